"""Adapter for timm's VisionTransformer family (deit_*, deit3_*, vit_*).

All timm knowledge of corp lives here: which modules can be pruned, how images
are embedded up to the first block, where the statistics read a block's
activations (``attn.qkv`` output, the MLP's hidden activation), the dense
weights of each part, how pruned parts are built (:class:`~corp.modules.PrunedAttention`,
an MLP of the same class with fewer hidden channels: ``Mlp``, ``SwiGLU``,
``GluMlp``/``SwiGLUPacked``, :mod:`corp.models.timm_mlp`), costs, and how a model is
described as JSON and rebuilt for :mod:`corp.io`.

q/k normalisation (``qk_norm=True``: a LayerNorm/RmsNorm over each head's query and
key) is accepted for MLP pruning; its q/k dims are not pruned (``AttentionPart.refusal``):
the norm reads all ``head_dim`` dims of a head, so dropping a dim changes the mean and
scale that every kept dim is normalised by, and the pruned logit is no longer a function
of the kept projections that a fold could compensate.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, LayerNorm, LayerScale, PatchEmbed, RmsNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from ..modules import PrunedAttention, load_fused_qkv_
from .base import AttentionPart, AttentionWeights, MlpPart, ModelAdapter, unsupported
from .timm_mlp import ACTIVATIONS, mlp_kind, mlp_kind_named

__all__ = ["TimmViT", "pruned_attention_like", "QK_NORM_REFUSAL"]

_MODEL_CLASSES = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}

QK_NORM_REFUSAL = (
    "attn.q_norm/k_norm normalise each head's query and key over all its dims, so removing a dim changes "
    "the normalisation of every kept dim: the logit after pruning is not a function of the kept projections "
    "that a fold into the weights could compensate (and the norm would still need every dim computed)"
)
_QK_NORMS = (nn.LayerNorm, LayerNorm, RmsNorm)


def _check_supported(model: nn.Module) -> None:
    """Raise TypeError/ValueError naming the first thing corp cannot prune in ``model``."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"unsupported model type {type(model).__name__}: corp prunes timm VisionTransformer models "
            "(deit_*, deit3_*, vit_*)"
        )
    if type(model) not in _MODEL_CLASSES.values():
        raise TypeError(f"unsupported VisionTransformer subclass {type(model).__name__}")
    if type(model.patch_embed) is not PatchEmbed:
        raise unsupported("patch_embed", model.patch_embed, "only timm PatchEmbed is supported")
    if len(model.blocks) == 0:
        raise ValueError("the model has no transformer blocks to prune")
    for i, block in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(block) is not Block:
            raise unsupported(path, block, "only timm's pre-norm Block is supported")
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, PrunedAttention):
            raise unsupported(f"{path}.attn", attn, "this block was already pruned by corp")
        if type(attn) is not Attention:
            raise unsupported(f"{path}.attn", attn, "only timm's Attention is supported")
        for name in ("q_norm", "k_norm"):
            norm = getattr(attn, name)
            if not isinstance(norm, nn.Identity) and type(norm) not in _QK_NORMS:
                raise unsupported(f"{path}.attn.{name}", norm, "only LayerNorm/RmsNorm query/key normalisation is supported")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise unsupported(f"{path}.attn.norm", attn.norm, "attention output normalisation is not supported")
        if getattr(attn, "gate", None) is not None:
            raise unsupported(f"{path}.attn.gate", attn.gate, "gated attention is not supported")
        if attn.num_heads * attn.head_dim != attn.qkv.out_features // 3:
            raise unsupported(f"{path}.attn", attn, "qkv width is not 3 × heads × head_dim")
        mlp_kind(f"{path}.mlp", mlp).check(f"{path}.mlp", mlp)
        for name in ("ls1", "ls2"):
            ls = getattr(block, name)
            if not isinstance(ls, (nn.Identity, LayerScale)):
                raise unsupported(f"{path}.{name}", ls, "unknown layer scale")


def _check_images(model: VisionTransformer, images: torch.Tensor) -> None:
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


