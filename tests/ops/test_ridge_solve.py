"""``corp::ridge_solve``: batched damped Cholesky solves, every implementation, against torch.linalg in fp64.

* the PyTorch reference (:func:`corp.reference.ridge_solve`, the op's CPU kernel), through
  ``ops.REFERENCE.ridge_solve`` (the wrapper that validates shapes and damping): runs everywhere;
* the compiled solver (csrc/): its CPU kernel ``corp._compiled.module().ridge_solve_cpu`` (what
  ``ops.resolve("compiled", "cpu")`` calls) and, on CUDA, the registered op
  ``torch.ops.corp.ridge_solve`` whose CUDA kernel it is. The CUDA cases run only with a GPU and an
  extension built with its CUDA kernels. These tests skip only when the extension is not built (and
  fail when the build record says that a build was attempted and failed, so that a compile error
  cannot pass CI); the tests marked ``runs_without_extension`` do not need it;
* the op's registration (schema, fake) and the backend resolution of :mod:`corp.ops`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from corp import _compiled, ops, reference
from corp.reference import DAMPING_GROWTH, MAX_DAMPING_RETRIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_OK = torch.cuda.is_available() and _compiled.available() and _compiled.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and the CUDA kernels"))]


def runs_without_extension(test):
    """Mark a test that does not need the compiled extension (the autouse fixture then lets it run)."""
    test.runs_without_extension = True
    return test


@pytest.fixture(autouse=True)
def _needs_extension(request):
    if getattr(request.function, "runs_without_extension", False):
        return
    if not _compiled.available():
        record = _compiled.build_record()
        if record is not None and record.get("status") != "built":
            pytest.fail(f"the extension build failed: {json.dumps(record)}")
        pytest.skip(f"compiled solver not built ({_compiled.load_error()}); build: {_compiled.BUILD_COMMAND}")


def op(a, b, lam, retries=MAX_DAMPING_RETRIES, growth=DAMPING_GROWTH):
    """The compiled solver on a's device: its CPU kernel (the registered op's CPU kernel is the
    reference), or the registered op on CUDA (whose CUDA kernel is the compiled one)."""
    if a.device.type == "cpu":
        return _compiled.module().ridge_solve_cpu(a, b, lam, retries, growth)
    return torch.ops.corp.ridge_solve(a, b, lam, retries, growth)


def spd(batch, n, dtype=torch.float64, device="cpu", seed=0, rank=None):
    """Gram matrices X Xᵀ / k of random X (n × k); rank < n makes them singular."""
    g = torch.Generator().manual_seed(seed)
    k = rank if rank is not None else n + 5
    x = torch.randn(batch, n, k, generator=g, dtype=torch.float64)
    return (x @ x.transpose(1, 2) / k).to(dtype=dtype, device=device)


def rhs(batch, n, m, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, m, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def gram(b, n, rank=None, seed=0):
    """Unscaled Grams X Xᵀ of random X (n × rank, default 2n), fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, rank or 2 * n, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2)


def linalg_reference(a, b, lam):
    """(A + λI)⁻¹ B by torch.linalg in fp64."""
    a64, b64, l64 = a.double(), b.double(), lam.double()
    eye = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    factor = torch.linalg.cholesky(a64 + l64[:, None, None] * eye)
    return torch.cholesky_solve(b64, factor)


def backward_error(a, b, lam, x):
    """max_b ‖(A + λI)X − B‖ / (‖A + λI‖ ‖X‖ + ‖B‖), in fp64."""
    a64 = a.double() + lam.double()[:, None, None] * torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    r = a64 @ x.double() - b.double()
    num = torch.linalg.matrix_norm(r)
    den = torch.linalg.matrix_norm(a64) * torch.linalg.matrix_norm(x.double()) + torch.linalg.matrix_norm(b.double())
    return float((num / den).max())


# ----------------------------------------------------------------- the PyTorch reference


