"""Calibration statistics: streaming accumulators for one block.

Two statistics feed CORP (see ``../shared/CORP.md``):

* MLP: token count ``n``, column sums ``s = Σ h`` (D_h) and the Gram matrix
  ``G = Σ h hᵀ`` (D_h × D_h) of the hidden activations ``h = act(fc1(x))``.
* Attention, per head, from the qkv projection output before any scaling:
  ``GQ = Σ q qᵀ``, ``GK = Σ k kᵀ`` (d × d, uncentred) and the score vector
  ``e_j = Σ q_j² k_j²`` (q and k of the same token).

Every update multiplies in the input precision upcast to fp32 (fp64 stays
fp64) over one chunk of tokens, and adds the chunk's result into fp64 accumulators: sums over 10⁵–10⁶
tokens lose digits in plain fp32.

The per-chunk functions ``gram_update_`` and ``attention_stats_update_`` are
the swappable kernels: this module holds their PyTorch reference, which is the
CPU path and the oracle of the tests; ``backend="triton"`` runs the Triton
kernels of :mod:`corp.kernels` behind the same signatures (also registered as
the custom ops ``torch.ops.corp.gram_update_`` and
``torch.ops.corp.attention_stats_update_``, see :mod:`corp.kernels.ops`).
"""
from __future__ import annotations

import torch

__all__ = [
    "resolve_stats_backend",
    "STATS_BACKENDS",
    "gram_update_",
    "attention_stats_update_",
    "MLPStatistics",
    "AttentionStatistics",
    "GRAM_TILE",
    "symmetrize_upper",
]

# Column tile of the blocked upper-triangular Gram product. Computing only the
# tiles on or above the diagonal does (k+1)/2k of the full product's work; with
# 4 tiles of 384 on deit_small (D_h = 1536, 6304 tokens) it took 62 ms against
# 91 ms for the full `h.T @ h` on this project's 2-core CPU; smaller tiles lose
# more to matmul efficiency than they save.
GRAM_TILE = 384


STATS_BACKENDS = ("torch", "triton")


def _chunk_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-chunk products run in fp32 (bf16/fp16 upcast), or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resolve_stats_backend(requested: str, device: torch.device) -> str:
    """The statistics implementation for a ``corp.prune(backend=...)`` name (see :mod:`corp.backends`).

    ``"triton"`` when asked for and usable (CUDA tensors, or CPU tensors under
    Triton's interpreter, ``TRITON_INTERPRET=1``), else RuntimeError;
    ``"auto"``/``"compiled"``: ``"triton"`` on CUDA GPUs of compute capability
    8.0 or newer (the GPUs Triton targets) when triton imports, else
    ``"torch"`` (always on the CPU); ``"torch"``: the reference.
    """
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    if requested == "triton":
        from .kernels import interpreter_requested, triton_available

        if not triton_available():
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
    if device.type == "cuda" and torch.cuda.is_available():  # "auto", "compiled": the fastest available
        from .kernels import triton_available

        if torch.cuda.get_device_capability(device) >= (8, 0) and triton_available():
            return "triton"
    return "torch"


def gram_update_(gram: torch.Tensor, colsum: torch.Tensor, x: torch.Tensor, backend: str = "torch") -> None:
    """Add one chunk's Gram matrix and column sums into fp64 accumulators.

    Args:
        gram: ``(D, D)`` float64 accumulator. Its upper triangle (diagonal
            included) receives the chunk's Gram; the strict lower triangle holds
            unspecified values and must be ignored by the caller (see
            :func:`symmetrize_upper`).
        colsum: ``(D,)`` float64 accumulator of column sums.
        x: ``(..., D)`` activations in fp32, bf16 or fp16, any strides.
        backend: ``"torch"`` (blocked upper-triangular matmuls) or
            ``"triton"`` (:mod:`corp.kernels.gram`: on CUDA through the custom op
            ``torch.ops.corp.gram_update_``, on the CPU in Triton's interpreter).
    """
    if backend == "triton":
        if x.device.type == "cuda":
            from .kernels import ops  # noqa: F401  (registers torch.ops.corp.*)

            torch.ops.corp.gram_update_(gram, colsum, x)
        else:
            from .kernels.gram import gram_update_triton_

            gram_update_triton_(gram, colsum, x)
        return
    if backend != "torch":
        raise ValueError(f"unknown statistics backend {backend!r}")
    d = x.shape[-1]
    if gram.shape != (d, d) or colsum.shape != (d,):
        raise ValueError(f"accumulator shapes {tuple(gram.shape)}, {tuple(colsum.shape)} do not match D={d}")
    x2 = x.reshape(-1, d).to(_chunk_dtype(x))
    # chunk sums in the chunk's precision (torch sums pairwise), fp64 across chunks; asking
    # sum() for an fp64 result directly cost 7x more (0.67 s of an 8.3 s deit_small run)
    colsum += x2.sum(dim=0).to(torch.float64)
    for start in range(0, d, GRAM_TILE):
        stop = min(start + GRAM_TILE, d)
        # rows [start, stop) × columns [start, d): the tiles on or above the diagonal
        tile = x2[:, start:stop].T @ x2[:, start:]
        gram[start:stop, start:] += tile.to(torch.float64)


