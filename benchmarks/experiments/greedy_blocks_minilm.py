"""How many blocks the MLP residual greedy needs (corp.select.AUTO_MLP_BLOCKS), on a real model's
covariances: prunes all-MiniLM-L6-v2 with the default method and, for every block's MLP selection,
reruns the greedy on the same covariance with 64, 32 and 16 blocks and exactly (one channel per
step), printing each kept set's ridge objective J (fp64) relative to the exact greedy's, and the
greedy's time.

    HF_HUB_OFFLINE=1 python benchmarks/experiments/greedy_blocks_minilm.py [--calib 1024] [--sparsity 0.5]
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import corp.select as select  # noqa: E402
from corp.fit import damping, mlp_scale  # noqa: E402
from greedy_precision_minilm import prune_observing_mlp_selection, ridge_objective  # noqa: E402
from minilm_cosine import experiment_setup  # noqa: E402

BLOCKS = (64, 32, 16)


def main() -> int:
    args, model, batches = experiment_setup(__doc__.split("\n\n")[0])
    original = select.select_mlp_channels_by_residual
    print(f"# all-MiniLM-L6-v2, {args.calib} sentences, {args.sparsity:.0%}: J(kept) / J(exact greedy) − 1")

    def compare(cov, w2, keep, ridge, step=0):
        width = cov.shape[0]
        cov64, w64 = cov.to(torch.float64), w2.to(torch.float64)
        lam = float(damping(ridge, mlp_scale(cov64)))
        exact = ridge_objective(cov64, w64, original(cov, w2, keep, ridge, 1)[0], lam)
        cells = []
        for blocks in BLOCKS:
            t = time.perf_counter()
            kept, _ = original(cov, w2, keep, ridge, max(1, (width - keep) // blocks))
            seconds = time.perf_counter() - t
            cells.append(f"{blocks} blocks {ridge_objective(cov64, w64, kept, lam) / exact - 1:+.2e} ({seconds:.3f} s)")
        print(f"D {width}, keep {keep}: " + "; ".join(cells), flush=True)
        return original(cov, w2, keep, ridge, step)

    prune_observing_mlp_selection(compare, model, batches, args.sparsity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
