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

import contextlib
from typing import Optional

import torch

from .fit import damping, logit_scale, mlp_scale, sub_blocks, sylvester_solve
from .models.base import MlpWeights
from .reference import SPD_INVERSE_LEAF, cholesky_with_retries, spd_inverse_by_blocks
from .stats import AttentionStatistics, MLPStatistics

__all__ = [
    "EnergySelection",
    "ResidualSelection",
    "FactoredResidualSelection",
    "select_mlp_channels",
    "select_qk_dims",
    "select_mlp_channels_by_residual",
    "select_qk_dims_by_residual",
    "select_qk_dims_by_factored_residual",
    "factored_residual_scores",
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


# Relative diagonal shift of the q/k Grams in the factorised residual greedy: only there to keep
# the per-head inverse defined on rank-deficient statistics; small enough that the selection
# is the unregularised residual's on full-rank ones.
FACTORED_GRAM_SHIFT = 1e-8


# Precision of the MLP residual greedy (the inverse and the OBS downdates). fp32 halves its cost:
# D = 1536 hidden channels, keep 768, 64 steps, 2-core CPU: 0.22 s against 0.46 s in fp64, the
# same kept set, so the same objective J (a synthetic GELU covariance, 12,608 tokens; the test
# test_mlp_greedy_in_fp32_keeps_the_fp64_channels checks the same at D = 256). The damping keeps
# H = Σ + λI far enough from singular for an fp32 factor only while it is not tiny: with exact
# duplicate channels and ridge 1e-12 (tests/test_timm_families.py's exact gated fold) the fp32
# greedy kept both copies of a pair for 1 seed in 8, the fp64 one for none. Below
# GREEDY_FP32_MIN_RIDGE (relative, as ``ridge``) the greedy therefore runs in fp64. The fit that
# follows (corp.fit.MlpRidgeFit) solves in fp64 either way.
GREEDY_DTYPE = torch.float32
GREEDY_FP32_MIN_RIDGE = 1e-4


@contextlib.contextmanager
def _ieee_fp32_matmuls():
    """fp32 products at full precision inside (``torch.set_float32_matmul_precision("highest")``):
    a caller's ``"high"`` would run the greedy's fp32 products in TF32 on GPUs (10 mantissa bits),
    far less than its downdates need."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def auto_mlp_step(width: int, keep: int) -> int:
    """Block size used by ``step=0``: ``max(1, (width − keep) // AUTO_MLP_BLOCKS)``."""
    return max(1, (width - keep) // AUTO_MLP_BLOCKS)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


# From this width on, the greedy's CPU inverse is corp.reference.spd_inverse_by_blocks instead of
# LAPACK's cholesky + cholesky_inverse (on GPUs cuSOLVER's are kept: not measured against it).
# fp32, 2-core CPU (Xeon with AMX), medians of 9, LAPACK against blocked: D = 384 1.09 / 0.93 ms,
# 768 6.0 / 4.9 ms, 1024 23.0 / 8.1 ms, 1536 41.0 / 19.5 ms, 2048 108 / 47 ms. Below 1024 the
# saving is at most a millisecond per block, and there LAPACK's inverse is kept: it is what the
# digits ablation's default was measured with, and the recursion's different rounding (same
# objective J to fp32 precision) flipped near-tied channels of those D = 384 models, moving their
# test accuracy at 75-90% sparsity by up to 3 of 450 images either way (seeds 1-2; net −1 image over
# the 24 settings of six models).
BLOCKED_INVERSE_MIN_WIDTH = 1024


def _spd_inverse(matrix: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """``(A + λI)⁻¹`` ``(D, D)`` by Cholesky with corp's damping-retry ladder; returns the inverse and
    the λ used. ``A`` ``(D, D)`` symmetric (both triangles are read).

    The first attempt runs without the ladder's batched copies (0.04 s of a 0.2 s inverse at
    D = 1536 on the 2-core CPU), on the CPU by :func:`corp.reference.spd_inverse_by_blocks` from
    :data:`BLOCKED_INVERSE_MIN_WIDTH` on; only a failed factor goes down the ladder.
    """
    shifted = matrix.clone()
    shifted.diagonal().add_(lam)
    width = shifted.shape[-1]
    blocked = shifted.device.type == "cpu" and width >= BLOCKED_INVERSE_MIN_WIDTH
    # a leaf as wide as the matrix is one LAPACK (cuSOLVER) cholesky + cholesky_inverse
    inverse, ok = spd_inverse_by_blocks(shifted, SPD_INVERSE_LEAF if blocked else width)
    if ok:
        return inverse, lam
    factor, used, ok = cholesky_with_retries(matrix[None], torch.tensor([lam], dtype=matrix.dtype,
                                                                        device=matrix.device))
    if not bool(ok[0]):
        raise FloatingPointError("covariance could not be factored even with increased damping")
    return torch.cholesky_inverse(factor[0]), float(used[0])


def _mlp_greedy(
    cov: torch.Tensor, w2: torch.Tensor, keep: int, damping: float, step: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Backward OBS elimination on ``J`` (module docstring) with absolute damping λ.

    The current inverse ``Hinv = H_KK⁻¹`` is never formed: it is ``G − V Vᵀ`` on the kept rows
    and columns, with ``G = H⁻¹`` (one inverse) and ``V`` (``D × removed``) the stacked factors of
    the rank-``b`` downdates, ``Hinv_{·J} Lc⁻ᵀ`` with ``Lc Lcᵀ = Hinv_JJ``. A step reads ``V``
    (at most ``D × (D − keep)``) instead of downdating the ``D × D`` inverse in place and compacting
    it.

    Returns the kept indices (unsorted), the removed blocks in order, and the
    predicted increase of ``J`` for each block, ``tr(W'_J Hinv_JJ⁻¹ W'_Jᵀ)`` (0-d tensors:
    the loop never waits for the device).
    """
    width = cov.shape[0]
    g, _ = _spd_inverse(cov, damping)  # G = H⁻¹ (symmetric: its rows are its columns)
    # Row layout throughout (every gather and update reads whole rows). Whole greedy at D = 1536,
    # keep 768, 64 steps, 2-core CPU (benchmarks/experiments/mlp_greedy_vs_revision.py): 0.61 s with
    # the in-place D×D downdate (b75edda), 0.42 s without it, the same kept set; the inverse was 0.2 s
    # of it (fp64, an AMD EPYC). In fp32 on a Xeon with AMX (2026-12-02, the synthetic GELU case of
    # docs/measurement-log.md, *A faster MLP greedy*): 77-90 ms before, 51-59 ms with the blocked inverse and the one-solve
    # update (the ranges: the machine's speed over an hour).
    wt = w2.T.contiguous()  # (D, out): row j is W'_{·j}; W' = W2 H_{·K} H_KK⁻¹ = W2 for K = all channels
    diag = torch.diagonal(g).clone()  # diag(Hinv) on the kept channels
    factors = g.new_empty(width - keep, width)  # Vᵀ: Hinv = G − V Vᵀ on K×K
    removed_mask = torch.zeros(width, dtype=torch.bool, device=cov.device)  # channels no longer in K
    done, left = 0, width
    removed: list[torch.Tensor] = []
    increases: list[torch.Tensor] = []
    while left > keep:
        b = min(step, left - keep)
        # single-drop increase of J for every kept channel (one fused pass over wt; index_select below:
        # column gathers by advanced indexing were 3x slower on the CPU)
        score = torch.linalg.vector_norm(wt, dim=1).square_().div_(diag).masked_fill_(removed_mask, float("inf"))
        drop = torch.topk(score, b, largest=False, sorted=False).indices
        f = factors[:done]
        ut = g.index_select(0, drop).addmm_(f.index_select(1, drop).T, f, alpha=-1.0)  # (b, D) Hinv_J·: 0 on removed
        lc, _ = torch.linalg.cholesky_ex(ut.index_select(1, drop))  # Hinv_JJ, a principal block of an SPD inverse
        vt = torch.linalg.solve_triangular(lc, ut, upper=False)  # (b, D) Lc⁻¹ Hinv_J·, the new rows of Vᵀ
        r = torch.linalg.solve_triangular(lc, wt.index_select(0, drop), upper=False)  # (b, out) Lc⁻¹ W'_Jᵀ
        increases.append(r.square().sum())  # ‖W'_J Lc⁻ᵀ‖² = tr(W'_J Hinv_JJ⁻¹ W'_Jᵀ)
        # Group OBS: re-optimise the survivors after removing the whole block,
        # W'ᵀ −= Hinv_·J Hinv_JJ⁻¹ W'_Jᵀ = (Lc⁻¹ Hinv_J·)ᵀ (Lc⁻¹ W'_Jᵀ): one (b × out) solve instead
        # of a (b × D) one (removed rows become 0 to rounding: their score is masked)
        wt.addmm_(vt.T, r, alpha=-1.0)
        factors[done:done + b] = vt
        diag.sub_(vt.square().sum(0))
        removed_mask[drop] = True
        removed.append(drop)
        done += b
        left -= b
    live = ~removed_mask
    return live.nonzero()[:, 0], removed, increases


def select_mlp_channels_by_residual(
    cov: torch.Tensor, w2: torch.Tensor, keep: int, ridge: float, step: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` hidden channels whose removal the ridge compensation recovers worst.

    Backward greedy (OBS) elimination on the ridge objective ``J`` of the module
    docstring, ``step`` channels per iteration (the ``step`` lowest single-drop
    increases, then an exact rank-``step`` re-optimisation with BLAS-3 updates).
    ``step=1`` is the exact greedy.

    Args:
        cov: ``(D, D)`` centred covariance ``Σ`` of the hidden activations (the greedy runs in
            :data:`GREEDY_DTYPE`, in fp64 for ``ridge`` below :data:`GREEDY_FP32_MIN_RIDGE`).
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
    lam = float(damping(ridge, mlp_scale(cov)))
    dtype = GREEDY_DTYPE if ridge >= GREEDY_FP32_MIN_RIDGE else torch.float64
    w2 = w2.detach().to(device=cov.device, dtype=dtype)
    with _ieee_fp32_matmuls():
        alive, removed, _ = _mlp_greedy(cov.to(dtype), w2, keep, lam, step)
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
    gram_q: torch.Tensor, gram_k: torch.Tensor, keep: int, ridge: float, step: int = 1,
    shortlist: Optional[int] = None, shift: float = FACTORED_GRAM_SHIFT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, backward greedy on the exact compensated residual ``R`` (module docstring).

    Each iteration evaluates ``R(S \\ {j})`` for every head and every kept ``j``
    (``H·|S|`` Sylvester systems of size ``|S| − 1`` in one batched solve) and
    drops the ``step`` best candidates of each head (``step=1``: exact greedy;
    larger steps rank the block by single-drop residuals).

    With ``shortlist=K`` only the ``K`` candidates of each head with the smallest factorised
    residual (:func:`factored_residual_scores` of the current pruned set, no eigensolve) are
    evaluated exactly: ``H·K`` Sylvester systems per iteration instead of ``H·|S|``. The dims
    dropped are still the ``step`` best by the exact damped residual, among the shortlist.

    Args:
        gram_q, gram_k: ``(H, d, d)`` uncentred per-head Grams (fp64 used).
        keep: dims kept per head, ``0 < keep ≤ d``.
        ridge: relative damping of :class:`corp.fit.SylvesterLogitFit`.
        step: dims removed per head per iteration (≥ 1).
        shortlist: candidates per head evaluated exactly (None or ≥ ``|S|``: all); ``≥ step``.
        shift: relative Gram shift of the factorised shortlist scores.

    Returns:
        ``(kept, pruned)``: long tensors ``(H, keep)``, ``(H, d − keep)``, sorted per head, on the Grams' device.
    """
    heads, d, _ = gram_q.shape
    if gram_k.shape != gram_q.shape or gram_q.shape[2] != d:
        raise ValueError(f"Grams must both be (H, d, d); got {tuple(gram_q.shape)}, {tuple(gram_k.shape)}")
    if not 0 < keep <= d:
        raise ValueError(f"keep must be in 1..{d}, got {keep}")
    step = max(1, int(step))
    if shortlist is not None and shortlist < step:
        raise ValueError(f"shortlist ({shortlist}) must be at least step ({step})")
    # The greedy runs on the CPU whatever the Grams' device: each iteration eigendecomposes H·|S|
    # (or H·K) matrices of size |S| − 1, and torch.linalg.eigh on CUDA loops over a batch one matrix
    # at a time once n > 32 (pytorch/pytorch#175585), which is slower than the CPU for these sizes.
    home = gram_q.device
    gram_q, gram_k = gram_q.to("cpu", torch.float64), gram_k.to("cpu", torch.float64)
    dev = gram_q.device
    scorer = _FactoredScorer(gram_q, gram_k, shift) if shortlist is not None else None
    kept = torch.arange(d, device=dev).repeat(heads, 1)
    pruned = kept[:, :0]
    head_of = torch.arange(heads, device=dev)
    while kept.shape[1] > keep:
        s = kept.shape[1]
        b = min(step, s - keep)
        if scorer is not None and shortlist < s:
            cand = torch.topk(torch.gather(scorer.scores(pruned), 1, kept), shortlist, dim=1,
                              largest=False).indices  # (H, K) positions in kept
        else:
            cand = torch.arange(s, device=dev).expand(heads, s)
        n = cand.shape[1]
        # candidate c of head h: kept[h] without position cand[h, c] → (H, n, s−1); its pruned set gains it
        others = torch.ones(heads, n, s, dtype=torch.bool, device=dev)
        others.scatter_(2, cand[:, :, None], False)
        cand_kept = kept[:, None, :].expand(heads, n, s)[others].view(heads, n, s - 1)
        cand_pruned = torch.cat([pruned[:, None, :].expand(-1, n, -1), torch.gather(kept, 1, cand)[:, :, None]], dim=2)
        idx = head_of.repeat_interleave(n)
        res = qk_residual(gram_q[idx], gram_k[idx], cand_kept.reshape(heads * n, s - 1),
                          cand_pruned.reshape(heads * n, -1), ridge).view(heads, n)
        drop = torch.gather(cand, 1, torch.topk(res, b, dim=1, largest=False).indices)  # (H, b) positions in kept
        stay = torch.ones(heads, s, dtype=torch.bool, device=dev)
        stay.scatter_(1, drop, False)
        pruned = torch.cat([pruned, torch.gather(kept, 1, drop)], dim=1)
        kept = kept[stay].view(heads, s - b)
    return torch.sort(kept, dim=1).values.to(home), torch.sort(pruned, dim=1).values.to(home)


def _diag_mean(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)


def select_qk_dims_by_factored_residual(
    gram_q: torch.Tensor, gram_k: torch.Tensor, keep: int, shift: float = FACTORED_GRAM_SHIFT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, exact backward greedy on the factorised logit residual, with no eigensolve.

    For the unregularised logit fit the normal equation ``GQ_SS M GK_SS = GQ_SP GK_PS`` is solved
    by ``M = B_qᵀ B_k`` with ``B_q = GQ_PS GQ_SS⁻¹``, ``B_k = GK_PS GK_SS⁻¹``: the compensated
    logit is the product of two least-squares predictions of the pruned q and k dims. With the
    Schur complements ``C_q = GQ_PP − GQ_PS GQ_SS⁻¹ GQ_SP = [(GQ⁻¹)_PP]⁻¹`` (and ``C_k``), the
    residual (module docstring) becomes

        R(P) = tr(GQ_PP GK_PP) − tr((GQ_PP − C_q)(GK_PP − C_k))
             = tr(GQ_PP C_k) + tr(C_q GK_PP) − tr(C_q C_k).

    ``(GQ⁻¹)_PP`` is a principal block of ONE inverse per head, so moving dim j from S to P
    borders it by a row and a column: with ``A = C_q``, ``h = (GQ⁻¹)_{P j}``, ``u = A h``,
    ``σ = (GQ⁻¹)_jj − hᵀu``, the new ``C_q = [[A + uuᵀ/σ, −u/σ], [−uᵀ/σ, 1/σ]]`` (the same for
    k with ``v``, ``τ``), and every candidate of every head is scored from the current ``C_q``,
    ``C_k`` by batched products, ``O(|P|²·d)`` per head and step:

        R(P ∪ {j}) = tr(GQ_PP C_k) + (vᵀGQ_PP v − 2 GQ_{Pj}ᵀv + GQ_jj)/τ
                   + tr(C_q GK_PP) + (uᵀGK_PP u − 2 GK_{Pj}ᵀu + GK_jj)/σ
                   − tr(C_q C_k) − vᵀC_q v/τ − uᵀC_k u/σ − (uᵀv + 1)²/(στ).

    The Grams are shifted by ``shift · mean(diag G)`` (tiny by default) so that they are
    invertible; the residual is then exact for the shifted Grams (tests check it against the
    Sylvester residual and exhaustive search). Runs on the Grams' device, one host sync in all.

    Args:
        gram_q, gram_k: ``(H, d, d)`` per-head Grams (keys centred per image where the fit centres them).
        keep: dims kept per head, ``0 < keep ≤ d``.
        shift: relative diagonal shift of both Grams.

    Returns:
        ``(kept, pruned)``: long tensors ``(H, keep)``, ``(H, d − keep)``, sorted per head.
    """
    heads, d, _ = gram_q.shape
    if gram_k.shape != gram_q.shape or gram_q.shape[2] != d:
        raise ValueError(f"Grams must both be (H, d, d); got {tuple(gram_q.shape)}, {tuple(gram_k.shape)}")
    if not 0 < keep <= d:
        raise ValueError(f"keep must be in 1..{d}, got {keep}")
    dev = gram_q.device
    grams, inv = _shifted_grams_and_inverses(gram_q, gram_k, shift)
    schur = grams.new_zeros(2, heads, 0, 0)  # (C_q, C_k) for the current P
    pruned = torch.zeros(heads, 0, dtype=torch.long, device=dev)
    taken = torch.zeros(heads, d, dtype=torch.bool, device=dev)
    rows = torch.arange(heads, device=dev)
    for _ in range(d - keep):
        p = pruned.shape[1]
        score, uv, sigma = _factored_scores(grams, inv, schur, pruned)
        j = score.masked_fill(taken, float("inf")).argmin(1)  # (H,)
        u_j = torch.gather(uv, 3, j[None, :, None, None].expand(2, heads, p, 1))[..., 0]  # (2, H, p)
        s_j = sigma[:, rows, j]  # (2, H)
        top = schur + u_j[..., :, None] * u_j[..., None, :] / s_j[..., None, None]
        side = -u_j / s_j[..., None]
        schur = torch.cat([torch.cat([top, side[..., :, None]], 3),
                           torch.cat([side[..., None, :], (1 / s_j)[..., None, None]], 3)], 2)
        pruned = torch.cat([pruned, j[:, None]], 1)
        taken[rows, j] = True
    kept = torch.arange(d, device=dev).expand(heads, d)[~taken].view(heads, keep)
    return kept, torch.sort(pruned, dim=1).values


def _shifted_grams_and_inverses(gram_q, gram_k, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2, H, d, d)`` stacks of the shifted Grams (q, k) and of their inverses (fp64)."""
    heads, d, _ = gram_q.shape
    dev = gram_q.device
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    grams = torch.stack([g.to(torch.float64) for g in (gram_q, gram_k)])
    grams = grams + shift * _diag_mean(grams)[..., None, None] * eye
    factor, _, ok = cholesky_with_retries(grams.flatten(0, 1), torch.zeros(2 * heads, dtype=torch.float64, device=dev))
    if not bool(ok.all()):
        raise FloatingPointError("query/key Grams could not be factored even with increased damping")
    return grams, torch.cholesky_inverse(factor).view(2, heads, d, d)


def _factored_scores(grams, inv, schur, pruned) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``R(P ∪ {j})`` for every head and every dim j ``(H, d)`` (meaningless for j ∈ P), from the
    Schur complements ``schur = (C_q, C_k)`` ``(2, H, p, p)`` of the current ``P`` ``(H, p)``;
    also ``(u, v)`` ``(2, H, p, d)`` and ``(σ, τ)`` ``(2, H, d)`` for the bordering update."""
    _, heads, d, _ = grams.shape
    p = pruned.shape[1]
    idx = pruned[None, :, :, None].expand(2, heads, p, d)
    inv_p = torch.gather(inv, 2, idx)  # (2, H, p, d): (G⁻¹)_{P, all}
    gram_p = torch.gather(grams, 2, idx)  # G_{P, all}
    gram_pp = torch.gather(gram_p, 3, pruned[None, :, None, :].expand(2, heads, p, p))
    uv = schur @ inv_p  # u (q) and v (k) for every candidate
    sigma = torch.diagonal(inv, dim1=-2, dim2=-1) - (inv_p * uv).sum(2)  # σ, τ
    # each side's vector meets the OTHER side's matrices: uᵀGK_PP u, vᵀGQ_PP v, GK_{Pj}ᵀu, ...
    quad_g = (uv * (gram_pp.flip(0) @ uv)).sum(2)
    cross_g = (gram_p.flip(0) * uv).sum(2)
    quad_c = (uv * (schur.flip(0) @ uv)).sum(2)
    dot = (uv[0] * uv[1]).sum(1)  # uᵀv
    base = (gram_pp[0] * schur[1]).sum((1, 2)) + (schur[0] * gram_pp[1]).sum((1, 2)) \
        - (schur[0] * schur[1]).sum((1, 2))
    gain = (quad_g - 2 * cross_g + torch.diagonal(grams, dim1=-2, dim2=-1).flip(0) - quad_c) / sigma
    return base[:, None] + gain.sum(0) - (dot + 1) ** 2 / (sigma[0] * sigma[1]), uv, sigma


class _FactoredScorer:
    """``R(P ∪ {j})`` of the factorised residual for any pruned set ``P``, from one shifted Gram
    inverse per head and side (formed once): the Schur complements ``C = [(G⁻¹)_PP]⁻¹`` directly."""

    def __init__(self, gram_q: torch.Tensor, gram_k: torch.Tensor, shift: float):
        self.grams, self.inv = _shifted_grams_and_inverses(gram_q, gram_k, shift)

    def scores(self, pruned: torch.Tensor) -> torch.Tensor:
        """``(H, d)`` scores for the pruned set ``(H, p)`` (meaningless for ``j ∈ P``)."""
        heads, p = pruned.shape
        idx = pruned[None, :, :, None].expand(2, heads, p, self.grams.shape[-1])
        inv_pp = torch.gather(torch.gather(self.inv, 2, idx), 3, pruned[None, :, None, :].expand(2, heads, p, p))
        schur = torch.linalg.inv(inv_pp) if p else inv_pp
        return _factored_scores(self.grams, self.inv, schur, pruned)[0]


def factored_residual_scores(gram_q: torch.Tensor, gram_k: torch.Tensor, pruned: torch.Tensor,
                             shift: float = FACTORED_GRAM_SHIFT) -> torch.Tensor:
    """``R(P ∪ {j})`` ``(H, d)`` of :func:`select_qk_dims_by_factored_residual` for a given pruned set
    ``P`` ``(H, p)`` (its Schur complements formed directly, not by bordering)."""
    return _FactoredScorer(gram_q, gram_k, shift).scores(pruned)


# ---------------------------------------------------------------------------
# Energy (the paper)
# ---------------------------------------------------------------------------


def _split_top(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(score, descending=True, stable=True)
    return torch.sort(order[:keep]).values, torch.sort(order[keep:]).values


def select_mlp_channels(weights: MlpWeights, second_moment: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank hidden channels by ``E[h_j²]·‖W_in[j,:]‖·‖W_out[:,j]‖`` ``(D_h,)``; keep the top ``keep``
    (gated MLPs: ``‖W_in[j,:]‖`` is ``‖W_gate[j,:]‖·‖W_up[j,:]‖``, :meth:`MlpWeights.input_row_norms`).

    Returns sorted index tensors ``(kept (keep,), pruned (D_h − keep,))``.
    """
    score = second_moment.to(weights.w_in.device) * weights.input_row_norms() * weights.w_out.norm(dim=0)
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


# Candidates per head that the q/k greedy evaluates exactly, as a multiple of the dims it drops per
# iteration, and at least QK_SHORTLIST_MIN (the rest are ranked out by the factorised residual).
# Measured by benchmarks/accuracy_ablation.py (method="corp", this machine's digits models, top-1 on
# 450 test images at 50/75/90% and the 50% budget): every candidate A 97.11/97.11/88.89/97.11,
# B 98.22/98.22/96.67/97.78; max(8, 2·step) A 97.11/97.11/88.67/97.11, B the same as every candidate
# (one test image at A 90%); max(4, 1·step) lost 29 test images at A 90% (82.44). On deit_small
# (64 heads' candidates per iteration, step 4) 8 of 64 cuts the eigensolves 8x.
QK_SHORTLIST_STEPS = 2
QK_SHORTLIST_MIN = 8


def qk_shortlist(step: int) -> int:
    """Shortlist of :func:`select_qk_dims_by_residual` for ``step`` dims per iteration."""
    return max(QK_SHORTLIST_MIN, QK_SHORTLIST_STEPS * step)


class EnergySelection:
    """The paper's selection: activation energy times weight norms (MLP), ``Σ q_j² k_j²`` (q/k)."""

    needs_covariance = False  # MLP energy needs only Σ h² (no Gram) when nothing is compensated

    def select_mlp(self, stats: MLPStatistics, weights: MlpWeights, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_mlp_channels(weights, stats.second_moment_diag(), keep)

    def select_qk(self, stats: AttentionStatistics, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_qk_dims(stats.score, keep)


class ResidualSelection:
    """Backward greedy on what the compensation leaves (module docstring); ``ridge``/``attn_ridge``
    as the fits'. q/k dims by the exact damped residual of the Sylvester fit
    (:func:`select_qk_dims_by_residual`: batched eigensolves on the CPU, ``qk_selection_step``
    dims per iteration, evaluated for the :func:`qk_shortlist` candidates of each head that the
    factorised residual ranks best)."""

    needs_covariance = True

    def __init__(self, ridge: float, attn_ridge: float):
        self.ridge, self.attn_ridge = ridge, attn_ridge

    def select_mlp(self, stats: MLPStatistics, weights: MlpWeights, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, cov = stats.mean_and_covariance()
        return select_mlp_channels_by_residual(cov, weights.w_out.to(cov), keep, self.ridge)

    def select_qk(self, stats: AttentionStatistics, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = qk_selection_step(stats.head_dim, keep)
        return select_qk_dims_by_residual(stats.gram_q, stats.key_gram(), keep, self.attn_ridge,
                                          step=step, shortlist=qk_shortlist(step))


class FactoredResidualSelection(ResidualSelection):
    """:class:`ResidualSelection` with q/k dims by the factorised residual
    (:func:`select_qk_dims_by_factored_residual`: exact greedy, no eigensolve, on the statistics'
    device) of Grams shifted by ``shift`` (relative)."""

    def __init__(self, ridge: float, attn_ridge: float, shift: float = FACTORED_GRAM_SHIFT):
        super().__init__(ridge, attn_ridge)
        self.shift = shift

    def select_qk(self, stats: AttentionStatistics, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_qk_dims_by_factored_residual(stats.gram_q, stats.key_gram(), keep, self.shift)
