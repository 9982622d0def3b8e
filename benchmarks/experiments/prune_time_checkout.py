"""Prune time of ``method="paper"`` and ``method="corp"`` with the corp of a given checkout, for A/B runs.

deit_small (random weights), 64 random images, 50/50, CPU: one warm-up prune, then ``--rounds``
rounds of (paper, corp); prints the times and corp ÷ paper (medians). Alternate two checkouts
so that drifting machine speed reaches both alike, e.g. (a worktree of an older revision at /tmp/base):

    git worktree add /tmp/base <rev> && cp corp/_C*.so /tmp/base/corp/   # same csrc: same extension
    for i in 1 2 3; do python benchmarks/experiments/prune_time_checkout.py /tmp/base
                       python benchmarks/experiments/prune_time_checkout.py .; done
"""
import argparse
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("checkout", help="the repository whose corp/ is imported")
ap.add_argument("--rounds", type=int, default=2)
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.checkout))

import timm  # noqa: E402
import torch  # noqa: E402

import corp  # noqa: E402

torch.manual_seed(0)
model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
images = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
kwargs = dict(batch_size=32, mlp_sparsity=0.5, attn_sparsity=0.5)
corp.prune(model, images[:32], **kwargs)  # warm-up
seconds = {"paper": [], "corp": []}
for _ in range(args.rounds):
    for method in seconds:
        start = time.perf_counter()
        corp.prune(model, images, method=method, **kwargs)
        seconds[method].append(time.perf_counter() - start)
med = {k: statistics.median(v) for k, v in seconds.items()}
print(f"{os.path.dirname(corp.__file__)}: paper " + ", ".join(f"{t:.2f}" for t in seconds["paper"])
      + " s; corp " + ", ".join(f"{t:.2f}" for t in seconds["corp"]) + f" s; corp / paper {med['corp'] / med['paper']:.3f}")
