"""Non-uniform sparsity from a global budget: measured error curves, a cost model, an allocation.

Given, for every block and kind (MLP hidden channels, attention query/key dims),
the measured block-output error after compensation at each sparsity of a grid,
choose one grid point per *group* so that the total error is smallest while the
pruned model removes at least a given fraction of the model's parameters (or
FLOPs). Robust blocks give more.

Groups, everywhere in this module: for a model with ``L`` blocks, groups
``0 .. L-1`` are the MLPs of blocks ``0 .. L-1`` and groups ``L .. 2L-1`` their
attentions (query/key dims).

Pieces:

- Cost model (:func:`unit_costs`, :func:`removed_amount`, :func:`cost_table`,
  :func:`model_total`): what pruning a fraction ``p`` removes, exactly as
  :func:`corp.report.count_parameters` / :func:`corp.report.count_flops` count
  it, with the same ``kept_count`` rounding as the pruner.
- Allocation (:func:`allocate`): a multiple-choice knapsack, solved by the
  Lagrangian / convex-hull greedy, then improved by a local search over single
  and pair moves. :func:`allocate_model` wraps it for a model and a budget
  fraction; :func:`allocation_to_sparsities` maps indices back to per-block
  ``mlp_sparsity`` / ``attn_sparsity`` lists.
- :func:`uniform_reference`: the uniform sparsity that removes the same budget.
- :func:`measure_error_curves` / :func:`allocate_from_errors`: the pre-pass of
  ``corp.prune(budget=...)`` that measures every block's compensated error on
  :data:`BUDGET_GRID` and allocates from it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import BUDGET_METRICS, PruneConfig, kept_count

__all__ = [
    "METRICS",
    "unit_costs",
    "removed_amount",
    "cost_table",
    "model_total",
    "allocate",
    "allocate_model",
    "allocation_to_sparsities",
    "uniform_reference",
    "uniform_removed",
    "BUDGET_GRID",
    "budget_grid",
    "measure_error_curves",
    "allocate_from_errors",
]

METRICS = BUDGET_METRICS
# Sparsities at which a budgeted run measures each block's compensated error (allocation grid).
BUDGET_GRID = tuple(i / 16 for i in range(16))
KINDS = ("mlp", "attn")


# --------------------------------------------------------------------------- cost model


def unit_costs(
    embed_dim: int,
    mlp_hidden: int,
    num_heads: int,
    head_dim: int,
    tokens: int,
    qkv_bias: bool = True,
    mlp_bias: bool = True,
    metric: str = "params",
    mlp_input_rows: int = 1,
) -> dict[str, int]:
    """What one removed unit of each kind saves in one timm ViT block.

    Returns ``{"mlp": c_mlp, "attn": c_attn}``:

    - ``"mlp"``: one MLP hidden channel, i.e. one row of ``fc1`` (``E`` weights,
      plus its bias if ``mlp_bias``) and one column of ``fc2`` (``E`` weights; the
      bias of ``fc2`` stays). FLOPs: ``2·N·E`` for each of fc1 and fc2. A gated MLP
      (``mlp_input_rows=2``) also removes the channel's gate row.
    - ``"attn"``: one query/key dim removed *in every head* (attention sparsity
      is per head, the same count in each): ``H`` query rows and ``H`` key rows
      of the fused ``qkv`` (``E`` weights each, plus a bias each if
      ``qkv_bias``). FLOPs: ``2·N·E`` per removed row, plus ``2·N·N`` per head
      for the ``q·k`` logits (``count_flops`` counts ``2·H·N·N·(qk + d)`` for
      the two attention matmuls; values keep their width).

    FLOPs are per image, a multiply-add counts 2, ``N`` = ``tokens`` entering
    the blocks (prefix tokens included), as in :func:`corp.report.count_flops`.
    ``mlp_hidden`` and ``head_dim`` do not change the unit costs; they are taken
    for a uniform signature (see :func:`removed_amount`).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    e, h, n = int(embed_dim), int(num_heads), int(tokens)
    if metric == "params":
        mlp = mlp_input_rows * (e + (1 if mlp_bias else 0)) + e
        attn = 2 * h * (e + (1 if qkv_bias else 0))
    else:
        mlp = (mlp_input_rows + 1) * (2 * n * e)
        attn = 2 * h * (2 * n * e) + h * 2 * n * n
    return {"mlp": mlp, "attn": attn}


