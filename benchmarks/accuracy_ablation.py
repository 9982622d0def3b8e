"""Accuracy ablation of CORP's variants on two small ViTs trained on scikit-learn's digits (offline).

Which of the project's departures from the paper pay off, alone and together, at
50/75/90% uniform sparsity (MLP hidden channels and attention query/key dims
pruned together), and at a global budget of 50% of the parameters:

- ``uncompensated``: ``method="paper", compensate=False`` (the paper's selection, no compensation)
- ``uncompensated-corp``: ``method="corp", compensate=False`` (corp's selection, no compensation)
- ``paper``: ``method="paper"`` (dense propagation, energy selection, pooled logit fit, uniform)
- ``+ec``: paper + error-correcting targets (``propagate="pruned", target="dense"``)
- ``+centred``: paper + ``logit_fit="centred"``
- ``+per_image``: paper + ``logit_fit="per_image"``
- ``+residual``: paper + ``selection="residual"``
- ``all``: paper + all of them (``propagate="pruned", target="dense", logit_fit="centred", selection="residual"``):
  ``corp.prune`` refuses ``logit_fit="per_image"`` with ``target="dense"``, so the combined row takes the
  centred fit
- ``all-pi``: the other combination with the exact per-image fit: ``propagate="pruned"`` (local targets),
  ``logit_fit="per_image"``, ``selection="residual"``
- ``corp``: ``method="corp"`` (the project's defaults, whatever they are); ``corp-no-outfit``: the same
  without the attention output fit (the default until 2026-12-01, late); the other ``corp-*`` variants
  of :data:`VARIANTS` also pin the output fit off, as they were measured before it was in the default

Budget block (``--budget 0.5``, ``--budget-metric params``):

- ``budget-uniform``: paper at the smallest uniform sparsity that removes at least the budget
  (``corp.budget.uniform_reference``)
- ``budget-paper``: ``method="paper", budget=...`` (non-uniform allocation)
- ``budget-all``: ``all`` + ``budget=...``
- ``budget-corp``: ``method="corp", budget=...``

Models: ``a`` is the demo's digits ViT (``corp.demo.digits_vit``: CLS token, 4 heads of 24, qkv bias);
``b`` is a second shape (no CLS token and average pooling, 8 heads of 16, no qkv bias, 5 blocks of
width 128), trained with the same code and cached the same way (``~/.cache/corp`` or ``$CORP_CACHE``);
``swiglu`` and ``eva`` are the tiny SwiGLU ViT and rotary Eva of ``corp.demo.DIGITS_FAMILIES``
(``python benchmarks/accuracy_ablation.py --models swiglu,eva --sparsities 0.5,0.75 --budget 0
--variants uncompensated-corp,uncompensated,paper,corp``). Calibration: the first 256 training images (as the demo); accuracy: top-1 on the test split.

A variant that raises (e.g. an option ``corp.prune`` does not accept yet) is shown as ``n/a`` with the
error's first line, and the run goes on.

    python benchmarks/accuracy_ablation.py                       # both models, 50/75/90%, budget 50% params
    python benchmarks/accuracy_ablation.py --models a --sparsities 0.75 --variants paper,all
    python benchmarks/accuracy_ablation.py --quick               # one model, one sparsity, 32 images
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import corp  # noqa: E402
import corp.budget  # noqa: E402
import corp.report  # noqa: E402
from corp.demo import DIGITS_FAMILIES, FAMILY_TRAIN_SETTINGS, TRAIN_SETTINGS, accuracy, digits_vit  # noqa: E402
from corp.demo import load_digits_data  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "accuracy_ablation.json"

# Overrides of corp.demo.DIGITS_FAMILIES (architecture; DIGITS_VIT_CONFIG unless family=) and TRAIN_SETTINGS (training) per model.
MODELS: dict[str, dict[str, Any]] = {
    "a": dict(label="A (demo digits ViT)", overrides={}),
    "b": dict(
        label="B (avg pool, no CLS, 8 heads, no qkv bias)",
        overrides=dict(embed_dim=128, num_heads=8, depth=5, qkv_bias=False, class_token=False, global_pool="avg"),
    ),
    # the tiny models of the other families (corp.demo.DIGITS_FAMILIES; tests/test_digits_families.py)
    "swiglu": dict(label="SwiGLU ViT (tiny, 3 blocks, dim 64, 60 epochs)", overrides=dict(family="swiglu_vit")),
    "eva": dict(label="rotary Eva (tiny, 3 blocks, dim 64, SwiGLUPacked, 60 epochs)", overrides=dict(family="eva")),
}

PAPER = dict(method="paper")
# logit_fit="per_image" cannot be combined with target="dense" (corp.prune raises ValueError): "all" takes the
# centred fit, "all-pi" keeps per_image and drops the dense targets.
ALL = dict(method="paper", propagate="pruned", target="dense", logit_fit="centred", selection="residual")
ALL_PI = dict(method="paper", propagate="pruned", logit_fit="per_image", selection="residual")

NO_OUTFIT = dict(attn_output_fit=False)

# name -> (label, extra corp.prune kwargs); sparsity rows
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uncompensated": ("uncompensated", dict(method="paper", compensate=False)),
    # corp's selection without compensation: the "no compensation" of tests/test_end_to_end_digits.py
    "uncompensated-corp": ("uncompensated-corp", dict(method="corp", compensate=False)),
    "paper": ("paper", dict(PAPER)),
    "+ec": ("+ec", dict(PAPER, propagate="pruned", target="dense")),
    "+centred": ("+centred", dict(PAPER, logit_fit="centred")),
    "+per_image": ("+per_image", dict(PAPER, logit_fit="per_image")),
    "+residual": ("+residual", dict(PAPER, selection="residual")),
    "all": ("all", dict(ALL)),
    "all-pi": ("all-pi", dict(ALL_PI)),
    "corp": ("corp", dict(method="corp")),
    # The variants below were measured before the attention output fit joined corp's preset
    # (2026-12-01, late): they pin it off (NO_OUTFIT) so that their README rows reproduce.
    "corp-no-outfit": ("corp-no-outfit", dict(method="corp", **NO_OUTFIT)),
    # q/k selected by the factorised residual (no eigensolve)
    "corp-factored": ("corp-factored", dict(method="corp", selection="residual_factored", **NO_OUTFIT)),
    # the default until 2026-12-01: the logit fit solved as the damped Sylvester equation (eigen form)
    "corp-sylvester-fit": ("corp-sylvester-fit", dict(method="corp", logit_solve="sylvester", **NO_OUTFIT)),
    # the attention output projection refitted to the dense attention's output (corp.fit.AttentionOutputFit)
    "corp+outfit": ("corp+outfit", dict(method="corp", attn_output_fit=True)),
    "corp-factored-fit": ("corp-factored-fit", dict(method="corp", logit_solve="factored", **NO_OUTFIT)),
    "corp-lowrank": ("corp-lowrank", dict(method="corp", logit_solve="lowrank", **NO_OUTFIT)),
    "corp-lowrank+outfit": ("corp-lowrank+outfit", dict(method="corp", logit_solve="lowrank", attn_output_fit=True)),
    "paper+outfit": ("paper+outfit", dict(PAPER, attn_output_fit=True)),
    # MLP statistics weighted per token by 1/σ_t² of the sum the MLP output joins (in every block)
    "corp-token-weighted": ("corp-token-weighted", dict(method="corp", mlp_token_weights="on", **NO_OUTFIT)),
}

# name -> (label, kwargs without the budget; "uniform": prune at the same-budget uniform sparsity instead)
BUDGET_VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "budget-uniform": ("paper uniform, same budget", dict(PAPER), True),
    "budget-paper": ("paper + non-uniform", dict(PAPER), False),
    "budget-all": ("all + non-uniform", dict(ALL), False),
    "budget-all-pi": ("all-pi + non-uniform", dict(ALL_PI), False),
    "budget-corp": ("corp + budget", dict(method="corp"), False),
    "budget-corp-no-outfit": ("corp-no-outfit + budget", dict(method="corp", **NO_OUTFIT), False),
    "budget-corp-factored": ("corp, factored q/k + budget",
                             dict(method="corp", selection="residual_factored", **NO_OUTFIT), False),
    "budget-corp-sylvester-fit": ("corp, Sylvester fit + budget",
                                  dict(method="corp", logit_solve="sylvester", **NO_OUTFIT), False),
    "budget-corp+outfit": ("corp+outfit + budget", dict(method="corp", attn_output_fit=True), False),
    "budget-corp-lowrank": ("corp-lowrank + budget", dict(method="corp", logit_solve="lowrank", **NO_OUTFIT),
                            False),
    "budget-corp-factored-fit": ("corp-factored-fit + budget",
                                 dict(method="corp", logit_solve="factored", **NO_OUTFIT), False),
    "budget-corp-token-weighted": ("corp-token-weighted + budget",
                                   dict(method="corp", mlp_token_weights="on", **NO_OUTFIT), False),
}

QUICK_CALIB = 32


# --------------------------------------------------------------------------- helpers


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(Path(corp.__file__).resolve().parent), *args],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def corp_commit() -> dict[str, Any]:
    """The git commit corp is imported from, and whether corp/ differs from it."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--", ".")
    return {"commit": commit, "corp_dirty": bool(dirty) if dirty is not None else None,
            "corp_path": str(Path(corp.__file__).resolve().parent)}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def fraction_removed(dense: torch.nn.Module, pruned: torch.nn.Module, metric: str = "params") -> float:
    count = corp.report.count_parameters if metric == "params" else corp.report.count_flops
    return 1.0 - count(pruned) / count(dense)


