"""The statistics accumulators (corp/stats.py) against fp64 ground truth.

The ops they call (``corp::gram_update_``, ``corp::attention_stats_update_``) are tested in tests/ops/.
"""
import pytest
import torch

from corp import ops
from corp.stats import AttentionOutputStatistics, AttentionStatistics, MLPStatistics


def test_attention_stats_match_einsum():
    torch.manual_seed(1)
    h, d = 3, 20
    chunks = [torch.randn(2, 13, 3 * h * d), torch.randn(1, 7, 3 * h * d)[:, :, :]]
    st = AttentionStatistics(h, d, torch.device("cpu"), ops.REFERENCE)
    for c in chunks:
        st.update(c)
    qkv = torch.cat([c.reshape(-1, 3 * h * d) for c in chunks]).double().view(-1, 3, h, d)
    q, k = qkv[:, 0], qkv[:, 1]
    assert st.count == 33
    torch.testing.assert_close(st.gram_q, torch.einsum("nhi,nhj->hij", q, q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.gram_k, torch.einsum("nhi,nhj->hij", k, k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.score, (q * q * k * k).sum(0), rtol=1e-5, atol=1e-5)


def test_mlp_statistics_mean_covariance_and_diag_only_mode():
    torch.manual_seed(2)
    h = torch.randn(3, 41, 29) * 2 + 1
    cpu = torch.device("cpu")
    full, diag = MLPStatistics(29, cpu, ops.REFERENCE), MLPStatistics(29, cpu, ops.REFERENCE, full=False)
    full.update(h), diag.update(h)
    flat = h.reshape(-1, 29).double()
    mean, cov = full.mean_and_covariance()
    torch.testing.assert_close(mean, flat.mean(0))
    torch.testing.assert_close(cov, torch.cov(flat.T, correction=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.second_moment_diag(), (flat**2).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.second_moment_diag(), diag.second_moment_diag(), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):
        diag.mean_and_covariance()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_block_for_any_non_finite_entry(bad):
    """One NaN or ±Inf activation anywhere makes check_finite raise, naming the block (finite
    statistics pass, including ones with entries of both signs that cancel in a sum)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    fine = MLPStatistics(6, torch.device("cpu"))
    fine.update(torch.cat([h, -h]))  # Σ h = 0: cancellation must not matter
    fine.check_finite(3)
    h[1, 4, 2] = bad
    stats = MLPStatistics(6, torch.device("cpu"))
    stats.update(h)
    with pytest.raises(ValueError, match="non-finite MLP statistics in block 3"):
        stats.check_finite(3)
    attn = AttentionStatistics(2, 3, torch.device("cpu"))
    qkv = torch.randn(1, 5, 18, generator=g)
    qkv[0, 2, 7] = bad
    attn.update(qkv)
    with pytest.raises(ValueError, match="non-finite query/key statistics in block 5"):
        attn.check_finite(5)


def test_attention_output_statistics_are_those_of_the_concatenated_outputs():
    """Σ [o; z] and its Gram, accumulated block by block over fp32 batches of an odd width, equal the
    fp64 mean and covariance of the concatenated tokens; mismatched outputs are refused."""
    g = torch.Generator().manual_seed(3)
    width = 13
    batches = [(torch.randn(2, 7, width, generator=g), torch.randn(2, 7, width, generator=g)),
               (torch.randn(1, 5, width, generator=g), torch.randn(1, 5, width, generator=g))]
    stats = AttentionOutputStatistics(width, torch.device("cpu"))
    for o, z in batches:
        stats.update(o, 0.5 * o + z)  # correlated, as the pruned heads are with the dense ones
    tokens = torch.cat([torch.cat([o, 0.5 * o + z], -1).reshape(-1, 2 * width) for o, z in batches]).double()
    mean, cov = stats.mean_and_covariance()
    assert stats.count == tokens.shape[0] == 19
    torch.testing.assert_close(mean, tokens.mean(0), rtol=1e-6, atol=1e-6)
    centred = tokens - tokens.mean(0)
    torch.testing.assert_close(cov, centred.T @ centred / tokens.shape[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        AttentionOutputStatistics(width, torch.device("cpu")).update(torch.zeros(3, width), torch.zeros(3, width + 1))
