"""The op registry: every ``corp::`` op once, and the one place a backend is resolved.

=============================  =====================  ====================================  ==========================
op                             CPU (the reference)    CUDA                                  other implementations
=============================  =====================  ====================================  ==========================
``corp::gram_update_``         reference.gram_update_  Triton (kernels/gram.py)             Triton interpreter on CPU
``corp::attention_stats_update_``  reference.…        Triton (kernels/attention_stats.py)   Triton interpreter on CPU
``corp::ridge_solve``          reference.ridge_solve  compiled extension (csrc/)            compiled CPU kernels
=============================  =====================  ====================================  ==========================

Each op is a ``torch.library`` custom op with a fake (meta) implementation,
so it traces under ``torch.compile`` / ``torch.export``. Where its CUDA
implementation is missing (no triton, extension not built) the CUDA kernel
falls back to the reference.

The pipeline never dispatches on backend names: :func:`resolve` turns
``corp.prune(backend=...)`` into a :class:`Kernels` object holding the three
implementations to call, once per run.

Backend names (:data:`BACKENDS`):
    ``"auto"``: the fastest implementation available on the device, per op.
    ``"torch"``: the PyTorch references for every op.
    ``"triton"``: Triton statistics kernels (error if unavailable); solves as "auto".
    ``"compiled"``: the compiled solver (error if unavailable); statistics as "auto".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _compiled, reference

__all__ = ["BACKENDS", "Kernels", "RidgeSolution", "resolve", "gram_update_", "attention_stats_update_", "ridge_solve"]

BACKENDS = ("auto", "torch", "triton", "compiled")


def _triton_available() -> bool:
    from .kernels import triton_available

    return triton_available()


# --------------------------------------------------------------------------- corp::gram_update_


@torch.library.custom_op("corp::gram_update_", mutates_args=("gram", "colsum"))
def gram_update_(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor,
                 input_precision: Optional[str] = None) -> None:
    """Add ``triu(xᵀx)`` and ``Σx`` of one chunk ``x`` ``(..., D)`` into fp64 ``gram (D, D)`` / ``colsum (D,)``.

    ``input_precision`` applies to fp32 inputs on CUDA (:data:`corp.kernels.INPUT_PRECISIONS`);
    the reference always computes exact fp32 products.
    """
    reference.gram_update_(gram, colsum, x)


@gram_update_.register_kernel("cuda")
def _gram_update_cuda(gram, colsum, x, input_precision=None) -> None:
    if not _triton_available():
        reference.gram_update_(gram, colsum, x)
        return
    from .kernels.gram import gram_update_triton_

    gram_update_triton_(gram, colsum, x, input_precision)


@gram_update_.register_fake
def _gram_update_fake(gram, colsum, x, input_precision=None) -> None:
    reference.check_gram_shapes(gram, colsum, x)


# --------------------------------------------------------------------------- corp::attention_stats_update_


@torch.library.custom_op("corp::attention_stats_update_", mutates_args=("gram_q", "gram_k", "score"))
def attention_stats_update_(gram_q: torch.Tensor, gram_k: torch.Tensor, score: torch.Tensor, qkv: torch.Tensor,
                            num_heads: int, head_dim: int, input_precision: Optional[str] = None) -> None:
    """Add per-head ``Σ q qᵀ``, ``Σ k kᵀ`` ``(H, d, d)`` and ``Σ q_j² k_j²`` ``(H, d)`` of a qkv chunk
    ``(..., 3·H·d)`` into fp64 accumulators."""
    reference.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim)


@attention_stats_update_.register_kernel("cuda")
def _attention_stats_update_cuda(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision=None) -> None:
    if not _triton_available():
        reference.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim)
        return
    from .kernels.attention_stats import attention_stats_update_triton_

    attention_stats_update_triton_(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision)


@attention_stats_update_.register_fake
def _attention_stats_update_fake(gram_q, gram_k, score, qkv, num_heads, head_dim, input_precision=None) -> None:
    reference.check_attention_shapes(gram_q, gram_k, score, qkv, num_heads, head_dim)


# --------------------------------------------------------------------------- corp::ridge_solve


@torch.library.custom_op("corp::ridge_solve", mutates_args=())
def ridge_solve(matrix: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor, max_retries: int = 8,
                growth: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_b + λ_b I) X_b = B_b`` by Cholesky with damping retries → ``(X (b, n, m), λ used (b,), ok (b,))``."""
    return reference.ridge_solve(matrix, rhs, damping, max_retries, growth)


@ridge_solve.register_kernel("cuda")
def _ridge_solve_cuda(matrix, rhs, damping, max_retries=8, growth=10.0):
    if _compiled.cuda_available():
        return _compiled.module().ridge_solve_cuda(matrix, rhs, damping, max_retries, growth)
    return reference.ridge_solve(matrix, rhs, damping, max_retries, growth)


@ridge_solve.register_fake
def _ridge_solve_fake(matrix, rhs, damping, max_retries=8, growth=10.0):
    b = matrix.shape[0]
    return rhs.new_empty(rhs.shape), damping.new_empty((b,)), matrix.new_empty((b,), dtype=torch.bool)


def _compiled_ridge_solve_cpu(matrix, rhs, damping, max_retries, growth):
    return _compiled.module().ridge_solve_cpu(matrix, rhs, damping, max_retries, growth)