def block_widths(pruned: torch.nn.Module) -> Optional[list[dict[str, int]]]:
    rep = getattr(pruned, "corp_report", None)
    if rep is None:
        return None
    return [dict(mlp_hidden=b.mlp_hidden_after, qk_dim=b.qk_dim_after) for b in rep.blocks]


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return repr(obj)


@torch.no_grad()
def agreement(pruned: torch.nn.Module, dense: torch.nn.Module, images: torch.Tensor) -> float:
    """Percent of ``images`` whose top-1 class is the dense model's (a second, label-free metric: at
    low sparsity a pruned model can beat the dense one on labels by luck; it cannot agree more than 100%)."""
    return 100.0 * float((pruned(images).argmax(-1) == dense(images).argmax(-1)).double().mean())


def run_one(model: torch.nn.Module, calib: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
            kwargs: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Prune once with ``kwargs``, time it, evaluate; an exception becomes ``{"error": ...}``."""
    kwargs = dict(kwargs)
    kwargs.setdefault("batch_size", batch_size)
    kwargs.setdefault("progress", False)
    row: dict[str, Any] = {"kwargs": _jsonable(kwargs)}
    try:
        t = time.perf_counter()
        pruned = corp.prune(model, calib, **kwargs)
        row["prune_seconds"] = time.perf_counter() - t
        row["accuracy"] = accuracy(pruned, *test)
        row["agreement"] = agreement(pruned, model, test[0])
    except Exception as exc:  # an option not implemented yet, a failed solve, ...: report and go on
        row["error"] = first_line(exc)
        return row
    row["params"] = corp.report.count_parameters(pruned)
    row["flops"] = corp.report.count_flops(pruned)
    row["params_removed"] = fraction_removed(model, pruned, "params")
    row["flops_removed"] = fraction_removed(model, pruned, "flops")
    row["widths"] = block_widths(pruned)
    rep = getattr(pruned, "corp_report", None)
    if rep is not None and getattr(rep, "settings", None):
        row["settings"] = _jsonable(rep.settings)
    return row


def _cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "n/a"
    return f"{row['accuracy']:.2f}"


def _pct(p: float) -> str:
    s = f"{100 * p:.2f}".rstrip("0").rstrip(".")
    return f"{s}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), sep] + [fmt(r) for r in rows])


def _errors(results: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per (variant, error message), listing the columns where it happened."""
    seen: dict[tuple[str, str], list[str]] = {}
    for name, cols in results.items():
        for col, row in cols.items():
            if row and "error" in row:
                seen.setdefault((labels.get(name, name), row["error"]), []).append(col)
    return [f"  n/a {name} [{', '.join(cols)}]: {err}" for (name, err), cols in seen.items()]


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="a,b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--sparsities", default="0.5,0.75,0.9", help="uniform MLP+attention sparsities")
    ap.add_argument("--variants", default=None,
                    help=f"comma list (default all): {', '.join(list(VARIANTS) + list(BUDGET_VARIANTS))}")
    ap.add_argument("--budget", type=float, default=0.5, help="budget block: fraction removed (0: no budget block)")
    ap.add_argument("--budget-metric", default="params", choices=("params", "flops"))
    ap.add_argument("--calib", type=int, default=256, help="calibration images (first N training images)")
    ap.add_argument("--batch-size", type=int, default=64, help="corp.prune batch_size")
    ap.add_argument("--epochs", type=int, default=None, help="override the training epochs of every model")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="training seed of every model (default: corp.demo.TRAIN_SETTINGS's); other seeds stand "
                         "in for other machines' rounding, each trained once and cached under its own key")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: first model, first sparsity, {QUICK_CALIB} calibration images")
    ap.add_argument("--no-cache", action="store_true", help="train the models now, do not read or write the cache")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write all numbers ('' : nowhere)")
    args = ap.parse_args(argv)
    args.model_list = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    for m in args.model_list:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    known = list(VARIANTS) + list(BUDGET_VARIANTS)
    if args.variants:
        args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
        for v in args.variant_list:
            if v not in known and v != "dense":
                ap.error(f"unknown variant {v!r}; choose from {known}")
    else:
        args.variant_list = known
    if args.quick:
        args.model_list = args.model_list[:1]
        args.sparsity_list = args.sparsity_list[:1]
        args.calib = min(args.calib, QUICK_CALIB)
    return args


