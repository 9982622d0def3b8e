"""Selection, closed-form compensation and weight folding for one block (CORP.md).

Each function takes a dense module and its calibration statistics and returns
new, smaller modules; the dense module is not modified. All algebra is fp64;
the folded weights are cast back to the dense weights' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp

from .adapters import pruned_attention_like
from .modules import PrunedAttention
from .solve import ridge_solve, sub_blocks, sylvester_solve
from .stats import AttentionStatistics, MLPStatistics

__all__ = [
    "kept_count",
    "select_mlp_channels",
    "select_qk_dims",
    "mlp_compensation",
    "prune_mlp",
    "attention_compensation",
    "mlp_error_correcting_fold",
    "attention_error_correcting_solve",
    "prune_attention",
    "PrunedMLPResult",
    "PrunedAttentionResult",
]


def kept_count(width: int, sparsity: float) -> int:
    """Channels kept when a fraction ``sparsity`` of ``width`` is removed (rounded to nearest)."""
    return width - int(round(sparsity * width))


def select_mlp_channels(mlp: Mlp, second_moment: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank hidden channels by ``E[h_j²]·‖fc1.weight[j,:]‖·‖fc2.weight[:,j]‖``; keep the top ``keep``.

    Returns sorted index tensors ``(kept, pruned)``.
    """
    w1 = mlp.fc1.weight.detach().to(torch.float64)
    w2 = mlp.fc2.weight.detach().to(torch.float64)
    score = second_moment.to(w1.device) * w1.norm(dim=1) * w2.norm(dim=0)
    return _split_top(score, keep)


