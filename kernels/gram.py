"""Streaming Gram matrix (SYRK) and column sums in Triton.

``gram_update_triton_(gram, colsum, x)`` adds ``xᵀx`` (upper triangle only) and
``Σx`` of one chunk of tokens into fp64 running accumulators, exactly what the
PyTorch reference :func:`corp.reference.gram_update_` does.

Design:

* Work items: only the tiles on or above the diagonal are computed. Work item
  ``w`` is tile ``t = w mod n_tiles`` of token split ``s = w div n_tiles``;
  tile ``t = j(j+1)/2 + i`` is ``(i, j)``, ``i ≤ j``. Diagonal tiles mask their
  strict lower triangle on store, so the accumulator's strict lower triangle is
  never touched (as in the reference).
* Grid: one program per work item, or a persistent grid of a few programs per
  SM that loop over the work items (``PROGRAMS_PER_SM`` of the configuration;
  both are in the autotuned set). Diagonal and off-diagonal tiles run two
  specialisations of one tile routine, chosen once per work item: no branch in
  the K loop, and a diagonal tile loads its column block once (it is both
  operands).
* Precision, three levels (the error is flat in the number of tokens):

  1. the tensor cores sum ``PROMOTE_TOKENS`` tokens into an fp32 accumulator
     (16-bit inputs give exact products; fp32 inputs use ``input_precision``,
     default "ieee", see :data:`corp.kernels.INPUT_PRECISIONS`);
  2. that accumulator is then added into a second fp32 register accumulator
     (an IEEE round-to-nearest add) and reset: the tensor cores' fp32
     accumulation truncates, and on the H200 its error grew linearly with the
     tokens summed (3.1e-6 relative at 1,024 tokens, 1.3e-4 at 32,768);
  3. every ``FLUSH_TOKENS`` tokens the second accumulator is added into fp64 in
     global memory (the caller's accumulator, or the split's workspace slice).
* Split over tokens (the ``split`` work items per tile): only to fill the GPU
  when the upper tiles are too few (D ≤ 1536 gives ≤ 78 tiles of 128). Each
  split adds into its own fp64 workspace slice, and one reduction kernel then
  adds the slices into the accumulator in a fixed order (split 0, 1, ...): two
  calls on the same input give bit-identical results (no atomics anywhere).
  Without a split the program owns its tile and adds with a plain
  load-add-store.
* Column sums come from the diagonal tiles only (each column block once),
  promoted and flushed like the products.
* Inputs: any-stride ``(N, D)`` views, or ``(B, T, D)`` views whose tokens
  cannot be flattened without a copy (token ``n`` is then at
  ``(n // T)·stride_b + (n % T)·stride_t``); fp32, bf16 or fp16.
* Autotuning (CUDA only): the first call for a new key tunes on scratch
  accumulators, never on the caller's, so tuning cannot add a chunk twice.
  Determinism holds for one configuration: the summation order depends on
  ``BLOCK``/``BLOCK_K``/warps. The tuned choice is kept in Triton's cache
  (``cache_results``, where the installed Triton has it), so later processes on
  the same machine (a resumed prune) use the same one; across machines, pin it
  (``CORP_TRITON_AUTOTUNE=0`` or ``config=``).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import INPUT_PRECISIONS, get_default_input_precision

try:  # guarded: this module imports without triton; the launcher then raises
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "gram_update_triton_",
    "PROMOTE_TOKENS",
    "FLUSH_TOKENS",
    "MAX_TOKENS_PER_PROGRAM",
    "WORKSPACE_BYTES",
    "choose_split",
    "default_cuda_config",
    "cuda_configs",
]

# Tokens the tensor cores sum into one fp32 accumulator before it is promoted into the second fp32
# accumulator. The H200's bf16 Gram error grew by about 3e-9 per token summed in one tensor-core
# accumulator (3.1e-6 at 1,024 tokens): 256 tokens keep that part near 1e-6, while the promotion (one
# BLOCK×BLOCK fp32 add, 64 FADDs per thread at BLOCK = 128 and 8 warps) comes once per 4 MMA steps of
# BLOCK_K = 64, ~2% of the tensor-core time of those steps by an operation count (not yet measured).
# A multiple of every BLOCK_K of the configurations (16–128), so promotions fall on step boundaries.
PROMOTE_TOKENS = 256
# Tokens the second fp32 accumulator sums (FLUSH_TOKENS / PROMOTE_TOKENS = 128 promoted partials,
# rounding error ≲ 128 ulps worst case, ~11 typical) before it is added into fp64 in global memory;
# one 128×128 fp64 read-modify-write per 32,768 tokens costs < 1% of the tile's input reads.
FLUSH_TOKENS = 32768
# Kept for callers of the previous version: the longest run of tokens summed in fp32 before fp64.
MAX_TOKENS_PER_PROGRAM = FLUSH_TOKENS
# Do not split below this many tokens per split (the workspace traffic would dominate).
MIN_TOKENS_PER_SPLIT = 1024
# Largest fp64 split workspace (bytes): partials of this size written and read back at once stay
# mostly in the L2 cache of an H100/H200 (50 MB), so the deterministic reduction adds little
# traffic; the split is reduced until its workspace fits.
WORKSPACE_BYTES = 32 << 20
# Tile size assumed when choosing the split (the autotuned tile may be smaller, which only adds tiles).
_SPLIT_TILE = 128
# Interpreter (CPU) tiles: small, so that odd test shapes cross several tiles; PROGRAMS_PER_SM = 0
# is one program per work item (the interpreter runs programs one after another anyway).
INTERPRETER_CONFIG = {"BLOCK": 32, "BLOCK_K": 32, "PROGRAMS_PER_SM": 0}
# Tile of the split-reduction kernel (a memory-bound elementwise pass).
_REDUCE_BLOCK = 64

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if triton is not None:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)

    @triton.jit
    def _round_to_tf32(x):
        """Round fp32 ``x`` to the nearest TF32 value (10-bit mantissa, ties away from zero).

        The tensor cores read an fp32 operand's top 19 bits and drop the rest (truncation), which
        biases every product towards zero: on the H200 (2026-11-26) the tf32 Gram of positive-mean
        data came out 17x less accurate than cuBLAS's TF32 product, which rounds first
        (cvt.rna.tf32.f32). Rounding here makes the dropped bits zero.
        """
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)

    @triton.jit
    def _flush_block(ptrs, acc, mask, keep_old):
        """``*ptrs += acc`` in fp64 (``keep_old`` False: overwrite, a workspace slice's first flush)."""
        old = tl.load(ptrs, mask=mask & keep_old, other=0.0)
        tl.store(ptrs, old + acc.to(tl.float64), mask=mask)

    @triton.jit
    def _token_offsets(tok, T, stride_b, stride_t, IS_3D: tl.constexpr):
        """Memory offsets (elements, int64) of tokens ``tok``: ``n·stride_t``, or ``(n // T)·stride_b + (n % T)·stride_t``."""
        tok64 = tok.to(tl.int64)
        if IS_3D:
            off = (tok64 // T) * stride_b + (tok64 % T) * stride_t
        else:
            off = tok64 * stride_t
        return off

    @triton.jit
    def _sum_splits_kernel(
        ws_ptr, dst_ptr, SPLIT, R, C,
        ws_s, ws_b, ws_r, ws_c, dst_b, dst_r, dst_c,
        UPPER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """``dst[b] += Σ_s ws[s, b]`` over a ``(B, R, C)`` block, the splits added in order 0, 1, ... in fp64.

        The fixed order makes the result independent of which split finished first. ``UPPER``
        restricts it to ``r ≤ c`` (the Gram's upper triangle).
        """
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        bat = tl.program_id(2).to(tl.int64)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (r < R)[:, None] & (c < C)[None, :]
        if UPPER:
            m = m & (r[:, None] <= c[None, :])
        r64 = r.to(tl.int64)
        c64 = c.to(tl.int64)
        ws_off = bat * ws_b + r64[:, None] * ws_r + c64[None, :] * ws_c
        total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
        for s in range(0, SPLIT):
            total += tl.load(ws_ptr + s * ws_s + ws_off, mask=m, other=0.0)
        d_ptrs = dst_ptr + bat * dst_b + r64[:, None] * dst_r + c64[None, :] * dst_c
        old = tl.load(d_ptrs, mask=m, other=0.0)
        tl.store(d_ptrs, old + total, mask=m)

    @triton.jit
    def _gram_tile(
        x_ptr, out_ptr, ocs_ptr, i, j, k_start, k_stop,
        D, T, stride_b, stride_t, stride_d, stride_or, stride_oc, stride_ocs,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DIAG: tl.constexpr, ADD_TO_OUT: tl.constexpr,
        IS_3D: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
        PROMOTE: tl.constexpr, FLUSH: tl.constexpr,
    ):
        """Tokens ``[k_start, k_stop)`` of tile ``(i, j)`` into ``out`` (fp64; ``ADD_TO_OUT``: add to it,
        else a workspace slice that the first flush overwrites). ``DIAG``: ``i == j`` (one operand
        load; column sums into ``ocs``)."""
        rows = i * BLOCK + tl.arange(0, BLOCK)  # gram rows = columns of x
        cols = j * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < D
        col_ok = cols < D
        row_off = rows.to(tl.int64) * stride_d
        col_off = cols.to(tl.int64) * stride_d
        offs_k = tl.arange(0, BLOCK_K)
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_or + cols.to(tl.int64)[None, :] * stride_oc
        o_mask = row_ok[:, None] & col_ok[None, :] & (rows[:, None] <= cols[None, :])
        c_ptrs = ocs_ptr + cols.to(tl.int64) * stride_ocs
        STEPS = (PROMOTE + BLOCK_K - 1) // BLOCK_K  # MMA steps per promotion (a constexpr, >= 1)

        for seg in range(k_start, k_stop, FLUSH):
            seg_stop = tl.minimum(seg + FLUSH, k_stop)
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # the tensor cores' accumulator
            acc_hi = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # the promoted one
            csum = tl.zeros((BLOCK,), dtype=tl.float32)
            csum_hi = tl.zeros((BLOCK,), dtype=tl.float32)
            for step in range(0, tl.cdiv(seg_stop - seg, BLOCK_K)):
                tok = seg + step * BLOCK_K + offs_k
                tok_ok = tok < seg_stop
                tok_off = _token_offsets(tok, T, stride_b, stride_t, IS_3D)
                b = tl.load(x_ptr + tok_off[:, None] + col_off[None, :],
                            mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
                if DIAG:
                    a = b
                else:
                    a = tl.load(x_ptr + tok_off[:, None] + row_off[None, :],
                                mask=tok_ok[:, None] & row_ok[None, :], other=0.0)
                if UPCAST:  # the interpreter's 16-bit dot is wrong: upcast there (only there)
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if DIAG:  # column sums of the inputs as they are (before any TF32 rounding)
                    csum += tl.sum(b.to(tl.float32), axis=0)
                if ROUND_TF32:
                    a = _round_to_tf32(a)
                    b = _round_to_tf32(b)
                acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
                if step % STEPS == STEPS - 1:
                    acc_hi += acc
                    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
                    if DIAG:
                        csum_hi += csum
                        csum = tl.zeros((BLOCK,), dtype=tl.float32)
            acc_hi += acc
            # flush into fp64: a workspace slice is overwritten by its first segment (no zero fill)
            if ADD_TO_OUT:
                keep = seg >= k_start  # always: add to the caller's accumulator
            else:
                keep = seg > k_start
            _flush_block(o_ptrs, acc_hi, o_mask, keep)
            if DIAG:
                _flush_block(c_ptrs, csum_hi + csum, col_ok, keep)
        if not ADD_TO_OUT:  # a split with no tokens still defines its workspace slice
            empty = k_start >= k_stop
            tl.store(o_ptrs, tl.zeros((BLOCK, BLOCK), dtype=tl.float64), mask=o_mask & empty)
            if DIAG:
                tl.store(c_ptrs, tl.zeros((BLOCK,), dtype=tl.float64), mask=col_ok & empty)

    @triton.jit
    def _gram_kernel(
        x_ptr, out_ptr, ocs_ptr,
        N, D, T, SPLIT,
        stride_b, stride_t, stride_d,
        stride_os, stride_or, stride_oc, stride_ocs_s, stride_ocs,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
        IS_3D: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
        ADD_TO_OUT: tl.constexpr, PROMOTE: tl.constexpr, FLUSH: tl.constexpr,
    ):
        """Work items ``pid, pid + programs, ...`` of the ``n_tiles × SPLIT`` ones. ``out`` is the
        accumulator (``SPLIT == 1``, ``ADD_TO_OUT``) or the ``(SPLIT, D, D)`` workspace."""
        nt = tl.cdiv(D, BLOCK)
        n_tiles = nt * (nt + 1) // 2
        per_split = tl.cdiv(tl.cdiv(N, SPLIT), BLOCK_K) * BLOCK_K
        for w in range(tl.program_id(0), n_tiles * SPLIT, tl.num_programs(0)):
            t = w % n_tiles
            s = w // n_tiles
            # upper-triangular tile (i, j), i <= j, from t = j (j + 1) / 2 + i (float guess, exact fix-up)
            j = ((tl.sqrt(t.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
            j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
            j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
            i = t - j * (j + 1) // 2
            k_start = s * per_split
            k_stop = tl.minimum(k_start + per_split, N)
            out_s = out_ptr + s.to(tl.int64) * stride_os
            ocs_s = ocs_ptr + s.to(tl.int64) * stride_ocs_s
            if i == j:
                _gram_tile(x_ptr, out_s, ocs_s, i, j, k_start, k_stop, D, T, stride_b, stride_t, stride_d,
                           stride_or, stride_oc, stride_ocs, BLOCK, BLOCK_K, True, ADD_TO_OUT, IS_3D, UPCAST,
                           INPUT_PRECISION, ROUND_TF32, PROMOTE, FLUSH)
            else:
                _gram_tile(x_ptr, out_s, ocs_s, i, j, k_start, k_stop, D, T, stride_b, stride_t, stride_d,
                           stride_or, stride_oc, stride_ocs, BLOCK, BLOCK_K, False, ADD_TO_OUT, IS_3D, UPCAST,
                           INPUT_PRECISION, ROUND_TF32, PROMOTE, FLUSH)

    # Few configurations on purpose: each is compiled and timed for every new key (D, dtype,
    # precision, split or not, 3-D or not) on first use. PROGRAMS_PER_SM = 0: one program per work
    # item; 1–2: a persistent grid (no tail of a last partial wave of short programs at the engine's
    # chunk sizes; the autotuner keeps whichever is faster). No 128×128 tile with 4 warps: its two
    # fp32 accumulators (256 registers a thread) spilled ~200 local loads/stores inside the MMA loop
    # for sm_90 (benchmarks/ops/aot_compile_check.py).
    _CONFIGS_16BIT = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64, "PROGRAMS_PER_SM": 0}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64, "PROGRAMS_PER_SM": 1}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 128, "PROGRAMS_PER_SM": 0}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64, "PROGRAMS_PER_SM": 2}, num_warps=4, num_stages=4),
    ]
    _CONFIGS_FP32 = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 32, "PROGRAMS_PER_SM": 0}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 16, "PROGRAMS_PER_SM": 0}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 32, "PROGRAMS_PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 32, "PROGRAMS_PER_SM": 0}, num_warps=4, num_stages=3),
    ]

    def _configs():
        return _CONFIGS_16BIT + _CONFIGS_FP32

    def _prune(configs, named_args, **kwargs):
        if named_args["x_ptr"].dtype == torch.float32:
            return [c for c in configs if c in _CONFIGS_FP32]
        return [c for c in configs if c in _CONFIGS_16BIT]

    def autotune_options() -> dict:
        """``cache_results=True`` where this Triton has it: the tuned choice is stored in Triton's cache,
        so another process on the same machine (a resumed prune) runs the same configuration, and
        with it the same summation order (bit-identical statistics)."""
        import inspect

        return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

    _gram_kernel_tuned = triton.autotune(
        configs=_configs(),
        key=["D", "IS_3D", "INPUT_PRECISION", "ADD_TO_OUT"],
        prune_configs_by={"early_config_prune": _prune},
        **autotune_options(),
    )(_gram_kernel)
