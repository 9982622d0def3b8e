"""Adapter for timm's ``Eva`` family (``eva02_*``, ``vit_*_rope_*``): rotary position embeddings, SwiGLU MLPs.

What corp prunes here: the MLP hidden channels of every block (``Mlp``,
``SwiGLU``, ``GluMlp``/``SwiGLUPacked``, :mod:`corp.models.timm_mlp`), with the
same statistics, fits and folds as the ViT's MLPs; and the query/key dims of rotary
``EvaAttention`` (``AttentionPart.rotary``): with rotary embeddings the logit is
``q_mᵀ R(n−m) k_n``, ``R`` a block-diagonal rotation by position-dependent angles, one
2×2 block per frequency pair, so dims go in whole pairs and the fold ``k → A k`` (made
*before* the rotation) keeps the logit a function of relative position only if ``A``
commutes with every rotation: per kept pair a scaled rotation (:mod:`corp.rotary`). The
statistics read the rotated q/k; the pruned module is
:class:`~corp.modules.PrunedRotaryAttention`. Refused (``AttentionPart.refusal``, so
``attn_sparsity > 0`` is an error naming why): q/k norms, gated attention, the half-rotation
layout, ``AttentionRope`` (grouped-query) and ``EvaAttention`` without a rotary embedding.

An Eva block's forward needs the model's rotary embedding (``block(x, rope=...)``):
the pipeline calls ``block(x)``, so :meth:`TimmEva.blocks` hands it each block bound
to the model's fixed-size embedding (:class:`RopeBound`) and unwraps what the
pipeline writes back, so the pruned model holds plain ``EvaBlock``\\ s.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, RmsNorm
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models.eva import Eva, EvaAttention, EvaBlock

from ..modules import PrunedRotaryAttention, load_fused_qkv_
from ..rotary import rotate_pairs
from .base import AttentionPart, AttentionWeights, MlpPart, ModelAdapter, unsupported
from .timm_mlp import PackedGlu, PlainMlp, SplitGlu, activation_name, mlp_kind, mlp_kind_named
from .timm_vit import _check_images

__all__ = ["TimmEva", "RopeBound", "EVA_ATTENTION_REFUSAL"]

EVA_ATTENTION_REFUSAL = "attn has no rotary embedding: corp prunes the query/key dims of rotary EvaAttention only"


class RopeBound(nn.Module):
    """An ``EvaBlock`` callable as ``block(x)``: forwards ``x`` ``(B, T, D)`` with the model's fixed rotary
    embedding ``rope`` ``(T − prefix, 2·rot_dim)`` or None (a non-persistent buffer: it moves with the block
    and stays out of its state dict, whose names are the block's under ``block.``)."""

    def __init__(self, block: EvaBlock, rope: Optional[torch.Tensor]):
        super().__init__()
        self.block = block
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, rope=self.rope)


class _RopeBlocks(nn.Module):
    """A view of ``Eva.blocks`` whose items are :class:`RopeBound`; assigning an item stores the bare block."""

    def __init__(self, blocks: nn.ModuleList, rope: Optional[torch.Tensor]):
        super().__init__()
        self.inner = blocks
        self.rope_embed = rope

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> RopeBound:
        return RopeBound(self.inner[i], self.rope_embed)

    def __setitem__(self, i: int, block: nn.Module) -> None:
        self.inner[i] = _inner(block)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _inner(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, RopeBound) else block


def _rope_embed(model: Eva) -> Optional[torch.Tensor]:
    return model.rope.get_embed() if model.rope is not None else None


def _norm_desc(path: str, norm: nn.Module) -> dict[str, Any]:
    if isinstance(norm, nn.LayerNorm):
        return {"type": "layernorm", "eps": float(norm.eps)}
    if isinstance(norm, RmsNorm):
        return {"type": "rmsnorm", "eps": float(norm.eps)}
    raise unsupported(path, norm, "only LayerNorm/RmsNorm can be saved")


def _norm_layer(desc: dict[str, Any]):
    if desc["type"] == "layernorm":
        return partial(nn.LayerNorm, eps=desc["eps"])
    if desc["type"] == "rmsnorm":
        return partial(RmsNorm, eps=desc["eps"])
    raise ValueError(f"unknown norm type {desc['type']!r} in config")


