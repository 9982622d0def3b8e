"""Checks of files and folders that need neither torch nor timm (the CLI runs them before it
imports either), and the umask-respecting modes of atomically written files."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "IMAGE_EXTENSIONS", "is_corp_dir", "is_hf_dir", "check_output_dir",
           "check_creatable", "apply_umask", "list_image_files", "image_folder_classes"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "corp-vit"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (``0o666``/``0o777`` less the umask).

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 on purpose; an atomic write that renames
    such a temporary into place must widen it to what the user's umask allows, as other tools do.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_creatable(target: Path, what: str) -> None:
    """Refuse a ``target`` path whose nearest existing parent is a file or cannot be written.

    The permission test creates (and removes) an empty directory there: ``os.access`` alone
    is wrong for root, read-only mounts, ACLs and network filesystems.
    """
    import tempfile

    parent = Path(target).absolute().parent
    while not parent.exists():  # missing parents are created
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {what}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {what}: no write permission in {parent}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".corp-write-test-", dir=parent))
    except OSError as exc:
        raise PermissionError(f"cannot create {what}: cannot write in {parent} ({exc.strerror})") from None


def check_output_dir(directory: str | os.PathLike) -> Path:
    """Refuse, before any work, a ``directory`` that :func:`corp.save_pretrained` could not write.

    Raises:
        FileExistsError: it exists and is a file, or a non-empty directory that is not a corp save.
        NotADirectoryError: a parent of it is a file.
        PermissionError: the nearest existing parent is not writable (:func:`check_creatable`).
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not a directory: choose another output path")
    if target.is_dir() and any(target.iterdir()) and not is_corp_dir(target):
        raise FileExistsError(f"{target} exists and is not a corp model directory: refusing to overwrite it")
    check_creatable(target, str(target))
    return target


def is_corp_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a config.json written by corp."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


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


def hf_model_type(path: str | os.PathLike) -> str:
    """The ``model_type`` of a Hugging Face model directory's config (e.g. ``"bert"``, ``"vit"``)."""
    return str(json.loads((Path(path) / CONFIG_NAME).read_text()).get("model_type", ""))


# model_type values of the Hugging Face text encoders corp prunes (corp.models.hf.HFBert)
HF_TEXT_MODEL_TYPES = ("bert",)


def check_text_file(path: str | os.PathLike) -> None:
    """A calibration text file (one sample per line) that exists, is UTF-8 and holds a non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise ValueError(f"calibration file {path} holds no text: expected one sample per line")
    except UnicodeDecodeError as exc:
        raise ValueError(f"calibration file {path} is not UTF-8 text (one sample per line)") from exc


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted; FileNotFoundError/ValueError when there is none."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"calibration directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"calibration path {root} is a file, not a directory of images")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder ``root``: its sub-folders, sorted; class ``i`` is label ``i``
    (torchvision's order). Raises when ``root`` has no sub-folder or a sub-folder holds no image."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {root} is a file, not an ImageFolder directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: an ImageFolder has one sub-folder of images per class")
    empty = [c for c in classes if not any(_is_image(p) for p in (root / c).rglob("*"))]
    if empty:
        raise ValueError(f"class folders without image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}: "
                         f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    return classes
