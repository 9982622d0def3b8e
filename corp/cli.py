"""The ``corp`` command line: ``corp prune``, ``corp eval``, ``corp demo``, ``corp models``.

Arguments are parsed before anything heavy is imported (``corp --help`` and argument errors
need neither torch nor timm), and every argument, file and folder is checked before the model
is loaded, so that a bad ``--out`` or ``--calib`` costs seconds, not a pruning run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from .config import DEFAULT_ATTN_RIDGE, DEFAULT_MLP_RIDGE, LOGIT_FITS, LOGIT_SOLVES, METHODS, SELECTIONS, TOKEN_WEIGHTS

__all__ = ["main", "build_parser", "BACKEND_CHOICES", "MODEL_FAMILIES"]

# dtype names -> torch attribute names (torch itself is imported only when a command runs)
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
# corp.ops.BACKENDS, written out so that --help needs no torch (tests/test_cli_first_run.py checks they agree)
BACKEND_CHOICES = ("auto", "torch", "triton", "compiled")
# the families of corp.models.ADAPTERS by name, for --help without torch (checked against ADAPTERS by the
# tests); `corp models` reads ADAPTERS itself
MODEL_FAMILIES = {
    "timm_vit": "timm VisionTransformer models (deit_*, deit3_*, vit_*): Mlp or gated MLPs (SwiGLU, GluMlp), "
                "q/k-norm attention (MLP pruning only)",
    "timm_eva": "timm Eva models (eva02_*, vit_*_rope_*): MLPs; rotary q/k pruned in whole pairs",
    "hf_bert": "Hugging Face BertModel / BertFor* text encoders (a local model directory; --calib a text file)",
    "hf_vit": "Hugging Face ViTModel / ViTForImageClassification",
    "hf_dinov2": "Hugging Face Dinov2Model / Dinov2ForImageClassification (MLP or SwiGLU)",
    "hf_dinov3": "Hugging Face DINOv3ViTModel: MLP or gated MLP; rotary q/k pruned in whole pairs",
    "hf_clip_vision": "Hugging Face CLIPVisionModel",
    "hf_siglip_vision": "Hugging Face SiglipVisionModel",
}

_FAMILIES_EPILOG = "supported model families (`corp models` for details):\n" + "".join(
    f"  {name}: {text}\n" for name, text in MODEL_FAMILIES.items())
_EPILOG = _FAMILIES_EPILOG + "\nRun `corp COMMAND --help` for a command's options."


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag's False)
    or the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default:" in text:
            return text
        return super()._get_help_string(action)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _float_where(accept, requirement: str):
    """An argparse type: a float for which ``accept(value)`` holds, else "``requirement``, got ..."."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


_fraction = _float_where(lambda v: 0.0 <= v < 1.0, "sparsity must be in [0, 1)")
_share = _float_where(lambda v: 0.0 < v <= 1.0, "must be a fraction in (0, 1]")
_positive_float = _float_where(lambda v: 0 < v < float("inf"), "must be a positive finite number")


