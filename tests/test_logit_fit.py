"""The softmax-aware logit fits of corp.fit against independent references:
fp64 brute-force statistics, explicit least squares over token pairs, invariance to
per-image key shifts, and the softmax error they are meant to reduce."""
import math

import pytest
import torch

from corp.fit import FitContext, PerImageLogitFit, PerImageLogitSystem
from corp.ops import REFERENCE
from corp.reference import attention_stats_update_
from corp.stats import AttentionStatistics, centred_key_gram, key_outer_update_

from stages import attention_compensation, centred_attention_compensation, logit_damping_scale, select_qk_dims

F64 = torch.float64


def _qkv(q, k):
    """Pack q, k ``(B, H, T, d)`` into a qkv tensor ``(B, T, 3·H·d)`` (v = zeros)."""
    b, h, t, d = q.shape
    parts = [x.transpose(1, 2).reshape(b, t, h * d) for x in (q, k, torch.zeros_like(q))]
    return torch.cat(parts, dim=-1)


def _pooled_stats(qkv, h, d, chunks=(slice(None),)):
    gq = torch.zeros(h, d, d, dtype=F64)
    gk = torch.zeros_like(gq)
    score = torch.zeros(h, d, dtype=F64)
    outer = torch.zeros_like(gq)
    for c in chunks:
        attention_stats_update_(gq, gk, score, qkv[c], h, d)
        key_outer_update_(outer, qkv[c], h, d)
    return gq, gk, score, outer


def _fits(qkv, h, d, kept, pruned, ridge):
    """The paper's, the centred and the per-image M from the qkv tensor, through the public API."""
    gq, gk, _, outer = _pooled_stats(qkv, h, d, chunks=[slice(0, 1), slice(1, None)])
    gk_c = centred_key_gram(gk, outer)
    m_paper, _ = attention_compensation(gq, gk, kept, pruned, ridge)
    m_cent, lam_c = centred_attention_compensation(gq, gk_c, kept, pruned, ridge)
    system = PerImageLogitSystem(kept, pruned, h, d, "cpu")
    system.update(qkv[:1]), system.update(qkv[1:])
    scale = logit_damping_scale(gq, gk_c, kept)
    m_img, lam_i = system.solve(ridge, scale)
    return m_paper, m_cent, m_img, lam_c, lam_i


def _design(q_s, k_s, q_p, k_p, pairs):
    """Rows vec(q_S,i k_S,jᵀ) (row-major, matching M.reshape(-1)) and targets q_P,iᵀk_P,j."""
    i, j = pairs
    feats = (q_s[i][:, :, None] * k_s[j][:, None, :]).reshape(len(i), -1)
    return feats, (q_p[i] * k_p[j]).sum(-1)


def _lstsq(feats, target, lam):
    n = feats.shape[1]
    if lam > 0:  # λ‖M‖² as augmented rows sqrt(λ)·I with zero targets
        feats = torch.cat([feats, math.sqrt(lam) * torch.eye(n, dtype=F64)])
        target = torch.cat([target, torch.zeros(n, dtype=F64)])
    return torch.linalg.lstsq(feats, target[:, None], driver="gelsd").solution[:, 0]


def _offset_qk(seed, b, h, t, d, q_offset):
    """Random fp64 q, k ``(B, H, T, d)``: q shifted by ``q_offset``, keys by a random offset per image."""
    torch.manual_seed(seed)
    q = torch.randn(b, h, t, d, dtype=F64) + q_offset
    k = torch.randn(b, h, t, d, dtype=F64) + torch.randn(b, h, 1, d, dtype=F64)
    return q, k