def _embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` → the first block's input ``(B, T, D)``, as ``forward_features`` computes it."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _norm_eps(model: VisionTransformer) -> float:
    norm = model.blocks[0].norm1
    if not isinstance(norm, nn.LayerNorm):
        raise unsupported("blocks.0.norm1", norm, "only LayerNorm can be saved")
    return float(norm.eps)


def _qk_norm(model: VisionTransformer) -> bool:
    """Whether the attentions normalise q/k (saved only when they use the blocks' LayerNorm, as timm builds them)."""
    attn = model.blocks[0].attn
    if isinstance(attn, PrunedAttention) or isinstance(attn.q_norm, nn.Identity):
        return False
    if not isinstance(attn.q_norm, nn.LayerNorm) or float(attn.q_norm.eps) != _norm_eps(model):
        raise unsupported("blocks.0.attn.q_norm", attn.q_norm, "only a q/k LayerNorm like the blocks' norms can be saved")
    return True


def _describe(model: VisionTransformer) -> dict[str, Any]:
    """A JSON-able description from which :func:`build_architecture` rebuilds the dense skeleton."""
    _check_describable(model)
    pe = model.patch_embed
    block = model.blocks[0]
    attn = block.attn
    dim = model.embed_dim
    # A pruned model's widths are restored by reshape_block; the skeleton's
    # MLP ratio only has to produce valid modules.
    kind = mlp_kind("blocks.0.mlp", block.mlp)
    mlp_hidden = kind.constructor_hidden(block.mlp)
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
        qk_norm=_qk_norm(model),
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
    mlp = kind.describe(block.mlp)
    return {
        "class": type(model).__name__,
        "kwargs": kwargs,
        "norm_eps": _norm_eps(model),
        "act": mlp.pop("act"),
        "mlp": mlp,
    }


def _check_describable(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer) or type(model) not in _MODEL_CLASSES.values():
        raise TypeError(f"cannot save {type(model).__name__}: corp saves timm VisionTransformer models")
    first = None
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise unsupported(f"blocks.{i}", block, "cannot be described for saving")
        desc = mlp_kind(f"blocks.{i}.mlp", block.mlp).describe(block.mlp)
        first = first or desc
        if desc != first:  # timm builds every block's MLP with one mlp_layer and act_layer
            raise unsupported(f"blocks.{i}.mlp", block.mlp, f"differs from blocks.0.mlp ({desc} vs {first}): cannot be saved")
        if not isinstance(block.attn, (Attention, PrunedAttention)):
            raise unsupported(f"blocks.{i}.attn", block.attn, "cannot be described for saving")


def _build(arch: dict[str, Any], widths: list[dict[str, int]] | None = None) -> VisionTransformer:
    """Build the model described by :func:`describe_architecture`, reshaped to ``widths``.

    Weights are freshly initialised: load a state dict afterwards.
    """
    cls = _MODEL_CLASSES.get(arch["class"])
    if cls is None:
        raise ValueError(f"unknown model class {arch['class']!r} in config")
    act = ACTIVATIONS.get(arch["act"])
    if act is None:
        raise ValueError(f"unknown activation {arch['act']!r} in config")
    mlp = arch.get("mlp", {"kind": "mlp"})  # saves before gated MLPs hold plain Mlps
    kwargs = dict(arch["kwargs"])
    kwargs["img_size"] = tuple(kwargs["img_size"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    model = cls(
        **kwargs,
        norm_layer=partial(nn.LayerNorm, eps=arch["norm_eps"]),
        act_layer=act,
        mlp_layer=mlp_kind_named(mlp["kind"]).layer(mlp),
        weight_init="skip",
    )
    if widths is not None:
        if len(widths) != len(model.blocks):
            raise ValueError(f"config lists {len(widths)} blocks, the architecture has {len(model.blocks)}")
        for block, w in zip(model.blocks, widths):
            reshape_block(block, w)
    return model


def reshape_block(block: Block, widths: dict[str, int]) -> None:
    """Give ``block`` MLP hidden width ``widths["mlp_hidden"]`` and q/k width ``widths["qk_dim"]``
    (new modules, on the block's device and dtype, weights uninitialised)."""
    mlp_kind("mlp", block.mlp).reshape_(block.mlp, widths["mlp_hidden"])
    attn = block.attn
    current = attn.qk_dim if isinstance(attn, PrunedAttention) else attn.head_dim
    if widths["qk_dim"] != current:
        if isinstance(attn, PrunedAttention):
            raise ValueError("cannot reshape an already pruned attention")
        block.attn = pruned_attention_like(attn, widths["qk_dim"])


def pruned_attention_like(attn: Attention, qk_dim: int) -> PrunedAttention:
    """An (uninitialised) :class:`PrunedAttention` with ``attn``'s shape and options, on its device and dtype."""
    weight = attn.qkv.weight
    return torch.nn.utils.skip_init(  # every caller overwrites the weights (corp.models.base.empty_linear)
        PrunedAttention,
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


def _count_tokens(model: VisionTransformer, image_hw: tuple[int, int]) -> int:
    """Tokens per image of size ``image_hw`` entering the blocks."""
    pe = model.patch_embed
    grid = [math.ceil(s / p) for s, p in zip(image_hw, pe.patch_size)]
    return grid[0] * grid[1] + model.num_prefix_tokens


def _qk_width(attn: nn.Module) -> int:
    return attn.qk_dim if isinstance(attn, PrunedAttention) else attn.head_dim


def _attention_weights(attn: Attention) -> AttentionWeights:
    h, d = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.detach().to(torch.float64).view(3, h, d, -1)
    b = attn.qkv.bias.detach().to(torch.float64).view(3, h, d) if attn.qkv.bias is not None else None
    return AttentionWeights(w[0], w[1], w[2], *(b if b is not None else (None, None, None)))


def _build_attention(attn: Attention, weights: AttentionWeights, qk_dim: int) -> PrunedAttention:
    new = pruned_attention_like(attn, qk_dim)
    with torch.no_grad():
        load_fused_qkv_(new, weights, qk_dim)
        new.proj.load_state_dict(attn.proj.state_dict())
    new.train(attn.training)
    return new


def _dense_heads(attn: Attention, qkv: torch.Tensor, query_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm ``Attention.forward`` from its qkv projection's output ``(B, N, 3·H·d)`` to the output
    projection's input ``(B, N, H·d)`` (output norms and gates are refused by :func:`_check_supported`):
    bitwise the module's own where timm uses its fused attention (its default; with ``TIMM_FUSED_ATTN=0``
    the module's explicit softmax rounds differently). ``query_map`` ``(H, d, d)``: the queries are
    ``q @ query_map`` per head instead (:func:`corp.fold.query_map`; q/k norms are refused then)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if query_map is not None:
        q = torch.matmul(q, query_map.to(q))  # (B, H, N, d) @ (H, d, d)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))


class TimmViT(ModelAdapter):
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled`` with pre-norm ``Block``, ``Attention``
    (q/k norms: MLP pruning only) and ``Mlp``/``SwiGLU``/``GluMlp``."""

    name = "timm_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check_supported(self, model: nn.Module) -> None:
        _check_supported(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def stem_to_(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        for name, child in model.named_children():
            if name != "blocks":
                child.to(device=device, dtype=dtype)
        for p in model.parameters(recurse=False):  # cls/reg/dist tokens, position embedding
            p.data = p.data.to(device=device, dtype=dtype)

    def check_inputs(self, model: nn.Module, batch: torch.Tensor) -> None:
        _check_images(model, batch)

    def embed(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return _embed(model, batch)

    def attention(self, block: nn.Module) -> AttentionPart:
        attn = block.attn
        return AttentionPart(
            module=attn, num_heads=attn.num_heads, head_dim=attn.head_dim, qkv_site=attn.qkv,
            qkv=lambda x: attn.qkv(block.norm1(x)),
            weights=lambda: _attention_weights(attn),
            build=lambda weights, qk_dim: _build_attention(attn, weights, qk_dim),
            out_proj=attn.proj,
            refusal=None if isinstance(attn, PrunedAttention) or isinstance(attn.q_norm, nn.Identity) else QK_NORM_REFUSAL,
            attend=None if isinstance(attn, PrunedAttention) else partial(_dense_heads, attn),
        )

    def mlp(self, block: nn.Module) -> MlpPart:
        return mlp_kind("mlp", block.mlp).part(block.mlp)

    def set_part(self, block: nn.Module, part: str, module: nn.Module) -> None:
        if part not in ("attn", "mlp"):
            raise ValueError(f"unknown block part {part!r}")
        setattr(block, part, module)

    def halves(self, block: nn.Module):
        # as timm's Block.forward computes them (no attention mask inside a ViT)
        def first(x):
            return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))

        def second(y):
            return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))

        return first, second

    def widths(self, block: nn.Module) -> dict[str, int]:
        return {"mlp_hidden": mlp_kind("mlp", block.mlp).hidden(block.mlp), "qk_dim": _qk_width(block.attn)}

    def reshape_block(self, block: nn.Module, widths: dict[str, int]) -> None:
        reshape_block(block, widths)

    def block_costs(self, model: nn.Module) -> list[dict[str, Any]]:
        tokens = _count_tokens(model, tuple(model.patch_embed.img_size))
        costs = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            kind = mlp_kind("mlp", mlp)
            costs.append(dict(embed_dim=mlp.fc2.out_features, mlp_hidden=kind.hidden(mlp), num_heads=attn.num_heads,
                              head_dim=attn.head_dim, qk_dim=_qk_width(attn), tokens=tokens,
                              qkv_bias=attn.qkv.bias is not None, mlp_bias=kind.has_bias(mlp), mlp_input_rows=kind.input_rows))
        return costs

    def count_flops(self, model: nn.Module) -> int:
        """Counts the patch embedding, every Linear of the blocks and heads, and the two attention
        matmuls at their logical widths (q/k width ``qk_dim`` per head, whether or not the kernel
        pads it). Norms, activations and softmax are left out. Dense and pruned models alike."""
        pe = model.patch_embed
        tokens = _count_tokens(model, tuple(pe.img_size))
        patches = tokens - model.num_prefix_tokens
        conv = pe.proj
        flops = 2 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        for block in model.blocks:
            attn = block.attn
            for linear in (attn.qkv, attn.proj, *mlp_kind("mlp", block.mlp).linears(block.mlp)):
                flops += 2 * tokens * linear.in_features * linear.out_features
            flops += 2 * attn.num_heads * tokens * tokens * (_qk_width(attn) + attn.head_dim)
        for name in ("head", "head_dist"):
            head = getattr(model, name, None)
            if isinstance(head, nn.Linear):
                flops += 2 * head.in_features * head.out_features
        return flops

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return _describe(model)

    def build(self, arch: dict[str, Any], widths: Optional[list[dict[str, int]]] = None) -> nn.Module:
        return _build(arch, widths)
