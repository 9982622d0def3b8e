"""Model families corp can prune, each behind one :class:`~corp.models.base.ModelAdapter`.

:func:`adapter_for` picks the adapter of a model (TypeError naming the model's
class when no family matches); :func:`adapter_named` the adapter a saved
config names.
"""
from __future__ import annotations

import torch.nn as nn

from .base import AttentionPart, AttentionWeights, MlpPart, MlpWeights, ModelAdapter, unsupported
from .timm_eva import TimmEva
from .timm_vit import TimmViT

__all__ = ["ADAPTERS", "TimmViT", "TimmEva", "adapter_for", "adapter_named", "ModelAdapter", "AttentionPart", "MlpPart",
           "AttentionWeights", "MlpWeights", "unsupported"]

ADAPTERS: tuple[type[ModelAdapter], ...] = (TimmViT, TimmEva)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (it may still refuse some of its modules: ``check_supported``)."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise TypeError(
        f"unsupported model type {type(model).__name__}: corp prunes timm VisionTransformer models "
        "(deit_*, deit3_*, vit_*) and timm Eva models (eva02_*, vit_*_rope_*)"
    )


def adapter_named(name: str) -> ModelAdapter:
    for cls in ADAPTERS:
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown model family {name!r} in config (known: {[c.name for c in ADAPTERS]})")
