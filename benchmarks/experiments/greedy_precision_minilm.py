"""The MLP residual greedy in fp32 (corp.select.GREEDY_DTYPE) against fp64 on a real model's covariances.

Prunes all-MiniLM-L6-v2 with the default method and, for every block's MLP selection, also runs the
greedy in fp64 on the same covariance; prints the kept-set overlap and the ridge objective J of both
kept sets (fp64), and the covariance's condition number with the damping.

    HF_HUB_OFFLINE=1 python benchmarks/experiments/greedy_precision_minilm.py [--calib 1024] [--sparsity 0.5]
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import corp  # noqa: E402
import corp.select as select  # noqa: E402
from corp.fit import damping, mlp_scale  # noqa: E402
from minilm_cosine import experiment_setup  # noqa: E402


def ridge_objective(cov, w2, kept, lam):
    """J(S) = tr(W2_P (H_PP − H_PS H_SS⁻¹ H_SP) W2_Pᵀ), H = Σ + λI, fp64."""
    h = cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype)
    p = torch.ones(cov.shape[0], dtype=torch.bool)
    p[kept] = False
    s = ~p
    schur = h[p][:, p] - h[p][:, s] @ torch.linalg.solve(h[s][:, s], h[s][:, p])
    return float(torch.trace(w2[:, p] @ schur @ w2[:, p].T))


def prune_observing_mlp_selection(selection, model, batches, sparsity: float) -> None:
    """Prune ``model`` with the default method, ``sparsity`` for the MLP and q/k, with every block's
    MLP selection going through ``selection`` (same signature and result as
    :func:`corp.select.select_mlp_channels_by_residual`, which it replaces for the call)."""
    original = select.select_mlp_channels_by_residual
    select.select_mlp_channels_by_residual = selection
    try:
        corp.prune(model, batches, mlp_sparsity=sparsity, attn_sparsity=sparsity)
    finally:
        select.select_mlp_channels_by_residual = original


def main() -> int:
    args, model, batches = experiment_setup(__doc__.split("\n\n")[0])
    original = select.select_mlp_channels_by_residual

    def both(cov, w2, keep, ridge, step=0):
        kept, pruned = original(cov, w2, keep, ridge, step)
        fp32 = select.GREEDY_DTYPE
        select.GREEDY_DTYPE = torch.float64
        try:
            kept64, _ = original(cov, w2, keep, ridge, step)
        finally:
            select.GREEDY_DTYPE = fp32
        cov64, w64 = cov.to(torch.float64), w2.to(torch.float64)
        lam = float(damping(ridge, mlp_scale(cov64)))
        eig = torch.linalg.eigvalsh(cov64)
        same = len(set(kept.tolist()) & set(kept64.tolist()))
        j32, j64 = ridge_objective(cov64, w64, kept, lam), ridge_objective(cov64, w64, kept64, lam)
        print(f"D {cov.shape[0]}, keep {keep}: cond(Σ + λI) {float((eig[-1] + lam) / (eig[0].clamp(min=0) + lam)):.3g}; "
              f"kept sets share {same} of {keep}; J fp32 / J fp64 − 1 = {j32 / j64 - 1:+.2e}", flush=True)
        return kept, pruned

    prune_observing_mlp_selection(both, model, batches, args.sparsity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
