"""``corp.prune(backend="triton")`` prunes exactly like ``backend="torch"``.

Without a GPU the Triton statistics run in Triton's interpreter on the CPU
(forced by ``backend="triton"``); with a GPU, on the GPU.
"""
import os

import pytest
import torch

import corp
from corp.kernels import triton_available

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available() or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()


@pytest.mark.parametrize("propagate", ["dense", "pruned"])
def test_triton_backend_prunes_like_torch(propagate):
    model = _tiny_vit().to(DEVICE)
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    # Damping pinned at 1e-2 (not the defaults): the tolerances below are for solves of that
    # conditioning; a smaller damping amplifies the same ~1e-7 statistics differences further.
    kwargs = dict(mlp_sparsity=0.5, attn_sparsity=0.5, propagate=propagate, batch_size=8, report_images=0,
                  ridge=1e-2, attn_ridge=1e-2)
    ref = corp.prune(model, images, backend="torch", **kwargs)
    out = corp.prune(model, images, backend="triton", **kwargs)
    assert out.corp_report.settings["backend"].startswith("stats=triton"), out.corp_report.settings
    assert ref.corp_report.settings["backend"].startswith("stats=torch")
    sd_ref, sd_out = ref.state_dict(), out.state_dict()
    assert sd_ref.keys() == sd_out.keys()
    # The statistics agree to ~1e-7 (fp32 sums in a different order); the ridge
    # solves amplify that to ~5e-6 of the weights' scale on the CPU. cuBLAS and
    # the kernel's split-K atomics reorder sums more on a GPU: a little more room there.
    rtol, atol = (1e-5, 1e-6) if not CUDA else (1e-4, 1e-5)
    for name, w in sd_ref.items():
        assert sd_out[name].shape == w.shape, name  # same kept channels / dims
        torch.testing.assert_close(sd_out[name], w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(out(images), ref(images), rtol=10 * rtol, atol=10 * atol)


def test_auto_backend_on_this_device():
    model = _tiny_vit()
    images = torch.randn(4, 3, 16, 16)
    out = corp.prune(model, images, mlp_sparsity=0.25, backend="auto", report_images=0, device="cpu")
    assert out.corp_report.settings["backend"].startswith("stats=torch")  # the CPU keeps the reference
