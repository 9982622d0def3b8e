"""Issue 6 variants wired into corp.prune: error-correcting targets, softmax-aware logit fits,
residual selection, per-block sparsities and budgets. Each against an independent reference."""
import pytest
import torch

import corp
from corp.budget import model_total
from corp.report import count_parameters

from conftest import tiny_vit
from stages import (
    attention_compensation,
    attention_error_correcting_solve,
    kept_count,
    mlp_compensation,
    mlp_error_correcting_fold,
)


def _images(n=24, seed=1):
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- error-correcting fits, closed form


def test_mlp_error_correcting_fold_is_least_squares_on_the_dense_output():
    """W2' ĥ_S + b2' fitted to the dense W2 h + b2 (λ → 0) equals brute-force least squares."""
    g = torch.Generator().manual_seed(0)
    n, width, out = 400, 10, 4
    h = torch.randn(n, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                             dtype=torch.float64)
    h_hat = h + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64) + 0.2  # a disturbed stream
    w2 = torch.randn(out, width, generator=g, dtype=torch.float64)
    b2 = torch.randn(out, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5, 8, 9])
    mu, mu_hat = h.mean(0), h_hat.mean(0)
    cov_hat = (h_hat - mu_hat).T @ (h_hat - mu_hat) / n
    cross = (h - mu).T @ (h_hat - mu_hat) / n
    new_w2, new_b2, _, _ = mlp_error_correcting_fold(w2, b2, mu, mu_hat, cov_hat, cross, kept, 1e-12)
    design = torch.cat([h_hat[:, kept], torch.ones(n, 1, dtype=torch.float64)], 1)
    target = h @ w2.T + b2
    coef = torch.linalg.lstsq(design, target).solution  # (|S| + 1, out)
    torch.testing.assert_close(new_w2, coef[:-1].T, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(new_b2, coef[-1], rtol=1e-6, atol=1e-8)


def test_mlp_error_correcting_fold_reduces_to_the_paper_on_one_stream():
    g = torch.Generator().manual_seed(1)
    n, width = 300, 9
    h = torch.randn(n, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                             dtype=torch.float64)
    w2 = torch.randn(3, width, generator=g, dtype=torch.float64)
    b2 = torch.randn(3, generator=g, dtype=torch.float64)
    kept, pruned = torch.tensor([1, 2, 4, 7]), torch.tensor([0, 3, 5, 6, 8])
    mu = h.mean(0)
    cov = (h - mu).T @ (h - mu) / n
    new_w2, new_b2, lam, _ = mlp_error_correcting_fold(w2, b2, mu, mu, cov, cov, kept, 1e-2)
    coef, intercept, lam_paper = mlp_compensation(mu, cov, kept, pruned, 1e-2)
    assert lam == pytest.approx(lam_paper, rel=1e-12)
    torch.testing.assert_close(new_w2, w2[:, kept] + w2[:, pruned] @ coef, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(new_b2, b2 + w2[:, pruned] @ intercept, rtol=1e-9, atol=1e-10)


def test_attention_error_correcting_solve_is_least_squares_over_pairs():
    """q̂_Sᵀ(I+M)k̂_S fitted to the dense logits qᵀk over all pairs (λ → 0) vs brute force."""
    g = torch.Generator().manual_seed(2)
    heads, d, s, n = 2, 5, 3, 30
    q = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    q_hat = q + 0.2 * torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    k_hat = k + 0.2 * torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    kept = torch.tensor([[0, 2, 4], [1, 2, 3]])
    pruned = torch.tensor([[1, 3], [0, 4]])
    m, _ = attention_error_correcting_solve(q_hat.mT @ q_hat, k_hat.mT @ k_hat, q_hat.mT @ q, k.mT @ k_hat,
                                           kept, pruned, 1e-14)
    for head in range(heads):
        qs, ks = q_hat[head][:, kept[head]], k_hat[head][:, kept[head]]
        target = (q[head] @ k[head].T - qs @ ks.T).reshape(-1)  # all (i, j) pairs
        design = torch.einsum("ia,jb->ijab", qs, ks).reshape(n * n, s * s)
        brute = torch.linalg.lstsq(design, target).solution.reshape(s, s)
        torch.testing.assert_close(m[head], brute, rtol=1e-6, atol=1e-8)
    # one stream: the paper's fit
    same, _ = attention_error_correcting_solve(q.mT @ q, k.mT @ k, q.mT @ q, k.mT @ k, kept, pruned, 1e-3)
    paper, _ = attention_compensation(q.mT @ q, k.mT @ k, kept, pruned, 1e-3)
    torch.testing.assert_close(same, paper, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- engine


def test_error_correcting_prune_matches_local_on_the_first_block_and_fits_the_dense_model_better():
    model = tiny_vit(depth=3)
    x = _images()
    # (the attention output fit off: block 0's weights are compared, and it refits the projection on
    # top of two logit solves that agree only to rounding)
    kw = dict(mlp_sparsity=0.6, attn_sparsity=0.5, propagate="pruned", batch_size=8, report_images=8,
              attn_output_fit=False)
    # the error-correcting logit fit reduces to the Sylvester form of the local fit on identical streams
    local = corp.prune(model, x, target="local", logit_solve="sylvester", **kw)
    ec = corp.prune(model, x, target="dense", **kw)
    # block 0's attention sees identical streams: the same weights (its MLP is fitted to the dense
    # block's MLP output, which also undoes the attention's pruning error, so fc2 differs by design)
    for name, w in local.blocks[0].state_dict().items():
        if not name.startswith("mlp.fc2"):
            torch.testing.assert_close(ec.blocks[0].state_dict()[name], w, rtol=1e-5, atol=1e-6)
    # later blocks are fitted to the dense model's features: closer to them on the calibration images
    with torch.no_grad():
        dense_feat = model.forward_features(x)
        err = {n: float((m.forward_features(x) - dense_feat).norm()) for n, m in (("local", local), ("ec", ec))}
    assert err["ec"] < err["local"], err
    assert ec.corp_report.settings["target"] == "dense"


@pytest.mark.parametrize("logit_fit", ["centred", "per_image"])
def test_softmax_aware_fits_prune_and_ignore_a_per_image_key_shift(logit_fit):
    """A key bias (a per-image constant in every key) moves the paper's pooled fit but not the
    softmax-aware ones, and softmax cannot see it: their pruned models are unchanged by it
    (selection by residual on the same centred Grams, since Σq²k² moves with the bias too)."""
    model = tiny_vit(depth=1)
    x = _images(16)
    shifted = tiny_vit(depth=1)
    with torch.no_grad():
        e = model.embed_dim
        shifted.blocks[0].attn.qkv.bias[e:2 * e] += 3.0 * torch.randn(e, generator=torch.Generator().manual_seed(3))
    # the logit fits alone: the attention output fit (on in corp's preset) would absorb part of the move
    kw = dict(mlp_sparsity=0.0, attn_sparsity=0.5, batch_size=8, report_images=8, selection="residual",
              attn_output_fit=False)
    outs = {}
    for name, m in (("base", model), ("shifted", shifted)):
        outs[name, logit_fit] = corp.prune(m, x, logit_fit=logit_fit, **kw)
        outs[name, "pooled"] = corp.prune(m, x, logit_fit="pooled", logit_solve="sylvester", **kw)
    with torch.no_grad():
        y = {key: m(x) for key, m in outs.items()}
        dense = model(x)
    assert torch.allclose(model(x), shifted(x), atol=1e-5)  # softmax does not see the key bias
    torch.testing.assert_close(y["shifted", logit_fit], y["base", logit_fit], rtol=1e-4, atol=1e-4)
    assert (y["shifted", "pooled"] - y["base", "pooled"]).abs().max() > 1e-3  # the pooled fit does move
    assert float((y["base", logit_fit] - dense).norm()) < float((y["base", "pooled"] - dense).norm()) * 1.5


def test_residual_selection_lowers_the_block_error():
    model = tiny_vit(depth=2)
    x = _images()
    kw = dict(mlp_sparsity=0.7, attn_sparsity=0.5, batch_size=8, report_images=24)
    energy = corp.prune(model, x, selection="energy", **kw).corp_report
    residual = corp.prune(model, x, selection="residual", **kw).corp_report
    assert sum(b.error_compensated for b in residual.blocks) < sum(b.error_compensated for b in energy.blocks)


def test_per_block_sparsities():
    model = tiny_vit(depth=3)
    out = corp.prune(model, _images(), mlp_sparsity=[0.0, 0.5, 0.75], attn_sparsity=[0.5, 0.0, 0.25], batch_size=8)
    hidden, head_dim = model.blocks[0].mlp.fc1.out_features, model.blocks[0].attn.head_dim
    assert [b.mlp.fc1.out_features for b in out.blocks] == [kept_count(hidden, p) for p in (0.0, 0.5, 0.75)]
    assert [b.attn.qk_dim if hasattr(b.attn, "qk_dim") else b.attn.head_dim for b in out.blocks] == \
        [kept_count(head_dim, p) for p in (0.5, 0.0, 0.25)]


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_budget_removes_at_least_the_budget_and_round_trips(metric, tmp_path):
    model = tiny_vit(depth=3)
    before = model_total(model, metric)
    out = corp.prune(model, _images(), budget=0.3, budget_metric=metric, batch_size=8)
    after = model_total(out, metric)
    assert (before - after) / before >= 0.3
    alloc = out.corp_report.allocation
    assert len(alloc["mlp_sparsity"]) == 3 and len(alloc["attn_sparsity"]) == 3
    corp.save_pretrained(out, tmp_path / "m")
    back = corp.load_pretrained(tmp_path / "m")
    x = _images(4, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(back(x), out(x))
    assert count_parameters(back) == count_parameters(out)


def test_budget_beats_uniform_at_the_same_cost_on_block_error():
    """Allocation by measured error: at the same (or larger) parameter removal, the summed
    squared block errors are no larger than uniform pruning's."""
    from corp.budget import uniform_reference

    model = tiny_vit(depth=3)
    x = _images()
    p = uniform_reference(model, 0.35, "params")
    uniform = corp.prune(model, x, mlp_sparsity=p, attn_sparsity=p, batch_size=8, report_images=24)
    budget = corp.prune(model, x, budget=0.35, batch_size=8, report_images=24)
    assert count_parameters(budget) <= count_parameters(uniform) * 1.02
    with torch.no_grad():
        dense = model.forward_features(x)
        e_u = float((uniform.forward_features(x) - dense).norm())
        e_b = float((budget.forward_features(x) - dense).norm())
    assert e_b <= e_u * 1.05, (e_b, e_u)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="dense", propagate="dense"), "needs propagate='pruned'"),
    (dict(method="paper", target="dense"), "needs propagate='pruned'"),
    (dict(propagate="pruned", target="dense", logit_fit="per_image"), "per_image"),
    (dict(method="best"), "method must be one of"),
    (dict(logit_fit="softmax"), "logit_fit must be one of"),
    (dict(selection="random"), "selection must be one of"),
    (dict(mlp_sparsity=[0.5, 0.5]), "2 entries for a model of 3 blocks"),
    (dict(mlp_sparsity=[0.5, 1.0, 0.2]), r"in \[0, 1\)"),
    (dict(budget=1.5), "budget must be a fraction"),
    (dict(budget=0.3, mlp_sparsity=0.5), "either budget"),
    (dict(budget=0.3, budget_metric="bytes"), "budget_metric"),
    (dict(budget=0.999), "reach"),
])
def test_bad_variant_options_are_refused(kwargs, message):
    model = tiny_vit(depth=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        corp.prune(model, _images(8), batch_size=8, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_lowrank_logit_fit_prunes_round_trips_and_beats_selected_dims_on_the_logits(tmp_path):
    """logit_solve="lowrank" through corp.prune: the pruned q/k keep s rows per head, the model runs and
    round-trips exactly, and its logits on held-out images are closer to the dense ones (pairs of each
    image, per head) than those of the selected-dims default on the same calibration."""
    model = tiny_vit(depth=2)
    x, held_out = _images(24, seed=1), _images(12, seed=2)
    kw = dict(mlp_sparsity=0.0, attn_sparsity=0.5, batch_size=8, report_images=8)
    low = corp.prune(model, x, logit_solve="lowrank", **kw)
    sel = corp.prune(model, x, logit_solve="factored", **kw)
    assert low.corp_report.settings["logit_solve"] == "lowrank"
    heads, dim = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim

    def logits(m, block):
        """Per-head logits of block ``block`` on its dense input: (B, H, T, T)."""
        captured = {}
        handle = model.blocks[block].register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
        with torch.no_grad():
            model(held_out)
        handle.remove()
        attn = m.blocks[block].attn
        with torch.no_grad():
            h = m.blocks[block].norm1(captured["x"])
        w = attn.qkv.weight
        b = attn.qkv.bias
        keep = (w.shape[0] - model.embed_dim) // 2 // heads
        with torch.no_grad():
            q = torch.nn.functional.linear(h, w[:heads * keep], b[:heads * keep])
            k = torch.nn.functional.linear(h, w[heads * keep:2 * heads * keep], b[heads * keep:2 * heads * keep])
        q = q.unflatten(-1, (heads, keep)).transpose(1, 2)
        k = k.unflatten(-1, (heads, keep)).transpose(1, 2)
        return q @ k.mT / keep ** 0.5

    for block in range(2):
        dense = logits(model, block)
        err_low = float((logits(low, block) - dense).norm())
        err_sel = float((logits(sel, block) - dense).norm())
        assert err_low < err_sel, (block, err_low, err_sel)
    assert low.blocks[0].attn.qkv.weight.shape[0] == model.embed_dim + 2 * heads * (dim // 2)
    corp.save_pretrained(low, tmp_path / "low")
    again = corp.load_pretrained(tmp_path / "low")
    with torch.no_grad():
        torch.testing.assert_close(again(held_out), low(held_out), rtol=0, atol=0)
