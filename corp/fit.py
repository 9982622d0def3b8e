"""Closed-form fits: what the kept channels / dims must absorb (CORP.md), one class per variant.

MLP fits (:class:`MlpFit` result: an affine prediction of some hidden channels
from the kept ones, folded into the output projection by :mod:`corp.fold`):

* :class:`MlpRidgeFit` (paper): ``h_P ≈ B h_S + c``, ``B = Σ_PS (Σ_SS + λI)⁻¹``,
  ``c = μ_P − B μ_S``.
* :class:`MlpErrorCorrectingFit` (``target="dense"``): every dense channel from
  the pruned stream's kept ones, ``h ≈ C ĥ_S + c`` with
  ``C = [Cov(h, ĥ)[:, S] + λ E_S] (Σ̂_SS + λI)⁻¹`` (shrunk towards the identity on
  S), ``c = μ_h − C μ̂_S``; with identical streams it is the paper's fit exactly.

Logit fits (result ``M`` ``(H, s, s)``, folded as ``A = I + M`` into W_K):

* :class:`SylvesterLogitFit` (``logit_fit="pooled"``, paper, and ``"centred"``):
  ``GQ_SS M GK_SS + λM = GQ_SP GK_PS``, the key Gram centred per image for
  ``"centred"`` (the statistic :meth:`corp.stats.AttentionStatistics.key_gram`
  returns). Centring: softmax ignores a constant added to one query's row of
  logits and a query only meets keys of its own image, so with
  ``k̃_j = k_j − k̄_b`` the error softmax sees is
  ``Σ_b Σ_{i,j∈b} (q_P,iᵀ k̃_P,j − q_S,iᵀ M k̃_S,j)² + λ‖M‖²``  (*); pooling every
  query against every centred key gives the paper's equation with
  ``GK̃ = GK − Σ_b s_b s_bᵀ / T_b``, a one-pass surrogate of (*).
* :class:`PerImageLogitFit` (``"per_image"``): the exact objective (*), whose
  normal equation ``Σ_b GQ_b,SS M GK̃_b,SS + λM = Σ_b GQ_b,SP GK̃_b,PS`` is an
  s² × s² SPD system per head (a sum of Kronecker products has no two-eigenbasis
  form), accumulated in a second pass over the qkv projection once S is known
  (:class:`PerImageLogitSystem`) and solved by Cholesky.
* :class:`ErrorCorrectingLogitFit` (``target="dense"``): ``q̂_Sᵀ(I + M)k̂_S`` of
  the pruned stream fitted to the dense ``qᵀk``:
  ``GQ̂_SS M GK̂_SS + λM = XQ[S, :] XK[:, S] − GQ̂_SS GK̂_SS`` with ``XQ = Σ q̂ qᵀ``,
  ``XK = Σ k k̂ᵀ``; with identical streams the right side is ``GQ_SP GK_PS``.
* :class:`LowRankLogitFit` (``logit_solve="lowrank"``): no dims are selected; each
  head's q/k become ``q' = A q``, ``k' = C k`` with ``A, C`` ``(s, d)`` chosen so that
  ``AᵀC`` is the best rank-``s`` bilinear form on the same pooled (or centred)
  objective, ``min tr((I − N)ᵀ GQ (I − N) GK)`` over rank-``s`` ``N``: with
  ``GQ = L_q L_qᵀ``, ``GK = L_k L_kᵀ`` it is ``‖L_qᵀ(I − N)L_k‖²_F``, minimised by the
  truncated SVD of ``L_qᵀ L_k`` (Eckart–Young). A selected set with its
  compensation ``q_Sᵀ(I + M)k_S`` is one rank-``s`` ``N`` among these, so this fit's
  calibration residual is never larger than any selection's.

Damping, the one rule (:func:`damping`): λ = ``ridge`` × a scale of the system,
``mean(diag Σ_SS)`` for the MLP (:func:`mlp_scale`) and
``mean(diag GQ_SS) · mean(diag GK_SS)`` for attention (:func:`logit_scale`),
never below the smallest positive float (``ridge → 0`` is then the unregularised
fit where the Grams have full rank). The per-image system uses its own mean
diagonal (:meth:`PerImageLogitSystem.system_scale`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .ops import REFERENCE, Kernels
from .reference import cholesky_with_retries
from .stats import AttentionOutputStatistics, AttentionStatistics, MLPStatistics, qk_heads

__all__ = [
    "AttentionOutputFit",
    "gcv_scores",
    "OutputProjectionFit",
    "MlpFit",
    "MlpRidgeFit",
    "MlpErrorCorrectingFit",
    "SylvesterLogitFit",
    "PerImageLogitFit",
    "ErrorCorrectingLogitFit",
    "FactoredLogitFit",
    "LowRankLogitFit",
    "QKProjection",
    "PerImageLogitSystem",
    "FitContext",
    "damping",
    "mlp_scale",
    "logit_scale",
    "sub_blocks",
    "sylvester_solve",
]


# --------------------------------------------------------------------------- shared algebra


def damping(ridge: float, scale: torch.Tensor) -> torch.Tensor:
    """λ = ``ridge · scale``, at least the smallest positive float of its dtype."""
    return (ridge * scale).clamp_min(torch.finfo(scale.dtype).tiny)


def mlp_scale(cov: torch.Tensor) -> torch.Tensor:
    """``mean(diag Σ)`` of a covariance ``(n, n)``: the MLP damping scale (a 0-d tensor)."""
    return torch.diagonal(cov).mean().clamp_min(torch.finfo(cov.dtype).tiny)


def logit_scale(q_ss: torch.Tensor, k_ss: torch.Tensor) -> torch.Tensor:
    """``mean(diag GQ_SS) · mean(diag GK_SS)`` per head ``(H,)`` for Grams ``(H, s, s)``:
    the mean diagonal of the system matrix ``GK_SS ⊗ GQ_SS``."""
    return torch.diagonal(q_ss, dim1=1, dim2=2).mean(1) * torch.diagonal(k_ss, dim1=1, dim2=2).mean(1)


def sub_blocks(g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Batched sub-blocks ``g[b][rows[b]][:, cols[b]]``: g ``(B, d, d)``, rows ``(B, r)``, cols ``(B, c)`` → ``(B, r, c)``."""
    return torch.gather(torch.gather(g, 1, rows[:, :, None].expand(-1, -1, g.shape[2])), 2,
                        cols[:, None, :].expand(-1, rows.shape[1], -1))