@runs_without_extension
@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (3, 7, 1), (5, 33, 9), (2, 80, 129)])
def test_ridge_solve_matches_linalg_solve(b, n, m):
    a = gram(b, n)
    rhs_ = torch.randn(b, n, m, dtype=torch.float64)
    lam = torch.rand(b, dtype=torch.float64) * 1e-2
    sol = ops.REFERENCE.ridge_solve(a, rhs_, lam)
    ref = torch.linalg.solve(a + lam[:, None, None] * torch.eye(n, dtype=torch.float64), rhs_)
    assert sol.ok.all()
    assert torch.equal(sol.damping, lam)
    torch.testing.assert_close(sol.solution, ref, rtol=1e-9, atol=1e-9)


@runs_without_extension
def test_ridge_solve_retries_singular_with_more_damping():
    a = gram(4, 12, rank=3)  # rank 3 of 12: singular
    a[1] = torch.eye(12, dtype=torch.float64)  # one well-posed system in the batch
    rhs_ = torch.randn(4, 12, 2, dtype=torch.float64)
    sol = ops.REFERENCE.ridge_solve(a, rhs_, torch.zeros(4, dtype=torch.float64))
    assert sol.ok.all() and torch.isfinite(sol.solution).all()
    assert sol.damping[1] == 0  # untouched where the first factorisation worked
    for i in (0, 2, 3):
        assert sol.damping[i] > 0
        # backward error: the solve is as exact as the conditioning allows
        damped = a[i] + sol.damping[i] * torch.eye(12, dtype=torch.float64)
        residual = (damped @ sol.solution[i] - rhs_[i]).norm()
        assert residual <= 1e-10 * (damped.norm() * sol.solution[i].norm() + rhs_[i].norm())


