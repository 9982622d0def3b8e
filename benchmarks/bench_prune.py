"""End-to-end pruning benchmark on deit_small (random weights, CPU).

Prints, measured in the same run:
* pruning time ÷ one plain forward pass over the same 64 calibration images, for
  ``method="paper"`` and the default ``method="corp"`` (target ≤ 2×), and corp ÷ paper
  (target ≤ 1.3×), the three timed in turn in each round;
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
ROUNDS = 3
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


def test_pruning_time_vs_forward(benchmark, deit_small, calibration):
    """Forward, ``method="paper"`` and the default ``method="corp"``, interleaved in each round so that
    drifting machine load (this CPU's forward pass varied 7.3–9.2 s within one run) affects all three
    alike; medians over the rounds."""
    _forward_all(deit_small, calibration[:BATCH])  # warm-up
    times = {"forward": [], "paper": [], "corp": []}
    pruned = {}

    def one_round():
        for name in times:
            t = time.perf_counter()
            if name == "forward":
                _forward_all(deit_small, calibration)
            else:
                pruned[name] = corp.prune(deit_small, calibration, batch_size=BATCH, method=name, **SPARSITY)
            times[name].append(time.perf_counter() - t)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0)
    med = {name: statistics.median(v) for name, v in times.items()}
    benchmark.extra_info.update({f"{k}_s": v for k, v in med.items()}, corp_over_paper=med["corp"] / med["paper"])
    print(f"\ndeit_small, {CALIB_IMAGES} images, 50/50, CPU ({torch.get_num_threads()} threads), medians of "
          f"{ROUNDS} interleaved rounds: forward {med['forward']:.2f}s; paper {med['paper']:.2f}s = "
          f"{med['paper'] / med['forward']:.2f}x forward; corp {med['corp']:.2f}s = "
          f"{med['corp'] / med['forward']:.2f}x forward (target <= 2x); corp / paper = "
          f"{med['corp'] / med['paper']:.2f}x (target <= 1.3x)")
    for name, runs in times.items():
        print(f"  {name}: " + ", ".join(f"{t:.2f}" for t in runs) + " s")
    for model in pruned.values():
        assert model.corp_report.params_after < model.corp_report.params_before


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
