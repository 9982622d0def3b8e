"""Triton statistics kernels vs PyTorch, timed with ``triton.testing.do_bench`` (median).

Gram (SYRK) + column sums, D ∈ {768, 3072, 5120}, 64k–1M tokens, against the
PyTorch baseline ``X.T @ X`` in the same input precision with fp32 output
(``torch.mm(..., out_dtype=torch.float32)`` for 16-bit inputs) plus ``X.sum(0)``.
TFLOP/s are counted as the full product, ``2·N·D²`` (+ N·D for the sums), for
both, so they compare directly (the kernel computes only the upper tiles, about
half of those products); "speedup" is torch time ÷ Triton time.

Attention statistics (per head ``Σqqᵀ``, ``Σkkᵀ``, ``Σq_j²k_j²``) for DeiT-B
(12 heads of 64) and DeiT-III-H (16 heads of 80), against the fastest of two
plain-PyTorch formulations (batched matmuls on strided views with fp32 output,
and the corp reference that upcasts q and k to fp32 first).

Every Triton result is checked against its baseline once (``check`` column).
Cases run in order of importance and the script stops starting new ones after
``--budget`` seconds. Needs a CUDA GPU; without one it says so and exits 0.

    python benchmarks/stats_kernels_do_bench.py [--budget 170] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``a @ b`` in the inputs' precision with an fp32 result (16-bit output where torch lacks
    ``out_dtype``, e.g. on the CPU; ``exact`` then upcasts first, for the correctness check)."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return a.float() @ b.float() if exact else a @ b


def _bmm_fp32_out(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> torch.Tensor:
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return torch.bmm(a.float(), b.float()) if exact else torch.bmm(a, b)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _empty_cache(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def _cpu_median_ms(fn, return_mode="median", reps=3):
    """Stand-in for do_bench in --dry-run (CPU, interpreter): median wall time of a few calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.seconds


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
                    return _mm_fp32_out(x.T, x, exact), x.sum(0, dtype=torch.float32)

                old_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                try:
                    run_triton()  # compile + autotune (on scratch accumulators)
                    _sync(dev)
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
                _empty_cache(dev)


def bench_attention(do_bench, budget: Budget, quick: bool, dev: str = "cuda", scale: int = 1) -> None:
    from corp.kernels.attention_stats import attention_stats_update_triton_
    from corp.stats import attention_stats_update_

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
                    gq = _bmm_fp32_out(q.mT, q, exact)
                    gk = _bmm_fp32_out(k.mT, k, exact)
                    s = (q.float() * k.float()).square_().sum(1)
                    return gq, gk, s

                def run_reference():  # corp's torch path: fp32 upcast, bmm, fp64 accumulators
                    attention_stats_update_(*ref_acc, qkv, h, d, backend="torch")

                run_triton()
                _sync(dev)
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
                _empty_cache(dev)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=170.0, help="stop starting new cases after this many seconds")
    parser.add_argument("--quick", action="store_true", help="smallest token count only")
    parser.add_argument("--only", choices=("gram", "attention"), default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="every case at tiny sizes on the CPU in Triton's interpreter: checks the script, "
                             "measures nothing meaningful")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        budget = Budget(args.budget)
        if args.only in (None, "gram"):
            bench_gram(_cpu_median_ms, budget, True, dev="cpu", dims=(40,), scale=256)
        if args.only in (None, "attention"):
            bench_attention(_cpu_median_ms, budget, True, dev="cpu", scale=512)
        return 0
    if not torch.cuda.is_available():
        print("stats_kernels_do_bench: no CUDA device, nothing to measure (the kernels' GPU figures need a GPU)")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.testing import do_bench

    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d')}")
    torch.manual_seed(0)
    budget = Budget(args.budget)
    if args.only in (None, "gram"):
        bench_gram(do_bench, budget, args.quick)
    if args.only in (None, "attention"):
        # the attention cases are cheap: give them their own share if the Gram used the budget up
        bench_attention(do_bench, Budget(max(30.0, args.budget - (time.perf_counter() - budget.start))), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
