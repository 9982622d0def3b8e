"""The model-adapter interface: where all knowledge of a model family lives.

The pipeline sees a model only through a :class:`ModelAdapter`: its blocks, how
to embed calibration inputs up to the first block, and, per block, two
*parts* (attention, MLP) as :class:`AttentionPart` / :class:`MlpPart`: the
module to swap, the sub-module whose output the statistics read, the dense
weights as fp64 tensors, and how to build the pruned module from folded
weights. Saving, loading and cost counting go through the adapter as well.
A new family is a new subclass registered in :mod:`corp.models`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

__all__ = ["new_linear", "empty_linear", "ModelAdapter", "AttentionPart", "MlpPart", "AttentionWeights", "MlpWeights", "ConcatenatedOutputs",
           "InputOf", "unsupported"]


def new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], like: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` holding ``weight`` ``(out, in)`` and ``bias``, on ``like``'s device and dtype."""
    out_f, in_f = weight.shape
    layer = empty_linear(in_f, out_f, like, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(like.training)
    return layer


def empty_linear(in_f: int, out_f: int, like: nn.Linear, bias: Optional[bool] = None) -> nn.Linear:
    """An uninitialised ``nn.Linear`` ``in_f → out_f`` with ``like``'s bias presence (unless ``bias``
    says), device and dtype. Its weights are left unset (``torch.nn.utils.skip_init``): every caller
    overwrites them, and the random initialisation of the modules a deit_small prune builds cost
    0.08 s of it (kaiming_uniform_ on 96 layers)."""
    ref = like.weight
    bias = like.bias is not None if bias is None else bias
    return torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias, device=ref.device, dtype=ref.dtype)


def unsupported(path: str, module: nn.Module, why: str) -> ValueError:
    """The error for a module corp cannot prune: names its path, its class and what is missing."""
    return ValueError(f"unsupported module at '{path}' ({type(module).__name__}): {why}")


class ConcatenatedOutputs:
    """A hook site for a projection split over several modules (e.g. separate q, k, v ``nn.Linear``).

    It answers ``register_forward_hook(hook)`` like a module: ``hook(self, None, out)`` is
    called once all ``modules`` have run in one forward, ``out`` their outputs concatenated
    along the last dim in the order given (q, k, v: the fused ``[q heads | k heads | v heads]``
    layout :class:`AttentionPart` promises), whatever order the model calls them in. So the
    statistics and the streams see one fused qkv output for fused and separate projections alike.
    """

    def __init__(self, *modules: nn.Module):
        if not modules:
            raise ValueError("ConcatenatedOutputs needs at least one module")
        self.modules = modules

    def register_forward_hook(self, hook):
        outputs: dict[int, torch.Tensor] = {}

        def collect(index):
            def fn(_module, _inputs, out):
                outputs[index] = out
                if len(outputs) == len(self.modules):
                    fused = torch.cat([outputs[i] for i in range(len(self.modules))], dim=-1)
                    outputs.clear()
                    return hook(self, None, fused)  # a hook may stop the forward (raise): nothing is kept
            return fn

        handles = [m.register_forward_hook(collect(i)) for i, m in enumerate(self.modules)]
        return _Handles(handles, outputs)


class InputOf:
    """A hook site reporting what ``module`` *reads*: ``register_forward_hook(hook)`` calls
    ``hook(self, None, x)`` with ``module``'s first input ``x`` before it runs (a forward pre-hook).

    For MLPs whose hidden activation is computed inline, with no sub-module that outputs it
    (HF ``Dinov2SwiGLUFFN``: ``silu(x1) * x2`` in its forward): the output projection's input
    is that activation. A hook that raises stops the forward before ``module`` runs."""

    def __init__(self, module: nn.Module):
        self.module = module

    def register_forward_hook(self, hook):
        def pre(_module, args):
            hook(self, None, args[0])  # never returns a replacement input

        return self.module.register_forward_pre_hook(pre)


class _Handles:
    """Removes every hook of a :class:`ConcatenatedOutputs` registration."""

    def __init__(self, handles, pending: dict):
        self.handles, self.pending = handles, pending

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.pending.clear()


