"""PruneConfig: presets, overrides, and every invalid value or combination refused when it is built."""
import dataclasses
import os

import pytest

from corp.config import METHODS, PruneConfig


def test_presets_are_the_methods_and_options_override_them():
    paper = PruneConfig.create(method="paper")
    assert {k: getattr(paper, k) for k in METHODS["paper"]} == METHODS["paper"]
    default = PruneConfig.create()
    assert {k: getattr(default, k) for k in METHODS["corp"]} == METHODS["corp"]
    mixed = PruneConfig.create(method="paper", selection="residual", logit_fit="centred")
    assert (mixed.propagate, mixed.selection, mixed.logit_fit) == ("dense", "residual", "centred")
    assert mixed.centred_keys and not mixed.error_correcting


def test_config_is_frozen_and_sparsities_normalised():
    cfg = PruneConfig.create(mlp_sparsity=0.5, attn_sparsity=[0.25, 0, 0.5])
    assert cfg.mlp_sparsity == 0.5 and cfg.attn_sparsity == (0.25, 0.0, 0.5)
    assert cfg.per_block("mlp", 3) == [0.5] * 3 and cfg.per_block("attn", 3) == [0.25, 0.0, 0.5]
    with pytest.raises(ValueError, match="3 entries for a model of 2 blocks"):
        cfg.per_block("attn", 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ridge = 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="fast"), "method must be one of"),
    (dict(propagate="sideways"), "propagate must be one of"),
    (dict(target="dense", propagate="dense"), "needs propagate='pruned'"),
    (dict(target="dense", logit_fit="per_image"), "per_image' cannot be combined"),
    (dict(budget=0.5, mlp_sparsity=0.25), "either budget or"),
    (dict(logit_solve="svd"), "logit_solve must be one of"),
    (dict(logit_solve="factored", logit_fit="per_image"), "applies to the pooled and centred"),
    (dict(logit_solve="factored", target="dense"), "applies to the pooled and centred"),
    (dict(logit_solve="lowrank", logit_fit="per_image"), "applies to the pooled and centred"),
    (dict(logit_solve="lowrank", target="dense"), "applies to the pooled and centred"),
    (dict(budget=1.5), "budget must be a fraction"),
    (dict(budget=0.5, budget_metric="watts"), "budget_metric must be one of"),
    (dict(ridge=0.0), "ridge must be a positive finite"),
    (dict(attn_ridge=float("nan")), "attn_ridge must be a positive finite"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(states="tape"), "states must be one of"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(max_images=0), "max_images must be >= 1"),
    (dict(target="global"), "target must be one of"),
    (dict(mlp_token_weights="sometimes"), "mlp_token_weights must be one of"),
    (dict(attn_output_fit="yes"), "attn_output_fit must be True or False"),
    (dict(mlp_sparsity=1.0), "mlp_sparsity must be in"),
    (dict(attn_sparsity="half"), "attn_sparsity must be a number"),
])
def test_invalid_configs_are_refused_when_built(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PruneConfig.create(**kwargs)


def test_a_preset_target_that_needs_the_pruned_stream_is_dropped_for_dense_propagation():
    # only an explicit target='dense' with dense propagation is an error
    assert PruneConfig.create(propagate="dense").target == "local"


def test_settings_name_what_was_computed():
    s = PruneConfig.create(method="paper", mlp_sparsity=0.5).settings()
    assert s["method"] == "paper" and s["mlp_sparsity"] == 0.5 and s["budget_metric"] is None
    assert "batch_size" not in s  # how a run was cut is in the fingerprint only
    assert PruneConfig.create().fingerprint()["batch_size"] == 32


def test_kernels_package_is_the_top_level_folder():
    """corp.kernels is the repository's kernels/ folder (setup.py package_dir), not corp/kernels."""
    import corp.kernels

    repo = os.path.dirname(os.path.dirname(os.path.abspath(corp.__file__)))
    if not os.path.isfile(os.path.join(repo, "setup.py")):
        pytest.skip("corp is installed from a wheel, not used from a checkout")
    folder = os.path.dirname(os.path.abspath(corp.kernels.__file__))
    assert folder == os.path.join(repo, "kernels")
    assert os.path.isfile(os.path.join(folder, "gram.py")) and os.path.isfile(os.path.join(folder, "attention_stats.py"))
    assert corp.prune.__module__ == "corp.pipeline"


def test_the_presets_lowrank_solve_gives_way_to_fits_it_does_not_apply_to():
    assert PruneConfig.create().logit_solve == "lowrank"
    assert PruneConfig.create(logit_fit="per_image").logit_solve == "sylvester"
    assert PruneConfig.create(target="dense").logit_solve == "sylvester"


def test_kept_count_in_whole_pairs_rounds_up_to_a_positive_even_width():
    """Rotary q/k keep whole pairs: the plain count rounded up to a multiple of 2, never 0; the budget's
    cost model and the pruner both count this way (tests/test_hf.py checks the budget is met)."""
    from corp.config import kept_count

    for width in (8, 12, 16, 64, 80):
        for sparsity in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            plain, paired = kept_count(width, sparsity), kept_count(width, sparsity, 2)
            assert paired % 2 == 0 and paired >= max(2, plain) and paired - plain <= 1 + (plain == 0)
    assert kept_count(12, 0.6) == 5 and kept_count(12, 0.6, 2) == 6 and kept_count(16, 0.99, 2) == 2
