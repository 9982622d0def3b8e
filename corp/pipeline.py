"""``corp.prune``: the block loop.

Data flows one way: calibration batches → embedding → for each block and each
part (attention, then MLP): statistics → selection → fit → fold; then the
stream advances to the next block's input. Memory holds the calibration hidden
states and one block's statistics, never all layers' statistics at once. What
varies is in the strategy objects the config chooses: the stream
(:mod:`corp.streams`), the part pruners (:mod:`corp.parts`: selection, fit,
fold) and the model adapter (:mod:`corp.models`).
"""
from __future__ import annotations

import copy
import itertools
import time
import warnings
from dataclasses import asdict
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from . import __version__
from .budget import allocate_from_errors
from .calibration import CalibrationInput, batch_rows, is_token_batch, iter_calibration_batches
from .checkpoint import Checkpoint, fingerprint_tensor
from .config import DEFAULT_ATTN_RIDGE, DEFAULT_MLP_RIDGE, PruneConfig, Sparsity, kept_count
from .distributed import DataParallel
from .fit import FitContext
from .lazy import LazyWeights
from .models import adapter_for
from .ops import resolve
from .parts import PARTS, part_pruners
from .report import BlockReport, PruneReport, count_flops, count_parameters, measure_block_errors
from .streams import DenseStream, HiddenStates, PrunedStream, TwoStreams, check_finite, choose_location, swapped

