"""The block-wise calibration engine: ``corp.prune``.

Data flows one way: calibration batches → embedding → for each block:
statistics (forward hooks) → selection → closed-form solve → fold → the next
block's input. Memory holds the calibration hidden states and one block's
statistics, never all layers' statistics at once.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import asdict
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from . import __version__
from .backends import BACKENDS, resolve_backends
from .adapters import block_widths, check_images, check_supported, describe_architecture, embed, reshape_block
from .calibration import CalibrationInput, iter_calibration_batches
from .checkpoint import Checkpoint, fingerprint_tensor
from .distributed import DataParallel
from .lazy import LazyWeights
from .states import StateStore, choose_location
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


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor], dp: DataParallel) -> float:
    """``‖outputs − reference‖ / ‖reference‖`` over all batches of all ranks."""
    num = sum(float(torch.linalg.vector_norm((o - r).float())) ** 2 for o, r in zip(outputs, reference))
    den = sum(float(torch.linalg.vector_norm(r.float())) ** 2 for r in reference)
    num, den = dp.sum_float(num), dp.sum_float(den)
    return (num / max(den, 1e-300)) ** 0.5


def _is_finite(t: torch.Tensor) -> bool:
    # a sum is non-finite iff an element is (or the activations overflow, just as bad):
    # one reduction pass instead of isfinite's mask + all
    return bool(torch.isfinite(t.sum()))


def _check_finite(ok: bool, where: str, dp: DataParallel) -> None:
    """Raise on every rank if any rank saw non-finite values (a lone raise would hang the others)."""
    if dp.any(not ok):
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


def _copy_except_blocks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose blocks still share the original's tensors.

    Each block is deep-copied only when it is pruned (:func:`prune`), so peak
    memory is the input model plus the (smaller) pruned blocks, not two full models.
    """
    memo = {id(t): t for t in itertools.chain(model.blocks.parameters(), model.blocks.buffers())}
    return copy.deepcopy(model, memo)


