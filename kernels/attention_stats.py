"""Fused attention statistics in Triton.

``attention_stats_update_triton_(gram_q, gram_k, score, qkv, H, d)`` adds, for
every head ``h`` of one block, ``Σ q qᵀ``, ``Σ k kᵀ`` (d × d) and
``Σ q_j² k_j²`` (d) into fp64 accumulators, reading the fused qkv projection
output ``(..., 3·H·d)`` (timm layout ``[q heads | k heads | v heads]``) in place:
no copy, no permute, and the v third is never read.

Grid: ``(H, split)``. Program ``(h, s)`` streams its share of the tokens once,
loading the ``(BLOCK_K, d)`` q and k slices of head ``h`` and accumulating both
Grams (``tl.dot``) and the score in fp32; at the end it adds them into the
fp64 accumulators (fp64 atomics when the tokens are split, a plain
load-add-store otherwise). Heads alone (12–16) cannot fill a GPU, so the tokens
are split to give about two programs per SM, each summing at most
``MAX_TOKENS_PER_PROGRAM`` tokens in fp32. ``d`` that is not a power of two
(80 in DeiT-III Huge) is padded to the next one with masks.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .gram import (
    MAX_TOKENS_PER_PROGRAM,
    _INTERPRETED,
    _SUPPORTED_DTYPES,
    _check_precision,
    _sm_count,
    check_launch,
    token_view,
    triton,
)

if triton is not None:
    import triton.language as tl

    from .gram import _round_to_tf32

__all__ = ["attention_stats_update_triton_", "choose_attention_split"]

# Fewest tokens per program when splitting (each program ends with 2·d² + d fp64 adds).
MIN_TOKENS_PER_SPLIT = 256
INTERPRETER_BLOCK_K = 32


if triton is not None:

    @triton.jit
    def _attention_stats_kernel(
        qkv_ptr, gq_ptr, gk_ptr, score_ptr,
        N, T, d, HD,
        stride_b, stride_t, stride_c,
        sq_h, sq_r, sq_c, sk_h, sk_r, sk_c, ss_h, ss_c,
        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        IS_3D: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr, ROUND_TF32: tl.constexpr,
    ):
        head = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_split = tl.num_programs(1)

        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < d
        q_off = (head * d + dims).to(tl.int64) * stride_c
        k_off = (HD + head * d + dims).to(tl.int64) * stride_c

        per_split = tl.cdiv(tl.cdiv(N, n_split), BLOCK_K) * BLOCK_K
        k_start = pid_k * per_split
        k_stop = tl.minimum(k_start + per_split, N)
        offs_k = tl.arange(0, BLOCK_K)

        acc_q = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        acc_k = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in range(k_start, k_stop, BLOCK_K):
            tok = k + offs_k
            tok_ok = tok < k_stop
            tok64 = tok.to(tl.int64)
            if IS_3D:
                tok_off = (tok64 // T) * stride_b + (tok64 % T) * stride_t
            else:
                tok_off = tok64 * stride_t
            m = tok_ok[:, None] & dim_ok[None, :]
            q = tl.load(qkv_ptr + tok_off[:, None] + q_off[None, :], mask=m, other=0.0)
            kk = tl.load(qkv_ptr + tok_off[:, None] + k_off[None, :], mask=m, other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong: upcast there (only there)
                q = q.to(tl.float32)
                kk = kk.to(tl.float32)
            qf = q.to(tl.float32)  # the score from the inputs as they are (before any TF32 rounding)
            kf = kk.to(tl.float32)
            acc_s += tl.sum(qf * qf * kf * kf, axis=0)
            if ROUND_TF32:  # see corp.kernels.gram._round_to_tf32
                q = _round_to_tf32(q)
                kk = _round_to_tf32(kk)
            acc_q = tl.dot(tl.trans(q), q, acc_q, input_precision=INPUT_PRECISION)
            acc_k = tl.dot(tl.trans(kk), kk, acc_k, input_precision=INPUT_PRECISION)

        r = dims.to(tl.int64)
        mm = dim_ok[:, None] & dim_ok[None, :]
        gq_ptrs = gq_ptr + head * sq_h + r[:, None] * sq_r + r[None, :] * sq_c
        gk_ptrs = gk_ptr + head * sk_h + r[:, None] * sk_r + r[None, :] * sk_c
        s_ptrs = score_ptr + head * ss_h + r * ss_c
        if ATOMIC:
            tl.atomic_add(gq_ptrs, acc_q.to(tl.float64), mask=mm, sem="relaxed")
            tl.atomic_add(gk_ptrs, acc_k.to(tl.float64), mask=mm, sem="relaxed")
            tl.atomic_add(s_ptrs, acc_s.to(tl.float64), mask=dim_ok, sem="relaxed")
        else:
            old_q = tl.load(gq_ptrs, mask=mm, other=0.0)
            tl.store(gq_ptrs, old_q + acc_q.to(tl.float64), mask=mm)
            old_k = tl.load(gk_ptrs, mask=mm, other=0.0)
            tl.store(gk_ptrs, old_k + acc_k.to(tl.float64), mask=mm)
            old_s = tl.load(s_ptrs, mask=dim_ok, other=0.0)
            tl.store(s_ptrs, old_s + acc_s.to(tl.float64), mask=dim_ok)

    def _configs():
        c = triton.Config
        return [  # few on purpose: each is compiled and timed per new key
            c({"BLOCK_K": 64}, num_warps=4, num_stages=3),
            c({"BLOCK_K": 64}, num_warps=8, num_stages=3),
            c({"BLOCK_K": 128}, num_warps=8, num_stages=3),
        ]

    _attention_stats_kernel_tuned = triton.autotune(
        configs=_configs(),
        key=["d", "HD", "IS_3D", "INPUT_PRECISION", "ATOMIC"],
    )(_attention_stats_kernel)

_tuned_keys: set = set()


def choose_attention_split(n_tokens: int, num_heads: int, device: torch.device) -> int:
    """Programs per head along the tokens: about two per SM, each summing ≤ MAX_TOKENS_PER_PROGRAM tokens."""
    cap = math.ceil(n_tokens / MAX_TOKENS_PER_PROGRAM)
    if device.type != "cuda":
        return max(1, cap)
    fill = math.ceil(2 * _sm_count(device) / max(num_heads, 1))
    fill = min(fill, max(1, n_tokens // MIN_TOKENS_PER_SPLIT))
    return max(1, cap, fill)


def attention_stats_update_triton_(
    gram_q: torch.Tensor,
    gram_k: torch.Tensor,
    score: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    head_dim: int,
    input_precision: Optional[str] = None,
    split_k: Optional[int] = None,
    config: Optional[dict] = None,
) -> None:
    """Add one chunk's per-head ``Σ q qᵀ``, ``Σ k kᵀ``, ``Σ q_j² k_j²`` into fp64 accumulators, in Triton.

    Args:
        gram_q, gram_k: ``(H, d, d)`` float64 accumulators, any strides.
        score: ``(H, d)`` float64 accumulator.
        qkv: ``(..., 3·H·d)`` fp32, bf16 or fp16 output of the fused qkv projection, any strides.
        num_heads, head_dim: H and d.
        input_precision: products of fp32 inputs (see :data:`corp.kernels.INPUT_PRECISIONS`).
        split_k: programs per head along the tokens (None: chosen from the GPU size).
        config: fixed kernel parameters instead of the tuned/default ones:
            ``BLOCK_K`` and, on CUDA, ``num_warps``, ``num_stages``.
    """
    h, d = int(num_heads), int(head_dim)
    if qkv.shape[-1] != 3 * h * d:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{h}·{d}")
    if gram_q.shape != (h, d, d) or gram_k.shape != (h, d, d) or score.shape != (h, d):
        raise ValueError(
            f"accumulator shapes {tuple(gram_q.shape)}, {tuple(gram_k.shape)}, {tuple(score.shape)} "
            f"do not match H={h}, d={d}"
        )
    if any(t.dtype != torch.float64 for t in (gram_q, gram_k, score)):
        raise TypeError("gram_q, gram_k and score must be float64")
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    if any(t.device != qkv.device for t in (gram_q, gram_k, score)):
        raise ValueError("accumulators and qkv must be on the same device")
    precision = _check_precision(input_precision)
    if qkv.dtype != torch.float32:
        precision = "ieee"  # exact 16-bit products whatever was asked: one compiled variant
    check_launch(qkv.device)
    if qkv.numel() == 0:
        return
    v, n, t, sb, st, sc, is_3d = token_view(qkv)
    split = int(split_k) if split_k else choose_attention_split(n, h, qkv.device)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    block_d = max(16, triton.next_power_of_2(d))

    def args(gq, gk, s):
        return (v, gq, gk, s, n, t, d, h * d, sb, st, sc,
                gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1), gk.stride(2),
                s.stride(0), s.stride(1))

    meta = dict(BLOCK_D=block_d, IS_3D=is_3d, UPCAST=_INTERPRETED and qkv.dtype != torch.float32,
                INPUT_PRECISION=precision, ATOMIC=split > 1,
                ROUND_TF32=precision == "tf32" and qkv.dtype == torch.float32)
    grid = (h, split)
    if _INTERPRETED:
        cfg = {"BLOCK_K": INTERPRETER_BLOCK_K, **(config or {})}
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
        _attention_stats_kernel[grid](*args(gram_q, gram_k, score), **meta, **cfg)
        return
    with torch.cuda.device(qkv.device):
        if config is not None or os.environ.get("CORP_TRITON_AUTOTUNE", "1") == "0":
            cfg = {"BLOCK_K": 64, "num_warps": 4 if block_d <= 64 else 8, "num_stages": 3, **(config or {})}
            _attention_stats_kernel[grid](*args(gram_q, gram_k, score), **meta, **cfg)
            return
        key = (d, h, qkv.dtype, precision, split > 1, is_3d, qkv.device)
        if key not in _tuned_keys:
            # tune on scratch accumulators: benchmarking runs the kernel many times
            _attention_stats_kernel_tuned[grid](
                *args(torch.zeros_like(gram_q), torch.zeros_like(gram_k), torch.zeros_like(score)), **meta)
            _tuned_keys.add(key)
        _attention_stats_kernel_tuned[grid](*args(gram_q, gram_k, score), **meta)
