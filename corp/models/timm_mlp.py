"""timm's MLP variants inside a transformer block, one :class:`MlpKind` each.

A hidden channel ``j`` of every kind is what the output projection's column
``j`` reads:

* :class:`PlainMlp` (timm ``Mlp``): ``h = act(fc1 x)``; channel ``j`` = row ``j`` of ``fc1``.
* :class:`SplitGlu` (timm ``SwiGLU``): ``h = act(fc1_g x) ⊙ (fc1_x x)``; channel ``j`` = row ``j``
  of ``fc1_g`` (gate) and of ``fc1_x`` (up).
* :class:`PackedGlu` (timm ``GluMlp``, ``SwiGLUPacked``): ``fc1`` packs both halves,
  ``x1, x2 = chunk(fc1 x)``, ``h = x1 ⊙ act(x2)`` (``gate_last``) or ``act(x1) ⊙ x2``;
  channel ``j`` = rows ``j`` and ``D_h + j`` of ``fc1``.

In every kind ``fc2`` reads ``h`` (after dropout, an identity in eval, and a
hidden ``norm`` that corp requires to be the identity: a LayerNorm over the
hidden channels mixes them, so removing one changes the normalisation of all
the others and no fold of ``fc2`` can undo it). The statistics hook the module
whose output is exactly ``h``, and the compensation folds into ``fc2`` as for
the plain MLP. The adapters of :mod:`corp.models` share these kinds.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.layers.activations import GELUTanh, QuickGELU

from .base import MlpPart, MlpWeights, unsupported
from .base import empty_linear as _empty_linear
from .base import new_linear as _linear

__all__ = ["MlpKind", "PlainMlp", "SplitGlu", "PackedGlu", "MLP_KINDS", "mlp_kind", "mlp_kind_named",
           "activation_name", "ACTIVATIONS"]

# Activation modules corp can describe and rebuild, by config name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "timm_gelu_tanh": GELUTanh,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


def activation_name(act: nn.Module) -> str:
    """The config name of ``act`` (ValueError for an activation corp cannot rebuild)."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for name, cls in (("timm_gelu_tanh", GELUTanh), ("quick_gelu", QuickGELU), ("relu", nn.ReLU), ("silu", nn.SiLU),
                      ("sigmoid", nn.Sigmoid)):
        if type(act) is cls:
            return name
    raise ValueError(f"unsupported MLP activation {type(act).__name__}: corp can save {', '.join(ACTIVATIONS)}")


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.detach().to(torch.float64) if t is not None else None




def _shallow(mlp: nn.Module) -> nn.Module:
    """A copy of ``mlp`` sharing its activation, norm and dropout modules, with its own child dict."""
    new = copy.copy(mlp)
    new._modules = dict(mlp._modules)  # copy.copy shares the child dict: assigning fc1 would edit `mlp`
    return new


