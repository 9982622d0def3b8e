"""``corp.reference.spd_inverse_by_blocks`` (the MLP greedy's ``H⁻¹`` on the CPU) against fp64 ``torch.linalg.inv``,
and ``corp.select._spd_inverse``'s fall-back to the damping-retry ladder."""
import pytest
import torch

from corp import select
from corp.reference import spd_inverse_by_blocks


def _gelu_covariance(n: int, tokens: int, seed: int) -> torch.Tensor:
    """A correlated, ill-conditioned covariance like an MLP hidden layer's (fp64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(tokens, n, generator=g, dtype=torch.float64)
                                 @ torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5)
    return torch.cov(x.T).reshape(n, n)


@pytest.mark.parametrize("n, leaf", [(1, 4), (5, 4), (37, 4), (100, 8), (129, 16), (300, 64)])
def test_blocked_inverse_matches_fp64_inverse_at_odd_sizes(n, leaf):
    a = _gelu_covariance(n, 3 * n + 7, seed=n)
    a.diagonal().add_(1e-3 * float(a.diagonal().mean()))
    before = a.clone()
    inverse, ok = spd_inverse_by_blocks(a, leaf)
    assert ok
    expected = torch.linalg.inv(a)
    assert torch.equal(a, before)  # read only
    rel = float((inverse - expected).norm() / expected.norm())
    assert rel < 1e-10 * float(torch.linalg.cond(a))
    assert float((inverse - inverse.T).norm() / inverse.norm()) < 1e-14  # symmetric to rounding


def test_blocked_fp32_error_within_twice_lapack_fp32_error():
    """In fp32 (the greedy's precision) the recursion's error against the fp64 inverse stays within
    three times the error of LAPACK's fp32 Cholesky inverse of the same matrix (measured: 1.9 times)."""
    a = _gelu_covariance(700, 2000, seed=3)
    a.diagonal().add_(1e-3 * float(a.diagonal().mean()))
    exact = torch.linalg.inv(a)
    a32 = a.float()
    lapack = torch.cholesky_inverse(torch.linalg.cholesky(a32)).double()
    blocked, ok = spd_inverse_by_blocks(a32, leaf=64)
    assert ok and blocked.dtype == torch.float32
    err_lapack = float((lapack - exact).norm() / exact.norm())
    err_blocked = float((blocked.double() - exact).norm() / exact.norm())
    assert err_blocked <= 3 * err_lapack, (err_blocked, err_lapack)


def test_blocked_inverse_reports_indefinite_and_nan_matrices():
    a = _gelu_covariance(60, 200, seed=1)
    a.diagonal().add_(1e-3)
    indefinite = a.clone()
    indefinite[50, 50] = -1.0  # only the last Schur complement sees it
    assert not spd_inverse_by_blocks(indefinite, leaf=8)[1]
    poisoned = a.clone()
    poisoned[3, 40] = poisoned[40, 3] = float("nan")  # off the diagonal blocks: reaches S's diagonal
    assert not spd_inverse_by_blocks(poisoned, leaf=8)[1]
    assert not spd_inverse_by_blocks(a.new_full((20, 20), float("nan")), leaf=8)[1]
    with pytest.raises(ValueError, match="must be"):
        spd_inverse_by_blocks(a[:, :10])


def test_greedy_inverse_falls_back_to_the_damping_ladder():
    """A rank-deficient covariance made slightly indefinite, with no damping: the blocked inverse
    fails, and ``_spd_inverse`` returns ``(A + λI)⁻¹`` for the ladder's first λ that factors."""
    g = torch.Generator().manual_seed(0)
    n = select.BLOCKED_INVERSE_MIN_WIDTH + 3  # the CPU path takes the recursion first
    x = torch.randn(n, 40, generator=g, dtype=torch.float64)
    a = x @ x.T / 40
    a.diagonal().sub_(1e-9 * float(a.diagonal().mean()))
    assert not spd_inverse_by_blocks(a)[1]
    inverse, used = select._spd_inverse(a, 0.0)
    assert used > 0
    expected = torch.linalg.inv(a + used * torch.eye(n, dtype=a.dtype))
    assert float((inverse - expected).norm() / expected.norm()) < 1e-6


def test_greedy_inverse_on_cpu_is_the_blocked_one():
    """From BLOCKED_INVERSE_MIN_WIDTH on, the greedy's CPU inverse is the recursion's (the same tensor,
    bit for bit); below, LAPACK's."""
    a = _gelu_covariance(select.BLOCKED_INVERSE_MIN_WIDTH, 1500, seed=2).float()
    lam = 1e-3 * float(a.diagonal().mean())
    inverse, used = select._spd_inverse(a, lam)
    shifted = a.clone()
    shifted.diagonal().add_(lam)
    assert used == lam and torch.equal(inverse, spd_inverse_by_blocks(shifted)[0])
    small, shifted_small = a[:300, :300], shifted[:300, :300]
    inverse, _ = select._spd_inverse(small, lam)
    assert torch.equal(inverse, torch.cholesky_inverse(torch.linalg.cholesky(shifted_small)))
