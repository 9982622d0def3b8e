"""Pure-PyTorch references of corp's ops: the CPU path and the oracle of the tests.

One function per ``corp::`` op (registered in :mod:`corp.ops`):

* :func:`gram_update_`: ``corp::gram_update_`` (MLP statistics);
* :func:`attention_stats_update_`: ``corp::attention_stats_update_`` (q/k statistics);
* :func:`ridge_solve`: ``corp::ridge_solve`` (batched damped Cholesky solves).

Precision rule of the statistics: every update multiplies in the input
precision upcast to fp32 (fp64 stays fp64) over one chunk of tokens and adds
the chunk's result into fp64 accumulators: sums over 10⁵–10⁶ tokens lose
digits in plain fp32.
"""
from __future__ import annotations

import torch

__all__ = [
    "chunk_dtype",
    "gram_update_",
    "attention_stats_update_",
    "symmetrize_upper",
    "symmetrize_upper_",
    "cholesky_with_retries",
    "spd_inverse_by_blocks",
    "ridge_solve",
    "GRAM_TILE",
    "GRAM_TILE_WIDE",
    "GRAM_WIDE_FROM",
    "gram_tile",
    "MAX_DAMPING_RETRIES",
    "DAMPING_GROWTH",
]

# Column tile of the blocked upper-triangular Gram product. Computing only the
# tiles on or above the diagonal does (k+1)/2k of the full product's work; with
# 4 tiles of 384 on deit_small (D_h = 1536, 6304 tokens) it took 62 ms against
# 91 ms for the full `h.T @ h` on an early 2-core machine of this project.
# Tiles of 192 do less work again, and on two later 2-core machines they were
# faster up to 3072 columns (one update of 6304 tokens, fp32, medians: an AMD
# EPYC with AVX2, 2026-12-02, 192 / 384: width 384 37.8 / 48.6 ms, 768 127 / 143,
# 1536 423 / 444, 3072 1114 / 1298; an Intel Xeon with AMX: 384 5.2 / 6.5,
# 768 16.5 / 20.0, 1536 65.0 / 70.6, 3072 233 / 236), but at 5120 columns
# (ViT-H's MLP, 4112 tokens) 384 was faster (2.06 / 2.17 s and 1.92 / 3.05 s in
# two runs on the EPYC): wide Grams keep GRAM_TILE_WIDE. The upper triangle is
# bitwise the same with either tile (MKL, both machines, every width above).
GRAM_TILE = 192
GRAM_TILE_WIDE = 384
GRAM_WIDE_FROM = 4096


def gram_tile(width: int) -> int:
    """The column tile of :func:`gram_update_` for a Gram of ``width`` columns."""
    return GRAM_TILE if width < GRAM_WIDE_FROM else GRAM_TILE_WIDE

# A failed Cholesky factorisation is retried with the damping multiplied by
# DAMPING_GROWTH, at most MAX_DAMPING_RETRIES times. 10× per step reaches any
# reasonable conditioning within a few tries: a covariance that is singular to
# working precision (rank-deficient calibration) factors at relative damping
# ~1e-12 already in fp64.
MAX_DAMPING_RETRIES = 8
DAMPING_GROWTH = 10.0


def chunk_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-chunk products run in fp32 (bf16/fp16 upcast), or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_gram_shapes(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1]
    if gram.shape != (d, d) or colsum.shape != (d,):
        raise ValueError(f"accumulator shapes {tuple(gram.shape)}, {tuple(colsum.shape)} do not match D={d}")
    if gram.dtype != torch.float64 or colsum.dtype != torch.float64:
        raise TypeError("gram and colsum must be float64")


