"""The attention output fit (corp.fit.AttentionOutputFit): the refitted output projection against
brute-force ridge least squares on the tokens, and its effect through corp.prune."""
import math

import pytest
import torch

import corp
from corp.fit import AttentionOutputFit, FitContext, gcv_scores
from corp.ops import REFERENCE
from corp.stats import AttentionOutputStatistics

from conftest import tiny_vit

F64 = torch.float64


def _tokens(seed: int, n: int, width: int):
    """Correlated dense head outputs ``o`` and a perturbed pruned version ``z`` ``(n, width)``."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, width, generator=g, dtype=F64) @ torch.randn(width, width, generator=g, dtype=F64)
    z = o @ (torch.eye(width, dtype=F64) + 0.3 * torch.randn(width, width, generator=g, dtype=F64))
    return o + 0.5, z + 0.1 * torch.randn(n, width, generator=g, dtype=F64) - 0.2


@pytest.mark.parametrize("with_bias,ridge", [(True, 1e-3), (True, 0.3), (False, 1e-2)])
def test_output_fit_is_the_ridge_least_squares_solution(with_bias, ridge):
    """min_{W', b'} (1/n) Σ‖W o + b − W' z − b'‖² + λ‖W' − W‖² at the λ the fit chose (on its grid, at least
    ridge · mean(diag Cov(z)); uncentred second moments without a bias), solved here as one augmented
    least-squares problem over the tokens."""
    n, width, out = 400, 9, 5
    o, z = _tokens(int(ridge * 1000) + with_bias, n, width)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out, width, generator=g, dtype=F64)
    b = torch.randn(out, generator=g, dtype=F64) if with_bias else None
    stats = AttentionOutputStatistics(width, torch.device("cpu"))
    for chunk in (slice(0, 150), slice(150, n)):  # the fit sees batches; the oracle all tokens at once
        stats.update(o[chunk][None], z[chunk][None])
    fit = AttentionOutputFit(ridge).fit(stats, w, b, FitContext(REFERENCE))

    target = o @ w.T + (b if b is not None else 0)
    zc = z - z.mean(0) if with_bias else z
    floor = ridge * float(torch.diagonal(zc.T @ zc / n).mean())
    lam = fit.damping
    steps = torch.log10(torch.tensor(lam / floor, dtype=F64)) * 4  # quarter decades above the floor
    assert 0 <= float(steps) <= 20 + 1e-9 and abs(float(steps) - round(float(steps))) < 1e-9
    # unknowns Δ = W' − W (penalised) and b' (free): rows [z, 1] for the tokens, √(nλ)·I rows for Δ
    design = torch.cat([z, torch.ones(n, 1, dtype=F64)], 1) if with_bias else z
    penalty = torch.zeros(width, design.shape[1], dtype=F64)
    penalty[:, :width] = (n * lam) ** 0.5 * torch.eye(width, dtype=F64)
    rhs = torch.cat([target - z @ w.T, torch.zeros(width, out, dtype=F64)])
    sol = torch.linalg.lstsq(torch.cat([design, penalty]), rhs).solution
    assert torch.allclose(fit.weight, w + sol[:width].T, rtol=1e-8, atol=1e-9)
    if with_bias:
        assert torch.allclose(fit.bias, sol[width], rtol=1e-8, atol=1e-9)
    else:
        assert fit.bias is None


@pytest.mark.parametrize("intercept", [True, False])
def test_gcv_scores_are_the_hat_matrix_scores_over_the_tokens(intercept):
    """GCV(λ) = (RSS/n) / (1 − tr(H)/n)² with the ridge fit's residuals and hat matrix formed over the
    tokens (centred design plus a free intercept, or none), for a multi-output target; and the output
    fit's λ is the grid's argmin of that brute-force score."""
    n, width, out = 60, 7, 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, width, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, width, dtype=F64)
    # o − z: a small linear part of z plus noise of the same size, so that GCV damps well above the floor
    o = z @ (torch.eye(width, dtype=F64) + 0.2 * torch.randn(width, width, generator=g, dtype=F64))
    o = o + torch.randn(n, width, generator=g, dtype=F64)
    w = torch.randn(out, width, generator=g, dtype=F64)
    y = (o - z) @ w.T
    zc, yc = (z - z.mean(0), y - y.mean(0)) if intercept else (z, y)
    grid = torch.logspace(-3, 2, 11, dtype=F64)
    brute = []
    for lam in grid:
        hat = zc @ torch.linalg.solve(zc.T @ zc + n * lam * torch.eye(width, dtype=F64), zc.T)
        resid = yc - hat @ yc
        df = torch.trace(hat) + (1 if intercept else 0)
        brute.append(float(resid.square().sum() / n / (1 - df / n) ** 2))
    s_zz, s_zy = zc.T @ zc / n, zc.T @ yc / n
    got = gcv_scores(s_zz, s_zy, yc.square().sum() / n, n, intercept, grid)
    torch.testing.assert_close(got, torch.tensor(brute, dtype=F64), rtol=1e-9, atol=0)

    stats = AttentionOutputStatistics(width, torch.device("cpu"))
    stats.update(o[None], z[None])
    fit = AttentionOutputFit(1e-3).fit(stats, w, torch.zeros(out, dtype=F64) if intercept else None,
                                       FitContext(REFERENCE))
    floor = 1e-3 * float(torch.diagonal(s_zz).mean())
    candidates = floor * torch.logspace(0, 5, 21, dtype=F64)
    scores = []
    for lam in candidates:
        hat = zc @ torch.linalg.solve(zc.T @ zc + n * lam * torch.eye(width, dtype=F64), zc.T)
        df = torch.trace(hat) + (1 if intercept else 0)
        scores.append(float((yc - hat @ yc).square().sum() / n / (1 - df / n) ** 2))
    best = int(torch.tensor(scores).argmin())
    assert 0 < best < len(candidates) - 1  # an interior choice: the test would see a wrong score
    assert fit.damping == pytest.approx(float(candidates[best]), rel=1e-9)


def test_output_fit_recovers_an_exact_linear_map():
    """z an invertible linear image of o: the fit (tiny ridge) inverts it, and the new projection
    reproduces the dense output exactly."""
    n, width, out = 300, 6, 4
    g = torch.Generator().manual_seed(3)
    o = torch.randn(n, width, generator=g, dtype=F64)
    mix = torch.randn(width, width, generator=g, dtype=F64) + 3 * torch.eye(width, dtype=F64)
    z = o @ mix.T
    w, b = torch.randn(out, width, generator=g, dtype=F64), torch.randn(out, generator=g, dtype=F64)
    stats = AttentionOutputStatistics(width, torch.device("cpu"))
    stats.update(o, z)
    fit = AttentionOutputFit(1e-12).fit(stats, w, b, FitContext(REFERENCE))
    assert torch.allclose(z @ fit.weight.T + fit.bias, o @ w.T + b, atol=1e-8)


def test_output_fit_lowers_the_attention_error_on_the_calibration_tokens():
    """Through corp.prune (q/k only, MLP dense): block 0 sees the same input with and without the fit,
    and its output error on all calibration images is the fit's residual, which W' = W bounds."""
    torch.manual_seed(0)
    model = tiny_vit(embed_dim=32, num_heads=4, depth=2).double()
    images = torch.randn(20, 3, 24, 24, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = {}
    for refit in (False, True):
        pruned = corp.prune(model, images, attn_sparsity=0.5, attn_output_fit=refit, report_images=20,
                            batch_size=8, method="paper")
        errors[refit] = pruned.corp_report.blocks[0].error_compensated
        assert pruned.corp_report.settings["attn_output_fit"] is refit
        with torch.no_grad():
            assert torch.isfinite(pruned(images)).all()
    assert errors[True] < errors[False]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the user's model untouched


def test_output_fit_option_is_validated():
    with pytest.raises(TypeError, match="attn_output_fit"):
        corp.PruneConfig.create(attn_output_fit="yes")
    for bad in (0.0, -0.5, 1.5, True, "half"):
        with pytest.raises(ValueError, match="attn_output_fit_share must be a fraction in"):
            corp.PruneConfig.create(attn_output_fit_share=bad)


def test_in_share_picks_batches_spread_evenly_from_the_first():
    """Batch 0, then one batch at every unit step of j·share: ⌊(n − 1)·share⌋ + 1 of n batches."""
    from corp.streams import in_share

    for n in (1, 2, 5, 9, 16, 31):
        for share in (0.1, 0.25, 1 / 3, 0.5, 0.7, 0.75, 1.0):
            picked = [j for j in range(n) if in_share(j, share)]
            assert picked[0] == 0 and len(picked) == math.floor((n - 1) * share + 1e-9) + 1, (n, share)
            gaps = {b - a for a, b in zip(picked, picked[1:])}
            assert max(gaps, default=1) <= math.ceil(1 / share), (n, share)  # no long run left out
    assert [j for j in range(7) if in_share(j, 0.5)] == [0, 2, 4, 6]
    assert [j for j in range(11) if in_share(j, 0.1)] == [0, 10]
    assert all(in_share(j, 1.0) for j in range(9))


@pytest.mark.parametrize("arch,size,images", [("vit_tiny_patch16_224", 80, 36), ("eva02_tiny_patch14_224", 28, 12)])
def test_output_fit_share_fits_on_the_chosen_batches_and_still_replays_every_batch(arch, size, images,
                                                                                    monkeypatch):
    """``attn_output_fit_share=0.5`` over 4 batches: the model is bit for bit the one whose output fit
    is fed batches 0 and 2 of the full pass (the pass's outputs filtered here), and the MLP pass
    still replays the pruned heads of all 4 batches (the skipped ones record them too). vit: the
    pass derives both heads from the kept projection; eva02 (rotary): it runs the modules whole."""
    import timm

    import corp.modules
    from corp.streams import Stream

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=size, depth=2).eval()
    images = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=images.shape[0] // 4, report_images=0)
    replays = []
    forward = corp.modules.HeadsReplay.forward
    monkeypatch.setattr(corp.modules.HeadsReplay, "forward", lambda self, *a, **k: replays.append(1) or forward(self))
    half = corp.prune(model, images, attn_output_fit_share=0.5, **kw)
    assert len(replays) == 2 * 4  # blocks × batches
    original = Stream.attention_outputs

    def even_batches_only(self, *args, **kwargs):
        for j, pair in enumerate(original(self, *args, **kwargs)):
            if j % 2 == 0:
                yield pair

    monkeypatch.setattr(Stream, "attention_outputs", even_batches_only)
    reference = corp.prune(model, images, **kw)
    assert half.corp_report.settings["attn_output_fit_share"] == 0.5
    for (name, a), b in zip(half.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def _prune_with_and_without_replay(monkeypatch, replay_class, switch: str, model, images, **kw):
    """``corp.prune`` twice: as is, counting ``replay_class.forward`` calls, then with the pruned
    stream's ``switch`` (a class attribute) off. Returns both models and the replays of each run."""
    from corp.streams import PrunedStream

    replays = []
    forward = replay_class.forward
    monkeypatch.setattr(replay_class, "forward", lambda self, *a, **k: replays.append(1) or forward(self))
    replayed = corp.prune(model, images, **kw)
    first = len(replays)
    monkeypatch.setattr(PrunedStream, switch, False)
    whole = corp.prune(model, images, **kw)
    return replayed, whole, (first, len(replays) - first)


@pytest.mark.parametrize("arch,size,images", [("vit_tiny_patch16_224", 80, 36), ("eva02_tiny_patch14_224", 28, 12)])
def test_replayed_heads_give_the_recomputed_model(arch, size, images, monkeypatch):
    """The pruned stream's MLP statistics pass replays the heads' outputs that the output fit's pass
    recorded (corp.modules.ReplaysFromHeads) instead of running the pruned attention again, and the
    replay ran once per batch and block. Where that pass runs the pruned module whole (rotary eva02)
    the pruned model is bitwise the one recomputing them; where it derives the pruned heads from the
    dense projection (corp.fold.query_map: vit) it equals it to fp32 rounding."""
    import timm

    import corp.modules

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=size, depth=2).eval()
    # vit: 36 images of 26 tokens, full-rank statistics (936 tokens for 768 hidden channels), so that
    # rounding-level differences of the heads cannot flip the MLP selection's ties
    images = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1))
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=images.shape[0] // 3, report_images=0)
    replayed, recomputed, replays = _prune_with_and_without_replay(
        monkeypatch, corp.modules.HeadsReplay, "replay_heads", model, images, **kw)
    assert replays == (2 * 3, 0)  # blocks × batches, then none
    for (name, a), b in zip(replayed.state_dict().items(), recomputed.state_dict().values()):
        if arch.startswith("eva"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=name)  # weights O(0.1); measured ≤ 6e-7