def _check_supported(model: nn.Module) -> None:
    if type(model) is not Eva:
        raise TypeError(f"unsupported model type {type(model).__name__}: corp prunes timm Eva models")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("corp cannot prune an Eva model from lazy weights (weights=): load its weights first")
    if type(model.patch_embed) is not PatchEmbed:
        raise unsupported("patch_embed", model.patch_embed, "only timm PatchEmbed is supported")
    if model.dynamic_img_size:
        raise unsupported("patch_embed", model.patch_embed, "dynamic image sizes are not supported (the rotary "
                          "embedding must be fixed)")
    if model.rope is not None and type(model.rope) is not RotaryEmbeddingCat:
        raise unsupported("rope", model.rope, "only the 'cat' rotary embedding (RotaryEmbeddingCat) is supported")
    if model.patch_drop is not None:
        raise unsupported("patch_drop", model.patch_drop, "patch dropout is not supported")
    if len(model.blocks) == 0:
        raise ValueError("the model has no transformer blocks to prune")
    for i, block in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(block) is not EvaBlock:
            raise unsupported(path, block, "only the pre-norm EvaBlock is supported (no post-norm blocks)")
        if isinstance(block.attn, PrunedRotaryAttention):
            raise unsupported(f"{path}.attn", block.attn, "this block was already pruned by corp")
        if type(block.attn) not in (EvaAttention, AttentionRope):
            raise unsupported(f"{path}.attn", block.attn, "only EvaAttention and AttentionRope are supported")
        mlp_kind(f"{path}.mlp", block.mlp).check(f"{path}.mlp", block.mlp)


def _check_describable(model: Eva) -> None:
    if model.attn_pool is not None:
        raise unsupported("attn_pool", model.attn_pool, "attention pooling cannot be saved")
    if model.blocks[0].attn.gate is not None:
        raise unsupported("blocks.0.attn.gate", model.blocks[0].attn.gate, "Eva cannot be rebuilt with gated attention")
    if model.rope is not None:
        r = model.rope
        if (r.in_pixels, r.linear_bands, r.grid_type, r.normalize_coords) != (False, False, "index", "separate") \
                or r.shift_coords is not None or r.jitter_coords is not None or r.rescale_coords is not None:
            raise unsupported("rope", r, "only the default eva02 rotary-embedding options can be saved")
    first = None
    for i, block in enumerate(model.blocks):
        desc = mlp_kind(f"blocks.{i}.mlp", block.mlp).describe(block.mlp)
        first = first or desc
        if desc != first:
            raise unsupported(f"blocks.{i}.mlp", block.mlp, f"differs from blocks.0.mlp ({desc} vs {first}): cannot be saved")


def _mlp_options(block: EvaBlock) -> dict[str, Any]:
    """Eva's MLP constructor options that rebuild ``block.mlp`` (widths are restored afterwards)."""
    mlp = block.mlp
    kind = mlp_kind("blocks.0.mlp", mlp)
    dim = mlp.fc2.out_features
    if isinstance(kind, PlainMlp):
        if activation_name(mlp.act) != "gelu":  # Eva passes no act_layer: its blocks' default
            raise unsupported("blocks.0.mlp.act", mlp.act, "Eva builds its Mlp with GELU only: cannot be saved")
        return dict(mlp_ratio=kind.hidden(mlp) / dim, swiglu_mlp=False, swiglu_align_to=0)
    if isinstance(kind, SplitGlu):  # Eva builds the split SwiGLU only with a hidden norm or an alignment
        return dict(mlp_ratio=kind.hidden(mlp) / dim, swiglu_mlp=True, swiglu_align_to=1)
    if isinstance(kind, PackedGlu) and not mlp.gate_last and type(mlp.act) is nn.SiLU:
        return dict(mlp_ratio=kind.hidden(mlp) / dim, swiglu_mlp=True, swiglu_align_to=0)
    raise unsupported("blocks.0.mlp", mlp, "Eva builds GluMlp only as SwiGLUPacked (SiLU, gate first): cannot be saved")


def _qkv_bias(attn: nn.Module) -> bool:
    if isinstance(attn, PrunedRotaryAttention):
        return attn.qkv.bias is not None
    if attn.qkv is None:
        return attn.q_proj.bias is not None
    return (attn.qkv.bias if isinstance(attn, AttentionRope) else attn.q_bias) is not None


