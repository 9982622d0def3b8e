"""CORP on the tiny trained models of the other families (issue 12): a timm ViT with SwiGLU MLPs and a
timm Eva with rotary attention, trained by the suite on scikit-learn digits and cached (session fixture
``digits_family_model``). 50% of the MLP hidden channels and 50% of the q/k dims (whole rotary pairs in
the Eva) are pruned with the default method; "no compensation" is the same selection with
``compensate=False``, as in tests/test_end_to_end_digits.py."""
import pytest
import torch

import corp
from corp.demo import accuracy

SPARSITY = dict(mlp_sparsity=0.5, attn_sparsity=0.5)


@pytest.fixture(scope="module")
def results(digits_family_model, digits_data):
    family, model = digits_family_model
    calib = digits_data.train_images[:256]
    test = (digits_data.test_images, digits_data.test_labels)
    pruned = corp.prune(model, calib, **SPARSITY)
    plain = corp.prune(model, calib, compensate=False, report_images=0, **SPARSITY)
    return dict(family=family, model=model, pruned=pruned, plain=plain, dense_acc=accuracy(model, *test),
                corp_acc=accuracy(pruned, *test), plain_acc=accuracy(plain, *test))


def _numbers(results) -> dict:
    return {k: results[k] for k in ("family", "dense_acc", "corp_acc", "plain_acc")}


def test_dense_family_model_is_trained(results):
    assert results["dense_acc"] > 93.0, results["family"]


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


def test_corp_is_well_above_uncompensated_pruning(results, request):
    """The issue's claim, with the threshold tests/test_end_to_end_digits.py uses. It does not hold for
    the rotary Eva: pruning half of its rotary pairs (and MLP channels) *without* compensation already
    costs it under a point (96.44% dense, 95.56% uncompensated, 96.00% CORP, 450 test images), so there
    is not 2 points to win back; attention alone at 75%: 92.22% uncompensated, 92.44% CORP (README,
    "Other families on digits"). Kept as a strict expected failure, so that a change that makes it pass
    is noticed."""
    if results["family"] == "eva":
        request.applymarker(pytest.mark.xfail(strict=True, reason="rotary Eva: uncompensated pruning loses <1 "
                                              "point at 50/50, so CORP cannot be 2 points above it"))
    assert results["corp_acc"] >= results["plain_acc"] + 2.0, _numbers(results)


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
