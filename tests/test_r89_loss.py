"""Section 5 of train_gpt.py: the soft-capped multi-target training loss and its public gradient rule,
the validation loss, the prefix table, the FP8 LM head and the FP8 MLP with per-slot delayed scaling. Every
reference is written here independently: direct cross-entropy sums, explicit loops, fp64, and an emulation of
the FP8 quantisation."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import train_gpt as R
from conftest import tiktoken_cache

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def capped(logits):
    return 23 * torch.sigmoid((logits + 5) / 7.5)


def random_problem(num_tokens=48, dim=32, vocab=128, num_mtp=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=generator, dtype=dtype)
    head = torch.randn(dim, vocab, generator=generator, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab - 16, (num_tokens,), generator=generator)  # the last 16 columns: padding
    prefix = torch.randint(0, vocab - 16, (num_tokens,), generator=generator)
    prefix[torch.rand(num_tokens, generator=generator) < 0.3] = -1
    mtp_weights = torch.tensor([1.0, 0.5, 0.125][:num_mtp])
    prefix_weight = torch.tensor(0.25)
    return hidden, head, targets, prefix, mtp_weights, prefix_weight


def direct_loss(hidden, head, targets, prefix, mtp_weights, prefix_weight):
    """sum_k w_k sum_{t + k - 1 < T} CE(z_t, y_{t+k-1}) + w_p sum_{prefix_t valid} CE(z_t, prefix_t), each term an
    F.cross_entropy sum over all columns."""
    z = capped(hidden @ head)
    num_tokens = len(targets)
    total = 0.0
    for k in range(1, len(mtp_weights) + 1):
        rows = num_tokens - (k - 1)
        total = total + mtp_weights[k - 1].item() * F.cross_entropy(z[:rows], targets[k - 1:], reduction="sum")
    valid = prefix >= 0
    return total + prefix_weight.item() * F.cross_entropy(z[valid], prefix[valid], reduction="sum")


def public_rule_gradients(hidden, head, targets, prefix, mtp_weights, prefix_weight):
    """The public kernel's gradient, row by row with explicit loops: dlogits = (23/7.5) u (1 - u) (S_w softmax(z) -
    sum of the weights of the targets equal to each column), S_w = every MTP weight + w_p where the prefix is
    valid (also in the last rows, whose loss has fewer terms)."""
    logits = hidden @ head
    u = torch.sigmoid((logits + 5) / 7.5)
    probabilities = torch.softmax(23 * u, dim=-1)
    grad_z = torch.zeros_like(logits)
    num_tokens = len(targets)
    for t in range(num_tokens):
        softmax_weight = mtp_weights.sum().item() + (prefix_weight.item() if prefix[t] >= 0 else 0.0)
        grad_z[t] = softmax_weight * probabilities[t]
        for k in range(1, len(mtp_weights) + 1):
            if t + k - 1 < num_tokens:
                grad_z[t, targets[t + k - 1]] -= mtp_weights[k - 1].item()
        if prefix[t] >= 0:
            grad_z[t, prefix[t]] -= prefix_weight.item()
    grad_logits = grad_z * (23 / 7.5) * u * (1 - u)
    return grad_logits @ head.T, hidden.T @ grad_logits


def loss_and_gradients(problem, fp8=False, chunk_tokens=R.TRAIN_LOSS_CHUNK_TOKENS):
    hidden, head, *rest = problem
    hidden, head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    loss = R.training_loss(hidden, head, *rest, fp8=fp8, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.detach(), hidden.grad, head.grad


@pytest.mark.parametrize("num_mtp", [1, 2, 3])
def test_training_loss_value_is_the_summed_multi_target_ce(num_mtp):
    problem = random_problem(num_mtp=num_mtp, seed=num_mtp)
    loss = R.training_loss(*problem, fp8=False)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, direct_loss(*problem), rtol=1e-12, atol=1e-12)


def test_prefix_weight_zero_and_all_prefixes_missing_drop_the_prefix_term():
    hidden, head, targets, prefix, mtp_weights, _ = random_problem()
    expected = direct_loss(hidden, head, targets, torch.full_like(prefix, -1), mtp_weights, torch.tensor(0.0))
    torch.testing.assert_close(R.training_loss(hidden, head, targets, prefix, mtp_weights, torch.tensor(0.0), False),
                               expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.training_loss(hidden, head, targets, torch.full_like(prefix, -1), mtp_weights,
                                               torch.tensor(0.25), False), expected, rtol=1e-12, atol=1e-12)


def test_gradient_follows_the_public_rule_and_differs_from_the_loss_gradient_only_in_the_last_rows():
    problem = random_problem(num_mtp=3)
    _, grad_hidden, grad_head = loss_and_gradients(problem)
    expected_hidden, expected_head = public_rule_gradients(*problem)
    torch.testing.assert_close(grad_hidden, expected_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_head, expected_head, rtol=1e-10, atol=1e-12)
    # the true gradient of the reported loss: equal except in the last K - 1 = 2 rows
    hidden = problem[0].clone().requires_grad_()
    direct_loss(hidden, *problem[1:]).backward()
    torch.testing.assert_close(grad_hidden[:-2], hidden.grad[:-2], rtol=1e-10, atol=1e-12)
    assert (grad_hidden[-2:] - hidden.grad[-2:]).abs().max() > 1e-3


@pytest.mark.parametrize("fp8", [False, True])
def test_chunked_equals_unchunked(fp8):
    dtype = torch.float32 if fp8 else torch.float64
    problem = random_problem(num_tokens=64, dtype=dtype)
    whole = loss_and_gradients(problem, fp8, chunk_tokens=10_000)
    chunked = loss_and_gradients(problem, fp8, chunk_tokens=16)
    tolerance = dict(rtol=1e-5, atol=1e-5) if fp8 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, **tolerance)
    with torch.no_grad():
        torch.testing.assert_close(R.training_loss(*problem, fp8=fp8, chunk_tokens=16), whole[0], **tolerance)


def test_mtp_weights_change_without_changing_the_code_path():
    problem = list(random_problem(num_mtp=2))
    first = R.training_loss(*problem, fp8=False)
    problem[4] = torch.tensor([1.0, 0.0])
    second = R.training_loss(*problem, fp8=False)
    torch.testing.assert_close(second, direct_loss(*problem), rtol=1e-12, atol=1e-12)
    assert (first - second).abs() > 1.0


# ---- FP8 LM head: record 89's fixed scales against an fp64 emulation of the quantisation ----

def head_emulation(x, w, grad):
    """logits, dX, dW of the FP8 head: e4m3(x / (100/448)) @ e4m3(W / (1.6/448)) rescaled; e5m2(g / (0.75/448))."""
    sx, sw, sg = 100 / 448, 1.6 / 448, 0.75 / 448
    x8 = (x.double() / sx).clamp(-448, 448).to(E4M3).double()
    w8 = (w.double() / sw).clamp(-448, 448).to(E4M3).double()
    g8 = (grad.double() / sg).clamp(-57344, 57344).to(E5M2).double()
    return (x8 @ w8) * sx * sw, (g8 @ w8.T) * sg * sw, (x8.T @ g8) * sx * sg


def test_fp8_head_matches_the_emulated_quantisation():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 48, generator=generator) * 3
    w = torch.randn(48, 64, generator=generator) * 0.4
    grad = torch.randn(32, 64, generator=generator) * 0.05
    grad[0, 0] = 1e3  # past e5m2's range at this scale: saturates, never inf
    x.requires_grad_(), w.requires_grad_()
    logits = R.head_logits(x, w, fp8=True)
    logits.backward(grad)
    expected_logits, expected_grad_x, expected_grad_w = head_emulation(x.detach(), w.detach(), grad)
    assert logits.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), expected_grad_w, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()
    # and it is really FP8: far from the exact product
    assert (logits.double() - x.detach().double() @ w.detach().double()).abs().max() > 1e-2


def test_fp8_head_gradient_in_a_bf16_parameter_comes_back_in_bf16():
    x = torch.randn(16, 16, requires_grad=True)
    w = torch.randn(16, 32).bfloat16().requires_grad_()
    R.head_logits(x, w, fp8=True).sum().backward()
    assert w.grad.dtype == torch.bfloat16


def test_fp8_training_loss_uses_the_fp8_head():
    problem = random_problem(num_tokens=32, dim=32, vocab=64, dtype=torch.float32)
    hidden, head, targets, prefix, mtp_weights, prefix_weight = problem
    expected_logits, _, _ = head_emulation(hidden, head, torch.zeros(32, 64))
    z = capped(expected_logits.float())
    expected = sum(w.item() * F.cross_entropy(z[:32 - k], targets[k:], reduction="sum")
                   for k, w in enumerate(mtp_weights))
    valid = prefix >= 0
    expected = expected + prefix_weight.item() * F.cross_entropy(z[valid], prefix[valid], reduction="sum")
    torch.testing.assert_close(R.training_loss(*problem, fp8=True), expected, rtol=1e-5, atol=1e-4)
    assert (R.training_loss(*problem, fp8=True) - R.training_loss(*problem, fp8=False)).abs() > 1e-3


def test_fp8_shapes_not_divisible_by_16_are_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        R.head_logits(torch.randn(24, 16), torch.randn(16, 32), fp8=True)


# ---- validation loss ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_validation_loss_sum(dtype):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 16, generator=generator).to(dtype)
    head = (torch.randn(16, 96, generator=generator) * 0.5).to(dtype)
    targets = torch.randint(0, 96, (40,), generator=generator)
    z = (hidden @ head)  # in dtype
    z = (23 * torch.sigmoid((z + 5) / 7.5)).float()
    expected = F.cross_entropy(z, targets, reduction="sum")
    got = R.validation_loss_sum(hidden, head, targets, chunk_tokens=16)
    assert got.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: softcap rounding in eager op order may differ
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(R.validation_loss_sum(hidden, head, targets), got, rtol=1e-6, atol=1e-5)


# ---- prefix table ----

@pytest.fixture
def gpt2(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def longest_prefix_by_search(encoding, token):
    """Among all tokens, the one whose bytes are the longest proper prefix of token's bytes; -1 if none."""
    data = encoding.decode_single_token_bytes(token)
    best, best_length = -1, 0
    for other in range(encoding.n_vocab - 1):  # without <|endoftext|>
        candidate = encoding.decode_single_token_bytes(other)
        if best_length < len(candidate) < len(data) and data.startswith(candidate):
            best, best_length = other, len(candidate)
    return best


