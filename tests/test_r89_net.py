"""Section 4b of train_gpt.py (the network) against direct formulas written here from the fact sheet
(RECORDS_29_89.md 2.1-2.4, 2.6, 2.8): explicit loops, fp64, the gate columns and init values spelled out as
numbers. The attention of a layer is a recording stand-in with the contract's interface (4a is tested on its
own), so each layer's update is checked on its own; the whole forward with the real attention runs once
section 4a is in."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt as R

HAS_ATTENTION = all(hasattr(R, name) for name in ("CausalSelfAttention", "Rotary", "attention_masks"))
VOCAB = 200  # padded to 256: keeps the tiny model's tables small
PADDED = 256


def tiny_settings(**changes) -> R.Settings:
    return dataclasses.replace(R.Settings(), **{**R.PRESETS["tiny"], "vocab_size": VOCAB, **changes})


class RecordingAttention(nn.Module):
    """Stand-in for 4a's CausalSelfAttention: the contract's parameter, and an output that depends on the input
    and the value addition (y = a W_O^T + aux_v); it records what the layer passes in."""

    def __init__(self, s, layer):
        super().__init__()
        self.qkvo = nn.Parameter(torch.empty(4, s.model_dim, s.model_dim).uniform_(-0.1, 0.1))
        self.calls = []

    def forward(self, a, masks, rotary, lambdas, **gates):
        self.calls.append(dict(a=a, masks=masks, rotary=rotary, lambdas=lambdas, **gates))
        return stand_in_output(self, a, gates["aux_v"])


def stand_in_output(attention, a, aux_v):
    y = F.linear(a, attention.qkvo[3])
    return y if aux_v is None else y + aux_v.reshape(y.shape)


class RecordingRotary(nn.Module):
    """Stand-in for 4a's Rotary: its buffers, and a record of the YaRN updates asked for."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("frequencies", torch.ones(head_dim // 4))
        self.register_buffer("scale", torch.tensor(0.1))
        self.updates = []

    def apply_yarn(self, old_long_tokens, new_long_tokens):
        self.updates.append((old_long_tokens, new_long_tokens))


def use_stand_ins(monkeypatch):
    monkeypatch.setattr(R, "CausalSelfAttention", RecordingAttention, raising=False)
    monkeypatch.setattr(R, "Rotary", RecordingRotary, raising=False)


def stand_in_model(monkeypatch, s=None, seed=0) -> R.GPT:
    """An fp64 model with the recording attention and every parameter random (no zero-init shortcuts)."""
    use_stand_ins(monkeypatch)
    torch.manual_seed(seed)
    model = R.GPT(s or tiny_settings(), "explicit").double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def norm(x):
    return x / x.square().mean(-1, keepdim=True).sqrt()


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gate_reference(net, z):
    scale = net.scale if isinstance(net.scale, float) else net.scale.item()
    return (gelu(z @ net.w1.T) @ net.w2.T + net.b2) * scale


def wrap_int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def bigram_rows_reference(tokens: list[int], buckets: int) -> list[int]:
    rows = [buckets - 1]
    for previous, current in zip(tokens, tokens[1:]):
        rows.append((wrap_int32(36313 * current) ^ wrap_int32(27191 * previous)) % (buckets - 1))
    return rows


def sign_rows_reference(tokens: list[int]) -> list[int]:
    return [0] + [(previous ^ current) % 8192 for previous, current in zip(tokens, tokens[1:])]


