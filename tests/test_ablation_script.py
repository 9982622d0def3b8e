"""Smoke test of benchmarks/accuracy_ablation.py: --quick on a tiny, one-epoch digits ViT."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import corp
from corp.demo import accuracy, digits_vit, load_digits_data

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_ablation.py"
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, epochs=3)


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("accuracy_ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_quick_ablation(ablation, tmp_path, monkeypatch):
    monkeypatch.setenv("CORP_CACHE", str(tmp_path / "cache"))  # the tiny model never lands in the user's cache
    monkeypatch.setitem(ablation.MODELS, "tiny", dict(label="tiny", overrides=dict(TINY)))
    # a variant that raises must come out as n/a, and the run must go on
    monkeypatch.setitem(ablation.VARIANTS, "bogus", ("bogus", dict(no_such_option=1)))
    variants = ["bogus", *[v for v in ablation.VARIANTS if v != "bogus"], *ablation.BUDGET_VARIANTS]
    lines = []
    out_json = tmp_path / "results" / "ablation.json"
    out = ablation.main(
        ["--quick", "--models", "tiny,a", "--sparsities", "0.5,0.9", "--variants", ",".join(variants),
         "--json", str(out_json)],
        print_fn=lines.append,
    )
    text = "\n".join(lines)

    # --quick: one model, one sparsity, few calibration images
    assert list(out["models"]) == ["tiny"]
    assert out["sparsities"] == [0.5]
    assert out["calibration_images"] == ablation.QUICK_CALIB

    # the tables have every row (and the sparsity table one column)
    rows = _table_rows(text)
    assert "variant" in rows and rows["variant"] == ["50%"]
    expected = ["dense", *ablation.VARIANTS]
    assert {"uncompensated", "paper", "+ec", "+centred", "+per_image", "+residual", "all", "corp"} <= set(expected)
    for label in expected:
        assert label in rows, label
        assert len(rows[label]) == 1
    for name, (label, _, _) in ablation.BUDGET_VARIANTS.items():
        assert any(r.startswith(label) for r in rows), label
    assert rows["bogus"] == ["n/a"]
    assert "n/a bogus [50%]: TypeError" in text and "no_such_option" in text

    # every row ran or carries its error; pruned rows removed something
    entry = out["models"]["tiny"]
    assert set(entry["sparsity"]) == set(expected) - {"dense"}
    for name, cols in entry["sparsity"].items():
        row = cols["50%"]
        assert ("accuracy" in row) != ("error" in row), (name, row)
        if "accuracy" in row:
            assert 0.0 <= row["accuracy"] <= 100.0 and row["prune_seconds"] > 0
            assert 0.0 < row["params_removed"] < 1.0
            assert rows[ablation.VARIANTS[name][0]] == [f"{row['accuracy']:.2f}"]
    assert set(entry["budget"]) == set(ablation.BUDGET_VARIANTS)
    assert 0.0 < entry["uniform_reference"] < 1.0
    for name, row in entry["budget"].items():
        assert ("accuracy" in row) != ("error" in row), (name, row)
        if "accuracy" in row:
            assert row["params_removed"] >= 0.5 - 1e-9 or name != "budget-uniform"
    # only the bogus variant failed
    assert {n for n, cols in entry["sparsity"].items() if "error" in cols["50%"]} == {"bogus"}
    assert not [n for n, row in entry["budget"].items() if "error" in row]

    # dense accuracy, checked independently: the same model as corp.demo builds it (from the cache the
    # script filled), evaluated by corp.demo.accuracy
    data = load_digits_data()
    model = digits_vit(data, **TINY)
    dense = accuracy(model, data.test_images, data.test_labels)
    assert entry["dense_accuracy"] == dense
    assert rows["dense"] == [f"{dense:.2f}"]
    assert entry["params"] == corp.report.count_parameters(model)

    # everything went to the JSON file
    saved = json.loads(out_json.read_text())
    assert saved["models"]["tiny"]["dense_accuracy"] == dense
    assert saved["git"]["commit"] and saved["date"] and saved["command"]
    assert saved["models"]["tiny"]["config"]["embed_dim"] == TINY["embed_dim"]
    assert saved["models"]["tiny"]["train"]["epochs"] == 3


def test_train_seed_option_trains_and_reports_that_seed(ablation, tmp_path, monkeypatch):
    """``--train-seed S`` gives every model training seed S: the dense accuracy is that of the model
    corp.demo trains with seed S, and the JSON records it."""
    monkeypatch.setenv("CORP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ablation.MODELS, "tiny", dict(label="tiny", overrides=dict(TINY)))
    out = ablation.main(["--quick", "--models", "tiny", "--variants", "paper", "--budget", "0", "--train-seed", "1",
                         "--json", ""], print_fn=lambda *a: None)
    entry = out["models"]["tiny"]
    assert entry["train"]["seed"] == 1 and entry["overrides"]["seed"] == 1
    data = load_digits_data()
    seeded = digits_vit(data, **TINY, seed=1)
    assert entry["dense_accuracy"] == accuracy(seeded, data.test_images, data.test_labels)
    default = digits_vit(data, **TINY)  # seed 0: another model
    assert any(not torch.equal(a, b) for a, b in zip(seeded.state_dict().values(), default.state_dict().values()))