else:
    _INTERPRETED = False

_tuned_keys: set = set()
_num_sms: dict = {}


def cuda_configs(dtype: torch.dtype) -> list[dict]:
    """Every autotuned CUDA configuration for inputs of ``dtype`` as ``config=`` dicts (tests check each)."""
    if triton is None:
        return []
    table = _CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in table]


def _autotune_enabled() -> bool:
    return os.environ.get("CORP_TRITON_AUTOTUNE", "1") != "0"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms:
        _num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms[idx]


def choose_split(n_tokens: int, tiles: int, device: torch.device, d: Optional[int] = None) -> int:
    """Token splits per tile: only to fill the GPU (≥ 2 programs per SM), at least
    ``MIN_TOKENS_PER_SPLIT`` tokens each, with an fp64 workspace of at most ``WORKSPACE_BYTES``
    (``d``: the Gram width, for that bound). 1 on the CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    fill = math.ceil(2 * _sm_count(device) / max(tiles, 1))
    fill = min(fill, max(1, n_tokens // MIN_TOKENS_PER_SPLIT))
    if d is not None:
        fill = min(fill, max(1, WORKSPACE_BYTES // (8 * (d * d + d))))
    return max(1, fill)


def token_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int, bool]:
    """Describe the tokens of ``x`` ``(..., D)`` without copying when possible.

    Returns ``(view, N, T, stride_b, stride_t, stride_d, is_3d)``: token ``n`` of
    the ``N`` tokens starts at ``(n // T)·stride_b + (n % T)·stride_t`` when
    ``is_3d``, else at ``n·stride_t``.
    """
    d = x.shape[-1]
    if x.dim() == 1:
        x = x.unsqueeze(0)
    try:
        v = x.view(-1, d)
        return v, v.shape[0], v.shape[0], 0, v.stride(0), v.stride(1), False
    except RuntimeError:
        pass
    # leading dims that do not merge: keep the last two apart (copies only for
    # ≥ 4-D inputs whose batch dims themselves do not merge)
    v = x.reshape(-1, x.shape[-2], d)
    return v, v.shape[0] * v.shape[1], v.shape[1], v.stride(0), v.stride(1), v.stride(2), True


def check_launch(device: torch.device) -> None:
    """Raise unless Triton can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if triton is None:
        raise RuntimeError("the Triton statistics kernels need triton: pip install triton (it ships with CUDA builds of torch)")
    if device.type == "cuda":
        if _INTERPRETED:
            raise RuntimeError("triton was imported with TRITON_INTERPRET=1: kernels run only on CPU tensors in this process")
        return
    if not _INTERPRETED:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device.type}); to run them on the CPU in Triton's "
            "interpreter, set TRITON_INTERPRET=1 before anything imports triton"
        )


