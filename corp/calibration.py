"""Calibration input: turn whatever the user passes into validated image batches."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Union

import torch

__all__ = ["CalibrationInput", "iter_calibration_batches"]

CalibrationInput = Union[torch.Tensor, Iterable]


def _as_image_batch(item, index: int) -> torch.Tensor:
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"calibration item {index} is an empty tuple")
        item = item[0]  # (images, labels): labels are ignored
    elif isinstance(item, dict):
        for key in ("image", "images", "pixel_values", "input"):
            if key in item:
                item = item[key]
                break
        else:
            raise TypeError(f"calibration item {index} is a dict without an 'image'/'pixel_values' entry")
    if not torch.is_tensor(item):
        raise TypeError(f"calibration item {index} is {type(item).__name__}, expected a tensor of images")
    if item.dim() == 3:
        raise ValueError(
            f"calibration item {index} has shape {tuple(item.shape)}: expected a batch (N, C, H, W); "
            "wrap single images with unsqueeze(0) or use a DataLoader"
        )
    return item


def iter_calibration_batches(
    calibration: CalibrationInput, batch_size: int, max_images: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """Yield ``(B, C, H, W)`` batches of at most ``batch_size`` images, ``max_images`` in all.

    Args:
        calibration: a tensor ``(N, C, H, W)``, or any iterable (e.g. a
            DataLoader) yielding tensors ``(B, C, H, W)``, ``(images, labels)``
            tuples (labels ignored) or dicts with an ``"image"`` entry.
        batch_size: images per yielded batch; larger input batches are split.
        max_images: stop after this many images (None: all).

    Raises:
        ValueError: if the input yields no images at all, or holds non-finite values.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if torch.is_tensor(calibration):
        if calibration.dim() != 4:
            raise ValueError(f"calibration tensor must be (N, C, H, W), got shape {tuple(calibration.shape)}")
        source: Iterable = (calibration,)
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a tensor (N, C, H, W) or an iterable of image batches, got {type(calibration).__name__}"
        )
    else:
        source = calibration

    seen = 0
    for index, item in enumerate(source):
        images = _as_image_batch(item, index)
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            if max_images is not None:
                chunk = chunk[: max_images - seen]
            if chunk.shape[0] == 0:
                continue
            if chunk.is_floating_point() and not torch.isfinite(chunk).all():
                raise ValueError(f"calibration item {index} contains non-finite values (NaN or Inf)")
            seen += chunk.shape[0]
            yield chunk
            if max_images is not None and seen >= max_images:
                return
    if seen == 0:
        raise ValueError("calibration data is empty: no images were given")