def _per_method(option: str) -> str:
    """'default: per --method (corp: X, paper: Y)' for a variant option left at None."""
    return "default: per --method (" + ", ".join(f"{m}: {preset[option]}" for m, preset in METHODS.items()) + ")"


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a timm model name (pretrained weights from the Hugging Face hub or its cache), "
                        "a directory written by corp (corp prune --out), or a local Hugging Face model "
                        "directory (config.json + weights, e.g. a BERT text encoder)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="local weights file (.pth/.safetensors) for a timm model name: no hub download")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (imports neither torch nor timm)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="corp", description="One-shot CORP pruning of timm Vision Transformers.",
                                     epilog=_EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"corp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model with unlabeled calibration images and save it",
                       description="Prune a model (a timm name, a corp directory or a local Hugging Face directory) "
                                   "with unlabeled calibration images (or, for text encoders, lines of a text file) "
                                   "and save it to --out. A Hugging Face vision directory's images are "
                                   "preprocessed as its preprocessor_config.json says (saved with the pruned "
                                   "model). Every argument, file and folder is checked before the model is loaded.",
                       epilog=_FAMILIES_EPILOG, formatter_class=_HelpFormatter)
    _add_model_arguments(p)
    p.add_argument("--lazy", action="store_true",
                   help="with a .safetensors --checkpoint: read each block's weights only when it is pruned")
    p.add_argument("--calib", required=True, metavar="PATH",
                   help="directory of calibration images (ImageFolder or flat; searched recursively, labels unused); "
                        "for a Hugging Face text encoder a UTF-8 text file, one calibration sample per line")
    p.add_argument("--calib-size", type=_positive_int, default=None, metavar="N",
                   help="use a random subset of N images (chosen by --seed), or the first N lines of a text "
                        "file; default: all")
    p.add_argument("--max-length", type=_positive_int, default=128, metavar="T",
                   help="text encoders: tokens per calibration sample (longer lines are truncated)")
    p.add_argument("--mlp-sparsity", type=_fraction, default=0.0, metavar="S",
                   help="fraction of each block's MLP hidden channels to remove, in [0, 1)")
    p.add_argument("--attn-sparsity", type=_fraction, default=0.0, metavar="S",
                   help="fraction of each attention head's query/key dims to remove, in [0, 1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (model.safetensors + config.json); must be new, empty or a corp save")
    p.add_argument("--method", choices=tuple(METHODS), default="corp",
                   help="paper: the paper's method exactly; corp: this project's defaults (options below override)")
    p.add_argument("--propagate", choices=("dense", "pruned"), default=None,
                   help="statistics from the dense model's activations or the already-pruned blocks' outputs; "
                        + _per_method("propagate"))
    p.add_argument("--target", choices=("local", "dense"), default=None,
                   help="dense: error-correcting fits to the dense model's outputs (needs --propagate pruned); "
                        + _per_method("target"))
    p.add_argument("--logit-fit", choices=LOGIT_FITS, default=None,
                   help="attention logit fit: pooled (all token pairs), centred (keys centred per image), "
                        "per_image (exact within-image objective); " + _per_method("logit_fit"))
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="which channels/dims to keep: energy (the paper's heuristics), residual (greedy by what the "
                        "compensation cannot recover), residual_factored; " + _per_method("selection"))
    p.add_argument("--logit-solve", choices=LOGIT_SOLVES, default=None,
                   help="sylvester: exact damped logit fit (eigen form); factored: two ridge regressions; "
                        "lowrank: no dim selection, the best rank-s q/k form per head (truncated SVD); "
                        + _per_method("logit_solve"))
    p.add_argument("--attn-output-fit", action=argparse.BooleanOptionalAction, default=None,
                   help="after pruning q/k dims, refit each attention's output projection to the dense "
                        "attention's output (one more attention pass per block); " + _per_method("attn_output_fit"))
    p.add_argument("--attn-output-fit-share", type=_share, default=1.0, metavar="F",
                   help="the fraction of the calibration batches the attention output fit's statistics "
                        "take, spread evenly (0.5: every second batch; less dense attention work); default 1")
    p.add_argument("--mlp-token-weights", choices=TOKEN_WEIGHTS, default=None,
                   help="weight each token's MLP statistics by 1/variance of the sum the MLP output joins (what "
                        "the next LayerNorm divides by); auto: only in post-norm blocks; "
                        + _per_method("mlp_token_weights"))
    p.add_argument("--budget", type=_fraction, default=None, metavar="F",
                   help="instead of sparsities: remove this fraction of parameters (or FLOPs) with per-block "
                        "sparsities chosen by measured error")
    p.add_argument("--budget-metric", choices=("params", "flops"), default="params", help="what --budget counts")
    p.add_argument("--no-compensate", action="store_true", help="plain structured pruning, no compensation")
    p.add_argument("--ridge", type=_positive_float, default=DEFAULT_MLP_RIDGE,
                   help="MLP ridge damping, relative to mean diag Σ_SS")
    p.add_argument("--attn-ridge", type=_positive_float, default=DEFAULT_ATTN_RIDGE,
                   help="attention ridge damping, relative to mean diag GQ_SS · mean diag GK_SS")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="calibration images per forward pass (also the batch of the throughput measurement)")
    p.add_argument("--device", default=None, help="where blocks run, e.g. cuda, cuda:1, cpu; default: cuda if available")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="dtype of the forward passes and the saved model; default: the model's own "
                        "(statistics and solves are fp64 regardless)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="statistics/solve kernels: torch (PyTorch reference), triton (GPU kernels), "
                        "compiled (C++/CUDA solver), auto (the fastest available)")
    p.add_argument("--workers", type=_nonnegative_int, default=2, help="data loading processes (0: in this process)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --calib-size subset")
    p.add_argument("--states", choices=("auto", "device", "cpu", "disk"), default="auto",
                   help="where calibration hidden states live between blocks")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="save progress after each block here; rerun to resume")
    p.add_argument("--report", action="store_true", help="also write report.json and report.png into --out")
    p.add_argument("--throughput-runs", type=_nonnegative_int, default=3, metavar="N",
                   help="measure dense and pruned images/s on one calibration batch, median of N timed "
                        "forwards (0: skip)")

    e = sub.add_parser("eval", help="top-1/top-5 accuracy on a labelled ImageFolder",
                       description="Top-1/top-5 accuracy of a model on a labelled ImageFolder. Class sub-folders "
                                   "are sorted by name and numbered 0..K-1 (torchvision's ImageFolder order); "
                                   "folder i must be the model's class i.",
                       epilog=_FAMILIES_EPILOG, formatter_class=_HelpFormatter)
    _add_model_arguments(e)
    e.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder directory: one sub-folder of images per class, sorted names = class indices")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    e.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu; default: cuda if available")
    e.add_argument("--workers", type=_nonnegative_int, default=2, help="data loading processes (0: in this process)")

    d = sub.add_parser("demo", help="offline demo: train a small ViT on scikit-learn digits and prune it",
                       description="Offline demo: a 4-block ViT trained on scikit-learn's digits (trained on the "
                                   "first run, then cached), pruned with and without compensation.",
                       formatter_class=_HelpFormatter)
    d.add_argument("--mlp-sparsity", type=_fraction, default=0.5, metavar="S",
                   help="fraction of MLP hidden channels to remove")
    d.add_argument("--attn-sparsity", type=_fraction, default=0.5, metavar="S",
                   help="fraction of query/key dims to remove")
    d.add_argument("--no-cache", action="store_true", help="retrain instead of using the cached model")

    sub.add_parser("models", help="list the model families corp can prune",
                   description="List the model families corp can prune (corp.models.ADAPTERS).",
                   formatter_class=_HelpFormatter)
    return parser


