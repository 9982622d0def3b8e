"""Reference solvers against brute force in fp64."""
import pytest
import torch

from corp.solve import MAX_DAMPING_RETRIES, ridge_solve, sylvester_solve


def _spd(b, n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, rank or 2 * n, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2)


@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (3, 7, 1), (5, 33, 9), (2, 80, 129)])
def test_ridge_solve_matches_linalg_solve(b, n, m):
    a = _spd(b, n)
    rhs = torch.randn(b, n, m, dtype=torch.float64)
    lam = torch.rand(b, dtype=torch.float64) * 1e-2
    sol = ridge_solve(a, rhs, lam)
    ref = torch.linalg.solve(a + lam[:, None, None] * torch.eye(n, dtype=torch.float64), rhs)
    assert sol.ok.all()
    assert torch.equal(sol.damping, lam)
    torch.testing.assert_close(sol.solution, ref, rtol=1e-9, atol=1e-9)


def test_ridge_solve_retries_singular_with_more_damping():
    a = _spd(4, 12, rank=3)  # rank 3 of 12: singular
    a[1] = torch.eye(12, dtype=torch.float64)  # one well-posed system in the batch
    rhs = torch.randn(4, 12, 2, dtype=torch.float64)
    sol = ridge_solve(a, rhs, torch.zeros(4, dtype=torch.float64))
    assert sol.ok.all() and torch.isfinite(sol.solution).all()
    assert sol.damping[1] == 0  # untouched where the first factorisation worked
    for i in (0, 2, 3):
        assert sol.damping[i] > 0
        # backward error: the solve is as exact as the conditioning allows
        damped = a[i] + sol.damping[i] * torch.eye(12, dtype=torch.float64)
        residual = (damped @ sol.solution[i] - rhs[i]).norm()
        assert residual <= 1e-10 * (damped.norm() * sol.solution[i].norm() + rhs[i].norm())


def test_ridge_solve_reports_failure_instead_of_garbage():
    a = -torch.eye(5, dtype=torch.float64)[None] * 1e30  # negative definite: no damping rescues it
    sol = ridge_solve(a, torch.ones(1, 5, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert not sol.ok[0]
    assert torch.count_nonzero(sol.solution) == 0
    assert sol.damping[0] > 0 and torch.isfinite(sol.damping).all()
    assert MAX_DAMPING_RETRIES >= 1


def test_ridge_solve_rejects_bad_arguments():
    with pytest.raises(ValueError, match="damping"):
        ridge_solve(_spd(1, 3), torch.ones(1, 3, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="rhs"):
        ridge_solve(_spd(1, 3), torch.ones(1, 4, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("s", [1, 3, 6])
def test_sylvester_solve_matches_kronecker_system(s):
    gq, gk = _spd(2, s, seed=1), _spd(2, s, seed=2)
    c = torch.randn(2, s, s, dtype=torch.float64)
    lam = torch.tensor([0.3, 1e-3], dtype=torch.float64)
    m = sylvester_solve(gq, gk, c, lam)
    eye = torch.eye(s * s, dtype=torch.float64)
    for i in range(2):
        # row-major vec: vec(GQ M GK) = (GQ ⊗ GKᵀ) vec(M)
        big = torch.kron(gq[i], gk[i].T.contiguous()) + lam[i] * eye  # kron rejects a transposed view in torch 2.14
        ref = torch.linalg.solve(big, c[i].reshape(-1, 1)).reshape(s, s)
        torch.testing.assert_close(m[i], ref, rtol=1e-8, atol=1e-10)
