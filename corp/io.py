"""Saving and loading pruned models: ``model.safetensors`` + ``config.json``, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__
from .models import adapter_for, adapter_named

__all__ = ["save_pretrained", "load_pretrained", "load_model", "load_hf_model", "is_corp_dir", "is_hf_dir",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "corp-vit"
FORMAT_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Drop what JSON cannot hold (callables, tensors) from a timm pretrained_cfg."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if _is_plain(v)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value if _is_plain(v)]
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, (dict, list, tuple)):
        return True
    return value is None or isinstance(value, (str, int, float, bool))


def _model_config(model: nn.Module) -> dict[str, Any]:
    adapter = adapter_for(model)
    corp_config = getattr(model, "corp_config", None) or {}
    arch = corp_config.get("architecture")
    if arch is None or "error" in arch:
        if arch is not None and "error" in arch:
            raise ValueError(f"cannot save this model: {arch['error']}")
        arch = adapter.describe(model)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "corp_version": __version__,
        "base_model": pretrained_cfg.get("architecture") if isinstance(pretrained_cfg, dict) else None,
        "family": adapter.name,
        "architecture": arch,
        "blocks": adapter.block_widths(model),
        "dense_blocks": corp_config.get("dense_blocks"),
        "pruning": corp_config.get("pruning"),
        "pretrained_cfg": _jsonable(dict(pretrained_cfg)) if isinstance(pretrained_cfg, dict) else {},
    }
    report = getattr(model, "corp_report", None)
    if report is not None:
        config["report"] = report.to_dict()
    return config


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_corp_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (a ``config.json`` with a ``model_type``)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != FORMAT


def load_hf_model(directory: str | os.PathLike) -> nn.Module:
    """A local Hugging Face model directory → the model in eval mode, never from the hub.

    The class is the config's first ``architectures`` entry when transformers has it (e.g.
    ``ViTForImageClassification``), else ``AutoModel``'s choice (e.g. ``BertModel``).
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{directory} is a Hugging Face model directory: install transformers "
                          "(pip install corp-prune[hf])") from exc
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(directory), local_files_only=True).eval()


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (pruned or dense timm ViT) to ``directory``: weights and config.

    The directory is assembled under a temporary name beside its target and then
    renamed into place, so a crash never leaves a half-written model, and an
    existing save is replaced only once the new one is complete. A non-empty
    directory that is not a corp save is never overwritten.

    Returns the directory path.
    """
    target = Path(directory)
    config = _model_config(model)
    # Rebuild the skeleton now: a config that cannot reproduce the model fails here, not at load time.
    skeleton = adapter_named(config["family"]).build(config["architecture"], config["blocks"])
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))[:5]
        raise ValueError(f"cannot describe this model for saving: rebuilt architecture differs at {diff}")
    if target.exists() and any(target.iterdir()) and not is_corp_dir(target):
        raise FileExistsError(f"{target} exists and is not a corp model directory: refusing to overwrite it")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        with open(tmp / WEIGHTS_NAME, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_write(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_pretrained(directory: str | os.PathLike, device: Optional[torch.device | str] = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, without the original checkpoint.

    Returns the model in eval mode, with ``pretrained_cfg`` (for timm's data
    config), ``corp_config`` and, when saved, ``corp_report`` restored.
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a corp model directory")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a corp model config (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{directory} was written by a newer corp (format {config['format_version']}); upgrade corp to load it"
        )
    # saves of corp 0.1.0 name no family: they are all timm ViTs
    model = adapter_named(config.get("family", "timm_vit")).build(config["architecture"], config["blocks"])
    state = load_file(str(directory / WEIGHTS_NAME))
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    model.corp_config = {k: config.get(k) for k in ("architecture", "blocks", "dense_blocks", "pruning", "corp_version")}
    if config.get("report"):
        from .report import PruneReport

        model.corp_report = PruneReport.from_dict(config["report"])
    if device is not None:
        model.to(device)
    return model.eval()


def load_model(name_or_dir: str, checkpoint: Optional[str] = None, pretrained: bool = True, **kwargs) -> nn.Module:
    """A corp directory → :func:`load_pretrained`; a Hugging Face model directory →
    :func:`load_hf_model`; otherwise a timm model name.

    ``checkpoint``: a local weights file for the timm model (no hub download).
    Extra ``kwargs`` go to ``timm.create_model``.
    """
    if os.path.isdir(name_or_dir):
        if is_corp_dir(name_or_dir):
            return load_pretrained(name_or_dir)
        if is_hf_dir(name_or_dir):
            return load_hf_model(name_or_dir)
        raise ValueError(f"{name_or_dir} is a directory but not a corp model directory (no corp {CONFIG_NAME}) "
                         f"nor a Hugging Face one (no {CONFIG_NAME} with a model_type)")
    import timm

    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint file {checkpoint} does not exist")
        model = timm.create_model(name_or_dir, pretrained=False, checkpoint_path=checkpoint, **kwargs)
    else:
        model = timm.create_model(name_or_dir, pretrained=pretrained, **kwargs)
    return model.eval()
