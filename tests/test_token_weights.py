"""Token-weighted MLP statistics (``mlp_token_weights="on"``, and "auto", the default: on in post-norm blocks only): each token's hidden activation enters the
MLP covariance with weight ``1/σ_t²``, ``σ_t²`` the variance over channels of the sum the MLP's output
joins (the block output in pre-norm blocks, the output LayerNorm's input in post-norm BERT). Checked
against fp64 sums by hand, per sentence without padding, for both stream schedules."""
import warnings

import pytest
import torch

import corp
from corp.models import adapter_for
from corp.stats import MLPStatistics
from corp.streams import DenseStream, HiddenStates, PrunedStream, token_weights

from conftest import tiny_vit

F64 = torch.float64


class _NoRanks:
    def any(self, flag):
        return flag


def _weighted_moments(h: torch.Tensor, w: torch.Tensor):
    """fp64 weighted mean and covariance of the rows of ``h`` ``(N, D)`` with weights ``w`` ``(N,)``."""
    mean = (w[:, None] * h).sum(0) / w.sum()
    c = h - mean
    return mean, (w[:, None] * c).T @ c / w.sum()


@pytest.mark.parametrize("full", [True, False])
def test_weighted_statistics_are_the_weighted_moments(full):
    """Two batches with padding masks: mean, covariance (or E[h²]) of the real tokens weighted by w, by
    hand in fp64; count stays the number of real tokens; the weights' shape is checked."""
    g = torch.Generator().manual_seed(0)
    stats = MLPStatistics(13, torch.device("cpu"), full=full)
    rows, weights = [], []
    for b, t in ((3, 7), (5, 4)):
        h = torch.randn(b, t, 13, generator=g, dtype=F64) * torch.linspace(0.5, 3.0, 13, dtype=F64) + 0.7
        w = torch.rand(b, t, generator=g, dtype=F64) * 4
        mask = torch.rand(b, t, generator=g) > 0.3
        stats.update(h, mask=mask, weights=w)
        rows.append(h[mask])
        weights.append(w[mask])
    h, w = torch.cat(rows), torch.cat(weights)
    mean, cov = _weighted_moments(h, w)
    assert stats.count == h.shape[0]
    torch.testing.assert_close(stats.second_moment_diag(), (w[:, None] * h * h).sum(0) / w.sum(), rtol=1e-12, atol=0)
    if full:
        got_mean, got_cov = stats.mean_and_covariance()
        torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got_cov, cov, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="token weights must have shape"):
        MLPStatistics(13, torch.device("cpu")).update(torch.randn(2, 3, 13), weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="not supported with the dense stream's cross statistics"):
        MLPStatistics(13, torch.device("cpu"), cross=True).update(torch.randn(2, 13), torch.randn(2, 13),
                                                                weights=torch.ones(2))


def test_unit_weights_change_nothing():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 9, 11, generator=g, dtype=F64)
    a, b = MLPStatistics(11, torch.device("cpu")), MLPStatistics(11, torch.device("cpu"))
    a.update(h)
    b.update(h, weights=torch.ones(4, 9, dtype=F64))
    for x, y in zip(a.mean_and_covariance(), b.mean_and_covariance()):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


def test_token_weights_are_inverse_channel_variances():
    z = torch.randn(2, 5, 8, dtype=F64) * torch.arange(1, 6, dtype=F64)[None, :, None]
    w = token_weights(z)
    assert w.shape == (2, 5)
    torch.testing.assert_close(w, 1.0 / z.var(-1, unbiased=False))
    assert torch.isfinite(token_weights(torch.zeros(1, 2, 4))).all()  # a constant token: a large finite weight


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval().to(F64)


def _sentences():
    g = torch.Generator().manual_seed(2)
    return [torch.cat([torch.tensor([2]), torch.randint(3, 50, (int(n),), generator=g)])
            for n in torch.randint(3, 12, (7,), generator=g)]


