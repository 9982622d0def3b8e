"""Triton kernels for the calibration statistics, one file per op.

This folder is the top-level ``kernels/`` of the repository, installed as the
package ``corp.kernels`` (setup.py ``package_dir``; never as a top-level
``kernels`` module, a name taken on PyPI).

* :mod:`corp.kernels.gram`: ``corp::gram_update_``: streaming Gram (SYRK,
  upper tiles only) + column sums.
* :mod:`corp.kernels.attention_stats`: ``corp::attention_stats_update_``:
  per-head ``Σ q qᵀ``, ``Σ k kᵀ``, ``Σ q_j² k_j²`` read straight from the fused
  qkv output.

The ops themselves (schemas, fakes, the PyTorch references that run on the
CPU, these kernels on CUDA) are registered in one place, :mod:`corp.ops`.

Importing this package never imports triton: the kernel modules import it
(guarded) when first used, so ``import corp`` works without triton and
without a GPU. Triton kernels run on CUDA tensors, or on CPU tensors in
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before anything imports triton.
"""
from __future__ import annotations

import functools
import importlib
import os

__all__ = [
    "triton_available",
    "interpreter_requested",
    "INPUT_PRECISIONS",
    "get_default_input_precision",
    "set_default_input_precision",
]

# Precisions of the in-kernel products for fp32 inputs (16-bit inputs always
# use exact products with fp32 accumulation, whatever is chosen here):
#   "ieee":   true fp32 products (no tensor cores for fp32). The default: it is
#             what the PyTorch reference and torch's own default
#             (``torch.backends.cuda.matmul`` without TF32) compute, and the
#             covariance ``G/n − μμᵀ`` cancels digits when the activations have
#             a large mean, so the 10-bit TF32 mantissa is a real loss there.
#   "tf32":   TF32 tensor cores (about 1e-3 relative error per product).
#   "tf32x3": three TF32 products (near-fp32 accuracy, faster than "ieee").
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
_default_input_precision = os.environ.get("CORP_TRITON_INPUT_PRECISION", "ieee")


def get_default_input_precision() -> str:
    """The ``input_precision`` used when a launcher is given ``None`` ("ieee" unless changed)."""
    return _default_input_precision


def set_default_input_precision(value: str) -> None:
    """Set the default fp32 product precision of the kernels (one of :data:`INPUT_PRECISIONS`)."""
    global _default_input_precision
    if value not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {value!r}")
    _default_input_precision = value


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set (kernels then run on CPU tensors in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (imports it; call only when Triton may be used)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def __getattr__(name: str):
    # corp.kernels.gram / .attention_stats load on first attribute access.
    if name in ("gram", "attention_stats"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
