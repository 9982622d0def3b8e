"""The timm families beyond the classic ViT (random weights, small configs, no hub):
gated MLPs (SwiGLU, GluMlp/SwiGLUPacked), q/k-normalised attention, and the Eva family
(rotary embeddings, SwiGLU). Each prunes to a real smaller model of the same class, its
compensation beats plain pruning against the dense model on held-out images, it
round-trips through save/load bit for bit, and what corp refuses is refused by name."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import GluMlp, SwiGLU, SwiGLUPacked
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import VisionTransformer

import corp
from corp.models.base import MlpWeights
from corp.select import select_mlp_channels



@pytest.fixture(autouse=True)
def _no_grad():
    """The tests edit weights in place and compare forwards: no autograd (for this module's tests only)."""
    with torch.no_grad():
        yield


def _randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit-scale random weights: timm's inits (tiny gates, 1e-5 layer scales, 0.02 stds) make blocks
    near-identities whose hidden channels are almost linear, which would make every test easy."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
        elif "gamma" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny_vit(**overrides) -> VisionTransformer:
    cfg = dict(img_size=24, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, mlp_ratio=3.0)
    cfg.update(overrides)
    return _randomise_(VisionTransformer(**cfg))


def _tiny_eva(name: str = "eva02_tiny_patch14_224", **overrides):
    cfg = dict(img_size=28, patch_size=7, depth=2, embed_dim=48, num_heads=3, num_classes=5)
    cfg.update(overrides)
    return _randomise_(timm.create_model(name, pretrained=False, **cfg))


def _relative_error(model, reference: torch.Tensor, images: torch.Tensor) -> float:
    return float((model.forward_features(images) - reference).norm() / reference.norm())


def _check_family(tmp_path, model, size: int, attn_sparsity: float, **kwargs):
    """Prune ``model`` at 50% MLP (+ ``attn_sparsity``) and check class, widths, error and round trip."""
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(48, 3, size, size, generator=gen)
    held_out = torch.randn(12, 3, size, size, generator=gen)
    dense = model.forward_features(held_out)
    pruned = corp.prune(model, calib, mlp_sparsity=0.5, attn_sparsity=attn_sparsity, batch_size=16, **kwargs)
    plain = corp.prune(model, calib, mlp_sparsity=0.5, attn_sparsity=attn_sparsity, batch_size=16,
                       compensate=False, report_images=0, **kwargs)
    assert type(pruned) is type(model)
    for before, after in zip(model.blocks, pruned.blocks):
        assert type(after) is type(before) and type(after.mlp) is type(before.mlp)
        assert after.mlp.fc2.in_features == before.mlp.fc2.in_features // 2
    report = pruned.corp_report
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert sum(p.numel() for p in pruned.parameters()) == report.params_after
    compensated, uncompensated = _relative_error(pruned, dense, held_out), _relative_error(plain, dense, held_out)
    assert compensated < uncompensated, (compensated, uncompensated)
    for block in report.blocks:
        assert block.error_compensated < block.error_uncompensated
    corp.save_pretrained(pruned, tmp_path / "m")
    again = corp.load_pretrained(tmp_path / "m")
    assert type(again) is type(model)
    assert torch.equal(again(held_out), pruned(held_out))
    return pruned, compensated, uncompensated


GATED = {
    "SwiGLUPacked": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=6.0),
    "SwiGLU": dict(mlp_layer=SwiGLU, act_layer=nn.SiLU),
    "GluMlp-sigmoid-gate-last": dict(mlp_layer=GluMlp, act_layer=nn.Sigmoid, mlp_ratio=6.0),
}


VARIANTS = {"corp": dict(), "paper": dict(method="paper"), "error-correcting": dict(propagate="pruned", target="dense")}
# every kind with corp's defaults; the other variants on one kind each (they share the kinds' code)
GATED_CASES = [(name, "corp") for name in GATED] + [("SwiGLU", "paper"), ("SwiGLUPacked", "error-correcting")]


