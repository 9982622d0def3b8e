"""corp: one-shot, label-free structured pruning of Vision Transformers with closed-form compensation (CORP).

The public names are imported on first use (PEP 562 ``__getattr__``), so that
``import corp`` and the ``corp`` command line (``corp --help``, argument
errors) do not pay for importing torch and timm before they need them.
``from corp import prune`` and ``corp.prune`` work as usual.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "prune": "pipeline",
    "PruneConfig": "config",
    "METHODS": "config",
    "DEFAULT_MLP_RIDGE": "config",
    "DEFAULT_ATTN_RIDGE": "config",
    "save_pretrained": "io",
    "load_pretrained": "io",
    "load_model": "io",
    "meta_model": "lazy",
    "PrunedAttention": "modules",
    "PruneReport": "report",
    "BlockReport": "report",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:  # `import corp; corp.report.count_parameters(...)`: submodules on attribute access too
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
