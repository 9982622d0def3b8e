"""Streams of calibration hidden states: which activations feed each block's statistics.

* :class:`HiddenStates`: one list of hidden-state batches ``(B, T, D)``, kept on
  the compute device, in CPU memory or in memory-mapped files
  (:func:`choose_location`).
* The stream strategies, one per schedule, behind one interface
  (:class:`Stream`): :meth:`~Stream.begin` and :meth:`~Stream.fill` fill a
  block's statistics, :meth:`~Stream.advance` moves the stream past the block.

  - :class:`DenseStream` (``propagate="dense"``, the paper): statistics of every
    part from the dense block's one forward, which is also the next block's input.
  - :class:`PrunedStream` (``propagate="pruned"``): each part's statistics from the
    outputs of the already-pruned blocks, collected by a partial forward after the
    earlier parts of the block were pruned (attention first, then the MLP).
  - :class:`TwoStreams` (``target="dense"``): the pruned stream plus the dense
    model's own stream, whose activations are the fits' targets.

Token masks: for padded text batches a stream holds one ``(B, T)`` bool mask per batch
(``masks``; they are the same at every block). Every block runs through
``adapter.run_block(block, x, mask)`` / ``adapter.halves(block, mask)`` (padding masked as
keys) and every statistics update gets the batch's mask, so padded tokens never enter a
statistic; without masks (images) nothing changes.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .fold import query_map
from .modules import HeadsReplay, HiddenReplay, ReplaysFromHeads

__all__ = ["HiddenStates", "choose_location", "LOCATIONS", "Stream", "DenseStream", "PrunedStream", "TwoStreams",
           "capture", "swapped"]

LOCATIONS = ("auto", "device", "cpu", "disk")

# "auto" keeps the states on a CUDA device while they take at most this fraction of
# its free memory (the rest is for one block, its statistics and activations), and in
# CPU memory while they take at most this fraction of the available RAM.
DEVICE_FRACTION = 0.4
RAM_FRACTION = 0.5


def _available_ram() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_location(requested: str, device: torch.device, nbytes: int) -> str:
    """Resolve ``"auto"`` for hidden states of ``nbytes`` bytes computed on ``device``."""
    if requested not in LOCATIONS:
        raise ValueError(f"states must be one of {LOCATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= DEVICE_FRACTION * free:
            return "device"
    ram = _available_ram()
    if ram is None or nbytes <= RAM_FRACTION * ram:
        return "device" if device.type == "cpu" else "cpu"
    return "disk"


class HiddenStates:
    """An ordered list of hidden-state batches ``(B, T, D)`` kept on the device, in CPU memory, or
    in memory-mapped files under ``directory`` (one file per batch, removed by :meth:`close`)."""

    def __init__(self, location: str, device: torch.device, directory: Optional[str] = None):
        if location not in ("device", "cpu", "disk"):
            raise ValueError(f"unknown state location {location!r}")
        self.location, self.device = location, device
        self._items: list[torch.Tensor] = []
        self._dir: Optional[str] = None
        if location == "disk":
            os.makedirs(directory or tempfile.gettempdir(), exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="corp-states-", dir=directory)

    def spawn(self) -> "HiddenStates":
        """An empty store in the same place (same location, device and spill directory)."""
        parent = os.path.dirname(self._dir) if self._dir is not None else None
        return HiddenStates(self.location, self.device, parent)

    def append(self, x: torch.Tensor) -> None:
        if self.location == "device":
            self._items.append(x.to(self.device))
        elif self.location == "cpu":
            self._items.append(x.to("cpu"))
        else:
            path = os.path.join(self._dir, f"{len(self._items):06d}.bin")
            nbytes = x.numel() * x.element_size()
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
            mapped = torch.empty(0, dtype=x.dtype).set_(storage).view(x.shape)
            mapped.copy_(x)
            self._items.append(mapped)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Batch ``i`` on the compute device."""
        return self._items[i].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def raw(self) -> list[torch.Tensor]:
        """The stored tensors as they are (for checkpointing)."""
        return list(self._items)

    @property
    def images(self) -> int:
        return sum(t.shape[0] for t in self._items)

    @property
    def tokens(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self._items)

    def close(self) -> None:
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):  # pragma: no cover - best effort for the disk files
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- hooks


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