def test_prefix_table_entries(gpt2, tmp_path):
    table = R.build_prefix_table(50257, 50304, cache_dir=tmp_path)
    assert table.shape == (50304,) and table.dtype == torch.int64
    hello, = gpt2.encode(" hello")
    for word in [" hello", " the", "ing", " Wikipedia", " international"]:
        token, = gpt2.encode(word)
        assert table[token] == longest_prefix_by_search(gpt2, token), word
    assert gpt2.decode([table[hello].item()]) in (" hell", " hel", " he", " h")
    assert table[gpt2.encode("a")[0]] == -1  # a single byte has no proper prefix
    assert table[50256] == -1 and (table[50257:] == -1).all()
    # each entry is a proper byte-prefix of its token
    for token in range(0, 50256, 997):
        if table[token] >= 0:
            data, prefix = gpt2.decode_single_token_bytes(token), gpt2.decode_single_token_bytes(table[token].item())
            assert data.startswith(prefix) and len(prefix) < len(data)


def test_prefix_table_cache_is_used_and_rebuilt_when_stale(gpt2, tmp_path, monkeypatch):
    built = R.build_prefix_table(50257, 50304, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and not files[0].name.endswith(".tmp")

    def no_tokenizer():
        raise AssertionError("the tokenizer was loaded although a valid cache exists")
    monkeypatch.setattr(R, "gpt2_encoding", no_tokenizer)
    assert torch.equal(R.build_prefix_table(50257, 50304, cache_dir=tmp_path), built)
    monkeypatch.undo()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    record = torch.load(files[0], weights_only=True)
    record["format"] = R.PREFIX_TABLE_FORMAT - 1
    torch.save(record, files[0])
    assert torch.equal(R.build_prefix_table(50257, 50304, cache_dir=tmp_path), built)
    assert torch.load(files[0], weights_only=True)["format"] == R.PREFIX_TABLE_FORMAT
    files[0].write_bytes(b"truncated")
    assert torch.equal(R.build_prefix_table(50257, 50304, cache_dir=tmp_path), built)


def test_prefix_table_without_tokenizer_names_tiktoken_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(R.DataError, match="TIKTOKEN_CACHE_DIR") as error:
        R.build_prefix_table(50257, 50304, cache_dir=tmp_path)
    assert "\n" not in str(error.value)


# ---- FP8 MLP ----

def mlp_weights(dim=32, hidden=64, seed=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    fc = (torch.rand(hidden, dim, generator=generator) * 2 - 1) * 0.2
    proj = torch.randn(hidden, dim, generator=generator) * 0.05
    return fc.to(dtype), proj.to(dtype)


def up_emulation(x, fc):
    """post of the FP8 up-projection: scales and quotients rounded to x's dtype, dequant in fp32 (fp64 here)."""
    dtype = x.dtype
    x_amax = x.abs().max()
    x_scale = torch.tensor(448 / x_amax.double().item()).to(dtype)
    x8 = (x.double() * x_scale.double()).to(dtype).double().clamp(-448, 448).to(E4M3).double()
    fc_scale = torch.tensor(fc.abs().max().double().item() / 448).to(dtype)
    fc8 = (fc.double() / fc_scale.double()).to(dtype).double().clamp(-448, 448).to(E4M3).double()
    pre = ((x8 @ fc8.T) * (fc_scale.double() * x_amax.double() / 448)).to(dtype)
    return (torch.relu(pre) * torch.relu(pre)).to(dtype) if dtype == torch.float32 else torch.relu(pre).square()


def down_emulation(post, proj, act_scale, weight_scale):
    """quotients in fp32 (as the GPU computes them: fp64 quotients round differently on e4m3 ties), products in fp64."""
    act_scale, weight_scale = torch.tensor(act_scale), torch.tensor(weight_scale)
    post8 = (post.float() / act_scale).clamp(-448, 448).to(E4M3).double()
    proj8 = (proj.float() / weight_scale).clamp(-448, 448).to(E4M3).double()
    return (post8 @ proj8) * act_scale.double() * weight_scale.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_mlp_forward_matches_the_emulation_over_the_delayed_scaling_switch(dtype):
    """18 training steps with a weight that changes between them (as after optimizer steps): the activation
    scale is 1.8 amax(previous post)/448 from the second forward (1 at the first), the weight scale the current
    amax/448 in the first 16 forwards and 1.12 amax(previous weight)/448 after."""
    generator = torch.Generator().manual_seed(4)
    fc, proj = mlp_weights(dtype=dtype)
    state = R.MLPFP8State(slots_per_step=1, num_layers=2)
    act_scale, previous_proj = 1.0, None
    for step in range(18):
        x = (torch.randn(32, 32, generator=generator) * (1 + step % 3)).to(dtype)
        proj = (proj.float() * 1.1).to(dtype)
        out = R.mlp_forward(x, fc, proj, state.at(0, layer=1))
        post = up_emulation(x, fc)
        # the scales are fp32 numbers, amax * headroom / 448 (bf16 weights often sit exactly on an e4m3 rounding
        # tie of proj / scale, so a scale rounded otherwise would quantise differently)
        weight_amax = (previous_proj if step >= 16 else proj).abs().max().float()
        weight_scale = (weight_amax * (1.12 if step >= 16 else 1.0) / 448).item()
        expected = down_emulation(post, proj, act_scale, weight_scale)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-3 if dtype == torch.bfloat16 else 1e-6)
        act_scale, previous_proj = (post.abs().max().float() * 1.8 / 448).item(), proj
        assert state.next_act_scale[0, 1].item() == pytest.approx(act_scale, rel=1e-6)  # in use from the next step
        state.end_step()
        assert state.act_scale[0, 1].item() == pytest.approx(act_scale, rel=1e-6)
    assert state.steps == 18 and state.act_scale[0, 0] == 1  # layer 0 untouched


def test_fp8_mlp_up_projection_rounds_like_the_emulation_in_bf16():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(32, 32, generator=generator).bfloat16()
    fc, _ = mlp_weights(dtype=torch.bfloat16)
    post = R.fp8_up_projection(x, fc)
    expected = up_emulation(x, fc)
    assert post.dtype == torch.bfloat16
    mismatched = (post != expected).float().mean()
    assert mismatched < 0.02  # fp32 vs fp64 accumulation may flip a rare bf16 rounding
    torch.testing.assert_close(post.float(), expected.float(), rtol=1.6e-2, atol=1e-6)


def test_delayed_scales_per_slot_one_rank_equals_two_ranks():
    """1 rank running slots 0, 1 in turn each step vs two states (ranks) each running one slot: identical."""
    generator = torch.Generator().manual_seed(6)
    fc, proj = mlp_weights()
    one_rank = R.MLPFP8State(slots_per_step=2, num_layers=1)
    ranks = [R.MLPFP8State(slots_per_step=2, num_layers=1) for _ in range(2)]
    slot_index = torch.arange(2)
    for step in range(19):
        proj = proj * (1.05 if step % 2 else 0.93)
        for slot in range(2):
            x = torch.randn(16, 32, generator=generator) * (1 + 3 * slot)
            single = R.mlp_forward(x, fc, proj, one_rank.at(slot_index[slot], 0))
            separate = R.mlp_forward(x, fc, proj, ranks[slot].at(slot_index[slot], 0))
            assert torch.equal(single, separate)
        for state in (one_rank, *ranks):
            state.end_step()
    for slot in range(2):
        for name in ("act_scale", "weight_scale", "next_act_scale", "next_weight_scale"):
            assert torch.equal(getattr(one_rank, name)[slot], getattr(ranks[slot], name)[slot]), name
    # and the slots really differ (a shared history would have mixed them)
    assert one_rank.act_scale[0, 0] != one_rank.act_scale[1, 0]


def test_evaluation_forward_leaves_the_state_alone_and_the_state_is_in_the_state_dict():
    fc, proj = mlp_weights()
    state = R.MLPFP8State(slots_per_step=2, num_layers=3)
    R.mlp_forward(torch.randn(16, 32), fc, proj, state.at(1, 2))
    before = {name: tensor.clone() for name, tensor in state.state_dict().items()}
    assert set(before) == {"act_scale", "weight_scale", "next_act_scale", "next_weight_scale", "steps"}
    out = R.mlp_forward(torch.randn(16, 32), fc, proj, None)
    assert out.shape == (16, 32)
    for name, tensor in state.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_fp8_mlp_recomputed_by_activation_checkpointing_equals_the_plain_run():
    """A forward recomputed in backward reads the scales the first forward read, and writes the same values."""
    generator = torch.Generator().manual_seed(10)
    fc, proj = mlp_weights()
    states = [R.MLPFP8State(slots_per_step=1, num_layers=1) for _ in range(2)]
    for step in range(3):
        x = torch.randn(16, 32, generator=generator)
        results = []
        for state, recompute in zip(states, (False, True)):
            inputs = [t.clone().requires_grad_() for t in (x, fc, proj)]

            def forward(x, fc, proj):
                return R.mlp_forward(x, fc, proj, state.at(0, 0)) * 1.5  # recomputed: the output is used in backward
            out = checkpoint(forward, *inputs, use_reentrant=False) if recompute else forward(*inputs)
            (out.square().sum()).backward()
            results.append((out.detach(), *(t.grad for t in inputs)))
            state.end_step()
        for a, b in zip(*results):
            assert torch.equal(a, b)
        for name, tensor in states[0].state_dict().items():
            assert torch.equal(tensor, states[1].state_dict()[name]), name


def test_mlp_without_fp8_matches_autograd_of_the_formula():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    fc, proj = (w.double().requires_grad_() for w in mlp_weights())
    grad = torch.randn(16, 32, generator=generator, dtype=torch.float64)
    out = R.mlp_forward(x, fc, proj, None)
    got = torch.autograd.grad(out, (x, fc, proj), grad)
    reference = torch.relu(x @ fc.T).square() @ proj
    expected = torch.autograd.grad(reference, (x, fc, proj), grad)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fp8_mlp_backward_matches_autograd_of_the_formula():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(32, 32, generator=generator, requires_grad=True)
    fc, proj = (w.requires_grad_() for w in mlp_weights())
    grad = torch.randn(32, 32, generator=generator)
    state = R.MLPFP8State(slots_per_step=1, num_layers=1)
    got = torch.autograd.grad(R.mlp_forward(x, fc, proj, state.at(0, 0)), (x, fc, proj), grad)
    expected = torch.autograd.grad(torch.relu(x @ fc.T).square() @ proj, (x, fc, proj), grad)
    for a, b in zip(got, expected):
        assert ((a - b).norm() / b.norm()) < 0.05  # post comes from the FP8 pre-activation
        assert a.dtype == b.dtype


@pytest.mark.slow
def test_compiled_fp8_mlp_and_loss_chunk_match_eager_without_recompiling_per_slot_or_weights():
    """fullgraph compile: the slot is a device tensor, so both slots (and new MTP weights) run one graph each."""
    generator = torch.Generator().manual_seed(9)
    fc, proj = mlp_weights()
    eager_state, compiled_state = R.MLPFP8State(2, 1), R.MLPFP8State(2, 1)
    slots = torch.arange(2)

    def forward(x, state, slot):
        return R.mlp_forward(x, fc, proj, state.at(slot, 0))
    compiled = torch.compile(forward, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            for slot in range(2):
                x = torch.randn(16, 32, generator=generator).requires_grad_()
                eager_out = forward(x, eager_state, slots[slot])
                compiled_out = compiled(x, compiled_state, slots[slot])
                torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(torch.autograd.grad(compiled_out.sum(), x)[0],
                                           torch.autograd.grad(eager_out.sum(), x)[0], rtol=1e-4, atol=1e-5)
            eager_state.end_step()
            compiled_state.end_step()
        for name, tensor in eager_state.state_dict().items():
            torch.testing.assert_close(compiled_state.state_dict()[name], tensor, rtol=1e-6, atol=0)

        problem = list(random_problem(num_tokens=32, vocab=64, dtype=torch.float32))
        chunk = torch.compile(R.training_loss_chunk, fullgraph=True, dynamic=False)
        for mtp_weights in (torch.tensor([1.0, 0.5, 0.25]), torch.tensor([1.0, 0.5, 0.0])):
            problem[4] = mtp_weights
            eager = loss_and_gradients(problem, fp8=True, chunk_tokens=16)
            hidden, head = problem[0].clone().requires_grad_(), problem[1].clone().requires_grad_()
            loss = R.training_loss(hidden, head, *problem[2:], fp8=True, chunk_tokens=16, chunk_loss=chunk)
            loss.backward()
            for a, b in zip((loss, hidden.grad, head.grad), eager):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