def _check_precision(input_precision: Optional[str]) -> str:
    p = input_precision or get_default_input_precision()
    if p not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {p!r}")
    return p


def check_promote(promote_tokens: Optional[int], flush_tokens: int) -> int:
    """The promotion period to use: a power of two ≥ 16 (a multiple of every BLOCK_K) dividing ``flush_tokens``."""
    p = PROMOTE_TOKENS if promote_tokens is None else int(promote_tokens)
    if flush_tokens < 16 or flush_tokens & (flush_tokens - 1):
        raise ValueError(f"flush_tokens must be a power of two >= 16, got {flush_tokens}")
    p = min(p, flush_tokens)
    if p < 16 or p & (p - 1) or flush_tokens % p:
        raise ValueError(f"promote_tokens must be a power of two >= 16 dividing {flush_tokens}, got {promote_tokens}")
    return p


def sum_splits_(dst: torch.Tensor, workspace: torch.Tensor, upper: bool = False) -> None:
    """``dst += workspace.sum(0)`` in fp64, the splits added in order (deterministic). ``dst`` ``(R, C)``
    or ``(B, R, C)``, any strides; ``workspace`` ``(S, *dst.shape)``; ``upper``: only ``r ≤ c``."""
    d3 = dst if dst.dim() == 3 else dst.unsqueeze(0)
    w4 = workspace if workspace.dim() == 4 else workspace.unsqueeze(1)
    s, b, r, c = w4.shape
    grid = (triton.cdiv(r, _REDUCE_BLOCK), triton.cdiv(c, _REDUCE_BLOCK), b)
    _sum_splits_kernel[grid](w4, d3, s, r, c, *w4.stride(), *d3.stride(), UPPER=upper,
                             BLOCK_R=_REDUCE_BLOCK, BLOCK_C=_REDUCE_BLOCK)


