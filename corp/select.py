"""Selection: which MLP channels and q/k dims each block keeps, one class per rule.

* :class:`EnergySelection` (the paper): MLP channels by
  ``E[h_j²]·‖fc1.weight[j,:]‖·‖fc2.weight[:,j]‖``, q/k dims by ``Σ q_j² k_j²``.
* :class:`ResidualSelection`: by what the closed-form compensation cannot
  recover (a channel that copies another has high energy and costs nothing).

Both implement ``select_mlp(stats, weights, keep)`` and ``select_qk(stats, keep)``
and return sorted ``(kept, pruned)`` index tensors.

Residual selection, the MLP (hidden ``h``, ``D`` channels; centred covariance ``Σ``;
fc2 weight ``W2``). Keeping ``S`` and fitting ``h_P ≈ B h_S + c`` by ridge regression
(:class:`corp.fit.MlpRidgeFit`) leaves the per-token output error

    E‖W2_P(h_P − B h_S − c)‖² = tr(W2_P (Σ_PP − Σ_PS H_SS⁻¹ Σ_SP) W2_Pᵀ) − λ‖W2_P B‖²_F,
    H = Σ + λI,

(``λ = 0``: the Schur complement ``tr(W2_P Σ_{P|S} W2_Pᵀ)``). The folded weight
``W' = W2_S + W2_P B`` equals ``W2 H_{·S} H_SS⁻¹`` (``H_PS = Σ_PS`` off the
diagonal), the minimiser over ``V`` supported on ``S`` of the quadratic

    J(S) = tr((W2 − V) H (W2 − V)ᵀ)
         = E‖W2 h − W' h_S − b'‖² + λ(‖W2_P‖²_F + ‖W2_P B‖²_F)
         = tr(W2_P (H_PP − H_PS H_SS⁻¹ H_SP) W2_Pᵀ).

This is the ridge objective whose minimiser *is* the compensation; it is the
quantity the OBS recursion tracks exactly: with ``K`` the kept set,
``Hinv = H_KK⁻¹`` and ``W'`` the current folded weights, dropping ``j ∈ K`` and
re-optimising raises ``J`` by ``‖W'_{:,j}‖² / Hinv_jj``, and then
``W' ← W' − W'_{:,j} Hinv_{j,:}/Hinv_jj``, ``Hinv ← Hinv − Hinv_{:,j}Hinv_{j,:}/Hinv_jj``
(block of ``J``: ``tr(W'_J Hinv_JJ⁻¹ W'_Jᵀ)`` and the rank-|J| versions). With
``λ = 0`` the increase of ``J`` *is* the increase of the compensated error.
``λ = ridge · mean(diag Σ)`` over all ``D`` channels, fixed across steps (the
compensation afterwards uses ``ridge · mean(diag Σ_SS)`` of the final set).

Residual selection, attention q/k (per head, Grams ``GQ``, ``GK``, keys centred
per image where the fit centres them). The logit residual of the compensated
bilinear form for kept ``S`` is

    R(S) = Σ_{i,j} (q_{P,i}ᵀk_{P,j} − q_{S,i}ᵀ M k_{S,j})²
         = tr(GQ_PP GK_PP) − 2 tr(Mᵀ GQ_SP GK_PS) + tr(Mᵀ GQ_SS M GK_SS),

with ``M`` the ridge solution of :class:`corp.fit.SylvesterLogitFit`; the penalty
``λ‖M‖²`` is not part of ``R``. The greedy evaluates ``R(S \\ {j})`` exactly for
every head and candidate (one batched eigen-Sylvester solve per step) and drops the best.
"""
from __future__ import annotations

import torch

from .fit import damping, logit_scale, mlp_scale, sub_blocks, sylvester_solve
from .models.base import MlpWeights
from .reference import cholesky_with_retries
from .stats import AttentionStatistics, MLPStatistics

__all__ = [
    "EnergySelection",
    "ResidualSelection",
    "select_mlp_channels",
    "select_qk_dims",
    "select_mlp_channels_by_residual",
    "select_qk_dims_by_residual",
    "qk_residual",
    "auto_mlp_step",
    "qk_selection_step",
]

