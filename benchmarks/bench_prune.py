"""End-to-end pruning benchmark on deit_small (random weights, CPU).

Prints, measured in the same run:
* pruning time ÷ one plain forward pass over the same 64 calibration images, for
  ``method="paper"`` (target ≤ 3×) and the default ``method="corp"`` (residual selection's
  greedy eigensolves run on the CPU and cost more);
* pruned ÷ dense inference throughput at batch 32, 50% MLP + 50% attention (target ≥ 1.4×).

Run: pytest benchmarks/bench_prune.py -s --benchmark-columns=median,min,max
"""
import statistics
import time

import pytest
import timm
import torch

import corp

CALIB_IMAGES = 64
BATCH = 32
SPARSITY = dict(mlp_sparsity=0.5, attn_sparsity=0.5)


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def calibration():
    return torch.randn(CALIB_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _forward_all(model, images):
    for start in range(0, images.shape[0], BATCH):
        model(images[start : start + BATCH])


@pytest.mark.parametrize("method", ["paper", "corp"])
def test_pruning_time_vs_forward(benchmark, deit_small, calibration, method):
    _forward_all(deit_small, calibration[:BATCH])  # warm-up
    forward = _median_seconds(lambda: _forward_all(deit_small, calibration), 3)
    pruned = benchmark.pedantic(
        lambda: corp.prune(deit_small, calibration, batch_size=BATCH, method=method, **SPARSITY), rounds=3,
        warmup_rounds=0,
    )
    prune_median = benchmark.stats.stats.median
    ratio = prune_median / forward
    benchmark.extra_info.update(forward_s=forward, prune_s=prune_median, ratio=ratio)
    print(f"\ndeit_small, method={method}, {CALIB_IMAGES} images, CPU ({torch.get_num_threads()} threads): "
          f"forward {forward:.2f}s, prune {prune_median:.2f}s (median of 3), prune/forward = {ratio:.2f}x "
          f"(target <= 3x for the paper's method)")
    assert pruned.corp_report.params_after < pruned.corp_report.params_before


def test_pruned_throughput_vs_dense(benchmark, deit_small, calibration):
    pruned = corp.prune(deit_small, calibration, batch_size=BATCH, report_images=0, **SPARSITY)
    batch = calibration[:BATCH]
    with torch.no_grad():
        deit_small(batch), pruned(batch)  # warm-up
        # interleave the two models so that drifting machine load affects both alike
        dense_t, pruned_t = [], []
        for _ in range(7):
            dense_t.append(_median_seconds(lambda: deit_small(batch), 1))
            pruned_t.append(_median_seconds(lambda: pruned(batch), 1))
    dense_s, pruned_s = statistics.median(dense_t), statistics.median(pruned_t)
    speedup = dense_s / pruned_s
    benchmark.extra_info.update(dense_s=dense_s, pruned_s=pruned_s, speedup=speedup)
    benchmark.pedantic(lambda: pruned(batch), rounds=3, warmup_rounds=0)
    rep = pruned.corp_report
    print(f"\nbatch {BATCH} on CPU: dense {BATCH / dense_s:.1f} img/s, pruned {BATCH / pruned_s:.1f} img/s, "
          f"speed-up {speedup:.2f}x (target >= 1.4x; linear FLOPs {rep.flops_before / rep.flops_after:.2f}x)")