def default_cuda_config(dtype: torch.dtype) -> dict:
    """The untuned CUDA configuration (``CORP_TRITON_AUTOTUNE=0``)."""
    if dtype == torch.float32:
        return dict(BLOCK=128, BLOCK_K=32, PROGRAMS_PER_SM=0, num_warps=8, num_stages=3)
    return dict(BLOCK=128, BLOCK_K=64, PROGRAMS_PER_SM=0, num_warps=8, num_stages=3)


def gram_update_triton_(
    gram: torch.Tensor,
    colsum: torch.Tensor,
    x: torch.Tensor,
    input_precision: Optional[str] = None,
    split_k: Optional[int] = None,
    config: Optional[dict] = None,
    promote_tokens: Optional[int] = None,
    flush_tokens: Optional[int] = None,
) -> None:
    """Add one chunk's upper-triangular ``xᵀx`` and ``Σx`` into fp64 accumulators, in Triton.

    Args:
        gram: ``(D, D)`` float64 accumulator, any strides; only the upper
            triangle (diagonal included) is updated.
        colsum: ``(D,)`` float64 accumulator.
        x: ``(..., D)`` fp32, bf16 or fp16 activations, any strides.
        input_precision: products of fp32 inputs, one of
            :data:`corp.kernels.INPUT_PRECISIONS` (None: the default, "ieee").
        split_k: token splits per tile (None: chosen from the GPU size; forced
            values are for tests and benchmarks). Splits are reduced in a fixed
            order: the result does not depend on timing.
        config: fixed kernel parameters instead of the tuned/default ones:
            ``BLOCK``, ``BLOCK_K``, ``PROGRAMS_PER_SM`` and, on CUDA,
            ``num_warps``, ``num_stages``.
        promote_tokens: tokens per tensor-core accumulator before promotion
            (None: :data:`PROMOTE_TOKENS`; :data:`FLUSH_TOKENS` turns promotion
            off, for benchmarks measuring its cost).
        flush_tokens: tokens per fp64 flush (None: :data:`FLUSH_TOKENS`; smaller
            values are for tests, which must stay short in the interpreter).
    """
    d = x.shape[-1]
    if gram.shape != (d, d) or colsum.shape != (d,):
        raise ValueError(f"accumulator shapes {tuple(gram.shape)}, {tuple(colsum.shape)} do not match D={d}")
    if gram.dtype != torch.float64 or colsum.dtype != torch.float64:
        raise TypeError("gram and colsum must be float64")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if gram.device != x.device or colsum.device != x.device:
        raise ValueError("gram, colsum and x must be on the same device")
    precision = _check_precision(input_precision)
    flush = FLUSH_TOKENS if flush_tokens is None else int(flush_tokens)
    promote = check_promote(promote_tokens, flush)
    if x.dtype != torch.float32:
        precision = "ieee"  # exact 16-bit products whatever was asked: one compiled variant
    check_launch(x.device)
    if split_k is not None and int(split_k) < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if x.numel() == 0:
        return
    if precision == "tf32" and x.is_cuda and x.stride(-1) == 1:
        # TF32 tensor-core products need K-major operands (K = tokens here); a row-major chunk gives
        # M-major ones and a slow path. H200, D = 768-5120, 64k-262k tokens: 39-64 TFLOP/s row-major
        # vs 254-430 column-major (0.2x vs 1.1-1.6x torch's TF32 X.T @ X); the transposing copy
        # costs about one read and one write of the chunk (~1.6 ms of a 12 ms update at D = 3072).
        x = x.reshape(-1, d).T.contiguous().T
    v, n, t, sb, st, sd, is_3d = token_view(x)
    tiles_ref = math.ceil(d / _SPLIT_TILE)
    split = int(split_k) if split_k else choose_split(n, tiles_ref * (tiles_ref + 1) // 2, x.device, d)
    upcast = _INTERPRETED and x.dtype != torch.float32
    sms = _sm_count(x.device)

    if split > 1:  # every split into its own slice, reduced in order afterwards
        ws = torch.empty((split, d, d), dtype=torch.float64, device=x.device)
        ws_c = torch.empty((split, d), dtype=torch.float64, device=x.device)
        out, out_c = ws, ws_c
        strides = (ws.stride(0), ws.stride(1), ws.stride(2), ws_c.stride(0), ws_c.stride(1))
    else:
        out, out_c = gram, colsum
        strides = (0, gram.stride(0), gram.stride(1), 0, colsum.stride(0))

    def args(o, oc):
        return (v, o, oc, n, d, t, split, sb, st, sd, *strides)

    meta = dict(IS_3D=is_3d, UPCAST=upcast, INPUT_PRECISION=precision,
                ROUND_TF32=precision == "tf32" and x.dtype == torch.float32,
                ADD_TO_OUT=split == 1, PROMOTE=promote, FLUSH=flush)

    def grid(m):
        nt = triton.cdiv(d, m["BLOCK"])
        work = nt * (nt + 1) // 2 * split
        per_sm = m["PROGRAMS_PER_SM"]
        return (min(work, per_sm * sms) if per_sm else work,)

    def finish():
        if split > 1:
            sum_splits_(gram, ws, upper=True)
            sum_splits_(colsum.unsqueeze(0), ws_c.unsqueeze(1))

    if _INTERPRETED:
        cfg = {**INTERPRETER_CONFIG, **(config or {})}
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
        _gram_kernel[grid(cfg)](*args(out, out_c), **meta, **cfg)
        finish()
        return
    with torch.cuda.device(x.device):
        if config is not None or not _autotune_enabled():
            cfg = {**default_cuda_config(x.dtype), **(config or {})}
            _gram_kernel[grid(cfg)](*args(out, out_c), **meta, **cfg)
            finish()
            return
        key = (d, x.dtype, precision, split > 1, is_3d, x.device)
        if key not in _tuned_keys and split == 1:
            # tune on scratch accumulators: benchmarking runs the kernel many times (a workspace is
            # overwritten by each run, so with a split the tuning may run on the real one)
            _gram_kernel_tuned[grid](*args(torch.zeros_like(gram), torch.zeros_like(colsum)), **meta)
        _tuned_keys.add(key)
        _gram_kernel_tuned[grid](*args(out, out_c), **meta)
        finish()
