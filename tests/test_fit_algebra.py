"""The algebra of the fits (corp/fit.py) against brute force in fp64."""
import pytest
import torch

from corp.fit import sub_blocks, sylvester_solve


def _spd(b, n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, rank or 2 * n, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2)


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


def test_sub_blocks_match_indexing():
    g = torch.randn(3, 7, 7, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(3)])
    cols = torch.stack([torch.randperm(7, generator=gen)[:2] for _ in range(3)])
    out = sub_blocks(g, rows, cols)
    assert out.shape == (3, 4, 2)
    for b in range(3):
        assert torch.equal(out[b], g[b][rows[b]][:, cols[b]])
