"""Where the calibration hidden states live between blocks: the compute device, CPU memory or disk."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Optional

import torch

__all__ = ["StateStore", "choose_location", "LOCATIONS"]

LOCATIONS = ("auto", "device", "cpu", "disk")

# "auto" keeps the states on a CUDA device while they take at most this fraction of
# its free memory (the rest is for one block, its statistics and activations), and in
# CPU memory while they take at most this fraction of the available RAM.
DEVICE_FRACTION = 0.4
RAM_FRACTION = 0.5


def _available_ram() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_location(requested: str, device: torch.device, nbytes: int) -> str:
    """Resolve ``"auto"`` for hidden states of ``nbytes`` bytes computed on ``device``."""
    if requested not in LOCATIONS:
        raise ValueError(f"states must be one of {LOCATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= DEVICE_FRACTION * free:
            return "device"
    ram = _available_ram()
    if ram is None or nbytes <= RAM_FRACTION * ram:
        return "device" if device.type == "cpu" else "cpu"
    return "disk"


class StateStore:
    """An ordered list of hidden-state batches ``(B, T, D)`` kept on the device, in CPU memory, or
    in memory-mapped files under ``directory`` (one file per batch, removed by :meth:`close`)."""

    def __init__(self, location: str, device: torch.device, directory: Optional[str] = None):
        if location not in ("device", "cpu", "disk"):
            raise ValueError(f"unknown state location {location!r}")
        self.location, self.device = location, device
        self._items: list[torch.Tensor] = []
        self._dir: Optional[str] = None
        if location == "disk":
            os.makedirs(directory or tempfile.gettempdir(), exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="corp-states-", dir=directory)

    def spawn(self) -> "StateStore":
        """An empty store in the same place (same location, device and spill directory)."""
        parent = os.path.dirname(self._dir) if self._dir is not None else None
        return StateStore(self.location, self.device, parent)

    def append(self, x: torch.Tensor) -> None:
        if self.location == "device":
            self._items.append(x.to(self.device))
        elif self.location == "cpu":
            self._items.append(x.to("cpu"))
        else:
            path = os.path.join(self._dir, f"{len(self._items):06d}.bin")
            nbytes = x.numel() * x.element_size()
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
            mapped = torch.empty(0, dtype=x.dtype).set_(storage).view(x.shape)
            mapped.copy_(x)
            self._items.append(mapped)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Batch ``i`` on the compute device."""
        return self._items[i].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def raw(self) -> list[torch.Tensor]:
        """The stored tensors as they are (for checkpointing)."""
        return list(self._items)

    @property
    def images(self) -> int:
        return sum(t.shape[0] for t in self._items)

    @property
    def tokens(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self._items)

    def close(self) -> None:
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):  # pragma: no cover - best effort for the disk files
        try:
            self.close()
        except Exception:
            pass
