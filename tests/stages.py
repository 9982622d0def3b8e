"""Test-side helpers: one call per stage on bare tensors and modules, and brute-force oracles.

The wrappers call corp's real stage classes (:mod:`corp.fit`, :mod:`corp.fold`,
:mod:`corp.select`, :mod:`corp.parts`) with the statistics a test builds by
hand, so the tests can state each closed form on small tensors. The oracles
(``mlp_compensated_error``, ``mlp_ridge_objective``) are independent
evaluations of what the selection and the fits optimise; they live here, not
in the library, because only the tests use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

from corp import ops
from corp.config import PruneConfig, kept_count  # noqa: F401  (re-exported for the tests)
from corp.fit import (
    ErrorCorrectingLogitFit,
    FitContext,
    MlpErrorCorrectingFit,
    MlpRidgeFit,
    SylvesterLogitFit,
    logit_scale,
    sub_blocks,
)
from corp.fold import fold_mlp
from corp.models import TimmViT
from corp.models.base import MlpWeights
from corp.parts import part_pruners
from corp.select import qk_residual, select_mlp_channels as _select_mlp_channels, select_qk_dims  # noqa: F401

_CTX = FitContext(ops.REFERENCE)


class _Moments:
    """Statistics given by their mean and covariance (what the MLP fits read)."""

    def __init__(self, mean, cov, dense_mean=None, cross_cov=None):
        self._mc, self._dense = (mean, cov), (dense_mean, cross_cov)

    def mean_and_covariance(self):
        return self._mc

    def dense_mean_and_cross_covariance(self):
        return self._dense


class _Grams:
    """Attention statistics given by their Grams (what the logit fits read)."""

    def __init__(self, gram_q, gram_k, cross_q=None, cross_k=None):
        self.gram_q, self._gram_k, self.cross_q, self.cross_k = gram_q, gram_k, cross_q, cross_k

    def key_gram(self):
        return self._gram_k


def mlp_compensation(mean, cov, kept, pruned, ridge):
    """The paper's MLP fit (:class:`corp.fit.MlpRidgeFit`): ``(B (|P|, |S|), c (|P|,), λ)``."""
    fit = MlpRidgeFit(ridge).fit(_Moments(mean, cov), kept, pruned, _CTX)
    return fit.coef, fit.intercept, fit.damping


def attention_compensation(gram_q, gram_k, kept, pruned, ridge):
    """The pooled logit fit (:class:`corp.fit.SylvesterLogitFit`): ``(M (H, s, s), λ (H,))``."""
    gram_q, gram_k = gram_q.to(torch.float64), gram_k.to(torch.float64)
    kept, pruned = kept.to(gram_q.device), pruned.to(gram_q.device)
    return SylvesterLogitFit(ridge).fit(_Grams(gram_q, gram_k), kept, pruned, _CTX)


centred_attention_compensation = attention_compensation  # the same fit on the centred key Gram


def attention_error_correcting_solve(gram_q, gram_k, cross_q, cross_k, kept, pruned, ridge):
    """:class:`corp.fit.ErrorCorrectingLogitFit`: ``(M (H, s, s), λ (H,))``."""
    return ErrorCorrectingLogitFit(ridge).fit(_Grams(gram_q, gram_k, cross_q, cross_k), kept, pruned, _CTX)


def mlp_error_correcting_fold(w2, b2, mean_dense, mean_pruned, cov_pruned, cross_cov, kept, ridge):
    """:class:`corp.fit.MlpErrorCorrectingFit` folded by :func:`corp.fold.fold_mlp`: ``(W2', b2', λ, λ rel)``."""
    stats = _Moments(mean_pruned, cov_pruned, mean_dense, cross_cov)
    fit = MlpErrorCorrectingFit(ridge).fit(stats, kept, None, _CTX)
    weights = MlpWeights(torch.zeros(w2.shape[1], 1, dtype=w2.dtype), None, w2, b2)
    new_w2, new_b2 = fold_mlp(weights, kept, fit)
    return new_w2, new_b2, fit.damping, fit.relative_damping


def logit_damping_scale(gram_q, gram_k_centred, kept):
    """``mean(diag GQ_SS) · mean(diag GK̃_SS)`` per head (:func:`corp.fit.logit_scale`)."""
    kept = kept.to(gram_q.device)
    return logit_scale(sub_blocks(gram_q.to(torch.float64), kept, kept),
                       sub_blocks(gram_k_centred.to(torch.float64), kept, kept))


