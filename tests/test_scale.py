"""Scale features: hidden-state locations, data parallelism over 2 gloo processes, resume after a kill."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

import corp

from conftest import tiny_vit

KW = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=4)


def _images(n=16, seed=1):
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


def _assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("location", ["cpu", "disk"])
def test_state_locations_give_identical_results(tmp_path, monkeypatch, location):
    """Without a checkpoint folder, disk states go to a ``corp-states-*`` folder in the system's temp
    folder (here ``tmp_path``), which exists while the blocks are pruned and is gone afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, images = tiny_vit(), _images()
    ref = corp.prune(model, images, **KW)

    def spill_folders():
        return [p for p in tmp_path.iterdir() if p.name.startswith("corp-states-")]

    during = []
    out = corp.prune(model, images, states=location, checkpoint_dir=None,
                     callback=lambda i, rec: during.append(len(spill_folders())), **KW)
    for k, v in ref.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
    assert during == ([1, 1] if location == "disk" else [0, 0])
    assert spill_folders() == []


def test_bad_state_location_is_refused():
    with pytest.raises(ValueError, match="states must be one of"):
        corp.prune(tiny_vit(), _images(), states="cloud", **KW)


def test_blocks_are_copied_one_at_a_time_and_the_input_is_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    corp.prune(model, _images(), callback=lambda i, rec: seen.append((i, rec.mlp_hidden_after)), **KW)
    assert seen == [(0, 72), (1, 72)]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _worker(rank, world, init_file, out_dir, propagate):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images = _images()
        share = images[rank::world]  # each rank embeds and propagates its own images
        pruned = corp.prune(tiny_vit(), share, propagate=propagate, **KW)
        torch.save(pruned.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        torch.save(pruned.corp_report.calibration_images, os.path.join(out_dir, f"images{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("propagate", ["dense", "pruned"])
def test_two_gloo_processes_equal_one_process_on_the_union(tmp_path, propagate):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), propagate), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k in ranks[0]:  # rank 0's block is broadcast: every rank holds the same weights
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert torch.load(tmp_path / "images0.pt") == 16  # the report counts the images of all ranks
    single = corp.prune(tiny_vit(), _images(), propagate=propagate, **KW).state_dict()
    # Same statistics up to fp summation order (other chunks, an all_reduce): weights agree to ~1e-6.
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import corp
    from conftest import tiny_vit
    torch.set_num_threads(2)
    images = torch.randn(16, 3, 24, 24, generator=torch.Generator().manual_seed(1))

    def die_after(index, record):
        if index == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable signal: no clean-up runs

    corp.prune(tiny_vit(depth=4), images, checkpoint_dir={ckpt!r}, callback=die_after, propagate={prop!r},
               mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=4)
    """
)


@pytest.mark.parametrize("propagate", ["dense", "pruned"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, propagate):
    ckpt = tmp_path / "ckpt"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), kill_after=1, ckpt=str(ckpt), prop=propagate)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (ckpt / "progress.json").is_file()
    resumed_blocks = []
    kwargs = dict(propagate=propagate, **KW)
    resumed = corp.prune(tiny_vit(depth=4), _images(), checkpoint_dir=str(ckpt),
                         callback=lambda i, r: resumed_blocks.append(i), **kwargs)
    assert resumed_blocks == [2, 3]  # blocks 0 and 1 came from the checkpoint
    full = corp.prune(tiny_vit(depth=4), _images(), **kwargs)
    _assert_same_weights(resumed, full, rtol=1e-6, atol=1e-7)
    assert [b.index for b in resumed.corp_report.blocks] == [0, 1, 2, 3]
    assert resumed.corp_report.calibration_images == 16


def test_resume_with_other_arguments_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    corp.prune(tiny_vit(), _images(), checkpoint_dir=ckpt, **KW)
    with pytest.raises(ValueError, match="different arguments.*mlp_sparsity"):
        corp.prune(tiny_vit(), _images(), checkpoint_dir=ckpt, **{**KW, "mlp_sparsity": 0.25})
    with pytest.raises(ValueError, match="different arguments.*first_batch"):
        corp.prune(tiny_vit(), _images(seed=5), checkpoint_dir=ckpt, **KW)
    with pytest.raises(ValueError, match="different arguments.*weights"):
        corp.prune(tiny_vit(seed=3), _images(), checkpoint_dir=ckpt, **KW)


def test_lazy_weights_from_safetensors_equal_the_in_memory_model(tmp_path):
    from safetensors.torch import save_file

    model = tiny_vit(depth=3)
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with torch.device("meta"):
        skeleton = tiny_vit(depth=3)
    written = open(path, "rb").read()
    lazy = corp.prune(skeleton, _images(), weights=path, **KW)
    assert open(path, "rb").read() == written  # the weights file is only read
    ref = corp.prune(model, _images(), **KW)
    for k, v in ref.state_dict().items():
        assert torch.equal(lazy.state_dict()[k], v), k
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # the skeleton stays a skeleton
    with pytest.raises(ValueError, match="meta device"):
        corp.prune(skeleton, _images(), **KW)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "blocks.2.mlp" not in k}, path)
    with pytest.raises(ValueError, match="no tensor 'blocks.2.mlp.fc1.weight'"):
        corp.prune(skeleton, _images(), weights=path, **KW)


def test_budget_run_resumes_with_its_checkpointed_allocation(tmp_path):
    """An interrupted budgeted run resumes from its checkpoint with the allocation it chose (not a
    new measurement) and ends with the uninterrupted run's weights."""
    ckpt = str(tmp_path / "ckpt")

    class Interrupt(Exception):
        pass

    def stop_after_block_1(i, _record):
        if i == 1:
            raise Interrupt

    kw = dict(budget=0.3, batch_size=4, report_images=4)
    with pytest.raises(Interrupt):
        corp.prune(tiny_vit(depth=4), _images(), checkpoint_dir=ckpt, callback=stop_after_block_1, **kw)
    seen = []
    resumed = corp.prune(tiny_vit(depth=4), _images(), checkpoint_dir=ckpt, callback=lambda i, r: seen.append(i),
                         **kw)
    assert seen == [2, 3]
    full = corp.prune(tiny_vit(depth=4), _images(), **kw)
    assert resumed.corp_report.allocation == full.corp_report.allocation
    _assert_same_weights(resumed, full, rtol=1e-6, atol=1e-7)
