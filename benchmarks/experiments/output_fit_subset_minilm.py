"""Prototype (a run-time patch, not a corp option): the attention output fit on every k-th calibration
batch only, on all-MiniLM-L6-v2, to see whether its statistics need all the calibration tokens.

The patch keeps every ``--every``-th batch of ``corp.streams.Stream.attention_outputs`` (the output
fit's dense and pruned head outputs); everything else runs as in ``benchmarks/real_model_ablation.py``,
whose arguments follow ``--every``:

    HF_HUB_OFFLINE=1 python benchmarks/experiments/output_fit_subset_minilm.py --every 2 \\
        --calib 1024 --variants corp --sparsities 0.5 --json ''
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import corp.streams as streams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=2, help="keep batches 0, k, 2k, ... for the output fit")
    args, rest = ap.parse_known_args()
    original = streams.Stream.attention_outputs

    def every_kth(self, *a, **kw):
        for i, pair in enumerate(original(self, *a, **kw)):
            if i % args.every == 0:
                yield pair

    streams.Stream.attention_outputs = every_kth
    sys.argv = [str(REPO / "benchmarks" / "real_model_ablation.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