def _weights_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the dense weights (≤ 4096 strided samples per tensor) for checkpoint checks."""
    parts = []
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        parts.append(f"{name}:{fingerprint_tensor(flat[:: max(1, flat.numel() // 4096)])}")
    return fingerprint_tensor(torch.frombuffer(bytearray("|".join(parts).encode()), dtype=torch.uint8))


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
    states: str = "auto",
    checkpoint_dir: Optional[str] = None,
    distributed: Optional[bool] = None,
    report_images: int = 16,
    progress: bool = False,
    callback: Optional[Callable[[int, BlockReport], None]] = None,
    weights: Optional[str] = None,
    inplace: bool = False,
) -> nn.Module:
    """Prune a timm VisionTransformer in one shot with CORP and return the smaller model.

    Args:
        model: a timm ``VisionTransformer`` (deit, deit3, vit families). Left
            untouched unless ``inplace=True``.
        calibration: unlabeled images: a tensor ``(N, C, H, W)`` preprocessed
            like the model's inputs, or an iterable / DataLoader yielding such
            batches or ``(images, labels)`` tuples (labels ignored). Under
            torch.distributed, each rank passes its own share.
        mlp_sparsity: fraction of MLP hidden channels removed in every block, in [0, 1).
        attn_sparsity: fraction of query/key dims removed in every head, in [0, 1).
        compensate: fold the closed-form compensation into the kept weights
            (False: plain structured pruning with the same selection).
        propagate: ``"dense"`` (paper: statistics from the unpruned model) or
            ``"pruned"`` (statistics from the outputs of the already-pruned blocks).
        ridge: MLP ridge damping relative to the mean diagonal of Σ_SS.
        attn_ridge: attention damping relative to mean(diag GQ_SS)·mean(diag GK_SS).
        batch_size: images per forward chunk (also the statistics chunk).
        max_images: use at most this many calibration images (per rank).
        device: where blocks run (default: the model's device). Only the block
            being pruned is there; the returned model lives where the input
            model lives.
        dtype: dtype of the pruned model and of the calibration forward passes
            (default: the model's). Statistics and solves are fp64 regardless.
        backend: kernels for statistics and solves, one of :data:`corp.backends.BACKENDS`
            (``"auto"`` picks the fastest available for ``device``; ``"torch"`` is the reference).
        states: where the calibration hidden states live between blocks:
            ``"device"``, ``"cpu"``, ``"disk"`` (memory-mapped files) or
            ``"auto"`` (the device while they fit, else CPU memory, else disk).
        checkpoint_dir: after each block, save what a restarted run needs here;
            a run started again with the same arguments continues from the first
            unfinished block and gives the same result. Mismatched arguments are
            refused (ValueError).
        distributed: sum the statistics over the ranks of the initialised
            torch.distributed process group (default: whenever one with more
            than one rank is initialised).
        report_images: number of calibration images (per rank) on which per-block
            output errors with and without compensation are measured; 0 skips them.
        progress: show a progress bar over blocks (tqdm).
        callback: called as ``callback(block_index, block_report)`` after each
            block is pruned (and checkpointed).
        weights: a safetensors file with the model's ``state_dict()`` tensors,
            for a ``model`` built on the meta device (:func:`corp.meta_model`):
            the stem is read first and each block only when it is pruned, so the
            dense model never sits in memory whole. The result lives on the CPU.
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
    dp = DataParallel(distributed)
    param = next(model.parameters())
    lazy = LazyWeights(weights) if weights is not None else None
    if lazy is None and param.device.type == "meta":
        raise ValueError("the model's weights are on the meta device: pass weights=<safetensors file> to read them")
    home_device = torch.device("cpu") if lazy is not None else param.device
    device = torch.device(device) if device is not None else home_device
    dtype = dtype or param.dtype
    stats_backend, solve_backend = resolve_backends(backend, device)
    choose_location(states, device, 0)  # validates the name before any work

    try:
        architecture = describe_architecture(model)
    except (TypeError, ValueError) as exc:  # prunable but not describable: saving will say why
        architecture = {"error": str(exc)}
    params_before, flops_before = count_parameters(model), count_flops(model)
    widths_before = block_widths(model)
    settings = dict(
        mlp_sparsity=mlp_sparsity, attn_sparsity=attn_sparsity, compensate=compensate, propagate=propagate,
        ridge=ridge, attn_ridge=attn_ridge, backend=f"stats={stats_backend},solve={solve_backend}",
        dtype=str(dtype).replace("torch.", ""),
    )

    batches = iter_calibration_batches(calibration, batch_size, max_images)
    first = next(batches)  # raises on empty calibration before anything is copied
    ckpt = None
    if checkpoint_dir is not None:
        fingerprint = dict(
            settings, batch_size=batch_size, max_images=max_images, report_images=report_images,
            world_size=dp.world_size, architecture=str(architecture), dense_blocks=widths_before,
            weights=lazy.fingerprint() if lazy is not None else _weights_fingerprint(model),
            first_batch=fingerprint_tensor(first),
        )
        ckpt = Checkpoint(checkpoint_dir, fingerprint, rank=dp.rank)
    saved = ckpt.load_progress() if ckpt is not None else None

    work = model if inplace else _copy_except_blocks(model)
    was_training = work.training
    work.eval()
    if lazy is not None:
        lazy.materialize_(work, skip="blocks.")
    # The stem moves to the compute device now; each block goes there only while it is pruned.
    for name, child in work.named_children():
        if name != "blocks":
            child.to(device=device, dtype=dtype)
    for p in work.parameters(recurse=False):  # cls/reg/dist tokens, position embedding
        p.data = p.data.to(device=device, dtype=dtype)

    report = PruneReport()
    blocks = work.blocks
    first_block = 0
    if saved is None:
        expected = _expected_images(calibration, first.shape[0], max_images)
        store = _embed_all(work, itertools.chain([first], batches), expected, device, dtype, states, checkpoint_dir, dp)
        images, tokens = dp.sum_int(store.images), dp.sum_int(store.tokens)
    else:
        first_block = saved["next_block"]
        for j in range(first_block):
            blocks[j] = _restore_block(blocks[j], ckpt.load_block(j), inplace)
        restored = ckpt.load_states(first_block)
        nbytes = sum(t.numel() * t.element_size() for t in restored)
        store = StateStore(choose_location(states, device, nbytes), device, checkpoint_dir)
        for t in restored:
            store.append(t)
        del restored
        report.blocks = [BlockReport(**b) for b in saved["report_blocks"]]
        images, tokens = saved["images"], saved["tokens"]
    report.calibration_images, report.calibration_tokens = images, tokens
    report_batches = _report_prefix(store, report_images)

    iterator = range(first_block, len(blocks))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="corp: pruning blocks", unit="block", initial=first_block, total=len(blocks))
    for i in iterator:
        block = blocks[i] if inplace else copy.deepcopy(blocks[i])
        if lazy is not None:
            lazy.materialize_(block, prefix=f"blocks.{i}.")
        block.to(device=device, dtype=dtype)
        store, record = _prune_block(
            block, i, store, report_batches, mlp_sparsity, attn_sparsity, compensate, propagate, ridge, attn_ridge,
            stats_backend, solve_backend, dp,
        )
        blocks[i] = block.to(home_device)
        report.blocks.append(record)
        if ckpt is not None:
            ckpt.save_states(store.raw(), i + 1)
            dp.barrier()  # every rank's states are on disk before progress moves on
            if dp.rank == 0:
                ckpt.save_block(i, block, block_widths_of(block))
                ckpt.save_progress(i + 1, [asdict(b) for b in report.blocks], {"images": images, "tokens": tokens})
            dp.barrier()
            ckpt.drop_states_before(i + 1)
        if callback is not None:
            callback(i, record)
    store.close()
    work.to(home_device)
    work.train(was_training)

    report.params_before, report.flops_before = params_before, flops_before
    report.params_after, report.flops_after = count_parameters(work), count_flops(work)
    report.settings = settings
    report.seconds = time.perf_counter() - start
    work.corp_report = report
    work.corp_config = {
        "corp_version": __version__,
        "architecture": architecture,
        "dense_blocks": widths_before,
        "blocks": block_widths(work),
        "pruning": dict(settings, calibration_images=images, calibration_tokens=tokens),
    }
    return work


def block_widths_of(block: nn.Module) -> dict[str, int]:
    attn = block.attn
    return {"mlp_hidden": block.mlp.fc1.out_features, "qk_dim": getattr(attn, "qk_dim", attn.head_dim)}


def _restore_block(block: nn.Module, saved: dict, inplace: bool) -> nn.Module:
    """``block`` reshaped to a checkpointed pruned block's widths and loaded with its weights (on the CPU)."""
    block = block if inplace else copy.deepcopy(block)
    if any(t.is_meta for t in block.state_dict().values()):
        block.to_empty(device="cpu")
    reshape_block(block, saved["widths"])
    block.load_state_dict(saved["state"])
    return block


def _expected_images(calibration, first_batch: int, max_images: Optional[int]) -> int:
    """How many calibration images to expect: exact for tensors and datasets, else estimated."""
    if torch.is_tensor(calibration):
        n = calibration.shape[0]
    elif hasattr(getattr(calibration, "dataset", None), "__len__"):
        n = len(calibration.dataset)
    elif hasattr(calibration, "__len__"):
        n = len(calibration) * first_batch  # a sequence of batches
    else:
        n = first_batch  # a generator: nothing better is known
    return min(n, max_images) if max_images is not None else n


def _embed_all(work, batches, expected_images: int, device, dtype, states: str, spill_dir: Optional[str],
               dp: DataParallel) -> StateStore:
    """Embed every calibration batch once into a :class:`StateStore` (its location sized from the first batch)."""
    store = None
    finite = True
    for batch in batches:
        check_images(work, batch)
        x = embed(work, batch.to(device=device, dtype=dtype))
        finite = finite and _is_finite(x)
        if store is None:
            nbytes = x[0].numel() * x.element_size() * expected_images
            store = StateStore(choose_location(states, device, nbytes), device, spill_dir)
        store.append(x)
    _check_finite(finite, "the patch embedding output", dp)
    return store


def _report_prefix(store: StateStore, report_images: int) -> int:
    """How many leading batches hold the first ``report_images`` images (whole batches)."""
    if report_images <= 0:
        return 0
    count = seen = 0
    for t in store.raw():
        if seen >= report_images:
            break
        count, seen = count + 1, seen + t.shape[0]
    return count


def _propagate(block: nn.Module, states: StateStore, out: StateStore, keep: int, index: int,
               dp: DataParallel) -> list[torch.Tensor]:
    """Run ``block`` over every batch of ``states`` into ``out``; return the first ``keep`` outputs."""
    finite, kept = True, []
    for j, x in enumerate(states):
        y = block(x)
        finite = finite and _is_finite(y)
        out.append(y)
        if j < keep:
            kept.append(y)
    _check_finite(finite, f"the output of block {index}", dp)
    return kept


def _prune_block(
    block: nn.Module,
    index: int,
    states: StateStore,
    report_batches: int,
    mlp_sparsity: float,
    attn_sparsity: float,
    compensate: bool,
    propagate: str,
    ridge: float,
    attn_ridge: float,
    stats_backend: str,
    solve_backend: str,
    dp: DataParallel,
) -> tuple[StateStore, BlockReport]:
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
    next_states = states.spawn()
    dense_ref: list[torch.Tensor] = []  # dense outputs of the report batches

    def reduce_stats(stats) -> None:
        if isinstance(stats, AttentionStatistics):
            dp.sum_([stats.gram_q, stats.gram_k, stats.score])
        else:
            dp.sum_([stats.colsum, stats.gram if stats.full else stats.sq_sum])
        stats.count = dp.sum_int(stats.count)
        if not stats.all_finite():
            raise ValueError(f"non-finite {'query/key' if isinstance(stats, AttentionStatistics) else 'MLP'} "
                             f"statistics in block {index}")

    if propagate == "dense":
        # One dense forward gives both statistics and the next block's (dense) input.
        with contextlib.ExitStack() as stack:
            if attn_stats is not None:
                stack.enter_context(_hook(attn.qkv, attn_stats.update, stop=False))
            if mlp_stats is not None:
                stack.enter_context(_hook(mlp.act, mlp_stats.update, stop=False))
            dense_ref = _propagate(block, states, next_states, report_batches, index, dp)
    elif attn_stats is not None:
        with _hook(attn.qkv, attn_stats.update, stop=True):
            _run_until_hook(block, states)

    uncompensated_attn = uncompensated_fc = None
    if attn_stats is not None:
        reduce_stats(attn_stats)
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
        reduce_stats(mlp_stats)
        result_m = prune_mlp(mlp, mlp_stats, mlp_sparsity, ridge, compensate, solve_backend)
        if compensate and report_batches:
            uncompensated_fc = (result_m.fc1, result_m.plain_fc2)
        mlp.fc1, mlp.fc2 = result_m.fc1, result_m.fc2
        record.mlp_hidden_after = result_m.fc1.out_features
        record.mlp_damping, record.mlp_relative_damping = result_m.damping, result_m.relative_damping
        del mlp_stats
    # Every rank holds rank 0's pruned block, bit for bit.
    dp.broadcast_module_(block)

    pruned_report: list[torch.Tensor] = []
    if propagate == "pruned":
        pruned_report = _propagate(block, states, next_states, report_batches, index, dp)

    if report_batches and (prune_a or prune_m):
        inputs = [states[j] for j in range(report_batches)]
        comp = pruned_report or [block(x) for x in inputs]
        if not dense_ref:
            with _swapped(block, attn=attn, fc=dense_fc):
                dense_ref = [block(x) for x in inputs]
        record.error_compensated = _relative_error(comp, dense_ref, dp)
        if compensate:
            with _swapped(block, attn=uncompensated_attn, fc=uncompensated_fc):
                record.error_uncompensated = _relative_error([block(x) for x in inputs], dense_ref, dp)
        else:
            record.error_uncompensated = record.error_compensated
    states.close()
    return next_states, record