def capture(block, site: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``site`` inside ``block(x)`` (the rest of the block is skipped); ``block``: a
    module or any callable that runs ``site``."""
    out: list[torch.Tensor] = []
    with _hook(site, out.append, stop=True):
        try:
            block(x)
        except _StopForward:
            pass
    return out[0]


def capture_input(block, site: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``site`` inside ``block(x)`` (``site`` and the rest of the block are skipped)."""
    out: list[torch.Tensor] = []

    def hook(_mod, args):
        out.append(args[0])
        raise _StopForward

    handle = site.register_forward_pre_hook(hook)
    try:
        block(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return out[0]


@contextlib.contextmanager
def swapped(adapter, block: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily run ``block`` with other part modules (``{"attn": ..., "mlp": ...}``)."""
    old = {name: (adapter.attention(block) if name == "attn" else adapter.mlp(block)).module for name in modules}
    for name, module in modules.items():
        adapter.set_part(block, name, module)
    try:
        yield block
    finally:
        for name, module in old.items():
            adapter.set_part(block, name, module)


def _kept_channels(h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``h[..., kept]`` for activations ``h`` ``(..., D)`` and indices ``kept`` ``(k,)``: a row-wise
    ``index_select`` on the 2-D view, 3x faster than advanced indexing on the last dim on the CPU
    (5 ms vs 15 ms for a 32 x 197 x 1536 batch keeping 768, 2-core CPU; 0.24 s of a deit_small prune)."""
    return h.reshape(-1, h.shape[-1]).index_select(1, kept).view(*h.shape[:-1], kept.numel())


def _close(store: Optional[HiddenStates]) -> None:
    """Close ``store`` (if any); returns None, for ``self.cache = _close(self.cache)``."""
    if store is not None:
        store.close()


def _finite(t: torch.Tensor) -> bool:
    # a sum is non-finite iff an element is (or the activations overflow, just as bad):
    # one reduction pass instead of isfinite's mask + all
    return bool(torch.isfinite(t.sum()))


def in_share(j: int, share: float) -> bool:
    """Whether batch ``j`` is among a ``share`` (in (0, 1]) of the batches spread evenly from the first:
    batch 0, then each batch where ``⌊j·share⌋`` steps up (0.5: batches 0, 2, 4, ...; 1: every batch),
    ``⌊(n − 1)·share⌋ + 1`` of ``n`` batches."""
    if j == 0 or share >= 1.0:
        return True
    # the slack keeps a product that should be whole on its step when it rounds just below (100 × 0.29 = 28.999999999999996)
    return math.floor(j * share + 1e-9) != math.floor((j - 1) * share + 1e-9)


def check_finite(ok: bool, where: str, dp) -> None:
    """Raise on every rank if any rank saw non-finite values (a lone raise would hang the others)."""
    if dp.any(not ok):
        raise ValueError(f"non-finite activations (NaN or Inf) at {where}")


def token_weights(z: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` weights ``1/σ_t²`` of each token of ``z`` ``(..., T, C)``: the inverse of its variance over
    channels (fp32 at least; a token with zero variance gets the largest finite weight)."""
    z = z.detach()
    var = z.to(torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype).var(-1, unbiased=False)
    tiny = torch.finfo(var.dtype).tiny
    return var.clamp_min(tiny).reciprocal().clamp_max(1.0 / tiny)


def hidden_and_joined_sum(second, site: nn.Module, joins: Optional[nn.Module], y: torch.Tensor):
    """Run ``second(y)`` (a block's MLP half) whole; return the output of ``site`` (the MLP's hidden
    activation) and the sum the MLP's output joins: the input of ``joins`` (post-norm blocks) or, with
    ``joins`` None, the half's output (:attr:`corp.models.base.MlpPart.joins`)."""
    hidden: list[torch.Tensor] = []
    joined: list[torch.Tensor] = []
    handle = None if joins is None else joins.register_forward_pre_hook(lambda _m, args: joined.append(args[0]))
    try:
        with _hook(site, hidden.append, stop=False):
            out = second(y)
    finally:
        if handle is not None:
            handle.remove()
    return hidden[0], (out if joins is None else joined[0])


def halves(adapter, block: nn.Module, mask: Optional[torch.Tensor]):
    """``adapter.halves`` for one batch (adapters without token masks take no ``mask`` argument)."""
    return adapter.halves(block) if mask is None else adapter.halves(block, mask)


def propagate(run, states: HiddenStates, out: HiddenStates, keep: int, where: str, dp) -> list[torch.Tensor]:
    """``run(j, x)`` over every batch ``x`` (index ``j``) of ``states`` into ``out``; return the first
    ``keep`` outputs."""
    finite, kept = True, []
    for j, x in enumerate(states):
        y = run(j, x)
        finite = finite and _finite(y)
        out.append(y)
        if j < keep:
            kept.append(y)
    check_finite(finite, where, dp)
    return kept


# --------------------------------------------------------------------------- streams


class Stream:
    """One schedule of hidden states through the blocks.

    Per block the pipeline calls :meth:`begin` with every part's (empty)
    statistics, then for each part in order :meth:`fill` (before pruning that
    part), then :meth:`advance`. ``adapter`` maps part names to the block's
    modules; the first ``report_images`` images (in the ``report_batches`` leading batches; all
    of those batches when None) are the report's images.
    """

    def __init__(self, states: HiddenStates, adapter, dp, report_batches: int, owns_states: bool = True,
                 report_images: Optional[int] = None, masks: Optional[list[Optional[torch.Tensor]]] = None,
                 token_weights: Callable[[Optional[nn.Module]], bool] = lambda joins: False,
                 keep_qkv: bool = False):
        self.states, self.adapter, self.dp, self.report_batches = states, adapter, dp, report_batches
        # keep the attention statistics pass's qkv projections for the attention output fit's pass
        # (streams that compute them in a pass of their own: PrunedStream)
        self.keep_qkv = keep_qkv
        self.qkv_cache: Optional[HiddenStates] = None
        # whether a block's MLP statistics get 1/σ_t² weights, from its MlpPart.joins (PruneConfig.weighs_mlp_tokens)
        self.weighs_mlp_tokens = token_weights
        self.report_images = report_images
        self.owns_states = owns_states  # False: the first states are the caller's and stay open
        self.masks = masks  # one (B, T) bool token mask per batch, or None: every token is real
        self.dense_outputs: list[torch.Tensor] = []  # dense block outputs of the report batches, when known

    def mask(self, j: int) -> Optional[torch.Tensor]:
        """Batch ``j``'s token mask ``(B, T)`` (None: no padding)."""
        return None if self.masks is None else self.masks[j]

    def run(self, block: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
        """``block`` on batch ``j``'s hidden states ``x``, its padding masked."""
        return self.adapter.run_block(block, x, self.mask(j))

    def report_masks(self) -> Optional[list[Optional[torch.Tensor]]]:
        """The token masks of :meth:`report_inputs`, sliced like them (None: no padding)."""
        return None if self.masks is None else self._report_slice([self.mask(j) for j in range(self.report_batches)])

    def begin(self, block: nn.Module, index: int, stats: dict, dense: dict[str, nn.Module]) -> None:
        """Start ``block`` (``dense``: its unpruned part modules)."""
        self.index, self.dense, self.dense_outputs = index, dense, []
        self._drop_qkv()

    def fill(self, block: nn.Module, name: str, stats) -> None:
        """Fill part ``name``'s statistics (the block's earlier parts are pruned by now)."""

    def qkv_batches(self, block: nn.Module):
        """The attention's qkv projection over the stream's inputs to ``block`` (second passes), one
        image per row: a padded batch is given sequence by sequence, each with its real tokens only."""
        part = self.adapter.attention(block)
        for j, x in enumerate(self.states):
            qkv, mask = part.qkv(x), self.mask(j)
            if mask is None:
                yield qkv
            else:
                for row in range(qkv.shape[0]):
                    yield qkv[row][mask[row]][None]

    def attention_outputs(self, block: nn.Module, dense: nn.Module, pruned: nn.Module,
                          maps=None, share: float = 1.0) -> Iterator[tuple]:
        """Per batch of the stream's inputs to ``block``: the heads' concatenated outputs (the output
        projection's input) of the ``dense`` and of the ``pruned`` attention module, ``(o, z)``,
        each ``(B, T, H·d_v)`` (a second pass for :class:`corp.fit.AttentionOutputFit`); with token
        masks, the real tokens only, ``(N, H·d_v)``.

        ``maps``: the :class:`~corp.fit.QKProjection` of :func:`corp.fold.qk_maps` that turned the
        dense module's q/k projection into the pruned one's. With it, and where the dense module's
        :attr:`~corp.models.base.AttentionPart.attend` exists (no token masks), both outputs come
        from one dense qkv projection per batch (the statistics pass's, when it was kept): the
        pruned heads are the dense attention's with queries ``q @ Mq`` (:func:`corp.fold.query_map`),
        equal to the pruned module's to rounding. Without it each module runs whole.

        ``share``: only the batches :func:`in_share` picks are yielded; the others compute only what
        the stream keeps from this pass (the pruned heads, and the dense heads of report batches)."""
        a = self.adapter
        with swapped(a, block, {"attn": dense}):
            part = a.attention(block)
        if maps is not None and self.masks is None and part.attend is not None:
            mq = query_map(maps)
            cached = self.qkv_cache is not None and len(self.qkv_cache) == len(self.states)
            for j, x in enumerate(self.states):
                qkv = self.qkv_cache[j] if cached else part.qkv(x)
                fitted = in_share(j, share)
                z = part.attend(qkv, mq)
                self._record_heads(j, pruned, z)
                if fitted or j < self.report_batches:
                    o = part.attend(qkv)
                    self._record_dense_heads(j, dense, o)
                if fitted:
                    yield o, z
            self._drop_qkv()  # read once: the MLP's passes do not need it
            return
        for j, x in enumerate(self.states):
            fitted = in_share(j, share)
            if not (fitted or self._keeps_heads(pruned)):
                continue
            pair, mask = [], self.mask(j)
            for module in (dense, pruned) if fitted else (pruned,):
                with swapped(a, block, {"attn": module}):
                    out = capture_input(halves(a, block, mask)[0], a.attention(block).out_proj, x)
                pair.append(out if mask is None else out[mask])
            self._record_heads(j, pruned, out)
            if fitted:
                yield tuple(pair)

    def _keeps_heads(self, module: nn.Module) -> bool:
        """Whether :meth:`_record_heads` keeps ``module``'s heads' outputs (streams that replay them)."""
        return False

    def _keep_qkv(self, j: int, qkv: torch.Tensor) -> None:
        """Keep batch ``j``'s qkv projection ``(B, T, 3·H·d)`` for :meth:`attention_outputs` (with
        ``keep_qkv``), in memory only: where all batches' would not fit in the device's or the host's
        memory share (:func:`choose_location`), none are kept and that pass projects again."""
        if self.keep_qkv and self.masks is None:
            self.qkv_cache = self._keep_batch(self.qkv_cache, j, qkv)

    def _keep_batch(self, store: Optional[HiddenStates], j: int, t: torch.Tensor) -> Optional[HiddenStates]:
        """``store`` with batch ``j``'s tensor ``t`` appended (batches arrive in order): at ``j == 0`` a
        new store replaces it, in the device's or the host's memory (:func:`choose_location`), or None
        where all batches' tensors would not fit there or the states themselves are on disk (a cache
        is then not worth its memory)."""
        if j == 0:
            _close(store)
            nbytes = t.numel() * t.element_size() * len(self.states)
            location = choose_location("auto", self.states.device, nbytes)
            store = None if "disk" in (location, self.states.location) else HiddenStates(location, self.states.device)
        if store is not None and len(store) == j:
            store.append(t)
        return store

    def _drop_qkv(self) -> None:
        self.qkv_cache = _close(self.qkv_cache)

    def _record_dense_heads(self, j: int, module: nn.Module, heads: torch.Tensor) -> None:
        """Batch ``j``'s heads' outputs ``(B, T, H·d_v)`` of the dense attention ``module``, computed
        by :meth:`attention_outputs` from the kept projection: streams whose report needs the dense
        block's outputs may keep the report batches'."""

    def _record_heads(self, j: int, module: nn.Module, heads: torch.Tensor) -> None:
        """Batch ``j``'s heads' outputs ``(B, T, H·d_v)`` of the pruned attention ``module`` (the
        attention output fit's pass): streams that run that attention again may keep them."""

    def report_inputs(self) -> list[torch.Tensor]:
        return self._report_slice([self.states[j] for j in range(self.report_batches)])

    def _report_slice(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first ``report_images`` images of the leading ``batches`` (views)."""
        if self.report_images is None:
            return batches
        out, left = [], self.report_images
        for t in batches:
            if left <= 0:
                break
            out.append(t[:left])
            left -= t.shape[0]
        return out

    def advance(self, block: nn.Module, report: bool = True,
                mlp_kept: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Move past the pruned ``block``; return its outputs on the report batches (``report``:
        whether they are wanted; a pruned stream computes them anyway). ``mlp_kept``: the hidden
        channels the block's MLP kept (``(|S|,)``; None: not pruned, or not known), for streams that
        advance the MLP from the hidden activations of its statistics pass."""
        raise NotImplementedError

    def raw(self) -> list[torch.Tensor]:
        """The states entering the next block, as stored (for checkpoints)."""
        return self.states.raw()

    def _move_to(self, states: HiddenStates) -> None:
        if self.owns_states:
            self.states.close()
        self.states, self.owns_states = states, True

    def close(self) -> None:
        if self.owns_states:
            self.states.close()
        self._drop_qkv()

    def _sites(self, block: nn.Module, stats: dict):
        """``(module to hook, function of its output)`` that fill each part's statistics."""
        a = self.adapter
        out = []
        for name, st in stats.items():
            if name == "mlp":
                out.append((a.mlp(block).hidden_site, st.update))
                continue
            part = a.attention(block)
            convert = part.qkv_from_site
            out.append((part.qkv_site, st.update if convert is None else
                        (lambda y, st=st, f=convert, **kw: st.update(f(y), **kw))))
        return out

    def _update(self, update, j: int):
        """``update`` for batch ``j``'s activations (``(B, T, C)``), its padding left out."""
        mask = self.mask(j)
        return update if mask is None else (lambda *acts, **kw: update(*acts, mask=mask, **kw))


class DenseStream(Stream):
    """The paper's schedule: the dense block's one forward fills every part's statistics and is the
    next block's input."""

    def begin(self, block, index, stats, dense):
        super().begin(block, index, stats, dense)
        self.next = self.states.spawn()
        current = [0]  # the batch the hooks are seeing (its token mask)
        joins = self.adapter.mlp(block).joins if "mlp" in stats else None
        weighted = "mlp" in stats and self.weighs_mlp_tokens(joins)
        pending: list = []  # weighted: the batch's (update, h) until the block's output gives the weights
        joined: list[torch.Tensor] = []

        def hooked(update, name):
            if weighted and name == "mlp":
                return lambda out: pending.append((update, out))
            return lambda out: self._update(update, current[0])(out)

        def run(j, x):
            current[0] = j
            y = self.run(block, j, x)
            if pending:
                update, h = pending.pop()
                z = y if joins is None else joined.pop()
                self._update(update, j)(h, weights=token_weights(z))
            return y

        with contextlib.ExitStack() as stack:
            if joins is not None:
                handle = joins.register_forward_pre_hook(lambda _m, args: joined.append(args[0]))
                stack.callback(handle.remove)
            for name, (site, update) in zip(stats, self._sites(block, stats)):
                stack.enter_context(_hook(site, hooked(update, name), stop=False))
            self.dense_outputs = self._report_slice(propagate(run, self.states, self.next, self.report_batches,
                                                              f"the output of block {index}", self.dp))

    def advance(self, block, report=True, mlp_kept=None):
        pruned = []
        if report and self.report_batches:
            masks = self.report_masks() or [None] * self.report_batches
            pruned = [self.adapter.run_block(block, x, m) for x, m in zip(self.report_inputs(), masks)]
        self._move_to(self.next)
        return pruned


class PrunedStream(Stream):
    """Statistics from the outputs of the already-pruned blocks (SparseGPT's schedule).

    The MLP's statistics need the pruned attention's output; that pass keeps the residual
    stream after the attention (``after_attention``), so :meth:`advance` runs only the MLP half
    of the block. Per block and batch (timm ViT, default method): one dense qkv projection (the q/k
    statistics; kept for the output fit's pass, ``keep_qkv``), the dense and the pruned attention
    from it, the refitted output projection and the dense MLP up to its hidden activation (the MLP
    statistics; kept, ``replay_hidden``), and the pruned MLP's output projection on the kept
    channels: about one dense forward in projections, plus one attention.
    """

    #: replay the heads' outputs the attention output fit's pass recorded in the MLP statistics pass
    #: (:class:`corp.modules.ReplaysFromHeads`) instead of running the pruned attention again: the
    #: same tensors, one attention pass per block fewer
    replay_heads = True
    heads: Optional[HiddenStates] = None  # the recorded heads' outputs, one entry per batch
    heads_module: Optional[nn.Module] = None  # the pruned attention that produced them
    #: advance the pruned MLP from the kept channels of the hidden activations its statistics pass
    #: recorded (:attr:`corp.models.base.MlpPart.from_hidden`) instead of running its input
    #: projection again: the pruned MLP's hidden activation is those channels, to rounding
    replay_hidden = True
    hidden: Optional[HiddenStates] = None  # the MLP statistics pass's hidden activations, per batch
    dense_report_heads: tuple = ()  # (dense attention, its heads' outputs) per report batch, once recorded a list

    def begin(self, block, index, stats, dense):
        super().begin(block, index, stats, dense)
        self.after_attention: Optional[HiddenStates] = None
        self._drop_heads()
        self._drop_hidden()
        self.dense_report_heads = []

    def _drop_heads(self) -> None:
        self.heads, self.heads_module = _close(self.heads), None

    def _record_dense_heads(self, j, module, heads):
        # the report compares the pruned block with the dense one on the report images: with the dense
        # heads of those images kept, the dense block's outputs need its output projection and MLP
        # only (bitwise the same: the same projection and attention ops on the same input). The
        # heads come from AttentionPart.attend, whose modules end in proj_drop(proj(heads)): what
        # HeadsReplay computes
        if self.replay_heads and j < self.report_batches and hasattr(module, "proj") and hasattr(module, "proj_drop"):
            if j == 0:
                self.dense_report_heads = [(module, heads)]
            elif len(self.dense_report_heads) == j and self.dense_report_heads[0][0] is module:
                self.dense_report_heads.append((module, heads))

    def _dense_report_outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The dense block's outputs on the report inputs from the kept dense heads (empty if not kept)."""
        kept = self.dense_report_heads
        if len(kept) != self.report_batches or not self.report_batches:  # none kept (e.g. token masks)
            return []
        inputs = self.report_inputs()
        out = []
        for x, (module, heads) in zip(inputs, kept):
            with swapped(self.adapter, block, {"attn": HeadsReplay(module, heads[: x.shape[0]]),
                                               "mlp": self.dense["mlp"]}):
                out.append(self.adapter.run_block(block, x))
        return out

    def _keeps_heads(self, module):
        return self.replay_heads and isinstance(module, ReplaysFromHeads)

    def _record_heads(self, j, module, heads):
        if not self._keeps_heads(module):
            return
        if j == 0 or self.heads_module is not module:
            self._drop_heads()
            self.heads, self.heads_module = self.states.spawn(), module
        if len(self.heads) == j:  # in order, once per batch
            self.heads.append(heads)

    def _first_half(self, block: nn.Module, j: int, x: torch.Tensor, first) -> torch.Tensor:
        """``first(x)`` (the block's first half on batch ``j``), with the recorded heads' outputs of
        the block's attention replayed when they are there (:meth:`_record_heads`)."""
        module = self.adapter.attention(block).module
        if self.heads is None or module is not self.heads_module or len(self.heads) != len(self.states):
            return first(x)
        with swapped(self.adapter, block, {"attn": module.replay(self.heads[j])}):
            return first(x)

    def _start_after_attention(self) -> None:
        """Keep the first halves' outputs from now on, for :meth:`advance`."""
        self.after_attention = self.states.spawn()

    def _keep_hidden(self, j: int, h: torch.Tensor) -> None:
        """Keep batch ``j``'s dense MLP hidden activation ``(B, T, D_h)`` for :meth:`advance`."""
        if self.replay_hidden:
            self.hidden = self._keep_batch(self.hidden, j, h)

    def _drop_hidden(self) -> None:
        self.hidden = _close(self.hidden)

    def fill(self, block, name, stats):
        if name == "attn":  # what a hook on the qkv projection sees, without the rest of the block
            qkv = self.adapter.attention(block).qkv  # rotary families: the rotated q/k
            for j, x in enumerate(self.states):
                y = qkv(x)
                self._update(stats.update, j)(y)
                self._keep_qkv(j, y)
            return
        site, update = self._sites(block, {name: stats})[0]
        part = self.adapter.mlp(block)
        joins = part.joins
        weighted = self.weighs_mlp_tokens(joins)
        self._start_after_attention()
        for j, x in enumerate(self.states):
            first, second = halves(self.adapter, block, self.mask(j))
            y = self._first_half(block, j, x, first)
            self.after_attention.append(y)
            if weighted:  # the dense MLP's whole half: its output gives each token's weight
                h, z = hidden_and_joined_sum(second, site, joins, y)
                self._update(update, j)(h, weights=token_weights(z))
            else:
                h = capture(second, site, y)
                self._update(update, j)(h)
            if part.from_hidden is not None:
                self._keep_hidden(j, h)

    def advance(self, block, report=True, mlp_kept=None):
        nxt = self.states.spawn()
        where = f"the output of block {self.index}"
        if self.after_attention is not None:  # only the MLP half is left to run
            a = self.adapter
            finish = a.mlp(block).from_hidden
            replay = (mlp_kept is not None and finish is not None and self.hidden is not None
                      and len(self.hidden) == len(self.after_attention))

            def second(j, y):
                if not replay:
                    return halves(a, block, self.mask(j))[1](y)
                with swapped(a, block, {"mlp": HiddenReplay(finish, _kept_channels(self.hidden[j], mlp_kept))}):
                    return halves(a, block, self.mask(j))[1](y)

            pruned = propagate(second, self.after_attention, nxt, self.report_batches, where, self.dp)
            if report:
                self.dense_outputs = self._dense_report_outputs(block)
            self.dense_report_heads = []
            self.after_attention.close()
            self.after_attention = None
            self._drop_heads()
            self._drop_hidden()
        else:
            pruned = propagate(lambda j, x: self.run(block, j, x), self.states, nxt, self.report_batches, where,
                               self.dp)
        self._drop_qkv()
        self._move_to(nxt)
        return self._report_slice(pruned)

    def close(self) -> None:
        super().close()
        self._drop_heads()
        self._drop_hidden()


class TwoStreams(PrunedStream):
    """The pruned stream plus the dense model's stream (``dense_states``): statistics that want the
    dense activations (``stats.wants_dense``) get both, batch by batch."""

    replay_hidden = False  # its MLP pass keeps no hidden activations; the pruned MLP runs whole

    def __init__(self, states: HiddenStates, dense_states: HiddenStates, adapter, dp, report_batches: int,
                 report_images: Optional[int] = None, masks: Optional[list[Optional[torch.Tensor]]] = None):
        super().__init__(states, adapter, dp, report_batches, report_images=report_images, masks=masks)
        self.dense_states = dense_states

    def begin(self, block, index, stats, dense):
        super().begin(block, index, stats, dense)
        self.next_dense = None

    def fill(self, block, name, stats):
        if not stats.wants_dense:
            super().fill(block, name, stats)
            return
        a = self.adapter
        if name == "attn":  # the attention is still dense here: one qkv projection serves both streams
            qkv = a.attention(block).qkv
            for j, x in enumerate(self.states):
                self._update(stats.update, j)(qkv(x), qkv(self.dense_states[j]))
            return
        # the MLP: ĥ from the pruned block; h from the dense stream's one full forward, which is
        # also that stream's next input
        site = a.mlp(block).hidden_site
        self._start_after_attention()
        self.next_dense, finite = self.dense_states.spawn(), True
        for j, x in enumerate(self.states):
            first, second = halves(a, block, self.mask(j))
            y = self._first_half(block, j, x, first)
            self.after_attention.append(y)
            h_hat = capture(second, site, y)
            captured: list[torch.Tensor] = []
            with swapped(a, block, {"attn": self.dense["attn"]}), _hook(site, captured.append, stop=False):
                y = self.run(block, j, self.dense_states[j])
            finite = finite and _finite(y)
            self.next_dense.append(y)
            self._update(stats.update, j)(h_hat, captured[0])
        check_finite(finite, f"the output of block {self.index} (dense stream)", self.dp)

    def advance(self, block, report=True, mlp_kept=None):
        pruned = super().advance(block, report)
        if self.next_dense is None:
            self.next_dense = self.dense_states.spawn()
            with swapped(self.adapter, block, self.dense):
                propagate(lambda j, x: self.run(block, j, x), self.dense_states, self.next_dense, 0,
                          f"the output of block {self.index}", self.dp)
        self.dense_states.close()
        self.dense_states = self.next_dense
        return pruned

    def close(self) -> None:
        super().close()
        self.dense_states.close()
