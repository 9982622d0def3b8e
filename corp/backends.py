"""Choosing the kernels behind the statistics and the solves.

``corp.prune(backend=...)`` names a backend; this module turns it into one
implementation for the statistics (:mod:`corp.stats`) and one for the solves
(:mod:`corp.solve`). Each of those modules owns its own choice through
``resolve_stats_backend`` / ``resolve_solve_backend``. The PyTorch reference
("torch") is always available and is what runs on the CPU.

Names:
    ``"auto"``: the fastest implementation available on the device, for both.
    ``"torch"``: the PyTorch reference for both.
    ``"triton"``: Triton statistics kernels (error if unavailable); solves "auto".
    ``"compiled"``: the compiled C++/CUDA solver (error if unavailable); statistics "auto".
"""
from __future__ import annotations

import torch

from .solve import resolve_solve_backend
from .stats import resolve_stats_backend

__all__ = ["BACKENDS", "resolve_backends"]

BACKENDS = ("auto", "torch", "triton", "compiled")


def resolve_backends(requested: str, device: torch.device) -> tuple[str, str]:
    """Return ``(stats_backend, solve_backend)`` for ``requested`` on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: a backend that was asked for explicitly is not available
            (the message says how to get it).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    return resolve_stats_backend(requested, device), resolve_solve_backend(requested, device)
