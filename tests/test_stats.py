"""Reference statistics against fp64 ground truth."""
import pytest
import torch

from corp.stats import AttentionStatistics, MLPStatistics, attention_stats_update_, gram_update_, symmetrize_upper


@pytest.mark.parametrize("d", [1, 97, 385, 800])
def test_gram_update_matches_fp64_over_chunks(d):
    torch.manual_seed(d)
    chunks = [torch.randn(n, d) for n in (50, 197, 3)]
    gram = torch.zeros(d, d, dtype=torch.float64)
    colsum = torch.zeros(d, dtype=torch.float64)
    for c in chunks:
        gram_update_(gram, colsum, c)
    x = torch.cat(chunks).double()
    torch.testing.assert_close(symmetrize_upper(gram), x.T @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(colsum, x.sum(0), rtol=1e-5, atol=1e-4)  # fp32 within a chunk, like the Gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gram_update_accepts_strided_low_precision_views(dtype):
    torch.manual_seed(0)
    base = torch.randn(4, 60, 2 * 97).to(dtype)
    x = base[:, ::2, ::2]  # (4, 30, 97), non-contiguous
    gram = torch.zeros(97, 97, dtype=torch.float64)
    colsum = torch.zeros(97, dtype=torch.float64)
    gram_update_(gram, colsum, x)
    ref = x.reshape(-1, 97).double()
    # products of the low-precision values are exact in fp32; only fp32 summation rounds
    torch.testing.assert_close(symmetrize_upper(gram), ref.T @ ref, rtol=1e-5, atol=1e-3)


def test_fp64_accumulation_beats_plain_fp32_over_many_chunks():
    torch.manual_seed(0)
    d, gram = 8, torch.zeros(8, 8, dtype=torch.float64)
    colsum = torch.zeros(8, dtype=torch.float64)
    fp32_sum = torch.zeros(8)
    exact = torch.zeros(8, dtype=torch.float64)
    for _ in range(200):
        x = torch.rand(1000, d) + 10.0  # a large mean makes fp32 running sums lose digits
        gram_update_(gram, colsum, x)
        fp32_sum += x.sum(0)
        exact += x.double().sum(0)
    assert (colsum - exact).abs().max() < 1e-6 * exact.abs().max()
    assert (fp32_sum.double() - exact).abs().max() > (colsum - exact).abs().max()


def test_attention_stats_match_einsum():
    torch.manual_seed(1)
    h, d = 3, 20
    chunks = [torch.randn(2, 13, 3 * h * d), torch.randn(1, 7, 3 * h * d)[:, :, :]]
    st = AttentionStatistics(h, d, torch.device("cpu"))
    for c in chunks:
        st.update(c)
    qkv = torch.cat([c.reshape(-1, 3 * h * d) for c in chunks]).double().view(-1, 3, h, d)
    q, k = qkv[:, 0], qkv[:, 1]
    assert st.count == 33
    torch.testing.assert_close(st.gram_q, torch.einsum("nhi,nhj->hij", q, q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.gram_k, torch.einsum("nhi,nhj->hij", k, k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.score, (q * q * k * k).sum(0), rtol=1e-5, atol=1e-5)


def test_attention_stats_rejects_wrong_width():
    with pytest.raises(ValueError, match="qkv width"):
        attention_stats_update_(torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 4, 4, dtype=torch.float64),
                                torch.zeros(2, 4, dtype=torch.float64), torch.zeros(5, 23), 2, 4)


def test_mlp_statistics_mean_covariance_and_diag_only_mode():
    torch.manual_seed(2)
    h = torch.randn(3, 41, 29) * 2 + 1
    full, diag = MLPStatistics(29, torch.device("cpu")), MLPStatistics(29, torch.device("cpu"), full=False)
    full.update(h), diag.update(h)
    flat = h.reshape(-1, 29).double()
    mean, cov = full.mean_and_covariance()
    torch.testing.assert_close(mean, flat.mean(0))
    torch.testing.assert_close(cov, torch.cov(flat.T, correction=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.second_moment_diag(), (flat**2).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.second_moment_diag(), diag.second_moment_diag(), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):
        diag.mean_and_covariance()
