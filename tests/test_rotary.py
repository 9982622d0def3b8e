"""The rotary logit fit (corp.rotary) against brute force with real position rotations, fp64."""
import pytest
import torch

from corp.fit import sub_blocks
from corp.rotary import pair_basis, rotary_logit_solve, rotate_pairs, select_rotary_pairs


def _rope(positions: torch.Tensor, pairs: int):
    """sin/cos ``(T, 2p)`` of RoPE with distinct frequencies ``10^(−i/p)`` (each repeated for the two
    dims of its pair)."""
    freqs = 1.0 / (10.0 ** (torch.arange(pairs, dtype=torch.float64) / pairs))
    angles = positions[:, None].to(torch.float64) * freqs[None, :]
    return angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)


def _problem(seed=0, tokens=40, d=8, inputs=12, correlated=False):
    """Tokens ``x`` ``(T, in)``, q/k weights ``(d, in)`` and RoPE sin/cos for positions 0..T−1.
    ``correlated``: pairs 2i+1 are noisy copies of pairs 2i (a trained model's redundancy), with
    slow frequencies (as the low-frequency pairs of a ViT's RoPE over its small grid)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inputs, generator=g, dtype=torch.float64)
    w_q = torch.randn(d, inputs, generator=g, dtype=torch.float64)
    w_k = torch.randn(d, inputs, generator=g, dtype=torch.float64)
    if correlated:
        for w in (w_q, w_k):
            for i in range(0, d // 2, 2):
                w[2 * i + 2:2 * i + 4] = w[2 * i:2 * i + 2] + 0.1 * torch.randn(2, inputs, generator=g, dtype=torch.float64)
    positions = torch.arange(tokens) * (0.005 if correlated else 1.0)
    sin, cos = _rope(positions, d // 2)
    return x, w_q, w_k, sin, cos


def test_rotation_helper_rotates_each_pair_by_its_angle():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    sin, cos = _rope(torch.tensor([3]), 2)
    out = rotate_pairs(x, sin, cos)
    for i in range(2):
        c, s = cos[0, 2 * i], sin[0, 2 * i]
        rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        assert torch.allclose(out[0, 2 * i:2 * i + 2], rot @ x[0, 2 * i:2 * i + 2])


def test_restricted_fit_matches_brute_force_least_squares_over_token_pairs():
    x, w_q, w_k, sin, cos = _problem()
    q, k = rotate_pairs(x @ w_q.T, sin, cos), rotate_pairs(x @ w_k.T, sin, cos)  # (T, d) rotated
    kept, pruned = torch.tensor([[0, 1, 4, 5]]), torch.tensor([[2, 3, 6, 7]])
    gq, gk = (q.T @ q)[None], (k.T @ k)[None]
    lam = torch.tensor([0.37])
    rhs = sub_blocks(gq, kept, pruned) @ sub_blocks(gk, pruned, kept)
    m = rotary_logit_solve(sub_blocks(gq, kept, kept), sub_blocks(gk, kept, kept), rhs, lam)[0]

    # brute force: one feature per basis matrix B_α (scaled-rotation generators on each kept pair),
    # f_α(m, n) = q_S(m)ᵀ B_α k_S(n); target q_P(m)ᵀ k_P(n) over every token pair; ridge λ‖M‖² = 2λ‖θ‖²
    q_s, k_s, q_p, k_p = q[:, kept[0]], k[:, kept[0]], q[:, pruned[0]], k[:, pruned[0]]
    basis = []
    for i in range(2):
        for gen in pair_basis():
            b = torch.zeros(4, 4, dtype=torch.float64)
            b[2 * i:2 * i + 2, 2 * i:2 * i + 2] = gen
            basis.append(b)
    features = torch.stack([(q_s @ b @ k_s.T).reshape(-1) for b in basis], 1)
    target = (q_p @ k_p.T).reshape(-1)
    design = torch.cat([features, (2 * lam).sqrt() * torch.eye(len(basis), dtype=torch.float64)])
    theta = torch.linalg.lstsq(design, torch.cat([target, torch.zeros(len(basis), dtype=torch.float64)])[:, None]).solution[:, 0]
    expected = sum(t * b for t, b in zip(theta, basis))
    assert torch.allclose(m, expected, atol=1e-10, rtol=1e-8)
    # the fit's structure: a scaled rotation per kept pair, nothing between pairs
    for i in range(2):
        blk = m[2 * i:2 * i + 2, 2 * i:2 * i + 2]
        assert torch.allclose(blk[0, 0], blk[1, 1]) and torch.allclose(blk[0, 1], -blk[1, 0])
    assert m[:2, 2:].abs().max() == 0 and m[2:, :2].abs().max() == 0


@pytest.mark.parametrize("correlated", [False, True], ids=["independent-pairs", "redundant-pairs"])
def test_fold_before_rotation_keeps_the_logit_relative_and_beats_plain_pruning(correlated):
    """Folded into the key weights (before the rotation, as the pruned model runs), the restricted fit
    gives exactly the fitted logits q̂_Sᵀ A k̂_S at every position; the unrestricted Sylvester M does not
    commute with the rotations, so its folded logits differ from what it fitted. The fit never does
    worse than plain pruning on its data (M = 0 is a candidate); with redundant pairs it recovers most
    of the error, with independent random pairs at other frequencies there is little to recover."""
    x, w_q, w_k, sin, cos = _problem(seed=1, tokens=60, correlated=correlated)
    q, k = rotate_pairs(x @ w_q.T, sin, cos), rotate_pairs(x @ w_k.T, sin, cos)
    dense = q @ k.T
    gq, gk = (q.T @ q)[None], (k.T @ k)[None]
    kept, pruned = select_rotary_pairs((q ** 2 * (k ** 2).sum(0, keepdim=True) / len(k)).sum(0)[None], 2)
    assert kept.shape == (1, 4) and (kept[0, ::2] % 2 == 0).all() and (kept[0, 1::2] == kept[0, ::2] + 1).all()
    if correlated:  # one of each pair of copies (energy may keep both copies of the strongest)
        kept, pruned = torch.tensor([[0, 1, 4, 5]]), torch.tensor([[2, 3, 6, 7]])
    q_ss, k_ss = sub_blocks(gq, kept, kept), sub_blocks(gk, kept, kept)
    rhs = sub_blocks(gq, kept, pruned) @ sub_blocks(gk, pruned, kept)
    lam = 1e-6 * torch.diagonal(q_ss, dim1=1, dim2=2).mean(1) * torch.diagonal(k_ss, dim1=1, dim2=2).mean(1)
    m = rotary_logit_solve(q_ss, k_ss, rhs, lam)[0]
    a = torch.eye(4, dtype=torch.float64) + m
    s_sin, s_cos = sin[:, kept[0]], cos[:, kept[0]]
    q_pruned = rotate_pairs(x @ w_q[kept[0]].T, s_sin, s_cos)
    k_folded = rotate_pairs(x @ (a @ w_k[kept[0]]).T, s_sin, s_cos)  # W_K' = A W_K[S], then the rotation
    folded = q_pruned @ k_folded.T
    assert torch.allclose(folded, q[:, kept[0]] @ a @ k[:, kept[0]].T, atol=1e-9)
    plain = q[:, kept[0]] @ k[:, kept[0]].T
    assert (folded - dense).norm() < (0.5 if correlated else 1.0) * (plain - dense).norm()

    from corp.fit import sylvester_solve

    free = torch.eye(4, dtype=torch.float64) + sylvester_solve(q_ss, k_ss, rhs, lam)[0]
    free_folded = q_pruned @ rotate_pairs(x @ (free @ w_k[kept[0]]).T, s_sin, s_cos).T
    assert (free_folded - q[:, kept[0]] @ free @ k[:, kept[0]].T).norm() > 1e-3 * dense.norm()
