"""Time the MLP residual greedy (``corp.select.select_mlp_channels_by_residual``) of the working tree
against the same function at an earlier git revision, on one synthetic GELU covariance, interleaved;
also checks that both keep the same channels.

    python benchmarks/experiments/mlp_greedy_vs_revision.py --rev b75edda --width 1536

The earlier ``corp/select.py`` is read with ``git show REV:corp/select.py`` and imported beside the
current package (its relative imports pointed at ``corp``), so only the greedy differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import corp.select as current  # noqa: E402


def select_at(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:corp/select.py"], check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("from .", "from corp.")
    path = Path(tempfile.mkdtemp()) / f"select_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"select_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="b75edda")
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    old = select_at(args.rev)
    torch.manual_seed(0)
    d = args.width
    h = torch.nn.functional.gelu(torch.randn(12000, d // 4) @ torch.randn(d // 4, d) * 0.1 + 0.3 * torch.randn(d))
    h = (h - h.mean(0)).double()
    cov = h.T @ h / h.shape[0]
    w2 = torch.randn(d // 4, d, dtype=torch.float64) * 0.02
    times: dict[str, list[float]] = {"old": [], "new": []}
    kept = {}
    for _ in range(args.repeats):
        for name, module in (("old", old), ("new", current)):
            tick = time.perf_counter()
            kept[name], _ = module.select_mlp_channels_by_residual(cov, w2, d // 2, 1e-3)
            times[name].append(time.perf_counter() - tick)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"D={d}, keep {d // 2}, {torch.get_num_threads()} threads: {args.rev} {med['old']:.3f} s, working tree "
          f"{med['new']:.3f} s (ratio {med['new'] / med['old']:.2f}, medians of {args.repeats}, interleaved); "
          f"same kept channels: {torch.equal(kept['old'], kept['new'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
