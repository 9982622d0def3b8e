"""Where a prune spends its time: statistics, selection, solves (``BlockReport.seconds_*``), by method
and calibration size, on deit_small with random weights (CPU unless --device).

Selection does not grow with the number of calibration images; statistics do. This prints both, and
selection's share of the statistics time, for each (method, images) pair, from one run each.

    python benchmarks/phase_times.py [--images 64,256] [--methods paper,corp] [--model deit_small_patch16_224]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import corp  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--images", default="64,256")
    p.add_argument("--methods", default="paper,corp")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    size = model.patch_embed.img_size
    print(f"# {args.model}, random weights, {args.sparsity:.0%} MLP + attention, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<7} {'images':>6} | {'total s':>8} {'statistics s':>12} {'selection s':>11} {'solve s':>8} | "
          f"{'selection / statistics':>22}")
    for n in (int(v) for v in args.images.split(",")):
        images = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1)).to(args.device)
        for method in args.methods.split(","):
            t = time.perf_counter()
            pruned = corp.prune(model, images, mlp_sparsity=args.sparsity, attn_sparsity=args.sparsity,
                                method=method, batch_size=32)
            total = time.perf_counter() - t
            blocks = pruned.corp_report.blocks
            stats = sum(b.seconds_statistics for b in blocks)
            sel = sum(b.seconds_selection for b in blocks)
            solve = sum(b.seconds_solve for b in blocks)
            print(f"{method:<7} {n:>6} | {total:>8.2f} {stats:>12.2f} {sel:>11.2f} {solve:>8.2f} | "
                  f"{sel / max(stats, 1e-9):>21.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