# ---------------------------------------------------------------------------------------- checks


def _warn(command: str, message: str) -> None:
    print(f"corp {command}: warning: {message}", file=sys.stderr, flush=True)


def _check_model(name: str, checkpoint: Optional[str], lazy: bool = False) -> bool:
    """Refuse a --model / --checkpoint / --lazy combination that cannot load, before loading anything
    (and before importing torch). Returns whether ``name`` is to be a timm model name."""
    from .paths import is_corp_dir, is_hf_dir

    if os.path.isdir(name):
        if not (is_corp_dir(name) or is_hf_dir(name)):
            raise ValueError(f"--model {name} is a directory but neither one written by corp nor a Hugging Face "
                             "model directory (no config.json with a model_type)")
        if checkpoint is not None or lazy:
            kind = "corp directory" if is_corp_dir(name) else "Hugging Face model directory"
            raise ValueError(f"--checkpoint/--lazy apply to a timm model name; --model {name} is a {kind} "
                             "that holds its own weights")
        return False
    if os.path.isfile(name):
        raise ValueError(f"--model {name} is a file: pass the timm model name as --model and the file as "
                         "--checkpoint")
    if ":" not in name and (os.sep in name or name.startswith(".")):
        raise ValueError(f"--model {name} is neither a directory (there is none) nor a timm model name "
                         "(a Hugging Face hub repository needs the prefix hf-hub:)")
    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--checkpoint {checkpoint} is not a file")
    if lazy and not (checkpoint and checkpoint.endswith(".safetensors")):
        raise ValueError("--lazy needs --checkpoint FILE.safetensors holding the model's state_dict")
    return True


def _check_timm_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest ones (imports timm)."""
    import difflib

    import timm
    from timm.models import parse_model_name

    source, arch = parse_model_name(name)
    if source is None and not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ValueError(f"--model {name!r} is neither a directory written by corp nor a timm model name{hint}")


def _check_writable_dir(path: str, option: str) -> None:
    """A directory ``path`` that exists, or can be created, and can be written."""
    from pathlib import Path

    from .paths import check_creatable

    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{option} {path} exists and is a file, not a directory")
    check_creatable(Path(path) / "x", f"{option} {path}")


def _device(name: Optional[str]):
    """The torch.device of --device (default: cuda if available), refused when it cannot be used."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r} is not a device name ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _progress(loader, desc: str):
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, unit="batch")


def _init_distributed(device) -> tuple:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import torch
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


# ---------------------------------------------------------------------------------------- commands


