"""Fused attention statistics in Triton.

``attention_stats_update_triton_(gram_q, gram_k, score, qkv, H, d)`` adds, for
every head ``h`` of one block, ``Σ q qᵀ``, ``Σ k kᵀ`` (d × d) and
``Σ q_j² k_j²`` (d) into fp64 accumulators, reading the fused qkv projection
output ``(..., 3·H·d)`` (timm layout ``[q heads | k heads | v heads]``) in place:
no copy, no permute, and the v third is never read.

Grid: ``(H, split)``. Program ``(h, s)`` streams its share of the tokens once,
loading the q and k slices of head ``h`` and accumulating both Grams
(``tl.dot``) and the score in fp32, promoted and flushed into fp64 as in
:mod:`corp.kernels.gram` (``PROMOTE_TOKENS``, ``FLUSH_TOKENS``). Heads alone
(12–16) cannot fill a GPU, so the tokens are split to give about two programs
per SM; each split adds into its own fp64 workspace slice and one reduction
adds the slices in a fixed order (bit-identical results run to run; no atomics).

Head dims that are not a power of two are not padded to one: the head dim is cut
into a power-of-two block ``D0`` (the largest ≤ d) and a tail block ``D1`` (the
rest, rounded up to a power of two ≥ 16, the smallest ``tl.dot`` operand), and
the Gram is computed as its three blocks ``(0,0)``, ``(0,1)``, ``(1,1)`` (the
fourth is the transpose of ``(0,1)``). d = 80 (DeiT-III Huge) is 64 + 16:
5,376 products per token and Gram instead of 16,384 with 80 padded to 128, and
no masked lanes in the loads; d = 40 is 32 + 16 (8 masked), d = 24 is 16 + 16.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .gram import (
    FLUSH_TOKENS,
    WORKSPACE_BYTES,
    _INTERPRETED,
    _SUPPORTED_DTYPES,
    _check_precision,
    _sm_count,
    check_launch,
    check_promote,
    sum_splits_,
    token_view,
    triton,
)

if triton is not None:
    import triton.language as tl

    from .gram import _flush_block, _round_to_tf32, _token_offsets, autotune_options

__all__ = ["attention_stats_update_triton_", "choose_attention_split", "head_dim_blocks", "cuda_configs"]

# Fewest tokens per program when splitting (each split ends with a 2·d² + d fp64 workspace write).
MIN_TOKENS_PER_SPLIT = 256
INTERPRETER_BLOCK_K = 32


def head_dim_blocks(d: int) -> tuple[int, int]:
    """``(D0, D1)``: the power-of-two block (largest ≤ d, at least 16) and the tail block (the rest
    rounded up to a power of two ≥ 16; 0 when there is no rest) that the kernel cuts d into."""
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got {d}")
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    d1 = 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())
    return d0, d1


if triton is not None:

    @triton.jit
    def _attention_stats_kernel(
        qkv_ptr, gq_ptr, gk_ptr, score_ptr,
        N, T, d, HD,
        stride_b, stride_t, stride_c,
        sq_s, sq_h, sq_r, sq_c, sk_s, sk_h, sk_r, sk_c, ss_s, ss_h, ss_c,
        D0: tl.constexpr, D1: tl.constexpr, BLOCK_K: tl.constexpr,
        IS_3D: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
        ADD_TO_OUT: tl.constexpr, PROMOTE: tl.constexpr, FLUSH: tl.constexpr,
    ):
        head = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_split = tl.num_programs(1)
        TAIL: tl.constexpr = D1 > 0
        B1: tl.constexpr = D1 if D1 > 0 else 16  # shape of the (unused) tail tensors when there is no tail

        dims0 = tl.arange(0, D0)
        dims1 = D0 + tl.arange(0, B1)
        ok0 = dims0 < d
        ok1 = dims1 < d
        q_off0 = (head * d + dims0).to(tl.int64) * stride_c
        k_off0 = (HD + head * d + dims0).to(tl.int64) * stride_c
        q_off1 = (head * d + dims1).to(tl.int64) * stride_c
        k_off1 = (HD + head * d + dims1).to(tl.int64) * stride_c

        per_split = tl.cdiv(tl.cdiv(N, n_split), BLOCK_K) * BLOCK_K
        k_start = pid_k * per_split
        k_stop = tl.minimum(k_start + per_split, N)
        offs_k = tl.arange(0, BLOCK_K)
        STEPS = (PROMOTE + BLOCK_K - 1) // BLOCK_K  # MMA steps per promotion (a constexpr, >= 1)

        # output pointers of the blocks (0,0), (0,1), (1,0) = (0,1)ᵀ, (1,1) and of the score
        r0 = dims0.to(tl.int64)
        r1 = dims1.to(tl.int64)
        base_q = gq_ptr + pid_k.to(tl.int64) * sq_s + head * sq_h
        base_k = gk_ptr + pid_k.to(tl.int64) * sk_s + head * sk_h
        base_s = score_ptr + pid_k.to(tl.int64) * ss_s + head * ss_h
        m00 = ok0[:, None] & ok0[None, :]
        m01 = ok0[:, None] & ok1[None, :]
        m10 = ok1[:, None] & ok0[None, :]
        m11 = ok1[:, None] & ok1[None, :]

        for seg in range(k_start, k_stop, FLUSH):
            seg_stop = tl.minimum(seg + FLUSH, k_stop)
            # the tensor cores' accumulators and their promoted copies (suffix _hi)
            q00 = tl.zeros((D0, D0), dtype=tl.float32)
            k00 = tl.zeros((D0, D0), dtype=tl.float32)
            q01 = tl.zeros((D0, B1), dtype=tl.float32)
            k01 = tl.zeros((D0, B1), dtype=tl.float32)
            q11 = tl.zeros((B1, B1), dtype=tl.float32)
            k11 = tl.zeros((B1, B1), dtype=tl.float32)
            s0 = tl.zeros((D0,), dtype=tl.float32)
            s1 = tl.zeros((B1,), dtype=tl.float32)
            q00_hi = tl.zeros((D0, D0), dtype=tl.float32)
            k00_hi = tl.zeros((D0, D0), dtype=tl.float32)
            q01_hi = tl.zeros((D0, B1), dtype=tl.float32)
            k01_hi = tl.zeros((D0, B1), dtype=tl.float32)
            q11_hi = tl.zeros((B1, B1), dtype=tl.float32)
            k11_hi = tl.zeros((B1, B1), dtype=tl.float32)
            s0_hi = tl.zeros((D0,), dtype=tl.float32)
            s1_hi = tl.zeros((B1,), dtype=tl.float32)
            for step in range(0, tl.cdiv(seg_stop - seg, BLOCK_K)):
                tok = seg + step * BLOCK_K + offs_k
                tok_ok = tok < seg_stop
                tok_off = _token_offsets(tok, T, stride_b, stride_t, IS_3D)
                m0 = tok_ok[:, None] & ok0[None, :]
                qa = tl.load(qkv_ptr + tok_off[:, None] + q_off0[None, :], mask=m0, other=0.0)
                ka = tl.load(qkv_ptr + tok_off[:, None] + k_off0[None, :], mask=m0, other=0.0)
                if UPCAST:  # the interpreter's 16-bit dot is wrong: upcast there (only there)
                    qa = qa.to(tl.float32)
                    ka = ka.to(tl.float32)
                # the score from the inputs as they are (before any TF32 rounding)
                s0 += tl.sum(qa.to(tl.float32) * qa.to(tl.float32) * ka.to(tl.float32) * ka.to(tl.float32), axis=0)
                if ROUND_TF32:  # see corp.kernels.gram._round_to_tf32
                    qa = _round_to_tf32(qa)
                    ka = _round_to_tf32(ka)
                q00 = tl.dot(tl.trans(qa), qa, q00, input_precision=INPUT_PRECISION)
                k00 = tl.dot(tl.trans(ka), ka, k00, input_precision=INPUT_PRECISION)
                if TAIL:
                    m1 = tok_ok[:, None] & ok1[None, :]
                    qb = tl.load(qkv_ptr + tok_off[:, None] + q_off1[None, :], mask=m1, other=0.0)
                    kb = tl.load(qkv_ptr + tok_off[:, None] + k_off1[None, :], mask=m1, other=0.0)
                    if UPCAST:
                        qb = qb.to(tl.float32)
                        kb = kb.to(tl.float32)
                    s1 += tl.sum(qb.to(tl.float32) * qb.to(tl.float32) * kb.to(tl.float32) * kb.to(tl.float32),
                                 axis=0)
                    if ROUND_TF32:
                        qb = _round_to_tf32(qb)
                        kb = _round_to_tf32(kb)
                    q01 = tl.dot(tl.trans(qa), qb, q01, input_precision=INPUT_PRECISION)
                    k01 = tl.dot(tl.trans(ka), kb, k01, input_precision=INPUT_PRECISION)
                    q11 = tl.dot(tl.trans(qb), qb, q11, input_precision=INPUT_PRECISION)
                    k11 = tl.dot(tl.trans(kb), kb, k11, input_precision=INPUT_PRECISION)
                if step % STEPS == STEPS - 1:
                    q00_hi += q00
                    k00_hi += k00
                    s0_hi += s0
                    q00 = tl.zeros((D0, D0), dtype=tl.float32)
                    k00 = tl.zeros((D0, D0), dtype=tl.float32)
                    s0 = tl.zeros((D0,), dtype=tl.float32)
                    if TAIL:
                        q01_hi += q01
                        k01_hi += k01
                        q11_hi += q11
                        k11_hi += k11
                        s1_hi += s1
                        q01 = tl.zeros((D0, B1), dtype=tl.float32)
                        k01 = tl.zeros((D0, B1), dtype=tl.float32)
                        q11 = tl.zeros((B1, B1), dtype=tl.float32)
                        k11 = tl.zeros((B1, B1), dtype=tl.float32)
                        s1 = tl.zeros((B1,), dtype=tl.float32)
            # flush into fp64: a workspace slice is overwritten by its first segment (no zero fill)
            if ADD_TO_OUT:
                keep = seg >= k_start  # always: add to the caller's accumulator
            else:
                keep = seg > k_start
            _flush_block(base_q + r0[:, None] * sq_r + r0[None, :] * sq_c, q00_hi + q00, m00, keep)
            _flush_block(base_k + r0[:, None] * sk_r + r0[None, :] * sk_c, k00_hi + k00, m00, keep)
            _flush_block(base_s + r0 * ss_c, s0_hi + s0, ok0, keep)
            if TAIL:
                q01_t = q01_hi + q01
                k01_t = k01_hi + k01
                _flush_block(base_q + r0[:, None] * sq_r + r1[None, :] * sq_c, q01_t, m01, keep)
                _flush_block(base_q + r1[:, None] * sq_r + r0[None, :] * sq_c, tl.trans(q01_t), m10, keep)
                _flush_block(base_q + r1[:, None] * sq_r + r1[None, :] * sq_c, q11_hi + q11, m11, keep)
                _flush_block(base_k + r0[:, None] * sk_r + r1[None, :] * sk_c, k01_t, m01, keep)
                _flush_block(base_k + r1[:, None] * sk_r + r0[None, :] * sk_c, tl.trans(k01_t), m10, keep)
                _flush_block(base_k + r1[:, None] * sk_r + r1[None, :] * sk_c, k11_hi + k11, m11, keep)
                _flush_block(base_s + r1 * ss_c, s1_hi + s1, ok1, keep)
        if not ADD_TO_OUT:  # a split with no tokens still defines its workspace slice
            empty = k_start >= k_stop
            z0 = tl.zeros((D0, D0), dtype=tl.float64)
            tl.store(base_q + r0[:, None] * sq_r + r0[None, :] * sq_c, z0, mask=m00 & empty)
            tl.store(base_k + r0[:, None] * sk_r + r0[None, :] * sk_c, z0, mask=m00 & empty)
            tl.store(base_s + r0 * ss_c, tl.zeros((D0,), dtype=tl.float64), mask=ok0 & empty)
            if TAIL:
                z01 = tl.zeros((D0, B1), dtype=tl.float64)
                z10 = tl.zeros((B1, D0), dtype=tl.float64)
                z11 = tl.zeros((B1, B1), dtype=tl.float64)
                tl.store(base_q + r0[:, None] * sq_r + r1[None, :] * sq_c, z01, mask=m01 & empty)
                tl.store(base_q + r1[:, None] * sq_r + r0[None, :] * sq_c, z10, mask=m10 & empty)
                tl.store(base_q + r1[:, None] * sq_r + r1[None, :] * sq_c, z11, mask=m11 & empty)
                tl.store(base_k + r0[:, None] * sk_r + r1[None, :] * sk_c, z01, mask=m01 & empty)
                tl.store(base_k + r1[:, None] * sk_r + r0[None, :] * sk_c, z10, mask=m10 & empty)
                tl.store(base_k + r1[:, None] * sk_r + r1[None, :] * sk_c, z11, mask=m11 & empty)
                tl.store(base_s + r1 * ss_c, tl.zeros((B1,), dtype=tl.float64), mask=ok1 & empty)

    _CONFIGS = [  # few on purpose: each is compiled and timed per new key
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3),
    ]

    def _keeps(config, width: int) -> bool:
        # 4 warps cannot hold the accumulators (and their promoted copies) of a head dim above 64 in
        # registers: at d = 80 (64 + 16) the bf16 kernel spilled 164 local loads/stores inside the
        # MMA loop for sm_90 (benchmarks/ops/aot_compile_check.py), none with 8 warps.
        return width <= 64 or config.num_warps >= 8

    def _prune(configs, named_args, **kwargs):
        width = int(kwargs.get("D0", 64)) + int(kwargs.get("D1", 0))
        return [c for c in configs if _keeps(c, width)]

    _attention_stats_kernel_tuned = triton.autotune(
        configs=_CONFIGS,
        key=["d", "HD", "IS_3D", "INPUT_PRECISION", "ADD_TO_OUT"],
        prune_configs_by={"early_config_prune": _prune},
        **autotune_options(),  # the same tuned choice in later processes: see corp.kernels.gram
    )(_attention_stats_kernel)

_tuned_keys: set = set()


def cuda_configs(head_dim: Optional[int] = None) -> list[dict]:
    """Every CUDA configuration the autotuner tries (for head dim ``head_dim``; None: all of them), as
    ``config=`` dicts (tests check each against fp64)."""
    if triton is None:
        return []
    width = sum(head_dim_blocks(head_dim)) if head_dim is not None else 0
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _CONFIGS if _keeps(c, width)]


def choose_attention_split(n_tokens: int, num_heads: int, device: torch.device, head_dim: Optional[int] = None) -> int:
    """Token splits per head: about two programs per SM, at least ``MIN_TOKENS_PER_SPLIT`` tokens each,
    an fp64 workspace of at most ``WORKSPACE_BYTES`` (``head_dim`` given). 1 on the CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    fill = math.ceil(2 * _sm_count(device) / max(num_heads, 1))
    fill = min(fill, max(1, n_tokens // MIN_TOKENS_PER_SPLIT))
    if head_dim is not None:
        per_split = 8 * num_heads * (2 * head_dim * head_dim + head_dim)
        fill = min(fill, max(1, WORKSPACE_BYTES // per_split))
    return max(1, fill)


def default_cuda_config(head_dim: int) -> dict:
    """The untuned CUDA configuration (``CORP_TRITON_AUTOTUNE=0``) for head dim ``d``."""
    d0, d1 = head_dim_blocks(head_dim)
    return {"BLOCK_K": 64, "num_warps": 4 if d0 + d1 <= 64 else 8, "num_stages": 3}


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
    promote_tokens: Optional[int] = None,
    flush_tokens: Optional[int] = None,
) -> None:
    """Add one chunk's per-head ``Σ q qᵀ``, ``Σ k kᵀ``, ``Σ q_j² k_j²`` into fp64 accumulators, in Triton.

    Args:
        gram_q, gram_k: ``(H, d, d)`` float64 accumulators, any strides.
        score: ``(H, d)`` float64 accumulator.
        qkv: ``(..., 3·H·d)`` fp32, bf16 or fp16 output of the fused qkv projection, any strides.
        num_heads, head_dim: H and d.
        input_precision: products of fp32 inputs (see :data:`corp.kernels.INPUT_PRECISIONS`).
        split_k: programs per head along the tokens (None: chosen from the GPU size); the splits
            are reduced in a fixed order (deterministic).
        config: fixed kernel parameters instead of the tuned/default ones:
            ``BLOCK_K`` and, on CUDA, ``num_warps``, ``num_stages``.
        promote_tokens, flush_tokens: as in :func:`corp.kernels.gram.gram_update_triton_`.
    """
    h, d = int(num_heads), int(head_dim)
    if h < 1 or d < 1:
        raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads}, {head_dim}")
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
    flush = FLUSH_TOKENS if flush_tokens is None else int(flush_tokens)
    promote = check_promote(promote_tokens, flush)
    if qkv.dtype != torch.float32:
        precision = "ieee"  # exact 16-bit products whatever was asked: one compiled variant
    check_launch(qkv.device)
    if split_k is not None and int(split_k) < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if qkv.numel() == 0:
        return
    v, n, t, sb, st, sc, is_3d = token_view(qkv)
    split = int(split_k) if split_k else choose_attention_split(n, h, qkv.device, d)
    d0, d1 = head_dim_blocks(d)

    if split > 1:  # every split into its own slice, reduced in order afterwards
        ws = [torch.empty((split, h, d, d), dtype=torch.float64, device=qkv.device) for _ in range(2)]
        ws.append(torch.empty((split, h, d), dtype=torch.float64, device=qkv.device))
        outs = ws
        strides = [*ws[0].stride(), *ws[1].stride(), *ws[2].stride()]
    else:
        outs = [gram_q, gram_k, score]
        strides = [0, *gram_q.stride(), 0, *gram_k.stride(), 0, *score.stride()]

    def args(gq, gk, s):
        return (v, gq, gk, s, n, t, d, h * d, sb, st, sc, *strides)

    meta = dict(D0=d0, D1=d1, IS_3D=is_3d, UPCAST=_INTERPRETED and qkv.dtype != torch.float32,
                INPUT_PRECISION=precision, ROUND_TF32=precision == "tf32" and qkv.dtype == torch.float32,
                ADD_TO_OUT=split == 1, PROMOTE=promote, FLUSH=flush)
    grid = (h, split)

    def finish():
        if split > 1:
            sum_splits_(gram_q, ws[0])
            sum_splits_(gram_k, ws[1])
            sum_splits_(score.unsqueeze(0), ws[2].unsqueeze(1))

    if _INTERPRETED:
        cfg = {"BLOCK_K": INTERPRETER_BLOCK_K, **(config or {})}
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
        _attention_stats_kernel[grid](*args(*outs), **meta, **cfg)
        finish()
        return
    with torch.cuda.device(qkv.device):
        if config is not None or os.environ.get("CORP_TRITON_AUTOTUNE", "1") == "0":
            cfg = {**default_cuda_config(d), **(config or {})}
            _attention_stats_kernel[grid](*args(*outs), **meta, **cfg)
            finish()
            return
        key = (d, h, qkv.dtype, precision, split > 1, is_3d, qkv.device)
        if key not in _tuned_keys and split == 1:
            # tune on scratch accumulators: benchmarking runs the kernel many times (a workspace is
            # overwritten by each run, so with a split the tuning may run on the real one)
            _attention_stats_kernel_tuned[grid](
                *args(torch.zeros_like(gram_q), torch.zeros_like(gram_k), torch.zeros_like(score)), **meta)
        _tuned_keys.add(key)
        _attention_stats_kernel_tuned[grid](*args(*outs), **meta)
        finish()