@pytest.mark.parametrize("name,variant", GATED_CASES, ids=[f"{n}-{v}" for n, v in GATED_CASES])
def test_gated_mlp_vit_prunes_compensates_and_round_trips(tmp_path, name, variant):
    model = _tiny_vit(**GATED[name])
    _check_family(tmp_path, model, 24, attn_sparsity=0.5, **VARIANTS[variant])


def test_gated_fold_is_exact_when_pruned_channels_are_affine_in_the_kept_ones():
    """Channels n..2n-1 of a SwiGLU are 3× copies of channels 0..n-1 (same gate row, up row × 3): every
    pruned channel is then a linear function of a kept one, and the compensated fold reproduces the dense
    block to rounding while plain pruning does not."""
    model = _tiny_vit(mlp_layer=SwiGLU, act_layer=nn.SiLU, depth=1).double()
    mlp = model.blocks[0].mlp
    n = mlp.fc2.in_features // 2
    mlp.fc1_g.weight[n:] = mlp.fc1_g.weight[:n]
    mlp.fc1_g.bias[n:] = mlp.fc1_g.bias[:n]
    mlp.fc1_x.weight[n:] = 3 * mlp.fc1_x.weight[:n]
    mlp.fc1_x.bias[n:] = 3 * mlp.fc1_x.bias[:n]
    images = torch.randn(64, 3, 24, 24, dtype=torch.float64)
    dense = model.forward_features(images)
    kwargs = dict(mlp_sparsity=0.5, selection="residual", ridge=1e-12, method="paper")
    pruned = corp.prune(model, images, **kwargs)
    plain = corp.prune(model, images, compensate=False, **kwargs)
    kept = pruned.corp_report.blocks[0].mlp_hidden_after
    assert kept == n
    assert _relative_error(pruned, dense, images) < 1e-7
    assert _relative_error(plain, dense, images) > 1e-2


def test_gated_energy_score_uses_gate_and_up_row_norms():
    g = torch.Generator().manual_seed(0)
    w_up, w_gate, w_out = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((10, 6), (10, 6), (4, 10)))
    energy = torch.rand(10, generator=g, dtype=torch.float64)
    weights = MlpWeights(w_up, None, w_out, None, w_gate=w_gate)
    expected = [float(energy[j] * w_gate[j].norm() * w_up[j].norm() * w_out[:, j].norm()) for j in range(10)]
    order = sorted(range(10), key=lambda j: -expected[j])
    kept, pruned = select_mlp_channels(weights, energy, 4)
    assert kept.tolist() == sorted(order[:4]) and pruned.tolist() == sorted(order[4:])


def test_qk_norm_vit_prunes_its_mlps_and_refuses_its_query_key_dims(tmp_path):
    model = _tiny_vit(qk_norm=True)
    pruned, _, _ = _check_family(tmp_path, model, 24, attn_sparsity=0.0)
    assert all(type(b.attn) is type(m.attn) for b, m in zip(pruned.blocks, model.blocks))
    with pytest.raises(ValueError, match=r"attn_sparsity=0.5 in block 0: attn.q_norm/k_norm normalise"):
        corp.prune(model, torch.randn(4, 3, 24, 24), mlp_sparsity=0.5, attn_sparsity=0.5)