def main(argv: Optional[list[str]] = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ablation; print the tables; return (and write) everything as a dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_digits_data()
    test = (data.test_images, data.test_labels)
    calib = data.train_images[: args.calib]
    sparse_names = [v for v in args.variant_list if v in VARIANTS]
    budget_names = [v for v in args.variant_list if v in BUDGET_VARIANTS] if args.budget > 0 else []
    cols = [_pct(p) for p in args.sparsity_list]

    out: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "accuracy_ablation.main"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": corp_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "timm": __import__("timm").__version__, "corp": getattr(corp, "__version__", None)},
        "threads": torch.get_num_threads(),
        "calibration_images": int(calib.shape[0]),
        "test_images": int(test[0].shape[0]),
        "sparsities": args.sparsity_list,
        "variants": {v: _jsonable(VARIANTS[v][1]) for v in sparse_names},
        "budget": {"fraction": args.budget, "metric": args.budget_metric,
                   "variants": {v: _jsonable(BUDGET_VARIANTS[v][1]) for v in budget_names}} if budget_names else None,
        "models": {},
    }
    labels = {v: VARIANTS[v][0] for v in VARIANTS} | {v: BUDGET_VARIANTS[v][0] for v in BUDGET_VARIANTS}

    for key in args.model_list:
        spec = MODELS[key]
        overrides = dict(spec["overrides"])
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        if args.train_seed is not None:
            overrides["seed"] = args.train_seed
        t = time.perf_counter()
        model = digits_vit(data, cache=not args.no_cache, **overrides).eval()
        model_seconds = time.perf_counter() - t
        dense_acc = accuracy(model, *test)
        family = overrides.get("family", "vit")
        arch = {**DIGITS_FAMILIES[family], **{k: v for k, v in overrides.items() if k not in TRAIN_SETTINGS}}
        train = {**TRAIN_SETTINGS, **FAMILY_TRAIN_SETTINGS[family],
                 **{k: v for k, v in overrides.items() if k in TRAIN_SETTINGS}}
        entry: dict[str, Any] = {
            "label": spec["label"], "config": arch, "train": train, "overrides": overrides,
            "model_seconds": model_seconds, "dense_accuracy": dense_acc,
            "params": corp.report.count_parameters(model), "flops": corp.report.count_flops(model),
            "sparsity": {}, "budget": {},
        }
        out["models"][key] = entry
        print_fn(f"\n## Model {spec['label']}: {arch['depth']} blocks, dim {arch['embed_dim']}, "
                 f"{arch['num_heads']} heads, {entry['params']:,} params; dense top-1 {dense_acc:.2f}% "
                 f"({'trained' if model_seconds > 5 else 'loaded'} in {model_seconds:.1f}s); "
                 f"{calib.shape[0]} calibration images, {test[0].shape[0]} test images")

        results: dict[str, dict[str, Any]] = {}
        for name in sparse_names:
            results[name] = {}
            for p, col in zip(args.sparsity_list, cols):
                row = run_one(model, calib, test, dict(VARIANTS[name][1], mlp_sparsity=p, attn_sparsity=p),
                              args.batch_size)
                results[name][col] = row
                print_fn(f"  [{key}] {labels[name]:<14} {col:>4}: "
                         + (f"{row['accuracy']:6.2f}%  agrees with dense {row['agreement']:6.2f}%  "
                            f"({row['prune_seconds']:.1f}s)" if "error" not in row
                            else f"n/a ({row['error']})"))
        entry["sparsity"] = results
        rows = [["dense"] + [f"{dense_acc:.2f}"] * len(cols)]
        rows += [[labels[n]] + [_cell(results[n].get(c)) for c in cols] for n in sparse_names]
        print_fn(f"\n### Model {spec['label']}: top-1 % on the test split, uniform MLP + attention sparsity\n")
        print_fn(markdown_table(["variant"] + cols, rows))
        for line in _errors(results, labels):
            print_fn(line)

        if budget_names:
            try:
                p_uniform = corp.budget.uniform_reference(model, args.budget, args.budget_metric)
                entry["uniform_reference"] = p_uniform
            except Exception as exc:
                p_uniform = None
                entry["uniform_reference_error"] = first_line(exc)
            for name in budget_names:
                _, kw, uniform = BUDGET_VARIANTS[name]
                if uniform:
                    if p_uniform is None:
                        row = {"error": entry["uniform_reference_error"]}
                    else:
                        row = run_one(model, calib, test, dict(kw, mlp_sparsity=p_uniform, attn_sparsity=p_uniform),
                                      args.batch_size)
                        row["uniform_sparsity"] = p_uniform
                else:
                    row = run_one(model, calib, test, dict(kw, budget=args.budget, budget_metric=args.budget_metric),
                                  args.batch_size)
                entry["budget"][name] = row
                print_fn(f"  [{key}] {labels[name]:<27}: "
                         + (f"{row['accuracy']:6.2f}%  params removed {row['params_removed']:.2%}  "
                            f"({row['prune_seconds']:.1f}s)" if "error" not in row else f"n/a ({row['error']})"))
        print_fn(f"  model {key} done in {time.perf_counter() - t:.1f}s")

    if budget_names:
        keys = args.model_list
        header = ["budget: remove " + _pct(args.budget) + " of " + args.budget_metric]
        for k in keys:
            header += [f"{k.upper()} top-1 %", f"{k.upper()} params removed", f"{k.upper()} FLOPs removed"]
        rows = [["dense"] + sum([[f"{out['models'][k]['dense_accuracy']:.2f}", "0%", "0%"] for k in keys], [])]
        for name in budget_names:
            label = labels[name]
            if name == "budget-uniform":
                ps = [out["models"][k].get("uniform_reference") for k in keys]
                label += " (" + ", ".join(f"{k.upper()}: p={p:.4f}" for k, p in zip(keys, ps) if p is not None) + ")"
            cells = []
            for k in keys:
                row = out["models"][k]["budget"].get(name)
                if row is None or "error" in row:
                    cells += ["n/a" if row else "", "", ""]
                else:
                    cells += [f"{row['accuracy']:.2f}", f"{100 * row['params_removed']:.2f}%",
                              f"{100 * row['flops_removed']:.2f}%"]
            rows.append([label] + cells)
        print_fn(f"\n### Budget block: top-1 % on the test split at {_pct(args.budget)} of the {args.budget_metric} "
                 "removed (achieved fractions from corp.report)\n")
        print_fn(markdown_table(header, rows))
        for k in keys:
            for line in _errors({n: {k.upper(): r} for n, r in out["models"][k]["budget"].items()}, labels):
                print_fn(line)

    out["total_seconds"] = time.perf_counter() - t_start
    print_fn(f"\ntotal {out['total_seconds']:.1f}s; corp commit {out['git']['commit']}"
             + (" (corp/ modified)" if out["git"]["corp_dirty"] else ""))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(_jsonable(out), indent=2))
        os.replace(tmp, path)
        print_fn(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
