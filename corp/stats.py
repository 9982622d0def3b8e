"""Calibration statistics: streaming fp64 accumulators for one block's parts.

* :class:`MLPStatistics`: token count ``n``, column sums ``Σ h`` and the Gram
  ``Σ h hᵀ`` of the hidden activations ``h`` (CORP.md); with ``cross=True`` also
  the dense stream's ``Σ h_dense`` and ``Σ h_dense ĥᵀ`` (error-correcting fits).
* :class:`AttentionStatistics`: per head ``GQ = Σ q qᵀ``, ``GK = Σ k kᵀ``,
  ``e_j = Σ q_j² k_j²``; with ``centre_keys=True`` also
  ``Σ_b s_b s_bᵀ / T_b`` (key sums per image) so that :meth:`~AttentionStatistics.key_gram`
  is the Gram of per-image-centred keys (:mod:`corp.fit`); with ``cross=True``
  the cross Grams ``Σ q̂ qᵀ``, ``Σ k k̂ᵀ`` of the pruned and dense streams.

Every update takes an optional token ``mask`` ``(B, T)`` bool (False: padding): padded
tokens never enter a statistic (the Grams sum over real tokens only, key centring uses
each sequence's real tokens and their count). Updates go through the :class:`~corp.ops.Kernels` of the run (``corp::gram_update_``,
``corp::attention_stats_update_``). :meth:`reduce_` sums a statistic over
distributed ranks; :meth:`check_finite` refuses NaN/Inf.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import REFERENCE, Kernels
from .reference import chunk_dtype, symmetrize_upper_

__all__ = ["MLPStatistics", "AttentionStatistics", "AttentionOutputStatistics", "qk_heads", "key_outer_update_", "centred_key_gram"]


def qk_heads(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a qkv chunk ``(B, T, 3·H·d)`` (or ``(T, 3·H·d)``: one image) as ``(B, H, T, d)``,
    in the chunk precision (fp32, or fp64 for fp64 input)."""
    if qkv.dim() == 2:
        qkv = qkv[None]
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, T, 3·H·d) with one image per row of B, got {tuple(qkv.shape)}")
    if qkv.shape[-1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{num_heads}·{head_dim}")
    b, t, _ = qkv.shape
    x = qkv.reshape(b, t, 3, num_heads, head_dim).to(chunk_dtype(qkv))
    return x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool ``(B, T)`` matching the leading dims of ``x`` ``(B, T, C)``."""
    if mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"token mask must be (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def _centred_keys(k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Keys ``(B, H, T, d)`` minus each sequence's mean over its real tokens; padded tokens zeroed."""
    if mask is None:
        return k - k.mean(dim=2, keepdim=True)
    w = mask[:, None, :, None].to(k.dtype)  # (B, 1, T, 1)
    mean = (k * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp(min=1)
    return (k - mean) * w


@torch.no_grad()
def key_outer_update_(key_outer: torch.Tensor, qkv: torch.Tensor, num_heads: int, head_dim: int,
                      mask: Optional[torch.Tensor] = None) -> None:
    """Add ``Σ_b s_b s_bᵀ / T_b`` (``s_b = Σ_{j∈b} k_j``, per head) into an fp64 accumulator.

    Args:
        key_outer: ``(H, d, d)`` float64 accumulator.
        qkv: ``(B, T, 3·H·d)`` fused qkv output, one image per row of B with all its
            T tokens (``(T, 3·H·d)`` is one image); products in fp32 (fp64 for fp64 input).
        mask: ``(B, T)`` bool, the real tokens of each sequence (None: all): ``s_b`` and
            ``T_b`` count only those (a sequence without real tokens adds nothing).
    """
    _, k = qk_heads(qkv, num_heads, head_dim)  # (B, H, T, d)
    if key_outer.shape != (num_heads, head_dim, head_dim):
        raise ValueError(f"key_outer must be ({num_heads}, {head_dim}, {head_dim}), got {tuple(key_outer.shape)}")
    if mask is None:
        t = k.shape[2]
        mean = k.mean(dim=2).transpose(0, 1)  # (H, B, d): s_b / T
        # Σ_b s_b s_bᵀ / T = T · Σ_b k̄_b k̄_bᵀ, as one batched product over heads
        key_outer += (torch.bmm(mean.transpose(1, 2), mean) * t).to(torch.float64)
        return
    mask = _check_mask(mask if qkv.dim() == 3 else mask.reshape(1, -1), k[:, 0])
    w = mask[:, None, :, None].to(k.dtype)  # (B, 1, T, 1)
    sums = (k * w).sum(dim=2).transpose(0, 1)  # (H, B, d): s_b
    scaled = sums / w.sum(dim=2).transpose(0, 1).clamp(min=1)  # s_b / T_b
    key_outer += torch.bmm(sums.transpose(1, 2), scaled).to(torch.float64)


def centred_key_gram(gram_k: torch.Tensor, key_outer: torch.Tensor) -> torch.Tensor:
    """``GK̃ = GK − Σ_b s_b s_bᵀ / T_b``: the Gram of per-image-centred keys, ``(H, d, d)``, symmetrised."""
    if gram_k.shape != key_outer.shape:
        raise ValueError(f"shapes differ: {tuple(gram_k.shape)} vs {tuple(key_outer.shape)}")
    g = gram_k.to(torch.float64) - key_outer.to(torch.float64)
    return 0.5 * (g + g.transpose(-1, -2))


def _cross_update_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc (H, d, d) += Σ_tokens a_hᵀ b_h`` per head for ``a``, ``b`` ``(B, H, T, d)``: fp32 chunk, fp64 sum."""
    acc += (a.transpose(0, 1).flatten(1, 2).mT @ b.transpose(0, 1).flatten(1, 2)).to(torch.float64)


class _Statistics:
    """What every statistic does besides its update: ranks' sums and the finiteness check."""

    count: int
    kind: str = ""  # what the statistics describe, for error messages
    channels: int = 0  # the width whose covariance the statistics estimate

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def reduce_(self, dp) -> None:
        """Sum the accumulators and the token count over the ranks of ``dp`` (:class:`corp.distributed.DataParallel`)."""
        dp.sum_(self.tensors())
        self.count = dp.sum_int(self.count)

    def check_finite(self, block_index: int) -> None:
        """Raise ValueError naming the block if any accumulator holds NaN or Inf."""
        # a sum is finite iff every (fp64, far from overflow) entry is: one reduction per tensor instead
        # of isfinite's mask and all (36 checks cost 0.14 s of a deit_small prune on the 2-core CPU)
        if not all(bool(torch.isfinite(t.sum())) for t in self.tensors()):
            raise ValueError(f"non-finite {self.kind} statistics in block {block_index}")


class MLPStatistics(_Statistics):
    """Accumulates ``n``, ``Σ h`` and ``Σ h hᵀ`` of one MLP's hidden activations ``h`` ``(..., D_h)``.

    ``full=False`` keeps only ``Σ h²`` (all that energy selection without
    compensation needs), skipping the O(D_h²) Gram work. ``cross=True`` also
    accumulates the dense stream's ``Σ h`` and ``Σ h ĥᵀ`` (:meth:`update` then takes both).

    Token weights (``update(..., weights=w)``, ``mlp_token_weights``) make every sum a weighted
    one, ``Σ w``, ``Σ w h``, ``Σ w h hᵀ``: the mean and covariance are then those of the tokens
    weighted by ``w``; ``count`` stays the number of tokens.
    """

    kind = "MLP"

    def __init__(self, hidden: int, device: torch.device, kernels: Kernels = REFERENCE, full: bool = True,
                 cross: bool = False):
        self.count = 0
        self.channels = hidden
        self.kernels = kernels
        self.full = full or cross
        self.colsum = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.weight_sum = torch.zeros((), dtype=torch.float64, device=device)  # Σ w (the token count unweighted)
        self._finalized = None  # (mean, covariance) once formed: see mean_and_covariance
        if self.full:
            self.gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        else:
            self.sq_sum = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.dense_sum = torch.zeros(hidden, dtype=torch.float64, device=device) if cross else None
        self.cross = torch.zeros(hidden, hidden, dtype=torch.float64, device=device) if cross else None

    @torch.no_grad()
    def update(self, h: torch.Tensor, h_dense: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> None:
        """Add hidden activations ``h`` ``(..., D_h)`` (and, with ``cross``, the dense stream's ``h_dense``);
        ``mask`` ``(B, T)`` bool keeps only the real tokens of ``h`` ``(B, T, D_h)``; ``weights``
        ``h.shape[:-1]``: non-negative finite per-token weights (not with ``cross``)."""
        self._refuse_if_finalized()
        if weights is not None:
            if weights.shape != h.shape[:-1]:
                raise ValueError(f"token weights must have shape {tuple(h.shape[:-1])}, got {tuple(weights.shape)}")
            if self.cross is not None:
                raise ValueError("token weights are not supported with the dense stream's cross statistics")
        if mask is not None:
            mask = _check_mask(mask, h)
            h = h[mask]
            h_dense = h_dense[mask] if h_dense is not None else None
            weights = weights[mask] if weights is not None else None
        width = h.shape[-1]
        self.count += h.numel() // width
        if weights is not None:
            self._weighted_update(h.reshape(-1, width), weights.reshape(-1))
            return
        self.weight_sum += h.numel() // width
        if self.full:
            self.kernels.gram_update_(self.gram, self.colsum, h)
        else:
            h2 = h.reshape(-1, width).to(chunk_dtype(h))
            self.colsum += h2.sum(0).to(torch.float64)
            self.sq_sum += (h2 * h2).sum(0).to(torch.float64)
        if self.cross is not None:
            dt = chunk_dtype(h)
            a, b = h_dense.reshape(-1, width).to(dt), h.reshape(-1, width).to(dt)
            self.cross += (a.T @ b).to(torch.float64)
            self.dense_sum += a.sum(0).to(torch.float64)

    def _refuse_if_finalized(self) -> None:
        if self._finalized is not None:
            raise RuntimeError("statistics already turned into a covariance: no further updates")

    def _weighted_update(self, h: torch.Tensor, w: torch.Tensor) -> None:
        """``Σ w``, ``Σ w h`` and ``Σ w h hᵀ`` (or ``Σ w h²``) of ``h`` ``(N, D_h)`` with weights ``w`` ``(N,)``."""
        dt = chunk_dtype(h)
        h, w = h.to(dt), w.to(dt)
        self.weight_sum += w.sum().to(torch.float64)
        self.colsum += (w @ h).to(torch.float64)
        if self.full:
            # the Gram of the rows scaled by √w is Σ w h hᵀ; its column sums (Σ √w h) go to a scratch vector
            self.kernels.gram_update_(self.gram, torch.zeros_like(self.colsum), h * w.sqrt()[:, None])
        else:
            self.sq_sum += (w @ (h * h)).to(torch.float64)

    @property
    def wants_dense(self) -> bool:
        """Whether :meth:`update` takes the dense stream's activations too."""
        return self.cross is not None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.colsum, self.gram if self.full else self.sq_sum, self.weight_sum]
        return out + ([self.cross, self.dense_sum] if self.cross is not None else [])

    def second_moment_diag(self) -> torch.Tensor:
        """``E[h_j²]`` per channel, ``(D_h,)`` float64."""
        if self._finalized is not None:  # the Gram now holds Σ: E[h²] = Σ_jj + μ_j²
            mean, cov = self._finalized
            return torch.diagonal(cov) + mean * mean
        diag = torch.diagonal(self.gram) if self.full else self.sq_sum
        return diag / self.weight_sum

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``μ = s/n`` ``(D_h,)`` and ``Σ = G/n − μμᵀ`` ``(D_h, D_h)``, float64 (``n = Σ w`` with token weights).

        The covariance is formed in the Gram's own storage, its lower triangle written
        tile by tile (:func:`corp.reference.symmetrize_upper_`: no D_h² temporary, where
        four cost 210 MB each at D_h = 5120), so the statistics accept no further
        updates afterwards; later calls return the same tensors.
        """
        if not self.full:
            raise RuntimeError("covariance needs the full Gram matrix (MLPStatistics(full=True))")
        if self._finalized is None:
            mean = self.colsum / self.weight_sum
            g = symmetrize_upper_(self.gram)
            g.addr_(mean, mean, beta=1.0 / float(self.weight_sum), alpha=-1.0)  # G/n − μμᵀ in one pass
            self._finalized = (mean, g)
        return self._finalized

    def dense_mean_and_cross_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``μ_h`` ``(D_h,)`` of the dense stream and ``Cov(h, ĥ)`` ``(D_h, D_h)`` (rows dense), float64."""
        mean_hat, _ = self.mean_and_covariance()
        mean_dense = self.dense_sum / self.count
        return mean_dense, self.cross / self.count - torch.outer(mean_dense, mean_hat)


class AttentionOutputStatistics(MLPStatistics):
    """``n``, ``Σ [o; z]`` and ``Σ [o; z][o; z]ᵀ`` ``(2A, 2A)`` of the dense (``o``) and pruned (``z``)
    attention's concatenated head outputs ``(..., A)`` on the same block inputs: the output fit's
    statistics (:class:`corp.fit.AttentionOutputFit`)."""

    kind = "attention output"

    def __init__(self, width: int, device: torch.device, kernels: Kernels = REFERENCE):
        super().__init__(2 * width, device, kernels, full=True)
        self.width = width

    @torch.no_grad()
    def update(self, dense_out: torch.Tensor, pruned_out: torch.Tensor) -> None:  # type: ignore[override]
        """Add one batch: ``dense_out``, ``pruned_out`` ``(..., A)``, the same tokens.

        The Gram of ``[o; z]`` is accumulated block by block (``Σ ooᵀ``, ``Σ zzᵀ`` through the run's
        Gram kernel, the cross block ``Σ ozᵀ`` as one product), without a concatenated copy of the
        batch (4 ms per batch of 32 × 197 tokens at A = 384 on the 2-core CPU; the same products)."""
        self._refuse_if_finalized()
        a = self.width
        if dense_out.shape != pruned_out.shape or dense_out.shape[-1] != a:
            raise ValueError(f"dense and pruned head outputs must both be (..., {a}), got "
                             f"{tuple(dense_out.shape)} and {tuple(pruned_out.shape)}")
        tokens = dense_out.numel() // a
        self.count += tokens
        self.weight_sum += tokens
        self.kernels.gram_update_(self.gram[:a, :a], self.colsum[:a], dense_out)
        self.kernels.gram_update_(self.gram[a:, a:], self.colsum[a:], pruned_out)
        dt = chunk_dtype(dense_out)
        o, z = dense_out.reshape(-1, a).to(dt), pruned_out.reshape(-1, a).to(dt)
        self.gram[:a, a:] += (o.T @ z).to(torch.float64)


class AttentionStatistics(_Statistics):
    """Accumulates per-head ``Σ q qᵀ``, ``Σ k kᵀ`` ``(H, d, d)`` and ``Σ q_j² k_j²`` ``(H, d)`` of one attention.

    ``centre_keys``: also ``Σ_b s_b s_bᵀ / T_b``, so :meth:`key_gram` is the Gram of
    per-image-centred keys. ``cross``: also ``Σ q̂ qᵀ`` and ``Σ k k̂ᵀ`` between the
    pruned (hat) and dense streams, keys centred like :meth:`key_gram`'s.
    """

    kind = "query/key"

    def __init__(self, num_heads: int, head_dim: int, device: torch.device, kernels: Kernels = REFERENCE,
                 centre_keys: bool = False, cross: bool = False):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.channels = head_dim
        self.kernels = kernels
        self.count = 0
        self.centre_keys = centre_keys
        shape = (num_heads, head_dim, head_dim)
        self.gram_q = torch.zeros(shape, dtype=torch.float64, device=device)
        self.gram_k = torch.zeros_like(self.gram_q)
        self.score = torch.zeros(num_heads, head_dim, dtype=torch.float64, device=device)
        self.key_outer = torch.zeros_like(self.gram_q) if centre_keys else None
        self.cross_q = torch.zeros_like(self.gram_q) if cross else None
        self.cross_k = torch.zeros_like(self.gram_q) if cross else None

    @torch.no_grad()
    def update(self, qkv: torch.Tensor, qkv_dense: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None) -> None:
        """Add a qkv projection output ``(B, T, 3·H·d)`` (and, with ``cross``, the dense stream's);
        ``mask`` ``(B, T)`` bool: only real tokens count, keys centred over each sequence's real tokens."""
        h, d = self.num_heads, self.head_dim
        if mask is not None:
            mask = _check_mask(mask, qkv)
            real = qkv[mask][None]  # (1, N, 3·H·d): the Grams and scores are sums over tokens
        else:
            real = qkv
        self.count += real.numel() // qkv.shape[-1]
        self.kernels.attention_stats_update_(self.gram_q, self.gram_k, self.score, real, h, d)
        if self.key_outer is not None:
            key_outer_update_(self.key_outer, qkv, h, d, mask)
        if self.cross_q is not None:
            q_hat, k_hat = qk_heads(qkv, h, d)
            q_dense, k_dense = qk_heads(qkv_dense, h, d)
            if self.centre_keys:
                k_hat, k_dense = _centred_keys(k_hat, mask), _centred_keys(k_dense, mask)
            elif mask is not None:
                w = mask[:, None, :, None].to(k_hat.dtype)
                k_hat, k_dense = k_hat * w, k_dense * w
            if mask is not None:  # zero padded queries: they add nothing to the cross sums
                w = mask[:, None, :, None].to(q_hat.dtype)
                q_hat, q_dense = q_hat * w, q_dense * w
            _cross_update_(self.cross_q, q_hat, q_dense)
            _cross_update_(self.cross_k, k_dense, k_hat)

    @property
    def wants_dense(self) -> bool:
        """Whether :meth:`update` takes the dense stream's qkv too."""
        return self.cross_q is not None

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.key_outer, self.cross_q, self.cross_k) if t is not None]
        return [self.gram_q, self.gram_k, self.score] + extra

    def key_gram(self) -> torch.Tensor:
        """The key Gram the logit fit uses: centred per image with ``centre_keys``, else ``Σ k kᵀ``."""
        return centred_key_gram(self.gram_k, self.key_outer) if self.key_outer is not None else self.gram_k
