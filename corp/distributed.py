"""Data parallelism over calibration images with torch.distributed.

Each rank embeds and propagates its own share of the images; the statistics of
every block are summed with ``all_reduce`` before selection and solves. Every
rank then solves the same summed system, and rank 0's pruned block is broadcast
so that all ranks hold bit-identical weights even where BLAS threading makes
two solves of the same system differ in the last bit (one block's weights:
negligible traffic next to the statistics).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DataParallel", "active"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DataParallel:
    """Collectives for the engine; every method is a no-op in a single process."""

    def __init__(self, enabled: Optional[bool] = None):
        if enabled is None:
            enabled = active()
        if enabled and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first (e.g. under torchrun)")
        self.enabled = enabled
        self.rank = dist.get_rank() if enabled else 0
        self.world_size = dist.get_world_size() if enabled else 1
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if enabled and dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.enabled:
            return t
        buf = t.to(self.comm_device)
        dist.all_reduce(buf, op=op)
        if buf is not t:
            t.copy_(buf)
        return t

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """In-place sum over ranks of each tensor."""
        for t in tensors:
            self._reduce(t, dist.ReduceOp.SUM)

    def sum_int(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        return int(self._reduce(t, dist.ReduceOp.SUM)[0])

    def sum_float(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        return float(self._reduce(t, dist.ReduceOp.SUM)[0])

    def any(self, flag: bool) -> bool:
        return self.sum_int(int(flag)) > 0

    def broadcast_module_(self, module: nn.Module) -> None:
        """Overwrite every parameter and buffer of ``module`` with rank 0's."""
        if not self.enabled:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.data.to(self.comm_device)
            dist.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
