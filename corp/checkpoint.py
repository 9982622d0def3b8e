"""Resumable pruning: after each block, what a restarted run needs is saved atomically.

Layout of a checkpoint directory::

    progress.json        fingerprint of the run's arguments, next block, report so far (written last)
    block_0000.pt ...    state dict and widths of each finished (pruned) block
    states_rank0_next0003.pt ...  each rank's calibration hidden states entering block 3

Every file is written to a temporary name and renamed into place, and
progress.json is replaced only after the files it points to exist, so a run
killed at any instant resumes from the last finished block.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .paths import apply_umask

__all__ = ["Checkpoint", "fingerprint_tensor"]

PROGRESS = "progress.json"


def fingerprint_tensor(t: torch.Tensor) -> str:
    """A hash of a tensor's shape, dtype and contents."""
    data = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)  # mkstemp made it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Checkpoint:
    """Save and restore the engine's progress in ``directory`` for a run described by ``fingerprint``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], rank: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples etc.
        self.rank = rank

    def load_progress(self) -> Optional[dict[str, Any]]:
        """The saved progress, or None for a fresh directory. Raises ValueError on mismatched arguments."""
        path = self.dir / PROGRESS
        if not path.is_file():
            return None
        progress = json.loads(path.read_text())
        saved = progress.get("fingerprint", {})
        diffs = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if diffs:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diffs[:4])
            raise ValueError(
                f"checkpoint {self.dir} was written by a run with different arguments ({details}); "
                "use the same arguments to resume or another checkpoint directory"
            )
        return progress

    def save_block(self, index: int, block: nn.Module, widths: dict[str, int]) -> None:
        state = {k: v.detach().to("cpu") for k, v in block.state_dict().items()}
        _atomic_write(self.dir / f"block_{index:04d}.pt", lambda p: torch.save({"widths": widths, "state": state}, p))

    def load_block(self, index: int) -> dict[str, Any]:
        return torch.load(self.dir / f"block_{index:04d}.pt", map_location="cpu", weights_only=True)

    def _states_path(self, next_block: int) -> Path:
        return self.dir / f"states_rank{self.rank}_next{next_block:04d}.pt"

    def save_states(self, states: list[torch.Tensor], next_block: int) -> None:
        """Hidden states entering ``next_block``; the previous block's file stays until progress moves on."""
        data = [t.detach().to("cpu") for t in states]
        _atomic_write(self._states_path(next_block), lambda p: torch.save(data, p))

    def load_states(self, next_block: int) -> list[torch.Tensor]:
        path = self._states_path(next_block)
        if not path.is_file():
            raise ValueError(f"checkpoint {self.dir} has no hidden states of rank {self.rank} for block {next_block} "
                             "(was it written with another number of processes?)")
        return torch.load(path, map_location="cpu", weights_only=True)

    def drop_states_before(self, next_block: int) -> None:
        for path in self.dir.glob(f"states_rank{self.rank}_next*.pt"):
            if int(path.stem.rsplit("next", 1)[1]) < next_block:
                path.unlink(missing_ok=True)

    def save_progress(self, next_block: int, report_blocks: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        body = {"fingerprint": self.fingerprint, "next_block": next_block, "report_blocks": report_blocks, **extra}
        _atomic_write(self.dir / PROGRESS, lambda p: Path(p).write_text(json.dumps(body, indent=1)))
