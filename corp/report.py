"""What a pruning run did: per-block widths, damping and errors; parameters and FLOPs."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["BlockReport", "PruneReport", "count_parameters", "count_flops", "measure_block_errors",
           "measure_throughput"]


@dataclass
class BlockReport:
    """One block. Errors are ``‖y − y_dense‖ / ‖y_dense‖`` of the block output on the
    report images (the same block input for both), with and without compensation."""

    index: int
    mlp_hidden_before: int
    mlp_hidden_after: int
    qk_dim_before: int
    qk_dim_after: int
    mlp_damping: float = 0.0
    mlp_relative_damping: float = 0.0
    attn_damping: float = 0.0
    attn_relative_damping: float = 0.0
    error_compensated: Optional[float] = None
    error_uncompensated: Optional[float] = None
    # wall time of the block's phases: statistics passes (forwards and accumulation), selection,
    # solves and folds (the rest: propagation to the next block and the report's error forwards)
    seconds_statistics: float = 0.0
    seconds_selection: float = 0.0
    seconds_solve: float = 0.0

    @classmethod
    def for_block(cls, index: int, widths: dict[str, int]) -> "BlockReport":
        """The record of a block before pruning (``widths``: the adapter's ``mlp_hidden``/``qk_dim``)."""
        return cls(index=index, mlp_hidden_before=widths["mlp_hidden"], mlp_hidden_after=widths["mlp_hidden"],
                   qk_dim_before=widths["qk_dim"], qk_dim_after=widths["qk_dim"])

    def add_part(self, name: str, result) -> None:
        """Record a pruned part (:class:`corp.parts.PrunedPart`) of this block."""
        if name == "attn":
            self.qk_dim_after = result.width
            self.attn_damping, self.attn_relative_damping = result.damping, result.relative_damping
        else:
            self.mlp_hidden_after = result.width
            self.mlp_damping, self.mlp_relative_damping = result.damping, result.relative_damping
        self.seconds_selection += result.seconds_selection
        self.seconds_solve += result.seconds_fit


@dataclass
class PruneReport:
    """Summary of one :func:`corp.prune` run. ``str(report)`` is a readable table."""

    blocks: list[BlockReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0  # per image, 2 × multiply-adds of linear layers, convolution and attention
    flops_after: int = 0
    seconds: float = 0.0
    calibration_images: int = 0
    calibration_tokens: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    allocation: Optional[dict[str, Any]] = None  # per-block sparsities chosen for a budget
    # measured inference speed, when the caller measured it (the CLI does: :meth:`set_throughput`)
    throughput: Optional[dict[str, Any]] = None

    def set_throughput(self, dense: float, pruned: float, batch_size: int, device: str, runs: int) -> None:
        """Record measured images/s of the dense and the pruned model on batches of ``batch_size``."""
        self.throughput = {"dense_images_per_second": dense, "pruned_images_per_second": pruned,
                           "speedup": pruned / dense, "batch_size": batch_size, "device": device, "runs": runs}

    def _throughput_line(self) -> Optional[str]:
        t = self.throughput
        if not t:
            return None
        return (f"throughput (batch {t['batch_size']}, {t['device']}, median of {t['runs']}): "
                f"dense {t['dense_images_per_second']:.1f} -> pruned {t['pruned_images_per_second']:.1f} images/s "
                f"({t['speedup']:.2f}x)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw per-block output errors (with and without compensation) and kept widths as a PNG."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import matplotlib.ticker
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("plotting the report needs matplotlib: pip install 'corp-prune[plot]'") from exc
        idx = [b.index for b in self.blocks]
        fig, (ax_err, ax_w) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(idx) + 3), 6), sharex=True)
        comp = [b.error_compensated for b in self.blocks]
        plain = [b.error_uncompensated for b in self.blocks]
        if any(v is not None for v in comp):
            ax_err.plot(idx, [v if v is not None else float("nan") for v in plain], "o-", label="uncompensated")
            ax_err.plot(idx, [v if v is not None else float("nan") for v in comp], "o-", label="CORP")
            ax_err.set_yscale("log")
            ax_err.legend()
        ax_err.set_ylabel("block output error\n‖y − y_dense‖ / ‖y_dense‖")
        ax_err.grid(alpha=0.3)
        ax_w.plot(idx, [b.mlp_hidden_after / b.mlp_hidden_before for b in self.blocks], "s-", label="MLP channels kept")
        ax_w.plot(idx, [b.qk_dim_after / b.qk_dim_before for b in self.blocks], "^-", label="q/k dims kept")
        ax_w.set_ylim(0, 1.05)
        ax_w.set_ylabel("fraction kept")
        ax_w.set_xlabel("block")
        ax_w.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax_w.legend()
        ax_w.grid(alpha=0.3)
        s = self.settings
        title = (f"corp: {s.get('mlp_sparsity', 0):.0%} MLP, {s.get('attn_sparsity', 0):.0%} attention, "
                 f"{self.params_after / max(self.params_before, 1):.0%} of parameters kept")
        if self.throughput:
            t = self.throughput
            title += (f"\nthroughput {t['dense_images_per_second']:.1f} -> {t['pruned_images_per_second']:.1f} "
                      f"images/s ({t['speedup']:.2f}x, batch {t['batch_size']}, {t['device']})")
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneReport":
        data = dict(data)
        data["blocks"] = [BlockReport(**b) for b in data.get("blocks", [])]
        return cls(**data)

    def __str__(self) -> str:
        def err(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.4f}"

        lines = [
            f"{'block':>5} {'mlp kept':>10} {'qk kept':>8} {'mlp λ/diag':>10} {'attn λ rel':>10} "
            f"{'err comp':>9} {'err no-comp':>11}"
        ]
        for b in self.blocks:
            lines.append(
                f"{b.index:>5} {b.mlp_hidden_after:>5}/{b.mlp_hidden_before:<4} {b.qk_dim_after:>3}/{b.qk_dim_before:<4} "
                f"{b.mlp_relative_damping:>10.2e} {b.attn_relative_damping:>10.2e} "
                f"{err(b.error_compensated):>9} {err(b.error_uncompensated):>11}"
            )
        lines.append(
            f"params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M "
            f"({self.params_after / max(self.params_before, 1):.1%} kept), "
            f"FLOPs/image {self.flops_before / 1e9:.3f}G -> {self.flops_after / 1e9:.3f}G "
            f"({self.flops_after / max(self.flops_before, 1):.1%} kept), "
            f"{self.calibration_images} images / {self.calibration_tokens} tokens, {self.seconds:.1f}s"
        )
        if self._throughput_line():
            lines.append(self._throughput_line())
        return "\n".join(lines)


