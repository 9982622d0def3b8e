"""Set-up shared by the Triton kernel tests: device, skip marks, dtypes, untuned GPU runs."""
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


@pytest.fixture(autouse=True)
def _untuned_unless_asked(request, monkeypatch):
    """On a GPU, run the fixed default configuration: tuning compiles and times every
    configuration for every new odd shape of these tests, which takes minutes. The
    autotuning test (and the benchmarks) use the tuner."""
    if "autotun" not in request.node.name:
        monkeypatch.setenv("CORP_TRITON_AUTOTUNE", "0")
