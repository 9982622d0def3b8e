"""Softmax-aware logit fit for attention q/k pruning (issue 6, variant 2).

The paper (``../shared/CORP.md``) fits the per-head correction M of the kept
q/k dims S (pruned P, ``A = I + M`` folded into W_K) over ALL pooled token pairs:

    min_M Σ_{i,j} (q_P,iᵀ k_P,j − q_S,iᵀ M k_S,j)² + λ‖M‖²
    ⇒  GQ_SS M GK_SS + λM = GQ_SP GK_PS,   GQ = Σ q qᵀ, GK = Σ k kᵀ (uncentred).

Two facts it ignores: softmax is invariant to a constant added to one query's
row of logits, and a query only meets the keys of its own image. For image b
(tokens T_b, key sum s_b = Σ_{j∈b} k_j, mean k̄_b = s_b / T_b) let
k̃_j = k_j − k̄_b. The logit row of query i minus its row mean is
``q_iᵀ k_j − q_iᵀ k̄_b = q_iᵀ k̃_j``, so the error softmax actually sees is

    E(M) = Σ_b Σ_{i∈b} Σ_{j∈b} (q_P,iᵀ k̃_P,j − q_S,iᵀ M k̃_S,j)² + λ‖M‖².        (*)

(Any per-image constant in the keys, the key bias included, drops out: M spends
no capacity on row constants.)

Derivation. With ``r_ij = q_P,iᵀ k̃_P,j − q_S,iᵀ M k̃_S,j`` and ``q_S,iᵀ M k̃_S,j =
⟨M, q_S,i k̃_S,jᵀ⟩``, ∂E/∂M = −2 Σ r_ij q_S,i k̃_S,jᵀ + 2λM = 0. Inside one image
the double sum over (i, j) factorises into a query Gram times a key Gram:

    Σ_b GQ_b,SS M GK̃_b,SS + λM = Σ_b GQ_b,SP GK̃_b,PS,                        (1)
    GQ_b = Σ_{i∈b} q_i q_iᵀ,  GK̃_b = Σ_{j∈b} k̃_j k̃_jᵀ = GK_b − s_b s_bᵀ / T_b.

In vec form (column-major vec, ``vec(XMY) = (Yᵀ ⊗ X) vec M``):
``(Σ_b GK̃_b,SS ⊗ GQ_b,SS + λI) vec M = vec(rhs)``. A sum of Kronecker products
has no single Sylvester (two-eigenbasis) form, so this is an s² × s² SPD system
per head. This module flattens M row-major (``M.reshape(-1)``: vec of Mᵀ), where
the same matrix reads ``Σ_b GQ_b,SS ⊗ GK̃_b,SS`` (``torch.kron(GQ, GK)``).

Fit ``"centred"`` (one pass, cheap). Pool all queries against all keys, each key
centred by the mean of its own image: Σ_{all i} Σ_{all j} (q_P,iᵀk̃_P,j −
q_S,iᵀMk̃_S,j)² + λ‖M‖². The double sum factorises over the pooled Grams:

    GQ_SS M GK̃_SS + λM = GQ_SP GK̃_PS,   GK̃ = Σ_b GK̃_b = GK − Σ_b s_b s_bᵀ / T_b,

the paper's Sylvester equation with GK replaced by GK̃. The only new statistic
is ``key_outer = Σ_b s_b s_bᵀ / T_b`` (H, d, d), one more batched product in the
statistics pass (:func:`key_outer_update_`). It keeps cross-image pairs (a
query of image b against centred keys of image b'): it equals (*) when every
image's query Gram is the same multiple of the pooled one, and in general is a
pooled surrogate of (*).

Fit ``"per_image"`` (the exact objective (*), second pass). Equation (1) needs
the per-image Grams restricted to S (and S×P for the rhs), so S must be known:
:class:`PerImageLogitSystem` accumulates them in a second pass over the qkv
outputs after selection, and solves the s² × s² system by Cholesky in fp64
(:func:`corp.solve.ridge_solve`, batched over heads, retrying with more damping
if a factor fails). Both Grams are symmetric, so the system is accumulated as
``Σ_b vech(GQ_b,SS) vech(GK̃_b,SS)ᵀ`` over the u = s(s+1)/2 packed entries and
expanded to the s² × s² matrix only to solve.

Cost of per_image, per head and layer (s kept dims, p = d − s pruned, T tokens):

* memory: accumulator u² fp64 (s=32: u=528, 2.1 MiB; s=40: u=820, 5.1 MiB) and,
  while solving, the s² × s² system (s=32: 1024², 8 MiB; s=40: 1600², 19.5 MiB)
  plus its Cholesky factor. ViT-H (H=16, s=40): ~82 MiB accumulator, ~0.6 GiB
  transient while solving one layer (all heads batched).
* flops per image: Grams 2·T·s·d (q_S against [q_S|q_P], same for centred keys),
  packed outer product 2·u² (s=32: 0.56 M; s=40: 1.3 M), rhs 2·s²·p.
* solve: Cholesky s⁶/3 (s=32: 0.36 GFLOP; s=40: 1.4 GFLOP) + solve 2·s⁴.
The paper's / centred solve is O(s³) per head; both accumulate O(T·d²) per image.

Scale of λ. As in :func:`corp.compensate.attention_compensation`,
``λ = ridge · mean(diag GQ_SS) · mean(diag GK̃_SS)`` (:func:`logit_damping_scale`,
pooled Grams, centred keys): the mean diagonal of the pooled system matrix
``GK̃_SS ⊗ GQ_SS``. :meth:`PerImageLogitSystem.solve` takes the scale as an
argument; passing :func:`logit_damping_scale` of the pooled centred Grams gives
the same λ as the centred fit. Note that the per-image data term sums only
Σ_b T_b² pairs instead of (Σ_b T_b)², so with that scale the same ``ridge`` is
about (number of images) times stronger relative to the per-image data;
:meth:`PerImageLogitSystem.system_scale` returns the mean diagonal of the
per-image system itself, ``Σ_b mean(diag GQ_b,SS)·mean(diag GK̃_b,SS)``, for a
λ that is the same fraction of its own system as the paper's.

Precision: every chunk multiplies in fp32 (fp64 inputs stay fp64) and adds into
fp64 accumulators, like :mod:`corp.stats`. ``GK − key_outer`` cancels the
per-image mean part of the keys: its relative error is about
``ε_chunk · ‖GK‖ / ‖GK̃‖``, so keys whose shared per-image component dwarfs their
spread lose digits in the centred Gram (the per_image pass centres explicitly
before multiplying and does not).
"""
from __future__ import annotations

