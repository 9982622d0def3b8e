"""Two MLP ideas for issue 13 on all-MiniLM-L6-v2, measured as prototypes (not in the library).

They patch corp at run time, so that an idea can be measured before it is built; neither won enough
to be built (README, *Real-model ablation*):

- ``token-weighted``: the MLP statistics weight each token by ``1/σ_t²``, the variance over channels
  of the sum the MLP output is added into (BERT: the input of the layer's output LayerNorm), taken
  from the dense model on the same batches; the weights are normalised to mean 1 over real tokens.
  In a post-norm layer an error δ at token t reaches the output as about ``γ ∘ δ / σ_t``, and a few
  tokens have σ_t ten times the median (layer 0: 5% of the tokens carry 90% of the pre-norm energy).
- ``ec-mlp``: the low-rank q/k fit of the default, with the MLP fitted to the *dense* model's outputs
  (``target="dense"``'s error-correcting MLP fit; the library refuses ``target="dense"`` with
  ``logit_solve="lowrank"`` because its error-correcting q/k fit is a different solve).

    HF_HUB_OFFLINE=1 python benchmarks/experiments/minilm_mlp_prototypes.py token-weighted --runs 0.5/0,0.25/0
    HF_HUB_OFFLINE=1 python benchmarks/experiments/minilm_mlp_prototypes.py ec-mlp --runs 0.5/0.5

``--runs``: comma list of ``mlp/attn`` sparsities. Calibration and test sentences as
``benchmarks/real_model_ablation.py`` (``--calib`` even-indexed sentences, 512 odd-indexed ones).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import corp  # noqa: E402
import corp.parts as parts  # noqa: E402
import corp.stats as stats  # noqa: E402
from corp.fit import LowRankLogitFit  # noqa: E402
from corp.reference import gram_update_  # noqa: E402
from corp.select import EnergySelection  # noqa: E402
from minilm_cosine import docstring_sentences, load_minilm, mean_pooled  # noqa: E402
from real_model_ablation import nn_agreement  # noqa: E402

BATCH = 64  # also corp.prune's batch_size, so that the k-th statistics update is the k-th batch


def token_weights(model, batches) -> dict[int, list[torch.Tensor]]:
    """Per layer, per batch: ``(B, T)`` weights ``1/σ_t²`` of the output LayerNorm's input, mean 1 over real tokens."""
    weights: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.encoder.layer))}
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.output.LayerNorm.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0].var(-1)))
             for i, layer in enumerate(model.encoder.layer)]
    with torch.no_grad():
        for b in batches:
            model(**b)
            mask = b["attention_mask"].bool()
            for i, var in seen.items():
                w = var.clamp_min(1e-12).reciprocal()
                weights[i].append(w / w[mask].mean())
    for h in hooks:
        h.remove()
    return weights


def patch_token_weighted(weights, layers: int) -> None:
    made = [0]
    init, _ = stats.MLPStatistics.__init__, stats.MLPStatistics.update

    def weighted_init(self, *a, **k):
        init(self, *a, **k)
        self.layer, self.calls = made[0] % layers, 0
        made[0] += 1

    def weighted_update(self, h, h_dense=None, mask=None):
        w = weights[self.layer][self.calls][mask]
        self.calls += 1
        h = h[mask]
        self.count += float(w.sum())
        gram_update_(self.gram, torch.zeros_like(self.colsum), h * w.sqrt()[:, None])  # Σ w h hᵀ
        self.colsum += (w[:, None].double() * h.double()).sum(0)  # Σ w h

    stats.MLPStatistics.__init__, stats.MLPStatistics.update = weighted_init, weighted_update


def patch_ec_mlp() -> None:
    init = parts.AttentionPruner.__init__

    def lowrank_attention(self, config, kernels, selection):
        init(self, config, kernels, selection)
        self.correcting, self.fit, self.qk_selection = False, LowRankLogitFit(config.attn_ridge), EnergySelection()

    parts.AttentionPruner.__init__ = lowrank_attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prototype", choices=("token-weighted", "ec-mlp"))
    ap.add_argument("--runs", default="0.5/0.5")
    ap.add_argument("--calib", type=int, default=1024)
    args = ap.parse_args(argv)
    model, tok = load_minilm()
    sentences = docstring_sentences()
    calib, test = sentences[0:2 * args.calib:2], sentences[1:2 * 512:2]
    enc = dict(padding=True, truncation=True, max_length=128, return_tensors="pt")
    batches = [tok(calib[i:i + BATCH], **enc) for i in range(0, len(calib), BATCH)]
    test_batch = tok(test, **enc)
    dense = mean_pooled(model, test_batch)
    kw = dict(batch_size=BATCH, report_images=0)
    if args.prototype == "token-weighted":
        patch_token_weighted(token_weights(model, batches), len(model.encoder.layer))
    else:
        patch_ec_mlp()
        kw.update(target="dense", logit_solve="sylvester")  # the q/k fit is replaced by the low-rank one
    for run in args.runs.split(","):
        mlp, attn = (float(v) for v in run.split("/"))
        tick = time.perf_counter()
        pruned = corp.prune(model, batches, mlp_sparsity=mlp, attn_sparsity=attn, **kw)
        emb = mean_pooled(pruned, test_batch)
        print(f"{args.prototype}: MLP {mlp:.0%}, q/k {attn:.0%}: cosine {float((emb * dense).sum(-1).mean()):.4f} "
              f"nn {nn_agreement(emb, dense):.3f} ({time.perf_counter() - tick:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
