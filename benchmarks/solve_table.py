"""Batched ridge solves: the compiled op against torch.linalg, as a table.

For each case (batch × n, with m right-hand sides) and dtype, prints the median
time of

* ``op``: ``torch.ops.corp.ridge_solve`` (corp/_compiled.py, csrc/);
* ``chol``: ``torch.linalg.cholesky_ex(A + λI)`` + ``torch.cholesky_solve``;
* ``solve``: ``torch.linalg.solve(A + λI, B)``;
* ``ref``: corp.solve.ridge_solve(backend="torch") (chol plus the retry logic),

and the ratios chol/op and solve/op (> 1: the op is faster). Runs are
interleaved (op, chol, solve, ref, op, ...) so that load on a shared machine
hits all methods alike.

    python benchmarks/solve_table.py                    # CPU, fp64 and fp32
    python benchmarks/solve_table.py --device cuda      # GPU
    python benchmarks/solve_table.py --cases small      # skip the 2560 system
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from corp import _compiled
from corp.solve import DAMPING_GROWTH, MAX_DAMPING_RETRIES, ridge_solve

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

    def op():
        return torch.ops.corp.ridge_solve(a, b, lam, MAX_DAMPING_RETRIES, DAMPING_GROWTH)[0]

    def chol():
        factor, _info = torch.linalg.cholesky_ex(a + lam[:, None, None] * eye)
        return torch.cholesky_solve(b, factor)

    def solve():
        return torch.linalg.solve(a + lam[:, None, None] * eye, b)

    def ref():
        return ridge_solve(a, b, lam, backend="torch").solution

    return {"op": op, "chol": chol, "solve": solve, "ref": ref}


def time_all(fns: dict, repeats: int, device: str, budget_s: float) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():  # warm-up (allocator, LAPACK/cuSOLVER handles, kernel attributes)
        fn()
    sync()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_agreement(fns: dict) -> float:
    x, y = fns["op"](), fns["chol"]()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="both", choices=["float32", "float64", "both"])
    p.add_argument("--cases", default="all", choices=["all", "small", "large"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per case after which repeats stop (min 3)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
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
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# corp.ridge_solve vs torch.linalg on {dev_name}; torch {torch.__version__}; median of up to "
          f"{args.repeats} interleaved runs")
    header = f"{'case':<20} {'dtype':<8} {'op ms':>10} {'chol ms':>10} {'solve ms':>10} {'ref ms':>10} " \
             f"{'chol/op':>8} {'solve/op':>8} {'max rel diff':>12}"
    print(header)
    rows = []
    for label, batch, n, m in cases:
        for dtype in dtypes:
            a, b, lam = make_case(batch, n, m, dtype, args.device)
            fns = methods(a, b, lam)
            med = time_all(fns, args.repeats, args.device, args.budget)
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