def test_hidden_norm_inside_a_gated_mlp_is_refused_by_name():
    model = _tiny_vit(mlp_layer=SwiGLU, act_layer=nn.SiLU, scale_mlp_norm=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.norm.*mixes them"):
        corp.prune(model, torch.randn(4, 3, 24, 24), mlp_sparsity=0.5)


EVAS = {
    "eva02-SwiGLUPacked": ("eva02_tiny_patch14_224", {}),
    "eva02-SwiGLU-split-qk-norm": ("eva02_tiny_patch14_224", dict(swiglu_align_to=8, qk_norm=True)),
    "rope-vit-AttentionRope-Mlp": ("vit_small_patch16_rope_224", {}),
}


# (family, variant, attn_sparsity): rotary q/k pairs pruned too on the eva02 rows
EVA_CASES = [(name, "corp", 0.0) for name in EVAS] + [("eva02-SwiGLUPacked", "corp", 0.5),
                                                        ("eva02-SwiGLUPacked", "error-correcting", 0.5)]


@pytest.mark.parametrize("name,variant,attn", EVA_CASES, ids=[f"{n}-{v}-attn{a}" for n, v, a in EVA_CASES])
def test_eva_prunes_compensates_and_round_trips(tmp_path, name, variant, attn):
    from corp.modules import PrunedRotaryAttention

    arch, overrides = EVAS[name]
    model = _tiny_eva(arch, **overrides)
    pruned, _, _ = _check_family(tmp_path, model, 28, attn_sparsity=attn, **VARIANTS[variant])
    assert all(type(b) is EvaBlock for b in pruned.blocks)
    assert pruned.corp_config["family"] == "timm_eva"
    if attn:
        assert all(isinstance(b.attn, PrunedRotaryAttention) and b.attn.qk_dim == 8 for b in pruned.blocks)


@pytest.mark.parametrize("name,overrides,match", [
    ("eva02_tiny_patch14_224", dict(qk_norm=True), r"block 0: attn\.q_norm/k_norm normalise"),
    ("vit_small_patch16_rope_224", {}, r"block 0: attn is an AttentionRope"),
    ("eva02_tiny_patch14_224", dict(use_rot_pos_emb=False), r"block 0: attn has no rotary embedding"),
], ids=["qk-norm", "AttentionRope", "no-rope"])
def test_eva_refuses_query_key_pruning_it_cannot_do_saying_why(name, overrides, match):
    model = _tiny_eva(name, **overrides)
    with pytest.raises(ValueError, match=match):
        corp.prune(model, torch.randn(4, 3, 28, 28), mlp_sparsity=0.5, attn_sparsity=0.25)


def _pair_dims(dims: torch.Tensor) -> bool:
    return bool((dims[:, ::2] % 2 == 0).all() and (dims[:, 1::2] == dims[:, ::2] + 1).all())


def test_eva_rotary_pruning_without_compensation_is_the_dense_model_without_those_pairs():
    """Oracle: the dense Eva with the pruned pairs' query rows zeroed (a zero query pair stays zero under
    its rotation, so it adds nothing to any logit; the temperature is the dense one)."""
    model = _tiny_eva().double()
    images = torch.randn(24, 3, 28, 28, dtype=torch.float64)
    plain = corp.prune(model, images, attn_sparsity=0.5, compensate=False, method="paper")
    oracle = _tiny_eva().double()
    oracle.load_state_dict(model.state_dict())
    for block, pruned_block in zip(oracle.blocks, plain.blocks):
        attn, dims = block.attn, pruned_block.attn.rope_dims
        assert pruned_block.attn.qk_dim == 8 and _pair_dims(dims)
        d = attn.head_dim
        for h in range(attn.num_heads):
            dropped = [j for j in range(d) if j not in dims[h].tolist()]
            rows = [h * d + j for j in dropped]
            attn.qkv.weight[rows] = 0
            attn.q_bias[rows] = 0
    assert torch.allclose(plain(images), oracle(images), atol=1e-10, rtol=1e-9)


def _logits(attn, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Scaled q·k logits ``(H, N, N)`` of every token against every token of the batch ``x`` ``(B, T, D)``
    (what the pooled fit pools), rotated by timm's own ``apply_rot_embed_cat``."""
    from timm.layers import apply_rot_embed_cat

    from corp.modules import PrunedRotaryAttention

    b, t, _ = x.shape
    h, npt = attn.num_heads, attn.num_prefix_tokens
    if isinstance(attn, PrunedRotaryAttention):
        s, dims = attn.qk_dim, attn.rope_dims
        q, k, _ = attn.qkv(x).split([h * s, h * s, h * attn.head_dim], dim=-1)
        sin, cos = rope.tensor_split(2, -1)
        emb = torch.stack([torch.cat([sin[:, dims[i]], cos[:, dims[i]]], -1) for i in range(h)])  # (H, T', 2s)
    else:
        s = attn.head_dim
        q, k, _ = torch.nn.functional.linear(x, attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])).chunk(3, -1)
        emb = rope[None].expand(h, -1, -1)

    def heads(y):
        y = y.reshape(b, t, h, s).permute(0, 2, 1, 3)  # (B, H, T, s)
        y = torch.cat([y[:, :, :npt], apply_rot_embed_cat(y[:, :, npt:], emb[None])], dim=2)
        return y.permute(1, 0, 2, 3).reshape(h, b * t, s)

    return heads(q) @ heads(k).transpose(1, 2) * s ** -0.5


