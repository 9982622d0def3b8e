"""Whether the attention output fit could use one ``d × d`` map per head (a block-diagonal ``T`` in
``W' = W T``) instead of the full ``A × A`` one: its statistics would be per-head Grams, ``H`` times
cheaper than the ``[o; z]`` Gram of ``2A`` columns (deit_small: about 1 s of a 14 s prune, see the
README's *Fast default*). Runs another benchmark script with ``corp.fit.AttentionOutputFit.fit``
replaced by the per-head form, each head with its own GCV damping on its share of the projected
output. The statistics are still the full ones (the off-diagonal head blocks are ignored), so this
measures the accuracy only, not the time.

    HF_HUB_OFFLINE=1 python benchmarks/experiments/output_fit_per_head.py benchmarks/real_model_ablation.py --calib 1024 --variants corp
    python benchmarks/experiments/output_fit_per_head.py benchmarks/accuracy_ablation.py --variants corp,budget-corp
"""
from __future__ import annotations

import runpy
import sys

import torch

import corp.fit as fit_module
import corp.parts as parts

_HEADS: dict[str, int] = {}
_refit_output = parts.AttentionPruner._refit_output


def _refit_output_noting_heads(self, adapter, block, part, module, ctx, maps=None):
    _HEADS["heads"] = part.num_heads  # the fit below sees only the statistics
    return _refit_output(self, adapter, block, part, module, ctx, maps)


def per_head_fit(self, stats, weight, bias, ctx):
    """``AttentionOutputFit.fit`` with ``T`` block-diagonal over heads."""
    mean, cov = stats.mean_and_covariance()
    a = stats.width
    if bias is None:
        cov = cov + torch.outer(mean, mean)
    heads = _HEADS["heads"]
    d = a // heads
    weight = weight.to(cov)
    new_weight = weight.clone()
    steps = fit_module.OUTPUT_FIT_GRID_DECADES * fit_module.OUTPUT_FIT_GRID_PER_DECADE
    for h in range(heads):
        o, z = slice(h * d, (h + 1) * d), slice(a + h * d, a + (h + 1) * d)
        s_zz, s_zo, s_oo = cov[z, z].contiguous(), cov[z, o], cov[o, o]
        w = weight[:, o]
        zo_w = s_zo @ w.T
        s_zy = zo_w - s_zz @ w.T  # Cov(z_h, y_h), y_h = W_h (o_h − z_h)
        trace_yy = torch.einsum("ia,ab,ib->", w, s_oo - s_zo.T - s_zo + s_zz, w)
        grid = fit_module.damping(self.ridge, fit_module.mlp_scale(s_zz)) * torch.logspace(
            0, fit_module.OUTPUT_FIT_GRID_DECADES, steps + 1, dtype=cov.dtype)
        lam = grid[int(torch.argmin(fit_module.gcv_scores(s_zz, s_zy, trace_yy, stats.count, bias is not None, grid)))]
        new_weight[:, o] = torch.linalg.solve(s_zz + lam * torch.eye(d, dtype=cov.dtype), zo_w + lam * w.T).T
    new_bias = None if bias is None else bias.to(cov) + weight @ mean[:a] - new_weight @ mean[a:]
    return fit_module.OutputProjectionFit(new_weight, new_bias, 0.0, 0.0)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    parts.AttentionPruner._refit_output = _refit_output_noting_heads
    fit_module.AttentionOutputFit.fit = per_head_fit
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
