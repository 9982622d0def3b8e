"""Closed-form solves: batched ridge regression and the attention Sylvester equation.

These are the swappable solve kernels of the engine. This module is the
PyTorch reference; the compiled solver (``csrc/``, loaded by
:mod:`corp._compiled`: the ``torch.ops.corp.ridge_solve`` custom op) replaces
:func:`ridge_solve` behind the same signature with ``backend="compiled"``.

The attention Sylvester equation keeps its eigen form with every backend: it
is the exact solution in O(s³) per head, and the Cholesky op cannot replace it
without changing the estimator (factoring both Grams solves
``(GQ + αI) M (GK + βI) = C``, a different regulariser) or without the
O(s⁶) Kronecker system; benchmarks/sylvester_choice.py measures the three
(README, "Compiled solver").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _compiled

__all__ = [
    "resolve_solve_backend", "RidgeSolution", "ridge_solve", "sylvester_solve", "sub_blocks", "MAX_DAMPING_RETRIES",
    "DAMPING_GROWTH",
]

# A failed Cholesky factorisation is retried with the damping multiplied by
# DAMPING_GROWTH, at most MAX_DAMPING_RETRIES times. 10× per step reaches any
# reasonable conditioning within a few tries: a covariance that is singular to
# working precision (rank-deficient calibration) factors at relative damping
# ~1e-12 already in fp64.
MAX_DAMPING_RETRIES = 8
DAMPING_GROWTH = 10.0


def resolve_solve_backend(requested: str, device: torch.device) -> str:
    """The solve implementation for a ``corp.prune(backend=...)`` name (see :mod:`corp.backends`).

    ``"compiled"`` requires the compiled solver (RuntimeError saying how to
    build it otherwise, or when it lacks the CUDA kernels for a CUDA device).
    ``"auto"`` (and ``"triton"``, whose solves are "auto") takes it whenever
    it is built, loads and runs on ``device``: on the engine's calls it is
    never slower than the reference (small systems: its own kernels; large
    ones: the same LAPACK/cuSOLVER calls), see README "Compiled solver".
    """
    if requested == "torch":
        return "torch"
    device = torch.device(device)
    if requested == "compiled":
        _compiled.require(device)
        return "compiled"
    if device.type == "cpu" and _compiled.available():
        return "compiled"
    if device.type == "cuda" and _compiled.cuda_available():
        return "compiled"
    return "torch"


@dataclass
class RidgeSolution:
    """Result of :func:`ridge_solve` for a batch of b systems.

    Attributes:
        solution: ``(b, n, m)`` X with ``(A + λI) X = B``.
        damping: ``(b,)`` the λ finally used (≥ the requested one).
        ok: ``(b,)`` bool, True where a factorisation succeeded.
    """

    solution: torch.Tensor
    damping: torch.Tensor
    ok: torch.Tensor


def ridge_solve(
    matrix: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor, backend: str = "torch"
) -> RidgeSolution:
    """Solve ``(A_b + λ_b I) X_b = B_b`` by Cholesky, retrying with larger damping on failure.

    Args:
        matrix: ``(b, n, n)`` symmetric positive semi-definite A (fp32 or fp64).
        rhs: ``(b, n, m)`` right-hand sides B.
        damping: ``(b,)`` non-negative λ, or a scalar applied to all.
        backend: ``"torch"`` (reference: ``torch.linalg.cholesky_ex`` + ``cholesky_solve``)
            or ``"compiled"`` (``torch.ops.corp.ridge_solve``: same rule, fused
            kernels for small n; see :mod:`corp._compiled`).

    Returns:
        :class:`RidgeSolution`. Where even the last retry fails to factor, the
        solution is zero and ``ok`` is False: a failed factor is never used.
    """
    if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must be (b, n, n), got {tuple(matrix.shape)}")
    b, n, _ = matrix.shape
    if rhs.dim() != 3 or rhs.shape[:2] != (b, n):
        raise ValueError(f"rhs must be ({b}, {n}, m), got {tuple(rhs.shape)}")
    damping = torch.as_tensor(damping, dtype=matrix.dtype, device=matrix.device).expand(b).clone()
    if (damping < 0).any() or not torch.isfinite(damping).all():
        raise ValueError("damping must be finite and non-negative")
    if backend == "compiled":
        solution, used, ok = _compiled.ridge_solve(matrix, rhs, damping, MAX_DAMPING_RETRIES, DAMPING_GROWTH)
        return RidgeSolution(solution, used, ok)
    if backend != "torch":
        raise ValueError(f"unknown solve backend {backend!r}")

    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    solution = torch.zeros_like(rhs)
    ok = torch.zeros(b, dtype=torch.bool, device=matrix.device)
    todo = torch.arange(b, device=matrix.device)
    # Scale of the first retry's damping where the requested one is zero.
    floor = (torch.diagonal(matrix, dim1=-2, dim2=-1).abs().mean(-1) * 1e-12).clamp_min(torch.finfo(matrix.dtype).tiny)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(matrix[todo] + damping[todo, None, None] * eye)
        # cuSOLVER's potrf reports success (info 0) on a matrix holding NaN (seen on an H200,
        # torch 2.11): a factor with a non-finite entry is a failed factor too.
        good = (info == 0) & torch.isfinite(factor).flatten(1).all(1)
        if good.any():
            idx = todo[good]
            solution[idx] = torch.cholesky_solve(rhs[idx], factor[good])
            ok[idx] = True
        todo = todo[~good]
        if todo.numel() == 0 or attempt == MAX_DAMPING_RETRIES:
            break
        damping[todo] = torch.maximum(damping[todo] * DAMPING_GROWTH, floor[todo])
    return RidgeSolution(solution, damping, ok)


def sub_blocks(g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Batched sub-blocks ``g[b][rows[b]][:, cols[b]]``: g ``(B, d, d)``, rows ``(B, r)``, cols ``(B, c)`` → ``(B, r, c)``.

    Per-head index sets pick each head's S×S / S×P blocks of its Grams in two gathers.
    """
    return torch.gather(torch.gather(g, 1, rows[:, :, None].expand(-1, -1, g.shape[2])), 2,
                        cols[:, None, :].expand(-1, rows.shape[1], -1))


