"""The ``corp`` command line: ``corp prune``, ``corp eval``, ``corp demo``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_ATTN_RIDGE, DEFAULT_MLP_RIDGE, __version__
    from .config import LOGIT_SOLVES, SELECTIONS
    from .ops import BACKENDS

    parser = argparse.ArgumentParser(prog="corp", description="One-shot CORP pruning of timm Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"corp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model with unlabeled calibration images and save it")
    p.add_argument("--model", required=True, help="timm model name, or a directory written by corp")
    p.add_argument("--checkpoint", help="local weights file for a timm model name (no hub download)")
    p.add_argument("--lazy", action="store_true",
                   help="with a .safetensors --checkpoint: read each block's weights only when it is pruned")
    p.add_argument("--calib", required=True, help="directory of calibration images (ImageFolder or flat)")
    p.add_argument("--calib-size", type=_positive_int, default=None, help="use this many images (random, --seed)")
    p.add_argument("--mlp-sparsity", type=_fraction, default=0.0)
    p.add_argument("--attn-sparsity", type=_fraction, default=0.0)
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--method", choices=("paper", "corp"), default="corp",
                   help="paper: the paper's method exactly; corp: this project's defaults (options below override)")
    p.add_argument("--propagate", choices=("dense", "pruned"), default=None)
    p.add_argument("--target", choices=("local", "dense"), default=None,
                   help="dense: error-correcting fits to the dense model's outputs (needs --propagate pruned)")
    p.add_argument("--logit-fit", choices=("pooled", "centred", "per_image"), default=None)
    p.add_argument("--selection", choices=SELECTIONS, default=None)
    p.add_argument("--logit-solve", choices=LOGIT_SOLVES, default=None,
                   help="sylvester: exact damped logit fit (eigen form); factored: two ridge regressions")
    p.add_argument("--budget", type=_fraction, default=None,
                   help="remove this fraction of parameters (or FLOPs) with per-block sparsities by measured error")
    p.add_argument("--budget-metric", choices=("params", "flops"), default="params")
    p.add_argument("--no-compensate", action="store_true", help="plain structured pruning, no compensation")
    p.add_argument("--ridge", type=float, default=DEFAULT_MLP_RIDGE, help="MLP damping relative to mean diag Σ_SS")
    p.add_argument("--attn-ridge", type=float, default=DEFAULT_ATTN_RIDGE)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the --calib-size subset")
    p.add_argument("--states", choices=("auto", "device", "cpu", "disk"), default="auto",
                   help="where calibration hidden states live between blocks")
    p.add_argument("--checkpoint-dir", help="save progress after each block here; rerun to resume")
    p.add_argument("--report", action="store_true", help="also write report.json and report.png into --out")

    e = sub.add_parser("eval", help="top-1/top-5 accuracy on a labelled ImageFolder")
    e.add_argument("--model", required=True, help="timm model name, or a directory written by corp")
    e.add_argument("--checkpoint", help="local weights file for a timm model name")
    e.add_argument("--data", required=True, help="ImageFolder directory (one sub-folder per class)")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--device", default=None)
    e.add_argument("--workers", type=int, default=2)

    d = sub.add_parser("demo", help="offline demo: train a small ViT on scikit-learn digits and prune it")
    d.add_argument("--mlp-sparsity", type=_fraction, default=0.5)
    d.add_argument("--attn-sparsity", type=_fraction, default=0.5)
    d.add_argument("--no-cache", action="store_true", help="retrain instead of using the cached model")
    return parser


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(loader, desc: str):
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, unit="batch")


def _init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def cmd_prune(args: argparse.Namespace) -> int:
    import corp
    from .data import calibration_loader

    weights = None
    if args.lazy:
        if not (args.checkpoint and args.checkpoint.endswith(".safetensors")):
            raise ValueError("--lazy needs --checkpoint FILE.safetensors holding the model's state_dict")
        model, weights = corp.meta_model(args.model), args.checkpoint
    else:
        model = corp.load_model(args.model, checkpoint=args.checkpoint)
    device, rank, world = _init_distributed(_device(args.device))
    loader = calibration_loader(model, args.calib, args.calib_size, args.batch_size, args.workers, args.seed,
                                shard=(rank, world))
    t = time.perf_counter()
    pruned = corp.prune(
        model,
        _progress(loader, "corp: calibration images") if rank == 0 else loader,
        mlp_sparsity=args.mlp_sparsity,
        attn_sparsity=args.attn_sparsity,
        compensate=not args.no_compensate,
        method=args.method,
        propagate=args.propagate,
        target=args.target,
        logit_fit=args.logit_fit,
        selection=args.selection,
        logit_solve=args.logit_solve,
        budget=args.budget,
        budget_metric=args.budget_metric,
        ridge=args.ridge,
        attn_ridge=args.attn_ridge,
        batch_size=args.batch_size,
        device=device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        backend=args.backend,
        states=args.states,
        checkpoint_dir=args.checkpoint_dir,
        weights=weights,
        progress=rank == 0,
    )
    seconds = time.perf_counter() - t
    if rank == 0:  # every rank holds the same pruned model; one writes it
        out = corp.save_pretrained(pruned, args.out)
        if args.report:
            pruned.corp_report.save_json(out / "report.json")
            pruned.corp_report.plot(out / "report.png")
        print(pruned.corp_report)
        print(f"pruned in {seconds:.1f}s on {world} process(es); saved to {out}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


@torch.no_grad()
def cmd_eval(args: argparse.Namespace) -> int:
    import corp
    from .data import eval_loader

    model = corp.load_model(args.model, checkpoint=args.checkpoint)
    device = _device(args.device)
    model.to(device).eval()
    loader = eval_loader(model, args.data, args.batch_size, args.workers)
    top1 = top5 = total = 0
    for images, labels in _progress(loader, "corp: evaluating"):
        logits = model(images.to(device))
        labels = labels.to(device)
        k = min(5, logits.shape[-1])
        best = logits.topk(k, dim=-1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(-1).sum())
        total += labels.numel()
    result = {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "images": total}
    print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.mlp_sparsity, args.attn_sparsity, cache=not args.no_cache)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"prune": cmd_prune, "eval": cmd_eval, "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"corp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
