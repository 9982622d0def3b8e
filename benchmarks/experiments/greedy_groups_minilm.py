"""Whether the MLP residual greedy could run on groups of channels (a block-diagonal approximation of
``H = Σ + λI``) to make its ``D³`` inverse ``g²`` times cheaper (issue 11's ViT-H target), measured on a
real model's covariances: prunes all-MiniLM-L6-v2 with the default method and, for every block's MLP
selection, reruns the greedy on ``g`` = 2 and 4 groups of channels (contiguous, or a random partition),
each group keeping its share of the channels, and prints the kept set's ridge objective ``J`` (fp64, on
the full covariance) relative to the default greedy's, and the times.

    HF_HUB_OFFLINE=1 python benchmarks/experiments/greedy_groups_minilm.py [--calib 1024] [--sparsity 0.5]
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import corp.select as select  # noqa: E402
from corp.fit import damping, mlp_scale  # noqa: E402
from greedy_precision_minilm import prune_observing_mlp_selection, ridge_objective  # noqa: E402
from minilm_cosine import experiment_setup  # noqa: E402

GROUPS = (2, 4)


def grouped_greedy(cov: torch.Tensor, w2: torch.Tensor, keep: int, lam: float, groups: int,
                   order: torch.Tensor) -> torch.Tensor:
    """Kept channels (sorted) of the default greedy run separately on each of ``groups`` parts of
    ``order`` (a permutation of the channels), each keeping its proportional share of ``keep``."""
    parts = torch.tensor_split(order, groups)
    shares = [keep * len(p) // cov.shape[0] for p in parts]
    for i in range(keep - sum(shares)):  # the remainder to the first parts
        shares[i] += 1
    kept = []
    for part, share in zip(parts, shares):
        sub = cov.index_select(0, part).index_select(1, part).to(select.GREEDY_DTYPE)
        with select._ieee_fp32_matmuls():
            alive, _, _ = select._mlp_greedy(sub, w2[:, part].to(select.GREEDY_DTYPE), share, lam,
                                             select.auto_mlp_step(len(part), share))
        kept.append(part[alive])
    return torch.sort(torch.cat(kept)).values


def main() -> int:
    args, model, batches = experiment_setup(__doc__.split("\n\n")[0])
    original = select.select_mlp_channels_by_residual
    print(f"# all-MiniLM-L6-v2, {args.calib} sentences, {args.sparsity:.0%}: J(kept) / J(default greedy) − 1")
    generator = torch.Generator().manual_seed(0)

    def compare(cov, w2, keep, ridge, step=0):
        width = cov.shape[0]
        cov64, w64 = cov.to(torch.float64), w2.to(torch.float64)
        lam = float(damping(ridge, mlp_scale(cov64)))
        t = time.perf_counter()
        kept, pruned = original(cov, w2, keep, ridge, step)
        cells = [f"default greedy {time.perf_counter() - t:.3f} s"]
        reference = ridge_objective(cov64, w64, kept, lam)
        for groups in GROUPS:
            for name, order in (("contiguous", torch.arange(width)),
                                ("random", torch.randperm(width, generator=generator))):
                t = time.perf_counter()
                grouped = grouped_greedy(cov64, w64, keep, lam, groups, order)
                seconds = time.perf_counter() - t
                cells.append(f"{groups} {name} {ridge_objective(cov64, w64, grouped, lam) / reference - 1:+.2%} "
                             f"({seconds:.3f} s)")
        print(f"D {width}, keep {keep}: " + "; ".join(cells), flush=True)
        return kept, pruned

    prune_observing_mlp_selection(compare, model, batches, args.sparsity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
