"""Scaling benchmark (issue 5): pruning time and peak memory versus depth and width.

Two modes, both on the CPU with random-weight timm ViTs (``pretrained=False``):

* the scaling table (default): for each of the ViT-S, ViT-B, ViT-L, ViT-H shapes, in its own
  subprocess, ``corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=8)``
  on a fixed set of random images; reports params, fp32 model size, one plain forward pass over
  the same images (median of 2 after a 1-image warm-up, ``no_grad``), the pruning time, the ratio
  prune/forward, the child's peak RSS and peak RSS − model size;

      python benchmarks/bench_scaling.py [--shapes s,b,l,h] [--images 16] [--out FILE] [--trace]

  (``--trace`` adds where the pruning time goes: statistics, solves, report forwards.)

* the memory check of issue 5: prune a ViT-Huge-shaped model (``vit_huge_patch14_224``) with
  64 calibration images and check that the peak RSS of the whole child process (model creation
  + pruning) stays under the fp32 model size + 3 GB; exit code 0 if it does, 1 if not. It also
  prints where the memory goes (RSS sampled over time from /proc/self/status, with marks at the
  engine's phases: copy of the model, embedding, each block's statistics, solves and report).

      python benchmarks/bench_scaling.py --memory-check [--images 64] [--batch-size N] [--inplace]

  The phase marks come from wrapping methods of corp's classes inside the child
  (``copy.deepcopy`` in corp.pipeline, ``TimmViT.embed``, ``_Run.load_block`` / ``finish_block``,
  ``AttentionPruner.prune``, ``MlpPruner.prune``); corp itself is not changed, and a name corp no
  longer has is skipped. glibc's ``mallinfo2`` at each mark and at the
  highest sample splits the RSS into live allocations, freed memory malloc keeps, and the rest (shared
  libraries); the report ends with an accounting of the peak. ``--inplace`` runs
  ``corp.prune(..., inplace=True)`` to show what the returned copy costs.

Both modes take ``--corp-src DIR`` to import corp from another directory (e.g. ``git archive C corp``
unpacked there, with the commit written to ``DIR/COMMIT``), so that a benchmark is not disturbed by
edits to the checkout while it runs; the report names the corp it measured.

GB = 10^9 bytes throughout. Each shape runs in a fresh interpreter, so the peak RSS is that
model's alone; the parent imports neither torch nor corp (a child's ``ru_maxrss`` may include
the parent's RSS at the time of the fork/exec, which is therefore kept to a few MB).
A child writes exactly one line starting with ``BENCH_JSON `` to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

SHAPES = {
    "s": ("ViT-S", "vit_small_patch16_224"),
    "b": ("ViT-B", "vit_base_patch16_224"),
    "l": ("ViT-L", "vit_large_patch16_224"),
    "h": ("ViT-H", "vit_huge_patch14_224"),
}
# The paper's method: the README's figures were measured with it (it was the default then; the
# default method="corp" adds residual selection's CPU eigensolves, see README "Beyond the paper").
SPARSITY = dict(mlp_sparsity=0.5, attn_sparsity=0.5, method="paper")
MARKER = "BENCH_JSON "
GB = 1e9
MEMORY_BUDGET_GB = 3.0  # issue 5: peak RSS < model size + 3 GB


# --------------------------------------------------------------------------- memory probes

def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS: current resident set; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / GB


def maxrss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: kB


def _mallinfo():
    """glibc's mallinfo2 (all arenas): bytes in use (heap + mmapped chunks) and free bytes malloc keeps."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Info

    def read() -> dict:
        m = fn()
        return dict(in_use_gb=(m.uordblks + m.hblkhd) / GB, mmapped_gb=m.hblkhd / GB, free_held_gb=m.fordblks / GB)

    return read