import torch

from .solve import ridge_solve, sub_blocks, sylvester_solve
from .stats import _chunk_dtype

__all__ = [
    "key_outer_update_",
    "centred_key_gram",
    "logit_damping_scale",
    "centred_attention_compensation",
    "PerImageLogitSystem",
]


def _split_qk(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a qkv chunk ``(B, T, 3·H·d)`` (or ``(T, 3·H·d)``: one image) as ``(B, H, T, d)``."""
    h, d = num_heads, head_dim
    if qkv.dim() == 2:
        qkv = qkv[None]
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, T, 3·H·d) with one image per row of B, got {tuple(qkv.shape)}")
    if qkv.shape[-1] != 3 * h * d:
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3·{h}·{d}")
    b, t, _ = qkv.shape
    x = qkv.reshape(b, t, 3, h, d).to(_chunk_dtype(qkv))
    return x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)


@torch.no_grad()
def key_outer_update_(key_outer: torch.Tensor, qkv: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Add ``Σ_b s_b s_bᵀ / T_b`` (``s_b = Σ_{j∈b} k_j``, per head) into an fp64 accumulator.

    Args:
        key_outer: ``(H, d, d)`` float64 accumulator.
        qkv: ``(B, T, 3·H·d)`` fused qkv projection output, one image per row of
            B with all its T tokens (``(T, 3·H·d)`` is one image), any float
            dtype; layout ``[q heads | k heads | v heads]`` as in
            :func:`corp.stats.attention_stats_update_`. Products run in fp32
            (fp64 for fp64 input) per chunk and are added in fp64.
        num_heads: H.
        head_dim: d.
    """
    _, k = _split_qk(qkv, num_heads, head_dim)  # (B, H, T, d)
    if key_outer.shape != (num_heads, head_dim, head_dim):
        raise ValueError(f"key_outer must be ({num_heads}, {head_dim}, {head_dim}), got {tuple(key_outer.shape)}")
    t = k.shape[2]
    mean = k.mean(dim=2)  # (B, H, d): s_b / T
    # Σ_b s_b s_bᵀ / T = T · Σ_b k̄_b k̄_bᵀ, as one batched product over heads
    m = mean.transpose(0, 1)  # (H, B, d)
    key_outer += (torch.bmm(m.transpose(1, 2), m) * t).to(torch.float64)


def centred_key_gram(gram_k: torch.Tensor, key_outer: torch.Tensor) -> torch.Tensor:
    """``GK̃ = GK − Σ_b s_b s_bᵀ / T_b``: the Gram of per-image-centred keys, ``(H, d, d)``.

    ``gram_k`` is the full symmetric ``(H, d, d)`` uncentred key Gram
    (``AttentionStatistics.gram_k``), ``key_outer`` from :func:`key_outer_update_`
    over the same tokens. The result is symmetrised against round-off.
    """
    if gram_k.shape != key_outer.shape:
        raise ValueError(f"shapes differ: {tuple(gram_k.shape)} vs {tuple(key_outer.shape)}")
    g = gram_k.to(torch.float64) - key_outer.to(torch.float64)
    return 0.5 * (g + g.transpose(-1, -2))




def logit_damping_scale(gram_q: torch.Tensor, gram_k_centred: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``mean(diag GQ_SS) · mean(diag GK̃_SS)`` per head, ``(H,)`` fp64: λ = ridge · this.

    The scale of :func:`corp.compensate.attention_compensation` with the centred
    key Gram; pass it to :meth:`PerImageLogitSystem.solve` for the same λ as the
    centred fit. ``gram_q``, ``gram_k_centred``: ``(H, d, d)``; ``kept``: ``(H, s)``.
    """
    kept = kept.to(gram_q.device)
    dq = torch.gather(torch.diagonal(gram_q, dim1=1, dim2=2), 1, kept).to(torch.float64)
    dk = torch.gather(torch.diagonal(gram_k_centred, dim1=1, dim2=2), 1, kept).to(torch.float64)
    return dq.mean(1) * dk.mean(1)


def centred_attention_compensation(
    gram_q: torch.Tensor, gram_k_centred: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, ridge: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"centred"`` fit: ``GQ_SS M GK̃_SS + λM = GQ_SP GK̃_PS`` per head.

    ``λ = ridge · mean(diag GQ_SS) · mean(diag GK̃_SS)`` (clamped to the smallest
    positive float, so ``ridge=0`` is the unregularised fit where the Grams have
    full rank). Same eigen-form Sylvester solve as the paper's fit.

    Args:
        gram_q: ``(H, d, d)`` uncentred query Gram ``Σ q qᵀ``.
        gram_k_centred: ``(H, d, d)`` per-image-centred key Gram (:func:`centred_key_gram`).
        kept: ``(H, s)``; pruned: ``(H, d − s)`` per-head dim indices.
        ridge: relative damping.
        backend: solve backend of :func:`corp.solve.sylvester_solve`.

    Returns:
        ``M`` ``(H, s, s)`` (fold ``A = I + M`` into W_K as the paper's) and ``λ`` ``(H,)``.
    """
    dev = gram_q.device
    kept, pruned = kept.to(dev), pruned.to(dev)
    gq, gk = gram_q.to(torch.float64), gram_k_centred.to(torch.float64)
    q_ss, k_ss = sub_blocks(gq, kept, kept), sub_blocks(gk, kept, kept)
    rhs = sub_blocks(gq, kept, pruned) @ sub_blocks(gk, pruned, kept)
    scale = logit_damping_scale(gq, gk, kept)
    damping = (ridge * scale).clamp_min(torch.finfo(torch.float64).tiny)
    return sylvester_solve(q_ss, k_ss, rhs, damping, backend=backend), damping


class PerImageLogitSystem:
    """Accumulates and solves the ``"per_image"`` normal equation (1) for one attention.

    ``Σ_b GQ_b,SS M GK̃_b,SS + λM = Σ_b GQ_b,SP GK̃_b,PS`` per head, with per-image
    Grams of the kept (S) and pruned (P) dims and keys centred per image. Needs
    S: run it in a second pass over the qkv outputs after selection.

    Args:
        kept: ``(H, s)`` kept dims per head; pruned: ``(H, d − s)``.
        num_heads: H; head_dim: d.
        device: where the fp64 accumulators live.

    Attributes:
        packed: ``(H, u, u)`` fp64, ``Σ_b vech(GQ_b,SS) vech(GK̃_b,SS)ᵀ``, u = s(s+1)/2.
        rhs: ``(H, s, s)`` fp64, ``Σ_b GQ_b,SP GK̃_b,PS``.
        images: number of images added.
    """

    def __init__(self, kept: torch.Tensor, pruned: torch.Tensor, num_heads: int, head_dim: int, device):
        if kept.dim() != 2 or kept.shape[0] != num_heads or pruned.shape[0] != num_heads:
            raise ValueError(f"kept (H, s) and pruned (H, d−s) for H={num_heads}")
        if kept.shape[1] + pruned.shape[1] != head_dim:
            raise ValueError(f"kept {kept.shape[1]} + pruned {pruned.shape[1]} ≠ head_dim {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.device = torch.device(device)
        self.kept = kept.to(self.device)
        self.pruned = pruned.to(self.device)
        s = kept.shape[1]
        self.keep = s
        rows, cols = torch.triu_indices(s, s, device=self.device)
        self._rows, self._cols = rows, cols
        u = rows.numel()
        tri = torch.empty(s, s, dtype=torch.long, device=self.device)
        tri[rows, cols] = torch.arange(u, device=self.device)
        tri[cols, rows] = torch.arange(u, device=self.device)
        self._tri = tri  # packed index of the unordered pair (a, a')
        self.packed = torch.zeros(num_heads, u, u, dtype=torch.float64, device=self.device)
        self.rhs = torch.zeros(num_heads, s, s, dtype=torch.float64, device=self.device)
        self.images = 0

    @torch.no_grad()
    def update(self, qkv: torch.Tensor) -> None:
        """Add the images of a qkv chunk ``(B, T, 3·H·d)`` (one image per row of B, all its tokens).

        Adds ``Σ_b kron(GK̃_b,SS, GQ_b,SS)`` (packed, see the class) and
        ``Σ_b GQ_b,SP GK̃_b,PS``; products in fp32 per chunk (fp64 for fp64 input).
        """
        q, k = _split_qk(qkv, self.num_heads, self.head_dim)  # (B, H, T, d)
        b, h, t, d = q.shape
        k = k - k.mean(dim=2, keepdim=True)  # centre explicitly: no GK − s sᵀ/T cancellation
        kept = self.kept.to(q.device)
        pruned = self.pruned.to(q.device)
        order = torch.cat([kept, pruned], dim=1)[None, :, None, :].expand(b, h, t, d)
        q, k = torch.gather(q, 3, order), torch.gather(k, 3, order)  # columns [S | P]
        s = self.keep
        gq = q[..., :s].transpose(-1, -2) @ q  # (B, H, s, d): [GQ_SS | GQ_SP]
        gk = k[..., :s].transpose(-1, -2) @ k  # [GK̃_SS | GK̃_SP]
        gq_ss, gk_ss = gq[..., :s], gk[..., :s]
        rhs = (gq[..., s:] @ gk[..., s:].transpose(-1, -2)).sum(0)  # Σ_b GQ_SP · GK̃_PS
        vq = gq_ss[..., self._rows, self._cols].permute(1, 2, 0)  # (H, u, B)
        vk = gk_ss[..., self._rows, self._cols].transpose(0, 1)  # (H, B, u)
        self.packed += torch.bmm(vq, vk).to(torch.float64)
        self.rhs += rhs.to(torch.float64)
        self.images += b

    def system_matrix(self) -> torch.Tensor:
        """``(H, s², s²)`` fp64 ``Σ_b GQ_b,SS ⊗ GK̃_b,SS`` acting on row-major ``vec(M)``."""
        tri = self._tri
        full = self.packed[:, tri[:, None, :, None], tri[None, :, None, :]]  # (H, a, c, a', c')
        s = self.keep
        return full.reshape(self.num_heads, s * s, s * s)

    def system_scale(self) -> torch.Tensor:
        """Mean diagonal of the per-image system, ``Σ_b mean(diag GQ_b,SS)·mean(diag GK̃_b,SS)``, ``(H,)``."""
        diag = self._tri.diagonal()
        return self.packed[:, diag][:, :, diag].mean(dim=(1, 2))

    def solve(self, ridge: float, scale: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``(Σ_b GQ_b,SS ⊗ GK̃_b,SS + λI) vec M = vec(rhs)`` by Cholesky in fp64.

        Args:
            ridge: relative damping; ``λ = ridge · scale`` (≥ the smallest positive float).
            scale: ``(H,)`` λ scale: :func:`logit_damping_scale` of the pooled
                centred Grams (the centred fit's λ) or :meth:`system_scale`.
            backend: :func:`corp.solve.ridge_solve` backend.

        Returns:
            ``M`` ``(H, s, s)`` and the λ used ``(H,)`` (larger than asked where a
            factorisation failed and was retried with more damping).
        """
        if self.images == 0:
            raise RuntimeError("no images added")
        s = self.keep
        scale = torch.as_tensor(scale, dtype=torch.float64, device=self.device).expand(self.num_heads)
        damping = (ridge * scale).clamp_min(torch.finfo(torch.float64).tiny)
        matrix = self.system_matrix()
        matrix = 0.5 * (matrix + matrix.transpose(-1, -2))
        sol = ridge_solve(matrix, self.rhs.reshape(self.num_heads, s * s, 1), damping, backend=backend)
        if not bool(sol.ok.all()):
            raise FloatingPointError("per-image logit system could not be factored even with increased damping")
        return sol.solution.reshape(self.num_heads, s, s), sol.damping
