"""Image folders preprocessed with a model's own data config (timm's, or a Hugging Face vision
model's image processor settings)."""
from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["data_config", "hf_data_config", "HFImageTransform", "image_transform", "ImageFiles",
           "calibration_loader", "eval_loader", "IMAGE_EXTENSIONS", "list_image_files", "image_folder_classes"]

from .paths import IMAGE_EXTENSIONS, image_folder_classes, list_image_files  # noqa: F401 - re-exported


# Normalisation of Hugging Face vision families whose directory has no preprocessor_config.json:
# the defaults of each family's own image processor in transformers (ViTImageProcessor and
# SiglipImageProcessor: 0.5; CLIPImageProcessor: OpenAI CLIP's; the DINOv2/DINOv3 processors: ImageNet).
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HF_FAMILY_NORMALISATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": _IMAGENET,
    "dinov3_vit": _IMAGENET,
}
PREPROCESSOR_NAME = "preprocessor_config.json"  # what a Hugging Face image processor saves
_PIL_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _is_hf_vision(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(model, "patch_embed", None) is None and hasattr(config, "image_size") and \
        hasattr(config, "model_type")


def _pair(size) -> tuple[int, int]:
    """An HF size entry (int, ``[h, w]`` or ``{"height", "width"}``) as ``(h, w)``."""
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def hf_data_config(model: nn.Module, directory: Optional[str | os.PathLike] = None) -> dict:
    """A Hugging Face vision model's image processor settings, for :class:`HFImageTransform`.

    With ``directory/preprocessor_config.json`` (what ``AutoImageProcessor.save_pretrained``
    writes): its mean, std, resampling, its resize (a fixed ``{"height", "width"}`` or a
    ``shortest_edge``) and its ``crop_size`` centre crop when ``do_center_crop``.
    Without one: resize to ``model.config.image_size`` with the family's processor defaults,
    and a warning that says so. ``input_size`` is ``(C, H, W)`` of the tensors it gives.
    """
    config = model.config
    channels = int(getattr(config, "num_channels", 3))
    model_type = str(config.model_type)
    processor = None
    if directory is not None and (Path(directory) / PREPROCESSOR_NAME).is_file():
        processor = json.loads((Path(directory) / PREPROCESSOR_NAME).read_text())
    if processor is None:
        mean, std = _HF_FAMILY_NORMALISATION.get(model_type, _IMAGENET)
        warnings.warn(f"no {PREPROCESSOR_NAME} beside the {type(model).__name__} ({model_type}): images are "
                      f"resized to the config's image_size {_pair(config.image_size)} and normalised with the "
                      f"{model_type if model_type in _HF_FAMILY_NORMALISATION else 'ImageNet'} defaults "
                      f"(mean {mean}, std {std}); save the model's image processor there to use its own",
                      stacklevel=3)
        resize, crop, resample = _pair(config.image_size), None, 3
    else:
        size = processor.get("size") or {}
        resize = int(size["shortest_edge"]) if isinstance(size, dict) and "shortest_edge" in size else \
            _pair(size or config.image_size)
        crop = _pair(processor["crop_size"]) if processor.get("do_center_crop") and processor.get("crop_size") else None
        normalise = processor.get("do_normalize", True)
        mean = tuple(processor.get("image_mean", _IMAGENET[0])) if normalise else (0.0,) * channels
        std = tuple(processor.get("image_std", _IMAGENET[1])) if normalise else (1.0,) * channels
        resample = int(processor.get("resample", 3))
    final = crop if crop is not None else (resize if isinstance(resize, tuple) else (resize, resize))
    cfg = dict(input_size=(channels, *final), mean=tuple(mean), std=tuple(std),
               interpolation=_PIL_INTERPOLATION.get(resample, "bicubic"), hf_resize=resize, hf_crop=crop)
    if len(cfg["mean"]) != channels:
        cfg["mean"], cfg["std"] = tuple(cfg["mean"][:channels]), tuple(cfg["std"][:channels])
    return cfg


class HFImageTransform:
    """A Hugging Face image processor's eval preprocessing, PIL image → ``(C, H, W)`` float tensor:
    resize (``shortest_edge``, the long side floored as HF does, or a fixed ``(h, w)``), an
    optional centre crop whose offsets are floored as HF's ``center_crop`` floors them
    (torchvision's ``CenterCrop`` rounds: one pixel apart on odd margins), ``/255``, normalise."""

    def __init__(self, cfg: dict):
        self.resize, self.crop = cfg["hf_resize"], cfg["hf_crop"]
        self.mean, self.std, self.interpolation = cfg["mean"], cfg["std"], cfg["interpolation"]

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation)
        if isinstance(self.resize, tuple):
            image = TF.resize(image, list(self.resize), interpolation=mode)
        else:
            width, height = image.size
            short, long = sorted((width, height))
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if height <= width else (new_long, self.resize)
            image = TF.resize(image, list(size), interpolation=mode)
        if self.crop is not None:
            width, height = image.size
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            image = TF.crop(image, top, left, *self.crop)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def data_config(model: nn.Module, directory: Optional[str | os.PathLike] = None) -> dict:
    """timm's data config for ``model`` (mean, std, crop, interpolation), with the input size
    and channels taken from the model itself when it has a fixed image size; for a Hugging Face
    vision model, its image processor's (:func:`hf_data_config`, from ``directory``)."""
    if _is_hf_vision(model):
        return hf_data_config(model, directory)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (pe.proj.in_channels, *tuple(pe.img_size))
    channels = cfg["input_size"][0]
    if len(cfg["mean"]) != channels:
        cfg["mean"], cfg["std"] = tuple(cfg["mean"][:channels]), tuple(cfg["std"][:channels])
    return cfg


def image_transform(model: nn.Module, directory: Optional[str | os.PathLike] = None, cfg: Optional[dict] = None):
    """The eval transform of :func:`data_config` (or of ``cfg``): PIL image → ``(C, H, W)`` tensor."""
    cfg = cfg if cfg is not None else data_config(model, directory)
    if "hf_resize" in cfg:
        return HFImageTransform(cfg)
    from timm.data import create_transform

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
                       seed: int = 0, shard: tuple[int, int] = (0, 1),
                       directory: Optional[str | os.PathLike] = None) -> DataLoader:
    """Unlabeled calibration images under ``root`` (or the listed files) as batches ``(B, C, H, W)``
    (this rank's ``shard``); ``directory``: the model's, for a Hugging Face image processor config."""
    cfg = data_config(model, directory)
    dataset = ImageFiles(root, image_transform(model, cfg=cfg), channels=cfg["input_size"][0], limit=limit,
                         seed=seed, shard=shard)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def eval_loader(model: nn.Module, root: str, batch_size: int, workers: int,
                directory: Optional[str | os.PathLike] = None) -> DataLoader:
    """A labelled ImageFolder (one sub-folder per class, sorted class names = label order)."""
    from torchvision.datasets import ImageFolder

    cfg = data_config(model, directory)
    channels = cfg["input_size"][0]
    dataset = ImageFolder(root, transform=image_transform(model, cfg=cfg),
                          loader=lambda p: _load_image(Path(p), channels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