class MlpKind:
    """One timm MLP class: how corp reads, prunes, reshapes and describes it."""

    #: config name
    name: str = ""
    #: input-projection rows per hidden channel (2 for gated MLPs: gate and up)
    input_rows: int = 1

    def matches(self, mlp: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, path: str, mlp: nn.Module) -> None:
        """Raise :func:`unsupported` for what corp cannot prune in this MLP."""
        if not isinstance(mlp.norm, nn.Identity):
            raise unsupported(f"{path}.norm", mlp.norm,
                              "a normalisation over the MLP hidden channels mixes them (removing a channel changes "
                              "how every other one is normalised), so pruned channels cannot be folded into fc2")
        for name in self.linear_names():
            if type(getattr(mlp, name)) is not nn.Linear:
                raise unsupported(f"{path}.{name}", getattr(mlp, name), f"{name} must be nn.Linear")

    def linear_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def linears(self, mlp: nn.Module) -> list[nn.Linear]:
        return [getattr(mlp, n) for n in self.linear_names()]

    def hidden(self, mlp: nn.Module) -> int:
        """D_h, the number of hidden channels (columns of fc2)."""
        return mlp.fc2.in_features

    def has_bias(self, mlp: nn.Module) -> bool:
        return self.linears(mlp)[0].bias is not None

    def hidden_site(self, mlp: nn.Module) -> nn.Module:
        """The sub-module whose output is ``h`` ``(B, T, D_h)``, what fc2 reads."""
        return mlp.norm  # the identity (check): its output is the gated product after dropout

    def from_hidden(self, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``mlp``'s output from ``hidden_site``'s output ``h``: what its forward computes after the site."""
        return mlp.drop2(mlp.fc2(h))

    def weights(self, mlp: nn.Module) -> MlpWeights:
        raise NotImplementedError

    def build(self, mlp: nn.Module, kept: torch.Tensor, w_out: torch.Tensor, b_out: Optional[torch.Tensor]) -> nn.Module:
        """A copy of ``mlp`` keeping hidden channels ``kept`` ``(|S|,)`` with ``fc2 = (w_out, b_out)``."""
        raise NotImplementedError

    def reshape_(self, mlp: nn.Module, hidden: int) -> None:
        """Give ``mlp`` ``hidden`` channels (new uninitialised linears, same device and dtype)."""
        raise NotImplementedError

    def part(self, mlp: nn.Module) -> MlpPart:
        return MlpPart(module=mlp, hidden=self.hidden(mlp), hidden_site=self.hidden_site(mlp),
                       weights=lambda: self.weights(mlp),
                       build=lambda kept, w_out, b_out: self.build(mlp, kept, w_out, b_out),
                       from_hidden=lambda h: self.from_hidden(mlp, h))

    def describe(self, mlp: nn.Module) -> dict[str, Any]:
        """JSON-able: the kind and its options (activation included)."""
        return {"kind": self.name, "act": activation_name(mlp.act)}

    def layer(self, desc: dict[str, Any]) -> Callable[..., nn.Module]:
        """The timm ``mlp_layer`` constructor that rebuilds a described MLP."""
        raise NotImplementedError

    def constructor_hidden(self, mlp: nn.Module) -> int:
        """The ``hidden_features`` timm's constructor was given for this MLP."""
        return self.hidden(mlp)


class PlainMlp(MlpKind):
    """timm ``Mlp``: ``fc2(act(fc1 x))``."""

    name = "mlp"

    def matches(self, mlp):
        return type(mlp) is Mlp

    def linear_names(self):
        return ("fc1", "fc2")

    def hidden_site(self, mlp):
        return mlp.act

    def from_hidden(self, mlp, h):
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))

    def weights(self, mlp):
        return MlpWeights(_f64(mlp.fc1.weight), _f64(mlp.fc1.bias), _f64(mlp.fc2.weight), _f64(mlp.fc2.bias))

    def build(self, mlp, kept, w_out, b_out):
        new = _shallow(mlp)
        fc1 = mlp.fc1
        new.fc1 = _linear(fc1.weight.detach()[kept], fc1.bias.detach()[kept] if fc1.bias is not None else None, fc1)
        new.fc2 = _linear(w_out, b_out, mlp.fc2)
        return new

    def reshape_(self, mlp, hidden):
        if hidden != self.hidden(mlp):
            mlp.fc1 = _empty_linear(mlp.fc1.in_features, hidden, mlp.fc1)
            mlp.fc2 = _empty_linear(hidden, mlp.fc2.out_features, mlp.fc2)

    def layer(self, desc):
        return Mlp


