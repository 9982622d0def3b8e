"""Image folders preprocessed with a model's own timm data config."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["data_config", "image_transform", "ImageFiles", "calibration_loader", "eval_loader", "IMAGE_EXTENSIONS",
           "list_image_files", "image_folder_classes"]

from .paths import IMAGE_EXTENSIONS, image_folder_classes, list_image_files  # noqa: F401 - re-exported


def data_config(model: nn.Module) -> dict:
    """timm's data config for ``model`` (mean, std, crop, interpolation), with the input size
    and channels taken from the model itself when it has a fixed image size."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (pe.proj.in_channels, *tuple(pe.img_size))
    channels = cfg["input_size"][0]
    if len(cfg["mean"]) != channels:
        cfg["mean"], cfg["std"] = tuple(cfg["mean"][:channels]), tuple(cfg["std"][:channels])
    return cfg


def image_transform(model: nn.Module):
    from timm.data import create_transform

    cfg = data_config(model)
    return create_transform(**cfg, is_training=False)


def _load_image(path: Path, channels: int):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("L" if channels == 1 else "RGB")


class ImageFiles(Dataset):
    """Every image file under ``root`` (recursively, class folders or not), sorted; labels are not read.

    ``root``: a directory, or the list of image files :func:`list_image_files` found in one.
    ``limit``: keep a deterministic random subset of this many files (``seed``).
    ``shard``: ``(rank, world_size)``: keep every world_size-th file of that subset, from rank.
    ``available``: how many image files there were before ``limit`` and ``shard``.
    """

    def __init__(self, root: str | os.PathLike | list[Path], transform, channels: int = 3,
                 limit: Optional[int] = None, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        files = list(root) if isinstance(root, (list, tuple)) else list_image_files(root)
        self.available = len(files)
        if limit is not None and limit < len(files):
            files = sorted(random.Random(seed).sample(files, limit))
        files = files[shard[0] :: shard[1]]
        self.files, self.transform, self.channels = files, transform, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(_load_image(self.files[i], self.channels))


def calibration_loader(model: nn.Module, root: str | list[Path], limit: Optional[int], batch_size: int, workers: int,
                       seed: int = 0, shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """Unlabeled calibration images under ``root`` (or the listed files) as batches ``(B, C, H, W)``
    (this rank's ``shard``)."""
    channels = data_config(model)["input_size"][0]
    dataset = ImageFiles(root, image_transform(model), channels=channels, limit=limit, seed=seed, shard=shard)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def eval_loader(model: nn.Module, root: str, batch_size: int, workers: int) -> DataLoader:
    """A labelled ImageFolder (one sub-folder per class, sorted class names = label order)."""
    from torchvision.datasets import ImageFolder

    channels = data_config(model)["input_size"][0]
    dataset = ImageFolder(root, transform=image_transform(model), loader=lambda p: _load_image(Path(p), channels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