__all__ = ["prune"]


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration: CalibrationInput,
    *,
    mlp_sparsity: Sparsity = 0.0,
    attn_sparsity: Sparsity = 0.0,
    compensate: bool = True,
    method: str = "corp",
    propagate: Optional[str] = None,
    target: Optional[str] = None,
    logit_fit: Optional[str] = None,
    selection: Optional[str] = None,
    logit_solve: Optional[str] = None,
    attn_output_fit: Optional[bool] = None,
    attn_output_fit_share: float = 1.0,
    mlp_token_weights: Union[str, bool, None] = None,
    budget: Optional[float] = None,
    budget_metric: str = "params",
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
        mlp_sparsity: fraction of MLP hidden channels removed, in [0, 1): one number
            for every block, or a sequence with one per block.
        attn_sparsity: fraction of query/key dims removed in every head, in [0, 1):
            one number, or one per block.
        compensate: fold the closed-form compensation into the kept weights
            (False: plain structured pruning with the same selection).
        method: ``"paper"`` (the paper's method exactly) or ``"corp"`` (this
            project's defaults, :data:`corp.config.METHODS`); the options below override it.
        propagate: ``"dense"`` (paper: statistics from the unpruned model) or
            ``"pruned"`` (statistics from the outputs of the already-pruned blocks).
        target: ``"local"`` (paper: each block's pruned output fitted to the dense
            block on the same input) or ``"dense"`` (error-correcting, needs
            ``propagate="pruned"``: the pruned block on the pruned stream is fitted
            to the dense block's output on the dense stream, so it also undoes the
            error of earlier blocks; a second stream of hidden states is kept).
        logit_fit: attention fit: ``"pooled"`` (paper: all token pairs),
            ``"centred"`` (keys centred per image, what softmax sees; one pass) or
            ``"per_image"`` (exact within-image objective; a second pass over the
            qkv projection), see :mod:`corp.fit`.
        selection: ``"energy"`` (paper: E[h²]·weight norms; Σq²k²), ``"residual"`` (what the
            compensation cannot recover, :mod:`corp.select`; q/k by the damped Sylvester residual) or
            ``"residual_factored"`` (q/k by the factorised residual: no eigensolve, on the device).
        logit_solve: how the pooled/centred logit fit is solved: ``"sylvester"`` (the exact damped
            equation, eigen form) or ``"factored"`` (two damped ridge regressions, q and k sides,
            one batched Cholesky solve; :class:`corp.fit.FactoredLogitFit`) or ``"lowrank"`` (no dim
            selection: each head's q/k mapped to the best rank-s logit form by a truncated SVD,
            :class:`corp.fit.LowRankLogitFit`).
        attn_output_fit: after pruning a block's q/k dims, refit its attention output projection
            so that the pruned attention reproduces the dense attention's output on the same
            inputs (:class:`corp.fit.AttentionOutputFit`; one more pass through the dense and the
            pruned attention per block). None: the method's preset (corp: on; paper: off).
        attn_output_fit_share: the fraction of the calibration batches whose dense and pruned
            attention outputs the output fit's statistics take, spread evenly from the first (``0.5``:
            batches 0, 2, 4, ...); the other batches still run the pruned attention for the stream.
            Less than 1 saves the dense attention and the output statistics of the batches left out
            (README, *A third machine*: at 0.5 MiniLM's 50/50 cosine is 0.9535 against 0.9539, the
            digits models move by a few test images at 90%). Default 1: every batch.
        mlp_token_weights: ``"on"``: weight each token's MLP statistics (covariance and mean) by
            ``1/σ_t²``, ``σ_t²`` the variance over channels of the sum the MLP's output is added
            into (the block output, or a post-norm block's output LayerNorm input;
            ``MlpPart.joins``): the next normalisation divides that token's error by ``σ_t``, so the
            fit and the selection then minimise the error as the normalised stream sees it. Costs
            the dense MLP's output projection once more per block in the statistics pass. ``"auto"``:
            on only in post-norm blocks (``joins`` set, e.g. BERT), where that normalisation comes
            at once, and off with ``target="dense"``; ``"off"``. True/False mean ``"on"``/``"off"``.
            None: the method's preset (corp: ``"auto"``; paper: ``"off"``). ``"on"`` is refused with
            ``target="dense"``; the budget's error curves stay unweighted.
        budget: remove this fraction of the model's parameters (or FLOPs, see
            ``budget_metric``) with per-block sparsities allocated by each block's
            measured compensated error (:mod:`corp.budget`); a first pass
            measures the errors. ``mlp_sparsity``/``attn_sparsity`` must then be left at 0.
        budget_metric: ``"params"`` or ``"flops"``.
        ridge: MLP ridge damping relative to the mean diagonal of Σ_SS.
        attn_ridge: attention damping relative to mean(diag GQ_SS)·mean(diag GK_SS).
        batch_size: images per forward chunk (also the statistics chunk).
        max_images: use at most this many calibration images (per rank).
        device: where blocks run (default: the model's device). Only the block
            being pruned is there; the returned model lives where the input
            model lives.
        dtype: dtype of the pruned model and of the calibration forward passes
            (default: the model's). Statistics and solves are fp64 regardless.
        backend: kernels for statistics and solves, one of :data:`corp.ops.BACKENDS`
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
    config = PruneConfig.create(
        method=method, propagate=propagate, target=target, logit_fit=logit_fit, selection=selection,
        logit_solve=logit_solve, attn_output_fit=attn_output_fit, attn_output_fit_share=attn_output_fit_share,
        mlp_token_weights=mlp_token_weights, mlp_sparsity=mlp_sparsity, attn_sparsity=attn_sparsity, compensate=compensate,
        budget=budget, budget_metric=budget_metric, ridge=ridge, attn_ridge=attn_ridge, batch_size=batch_size,
        max_images=max_images, backend=backend, states=states, report_images=report_images,
    )
    if config.error_correcting and checkpoint_dir is not None:
        raise ValueError("checkpoint_dir is not supported with target='dense' (two streams of states)")
    run = _Run(model, calibration, config, device, dtype, checkpoint_dir, distributed, weights, inplace, start)
    pruners = part_pruners(config, run.kernels)
    stream, dp, adapter = run.stream, run.dp, run.adapter
    for i in run.block_indices(progress):
        block = run.load_block(i)
        dense = {"attn": adapter.attention(block).module, "mlp": adapter.mlp(block).module}
        todo = {name: pruners[name] for name in PARTS if run.sparsity[name][i] > 0}
        record = BlockReport.for_block(i, adapter.widths(block))
        tick = time.perf_counter()
        stats = {name: p.statistics(adapter, block) for name, p in todo.items()}
        stream.begin(block, i, stats, dense)  # the dense stream fills every part's statistics here
        record.seconds_statistics += time.perf_counter() - tick
        kept = {}
        for name, pruner in todo.items():  # attention, then the MLP on the pruned attention's output
            tick = time.perf_counter()
            stream.fill(block, name, stats[name])  # the pruned streams fill each part's statistics here
            stats[name].reduce_(dp)
            stats[name].check_finite(i)
            run.warn_if_rank_deficient(i, stats[name])
            record.seconds_statistics += time.perf_counter() - tick
            ctx = FitContext(run.kernels, dp, qkv_batches=lambda: stream.qkv_batches(block),
                             attention_outputs=lambda dense_attn, pruned_attn, maps=None: stream.attention_outputs(
                                 block, dense_attn, pruned_attn, maps, config.attn_output_fit_share),
                             block_index=i)
            result = pruner.prune(adapter, block, stats.pop(name), run.sparsity[name][i], ctx)
            adapter.set_part(block, name, result.module)
            record.add_part(name, result)
            kept[name] = result.kept
        dp.broadcast_module_(block)  # every rank holds rank 0's pruned block, bit for bit
        inputs = stream.report_inputs() if kept else []
        outputs = stream.advance(block, report=bool(inputs), mlp_kept=kept.get("mlp"))
        if inputs:
            plain = {}
            if config.compensate:
                with swapped(adapter, block, dense):
                    plain = {name: pruners[name].uncompensated(adapter, block, kept[name]) for name in kept}
            record.error_compensated, record.error_uncompensated = measure_block_errors(
                adapter, block, inputs, outputs, stream.dense_outputs, dense, plain, dp, stream.report_masks())
        run.finish_block(i, block, record, callback)
    return run.finish()


class _Run:
    """Everything around the block loop: validation, the working copy, lazy weights, devices,
    embedding, resuming, budgets, checkpoints and the final report."""

    def __init__(self, model, calibration, config: PruneConfig, device, dtype, checkpoint_dir, distributed,
                 weights, inplace, start: float):
        self.config, self.inplace, self.start = config, inplace, start
        self.adapter = adapter = adapter_for(model)
        adapter.check_supported(model)
        blocks = adapter.blocks(model)
        depth = len(blocks)
        self.sparsity = {"mlp": config.per_block("mlp", depth), "attn": config.per_block("attn", depth)}
        _check_widths(adapter, blocks, self.sparsity)
        self.dp = dp = DataParallel(distributed)
        param = next(model.parameters())
        self.lazy = LazyWeights(weights) if weights is not None else None
        if self.lazy is None and param.device.type == "meta":
            raise ValueError("the model's weights are on the meta device: pass weights=<safetensors file> to read them")
        self.home = torch.device("cpu") if self.lazy is not None else param.device
        self.device = torch.device(device) if device is not None else self.home
        self.dtype = dtype or param.dtype
        self.kernels = resolve(config.backend, self.device)
        try:
            self.architecture = adapter.describe(model)
        except (TypeError, ValueError) as exc:  # prunable but not describable: saving will say why
            self.architecture = {"error": str(exc)}
        self.params_before, self.flops_before = count_parameters(model), count_flops(model)
        self.widths_before = adapter.block_widths(model)
        self.settings = config.settings(self.kernels, self.dtype)
        self.model = model

        batches = iter_calibration_batches(calibration, config.batch_size, config.max_images)
        first = next(batches)  # raises on empty calibration before anything is copied
        self.ckpt = saved = None
        if checkpoint_dir is not None:
            fingerprint = dict(
                config.fingerprint(self.kernels, self.dtype), world_size=dp.world_size,
                architecture=str(self.architecture), dense_blocks=self.widths_before,
                weights=self.lazy.fingerprint() if self.lazy is not None else _weights_fingerprint(model),
                first_batch=fingerprint_tensor(first["input_ids"] if is_token_batch(first) else first),
            )
            self.ckpt = Checkpoint(checkpoint_dir, fingerprint, rank=dp.rank)
            saved = self.ckpt.load_progress()

        self.work = work = model if inplace else _copy_except_blocks(model, blocks)
        self.was_training = work.training
        work.eval()
        if self.lazy is not None:
            self.lazy.materialize_(work, skip="blocks.")
        adapter.stem_to_(work, self.device, self.dtype)  # each block goes there only while it is pruned
        self.blocks = adapter.blocks(work)
        self.report = PruneReport()
        self.first_block = 0
        self.masks: Optional[list] = None  # per batch the (B, T) bool mask of real tokens (text), else None
        if saved is None:
            expected = _expected_images(calibration, batch_rows(first), config.max_images)
            states = self._embed_all(itertools.chain([first], batches), expected, checkpoint_dir)
            tokens = states.tokens if self.masks is None else sum(int(m.sum()) for m in self.masks)
            self.images, self.tokens = dp.sum_int(states.images), dp.sum_int(tokens)
        else:
            self.masks = self._token_masks(itertools.chain([first], batches))
            self.first_block = saved["next_block"]
            for j in range(self.first_block):
                self.blocks[j] = self._restore_block(self.blocks[j], self.ckpt.load_block(j))
            restored = self.ckpt.load_states(self.first_block)
            nbytes = sum(t.numel() * t.element_size() for t in restored)
            states = HiddenStates(choose_location(config.states, self.device, nbytes), self.device, checkpoint_dir)
            for t in restored:
                states.append(t)
            del restored
            self.report.blocks = [BlockReport(**b) for b in saved["report_blocks"]]
            self.images, self.tokens = saved["images"], saved["tokens"]
        self.report.calibration_images, self.report.calibration_tokens = self.images, self.tokens
        report_batches = _report_prefix(states, config.report_images)
        if config.budget is not None:
            if saved is None:
                mlp, attn = allocate_from_errors(self, states, max(report_batches, 1))
            else:  # a resumed run continues with the allocation it checkpointed
                mlp, attn = saved["allocation"]
            self.sparsity = {"mlp": mlp, "attn": attn}
            self.report.allocation = {"mlp_sparsity": mlp, "attn_sparsity": attn}
            self.settings["allocated_mlp_sparsity"], self.settings["allocated_attn_sparsity"] = mlp, attn
        if config.error_correcting:
            dense_states = states.spawn()
            for t in states.raw():
                dense_states.append(t)
            self.stream = TwoStreams(states, dense_states, adapter, dp, report_batches, config.report_images,
                                     masks=self.masks)
        elif config.propagate == "pruned":
            self.stream = PrunedStream(states, adapter, dp, report_batches, report_images=config.report_images,
                                       masks=self.masks, token_weights=config.weighs_mlp_tokens,
                                       keep_qkv=config.compensate and config.attn_output_fit)
        else:
            self.stream = DenseStream(states, adapter, dp, report_batches, report_images=config.report_images,
                                      masks=self.masks, token_weights=config.weighs_mlp_tokens)

    def _token_masks(self, batches) -> Optional[list]:
        """The token masks of every batch (None when no batch has padding information)."""
        masks = []
        for batch in batches:
            self.adapter.check_inputs(self.work, batch)
            batch = self.adapter.prepare_batch(batch, self.device, self.dtype)
            masks.append(self.adapter.token_mask(self.work, batch))
        return masks if any(m is not None for m in masks) else None

    def _embed_all(self, batches, expected_images: int, spill_dir: Optional[str]) -> HiddenStates:
        """Embed every calibration batch once (the states' location sized from the first batch);
        the token masks of text batches go to ``self.masks``."""
        store, finite, masks = None, True, []
        for batch in batches:
            self.adapter.check_inputs(self.work, batch)
            batch = self.adapter.prepare_batch(batch, self.device, self.dtype)
            x = self.adapter.embed(self.work, batch)
            masks.append(self.adapter.token_mask(self.work, batch))
            finite = finite and bool(torch.isfinite(x.sum()))
            if store is None:
                nbytes = x[0].numel() * x.element_size() * expected_images
                store = HiddenStates(choose_location(self.config.states, self.device, nbytes), self.device, spill_dir)
            store.append(x)
        check_finite(finite, "the embedding output", self.dp)
        self.masks = masks if any(m is not None for m in masks) else None
        return store

    def warn_if_rank_deficient(self, index: int, stats) -> None:
        """Warn once per run when a block's statistics have fewer tokens than channels."""
        if stats.count >= stats.channels or self.warned_rank_deficient:
            return
        self.warned_rank_deficient = True
        warnings.warn(
            f"block {index}: {stats.count} calibration tokens for {stats.channels} {stats.kind} channels: the "
            "covariance is singular, so compensation relies on its damping and residual selection has exact ties; "
            "use more calibration images", stacklevel=4)  # the caller of corp.prune (through no_grad)

    warned_rank_deficient = False

    def block_indices(self, progress: bool):
        indices = range(self.first_block, len(self.blocks))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="corp: pruning blocks", unit="block", initial=self.first_block,
                           total=len(self.blocks))
        return indices

    def load_block(self, i: int, copy_always: bool = False) -> nn.Module:
        """Block ``i`` on the compute device (a copy unless pruning in place), its lazy weights read."""
        block = self.blocks[i] if self.inplace and not copy_always else copy.deepcopy(self.blocks[i])
        if self.lazy is not None:
            self.lazy.materialize_(block, prefix=f"blocks.{i}.")
        return block.to(device=self.device, dtype=self.dtype)

    def _restore_block(self, block: nn.Module, saved: dict) -> nn.Module:
        """``block`` reshaped to a checkpointed pruned block's widths and loaded with its weights (CPU)."""
        block = block if self.inplace else copy.deepcopy(block)
        if any(t.is_meta for t in block.state_dict().values()):
            block.to_empty(device="cpu")
        self.adapter.reshape_block(block, saved["widths"])
        block.load_state_dict(saved["state"])
        return block

    def finish_block(self, i: int, block: nn.Module, record: BlockReport, callback) -> None:
        self.blocks[i] = block.to(self.home)
        self.report.blocks.append(record)
        ckpt, dp = self.ckpt, self.dp
        if ckpt is not None:
            ckpt.save_states(self.stream.raw(), i + 1)
            dp.barrier()  # every rank's states are on disk before progress moves on
            if dp.rank == 0:
                ckpt.save_block(i, block, self.adapter.widths(block))
                extra = {"images": self.images, "tokens": self.tokens}
                if self.config.budget is not None:
                    extra["allocation"] = [self.sparsity["mlp"], self.sparsity["attn"]]
                ckpt.save_progress(i + 1, [asdict(b) for b in self.report.blocks], extra)
            dp.barrier()
            ckpt.drop_states_before(i + 1)
        if callback is not None:
            callback(i, record)

    def finish(self) -> nn.Module:
        self.stream.close()
        work, report = self.work, self.report
        work.to(self.home)
        work.train(self.was_training)
        report.params_before, report.flops_before = self.params_before, self.flops_before
        report.params_after, report.flops_after = count_parameters(work), count_flops(work)
        report.settings = self.settings
        report.seconds = time.perf_counter() - self.start
        work.corp_report = report
        work.corp_config = {
            "corp_version": __version__,
            "family": self.adapter.name,
            "architecture": self.architecture,
            "dense_blocks": self.widths_before,
            "blocks": self.adapter.block_widths(work),
            "pruning": dict(self.settings, calibration_images=self.images, calibration_tokens=self.tokens),
        }
        return work


def _check_widths(adapter, blocks, sparsity: dict[str, list[float]]) -> None:
    for i, block in enumerate(blocks):
        attention = adapter.attention(block)
        hidden, head_dim = adapter.mlp(block).hidden, attention.head_dim
        if sparsity["attn"][i] > 0 and attention.refusal is not None:
            raise ValueError(f"attn_sparsity={sparsity['attn'][i]} in block {i}: {attention.refusal} "
                             "(prune only its MLP: attn_sparsity=0)")
        if kept_count(hidden, sparsity["mlp"][i]) < 1:
            raise ValueError(f"mlp_sparsity={sparsity['mlp'][i]} leaves no MLP channel of {hidden} in block {i}")
        if kept_count(head_dim, sparsity["attn"][i]) < 1:
            raise ValueError(f"attn_sparsity={sparsity['attn'][i]} leaves no query/key dim of {head_dim} in block {i}")


def _copy_except_blocks(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """A copy of ``model`` whose blocks still share the original's tensors.

    Each block is deep-copied only when it is pruned, so peak memory is the input
    model plus the (smaller) pruned blocks, not two full models.
    """
    memo = {id(t): t for t in itertools.chain(blocks.parameters(), blocks.buffers())}
    return copy.deepcopy(model, memo)


def _weights_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the dense weights (≤ 4096 strided samples per tensor) for checkpoint checks."""
    parts = []
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        parts.append(f"{name}:{fingerprint_tensor(flat[:: max(1, flat.numel() // 4096)])}")
    return fingerprint_tensor(torch.frombuffer(bytearray("|".join(parts).encode()), dtype=torch.uint8))


def _expected_images(calibration, first_batch: int, max_images: Optional[int]) -> int:
    """How many calibration images to expect: exact for tensors and datasets, else estimated."""
    if torch.is_tensor(calibration) or is_token_batch(calibration):
        n = batch_rows(calibration)
    elif hasattr(getattr(calibration, "dataset", None), "__len__"):
        n = len(calibration.dataset)
    elif hasattr(calibration, "__len__"):
        n = len(calibration) * first_batch  # a sequence of batches
    else:
        n = first_batch  # a generator: nothing better is known
    return min(n, max_images) if max_images is not None else n


def _report_prefix(states: HiddenStates, report_images: int) -> int:
    """How many leading batches hold the first ``report_images`` images (whole batches)."""
    if report_images <= 0:
        return 0
    count = seen = 0
    for t in states.raw():
        if seen >= report_images:
            break
        count, seen = count + 1, seen + t.shape[0]
    return count
