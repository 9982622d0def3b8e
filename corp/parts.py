"""The two parts of a block, each pruned by the same four stages: statistics → select → fit → fold.

:class:`AttentionPruner` and :class:`MlpPruner` compose the strategies a
:class:`~corp.config.PruneConfig` chooses (:func:`part_pruners`) and share one
interface: :meth:`statistics` (empty accumulators for a block) and
:meth:`prune` (select, fit and fold from filled statistics, returning the new
module and what the report records).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .config import PruneConfig, kept_count
from .fit import (
    AttentionOutputFit,
    ErrorCorrectingLogitFit,
    FactoredLogitFit,
    FitContext,
    LowRankLogitFit,
    MlpErrorCorrectingFit,
    MlpFit,
    MlpRidgeFit,
    PerImageLogitFit,
    SylvesterLogitFit,
)
from .fold import fold_attention, fold_mlp, qk_maps
from .ops import Kernels
from .rotary import RotaryLogitFit, select_rotary_pairs
from .select import EnergySelection, FactoredResidualSelection, ResidualSelection
from .stats import AttentionOutputStatistics, AttentionStatistics, MLPStatistics
from .streams import swapped

__all__ = ["PrunedPart", "AttentionPruner", "MlpPruner", "part_pruners", "PARTS"]

PARTS = ("attn", "mlp")  # the order within a block: the MLP's statistics follow the pruned attention


@dataclass
class PrunedPart:
    """A pruned part: the new module, the kept indices (for the report's uncompensated twin),
    the width kept, and the damping used (absolute, and relative to its scale)."""

    module: nn.Module
    kept: torch.Tensor
    width: int
    damping: float = 0.0
    relative_damping: float = 0.0
    seconds_selection: float = 0.0
    seconds_fit: float = 0.0  # the fit's solves and the fold


def _device(module: nn.Module) -> torch.device:
    """Where a part's weights live (its statistics and fits go there)."""
    return next(module.parameters()).device


_SELECTIONS = {"energy": EnergySelection, "residual": ResidualSelection,
               "residual_factored": FactoredResidualSelection}
_LOGIT_FITS = {"pooled": SylvesterLogitFit, "centred": SylvesterLogitFit, "per_image": PerImageLogitFit}
_LOGIT_SOLVES = {"factored": FactoredLogitFit, "lowrank": LowRankLogitFit}  # else the logit fit's own solve


class AttentionPruner:
    """Query/key dims of every head: ``Σ qqᵀ, Σ kkᵀ`` (+ centred keys, cross Grams) → dims → M → ``A = I + M``."""

    name = "attn"

    def __init__(self, config: PruneConfig, kernels: Kernels, selection):
        self.config, self.kernels, self.selection = config, kernels, selection
        self.correcting = config.error_correcting and config.compensate
        if self.correcting:
            fit_class = ErrorCorrectingLogitFit
        elif config.logit_solve in _LOGIT_SOLVES:
            fit_class = _LOGIT_SOLVES[config.logit_solve]
        else:
            fit_class = _LOGIT_FITS[config.logit_fit]
        self.fit = fit_class(config.attn_ridge) if config.compensate else None
        self.output_fit = AttentionOutputFit(config.ridge) if config.compensate and config.attn_output_fit else None
        self.rotary_fit = RotaryLogitFit(config.attn_ridge) if config.compensate else None
        # a fit that selects no dims needs a selection only for the report's uncompensated twin: the
        # cheapest one (the residual greedy would cost seconds per block for nothing)
        self.qk_selection = EnergySelection() if isinstance(self.fit, LowRankLogitFit) else selection

    def statistics(self, adapter, block: nn.Module) -> AttentionStatistics:
        part = adapter.attention(block)
        if part.refusal is not None:  # the pipeline checks first; this covers every other caller
            raise ValueError(f"cannot prune query/key dims: {part.refusal}")
        return AttentionStatistics(part.num_heads, part.head_dim, _device(part.module), self.kernels,
                                   centre_keys=self.config.centred_keys, cross=self.correcting)

    def prune(self, adapter, block: nn.Module, stats: AttentionStatistics, sparsity: float,
              ctx: FitContext) -> PrunedPart:
        part = adapter.attention(block)
        keep = kept_count(part.head_dim, sparsity, 2 if part.rotary else 1)
        tick = time.perf_counter()
        fit = self.fit
        if part.rotary:  # whole rotary pairs, a fit that commutes with the rotations (corp.rotary)
            kept, pruned = select_rotary_pairs(stats.score, keep // 2)
            fit = self.rotary_fit
        else:
            kept, pruned = self.qk_selection.select_qk(stats, keep)
        dev = _device(part.module)
        kept, pruned = kept.to(dev), pruned.to(dev)
        tock = time.perf_counter()
        correction, lam = None, None
        if fit is not None and pruned.numel():
            correction, lam = fit.fit(stats, kept, pruned, ctx)
        module = part.build(fold_attention(part.weights(), kept, correction), keep)
        if self.output_fit is not None and pruned.numel():
            # rotary q/k are rotated after the projection: their pass runs the modules whole
            maps = None if part.rotary else qk_maps(kept, correction, part.head_dim)
            self._refit_output(adapter, block, part, module, ctx, maps)
        result = PrunedPart(module, kept, keep, seconds_selection=tock - tick, seconds_fit=time.perf_counter() - tock)
        if lam is not None:
            result.damping, result.relative_damping = float(lam.mean()), self.config.attn_ridge
        return result

    def _refit_output(self, adapter, block: nn.Module, part, module: nn.Module, ctx: FitContext,
                      maps=None) -> None:
        """:class:`~corp.fit.AttentionOutputFit`: a second pass over the block's inputs through the
        dense (``part``) and the pruned attention (``module``), then the new output projection.
        ``maps`` (:func:`corp.fold.qk_maps`): how ``module``'s queries and keys follow from the dense
        ones, so that the pass may compute both from one projection (``Stream.attention_outputs``)."""
        dense_proj = part.out_proj
        if dense_proj is None or ctx.attention_outputs is None:
            raise ValueError(f"attn_output_fit needs the attention's output projection, which the "
                             f"{type(part.module).__name__} of this model family does not expose")
        with swapped(adapter, block, {"attn": module}):
            proj = adapter.attention(block).out_proj
        stats = AttentionOutputStatistics(dense_proj.in_features, dense_proj.weight.device, self.kernels)
        for dense_out, pruned_out in ctx.attention_outputs(part.module, module, maps):
            stats.update(dense_out, pruned_out)
        stats.reduce_(ctx.dp)
        stats.check_finite(-1 if ctx.block_index is None else ctx.block_index)
        bias = dense_proj.bias.detach().to(torch.float64) if dense_proj.bias is not None else None
        fit = self.output_fit.fit(stats, dense_proj.weight.detach().to(torch.float64), bias, ctx)
        proj.weight.copy_(fit.weight.to(proj.weight))
        if proj.bias is not None:
            proj.bias.copy_(fit.bias.to(proj.bias))

    def uncompensated(self, adapter, block: nn.Module, kept: torch.Tensor) -> nn.Module:
        """The same selection without compensation (for the report), from the dense ``block``."""
        part = adapter.attention(block)
        return part.build(fold_attention(part.weights(), kept, None), kept.shape[1])


class MlpPruner:
    """Hidden channels: ``Σ h, Σ hhᵀ`` (+ dense cross statistics) → channels → affine fit → output projection."""

    name = "mlp"

    def __init__(self, config: PruneConfig, kernels: Kernels, selection):
        self.config, self.kernels, self.selection = config, kernels, selection
        self.correcting = config.error_correcting and config.compensate
        fit_class = MlpErrorCorrectingFit if self.correcting else MlpRidgeFit
        self.fit = fit_class(config.ridge) if config.compensate else None

    def statistics(self, adapter, block: nn.Module) -> MLPStatistics:
        part = adapter.mlp(block)
        full = self.fit is not None or self.selection.needs_covariance
        device = next(part.module.parameters()).device
        return MLPStatistics(part.hidden, device, self.kernels, full=full, cross=self.correcting)

    def prune(self, adapter, block: nn.Module, stats: MLPStatistics, sparsity: float, ctx: FitContext) -> PrunedPart:
        part = adapter.mlp(block)
        weights = part.weights()
        keep = kept_count(part.hidden, sparsity)
        tick = time.perf_counter()
        kept, pruned = self.selection.select_mlp(stats, weights, keep)
        dev = weights.w_in.device
        kept, pruned = kept.to(dev), pruned.to(dev)
        tock = time.perf_counter()
        fit: Optional[MlpFit] = None
        if self.fit is not None and pruned.numel():
            fit = self.fit.fit(stats, kept, pruned, ctx)
        module = part.build(kept, *fold_mlp(weights, kept, fit))
        result = PrunedPart(module, kept, keep, seconds_selection=tock - tick, seconds_fit=time.perf_counter() - tock)
        if fit is not None:
            result.damping, result.relative_damping = fit.damping, fit.relative_damping
        return result

    def uncompensated(self, adapter, block: nn.Module, kept: torch.Tensor) -> nn.Module:
        part = adapter.mlp(block)
        return part.build(kept, *fold_mlp(part.weights(), kept, None))


def part_pruners(config: PruneConfig, kernels: Kernels) -> dict[str, object]:
    """The pruner of each part, in block order, with the config's selection."""
    cls = _SELECTIONS[config.selection]
    selection = cls() if cls is EnergySelection else cls(config.ridge, config.attn_ridge)
    return {"attn": AttentionPruner(config, kernels, selection), "mlp": MlpPruner(config, kernels, selection)}