def _prune_config(args: argparse.Namespace):
    """The run's PruneConfig, built now so that every invalid value or combination is refused before work."""
    from .config import PruneConfig

    config = PruneConfig.create(
        method=args.method, propagate=args.propagate, target=args.target, logit_fit=args.logit_fit,
        selection=args.selection, logit_solve=args.logit_solve, attn_output_fit=args.attn_output_fit,
        attn_output_fit_share=args.attn_output_fit_share,
        mlp_token_weights=args.mlp_token_weights, mlp_sparsity=args.mlp_sparsity,
        attn_sparsity=args.attn_sparsity, compensate=not args.no_compensate, budget=args.budget,
        budget_metric=args.budget_metric, ridge=args.ridge, attn_ridge=args.attn_ridge,
        batch_size=args.batch_size, backend=args.backend, states=args.states,
    )
    # corp.prune refuses this too, but only once the model is loaded
    if config.error_correcting and args.checkpoint_dir is not None:
        raise ValueError("--checkpoint-dir is not supported with --target dense (two streams of states)")
    if not (args.budget or args.mlp_sparsity or args.attn_sparsity):
        _warn("prune", "--mlp-sparsity and --attn-sparsity are 0 and no --budget is given: nothing is removed")
    return config


def _measure_throughput(args, dense, pruned, loader, device, dtype) -> None:
    """Dense vs pruned images/s on the first calibration batch, into ``pruned.corp_report``.

    A failure here (e.g. out of memory with both models on the device) is a warning: the
    pruned model is saved regardless.
    """
    from .report import measure_throughput

    try:
        images = next(iter(loader))
        images = images.to(device, dtype=dtype or next(pruned.parameters()).dtype)
        dense_ips = measure_throughput(dense.to(device, dtype=images.dtype), images, args.throughput_runs)
        pruned_ips = measure_throughput(pruned.to(device), images, args.throughput_runs)
    except Exception as exc:  # noqa: BLE001 - never lose the pruned model to a measurement
        _warn("prune", f"throughput not measured ({type(exc).__name__}: {exc})")
        return
    finally:
        pruned.to("cpu")
    pruned.corp_report.set_throughput(dense_ips, pruned_ips, int(images.shape[0]), str(device), args.throughput_runs)


def cmd_prune(args: argparse.Namespace) -> int:
    import importlib.util

    from .paths import HF_TEXT_MODEL_TYPES, check_output_dir, check_text_file, hf_model_type, is_hf_dir, list_image_files

    # everything that can be checked without the model, before loading it: files and folders
    # first (no torch needed, so these errors come at once), then names, options and the device
    timm_name = _check_model(args.model, args.checkpoint, args.lazy)
    text_model = is_hf_dir(args.model) and hf_model_type(args.model) in HF_TEXT_MODEL_TYPES
    if text_model:
        if not os.path.isfile(args.calib):
            raise ValueError(f"--model {args.model} is a text encoder: --calib must be a text file with one "
                             f"calibration sample per line, not {args.calib}")
        check_text_file(args.calib)
        calib_files = []
    else:  # timm names, corp directories and Hugging Face vision directories (their image processor's settings)
        calib_files = list_image_files(args.calib)
    check_output_dir(args.out)
    if args.checkpoint_dir is not None:
        _check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    if args.report and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--report draws report.png with matplotlib, which is not installed: "
                          "pip install 'corp-prune[plot]' (or drop --report)")
    config = _prune_config(args)
    if timm_name:
        _check_timm_name(args.model)
    device = _device(args.device)

    import torch

    import corp
    from . import ops
    from .data import calibration_loader

    ops.resolve(config.backend, device)  # an unavailable --backend says so now
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    device, rank, world = _init_distributed(device)
    if rank == 0 and not text_model and args.calib_size is not None and args.calib_size > len(calib_files):
        _warn("prune", f"--calib-size {args.calib_size} but {args.calib} has only {len(calib_files)} images: "
                       f"calibrating on all {len(calib_files)}")

    weights = None
    if args.lazy:
        model, weights = corp.meta_model(args.model), args.checkpoint
    else:
        model = corp.load_model(args.model, checkpoint=args.checkpoint)
    if text_model:
        loader = _text_batches(args, rank, world)
    else:
        loader = calibration_loader(model, calib_files, args.calib_size, args.batch_size, args.workers, args.seed,
                                    shard=(rank, world), directory=_model_dir(args.model))
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
        attn_output_fit=args.attn_output_fit,
        attn_output_fit_share=args.attn_output_fit_share,
        mlp_token_weights=args.mlp_token_weights,
        budget=args.budget,
        budget_metric=args.budget_metric,
        ridge=args.ridge,
        attn_ridge=args.attn_ridge,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        backend=args.backend,
        states=args.states,
        checkpoint_dir=args.checkpoint_dir,
        weights=weights,
        progress=rank == 0,
    )
    seconds = time.perf_counter() - t
    if rank == 0:  # every rank holds the same pruned model; one writes it
        if args.throughput_runs > 0:
            if text_model:
                _warn("prune", "throughput not measured: the CLI measures images/s of vision models")
            elif args.lazy:
                _warn("prune", "throughput not measured: with --lazy the dense model was never in memory")
            else:
                _measure_throughput(args, model, pruned, loader, device, dtype)
        del model
        out = corp.save_pretrained(pruned, args.out, extra_files=_preprocessor_files(args.model))
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


