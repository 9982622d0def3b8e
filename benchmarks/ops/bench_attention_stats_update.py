"""Benchmark of ``corp::attention_stats_update_``: the fused Triton attention-statistics kernel vs PyTorch.

Per head ``Σqqᵀ``, ``Σkkᵀ``, ``Σq_j²k_j²`` into fp64 accumulators, read from the qkv projection
output of DeiT-B (12 heads of 64) and DeiT-III-H (16 heads of 80). Two ways to run it:

* pytest-benchmark pairs (CUDA only; skip without a GPU): 262 144 bf16 tokens against batched
  matmuls on strided views plus the fp32 score; ``extra_info`` holds TFLOP/s, GB/s and, for
  Triton, the speedup over the baseline's median::

      pytest benchmarks/ops/bench_attention_stats_update.py -s --benchmark-columns=median,min,max

* the wider table timed with ``triton.testing.do_bench`` (median): 64k–1M bf16 / fp32 tokens,
  against the fastest of two plain-PyTorch formulations (batched matmuls on strided views with
  fp32 output, and corp's reference, :func:`corp.reference.attention_stats_update_`, that upcasts
  q and k to fp32 first). Every Triton result is checked against fp64 once (``check`` column: at
  most twice the error of torch at the same precision). The script stops starting new cases after
  ``--budget`` seconds. Needs a CUDA GPU; without one it says so and exits 0 (``--dry-run``: every
  case at tiny sizes on the CPU in Triton's interpreter)::

      python benchmarks/ops/bench_attention_stats_update.py [--budget 170] [--quick] [--dry-run]
"""
from __future__ import annotations

import sys

import pytest
import torch

from timing import Budget, bmm_fp32_out, do_bench_median_ms, empty_cache
from timing import do_bench_main, pytest_benchmark_cuda, sync

ATTN_TOKENS = 262144
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA GPU")


