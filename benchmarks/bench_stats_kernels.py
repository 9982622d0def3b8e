"""pytest-benchmark: Triton statistics kernels vs their PyTorch baselines (CUDA only).

Gram + column sums at D ∈ {768, 3072, 5120} (65 536 bf16 tokens) against
``torch.mm(X.T, X, out_dtype=float32)`` + ``X.sum(0)``; attention statistics of
DeiT-B (12×64) and DeiT-III-H (16×80) qkv outputs (262 144 bf16 tokens)
against batched matmuls on strided views plus the fp32 score. Each pair shares
a benchmark group; ``extra_info`` holds TFLOP/s (full-product count, 2·N·D²
for the Gram) and, for Triton, the speedup over the baseline's median. The
wider sweep with ``triton.testing.do_bench`` is ``stats_kernels_do_bench.py``.

Run: pytest benchmarks/bench_stats_kernels.py -s --benchmark-columns=median,min,max
Skips without a CUDA GPU.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA GPU")

GRAM_TOKENS = 65536
ATTN_TOKENS = 262144


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / autotune / cuBLAS heuristics outside the timing
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
    return benchmark.stats.stats.median


def _median_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def _gram_baseline(x):
    try:
        return torch.mm(x.T, x, out_dtype=torch.float32), x.sum(0, dtype=torch.float32)
    except (RuntimeError, TypeError):
        return x.T @ x, x.sum(0, dtype=torch.float32)


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
    seconds = _timed(benchmark, fn)
    tflops = 2.0 * GRAM_TOKENS * d * d / seconds / 1e12
    benchmark.extra_info["tflops_full_product"] = round(tflops, 1)
    if impl == "triton":
        speedup = _median_ms(lambda: _gram_baseline(x)) / _median_ms(fn)
        benchmark.extra_info["speedup_vs_torch"] = round(speedup, 2)
        print(f"\ngram bf16 D={d} N={GRAM_TOKENS}: triton {tflops:.0f} TFLOP/s, {speedup:.2f}x torch")


def _attention_baseline(qkv, h, d):
    x = qkv.view(qkv.shape[0], 3, h, d)
    q, k = x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)
    try:
        gq = torch.bmm(q.mT, q, out_dtype=torch.float32)
        gk = torch.bmm(k.mT, k, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        gq, gk = torch.bmm(q.mT, q), torch.bmm(k.mT, k)
    return gq, gk, (q.float() * k.float()).square_().sum(1)


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
    seconds = _timed(benchmark, fn)
    benchmark.extra_info["tflops"] = round(4.0 * ATTN_TOKENS * h * d * d / seconds / 1e12, 2)
    benchmark.extra_info["gb_per_s"] = round(ATTN_TOKENS * 2 * h * d * 2 / seconds / 1e9, 0)
    if impl == "triton":
        speedup = _median_ms(lambda: _attention_baseline(qkv, h, d)) / _median_ms(fn)
        benchmark.extra_info["speedup_vs_torch"] = round(speedup, 2)
        print(f"\nattention stats bf16 {h}x{d} N={ATTN_TOKENS}: {speedup:.2f}x torch")