def removed_amount(width: int, sparsity: float, unit: int, multiple: int = 1) -> int:
    """``unit`` × the number of units that pruning a fraction ``sparsity`` of ``width`` removes.

    ``width``: the MLP hidden width, or the query/key width per head; the count
    uses :func:`corp.config.kept_count`, the pruner's own rounding (``multiple``: rotary q/k
    keep whole pairs), so the amount is what the pruned model really saves.
    """
    return (int(width) - kept_count(int(width), float(sparsity), int(multiple))) * int(unit)


def _block_info(model: nn.Module) -> list[dict]:
    from .models import adapter_for

    return adapter_for(model).block_costs(model)


def model_total(model: nn.Module, metric: str = "params") -> int:
    """The whole model's parameters or FLOPs per image, as :mod:`corp.report` counts them."""
    from .report import count_flops, count_parameters

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return count_parameters(model) if metric == "params" else count_flops(model)


def cost_table(model: nn.Module, grid: torch.Tensor | Sequence[float], metric: str = "params") -> torch.Tensor:
    """``removed`` for :func:`allocate`: ``(2L, K)`` float64, what group ``g`` removes at grid point ``k``.

    Rows ``0 .. L-1``: MLP of each block; rows ``L .. 2L-1``: attention. Widths
    are the model's current ones (the adapter's ``widths``). A grid point
    that would keep no channel (or no query/key dim) is refused with ValueError.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    infos = _block_info(model)
    rows_mlp, rows_attn = [], []
    for i, info in enumerate(infos):
        units = unit_costs(
            info["embed_dim"], info["mlp_hidden"], info["num_heads"], info["head_dim"], info["tokens"],
            qkv_bias=info["qkv_bias"], mlp_bias=info["mlp_bias"], metric=metric,
            mlp_input_rows=info.get("mlp_input_rows", 1),
        )
        for p in grid.tolist():
            for width, what in ((info["mlp_hidden"], "MLP channel"), (info["qk_dim"], "query/key dim")):
                if kept_count(width, p) < 1:
                    raise ValueError(f"grid sparsity {p} leaves no {what} of {width} in block {i}")
        rows_mlp.append([removed_amount(info["mlp_hidden"], p, units["mlp"]) for p in grid.tolist()])
        rows_attn.append([removed_amount(info["qk_dim"], p, units["attn"], info.get("qk_multiple", 1))
                          for p in grid.tolist()])
    return torch.tensor(rows_mlp + rows_attn, dtype=torch.float64).reshape(2 * len(infos), grid.numel())


# --------------------------------------------------------------------------- allocation


def _allowed_mask(G: int, K: int, max_sparsity, grid: Optional[torch.Tensor]) -> torch.Tensor:
    allowed = torch.ones(G, K, dtype=torch.bool)
    if max_sparsity is None:
        return allowed
    if grid is None:
        raise ValueError("max_sparsity needs the grid")
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if grid.numel() != K:
        raise ValueError(f"grid has {grid.numel()} points, the tables {K}")
    cap = torch.as_tensor(max_sparsity, dtype=torch.float64)
    cap = cap.expand(G) if cap.dim() == 0 else cap.flatten()
    if cap.numel() != G:
        raise ValueError(f"max_sparsity: one value, or one per group ({G}), got {cap.numel()}")
    allowed = grid[None, :] <= cap[:, None] + 1e-12
    allowed[:, 0] |= ~allowed.any(dim=1)  # a cap below every grid point still allows the first
    return allowed


def _group_hull(err: list[float], rem: list[float], allowed: list[bool]) -> tuple[int, list[tuple[float, float, int]]]:
    """Start index (least error, then least removed, then lowest k) and the steps along the
    lower convex hull of the group's options to its right: ``(slope, Δremoved, to_k)``."""
    opts = [k for k in range(len(err)) if allowed[k]]
    start = min(opts, key=lambda k: (err[k], rem[k], k))
    # One option per removed amount (least error, then lowest k), right of the start.
    best: dict[float, int] = {}
    for k in opts:
        if rem[k] > rem[start] and (rem[k] not in best or (err[k], k) < (err[best[rem[k]]], best[rem[k]])):
            best[rem[k]] = k
    pts = [start] + [best[r] for r in sorted(best)]
    hull: list[int] = []
    for k in pts:  # monotone chain, lower hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> k
            cross = (rem[b] - rem[a]) * (err[k] - err[a]) - (err[b] - err[a]) * (rem[k] - rem[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(k)
    steps = []
    for a, b in zip(hull, hull[1:]):
        dr = rem[b] - rem[a]
        steps.append(((err[b] - err[a]) / dr, dr, b))
    return start, steps


def _local_search(
    err: torch.Tensor, rem: torch.Tensor, allowed: torch.Tensor, idx: torch.Tensor, budget: float, max_rounds: int
) -> torch.Tensor:
    """Best-improvement moves of one group or of two groups at once, staying within the budget."""
    G, K = err.shape
    ar = torch.arange(G)
    inf = torch.tensor(float("inf"), dtype=err.dtype)
    for _ in range(max_rounds):
        cur_e = err[ar, idx]
        cur_r = rem[ar, idx]
        total_e, total_r = float(cur_e.sum()), float(cur_r.sum())
        de = torch.where(allowed, err - cur_e[:, None], inf)  # (G, K)
        dr = rem - cur_r[:, None]
        slack = total_r - budget
        tol = 1e-12 * max(1.0, abs(total_e), float(err.abs().max()))
        feas_tol = 1e-9 * max(1.0, abs(budget))
        # single moves
        single = torch.where(dr >= -slack - feas_tol, de, inf)
        best_val, best_flat = single.flatten().min(0)
        move: Optional[tuple] = None
        if float(best_val) < -tol:
            g, k = divmod(int(best_flat), K)
            move, gain = ((g, k),), float(best_val)
        else:
            gain = 0.0
        # pair moves
        if G >= 2:
            pe = de.reshape(G * K, 1) + de.reshape(1, G * K)
            pr = dr.reshape(G * K, 1) + dr.reshape(1, G * K)
            same = (ar.repeat_interleave(K)[:, None] == ar.repeat_interleave(K)[None, :])
            pe = torch.where((pr >= -slack - feas_tol) & ~same, pe, inf)
            pval, pflat = pe.flatten().min(0)
            if float(pval) < min(gain, 0.0) - tol:
                a, b = divmod(int(pflat), G * K)
                move, gain = (divmod(a, K), divmod(b, K)), float(pval)
        if move is None:
            break
        idx = idx.clone()
        for g, k in move:
            idx[g] = k
    return idx


def allocate(
    errors: torch.Tensor,
    removed: torch.Tensor,
    budget: float,
    max_sparsity: float | Sequence[float] | torch.Tensor | None = None,
    grid: Optional[torch.Tensor | Sequence[float]] = None,
    *,
    refine: bool = True,
    tie: bool = False,
    total: Optional[float] = None,
    max_rounds: int = 1000,
) -> torch.Tensor:
    """Choose one grid point per group: least total error, at least ``budget`` removed.

    Args:
        errors: ``(G, K)``, the measured error of group ``g`` at grid point ``k``
            (non-negative; curves need not be convex or monotone; ``k = 0`` is
            sparsity 0).
        removed: ``(G, K)``, the parameters (or FLOPs) group ``g`` removes at grid
            point ``k`` (e.g. :func:`cost_table`).
        budget: the absolute amount to remove (``fraction × model_total``).
        max_sparsity: a cap on every group's sparsity (one value, or one per
            group); grid points above it are never chosen. Needs ``grid``.
            Default: no cap (the grid's max).
        grid: ``(K,)`` sparsities of the grid points (only used for the cap).
        refine: after the greedy, improve by single- and pair-group moves that
            keep the budget (never worse than the greedy).
        tie: force the MLP and the attention of a block to share one grid point
            (groups ``g`` and ``g + G/2`` are merged; G must be even).
        total: the model's total, only to state fractions in error messages.

    Returns:
        ``(G,)`` long, the chosen grid index of each group.

    Method: each group's options (within the cap) are reduced to the lower
    convex hull, in (removed, error), to the right of its least-error option;
    all hull steps of all groups are sorted by error per removed amount and
    taken in that order until the budget is met (the Lagrangian relaxation).
    The result is optimal for the amount it removes: no assignment removing at
    least as much has less error. Against the optimum at ``budget`` itself, its
    excess error is at most the last step's error. ``refine`` then narrows that
    gap with a local search (pair moves cover "undo the last step, take
    another group's step instead").

    Raises:
        ValueError: the budget exceeds what the groups can remove at most
            (the message names the maximum, as a fraction of ``total`` if given).
    """
    errors = torch.as_tensor(errors, dtype=torch.float64)
    removed = torch.as_tensor(removed, dtype=torch.float64)
    if errors.dim() != 2 or errors.shape != removed.shape:
        raise ValueError(f"errors and removed must be (G, K) of one shape, got {tuple(errors.shape)} and "
                         f"{tuple(removed.shape)}")
    if not (torch.isfinite(errors).all() and torch.isfinite(removed).all()):
        raise ValueError("errors and removed must be finite")
    G, K = errors.shape
    allowed = _allowed_mask(G, K, max_sparsity, grid)
    if tie:
        if G % 2:
            raise ValueError(f"tie needs an even number of groups (MLPs then attentions), got {G}")
        L = G // 2
        sub = _allocate(errors[:L] + errors[L:], removed[:L] + removed[L:], allowed[:L] & allowed[L:],
                        budget, refine, total, max_rounds)
        return torch.cat([sub, sub])
    return _allocate(errors, removed, allowed, budget, refine, total, max_rounds)


def _allocate(errors, removed, allowed, budget, refine, total, max_rounds) -> torch.Tensor:
    G, K = errors.shape
    budget = float(budget)
    reach = float(torch.where(allowed, removed, torch.tensor(float("-inf"), dtype=torch.float64)).max(1).values.sum())
    feas_tol = 1e-9 * max(1.0, abs(budget))
    if budget > reach + feas_tol:
        if total:
            raise ValueError(f"budget {budget / total:.4%} of the total is unreachable: pruning the MLPs and "
                             f"query/key dims removes at most {reach / total:.4%} ({reach:.6g} of {total:.6g})")
        raise ValueError(f"budget {budget:.6g} is unreachable: the groups remove at most {reach:.6g}")
    e_list, r_list, a_list = errors.tolist(), removed.tolist(), allowed.tolist()
    idx = torch.empty(G, dtype=torch.long)
    steps = []
    for g in range(G):
        start, group_steps = _group_hull(e_list[g], r_list[g], a_list[g])
        idx[g] = start
        steps += [(slope, j, g, dr, k) for j, (slope, dr, k) in enumerate(group_steps)]
    got = float(removed[torch.arange(G), idx].sum())
    steps.sort(key=lambda s: (s[0], s[1], s[2]))  # slope, then round-robin over groups on ties
    for _, _, g, dr, k in steps:
        if got >= budget - feas_tol:
            break
        idx[g] = k
        got += dr
    if refine:
        idx = _local_search(errors, removed, allowed, idx, budget, max_rounds)
    return idx


def allocation_to_sparsities(
    indices: torch.Tensor | Sequence[int], grid: torch.Tensor | Sequence[float], num_blocks: int
) -> tuple[list[float], list[float]]:
    """``(mlp_sparsity, attn_sparsity)`` per-block lists from group indices.

    Groups ``0 .. L-1`` are the MLPs of blocks ``0 .. L-1``, ``L .. 2L-1`` their attentions.
    """
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if indices.numel() != 2 * num_blocks:
        raise ValueError(f"expected {2 * num_blocks} group indices for {num_blocks} blocks, got {indices.numel()}")
    values = grid[indices].tolist()
    return values[:num_blocks], values[num_blocks:]


def allocate_model(
    model: nn.Module,
    errors: torch.Tensor,
    grid: torch.Tensor | Sequence[float],
    budget: float,
    metric: str = "params",
    max_sparsity: float | Sequence[float] | torch.Tensor | None = None,
    *,
    tie: bool = False,
    refine: bool = True,
) -> tuple[list[float], list[float]]:
    """Per-block ``(mlp_sparsity, attn_sparsity)`` that remove at least a fraction ``budget``
    of the whole model's parameters (``metric="params"``) or FLOPs per image (``"flops"``),
    with the least total measured error.

    ``errors``: ``(2L, K)`` in group order (MLPs, then attentions) over ``grid``.
    Raises ValueError naming the largest reachable fraction if ``budget`` exceeds it.
    """
    removed = cost_table(model, grid, metric)
    total = float(model_total(model, metric))
    idx = allocate(errors, removed, budget * total, max_sparsity, grid, refine=refine, tie=tie, total=total)
    return allocation_to_sparsities(idx, grid, len(_block_info(model)))


# --------------------------------------------------------------------------- uniform reference


def uniform_removed(model: nn.Module, sparsity: float, metric: str = "params", kinds: Sequence[str] = KINDS) -> int:
    """What a uniform ``sparsity`` of the given kinds in every block removes (params or FLOPs)."""
    total = 0
    for info in _block_info(model):
        units = unit_costs(
            info["embed_dim"], info["mlp_hidden"], info["num_heads"], info["head_dim"], info["tokens"],
            qkv_bias=info["qkv_bias"], mlp_bias=info["mlp_bias"], metric=metric,
            mlp_input_rows=info.get("mlp_input_rows", 1),
        )
        if "mlp" in kinds:
            total += removed_amount(info["mlp_hidden"], sparsity, units["mlp"])
        if "attn" in kinds:
            total += removed_amount(info["qk_dim"], sparsity, units["attn"], info.get("qk_multiple", 1))
    return total


def uniform_reference(
    model: nn.Module,
    budget: float,
    metric: str = "params",
    kinds: Sequence[str] = KINDS,
    grid: Optional[torch.Tensor | Sequence[float]] = None,
) -> float:
    """The smallest uniform sparsity (for all ``kinds`` in every block) that removes at
    least a fraction ``budget`` of the model's parameters or FLOPs: the "same budget"
    baseline for a non-uniform allocation.

    With ``grid``, the smallest grid point that does. Without, the smallest value
    among the exact fractions ``j / width`` of the widths and points inside every
    interval where the pruner's rounded widths are constant, so no reachable
    (MLP, q/k) width pair is skipped. Raises ValueError when even the largest
    candidate (keeping one channel / dim) falls short.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    total = model_total(model, metric)
    target = budget * total
    infos = _block_info(model)
    widths = sorted({w for info in infos for w, kind in ((info["mlp_hidden"], "mlp"), (info["qk_dim"], "attn"))
                     if kind in kinds})
    if grid is not None:
        cands = sorted(float(p) for p in torch.as_tensor(grid, dtype=torch.float64).flatten().tolist())
    else:
        exact = {j / w for w in widths for j in range(w)}
        bounds = sorted({(j + 0.5) / w for w in widths for j in range(w)})
        mids = {(a + b) / 2 for a, b in zip(bounds, bounds[1:])}
        cands = sorted(exact | mids | {0.0})
    best_reach = 0.0
    for p in cands:
        if any(kept_count(w, p) < 1 for w in widths):
            continue
        got = uniform_removed(model, p, metric, kinds)
        best_reach = max(best_reach, got)
        if got >= target - 1e-9 * max(1.0, abs(target)):
            return p
    raise ValueError(f"budget {budget:.4%} is unreachable by a uniform sparsity of {kinds}: at most "
                     f"{best_reach / total:.4%}")


# --------------------------------------------------------------------------- measured error curves


def budget_grid(adapter, blocks) -> list[float]:
    """The points of :data:`BUDGET_GRID` that keep at least one channel and q/k dim in every block."""
    return [p for p in BUDGET_GRID
            if all(kept_count(adapter.mlp(b).hidden, p) >= 1 and kept_count(adapter.attention(b).head_dim, p) >= 1
                   for b in blocks)]


@torch.no_grad()
def measure_error_curves(run, states, report_batches: int) -> torch.Tensor:
    """Budget pre-pass: every block's compensated output error at every grid sparsity.

    The dense model runs once over the calibration states (statistics as in
    ``propagate="dense"``); each block is then pruned at every grid point, MLP and
    attention separately, with the paper's fit and selection (the fits of one block
    cost a fraction of its statistics), and its squared relative output error on the
    report batches is measured against the dense block. ``run``: the pipeline's run
    (adapter, blocks, kernels, ranks, block loader); ``states``: the embedded
    calibration states (left open). Returns ``(2L, K)``: rows 0..L−1 the MLPs,
    L..2L−1 the attentions (this module's group order).
    """
    from .fit import FitContext
    from .parts import part_pruners
    from .report import measure_block_errors
    from .streams import DenseStream, swapped

    adapter, blocks, dp = run.adapter, run.blocks, run.dp
    grid = budget_grid(adapter, blocks)
    depth = len(blocks)
    errors = torch.zeros(2 * depth, len(grid), dtype=torch.float64)
    paper = PruneConfig.create(method="paper", ridge=run.config.ridge, attn_ridge=run.config.attn_ridge)
    pruners = part_pruners(paper, run.kernels)
    stream = DenseStream(states, adapter, dp, report_batches, owns_states=False, masks=run.masks)
    masks = stream.report_masks()
    for i in range(depth):
        block = run.load_block(i, copy_always=True)
        dense = {"attn": adapter.attention(block).module, "mlp": adapter.mlp(block).module}
        stats = {name: p.statistics(adapter, block) for name, p in pruners.items()}
        inputs = stream.report_inputs()
        stream.begin(block, i, stats, dense)
        reference = stream.dense_outputs
        ctx = FitContext(run.kernels, dp)
        for name in ("mlp", "attn"):
            stats[name].reduce_(dp)
            row = i if name == "mlp" else depth + i
            for k, p in enumerate(grid):
                if p == 0:
                    continue
                module = pruners[name].prune(adapter, block, stats[name], p, ctx).module
                with swapped(adapter, block, {name: module}):
                    outputs = [stream.run(block, j, x) for j, x in enumerate(inputs)]
                    err, _ = measure_block_errors(adapter, block, inputs, outputs, reference, dense, {}, dp, masks)
                errors[row, k] = err ** 2
        stream.advance(block, report=False)
        del block, stats
    stream.close()
    return errors


def allocate_from_errors(run, states, report_batches: int) -> tuple[list[float], list[float]]:
    """Measure the error curves (:func:`measure_error_curves`) and allocate ``run.config.budget``."""
    errors = measure_error_curves(run, states, report_batches)
    grid = budget_grid(run.adapter, run.blocks)
    return allocate_model(run.model, errors, grid, run.config.budget, run.config.budget_metric)