# Number of greedy iterations the automatic MLP block size aims at. Measured
# on synthetic GELU activations (6000 tokens, out = D/4, keep 50%, ridge 1e-3;
# compensated error relative to the exact greedy, step = 1): 64 blocks gave
# +0.12% (D = 768) and +0.05% (D = 1536); 16 blocks +0.2%/+0.15%; 4 blocks
# +0.8%. Time at D = 1536 on the 2-core CPU: step = 1 0.98 s, 64 blocks 0.20 s,
# 16 blocks 0.17 s (the D³ inverse is a floor of ~0.13 s): 64 blocks costs
# about as little as coarser blocks and stays within 0.12% of exact.
AUTO_MLP_BLOCKS = 64


def auto_mlp_step(width: int, keep: int) -> int:
    """Block size used by ``step=0``: ``max(1, (width − keep) // AUTO_MLP_BLOCKS)``."""
    return max(1, (width - keep) // AUTO_MLP_BLOCKS)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


def _spd_inverse(matrix: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """``(A + λI)⁻¹`` by Cholesky with corp's damping-retry ladder; returns the inverse and the λ used."""
    factor, used, ok = cholesky_with_retries(matrix[None], torch.tensor([lam], dtype=matrix.dtype,
                                                                        device=matrix.device))
    if not bool(ok[0]):
        raise FloatingPointError("covariance could not be factored even with increased damping")
    return torch.cholesky_inverse(factor[0]), float(used[0])


def _mlp_greedy(
    cov: torch.Tensor, w2: torch.Tensor, keep: int, damping: float, step: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Backward OBS elimination on ``J`` (module docstring) with absolute damping λ.

    Returns the kept indices (unsorted), the removed blocks in order, and the
    predicted increase of ``J`` for each block, ``tr(W'_J Hinv_JJ⁻¹ W'_Jᵀ)``.
    """
    width = cov.shape[0]
    hinv, _ = _spd_inverse(cov, damping)
    wp = w2.clone()  # W' = W2 H_{·K} H_KK⁻¹ = W2 for K = all channels
    alive = torch.arange(width, device=cov.device)  # channel of each row/column of hinv
    live = torch.ones(width, dtype=torch.bool, device=cov.device)  # rows/columns still in K
    left = width
    removed: list[torch.Tensor] = []
    increases: list[float] = []
    while left > keep:
        b = min(step, left - keep)
        score = (wp * wp).sum(0) / torch.diagonal(hinv)  # single-drop increase of J for every kept channel
        score = score.masked_fill(~live, float("inf"))
        drop = torch.topk(score, b, largest=False, sorted=False).indices
        c = hinv[drop[:, None], drop]  # (b, b) Hinv_JJ, SPD (principal block of an SPD inverse)
        u = hinv[:, drop]  # (n, b) Hinv_{·J}
        w_j = wp[:, drop]  # (out, b)
        lc = torch.linalg.cholesky(c)
        x = torch.cholesky_solve(u.T.contiguous(), lc)  # (b, n) Hinv_JJ⁻¹ Hinv_J·
        increases.append(float((w_j * torch.cholesky_solve(w_j.T.contiguous(), lc).T).sum()))
        # Group OBS: re-optimise the survivors after removing the whole block, in place. Rows and
        # columns of removed channels become (numerically) zero and are never read again: compacting
        # the n×n inverse every step cost more memory traffic than the rank-b update itself.
        wp.addmm_(w_j, x, alpha=-1.0)
        hinv.addmm_(u, x, alpha=-1.0)
        live[drop] = False
        removed.append(alive[drop])
        left -= b
        if left > keep and left < 0.75 * live.numel():  # compact once a quarter is dead
            rest = live.nonzero()[:, 0]
            hinv = hinv[rest[:, None], rest]
            hinv = 0.5 * (hinv + hinv.T)  # re-symmetrise the downdated inverse
            wp, alive = wp[:, rest].contiguous(), alive[rest]
            live = torch.ones(rest.numel(), dtype=torch.bool, device=cov.device)
    alive = alive[live]
    return alive, removed, increases


def select_mlp_channels_by_residual(
    cov: torch.Tensor, w2: torch.Tensor, keep: int, ridge: float, step: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` hidden channels whose removal the ridge compensation recovers worst.

    Backward greedy (OBS) elimination on the ridge objective ``J`` of the module
    docstring, ``step`` channels per iteration (the ``step`` lowest single-drop
    increases, then an exact rank-``step`` re-optimisation with BLAS-3 updates).
    ``step=1`` is the exact greedy.

    Args:
        cov: ``(D, D)`` centred covariance ``Σ`` of the hidden activations (fp64 used).
        w2: ``(out, D)`` fc2 weight.
        keep: channels kept, ``0 < keep ≤ D``.
        ridge: λ relative to ``mean(diag Σ)`` (fixed for all steps).
        step: channels removed per iteration; ``0`` picks :func:`auto_mlp_step`.

    Returns:
        ``(kept, pruned)``: sorted long tensors of shapes ``(keep,)``, ``(D − keep,)`` on ``cov.device``.
    """
    width = cov.shape[0]
    if cov.shape != (width, width) or w2.dim() != 2 or w2.shape[1] != width:
        raise ValueError(f"cov must be (D, D) and w2 (out, D); got {tuple(cov.shape)}, {tuple(w2.shape)}")
    if not 0 < keep <= width:
        raise ValueError(f"keep must be in 1..{width}, got {keep}")
    if ridge < 0:
        raise ValueError("ridge must be non-negative")
    step = auto_mlp_step(width, keep) if step <= 0 else step
    cov = cov.to(torch.float64)
    w2 = w2.detach().to(device=cov.device, dtype=torch.float64)
    lam = float(damping(ridge, mlp_scale(cov)))
    alive, removed, _ = _mlp_greedy(cov, w2, keep, lam, step)
    pruned = torch.cat(removed) if removed else alive.new_zeros(0)
    return torch.sort(alive).values, torch.sort(pruned).values


# ---------------------------------------------------------------------------
# Attention q/k
# ---------------------------------------------------------------------------




def qk_residual(gram_q: torch.Tensor, gram_k: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor,
                ridge: float) -> torch.Tensor:
    """Logit residual ``R`` (module docstring) left by :class:`corp.fit.SylvesterLogitFit`, batched.

    Grams ``(B, d, d)`` (fp64), kept ``(B, s)``, pruned ``(B, d − s)`` → ``(B,)``; ``λ‖M‖²`` not included.
    """
    if pruned.shape[1] == 0:
        return gram_q.new_zeros(gram_q.shape[0])
    q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
    rhs = sub_blocks(gram_q, kept, pruned) @ sub_blocks(gram_k, pruned, kept)
    q_pp, k_pp = sub_blocks(gram_q, pruned, pruned), sub_blocks(gram_k, pruned, pruned)
    m = sylvester_solve(q_ss, k_ss, rhs, damping(ridge, logit_scale(q_ss, k_ss)))
    full = (q_pp * k_pp).sum((1, 2))  # tr(GQ_PP GK_PP): both symmetric
    return full - 2 * (m * rhs).sum((1, 2)) + (m * (q_ss @ m @ k_ss)).sum((1, 2))


def select_qk_dims_by_residual(
    gram_q: torch.Tensor, gram_k: torch.Tensor, keep: int, ridge: float, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, backward greedy on the exact compensated residual ``R`` (module docstring).

    Each iteration evaluates ``R(S \\ {j})`` for every head and every kept ``j``
    (``H·|S|`` Sylvester systems of size ``|S| − 1`` in one batched solve) and
    drops the ``step`` best candidates of each head (``step=1``: exact greedy;
    larger steps rank the block by single-drop residuals).

    Args:
        gram_q, gram_k: ``(H, d, d)`` uncentred per-head Grams (fp64 used).
        keep: dims kept per head, ``0 < keep ≤ d``.
        ridge: relative damping of :class:`corp.fit.SylvesterLogitFit`.
        step: dims removed per head per iteration (≥ 1).

    Returns:
        ``(kept, pruned)``: long tensors ``(H, keep)``, ``(H, d − keep)``, sorted per head, on the Grams' device.
    """
    heads, d, _ = gram_q.shape
    if gram_k.shape != gram_q.shape or gram_q.shape[2] != d:
        raise ValueError(f"Grams must both be (H, d, d); got {tuple(gram_q.shape)}, {tuple(gram_k.shape)}")
    if not 0 < keep <= d:
        raise ValueError(f"keep must be in 1..{d}, got {keep}")
    step = max(1, int(step))
    # The greedy runs on the CPU whatever the Grams' device: each iteration eigendecomposes H·|S|
    # matrices of size |S| − 1, and torch.linalg.eigh on CUDA loops over a batch one matrix at a
    # time once n > 32 (pytorch/pytorch#175585), which is slower than the CPU for these sizes.
    home = gram_q.device
    gram_q, gram_k = gram_q.to("cpu", torch.float64), gram_k.to("cpu", torch.float64)
    dev = gram_q.device
    kept = torch.arange(d, device=dev).repeat(heads, 1)
    pruned = kept[:, :0]
    head_of = torch.arange(heads, device=dev)
    while kept.shape[1] > keep:
        s = kept.shape[1]
        b = min(step, s - keep)
        # candidate c of head h: kept[h] without position c → (H, s, s−1); its pruned set gains kept[h, c]
        pos = torch.arange(s, device=dev)
        others = pos[None, :].expand(s, s)[~torch.eye(s, dtype=torch.bool, device=dev)].view(s, s - 1)
        cand_kept = kept[:, others]  # (H, s, s−1)
        cand_pruned = torch.cat([pruned[:, None, :].expand(-1, s, -1), kept[:, :, None]], dim=2)
        idx = head_of.repeat_interleave(s)
        res = qk_residual(gram_q[idx], gram_k[idx], cand_kept.reshape(heads * s, s - 1),
                                   cand_pruned.reshape(heads * s, -1), ridge).view(heads, s)
        drop = torch.topk(res, b, dim=1, largest=False).indices  # (H, b) positions in kept
        stay = torch.ones(heads, s, dtype=torch.bool, device=dev)
        stay.scatter_(1, drop, False)
        pruned = torch.cat([pruned, torch.gather(kept, 1, drop)], dim=1)
        kept = kept[stay].view(heads, s - b)
    return torch.sort(kept, dim=1).values.to(home), torch.sort(pruned, dim=1).values.to(home)


# ---------------------------------------------------------------------------
# Energy (the paper)
# ---------------------------------------------------------------------------


def _split_top(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(score, descending=True, stable=True)
    return torch.sort(order[:keep]).values, torch.sort(order[keep:]).values


def select_mlp_channels(weights: MlpWeights, second_moment: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank hidden channels by ``E[h_j²]·‖W_in[j,:]‖·‖W_out[:,j]‖`` ``(D_h,)``; keep the top ``keep``.

    Returns sorted index tensors ``(kept (keep,), pruned (D_h − keep,))``.
    """
    score = second_moment.to(weights.w_in.device) * weights.w_in.norm(dim=1) * weights.w_out.norm(dim=0)
    return _split_top(score, keep)


def select_qk_dims(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, keep the ``keep`` dims with the largest ``Σ q_j² k_j²``. ``score``: ``(H, d)``.

    Returns ``(kept, pruned)`` of shapes ``(H, keep)`` and ``(H, d - keep)``, sorted per head.
    """
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    kept, _ = torch.sort(order[:, :keep], dim=1)
    pruned, _ = torch.sort(order[:, keep:], dim=1)
    return kept, pruned


def qk_selection_step(head_dim: int, keep: int) -> int:
    """q/k dims dropped per greedy iteration of residual selection.

    Exact greedy (1) re-solves H·|S| Sylvester systems per dim removed: 7 s per layer of
    12 heads × 64 on 2 CPU cores (benchmarks/selection_cost.py), 130x the layer's attention
    statistics. Eight iterations per layer keep it to a few Sylvester batches.
    """
    return max(1, (head_dim - keep) // 8)


class EnergySelection:
    """The paper's selection: activation energy times weight norms (MLP), ``Σ q_j² k_j²`` (q/k)."""

    needs_covariance = False  # MLP energy needs only Σ h² (no Gram) when nothing is compensated

    def select_mlp(self, stats: MLPStatistics, weights: MlpWeights, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_mlp_channels(weights, stats.second_moment_diag(), keep)

    def select_qk(self, stats: AttentionStatistics, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_qk_dims(stats.score, keep)


class ResidualSelection:
    """Backward greedy on what the compensation leaves (module docstring); ``ridge``/``attn_ridge``
    as the fits'."""

    needs_covariance = True

    def __init__(self, ridge: float, attn_ridge: float):
        self.ridge, self.attn_ridge = ridge, attn_ridge

    def select_mlp(self, stats: MLPStatistics, weights: MlpWeights, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, cov = stats.mean_and_covariance()
        return select_mlp_channels_by_residual(cov, weights.w_out.to(cov), keep, self.ridge)

    def select_qk(self, stats: AttentionStatistics, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = stats.head_dim
        return select_qk_dims_by_residual(stats.gram_q, stats.key_gram(), keep, self.attn_ridge,
                                          step=qk_selection_step(d, keep))
