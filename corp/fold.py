"""Folds: the fitted compensation written into the kept weights (CORP.md), in fp64.

Model-independent: the weights come from and go back to the model through its
adapter's part (:class:`~corp.models.base.MlpPart`, :class:`~corp.models.base.AttentionPart`),
which builds the smaller module. Without a fit, a fold is plain structured
pruning with the same selection.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .fit import MlpFit, QKProjection
from .models.base import AttentionWeights, MlpWeights

__all__ = ["fold_mlp", "fold_attention", "fold_attention_projection", "qk_maps", "query_map"]


def fold_mlp(weights: MlpWeights, kept: torch.Tensor, fit: Optional[MlpFit]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The output projection of an MLP that keeps hidden channels ``kept`` ``(|S|,)``.

    With a fit predicting channels ``rows`` as ``coef h_S + intercept``:
    ``W_out' = W_out[:, S \\ rows] + W_out[:, rows] · coef`` and
    ``b_out' = b_out + W_out[:, rows] · intercept`` (the paper: rows = P, so
    ``W2' = W2_S + W2_P B``, ``b2' = b2 + W2_P c``; error-correcting fits predict every
    channel, so ``W2' = W2 C``). Without a fit: ``W_out[:, S]``, ``b_out``.

    Returns ``W_out'`` ``(out, |S|)`` and ``b_out'`` ``(out,)`` or None, fp64.
    """
    w2, b2 = weights.w_out, weights.b_out
    new_w = w2[:, kept]
    if fit is None or fit.rows.numel() == 0:
        return new_w, b2
    direct = ~torch.isin(kept, fit.rows)  # kept channels the fit does not re-predict stay as they are
    w_rows = w2[:, fit.rows]
    new_w = new_w * direct.to(new_w.dtype) + w_rows @ fit.coef
    shift = w_rows @ fit.intercept
    return new_w, (shift if b2 is None else b2 + shift)


def fold_attention(weights: AttentionWeights, kept: torch.Tensor,
                   correction: Optional[Union[torch.Tensor, QKProjection]]) -> AttentionWeights:
    """The q/k projection of an attention keeping dims ``kept`` ``(H, s)`` of each head.

    A :class:`~corp.fit.QKProjection` correction (``logit_solve="lowrank"``) selects no dims:
    it is written by :func:`fold_attention_projection` (``kept`` unused).

    With ``A = I + M`` (``correction`` = M ``(H, s, s)``): ``W_K' = A W_K[S]``,
    ``b_K' = A b_K[S]``, ``W_Q' = W_Q[S] · r``, ``b_Q' = b_Q[S] · r``, ``r = sqrt(|S| / d)``,
    so that ``q'ᵀk' / sqrt(|S|) = q_Sᵀ A k_S / sqrt(d)``: the pruned module keeps the
    dense softmax temperature. Values are unchanged.

    Returns the folded :class:`AttentionWeights` (q/k ``(H, s, in)``), fp64.
    """
    if isinstance(correction, QKProjection):
        return fold_attention_projection(weights, correction)
    d = weights.w_q.shape[1]
    keep = kept.shape[1]
    rows = kept[:, :, None].expand(-1, -1, weights.w_q.shape[-1])
    w_q, w_k = torch.gather(weights.w_q, 1, rows), torch.gather(weights.w_k, 1, rows)
    b_q = torch.gather(weights.b_q, 1, kept) if weights.b_q is not None else None
    b_k = torch.gather(weights.b_k, 1, kept) if weights.b_k is not None else None
    if correction is not None:
        a = torch.eye(keep, dtype=torch.float64, device=w_k.device) + correction
        w_k = a @ w_k
        if b_k is not None:
            b_k = (a @ b_k[:, :, None])[:, :, 0]
    r = math.sqrt(keep / d)
    w_q, b_q = w_q * r, (b_q * r if b_q is not None else None)
    return AttentionWeights(w_q, w_k, weights.w_v, b_q, b_k, weights.b_v, qk_dims=kept)