def check_attention_shapes(gram_q, gram_k, score, qkv, num_heads: int, head_dim: int) -> None:
    h, d = num_heads, head_dim
    if qkv.shape[-1] != 3 * h * d:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{h}·{d}")
    if gram_q.shape != (h, d, d) or gram_k.shape != (h, d, d) or score.shape != (h, d):
        raise ValueError("accumulator shapes do not match num_heads, head_dim")
    if any(t.dtype != torch.float64 for t in (gram_q, gram_k, score)):
        raise TypeError("gram_q, gram_k and score must be float64")


def gram_update_(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor) -> None:
    """Add one chunk's Gram matrix and column sums into fp64 accumulators.

    Args:
        gram: ``(D, D)`` float64 accumulator. Its upper triangle (diagonal
            included) receives the chunk's Gram; the strict lower triangle holds
            unspecified values and must be ignored by the caller (see
            :func:`symmetrize_upper`).
        colsum: ``(D,)`` float64 accumulator of column sums.
        x: ``(..., D)`` activations in fp32, bf16, fp16 or fp64, any strides.
    """
    check_gram_shapes(gram, colsum, x)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).to(chunk_dtype(x))
    # chunk sums in the chunk's precision (torch sums pairwise), fp64 across chunks; asking
    # sum() for an fp64 result directly cost 7x more (0.67 s of an 8.3 s deit_small run)
    colsum += x2.sum(dim=0).to(torch.float64)
    tile = gram_tile(d)
    for start in range(0, d, tile):
        stop = min(start + tile, d)
        # rows [start, stop) × columns [start, d): the tiles on or above the diagonal
        product = x2[:, start:stop].T @ x2[:, start:]
        gram[start:stop, start:] += product.to(torch.float64)


def attention_stats_update_(
    gram_q: torch.Tensor, gram_k: torch.Tensor, score: torch.Tensor, qkv: torch.Tensor, num_heads: int, head_dim: int
) -> None:
    """Add one chunk's per-head query/key statistics into fp64 accumulators.

    Args:
        gram_q: ``(H, d, d)`` float64, accumulates ``Σ q qᵀ`` per head.
        gram_k: ``(H, d, d)`` float64, accumulates ``Σ k kᵀ`` per head.
        score: ``(H, d)`` float64, accumulates ``Σ q_j² k_j²`` per head.
        qkv: ``(..., 3·H·d)`` output of a fused qkv projection, laid out
            ``[q heads | k heads | v heads]`` (timm's ``Attention``).
        num_heads: H.
        head_dim: d.
    """
    check_attention_shapes(gram_q, gram_k, score, qkv, num_heads, head_dim)
    x = qkv.reshape(-1, 3, num_heads, head_dim)
    q = x[:, 0].to(chunk_dtype(qkv)).transpose(0, 1)  # (H, N, d)
    k = x[:, 1].to(chunk_dtype(qkv)).transpose(0, 1)
    gram_q += torch.bmm(q.transpose(1, 2), q).to(torch.float64)
    gram_k += torch.bmm(k.transpose(1, 2), k).to(torch.float64)
    score += (q * q * k * k).sum(dim=1).to(torch.float64)


def symmetrize_upper(gram: torch.Tensor) -> torch.Tensor:
    """Return the symmetric matrix whose upper triangle is ``gram``'s. ``(..., D, D)``."""
    upper = torch.triu(gram)
    return upper + torch.triu(gram, diagonal=1).transpose(-1, -2)


# Tile of symmetrize_upper_: each lower tile is one transposed copy of a tile of at most this size.
# D = 1536 fp64 on the 2-core CPU: 4.1 ms with 256, against 17.9 ms for triu + transposed add of the
# whole matrix (the transposed read of a D² operand is what costs), and no D² temporary.
SYMMETRIZE_TILE = 256