def _within_image_pairs(b, t):
    """All (query, key) token index pairs ``(2, B·T·T)`` of the same image, tokens numbered image-major."""
    idx = torch.arange(b * t)
    pairs = torch.cartesian_prod(idx, idx).T
    return pairs[:, (idx // t)[pairs[0]] == (idx // t)[pairs[1]]]


def test_key_outer_update_over_chunks_matches_brute_force():
    torch.manual_seed(0)
    b, t, h, d = 7, 9, 3, 5
    qkv = torch.randn(b, t, 3 * h * d, dtype=torch.float32) * 2 + 0.5
    outer = torch.zeros(h, d, d, dtype=F64)
    for c in (slice(0, 2), slice(2, 3), slice(3, 7)):
        key_outer_update_(outer, qkv[c], h, d)
    k = qkv.double().reshape(b, t, 3, h, d)[:, :, 1]  # (B, T, H, d)
    ref = torch.zeros(h, d, d, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            s_b = k[bi, :, hi].sum(0)
            ref[hi] += torch.outer(s_b, s_b) / t
    assert torch.allclose(outer, ref, rtol=1e-5, atol=1e-6 * ref.abs().max())

    # GK − key_outer is the Gram of explicitly per-image-centred keys
    gq = torch.zeros(h, d, d, dtype=F64)
    gk, score = torch.zeros_like(gq), torch.zeros(h, d, dtype=F64)
    attention_stats_update_(gq, gk, score, qkv.double(), h, d)
    outer64 = torch.zeros_like(gq)
    key_outer_update_(outer64, qkv.double(), h, d)
    kc = k - k.mean(dim=1, keepdim=True)
    ref_c = torch.einsum("bthi,bthj->hij", kc, kc)
    got = centred_key_gram(gk, outer64)
    assert torch.allclose(got, ref_c, rtol=1e-10, atol=1e-10 * ref_c.abs().max())
    assert not torch.allclose(gk, ref_c, rtol=1e-3)  # the centring does something here


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_fits_match_brute_force_least_squares(ridge):
    """H=2, d=6, s=3, B=3 images of T=5 tokens, random fp64 q, k (with per-image offsets)."""
    h, d, s, b, t = 2, 6, 3, 3, 5
    q, k = _offset_qk(1, b, h, t, d, 0.3)
    qkv = _qkv(q, k)
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    pruned = torch.tensor([[1, 3, 4], [0, 2, 5]])
    m_paper, m_cent, m_img, lam_c, lam_i = _fits(qkv, h, d, kept, pruned, ridge)
    kc = k - k.mean(dim=2, keepdim=True)  # per-image-centred keys
    # λ from the tokens: ridge · (mean over kept q dims of Σ q²) · (mean over kept k dims of Σ k̃²)
    for hi in range(h if ridge > 0 else 0):
        q_energy = q[:, hi][..., kept[hi]].square().sum((0, 1)).mean()
        k_energy = kc[:, hi][..., kept[hi]].square().sum((0, 1)).mean()
        assert float(lam_c[hi]) == pytest.approx(ridge * float(q_energy * k_energy), rel=1e-10, abs=0)
    assert torch.allclose(lam_c, lam_i)  # the per-image system was given the same scale here

    idx = torch.arange(b * t)
    all_pairs = torch.cartesian_prod(idx, idx).T
    within = _within_image_pairs(b, t)
    assert within.shape[1] == b * t * t
    for hi in range(h):
        qh = q[:, hi].reshape(b * t, d)
        kh = kc[:, hi].reshape(b * t, d)
        q_s, q_p, k_s, k_p = qh[:, kept[hi]], qh[:, pruned[hi]], kh[:, kept[hi]], kh[:, pruned[hi]]
        lam = float(lam_c[hi]) if ridge > 0 else 0.0
        feats, target = _design(q_s, k_s, q_p, k_p, all_pairs)
        ref_cent = _lstsq(feats, target, lam).reshape(s, s)
        feats, target = _design(q_s, k_s, q_p, k_p, within)
        ref_img = _lstsq(feats, target, lam).reshape(s, s)
        assert torch.allclose(m_cent[hi], ref_cent, rtol=1e-7, atol=1e-9), (m_cent[hi], ref_cent)
        assert torch.allclose(m_img[hi], ref_img, rtol=1e-7, atol=1e-9), (m_img[hi], ref_img)
        assert (ref_cent - ref_img).abs().max() > 1e-3  # the two objectives differ on this data


def test_per_image_logit_fit_damps_by_its_own_system_scale():
    """:class:`corp.fit.PerImageLogitFit` end to end (a second pass over the qkv batches): λ is
    ``ridge · Σ_b mean(diag GQ_b,SS)·mean(diag GK̃_b,SS)`` computed here from the tokens, and M is the
    damped least squares over within-image token pairs at that λ."""
    h, d, b, t, ridge = 2, 5, 3, 6, 0.05
    q, k = _offset_qk(4, b, h, t, d, 0.2)
    qkv = _qkv(q, k)
    kept = torch.tensor([[0, 3, 4], [1, 2, 4]])
    pruned = torch.tensor([[1, 2], [0, 3]])
    ctx = FitContext(REFERENCE, qkv_batches=lambda: iter([qkv[:2], qkv[2:]]))
    m, lam = PerImageLogitFit(ridge).fit(AttentionStatistics(h, d, torch.device("cpu")), kept, pruned, ctx)
    kc = k - k.mean(dim=2, keepdim=True)
    within = _within_image_pairs(b, t)
    for hi in range(h):
        scale = sum(float(q[bi, hi][:, kept[hi]].square().sum(0).mean() * kc[bi, hi][:, kept[hi]].square().sum(0).mean())
                    for bi in range(b))
        assert float(lam[hi]) == pytest.approx(ridge * scale, rel=1e-10, abs=0)
        qh, kh = q[:, hi].reshape(b * t, d), kc[:, hi].reshape(b * t, d)
        feats, target = _design(qh[:, kept[hi]], kh[:, kept[hi]], qh[:, pruned[hi]], kh[:, pruned[hi]], within)
        ref = _lstsq(feats, target, ridge * scale).reshape(3, 3)
        assert torch.allclose(m[hi], ref, rtol=1e-7, atol=1e-9), (m[hi], ref)


def test_per_image_key_shift_leaves_both_fits_unchanged():
    torch.manual_seed(2)
    h, d, b, t = 2, 8, 4, 6
    q = torch.randn(b, h, t, d, dtype=F64) + 0.5
    k = torch.randn(b, h, t, d, dtype=F64)
    shifted = k + 2.0 * torch.randn(b, h, 1, d, dtype=F64)  # k_j += c_b for every key of image b
    _, _, score, _ = _pooled_stats(_qkv(q, k), h, d)
    kept, pruned = select_qk_dims(score, 5)
    before = _fits(_qkv(q, k), h, d, kept, pruned, 1e-3)
    after = _fits(_qkv(q, shifted), h, d, kept, pruned, 1e-3)
    m_paper, m_cent, m_img = before[:3]
    m_paper2, m_cent2, m_img2 = after[:3]
    assert torch.allclose(m_cent, m_cent2, rtol=1e-8, atol=1e-10)
    assert torch.allclose(m_img, m_img2, rtol=1e-8, atol=1e-10)
    assert (m_paper - m_paper2).abs().max() > 1e-2 * m_paper.abs().max()  # the paper's fit moves


def _logits(q, k, kept, pruned, m=None):
    """Per-head, per-image logits ``(B, H, T, T)`` / sqrt(d): dense, or q_Sᵀ(I+M)k_S."""
    d = q.shape[-1]
    if m is None:
        return q @ k.transpose(-1, -2) / math.sqrt(d)
    h = q.shape[1]
    idx = kept[None, :, None, :].expand(q.shape[0], h, q.shape[2], -1)
    q_s, k_s = torch.gather(q, 3, idx), torch.gather(k, 3, idx)
    a = torch.eye(kept.shape[1], dtype=F64) + m
    return q_s @ (k_s @ a.transpose(-1, -2)).transpose(-1, -2) / math.sqrt(d)


def _row_centred_residual(q, k, kept, pruned, m):
    err = _logits(q, k, kept, pruned) - _logits(q, k, kept, pruned, m)
    return float(((err - err.mean(-1, keepdim=True)) ** 2).sum())


def _correlated_qk(b, h, t, d, rank, shared):
    """q, k driven by a rank-``rank`` latent per token (so the pruned dims are predictable from
    the kept ones), plus a per-image key component of size ``shared`` (zero for none)."""
    mix_q = torch.randn(h, rank, d, dtype=F64)
    mix_k = torch.randn(h, rank, d, dtype=F64)
    z = torch.randn(b, 1, t, rank, dtype=F64)
    q = z @ mix_q + 0.3 * torch.randn(b, h, t, d, dtype=F64) + 0.5
    k = z @ mix_k + 0.3 * torch.randn(b, h, t, d, dtype=F64)
    k = k + shared * torch.randn(b, h, 1, d, dtype=F64)
    return q, k


def test_per_image_fit_is_optimal_for_the_softmax_residual():
    torch.manual_seed(3)
    h, d, b, t = 3, 8, 6, 10
    q, k = _correlated_qk(b, h, t, d, rank=5, shared=1.0)
    qkv = _qkv(q, k)
    _, _, score, _ = _pooled_stats(qkv, h, d)
    kept, pruned = select_qk_dims(score, 4)
    m_paper, m_cent, m_img, _, _ = _fits(qkv, h, d, kept, pruned, 0.0)
    r_paper = _row_centred_residual(q, k, kept, pruned, m_paper)
    r_cent = _row_centred_residual(q, k, kept, pruned, m_cent)
    r_img = _row_centred_residual(q, k, kept, pruned, m_img)
    r_none = _row_centred_residual(q, k, kept, pruned, torch.zeros_like(m_img))
    assert r_img <= r_paper * (1 + 1e-9) and r_img <= r_cent * (1 + 1e-9)
    assert r_img < r_none
    # strictly better here: not a degenerate case where all fits coincide
    assert r_img < 0.999 * r_paper and r_img < 0.999 * r_cent


def test_softmax_is_closer_with_large_per_image_key_component():
    """Case: keys = low-rank token signal + a per-image shared vector 4× larger (per head),
    queries with a nonzero mean. The shared part only shifts each query's logit row, which
    softmax ignores, but it dominates the uncentred key Gram the paper's fit is built from."""
    torch.manual_seed(4)
    h, d, b, t = 3, 8, 8, 12
    q, k = _correlated_qk(b, h, t, d, rank=5, shared=4.0)
    qkv = _qkv(q, k)
    _, _, score, _ = _pooled_stats(qkv, h, d)
    kept, pruned = select_qk_dims(score, 4)
    m_paper, m_cent, m_img, _, _ = _fits(qkv, h, d, kept, pruned, 1e-4)
    dense = torch.log_softmax(_logits(q, k, kept, pruned), -1)

    def kl(m):
        approx = torch.log_softmax(_logits(q, k, kept, pruned, m), -1)
        return float((dense.exp() * (dense - approx)).sum(-1).mean())

    kl_paper, kl_cent, kl_img = kl(m_paper), kl(m_cent), kl(m_img)
    kl_none = kl(torch.zeros_like(m_img))
    assert kl_img < kl_paper and kl_cent < kl_paper, (kl_none, kl_paper, kl_cent, kl_img)
    assert kl_img < kl_none


def test_factored_logit_fit_is_two_ridge_regressions_and_the_lstsq_fit_without_damping():
    """M = (GQ_SS + αI)⁻¹ GQ_SP · GK_PS (GK_SS + βI)⁻¹ (explicit solves); with α = β → 0 it is the
    least-squares M over all token pairs (the Sylvester fit without damping)."""
    from corp.fit import FactoredLogitFit, FitContext
    from corp.ops import REFERENCE

    class Grams:
        def __init__(self, gq, gk):
            self.gram_q, self._gk = gq, gk

        def key_gram(self):
            return self._gk

    g = torch.Generator().manual_seed(7)
    h, d, n = 3, 6, 80
    q = torch.randn(h, n, d, generator=g, dtype=torch.float64) @ torch.randn(h, d, d, generator=g, dtype=torch.float64)
    k = torch.randn(h, n, d, generator=g, dtype=torch.float64) @ torch.randn(h, d, d, generator=g, dtype=torch.float64)
    gq, gk = q.mT @ q, k.mT @ k
    kept = torch.tensor([[0, 2, 3], [1, 4, 5], [0, 1, 5]])
    pruned = torch.tensor([[1, 4, 5], [0, 2, 3], [2, 3, 4]])
    ridge = 0.05
    m, lam = FactoredLogitFit(ridge).fit(Grams(gq, gk), kept, pruned, FitContext(REFERENCE))
    for hd in range(h):
        s, p = kept[hd], pruned[hd]
        a = ridge * gq[hd][s][:, s].diagonal().mean()
        b = ridge * gk[hd][s][:, s].diagonal().mean()
        ref = torch.linalg.solve(gq[hd][s][:, s] + a * torch.eye(3, dtype=torch.float64), gq[hd][s][:, p]) @ \
            torch.linalg.solve(gk[hd][s][:, s] + b * torch.eye(3, dtype=torch.float64), gk[hd][s][:, p]).T
        assert torch.allclose(m[hd], ref, rtol=1e-10, atol=1e-12)
        assert float(lam[hd]) == pytest.approx(float(a * b), rel=1e-12)
    m0, _ = FactoredLogitFit(1e-14).fit(Grams(gq, gk), kept, pruned, FitContext(REFERENCE))
    m_ls, _ = attention_compensation(gq, gk, kept, pruned, 1e-16)
    assert torch.allclose(m0, m_ls, rtol=1e-6, atol=1e-9)


class _Grams:
    """The two statistics a pooled/centred logit fit reads, from explicit Grams."""

    def __init__(self, gq, gk):
        self.gram_q, self._gk = gq, gk

    def key_gram(self):
        return self._gk


def _random_qk(seed, h, n, d, rank=None):
    """Correlated per-head q, k ``(H, n, d)`` fp64; ``rank`` < d makes both rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    r = rank or d
    q = torch.randn(h, n, r, generator=g, dtype=F64) @ torch.randn(h, r, d, generator=g, dtype=F64)
    k = torch.randn(h, n, r, generator=g, dtype=F64) @ torch.randn(h, r, d, generator=g, dtype=F64) + 0.5 * q
    return q, k


def _pair_residual(q, k, n_form):
    """Σ_{i,j} (q_iᵀ k_j − q_iᵀ N k_j)² over every token pair, per head ``(H,)`` (brute force)."""
    dense = q @ k.mT  # (H, n, n)
    approx = q @ n_form @ k.mT
    return ((dense - approx) ** 2).sum((1, 2))


def test_lowrank_logit_fit_is_the_best_rank_s_form_over_token_pairs():
    """The fit's N = aᵀc has rank s and its pair residual (brute force over all token pairs) equals the
    Eckart–Young optimum Σ_{i>s} σ_i² of GQ^½ GK^½ (symmetric square roots from eigh, not the fit's
    Cholesky factors), is a stationary point (no random rank-s perturbation lowers it), and is no larger
    than every selected set's compensated residual (exhaustive over the sets of a 5-dim head)."""
    import itertools

    from corp.fit import FitContext, LowRankLogitFit
    from corp.ops import REFERENCE

    h, n, d, s = 2, 60, 5, 2
    q, k = _random_qk(3, h, n, d)
    gq, gk = q.mT @ q, k.mT @ k
    kept = torch.arange(s).repeat(h, 1)
    proj, lam = LowRankLogitFit(1e-13).fit(_Grams(gq, gk), kept, torch.arange(s, d).repeat(h, 1), FitContext(REFERENCE))
    assert proj.a.shape == (h, s, d) and proj.c.shape == (h, s, d) and lam.shape == (h,)
    n_form = proj.a.mT @ proj.c
    assert int(torch.linalg.matrix_rank(n_form[0])) == s
    residual = _pair_residual(q, k, n_form)

    def sym_sqrt(g):
        w, v = torch.linalg.eigh(g)
        return v @ torch.diag_embed(w.clamp_min(0).sqrt()) @ v.mT

    sigma = torch.linalg.svdvals(sym_sqrt(gq) @ sym_sqrt(gk))
    torch.testing.assert_close(residual, (sigma[:, s:] ** 2).sum(1), rtol=1e-7, atol=1e-9)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):  # rank-s perturbations of the factors: never better
        a = proj.a + 1e-3 * torch.randn(proj.a.shape, generator=g, dtype=F64)
        c = proj.c + 1e-3 * torch.randn(proj.c.shape, generator=g, dtype=F64)
        assert bool((_pair_residual(q, k, a.mT @ c) >= residual * (1 - 1e-9)).all())
    for hd in range(h):  # every selected set S with its least-squares M: never better
        for subset in itertools.combinations(range(d), s):
            s_idx = torch.tensor(subset)
            p_idx = torch.tensor([j for j in range(d) if j not in subset])
            m, _ = attention_compensation(gq[hd:hd + 1], gk[hd:hd + 1], s_idx[None], p_idx[None], 1e-14)
            n_sel = torch.zeros(d, d, dtype=F64)
            n_sel[s_idx[:, None], s_idx] = torch.eye(s, dtype=F64) + m[0]
            sel = _pair_residual(q[hd:hd + 1], k[hd:hd + 1], n_sel[None])
            assert float(sel) >= float(residual[hd]) * (1 - 1e-9), (subset, float(sel), float(residual[hd]))


def test_lowrank_logit_fit_keeps_everything_at_full_rank_and_survives_rank_deficient_grams():
    """s = d reproduces the dense logits (N = I); Grams of rank < s still factor (the damping keeps L⁻¹
    defined) and give a finite rank-s form whose residual is that of the dense form's best rank-s one."""
    from corp.fit import FitContext, LowRankLogitFit
    from corp.ops import REFERENCE

    h, n, d = 2, 40, 6
    q, k = _random_qk(11, h, n, d)
    gq, gk = q.mT @ q, k.mT @ k
    full, _ = LowRankLogitFit(1e-12).fit(_Grams(gq, gk), torch.arange(d).repeat(h, 1), torch.zeros(h, 0, dtype=torch.long),
                                         FitContext(REFERENCE))
    torch.testing.assert_close(full.a.mT @ full.c, torch.eye(d, dtype=F64).expand(h, d, d), rtol=1e-6, atol=1e-6)
    q, k = _random_qk(12, h, n, d, rank=2)
    gq, gk = q.mT @ q, k.mT @ k
    proj, _ = LowRankLogitFit(1e-6).fit(_Grams(gq, gk), torch.arange(3).repeat(h, 1), torch.arange(3, d).repeat(h, 1),
                                        FitContext(REFERENCE))
    n_form = proj.a.mT @ proj.c
    assert bool(torch.isfinite(n_form).all())
    dense_energy = _pair_residual(q, k, torch.zeros(h, d, d, dtype=F64))
    assert bool((_pair_residual(q, k, n_form) <= 1e-6 * dense_energy).all())  # rank 2 ≤ s = 3: all recovered