@dataclass
class AttentionWeights:
    """One attention's q/k/v projection, fp64: ``w_*`` ``(H, d, in)``, ``b_*`` ``(H, d)`` or None.

    ``qk_dims``: ``(H, s)``, which dense q/k dims the ``s`` rows of ``w_q``/``w_k`` came from
    (set by :func:`corp.fold.fold_attention`; rotary attention keeps their frequencies); None
    for dense weights."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    b_q: Optional[torch.Tensor]
    b_k: Optional[torch.Tensor]
    b_v: Optional[torch.Tensor]
    qk_dims: Optional[torch.Tensor] = None


@dataclass
class MlpWeights:
    """One MLP's projections, fp64.

    Attributes:
        w_in, b_in: the input projection ``(D_h, in)``, ``(D_h,)`` or None: ``fc1`` of a plain
            MLP, the *up* projection (the factor that is not gated) of a gated one.
        w_out, b_out: the output projection ``(out, D_h)``, ``(out,)`` or None.
        w_gate, b_gate: the gate projection of a gated MLP (``h = act(w_gate x + b_gate) ⊙
            (w_in x + b_in)``), ``(D_h, in)``, ``(D_h,)``; None for a plain MLP.
    """

    w_in: torch.Tensor
    b_in: Optional[torch.Tensor]
    w_out: torch.Tensor
    b_out: Optional[torch.Tensor]
    w_gate: Optional[torch.Tensor] = None
    b_gate: Optional[torch.Tensor] = None

    def input_row_norms(self) -> torch.Tensor:
        """Per hidden channel, the norm of what produces it ``(D_h,)``: ``‖W_in[j]‖`` for a plain
        MLP, ``‖W_gate[j]‖·‖W_in[j]‖`` for a gated one (both rows go with the channel).
        The paper's energy score multiplies this by ``E[h_j²]·‖W_out[:, j]‖``."""
        norms = self.w_in.norm(dim=1)
        return norms if self.w_gate is None else norms * self.w_gate.norm(dim=1)


@dataclass
class AttentionPart:
    """A block's attention as the pipeline sees it.

    Attributes:
        module: the attention module (swapped in and out with :meth:`ModelAdapter.set_part`).
        num_heads, head_dim: H and d (the q/k width per head before pruning).
        qkv_site: the sub-module whose output is the fused ``(B, T, 3·H·d)`` projection,
            laid out ``[q heads | k heads | v heads]``: the statistics hook it. Separate q/k/v
            projections give a :class:`ConcatenatedOutputs` of the three (anything with
            ``register_forward_hook`` that reports the fused output).
        qkv: ``qkv(x)`` computes that projection for a block input ``x`` ``(B, T, D)``
            without running the rest of the block.
        weights: ``weights()`` → :class:`AttentionWeights` of the dense module.
        build: ``build(weights, qk_dim)`` → a new module with q/k width ``qk_dim``
            (rows of ``weights.w_q``/``w_k``), values and output projection as the dense one.
        out_proj: the ``nn.Linear`` mapping the heads' concatenated outputs ``(B, T, H·d_v)`` to
            the block's width (its input is what the attention output fit reads, and its weights
            what it refits); None where the family has none (the output fit is then refused).
        refusal: None when q/k dims can be pruned; otherwise why not (the pipeline raises it,
            naming the module, for ``attn_sparsity > 0``; MLP pruning of the block still works).
        qkv_from_site: when the statistics need more than ``qkv_site``'s output (rotary q/k are
            rotated after the projection): maps that output to the ``(B, T, 3·H·d)`` tensor
            ``qkv`` computes; None: the site's output is that tensor.
        rotary: q/k dims are rotary pairs (``2i, 2i+1``): they are pruned in whole pairs and the
            logit fit is restricted to a scaled rotation per kept pair (:mod:`corp.rotary`); the
            statistics (``qkv``) see the rotated queries and keys.
        attend: ``attend(qkv, query_map=None)`` → the heads' concatenated outputs ``(B, T, H·d_v)``
            (``out_proj``'s input) of the dense module from what ``qkv`` returns ``(B, T, 3·H·d)``,
            without the projection; with ``query_map`` ``(H, d, d)`` those of the same attention
            with queries ``q @ query_map`` per head (keys, values and softmax scale unchanged:
            :func:`corp.fold.query_map`). The attention output fit's pass computes the dense and
            the pruned heads from one cached projection with it. None: not available (that pass
            then runs the attention modules whole).
    """

    module: nn.Module
    num_heads: int
    head_dim: int
    qkv_site: Any
    qkv: Callable[[torch.Tensor], torch.Tensor]
    weights: Callable[[], AttentionWeights]
    build: Callable[[AttentionWeights, int], nn.Module]
    out_proj: Optional[nn.Linear] = None
    refusal: Optional[str] = None
    qkv_from_site: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    rotary: bool = False
    attend: Optional[Callable[..., torch.Tensor]] = None


