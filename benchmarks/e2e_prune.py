"""End-to-end pruning time of the default method, with per-phase seconds, on one device.

Random weights and random images (no hub): ``timm.create_model(name, pretrained=False)``, N
images of the model's size, 50% MLP + 50% q/k by default, the model and its forward passes in
``--dtype`` (statistics and solves stay fp64). Prints, per model: one forward pass over the same
images, the prune's wall time and its ratio, and the sum over blocks of the report's phases
(statistics passes, selection, solves + folds; the rest is propagation, report forwards, copies).

    python benchmarks/e2e_prune.py --device cuda --dtype bf16 --images 1024 \\
        --models deit3_huge_patch14_224,deit_small_patch16_224,vit_base_patch16_224
    python benchmarks/e2e_prune.py --images 16 --models deit_small_patch16_224     # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import corp  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_seconds(model, images, batch_size: int, device) -> float:
    model(images[:batch_size])  # warm-up (kernel selection, autotuning)
    _sync(device)
    t = time.perf_counter()
    for start in range(0, images.shape[0], batch_size):
        model(images[start:start + batch_size])
    _sync(device)
    return time.perf_counter() - t


def run(name: str, args, device, dtype) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=dtype)
    size = model.patch_embed.img_size
    images = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(1)).to(device=device,
                                                                                               dtype=dtype)
    fwd = forward_seconds(model, images, args.batch_size, device)
    _sync(device)
    t = time.perf_counter()
    pruned = corp.prune(model, images, mlp_sparsity=args.sparsity, attn_sparsity=args.sparsity, method=args.method,
                        batch_size=args.batch_size, inplace=True, report_images=args.report_images)
    _sync(device)
    seconds = time.perf_counter() - t
    blocks = pruned.corp_report.blocks
    row = dict(model=name, images=args.images, method=args.method, dtype=args.dtype, device=str(device),
               forward_s=fwd, prune_s=seconds, ratio=seconds / fwd,
               statistics_s=sum(b.seconds_statistics for b in blocks),
               selection_s=sum(b.seconds_selection for b in blocks),
               solve_s=sum(b.seconds_solve for b in blocks),
               backend=pruned.corp_report.settings.get("backend"))
    row["other_s"] = seconds - row["statistics_s"] - row["selection_s"] - row["solve_s"]
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model, pruned, images
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_small_patch16_224")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="corp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--report-images", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"# corp.prune end to end: {args.images} random images, {args.sparsity:.0%}/{args.sparsity:.0%}, "
          f"method={args.method}, {args.dtype} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"), flush=True)
    print(f"{'model':<28} {'forward s':>9} {'prune s':>8} {'ratio':>6} | {'stats s':>8} {'select s':>8} "
          f"{'solve s':>8} {'other s':>8}", flush=True)
    rows = []
    for name in args.models.split(","):
        r = run(name, args, device, dtype)
        rows.append(r)
        print(f"{name:<28} {r['forward_s']:>9.2f} {r['prune_s']:>8.2f} {r['ratio']:>5.2f}x | {r['statistics_s']:>8.2f} "
              f"{r['selection_s']:>8.2f} {r['solve_s']:>8.2f} {r['other_s']:>8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
