"""Model families corp can prune, each behind one :class:`~corp.models.base.ModelAdapter`.

:func:`adapter_for` picks the adapter of a model (TypeError naming the model's
class when no family matches); :func:`adapter_named` the adapter a saved
config names.
"""
from __future__ import annotations

import torch.nn as nn

from .base import AttentionPart, AttentionWeights, ConcatenatedOutputs, MlpPart, MlpWeights, ModelAdapter, unsupported
from .hf import HF_ADAPTERS
from .timm_eva import TimmEva
from .timm_vit import TimmViT

__all__ = ["ADAPTERS", "TimmViT", "TimmEva", "adapter_for", "adapter_named", "ModelAdapter", "AttentionPart", "MlpPart",
           "AttentionWeights", "MlpWeights", "ConcatenatedOutputs", "unsupported"]

# Hugging Face families import transformers only when one of their models is met
ADAPTERS: tuple[type[ModelAdapter], ...] = (TimmViT, TimmEva) + HF_ADAPTERS


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family (it may still refuse some of its modules: ``check_supported``)."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise TypeError(
        f"unsupported model type {type(model).__name__}: corp prunes timm VisionTransformer models "
        "(deit_*, deit3_*, vit_*), timm Eva models (eva02_*, vit_*_rope_*) and the Hugging Face transformers "
        "classes " + ", ".join(name for cls in HF_ADAPTERS for name in cls.model_classes)
    )


def adapter_named(name: str) -> ModelAdapter:
    for cls in ADAPTERS:
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown model family {name!r} in config (known: {[c.name for c in ADAPTERS]})")
