"""Cost of residual-based selection (corp/selection.py) against the statistics pass it sits beside.

For each size, the median time of the selection is divided by the time of the
statistics accumulation over the tokens of one calibration pass (default 64
images × 197 tokens): ``corp.reference.gram_update_`` for the MLP (D_h × D_h Gram),
``corp.reference.attention_stats_update_`` for attention (12 heads × 64). Activations
are synthetic (GELU of correlated inputs; q/k with mixed dims): timing does not
depend on their values beyond conditioning.

    .venv/bin/python benchmarks/selection_cost.py            # default: < ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/selection_cost.py --images 16 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from corp.select import auto_mlp_step, select_mlp_channels_by_residual, select_qk_dims_by_residual
from corp.reference import attention_stats_update_, gram_update_, symmetrize_upper


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _hidden(tokens: int, width: int, gen: torch.Generator) -> torch.Tensor:
    dim = width // 4
    x = torch.randn(tokens, dim, generator=gen) @ (torch.eye(dim) + 0.5 * torch.randn(dim, dim, generator=gen) / dim**0.5)
    return torch.nn.functional.gelu(x @ (torch.randn(dim, width, generator=gen) / dim**0.5) + 0.1)


def mlp_rows(tokens: int, chunk: int, repeats_small: int, repeats_big: int, gen: torch.Generator) -> list[str]:
    rows = []
    for width in (1536, 3072):
        h = _hidden(tokens, width, gen)
        gram = torch.zeros(width, width, dtype=torch.float64)
        colsum = torch.zeros(width, dtype=torch.float64)

        def stats_pass():
            gram.zero_()
            colsum.zero_()
            for start in range(0, tokens, chunk):
                gram_update_(gram, colsum, h[start:start + chunk])

        reps = repeats_small if width <= 1536 else repeats_big
        t_stats = _median_time(stats_pass, reps)
        mean = colsum / tokens
        cov = symmetrize_upper(gram) / tokens - torch.outer(mean, mean)
        w2 = torch.randn(width // 4, width, generator=gen, dtype=torch.float64) / width**0.5
        for frac in (0.5, 0.25):
            keep = int(width * frac)
            t_sel = _median_time(lambda: select_mlp_channels_by_residual(cov, w2, keep, 1e-3), reps)
            rows.append(f"| MLP D_h={width} out={width // 4} | keep {keep} ({frac:.0%}), step {auto_mlp_step(width, keep)} "
                        f"| {t_sel:.3f} | {t_stats:.3f} | {t_sel / t_stats:.2f} |")
            print(rows[-1], flush=True)
        del h, gram, cov
    return rows


def attention_rows(tokens: int, chunk: int, repeats: int, steps: tuple[int, ...], gen: torch.Generator) -> list[str]:
    heads, d = 12, 64
    per_head = torch.randn(heads, d, d, generator=gen) / d**0.5 + torch.eye(d)
    base = torch.randn(tokens, 3, heads, d, generator=gen)
    qkv = torch.einsum("nthd,hde->nthe", base, per_head).reshape(tokens, 3 * heads * d).contiguous()
    gq = torch.zeros(heads, d, d, dtype=torch.float64)
    gk, score = torch.zeros_like(gq), torch.zeros(heads, d, dtype=torch.float64)

    def stats_pass():
        gq.zero_(), gk.zero_(), score.zero_()
        for start in range(0, tokens, chunk):
            attention_stats_update_(gq, gk, score, qkv[start:start + chunk], heads, d)

    t_stats = _median_time(stats_pass, max(repeats, 3))
    rows = []
    for frac in (0.5, 0.25):
        keep = int(d * frac)
        for step in steps:
            t_sel = _median_time(lambda: select_qk_dims_by_residual(gq, gk, keep, 1e-3, step=step), repeats)
            rows.append(f"| attention {heads}x{d} | keep {keep} ({frac:.0%}), step {step} "
                        f"| {t_sel:.3f} | {t_stats:.3f} | {t_sel / t_stats:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--tokens-per-image", type=int, default=197)
    ap.add_argument("--batch-images", type=int, default=32, help="images per statistics chunk (the engine's batch)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats for D_h=1536 and attention (median)")
    ap.add_argument("--repeats-big", type=int, default=1, help="repeats for D_h=3072")
    ap.add_argument("--attn-steps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.images * args.tokens_per_image
    chunk = args.batch_images * args.tokens_per_image
    gen = torch.Generator().manual_seed(0)
    print(f"tokens {tokens} ({args.images} images x {args.tokens_per_image}), chunk {chunk}, "
          f"torch threads {torch.get_num_threads()}, ridge 1e-3")
    print("| block | selection | selection s (median) | stats pass s | ratio |")
    print("|---|---|---|---|---|")
    mlp_rows(tokens, chunk, args.repeats, args.repeats_big, gen)
    attention_rows(tokens, chunk, max(1, args.repeats - 2), tuple(args.attn_steps), gen)


if __name__ == "__main__":
    main()