class SplitGlu(MlpKind):
    """timm ``SwiGLU``: ``fc2(act(fc1_g x) ⊙ fc1_x x)``, separate gate (``fc1_g``) and up (``fc1_x``)."""

    name = "swiglu"
    input_rows = 2

    def matches(self, mlp):
        return type(mlp) is SwiGLU

    def linear_names(self):
        return ("fc1_g", "fc1_x", "fc2")

    def weights(self, mlp):
        return MlpWeights(_f64(mlp.fc1_x.weight), _f64(mlp.fc1_x.bias), _f64(mlp.fc2.weight), _f64(mlp.fc2.bias),
                          w_gate=_f64(mlp.fc1_g.weight), b_gate=_f64(mlp.fc1_g.bias))

    def build(self, mlp, kept, w_out, b_out):
        new = _shallow(mlp)
        for name in ("fc1_g", "fc1_x"):
            fc = getattr(mlp, name)
            setattr(new, name, _linear(fc.weight.detach()[kept], fc.bias.detach()[kept] if fc.bias is not None else None, fc))
        new.fc2 = _linear(w_out, b_out, mlp.fc2)
        return new

    def reshape_(self, mlp, hidden):
        if hidden != self.hidden(mlp):
            for name in ("fc1_g", "fc1_x"):
                fc = getattr(mlp, name)
                setattr(mlp, name, _empty_linear(fc.in_features, hidden, fc))
            mlp.fc2 = _empty_linear(hidden, mlp.fc2.out_features, mlp.fc2)

    def layer(self, desc):
        return SwiGLU


class PackedGlu(MlpKind):
    """timm ``GluMlp`` / ``SwiGLUPacked``: ``fc1`` packs ``[x1; x2]``; the gate is ``x2`` when
    ``gate_last`` (``x1 ⊙ act(x2)``), else ``x1`` (``act(x1) ⊙ x2``, SwiGLUPacked)."""

    name = "glu"
    input_rows = 2

    def matches(self, mlp):
        return type(mlp) is GluMlp

    def check(self, path, mlp):
        super().check(path, mlp)
        if mlp.chunk_dim != -1:
            raise unsupported(path, mlp, "only the Linear (use_conv=False) GluMlp is supported")

    def linear_names(self):
        return ("fc1", "fc2")

    def _halves(self, mlp):
        """``(up rows, gate rows)`` of fc1 as index offsets: 0 or D_h."""
        d = self.hidden(mlp)
        return (0, d) if mlp.gate_last else (d, 0)

    def weights(self, mlp):
        d = self.hidden(mlp)
        up, gate = self._halves(mlp)
        w, b = _f64(mlp.fc1.weight), _f64(mlp.fc1.bias)
        return MlpWeights(w[up:up + d], b[up:up + d] if b is not None else None, _f64(mlp.fc2.weight),
                          _f64(mlp.fc2.bias), w_gate=w[gate:gate + d], b_gate=b[gate:gate + d] if b is not None else None)

    def build(self, mlp, kept, w_out, b_out):
        new = _shallow(mlp)
        fc1 = mlp.fc1
        rows = torch.cat([kept, kept + self.hidden(mlp)])  # the same channels in both halves, halves in place
        new.fc1 = _linear(fc1.weight.detach()[rows], fc1.bias.detach()[rows] if fc1.bias is not None else None, fc1)
        new.fc2 = _linear(w_out, b_out, mlp.fc2)
        return new

    def reshape_(self, mlp, hidden):
        if hidden != self.hidden(mlp):
            mlp.fc1 = _empty_linear(mlp.fc1.in_features, 2 * hidden, mlp.fc1)
            mlp.fc2 = _empty_linear(hidden, mlp.fc2.out_features, mlp.fc2)

    def describe(self, mlp):
        return dict(super().describe(mlp), gate_last=bool(mlp.gate_last))

    def layer(self, desc):
        return partial(GluMlp, gate_last=bool(desc["gate_last"]))

    def constructor_hidden(self, mlp):
        return mlp.fc1.out_features  # GluMlp's hidden_features counts both halves


MLP_KINDS: tuple[MlpKind, ...] = (PlainMlp(), SplitGlu(), PackedGlu())


def mlp_kind(path: str, mlp: nn.Module) -> MlpKind:
    """The kind of ``mlp`` (ValueError naming ``path`` when corp knows none)."""
    for kind in MLP_KINDS:
        if kind.matches(mlp):
            return kind
    raise unsupported(path, mlp, "corp prunes timm's Mlp, SwiGLU and GluMlp/SwiGLUPacked MLPs")


def mlp_kind_named(name: str) -> MlpKind:
    for kind in MLP_KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"unknown MLP kind {name!r} in config (known: {[k.name for k in MLP_KINDS]})")
