"""Calibration input: turn whatever the user passes into validated batches.

Image batches are tensors ``(N, C, H, W)``; tokenised text batches are mappings (a dict or
a tokenizer's ``BatchEncoding``) with ``input_ids`` ``(N, T)`` and optionally
``attention_mask`` and ``token_type_ids`` ``(N, T)``: they are split and counted by rows
(sequences) like images (:func:`batch_rows`, :func:`slice_batch`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Iterator, Optional, Union

import torch

__all__ = ["CalibrationInput", "iter_calibration_batches", "is_token_batch", "batch_rows", "slice_batch",
           "read_text_lines", "tokenised_batches"]

CalibrationInput = Union[torch.Tensor, Mapping, Iterable]

# the entries of a tokenised batch corp passes on (others, e.g. a tokenizer's offsets, are dropped)
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def is_token_batch(item) -> bool:
    """Whether ``item`` is a tokenised text batch (a mapping with ``input_ids``)."""
    return isinstance(item, Mapping) and "input_ids" in item


def batch_rows(batch) -> int:
    """Images or sequences in a batch (tensor or tokenised mapping)."""
    return batch["input_ids"].shape[0] if is_token_batch(batch) else batch.shape[0]


def slice_batch(batch, start: int, stop: int):
    """Rows ``start:stop`` of a batch (tensor or tokenised mapping)."""
    if is_token_batch(batch):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def read_text_lines(path, max_lines: Optional[int] = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one calibration sample per line), stripped."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                lines.append(line)
                if max_lines is not None and len(lines) >= max_lines:
                    break
    if not lines:
        raise ValueError(f"{path} holds no text: expected one calibration sample per line")
    return lines


def tokenised_batches(texts: list[str], tokenizer, batch_size: int = 32, max_length: Optional[int] = None):
    """``texts`` as tokenised batches of ``batch_size`` sequences, each padded only to its own longest
    (less padding than one batch of everything); ``max_length`` truncates (default: the tokenizer's)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def _as_token_batch(item: Mapping, index: int) -> dict[str, torch.Tensor]:
    batch = {}
    for key in TOKEN_KEYS:
        if key not in item or item[key] is None:
            continue
        value = item[key]
        if not torch.is_tensor(value):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"calibration item {index}: {key!r} is not a tensor of equal-length rows "
                                f"(pad the batch, e.g. tokenizer(..., padding=True, return_tensors='pt'))") from exc
        batch[key] = value
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"calibration item {index}: input_ids must be (N, T), got shape {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"calibration item {index}: input_ids must be integer token ids, got {ids.dtype}")
    for key, value in batch.items():
        if tuple(value.shape) != tuple(ids.shape):
            raise ValueError(f"calibration item {index}: {key} has shape {tuple(value.shape)}, "
                             f"input_ids {tuple(ids.shape)}")
    return batch


def _as_batch(item, index: int):
    if is_token_batch(item):
        return _as_token_batch(item, index)
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"calibration item {index} is an empty tuple")
        item = item[0]  # (images, labels): labels are ignored
    elif isinstance(item, Mapping):
        for key in ("image", "images", "pixel_values", "input"):
            if key in item:
                item = item[key]
                break
        else:
            raise TypeError(f"calibration item {index} is a dict without an 'image'/'pixel_values' entry "
                            "(or 'input_ids' for text)")
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
) -> Iterator:
    """Yield ``(B, C, H, W)`` batches of at most ``batch_size`` images, ``max_images`` in all
    (text: tokenised batches of at most ``batch_size`` sequences, as dicts of ``(B, T)`` tensors).

    Args:
        calibration: a tensor ``(N, C, H, W)``, or any iterable (e.g. a
            DataLoader) yielding tensors ``(B, C, H, W)``, ``(images, labels)``
            tuples (labels ignored) or dicts with an ``"image"`` entry; for text
            encoders a tokenised batch (a mapping with ``input_ids`` ``(N, T)`` and
            ``attention_mask``, e.g. a tokenizer's output) or an iterable of them.
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
    elif isinstance(calibration, Mapping):  # one batch (images or tokens), not an iterable of keys
        source = (calibration,)
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a tensor (N, C, H, W) or an iterable of image batches, got {type(calibration).__name__}"
        )
    else:
        source = calibration

    seen = 0
    for index, item in enumerate(source):
        images = _as_batch(item, index)
        rows = batch_rows(images)
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            if max_images is not None:
                stop = min(stop, start + max_images - seen)
            if stop <= start:
                continue
            chunk = slice_batch(images, start, stop)
            if torch.is_tensor(chunk) and chunk.is_floating_point() and not torch.isfinite(chunk).all():
                raise ValueError(f"calibration item {index} contains non-finite values (NaN or Inf)")
            seen += stop - start
            yield chunk
            if max_images is not None and seen >= max_images:
                return
    if seen == 0:
        raise ValueError("calibration data is empty: no images were given")
