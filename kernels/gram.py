"""Streaming Gram matrix (SYRK) and column sums in Triton.

``gram_update_triton_(gram, colsum, x)`` adds ``xᵀx`` (upper triangle only) and
``Σx`` of one chunk of tokens into fp64 running accumulators, exactly what the
PyTorch reference :func:`corp.reference.gram_update_` does.

Design:

* Only the tiles on or above the diagonal are computed: program ``p`` of grid
  axis 0 owns tile ``(i, j)``, ``i ≤ j``, with ``p = j(j+1)/2 + i``. Diagonal
  tiles mask their strict lower triangle on store, so the accumulator's strict
  lower triangle is never touched (as in the reference).
* Precision: inside a program, the products are summed in fp32 (16-bit inputs
  give exact products; fp32 inputs use ``input_precision``, default "ieee", see
  :data:`corp.kernels.INPUT_PRECISIONS`); at the end the fp32 tile is added into
  the fp64 accumulator. A program never sums more than ``MAX_TOKENS_PER_PROGRAM``
  tokens in fp32, whatever the chunk size, so the fp32 part of the error is
  bounded by a short sum and the fp64 part is negligible over 10⁶ tokens.
* Split over tokens (grid axis 1): when the upper tiles are too few to fill
  the GPU (D ≤ 1536 gives ≤ 78 tiles of 128) or the chunk exceeds
  ``MAX_TOKENS_PER_PROGRAM``, the tokens are divided among several programs per
  tile, and each adds its fp32 partial into the fp64 accumulator with an fp64
  atomic add (no partial-sum buffer, no second pass). With one program per
  tile the add is a plain load-add-store (deterministic).
* Column sums come from the diagonal programs only (each column block once),
  summed in fp32 alongside their products and added into the fp64 ``colsum``.
* Inputs: any-stride ``(N, D)`` views, or ``(B, T, D)`` views whose tokens
  cannot be flattened without a copy (token ``n`` is then at
  ``(n // T)·stride_b + (n % T)·stride_t``); fp32, bf16 or fp16.
* Autotuning (CUDA only): the first call for a new key tunes on scratch
  accumulators, never on the caller's, so tuning cannot add a chunk twice.
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

__all__ = ["gram_update_triton_", "MAX_TOKENS_PER_PROGRAM", "choose_split", "default_cuda_config"]

# Longest run of tokens one program sums in fp32 before the fp64 add.
MAX_TOKENS_PER_PROGRAM = 32768
# Do not split below this many tokens per program (the fp64 adds would dominate).
MIN_TOKENS_PER_SPLIT = 1024
# Tile size assumed when choosing the split (the autotuned tile may be smaller,
# which only adds programs).
_SPLIT_TILE = 128
# Interpreter (CPU) tiles: small, so that odd test shapes cross several tiles.
INTERPRETER_CONFIG = {"BLOCK": 32, "BLOCK_K": 32}

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
    def _gram_kernel(
        x_ptr, gram_ptr, colsum_ptr,
        N, D, T,
        stride_b, stride_t, stride_d,
        stride_gr, stride_gc, stride_c,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        IS_3D: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr, ROUND_TF32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_split = tl.num_programs(1)
        # upper-triangular tile (i, j), i <= j, from pid = j (j + 1) / 2 + i
        j = ((tl.sqrt(pid.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        i = pid - j * (j + 1) // 2
        is_diag = i == j

        rows = i * BLOCK + tl.arange(0, BLOCK)  # gram rows = columns of x
        cols = j * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < D
        col_ok = cols < D
        row_off = rows.to(tl.int64) * stride_d
        col_off = cols.to(tl.int64) * stride_d

        per_split = tl.cdiv(tl.cdiv(N, n_split), BLOCK_K) * BLOCK_K
        k_start = pid_k * per_split
        k_stop = tl.minimum(k_start + per_split, N)
        offs_k = tl.arange(0, BLOCK_K)

        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        csum = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(k_start, k_stop, BLOCK_K):
            tok = k + offs_k
            tok_ok = tok < k_stop
            tok64 = tok.to(tl.int64)
            if IS_3D:
                tok_off = (tok64 // T) * stride_b + (tok64 % T) * stride_t
            else:
                tok_off = tok64 * stride_t
            a = tl.load(x_ptr + tok_off[:, None] + row_off[None, :],
                        mask=tok_ok[:, None] & row_ok[None, :], other=0.0)
            b = tl.load(x_ptr + tok_off[:, None] + col_off[None, :],
                        mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong: upcast there (only there)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if is_diag:  # column sums of the inputs as they are (before any TF32 rounding)
                csum += tl.sum(b.to(tl.float32), axis=0)
            if ROUND_TF32:
                a = _round_to_tf32(a)
                b = _round_to_tf32(b)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

        g_ptrs = gram_ptr + rows.to(tl.int64)[:, None] * stride_gr + cols.to(tl.int64)[None, :] * stride_gc
        g_mask = row_ok[:, None] & col_ok[None, :] & (rows[:, None] <= cols[None, :])
        acc64 = acc.to(tl.float64)
        if ATOMIC:
            tl.atomic_add(g_ptrs, acc64, mask=g_mask, sem="relaxed")
        else:
            old = tl.load(g_ptrs, mask=g_mask, other=0.0)
            tl.store(g_ptrs, old + acc64, mask=g_mask)
        if is_diag:
            c_ptrs = colsum_ptr + cols.to(tl.int64) * stride_c
            if ATOMIC:
                tl.atomic_add(c_ptrs, csum.to(tl.float64), mask=col_ok, sem="relaxed")
            else:
                old_c = tl.load(c_ptrs, mask=col_ok, other=0.0)
                tl.store(c_ptrs, old_c + csum.to(tl.float64), mask=col_ok)

    # Few configurations on purpose: each is compiled and timed for every new
    # key (D, dtype, precision, split or not, 3-D or not) on first use.
    _CONFIGS_16BIT = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    _CONFIGS_FP32 = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]

    def _configs():
        return _CONFIGS_16BIT + _CONFIGS_FP32

    def _prune(configs, named_args, **kwargs):
        if named_args["x_ptr"].dtype == torch.float32:
            return [c for c in configs if c in _CONFIGS_FP32]
        return [c for c in configs if c in _CONFIGS_16BIT]

    _gram_kernel_tuned = triton.autotune(
        configs=_configs(),
        key=["D", "IS_3D", "INPUT_PRECISION", "ATOMIC"],
        prune_configs_by={"early_config_prune": _prune},
    )(_gram_kernel)
else:
    _INTERPRETED = False

_tuned_keys: set = set()
_num_sms: dict = {}


def _autotune_enabled() -> bool:
    return os.environ.get("CORP_TRITON_AUTOTUNE", "1") != "0"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms:
        _num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms[idx]


def choose_split(n_tokens: int, tiles: int, device: torch.device) -> int:
    """Programs per tile along the tokens: enough to fill the GPU, and to cap each fp32 run."""
    cap = math.ceil(n_tokens / MAX_TOKENS_PER_PROGRAM)
    if device.type != "cuda":
        return max(1, cap)
    fill = math.ceil(2 * _sm_count(device) / max(tiles, 1))
    fill = min(fill, max(1, n_tokens // MIN_TOKENS_PER_SPLIT))
    return max(1, cap, fill)


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


def default_cuda_config(dtype: torch.dtype) -> dict:
    """The untuned CUDA configuration (``CORP_TRITON_AUTOTUNE=0``)."""
    if dtype == torch.float32:
        return dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3)


def gram_update_triton_(
    gram: torch.Tensor,
    colsum: torch.Tensor,
    x: torch.Tensor,
    input_precision: Optional[str] = None,
    split_k: Optional[int] = None,
    config: Optional[dict] = None,
) -> None:
    """Add one chunk's upper-triangular ``xᵀx`` and ``Σx`` into fp64 accumulators, in Triton.

    Args:
        gram: ``(D, D)`` float64 accumulator, any strides; only the upper
            triangle (diagonal included) is updated.
        colsum: ``(D,)`` float64 accumulator.
        x: ``(..., D)`` fp32, bf16 or fp16 activations, any strides.
        input_precision: products of fp32 inputs, one of
            :data:`corp.kernels.INPUT_PRECISIONS` (None: the default, "ieee").
        split_k: programs per tile along the tokens (None: chosen from the
            GPU size; forced values are for tests and benchmarks).
        config: fixed kernel parameters instead of the tuned/default ones:
            ``BLOCK``, ``BLOCK_K`` and, on CUDA, ``num_warps``, ``num_stages``.
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
    if x.dtype != torch.float32:
        precision = "ieee"  # exact 16-bit products whatever was asked: one compiled variant
    check_launch(x.device)
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
    split = int(split_k) if split_k else choose_split(n, tiles_ref * (tiles_ref + 1) // 2, x.device)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    upcast = _INTERPRETED and x.dtype != torch.float32

    def args(g, c):
        return (v, g, c, n, d, t, sb, st, sd, g.stride(0), g.stride(1), c.stride(0))

    meta = dict(IS_3D=is_3d, UPCAST=upcast, INPUT_PRECISION=precision, ATOMIC=split > 1,
                ROUND_TF32=precision == "tf32" and x.dtype == torch.float32)

    def grid(m):
        nt = triton.cdiv(d, m["BLOCK"])
        return (nt * (nt + 1) // 2, split)

    if _INTERPRETED:
        cfg = {**INTERPRETER_CONFIG, **(config or {})}
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
        _gram_kernel[grid(cfg)](*args(gram, colsum), **meta, **cfg)
        return
    with torch.cuda.device(x.device):
        if config is not None or not _autotune_enabled():
            cfg = {**default_cuda_config(x.dtype), **(config or {})}
            _gram_kernel[grid(cfg)](*args(gram, colsum), **meta, **cfg)
            return
        key = (d, x.dtype, precision, split > 1, is_3d, x.device)
        if key not in _tuned_keys:
            # tune on scratch accumulators: benchmarking runs the kernel many times
            _gram_kernel_tuned[grid](*args(torch.zeros_like(gram), torch.zeros_like(colsum)), **meta)
            _tuned_keys.add(key)
        _gram_kernel_tuned[grid](*args(gram, colsum), **meta)
