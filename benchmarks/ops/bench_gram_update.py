"""Benchmark of ``corp::gram_update_``: the Triton Gram (SYRK) + column-sum kernel vs PyTorch.

Two ways to run it:

* pytest-benchmark pairs (CUDA only; skip without a GPU): Gram + column sums at
  D ∈ {768, 3072, 5120} (65 536 bf16 tokens) against ``torch.mm(X.T, X, out_dtype=float32)``
  + ``X.sum(0)``. Each pair shares a benchmark group; ``extra_info`` holds TFLOP/s (full-product
  count, 2·N·D²) and, for Triton, the speedup over the baseline's median::

      pytest benchmarks/ops/bench_gram_update.py -s --benchmark-columns=median,min,max

* the wider table timed with ``triton.testing.do_bench`` (median): D ∈ {768, 3072, 5120},
  64k–1M tokens, bf16 / fp32 (TF32, IEEE, column-major) / fp16, against the PyTorch baseline
  ``X.T @ X`` in the same input precision with fp32 output plus ``X.sum(0)``. TFLOP/s are counted
  as the full product, ``2·N·D²`` (+ N·D for the sums), for both, so they compare directly (the
  kernel computes only the upper tiles, about half of those products); "speedup" is torch time ÷
  Triton time. Every Triton result is checked against fp64 once (``check`` column: at most twice
  the error of torch at the same precision). Cases run in order of importance and the script stops
  starting new ones after ``--budget`` seconds. Needs a CUDA GPU; without one it says so and exits 0
  (``--dry-run``: every case at tiny sizes on the CPU in Triton's interpreter)::

      python benchmarks/ops/bench_gram_update.py [--budget 170] [--quick] [--dry-run]
"""
from __future__ import annotations

import sys

import pytest
import torch

from timing import Budget, do_bench_median_ms, empty_cache, mm_fp32_out
from timing import do_bench_main, pytest_benchmark_cuda, sync

GRAM_TOKENS = 65536
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA GPU")


def _gram_baseline(x):
    try:
        return torch.mm(x.T, x, out_dtype=torch.float32), x.sum(0, dtype=torch.float32)
    except (RuntimeError, TypeError):
        return x.T @ x, x.sum(0, dtype=torch.float32)


# ---------------------------------------------------------------------------- pytest-benchmark


@cuda_only
@pytest.mark.parametrize("d", [768, 3072, 5120])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gram(benchmark, impl, d):
    from corp.kernels.gram import gram_update_triton_

    benchmark.group = f"gram bf16 D={d} N={GRAM_TOKENS}"
    torch.manual_seed(0)
    x = torch.randn(GRAM_TOKENS, d, device="cuda").to(torch.bfloat16)
    gram = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    colsum = torch.zeros(d, dtype=torch.float64, device="cuda")
    if impl == "triton":
        fn = lambda: gram_update_triton_(gram, colsum, x)  # noqa: E731
    else:
        fn = lambda: _gram_baseline(x)  # noqa: E731
    seconds = pytest_benchmark_cuda(benchmark, fn)
    tflops = 2.0 * GRAM_TOKENS * d * d / seconds / 1e12
    benchmark.extra_info["tflops_full_product"] = round(tflops, 1)
    if impl == "triton":
        speedup = do_bench_median_ms(lambda: _gram_baseline(x)) / do_bench_median_ms(fn)
        benchmark.extra_info["speedup_vs_torch"] = round(speedup, 2)
        print(f"\ngram bf16 D={d} N={GRAM_TOKENS}: triton {tflops:.0f} TFLOP/s, {speedup:.2f}x torch")


# ---------------------------------------------------------------------------- do_bench table