def _attention_baseline(qkv, h, d):
    x = qkv.view(qkv.shape[0], 3, h, d)
    q, k = x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)
    try:
        gq = torch.bmm(q.mT, q, out_dtype=torch.float32)
        gk = torch.bmm(k.mT, k, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        gq, gk = torch.bmm(q.mT, q), torch.bmm(k.mT, k)
    return gq, gk, (q.float() * k.float()).square_().sum(1)


# ---------------------------------------------------------------------------- pytest-benchmark


@cuda_only
@pytest.mark.parametrize("h,d", [(12, 64), (16, 80)], ids=["deit_base", "deit3_huge"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_attention_stats(benchmark, impl, h, d):
    from corp.kernels.attention_stats import attention_stats_update_triton_

    benchmark.group = f"attention stats bf16 {h}x{d} N={ATTN_TOKENS}"
    torch.manual_seed(0)
    qkv = torch.randn(ATTN_TOKENS, 3 * h * d, device="cuda").to(torch.bfloat16)
    acc = [torch.zeros(h, d, d, dtype=torch.float64, device="cuda") for _ in range(2)]
    acc.append(torch.zeros(h, d, dtype=torch.float64, device="cuda"))
    if impl == "triton":
        fn = lambda: attention_stats_update_triton_(*acc, qkv, h, d)  # noqa: E731
    else:
        fn = lambda: _attention_baseline(qkv, h, d)  # noqa: E731
    seconds = pytest_benchmark_cuda(benchmark, fn)
    benchmark.extra_info["tflops"] = round(4.0 * ATTN_TOKENS * h * d * d / seconds / 1e12, 2)
    benchmark.extra_info["gb_per_s"] = round(ATTN_TOKENS * 2 * h * d * 2 / seconds / 1e9, 0)
    if impl == "triton":
        speedup = do_bench_median_ms(lambda: _attention_baseline(qkv, h, d)) / do_bench_median_ms(fn)
        benchmark.extra_info["speedup_vs_torch"] = round(speedup, 2)
        print(f"\nattention stats bf16 {h}x{d} N={ATTN_TOKENS}: {speedup:.2f}x torch")


# ---------------------------------------------------------------------------- do_bench table


def bench_attention(do_bench, budget: Budget, quick: bool, dev: str = "cuda", scale: int = 1) -> None:
    from corp import reference
    from corp.kernels.attention_stats import attention_stats_update_triton_

    print("\n## Attention statistics (per head Σqqᵀ, Σkkᵀ, Σq²k², fp64 accumulators) vs best plain PyTorch")
    print(f"{'dtype':<6} {'H x d':>8} {'tokens':>8} | {'triton ms':>9} {'TFLOP/s':>8} {'GB/s':>7} | "
          f"{'bmm ms':>8} {'ref ms':>8} | {'speedup':>7} | check")
    token_counts = [n // scale for n in ([65536] if quick else [65536, 262144, 1048576])]
    for dtype in (torch.bfloat16, torch.float32):
        for h, d in ((12, 64), (16, 80)):
            for n in token_counts:
                name = "bf16" if dtype == torch.bfloat16 else "fp32"
                if not budget.left():
                    print(f"{name:<6} {f'{h}x{d}':>8} {n:>8} | skipped (time budget)")
                    continue
                qkv = torch.randn(n, 3 * h * d, device=dev).to(dtype)
                acc = [torch.zeros(h, d, d, dtype=torch.float64, device=dev) for _ in range(2)]
                acc.append(torch.zeros(h, d, dtype=torch.float64, device=dev))
                ref_acc = [torch.zeros_like(t) for t in acc]

                def run_triton():
                    attention_stats_update_triton_(*acc, qkv, h, d)

                def run_bmm(exact=False):
                    x = qkv.view(n, 3, h, d)
                    q, k = x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)  # (H, N, d) strided views
                    gq = bmm_fp32_out(q.mT, q, exact)
                    gk = bmm_fp32_out(k.mT, k, exact)
                    s = (q.float() * k.float()).square_().sum(1)
                    return gq, gk, s

                def run_reference():  # corp's torch path: fp32 upcast, bmm, fp64 accumulators
                    reference.attention_stats_update_(*ref_acc, qkv, h, d)

                run_triton()
                sync(dev)
                t_tri = do_bench(run_triton, return_mode="median")
                t_bmm = do_bench(run_bmm, return_mode="median")
                t_ref = do_bench(run_reference, return_mode="median")
                for t in acc:
                    t.zero_()
                run_triton()
                gq, gk, s = run_bmm(exact=False)
                x64 = qkv.view(n, 3, h, d).double()
                q64, k64 = x64[:, 0].transpose(0, 1), x64[:, 1].transpose(0, 1)
                exact = (q64.mT @ q64, k64.mT @ k64, (q64 * k64).square().sum(1))
                del x64, q64, k64
                err = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(acc, exact))
                err_torch = max(((b.double() - e).abs().max() / e.abs().max()).item() for b, e in zip((gq, gk, s), exact))
                check = "ok" if err <= 2 * err_torch + 1e-7 else "WORSE"
                check = f"{check} (err {err:.1e} vs torch {err_torch:.1e})"
                flops = 2 * (2.0 * n * h * d * d) + 3.0 * n * h * d
                read = n * 2 * h * d * qkv.element_size()
                best = min(t_bmm, t_ref)
                print(f"{name:<6} {f'{h}x{d}':>8} {n:>8} | {t_tri:>9.3f} {flops / t_tri / 1e9:>8.1f} "
                      f"{read / t_tri / 1e6:>7.0f} | {t_bmm:>8.3f} {t_ref:>8.3f} | {best / t_tri:>6.2f}x | "
                      f"{check}", flush=True)
                del qkv, acc, ref_acc, gq, gk, s
                empty_cache(dev)


def main(argv=None) -> int:
    return do_bench_main("bench_attention_stats_update", __doc__.split("\n\n")[0], bench_attention, dict(dev="cpu", scale=512), argv)


if __name__ == "__main__":
    sys.exit(main())
