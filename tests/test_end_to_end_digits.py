"""End to end on a ViT trained by the test suite on scikit-learn digits (session fixture)."""
import pytest
import torch

import corp
from corp.demo import accuracy

SPARSITY = dict(mlp_sparsity=0.5, attn_sparsity=0.5)
HIGH_SPARSITY = dict(mlp_sparsity=0.75, attn_sparsity=0.75)


@pytest.fixture(scope="module")
def calibration(digits_data):
    return digits_data.train_images[:256]


@pytest.fixture(scope="module")
def accuracies(digits_model, digits_data, calibration):
    test = (digits_data.test_images, digits_data.test_labels)
    pruned = corp.prune(digits_model, calibration, **SPARSITY)
    plain = corp.prune(digits_model, calibration, compensate=False, **SPARSITY)
    with torch.no_grad():
        reference = digits_model(digits_data.test_images)
        error = {name: float((m(digits_data.test_images) - reference).norm() / reference.norm())
                 for name, m in (("corp", pruned), ("plain", plain))}
    return {
        "dense": accuracy(digits_model, *test),
        "corp": accuracy(pruned, *test),
        "corp_pruned_stream": accuracy(corp.prune(digits_model, calibration, propagate="pruned", **SPARSITY), *test),
        "plain": accuracy(plain, *test),
        "corp_75": accuracy(corp.prune(digits_model, calibration, **HIGH_SPARSITY), *test),
        "plain_75": accuracy(corp.prune(digits_model, calibration, compensate=False, report_images=0,
                                        **HIGH_SPARSITY), *test),
        "logit_error": error,
        "pruned_model": pruned,
    }


def test_dense_model_is_trained(accuracies):
    assert accuracies["dense"] > 90.0


def test_corp_keeps_accuracy_within_two_points_of_dense(accuracies):
    assert accuracies["corp"] >= accuracies["dense"] - 2.0
    assert accuracies["corp_pruned_stream"] >= accuracies["dense"] - 2.0


def test_corp_is_well_above_uncompensated_pruning(accuracies):
    """CORP against the same selection without compensation. The model the suite trains depends on the
    machine's rounding, so the margins are set from training seeds 0-2 on one machine (a stand-in for
    other machines): at 50/50 the top-1 gain was +7.3, +2.0 and +5.6 points, so a 2-point margin there
    would sit on the edge; the test-set logit error (‖f − f_dense‖ / ‖f_dense‖) was 0.007-0.009 against
    0.25-0.43, and at 75/75 the top-1 gain +62.7, +15.1 and +42.2 points."""
    numbers = {k: v for k, v in accuracies.items() if k != "pruned_model"}
    assert accuracies["corp"] >= accuracies["plain"], numbers
    assert accuracies["logit_error"]["corp"] <= 0.1 * accuracies["logit_error"]["plain"], numbers
    assert accuracies["corp_75"] >= accuracies["plain_75"] + 2.0, numbers


@torch.no_grad()
def test_compensation_lowers_every_blocks_error_on_held_out_images(digits_model, digits_data, accuracies):
    """Per block, on test images never used for calibration, fed the same dense input."""
    pruned = accuracies["pruned_model"]
    plain = corp.prune(digits_model, digits_data.train_images[:256], compensate=False, **SPARSITY)
    x = corp.models.adapter_for(digits_model).embed(digits_model, digits_data.test_images)
    for dense_block, comp_block, plain_block in zip(digits_model.blocks, pruned.blocks, plain.blocks):
        ref = dense_block(x)
        err_comp = (comp_block(x) - ref).norm()
        err_plain = (plain_block(x) - ref).norm()
        assert err_comp <= err_plain
        x = ref


def test_trained_pruned_model_round_trips(tmp_path, accuracies, digits_data):
    pruned = accuracies["pruned_model"]
    corp.save_pretrained(pruned, tmp_path / "digits")
    again = corp.load_pretrained(tmp_path / "digits")
    with torch.no_grad():
        assert torch.equal(again(digits_data.test_images), pruned(digits_data.test_images))