def bench_gram(do_bench, budget: Budget, quick: bool, dev: str = "cuda", dims=(768, 3072, 5120), scale: int = 1) -> None:
    from corp.kernels.gram import gram_update_triton_

    modes = [  # (label, dtype, input_precision, token counts)
        ("bf16", torch.bfloat16, "ieee", [65536, 262144, 1048576]),
        ("fp32-tf32", torch.float32, "tf32", [65536, 262144]),
        # the same data stored column-major: Hopper's tf32 wgmma needs K-major operands, and with
        # row-major (N, D) input the xᵀ operand is not (the tf32 rows above ran at 0.2x of torch)
        ("tf32-colmaj", torch.float32, "tf32", [65536, 262144]),
        ("fp32-ieee", torch.float32, "ieee", [65536, 262144]),
        ("fp16", torch.float16, "ieee", [262144]),
    ]
    if quick:
        modes = [(m[0], m[1], m[2], m[3][:1]) for m in modes]
    modes = [(m[0], m[1], m[2], [n // scale for n in m[3]]) for m in modes]
    print("\n## Gram + column sums (upper triangle, fp64 accumulator) vs torch X.T @ X (fp32 out) + X.sum(0)")
    print(f"{'mode':<10} {'D':>5} {'tokens':>8} | {'triton ms':>9} {'TFLOP/s':>8} | {'torch ms':>9} {'TFLOP/s':>8} | "
          f"{'speedup':>7} | check")
    for label, dtype, precision, token_counts in modes:
        for d in dims:
            for n in token_counts:
                if not budget.left():
                    print(f"{label:<10} {d:>5} {n:>8} | skipped (time budget)")
                    continue
                x = torch.randn(n, d, device=dev).to(dtype)
                if label.endswith("colmaj"):
                    x = x.T.contiguous().T  # same values, column-major strides
                gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
                colsum = torch.zeros(d, dtype=torch.float64, device=dev)

                def run_triton():
                    gram_update_triton_(gram, colsum, x, input_precision=precision)

                def run_torch(exact=False):
                    return mm_fp32_out(x.T, x, exact), x.sum(0, dtype=torch.float32)

                old_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                try:
                    run_triton()  # compile + autotune (on scratch accumulators)
                    sync(dev)
                    t_tri = do_bench(run_triton, return_mode="median")
                    t_ref = do_bench(run_torch, return_mode="median")
                    # correctness of the tuned kernel on this size: one fresh update vs the baseline
                    gram.zero_(), colsum.zero_()
                    run_triton()
                    ref_g, ref_c = run_torch(exact=True)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old_tf32
                # flash-attention's rule: the kernel's error against fp64 may be at most twice the error
                # of the same computation in plain torch at the same precision (+ a floor for exact cases)
                xd = x.double()
                exact_g, exact_c = xd.T @ xd, xd.sum(0)
                del xd
                up = torch.ones(d, d, dtype=torch.bool, device=dev).triu()
                scale_g, scale_c = exact_g[up].abs().max(), exact_c.abs().max()
                err = max(((gram[up] - exact_g[up]).abs().max() / scale_g).item(),
                          ((colsum - exact_c).abs().max() / scale_c).item())
                err_torch = max(((ref_g.double()[up] - exact_g[up]).abs().max() / scale_g).item(),
                                ((ref_c.double() - exact_c).abs().max() / scale_c).item())
                check = "ok" if err <= 2 * err_torch + 1e-7 else "WORSE"
                check = f"{check} (err {err:.1e} vs torch {err_torch:.1e})"
                del exact_g, exact_c
                flops = 2.0 * n * d * d + n * d
                print(f"{label:<10} {d:>5} {n:>8} | {t_tri:>9.3f} {flops / t_tri / 1e9:>8.1f} | {t_ref:>9.3f} "
                      f"{flops / t_ref / 1e9:>8.1f} | {t_ref / t_tri:>6.2f}x | {check}", flush=True)
                del x, gram, colsum, ref_g, ref_c
                empty_cache(dev)


def main(argv=None) -> int:
    return do_bench_main("bench_gram_update", __doc__.split("\n\n")[0], bench_gram, dict(dev="cpu", dims=(40,), scale=256), argv)


if __name__ == "__main__":
    sys.exit(main())