@pytest.mark.parametrize("kind", ["none", "sylvester", "projection"])
def test_qk_maps_are_the_maps_the_fold_applies(kind):
    """corp.fold.qk_maps: the folded q/k weights and biases are a·W_Q, c·W_K (a, c per head) for every
    kind of correction fold_attention takes (none, M = the Sylvester correction, a QKProjection), and
    query_map's queries give the pruned module's logits."""
    from corp.fit import QKProjection
    from corp.fold import fold_attention, qk_maps, query_map
    from corp.models.base import AttentionWeights

    g = torch.Generator().manual_seed(3)
    heads, d, width, keep = 3, 8, 20, 5
    w = AttentionWeights(*(torch.randn(heads, d, width, generator=g, dtype=F64) for _ in range(3)),
                         *(torch.randn(heads, d, generator=g, dtype=F64) for _ in range(3)))
    kept = torch.stack([torch.randperm(d, generator=g)[:keep].sort().values for _ in range(heads)])
    correction = {"none": None, "sylvester": 0.2 * torch.randn(heads, keep, keep, generator=g, dtype=F64),
                  "projection": QKProjection(torch.randn(heads, keep, d, generator=g, dtype=F64),
                                             torch.randn(heads, keep, d, generator=g, dtype=F64))}[kind]
    folded = fold_attention(w, kept, correction)
    maps = qk_maps(kept, correction, d)
    assert torch.allclose(folded.w_q, maps.a @ w.w_q, rtol=1e-12, atol=1e-12)
    assert torch.allclose(folded.w_k, maps.c @ w.w_k, rtol=1e-12, atol=1e-12)
    assert torch.allclose(folded.b_q, (maps.a @ w.b_q[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(folded.b_k, (maps.c @ w.b_k[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    # corp.fold.query_map: the pruned module's logits s^-½ (a q)ᵀ(c k) are the dense attention's with
    # queries q @ Mq and the dense keys and scale, d^-½ (q @ Mq)ᵀ k
    q, k = (torch.randn(heads, 7, d, generator=g, dtype=F64) for _ in range(2))
    pruned_logits = (q @ maps.a.transpose(1, 2)) @ (k @ maps.c.transpose(1, 2)).transpose(1, 2) * keep ** -0.5
    mapped_logits = (q @ query_map(maps)) @ k.transpose(1, 2) * d ** -0.5
    assert torch.allclose(mapped_logits, pruned_logits, rtol=1e-12, atol=1e-12)


def test_output_fit_pass_derives_both_heads_from_the_kept_projection(monkeypatch):
    """The pruned stream keeps the attention statistics pass's qkv projections; the output fit's pass
    then computes the dense heads from them (bitwise the dense module's own) and the pruned heads by
    the dense attention with queries q @ corp.fold.query_map (the pruned module's own to fp32 rounding),
    without projecting again."""
    import timm

    from corp.fit import LowRankLogitFit
    from corp.fold import fold_attention, qk_maps
    from corp.models import adapter_for
    from corp.stats import AttentionStatistics
    from corp.streams import HiddenStates, PrunedStream, capture_input, halves, swapped

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=1).eval()
    block = model.blocks[0]
    a = adapter_for(model)
    states = HiddenStates("device", torch.device("cpu"))
    for seed in (1, 2):
        states.append(torch.randn(5, 10, 192, generator=torch.Generator().manual_seed(seed)))
    stream = PrunedStream(states, a, corp.distributed.DataParallel(False), 0, keep_qkv=True)
    part = a.attention(block)
    stats = AttentionStatistics(part.num_heads, part.head_dim, torch.device("cpu"), centre_keys=True)
    stream.begin(block, 0, {"attn": stats}, {"attn": part.module, "mlp": block.mlp})
    stream.fill(block, "attn", stats)
    assert stream.qkv_cache is not None and len(stream.qkv_cache) == 2
    kept = torch.arange(32).repeat(part.num_heads, 1)
    correction, _ = LowRankLogitFit(1e-3).fit(stats, kept, kept[:, :0], FitContext(REFERENCE))
    pruned = part.build(fold_attention(part.weights(), kept, correction), 32)
    projections = []
    handle = part.module.qkv.register_forward_hook(lambda *_: projections.append(1))
    pairs = list(stream.attention_outputs(block, part.module, pruned, qk_maps(kept, correction, part.head_dim)))
    handle.remove()
    assert projections == [] and stream.qkv_cache is None  # read from the cache, then dropped
    for j, (o, z) in enumerate(pairs):
        x = states[j]
        for module, got, exact in ((part.module, o, True), (pruned, z, False)):
            with swapped(a, block, {"attn": module}):
                want = capture_input(halves(a, block, None)[0], a.attention(block).out_proj, x)
            if exact:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_pruned_stream_advances_the_mlp_from_the_recorded_hidden_activations(gated, monkeypatch):
    """The pruned stream advances each block's pruned MLP from the kept channels of the hidden
    activations its statistics pass recorded (corp.modules.HiddenReplay, once per batch and block)
    instead of running its input projection again; the pruned model equals the one that runs the
    pruned MLP whole, to fp32 rounding (plain and gated MLPs; full-rank statistics)."""
    import timm
    import torch.nn as nn
    from timm.layers import SwiGLU

    import corp.modules

    torch.manual_seed(0)
    extra = dict(mlp_layer=SwiGLU, act_layer=nn.SiLU) if gated else {}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=80, depth=2, **extra).eval()
    images = torch.randn(36, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=12, report_images=12)
    replayed, whole, replays = _prune_with_and_without_replay(
        monkeypatch, corp.modules.HiddenReplay, "replay_hidden", model, images, **kw)
    assert replays == (2 * 3, 0)  # blocks × batches, then none
    for (name, a), b in zip(replayed.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=name)
    for r, w in zip(replayed.corp_report.blocks, whole.corp_report.blocks):
        assert r.error_compensated == pytest.approx(w.error_compensated, rel=1e-3)


def test_report_dense_outputs_from_the_kept_dense_heads_are_the_dense_block_bit_for_bit(monkeypatch):
    """The pruned stream's report takes the dense block's outputs on the report images from the dense
    heads the output fit's pass kept (its output projection and MLP only): bitwise the dense block run
    whole on those inputs."""
    import timm

    import corp.pipeline
    from corp.streams import swapped

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=2).eval()
    images = torch.randn(20, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    seen = []
    measure = corp.pipeline.measure_block_errors

    def checked(adapter, block, inputs, outputs, dense_outputs, dense, plain, dp, masks=None):
        with swapped(adapter, block, dense):
            whole = [adapter.run_block(block, x) for x in inputs]
        seen.append(len(dense_outputs))
        assert len(dense_outputs) == len(whole) and all(torch.equal(a, b) for a, b in zip(dense_outputs, whole))
        return measure(adapter, block, inputs, outputs, dense_outputs, dense, plain, dp, masks)

    monkeypatch.setattr(corp.pipeline, "measure_block_errors", checked)
    corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=8, report_images=12)
    assert seen == [2, 2]  # report images 0..11 in batches 0 and 1, both blocks
