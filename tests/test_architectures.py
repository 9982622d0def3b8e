"""Every supported timm ViT variant (random weights, small configs) prunes, runs and round-trips."""
import pytest
import timm
import torch
from timm.layers import LayerScale

import corp

SMALL = dict(img_size=32, depth=2, embed_dim=48, num_heads=3, num_classes=5)

# (timm name, overrides): each row exercises one structural feature
ARCHITECTURES = [
    ("deit_tiny_patch16_224", {}),  # class token, qkv bias
    ("deit_tiny_distilled_patch16_224", {}),  # distillation token and head
    ("deit3_small_patch16_224", {}),  # LayerScale, no_embed_class
    ("vit_small_patch16_224", dict(qkv_bias=False)),  # no qkv bias
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),  # average pooling + fc_norm
    ("vit_base_patch16_clip_224", {}),  # norm_pre (CLIP pre-norm), no patch-embed bias
    ("vit_base_patch16_clip_quickgelu_224", {}),  # QuickGELU activation
    ("vit_base_patch16_reg4_gap_256", {}),  # register tokens, no class token, avg pooling
]


VARIANTS = {  # every corp.prune variant on every architecture
    "paper": dict(method="paper"),
    "corp": dict(),
    "error-correcting": dict(propagate="pruned", target="dense"),
    "per-image": dict(logit_fit="per_image"),
}


@pytest.mark.parametrize("name,overrides", ARCHITECTURES, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in ARCHITECTURES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_architecture_prunes_runs_and_round_trips(tmp_path, name, overrides, variant):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, patch_size=8, **{**SMALL, **overrides}).eval()
    for module in model.modules():  # LayerScale starts near 0, which would make every block an identity
        if isinstance(module, LayerScale):
            module.gamma.data.uniform_(0.5, 1.0)
    images = torch.randn(10, 3, 32, 32)
    pruned = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=4, **VARIANTS[variant])
    assert type(pruned) is type(model)
    assert pruned.corp_report.params_after < pruned.corp_report.params_before
    with torch.no_grad():
        dense_out, out = model(images), pruned(images)
        dense_feat, feat = model.forward_features(images), pruned.forward_features(images)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()
    # compensation keeps the pruned features closer to the dense ones than plain pruning
    plain = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, compensate=False, report_images=0,
                       **VARIANTS[variant])
    with torch.no_grad():
        plain_feat = plain.forward_features(images)
    assert (feat - dense_feat).norm() < (plain_feat - dense_feat).norm()
    corp.save_pretrained(pruned, tmp_path / "m")
    again = corp.load_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(images), out)
    assert again.pretrained_cfg.get("architecture") == model.pretrained_cfg.get("architecture")


@pytest.mark.parametrize("name,overrides", ARCHITECTURES[:3] + ARCHITECTURES[-1:],
                         ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o in ARCHITECTURES[:3] + ARCHITECTURES[-1:]])
def test_architecture_budget_meets_its_flop_budget(name, overrides):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, patch_size=8, **{**SMALL, **overrides}).eval()
    images = torch.randn(8, 3, 32, 32)
    pruned = corp.prune(model, images, budget=0.3, budget_metric="flops", batch_size=4)
    before, after = pruned.corp_report.flops_before, pruned.corp_report.flops_after
    assert (before - after) / before >= 0.3
    with torch.no_grad():
        assert torch.isfinite(pruned(images)).all()


@pytest.mark.parametrize("name,overrides", ARCHITECTURES[:3] + ARCHITECTURES[6:7], ids=lambda v: str(v))
def test_flop_count_matches_torch_flop_counter(name, overrides):
    """corp.report.count_flops against torch.utils.flop_counter.FlopCounterMode on one image, dense and
    pruned: the counter's convolution and matrix products (all the Linear layers), plus the two
    attention matmuls per head, written here at the logical q/k width (the CPU counter does not count
    fused attention, and the pruned modules' zero padding of q/k is not work the model needs)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **overrides}).eval()
    size = model.patch_embed.img_size
    pruned = corp.prune(model, torch.randn(8, 3, *size), mlp_sparsity=0.5, attn_sparsity=0.25, batch_size=4,
                        report_images=0)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for m in (model, pruned):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randn(1, 3, *size))
        counted = counter.get_flop_counts()["Global"]
        products = sum(int(v) for k, v in counted.items()
                       if str(k) in ("aten.convolution", "aten.addmm", "aten.mm", "aten.bmm", "aten.linear"))
        attention = 0
        for block in m.blocks:
            heads, head_dim = block.attn.num_heads, block.attn.head_dim
            qk = getattr(block.attn, "qk_dim", head_dim)
            attention += 2 * heads * tokens * tokens * (qk + head_dim)
        assert corp.report.count_flops(m) == products + attention, (name, m is pruned)
    assert corp.report.count_flops(pruned) < corp.report.count_flops(model)
