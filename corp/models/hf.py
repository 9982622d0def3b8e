"""Adapters for Hugging Face ``transformers`` encoders: BERT-style text encoders and ViT, DINOv2
(MLP or SwiGLU), DINOv3 (rotary attention, MLP or gated MLP), CLIP and SigLIP vision towers.

What differs from timm, and how it maps onto the adapter interface:

* **Separate q/k/v projections** (``query``/``key``/``value`` or ``q_proj``/``k_proj``/``v_proj``):
  the statistics hook a :class:`~corp.models.base.ConcatenatedOutputs` of the three, which
  reports the fused ``[q | k | v]`` output; :meth:`AttentionPart.weights` reads the three
  weights. A pruned attention is a :class:`PrunedHFAttention` with the same projection
  names (so state-dict keys stay HF's) and the replaced module's call signature and return.
* **MLPs split over two modules** (BERT, ViT: ``intermediate.dense`` → act, then
  ``output.dense`` + residual (+ post-norm)): the part's module is a :class:`SplitMlp` holding
  both; :meth:`set_part` puts its two halves back where they came from.
* **Post-norm blocks** (BERT): :meth:`halves` are the layer's own attention sub-module
  (with its residual and LayerNorm) and its own feed-forward chunk, so
  ``block(x) == second(first(x))`` bit for bit.
* **Padding** (text): calibration batches are tokenised dicts; :meth:`token_mask` is their
  ``attention_mask``; :meth:`run_block` turns it into HF's additive key mask for the layer.
* **Rotary attention** (DINOv3): HF rotates half-split pairs ``(i, i + d/2)``; :class:`HFDinov3`
  shows corp the q/k dims in interleaved pair order (:func:`half_to_pairs`), so :mod:`corp.rotary`'s
  whole-pair selection and scaled-rotation fit apply unchanged; :class:`PrunedHFRotaryAttention`.
* **Saving**: the HF config cannot describe per-layer widths, so :meth:`describe` keeps the
  model's class name and config dict, and :meth:`build` rebuilds the dense model from them
  (``_from_config``, no hub) and reshapes every layer to its saved widths.

``transformers`` is imported only when one of these models is met or rebuilt.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rotary import rotate_pairs
from .base import AttentionPart, AttentionWeights, ConcatenatedOutputs, InputOf, MlpPart, MlpWeights, ModelAdapter
from .base import unsupported
from .base import empty_linear as _empty_linear
from .base import new_linear as _linear

__all__ = ["PrunedHFAttention", "PrunedHFRotaryAttention", "SplitMlp", "HFBert", "HFViT", "HFDinov2", "HFDinov3",
           "HFClipVision", "HFSiglipVision", "HF_ADAPTERS", "half_to_pairs"]


def _fp64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.detach().to(torch.float64) if t is not None else None


def _first(out):
    """HF modules return a tensor or a tuple whose first entry is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``(B, T)`` bool real-token mask → HF's additive key mask ``(B, 1, 1, T)`` (0 or dtype min)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min




# --------------------------------------------------------------------------- pruned modules