def symmetrize_upper_(gram: torch.Tensor, tile: int = SYMMETRIZE_TILE) -> torch.Tensor:
    """In place: overwrite the strict lower triangle of ``gram`` ``(D, D)`` with its upper triangle's
    transpose (the symmetric matrix of :func:`symmetrize_upper`), tile by tile; returns ``gram``."""
    d = gram.shape[-1]
    if gram.dim() != 2 or gram.shape[0] != d:
        raise ValueError(f"gram must be (D, D), got {tuple(gram.shape)}")
    for i in range(0, d, tile):
        rows = slice(i, min(i + tile, d))
        for j in range(0, i, tile):
            gram[rows, j:j + tile] = gram[j:j + tile, rows].T
        diag = gram[rows, rows]
        diag.copy_(symmetrize_upper(diag))
    return gram


# Order at or below which spd_inverse_by_blocks hands a diagonal block to LAPACK (potrf + potri).
# fp32 on the 2-core CPU (Xeon with AMX, torch 2.14.1, MKL), median of 7: n = 1536 18.1 ms with 256
# (18.9 with 128, 19.0 with 384) against 36.2 ms for cholesky + cholesky_inverse; n = 3072 136 ms
# against 259 ms; n = 768 3.5 ms against 4.9 ms. LAPACK's potrf/potri run at 70-100 GFLOP/s there,
# its matrix products at ~400.
SPD_INVERSE_LEAF = 256


def spd_inverse_by_blocks(matrix: torch.Tensor, leaf: int = SPD_INVERSE_LEAF) -> tuple[torch.Tensor, bool]:
    """``A⁻¹`` of a symmetric positive definite ``A`` ``(n, n)`` by the Schur complement recursion.

    With ``A = [[A11, A12], [A12ᵀ, A22]]``, ``Y = A11⁻¹ A12`` and ``S = A22 − A12ᵀ Y``:
    ``A⁻¹ = [[A11⁻¹ + Y S⁻¹ Yᵀ, −Y S⁻¹], [−S⁻¹ Yᵀ, S⁻¹]]``, ``A11⁻¹`` and ``S⁻¹`` recursively,
    blocks of order ``≤ leaf`` by Cholesky. That is block Gaussian elimination without pivoting,
    stable for SPD matrices (every ``S`` is SPD, its condition at most ``A``'s), with ``4/3 n³``
    flops in four matrix products per level against LAPACK's ``n³`` in ``potrf`` + ``potri``,
    which run at a fraction of the products' speed on the CPU (:data:`SPD_INVERSE_LEAF`).

    Returns ``(inverse, ok)``: ``ok`` is False where a diagonal block's factor failed or holds
    a non-finite value (``A`` not positive definite to working precision, or holding NaN: a
    NaN in ``A12`` reaches a diagonal entry of ``S``); the inverse is then not to be used.
    ``A`` is read only. Above the leaf the result is symmetric to rounding, not bit for bit.
    """
    n = matrix.shape[-1]
    if matrix.dim() != 2 or matrix.shape[0] != n:
        raise ValueError(f"matrix must be (n, n), got {tuple(matrix.shape)}")
    out = torch.empty_like(matrix)
    return out, _spd_inverse_into(matrix, out, leaf)


def _factored(factor: torch.Tensor, info: torch.Tensor) -> bool:
    """Whether ``cholesky_ex`` succeeded: info 0 and a finite diagonal (a NaN anywhere in the
    factored matrix's lower triangle reaches the diagonal of its row of the factor)."""
    return int(info) == 0 and bool(torch.isfinite(torch.diagonal(factor)).all())


