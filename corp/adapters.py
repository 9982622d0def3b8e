"""Model adapter for timm's VisionTransformer family.

Knows which timm modules CORP can prune, how to embed images up to the first
block, how to describe a model's architecture as JSON and rebuild it, and how
to reshape a freshly built model to a pruned model's widths.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
from timm.layers.activations import GELUTanh, QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .modules import PrunedAttention

__all__ = [
    "check_supported",
    "embed",
    "check_images",
    "describe_architecture",
    "build_architecture",
    "block_widths",
    "apply_block_widths",
    "reshape_block",
]

_MODEL_CLASSES = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}

# Activation modules corp can describe and rebuild, by config name.
_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "timm_gelu_tanh": GELUTanh,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def _activation_name(act: nn.Module) -> str:
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for name, cls in (("timm_gelu_tanh", GELUTanh), ("quick_gelu", QuickGELU), ("relu", nn.ReLU), ("silu", nn.SiLU)):
        if type(act) is cls:
            return name
    raise ValueError(f"unsupported MLP activation {type(act).__name__}: corp can save gelu, gelu_tanh, quick_gelu, relu, silu")


def _unsupported(path: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"unsupported module at '{path}' ({type(module).__name__}): {why}")


def check_supported(model: nn.Module) -> None:
    """Raise TypeError/ValueError naming the first thing corp cannot prune in ``model``."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"unsupported model type {type(model).__name__}: corp prunes timm VisionTransformer models "
            "(deit_*, deit3_*, vit_*)"
        )
    if type(model) not in _MODEL_CLASSES.values():
        raise TypeError(f"unsupported VisionTransformer subclass {type(model).__name__}")
    if type(model.patch_embed) is not PatchEmbed:
        raise _unsupported("patch_embed", model.patch_embed, "only timm PatchEmbed is supported")
    if len(model.blocks) == 0:
        raise ValueError("the model has no transformer blocks to prune")
    for i, block in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(block) is not Block:
            raise _unsupported(path, block, "only timm's pre-norm Block is supported")
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, PrunedAttention):
            raise _unsupported(f"{path}.attn", attn, "this block was already pruned by corp")
        if type(attn) is not Attention:
            raise _unsupported(f"{path}.attn", attn, "only timm's Attention is supported")
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise _unsupported(f"{path}.attn.q_norm", attn.q_norm, "query/key normalisation is not supported")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise _unsupported(f"{path}.attn.norm", attn.norm, "attention output normalisation is not supported")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(f"{path}.attn.gate", attn.gate, "gated attention is not supported")
        if attn.num_heads * attn.head_dim != attn.qkv.out_features // 3:
            raise _unsupported(f"{path}.attn", attn, "qkv width is not 3 × heads × head_dim")
        if type(mlp) is not Mlp:
            raise _unsupported(f"{path}.mlp", mlp, "only timm's two-layer Mlp is supported (no GLU/SwiGLU)")
        if not isinstance(mlp.norm, nn.Identity):
            raise _unsupported(f"{path}.mlp.norm", mlp.norm, "MLP hidden normalisation is not supported")
        if type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
            raise _unsupported(f"{path}.mlp.fc1", mlp.fc1, "fc1/fc2 must be nn.Linear")
        for name in ("ls1", "ls2"):
            ls = getattr(block, name)
            if not isinstance(ls, (nn.Identity, LayerScale)):
                raise _unsupported(f"{path}.{name}", ls, "unknown layer scale")


