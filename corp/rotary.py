"""Pruning query/key dims of rotary attention: whole pairs, and a logit fit that commutes with rotation.

With rotary position embeddings (RoPE, interleaved layout: dims ``2i, 2i+1`` form
pair ``i`` with frequency ``θ_i``) a token at position ``m`` sees ``q̂_m = R(m) q_m``
and ``k̂_n = R(n) k_n``, ``R(m)`` block-diagonal with the 2×2 rotation by ``m·θ_i``
in block ``i``, so the logit ``q̂_mᵀ k̂_n = q_mᵀ R(n − m) k_n`` depends on relative
position only. Hence:

* dims go in **whole pairs**, the same pair in q and k (a lone dim of a pair has no
  rotation partner): :func:`select_rotary_pairs` scores a pair by the sum of its
  dims' energies ``Σ q_j² k_j²`` (rotated q/k) and keeps the best pairs per head;
* the compensation ``A = I + M`` is folded into the key weights, i.e. *before* the
  rotation: the pruned model computes ``q̂_Sᵀ R_S(n)·A·R_S(n)ᵀ k̂_S``, which equals the
  fitted ``q̂_Sᵀ A k̂_S`` for every position only if ``A`` commutes with every
  ``R_S(n)``. With distinct frequencies the matrices commuting with all of them are
  block-diagonal with one **scaled rotation** ``[[a, −b], [b, a]]`` per kept pair
  (the commutant of SO(2) in 2×2 real matrices: multiplication by ``a + ib``), and
  then the logit stays a function of ``n − m``.

:func:`rotary_logit_solve` minimises the paper's pooled objective over that subspace:
``J(M) = ⟨M, GQ M GK⟩ − 2⟨M, C⟩ + λ‖M‖²`` (``GQ``, ``GK`` the rotated q/k Grams of
the kept dims, ``C`` the right side of the unrestricted equation ``GQ M GK + λM = C``,
e.g. ``GQ_SP GK_PS``). Writing ``M = Σ_α θ_α B_α`` over the basis ``B = {E_i, F_i}``
(``E_i``: the identity on pair ``i``; ``F_i``: ``[[0, −1], [1, 0]]`` on pair ``i``),
``J`` is a quadratic in θ whose normal equation is the ``s × s`` SPD system
``Σ_β (⟨B_α, GQ B_β GK⟩ + 2λ δ_αβ) θ_β = ⟨B_α, C⟩`` (``⟨E_i, E_i⟩ = ⟨F_i, F_i⟩ = 2``,
``⟨E_i, F_i⟩ = 0``), solved per head in closed form. tests/test_rotary.py checks it
against brute-force least squares over token pairs with real rotations.
"""
from __future__ import annotations

import torch

from .fit import FitContext, damping, logit_scale, sub_blocks
from .stats import AttentionStatistics

__all__ = ["select_rotary_pairs", "rotary_logit_solve", "pair_basis", "rotate_pairs", "RotaryLogitFit"]


def pair_basis(dtype=torch.float64, device=None) -> torch.Tensor:
    """The two 2×2 generators of the scaled rotations, ``(2, 2, 2)``: ``[I, J]``, ``J = [[0, −1], [1, 0]]``."""
    return torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]]], dtype=dtype, device=device)


def rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE in the interleaved layout: pair ``(x_2i, x_2i+1)`` rotated by the angle whose sine/cosine
    ``sin``/``cos`` (broadcastable to ``x`` ``(..., 2p)``, each value repeated for both dims of a pair)
    give: ``x·cos + rot(x)·sin``, ``rot(x)_2i = −x_2i+1``, ``rot(x)_2i+1 = x_2i`` (timm's ``apply_rot_embed_cat``)."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


def select_rotary_pairs(score: torch.Tensor, keep_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, keep the ``keep_pairs`` rotary pairs with the largest ``Σ_{j∈pair} Σ q_j² k_j²``.

    Args:
        score: ``(H, d)`` per-dim energy of the rotated q/k (``AttentionStatistics.score``), d even.
        keep_pairs: pairs kept per head, ``1 ≤ keep_pairs ≤ d/2``.

    Returns:
        ``(kept, pruned)`` dims, ``(H, 2·keep_pairs)`` and ``(H, d − 2·keep_pairs)``, sorted per head,
        both dims of each pair together.
    """
    heads, d = score.shape
    if d % 2:
        raise ValueError(f"rotary q/k width must be even, got {d}")
    if not 1 <= keep_pairs <= d // 2:
        raise ValueError(f"keep_pairs must be in 1..{d // 2}, got {keep_pairs}")
    pair_score = score.reshape(heads, d // 2, 2).sum(-1)
    order = torch.argsort(pair_score, dim=1, descending=True, stable=True)
    kept_pairs = torch.sort(order[:, :keep_pairs], dim=1).values
    pruned_pairs = torch.sort(order[:, keep_pairs:], dim=1).values

    def dims(pairs):
        return torch.stack([2 * pairs, 2 * pairs + 1], dim=-1).reshape(heads, -1)

    return dims(kept_pairs), dims(pruned_pairs)


def rotary_logit_solve(gram_q: torch.Tensor, gram_k: torch.Tensor, rhs: torch.Tensor,
                       damping: torch.Tensor) -> torch.Tensor:
    """Minimise ``⟨M, GQ M GK⟩ − 2⟨M, C⟩ + λ‖M‖²`` over M block-diagonal with a scaled rotation
    ``[[a, −b], [b, a]]`` per pair (module docstring), batched over heads.

    Args:
        gram_q, gram_k: ``(H, s, s)`` rotated q/k Grams of the kept dims (pairs adjacent), s even.
        rhs: ``(H, s, s)`` C (``GQ_SP GK_PS`` for the paper's fit).
        damping: ``(H,)`` λ > 0.

    Returns:
        ``(H, s, s)`` M, commuting with every rotation of the kept pairs.
    """
    heads, s, _ = gram_q.shape
    if s % 2:
        raise ValueError(f"rotary q/k width must be even, got {s}")
    p = s // 2
    basis = pair_basis(gram_q.dtype, gram_q.device)  # (t, 2, 2)
    q_blocks = gram_q.reshape(heads, p, 2, p, 2).permute(0, 1, 3, 2, 4)  # [h, i, j] = GQ block (pair i, pair j)
    k_blocks = gram_k.reshape(heads, p, 2, p, 2).permute(0, 1, 3, 2, 4)
    # ⟨B_(i,t), GQ B_(j,u) GK⟩ = tr(X_tᵀ GQ_ij X_u GK_ji)
    system = torch.einsum("tba,hijbc,ucd,hjida->hitju", basis, q_blocks, basis, k_blocks).reshape(heads, s, s)
    system = system + 2 * damping[:, None, None] * torch.eye(s, dtype=system.dtype, device=system.device)
    c_blocks = rhs.reshape(heads, p, 2, p, 2).diagonal(dim1=1, dim2=3)  # (h, 2, 2, p): diagonal blocks of C
    target = torch.einsum("tab,habi->hit", basis, c_blocks).reshape(heads, s)
    theta = torch.linalg.solve(system, target[..., None])[..., 0].reshape(heads, p, 2)
    blocks = torch.einsum("hit,tab->hiab", theta, basis)  # (h, p, 2, 2)
    out = torch.zeros(heads, p, 2, p, 2, dtype=gram_q.dtype, device=gram_q.device)
    idx = torch.arange(p, device=gram_q.device)
    out[:, idx, :, idx, :] = blocks.permute(1, 0, 2, 3)
    return out.reshape(heads, s, s)


class RotaryLogitFit:
    """The logit fit of rotary attention: :func:`rotary_logit_solve` on the rotated q/k statistics with the
    right side of the configured objective: ``GQ_SP GK_PS`` (pooled; keys centred per image for
    ``"centred"``, the statistics' key Gram), or the error-correcting one
    (``XQ[S, :] XK[:, S] − GQ̂_SS GK̂_SS``) when the statistics hold the dense cross Grams.
    ``logit_fit="per_image"`` and ``logit_solve="factored"`` solve for an unrestricted M and are not
    used here: rotary attention always takes this restricted closed form."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``M`` ``(H, s, s)`` (a scaled rotation per kept pair) and ``λ`` ``(H,)``."""
        gram_q, gram_k = stats.gram_q, stats.key_gram()
        q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
        if stats.cross_q is not None:
            rows_q = torch.gather(stats.cross_q, 1, kept[:, :, None].expand(-1, -1, stats.cross_q.shape[2]))
            cols_k = torch.gather(stats.cross_k, 2, kept[:, None, :].expand(-1, stats.cross_k.shape[1], -1))
            rhs = rows_q @ cols_k - q_ss @ k_ss
        else:
            rhs = sub_blocks(gram_q, kept, pruned) @ sub_blocks(gram_k, pruned, kept)
        lam = damping(self.ridge, logit_scale(q_ss, k_ss))
        return rotary_logit_solve(q_ss, k_ss, rhs, lam), lam