def sylvester_solve(
    gram_q: torch.Tensor, gram_k: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """Solve ``GQ · M · GK + λ M = C`` for M, batched, in O(s³) per system.

    With ``GQ = U_q diag(a) U_qᵀ`` and ``GK = U_k diag(b) U_kᵀ``:
    ``M = U_q [(U_qᵀ C U_k) / (a_i b_j + λ)] U_kᵀ``. Symmetric PSD GQ, GK and
    λ > 0 make every denominator positive.

    Args:
        gram_q: ``(b, s, s)`` symmetric PSD.
        gram_k: ``(b, s, s)`` symmetric PSD.
        rhs: ``(b, s, s)`` C.
        damping: ``(b,)`` λ > 0.
        backend: ``"torch"`` or ``"compiled"``: both use this eigen form
            (batched ``torch.linalg.eigh``), the exact solution; see the
            module docstring for why the compiled Cholesky op is not used here.

    Returns:
        ``(b, s, s)`` M.
    """
    if backend not in ("torch", "compiled"):
        raise ValueError(f"unknown solve backend {backend!r}")
    eig_q, vec_q = torch.linalg.eigh(gram_q)
    eig_k, vec_k = torch.linalg.eigh(gram_k)
    # Round-off can leave tiny negative eigenvalues of a PSD Gram; they are zero.
    eig_q, eig_k = eig_q.clamp_min(0), eig_k.clamp_min(0)
    rotated = vec_q.transpose(-1, -2) @ rhs @ vec_k
    denom = eig_q[..., :, None] * eig_k[..., None, :] + damping[..., None, None]
    return vec_q @ (rotated / denom) @ vec_k.transpose(-1, -2)
