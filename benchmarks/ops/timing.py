"""Timing helpers shared by the op benchmarks (benchmarks/ops/bench_*.py).

Named ``timing`` rather than ``common`` so that it never shadows tests/ops/common.py when one
pytest session collects both folders (neither folder is a package: each is put on sys.path).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

# the repository root, for running a script from a checkout without installing corp
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def empty_cache(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``a @ b`` in the inputs' precision with an fp32 result (16-bit output where torch lacks
    ``out_dtype``, e.g. on the CPU; ``exact`` then upcasts first, for the correctness check)."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return a.float() @ b.float() if exact else a @ b


def bmm_fp32_out(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Batched :func:`mm_fp32_out`."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return torch.bmm(a.float(), b.float()) if exact else torch.bmm(a, b)


def cpu_median_ms(fn, return_mode="median", reps=3):
    """Stand-in for do_bench in --dry-run (CPU, interpreter): median wall time of a few calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def do_bench_median_ms(fn) -> float:
    """``triton.testing.do_bench`` median, in milliseconds (CUDA)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


class Budget:
    """Wall-clock budget: the tables stop starting new cases once it is spent."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.seconds


def pytest_benchmark_cuda(benchmark, fn, rounds: int = 20, warmup_rounds: int = 3) -> float:
    """Time ``fn`` with pytest-benchmark's ``benchmark`` fixture, synchronising CUDA after each call;
    the first call (compile, autotune, cuBLAS heuristics) is outside the timing. Returns the median (s)."""
    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return benchmark.stats.stats.median


def interleaved_medians(fns: dict, repeats: int, device, budget_s: float) -> dict:
    """Median seconds per function, runs interleaved (a, b, c, a, b, c, ...) so that load on a shared
    machine hits all alike; stops repeating after ``budget_s`` (at least 3 rounds)."""
    for fn in fns.values():  # warm-up (allocator, LAPACK/cuSOLVER handles, kernel attributes)
        fn()
    sync(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_gpu_header() -> None:
    """One line: GPU, torch and triton versions, date."""
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d')}")


def do_bench_main(name: str, description: str, bench, dry_run_kwargs: dict, argv=None) -> int:
    """The command line of an op's do_bench table: ``--budget``, ``--quick``, ``--dry-run``.

    ``bench(do_bench, budget, quick, **kwargs)`` prints the table; ``--dry-run`` calls it with
    :func:`cpu_median_ms` in Triton's interpreter at ``dry_run_kwargs`` (tiny CPU sizes).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget", type=float, default=170.0, help="stop starting new cases after this many seconds")
    parser.add_argument("--quick", action="store_true", help="smallest token count only")
    parser.add_argument("--dry-run", action="store_true",
                        help="every case at tiny sizes on the CPU in Triton's interpreter: checks the script, "
                             "measures nothing meaningful")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        bench(cpu_median_ms, Budget(args.budget), True, **dry_run_kwargs)
        return 0
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device, nothing to measure (the kernel's GPU figures need a GPU)")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.testing import do_bench

    print_gpu_header()
    torch.manual_seed(0)
    bench(do_bench, Budget(args.budget), args.quick)
    return 0