def check_images(model: VisionTransformer, images: torch.Tensor) -> None:
    """Raise ValueError if ``images`` ``(B, C, H, W)`` cannot go through ``model``'s patch embedding."""
    if not torch.is_tensor(images):
        raise TypeError(f"calibration batches must be tensors, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"calibration images must be floating point (normalised), got {images.dtype}")
    pe = model.patch_embed
    channels = pe.proj.in_channels
    if images.shape[1] != channels:
        raise ValueError(f"calibration images have {images.shape[1]} channels, the model expects {channels}")
    size = tuple(images.shape[-2:])
    if getattr(pe, "strict_img_size", True) and not model.dynamic_img_size:
        if size != tuple(pe.img_size):
            raise ValueError(f"calibration images are {size[0]}×{size[1]}, the model expects {pe.img_size[0]}×{pe.img_size[1]}")
    elif not getattr(pe, "dynamic_img_pad", False):
        if size[0] % pe.patch_size[0] or size[1] % pe.patch_size[1]:
            raise ValueError(f"calibration image size {size} is not a multiple of the patch size {tuple(pe.patch_size)}")


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` → the first block's input ``(B, T, D)``, as ``forward_features`` computes it."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def block_widths(model: VisionTransformer) -> list[dict[str, int]]:
    """Per block: MLP hidden width and attention query/key width per head."""
    widths = []
    for block in model.blocks:
        attn = block.attn
        qk = attn.qk_dim if isinstance(attn, PrunedAttention) else attn.head_dim
        widths.append({"mlp_hidden": block.mlp.fc1.out_features, "qk_dim": qk})
    return widths


def _norm_eps(model: VisionTransformer) -> float:
    norm = model.blocks[0].norm1
    if not isinstance(norm, nn.LayerNorm):
        raise _unsupported("blocks.0.norm1", norm, "only LayerNorm can be saved")
    return float(norm.eps)


def describe_architecture(model: VisionTransformer) -> dict[str, Any]:
    """A JSON-able description from which :func:`build_architecture` rebuilds the dense skeleton."""
    check_pruned_or_supported_for_save(model)
    pe = model.patch_embed
    block = model.blocks[0]
    attn = block.attn
    dim = model.embed_dim
    # A pruned model's widths are restored by apply_block_widths; the skeleton's
    # MLP ratio only has to produce valid modules.
    mlp_hidden = block.mlp.fc1.out_features
    init_values = None
    if isinstance(block.ls1, LayerScale):
        init_values = 1e-5  # the value is irrelevant: the saved gamma overwrites it
    kwargs = dict(
        img_size=list(pe.img_size),
        patch_size=list(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=mlp_hidden / dim,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        init_values=init_values,
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size,
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
    )
    return {
        "class": type(model).__name__,
        "kwargs": kwargs,
        "norm_eps": _norm_eps(model),
        "act": _activation_name(block.mlp.act),
    }


def check_pruned_or_supported_for_save(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer) or type(model) not in _MODEL_CLASSES.values():
        raise TypeError(f"cannot save {type(model).__name__}: corp saves timm VisionTransformer models")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.mlp) is not Mlp:
            raise _unsupported(f"blocks.{i}", block, "cannot be described for saving")
        if not isinstance(block.attn, (Attention, PrunedAttention)):
            raise _unsupported(f"blocks.{i}.attn", block.attn, "cannot be described for saving")


def build_architecture(arch: dict[str, Any], widths: list[dict[str, int]] | None = None) -> VisionTransformer:
    """Build the model described by :func:`describe_architecture`, reshaped to ``widths``.

    Weights are freshly initialised: load a state dict afterwards.
    """
    cls = _MODEL_CLASSES.get(arch["class"])
    if cls is None:
        raise ValueError(f"unknown model class {arch['class']!r} in config")
    act = _ACTIVATIONS.get(arch["act"])
    if act is None:
        raise ValueError(f"unknown activation {arch['act']!r} in config")
    kwargs = dict(arch["kwargs"])
    kwargs["img_size"] = tuple(kwargs["img_size"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    model = cls(
        **kwargs,
        norm_layer=partial(nn.LayerNorm, eps=arch["norm_eps"]),
        act_layer=act,
        weight_init="skip",
    )
    if widths is not None:
        apply_block_widths(model, widths)
    return model


def apply_block_widths(model: VisionTransformer, widths: list[dict[str, int]]) -> None:
    """Replace modules so that block i has ``widths[i]``'s MLP hidden and q/k widths (weights uninitialised)."""
    if len(widths) != len(model.blocks):
        raise ValueError(f"config lists {len(widths)} blocks, the architecture has {len(model.blocks)}")
    for block, w in zip(model.blocks, widths):
        reshape_block(block, w)


def reshape_block(block: Block, widths: dict[str, int]) -> None:
    """Give ``block`` MLP hidden width ``widths["mlp_hidden"]`` and q/k width ``widths["qk_dim"]``
    (new modules, on the block's device and dtype, weights uninitialised)."""
    mlp = block.mlp
    ref = mlp.fc1.weight
    dd = {"device": ref.device, "dtype": ref.dtype}
    if widths["mlp_hidden"] != mlp.fc1.out_features:
        dim = mlp.fc1.in_features
        mlp.fc1 = nn.Linear(dim, widths["mlp_hidden"], bias=mlp.fc1.bias is not None, **dd)
        mlp.fc2 = nn.Linear(widths["mlp_hidden"], mlp.fc2.out_features, bias=mlp.fc2.bias is not None, **dd)
    attn = block.attn
    current = attn.qk_dim if isinstance(attn, PrunedAttention) else attn.head_dim
    if widths["qk_dim"] != current:
        if isinstance(attn, PrunedAttention):
            raise ValueError("cannot reshape an already pruned attention")
        block.attn = pruned_attention_like(attn, widths["qk_dim"])


def pruned_attention_like(attn: Attention, qk_dim: int) -> PrunedAttention:
    """An (uninitialised) :class:`PrunedAttention` with ``attn``'s shape and options, on its device and dtype."""
    weight = attn.qkv.weight
    return PrunedAttention(
        dim=attn.qkv.in_features,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        qk_dim=qk_dim,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        attn_drop=attn.attn_drop.p,
        proj_drop=attn.proj_drop.p,
        device=weight.device,
        dtype=weight.dtype,
    )


def count_tokens(model: VisionTransformer, image_hw: tuple[int, int]) -> int:
    """Tokens per image of size ``image_hw`` entering the blocks."""
    pe = model.patch_embed
    grid = [math.ceil(s / p) for s, p in zip(image_hw, pe.patch_size)]
    return grid[0] * grid[1] + model.num_prefix_tokens