@pytest.mark.parametrize("stream_class", [DenseStream, PrunedStream])
def test_bert_statistics_weight_tokens_by_the_output_layernorm_input(stream_class):
    """Post-norm BERT, padded batches: the stream's weighted MLP statistics of layer 0 equal, by hand,
    each sentence alone through layer 0 with w = 1/var(output.dense(h) + attention output)."""
    model = _bert()
    adapter = adapter_for(model)
    seqs = _sentences()
    width = max(len(s) for s in seqs) + 3
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = s, 1
    layer = model.encoder.layer[0]
    rows, weights = [], []
    with torch.no_grad():
        for s in seqs:
            x = model.embeddings(input_ids=s[None])
            a = layer.attention(x)[0]
            h = layer.intermediate(a)
            z = layer.output.dense(h) + a  # what output.LayerNorm normalises
            rows.append(h[0])
            weights.append(1.0 / z[0].var(-1, unbiased=False))
        mean, cov = _weighted_moments(torch.cat(rows), torch.cat(weights))
        states, masks = HiddenStates("cpu", torch.device("cpu")), []
        for lo, hi in ((0, 3), (3, 7)):
            batch = {"input_ids": ids[lo:hi], "attention_mask": att[lo:hi]}
            states.append(adapter.embed(model, batch))
            masks.append(adapter.token_mask(model, batch))
        block = adapter.blocks(model)[0]
        stats = MLPStatistics(adapter.mlp(block).hidden, torch.device("cpu"))
        stream = stream_class(states, adapter, _NoRanks(), 0, masks=masks, token_weights=lambda joins: True)
        stream.begin(block, 0, {"mlp": stats}, {})
        stream.fill(block, "mlp", stats)
    got_mean, got_cov = stats.mean_and_covariance()
    assert stats.count == sum(len(s) for s in seqs)
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_cov, cov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stream_class", [DenseStream, PrunedStream])
def test_vit_statistics_weight_tokens_by_the_block_output(stream_class):
    """Pre-norm timm ViT: w = 1/var of the block output (the residual stream the next norm reads)."""
    model = tiny_vit().to(F64)
    adapter = adapter_for(model)
    images = torch.randn(6, 3, 24, 24, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = adapter.embed(model, images)
        block = adapter.blocks(model)[0]
        y = x + block.ls1(block.attn(block.norm1(x)))
        h = block.mlp.act(block.mlp.fc1(block.norm2(y)))
        z = block(x)
        mean, cov = _weighted_moments(h.reshape(-1, h.shape[-1]), (1.0 / z.var(-1, unbiased=False)).reshape(-1))
        states = HiddenStates("cpu", torch.device("cpu"))
        states.append(x[:4])
        states.append(x[4:])
        stats = MLPStatistics(adapter.mlp(block).hidden, torch.device("cpu"))
        stream = stream_class(states, adapter, _NoRanks(), 0, token_weights=lambda joins: True)
        stream.begin(block, 0, {"mlp": stats}, {})
        stream.fill(block, "mlp", stats)
    got_mean, got_cov = stats.mean_and_covariance()
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_cov, cov, rtol=1e-10, atol=1e-12)


def test_token_weighted_prune_runs_saves_and_is_refused_with_dense_targets(tmp_path):
    model = tiny_vit()
    images = torch.randn(24, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer calibration tokens than channels in this tiny model
        plain = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5)
        weighted = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, mlp_token_weights=True)
        paper = corp.prune(model, images, mlp_sparsity=0.5, method="paper", mlp_token_weights=True)
    assert weighted.corp_config["pruning"]["mlp_token_weights"] == "on"
    assert plain.corp_config["pruning"]["mlp_token_weights"] == "auto"
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), weighted.state_dict().values()))
    assert paper.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features // 2
    corp.save_pretrained(weighted, tmp_path / "m")
    again = corp.load_pretrained(tmp_path / "m")
    probe = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again(probe), weighted(probe))
    with pytest.raises(ValueError, match="mlp_token_weights='on' cannot be combined with target='dense'"):
        corp.prune(model, images, mlp_sparsity=0.5, target="dense", mlp_token_weights=True)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_auto_weights_post_norm_blocks_only():
    """``"auto"`` (corp's preset): BERT (post-norm, ``MlpPart.joins`` set) is pruned exactly as with
    ``"on"`` and differently from ``"off"``; a pre-norm timm ViT exactly as with ``"off"``; with
    error-correcting targets ``"auto"`` means off."""
    bert = _bert().float()
    seqs = _sentences()
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = s, 1
    text = [{"input_ids": ids, "attention_mask": att}]
    images = torch.randn(24, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    vit = tiny_vit()
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, report_images=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer calibration tokens than channels in these tiny models
        default = corp.prune(bert, text, **kw)
        bert_on, bert_off = (corp.prune(bert, text, mlp_token_weights=w, **kw) for w in ("on", "off"))
        vit_auto, vit_on, vit_off = (corp.prune(vit, images, mlp_token_weights=w, **kw) for w in ("auto", "on", "off"))
        ec_auto, ec_off = (corp.prune(vit, images, target="dense", logit_solve="sylvester", mlp_token_weights=w, **kw)
                           for w in ("auto", "off"))
    assert default.corp_config["pruning"]["mlp_token_weights"] == "auto"
    assert _same_weights(default, bert_on) and not _same_weights(default, bert_off)
    assert _same_weights(vit_auto, vit_off) and not _same_weights(vit_auto, vit_on)
    assert _same_weights(ec_auto, ec_off)