def _model_dir(model: str):
    """``--model`` when it is a directory (where a Hugging Face image processor config may lie)."""
    return model if os.path.isdir(model) else None


def _preprocessor_files(model: str) -> list:
    """A Hugging Face image processor config beside ``--model``: saved with the pruned model, so
    that ``corp eval`` on it preprocesses images as the dense model's processor does."""
    from .data import PREPROCESSOR_NAME

    path = os.path.join(model, PREPROCESSOR_NAME)
    return [path] if os.path.isdir(model) and os.path.isfile(path) else []


def _text_batches(args: argparse.Namespace, rank: int, world: int) -> list:
    """The calibration text file as tokenised batches (the model directory's tokenizer), this rank's share."""
    from transformers import AutoTokenizer

    from .calibration import read_text_lines, tokenised_batches

    lines = read_text_lines(args.calib, max_lines=args.calib_size)
    if rank == 0 and args.calib_size is not None and args.calib_size > len(lines):
        _warn("prune", f"--calib-size {args.calib_size} but {args.calib} has only {len(lines)} non-empty lines: "
                       f"calibrating on all {len(lines)}")
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    return tokenised_batches(lines[rank::world], tokenizer, args.batch_size, args.max_length)


def _check_classes(model, classes: list[str], data: str) -> None:
    """Refuse an ImageFolder with more classes than the model predicts; warn when it has fewer."""
    outputs = getattr(model, "num_classes", None)
    if outputs is None and type(model).__name__.endswith("ForImageClassification"):  # Hugging Face
        outputs = model.config.num_labels
    if not outputs:
        return
    k = len(classes)
    if k > outputs:
        raise ValueError(f"{data} has {k} class folders but the model predicts {outputs} classes: folders are "
                         f"labelled 0..{k - 1} by sorted name, so labels {outputs}..{k - 1} could never be right")
    if k < outputs:
        _warn("eval", f"{data} has {k} class folders but the model predicts {outputs} classes: folders are "
                      f"labelled 0..{k - 1} by sorted name ({classes[0]!r} = 0, ...), so the accuracy is only "
                      f"meaningful if those are the model's classes 0..{k - 1}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .paths import image_folder_classes

    timm_name = _check_model(args.model, args.checkpoint)
    classes = image_folder_classes(args.data)
    if timm_name:
        _check_timm_name(args.model)
    device = _device(args.device)

    import torch

    import corp
    from .data import eval_loader

    model = corp.load_model(args.model, checkpoint=args.checkpoint)
    _check_classes(model, classes, args.data)
    model.to(device).eval()
    loader = eval_loader(model, args.data, args.batch_size, args.workers, directory=_model_dir(args.model))
    top1 = top5 = total = 0
    with torch.no_grad():
        for images, labels in _progress(loader, "corp: evaluating"):
            logits = model(images.to(device))
            logits = getattr(logits, "logits", logits)  # Hugging Face classifiers return an output object
            if not torch.is_tensor(logits):
                raise ValueError(f"--model {args.model} ({type(model).__name__}) returns no class logits: corp eval "
                                 "measures the top-1 of image classifiers (e.g. ViTForImageClassification)")
            labels = labels.to(device)
            k = min(5, logits.shape[-1])
            best = logits.topk(k, dim=-1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(-1).sum())
            total += labels.numel()
    result = {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "images": total, "classes": len(classes)}
    print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.mlp_sparsity, args.attn_sparsity, cache=not args.no_cache)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import ADAPTERS

    for cls in ADAPTERS:
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split()).replace("``", "")
        print(f"{cls.name}: {doc}")
    print("Anything else is refused with an error naming the module corp cannot prune.")
    return 0


_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"prune": cmd_prune, "eval": cmd_eval, "demo": cmd_demo, "models": cmd_models}[args.command]
    try:
        return handler(args)
    except _ERRORS as exc:
        print(f"corp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