def qk_compensated_residual(gram_q, gram_k, kept, pruned, ridge):
    """Per-head logit residual after the pooled fit (:func:`corp.select.qk_residual`) ``(H,)``."""
    gram_q, gram_k = gram_q.to(torch.float64), gram_k.to(torch.float64)
    return qk_residual(gram_q, gram_k, kept.to(gram_q.device), pruned.to(gram_q.device), ridge)


def select_mlp_channels(mlp, second_moment, keep):
    """Energy selection of a timm ``Mlp``'s hidden channels (:func:`corp.select.select_mlp_channels`)."""
    return _select_mlp_channels(TimmViT().mlp(SimpleNamespace(mlp=mlp)).weights(), second_moment, keep)


@dataclass
class PrunedMlp:
    fc1: nn.Linear
    fc2: nn.Linear
    kept: torch.Tensor
    damping: float
    relative_damping: float


@dataclass
class PrunedAttn:
    attn: nn.Module
    kept: torch.Tensor
    damping: float
    relative_damping: float


def _pruner(part: str, ridge: float, compensate: bool, attn_ridge: float = 1e-3):
    config = PruneConfig.create(method="paper", ridge=ridge if part == "mlp" else 1e-3,
                                attn_ridge=ridge if part == "attn" else attn_ridge, compensate=compensate)
    return part_pruners(config, ops.REFERENCE)[part]


def prune_mlp(mlp, stats, sparsity, ridge, compensate) -> PrunedMlp:
    """A timm ``Mlp`` pruned by the paper's MLP stages (:class:`corp.parts.MlpPruner`)."""
    block = SimpleNamespace(mlp=mlp)
    res = _pruner("mlp", ridge, compensate).prune(TimmViT(), block, stats, sparsity, _CTX)
    return PrunedMlp(res.module.fc1, res.module.fc2, res.kept, res.damping, res.relative_damping)


def prune_attention(attn, stats, sparsity, ridge, compensate) -> PrunedAttn:
    """A timm ``Attention`` pruned by the paper's attention stages (:class:`corp.parts.AttentionPruner`)."""
    block = SimpleNamespace(attn=attn, norm1=nn.Identity())
    res = _pruner("attn", ridge, compensate).prune(TimmViT(), block, stats, sparsity, _CTX)
    return PrunedAttn(res.module, res.kept, res.damping, res.relative_damping)


# --------------------------------------------------------------------------- oracles


def mlp_error_given_coef(cov, w2, kept, pruned, coef):
    """``E‖W2_P(h̃_P − B h̃_S)‖²`` for any ``B`` ``(|P|, |S|)``: ``tr(Y Σ Yᵀ)``, ``Y = [W2_P, −W2_P B]`` on ``[P, S]``."""
    f = w2[:, pruned]
    y = torch.cat([f, -(f @ coef)], dim=1)
    idx = torch.cat([pruned, kept])
    return ((y @ cov[idx[:, None], idx]) * y).sum()


def mlp_compensated_error(cov, w2, kept, pruned, ridge) -> float:
    """Per-token output error ``E‖W2_P(h_P − B h_S − c)‖²`` left by the paper's ridge fit.

    Evaluated as the quadratic form ``tr(Y Σ Yᵀ)`` of the centred covariance (the
    intercept cancels the means), with ``B`` from :func:`mlp_compensation`.
    """
    cov = cov.to(torch.float64)
    w2 = w2.detach().to(device=cov.device, dtype=torch.float64)
    kept, pruned = kept.to(cov.device), pruned.to(cov.device)
    if pruned.numel() == 0:
        return 0.0
    if kept.numel() == 0:
        coef = cov.new_zeros(pruned.numel(), 0)
    else:
        coef, _, _ = mlp_compensation(torch.zeros(cov.shape[0], dtype=cov.dtype), cov, kept, pruned, ridge)
    return float(mlp_error_given_coef(cov, w2, kept, pruned, coef).clamp_min(0))


def mlp_ridge_objective(cov, w2, kept, pruned, damping) -> float:
    """``J(S) = tr(W2_P (H_PP − H_PS H_SS⁻¹ H_SP) W2_Pᵀ)``, ``H = Σ + λI`` (absolute λ): what the greedy tracks."""
    h = cov + damping * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    f = w2[:, pruned]
    h_ss, h_sp = h[kept[:, None], kept], h[kept[:, None], pruned]
    schur = h[pruned[:, None], pruned] - h_sp.T @ torch.linalg.solve(h_ss, h_sp)
    return float(((f @ schur) * f).sum())