def random_tokens(length: int, seed: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (length,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


# ---- bigram hash and sign table


def test_bigram_hash_and_sign_rows_match_the_formula():
    pairs = [(0, 0), (50256, 1), (1, 50256), (50303, 50303), (12345, 678), (70000, 65000)]  # the last wraps int32
    tokens = [t for pair in pairs for t in pair] + random_tokens(300, high=50304).tolist()
    inputs = torch.tensor(tokens, dtype=torch.int32)
    for buckets in (377_280, 4096):
        rows = R.bigram_hash(inputs, buckets)
        assert rows.dtype == torch.int32
        assert rows.tolist() == bigram_rows_reference(tokens, buckets)
    assert R.bigram_sign_rows(inputs).tolist() == sign_rows_reference(tokens)
    assert wrap_int32(36313 * 70000) < 0  # the case above does wrap around
    assert R.bigram_hash(inputs[:1], 4096).tolist() == [4095] and R.bigram_hash(inputs[:0], 4096).numel() == 0


def test_sign_table_is_seeded_and_the_same_on_independently_built_models(monkeypatch):
    first = stand_in_model(monkeypatch, seed=1)
    second = stand_in_model(monkeypatch, seed=2)  # another init stream for everything else
    assert not torch.equal(first.lm_head, second.lm_head)
    assert torch.equal(first.bigram_signs, second.bigram_signs)
    assert first.bigram_signs.shape == (8192, 48) and set(first.bigram_signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(first.bigram_signs.mean().item()) < 0.02
    other_seed = stand_in_model(monkeypatch, tiny_settings(seed=5))
    assert not torch.equal(first.bigram_signs, other_seed.bigram_signs)
    # the same tokens give the same bigram vector on both (same table values, same hash)
    with torch.no_grad():
        second.bigram_embed.copy_(first.bigram_embed)
    tokens = random_tokens(64)
    assert torch.equal(first.embed_inputs(tokens, None, None)[1].bigram, second.embed_inputs(tokens, None, None)[1].bigram)


# ---- embeddings: tied head, smear, bigram vector, value embeddings, layer 0's input


def test_smear_matches_a_loop():
    generator = torch.Generator().manual_seed(3)
    e = torch.randn(17, 20, dtype=torch.float64, generator=generator)
    w = torch.randn(1, 12, dtype=torch.float64, generator=generator)
    lam = torch.tensor(0.7, dtype=torch.float64)
    expected = e.clone()
    for t in range(1, e.size(0)):
        gate = 1 / (1 + math.exp(-sum(w[0, j].item() * e[t, j].item() for j in range(12))))
        expected[t] = e[t] + lam * gate * e[t - 1]
    torch.testing.assert_close(R.smear(e, w, lam), expected)


def test_embed_inputs_match_the_formulas(monkeypatch):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(40)
    x, inputs = model.embed_inputs(tokens, None, None)
    idx = tokens.long()
    # tied: the token embedding is lm_head^T; smear, then x0 = norm(e)
    e = model.lm_head.T[idx]
    lam, w = model.scalars[22], model.smear_gate[0]
    smeared = e.clone()
    for t in range(1, len(idx)):
        smeared[t] = e[t] + lam * torch.sigmoid(w @ e[t, :12]) * e[t - 1]
    x0 = norm(smeared)
    torch.testing.assert_close(inputs.x0, x0)
    signs = model.bigram_signs[sign_rows_reference(tokens.tolist())]
    b = model.bigram_embed[bigram_rows_reference(tokens.tolist(), 4096)] * signs
    torch.testing.assert_close(inputs.bigram, b)
    for k in range(5):  # table k is rows k*V .. (k+1)*V - 1
        torch.testing.assert_close(inputs.value_embeds[k], model.value_embeds[k * PADDED + idx])
    pre = gate_reference(model.pre_gate, x0)
    torch.testing.assert_close(inputs.pre_gates, pre)
    torch.testing.assert_close(x, x0 + pre[:, 19:20] * b)  # layer 0's bigram gate
    assert inputs.caches[0] is x


def test_untie_copies_the_head_and_switches_the_embedding(monkeypatch):
    model = stand_in_model(monkeypatch)
    keys_before = set(model.state_dict())
    tied_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.tied.dtype == torch.bool and model.tied.item()
    model.untie()
    assert not model.tied.item() and set(model.state_dict()) == keys_before
    torch.testing.assert_close(model.embed, model.lm_head.T)
    with torch.no_grad():
        model.embed.add_(1.0)  # now the embedding is its own: the head no longer feeds it
    tokens = random_tokens(16)
    torch.testing.assert_close(model.embed_inputs(tokens, None, None)[1].x0[0], norm(model.embed[tokens[0].long()]))
    with pytest.raises(RuntimeError, match="already untied"):
        model.untie()
    model.load_state_dict(tied_state)  # a checkpoint from before the untie ties them again
    assert model.tied.item()
    torch.testing.assert_close(model.embed_inputs(tokens, None, None)[1].x0[0], norm(model.lm_head[:, tokens[0].long()]))


def test_tied_embedding_gradient_flows_into_the_head(monkeypatch):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(8)
    model.embed_inputs(tokens, None, None)[0].sum().backward()
    assert model.embed.grad is None
    assert model.lm_head.grad is not None and model.lm_head.grad[:, tokens.long()].abs().sum() > 0
    unused = sorted(set(range(PADDED)) - set(tokens.tolist()))
    assert model.lm_head.grad[:, unused].abs().sum() == 0


# ---- gate networks and their init values


def test_gate_network_matches_its_formula(monkeypatch):
    model = stand_in_model(monkeypatch)
    z = torch.randn(9, 48, dtype=torch.float64)
    for net in (model.pre_gate, model.post_gate, model.mudd0, model.mudd1):
        torch.testing.assert_close(net(z), gate_reference(net, z))
    assert model.mudd0.scale == 0.1 and model.mudd1.scale == 0.1


def test_every_gate_starts_at_its_init_value_for_any_input(init_model):
    model = init_model
    z = 3 * torch.randn(7, 48)
    expected = {
        "pre_gate": [0.0] * 12 + [0.25] * 6 + [0.0, 0.05] * 4,
        "post_gate": [0.0] * 12 + [0.25] * 6 + [0.0, 0.05] * 5 + [0.5] + [1.0] * 6 + [0.0] * 6,
        "mudd0": [0, 0, 0, 0, 0, 0, 2, 2, math.sqrt(1.1), 1, 0, 0.05, math.sqrt(1.1), 1],
        "mudd1": [0, -0.5, 0, 0, 0],
    }
    for name, values in expected.items():
        net = getattr(model, name)
        torch.testing.assert_close(net(z), torch.tensor(values, dtype=torch.float32).expand(7, -1))
        torch.testing.assert_close(net.b2, torch.tensor(values, dtype=torch.float32) / 0.1)  # stored / scale
        assert net.w2.abs().sum() == 0 and net.w1.abs().max() <= 48**-0.5
        assert net.w1.std().item() == pytest.approx(48**-0.5 / math.sqrt(3), rel=0.05)  # U(+-1/sqrt(d))
    assert model.pre_gate.scale.item() == pytest.approx(0.1) and model.post_gate.scale.item() == pytest.approx(0.1)


@pytest.fixture
def init_model(monkeypatch):
    if not HAS_ATTENTION:
        use_stand_ins(monkeypatch)
    torch.manual_seed(0)
    return R.GPT(tiny_settings(vocab_size=50257), "explicit")


def test_init_distributions(init_model):
    model = init_model
    assert model.lm_head.std().item() == pytest.approx(0.005, rel=0.01)
    assert abs(model.lm_head.mean().item()) < 1e-4
    torch.testing.assert_close(model.embed, model.lm_head.T)
    assert model.value_embeds.std().item() == pytest.approx(0.01, rel=0.01)
    for name in ("bigram_embed", "smear_gate", "ve_gate_bank"):
        assert getattr(model, name).abs().sum() == 0, name
    expected_scalars = [0.5, 1.0] * 11 + [0.0, -1.5]
    torch.testing.assert_close(model.scalars, torch.tensor(expected_scalars))
    torch.testing.assert_close(model.resid_lambdas, torch.full((11, 2), math.sqrt(1.1)))
    torch.testing.assert_close(model.post_lambdas, torch.ones(11, 2))
    bound = math.sqrt(3) * 0.5 / math.sqrt(48)
    for block in model.blocks:
        assert block.mlp.fc.abs().max() <= bound and block.mlp.fc.abs().max() > 0.95 * bound
        assert block.mlp.proj.abs().sum() == 0


# ---- the per-layer update


def layer_setup(model, tokens):
    """Layer inputs with random pre/post gates and caches, so every column read is checked."""
    x, inputs = model.embed_inputs(tokens, "masks", None)
    T = len(tokens)
    inputs.pre_gates = torch.randn(T, 26, dtype=torch.float64)
    inputs.post_gates = torch.randn(T, 41, dtype=torch.float64)
    for k in (0, 3, 7):
        inputs.caches[k] = torch.randn(T, 48, dtype=torch.float64)
    return torch.randn(T, 48, dtype=torch.float64), inputs


def mlp_reference(block, x):
    return torch.relu(norm(x) @ block.mlp.fc.T).square() @ block.mlp.proj


X0_GATE_COLUMN = {0: ("pre", 18), 1: ("pre", 20), 2: ("pre", 22), 3: ("pre", 24),
                  4: ("post", 18), 5: ("post", 20), 7: ("post", 22), 8: ("post", 24), 9: ("post", 26)}
XSA = {1: ("pre", 0), 3: ("pre", 6), 4: ("post", 0), 7: ("post", 6)}
VE_TABLE = {1: 0, 2: 1, 8: 2, 9: 3}


@pytest.mark.parametrize("i", [0, 1, 2, 3, 4, 5, 7, 8, 9])
def test_attention_layer_update_matches_the_formula(monkeypatch, i):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(24)
    x, inputs = layer_setup(model, tokens)
    if i == 4:  # the post gate is computed here from x
        inputs.post_gates = None
    gates = {"pre": inputs.pre_gates}
    out = model.layer(i, x, inputs)
    gates["post"] = inputs.post_gates
    if i == 4:
        torch.testing.assert_close(inputs.post_gates, gate_reference(model.post_gate, x))

    source = inputs.caches[7] if i >= 8 else x
    a = norm(source)
    (call,) = model.blocks[i].attn.calls
    torch.testing.assert_close(call["a"], a)
    assert call["masks"] == "masks" and call["rotary"] is model.rotary
    torch.testing.assert_close(call["lambdas"], model.scalars[2 * i:2 * i + 2])
    if i in XSA:
        net, first = XSA[i]
        torch.testing.assert_close(call["xsa_alpha"], gates[net][:, first:first + 6])
    else:
        assert call["xsa_alpha"] is None
    if i == 3:
        torch.testing.assert_close(call["output_gate"], gates["pre"][:, 12:18])
    else:
        assert call["output_gate"] is None
    assert call["dc_w1"] is None and call["dc_w2"] is None
    if i in VE_TABLE:
        k = VE_TABLE[i]
        ve = model.value_embeds[k * PADDED + tokens.long()]
        G = model.ve_gate_bank[k]
        expected_aux = torch.empty(len(tokens), 6, 8, dtype=torch.float64)
        for t in range(len(tokens)):
            features = torch.cat([a[t, :6], ve[t, :6]])
            for h in range(6):
                expected_aux[t, h] = 2 * torch.sigmoid(G[h] @ features) * ve[t, 8 * h:8 * h + 8]
        torch.testing.assert_close(call["aux_v"], expected_aux)
    else:
        assert call["aux_v"] is None

    y = stand_in_output(model.blocks[i].attn, a, call["aux_v"])
    net, column = X0_GATE_COLUMN[i]
    r, p = model.resid_lambdas[i], model.post_lambdas[i]
    expected = r[0] * x + p[0] * y + gates[net][:, column:column + 1] * inputs.x0
    if i > 0:
        expected = expected + gates[net][:, column + 1:column + 2] * inputs.bigram
    expected = r[1] * expected + p[1] * mlp_reference(model.blocks[i], expected)
    torch.testing.assert_close(out, expected)
    if i in (3, 7):
        assert inputs.caches[i] is out


def test_layer_6_adds_the_gated_skip_from_layer_3(monkeypatch):
    model = stand_in_model(monkeypatch)
    assert model.blocks[6].attn is None
    x, inputs = layer_setup(model, random_tokens(24))
    out = model.layer(6, x, inputs)
    expected = x + torch.sigmoid(model.scalars[23]) * inputs.post_gates[:, 28:29] * inputs.caches[3]
    r, p = model.resid_lambdas[6], model.post_lambdas[6]
    torch.testing.assert_close(out, r[1] * expected + p[1] * mlp_reference(model.blocks[6], expected))


def test_layer_10_is_mixed_by_mudd0(monkeypatch):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(24)
    x, inputs = layer_setup(model, tokens)
    out = model.layer(10, x, inputs)
    assert inputs.caches[9] is x
    mu = gate_reference(model.mudd0, x)
    m = [mu[:, k:k + 1] for k in range(14)]
    c0, c7, b, post = inputs.caches[0], inputs.caches[7], inputs.bigram, inputs.post_gates
    v_mudd = m[0] * c0 + m[1] * c7 + m[2] * x
    h = (1 + m[5]) * x + m[3] * c0 + m[4] * c7
    ve4 = model.value_embeds[4 * PADDED + tokens.long()].view(-1, 6, 8)
    head_gates = torch.cat([m[6]] * 3 + [m[7]] * 3, dim=1)  # mu6 on heads 0-2, mu7 on heads 3-5
    (call,) = model.blocks[10].attn.calls
    torch.testing.assert_close(call["a"], norm(c7))
    torch.testing.assert_close(call["aux_v"], head_gates[:, :, None] * ve4 + v_mudd.view(-1, 6, 8))
    torch.testing.assert_close(call["output_gate"], post[:, 12:18])
    torch.testing.assert_close(call["dc_w1"], post[:, 29:35])
    torch.testing.assert_close(call["dc_w2"], post[:, 35:41])
    assert call["xsa_alpha"] is None
    y = stand_in_output(model.blocks[10].attn, norm(c7), call["aux_v"])
    h = m[8] * h + m[9] * y + m[10] * c0 + m[11] * b
    torch.testing.assert_close(out, m[12] * h + m[13] * mlp_reference(model.blocks[10], h))


def test_final_mix_is_mudd1(monkeypatch):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(24)
    x, inputs = layer_setup(model, tokens)
    inputs.caches[9] = torch.randn_like(x)
    nu = gate_reference(model.mudd1, x)
    ve0 = model.value_embeds[tokens.long()]
    c = inputs.caches
    expected = (x + nu[:, 0:1] * c[0] + nu[:, 1:2] * c[7] + nu[:, 2:3] * c[9] + nu[:, 3:4] * ve0
                + nu[:, 4:5] * c[3])
    torch.testing.assert_close(model.final_mix(x, inputs), expected)


def test_hidden_runs_the_layers_in_order(monkeypatch):
    """The whole forward with the stand-in: layer by layer as tested above, caches from the right layers."""
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(32)
    batch = SimpleNamespace(inputs=tokens, document_ids=torch.zeros(32, dtype=torch.int32))
    hidden = model.hidden(batch, "masks", None)
    x, inputs = model.embed_inputs(tokens, "masks", None)
    snapshots = {}
    for i in range(11):
        x = model.layer(i, x, inputs)
        snapshots[i] = x
    assert inputs.caches[3] is snapshots[3] and inputs.caches[7] is snapshots[7]
    assert inputs.caches[9] is snapshots[9]
    torch.testing.assert_close(hidden, norm(model.final_mix(x, inputs)))
    assert hidden.shape == (32, 48)


# ---- shapes, dtypes, gradients


RECORD_SHAPES = {
    "lm_head": (768, 50304), "embed": (50304, 768), "bigram_embed": (377280, 768),
    "value_embeds": (5 * 50304, 768), "smear_gate": (1, 12), "scalars": (24,), "resid_lambdas": (11, 2),
    "post_lambdas": (11, 2), "ve_gate_bank": (5, 6, 12),
    "pre_gate.w1": (64, 768), "pre_gate.w2": (26, 64), "pre_gate.b2": (26,), "pre_gate.scale": (),
    "post_gate.w1": (64, 768), "post_gate.w2": (41, 64), "post_gate.b2": (41,), "post_gate.scale": (),
    "mudd0.w1": (64, 768), "mudd0.w2": (14, 64), "mudd0.b2": (14,),
    "mudd1.w1": (64, 768), "mudd1.w2": (5, 64), "mudd1.b2": (5,),
    **{f"blocks.{i}.attn.qkvo": (4, 768, 768) for i in range(11) if i != 6},
    **{f"blocks.{i}.mlp.{name}": (3072, 768) for i in range(11) for name in ("fc", "proj")},
}
FP32_ON_GPU = {"scalars", "resid_lambdas", "post_lambdas", "pre_gate.scale", "post_gate.scale"}


class GpuLikeRuntime(R.Runtime):
    compute_dtype = property(lambda self: torch.bfloat16)


def record_model(monkeypatch, runtime_class=R.Runtime):
    if not HAS_ATTENTION:
        use_stand_ins(monkeypatch)
    runtime = runtime_class(rank=0, world_size=1, device=torch.device("meta"), attention_backend="explicit",
                            fp8=False)
    return R.build_model(R.Settings(), runtime)


def test_record_shape_parameters(monkeypatch):
    model = record_model(monkeypatch)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == RECORD_SHAPES
    buffers = {name: tuple(b.shape) for name, b in model.named_buffers() if not name.startswith("rotary.")}
    fp8_scales = {f"mlp_fp8.{name}": (8, 11) for name in ("act_scale", "weight_scale", "next_act_scale",
                                                           "next_weight_scale")}
    assert buffers == {"tied": (), "bigram_signs": (8192, 768), "long_window_tokens": (), "mlp_fp8.steps": (),
                       **fp8_scales}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # on CPU (here: meta) fp32 throughout
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(math.prod(shape) for shape in RECORD_SHAPES.values())


def test_gpu_dtypes(monkeypatch):
    model = record_model(monkeypatch, GpuLikeRuntime)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if name in FP32_ON_GPU else torch.bfloat16), name
    assert model.bigram_signs.dtype == torch.bfloat16 and model.tied.dtype == torch.bool


def check_every_parameter_reached(model, batch, masks):
    def backward():
        model.zero_grad(set_to_none=True)
        hidden = model.hidden(batch, masks, None)
        (hidden.square().sum() + (hidden @ model.lm_head).square().sum()).backward()
        return {name for name, p in model.named_parameters() if p.grad is None}

    assert backward() == {"embed"}  # tied: the embedding is lm_head^T
    model.untie()
    assert backward() == set()


def test_every_parameter_is_reached_by_the_backward_with_the_stand_in(monkeypatch):
    model = stand_in_model(monkeypatch)
    tokens = random_tokens(32)
    batch = SimpleNamespace(inputs=tokens, document_ids=torch.zeros(32, dtype=torch.int32))
    check_every_parameter_reached(model, batch, "masks")


@pytest.mark.skipif(not HAS_ATTENTION, reason="needs section 4a's attention")
def test_whole_forward_with_attention_reaches_every_parameter():
    model, batch = real_model_and_batch()
    masks = model.masks_for(batch, 1, 3)
    hidden = model.hidden(batch, masks, None)
    assert hidden.shape == (64, 48) and torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden.square().mean(-1), torch.ones(64), rtol=1e-4, atol=1e-4)
    check_every_parameter_reached(model, batch, masks)


def test_set_long_window_updates_the_rotary_only_on_a_change(monkeypatch):
    model = stand_in_model(monkeypatch)
    for tokens in (384, 384, 896, 896, 1408, 1664):
        model.set_long_window(tokens)
    assert model.rotary.updates == [(384, 896), (896, 1408), (1408, 1664)]
    assert model.long_window_tokens.item() == 1664
    state = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = stand_in_model(monkeypatch)
    resumed.load_state_dict(state)  # a resumed run continues from the checkpoint's window
    resumed.set_long_window(1664)
    resumed.set_long_window(2048)
    assert resumed.rotary.updates == [(1664, 2048)]


def test_bf16_model_runs_in_bf16(monkeypatch):
    """The GPU's dtypes (bf16 but the fp32 scalars) compose: the forward stays in bf16 (here on CPU)."""
    use_stand_ins(monkeypatch)
    runtime = GpuLikeRuntime(rank=0, world_size=1, device=torch.device("cpu"), attention_backend="explicit", fp8=False)
    model = R.build_model(tiny_settings(), runtime)
    tokens = random_tokens(32)
    batch = SimpleNamespace(inputs=tokens, document_ids=torch.zeros(32, dtype=torch.int32))
    hidden = model.hidden(batch, "masks", None)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()


def real_model_and_batch(length=64):
    """The tiny model with 4a's attention, random weights, and a buffer of three documents."""
    torch.manual_seed(0)
    model = R.GPT(tiny_settings(), "explicit")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    tokens = random_tokens(length)
    tokens[[0, 20, 41]] = 0
    batch = SimpleNamespace(inputs=tokens, document_ids=torch.cumsum(tokens == 0, 0).to(torch.int32))
    return model, batch


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ATTENTION, reason="needs section 4a's attention")
def test_forward_traces_as_one_graph():
    """No host syncs or Python branches on tensors in the whole forward (4a's attention included): dynamo
    traces it whole (fullgraph), tied and untied (a Python flag: one recompile at the untie). Dynamo only
    (backend "eager"): no code generation."""
    model, batch = real_model_and_batch()
    masks = model.masks_for(batch, 1, 3)
    torch._dynamo.reset()
    compiled = torch.compile(model.hidden, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(batch, masks, None), model.hidden(batch, masks, None))
    model.untie()
    with torch.no_grad():
        model.embed.mul_(2)
    torch.testing.assert_close(compiled(batch, masks, None), model.hidden(batch, masks, None))
    torch._dynamo.reset()


@pytest.mark.skipif(not HAS_ATTENTION, reason="needs section 4a's attention")
def test_set_long_window_applies_yarn_to_the_shared_rotary():
    model = real_model_and_batch()[0]
    reference = R.Rotary(8)
    for tokens in (48, 48, 112, 176, 208):
        model.set_long_window(tokens)
    for old, new in ((48, 112), (112, 176), (176, 208)):
        reference.apply_yarn(old, new)
    torch.testing.assert_close(model.rotary.frequencies, reference.frequencies)
    torch.testing.assert_close(model.rotary.scale, reference.scale)
    assert not torch.equal(reference.frequencies, R.Rotary(8).frequencies)