def test_eva_rotary_fit_lowers_the_logit_error_it_was_fitted_on():
    """The paper's pooled logit objective, on the calibration tokens of block 0: the restricted
    fit is a least-squares solution containing M = 0, so its folded, rotated pruned logits are closer to
    the dense ones than plain pair pruning's; computing them with timm's rotation checks that corp's
    statistics, fold and PrunedRotaryAttention rotate the same dims the same way."""
    model = _tiny_eva().double()
    images = torch.randn(24, 3, 28, 28, dtype=torch.float64)
    kwargs = dict(attn_sparsity=0.5, method="paper", attn_ridge=1e-9)
    fitted = corp.prune(model, images, **kwargs)
    plain = corp.prune(model, images, compensate=False, **kwargs)
    x = model.norm_pre(model._pos_embed(model.patch_embed(images))[0])
    normed, rope = model.blocks[0].norm1(x), model.rope.get_embed().double()
    dense = _logits(model.blocks[0].attn, normed, rope)
    err_fit = (_logits(fitted.blocks[0].attn, normed, rope) - dense).norm()
    err_plain = (_logits(plain.blocks[0].attn, normed, rope) - dense).norm()
    assert torch.equal(fitted.blocks[0].attn.rope_dims, plain.blocks[0].attn.rope_dims)
    assert err_fit < err_plain


def test_eva_with_a_hidden_norm_is_refused_by_name():
    model = _tiny_eva(scale_mlp=True)  # eva02_base/large: SwiGLU with a LayerNorm over the hidden channels
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.norm"):
        corp.prune(model, torch.randn(4, 3, 28, 28), mlp_sparsity=0.5)


def test_eva_resumes_from_a_checkpoint_to_the_same_model(tmp_path):
    model = _tiny_eva()
    images = torch.randn(16, 3, 28, 28)
    whole = corp.prune(model, images, mlp_sparsity=0.5, batch_size=8)
    calls = []

    def stop_after_first(i, _record):
        calls.append(i)
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        corp.prune(model, images, mlp_sparsity=0.5, batch_size=8, checkpoint_dir=tmp_path, callback=stop_after_first)
    resumed = corp.prune(model, images, mlp_sparsity=0.5, batch_size=8, checkpoint_dir=tmp_path)
    assert torch.equal(resumed(images), whole(images))


def test_budget_counts_the_gate_row_of_a_gated_channel_and_meets_its_budget():
    from corp.budget import cost_table

    model = _tiny_vit(mlp_layer=SwiGLU, act_layer=nn.SiLU, depth=1)
    mlp = model.blocks[0].mlp
    removed = cost_table(model, [0.5])[0, 0].item()  # block 0's MLP at 50%
    per_channel = sum(fc.weight.shape[1] + 1 for fc in (mlp.fc1_g, mlp.fc1_x)) + mlp.fc2.out_features
    assert removed == (mlp.fc2.in_features // 2) * per_channel
    images = torch.randn(12, 3, 24, 24)
    pruned = corp.prune(model, images, budget=0.3, batch_size=6)
    report = pruned.corp_report
    assert (report.params_before - report.params_after) / report.params_before >= 0.3
