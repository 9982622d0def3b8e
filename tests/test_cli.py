"""The corp command line on image folders written by the test."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import corp
from corp.cli import main
from corp.data import calibration_loader

from conftest import tiny_vit


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    model = tiny_vit(num_classes=2)
    corp.save_pretrained(model, tmp_path / "dense")
    return tmp_path


def test_prune_then_eval(folders, capsys):
    out = folders / "pruned"
    rc = main(["prune", "--model", str(folders / "dense"), "--calib", str(folders / "data"), "--calib-size", "8",
               "--mlp-sparsity", "0.5", "--attn-sparsity", "0.5", "--out", str(out), "--workers", "0",
               "--batch-size", "3", "--report"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "saved to" in printed and "params" in printed
    pruned = corp.load_pretrained(out)
    assert pruned.blocks[0].mlp.fc1.out_features == 72
    saved_report = corp.PruneReport.from_dict(json.loads((out / "report.json").read_text()))
    assert [b.mlp_hidden_after for b in saved_report.blocks] == [72, 72]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pruned.corp_config["pruning"]["calibration_images"] == 8

    # the CLI prunes exactly what the API prunes on the same preprocessed images
    dense = corp.load_pretrained(folders / "dense")
    loader = calibration_loader(dense, str(folders / "data"), 8, 3, 0)
    api = corp.prune(dense, loader, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=3)
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)

    rc = main(["eval", "--model", str(out), "--data", str(folders / "data"), "--workers", "0"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 10 and 0 <= result["top1"] <= result["top5"] <= 100


def test_errors_are_reported_not_raised(folders, capsys):
    rc = main(["prune", "--model", str(folders / "dense"), "--calib", str(folders / "nowhere"), "--mlp-sparsity", "0.5",
               "--out", str(folders / "x"), "--workers", "0"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_sparsity_is_rejected_by_the_parser():
    proc = subprocess.run([sys.executable, "-m", "corp.cli", "prune", "--model", "m", "--calib", "c",
                           "--mlp-sparsity", "1.5", "--out", "o"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "sparsity must be in [0, 1)" in proc.stderr


def test_prune_under_torchrun_with_two_gloo_processes(folders):
    """`torchrun --nproc_per_node 2 corp prune ...` equals a single-process run on the same images."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--model", str(folders / "dense"), "--calib", str(folders / "data"), "--mlp-sparsity", "0.5",
              "--attn-sparsity", "0.5", "--workers", "0", "--batch-size", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "corp.cli", "prune", *common, "--out", str(folders / "ddp")],
        capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert main(["prune", *common, "--out", str(folders / "single")]) == 0
    ddp, single = corp.load_pretrained(folders / "ddp"), corp.load_pretrained(folders / "single")
    assert ddp.corp_config["pruning"]["calibration_images"] == 10
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_prune_with_variants_and_budget_matches_the_api(folders):
    out = folders / "budget"
    args = ["prune", "--model", str(folders / "dense"), "--calib", str(folders / "data"), "--calib-size", "8",
            "--out", str(out), "--workers", "0", "--batch-size", "4", "--propagate", "pruned", "--target", "dense",
            "--logit-fit", "centred", "--selection", "residual", "--budget", "0.3"]
    assert main(args) == 0
    pruned = corp.load_pretrained(out)
    settings = pruned.corp_config["pruning"]
    assert (settings["target"], settings["logit_fit"], settings["selection"], settings["budget"]) == \
        ("dense", "centred", "residual", 0.3)
    dense = corp.load_pretrained(folders / "dense")
    loader = calibration_loader(dense, str(folders / "data"), 8, 4, 0)
    api = corp.prune(dense, loader, propagate="pruned", target="dense", logit_fit="centred", selection="residual",
                     budget=0.3, batch_size=4)
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)
    assert corp.report.count_parameters(pruned) <= 0.7 * corp.report.count_parameters(dense)