def sylvester_solve(gram_q: torch.Tensor, gram_k: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """Solve ``GQ · M · GK + λ M = C`` for M, batched, in O(s³) per system.

    With ``GQ = U_q diag(a) U_qᵀ`` and ``GK = U_k diag(b) U_kᵀ``:
    ``M = U_q [(U_qᵀ C U_k) / (a_i b_j + λ)] U_kᵀ``. Symmetric PSD GQ, GK and
    λ > 0 make every denominator positive. This exact eigen form is used with
    every backend: the Cholesky op cannot replace it without changing the
    estimator (factoring both Grams solves ``(GQ + αI) M (GK + βI) = C``, another
    regulariser) or without the O(s⁶) Kronecker system
    (benchmarks/sylvester_choice.py).

    Args:
        gram_q, gram_k: ``(b, s, s)`` symmetric PSD; rhs: ``(b, s, s)`` C; damping: ``(b,)`` λ > 0.

    Returns:
        ``(b, s, s)`` M.
    """
    eig_q, vec_q = torch.linalg.eigh(gram_q)
    eig_k, vec_k = torch.linalg.eigh(gram_k)
    # Round-off can leave tiny negative eigenvalues of a PSD Gram; they are zero.
    eig_q, eig_k = eig_q.clamp_min(0), eig_k.clamp_min(0)
    rotated = vec_q.transpose(-1, -2) @ rhs @ vec_k
    denom = eig_q[..., :, None] * eig_k[..., None, :] + damping[..., None, None]
    return vec_q @ (rotated / denom) @ vec_k.transpose(-1, -2)


@dataclass
class FitContext:
    """What a fit may need besides the statistics: the run's kernels, the ranks, and (for fits
    that take a second pass) the block's qkv projections over the current stream."""

    kernels: Kernels
    dp: object = None  # corp.distributed.DataParallel
    qkv_batches: Optional[Callable[[], Iterable[torch.Tensor]]] = None
    # (dense attention module, pruned one[, q/k maps of corp.fold.qk_maps]) → per batch the two modules'
    # head outputs (o, z), (B, T, A)
    attention_outputs: Optional[Callable[..., Iterable[tuple[torch.Tensor, torch.Tensor]]]] = None
    block_index: Optional[int] = None  # for error messages


# --------------------------------------------------------------------------- MLP


@dataclass
class MlpFit:
    """Hidden channels ``rows`` predicted as ``coef @ h_S + intercept`` from the kept channels S.

    ``coef``: ``(|rows|, |S|)``, ``intercept``: ``(|rows|,)`` (fp64). ``rows`` is the
    pruned set P (the paper) or every channel (error-correcting fits, whose
    prediction replaces the kept channels too). ``damping``: the λ used;
    ``relative_damping``: λ over its scale.
    """

    rows: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    damping: float
    relative_damping: float


def _solve_one(kernels: Kernels, matrix: torch.Tensor, rhs: torch.Tensor, lam: torch.Tensor, what: str):
    sol = kernels.ridge_solve(matrix[None], rhs[None], lam.reshape(1))
    if not bool(sol.ok[0]):
        raise FloatingPointError(f"{what} could not be factored even with increased damping")
    return sol.solution[0], float(sol.damping[0])


class MlpRidgeFit:
    """The paper's MLP fit: ``h_P ≈ B h_S + c`` by ridge regression (module docstring)."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: MLPStatistics, kept: torch.Tensor, pruned: torch.Tensor, ctx: FitContext) -> MlpFit:
        mean, cov = stats.mean_and_covariance()
        cov_ss = cov[kept[:, None], kept]  # one gather each: no |S| × D_h intermediate
        scale = mlp_scale(cov_ss)
        sol, lam = _solve_one(ctx.kernels, cov_ss, cov[kept[:, None], pruned], damping(self.ridge, scale),
                              "MLP ridge system")
        coef = sol.T  # (|P|, |S|): Bᵀ solves (Σ_SS + λI) Bᵀ = Σ_SP
        return MlpFit(pruned, coef, mean[pruned] - coef @ mean[kept], lam, lam / float(scale))


class MlpErrorCorrectingFit:
    """Every dense channel from the pruned stream's kept channels (module docstring); needs
    :class:`~corp.stats.MLPStatistics` with ``cross=True``."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: MLPStatistics, kept: torch.Tensor, pruned: torch.Tensor, ctx: FitContext) -> MlpFit:
        mean_hat, cov_hat = stats.mean_and_covariance()
        mean_dense, cross_cov = stats.dense_mean_and_cross_covariance()
        cov_ss = cov_hat[kept[:, None], kept]
        scale = mlp_scale(cov_ss)
        lam = damping(self.ridge, scale)
        diag = (kept, torch.arange(kept.numel(), device=kept.device))
        target = cross_cov[:, kept].clone()  # (D, |S|)
        target[diag] += lam
        # (Σ̂_SS + λI) Cᵀ = targetᵀ
        sol, used = _solve_one(ctx.kernels, cov_ss, target.T.contiguous(), lam, "error-correcting MLP system")
        if used != float(lam):  # the solver raised the damping: keep the identity shrinkage consistent
            target[diag] += used - float(lam)
            sol, used = _solve_one(ctx.kernels, cov_ss, target.T.contiguous(), torch.tensor(used, dtype=lam.dtype,
                                   device=lam.device), "error-correcting MLP system")
        coef = sol.T  # (D, |S|)
        rows = torch.arange(coef.shape[0], device=coef.device)
        return MlpFit(rows, coef, mean_dense - coef @ mean_hat[kept], used, used / float(scale))


# --------------------------------------------------------------------------- attention output


@dataclass
class OutputProjectionFit:
    """A refitted output projection: ``weight`` ``(D, A)``, ``bias`` ``(D,)`` or None (fp64), the λ used."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    damping: float
    relative_damping: float


# The output fit's damping grid, relative to mean(diag Σ_zz): from the config's ridge up by
# quarter decades to 10⁵ × it. Generalised cross-validation picks from it (gcv_scores).
OUTPUT_FIT_GRID_DECADES = 5
OUTPUT_FIT_GRID_PER_DECADE = 4


def gcv_scores(s_zz: torch.Tensor, s_zy: torch.Tensor, trace_yy: torch.Tensor, count: int, intercept: bool,
               candidates: torch.Tensor) -> torch.Tensor:
    """Generalised cross-validation scores ``(G,)`` of the multi-output ridge regression
    ``y ≈ Δ z (+ c)`` at each damping of ``candidates`` ``(G,)``, from its second moments.

    With ``Σ_zz = U diag(s) Uᵀ`` ``(A, A)`` (per token; centred when there is an intercept) and
    ``C = Uᵀ Σ_zy`` (``Σ_zy`` ``(A, D)``), the per-token residual is
    ``RSS(λ)/n = tr Σ_yy − Σ_i ‖C_i‖² (s_i + 2λ)/(s_i + λ)²`` and the degrees of freedom
    ``df(λ) = Σ_i s_i/(s_i + λ)`` (+1 for the intercept); ``GCV(λ) = (RSS/n) / (1 − df/n)²``
    (Golub, Heath and Wahba 1979), the rotation-invariant leave-one-out error of a ridge fit.
    """
    s, u = torch.linalg.eigh(s_zz)
    s = s.clamp_min(0.0)
    c2 = (u.T @ s_zy).square().sum(1)  # (A,)
    lam = candidates[:, None]
    rss = trace_yy - (c2 * (s + 2 * lam) / (s + lam).square()).sum(1)
    df = (s / (s + lam)).sum(1) + (1.0 if intercept else 0.0)
    left = (1.0 - df / count).clamp_min(torch.finfo(s.dtype).tiny)
    return rss.clamp_min(0.0) / left.square()


class AttentionOutputFit:
    """The output projection refitted so that the pruned attention reproduces the dense one's output.

    After the q/k dims are pruned (and the logits compensated), the attention probabilities change,
    so the heads' outputs ``z`` of the pruned attention differ from the dense ones ``o`` on the same
    block input. With the dense projection ``W`` ``(D, A)``, ``b``, the new projection minimises

        E‖W o + b − W' z − b'‖² + λ‖W' − W‖²_F,

    shrunk towards ``W`` (λ → ∞ gives back the dense projection). With the centred statistics
    ``Σ_zz``, ``Σ_zo`` and means ``μ_o``, ``μ_z``:

        (Σ_zz + λI) W'ᵀ = Σ_zo Wᵀ + λWᵀ,    b' = b + W μ_o − W' μ_z,

    one ridge solve (``corp::ridge_solve``). ``W' = W + Δ`` is the ridge regression of
    ``y = W (o − z)`` on ``z``, so λ is chosen by generalised cross-validation (:func:`gcv_scores`)
    among ``ridge · mean(diag Σ_zz) · 10^(k/4)``, k = 0 … 20. With few calibration tokens per input
    dim a fixed λ lowers the calibration error and raises the held-out one (tests/test_timm_families.py's
    random eva02 at 50/50, 816 tokens for A = 48: held-out feature error 0.2303 with λ at the ridge,
    0.2275 with GCV's, 0.2273 without the output fit, 0.2298 uncompensated). Tokens of one image are
    not independent, so the token count overstates the sample size and GCV errs towards less damping.
    Without a bias the intercept is dropped and the uncentred moments replace the centred ones.
    """

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionOutputStatistics, weight: torch.Tensor, bias: Optional[torch.Tensor],
            ctx: FitContext) -> OutputProjectionFit:
        """``weight`` ``(D, A)``, ``bias`` ``(D,)`` or None: the dense projection (fp64)."""
        mean, cov = stats.mean_and_covariance()
        a = stats.width
        if bias is None:
            cov = cov + torch.outer(mean, mean)  # uncentred second moments: no intercept to absorb means
        s_zz, s_zo = cov[a:, a:].contiguous(), cov[a:, :a]
        scale = mlp_scale(s_zz)
        w_t = weight.T.to(cov)
        zo_w = s_zo @ w_t
        s_zy = zo_w - s_zz @ w_t  # Cov(z, y), y = W (o − z)
        s_yy = cov[:a, :a] - cov[:a, a:] - cov[a:, :a] + s_zz
        trace_yy = torch.einsum("ia,ab,ib->", weight.to(cov), s_yy, weight.to(cov))
        steps = OUTPUT_FIT_GRID_DECADES * OUTPUT_FIT_GRID_PER_DECADE
        grid = damping(self.ridge, scale) * torch.logspace(0, OUTPUT_FIT_GRID_DECADES, steps + 1, dtype=cov.dtype,
                                                           device=cov.device)
        lam = grid[int(torch.argmin(gcv_scores(s_zz, s_zy, trace_yy, stats.count, bias is not None, grid)))]
        sol, used = _solve_one(ctx.kernels, s_zz, zo_w + lam * w_t, lam, "attention output system")
        if used != float(lam):  # the solver raised the damping: shrink towards W with the λ it used
            lam = torch.tensor(used, dtype=cov.dtype, device=cov.device)
            sol, used = _solve_one(ctx.kernels, s_zz, zo_w + lam * w_t, lam, "attention output system")
        new_weight = sol.T
        new_bias = None
        if bias is not None:
            new_bias = bias.to(cov) + weight.to(cov) @ mean[:a] - new_weight @ mean[a:]
        return OutputProjectionFit(new_weight, new_bias, used, used / float(scale))


# --------------------------------------------------------------------------- logits


class SylvesterLogitFit:
    """``GQ_SS M GK_SS + λM = GQ_SP GK_PS`` per head, on the statistics' key Gram
    (uncentred: the paper's pooled fit; centred per image: ``"centred"``)."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``M`` ``(H, s, s)`` and ``λ`` ``(H,)``."""
        gram_q, gram_k = stats.gram_q, stats.key_gram()
        q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
        rhs = sub_blocks(gram_q, kept, pruned) @ sub_blocks(gram_k, pruned, kept)
        lam = damping(self.ridge, logit_scale(q_ss, k_ss))
        return sylvester_solve(q_ss, k_ss, rhs, lam), lam


class FactoredLogitFit:
    """The logit fit as two ridge regressions (``logit_solve="factored"``): the unregularised
    normal equation ``GQ_SS M GK_SS = GQ_SP GK_PS`` is solved by ``M = B_qᵀ B_k`` with
    ``B_qᵀ = GQ_SS⁻¹ GQ_SP`` and ``B_kᵀ = GK_SS⁻¹ GK_SP`` (the least-squares predictions of the
    pruned q and k dims from the kept ones). Here each side is damped,
    ``(GQ_SS + αI) B_qᵀ = GQ_SP``, ``α = ridge · mean(diag GQ_SS)`` (β likewise), and the two
    are one batched Cholesky ridge solve over heads (``corp::ridge_solve``). Keys as the
    statistics' key Gram (centred per image for ``"centred"``)."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        grams = torch.cat([stats.gram_q, stats.key_gram()])  # (2H, d, d): q heads, then k heads
        both_kept, both_pruned = torch.cat([kept, kept]), torch.cat([pruned, pruned])
        ss = sub_blocks(grams, both_kept, both_kept)
        lam = damping(self.ridge, torch.diagonal(ss, dim1=1, dim2=2).mean(1))
        sol = ctx.kernels.ridge_solve(ss, sub_blocks(grams, both_kept, both_pruned), lam)
        if not bool(sol.ok.all()):
            raise FloatingPointError("query/key ridge systems could not be factored even with increased damping")
        heads = kept.shape[0]
        b_q_t, b_k_t = sol.solution[:heads], sol.solution[heads:]  # (H, s, p): B_qᵀ, B_kᵀ
        return b_q_t @ b_k_t.transpose(1, 2), sol.damping[:heads] * sol.damping[heads:]


@dataclass
class QKProjection:
    """Each head's new queries and keys as linear maps of its dense ones: ``q' = a q``, ``k' = c k``;
    ``a``, ``c`` ``(H, s, d)`` fp64 (the logit ``q'ᵀk' = qᵀ aᵀc k``)."""

    a: torch.Tensor
    c: torch.Tensor


class LowRankLogitFit:
    """``logit_solve="lowrank"``: the best rank-``s`` logit form of each head (module docstring),
    no dim selection. Both Grams are shifted by ``ridge · mean(diag G)`` (each side) before
    their Cholesky factors are taken, which keeps ``L⁻¹`` defined on rank-deficient statistics
    and shrinks the fit towards the dense form in directions the calibration never excited.

    :meth:`fit` returns a :class:`QKProjection` (the selection's ``kept`` only sets ``s``) and
    the damping ``α_q·α_k`` per head; :func:`corp.fold.fold_attention` writes it into the q/k projection."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[QKProjection, torch.Tensor]:
        heads, s = kept.shape
        grams = torch.cat([stats.gram_q, stats.key_gram()]).to(torch.float64)  # (2H, d, d)
        grams = 0.5 * (grams + grams.transpose(1, 2))
        lam = damping(self.ridge, torch.diagonal(grams, dim1=1, dim2=2).mean(1))
        factor, used, ok = cholesky_with_retries(grams, lam)
        if not bool(ok.all()):
            raise FloatingPointError("query/key Grams could not be factored even with increased damping")
        l_q, l_k = factor[:heads], factor[heads:]
        u, sv, vh = torch.linalg.svd(l_q.transpose(1, 2) @ l_k)  # (H, d, d) each
        root = sv[:, :s].sqrt()[:, None, :]  # split σ evenly between the two sides (conditioning)
        # aᵀ = L_q⁻ᵀ U_s Σ_s^½, cᵀ = L_k⁻ᵀ V_s Σ_s^½: aᵀc = L_q⁻ᵀ (U_s Σ_s V_sᵀ) L_k⁻¹
        a_t = torch.linalg.solve_triangular(l_q.transpose(1, 2), u[:, :, :s] * root, upper=True)
        c_t = torch.linalg.solve_triangular(l_k.transpose(1, 2), vh[:, :s, :].transpose(1, 2) * root, upper=True)
        return QKProjection(a_t.transpose(1, 2), c_t.transpose(1, 2)), used[:heads] * used[heads:]


class ErrorCorrectingLogitFit:
    """The pruned stream's compensated logits fitted to the dense ones (module docstring); needs
    :class:`~corp.stats.AttentionStatistics` with ``cross=True``."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        gram_q, gram_k, cross_q, cross_k = stats.gram_q, stats.key_gram(), stats.cross_q, stats.cross_k
        q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
        rows_q = torch.gather(cross_q, 1, kept[:, :, None].expand(-1, -1, cross_q.shape[2]))  # (H, s, d)
        cols_k = torch.gather(cross_k, 2, kept[:, None, :].expand(-1, cross_k.shape[1], -1))  # (H, d, s)
        rhs = rows_q @ cols_k - q_ss @ k_ss
        lam = damping(self.ridge, logit_scale(q_ss, k_ss))
        return sylvester_solve(q_ss, k_ss, rhs, lam), lam


class PerImageLogitFit:
    """The exact within-image objective (*): a second pass over the qkv projection, then an
    s² × s² Cholesky solve per head (:class:`PerImageLogitSystem`)."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    def fit(self, stats: AttentionStatistics, kept: torch.Tensor, pruned: torch.Tensor,
            ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        system = PerImageLogitSystem(kept, pruned, stats.num_heads, stats.head_dim, kept.device)
        for qkv in ctx.qkv_batches():
            system.update(qkv)
        if ctx.dp is not None:
            ctx.dp.sum_([system.packed, system.rhs])
        return system.solve(self.ridge, system.system_scale(), ctx.kernels)


class PerImageLogitSystem:
    """Accumulates and solves ``Σ_b GQ_b,SS M GK̃_b,SS + λM = Σ_b GQ_b,SP GK̃_b,PS`` per head.

    Per-image Grams of the kept (S) and pruned (P) dims, keys centred per image.
    Both Grams are symmetric, so the system is accumulated as
    ``Σ_b vech(GQ_b,SS) vech(GK̃_b,SS)ᵀ`` over the u = s(s+1)/2 packed entries and
    expanded to the s² × s² matrix (row-major ``vec(M)``: ``Σ_b GQ_b,SS ⊗ GK̃_b,SS``)
    only to solve.

    Cost per head and layer (s kept, p pruned, T tokens): accumulator u² fp64
    (s=32: 2.1 MiB; s=40: 5.1 MiB), while solving the s² × s² system (s=40:
    19.5 MiB) and its factor; flops per image 2·T·s·d (Grams) + 2·u² + 2·s²·p;
    solve s⁶/3 (s=40: 1.4 GFLOP). Every chunk multiplies in fp32 (fp64 stays fp64).

    Args:
        kept: ``(H, s)``; pruned: ``(H, d − s)``; num_heads: H; head_dim: d;
        device: where the fp64 accumulators live.

    Attributes:
        packed: ``(H, u, u)`` fp64; rhs: ``(H, s, s)`` fp64; images: images added.
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
        """Add the images of a qkv chunk ``(B, T, 3·H·d)`` (one image per row of B, all its tokens)."""
        q, k = qk_heads(qkv, self.num_heads, self.head_dim)  # (B, H, T, d)
        b, h, t, d = q.shape
        k = k - k.mean(dim=2, keepdim=True)  # centre explicitly: no GK − s sᵀ/T cancellation
        order = torch.cat([self.kept.to(q.device), self.pruned.to(q.device)], dim=1)[None, :, None, :]
        order = order.expand(b, h, t, d)
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

    def solve(self, ridge: float, scale: torch.Tensor, kernels: Kernels = REFERENCE) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_b GQ_b,SS ⊗ GK̃_b,SS + λI) vec M = vec(rhs)`` by Cholesky, ``λ = damping(ridge, scale)``.

        Returns ``M`` ``(H, s, s)`` and the λ used ``(H,)`` (larger than asked where a
        factorisation failed and was retried with more damping).
        """
        if self.images == 0:
            raise RuntimeError("no images added")
        s = self.keep
        scale = torch.as_tensor(scale, dtype=torch.float64, device=self.device).expand(self.num_heads)
        matrix = self.system_matrix()
        matrix = 0.5 * (matrix + matrix.transpose(-1, -2))
        sol = kernels.ridge_solve(matrix, self.rhs.reshape(self.num_heads, s * s, 1), damping(ridge, scale))
        if not bool(sol.ok.all()):
            raise FloatingPointError("per-image logit system could not be factored even with increased damping")
        return sol.solution.reshape(self.num_heads, s, s), sol.damping
