"""Loader of the compiled solver ``corp._C`` (``csrc/``): CPU and CUDA kernels of ``corp::ridge_solve``.

The op itself (schema, fake, which kernel runs where) is registered in
:mod:`corp.ops`; the extension only provides the kernels
(``ridge_solve_cpu``, ``ridge_solve_cuda``).

The package imports and works without it: :func:`available` is then False and
:func:`require` raises a RuntimeError that says how to build it. The extension
is built by ``pip install --no-build-isolation -e .`` (see setup.py); the
outcome of that build is recorded in ``corp/_ext_build.json``.

``CORP_DISABLE_EXT=1`` ignores a built extension (as if it were not built).

Opt-in JIT fallback (GPU machines with a compiler and the sources at hand):
``CORP_JIT_BUILD=1`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load``
on first use when the built extension is missing.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional

import torch

__all__ = [
    "BUILD_COMMAND",
    "available",
    "cuda_available",
    "load_error",
    "build_record",
    "require",
    "module",
]

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)
_SOURCE_DIR = os.path.join(_REPO_DIR, "csrc")
_module = None
_error: Optional[str] = None
_tried = False


def _jit_load():
    from torch.utils import cpp_extension

    from ._ext_sources import CPU_SOURCES, CUDA_SOURCES

    sources = [os.path.join(_REPO_DIR, name) for name in CPU_SOURCES]
    cflags = ["-O3", "-fopenmp"]
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += [os.path.join(_REPO_DIR, name) for name in CUDA_SOURCES]
        cflags.append("-DCORP_WITH_CUDA")
    return cpp_extension.load(
        name="corp_C_jit",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-DCORP_WITH_CUDA"],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        verbose=os.environ.get("CORP_JIT_VERBOSE", "0") == "1",
    )


def _load() -> None:
    global _module, _error, _tried
    if _tried:
        return
    _tried = True
    if os.environ.get("CORP_DISABLE_EXT", "0") == "1":
        _error = "disabled by CORP_DISABLE_EXT=1"
        return
    try:
        _module = importlib.import_module("corp._C")
    except (ImportError, OSError) as exc:
        _error = f"{type(exc).__name__}: {exc}"
        if os.environ.get("CORP_JIT_BUILD", "0") == "1" and os.path.isdir(_SOURCE_DIR):
            try:
                _module = _jit_load()
                _error = None
            except Exception as jit_exc:  # noqa: BLE001 - any compiler failure: report it
                _error += f"; JIT build (CORP_JIT_BUILD=1) failed: {type(jit_exc).__name__}: {jit_exc}"


def build_record() -> Optional[dict]:
    """The outcome of the last ``setup.py`` build of the extension (``corp/_ext_build.json``), if any."""
    path = os.path.join(_PACKAGE_DIR, "_ext_build.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def available() -> bool:
    """True when the compiled solver is built and loads."""
    _load()
    return _module is not None


def cuda_available() -> bool:
    """True when the loaded extension has its CUDA kernels (and a GPU is visible)."""
    return available() and bool(getattr(_module, "with_cuda", False)) and torch.cuda.is_available()


def load_error() -> Optional[str]:
    """Why the extension did not load (None when it did)."""
    _load()
    return _error


def _explain() -> str:
    msg = (
        "the compiled solve backend is not available: the extension corp._C is not built or does not load"
        f" ({_error}). Build it from the repository root with\n    {BUILD_COMMAND}\n"
        "(needs torch installed first, ninja and a C++ compiler; nvcc for the CUDA kernels; "
        "CORP_BUILD_CUDA=0/1 forces the CUDA part off/on). "
    )
    record = build_record()
    if record and record.get("status") != "built":
        msg += f"The last build failed: {record.get('cuda_error') or ''} {record.get('error') or ''}. "
    msg += "Or use backend='torch'."
    return msg


def require(device: Optional[torch.device] = None) -> None:
    """Raise RuntimeError (saying how to build it) unless the compiled solver can run on ``device``."""
    if not available():
        raise RuntimeError(_explain())
    if device is not None and torch.device(device).type == "cuda" and not getattr(_module, "with_cuda", False):
        raise RuntimeError(
            "the compiled solver was built without its CUDA kernels; rebuild it on a machine with nvcc and a CUDA "
            f"build of torch: CORP_BUILD_CUDA=1 {BUILD_COMMAND}"
        )
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise RuntimeError(f"the compiled solver runs on CPU and CUDA tensors, not on {device}")


def module():
    """The loaded extension (``ridge_solve_cpu``, ``ridge_solve_cuda``, ``cpu_isa``, ...); RuntimeError if absent."""
    require()
    return _module