def _describe(model: Eva) -> dict[str, Any]:
    _check_supported(model)
    _check_describable(model)
    pe, block = model.patch_embed, model.blocks[0]
    attn = block.attn
    fused = attn.qkv is not None
    rope = model.rope
    kwargs = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=attn.num_heads,
        qkv_bias=_qkv_bias(attn), qkv_fused=fused,
        qk_norm=not isinstance(attn.q_norm, nn.Identity), scale_mlp=False,
        scale_attn_inner=not isinstance(attn.norm, nn.Identity),
        attn_type="rope" if isinstance(attn, AttentionRope) else "eva",
        init_values=1.0 if block.gamma_1 is not None else None,  # the saved gammas overwrite the value
        attn_only_layer_scale=block.gamma_1 is not None and block.gamma_2 is None,
        class_token=model.cls_token is not None,
        num_reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
        no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
        use_rot_pos_emb=rope is not None,
        use_pre_transformer_norm=not isinstance(model.norm_pre, nn.Identity),
        use_post_transformer_norm=not isinstance(model.norm, nn.Identity),
        use_fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        **_mlp_options(block),
    )
    if isinstance(attn, AttentionRope) and attn.num_kv_heads != attn.num_heads:
        kwargs["num_kv_heads"] = attn.num_kv_heads
    if rope is not None:
        kwargs.update(rope_type="cat", rope_temperature=float(rope.temperature), rope_grid_indexing=rope.grid_indexing,
                      rope_grid_offset=float(rope.grid_offset), rope_rotate_half=bool(rope.rotate_half),
                      ref_feat_shape=list(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None)
    mlp = mlp_kind("blocks.0.mlp", block.mlp).describe(block.mlp)
    return {"class": "Eva", "kwargs": kwargs, "norm": _norm_desc("blocks.0.norm1", block.norm1), "mlp": mlp}


def _build(arch: dict[str, Any], widths: Optional[list[dict[str, int]]] = None) -> Eva:
    if arch.get("class") != "Eva":
        raise ValueError(f"unknown model class {arch.get('class')!r} in an Eva config")
    kwargs = dict(arch["kwargs"])
    for key in ("img_size", "patch_size", "ref_feat_shape"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    mlp = arch["mlp"]
    mlp_kind_named(mlp["kind"])  # a config naming an unknown kind fails here
    model = Eva(**kwargs, norm_layer=_norm_layer(arch["norm"]))
    if widths is not None:
        if len(widths) != len(model.blocks):
            raise ValueError(f"config lists {len(widths)} blocks, the architecture has {len(model.blocks)}")
        for block, w in zip(model.blocks, widths):
            _reshape_block(block, w)
    return model


def _reshape_block(block: nn.Module, widths: dict[str, int]) -> None:
    block = _inner(block)
    mlp_kind("mlp", block.mlp).reshape_(block.mlp, widths["mlp_hidden"])
    if widths["qk_dim"] != _qk_width(block.attn):
        if isinstance(block.attn, PrunedRotaryAttention):
            raise ValueError("cannot reshape an already pruned attention")
        block.attn = _pruned_like(block.attn, widths["qk_dim"])


def _qk_width(attn: nn.Module) -> int:
    return attn.qk_dim if isinstance(attn, PrunedRotaryAttention) else attn.head_dim


def _refused(*_args):
    raise ValueError("corp does not prune the query/key dims of this attention (AttentionPart.refusal says why)")


def _rotary_refusal(attn: nn.Module, rope: Optional[torch.Tensor]) -> Optional[str]:
    """Why the q/k dims of ``attn`` cannot be pruned (None: they can, as rotary pairs)."""
    if isinstance(attn, PrunedRotaryAttention):
        return None
    if isinstance(attn, AttentionRope):
        return "attn is an AttentionRope (grouped-query rotary attention): its q/k pruning is not implemented"
    if rope is None:
        return EVA_ATTENTION_REFUSAL
    if not isinstance(attn.q_norm, nn.Identity):
        return ("attn.q_norm/k_norm normalise each head's query and key over all its dims, so removing a dim "
                "changes the normalisation of every kept dim")
    if attn.gate is not None:
        return "attn.gate (gated attention) is not modelled by corp's pruned rotary attention"
    if attn.rotate_half:
        return "attn uses the half-rotation rotary layout; corp prunes the interleaved layout (eva02) only"
    if rope.shape[-1] != 2 * attn.head_dim:
        return f"the rotary embedding covers {rope.shape[-1] // 2} of the head's {attn.head_dim} dims"
    return None


def _rotated_qkv(attn: EvaAttention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``(B, T, 3·H·d)`` [q | k | v] of ``attn`` on its input ``x`` ``(B, T, D)``, q and k after the
    rotary embedding (prefix tokens unrotated), as ``EvaAttention.forward`` computes them."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    q, k, v = qkv.view(b, n, 3, h, d).unbind(2)  # (B, T, H, d)
    npt = attn.num_prefix_tokens
    sin, cos = rope.tensor_split(2, -1)  # (T − npt, d)
    sin, cos = sin[:, None, :].to(q.dtype), cos[:, None, :].to(q.dtype)
    q = torch.cat([q[:, :npt], rotate_pairs(q[:, npt:], sin, cos)], dim=1)
    k = torch.cat([k[:, :npt], rotate_pairs(k[:, npt:], sin, cos)], dim=1)
    return torch.cat([q.reshape(b, n, h * d), k.reshape(b, n, h * d), v.reshape(b, n, h * d)], dim=-1)


def _eva_attention_weights(attn: EvaAttention) -> AttentionWeights:
    h, d = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        w = attn.qkv.weight.detach().to(torch.float64).view(3, h, d, -1)
        biases = (attn.q_bias, attn.k_bias, attn.v_bias) if attn.q_bias is not None else None
    else:
        w = torch.stack([p.weight.detach().to(torch.float64) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
        w = w.view(3, h, d, -1)
        biases = None
        if attn.q_proj.bias is not None:  # EvaAttention's k projection has no bias
            biases = (attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias), attn.v_proj.bias)
    b = [t.detach().to(torch.float64).view(h, d) for t in biases] if biases is not None else [None] * 3
    return AttentionWeights(w[0], w[1], w[2], *b)


def _pruned_like(attn: EvaAttention, qk_dim: int) -> PrunedRotaryAttention:
    """An (uninitialised) :class:`PrunedRotaryAttention` with ``attn``'s shape and options."""
    ref = attn.proj.weight
    has_bias = attn.q_bias is not None if attn.qkv is not None else attn.q_proj.bias is not None
    return PrunedRotaryAttention(
        dim=attn.proj.out_features, num_heads=attn.num_heads, head_dim=attn.head_dim, qk_dim=qk_dim,
        num_prefix_tokens=attn.num_prefix_tokens, qkv_bias=has_bias, proj_bias=attn.proj.bias is not None,
        attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
        norm=None if isinstance(attn.norm, nn.Identity) else copy.deepcopy(attn.norm),
        device=ref.device, dtype=ref.dtype)


def _build_rotary(attn: EvaAttention, weights: AttentionWeights, qk_dim: int) -> PrunedRotaryAttention:
    h = attn.num_heads
    new = _pruned_like(attn, qk_dim)
    with torch.no_grad():
        load_fused_qkv_(new, weights, qk_dim)
        new.rope_dims.copy_(weights.qk_dims if weights.qk_dims is not None else torch.arange(qk_dim).repeat(h, 1))
        new.proj.load_state_dict(attn.proj.state_dict())
    new.train(attn.training)
    return new


class TimmEva(ModelAdapter):
    """timm ``Eva`` with pre-norm ``EvaBlock``\\ s: MLP hidden channels (query/key dims refused, module docstring)."""

    name = "timm_eva"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def check_supported(self, model: nn.Module) -> None:
        _check_supported(model)

    def blocks(self, model: nn.Module) -> _RopeBlocks:
        return _RopeBlocks(model.blocks, _rope_embed(model))

    def stem_to_(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        for name, child in model.named_children():
            if name != "blocks":
                child.to(device=device, dtype=dtype)
        for p in model.parameters(recurse=False):  # cls/reg tokens, position embedding
            p.data = p.data.to(device=device, dtype=dtype)

    def check_inputs(self, model: nn.Module, batch: torch.Tensor) -> None:
        _check_images(model, batch)

    def embed(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → the first block's input ``(B, T, D)``, as ``Eva.forward_features``."""
        x = model.patch_embed(batch)
        x, _ = model._pos_embed(x)  # the rotary embedding is fixed: RopeBound holds it
        return model.norm_pre(x)

    def attention(self, block: nn.Module) -> AttentionPart:
        inner = _inner(block)
        attn = inner.attn
        rope = block.rope if isinstance(block, RopeBound) else None
        refusal = _rotary_refusal(attn, rope)
        if refusal is not None or isinstance(attn, PrunedRotaryAttention):
            return AttentionPart(module=attn, num_heads=attn.num_heads, head_dim=attn.head_dim, qkv_site=inner.norm1,
                                 qkv=_refused, weights=_refused, build=_refused,
                                 refusal=refusal or "this attention was already pruned by corp",
                                 out_proj=getattr(attn, "proj", None))
        return AttentionPart(
            module=attn, num_heads=attn.num_heads, head_dim=attn.head_dim,
            qkv_site=inner.norm1,  # its output is the attention's input: q/k are rotated from it
            qkv_from_site=lambda normed: _rotated_qkv(attn, normed, rope),
            qkv=lambda x: _rotated_qkv(attn, inner.norm1(x), rope),
            weights=lambda: _eva_attention_weights(attn),
            build=lambda weights, qk_dim: _build_rotary(attn, weights, qk_dim),
            rotary=True,
            out_proj=attn.proj,
        )

    def mlp(self, block: nn.Module) -> MlpPart:
        mlp = _inner(block).mlp
        return mlp_kind("mlp", mlp).part(mlp)

    def set_part(self, block: nn.Module, part: str, module: nn.Module) -> None:
        if part not in ("attn", "mlp"):
            raise ValueError(f"unknown block part {part!r}")
        setattr(_inner(block), part, module)

    def halves(self, block: nn.Module):
        # as EvaBlock.forward computes them, with the bound rotary embedding
        rope, b = block.rope, _inner(block)

        def first(x):
            y = b.attn(b.norm1(x), rope=rope)
            return x + b.drop_path1(b.gamma_1 * y if b.gamma_1 is not None else y)

        def second(x):
            y = b.mlp(b.norm2(x))
            return x + b.drop_path2(b.gamma_2 * y if b.gamma_2 is not None else y)

        return first, second

    def widths(self, block: nn.Module) -> dict[str, int]:
        b = _inner(block)
        return {"mlp_hidden": mlp_kind("mlp", b.mlp).hidden(b.mlp), "qk_dim": _qk_width(b.attn)}

    def reshape_block(self, block: nn.Module, widths: dict[str, int]) -> None:
        _reshape_block(block, widths)

    def _tokens(self, model: Eva) -> int:
        pe = model.patch_embed
        grid = [math.ceil(s / p) for s, p in zip(pe.img_size, pe.patch_size)]
        return grid[0] * grid[1] + model.num_prefix_tokens

    def _attn_linears(self, attn: nn.Module) -> list[nn.Linear]:
        if isinstance(attn, PrunedRotaryAttention):
            return [attn.qkv, attn.proj]
        projections = [attn.qkv] if attn.qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        return projections + [attn.proj] + ([attn.gate] if attn.gate is not None else [])

    def block_costs(self, model: nn.Module) -> list[dict[str, Any]]:
        tokens = self._tokens(model)
        costs = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            kind = mlp_kind("mlp", mlp)
            costs.append(dict(embed_dim=mlp.fc2.out_features, mlp_hidden=kind.hidden(mlp), num_heads=attn.num_heads,
                              head_dim=attn.head_dim, qk_dim=_qk_width(attn), tokens=tokens, qkv_bias=_qkv_bias(attn),
                              mlp_bias=kind.has_bias(mlp), mlp_input_rows=kind.input_rows,
                              qk_multiple=2 if self.attention(block).rotary else 1))
        return costs

    def count_flops(self, model: nn.Module) -> int:
        """The patch embedding, every Linear of the blocks and the head, and the two attention matmuls
        (norms, activations, rotations and softmax left out)."""
        pe = model.patch_embed
        tokens = self._tokens(model)
        conv = pe.proj
        flops = 2 * (tokens - model.num_prefix_tokens) * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] \
            * conv.out_channels
        for block in model.blocks:
            attn = block.attn
            for linear in self._attn_linears(attn) + mlp_kind("mlp", block.mlp).linears(block.mlp):
                flops += 2 * tokens * linear.in_features * linear.out_features
            flops += 2 * attn.num_heads * tokens * tokens * (_qk_width(attn) + attn.head_dim)
        if isinstance(model.head, nn.Linear):
            flops += 2 * model.head.in_features * model.head.out_features
        return flops

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return _describe(model)

    def build(self, arch: dict[str, Any], widths: Optional[list[dict[str, int]]] = None) -> nn.Module:
        return _build(arch, widths)

    def block_widths(self, model: nn.Module) -> list[dict[str, int]]:
        return [self.widths(b) for b in model.blocks]