def select_qk_dims(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, keep the ``keep`` dims with the largest ``Σ q_j² k_j²``. ``score``: ``(H, d)``.

    Returns ``(kept, pruned)`` of shapes ``(H, keep)`` and ``(H, d - keep)``, sorted per head.
    """
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    kept, _ = torch.sort(order[:, :keep], dim=1)
    pruned, _ = torch.sort(order[:, keep:], dim=1)
    return kept, pruned


def _split_top(score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(score, descending=True, stable=True)
    return torch.sort(order[:keep]).values, torch.sort(order[keep:]).values


@dataclass
class PrunedMLPResult:
    fc1: nn.Linear
    fc2: nn.Linear
    kept: torch.Tensor
    damping: float  # absolute λ used (0 without compensation)
    relative_damping: float  # λ / mean(diag Σ_SS)
    plain_fc2: nn.Linear  # fc2 with the same kept channels and no compensation (for error reports)


def mlp_compensation(
    mean: torch.Tensor, cov: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, ridge: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge fit ``h_P ≈ B h_S + c`` from the mean ``(D_h,)`` and covariance ``(D_h, D_h)``.

    ``B = Σ_PS (Σ_SS + λI)⁻¹``, ``c = μ_P − B μ_S``, ``λ = ridge · mean(diag Σ_SS)``.

    Returns ``B`` ``(|P|, |S|)``, ``c`` ``(|P|,)`` and the λ finally used.
    """
    cov_ss = cov[kept[:, None], kept]  # one gather each: no |S| × D_h intermediate
    cov_sp = cov[kept[:, None], pruned]
    scale = torch.diagonal(cov_ss).mean().clamp_min(torch.finfo(cov.dtype).tiny)
    sol = ridge_solve(cov_ss[None], cov_sp[None], (ridge * scale)[None], backend=backend)
    if not bool(sol.ok[0]):
        raise FloatingPointError("MLP ridge system could not be factored even with increased damping")
    coef = sol.solution[0].T  # (|P|, |S|): Bᵀ solves (Σ_SS + λI) Bᵀ = Σ_SP
    intercept = mean[pruned] - coef @ mean[kept]
    return coef, intercept, float(sol.damping[0])


def prune_mlp(
    mlp: Mlp, stats: MLPStatistics, sparsity: float, ridge: float, compensate: bool, backend: str = "torch",
    *, selected: Optional[tuple[torch.Tensor, torch.Tensor]] = None, fold: Optional[Callable] = None,
) -> PrunedMLPResult:
    """New fc1/fc2 for ``mlp`` with a fraction ``sparsity`` of hidden channels removed.

    fc1 loses rows; with compensation, ``W2' = W2[:, S] + W2[:, P] B`` and
    ``b2' = b2 + W2[:, P] c``.

    ``selected``: ``(kept, pruned)`` channel indices chosen elsewhere (default:
    :func:`select_mlp_channels`). ``fold``: ``fold(kept, pruned) -> (W2' (out, |S|),
    b2' (out,) or None, λ, λ relative)`` in fp64, replacing the paper's fold (used by the
    error-correcting fit, :func:`mlp_error_correcting_fold`).
    """
    fc1, fc2 = mlp.fc1, mlp.fc2
    width = fc1.out_features
    keep = kept_count(width, sparsity)
    if selected is None:
        selected = select_mlp_channels(mlp, stats.second_moment_diag(), keep)
    dev = fc1.weight.device
    kept, pruned = selected[0].to(dev), selected[1].to(dev)
    w2 = fc2.weight.detach().to(torch.float64)
    b2 = fc2.bias.detach().to(torch.float64) if fc2.bias is not None else None
    new_w2 = w2[:, kept]
    new_b2 = b2
    damping = rel = 0.0
    if compensate and pruned.numel() and fold is not None:
        new_w2, new_b2, damping, rel = fold(kept, pruned)
    elif compensate and pruned.numel():
        mean, cov = stats.mean_and_covariance()
        mean, cov = mean.to(dev), cov.to(dev)
        coef, intercept, damping = mlp_compensation(mean, cov, kept, pruned, ridge, backend)
        rel = damping / float(torch.diagonal(cov)[kept].mean().clamp_min(1e-300))
        new_w2 = new_w2 + w2[:, pruned] @ coef
        shift = w2[:, pruned] @ intercept
        new_b2 = shift if b2 is None else b2 + shift
    new_fc1 = _linear(fc1.weight[kept], fc1.bias[kept] if fc1.bias is not None else None, like=fc1)
    new_fc2 = _linear(new_w2, new_b2, like=fc2)
    plain_fc2 = _linear(w2[:, kept], b2, like=fc2) if compensate else new_fc2
    return PrunedMLPResult(new_fc1, new_fc2, kept, damping, rel, plain_fc2)


@dataclass
class PrunedAttentionResult:
    attn: PrunedAttention
    kept: torch.Tensor  # (H, qk_dim)
    damping: float  # mean absolute λ over heads
    relative_damping: float


def attention_compensation(
    gram_q: torch.Tensor, gram_k: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, ridge: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares logit correction ``M`` per head.

    Solves ``GQ_SS · M · GK_SS + λM = GQ_SP · GK_PS`` with
    ``λ = ridge · mean(diag GQ_SS) · mean(diag GK_SS)``.

    Args:
        gram_q, gram_k: ``(H, d, d)`` per-head uncentred Grams.
        kept: ``(H, s)``; pruned: ``(H, d - s)`` per-head indices.

    Returns:
        ``M`` ``(H, s, s)`` and ``λ`` ``(H,)``.
    """
    q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
    rhs = sub_blocks(gram_q, kept, pruned) @ sub_blocks(gram_k, pruned, kept)
    scale = torch.diagonal(q_ss, dim1=1, dim2=2).mean(1) * torch.diagonal(k_ss, dim1=1, dim2=2).mean(1)
    damping = (ridge * scale).clamp_min(torch.finfo(scale.dtype).tiny)
    return sylvester_solve(q_ss, k_ss, rhs, damping, backend=backend), damping


def prune_attention(
    attn: Attention, stats: AttentionStatistics, sparsity: float, ridge: float, compensate: bool,
    backend: str = "torch", *, selected: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    solve: Optional[Callable] = None,
) -> PrunedAttentionResult:
    """A :class:`PrunedAttention` with a fraction ``sparsity`` of q/k dims removed in every head.

    Folds ``A = I + M``: ``W_K' = A W_K[S]``, ``b_K' = A b_K[S]``,
    ``W_Q' = W_Q[S] · r``, ``b_Q' = b_Q[S] · r`` with ``r = sqrt(|S| / d)``, so
    ``q'ᵀk' / sqrt(|S|) = q_Sᵀ A k_S / sqrt(d)``.

    ``selected``: per-head ``(kept (H, s), pruned (H, d−s))`` chosen elsewhere (default:
    :func:`select_qk_dims`). ``solve``: ``solve(kept, pruned) -> (M (H, s, s), λ (H,))``
    replacing the paper's pooled fit (:func:`attention_compensation`), e.g. the
    softmax-aware fits of :mod:`corp.logit_fit` or the error-correcting fit.
    """
    h, d = attn.num_heads, attn.head_dim
    keep = kept_count(d, sparsity)
    dev = attn.qkv.weight.device
    if selected is None:
        selected = select_qk_dims(stats.score, keep)
    kept, pruned = selected[0].to(dev), selected[1].to(dev)

    w = attn.qkv.weight.detach().to(torch.float64).view(3, h, d, -1)
    b = attn.qkv.bias.detach().to(torch.float64).view(3, h, d) if attn.qkv.bias is not None else None
    rows = kept[:, :, None].expand(-1, -1, w.shape[-1])
    w_q, w_k, w_v = torch.gather(w[0], 1, rows), torch.gather(w[1], 1, rows), w[2]
    b_q = torch.gather(b[0], 1, kept) if b is not None else None
    b_k = torch.gather(b[1], 1, kept) if b is not None else None

    damping = torch.zeros(h, dtype=torch.float64)
    if compensate and pruned.numel():
        if solve is not None:
            m, damping = solve(kept, pruned)
        else:
            m, damping = attention_compensation(stats.gram_q.to(dev), stats.gram_k.to(dev), kept, pruned, ridge,
                                                backend)
        a = torch.eye(keep, dtype=torch.float64, device=dev) + m
        w_k = a @ w_k
        if b_k is not None:
            b_k = (a @ b_k[:, :, None])[:, :, 0]
    r = math.sqrt(keep / d)
    w_q, b_q = w_q * r, (b_q * r if b_q is not None else None)

    new = pruned_attention_like(attn, keep)
    new_w = torch.cat([w_q.reshape(h * keep, -1), w_k.reshape(h * keep, -1), w_v.reshape(h * d, -1)])
    with torch.no_grad():
        new.qkv.weight.copy_(new_w)
        if b is not None:
            new.qkv.bias.copy_(torch.cat([b_q.reshape(-1), b_k.reshape(-1), b[2].reshape(-1)]))
        new.proj.load_state_dict(attn.proj.state_dict())
    new.train(attn.training)
    return PrunedAttentionResult(new, kept, float(damping.mean()), ridge if compensate and pruned.numel() else 0.0)


def mlp_error_correcting_fold(
    w2: torch.Tensor, b2: Optional[torch.Tensor], mean_dense: torch.Tensor, mean_pruned: torch.Tensor,
    cov_pruned: torch.Tensor, cross_cov: torch.Tensor, kept: torch.Tensor, ridge: float, backend: str = "torch",
) -> tuple[torch.Tensor, Optional[torch.Tensor], float, float]:
    """Error-correcting MLP fold: fit the DENSE fc2 output from the pruned stream's kept channels.

    The dense block sees hidden activations ``h`` (dense stream), the pruned block
    ``ĥ`` (inputs already disturbed by earlier pruning). Model every dense channel as
    affine in the kept pruned ones, ``h ≈ C ĥ_S + c``, by ridge regression that
    shrinks the kept channels' coefficients towards the identity:

        C = [Cov(h, ĥ)[:, S] + λ E_S] (Σ̂_SS + λI)⁻¹,   c = μ_h − C μ̂_S

    (``E_S``: the columns S of the identity), and fold ``W2' = W2 C``,
    ``b2' = b2 + W2 c``. With identical streams (``ĥ = h``) the rows S of C are
    the identity and rows P are the paper's B: this is the paper's fold exactly.

    Args:
        w2: ``(out, D)`` fc2 weight; ``b2``: ``(out,)`` or None (fp64).
        mean_dense: ``(D,)`` μ_h; ``mean_pruned``: ``(D,)`` μ̂.
        cov_pruned: ``(D, D)`` Σ̂ = Cov(ĥ); ``cross_cov``: ``(D, D)`` Cov(h, ĥ) (rows dense).
        kept: ``(|S|,)`` kept channel indices; ``ridge``: λ relative to mean(diag Σ̂_SS).

    Returns:
        ``W2'`` ``(out, |S|)``, ``b2'`` ``(out,)``, λ, and λ relative to mean(diag Σ̂_SS).
    """
    cov_ss = cov_pruned[kept[:, None], kept]
    scale = torch.diagonal(cov_ss).mean().clamp_min(torch.finfo(cov_ss.dtype).tiny)
    lam = ridge * scale
    target = cross_cov[:, kept].clone()  # (D, |S|)
    target[kept, torch.arange(kept.numel(), device=kept.device)] += lam
    # (Σ̂_SS + λI) Cᵀ = targetᵀ
    sol = ridge_solve(cov_ss[None], target.T.contiguous()[None], lam[None], backend=backend)
    if not bool(sol.ok[0]):
        raise FloatingPointError("error-correcting MLP system could not be factored even with increased damping")
    used = float(sol.damping[0])
    if used != float(lam):  # the solver raised the damping: keep the identity shrinkage consistent
        target[kept, torch.arange(kept.numel(), device=kept.device)] += used - float(lam)
        sol = ridge_solve(cov_ss[None], target.T.contiguous()[None], torch.tensor([used], dtype=lam.dtype,
                                                                                   device=lam.device), backend=backend)
    coef = sol.solution[0].T  # (D, |S|)
    shift = mean_dense - coef @ mean_pruned[kept]
    new_w2 = w2 @ coef
    new_b2 = w2 @ shift if b2 is None else b2 + w2 @ shift
    return new_w2, new_b2, used, used / float(scale)


def attention_error_correcting_solve(
    gram_q: torch.Tensor, gram_k: torch.Tensor, cross_q: torch.Tensor, cross_k: torch.Tensor,
    kept: torch.Tensor, pruned: torch.Tensor, ridge: float, backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-correcting logit fit: ``q̂_Sᵀ (I + M) k̂_S`` (pruned stream) fitted to the dense ``qᵀk``.

    Pooled least squares over all pairs, ``min Σ_ij (q_iᵀk_j − q̂_S,iᵀ(I+M)k̂_S,j)² + λ‖M‖²``:

        GQ̂_SS M GK̂_SS + λM = XQ[S, :] · XK[:, S] − GQ̂_SS GK̂_SS

    with ``XQ = Σ q̂ qᵀ`` and ``XK = Σ k k̂ᵀ`` (per head, pruned × dense and dense ×
    pruned). With identical streams the right side is ``GQ_SP GK_PS``: the paper's fit.

    Args:
        gram_q, gram_k: ``(H, d, d)`` Grams of the pruned stream's q̂, k̂ (keys may be
            centred per image, see :mod:`corp.logit_fit`, then ``cross_k`` must be too).
        cross_q: ``(H, d, d)`` ``Σ q̂ qᵀ``; cross_k: ``(H, d, d)`` ``Σ k k̂ᵀ``.
        kept, pruned: ``(H, s)``, ``(H, d − s)``.

    Returns:
        ``M`` ``(H, s, s)`` and ``λ`` ``(H,)``.
    """
    q_ss, k_ss = sub_blocks(gram_q, kept, kept), sub_blocks(gram_k, kept, kept)
    rows_q = torch.gather(cross_q, 1, kept[:, :, None].expand(-1, -1, cross_q.shape[2]))  # (H, s, d)
    cols_k = torch.gather(cross_k, 2, kept[:, None, :].expand(-1, cross_k.shape[1], -1))  # (H, d, s)
    rhs = rows_q @ cols_k - q_ss @ k_ss
    scale = torch.diagonal(q_ss, dim1=1, dim2=2).mean(1) * torch.diagonal(k_ss, dim1=1, dim2=2).mean(1)
    damping = (ridge * scale).clamp_min(torch.finfo(scale.dtype).tiny)
    return sylvester_solve(q_ss, k_ss, rhs, damping, backend=backend), damping




def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out_f, in_f = weight.shape
    ref = like.weight
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(like.training)
    return layer