class PrunedHFAttention(nn.Module):
    """Multi-head self-attention with ``qk_dim`` query/key dims and ``head_dim`` value dims per head,
    in place of a Hugging Face attention module.

    The projections keep the HF names (``names``: q, k, v and, for CLIP/SigLIP, the output
    projection), so the state dict reads like the original's. Logits are scaled by
    ``qk_dim ** -0.5`` (CORP folds ``sqrt(qk_dim / head_dim)`` into the queries, keeping the
    dense temperature); q and k are zero-padded to ``head_dim`` for the fused kernels (zero
    dims leave every logit unchanged). ``style`` selects the call signature and return value
    of the module it replaces:

    * ``"bert"``: ``forward(hidden_states, attention_mask=None, head_mask=None, ...)`` → ``(context, None)``
    * ``"vit"``: ``forward(hidden_states, head_mask=None)`` → ``(context, None)`` (ViT, DINOv2)
    * ``"clip"``: ``forward(hidden_states, attention_mask=None, causal_attention_mask=None, ...)``
      → ``(projected output, None)`` (CLIP, SigLIP)

    ``hidden_states`` ``(B, T, dim)``; masks are HF's additive masks broadcastable to ``(B, H, T, T)``.
    """

    STYLES = ("bert", "vit", "clip")

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, style: str,
                 names: tuple[str, ...] = ("query", "key", "value"), qkv_bias: bool = True,
                 out_bias: bool = True, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if style not in self.STYLES:
            raise ValueError(f"style must be one of {self.STYLES}, got {style!r}")
        if not 0 < qk_dim <= head_dim:
            raise ValueError(f"qk_dim must be in [1, head_dim={head_dim}], got {qk_dim}")
        if len(names) not in (3, 4):
            raise ValueError(f"names must be (q, k, v) or (q, k, v, out), got {names}")
        dd = {"device": device, "dtype": dtype}
        self.style, self.names = style, tuple(names)
        self.num_heads, self.head_dim, self.qk_dim = num_heads, head_dim, qk_dim
        self.dropout = dropout
        widths = (num_heads * qk_dim, num_heads * qk_dim, num_heads * head_dim)
        for name, width in zip(self.names[:3], widths):
            setattr(self, name, nn.Linear(dim, width, bias=qkv_bias, **dd))
        if len(self.names) == 4:
            setattr(self, self.names[3], nn.Linear(num_heads * head_dim, dim, bias=out_bias, **dd))

    def projections(self) -> tuple[nn.Linear, ...]:
        return tuple(getattr(self, n) for n in self.names)

    def attend(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` → ``(B, T, H·head_dim)`` (projected by the output projection if it has one)."""
        b, n, _ = x.shape
        h, s, d = self.num_heads, self.qk_dim, self.head_dim
        proj = self.projections()
        q = proj[0](x).view(b, n, h, s).transpose(1, 2)
        k = proj[1](x).view(b, n, h, s).transpose(1, 2)
        v = proj[2](x).view(b, n, h, d).transpose(1, 2)
        if s < d:
            q, k = F.pad(q, (0, d - s)), F.pad(k, (0, d - s))
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s ** -0.5,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return proj[3](out) if len(proj) == 4 else out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.style == "bert":
            return self._forward_bert(hidden_states, *args, **kwargs)
        if self.style == "vit":
            return self._forward_vit(hidden_states, *args, **kwargs)
        return self._forward_clip(hidden_states, *args, **kwargs)

    def _forward_bert(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                      past_key_values=None, output_attentions=False, cache_position=None, **kwargs):
        if head_mask is not None or encoder_hidden_states is not None or past_key_values is not None:
            raise ValueError("a corp-pruned attention supports plain self-attention only "
                             "(no head_mask, cross-attention or key/value cache)")
        return self.attend(hidden_states, attention_mask), None

    def _forward_vit(self, hidden_states, head_mask=None, **kwargs):
        if head_mask is not None:
            raise ValueError("a corp-pruned attention does not support head_mask")
        return self.attend(hidden_states, None), None

    def _forward_clip(self, hidden_states, attention_mask=None, causal_attention_mask=None, **kwargs):
        if attention_mask is not None and causal_attention_mask is not None:
            attention_mask = attention_mask + causal_attention_mask
        elif causal_attention_mask is not None:
            attention_mask = causal_attention_mask
        return self.attend(hidden_states, attention_mask), None

    def extra_repr(self) -> str:
        return f"style={self.style}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, head_dim={self.head_dim}"


class SplitMlp(nn.Module):
    """An MLP spread over two modules of an HF layer (BERT, ViT): ``intermediate`` (input
    projection ``.dense`` and activation; its output is the hidden activation ``(B, T, D_h)``)
    and ``dense``, the output projection inside the layer's output module. A handle for
    swapping both at once; it is never called itself."""

    def __init__(self, intermediate: nn.Module, dense: nn.Linear):
        super().__init__()
        self.intermediate, self.dense = intermediate, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.intermediate(x))


def half_to_pairs(head_dim: int) -> torch.Tensor:
    """``(d,)`` the dense dim at each position of the interleaved pair layout, for HF's half-split RoPE.

    HF rotates with ``rotate_half``: dim ``i`` and dim ``i + d/2`` (``i < d/2``) turn together by the same
    angle, ``out_i = x_i cos − x_{i+d/2} sin``, ``out_{i+d/2} = x_{i+d/2} cos + x_i sin``. Listing the
    dims as ``[0, d/2, 1, d/2 + 1, …]`` puts each pair at positions ``2i, 2i+1``, where that rotation
    is exactly the interleaved one :mod:`corp.rotary` prunes and fits."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


class PrunedHFRotaryAttention(nn.Module):
    """In place of ``DINOv3ViTAttention``: ``qk_dim`` of ``head_dim`` query/key dims per head, kept in
    whole rotary pairs, values and ``o_proj`` as the dense module's.

    The kept q/k dims are stored pairs adjacent (``2j, 2j+1``) and rotated in that interleaved layout;
    ``rope_dims`` ``(H, qk_dim)`` names the dense (half-split) dim whose angle each kept dim turns by,
    so HF's ``position_embeddings`` ``(cos, sin)``, each ``(T − prefix, head_dim)``, are gathered per
    head. Prefix tokens (CLS, registers) are not rotated, as in HF. Logits are scaled by
    ``qk_dim ** -0.5`` (CORP's fold keeps the dense temperature); q/k are zero-padded to
    ``head_dim`` for the fused kernels. ``config``: the model's config, as HF attentions hold it
    (the layer's rotary embedding is computed from it). Call signature and return as HF's:
    ``forward(hidden_states (B, T, dim), attention_mask=None, position_embeddings=None)`` →
    ``(output (B, T, dim), None)``.
    """

    names = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, config, dim: int, num_heads: int, head_dim: int, qk_dim: int, biases: tuple[bool, ...],
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if qk_dim % 2 or head_dim % 2 or not 0 < qk_dim <= head_dim:
            raise ValueError(f"qk_dim must be even and in [2, head_dim={head_dim}], got {qk_dim}")
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.num_heads, self.head_dim, self.qk_dim, self.dropout = num_heads, head_dim, qk_dim, dropout
        widths = (num_heads * qk_dim, num_heads * qk_dim, num_heads * head_dim)
        for name, width, bias in zip(self.names[:3], widths, biases[:3]):
            setattr(self, name, nn.Linear(dim, width, bias=bias, **dd))
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=biases[3], **dd)
        pairs = half_to_pairs(head_dim)[:qk_dim].to(device)
        self.register_buffer("rope_dims", pairs.repeat(num_heads, 1))

    def projections(self) -> tuple[nn.Linear, ...]:
        return tuple(getattr(self, n) for n in self.names)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, **kwargs):
        if attention_mask is not None:
            raise ValueError("a corp-pruned attention does not support head_mask / attention masks")
        if position_embeddings is None:
            raise ValueError("a rotary attention needs position_embeddings (cos, sin)")
        b, n, _ = hidden_states.shape
        h, s, d = self.num_heads, self.qk_dim, self.head_dim
        q = self.q_proj(hidden_states).view(b, n, h, s).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, h, s).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, h, d).transpose(1, 2)
        cos, sin = position_embeddings  # (T', d) each
        cos, sin = cos[:, self.rope_dims].transpose(0, 1), sin[:, self.rope_dims].transpose(0, 1)  # (H, T', s)
        q, k = _rotate_patches(q, sin, cos), _rotate_patches(k, sin, cos)
        if s < d:
            q, k = F.pad(q, (0, d - s)), F.pad(k, (0, d - s))
        out = F.scaled_dot_product_attention(q, k, v, scale=s ** -0.5,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h * d)), None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, head_dim={self.head_dim}"


def _rotate_patches(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, T, s)`` in the interleaved pair layout, its last ``T'`` tokens rotated by
    ``sin``/``cos`` (broadcastable to ``(B, H, T', s)``), the prefix tokens before them unchanged."""
    prefix = x.shape[2] - sin.shape[-2]
    return torch.cat([x[:, :, :prefix], rotate_pairs(x[:, :, prefix:], sin, cos).type_as(x)], dim=2)


_PRUNED = (PrunedHFAttention, PrunedHFRotaryAttention)


# --------------------------------------------------------------------------- the shared adapter


class _HFEncoder(ModelAdapter):
    """What the HF families share; subclasses name their modules (class attributes and a few methods)."""

    #: the transformers classes (by name) this family prunes, and what their pruned ones subclass
    model_classes: tuple[str, ...] = ()
    #: the attention module classes corp can prune, by name
    attention_classes: tuple[str, ...] = ()
    #: the attribute path of the q/k/v attention module inside a layer, and its q/k/v(/out) names
    attention_path: tuple[str, ...] = ()
    #: the path of the module swapped as the "attn" part: the attention with its output projection
    #: (BERT/ViT/DINOv2: the container of the q/k/v module and the output module; CLIP: the same module)
    part_path: tuple[str, ...] = ()
    projection_names: tuple[str, ...] = ("query", "key", "value")
    style = "vit"
    text = False
    #: whether q, k and v may differ in having a bias (the pruned module then keeps each one's)
    independent_qkv_biases = False

    # ---------------------------------------------------------------- family specifics
    def encoder(self, model: nn.Module) -> nn.Module:
        """The module holding embeddings and encoder (e.g. ``BertModel`` inside a task model)."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.encoder(model).encoder.layer

    def attention_input(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the attention module reads for a block input ``x`` (its pre-norm, if any)."""
        raise NotImplementedError

    def mlp_linears(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        raise NotImplementedError

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def mlp_hidden(self, block: nn.Module) -> int:
        """D_h, the MLP's hidden channels (the output projection's columns)."""
        return self.mlp_linears(block)[1].in_features

    def mlp_input_rows(self, block: nn.Module) -> int:
        """Input-projection rows per hidden channel (2 for a gated MLP: gate and up)."""
        return 1

    def mlp_weights(self, block: nn.Module) -> MlpWeights:
        """The dense MLP's projections, fp64 (a plain MLP: ``mlp_linears``)."""
        fc_in, fc_out = self.mlp_linears(block)
        return MlpWeights(_fp64(fc_in.weight), _fp64(fc_in.bias), _fp64(fc_out.weight), _fp64(fc_out.bias))

    def hidden_site(self, block: nn.Module):
        raise NotImplementedError

    def set_mlp(self, block: nn.Module, module: nn.Module) -> None:
        block.mlp = module

    def build_mlp(self, block: nn.Module, kept: torch.Tensor, w_out: torch.Tensor,
                  b_out: Optional[torch.Tensor]) -> nn.Module:
        """A shallow copy of the MLP module (same activation) with ``fc1`` rows ``kept`` and a new ``fc2``."""
        mlp = block.mlp
        new = copy.copy(mlp)
        new._modules = dict(mlp._modules)  # copy.copy shares the child dict: assigning fc1 would edit `mlp`
        fc1 = mlp.fc1
        new.fc1 = _linear(fc1.weight.detach()[kept], fc1.bias.detach()[kept] if fc1.bias is not None else None, fc1)
        new.fc2 = _linear(w_out, b_out, mlp.fc2)
        return new

    def reshape_mlp(self, block: nn.Module, hidden: int) -> None:
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        block.mlp.fc1 = _empty_linear(fc1.in_features, hidden, fc1)
        block.mlp.fc2 = _empty_linear(hidden, fc2.out_features, fc2)

    def tokens(self, model: nn.Module) -> int:
        """Tokens of one input at the model's native size (FLOP counts and budgets)."""
        cfg = model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    def check_layer(self, path: str, block: nn.Module) -> None:
        """Raise on what corp cannot prune in one layer beyond attention and MLP classes."""

    # ---------------------------------------------------------------- shared
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and type(model).__name__ in cls.model_classes

    def _attention(self, block: nn.Module) -> nn.Module:
        module = block
        for name in self.attention_path:
            module = getattr(module, name)
        return module

    def _part(self, block: nn.Module) -> nn.Module:
        module = block
        for name in self.part_path:
            module = getattr(module, name)
        return module

    def out_projection(self, part: nn.Module) -> nn.Linear:
        """The output projection inside the swapped attention part (BERT/ViT/DINOv2: ``output.dense``)."""
        return part.output.dense

    def _set_attention(self, block: nn.Module, module: nn.Module) -> None:
        owner = block
        for name in self.attention_path[:-1]:
            owner = getattr(owner, name)
        setattr(owner, self.attention_path[-1], module)

    def _heads(self, attn: nn.Module) -> tuple[int, int]:
        if isinstance(attn, _PRUNED):
            return attn.num_heads, attn.head_dim
        heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
        head_dim = getattr(attn, "attention_head_size", None) or attn.head_dim
        return heads, head_dim

    def _qk_width(self, attn: nn.Module) -> int:
        return attn.qk_dim if isinstance(attn, _PRUNED) else self._heads(attn)[1]

    def check_supported(self, model: nn.Module) -> None:
        import transformers

        major = int(transformers.__version__.split(".")[0])
        if major >= 5:  # its models' module layout differs (e.g. ViTModel has no .encoder): never guess
            raise TypeError(f"corp's Hugging Face adapters support transformers 4.x (tested with 4.57.1); "
                            f"{transformers.__version__} is installed: pip install 'transformers>=4.50,<5'")
        blocks = self.blocks(model)
        if len(blocks) == 0:
            raise ValueError("the model has no transformer layers to prune")
        prefix = self._blocks_path(model)
        for i, block in enumerate(blocks):
            path = f"{prefix}.{i}"
            attn = self._attention(block)
            apath = f"{path}." + ".".join(self.attention_path)
            if isinstance(attn, _PRUNED):
                raise unsupported(apath, attn, "this layer was already pruned by corp")
            if type(attn).__name__ not in self.attention_classes:
                raise unsupported(apath, attn, f"only {', '.join(self.attention_classes)} are supported")
            heads, head_dim = self._heads(attn)
            projections = [getattr(attn, n) for n in self.projection_names]
            for name, p in zip(self.projection_names, projections):
                if type(p) is not nn.Linear:
                    raise unsupported(f"{apath}.{name}", p, "q/k/v projections must be nn.Linear")
            for name, p in zip(self.projection_names[:3], projections[:3]):
                if p.out_features != heads * head_dim:
                    raise unsupported(f"{apath}.{name}", p, f"width {p.out_features} is not heads × head_dim "
                                      f"= {heads} × {head_dim} (pruned heads are not supported)")
            if not self.independent_qkv_biases and len({p.bias is not None for p in projections[:3]}) != 1:
                raise unsupported(apath, attn, "q, k and v must all have biases or none")
            scale = getattr(attn, "scaling", getattr(attn, "scale", head_dim ** -0.5))
            if not math.isclose(float(scale), head_dim ** -0.5, rel_tol=1e-6):
                raise unsupported(apath, attn, f"logit scale {scale} is not head_dim ** -0.5")
            self.check_layer(path, block)  # first: the family's MLP class, before its projections are read
            fc_in, fc_out = self.mlp_linears(block)
            if type(fc_in) is not nn.Linear or type(fc_out) is not nn.Linear:
                raise unsupported(f"{path}", block, "the MLP projections must be nn.Linear")

    def _blocks_path(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        for name, module in model.named_modules():
            if module is blocks:
                return name
        return "layers"

    def stem_to_(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        in_blocks = {id(t) for t in list(self.blocks(model).parameters()) + list(self.blocks(model).buffers())}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in in_blocks:
                    p.data = p.data.to(device=device, dtype=dtype)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in in_blocks:  # integer buffers (position ids) keep their dtype
                    module._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)

    def attention(self, block: nn.Module) -> AttentionPart:
        attn = self._attention(block)
        heads, head_dim = self._heads(attn)
        q, k, v = (getattr(attn, n) for n in self.projection_names[:3])

        def qkv(x):
            y = self.attention_input(block, x)
            return torch.cat([q(y), k(y), v(y)], dim=-1)

        def weights() -> AttentionWeights:
            shape = (heads, head_dim, -1)
            return AttentionWeights(
                _fp64(q.weight).reshape(shape), _fp64(k.weight).reshape(shape), _fp64(v.weight).reshape(shape),
                *[_fp64(p.bias).reshape(heads, head_dim) if p.bias is not None else None for p in (q, k, v)])

        part = self._part(block)
        return AttentionPart(module=part, num_heads=heads, head_dim=head_dim, qkv_site=ConcatenatedOutputs(q, k, v),
                             qkv=qkv, weights=weights, build=lambda w, qk_dim: self._build_part(part, attn, w, qk_dim),
                             out_proj=self.out_projection(part))

    def _build_part(self, part: nn.Module, attn: nn.Module, w: AttentionWeights, qk_dim: int) -> nn.Module:
        """The swapped part with a pruned q/k/v module; the container's other children (the output
        projection and its norm) are copies, so fits that rewrite them leave the dense part intact."""
        core = self._build_attention(attn, w, qk_dim)
        if part is attn:
            return core
        new = copy.copy(part)
        core_name = self.attention_path[len(self.part_path):]
        if len(core_name) != 1:
            raise ValueError(f"{self.name}: the q/k/v module must be a direct child of the attention part")
        new._modules = {name: core if name == core_name[0] else copy.deepcopy(child)
                        for name, child in part._modules.items()}
        new.train(part.training)
        return new

    def _pruned_like(self, attn: nn.Module, qk_dim: int) -> PrunedHFAttention:
        heads, head_dim = self._heads(attn)
        projections = [getattr(attn, n) for n in self.projection_names]
        ref = projections[0].weight
        dropout = getattr(attn, "dropout_prob", None)
        if dropout is None:
            dropout = getattr(attn, "dropout", 0.0)
            dropout = dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)
        return torch.nn.utils.skip_init(  # every caller overwrites the weights (corp.models.base.empty_linear)
            PrunedHFAttention, projections[0].in_features, heads, head_dim, qk_dim, self.style, self.projection_names,
            qkv_bias=projections[0].bias is not None,
            out_bias=len(projections) == 4 and projections[3].bias is not None,
            dropout=dropout, device=ref.device, dtype=ref.dtype)

    def _build_attention(self, attn: nn.Module, w: AttentionWeights, qk_dim: int) -> PrunedHFAttention:
        new = self._pruned_like(attn, qk_dim)
        new_proj = new.projections()
        with torch.no_grad():
            for layer, weight, bias in zip(new_proj[:3], (w.w_q, w.w_k, w.w_v), (w.b_q, w.b_k, w.b_v)):
                layer.weight.copy_(weight.reshape(layer.out_features, -1))
                if bias is not None:
                    layer.bias.copy_(bias.reshape(-1))
            if len(new_proj) == 4:
                new_proj[3].load_state_dict(getattr(attn, self.projection_names[3]).state_dict())
        new.train(attn.training)
        return new

    def mlp(self, block: nn.Module) -> MlpPart:
        return MlpPart(
            module=self.mlp_module(block), hidden=self.mlp_hidden(block), hidden_site=self.hidden_site(block),
            weights=lambda: self.mlp_weights(block),
            build=lambda kept, w_out, b_out: self.build_mlp(block, kept, w_out, b_out),
            joins=self.mlp_joins(block),
        )

    def mlp_joins(self, block: nn.Module) -> Optional[nn.Module]:
        """:attr:`MlpPart.joins`: None, pre-norm layers (post-norm families override it)."""
        return None

    def set_part(self, block: nn.Module, part: str, module: nn.Module) -> None:
        if part == "attn":
            owner = block
            for name in self.part_path[:-1]:
                owner = getattr(owner, name)
            setattr(owner, self.part_path[-1], module)
        elif part == "mlp":
            self.set_mlp(block, module)
        else:
            raise ValueError(f"unknown block part {part!r}")

    def widths(self, block: nn.Module) -> dict[str, int]:
        return {"mlp_hidden": self.mlp_hidden(block), "qk_dim": self._qk_width(self._attention(block))}

    def reshape_block(self, block: nn.Module, widths: dict[str, int]) -> None:
        if widths["mlp_hidden"] != self.mlp_hidden(block):
            self.reshape_mlp(block, widths["mlp_hidden"])
        attn = self._attention(block)
        if widths["qk_dim"] != self._qk_width(attn):
            if isinstance(attn, _PRUNED):
                raise ValueError("cannot reshape an already pruned attention")
            self._set_attention(block, self._pruned_like(attn, widths["qk_dim"]))

    def check_inputs(self, model: nn.Module, batch) -> None:
        from ..calibration import is_token_batch

        cfg = model.config
        if is_token_batch(batch):
            raise TypeError(f"{type(model).__name__} is a vision model: calibrate with pixel tensors (N, C, H, W), "
                            "not tokenised text")
        if not torch.is_tensor(batch) or batch.dim() != 4:
            shape = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
            raise ValueError(f"calibration images must be pixel tensors (N, C, H, W), got {shape}")
        if not batch.is_floating_point():
            raise ValueError(f"calibration images must be floating point (normalised), got {batch.dtype}")
        if batch.shape[1] != cfg.num_channels:
            raise ValueError(f"calibration images have {batch.shape[1]} channels, the model expects {cfg.num_channels}")
        size = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        if tuple(batch.shape[-2:]) != size:
            raise ValueError(f"calibration images are {batch.shape[-2]}×{batch.shape[-1]}, the model expects "
                             f"{size[0]}×{size[1]}")

    def block_costs(self, model: nn.Module) -> list[dict[str, Any]]:
        tokens = self.tokens(model)
        costs = []
        for block in self.blocks(model):
            attn = self._attention(block)
            heads, head_dim = self._heads(attn)
            fc_in, _ = self.mlp_linears(block)
            q = getattr(attn, self.projection_names[0])
            costs.append(dict(embed_dim=fc_in.in_features, mlp_hidden=self.mlp_hidden(block), num_heads=heads,
                              head_dim=head_dim, qk_dim=self._qk_width(attn), tokens=tokens,
                              qkv_bias=q.bias is not None, mlp_bias=fc_in.bias is not None,
                              mlp_input_rows=self.mlp_input_rows(block),
                              qk_multiple=2 if self.attention(block).rotary else 1))
        return costs

    def count_flops(self, model: nn.Module) -> int:
        """Every Linear of the layers per token, the two attention matmuls at their logical widths,
        the patch embedding (vision) and every other Linear once (pooler, heads). Norms,
        activations, softmax and embedding lookups are left out. Text encoders are counted at
        ``max_position_embeddings`` tokens."""
        tokens = self.tokens(model)
        blocks = self.blocks(model)
        in_blocks = {id(m) for m in blocks.modules()}
        flops = 0
        for block in blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    flops += 2 * tokens * m.in_features * m.out_features
            attn = self._attention(block)
            heads, head_dim = self._heads(attn)
            flops += 2 * heads * tokens * tokens * (self._qk_width(attn) + head_dim)
        for m in model.modules():
            if id(m) in in_blocks:
                continue
            if isinstance(m, nn.Linear):
                flops += 2 * m.in_features * m.out_features
            elif isinstance(m, nn.Conv2d):
                patches = tokens - 1
                flops += 2 * patches * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        return flops

    def describe(self, model: nn.Module) -> dict[str, Any]:
        if not self.matches(model):
            raise TypeError(f"cannot save {type(model).__name__} as {self.name}")
        return {"class": type(model).__name__, "config": model.config.to_dict(),
                "attn_implementation": model.config._attn_implementation}

    def build(self, arch: dict[str, Any], widths: Optional[list[dict[str, int]]] = None) -> nn.Module:
        import transformers

        name = arch.get("class")
        if name not in self.model_classes or not hasattr(transformers, name):
            raise ValueError(f"unknown {self.name} model class {name!r} in config (known: {list(self.model_classes)})")
        cls = getattr(transformers, name)
        config = cls.config_class.from_dict(dict(arch["config"]))
        model = cls._from_config(config, attn_implementation=arch.get("attn_implementation"))
        model.eval()
        if widths is not None:
            blocks = self.blocks(model)
            if len(widths) != len(blocks):
                raise ValueError(f"config lists {len(widths)} layers, the architecture has {len(blocks)}")
            for block, w in zip(blocks, widths):
                self.reshape_block(block, w)
        return model


# --------------------------------------------------------------------------- families


class _SplitMlpFamily(_HFEncoder):
    """Layers with ``intermediate`` (dense → act) and ``output`` (dense → dropout → + residual): BERT, ViT."""

    def mlp_linears(self, block):
        return block.intermediate.dense, block.output.dense

    def mlp_module(self, block):
        return SplitMlp(block.intermediate, block.output.dense)

    def hidden_site(self, block):
        return block.intermediate

    def set_mlp(self, block, module):
        if not isinstance(module, SplitMlp):
            raise TypeError(f"expected a SplitMlp for this layer's MLP, got {type(module).__name__}")
        block.intermediate, block.output.dense = module.intermediate, module.dense

    def build_mlp(self, block, kept, w_out, b_out):
        inter = block.intermediate
        new = copy.copy(inter)
        new._modules = dict(inter._modules)
        fc1 = inter.dense
        new.dense = _linear(fc1.weight.detach()[kept], fc1.bias.detach()[kept] if fc1.bias is not None else None, fc1)
        return SplitMlp(new, _linear(w_out, b_out, block.output.dense))

    def reshape_mlp(self, block, hidden):
        fc1, fc2 = block.intermediate.dense, block.output.dense
        block.intermediate.dense = _empty_linear(fc1.in_features, hidden, fc1)
        block.output.dense = _empty_linear(hidden, fc2.out_features, fc2)


class HFBert(_SplitMlpFamily):
    """``BertModel`` and BERT task models (``BertFor*``): post-norm text encoders, padded batches."""

    name = "hf_bert"
    model_classes = ("BertModel", "BertForSequenceClassification", "BertForTokenClassification",
                     "BertForMaskedLM", "BertForQuestionAnswering", "BertForMultipleChoice", "BertForPreTraining")
    attention_classes = ("BertSelfAttention", "BertSdpaSelfAttention")
    attention_path = ("attention", "self")
    part_path = ("attention",)
    style = "bert"
    text = True

    def encoder(self, model):
        return model.base_model

    def mlp_joins(self, block):
        return block.output.LayerNorm  # LayerNorm(dense(h) + attention output): post-norm

    def attention_input(self, block, x):
        return x  # post-norm: the attention reads the block input itself

    def check_supported(self, model):
        cfg = model.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise unsupported("config", model, "decoder / cross-attention BERT models are not supported")
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise unsupported("config", model, f"position_embedding_type={cfg.position_embedding_type!r}: "
                              "only absolute position embeddings are supported (relative ones read q/k at full width)")
        super().check_supported(model)

    def tokens(self, model):
        return int(model.config.max_position_embeddings)

    def check_inputs(self, model, batch):
        from ..calibration import is_token_batch

        if not is_token_batch(batch):
            raise TypeError(f"{type(model).__name__} is a text encoder: calibrate with tokenised batches (a dict "
                            f"with input_ids and attention_mask, e.g. a tokenizer's output), got {type(batch).__name__}")
        cfg = model.config
        ids = batch["input_ids"]
        if ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"calibration sequences have {ids.shape[1]} tokens, the model takes at most "
                             f"{cfg.max_position_embeddings}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"calibration input_ids must be in [0, {cfg.vocab_size}), got [{int(ids.min())}, "
                             f"{int(ids.max())}]")

    def prepare_batch(self, batch, device, dtype):
        return {k: v.to(device=device) for k, v in batch.items()}

    def token_mask(self, model, batch):
        mask = batch.get("attention_mask")
        return mask.to(torch.bool) if mask is not None else None

    def embed(self, model, batch):
        return self.encoder(model).embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                                              position_ids=batch.get("position_ids"))

    def run_block(self, block, x, mask=None):
        return _first(block(x, attention_mask=_additive_mask(mask, x.dtype)))

    def halves(self, block, mask=None):
        # BertLayer.forward's own two steps: attention (+ residual, LayerNorm), then the feed-forward chunk
        from transformers.pytorch_utils import apply_chunking_to_forward

        def first(x):
            return _first(block.attention(x, attention_mask=_additive_mask(mask, x.dtype)))

        def second(y):
            return apply_chunking_to_forward(block.feed_forward_chunk, block.chunk_size_feed_forward,
                                             block.seq_len_dim, y)

        return first, second


class HFViT(_SplitMlpFamily):
    """``ViTModel`` / ``ViTForImageClassification``: pre-norm ViT layers."""

    name = "hf_vit"
    model_classes = ("ViTModel", "ViTForImageClassification")
    attention_classes = ("ViTSelfAttention", "ViTSdpaSelfAttention")
    attention_path = ("attention", "attention")
    part_path = ("attention",)

    def encoder(self, model):
        return model if type(model).__name__ == "ViTModel" else model.vit

    def attention_input(self, block, x):
        return block.layernorm_before(x)

    def embed(self, model, batch):
        return self.encoder(model).embeddings(batch)

    def run_block(self, block, x, mask=None):
        if mask is not None:
            raise ValueError("ViT layers take no token mask")
        return _first(block(x))

    def halves(self, block, mask=None):
        # ViTLayer.forward, split at its first residual
        def first(x):
            return _first(block.attention(block.layernorm_before(x))) + x

        def second(y):
            return block.output(block.intermediate(block.layernorm_after(y)), y)

        return first, second


class HFDinov2(_HFEncoder):
    """``Dinov2Model`` / ``Dinov2ForImageClassification``: pre-norm layers with LayerScale, and either
    MLP: ``Dinov2MLP`` (fc1 → act → fc2) or the giant's ``Dinov2SwiGLUFFN`` (``use_swiglu_ffn``).

    ``Dinov2SwiGLUFFN`` fuses gate and up into one Linear: ``x1, x2 = chunk(weights_in(x))``,
    ``h = silu(x1) ⊙ x2``, ``out = weights_out(h)``. Hidden channel ``j`` is row ``j`` (gate) and
    row ``D_h + j`` (up) of ``weights_in`` and column ``j`` of ``weights_out``; ``h`` is computed
    inline, so the statistics read ``weights_out``'s input (:class:`~corp.models.base.InputOf`),
    and the compensation folds into ``weights_out`` as into fc2."""

    name = "hf_dinov2"
    model_classes = ("Dinov2Model", "Dinov2ForImageClassification")
    attention_classes = ("Dinov2SelfAttention", "Dinov2SdpaSelfAttention")
    attention_path = ("attention", "attention")
    part_path = ("attention",)

    def encoder(self, model):
        return model if type(model).__name__ == "Dinov2Model" else model.dinov2

    def check_layer(self, path, block):
        if type(block.mlp).__name__ not in ("Dinov2MLP", "Dinov2SwiGLUFFN"):
            raise unsupported(f"{path}.mlp", block.mlp, "only Dinov2MLP (fc1 → act → fc2) and Dinov2SwiGLUFFN "
                              "are supported")

    def attention_input(self, block, x):
        return block.norm1(x)

    @staticmethod
    def _swiglu(block) -> bool:
        return type(block.mlp).__name__ == "Dinov2SwiGLUFFN"

    def mlp_linears(self, block):
        if self._swiglu(block):
            return block.mlp.weights_in, block.mlp.weights_out
        return block.mlp.fc1, block.mlp.fc2

    def mlp_input_rows(self, block):
        return 2 if self._swiglu(block) else 1

    def mlp_weights(self, block):
        if not self._swiglu(block):
            return super().mlp_weights(block)
        w_in, w_out = self.mlp_linears(block)
        d = w_out.in_features
        w, b = _fp64(w_in.weight), _fp64(w_in.bias)
        return MlpWeights(w[d:], b[d:] if b is not None else None, _fp64(w_out.weight), _fp64(w_out.bias),
                          w_gate=w[:d], b_gate=b[:d] if b is not None else None)

    def hidden_site(self, block):
        return InputOf(block.mlp.weights_out) if self._swiglu(block) else block.mlp.activation

    def build_mlp(self, block, kept, w_out, b_out):
        if not self._swiglu(block):
            return super().build_mlp(block, kept, w_out, b_out)
        mlp = block.mlp
        new = copy.copy(mlp)
        new._modules = dict(mlp._modules)
        rows = torch.cat([kept, kept + self.mlp_hidden(block)])  # the same channels in the gate and up halves
        w_in = mlp.weights_in
        new.weights_in = _linear(w_in.weight.detach()[rows], w_in.bias.detach()[rows] if w_in.bias is not None else None,
                                 w_in)
        new.weights_out = _linear(w_out, b_out, mlp.weights_out)
        return new

    def reshape_mlp(self, block, hidden):
        if not self._swiglu(block):
            return super().reshape_mlp(block, hidden)
        w_in, w_out = block.mlp.weights_in, block.mlp.weights_out
        block.mlp.weights_in = _empty_linear(w_in.in_features, 2 * hidden, w_in)
        block.mlp.weights_out = _empty_linear(hidden, w_out.out_features, w_out)

    def embed(self, model, batch):
        return self.encoder(model).embeddings(batch)

    def run_block(self, block, x, mask=None):
        if mask is not None:
            raise ValueError("DINOv2 layers take no token mask")
        return _first(block(x))

    def halves(self, block, mask=None):
        # Dinov2Layer.forward, split at its first residual
        def first(x):
            return block.drop_path(block.layer_scale1(_first(block.attention(block.norm1(x))))) + x

        def second(y):
            return block.drop_path(block.layer_scale2(block.mlp(block.norm2(y)))) + y

        return first, second


class HFDinov3(_HFEncoder):
    """``DINOv3ViTModel``: pre-norm layers with LayerScale, CLS and register tokens, rotary (RoPE)
    attention with separate q/k/v and ``o_proj``, and a plain (``up_proj`` → act → ``down_proj``) or
    gated (``act(gate_proj) ⊙ up_proj`` → ``down_proj``) MLP.

    MLP hidden channels are pruned as for the other families (gated: a row of ``gate_proj`` and of
    ``up_proj``), the statistics read ``down_proj``'s input. Query/key dims are pruned in whole rotary
    pairs with the scaled-rotation logit fit of :mod:`corp.rotary`: HF rotates *half-split* pairs
    ``(i, i + d/2)`` (``rotate_half``), so this adapter shows corp each head's q/k dims in the order
    :func:`half_to_pairs` (the interleaved layout ``corp.rotary`` works in) and the pruned
    :class:`PrunedHFRotaryAttention` keeps, per kept dim, the dense dim whose angle it turns by.
    The rotary embedding is the model's (``rope_embeddings``), recomputed for a layer from its config.
    """

    name = "hf_dinov3"
    model_classes = ("DINOv3ViTModel",)
    attention_classes = ("DINOv3ViTAttention",)
    attention_path = ("attention",)
    part_path = ("attention",)
    projection_names = ("q_proj", "k_proj", "v_proj", "o_proj")
    independent_qkv_biases = True  # DINOv3: no key bias by default

    def encoder(self, model):
        return model

    def blocks(self, model):
        return model.layer

    def check_layer(self, path, block):
        if type(block.mlp).__name__ not in ("DINOv3ViTMLP", "DINOv3ViTGatedMLP"):
            raise unsupported(f"{path}.mlp", block.mlp, "only DINOv3ViTMLP and DINOv3ViTGatedMLP are supported")
        if type(block).__name__ != "DINOv3ViTLayer":
            raise unsupported(path, block, "only DINOv3ViTLayer is supported")

    def check_supported(self, model):
        super().check_supported(model)
        cfg = model.config
        if isinstance(cfg.image_size, (tuple, list)) and cfg.image_size[0] != cfg.image_size[1]:
            raise unsupported("config.image_size", model, "only square images are supported")

    def tokens(self, model):
        cfg = model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1 + cfg.num_register_tokens

    def attention_input(self, block, x):
        return block.norm1(x)

    @staticmethod
    def _gated(block) -> bool:
        return type(block.mlp).__name__ == "DINOv3ViTGatedMLP"

    def mlp_linears(self, block):
        return block.mlp.up_proj, block.mlp.down_proj

    def mlp_input_rows(self, block):
        return 2 if self._gated(block) else 1

    def mlp_weights(self, block):
        w = super().mlp_weights(block)
        if self._gated(block):
            w.w_gate, w.b_gate = _fp64(block.mlp.gate_proj.weight), _fp64(block.mlp.gate_proj.bias)
        return w

    def hidden_site(self, block):
        return InputOf(block.mlp.down_proj)  # the gated product is computed inline

    def _input_names(self, block) -> tuple[str, ...]:
        return ("gate_proj", "up_proj") if self._gated(block) else ("up_proj",)

    def build_mlp(self, block, kept, w_out, b_out):
        mlp = block.mlp
        new = copy.copy(mlp)
        new._modules = dict(mlp._modules)
        for name in self._input_names(block):
            fc = getattr(mlp, name)
            setattr(new, name, _linear(fc.weight.detach()[kept], fc.bias.detach()[kept] if fc.bias is not None else None,
                                       fc))
        new.down_proj = _linear(w_out, b_out, mlp.down_proj)
        return new

    def reshape_mlp(self, block, hidden):
        for name in self._input_names(block):
            fc = getattr(block.mlp, name)
            setattr(block.mlp, name, _empty_linear(fc.in_features, hidden, fc))
        block.mlp.down_proj = _empty_linear(hidden, block.mlp.down_proj.out_features, block.mlp.down_proj)

    def embed(self, model, batch):
        return model.embeddings(batch)

    @staticmethod
    def position_embeddings(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``(cos, sin)``, each ``(T − prefix, head_dim)``, for a layer's input ``x`` ``(B, T, D)``
        (eval mode: no coordinate augmentation), as ``DINOv3ViTModel.forward`` computes them."""
        from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

        cfg = block.attention.config
        grid = math.isqrt(x.shape[1] - 1 - cfg.num_register_tokens)
        rope = DINOv3ViTRopePositionEmbedding(cfg).to(x.device).eval()
        side = grid * cfg.patch_size
        return rope(torch.empty(1, cfg.num_channels, side, side, device=x.device, dtype=x.dtype))

    def run_block(self, block, x, mask=None):
        if mask is not None:
            raise ValueError("DINOv3 layers take no token mask")
        return block(x, position_embeddings=self.position_embeddings(block, x))

    def halves(self, block, mask=None):
        # DINOv3ViTLayer.forward, split at its first residual
        def first(x):
            y, _ = block.attention(block.norm1(x), attention_mask=None,
                                   position_embeddings=self.position_embeddings(block, x))
            return block.drop_path(block.layer_scale1(y)) + x

        def second(y):
            return block.drop_path(block.layer_scale2(block.mlp(block.norm2(y)))) + y

        return first, second

    def _rotated_qkv(self, block, attn, normed: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3·H·d)`` [q | k | v] of the dense attention on its input, q and k after HF's rotary
        embedding and each head's q/k dims in the :func:`half_to_pairs` order (v as is)."""
        from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

        b, n, _ = normed.shape
        h, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed).view(b, n, h, d).transpose(1, 2)
        k = attn.k_proj(normed).view(b, n, h, d).transpose(1, 2)
        cos, sin = self.position_embeddings(block, normed)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        order = half_to_pairs(d).to(normed.device)
        q, k = q[..., order].transpose(1, 2), k[..., order].transpose(1, 2)
        return torch.cat([q.reshape(b, n, h * d), k.reshape(b, n, h * d), attn.v_proj(normed)], dim=-1)

    def attention(self, block):
        attn = block.attention
        heads, head_dim = self._heads(attn)
        if isinstance(attn, _PRUNED):
            return AttentionPart(module=attn, num_heads=heads, head_dim=head_dim, qkv_site=block.norm1,
                                 qkv=_refused, weights=_refused, build=_refused, out_proj=attn.o_proj,
                                 refusal="this attention was already pruned by corp")
        order = half_to_pairs(head_dim)

        def weights() -> AttentionWeights:
            shape = (heads, head_dim, -1)

            def rows(p, permute):
                w = _fp64(p.weight).reshape(shape)
                bias = _fp64(p.bias).reshape(heads, head_dim) if p.bias is not None else None
                if permute:
                    w, bias = w[:, order], (bias[:, order] if bias is not None else None)
                return w, bias

            (w_q, b_q), (w_k, b_k), (w_v, b_v) = rows(attn.q_proj, True), rows(attn.k_proj, True), rows(attn.v_proj, False)
            return AttentionWeights(w_q, w_k, w_v, b_q, b_k, b_v)

        return AttentionPart(
            module=attn, num_heads=heads, head_dim=head_dim,
            qkv_site=block.norm1,  # its output is the attention's input: q/k are rotated from it
            qkv_from_site=lambda normed: self._rotated_qkv(block, attn, normed),
            qkv=lambda x: self._rotated_qkv(block, attn, block.norm1(x)),
            weights=weights, build=lambda w, qk_dim: self._build_attention(attn, w, qk_dim),
            out_proj=attn.o_proj, rotary=True)

    def _pruned_like(self, attn, qk_dim):
        heads, head_dim = self._heads(attn)
        ref = attn.q_proj.weight
        return PrunedHFRotaryAttention(
            attn.config, attn.q_proj.in_features, heads, head_dim, qk_dim,
            biases=tuple(getattr(attn, n).bias is not None for n in self.projection_names),
            dropout=float(attn.dropout), device=ref.device, dtype=ref.dtype)

    def _build_attention(self, attn, w, qk_dim):
        heads, head_dim = self._heads(attn)
        new = self._pruned_like(attn, qk_dim)
        with torch.no_grad():
            for layer, weight, bias in zip(new.projections()[:3], (w.w_q, w.w_k, w.w_v), (w.b_q, w.b_k, w.b_v)):
                layer.weight.copy_(weight.reshape(layer.out_features, -1))
                if bias is not None:
                    layer.bias.copy_(bias.reshape(-1))
            new.o_proj.load_state_dict(attn.o_proj.state_dict())
            kept = w.qk_dims if w.qk_dims is not None else torch.arange(qk_dim).repeat(heads, 1)
            new.rope_dims.copy_(half_to_pairs(head_dim).to(kept.device)[kept])  # the dense dim of each kept one
        new.train(attn.training)
        return new

    def count_flops(self, model):
        flops = super().count_flops(model)
        # the base counts tokens − 1 patches; CLS and the registers are not patches
        pe = model.embeddings.patch_embeddings
        return flops - 2 * model.config.num_register_tokens * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] \
            * pe.out_channels


def _refused(*_args):
    raise ValueError("corp does not prune this attention's query/key dims again (AttentionPart.refusal)")


class _ClipLike(_HFEncoder):
    """CLIP/SigLIP vision towers: ``vision_model.encoder.layers`` of pre-norm layers whose
    ``self_attn`` holds q/k/v and the output projection, and ``mlp`` (fc1 → act → fc2)."""

    attention_path = ("self_attn",)
    part_path = ("self_attn",)
    projection_names = ("q_proj", "k_proj", "v_proj", "out_proj")
    style = "clip"

    def encoder(self, model):
        return model.vision_model

    def blocks(self, model):
        return model.vision_model.encoder.layers

    def attention_input(self, block, x):
        return block.layer_norm1(x)

    def out_projection(self, part):
        return part.out_proj

    def mlp_linears(self, block):
        return block.mlp.fc1, block.mlp.fc2

    def hidden_site(self, block):
        return block.mlp.activation_fn

    def halves(self, block, mask=None):
        # the encoder layer's forward, split at its first residual (vision: no attention mask)
        def first(x):
            return x + _first(block.self_attn(hidden_states=block.layer_norm1(x), attention_mask=None))

        def second(y):
            return y + block.mlp(block.layer_norm2(y))

        return first, second


class HFClipVision(_ClipLike):
    """``CLIPVisionModel``: a pre-LayerNorm after the embeddings, then CLIP encoder layers."""

    name = "hf_clip_vision"
    model_classes = ("CLIPVisionModel",)
    attention_classes = ("CLIPAttention", "CLIPSdpaAttention")

    def embed(self, model, batch):
        vm = model.vision_model
        return vm.pre_layrnorm(vm.embeddings(batch))

    def run_block(self, block, x, mask=None):
        if mask is not None:
            raise ValueError("CLIP vision layers take no token mask")
        return _first(block(x, None, None))


class HFSiglipVision(_ClipLike):
    """``SiglipVisionModel``: SigLIP encoder layers (no class token; the pooling head is not pruned)."""

    name = "hf_siglip_vision"
    model_classes = ("SiglipVisionModel",)
    attention_classes = ("SiglipAttention", "SiglipSdpaAttention")

    def tokens(self, model):
        cfg = model.config
        return (cfg.image_size // cfg.patch_size) ** 2

    def embed(self, model, batch):
        return model.vision_model.embeddings(batch)

    def run_block(self, block, x, mask=None):
        if mask is not None:
            raise ValueError("SigLIP vision layers take no token mask")
        return _first(block(x, None))

    def count_flops(self, model):
        flops = super().count_flops(model)
        # no class token: the patch embedding sees every token (the base counts tokens - 1 patches)
        pe = model.vision_model.embeddings.patch_embedding
        return flops + 2 * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * pe.out_channels


HF_ADAPTERS: tuple[type[ModelAdapter], ...] = (HFBert, HFViT, HFDinov2, HFDinov3, HFClipVision, HFSiglipVision)
