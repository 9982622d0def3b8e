"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before anything imports triton, so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data():
    from corp.demo import load_digits_data

    return load_digits_data()


@pytest.fixture(scope="session")
def digits_model(digits_data):
    """The demo's digits ViT: trained deterministically once per machine and cached under a hash of
    the training code (corp.demo.training_key), so a fresh machine trains it and later runs load it."""
    from corp.demo import digits_vit

    return digits_vit(digits_data, cache=True)


def tiny_vit(**overrides):
    """A small random timm VisionTransformer (odd-ish sizes), eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(overrides.pop("seed", 0))
    cfg = dict(img_size=24, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, mlp_ratio=3.0)
    cfg.update(overrides)
    return VisionTransformer(**cfg).eval()


@pytest.fixture(scope="session", params=["swiglu_vit", "eva"])
def digits_family_model(request, digits_data):
    """``(family, model)``: the tiny gated-MLP ViT and the tiny rotary Eva of corp.demo.DIGITS_FAMILIES,
    trained on digits once per machine and cached like the demo's ViT (under a minute each)."""
    from corp.demo import digits_vit

    return request.param, digits_vit(digits_data, cache=True, family=request.param)
