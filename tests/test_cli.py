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
from corp.data import calibration_loader, image_transform

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
    # the same top-1 computed here: every file through the model's own transform, labels from the folders
    transform = image_transform(pruned)
    files = sorted((folders / "data").glob("*/*.png"))
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([("cat", "dog").index(f.parent.name) for f in files])
    with torch.no_grad():
        top1 = 100.0 * float((pruned(images).argmax(-1) == labels).double().mean())
    assert result["images"] == 10
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == 100.0  # two classes: the true one is always among the top 5


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


# --------------------------------------------------------------------------- Hugging Face vision directories


def _hf_vision_dir(root, processor):
    """A tiny HF ViTForImageClassification (3 labels, 16×16 images) saved with ``processor``'s config,
    and 3 class folders of non-square images."""
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            size = (22 + 4 * i, 30)  # (height, width): the shortest-edge resize and the centre crop matter
            Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                 image_size=16, patch_size=4, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(root / "hf")
    if processor is not None:
        processor.save_pretrained(root / "hf")
    return model


def _processors():
    transformers = pytest.importorskip("transformers")
    return {"vit": transformers.ViTImageProcessor(size={"height": 16, "width": 16}),
            "clip": transformers.CLIPImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16}),
            "bit": transformers.BitImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16},
                                                  image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])}


@pytest.mark.parametrize("kind", ["vit", "clip", "bit"])
def test_hf_vision_directory_prunes_from_image_files_as_its_processor_preprocesses(tmp_path, capsys, kind):
    """--model an HF vision directory, --calib image files: the CLI's pixels are the HF image processor's
    own (bit for bit), the pruned model is the API's on those pixels, the processor config is saved with
    it, and corp eval reads the HF classifier's logits."""
    processor = _processors()[kind]
    _hf_vision_dir(tmp_path, processor)
    from corp.paths import list_image_files

    files = list_image_files(tmp_path / "imgs")
    dense = corp.load_model(str(tmp_path / "hf"))
    pixels = next(iter(calibration_loader(dense, files, None, len(files), 0, directory=tmp_path / "hf")))
    reference = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt").pixel_values
    assert torch.equal(pixels, reference)

    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(tmp_path / "hf"), "--calib", str(tmp_path / "imgs"), "--mlp-sparsity", "0.5",
               "--attn-sparsity", "0.5", "--out", str(out), "--workers", "0", "--batch-size", "5"])
    assert rc == 0
    pruned = corp.load_pretrained(out)
    assert type(pruned).__name__ == "ViTForImageClassification"
    assert pruned.vit.encoder.layer[0].intermediate.dense.out_features == 48
    api = corp.prune(dense, [reference[i:i + 5] for i in range(0, len(files), 5)], mlp_sparsity=0.5,
                     attn_sparsity=0.5, batch_size=5)
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)
    assert (out / "preprocessor_config.json").read_bytes() == (tmp_path / "hf" / "preprocessor_config.json").read_bytes()

    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(tmp_path / "imgs"), "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        labels = torch.tensor([i // 4 for i in range(len(files))])
        top1 = 100.0 * float((pruned(reference).logits.argmax(-1) == labels).double().mean())
    assert result["images"] == 12 and result["classes"] == 3
    assert result["top1"] == pytest.approx(top1)


def test_hf_vision_directory_without_a_processor_config_warns_and_uses_the_config_size(tmp_path):
    model = _hf_vision_dir(tmp_path, None)
    with pytest.warns(UserWarning, match=r"no preprocessor_config\.json.*image_size \(16, 16\).*vit defaults"):
        cfg = corp.data.data_config(model, tmp_path / "hf")
    assert cfg["input_size"] == (3, 16, 16) and cfg["mean"] == (0.5, 0.5, 0.5)
    assert cfg["hf_resize"] == (16, 16) and cfg["hf_crop"] is None


def test_eval_refuses_an_hf_model_without_logits(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _hf_vision_dir(tmp_path, _processors()["vit"])
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                                 image_size=16, patch_size=4)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "backbone")
    rc = main(["eval", "--model", str(tmp_path / "backbone"), "--data", str(tmp_path / "imgs"), "--workers", "0"])
    assert rc != 0
    assert "returns no class logits" in capsys.readouterr().err


def test_mlp_token_weights_flag_matches_the_api(folders):
    out = folders / "weighted"
    assert main(["prune", "--model", str(folders / "dense"), "--calib", str(folders / "data"), "--calib-size", "8",
                 "--mlp-sparsity", "0.5", "--out", str(out), "--workers", "0", "--batch-size", "4",
                 "--mlp-token-weights", "on"]) == 0
    pruned = corp.load_pretrained(out)
    assert pruned.corp_config["pruning"]["mlp_token_weights"] == "on"
    dense = corp.load_pretrained(folders / "dense")
    loader = calibration_loader(dense, str(folders / "data"), 8, 4, 0)
    api = corp.prune(dense, loader, mlp_sparsity=0.5, batch_size=4, mlp_token_weights="on")
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)


def test_no_attn_output_fit_flag_turns_off_the_presets_output_fit(folders):
    """corp's preset refits the attention output projection; ``--no-attn-output-fit`` gives the API's
    ``attn_output_fit=False`` model, which differs from the default's."""
    out = folders / "no_outfit"
    assert main(["prune", "--model", str(folders / "dense"), "--calib", str(folders / "data"), "--calib-size", "8",
                 "--attn-sparsity", "0.5", "--out", str(out), "--workers", "0", "--batch-size", "4",
                 "--no-attn-output-fit"]) == 0
    pruned = corp.load_pretrained(out)
    assert pruned.corp_config["pruning"]["attn_output_fit"] is False
    dense = corp.load_pretrained(folders / "dense")
    loader = calibration_loader(dense, str(folders / "data"), 8, 4, 0)
    api = corp.prune(dense, loader, attn_sparsity=0.5, batch_size=4, attn_output_fit=False)
    default = corp.prune(dense, calibration_loader(dense, str(folders / "data"), 8, 4, 0), attn_sparsity=0.5,
                         batch_size=4)
    assert default.corp_config["pruning"]["attn_output_fit"] is True
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)
    assert any(not torch.equal(v, default.state_dict()[k]) for k, v in api.state_dict().items())


def test_attn_output_fit_share_flag_gives_the_apis_model(folders):
    """``--attn-output-fit-share 0.5`` gives the API's ``attn_output_fit_share=0.5`` model (2 batches:
    the fit on the first only), saved with the setting; 0 is refused by the parser."""
    out = folders / "half_outfit"
    assert main(["prune", "--model", str(folders / "dense"), "--calib", str(folders / "data"), "--calib-size", "8",
                 "--attn-sparsity", "0.5", "--out", str(out), "--workers", "0", "--batch-size", "4",
                 "--attn-output-fit-share", "0.5"]) == 0
    pruned = corp.load_pretrained(out)
    assert pruned.corp_config["pruning"]["attn_output_fit_share"] == 0.5
    dense = corp.load_pretrained(folders / "dense")
    api = corp.prune(dense, calibration_loader(dense, str(folders / "data"), 8, 4, 0), attn_sparsity=0.5,
                     batch_size=4, attn_output_fit_share=0.5)
    for k, v in api.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[k], v)
    proc = subprocess.run([sys.executable, "-m", "corp.cli", "prune", "--model", "m", "--calib", "c",
                           "--attn-output-fit-share", "0", "--out", "o"], capture_output=True, text=True)
    assert proc.returncode == 2 and "must be a fraction in (0, 1]" in proc.stderr