class RSSSampler:
    """Samples VmRSS in a background thread; keeps the timeline and labelled marks.

    The torch kernels release the GIL, so the thread keeps sampling during long ops; a
    sample every ``interval`` seconds can miss a shorter spike, which VmHWM/ru_maxrss do not.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS GB)
        self.marks: list[tuple[float, str, float]] = []  # (seconds, label, RSS GB at the mark)
        self.mark_malloc: list[dict] = []  # malloc statistics at each mark
        self.peak_malloc: dict = {}  # malloc statistics at the highest sampled RSS
        self._mallinfo = _mallinfo()
        self._max = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now, rss = time.perf_counter() - self.t0, rss_gb()
            self.samples.append((now, rss))
            if rss > self._max:
                self._max = rss
                if self._mallinfo is not None:
                    self.peak_malloc = dict(self._mallinfo(), t=now, rss_gb=rss)
            self._stop.wait(self.interval)

    def start(self) -> "RSSSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, label: str) -> None:
        now, rss = time.perf_counter() - self.t0, rss_gb()
        self.samples.append((now, rss))
        self.marks.append((now, label, rss))
        self.mark_malloc.append(self._mallinfo() if self._mallinfo is not None else {})

    def peak_between(self, t_from: float, t_to: float) -> float:
        vals = [r for t, r in self.samples if t_from <= t <= t_to]
        return max(vals) if vals else float("nan")

    def peak(self) -> tuple[float, float]:
        return max(((r, t) for t, r in self.samples), default=(float("nan"), float("nan")))


def _instrument_engine(sampler: RSSSampler) -> list[str]:
    """Put marks at the pipeline's phases by wrapping methods of corp's classes in this child process
    (corp.pipeline._Run, corp.parts, the timm adapter; corp's files are unchanged).

    Returns the names wrapped; a name corp no longer has is skipped, and the timeline still has its samples.
    """
    import corp.models.timm_vit as timm_vit
    import corp.parts as parts
    import corp.pipeline as pipeline

    wrapped = []

    def wrap(owner, name, before, after):
        fn = getattr(owner, name, None)
        if fn is None or not callable(fn):
            return

        def inner(*args, **kwargs):
            if before:
                sampler.mark(before(args, kwargs))
            out = fn(*args, **kwargs)
            if after:
                sampler.mark(after(args, kwargs))
            return out

        setattr(owner, name, inner)
        wrapped.append(f"{getattr(owner, '__name__', owner)}.{name}")

    copy_mod = getattr(pipeline, "copy", None)
    if copy_mod is not None and hasattr(copy_mod, "deepcopy"):
        class _Copy:  # stands in for the `copy` module inside corp.pipeline only
            @staticmethod
            def deepcopy(obj, *a, **k):
                sampler.mark("deepcopy start")
                out = copy_mod.deepcopy(obj, *a, **k)
                sampler.mark("deepcopy end")
                return out

            def __getattr__(self, item):
                return getattr(copy_mod, item)

        pipeline.copy = _Copy()
        wrapped.append("copy.deepcopy")
    state = {"embedded": 0}

    def after_embed(args, kwargs):
        state["embedded"] += 1
        return f"embed batch {state['embedded']}"

    wrap(timm_vit.TimmViT, "embed", None, after_embed)
    # a block runs from its load (copy, lazy weights, move) to finish_block (back home, checkpoint)
    wrap(pipeline._Run, "load_block", None, lambda a, k: f"block {a[1]} start")
    wrap(pipeline._Run, "finish_block", None, lambda a, k: f"block {a[1]} end")
    wrap(parts.AttentionPruner, "prune", lambda a, k: "attn solve start", lambda a, k: "attn solve end")
    wrap(parts.MlpPruner, "prune", lambda a, k: "mlp solve start", lambda a, k: "mlp solve end")
    return wrapped


# --------------------------------------------------------------------------- child

BLOCK_PHASES = ("before block (copy, move)", "statistics (forward + hooks)", "attention solve",
                "MLP solve", "between solves", "report forwards")


def _phase_of(start: str, end: str) -> str:
    """The category of the interval between two consecutive marks inside the block loop."""
    if start.startswith("attn solve start"):
        return "attention solve"
    if start.startswith("mlp solve start"):
        return "MLP solve"
    if start.startswith("block ") and start.endswith(" start"):
        return "statistics (forward + hooks)"
    if start.startswith("mlp solve end") and end.startswith("block "):
        return "report forwards"
    if start.startswith("attn solve end") and end.startswith("block "):
        return "report forwards"
    if start.startswith("block ") and start.endswith(" end") or start.startswith("deepcopy"):
        return "before block (copy, move)"
    return "between solves"


def _analyse_trace(sampler: RSSSampler, model_gb: float, baseline_gb: float) -> dict:
    """RSS at each top-level mark, and per block the peak RSS inside each phase (see BLOCK_PHASES).

    Intervals before the first block and after the last one are listed as they are; the intervals between
    "block k end" and "block k+1 start" (the next block's copy and move) are credited to block k+1.
    """
    marks, mal = sampler.marks, sampler.mark_malloc
    top, blocks = [], {}
    current = None  # the block whose phases are being collected
    pending = 0.0  # peak RSS since the last "block k end"
    seconds: dict[str, float] = {}  # time per phase, summed over blocks
    n_blocks_started = sum(1 for _, lab, _ in marks if lab.startswith("block ") and lab.endswith(" start"))
    for i, ((t_a, label_a, rss_a), (t_b, label_b, rss_b)) in enumerate(zip(marks, marks[1:])):
        peak = sampler.peak_between(t_a, t_b)
        m_b = mal[i + 1] if i + 1 < len(mal) else {}
        if label_b.startswith("block ") and label_b.endswith(" start"):
            if current is None:  # before the first block: the model copy, the embedding, ...
                top.append(dict(start=label_a, end=label_b, t0=t_a, t1=t_b, rss_start_gb=rss_a, peak_gb=peak,
                                rss_end_gb=rss_b, in_use_end_gb=m_b.get("in_use_gb"),
                                free_held_end_gb=m_b.get("free_held_gb")))
                phases = {}
            else:
                phases = {"before block (copy, move)": max(pending, peak)}
            current = int(label_b.split()[1])
            blocks[current] = dict(start_gb=rss_b, t_start=t_b, phases=phases, in_use_start_gb=m_b.get("in_use_gb"))
            pending = 0.0
            continue
        block_done = current is not None and "end_gb" in blocks[current]
        if current is None or (block_done and len(blocks) == n_blocks_started and not label_a.startswith("block ")
                               and not label_a.startswith("deepcopy")) or label_a == "prune end":
            top.append(dict(start=label_a, end=label_b, t0=t_a, t1=t_b, rss_start_gb=rss_a, peak_gb=peak,
                            rss_end_gb=rss_b, in_use_end_gb=m_b.get("in_use_gb"),
                            free_held_end_gb=m_b.get("free_held_gb")))
            continue
        if label_b == f"block {current} end":
            blocks[current].update(end_gb=rss_b, t_end=t_b, in_use_end_gb=m_b.get("in_use_gb"),
                                   free_held_end_gb=m_b.get("free_held_gb"))
        if block_done:  # between this block's end and the next block's start (or the end of pruning)
            if label_b == "prune end":
                top.append(dict(start=label_a, end=label_b, t0=t_a, t1=t_b, rss_start_gb=rss_a, peak_gb=peak,
                                rss_end_gb=rss_b, in_use_end_gb=m_b.get("in_use_gb"),
                                free_held_end_gb=m_b.get("free_held_gb")))
            else:
                pending = max(pending, peak)
                seconds["before block (copy, move)"] = seconds.get("before block (copy, move)", 0.0) + (t_b - t_a)
            continue
        ph = _phase_of(label_a, label_b)
        blocks[current]["phases"][ph] = max(blocks[current]["phases"].get(ph, 0.0), peak)
        seconds[ph] = seconds.get(ph, 0.0) + (t_b - t_a)
    for blk in blocks.values():
        blk["peak_gb"] = max(blk["phases"].values(), default=blk["start_gb"])
    in_use_at = {lab: m.get("in_use_gb") for (_, lab, _), m in zip(marks, mal) if not lab.startswith(("block", "attn",
                                                                                                  "mlp", "embed"))}
    peak_rss, peak_t = sampler.peak()
    where = None
    for (t_a, label_a, _), (t_b, label_b, _) in zip(marks, marks[1:]):
        if t_a <= peak_t <= t_b:
            where = f"{label_a} -> {label_b}"
    return dict(top=top, blocks=blocks, peak_rss_sampled_gb=peak_rss, peak_t=peak_t, peak_phase=where,
                phase_seconds=seconds, in_use_at=in_use_at, peak_malloc=sampler.peak_malloc, model_gb=model_gb, baseline_gb=baseline_gb)


def _forward_all(model, images, batch_size):
    import torch

    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size])


def child(cfg: dict) -> dict:
    t_start = time.perf_counter()
    sampler = RSSSampler().start()
    sampler.mark("child start")
    import torch
    import timm

    import corp

    sampler.mark("imports done (python + torch + timm + corp)")
    rss_imports = rss_gb()
    corp_dir = os.path.dirname(os.path.abspath(corp.__file__))
    provenance = _provenance(corp_dir)  # at import time: the checkout may move on while this runs
    load_start = os.getloadavg()[0]
    torch.manual_seed(cfg["seed"])
    model = timm.create_model(cfg["model"], pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    model_gb = model_bytes / GB
    sampler.mark("model built")
    rss_model = rss_gb()
    size = model.patch_embed.img_size
    gen = torch.Generator().manual_seed(cfg["seed"])
    images = torch.randn(cfg["images"], 3, size[0], size[1], generator=gen)
    out_images_gb = images.numel() * images.element_size() / GB
    tokens_per_image = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)

    out = dict(model=cfg["model"], label=cfg["label"], params_m=params / 1e6, model_gb=model_gb,
               depth=len(model.blocks), width=model.embed_dim, mlp_hidden=model.blocks[0].mlp.fc1.out_features,
               heads=model.blocks[0].attn.num_heads, tokens=tokens_per_image, images=cfg["images"],
               batch_size=cfg["batch_size"], threads=torch.get_num_threads(),
               rss_after_imports_gb=rss_imports, rss_after_model_gb=rss_model)
    # sizes for the memory accounting (fp32, GB)
    import inspect

    prune_batch = cfg["batch_size_prune"] or inspect.signature(corp.prune).parameters["batch_size"].default
    blk = model.blocks[0]
    out.update(
        prune_batch=prune_batch,
        images_gb=out_images_gb,
        states_gb=cfg["images"] * tokens_per_image * model.embed_dim * 4 / GB,
        block_gb=sum(p.numel() for p in blk.parameters()) * 4 / GB,
        mlp_gram_gb=blk.mlp.fc1.out_features ** 2 * 8 / GB,
        batch_mlp_act_gb=min(prune_batch, cfg["images"]) * tokens_per_image * blk.mlp.fc1.out_features * 4 / GB,
    )

    if cfg["forward"]:
        with torch.no_grad():
            model(images[:1])  # warm-up
        times = []
        for _ in range(2):
            t = time.perf_counter()
            _forward_all(model, images, cfg["batch_size"])
            times.append(time.perf_counter() - t)
        out["forward_s"] = statistics.median(times)
        out["forward_runs_s"] = times
        sampler.mark("forward timed")

    if cfg["trace"]:
        out["instrumented"] = _instrument_engine(sampler)
    out["rss_before_prune_gb"] = rss_gb()
    out["maxrss_before_prune_gb"] = maxrss_gb()
    sampler.mark("prune start")
    kwargs = dict(SPARSITY)
    if cfg["batch_size_prune"] is not None:
        kwargs["batch_size"] = cfg["batch_size_prune"]
    if cfg["inplace"]:
        kwargs["inplace"] = True
    t = time.perf_counter()
    pruned = corp.prune(model, images, **kwargs)
    out["prune_s"] = time.perf_counter() - t
    sampler.mark("prune end")
    out["rss_after_prune_gb"] = rss_gb()
    out["peak_rss_gb"] = maxrss_gb()  # ru_maxrss of this child: model creation + (forward) + pruning
    out["vmhwm_gb"] = _status_kb("VmHWM") * 1024 / GB
    out["params_after_m"] = pruned.corp_report.params_after / 1e6
    out["pruned_model_gb"] = pruned.corp_report.params_after * 4 / GB
    out["prune_kwargs"] = {k: v for k, v in kwargs.items()}
    out["child_s"] = time.perf_counter() - t_start
    out["provenance"] = provenance
    out["loadavg_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    out["corp_dir"] = corp_dir
    sampler.stop()
    if cfg["trace"]:
        out["trace"] = _analyse_trace(sampler, model_gb, rss_imports)
    return out


# --------------------------------------------------------------------------- parent

def run_child(cfg: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    print(f"[bench_scaling] {cfg['label']} ({cfg['model']}), {cfg['images']} images ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    env = dict(os.environ)
    if cfg.get("corp_src"):  # import corp from this directory instead of the installed one
        env["PYTHONPATH"] = os.path.abspath(cfg["corp_src"]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"child for {cfg['model']} failed (exit code {proc.returncode})")
    result = json.loads(lines[-1][len(MARKER):])
    print(f"[bench_scaling]   done in {time.perf_counter() - t:.1f}s: " + ", ".join(
        f"{k}={result[k]:.2f}" for k in ("forward_s", "prune_s", "peak_rss_gb") if k in result),
        file=sys.stderr, flush=True)
    return result


def _provenance(corp_dir: str) -> str:
    """Which corp the child imported: its directory, and the git commit when it is a checkout."""
    root = os.path.dirname(corp_dir)
    marker = os.path.join(root, "COMMIT")  # a snapshot (e.g. `git archive C corp`) may name its commit here
    if os.path.exists(marker):
        with open(marker) as f:
            return f"corp at {f.read().strip()} (snapshot in {corp_dir})"
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0 or not head.stdout.strip():
            return f"corp from {corp_dir}"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "corp"], capture_output=True,
                               text=True).stdout
        return f"corp at {head.stdout.strip()}" + (" + uncommitted changes under corp/" if dirty.strip() else "") + \
            f" ({corp_dir})"
    except OSError:
        return f"corp from {corp_dir}"


def _command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def scaling_table(args) -> str:
    rows = []
    for key in args.shapes.split(","):
        key = key.strip().lower()
        if key not in SHAPES:
            raise SystemExit(f"unknown shape {key!r}; choose from {','.join(SHAPES)}")
        label, name = SHAPES[key]
        rows.append(run_child(dict(label=label, model=name, images=args.images, batch_size=args.batch_size,
                                   batch_size_prune=args.batch_size, seed=args.seed, forward=True, trace=args.trace,
                                   inplace=False, corp_src=args.corp_src)))
    r0 = rows[0]
    lines = [
        f"Scaling: corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size={args.batch_size}), "
        f"random weights, {args.images} random images, CPU ({r0['threads']} threads), one subprocess per shape; "
        f"{r0['provenance']}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| shape | timm model | depth | width | MLP | tokens | params (M) | model (GB, fp32) | forward (s) "
        "| prune (s) | prune/forward | peak RSS (GB) | peak RSS − model (GB) | RSS before prune (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | `{r['model']}` | {r['depth']} | {r['width']} | {r['mlp_hidden']} | {r['tokens']} "
            f"| {r['params_m']:.1f} | {r['model_gb']:.2f} | {r['forward_s']:.2f} | {r['prune_s']:.2f} "
            f"| {r['prune_s'] / r['forward_s']:.2f}× | {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['model_gb']:.2f} "
            f"| {r['rss_before_prune_gb']:.2f} |"
        )
    loads = [x for r in rows for x in r["loadavg_1min"]]
    if args.trace:
        lines += ["", "Where the pruning time goes (seconds summed over blocks; --trace):", "",
                  "| shape | " + " | ".join(BLOCK_PHASES) + " | outside the blocks |",
                  "|---|" + "---|" * (len(BLOCK_PHASES) + 1)]
        for r in rows:
            secs = r["trace"]["phase_seconds"]
            rest = r["prune_s"] - sum(secs.values())
            lines.append(f"| {r['label']} | " + " | ".join(f"{secs.get(ph, 0.0):.2f}" for ph in BLOCK_PHASES)
                         + f" | {rest:.2f} |")
    lines += [
        "",
        "forward: one plain forward pass over the same images in batches of "
        f"{args.batch_size}, no_grad, median of 2 after a 1-image warm-up. peak RSS: ru_maxrss of the child "
        "(model creation, the forward passes and pruning; Python + torch alone take "
        f"{r0['rss_after_imports_gb']:.2f} GB). RSS before prune: the model's own footprint plus that runtime. "
        f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f} (2 cores: above ~2 means other "
        "processes competed for the CPU and the times are inflated).",
        "",
        f"command: {_command_line()}",
    ]
    return "\n".join(lines)


def _gb(v) -> str:
    return "" if v is None else f"{v:.2f}"


def _fmt_trace(tr: dict) -> list[str]:
    out = ["", "RSS over time (VmRSS from /proc/self/status, sampled every 20 ms, plus marks at the pipeline's phases; "
               "malloc: glibc mallinfo2 at the closing mark, 'in use' = live heap + mmapped chunks, 'free held' = "
               "freed bytes malloc keeps):",
           "", "| phase (mark → mark) | t (s) | RSS at start | peak in phase | RSS at end | malloc in use | "
               "malloc free held |", "|---|---|---|---|---|---|---|"]
    top = tr["top"]
    embeds = [p for p in top if p["start"].startswith("embed batch") and p["end"].startswith("embed batch")]
    for ph in top:
        if len(embeds) > 2 and ph in embeds:
            if ph is embeds[0]:
                last = embeds[-1]
                out.append(f"| embed batch 1 → … → {last['end']} | {ph['t0']:.1f}–{last['t1']:.1f} "
                           f"| {ph['rss_start_gb']:.2f} | {max(e['peak_gb'] for e in embeds):.2f} "
                           f"| {last['rss_end_gb']:.2f} | {_gb(last['in_use_end_gb'])} | {_gb(last['free_held_end_gb'])} |")
            continue
        out.append(f"| {ph['start']} → {ph['end']} | {ph['t0']:.1f}–{ph['t1']:.1f} | {ph['rss_start_gb']:.2f} "
                   f"| {ph['peak_gb']:.2f} | {ph['rss_end_gb']:.2f} | {_gb(ph['in_use_end_gb'])} "
                   f"| {_gb(ph['free_held_end_gb'])} |")
    blocks = tr["blocks"]
    used = [ph for ph in BLOCK_PHASES if any(ph in b["phases"] for b in blocks.values())]
    out += ["", "Per block (GB): RSS at the block's start, the peak RSS inside each phase, RSS at the block's end, "
                "and malloc's bytes in use / free held at the end:", "",
            "| block | start | " + " | ".join(used) + " | end | in use | free held | seconds |",
            "|---|---|" + "---|" * len(used) + "---|---|---|---|"]
    for k in sorted(blocks, key=int):  # keys are strings after the JSON round trip
        b = blocks[k]
        cells = " | ".join(f"{b['phases'][ph]:.2f}" if ph in b["phases"] else "" for ph in used)
        out.append(f"| {k} | {b['start_gb']:.2f} | {cells} | {_gb(b.get('end_gb'))} | {_gb(b.get('in_use_end_gb'))} "
                   f"| {_gb(b.get('free_held_end_gb'))} | {b.get('t_end', float('nan')) - b['t_start']:.1f} |")
    secs = tr.get("phase_seconds") or {}
    if secs:
        out += ["", "Time per phase, summed over blocks: " + ", ".join(
            f"{ph} {secs[ph]:.1f} s" for ph in BLOCK_PHASES if ph in secs) + "."]
    out += ["", f"sampled peak {tr['peak_rss_sampled_gb']:.2f} GB at t = {tr['peak_t']:.1f} s, between the marks "
                f"'{tr['peak_phase']}'"]
    pm = tr.get("peak_malloc") or {}
    if pm:
        out[-1] += (f"; malloc at the highest sample ({pm['rss_gb']:.2f} GB, t = {pm['t']:.1f} s): in use "
                    f"{pm['in_use_gb']:.2f} GB (of which mmapped {pm['mmapped_gb']:.2f}), free held {pm['free_held_gb']:.2f} GB")
    return out


def _fmt_accounting(r: dict) -> list[str]:
    """Split the peak RSS into parts, from glibc's malloc statistics at the marks and at the highest sample.

    Parts: memory outside malloc (shared libraries, interpreter); malloc in use after the imports; the input
    model; the calibration images; what corp.prune holds when the peak block starts (its copy of the model or
    the pruned blocks so far, and one copy of the hidden states, computed from their shape); what the peak
    block adds (the next block's input, statistics, solve and activation temporaries); freed memory malloc
    keeps (fragmentation).
    """
    tr = r["trace"]
    pm, at = tr.get("peak_malloc") or {}, tr.get("in_use_at") or {}
    imports = at.get("imports done (python + torch + timm + corp)")
    built, start = at.get("model built"), at.get("prune start")
    peak_t = pm.get("t")
    blk = None
    for k, b in tr["blocks"].items():
        if peak_t is not None and b["t_start"] <= peak_t <= b.get("t_end", float("inf")):
            blk = (k, b)
    if not pm or None in (imports, built, start) or blk is None or blk[1].get("in_use_start_gb") is None:
        return ["", "(no malloc statistics at the peak: accounting skipped)"]
    k, b = blk
    held = b["in_use_start_gb"] - start  # corp.prune's own memory when the peak block starts
    parts = [
        ("outside malloc: shared libraries (libtorch …), interpreter", pm["rss_gb"] - pm["in_use_gb"] - pm["free_held_gb"]),
        ("malloc in use after the imports", imports),
        ("input model (malloc growth while timm builds it)", built - imports),
        (f"calibration images ({r['images_gb']:.3f} GB) and the rest up to the prune call", start - built),
        (f"corp.prune at the start of block {k}: hidden states (1 copy, from their shape)", r["states_gb"]),
        (f"corp.prune at the start of block {k}: model copy / pruned blocks so far / stem", held - r["states_gb"]),
        (f"inside block {k} at the peak: next hidden states, statistics, solve and activation temporaries",
         pm["in_use_gb"] - b["in_use_start_gb"]),
        ("freed memory malloc keeps (fragmentation)", pm["free_held_gb"]),
    ]
    total = sum(v for _, v in parts)
    out = ["", f"Accounting of the peak ({pm['rss_gb']:.2f} GB sampled at t = {peak_t:.1f} s, in block {k}):", "",
           "| part | GB | share |", "|---|---|---|"]
    out += [f"| {name} | {v:.3f} | {100 * v / total:.0f}% |" for name, v in parts]
    out.append(f"| total | {total:.3f} | |")
    return out


def memory_check(args) -> tuple[str, bool]:
    label, name = SHAPES[args.memory_shape]
    r = run_child(dict(label=label, model=name, images=args.images, batch_size=args.batch_size or 32,
                       batch_size_prune=args.batch_size, seed=args.seed, forward=False, trace=True,
                       inplace=args.inplace, corp_src=args.corp_src))
    limit = r["model_gb"] + MEMORY_BUDGET_GB
    ok = r["peak_rss_gb"] < limit
    kw = ", ".join(f"{k}={v}" for k, v in r["prune_kwargs"].items())
    batch_note = "" if args.batch_size else " (batch_size: corp's default)"
    lines = [
        f"Memory check (issue 5): corp.prune({name} [random weights], {r['images']} random images, {kw})"
        f"{batch_note}, CPU ({r['threads']} threads); {r['provenance']}; {time.strftime('%Y-%m-%d')}; "
        f"1-minute load average {r['loadavg_1min'][0]:.1f} → {r['loadavg_1min'][1]:.1f}.",
        "Peak RSS is measured over the whole child process: Python + torch + timm + corp imports, model creation "
        "and pruning (ru_maxrss of a fresh interpreter).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| params | {r['params_m']:.1f} M (after pruning {r['params_after_m']:.1f} M) |",
        f"| model size (fp32) | {r['model_gb']:.3f} GB |",
        f"| RSS after imports (Python + torch + timm + corp) | {r['rss_after_imports_gb']:.3f} GB |",
        f"| RSS after model creation (before pruning) | {r['rss_before_prune_gb']:.3f} GB |",
        f"| peak RSS (ru_maxrss, whole child) | {r['peak_rss_gb']:.3f} GB (VmHWM {r['vmhwm_gb']:.3f} GB) |",
        f"| peak RSS − model size | {r['peak_rss_gb'] - r['model_gb']:.3f} GB |",
        f"| limit: model size + {MEMORY_BUDGET_GB:g} GB | {limit:.3f} GB |",
        f"| RSS after pruning (input + pruned model alive) | {r['rss_after_prune_gb']:.3f} GB |",
        f"| pruning time | {r['prune_s']:.1f} s (whole child {r['child_s']:.1f} s) |",
        "",
        f"RESULT: peak RSS {r['peak_rss_gb']:.2f} GB {'<' if ok else '>='} model size {r['model_gb']:.2f} GB "
        f"+ {MEMORY_BUDGET_GB:g} GB = {limit:.2f} GB: {'PASS' if ok else 'FAIL'}",
    ]
    lines += [
        "",
        "Sizes for the accounting (fp32): "
        f"one copy of the calibration hidden states {r['states_gb']:.3f} GB ({r['images']} × {r['tokens']} tokens × "
        f"{r['width']}); one block {r['block_gb']:.3f} GB; one MLP Gram (fp64, {r['mlp_hidden']}²) "
        f"{r['mlp_gram_gb']:.3f} GB; MLP hidden activations of one batch of {r['prune_batch']} "
        f"{r['batch_mlp_act_gb']:.3f} GB; pruned model {r['pruned_model_gb']:.3f} GB.",
    ]
    lines += _fmt_trace(r["trace"])
    lines += _fmt_accounting(r)
    lines += ["", f"command: {_command_line()}"]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(r, f, indent=1)
    return "\n".join(lines), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="s,b,l,h", help="comma-separated subset of s,b,l,h (default: all)")
    p.add_argument("--images", type=int, default=None, help="calibration images (default 16; 64 with --memory-check)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of pruning and forward (table default 8; memory check default: corp's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the printed report to this file")
    p.add_argument("--trace", action="store_true",
                   help="table: also sample RSS and time the pipeline's phases (adds a time-breakdown table)")
    p.add_argument("--memory-check", action="store_true", help="issue 5's ViT-H peak-RSS check (exit code 0/1)")
    p.add_argument("--inplace", action="store_true", help="memory check with corp.prune(..., inplace=True) (diagnosis)")
    p.add_argument("--memory-shape", default="h", choices=sorted(SHAPES),
                   help="model of the memory check (default h, the issue's ViT-Huge; others for quick trials)")
    p.add_argument("--corp-src", default=None,
                   help="import corp from this directory (put on the children's PYTHONPATH), e.g. a snapshot of a commit")
    p.add_argument("--json-out", default=None, help="memory check: write the child's raw measurements (incl. trace)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        result = child(json.loads(args.child))
        sys.stdout.write(MARKER + json.dumps(result) + "\n")
        sys.stdout.flush()
        return 0

    if args.memory_check:
        args.images = args.images or 64
        report, ok = memory_check(args)
        code = 0 if ok else 1
    else:
        args.images = args.images or 16
        args.batch_size = args.batch_size or 8
        report, code = scaling_table(args), 0
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
