"""Which solve for the attention equation GQ·M·GK + λM = C (CORP.md)?

Measures, per head batch (H heads of |S| = s kept dims, fp64, Grams from
correlated random tokens):

* ``eigen``: corp.fit.sylvester_solve, the exact eigen form (2 batched eigh + 4 matmuls);
* ``chol2``: the compiled Cholesky solver (``ops.resolve("compiled", "cpu")``) on both sides,
  M = (GQ + αI)⁻¹ C (GK + βI)⁻¹ with αβ = λ: two ridge solves, but it solves a *different* equation
  (GQ M GK + β GQ M + α M GK + λM = C, an extra regulariser);
* ``kron``: the exact equation as one (s² × s²) SPD system (GK ⊗ GQ + λI) vec M = vec C
  through the compiled solver (O(s⁶)).

For each: median time, the relative residual of the true equation, and the
relative distance of M from the eigen solution.

    python benchmarks/sylvester_choice.py
"""
from __future__ import annotations

import functools
import statistics
import sys
import time

import torch

from corp import _compiled, ops
from corp.fit import sylvester_solve
from corp.reference import DAMPING_GROWTH, MAX_DAMPING_RETRIES

CASES = [(12, 8), (12, 16), (12, 32), (16, 40), (6, 64)]  # (heads, kept dims s)
TOKENS = 4000


def grams(heads: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix_q = torch.randn(heads, s, s, generator=g, dtype=torch.float64) / s**0.5
    mix_k = torch.randn(heads, s, s, generator=g, dtype=torch.float64) / s**0.5
    z = torch.randn(heads, TOKENS, s, generator=g, dtype=torch.float64)
    q = z @ mix_q + 0.1 * torch.randn(heads, TOKENS, s, generator=g, dtype=torch.float64)
    k = z @ mix_k + 0.1 * torch.randn(heads, TOKENS, s, generator=g, dtype=torch.float64)
    gq, gk = q.transpose(1, 2) @ q, k.transpose(1, 2) @ k
    c = torch.randn(heads, s, s, generator=g, dtype=torch.float64) @ gk * 0.1
    tq = torch.diagonal(gq, dim1=1, dim2=2).mean(1)
    tk = torch.diagonal(gk, dim1=1, dim2=2).mean(1)
    lam = 1e-2 * tq * tk  # a damping 10x corp.config.DEFAULT_ATTN_RIDGE: the comparison holds at any λ
    return gq, gk, c, lam, tq, tk


@functools.lru_cache(maxsize=None)
def _compiled_solve(device_type: str):
    return ops.resolve("compiled", device_type).ridge_solve_impl


def ridge(a, b, lam):
    """``(A + λI)⁻¹ B`` by the compiled solver's kernel (no wrapper checks inside the timing)."""
    return _compiled_solve(a.device.type)(a, b, lam, MAX_DAMPING_RETRIES, DAMPING_GROWTH)[0]


def eigen(gq, gk, c, lam, tq, tk):
    return sylvester_solve(gq, gk, c, lam)


def chol2(gq, gk, c, lam, tq, tk):
    alpha = lam.sqrt() * (tq / tk).sqrt()
    beta = lam.sqrt() * (tk / tq).sqrt()
    x = ridge(gq, c, alpha)  # (GQ + αI)⁻¹ C
    return ridge(gk, x.transpose(1, 2).contiguous(), beta).transpose(1, 2)


def kron(gq, gk, c, lam, tq, tk):
    h, s, _ = gq.shape
    # vec is column-major: vec(GQ M GK) = (GKᵀ ⊗ GQ) vec M
    big = torch.einsum("hab,hcd->hbcad", gk, gq).reshape(h, s * s, s * s)
    vec_c = c.transpose(1, 2).reshape(h, s * s, 1)
    vec_m = ridge(big, vec_c, lam)
    return vec_m.reshape(h, s, s).transpose(1, 2)


def median_ms(fn, args, repeats=7, budget=10.0):
    fn(*args)
    ts, start = [], time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget and len(ts) >= 3:
            break
    return statistics.median(ts) * 1e3


def main() -> int:
    if not _compiled.available():
        print(f"compiled solver not available: {_compiled.load_error()}")
        return 1
    print(f"# GQ M GK + λM = C per head, fp64, CPU {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'heads x s':<10} {'method':<6} {'ms':>9} {'residual':>10} {'|M - M_eigen|/|M_eigen|':>24}")
    for heads, s in CASES:
        args = grams(heads, s)
        gq, gk, c, lam = args[:4]
        exact = eigen(*args)
        for name, fn in (("eigen", eigen), ("chol2", chol2), ("kron", kron)):
            if name == "kron" and s > 40:
                print(f"{heads}x{s:<7} {name:<6} {'(skipped: s² = ' + str(s * s) + ')':>20}")
                continue
            ms = median_ms(fn, args)
            m = fn(*args)
            res = gq @ m @ gk + lam[:, None, None] * m - c
            rel_res = float(torch.linalg.matrix_norm(res).max() / torch.linalg.matrix_norm(c).min())
            dist = float((torch.linalg.matrix_norm(m - exact) / torch.linalg.matrix_norm(exact)).max())
            print(f"{heads}x{s:<7} {name:<6} {ms:>9.3f} {rel_res:>10.1e} {dist:>24.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
