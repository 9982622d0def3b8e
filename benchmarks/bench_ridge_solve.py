"""pytest-benchmark: the compiled ridge solve (torch.ops.corp.ridge_solve) against torch.linalg.

Cases: batches 512×40, 768×64, 32×128 (attention-sized: many small systems,
m = n right-hand sides) and one 2560 system with 2560 right-hand sides
(MLP-sized), fp64 and fp32, on the CPU and, when present, on CUDA. Methods:
``op``, ``chol`` (cholesky_ex + cholesky_solve), ``solve`` (torch.linalg.solve).
Each benchmark's median is its pytest-benchmark median; ``test_ratio_*``
prints interleaved medians and the ratios chol/op, solve/op (targets: ≥ 1 on
the CPU for the small batches, ≥ 5 on an H100), as solve_table.py does.

    pytest benchmarks/bench_ridge_solve.py --benchmark-columns=median,min,max -s
    pytest benchmarks/bench_ridge_solve.py -k "cpu and not 2560"     # quick
"""
import pytest
import torch

from corp import _compiled
from solve_table import LARGE_CASES, SMALL_CASES, make_case, methods, time_all

pytestmark = pytest.mark.skipif(
    not _compiled.available(), reason=f"compiled solver not built: {_compiled.BUILD_COMMAND}"
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _compiled.cuda_available()), reason="needs a GPU and the CUDA kernels"))]
CASES = [pytest.param(c, id=c[0].split()[0]) for c in SMALL_CASES + LARGE_CASES]
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def _rounds(case):
    return 3 if case[2] >= 1024 else 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["op", "chol", "solve"])
def test_ridge_solve(benchmark, method, case, dtype, device):
    label, batch, n, m = case
    a, b, lam = make_case(batch, n, m, dtype, device)
    fn = methods(a, b, lam)[method]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.group = f"{label} {str(dtype)[6:]} {device}"
    benchmark.pedantic(run, rounds=_rounds(case), warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_ratio(benchmark, case, dtype, device):
    label, batch, n, m = case
    a, b, lam = make_case(batch, n, m, dtype, device)
    fns = methods(a, b, lam)
    med = time_all(fns, _rounds(case), device, budget_s=20.0)
    ratios = {"chol_over_op": med["chol"] / med["op"], "solve_over_op": med["solve"] / med["op"]}
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in med.items()}, **ratios)
    benchmark.group = "ratios"
    benchmark.pedantic(fns["op"], rounds=1, warmup_rounds=0)
    print(f"\n{label} {dtype} {device}: op {med['op'] * 1e3:.3f} ms, chol {med['chol'] * 1e3:.3f} ms, "
          f"solve {med['solve'] * 1e3:.3f} ms; chol/op {ratios['chol_over_op']:.2f}, "
          f"solve/op {ratios['solve_over_op']:.2f}")
    x = fns["op"]()
    y = fns["chol"]()
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert float((x - y).abs().max() / y.abs().max()) < tol
