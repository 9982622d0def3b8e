"""Pruned modules: attention whose query/key width per head differs from its value width
(:class:`PrunedAttention` for timm's ``Attention``, :class:`PrunedRotaryAttention` for rotary attention)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["load_fused_qkv_", "PrunedAttention", "PrunedRotaryAttention", "ReplaysFromHeads", "HeadsReplay",
           "HiddenReplay"]


class HeadsReplay(nn.Module):
    """Stands in for an attention module :class:`ReplaysFromHeads`: whatever it is called with, it
    returns ``proj_drop(proj(z))`` of that module for heads' outputs ``z`` ``(B, T, H·d_v)``
    recorded before (the output projection's input), without recomputing the attention."""

    def __init__(self, module: nn.Module, heads: torch.Tensor):
        super().__init__()
        self.inner, self.heads = module, heads

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.inner.proj_drop(self.inner.proj(self.heads))


class HiddenReplay(nn.Module):
    """Stands in for an MLP: whatever it is called with, it returns ``finish(hidden)``, the MLP's
    output from a hidden activation ``hidden`` ``(B, T, D_h)`` recorded before
    (:attr:`corp.models.base.MlpPart.from_hidden`), without the input projection."""

    def __init__(self, finish, hidden: torch.Tensor):
        super().__init__()
        self.finish, self.hidden = finish, hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.finish(self.hidden)


class ReplaysFromHeads:
    """A mixin for attention modules whose output is exactly ``proj_drop(proj(z))`` of their output
    projection's input ``z``: :meth:`replay` builds the stand-in that reuses a recorded ``z``
    (corp.streams: the attention output fit's pass records it, and the MLP statistics pass that
    follows replays it with the refitted projection)."""

    def replay(self, heads: torch.Tensor) -> HeadsReplay:
        return HeadsReplay(self, heads)


@torch.no_grad()
def load_fused_qkv_(module: nn.Module, weights, qk_dim: int) -> None:
    """Copy q/k/v weights (:class:`corp.models.base.AttentionWeights`: ``(H, qk_dim, in)``,
    ``(H, qk_dim, in)``, ``(H, head_dim, in)``, biases ``(H, ·)``) into ``module.qkv`` laid out
    ``[q heads | k heads | v heads]`` (the layout of every pruned attention here)."""
    h = weights.w_q.shape[0]
    module.qkv.weight.copy_(torch.cat([weights.w_q.reshape(h * qk_dim, -1), weights.w_k.reshape(h * qk_dim, -1),
                                       weights.w_v.reshape(-1, weights.w_v.shape[-1])]))
    if module.qkv.bias is not None:
        module.qkv.bias.copy_(torch.cat([weights.b_q.reshape(-1), weights.b_k.reshape(-1), weights.b_v.reshape(-1)]))


class PrunedAttention(ReplaysFromHeads, nn.Module):
    """Multi-head self-attention with ``qk_dim`` query/key dims and ``head_dim`` value dims per head.

    A drop-in replacement for timm's ``Attention`` inside a ``Block``: same
    call signature, same output. The fused projection ``qkv`` maps ``dim`` to
    ``H·qk_dim`` queries, ``H·qk_dim`` keys and ``H·head_dim`` values, in that
    order. Logits are scaled by ``qk_dim ** -0.5`` (CORP folds the factor
    ``sqrt(qk_dim / head_dim)`` into the query weights so that the pruned model
    keeps the dense model's softmax temperature).

    ``pad_qk``: zero-pad q and k to ``head_dim`` before
    ``scaled_dot_product_attention``. Zero dims leave every logit unchanged,
    and the equal widths keep the fused kernels: on the CPU a q/k width of 32
    against a value width of 64 fell back to a path 2.7× slower (96 ms vs 35 ms
    padded, batch 32, 6 heads, 197 tokens). Flash kernels on GPUs need equal
    widths too.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        qk_dim: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pad_qk: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not 0 < qk_dim <= head_dim:
            raise ValueError(f"qk_dim must be in [1, head_dim={head_dim}], got {qk_dim}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.attn_dim = num_heads * head_dim
        self.scale = qk_dim ** -0.5
        self.pad_qk = pad_qk
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + head_dim), bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """``x``: ``(B, N, dim)`` → ``(B, N, dim)``."""
        return self.proj_drop(self.proj(self.heads_from_qkv(self.qkv(x), attn_mask, is_causal)))

    def heads_from_qkv(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                       is_causal: bool = False) -> torch.Tensor:
        """The heads' concatenated outputs ``(B, N, H·head_dim)`` (the output projection's input) for
        the fused projection's output ``qkv`` ``(B, N, H·(2·qk_dim + head_dim))``."""
        b, n, _ = qkv.shape
        h, s, d = self.num_heads, self.qk_dim, self.head_dim
        q, k, v = qkv.split([h * s, h * s, h * d], dim=-1)
        q = q.view(b, n, h, s).transpose(1, 2)
        k = k.view(b, n, h, s).transpose(1, 2)
        v = v.view(b, n, h, d).transpose(1, 2)
        if self.pad_qk and s < d:
            q = F.pad(q, (0, d - s))
            k = F.pad(k, (0, d - s))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )
        return out.transpose(1, 2).reshape(b, n, self.attn_dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, head_dim={self.head_dim}, pad_qk={self.pad_qk}"


class PrunedRotaryAttention(ReplaysFromHeads, nn.Module):
    """Rotary multi-head self-attention keeping ``qk_dim`` of ``head_dim`` query/key dims per head, in
    whole rotary pairs; a drop-in replacement for timm's ``EvaAttention`` (call signature
    ``(x, rope=None, attn_mask=None, is_causal=False)``).

    ``qkv`` maps ``dim`` to ``H·qk_dim`` queries, ``H·qk_dim`` keys and ``H·head_dim`` values.
    ``rope_dims`` ``(H, qk_dim)``: for each kept q/k dim, the dense dim whose rotary frequency
    it keeps (pairs adjacent, interleaved layout), so the model's rotary embedding ``rope``
    ``(T − prefix, 2·head_dim)`` (sines, then cosines) is gathered per head. Prefix tokens are not
    rotated, as in ``EvaAttention``. Logits are scaled by ``qk_dim ** -0.5`` (the fold scales
    the queries to keep the dense temperature); ``norm`` is the dense module's output norm
    (``scale_attn_inner``) or an identity. ``pad_qk``: zero-pad q/k to ``head_dim`` for the fused
    kernels (as :class:`PrunedAttention`).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, num_prefix_tokens: int = 1,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm: Optional[nn.Module] = None, pad_qk: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if qk_dim % 2 or head_dim % 2 or not 0 < qk_dim <= head_dim:
            raise ValueError(f"qk_dim must be even and in [2, head_dim={head_dim}], got {qk_dim}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.qk_dim = num_heads, head_dim, qk_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_dim = num_heads * head_dim
        self.scale = qk_dim ** -0.5
        self.pad_qk = pad_qk
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + head_dim), bias=qkv_bias, **dd)
        self.register_buffer("rope_dims", torch.arange(qk_dim, device=device).repeat(num_heads, 1))
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        body = x[:, :, npt:]
        rotated = torch.stack([-body[..., 1::2], body[..., ::2]], dim=-1).reshape(body.shape)
        return torch.cat([x[:, :, :npt], (body * cos + rotated * sin).type_as(x)], dim=2)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x``: ``(B, N, dim)`` → ``(B, N, dim)``; ``rope``: ``(N − prefix, 2·head_dim)`` or None."""
        b, n, _ = x.shape
        h, s, d = self.num_heads, self.qk_dim, self.head_dim
        q, k, v = self.qkv(x).split([h * s, h * s, h * d], dim=-1)
        q = q.view(b, n, h, s).transpose(1, 2)
        k = k.view(b, n, h, s).transpose(1, 2)
        v = v.view(b, n, h, d).transpose(1, 2)
        if rope is not None:
            sin, cos = rope.tensor_split(2, -1)  # (N', head_dim) each
            sin, cos = sin[:, self.rope_dims].transpose(0, 1), cos[:, self.rope_dims].transpose(0, 1)  # (H, N', s)
            q, k = self._rotate(q, sin, cos), self._rotate(k, sin, cos)
        if self.pad_qk and s < d:
            q, k = F.pad(q, (0, d - s)), F.pad(k, (0, d - s))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop.p if self.training else 0.0,
                                             is_causal=is_causal, scale=self.scale)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, head_dim={self.head_dim}, pad_qk={self.pad_qk}"
