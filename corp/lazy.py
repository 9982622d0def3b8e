"""Weights read lazily from a safetensors file, one block at a time.

A model built on the ``meta`` device holds no memory; :func:`corp.prune` with
``weights=FILE`` reads the stem's tensors first and each block's tensors only
when that block is pruned, so peak memory is the pruned model plus one dense
block, not the dense model.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["LazyWeights", "meta_model"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyWeights:
    """Reads tensors named as in the model's ``state_dict()`` from a safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"weights file {self.path} does not exist")
        with open(self.path, "rb") as f:
            self._header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(self._header_len))
            except ValueError as exc:
                raise ValueError(f"{self.path} is not a safetensors file") from exc
        header.pop("__metadata__", None)
        self._header = header
        self._keys = set(header)

    def get_tensor(self, key: str) -> torch.Tensor:
        """Read one tensor with plain file reads into fresh memory.

        Not through a memory map: mapped file pages count towards the process's
        RSS (ViT-H: the whole 2.5 GB file by the last block), reads do not.
        """
        info = self._header[key]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(8 + self._header_len + start)
            if f.readinto(buf.numpy()) != end - start:
                raise ValueError(f"{self.path} is truncated: '{key}' is incomplete")
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def fingerprint(self) -> str:
        """A hash of the file's size and header (names, shapes, dtypes, offsets)."""
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = f.read(min(header_len, 1 << 24))
        return hashlib.sha256(str(os.path.getsize(self.path)).encode() + header).hexdigest()[:16]

    def materialize_(self, module: nn.Module, prefix: str = "", skip: Optional[str] = None,
                     dtype: Optional[torch.dtype] = None) -> None:
        """Replace ``module``'s meta tensors by the file's ``prefix + name`` tensors (CPU), except names under ``skip``."""
        for mod_name, mod in module.named_modules():
            full = f"{prefix}{mod_name}." if mod_name else prefix
            if skip is not None and full.startswith(skip):
                continue
            for kind in ("_parameters", "_buffers"):
                for name, t in list(getattr(mod, kind).items()):
                    if t is None:
                        continue
                    key = full + name
                    if key not in self._keys:
                        if kind == "_buffers" and name not in mod.state_dict():
                            continue  # non-persistent buffer: not in checkpoints
                        raise ValueError(f"weights file {self.path} has no tensor '{key}'")
                    value = self.get_tensor(key)
                    if tuple(value.shape) != tuple(t.shape):
                        raise ValueError(f"'{key}' is {tuple(value.shape)} in {self.path}, the model expects {tuple(t.shape)}")
                    if dtype is not None and value.is_floating_point():
                        value = value.to(dtype)
                    if kind == "_parameters":
                        mod._parameters[name] = nn.Parameter(value, requires_grad=t.requires_grad)
                    else:
                        mod._buffers[name] = value


def meta_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` on the meta device (no memory, no download)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).eval()