@runs_without_extension
def test_ridge_solve_reports_failure_instead_of_garbage():
    a = -torch.eye(5, dtype=torch.float64)[None] * 1e30  # negative definite: no damping rescues it
    sol = ops.REFERENCE.ridge_solve(a, torch.ones(1, 5, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert not sol.ok[0]
    assert torch.count_nonzero(sol.solution) == 0
    assert sol.damping[0] > 0 and torch.isfinite(sol.damping).all()
    assert MAX_DAMPING_RETRIES >= 1


@runs_without_extension
def test_ridge_solve_rejects_bad_arguments():
    solve = ops.REFERENCE.ridge_solve
    with pytest.raises(ValueError, match="damping"):
        solve(gram(1, 3), torch.ones(1, 3, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="rhs"):
        solve(gram(1, 3), torch.ones(1, 4, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


# ----------------------------------------------------------------- the compiled solver: build


def test_build_record_has_no_error():
    """A failed CUDA (or CPU) compile in auto mode installs without it but is recorded: fail here."""
    record = _compiled.build_record()
    if record is None:
        pytest.skip("no build record (extension built by JIT or by another route)")
    assert record["status"] == "built", record
    assert record["cuda_error"] is None, record["cuda_error"]
    assert record["error"] is None, record["error"]
    assert bool(_compiled._module.with_cuda) == bool(record["with_cuda"])


# ----------------------------------------------------------------- accuracy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 300])
@pytest.mark.parametrize("m", ["one", "many"])
@pytest.mark.parametrize("n", [1, 7, 33, 80, 129])
def test_matches_linalg_fp64(n, m, batch, device):
    m = 1 if m == "one" else n + 5
    a, b = spd(batch, n, device=device), rhs(batch, n, m, device=device)
    lam = torch.full((batch,), 1e-2, dtype=torch.float64, device=device)
    x, used, ok = op(a, b, lam)
    assert x.shape == (batch, n, m) and x.dtype == torch.float64 and x.device.type == device
    assert ok.dtype == torch.bool and bool(ok.all())
    torch.testing.assert_close(used, lam, rtol=0, atol=0)  # well conditioned: no retry
    torch.testing.assert_close(x, linalg_reference(a, b, lam), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [7, 33, 80, 128, 129])
def test_matches_linalg_fp32(n, device):
    batch, m = 300, 45
    a, b = spd(batch, n, torch.float32, device), rhs(batch, n, m, torch.float32, device)
    lam = torch.full((batch,), 1e-1, dtype=torch.float32, device=device)
    x, used, ok = op(a, b, lam)
    assert x.dtype == torch.float32 and bool(ok.all())
    ref = linalg_reference(a, b, lam)
    assert float((x.double() - ref).abs().max() / ref.abs().max()) < 1e-4
    assert backward_error(a, b, lam, x) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [200, 256, 257, 300])
def test_larger_systems_kernel_and_library_paths(n, device):
    """n up to 256 with a full batch runs the CPU kernel; beyond, or a single system, torch.linalg."""
    for batch in (1, 2 * torch.get_num_threads() + 1):
        a, b = spd(batch, n, device=device, seed=n), rhs(batch, n, 37, device=device)
        lam = torch.full((batch,), 1e-2, dtype=torch.float64, device=device)
        x, used, ok = op(a, b, lam)
        assert bool(ok.all())
        torch.testing.assert_close(x, linalg_reference(a, b, lam), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_many_right_hand_sides_in_chunks(device):
    a, b = spd(3, 64, device=device), rhs(3, 64, 1000, device=device)
    lam = torch.full((3,), 1e-2, dtype=torch.float64, device=device)
    x, _, ok = op(a, b, lam)
    assert bool(ok.all())
    torch.testing.assert_close(x, linalg_reference(a, b, lam), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [33, 300])
def test_reads_lower_triangle_only(n, device):
    """Like torch.linalg.cholesky: the strict upper triangle is never read (NaN there changes nothing)."""
    a, b = spd(20, n, device=device), rhs(20, n, 4, device=device)
    lam = torch.full((20,), 1e-2, dtype=torch.float64, device=device)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
    x, _, ok = op(a.masked_fill(upper, float("nan")), b, lam)
    assert bool(ok.all())
    torch.testing.assert_close(x, op(a, b, lam)[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    for batch, n, m in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        a = spd(batch, n, device=device) if n else torch.zeros(batch, 0, 0, dtype=torch.float64, device=device)
        b = torch.zeros(batch, n, m, dtype=torch.float64, device=device)
        lam = torch.ones(batch, dtype=torch.float64, device=device)
        x, used, ok = op(a, b, lam)
        assert x.shape == (batch, n, m) and used.shape == (batch,) and ok.shape == (batch,)
        assert bool(ok.all())


# --------------------------------------------------- conditioning and failures


@pytest.mark.parametrize("device", DEVICES)
def test_singular_dead_channel_retries_at_the_floor(device):
    """A channel that is always zero (a zero row and column): λ = 0 fails exactly at its pivot, in both
    implementations, and the first retry uses the floor mean|diag|·1e-12: same status, damping and solution."""
    batch, n, dead = 300, 33, 7
    a = spd(batch, n, device=device)
    a[:, dead, :] = 0
    a[:, :, dead] = 0
    b = rhs(batch, n, 5, device=device)
    b[:, dead, :] = 0  # consistent system: the dead channel's covariance with the rest is zero
    lam = torch.zeros(batch, dtype=torch.float64, device=device)
    x, used, ok = op(a, b, lam)
    ref = ops.REFERENCE.ridge_solve(a, b, lam)
    assert bool(ok.all()) and bool(ref.ok.all())
    floor = torch.diagonal(a, dim1=1, dim2=2).abs().mean(-1) * 1e-12
    torch.testing.assert_close(used, floor, rtol=1e-12, atol=0)
    torch.testing.assert_close(used, ref.damping, rtol=1e-12, atol=0)
    assert bool(torch.isfinite(x).all())
    assert float(x[:, dead].abs().max()) == 0.0
    torch.testing.assert_close(x, ref.solution, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_deficient_is_finite_and_solves_the_damped_system(device):
    """Rank n/2 Grams with λ = 0: factorisation succeeds after retries; X is finite and
    solves (A + λ_used I) X = B to backward-error precision."""
    batch, n = 300, 33
    a, b = spd(batch, n, device=device, rank=n // 2), rhs(batch, n, 3, device=device)
    lam = torch.zeros(batch, dtype=torch.float64, device=device)
    x, used, ok = op(a, b, lam)
    ref = ops.REFERENCE.ridge_solve(a, b, lam)
    assert bool(ok.all()) and bool(torch.isfinite(x).all())
    assert bool((used > 0).all())
    # Both walk the same damping ladder (0, floor, 10·floor, ...); round-off may stop them one rung apart.
    ratio = used / ref.damping
    assert bool(((ratio > 0.099) & (ratio < 10.01)).all()), ratio
    assert backward_error(a, b, used, x) < 1e-13


@pytest.mark.parametrize("device", DEVICES)
def test_ill_conditioned_hilbert(device):
    n = 33
    i = torch.arange(n, dtype=torch.float64, device=device)
    hilbert = (1.0 / (i[:, None] + i[None, :] + 1)).expand(4, n, n).contiguous()
    b = rhs(4, n, 6, device=device)
    lam = torch.tensor([0.0, 1e-14, 1e-8, 1e-2], dtype=torch.float64, device=device)
    x, used, ok = op(hilbert, b, lam)
    assert bool(ok.all()) and bool(torch.isfinite(x).all())
    assert bool((used >= lam).all())
    torch.testing.assert_close(used[2:], lam[2:], rtol=0, atol=0)  # damped enough: no retry
    assert backward_error(hilbert, b, used, x) < 1e-14
    torch.testing.assert_close(x[3:], linalg_reference(hilbert[3:], b[3:], lam[3:]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_never_factorable_gives_zero_and_not_ok(device):
    """Every retry fails (negative definite beyond the largest damping, or NaN): ok is False, the
    solution is exactly zero (a failed factor is never used), the damping is the last one tried;
    the good matrices of the same batch are solved normally."""
    n = 9
    a = spd(4, n, device=device)
    a[1] = -1e12 * torch.eye(n, dtype=torch.float64, device=device)
    a[2, 3, 3] = float("nan")
    b = rhs(4, n, 2, device=device)
    lam = torch.ones(4, dtype=torch.float64, device=device)
    x, used, ok = op(a, b, lam)
    ref = ops.REFERENCE.ridge_solve(a, b, lam)
    assert ok.tolist() == [True, False, False, True] == ref.ok.tolist()
    assert float(x[1:3].abs().max()) == 0.0
    assert float(used[1]) == pytest.approx(DAMPING_GROWTH**MAX_DAMPING_RETRIES)
    keep = torch.tensor([0, 1, 3], device=device)  # NaN input: the reference's damping turns NaN, the op's not
    torch.testing.assert_close(used[keep], ref.damping[keep], rtol=1e-12, atol=0)
    good = torch.tensor([0, 3], device=device)
    torch.testing.assert_close(x[good], linalg_reference(a[good], b[good], lam[good]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_retry_limit_is_an_argument(device):
    a = -torch.eye(3, dtype=torch.float64, device=device)[None].repeat(2, 1, 1)
    b = rhs(2, 3, 1, device=device)
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64, device=device)
    _, used0, ok0 = op(a, b, lam, retries=0)
    assert not bool(ok0.any()) and used0.tolist() == [0.5, 0.5]
    x, used, ok = op(a, b, lam, retries=1, growth=4.0)  # 0.5·4 = 2: A + 2I = I
    assert bool(ok.all()) and used.tolist() == [2.0, 2.0]
    torch.testing.assert_close(x, b)


# ----------------------------------------------------- layouts and bad input


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_are_handled(device):
    batch, n, m = 12, 33, 6
    a, b = spd(batch, n, device=device), rhs(batch, n, m, device=device)
    lam = torch.full((batch,), 1e-2, dtype=torch.float64, device=device)
    expected = op(a, b, lam)[0]
    a_col_major = a.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, column-major strides
    b_wide = torch.zeros(batch, n, 2 * m, dtype=torch.float64, device=device)
    b_wide[:, :, ::2] = b
    lam_strided = torch.stack([lam, lam], 1)[:, 0]
    lam_expanded = torch.tensor(1e-2, dtype=torch.float64, device=device).expand(batch)
    # the same values in another layout: bit-identical solutions
    for args in [(a_col_major, b, lam), (a, b_wide[:, :, ::2], lam), (a, b, lam_strided), (a, b, lam_expanded)]:
        assert not all(t.is_contiguous() for t in args)
        x, _, ok = op(*args)
        assert bool(ok.all()) and x.is_contiguous()
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    batch_slice = op(a[::2], b[::2], lam[::2])[0]
    torch.testing.assert_close(batch_slice, expected[::2], rtol=0, atol=0)
    # The transpose is a column-major view of Aᵀ, whose lower triangle is A's upper one: X Xᵀ is
    # symmetric only to round-off (~1 ulp), so the solution agrees to fp64 precision times the
    # conditioning (cond(A + λI) ≈ 3e2 here: measured 5e-15 of max|X|), not bit for bit.
    a_t = a.transpose(1, 2)
    x, _, ok = op(a_t, b, lam)
    assert bool(ok.all()) and x.is_contiguous()
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_rejected_with_a_clear_error(device):
    a, b = spd(2, 5, device=device), rhs(2, 5, 3, device=device)
    lam = torch.ones(2, dtype=torch.float64, device=device)
    cases = [
        ((a.float(), b, lam), "same dtype"),
        ((a.half(), b.half(), lam.half()), "float32 or float64"),
        ((a[:, :4], b, lam), "matrix must be"),
        ((a, b[:, :4], lam), "rhs must be"),
        ((a, b, lam[:1]), "damping must be"),
        ((a, b, lam.cpu() if device == "cuda" else lam.reshape(2, 1)), "damping" if device == "cpu" else "device"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    with pytest.raises(RuntimeError, match="growth"):
        op(a, b, lam, growth=1.0)
    with pytest.raises(RuntimeError, match="max_retries"):
        op(a, b, lam, retries=-1)


def test_negative_damping_is_rejected_on_cpu():
    a, b = spd(2, 5), rhs(2, 5, 3)
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        op(a, b, torch.tensor([1.0, -1.0], dtype=torch.float64))


# ------------------------------------------------------- op registration


@runs_without_extension
def test_fake_implementation_and_schema():
    """The op is registered by corp.ops (extension or not); on CPU tensors it runs the reference."""
    a, b = spd(3, 7), rhs(3, 7, 2)
    lam = torch.full((3,), 1e-2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.corp.ridge_solve.default, (a, b, lam, 8, 10.0))
    x, used, ok = torch.ops.corp.ridge_solve(a, b, lam, 8, 10.0)
    assert bool(ok.all()) and torch.equal(used, lam)
    torch.testing.assert_close(x, linalg_reference(a, b, lam), rtol=1e-10, atol=1e-10)
    x, used, ok = torch.ops.corp.ridge_solve(a.to("meta"), b.to("meta"), lam.to("meta"), 8, 10.0)
    assert x.device.type == "meta" and x.shape == (3, 7, 2) and x.dtype == torch.float64
    assert used.shape == (3,) and ok.dtype == torch.bool


def test_ridge_solve_compiled_backend_matches_reference():
    a, b = spd(5, 40), rhs(5, 40, 11)
    compiled = ops.resolve("compiled", torch.device("cpu"))
    assert compiled.solve == "compiled" and compiled.ridge_solve_impl is not reference.ridge_solve
    sol_c = compiled.ridge_solve(a, b, 1e-3)  # scalar damping broadcast by the wrapper
    sol_t = ops.resolve("torch", torch.device("cpu")).ridge_solve(a, b, 1e-3)
    torch.testing.assert_close(sol_c.solution, sol_t.solution, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sol_c.damping, sol_t.damping)
    assert sol_c.ok.tolist() == sol_t.ok.tolist()
    assert ops.resolve("compiled", torch.device("cpu")).solve == "compiled"
    assert ops.resolve("auto", torch.device("cpu")).solve == "compiled"
    assert ops.resolve("torch", torch.device("cpu")).solve == "torch"


@runs_without_extension
def test_missing_extension_gives_the_build_command():
    """With the extension unavailable (CORP_DISABLE_EXT=1 in a fresh interpreter): corp works through
    the PyTorch path, "auto" falls back to it and "compiled" raises with the build command."""
    code = (
        "import torch, corp\n"
        "from corp import _compiled, ops\n"
        "assert not _compiled.available()\n"
        "assert ops.resolve('auto', torch.device('cpu')).solve == 'torch'\n"
        "x = torch.eye(3, dtype=torch.float64)[None]\n"
        "assert ops.resolve('auto', torch.device('cpu')).ridge_solve(x, x, 0.0).ok.all()\n"
        "assert torch.ops.corp.ridge_solve(x, x, torch.zeros(1, dtype=torch.float64))[2].all()\n"
        "for call in (lambda: ops.resolve('compiled', torch.device('cpu')),\n"
        "             lambda: ops.resolve('compiled', torch.device('cpu')).ridge_solve(x, x, 0.0),\n"
        "             lambda: _compiled.module()):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        assert _compiled.BUILD_COMMAND in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CORP_DISABLE_EXT="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# ------------------------------------------------------- the CUDA kernels, path by path (GPU only)
#
# ridge_solve_cuda(..., path, splits): path 1 is the warp-per-matrix kernel (n <= 32), path 2 the
# blocked shared-memory kernel (n <= 128), 0 chooses by n (what the registered op runs); splits > 0
# forces the number of warps/blocks that share one matrix's right-hand sides.

cuda_kernels = pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and the CUDA kernels")
WARP, BLOCKED = 1, 2


def cuda_op(a, b, lam, path=0, splits=0, retries=MAX_DAMPING_RETRIES, growth=DAMPING_GROWTH):
    return _compiled.module().ridge_solve_cuda(a, b, lam, retries, growth, path, splits)


@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("path,n", [(WARP, 1), (WARP, 5), (WARP, 31), (WARP, 32), (BLOCKED, 1), (BLOCKED, 7),
                                    (BLOCKED, 32), (BLOCKED, 33), (BLOCKED, 40), (BLOCKED, 63), (BLOCKED, 64),
                                    (BLOCKED, 80), (BLOCKED, 97), (BLOCKED, 127), (BLOCKED, 128)])
@pytest.mark.parametrize("m", [1, 33, 130])
def test_cuda_path_matches_fp64(path, n, m, dtype):
    """Each kernel against torch.linalg in fp64: odd n (partial warps, partial last panel), m = 1,
    m not a multiple of 32, m over two right-hand-side chunks of the blocked kernel."""
    batch = 37
    a, b = spd(batch, n, dtype, "cuda", seed=n), rhs(batch, n, m, dtype, "cuda", seed=m)
    lam = torch.full((batch,), 1e-2, dtype=dtype, device="cuda")
    x, used, ok = cuda_op(a, b, lam, path=path)
    assert bool(ok.all()) and torch.equal(used, lam)
    ref = linalg_reference(a, b, lam)
    if dtype == torch.float64:
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    else:
        assert float((x.double() - ref).abs().max() / ref.abs().max()) < 1e-4
        assert backward_error(a, b, lam, x) < 1e-6


@cuda_kernels
@pytest.mark.parametrize("label,batch,n,m", [("512x40", 512, 40, 40), ("768x64", 768, 64, 64),
                                             ("2048x32", 2048, 32, 32), ("32x128", 32, 128, 128),
                                             # the engine's attention fits at 50%: 2H systems, kept × pruned dims
                                             ("deit3-huge-qk", 32, 40, 40), ("deit-base-qk", 24, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cuda_issue_shapes_match_fp64(label, batch, n, m, dtype):
    """The benchmark shapes of the issue (batch × n, m = n) and the engine's attention-fit shapes,
    through the op's own path choice."""
    a, b = spd(batch, n, dtype, "cuda", seed=batch), rhs(batch, n, m, dtype, "cuda")
    lam = torch.full((batch,), 1e-3, dtype=dtype, device="cuda")
    x, used, ok = op(a, b, lam)
    assert bool(ok.all())
    ref = linalg_reference(a, b, lam)
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    assert float((x.double() - ref).abs().max() / ref.abs().max()) < bound, label


@cuda_kernels
@pytest.mark.parametrize("path,n", [(WARP, 29), (BLOCKED, 29), (BLOCKED, 100)])
def test_cuda_right_hand_sides_split_across_warps_and_blocks(path, n):
    """A small batch with many right-hand sides: splitting the columns over 1, 3, 7 warps/blocks
    (each refactors the matrix) gives the same solution bit for bit, and it matches fp64."""
    batch, m = 3, 517
    a, b = spd(batch, n, device="cuda", seed=5), rhs(batch, n, m, device="cuda", seed=6)
    lam = torch.full((batch,), 1e-2, dtype=torch.float64, device="cuda")
    results = [cuda_op(a, b, lam, path=path, splits=s) for s in (1, 3, 7, 0)]
    for x, used, ok in results:
        assert bool(ok.all()) and torch.equal(used, lam)
        assert torch.equal(x, results[0][0])
    torch.testing.assert_close(results[0][0], linalg_reference(a, b, lam), rtol=1e-10, atol=1e-10)


@cuda_kernels
@pytest.mark.parametrize("path,n", [(WARP, 32), (BLOCKED, 48), (BLOCKED, 128)])
def test_cuda_bitwise_repeat(path, n):
    """Two runs on the same input are bit-identical (no atomics; λ = 0 on rank-deficient Grams: the
    retries run too)."""
    a, b = spd(200, n, device="cuda", seed=9, rank=n // 2 + 1), rhs(200, n, 70, device="cuda")
    lam = torch.zeros(200, dtype=torch.float64, device="cuda")
    first = cuda_op(a, b, lam, path=path)
    for _ in range(3):
        again = cuda_op(a, b, lam, path=path)
        for u, v in zip(first, again):
            assert torch.equal(u, v)


@cuda_kernels
@pytest.mark.parametrize("path,n", [(WARP, 24), (BLOCKED, 24), (BLOCKED, 72)])
def test_cuda_damping_retries_inside_each_kernel(path, n):
    """Rank-deficient Grams with λ = 0 retry inside the kernel; a dead channel fails exactly at its
    pivot and the first retry is the floor mean|diag|·1e-12, as in the reference; a negative
    definite matrix exhausts the retries (ok False, X = 0) without disturbing its neighbours."""
    batch = 40
    a = spd(batch, n, device="cuda", rank=n // 2)
    a[0] = spd(1, n, device="cuda", seed=3)[0]
    a[1] = spd(1, n, device="cuda", seed=4)[0]
    a[1, 5, :] = 0
    a[1, :, 5] = 0
    a[2] = -1e12 * torch.eye(n, dtype=torch.float64, device="cuda")
    b = rhs(batch, n, 9, device="cuda")
    b[1, 5] = 0
    lam = torch.zeros(batch, dtype=torch.float64, device="cuda")
    x, used, ok = cuda_op(a, b, lam, path=path)
    ref = ops.REFERENCE.ridge_solve(a, b, lam)
    assert ok.tolist() == ref.ok.tolist() and not bool(ok[2]) and bool(ok[[0, 1]].all())
    assert float(used[0]) == 0.0  # well posed: no retry
    assert float(x[2].abs().max()) == 0.0
    torch.testing.assert_close(used[1], torch.diagonal(a[1]).abs().mean() * 1e-12, rtol=1e-12, atol=0)
    good = ok.nonzero().squeeze(1)
    assert backward_error(a[good], b[good], used[good], x[good]) < 1e-13
    ratio = used[3:] / ref.damping[3:]
    assert bool(((ratio > 0.099) & (ratio < 10.01)).all()), ratio  # the same ladder, maybe one rung apart


@cuda_kernels
def test_cuda_forced_path_refuses_a_shape_it_does_not_take():
    a, b = spd(2, 33, device="cuda"), rhs(2, 33, 3, device="cuda")
    lam = torch.ones(2, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="forced CUDA path"):
        cuda_op(a, b, lam, path=WARP)
    with pytest.raises(RuntimeError, match="forced CUDA path"):
        cuda_op(spd(2, 129, device="cuda"), rhs(2, 129, 3, device="cuda"), lam, path=BLOCKED)
    with pytest.raises(RuntimeError, match="path must be"):
        cuda_op(a, b, lam, path=3)