@dataclass
class MlpPart:
    """A block's MLP as the pipeline sees it.

    Attributes:
        module: the MLP module (swapped with :meth:`ModelAdapter.set_part`).
        hidden: D_h, the number of hidden channels.
        hidden_site: the sub-module whose output is the hidden activation ``h``
            ``(B, T, D_h)`` that the output projection reads: the statistics hook it.
        weights: ``weights()`` → :class:`MlpWeights` of the dense module.
        build: ``build(kept, w_out, b_out)`` → a new module keeping hidden channels
            ``kept`` (rows of the input projection) with output projection ``w_out``
            ``(out, |S|)`` and bias ``b_out``.
        joins: where the sum that the MLP's output is added into is normalised inside the block:
            post-norm blocks name the normalisation module whose input that sum is (BERT's
            ``output.LayerNorm``); None (pre-norm blocks): the sum is the block's output, which the
            next normalisation reads. ``mlp_token_weights`` weights tokens by ``1/var`` of that sum.
        from_hidden: ``from_hidden(h)`` → the module's output ``(B, T, out)`` from its hidden activation
            ``h`` ``(B, T, D_h)`` (``hidden_site``'s output), without the input projection: a pruned
            MLP's hidden activation is the kept channels of the dense one's on the same input, so the
            pruned stream advances from the statistics pass's ``h``. None: not available.
    """

    module: nn.Module
    hidden: int
    hidden_site: nn.Module
    weights: Callable[[], MlpWeights]
    build: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], nn.Module]
    joins: Optional[nn.Module] = None
    from_hidden: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class ModelAdapter:
    """One model family. Subclasses implement every method; :mod:`corp.models` picks one per model."""

    #: the family's name in saved configs and error messages
    name: str = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (it may still hold unsupported modules)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the model
    def check_supported(self, model: nn.Module) -> None:
        """Raise TypeError/ValueError naming the first module corp cannot prune."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks, in order (the pipeline replaces entries of this list)."""
        raise NotImplementedError

    def stem_to_(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        """Move everything but the blocks to ``device``/``dtype`` (in place)."""
        raise NotImplementedError

    def check_inputs(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Raise ValueError/TypeError if ``batch`` cannot go through :meth:`embed`."""
        raise NotImplementedError

    def embed(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Calibration inputs → the first block's input ``(B, T, D)``."""
        raise NotImplementedError

    def prepare_batch(self, batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """A calibration batch on ``device``, floating inputs in ``dtype`` (token ids stay integers)."""
        return batch.to(device=device, dtype=dtype)

    def token_mask(self, model: nn.Module, batch: Any) -> Optional[torch.Tensor]:
        """Which tokens of the embedded ``batch`` are real: ``(B, T)`` bool, or None when all are.

        Padding tokens (False) are run through the blocks like the others (masked as keys
        by :meth:`run_block`) but never enter the statistics or the reported errors. The
        mask travels with the hidden states through every block (it does not change).
        """
        return None

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``block`` on hidden states ``x`` ``(B, T, D)`` → ``(B, T, D)``, padding keys masked
        out by ``mask`` ``(B, T)`` bool (None: no padding)."""
        if mask is not None:
            raise ValueError(f"{type(self).__name__} models take no token mask")
        return block(x)

    # ------------------------------------------------------------------ one block
    def attention(self, block: nn.Module) -> AttentionPart:
        raise NotImplementedError

    def mlp(self, block: nn.Module) -> MlpPart:
        raise NotImplementedError

    def set_part(self, block: nn.Module, part: str, module: nn.Module) -> None:
        """Put ``module`` in ``block`` as its ``"attn"`` or ``"mlp"``."""
        raise NotImplementedError

    def halves(self, block: nn.Module, mask: Optional[torch.Tensor] = None
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """``(first, second)`` with ``run_block(block, x, mask) == second(first(x))``: ``first`` the
        attention with its residual (and, post-norm, its norm), ``second`` the MLP with its residual
        (computed the same way, bit for bit); ``mask`` as in :meth:`run_block`."""
        raise NotImplementedError

    def widths(self, block: nn.Module) -> dict[str, int]:
        """``{"mlp_hidden": D_h, "qk_dim": q/k width per head}`` of a dense or pruned block."""
        raise NotImplementedError

    def reshape_block(self, block: nn.Module, widths: dict[str, int]) -> None:
        """Give ``block`` the widths of :meth:`widths` (new uninitialised modules, same device and dtype)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ costs, saving
    def block_costs(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per block: ``embed_dim, mlp_hidden, num_heads, head_dim, qk_dim, tokens, qkv_bias, mlp_bias``
        and optionally ``mlp_input_rows`` (input-projection rows per hidden channel: 2 for gated MLPs,
        default 1) and ``qk_multiple`` (q/k dims are kept in multiples of it: 2 for rotary pairs,
        default 1), what :mod:`corp.budget`'s cost model needs."""
        raise NotImplementedError

    def count_flops(self, model: nn.Module) -> int:
        """Analytic FLOPs (2 × multiply-adds) of one input at the model's native size."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """A JSON-able description from which :meth:`build` rebuilds the dense skeleton."""
        raise NotImplementedError

    def build(self, arch: dict[str, Any], widths: Optional[list[dict[str, int]]] = None) -> nn.Module:
        """The model :meth:`describe` described, reshaped to per-block ``widths`` (weights uninitialised)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers
    def block_widths(self, model: nn.Module) -> list[dict[str, int]]:
        return [self.widths(b) for b in self.blocks(model)]