def fold_attention_projection(weights: AttentionWeights, projection) -> AttentionWeights:
    """The q/k projection of an attention whose queries and keys are mapped, per head, to
    ``q' = a q``, ``k' = c k`` (:class:`corp.fit.QKProjection`, ``a``, ``c`` ``(H, s, d)``):
    ``W_Q' = a W_Q · r``, ``b_Q' = a b_Q · r``, ``W_K' = c W_K``, ``b_K' = c b_K``,
    ``r = sqrt(s / d)`` (the dense softmax temperature, as :func:`fold_attention`). Values unchanged.

    Returns the folded :class:`AttentionWeights` (q/k ``(H, s, in)``), fp64, with no ``qk_dims``
    (the new dims are combinations of the dense ones, not a subset).
    """
    a, c = projection.a.to(weights.w_q), projection.c.to(weights.w_k)
    d, keep = weights.w_q.shape[1], a.shape[1]
    r = math.sqrt(keep / d)
    w_q, w_k = (a @ weights.w_q) * r, c @ weights.w_k
    b_q = (a @ weights.b_q[:, :, None])[:, :, 0] * r if weights.b_q is not None else None
    b_k = (c @ weights.b_k[:, :, None])[:, :, 0] if weights.b_k is not None else None
    return AttentionWeights(w_q, w_k, weights.w_v, b_q, b_k, weights.b_v)


def qk_maps(kept: torch.Tensor, correction: Optional[Union[torch.Tensor, QKProjection]],
            head_dim: int) -> QKProjection:
    """The per-head linear maps :func:`fold_attention` applies to the dense q/k projection, the softmax
    temperature included: the folded weights are ``W_Q' = a W_Q``, ``W_K' = c W_K`` (biases alike), so the
    pruned module's queries and keys are ``a q`` and ``c k`` of the dense ones (:func:`query_map`).

    Args:
        kept: ``(H, s)`` kept dims (unused for a :class:`~corp.fit.QKProjection` correction).
        correction: as for :func:`fold_attention`: None, ``M`` ``(H, s, s)`` or a QKProjection.
        head_dim: d.

    Returns:
        :class:`~corp.fit.QKProjection` with ``a``, ``c`` ``(H, s, d)``, fp64.
    """
    if isinstance(correction, QKProjection):
        a, c = correction.a.to(torch.float64), correction.c.to(torch.float64)
    else:
        heads, keep = kept.shape
        select = torch.zeros(heads, keep, head_dim, dtype=torch.float64, device=kept.device)
        select.scatter_(2, kept[:, :, None], 1.0)
        a = select
        c = select if correction is None else (
            torch.eye(keep, dtype=torch.float64, device=kept.device) + correction.to(torch.float64)) @ select
    return QKProjection(a * math.sqrt(a.shape[1] / head_dim), c)


def query_map(maps: QKProjection) -> torch.Tensor:
    """One per-head map of the dense queries that gives the pruned attention's logits with the dense
    keys and the dense softmax scale: ``Mq = sqrt(d / s) · aᵀc`` ``(H, d, d)`` (row vectors: ``q @ Mq``).

    The pruned module (:class:`corp.modules.PrunedAttention`) scales its logits by ``s^-½``, so its
    logit is ``s^-½ (a q)ᵀ(c k) = d^-½ (q @ Mq)ᵀ k``: the dense attention with queries ``q @ Mq``
    (keys, values and scale unchanged) computes the pruned heads' outputs from the dense projection,
    at ``d²`` multiply-adds per token and head, with no padding of the pruned q/k width
    (:attr:`corp.models.base.AttentionPart.attend`; 8 ms of 39 ms per deit_small batch of 32 on the
    2-core CPU went to the folded projection, its padding and the concatenation this replaces).

    Args:
        maps: :func:`qk_maps` (``a``, ``c`` ``(H, s, d)``, the temperature included).
    """
    a, c = maps.a, maps.c
    return math.sqrt(a.shape[2] / a.shape[1]) * a.transpose(1, 2) @ c
