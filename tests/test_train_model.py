"""Model wiring: attention per block, value-embedding tables, U-net skips, init, logit cap."""
import math

import pytest
import torch

from records.recipes import record21

T = record21()  # these tests cover the record-21 recipe kept under records/

# The record's 12-block layout at a width small enough to build and run quickly.
SMALL_RECORD_SHAPE = ["--model_dim=32", "--num_heads=2", "--head_dim=16", "--train_seq_len=256",
                      "--val_seq_len=256", "--train_batch_tokens=256", "--val_tokens=256", "--block_size=32",
                      "--max_window_tokens=128", "--vocab_size=1000"]


def small_record_model():
    settings = T.parse_settings(SMALL_RECORD_SHAPE)
    torch.manual_seed(0)
    return settings, T.GPT(settings, "sdpa")


def test_record_layout_defaults():
    s = T.Settings()
    assert (s.num_layers, s.model_dim, s.num_heads, s.head_dim, s.mlp_ratio) == (12, 768, 6, 128, 4)
    assert s.train_batch_tokens == 8 * 48 * 1024 and s.num_iterations == 1770 and s.val_tokens == 10_485_760
    settings, model = small_record_model()
    with_attention = [i for i, block in enumerate(model.blocks) if block.attn is not None]
    assert with_attention == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert "".join(kind or "-" for kind in model.window_kinds) == "LSSSLSS-SSSL"
    assert model.value_embed_tables == [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    assert len(model.value_embeds) == 3
    assert model.lm_head.weight.shape == (1024, 32)  # padded to a multiple of 128
    assert T.padded_vocab_size(50257) == 50304


def run_with_hooks(model, tokens):
    """Records each block's inputs (x, x0, value_embed) and output during one forward pass."""
    records = []

    def hook(block, args, output):
        x, x0, value_embed, mask = args
        records.append(dict(x=x.detach(), x0=x0.detach(), value_embed=value_embed, out=output.detach()))

    handles = [block.register_forward_hook(hook) for block in model.blocks]
    model(tokens[:-1], tokens[1:], torch.tensor(2))
    for handle in handles:
        handle.remove()
    return records


def test_value_embeddings_and_unet_skips_are_wired_as_the_record():
    settings, model = small_record_model()
    with torch.no_grad():  # make skips and mixing visible: nonzero projections and distinct skip weights
        for block in model.blocks:
            block.mlp.proj.weight.normal_(0, 0.05)
        model.skip_weights.copy_(torch.arange(2.0, 2.0 + len(model.skip_weights)))
    tokens = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(1))
    records = run_with_hooks(model, tokens)
    tables = [table(tokens[:-1]) for table in model.value_embeds]
    for i, record in enumerate(records):
        expected = model.value_embed_tables[i]
        if expected is None:
            assert record["value_embed"] is None, f"block {i} must get no value embedding"
        else:
            assert torch.equal(record["value_embed"], tables[expected]), f"block {i} must get table {expected}"
    for j in range(6):  # decoder block 6 + j gets x + w_j * (output of encoder block 5 - j)
        decoder = 6 + j
        expected_input = records[decoder - 1]["out"] + model.skip_weights[j].detach() * records[5 - j]["out"]
        assert torch.allclose(records[decoder]["x"], expected_input, atol=1e-5), f"skip into block {decoder} wrong"
    x0 = T.rms_norm(model.embed(tokens[:-1])[None])
    for record in records:
        assert torch.equal(record["x0"], x0), "every block must get the normed embedding as x0"


def test_initialisation():
    settings, model = small_record_model()
    for i, block in enumerate(model.blocks):
        assert block.mlp.proj.weight.abs().max() == 0, "MLP output projection must start at zero"
        assert block.embed_mix.tolist() == [1.0, 0.0]
        if block.attn is not None:
            assert block.attn.proj.weight.abs().max() == 0, "attention output projection must start at zero"
            assert block.attn.value_lambdas.tolist() == [0.5, 0.5]
            assert block.attn.qkv_weight.std().item() == pytest.approx(0.5 / math.sqrt(32), rel=0.1)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.5 / math.sqrt(32), rel=0.1)
    assert model.lm_head.weight.abs().max() == 0
    assert model.skip_weights.tolist() == [1.0] * 6
    for embedding in (model.embed, *model.value_embeds):
        assert embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_zero_initialised_model_predicts_uniformly():
    settings, model = small_record_model()
    tokens = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(2))
    loss = model(tokens[:-1], tokens[1:], torch.tensor(2))
    assert loss.item() == pytest.approx(math.log(1024), abs=1e-4)  # 1000 tokens padded to 1024 logits


def test_logit_soft_cap_bounds():
    settings, model = small_record_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    model.eval()  # exact head: FP8 would saturate these weights
    x = torch.randn(64, 32)
    capped = model.capped_logits(x)
    raw = model.lm_head(x).float()
    assert capped.min() >= 0 and capped.max() <= 30
    assert capped.max() > 29.9 and capped.min() < 0.1, "large logits must approach the caps"
    assert torch.allclose(capped, 15 * torch.tanh(raw / 15) + 15, atol=1e-4)


def test_fp8_head_is_used_only_in_training():
    settings = T.parse_settings(SMALL_RECORD_SHAPE + ["--fp8_head=true"])
    model = T.GPT(settings, "sdpa")
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    x = torch.randn(64, 32)
    exact = model.lm_head(x).float()
    model.train()
    fp8 = model.capped_logits(x)
    model.eval()
    evaluation = model.capped_logits(x)
    cap = lambda z: 30 * torch.sigmoid(z / 7.5)  # noqa: E731
    assert torch.allclose(evaluation, cap(exact), atol=1e-6), "evaluation must use the exact matmul"
    assert not torch.allclose(fp8, cap(exact), atol=1e-6), "training must use the FP8 matmul"
    deviation = (fp8 - cap(exact)).norm() / (cap(exact) - 15).norm()
    assert deviation < 0.06, "FP8 logits must stay within FP8 precision of the exact ones"


def test_eval_loss_in_chunks_equals_unchunked(monkeypatch):
    settings, model = small_record_model()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    model.fp8_head = False  # compare the exact head in both modes
    tokens = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(3))
    model.train()
    whole = model(tokens[:-1], tokens[1:], torch.tensor(2))
    model.eval()
    monkeypatch.setattr(T, "EVAL_LOGITS_CHUNK", 48)  # 256 tokens -> 6 chunks, the last one short
    chunked = model(tokens[:-1], tokens[1:], torch.tensor(2))
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


def test_muon_gets_block_matrices_and_adam_the_rest():
    settings = T.parse_settings(SMALL_RECORD_SHAPE)
    runtime = T.resolve_runtime(settings, 0, 1, 0)
    model = T.build_model(settings, runtime)
    muon, adam = T.build_optimizers(model, settings, runtime)
    muon_params = {id(p) for group in muon.param_groups for p in group["params"]}
    expected = {id(p) for block in model.blocks for p in block.parameters() if p.ndim >= 2}
    assert muon_params == expected
    lrs = {id(p): group["lr"] for group in adam.param_groups for p in group["params"]}
    assert lrs[id(model.lm_head.weight)] == 0.008
    assert lrs[id(model.embed.weight)] == 0.6 and lrs[id(model.value_embeds[2].weight)] == 0.6
    assert lrs[id(model.skip_weights)] == 0.04 and lrs[id(model.blocks[0].embed_mix)] == 0.04
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