def attention_stats_update_(
    gram_q: torch.Tensor,
    gram_k: torch.Tensor,
    score: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    head_dim: int,
    backend: str = "torch",
) -> None:
    """Add one chunk's per-head query/key statistics into fp64 accumulators.

    Args:
        gram_q: ``(H, d, d)`` float64, accumulates ``Σ q qᵀ`` per head.
        gram_k: ``(H, d, d)`` float64, accumulates ``Σ k kᵀ`` per head.
        score: ``(H, d)`` float64, accumulates ``Σ q_j² k_j²`` per head.
        qkv: ``(..., 3·H·d)`` output of the fused qkv projection, laid out as
            timm's ``Attention`` does: ``[q heads | k heads | v heads]``.
        num_heads: H.
        head_dim: d.
        backend: ``"torch"`` (batched matmuls over heads) or ``"triton"``
            (:mod:`corp.kernels.attention_stats`: on CUDA through the custom op
            ``torch.ops.corp.attention_stats_update_``, on the CPU in Triton's interpreter).
    """
    if backend == "triton":
        if qkv.device.type == "cuda":
            from .kernels import ops  # noqa: F401  (registers torch.ops.corp.*)

            torch.ops.corp.attention_stats_update_(gram_q, gram_k, score, qkv, num_heads, head_dim)
        else:
            from .kernels.attention_stats import attention_stats_update_triton_

            attention_stats_update_triton_(gram_q, gram_k, score, qkv, num_heads, head_dim)
        return
    if backend != "torch":
        raise ValueError(f"unknown statistics backend {backend!r}")
    h, d = num_heads, head_dim
    if qkv.shape[-1] != 3 * h * d:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{h}·{d}")
    x = qkv.reshape(-1, 3, h, d)
    q = x[:, 0].to(_chunk_dtype(qkv)).transpose(0, 1)  # (H, N, d)
    k = x[:, 1].to(_chunk_dtype(qkv)).transpose(0, 1)
    gram_q += torch.bmm(q.transpose(1, 2), q).to(torch.float64)
    gram_k += torch.bmm(k.transpose(1, 2), k).to(torch.float64)
    score += (q * q * k * k).sum(dim=1).to(torch.float64)


def symmetrize_upper(gram: torch.Tensor) -> torch.Tensor:
    """Return the symmetric matrix whose upper triangle is ``gram``'s. ``(..., D, D)``."""
    upper = torch.triu(gram)
    return upper + torch.triu(gram, diagonal=1).transpose(-1, -2)


class MLPStatistics:
    """Accumulates ``n``, ``Σ h`` and ``Σ h hᵀ`` of one MLP's hidden activations.

    With ``full=False`` only the diagonal ``Σ h²`` is kept (all that selection
    without compensation needs), which skips the O(D_h²) Gram work.
    """

    def __init__(self, hidden: int, device: torch.device, full: bool = True, backend: str = "torch"):
        self.count = 0
        self.backend = backend
        self.full = full
        self.colsum = torch.zeros(hidden, dtype=torch.float64, device=device)
        self._finalized = None  # (mean, covariance) once formed: see mean_and_covariance
        if full:
            self.gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        else:
            self.sq_sum = torch.zeros(hidden, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, h: torch.Tensor) -> None:
        """Add hidden activations ``h`` of shape ``(..., D_h)``."""
        if self._finalized is not None:
            raise RuntimeError("statistics already turned into a covariance: no further updates")
        rows = h.numel() // h.shape[-1]
        self.count += rows
        if self.full:
            gram_update_(self.gram, self.colsum, h, self.backend)
        else:
            h2 = h.reshape(-1, h.shape[-1]).to(_chunk_dtype(h))
            self.colsum += h2.sum(0).to(torch.float64)
            self.sq_sum += (h2 * h2).sum(0).to(torch.float64)

    def second_moment_diag(self) -> torch.Tensor:
        """``E[h_j²]`` per channel, ``(D_h,)`` float64."""
        if self._finalized is not None:  # the Gram now holds Σ: E[h²] = Σ_jj + μ_j²
            mean, cov = self._finalized
            return torch.diagonal(cov) + mean * mean
        diag = torch.diagonal(self.gram) if self.full else self.sq_sum
        return diag / self.count

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``μ = s/n`` ``(D_h,)`` and ``Σ = G/n − μμᵀ`` ``(D_h, D_h)``, float64.

        The covariance is formed in the Gram's own storage (one D_h² temporary
        instead of four: 210 MB each at D_h = 5120), so the statistics accept no
        further updates afterwards; later calls return the same tensors.
        """
        if not self.full:
            raise RuntimeError("covariance needs the full Gram matrix (MLPStatistics(full=True))")
        if self._finalized is None:
            mean = self.colsum / self.count
            g = self.gram
            upper = torch.triu(g, diagonal=1)
            g.triu_()
            g += upper.T
            del upper
            g /= self.count
            g.addr_(mean, mean, alpha=-1.0)
            self._finalized = (mean, g)
        return self._finalized

    def all_finite(self) -> bool:
        acc = self.gram if self.full else self.sq_sum  # (the covariance, once formed)
        return bool(torch.isfinite(acc).all() and torch.isfinite(self.colsum).all())


class AttentionStatistics:
    """Accumulates per-head ``Σ q qᵀ``, ``Σ k kᵀ`` and ``Σ q_j² k_j²`` for one attention."""

    def __init__(self, num_heads: int, head_dim: int, device: torch.device, backend: str = "torch"):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.backend = backend
        self.count = 0
        self.gram_q = torch.zeros(num_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.gram_k = torch.zeros_like(self.gram_q)
        self.score = torch.zeros(num_heads, head_dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, qkv: torch.Tensor) -> None:
        """Add the qkv projection output ``(..., 3·H·d)``."""
        self.count += qkv.numel() // qkv.shape[-1]
        attention_stats_update_(self.gram_q, self.gram_k, self.score, qkv, self.num_heads, self.head_dim, self.backend)

    def all_finite(self) -> bool:
        return bool(
            torch.isfinite(self.gram_q).all() and torch.isfinite(self.gram_k).all() and torch.isfinite(self.score).all()
        )

