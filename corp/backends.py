"""Choosing the kernels behind the statistics and the solves.

``corp.prune(backend=...)`` names a backend; this module turns it into one
implementation for the statistics (:mod:`corp.stats`) and one for the solves
(:mod:`corp.solve`). The PyTorch reference ("torch") is always available and
is what runs on the CPU.
"""
from __future__ import annotations

import torch

__all__ = ["BACKENDS", "resolve_backends"]

BACKENDS = ("auto", "torch")


def resolve_backends(requested: str, device: torch.device) -> tuple[str, str]:
    """Return ``(stats_backend, solve_backend)`` for ``requested`` on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a backend that was asked for explicitly is not available.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    return "torch", "torch"
