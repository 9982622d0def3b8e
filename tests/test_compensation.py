"""The checks of CORP.md: exact recovery of affine channels, the closed-form logit fit
against brute-force least squares, and the fold reproducing the compensated logits."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp

import corp
from corp.stats import AttentionStatistics, MLPStatistics

from conftest import tiny_vit
from stages import attention_compensation, kept_count, prune_attention, prune_mlp, select_qk_dims


@pytest.mark.parametrize("hidden,keep", [(37, 19), (64, 40)])
def test_affine_pruned_channels_are_recovered_exactly(hidden, keep):
    """If h_P is exactly affine in h_S, the compensated MLP output equals the dense one."""
    torch.manual_seed(hidden)
    dim, n = 11, 600
    mlp = Mlp(dim, hidden, act_layer=nn.Identity).double()
    # h lives in a keep-dimensional affine subspace: any `keep` generic coordinates determine the rest
    basis = torch.randn(keep, hidden, dtype=torch.float64)
    offset = torch.randn(hidden, dtype=torch.float64)
    h = torch.randn(n, keep, dtype=torch.float64) @ basis + offset
    stats = MLPStatistics(hidden, torch.device("cpu"))
    stats.update(h[:250]), stats.update(h[250:])
    sparsity = (hidden - keep) / hidden
    assert kept_count(hidden, sparsity) == keep
    res = prune_mlp(mlp, stats, sparsity, ridge=1e-12, compensate=True)
    dense_out = mlp.fc2(h)
    comp_out = res.fc2(h[:, res.kept])
    assert (comp_out - dense_out).abs().max() < 1e-7 * dense_out.abs().max()
    plain = prune_mlp(mlp, stats, sparsity, ridge=1e-12, compensate=False)
    assert (plain.fc2(h[:, plain.kept]) - dense_out).abs().max() > 1e-2 * dense_out.abs().max()


def test_affine_mlp_through_the_engine_reproduces_the_dense_model():
    """An MLP with identity activation has h = W1 x + b1: keeping ≥ dim channels loses nothing."""
    model = tiny_vit(act_layer=nn.Identity, embed_dim=24, num_heads=2, mlp_ratio=4.0).double()
    images = torch.randn(12, 3, 24, 24, dtype=torch.float64)
    pruned = corp.prune(model, images, mlp_sparsity=0.5, ridge=1e-12)  # keeps 48 of 96 ≥ 24
    assert pruned.blocks[0].mlp.fc1.out_features == 48
    with torch.no_grad():
        ref, out = model(images), pruned(images)
    assert (out - ref).abs().max() < 1e-6 * ref.abs().max()


def _brute_force_m(q_s, q_p, k_s, k_p, lam):
    """Least squares over all (i, j) pairs: Σ (q_Piᵀ k_Pj − q_Siᵀ M k_Sj)² + λ‖M‖²."""
    s = q_s.shape[1]
    feats = torch.einsum("ia,jb->ijab", q_s, k_s).reshape(-1, s * s)
    target = (q_p @ k_p.T).reshape(-1)
    lhs = feats.T @ feats + lam * torch.eye(s * s, dtype=torch.float64)
    return torch.linalg.solve(lhs, (feats.T @ target)[:, None]).reshape(s, s)


@pytest.mark.parametrize("d,keep,ridge", [(7, 4, 1e-3), (5, 1, 1e-2), (6, 5, 0.5)])
def test_closed_form_logit_fit_equals_brute_force(d, keep, ridge):
    torch.manual_seed(d * 10 + keep)
    heads, n = 2, 13
    q = torch.randn(n, heads, d, dtype=torch.float64) + 0.3
    k = torch.randn(n, heads, d, dtype=torch.float64) - 0.2
    gq = torch.einsum("nhi,nhj->hij", q, q)
    gk = torch.einsum("nhi,nhj->hij", k, k)
    score = (q * q * k * k).sum(0)
    kept, pruned = select_qk_dims(score, keep)
    m, lam = attention_compensation(gq, gk, kept, pruned, ridge)
    for hd in range(heads):
        s_idx, p_idx = kept[hd], pruned[hd]
        q_h, k_h = q[:, hd], k[:, hd]
        ref = _brute_force_m(q_h[:, s_idx], q_h[:, p_idx], k_h[:, s_idx], k_h[:, p_idx], float(lam[hd]))
        torch.testing.assert_close(m[hd], ref, rtol=1e-7, atol=1e-9)


def _compensated_reference(attn, x, kept, m):
    """softmax(q_Sᵀ (I + M) k_S / sqrt(d)) v, then proj, computed from the dense weights."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).view(b, n, 3, h, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, d)
    idx = kept[None, None].expand(b, n, -1, -1)
    q_s, k_s = torch.gather(q, 3, idx), torch.gather(k, 3, idx)
    a = torch.eye(kept.shape[1], dtype=x.dtype) + m
    logits = torch.einsum("bihs,hst,bjht->bhij", q_s, a, k_s) / math.sqrt(d)
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(b, n, h * d)
    return attn.proj(out), logits