@torch.no_grad()
def measure_throughput(model: nn.Module, images: torch.Tensor, runs: int = 3) -> float:
    """Median images/s of ``model(images)`` (``images``: ``(B, C, H, W)`` on the model's device and
    dtype) over ``runs`` timed forwards after one untimed warm-up."""
    import time

    def forward() -> float:
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        model(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        return time.perf_counter() - start

    was_training = model.training
    model.eval()
    try:
        forward()
        times = sorted(forward() for _ in range(runs))
    finally:
        model.train(was_training)
    return images.shape[0] / times[len(times) // 2]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module) -> int:
    """Analytic FLOPs (2 × multiply-adds) for one image at the model's native size, as the model's
    adapter counts them (timm ViT: patch embedding, every Linear of the blocks and heads, and the
    two attention matmuls at their logical widths; norms, activations and softmax left out).
    Works for the dense and the pruned models alike."""
    from .models import adapter_for

    return adapter_for(model).count_flops(model)


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor], dp, masks=None) -> float:
    """``‖outputs − reference‖ / ‖reference‖`` over all batches of all ranks (real tokens only:
    ``masks``, one ``(B, T)`` bool per batch or None)."""
    masks = masks if masks is not None else [None] * len(reference)
    pairs = [(o, r) if m is None else (o[m], r[m]) for o, r, m in zip(outputs, reference, masks)]
    num = sum(float(torch.linalg.vector_norm((o - r).float())) ** 2 for o, r in pairs)
    den = sum(float(torch.linalg.vector_norm(r.float())) ** 2 for _, r in pairs)
    num, den = dp.sum_float(num), dp.sum_float(den)
    return (num / max(den, 1e-300)) ** 0.5


def measure_block_errors(adapter, block: nn.Module, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                         dense_outputs: list[torch.Tensor], dense: dict[str, nn.Module],
                         plain: dict[str, nn.Module], dp, masks=None) -> tuple[float, float]:
    """The pruned block's output error on the report ``inputs``, with and without compensation.

    Args:
        block: the pruned block; ``outputs``: its outputs on ``inputs`` (``(B, T, D)`` each).
        dense_outputs: the dense block's outputs on ``inputs`` (computed here when empty).
        dense: the block's dense part modules; ``plain``: the uncompensated pruned part modules
            (the same selection, no fit; empty when the run did not compensate).
        masks: per input batch its ``(B, T)`` bool token mask (None: no padding); padding is
            masked in the blocks and left out of the errors.

    Returns:
        ``(error_compensated, error_uncompensated)``, each ``‖y − y_dense‖ / ‖y_dense‖``.
    """
    from .streams import swapped

    masks = masks if masks is not None else [None] * len(inputs)

    def run() -> list[torch.Tensor]:
        return [adapter.run_block(block, x, m) for x, m in zip(inputs, masks)]

    if not dense_outputs:
        with swapped(adapter, block, dense):
            dense_outputs = run()
    compensated = _relative_error(outputs, dense_outputs, dp, masks)
    if not plain:
        return compensated, compensated
    with swapped(adapter, block, plain):
        return compensated, _relative_error(run(), dense_outputs, dp, masks)
