"""The block-wise calibration engine: ``corp.prune``.

Data flows one way: calibration batches → embedding → for each block:
statistics (forward hooks) → selection → closed-form solve → fold → the next
block's input. Memory holds the calibration hidden states and one block's
statistics, never all layers' statistics at once.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Iterator, Optional

import torch
import torch.nn as nn

from . import __version__
from .backends import BACKENDS, resolve_backends
from .adapters import block_widths, check_images, check_supported, describe_architecture, embed
from .calibration import CalibrationInput, iter_calibration_batches
from .compensate import kept_count, prune_attention, prune_mlp
from .report import BlockReport, PruneReport, count_flops, count_parameters
from .stats import AttentionStatistics, MLPStatistics

__all__ = ["prune", "DEFAULT_MLP_RIDGE", "DEFAULT_ATTN_RIDGE"]

# Ridge dampings, relative to mean(diag Σ_SS) for the MLP and to
# mean(diag GQ_SS)·mean(diag GK_SS) for attention. Chosen by
# benchmarks/ridge_sweep.py on the digits ViT (dense 97.33%): with attention at
# 1e-3, MLP ridge 1e-4 / 1e-3 / 1e-2 gave 97.11 / 97.11 / 97.11% at 50% and
# 94.67 / 94.67 / 94.22% at 75% (MLP + attention); attention ridge 1e-4 / 1e-3 /
# 1e-2 / 1e-1 gave 97.11 / 97.11 / 96.89 / 95.78% at 50% and 94.00 / 94.22 /
# 93.56 / 91.56% at 75% (MLP at 1e-2). 1e-3 is also the paper's floor.
DEFAULT_MLP_RIDGE = 1e-3
DEFAULT_ATTN_RIDGE = 1e-3

PROPAGATE_MODES = ("dense", "pruned")


class _StopForward(Exception):
    """Raised by a hook once the statistics it needs are collected: the rest of the block is skipped."""


@contextlib.contextmanager
def _hook(module: nn.Module, fn, stop: bool) -> Iterator[None]:
    def hook(_mod, _inp, out):
        fn(out)
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_until_hook(block: nn.Module, states: list[torch.Tensor]) -> None:
    for x in states:
        try:
            block(x)
        except _StopForward:
            pass


@contextlib.contextmanager
def _swapped(block: nn.Module, attn: Optional[nn.Module] = None, fc: Optional[tuple[nn.Module, nn.Module]] = None):
    """Temporarily run ``block`` with another attention and/or another (fc1, fc2) pair."""
    old_attn, old_fc = block.attn, (block.mlp.fc1, block.mlp.fc2)
    if attn is not None:
        block.attn = attn
    if fc is not None:
        block.mlp.fc1, block.mlp.fc2 = fc
    try:
        yield block
    finally:
        block.attn = old_attn
        block.mlp.fc1, block.mlp.fc2 = old_fc


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``‖outputs − reference‖ / ‖reference‖`` over all batches (norms per batch in the working dtype)."""
    num = sum(float(torch.linalg.vector_norm((o - r).float())) ** 2 for o, r in zip(outputs, reference))
    den = sum(float(torch.linalg.vector_norm(r.float())) ** 2 for r in reference)
    return (num / max(den, 1e-300)) ** 0.5


def _check_finite(tensors: list[torch.Tensor], where: str) -> None:
    for t in tensors:
        # a sum is non-finite iff an element is (or the activations overflow, just as bad);
        # one reduction pass instead of isfinite's mask + all
        if not torch.isfinite(t.sum()):
            raise ValueError(f"non-finite activations (NaN or Inf) at {where}")


