"""Benchmark of ``corp::ridge_solve``: the compiled batched ridge solve against torch.linalg.

Methods, for each case (batch × n, with m right-hand sides) and dtype:

* ``op``: the compiled solver (csrc/), as ``ops.resolve("compiled", device)`` calls it: its CPU
  kernel on the CPU, the registered op ``torch.ops.corp.ridge_solve`` (compiled CUDA kernel) on CUDA;
* ``chol``: ``torch.linalg.cholesky_ex(A + λI)`` + ``torch.cholesky_solve``;
* ``solve``: ``torch.linalg.solve(A + λI, B)``;
* ``ref``: ``ops.REFERENCE.ridge_solve`` (the PyTorch reference: chol plus the retry logic).

Cases: batches 512×40, 768×64, 32×128 (attention-sized: many small systems, m = n right-hand
sides) and one 2560 system with 2560 right-hand sides (MLP-sized), fp64 and fp32. Two ways to run it:

* pytest-benchmark, on the CPU and, when present, on CUDA (skips without the compiled extension).
  Each ``test_ridge_solve`` median is its pytest-benchmark median; ``test_ratio`` prints
  interleaved medians and the ratios chol/op, solve/op (targets: ≥ 1 on the CPU for the small
  batches, ≥ 5 on an H100)::

      pytest benchmarks/ops/bench_ridge_solve.py --benchmark-columns=median,min,max -s
      pytest benchmarks/ops/bench_ridge_solve.py -k "cpu and not 2560"     # quick

* a table of interleaved medians (op, chol, solve, ref, op, ...: load on a shared machine hits all
  methods alike) and the ratios chol/op and solve/op (> 1: the op is faster)::

      python benchmarks/ops/bench_ridge_solve.py                    # CPU, fp64 and fp32
      python benchmarks/ops/bench_ridge_solve.py --device cuda      # GPU
      python benchmarks/ops/bench_ridge_solve.py --cases small      # skip the 2560 system
"""
from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from timing import interleaved_medians  # first: puts the repository root on sys.path

from corp import _compiled, ops
from corp.reference import DAMPING_GROWTH, MAX_DAMPING_RETRIES

# (label, batch, n, m): the attention-sized batches and the MLP-sized system.
SMALL_CASES = [("512x40", 512, 40, 40), ("768x64", 768, 64, 64), ("32x128", 32, 128, 128)]
LARGE_CASES = [("1x2560 (2560 rhs)", 1, 2560, 2560)]


def make_case(batch: int, n: int, m: int, dtype: torch.dtype, device: str, seed: int = 0):
    """SPD-ish Grams (rank-deficient half of the time, as covariances of few tokens are) and rhs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = max(1, n // 2) if n > 1 else 1
    x = torch.randn(batch, n, n + k, generator=g, dtype=torch.float64)
    a = (x @ x.transpose(1, 2) / (n + k)).to(dtype)
    b = torch.randn(batch, n, m, generator=g, dtype=torch.float64).to(dtype)
    lam = torch.full((batch,), 1e-2, dtype=dtype)
    return a.to(device), b.to(device), lam.to(device)


def methods(a, b, lam):
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    compiled = ops.resolve("compiled", a.device).ridge_solve_impl  # raw kernel: no wrapper checks timed

    def op():
        return compiled(a, b, lam, MAX_DAMPING_RETRIES, DAMPING_GROWTH)[0]

    def chol():
        factor, _info = torch.linalg.cholesky_ex(a + lam[:, None, None] * eye)
        return torch.cholesky_solve(b, factor)

    def solve():
        return torch.linalg.solve(a + lam[:, None, None] * eye, b)

    def ref():
        return ops.REFERENCE.ridge_solve(a, b, lam).solution

    return {"op": op, "chol": chol, "solve": solve, "ref": ref}


def check_agreement(fns: dict) -> float:
    x, y = fns["op"](), fns["chol"]()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------- pytest-benchmark

needs_extension = pytest.mark.skipif(
    not _compiled.available(), reason=f"compiled solver not built: {_compiled.BUILD_COMMAND}"
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _compiled.cuda_available()), reason="needs a GPU and the CUDA kernels"))]
CASES = [pytest.param(c, id=c[0].split()[0]) for c in SMALL_CASES + LARGE_CASES]
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def _rounds(case):
    return 3 if case[2] >= 1024 else 10


@needs_extension
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


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_ratio(benchmark, case, dtype, device):
    label, batch, n, m = case
    a, b, lam = make_case(batch, n, m, dtype, device)
    fns = methods(a, b, lam)
    med = interleaved_medians(fns, _rounds(case), device, budget_s=20.0)
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


# ---------------------------------------------------------------------------- table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="both", choices=["float32", "float64", "both"])
    p.add_argument("--cases", default="all", choices=["all", "small", "large"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per case after which repeats stop (min 3)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="one case only: a batch of 8 systems of N×N with N right-hand sides (a quick check)")
    args = p.parse_args(argv)

    if not _compiled.available():
        print(f"compiled solver not available: {_compiled.load_error()}\nbuild: {_compiled.BUILD_COMMAND}")
        return 1
    if args.device == "cuda" and not _compiled.cuda_available():
        print("CUDA requested but no GPU or the extension has no CUDA kernels")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"float32": [torch.float32], "float64": [torch.float64], "both": [torch.float64, torch.float32]}[args.dtype]
    cases = {"all": SMALL_CASES + LARGE_CASES, "small": SMALL_CASES, "large": LARGE_CASES}[args.cases]
    if args.size is not None:
        cases = [(f"8x{args.size}", 8, args.size, args.size)]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# corp::ridge_solve (compiled) vs torch.linalg on {dev_name}; torch {torch.__version__}; median of up to "
          f"{args.repeats} interleaved runs")
    header = f"{'case':<20} {'dtype':<8} {'op ms':>10} {'chol ms':>10} {'solve ms':>10} {'ref ms':>10} " \
             f"{'chol/op':>8} {'solve/op':>8} {'max rel diff':>12}"
    print(header)
    rows = []
    for label, batch, n, m in cases:
        for dtype in dtypes:
            a, b, lam = make_case(batch, n, m, dtype, args.device)
            fns = methods(a, b, lam)
            med = interleaved_medians(fns, args.repeats, args.device, args.budget)
            diff = check_agreement(fns)
            row = dict(case=label, batch=batch, n=n, m=m, dtype=str(dtype).replace("torch.", ""),
                       device=dev_name, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                       chol_over_op=med["chol"] / med["op"], solve_over_op=med["solve"] / med["op"], max_rel_diff=diff)
            rows.append(row)
            print(f"{label:<20} {row['dtype']:<8} {row['op_ms']:>10.3f} {row['chol_ms']:>10.3f} "
                  f"{row['solve_ms']:>10.3f} {row['ref_ms']:>10.3f} {row['chol_over_op']:>8.2f} "
                  f"{row['solve_over_op']:>8.2f} {diff:>12.1e}", flush=True)
            del a, b, lam, fns
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
