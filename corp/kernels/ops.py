"""``torch.library`` custom ops for the calibration statistics.

* ``torch.ops.corp.gram_update_(gram, colsum, x, input_precision=None)``
  mutates ``gram`` (upper triangle) and ``colsum``.
* ``torch.ops.corp.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision=None)``
  mutates ``gram_q``, ``gram_k`` and ``score``.

One function per statistic whatever the device: the PyTorch reference of
:mod:`corp.stats` is the implementation for every device but CUDA, where the
Triton kernels run (the reference too when triton is not installed). The fake
implementations only check shapes (the ops return nothing), so the ops trace
under ``torch.compile`` / ``torch.export`` with FakeTensors.

``input_precision`` applies to fp32 inputs on CUDA (see
:data:`corp.kernels.INPUT_PRECISIONS`); the reference always computes exact
fp32 products.

Importing this module registers the ops; it does not import triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import stats as _stats
from . import triton_available

__all__ = ["gram_update_", "attention_stats_update_"]


def _check_gram_shapes(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1]
    if gram.shape != (d, d) or colsum.shape != (d,):
        raise ValueError(f"accumulator shapes {tuple(gram.shape)}, {tuple(colsum.shape)} do not match D={d}")
    if gram.dtype != torch.float64 or colsum.dtype != torch.float64:
        raise TypeError("gram and colsum must be float64")


def _check_attention_shapes(gram_q, gram_k, score, qkv, num_heads: int, head_dim: int) -> None:
    h, d = num_heads, head_dim
    if qkv.shape[-1] != 3 * h * d:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{h}·{d}")
    if gram_q.shape != (h, d, d) or gram_k.shape != (h, d, d) or score.shape != (h, d):
        raise ValueError("accumulator shapes do not match num_heads, head_dim")
    if any(t.dtype != torch.float64 for t in (gram_q, gram_k, score)):
        raise TypeError("gram_q, gram_k and score must be float64")


@torch.library.custom_op("corp::gram_update_", mutates_args=("gram", "colsum"))
def gram_update_(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor,
                 input_precision: Optional[str] = None) -> None:
    """Add ``triu(xᵀx)`` and ``Σx`` of one chunk ``x`` ``(..., D)`` into fp64 ``gram``/``colsum``."""
    _stats.gram_update_(gram, colsum, x, backend="torch")


@gram_update_.register_kernel("cuda")
def _gram_update_cuda(gram, colsum, x, input_precision=None) -> None:
    if not triton_available():
        _stats.gram_update_(gram, colsum, x, backend="torch")
        return
    from .gram import gram_update_triton_

    gram_update_triton_(gram, colsum, x, input_precision)


@gram_update_.register_fake
def _gram_update_fake(gram, colsum, x, input_precision=None) -> None:
    _check_gram_shapes(gram, colsum, x)
    return None


@torch.library.custom_op("corp::attention_stats_update_", mutates_args=("gram_q", "gram_k", "score"))
def attention_stats_update_(gram_q: torch.Tensor, gram_k: torch.Tensor, score: torch.Tensor, qkv: torch.Tensor,
                            num_heads: int, head_dim: int, input_precision: Optional[str] = None) -> None:
    """Add per-head ``Σ q qᵀ``, ``Σ k kᵀ``, ``Σ q_j² k_j²`` of one qkv chunk into fp64 accumulators."""
    _stats.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim, backend="torch")


@attention_stats_update_.register_kernel("cuda")
def _attention_stats_update_cuda(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision=None) -> None:
    if not triton_available():
        _stats.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim, backend="torch")
        return
    from .attention_stats import attention_stats_update_triton_

    attention_stats_update_triton_(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision)


@attention_stats_update_.register_fake
def _attention_stats_update_fake(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision=None) -> None:
    _check_attention_shapes(gram_q, gram_k, score, qkv, num_heads, head_dim)
    return None