@pytest.mark.parametrize("pad_qk", [True, False])
def test_fold_reproduces_compensated_logits_and_output(pad_qk):
    torch.manual_seed(3)
    dim, heads = 30, 3  # head_dim 10
    attn = Attention(dim, num_heads=heads, qkv_bias=True).double().eval()
    x = torch.randn(4, 9, dim, dtype=torch.float64)
    stats = AttentionStatistics(heads, 10, torch.device("cpu"))
    stats.update(attn.qkv(x))
    res = prune_attention(attn, stats, 0.3, ridge=1e-3, compensate=True)
    new = res.attn
    new.pad_qk = pad_qk
    assert new.qk_dim == kept_count(10, 0.3) == 7
    assert new.qkv.out_features == heads * (7 + 7 + 10)
    kept, pruned = select_qk_dims(stats.score, 7)
    m, _ = attention_compensation(stats.gram_q, stats.gram_k, kept, pruned, 1e-3)
    ref_out, ref_logits = _compensated_reference(attn, x, kept, m)
    q, k, _ = new.qkv(x).split([21, 21, 30], dim=-1)
    q, k = q.view(4, 9, 3, 7), k.view(4, 9, 3, 7)
    logits = torch.einsum("bihs,bjhs->bhij", q, k) * new.scale
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref_out, rtol=1e-10, atol=1e-10)


def test_uncompensated_attention_only_drops_dims():
    torch.manual_seed(4)
    attn = Attention(16, num_heads=2, qkv_bias=False).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    stats = AttentionStatistics(2, 8, torch.device("cpu"))
    stats.update(attn.qkv(x))
    res = prune_attention(attn, stats, 0.5, ridge=1e-3, compensate=False)
    assert res.attn.qkv.bias is None
    kept, _ = select_qk_dims(stats.score, 4)
    ref_out, _ = _compensated_reference(attn, x, kept, torch.zeros(2, 4, 4, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(res.attn(x), ref_out, rtol=1e-10, atol=1e-10)


def test_selection_keeps_highest_scores():
    mlp = Mlp(4, 6).double()
    with torch.no_grad():
        mlp.fc1.weight.fill_(1.0)
        mlp.fc2.weight.fill_(1.0)
    stats = MLPStatistics(6, torch.device("cpu"), full=False)
    stats.update(torch.tensor([[1.0, 5.0, 0.1, 3.0, 0.2, 4.0]], dtype=torch.float64))
    res = prune_mlp(mlp, stats, 0.5, ridge=1e-3, compensate=False)
    assert res.kept.tolist() == [1, 3, 5]
    torch.testing.assert_close(res.fc1.weight, mlp.fc1.weight[[1, 3, 5]].to(res.fc1.weight.dtype))
    torch.testing.assert_close(res.fc2.bias, mlp.fc2.bias)
