"""save_pretrained / load_pretrained: identical outputs, complete config, atomic and careful writes."""
import json
import os

import pytest
import torch

import corp
from corp.io import CONFIG_NAME, WEIGHTS_NAME

from conftest import tiny_vit


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    return corp.prune(tiny_vit(), torch.randn(12, 3, 24, 24), mlp_sparsity=0.5, attn_sparsity=0.5)


def test_round_trip_is_identical_and_config_is_complete(tmp_path, pruned):
    out = corp.save_pretrained(pruned, tmp_path / "m")
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["corp_version"] == corp.__version__
    assert cfg["architecture"]["class"] == "VisionTransformer"
    assert cfg["blocks"] == [{"mlp_hidden": 72, "qk_dim": 8}] * 2
    assert cfg["dense_blocks"] == [{"mlp_hidden": 144, "qk_dim": 16}] * 2
    assert cfg["pruning"]["mlp_sparsity"] == 0.5 and cfg["pruning"]["calibration_images"] == 12
    assert len(cfg["report"]["blocks"]) == 2
    again = corp.load_pretrained(out)
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    assert again.corp_report.params_after == pruned.corp_report.params_after
    assert not again.training


def test_dense_model_round_trip(tmp_path):
    model = tiny_vit(qkv_bias=False, class_token=False, global_pool="avg")
    corp.save_pretrained(model, tmp_path / "dense")
    again = corp.load_model(str(tmp_path / "dense"))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_overwrite_replaces_a_previous_save(tmp_path, pruned):
    corp.save_pretrained(tiny_vit(), tmp_path / "m")
    corp.save_pretrained(pruned, tmp_path / "m")
    assert corp.load_pretrained(tmp_path / "m").blocks[0].mlp.fc1.out_features == 72
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or backup directories left behind


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, pruned):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a corp model directory"):
        corp.save_pretrained(pruned, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_save_intact(tmp_path, pruned, monkeypatch):
    corp.save_pretrained(pruned, tmp_path / "m")
    before = (tmp_path / "m" / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("corp.io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        corp.save_pretrained(tiny_vit(), tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a corp model directory"):
        corp.load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a corp model config"):
        corp.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a corp model directory"):
        corp.load_model(str(tmp_path))


def test_a_model_saved_by_corp_0_1_0_still_loads():
    """tests/data holds a pruned tiny ViT written by corp 0.1.0 before the restructuring (its config
    names no model family) with the logits it gave on a probe batch: today's loader restores every saved
    tensor bitwise and reproduces the logits. Those were computed on the machine that wrote them, so they
    are compared to fp32 rounding: another CPU's kernels round differently (measured on a second
    machine: bitwise different, max |Δ| 6e-8 on logits of size 0.2)."""
    from safetensors.torch import load_file

    data = os.path.join(os.path.dirname(__file__), "data")
    model = corp.load_pretrained(os.path.join(data, "saved_by_corp_0.1.0"))
    cfg = json.loads(open(os.path.join(data, "saved_by_corp_0.1.0", CONFIG_NAME)).read())
    assert "family" not in cfg and cfg["blocks"] == [{"mlp_hidden": 24, "qk_dim": 6}] * 2
    saved = load_file(os.path.join(data, "saved_by_corp_0.1.0", "model.safetensors"))
    state = model.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    probe = load_file(os.path.join(data, "saved_by_corp_0.1.0_probe.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(probe["probe"]), probe["logits"], rtol=1e-5, atol=1e-6)
