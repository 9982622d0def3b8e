"""The target ratios of the GPU-kernel issue, measured in one run (``triton.testing.do_bench`` medians).

1. Gram + column sums, bf16, D = 5120 / 3072 / 768, against torch's ``X.T @ X`` (fp32 out) +
   ``X.sum(0)`` + the fp64 adds into the accumulators (what the reference path costs):
   * the engine's call shape: 32 consecutive chunks of 8,224 tokens into one fp64 accumulator
     (timed as the 32 calls together);
   * single calls of 262,144 and 1,048,576 tokens;
   targets ≥ 1.8× at 5120 and 3072, ≥ 1.2× at 768; the error vs fp64 (max over the upper
   triangle, relative to the largest entry) ≤ 5e-6 and flat in the token count; the cost of the
   accumulator promotion (the same call with promotion off).
2. Attention statistics, bf16, 16 heads × 80 and 12 × 64, 1,048,576 tokens: bytes of q and k read
   per second as a share of the device's copy bandwidth (a device-to-device copy of the same
   number of bytes, read + write), target ≥ 80%; and the speedup over the plain-PyTorch form.
3. Batched Cholesky ridge solve, fp64: the compiled op against ``cholesky_ex`` + ``cholesky_solve``
   at 512×40, 768×64, 2048×32, 32×128 (m = n) and the engine's attention-fit shapes
   (2H systems of n = kept dims, m = pruned dims), target ≥ 5×.

Every timed result is checked against fp64 first; a wrong result is printed as WRONG and makes the
exit status 1 (a missed speed target does not: it is a measurement). Needs a CUDA GPU.

    python benchmarks/ops/bench_targets.py [--only gram|attention|solve] [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

from timing import do_bench_median_ms, empty_cache, print_gpu_header  # first: puts the repository root on sys.path

ENGINE_CHUNK, ENGINE_CHUNKS = 8224, 32
failures: list[str] = []


def _verdict(ratio: float, target: float) -> str:
    return "meets" if ratio >= target else "MISSES"


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


SLICE = 131072


def _gelu_like(tokens: int, d: int, gen) -> torch.Tensor:
    """GELU outputs of N(0.5, 1.5²) pre-activations in bf16, made in slices (bounded fp32 scratch)."""
    out = torch.empty(tokens, d, dtype=torch.bfloat16, device="cuda")
    for s in range(0, tokens, SLICE):
        n = min(SLICE, tokens - s)
        out[s:s + n] = torch.nn.functional.gelu(torch.randn(n, d, device="cuda", generator=gen) * 1.5 + 0.5)
    return out


def bench_gram(quick: bool) -> None:
    from corp.kernels.gram import FLUSH_TOKENS, gram_update_triton_

    print("\n## Gram + column sums, bf16 into fp64, vs torch mm (fp32 out) + sum + fp64 add")
    print(f"{'D':>5} {'shape':<22} | {'triton ms':>9} {'torch ms':>9} {'ratio':>6} {'target':>6} | "
          f"{'rel err':>8} {'torch err':>9} | {'no-promote ms':>13} {'promote cost':>12}")
    targets = {5120: 1.8, 3072: 1.8, 768: 1.2}
    for d in (5120, 3072, 768):
        gen = torch.Generator(device="cuda").manual_seed(d)
        shapes = [("engine 32 x 8224", ENGINE_CHUNKS, ENGINE_CHUNK), ("262144 tokens", 1, 262144)]
        if not quick:
            shapes.append(("1048576 tokens", 1, 1048576))
        for label, chunks, tokens in shapes:
            xs = [_gelu_like(tokens, d, gen) for _ in range(chunks)]
            g = torch.zeros(d, d, dtype=torch.float64, device="cuda")
            c = torch.zeros(d, dtype=torch.float64, device="cuda")

            def run_triton(promote=None):
                for x in xs:
                    gram_update_triton_(g, c, x, promote_tokens=promote)

            def run_torch():
                for x in xs:
                    g.add_(torch.mm(x.T, x, out_dtype=torch.float32))  # fp32 -> fp64 in the add
                    c.add_(x.sum(0, dtype=torch.float32))

            # correctness first: one pass of each into zeroed accumulators, against fp64
            run_triton()
            tri_g, tri_c = g.clone(), c.clone()
            g.zero_(), c.zero_()
            run_torch()
            tor_g = g.clone()
            ref_g = torch.zeros_like(g)
            ref_c = torch.zeros_like(c)
            for x in xs:
                for s in range(0, x.shape[0], SLICE):  # fp64 in slices: 1M × 5120 would be 43 GB at once
                    x64 = x[s:s + SLICE].double()
                    ref_g += x64.T @ x64
                    ref_c += x64.sum(0)
                    del x64
            up = torch.ones(d, d, dtype=torch.bool, device="cuda").triu()
            err = max(_rel_err(tri_g[up], ref_g[up]), _rel_err(tri_c, ref_c))
            err_torch = _rel_err(tor_g[up], ref_g[up])
            del ref_g, tri_g, tor_g
            if not err <= max(5e-6, 2 * err_torch):
                failures.append(f"gram D={d} {label}: rel err {err:.2e}")
            t_tri = do_bench_median_ms(run_triton)
            t_ref = do_bench_median_ms(run_torch)
            t_off = do_bench_median_ms(lambda: run_triton(FLUSH_TOKENS))
            ratio = t_ref / t_tri
            ok_err = "" if err <= 5e-6 else " >5e-6"
            print(f"{d:>5} {label:<22} | {t_tri:>9.3f} {t_ref:>9.3f} {ratio:>5.2f}x {targets[d]:>5.1f}x | "
                  f"{err:>8.1e}{ok_err} {err_torch:>9.1e} | {t_off:>13.3f} {t_tri / t_off - 1:>+11.1%}  "
                  f"{_verdict(ratio, targets[d])}", flush=True)
            xs = g = c = None  # free the chunks before the next shape (the closures hold them)
            empty_cache("cuda")


def bench_attention(quick: bool) -> None:
    from corp import reference
    from corp.kernels.attention_stats import attention_stats_update_triton_

    tokens = 262144 if quick else 1048576
    print(f"\n## Attention statistics, bf16, {tokens} tokens: share of device copy bandwidth for reading q and k")
    print(f"{'heads x d':<10} | {'triton ms':>9} {'q,k GB/s':>9} {'copy GB/s':>9} {'share':>6} {'target':>6} | "
          f"{'torch ms':>9} {'speedup':>7} | {'rel err':>8}")
    for h, d in ((16, 80), (12, 64)):
        gen = torch.Generator(device="cuda").manual_seed(h)
        qkv = (torch.randn(tokens, 3 * h * d, device="cuda", generator=gen) * 1.2 + 0.3).to(torch.bfloat16)
        acc = [torch.zeros(h, d, d, dtype=torch.float64, device="cuda") for _ in range(2)]
        acc.append(torch.zeros(h, d, dtype=torch.float64, device="cuda"))
        attention_stats_update_triton_(*acc, qkv, h, d)  # tune, and the correctness check
        ref = [torch.zeros_like(a) for a in acc]
        step = 65536
        for s in range(0, tokens, step):
            x = qkv[s:s + step].double().view(-1, 3, h, d)
            q, k = x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)
            ref[0] += q.mT @ q
            ref[1] += k.mT @ k
            ref[2] += (q * q * k * k).sum(1)
            del x, q, k
        err = max(_rel_err(a, r) for a, r in zip(acc, ref))
        if not err <= 5e-6:
            failures.append(f"attention {h}x{d}: rel err {err:.2e}")
        t_tri = do_bench_median_ms(lambda: attention_stats_update_triton_(*acc, qkv, h, d))
        t_ref = do_bench_median_ms(lambda: reference.attention_stats_update_(*acc, qkv, h, d))
        qk_bytes = tokens * 2 * h * d * qkv.element_size()
        src = torch.empty(qk_bytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = do_bench_median_ms(lambda: dst.copy_(src))
        copy_bw = 2 * qk_bytes / t_copy / 1e6  # read + write, GB/s
        bw = qk_bytes / t_tri / 1e6
        share = bw / copy_bw
        print(f"{h:>2} x {d:<5} | {t_tri:>9.3f} {bw:>9.0f} {copy_bw:>9.0f} {share:>6.0%} {0.8:>6.0%} | "
              f"{t_ref:>9.3f} {t_ref / t_tri:>6.1f}x | {err:>8.1e}  {_verdict(share, 0.8)}", flush=True)
        qkv = acc = ref = src = dst = None  # free before the next shape (the closures hold them)
        empty_cache("cuda")


def bench_solve(quick: bool) -> None:
    from corp import _compiled

    if not _compiled.cuda_available():
        failures.append(f"solve: the compiled CUDA solver is not available ({_compiled.load_error()})")
        print(f"\n## Cholesky: compiled CUDA solver NOT AVAILABLE ({_compiled.load_error()})")
        return
    mod = _compiled.module()
    cases = [("512x40", 512, 40, 40), ("768x64", 768, 64, 64), ("2048x32", 2048, 32, 32), ("32x128", 32, 128, 128),
             # the engine's attention fits: 2H systems of the kept dims, right-hand sides the pruned dims
             ("engine DeiT-III-H 50% qk (32x40, m 40)", 32, 40, 40),
             ("engine DeiT-B 50% qk (24x32, m 32)", 24, 32, 32)]
    print("\n## Batched Cholesky ridge solve, fp64, vs torch cholesky_ex + cholesky_solve")
    print(f"{'case':<40} | {'op ms':>8} {'chol ms':>8} {'ratio':>6} {'target':>6} | {'rel err':>8}")
    for label, batch, n, m in cases:
        gen = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(batch, n, n + n // 2, generator=gen, dtype=torch.float64)
        a = (x @ x.mT / (n + n // 2)).cuda()
        b = torch.randn(batch, n, m, generator=gen, dtype=torch.float64).cuda()
        lam = torch.full((batch,), 1e-2, dtype=torch.float64, device="cuda")
        eye = torch.eye(n, dtype=torch.float64, device="cuda")

        def chol():
            f, _ = torch.linalg.cholesky_ex(a + lam[:, None, None] * eye)
            return torch.cholesky_solve(b, f)

        sol, _, ok = mod.ridge_solve_cuda(a, b, lam, 8, 10.0)
        err = _rel_err(sol, chol())
        if not (bool(ok.all()) and err < 1e-10):
            failures.append(f"solve {label}: ok={bool(ok.all())} rel err {err:.2e}")
        t_op = do_bench_median_ms(lambda: mod.ridge_solve_cuda(a, b, lam, 8, 10.0))
        t_chol = do_bench_median_ms(chol)
        ratio = t_chol / t_op
        print(f"{label:<40} | {t_op:>8.3f} {t_chol:>8.3f} {ratio:>5.2f}x {5.0:>5.1f}x | {err:>8.1e}  "
              f"{_verdict(ratio, 5.0)}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("gram", "attention", "solve"), default=None)
    parser.add_argument("--quick", action="store_true", help="skip the 1M-token Gram rows, 262k-token attention")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_targets: needs a CUDA GPU", file=sys.stderr)
        return 1
    print_gpu_header()
    for name, fn in (("gram", bench_gram), ("attention", bench_attention), ("solve", bench_solve)):
        if args.only in (None, name):
            try:
                fn(args.quick)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other sections
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    if failures:
        print("\nWRONG / FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall results correct against fp64 (speed targets: see 'meets' / 'MISSES')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
