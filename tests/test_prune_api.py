"""corp.prune: inputs, outputs, the untouched original, and clear errors on bad input."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import corp
from corp.modules import PrunedAttention

from conftest import tiny_vit


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.fixture
def model():
    return tiny_vit()


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(20, 3, 24, 24)


def test_prune_returns_smaller_model_and_leaves_input_untouched(model, images):
    before = _state(model)
    pruned = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.25)
    assert _same_state(model, before)
    assert pruned is not model
    for block in pruned.blocks:
        assert isinstance(block.attn, PrunedAttention)
        assert block.attn.qk_dim == 12 and block.attn.head_dim == 16
        assert block.mlp.fc1.out_features == 72 and block.mlp.fc2.in_features == 72
    rep = pruned.corp_report
    assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before
    assert rep.calibration_images == 20 and rep.calibration_tokens == 20 * 10
    assert [b.mlp_hidden_after for b in rep.blocks] == [72, 72]
    assert all(b.error_compensated is not None and b.error_uncompensated is not None for b in rep.blocks)
    assert "params" in str(rep)
    with torch.no_grad():
        out = pruned(images)
        feats = pruned.forward_features(images)
        assert out.shape == (20, 7) and pruned.num_classes == 7
        torch.testing.assert_close(pruned.forward_head(feats), out)


@pytest.mark.parametrize("options", [
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, method="paper"),
    dict(budget=0.5),
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, propagate="pruned", target="dense"),
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, logit_fit="per_image", logit_solve="sylvester"),
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, selection="residual_factored", logit_solve="factored"),
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, attn_output_fit_share=0.5, mlp_token_weights="on"),
    dict(mlp_sparsity=0.5, attn_sparsity=0.5, compensate=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_leaves_the_input_model_untouched(model, images, options):
    """The working copy shares nothing the pruning writes with the user's model, whatever the path
    (budget search, two streams, second passes, replayed heads, no compensation)."""
    before = _state(model)
    pruned = corp.prune(model, images, batch_size=8, **options)
    assert _same_state(model, before)
    assert pruned.corp_report.params_after < pruned.corp_report.params_before
    assert pruned is not model and all(b.mlp.fc1.out_features == 144 for b in model.blocks)


def test_eva_and_bert_inputs_are_untouched():
    """The rotary Eva (whole-pair q/k pruning) and a Hugging Face BERT (padded text batches)."""
    import timm

    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7, depth=2,
                            embed_dim=48, num_heads=3, num_classes=5).eval()
    before = _state(eva)
    corp.prune(eva, torch.randn(8, 3, 28, 28), mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=4)
    assert _same_state(eva, before)

    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=97,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(3, 97, (6, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # padded rows
    before = _state(bert)
    corp.prune(bert, [{"input_ids": ids, "attention_mask": mask}], mlp_sparsity=0.5, attn_sparsity=0.5)
    assert _same_state(bert, before)


def test_impossible_widths_and_combinations_are_named(model, images, tmp_path):
    with pytest.raises(ValueError, match="mlp_sparsity=0.999 leaves no MLP channel of 144 in block 0"):
        corp.prune(model, images, mlp_sparsity=0.999)
    with pytest.raises(ValueError, match="checkpoint_dir is not supported with target='dense'"):
        corp.prune(model, images, mlp_sparsity=0.5, propagate="pruned", target="dense", checkpoint_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_calibration_input_forms_give_identical_results(model, images):
    kwargs = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=8)
    ref = corp.prune(model, images, **kwargs).state_dict()
    labels = torch.zeros(20, dtype=torch.long)
    forms = [
        [images[:7], images[7:]],
        DataLoader(TensorDataset(images, labels), batch_size=6),
        ({"image": images[i : i + 5]} for i in range(0, 20, 5)),
    ]
    for form in forms:
        got = corp.prune(model, form, **kwargs).state_dict()
        for k in ref:  # other batch boundaries only change the fp32 summation order of the statistics
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_max_images_limits_calibration(model, images):
    pruned = corp.prune(model, images, mlp_sparsity=0.5, max_images=5, batch_size=2)
    assert pruned.corp_report.calibration_images == 5


def test_inplace_prunes_the_given_model(model, images):
    out = corp.prune(model, images, mlp_sparsity=0.5, inplace=True)
    assert out is model and model.blocks[0].mlp.fc1.out_features == 72


def test_zero_sparsity_changes_nothing(model, images):
    pruned = corp.prune(model, images)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), model(images))


@pytest.mark.parametrize("propagate", ["dense", "pruned"])
def test_compensation_reduces_output_error(model, images, propagate):
    with torch.no_grad():
        ref = model(images)
        comp = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, propagate=propagate)(images)
        plain = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, compensate=False)(images)
    assert (comp - ref).norm() < 0.8 * (plain - ref).norm()


def test_pruned_model_runs_under_torch_compile(model, images):
    pruned = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5)
    compiled = torch.compile(pruned, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images[:4]), pruned(images[:4]), rtol=1e-4, atol=1e-5)


def test_lower_precision_dtype(model, images):
    pruned = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, dtype=torch.bfloat16)
    assert next(pruned.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(pruned(images.bfloat16()).float()).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mlp_sparsity=1.0), "mlp_sparsity must be in"),
        (dict(mlp_sparsity=-0.1), "mlp_sparsity must be in"),
        (dict(attn_sparsity=1.5), "attn_sparsity must be in"),
        (dict(attn_sparsity=0.97), "leaves no query/key dim"),
        (dict(mlp_sparsity=0.5, propagate="sideways"), "propagate"),
        (dict(mlp_sparsity=0.5, backend="fortran"), "backend"),
        (dict(mlp_sparsity=0.5, ridge=0.0), "ridge"),
        (dict(mlp_sparsity=0.5, batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_raise_value_error(model, images, kwargs, match):
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        corp.prune(model, images, **kwargs)
    assert _same_state(model, before)


def test_sparsity_type_is_checked(model, images):
    with pytest.raises(TypeError, match="mlp_sparsity"):
        corp.prune(model, images, mlp_sparsity="half")


@pytest.mark.parametrize(
    "calibration,exc,match",
    [
        (torch.randn(0, 3, 24, 24), ValueError, "empty"),
        ([], ValueError, "empty"),
        (torch.randn(4, 1, 24, 24), ValueError, "1 channels, the model expects 3"),
        (torch.randn(4, 3, 32, 32), ValueError, "32×32, the model expects 24×24"),
        (torch.randn(3, 24, 24), ValueError, r"\(N, C, H, W\)"),
        ([torch.randn(3, 24, 24)], ValueError, "expected a batch"),
        (torch.full((2, 3, 24, 24), float("nan")), ValueError, "non-finite"),
        ("images/", TypeError, "calibration must be"),
        ([["a"]], TypeError, "expected a tensor"),
    ],
)
def test_bad_calibration_data(model, calibration, exc, match):
    before = _state(model)
    with pytest.raises(exc, match=match):
        corp.prune(model, calibration, mlp_sparsity=0.5)
    assert _same_state(model, before)


def test_non_finite_activations_name_the_block(model, images):
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
    before = _state(model)
    with pytest.raises(ValueError, match="block 1"):
        corp.prune(model, images, mlp_sparsity=0.5)
    assert _same_state(model, before)


def test_unsupported_models_and_modules_are_named(images):
    import timm

    with pytest.raises(TypeError, match="ResNet"):
        corp.prune(timm.create_model("resnet18", num_classes=3), images, mlp_sparsity=0.5)
    with pytest.raises(ValueError, match=r"block 0: attn\.q_norm"):  # q/k norms: MLP pruning only
        corp.prune(tiny_vit(qk_norm=True), images, attn_sparsity=0.5)
    from timm.layers import GatedMlp, SwiGLUPacked

    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.norm"):
        corp.prune(tiny_vit(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, scale_mlp_norm=True), images, mlp_sparsity=0.5)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp' \(GatedMlp\)"):
        corp.prune(tiny_vit(mlp_layer=GatedMlp), images, mlp_sparsity=0.5)
    with pytest.raises(TypeError, match="Linear"):
        corp.prune(nn.Linear(3, 3), images, mlp_sparsity=0.5)


def test_already_pruned_model_is_refused(model, images):
    pruned = corp.prune(model, images, attn_sparsity=0.5)
    with pytest.raises(ValueError, match="already pruned"):
        corp.prune(pruned, images, attn_sparsity=0.5)


def test_fewer_tokens_than_channels_warns_once_naming_the_block():
    model = tiny_vit(mlp_ratio=8.0)  # 384 hidden channels; 2 images × 10 tokens = 20 tokens
    images = torch.randn(2, 3, 24, 24)
    with pytest.warns(UserWarning, match=r"block 0: 20 calibration tokens for 384 MLP channels") as record:
        corp.prune(model, images, mlp_sparsity=0.5)
    assert sum("calibration tokens for" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corp.prune(model, torch.randn(40, 3, 24, 24), mlp_sparsity=0.5, attn_sparsity=0.5)  # 400 tokens: quiet
