"""Set-up shared by the op tests (tests/ops/): device, skip marks, dtypes, untuned GPU runs, fp64 helpers."""
import os

import pytest
import torch

from corp.kernels import triton_available

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_available() or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL_FLOOR = 1e-6  # a few fp32 ulps of the result's magnitude


@pytest.fixture(autouse=True)
def _untuned_unless_asked(request, monkeypatch):
    """On a GPU, run the fixed default configuration: tuning compiles and times every
    configuration for every new odd shape of these tests, which takes minutes. The
    autotuning test (and the benchmarks) use the tuner."""
    if "autotun" not in request.node.name:
        monkeypatch.setenv("CORP_TRITON_AUTOTUNE", "0")


def assert_within_bound(out, baseline, ref64, factor=2.0, rel_floor=REL_FLOOR, what=""):
    """|out − ref64| ≤ factor·|baseline − ref64| + rel_floor·|ref64|, maxima over entries.

    flash-attention's rule: a kernel's error against an fp64 reference is at most
    twice the error of the same computation in plain PyTorch at the same
    precision, plus a small floor relative to the result's magnitude (a few fp32
    ulps; a wrong tile or a lost chunk is off by O(1)).
    """
    err = (out.double() - ref64).abs().max().item()
    base = (baseline.double() - ref64).abs().max().item()
    floor = rel_floor * ref64.abs().max().item()
    assert err <= factor * base + floor, f"{what}: kernel error {err:.3e} > {factor}·{base:.3e} + {floor:.3e}"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to TF32 (10 stored mantissa bits), to nearest, half away from zero, as fp32."""
    # 2^(e-10) spacing of TF32 around each value; round half away from zero with fp64 arithmetic
    x64 = x.double()
    mant, exp = torch.frexp(x64)  # x = mant · 2^exp, 0.5 <= |mant| < 1
    scaled = mant * 2048.0  # 11 significant bits (1 implicit + 10 stored)
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return torch.ldexp(rounded / 2048.0, exp).float()