def _spd_inverse_into(matrix: torch.Tensor, out: torch.Tensor, leaf: int) -> bool:
    """:func:`spd_inverse_by_blocks` written into ``out`` (a view of the same shape, rows contiguous):
    every block goes straight to its place, without a temporary per level (bitwise the same result as
    assembling the blocks; fp32 on the 2-core Xeon: n = 1024 9.3 ms against 11.7, n = 5120 646 ms
    against 660)."""
    n = matrix.shape[-1]
    if n <= leaf:
        factor, info = torch.linalg.cholesky_ex(matrix)
        torch.cholesky_inverse(factor, out=out)
        return _factored(factor, info)
    half = n // 2
    upper, off, lower, schur_inverse = out[:half, :half], out[:half, half:], out[half:, :half], out[half:, half:]
    if not _spd_inverse_into(matrix[:half, :half], upper, leaf):  # no use going on
        out.fill_(float("nan"))
        return False
    a12 = matrix[:half, half:]
    y = upper @ a12  # (half, n − half): A11⁻¹ A12
    schur = torch.addmm(matrix[half:, half:], a12.T, y, alpha=-1.0)
    ok = _spd_inverse_into(schur, schur_inverse, leaf)
    torch.mm(y, schur_inverse, out=off)  # Y S⁻¹
    upper.addmm_(off, y.T)  # A11⁻¹ + Y S⁻¹ Yᵀ
    off.neg_()  # −Y S⁻¹
    lower.copy_(off.T)
    return ok


def cholesky_with_retries(
    matrix: torch.Tensor, damping: torch.Tensor, max_retries: int = MAX_DAMPING_RETRIES,
    growth: float = DAMPING_GROWTH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky factors of ``A_b + λ_b I``, retrying failed factorisations with more damping.

    The one damping-retry ladder of corp: a failed factor is retried with
    ``λ ← max(λ · growth, 1e-12 · mean|diag A|)`` at most ``max_retries`` times,
    and a failed factor is never used.

    Args:
        matrix: ``(b, n, n)`` symmetric positive semi-definite A.
        damping: ``(b,)`` non-negative λ (same dtype and device as ``matrix``).

    Returns:
        ``(factor (b, n, n), damping_used (b,), ok (b,) bool)``; the factor is
        zero where ``ok`` is False.
    """
    b, n, _ = matrix.shape
    damping = damping.clone()
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    factor = torch.zeros_like(matrix)
    ok = torch.zeros(b, dtype=torch.bool, device=matrix.device)
    todo = torch.arange(b, device=matrix.device)
    # Scale of the first retry's damping where the requested one is zero.
    floor = (torch.diagonal(matrix, dim1=-2, dim2=-1).abs().mean(-1) * 1e-12).clamp_min(torch.finfo(matrix.dtype).tiny)
    for attempt in range(max_retries + 1):
        lower, info = torch.linalg.cholesky_ex(matrix[todo] + damping[todo, None, None] * eye)
        # cuSOLVER's potrf reports success (info 0) on a matrix holding NaN (seen on an H200,
        # torch 2.11): a factor with a non-finite entry is a failed factor too.
        good = (info == 0) & torch.isfinite(lower).flatten(1).all(1)
        if good.any():
            idx = todo[good]
            factor[idx] = lower[good]
            ok[idx] = True
        todo = todo[~good]
        if todo.numel() == 0 or attempt == max_retries:
            break
        damping[todo] = torch.maximum(damping[todo] * growth, floor[todo])
    return factor, damping, ok


def ridge_solve(
    matrix: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor, max_retries: int = MAX_DAMPING_RETRIES,
    growth: float = DAMPING_GROWTH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``(A_b + λ_b I) X_b = B_b`` by Cholesky with damping retries (``corp::ridge_solve``).

    Args:
        matrix: ``(b, n, n)`` symmetric positive semi-definite A (fp32 or fp64).
        rhs: ``(b, n, m)`` right-hand sides B.
        damping: ``(b,)`` non-negative finite λ.
        max_retries, growth: the retry ladder of :func:`cholesky_with_retries`.

    Returns:
        ``(solution (b, n, m), damping_used (b,), ok (b,) bool)``; the solution
        is zero where even the last retry failed to factor.
    """
    factor, used, ok = cholesky_with_retries(matrix, damping.to(matrix.dtype), max_retries, growth)
    solution = torch.zeros_like(rhs)
    if bool(ok.any()):
        solution[ok] = torch.cholesky_solve(rhs[ok], factor[ok])
    return solution, used, ok