def _validate_args(mlp_sparsity: float, attn_sparsity: float, propagate: str, backend: str, ridge: float,
                   attn_ridge: float, batch_size: int) -> None:
    for name, value in (("mlp_sparsity", mlp_sparsity), ("attn_sparsity", attn_sparsity)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if propagate not in PROPAGATE_MODES:
        raise ValueError(f"propagate must be one of {PROPAGATE_MODES}, got {propagate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("ridge", ridge), ("attn_ridge", attn_ridge)):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_widths(model: nn.Module, mlp_sparsity: float, attn_sparsity: float) -> None:
    for i, block in enumerate(model.blocks):
        hidden, head_dim = block.mlp.fc1.out_features, block.attn.head_dim
        if kept_count(hidden, mlp_sparsity) < 1:
            raise ValueError(f"mlp_sparsity={mlp_sparsity} leaves no MLP channel of {hidden} in block {i}")
        if kept_count(head_dim, attn_sparsity) < 1:
            raise ValueError(f"attn_sparsity={attn_sparsity} leaves no query/key dim of {head_dim} in block {i}")


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration: CalibrationInput,
    *,
    mlp_sparsity: float = 0.0,
    attn_sparsity: float = 0.0,
    compensate: bool = True,
    propagate: str = "dense",
    ridge: float = DEFAULT_MLP_RIDGE,
    attn_ridge: float = DEFAULT_ATTN_RIDGE,
    batch_size: int = 32,
    max_images: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    report_images: int = 16,
    progress: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Prune a timm VisionTransformer in one shot with CORP and return the smaller model.

    Args:
        model: a timm ``VisionTransformer`` (deit, deit3, vit families). Left
            untouched unless ``inplace=True``.
        calibration: unlabeled images: a tensor ``(N, C, H, W)`` preprocessed
            like the model's inputs, or an iterable / DataLoader yielding such
            batches or ``(images, labels)`` tuples (labels ignored).
        mlp_sparsity: fraction of MLP hidden channels removed in every block, in [0, 1).
        attn_sparsity: fraction of query/key dims removed in every head, in [0, 1).
        compensate: fold the closed-form compensation into the kept weights
            (False: plain structured pruning with the same selection).
        propagate: ``"dense"`` (paper: statistics from the unpruned model) or
            ``"pruned"`` (statistics from the outputs of the already-pruned blocks).
        ridge: MLP ridge damping relative to the mean diagonal of Σ_SS.
        attn_ridge: attention damping relative to mean(diag GQ_SS)·mean(diag GK_SS).
        batch_size: images per forward chunk (also the statistics chunk).
        max_images: use at most this many calibration images.
        device: where blocks run (default: the model's device). The returned
            model lives where the input model lives.
        dtype: dtype of the pruned model and of the calibration forward passes
            (default: the model's). Statistics and solves are fp64 regardless.
        backend: kernels for statistics and solves, one of :data:`corp.backends.BACKENDS`
            (``"auto"`` picks the fastest available for ``device``; ``"torch"`` is the reference).
        report_images: number of calibration images on which per-block output
            errors (with and without compensation) are measured; 0 skips them.
        progress: show a progress bar over blocks (tqdm).
        inplace: prune ``model`` itself instead of a copy.

    Returns:
        The pruned model (an ``nn.Module`` of the same class) with attributes
        ``corp_report`` (:class:`~corp.report.PruneReport`) and ``corp_config``
        (what :func:`corp.save_pretrained` writes).
    """
    start = time.perf_counter()
    _validate_args(mlp_sparsity, attn_sparsity, propagate, backend, ridge, attn_ridge, batch_size)
    check_supported(model)
    _check_widths(model, mlp_sparsity, attn_sparsity)
    param = next(model.parameters())
    home_device = param.device
    device = torch.device(device) if device is not None else home_device
    dtype = dtype or param.dtype
    stats_backend, solve_backend = resolve_backends(backend, device)

    try:
        architecture = describe_architecture(model)
    except (TypeError, ValueError) as exc:  # prunable but not describable: saving will say why
        architecture = {"error": str(exc)}
    params_before, flops_before = count_parameters(model), count_flops(model)
    widths_before = block_widths(model)

    work = model if inplace else copy.deepcopy(model)
    was_training = work.training
    work.eval()
    work.to(dtype=dtype)
    # Only the stem moves to the compute device now; each block moves there while it is pruned.
    for name, child in work.named_children():
        if name != "blocks":
            child.to(device)
    for p in work.parameters(recurse=False):  # cls/reg/dist tokens, position embedding
        p.data = p.data.to(device)
    states: list[torch.Tensor] = []
    images = 0
    for batch in iter_calibration_batches(calibration, batch_size, max_images):
        check_images(work, batch)
        states.append(embed(work, batch.to(device=device, dtype=dtype)))
        images += batch.shape[0]
    _check_finite(states, "the patch embedding output")
    tokens = sum(s.shape[0] * s.shape[1] for s in states)
    report_batches = _report_prefix(states, report_images)

    report = PruneReport(calibration_images=images, calibration_tokens=tokens)
    blocks = work.blocks
    iterator = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="corp: pruning blocks", unit="block")
    for i in iterator:
        block = blocks[i].to(device)
        states, record = _prune_block(
            block, i, states, report_batches, mlp_sparsity, attn_sparsity, compensate, propagate, ridge, attn_ridge,
            stats_backend, solve_backend,
        )
        blocks[i] = block.to(home_device)
        report.blocks.append(record)
    work.to(home_device)
    work.train(was_training)

    report.params_before, report.flops_before = params_before, flops_before
    report.params_after, report.flops_after = count_parameters(work), count_flops(work)
    report.settings = dict(
        mlp_sparsity=mlp_sparsity, attn_sparsity=attn_sparsity, compensate=compensate, propagate=propagate,
        ridge=ridge, attn_ridge=attn_ridge, backend=f"stats={stats_backend},solve={solve_backend}", dtype=str(dtype).replace("torch.", ""),
    )
    report.seconds = time.perf_counter() - start
    work.corp_report = report
    work.corp_config = {
        "corp_version": __version__,
        "architecture": architecture,
        "dense_blocks": widths_before,
        "blocks": block_widths(work),
        "pruning": dict(report.settings, calibration_images=images, calibration_tokens=tokens),
    }
    return work


def _report_prefix(states: list[torch.Tensor], report_images: int) -> int:
    """How many leading batches hold the first ``report_images`` images (whole batches)."""
    if report_images <= 0:
        return 0
    count = seen = 0
    for s in states:
        if seen >= report_images:
            break
        count, seen = count + 1, seen + s.shape[0]
    return count


def _prune_block(
    block: nn.Module,
    index: int,
    states: list[torch.Tensor],
    report_batches: int,
    mlp_sparsity: float,
    attn_sparsity: float,
    compensate: bool,
    propagate: str,
    ridge: float,
    attn_ridge: float,
    stats_backend: str,
    solve_backend: str,
) -> tuple[list[torch.Tensor], BlockReport]:
    """Prune one block in place; return the next block's input states and the block's record."""
    attn, mlp = block.attn, block.mlp
    device = attn.qkv.weight.device
    record = BlockReport(
        index=index,
        mlp_hidden_before=mlp.fc1.out_features,
        mlp_hidden_after=mlp.fc1.out_features,
        qk_dim_before=attn.head_dim,
        qk_dim_after=attn.head_dim,
    )
    prune_a, prune_m = attn_sparsity > 0, mlp_sparsity > 0
    attn_stats = AttentionStatistics(attn.num_heads, attn.head_dim, device, stats_backend) if prune_a else None
    mlp_stats = MLPStatistics(mlp.fc1.out_features, device, full=compensate, backend=stats_backend) if prune_m else None
    dense_fc = (mlp.fc1, mlp.fc2)
    dense_out: Optional[list[torch.Tensor]] = None

    if propagate == "dense":
        # One dense forward gives both statistics and the next block's (dense) input.
        with contextlib.ExitStack() as stack:
            if attn_stats is not None:
                stack.enter_context(_hook(attn.qkv, attn_stats.update, stop=False))
            if mlp_stats is not None:
                stack.enter_context(_hook(mlp.act, mlp_stats.update, stop=False))
            dense_out = [block(x) for x in states]
        _check_finite(dense_out, f"the output of block {index}")
    elif attn_stats is not None:
        with _hook(attn.qkv, attn_stats.update, stop=True):
            _run_until_hook(block, states)

    uncompensated_attn = uncompensated_fc = None
    if attn_stats is not None:
        if not attn_stats.all_finite():
            raise ValueError(f"non-finite query/key statistics in block {index}")
        result = prune_attention(attn, attn_stats, attn_sparsity, attn_ridge, compensate, solve_backend)
        block.attn = result.attn
        record.qk_dim_after = result.attn.qk_dim
        record.attn_damping, record.attn_relative_damping = result.damping, result.relative_damping
        if compensate and report_batches:
            uncompensated_attn = prune_attention(attn, attn_stats, attn_sparsity, attn_ridge, False).attn
        del attn_stats

    if mlp_stats is not None:
        if propagate == "pruned":
            # Statistics of the MLP input after the (already pruned) attention.
            with _hook(mlp.act, mlp_stats.update, stop=True):
                _run_until_hook(block, states)
        if not mlp_stats.all_finite():
            raise ValueError(f"non-finite MLP activations in block {index}")
        result_m = prune_mlp(mlp, mlp_stats, mlp_sparsity, ridge, compensate, solve_backend)
        if compensate and report_batches:
            uncompensated_fc = (result_m.fc1, prune_mlp(mlp, mlp_stats, mlp_sparsity, ridge, False).fc2)
        mlp.fc1, mlp.fc2 = result_m.fc1, result_m.fc2
        record.mlp_hidden_after = result_m.fc1.out_features
        record.mlp_damping, record.mlp_relative_damping = result_m.damping, result_m.relative_damping
        del mlp_stats

    pruned_out = [block(x) for x in states] if propagate == "pruned" else None
    if pruned_out is not None:
        _check_finite(pruned_out, f"the output of block {index}")

    if report_batches and (prune_a or prune_m):
        inputs = states[:report_batches]
        comp = pruned_out[:report_batches] if pruned_out is not None else [block(x) for x in inputs]
        with _swapped(block, attn=attn, fc=dense_fc):
            ref = dense_out[:report_batches] if dense_out is not None else [block(x) for x in inputs]
        record.error_compensated = _relative_error(comp, ref)
        if compensate:
            with _swapped(block, attn=uncompensated_attn, fc=uncompensated_fc):
                record.error_uncompensated = _relative_error([block(x) for x in inputs], ref)
        else:
            record.error_uncompensated = record.error_compensated

    next_states = dense_out if propagate == "dense" else pruned_out
    return next_states, record

