"""Peak RSS of pruning ViT-Huge with lazy weights (issue 5's bound: model size + 3 GB).

The dense weights are written once to a safetensors file; a fresh process then
prunes a meta-device skeleton with ``corp.prune(..., weights=FILE)``, so the
dense model is never in memory whole. Peak RSS is ru_maxrss of that process
(Python + torch + timm + corp included).

Run: python benchmarks/memory_lazy.py [--model vit_huge_patch14_224] [--images 64]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(model_name: str, weights: str, images: int) -> None:
    import torch

    import corp

    torch.manual_seed(0)
    skeleton = corp.meta_model(model_name)
    calib = torch.randn(images, 3, 224, 224)
    t = time.perf_counter()
    # method="paper": the README's figure was measured with it (the default then)
    pruned = corp.prune(skeleton, calib, mlp_sparsity=0.5, attn_sparsity=0.5, method="paper", weights=weights)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_gb": peak / 1e9, "prune_s": seconds,
                      "params_after_m": corp.report.count_parameters(pruned) / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_huge_patch14_224")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WEIGHTS"))
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.images)
    import timm
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dense.safetensors")
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False)
        params = sum(p.numel() for p in model.parameters())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        del model
        out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--child", args.model, path],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    model_gb = params * 4 / 1e9
    limit = model_gb + 3.0
    print(f"{args.model}: {params / 1e6:.1f} M params, {model_gb:.2f} GB fp32; lazy weights, {args.images} images, "
          f"50%/50%: peak RSS {result['peak_rss_gb']:.2f} GB (whole process), limit model + 3 GB = {limit:.2f} GB: "
          f"{'PASS' if result['peak_rss_gb'] < limit else 'FAIL'}; pruning {result['prune_s']:.0f} s")
    sys.exit(0 if result["peak_rss_gb"] < limit else 1)


if __name__ == "__main__":
    main()