# --------------------------------------------------------------------------- backends


@dataclass
class RidgeSolution:
    """Result of :meth:`Kernels.ridge_solve` for a batch of b systems.

    Attributes:
        solution: ``(b, n, m)`` X with ``(A + λI) X = B``.
        damping: ``(b,)`` the λ finally used (≥ the requested one).
        ok: ``(b,)`` bool, True where a factorisation succeeded.
    """

    solution: torch.Tensor
    damping: torch.Tensor
    ok: torch.Tensor


@dataclass(frozen=True)
class Kernels:
    """The implementations one run uses, chosen by :func:`resolve`.

    ``stats`` and ``solve`` name them (``"torch"``, ``"triton"``, ``"compiled"``)
    for reports and checkpoints; the callables are what the stages call.
    """

    stats: str
    solve: str
    gram_update_impl: Callable
    attention_stats_update_impl: Callable
    ridge_solve_impl: Callable

    def gram_update_(self, gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor) -> None:
        """Add one chunk ``x`` ``(..., D)`` into fp64 ``gram`` ``(D, D)`` (upper triangle) and ``colsum`` ``(D,)``."""
        self.gram_update_impl(gram, colsum, x)

    def attention_stats_update_(self, gram_q, gram_k, score, qkv: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Add a qkv chunk ``(..., 3·H·d)`` into ``gram_q``/``gram_k`` ``(H, d, d)`` and ``score`` ``(H, d)``."""
        self.attention_stats_update_impl(gram_q, gram_k, score, qkv, num_heads, head_dim)

    def ridge_solve(self, matrix: torch.Tensor, rhs: torch.Tensor, damping) -> RidgeSolution:
        """Solve ``(A_b + λ_b I) X_b = B_b``: matrix ``(b, n, n)``, rhs ``(b, n, m)``, damping ``(b,)`` or scalar.

        Where even the last damping retry fails to factor, the solution is zero and ``ok`` is False.
        """
        if matrix.dim() != 3 or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(f"matrix must be (b, n, n), got {tuple(matrix.shape)}")
        b, n, _ = matrix.shape
        if rhs.dim() != 3 or rhs.shape[:2] != (b, n):
            raise ValueError(f"rhs must be ({b}, {n}, m), got {tuple(rhs.shape)}")
        damping = torch.as_tensor(damping, dtype=matrix.dtype, device=matrix.device).expand(b).clone()
        if (damping < 0).any() or not torch.isfinite(damping).all():
            raise ValueError("damping must be finite and non-negative")
        solution, used, ok = self.ridge_solve_impl(matrix, rhs, damping, reference.MAX_DAMPING_RETRIES,
                                                   reference.DAMPING_GROWTH)
        return RidgeSolution(solution, used, ok)


def _triton_stats(device: torch.device) -> tuple[Callable, Callable]:
    if device.type == "cuda":
        return torch.ops.corp.gram_update_, torch.ops.corp.attention_stats_update_
    from .kernels.attention_stats import attention_stats_update_triton_  # the interpreter, on CPU tensors
    from .kernels.gram import gram_update_triton_

    return gram_update_triton_, attention_stats_update_triton_


def _stats_backend(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return "torch"
    if requested == "triton":
        from .kernels import interpreter_requested

        if not _triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package: pip install triton "
                "(CUDA builds of torch ship with it); or use backend='auto' or 'torch'"
            )
        if device.type != "cuda" and not interpreter_requested():
            raise RuntimeError(
                f"backend='triton' runs its kernels on CUDA devices (got {device.type}); on the CPU they run "
                "only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
            )
        return "triton"
    # "auto", "compiled": Triton on CUDA GPUs of compute capability 8.0 or newer (what Triton targets)
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability(device) >= (8, 0) and _triton_available():
            return "triton"
    return "torch"


def _solve_backend(requested: str, device: torch.device) -> str:
    # "auto" takes the compiled solver whenever it is built and runs on the device: on the
    # pipeline's calls it is never slower than the reference (small systems: its own kernels;
    # large ones: the same LAPACK/cuSOLVER calls), see README "Compiled solver".
    if requested == "torch":
        return "torch"
    if requested == "compiled":
        _compiled.require(device)
        return "compiled"
    if device.type == "cpu" and _compiled.available():
        return "compiled"
    if device.type == "cuda" and _compiled.cuda_available():
        return "compiled"
    return "torch"


def resolve(backend: str, device: torch.device | str) -> Kernels:
    """The :class:`Kernels` for a ``corp.prune(backend=...)`` name on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a backend asked for explicitly is not available (the message says how to get it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    stats, solve = _stats_backend(backend, device), _solve_backend(backend, device)
    if stats == "triton":
        gram, attention = _triton_stats(device)
    else:
        gram, attention = reference.gram_update_, reference.attention_stats_update_
    if solve == "compiled":
        solver = torch.ops.corp.ridge_solve if device.type == "cuda" else _compiled_ridge_solve_cpu
    else:
        solver = reference.ridge_solve
    return Kernels(stats, solve, gram, attention, solver)


REFERENCE = Kernels("torch", "torch", reference.gram_update_, reference.attention_stats_update_,
                    reference.ridge_solve)
"""The PyTorch references for every op (``resolve("torch", ...)`` on any device)."""
