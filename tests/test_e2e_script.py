"""Smoke test of benchmarks/e2e_prune.py, the script benchmarks/gpu_e2e.sh runs on a GPU: the same
flags (bf16 forward passes, JSON rows) on the CPU with a small timm ViT, so that a GPU session's few
minutes are not lost to a broken script."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e_prune.py"


def test_e2e_script_prunes_in_bf16_and_writes_its_phases(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("e2e_prune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "e2e.json"
    assert mod.main(["--images", "4", "--batch-size", "2", "--dtype", "bf16", "--report-images", "2",
                     "--models", "deit_tiny_patch16_224", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "deit_tiny_patch16_224" and row["dtype"] == "bf16" and row["method"] == "corp"
    phases = row["statistics_s"] + row["selection_s"] + row["solve_s"]
    assert 0 < phases <= row["prune_s"] and abs(row["other_s"] - (row["prune_s"] - phases)) < 1e-9
    assert abs(row["ratio"] - row["prune_s"] / row["forward_s"]) < 1e-9
    assert "deit_tiny_patch16_224" in capsys.readouterr().out
