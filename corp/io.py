"""Saving and loading pruned models: ``model.safetensors`` + ``config.json``, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__
from .models import adapter_for, adapter_named
from .paths import CONFIG_NAME, FORMAT, WEIGHTS_NAME, apply_umask, check_output_dir, is_corp_dir, is_hf_dir

__all__ = ["apply_umask", "save_pretrained", "load_pretrained", "load_model", "load_hf_model", "is_corp_dir",
           "is_hf_dir", "check_output_dir", "HubUnreachableError",
           "CONFIG_NAME", "WEIGHTS_NAME"]

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


def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``model`` (pruned or dense timm ViT) to ``directory``: weights and config.

    The directory is assembled under a temporary name beside its target and then
    renamed into place, so a crash never leaves a half-written model, and an
    existing save is replaced only once the new one is complete. A non-empty
    directory that is not a corp save is never overwritten.

    ``extra_files``: files copied in beside the weights, in the same atomic save (e.g. a
    Hugging Face ``preprocessor_config.json``); their names must not be corp's own.

    Returns the directory path.
    """
    extra = [Path(f) for f in extra_files]
    for f in extra:
        if f.name in (WEIGHTS_NAME, CONFIG_NAME) or not f.is_file():
            raise ValueError(f"extra file {f} is not a file, or would replace corp's own {f.name}")
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
    check_output_dir(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        with open(tmp / WEIGHTS_NAME, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_write(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
        for f in extra:
            _fsync_write(tmp / f.name, f.read_bytes())
        for name in (WEIGHTS_NAME, CONFIG_NAME, *(f.name for f in extra)):
            apply_umask(tmp / name)
        apply_umask(tmp, directory=True)  # mkdtemp made it 0700
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
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}: an incomplete corp model directory")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ValueError(f"cannot read {weights}: {exc}") from exc
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    model.corp_config = {k: config.get(k) for k in ("architecture", "blocks", "dense_blocks", "pruning", "corp_version")}
    if config.get("report"):
        from .report import PruneReport

        model.corp_report = PruneReport.from_dict(config["report"])
    if device is not None:
        model.to(device)
    return model.eval()


class HubUnreachableError(ConnectionError):
    """A timm model's pretrained weights are neither cached nor downloadable now (offline or no network)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds.

    Behind a proxy the answer is left to the download itself (True): only the proxy knows.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    scheme = parsed.scheme or "https"
    if any(os.environ.get(k) for k in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")):
        return True
    port = parsed.port or (443 if scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_weights(repo_id: str) -> Optional[str]:
    """The weights of ``repo_id`` in the local Hugging Face cache, as timm would download them, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):  # timm's order
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def _weights_source(name: str) -> Optional[str]:
    """Where ``timm.create_model(name, pretrained=True)`` should read its weights without hanging.

    Returns None to let timm download as usual (the source is reachable, or the weights are in
    torch's cache), or the path of a cached copy to read directly when the Hugging Face hub is
    offline (``HF_HUB_OFFLINE``) or unreachable: huggingface_hub would otherwise retry the
    network for about a minute before it looks in its cache.

    Raises:
        HubUnreachableError: the weights are not cached and cannot be downloaded now; the
            message says what to pass instead.
    """
    from timm.models import get_pretrained_cfg, is_model, parse_model_name

    source, arch = parse_model_name(name)
    if source == "local-dir":
        return None
    if source == "hf-hub":
        hub_id, url = arch, None
    else:
        if not is_model(arch):
            return None  # timm names the unknown model itself
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
        if cfg is None:
            return None  # timm itself reports a model without pretrained weights
        hub_id, url = cfg.hf_hub_id, cfg.url
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if hub_id:
        hub_id = hub_id.split("@")[0]  # a revision suffix is not part of the cache's repository name
        cached = _cached_hub_weights(hub_id)
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
        if not offline and _reachable(endpoint):
            return None
        if cached is not None:
            return cached
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face hub ({endpoint}) cannot be reached"
        what = f"{hub_id} from the Hugging Face hub"
    elif url:
        import torch.hub

        if Path(torch.hub.get_dir(), "checkpoints", Path(url).name).is_file() or _reachable(url):
            return None
        why, what = f"{url} cannot be reached", url
    else:
        return None
    raise HubUnreachableError(
        f"cannot download the pretrained weights of {name!r} ({what}): {why}, and they are not in the local "
        "cache. Pass a local weights file with --checkpoint FILE (corp.load_model(name, checkpoint=FILE)), "
        "a directory written by corp (corp prune --out / corp.save_pretrained), or a timm "
        "'local-dir:/path/to/folder' holding config.json and model.safetensors; or download the weights "
        "once where the network is reachable (they are then cached)."
    )


def load_model(name_or_dir: str, checkpoint: Optional[str] = None, pretrained: bool = True, **kwargs) -> nn.Module:
    """A corp directory → :func:`load_pretrained`; a Hugging Face model directory →
    :func:`load_hf_model`; otherwise a timm model name.

    ``checkpoint``: a local weights file for the timm model (no hub download). Without it the
    weights come from timm's sources; when the hub is offline (``HF_HUB_OFFLINE=1``) or cannot
    be reached, a cached copy is read directly and, without one, :class:`HubUnreachableError`
    says so at once instead of after the hub's retries.
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
    elif pretrained and (cached := _weights_source(name_or_dir)) is not None:
        overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": cached}
        model = timm.create_model(name_or_dir, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = timm.create_model(name_or_dir, pretrained=pretrained, **kwargs)
    return model.eval()
