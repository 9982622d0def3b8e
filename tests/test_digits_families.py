"""CORP on the tiny trained models of the other families (issue 12): a timm ViT with SwiGLU MLPs and a
timm Eva with rotary attention, trained by the suite on scikit-learn digits and cached (session fixture
``digits_family_model``). 50% (and 75%) of the MLP hidden channels and of the q/k dims (whole rotary
pairs in the Eva) are pruned with the default method; "no compensation" is the same selection with
``compensate=False``, as in tests/test_end_to_end_digits.py. The thresholds hold with a margin over
training seeds 0-3 (a stand-in for other machines, whose rounding trains a different model)."""
import pytest
import torch

import corp
from corp.demo import accuracy

SPARSITY = dict(mlp_sparsity=0.5, attn_sparsity=0.5)
HIGH_SPARSITY = dict(mlp_sparsity=0.75, attn_sparsity=0.75)


@torch.no_grad()
def _logit_error(model, reference, images) -> float:
    """``‖f(x) − f_dense(x)‖ / ‖f_dense(x)‖`` over the test images' logits."""
    return float((model(images) - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def results(digits_family_model, digits_data):
    family, model = digits_family_model
    calib = digits_data.train_images[:256]
    test = (digits_data.test_images, digits_data.test_labels)
    with torch.no_grad():
        reference = model(digits_data.test_images)
    out = dict(family=family, model=model, dense_acc=accuracy(model, *test))
    for suffix, sparsity in (("", SPARSITY), ("_75", HIGH_SPARSITY)):
        pruned = corp.prune(model, calib, **sparsity)
        plain = corp.prune(model, calib, compensate=False, report_images=0, **sparsity)
        out.update({f"pruned{suffix}": pruned, f"plain{suffix}": plain,
                    f"corp_acc{suffix}": accuracy(pruned, *test), f"plain_acc{suffix}": accuracy(plain, *test),
                    f"corp_err{suffix}": _logit_error(pruned, reference, digits_data.test_images),
                    f"plain_err{suffix}": _logit_error(plain, reference, digits_data.test_images)})
    return out


def _numbers(results) -> dict:
    return {k: v for k, v in results.items() if k == "family" or k.endswith(("_acc", "_acc_75", "_err", "_err_75"))}


def test_dense_family_model_is_trained(results):
    assert results["dense_acc"] > 95.0, results["family"]  # 97.8-99.8% over training seeds 0-3


def test_family_model_is_what_its_family_says(results):
    from timm.layers import GluMlp, SwiGLU
    from timm.models.eva import Eva

    model, pruned = results["model"], results["pruned"]
    if results["family"] == "eva":
        assert type(model) is Eva and model.rope is not None and type(model.blocks[0].mlp) is GluMlp
        assert all(b.attn.qk_dim == b.attn.head_dim // 2 for b in pruned.blocks)
    else:
        assert all(type(b.mlp) is SwiGLU for b in model.blocks)
        assert all(type(b.mlp) is SwiGLU and b.mlp.fc2.in_features == m.mlp.fc2.in_features // 2
                   for b, m in zip(pruned.blocks, model.blocks))


def test_corp_keeps_accuracy_within_two_points_of_dense(results):
    assert results["corp_acc"] >= results["dense_acc"] - 2.0, _numbers(results)


# CORP's test-set logit error at 50/50 relative to no compensation's, at most (measured over training
# seeds 0-3 of the 60-epoch models: SwiGLU ViT 0.03-0.08, rotary Eva 0.47-0.57)
LOGIT_ERROR_RATIO = {"swiglu_vit": 0.25, "eva": 0.75}


def test_corp_is_well_above_uncompensated_pruning_at_50_50(results):
    """The issue's claim at 50/50, on the model's function: CORP's logits on the test images are far
    closer to the dense model's than those of the same selection without compensation. In top-1 the
    converged tiny models cannot show it at 50/50: without compensation they lose 0-0.9 points (Eva)
    or -0.2-4.9 points (SwiGLU ViT) over training seeds 0-3, so a 2-point margin there would depend on
    the seed and on the machine's rounding (README, "Other families on digits")."""
    assert results["corp_err"] <= LOGIT_ERROR_RATIO[results["family"]] * results["plain_err"], _numbers(results)


def test_corp_is_well_above_uncompensated_pruning_in_top1_at_75_75(results):
    """Where pruning without compensation loses accuracy, CORP wins it back: at 75/75 the SwiGLU ViT
    keeps 2+ points more than no compensation (measured over seeds 0-3: 7.1-43.8 points more). The
    rotary Eva loses at most 1.8 points without compensation even at 75/75 (seeds 0-3), so there CORP
    is asserted within 2 points of dense and not below no compensation (measured: 0.2-1.1 points below
    dense, 0.4-1.3 points above no compensation)."""
    if results["family"] == "eva":
        assert results["corp_acc_75"] >= results["dense_acc"] - 2.0, _numbers(results)
        assert results["corp_acc_75"] >= results["plain_acc_75"], _numbers(results)
    else:
        assert results["corp_acc_75"] >= results["plain_acc_75"] + 2.0, _numbers(results)


@torch.no_grad()
def test_compensation_lowers_every_blocks_error_on_held_out_images(results, digits_data):
    """Per block, on test images never used for calibration, fed the same dense input. In the rotary
    Eva's first block this needs the attention output fit (on by default since 2026-12-01): the
    scaled-rotation logit fit alone lowers the logit error it minimises (last test) but raises that
    block's output error (uncompensated → compensated 63.8 → 65.5 at 50/50); with the output fit
    refitted to the dense attention's output it is 63.8 → 41.4 (blocks 1 and 2: 44.1 → 21.3 and
    121.9 → 37.9)."""
    model, pruned, plain = results["model"], results["pruned"], results["plain"]
    adapter = corp.models.adapter_for(model)
    x = adapter.embed(model, digits_data.test_images)
    for dense_block, comp_block, plain_block in zip(adapter.blocks(model), adapter.blocks(pruned),
                                                    adapter.blocks(plain)):
        ref = dense_block(x)
        assert (comp_block(x) - ref).norm() < (plain_block(x) - ref).norm()
        x = ref


def test_trained_family_model_round_trips(tmp_path, results, digits_data):
    corp.save_pretrained(results["pruned"], tmp_path / "m")
    again = corp.load_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(digits_data.test_images), results["pruned"](digits_data.test_images))


@torch.no_grad()
def test_rotary_fit_lowers_every_blocks_logit_error_on_held_out_images(results, digits_data):
    """What the rotary logit fit minimises, on test images: per block (dense input), the error of the
    pruned attention's logits (kept pairs rotated by their own angles, scale qk_dim ** -0.5) against the
    dense rotated logits (head_dim ** -0.5), each query's logits centred (the softmax ignores a shift),
    is smaller with the fitted scaled rotations than with none."""
    from corp.models.timm_eva import _rotated_qkv

    if results["family"] != "eva":
        pytest.skip("rotary attention only")
    model, pruned, plain = results["model"], results["pruned"], results["plain"]
    adapter = corp.models.adapter_for(model)
    x = adapter.embed(model, digits_data.test_images)
    for dense, comp, unc in zip(adapter.blocks(model), adapter.blocks(pruned), adapter.blocks(plain)):
        attn = dense.block.attn
        normed = dense.block.norm1(x)
        b, t, _ = normed.shape
        h, d = attn.num_heads, attn.head_dim
        q, k, _ = _rotated_qkv(attn, normed, dense.rope).view(b, t, 3, h, d).unbind(2)
        reference = torch.einsum("bthd,buhd->bhtu", q, k) / d ** 0.5
        errors = []
        for block in (comp, unc):
            pa = block.block.attn
            s = pa.qk_dim
            qs, ks, _ = pa.qkv(normed).split([h * s, h * s, h * d], dim=-1)
            qs, ks = qs.view(b, t, h, s).transpose(1, 2), ks.view(b, t, h, s).transpose(1, 2)
            sin, cos = dense.rope.tensor_split(2, -1)
            sin, cos = sin[:, pa.rope_dims].transpose(0, 1), cos[:, pa.rope_dims].transpose(0, 1)
            logits = pa._rotate(qs, sin, cos) @ pa._rotate(ks, sin, cos).transpose(-1, -2) * s ** -0.5
            diff = logits - reference
            errors.append(float((diff - diff.mean(-1, keepdim=True)).norm()))
        assert errors[0] < errors[1], errors
        x = dense(x)
