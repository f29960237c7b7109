"""Record-89 attention (train_gpt.py section 4a) against references written independently here:
explicit loops and masks in fp64, the fact sheet's formulas (RECORDS_29_89.md 2.5 and 3) written directly."""
import math

import pytest
import torch

import train_gpt as R

FLOAT32_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's epsilon when none is given (fact sheet 2.1)
SEQ_LEN, BLOCK, SHORT_BLOCKS, LONG_BLOCKS = 96, 16, 1, 3
DIM, HEADS, HEAD_DIM, DC_WINDOW = 48, 6, 8, 14


def settings() -> R.Settings:
    return R.Settings(model_dim=DIM, num_heads=HEADS, head_dim=HEAD_DIM, dc_window=DC_WINDOW, block_size=BLOCK)


def document_ids_from_lengths(lengths: list[int]) -> torch.Tensor:
    ids = []
    for document, length in enumerate(lengths):
        ids += [document + 7] * length  # ids need not start at 0, only never decrease
    return torch.tensor(ids, dtype=torch.int32)


# Documents crossing block edges, one ending on a block edge (32), one-token and two-token documents.
DOCUMENTS = document_ids_from_lengths([5, 27, 1, 20, 2, 25, 16])
assert DOCUMENTS.numel() == SEQ_LEN


def reference_mask(document_ids: list[int], window: int) -> torch.Tensor:
    """allowed[q, k]: k in q's document and q - window <= k <= q."""
    n = len(document_ids)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(max(0, q - window), q + 1):
            allowed[q, k] = document_ids[q] == document_ids[k]
    return allowed


def reference_frequencies(head_dim: int, window_changes: list[tuple[int, int]]) -> tuple[list[float], float]:
    """omega_j = 1024^(-j/(P-1)) and the scale 0.1, then YaRN at each (old, new) long-window change."""
    pairs = head_dim // 4
    omegas = [1024.0 ** (-j / (pairs - 1)) for j in range(pairs)]
    scale = 0.1
    for old, new in window_changes:
        for j, omega in enumerate(omegas):
            turns = old * omega / (2 * math.pi)
            weight = min(1.0, max(0.0, (turns - 1) / 31))
            omegas[j] = omega * (old / new + weight * (1 - old / new))
        scale *= 1 + 0.2 * math.log(new / old)
    return omegas, scale


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, omegas: list[float]) -> torch.Tensor:
    """x (T, H, D) fp64, positions (T, H): pair (2j, 2j+1) for j < P turned by position * omega_j with
    even' = e cos + o sin, odd' = o cos - e sin; the other dimensions unchanged."""
    out = x.clone()
    for j, omega in enumerate(omegas):
        angle = positions.double() * omega
        even, odd = x[..., 2 * j], x[..., 2 * j + 1]
        out[..., 2 * j] = even * angle.cos() + odd * angle.sin()
        out[..., 2 * j + 1] = odd * angle.cos() - even * angle.sin()
    return out


def reference_softmax_attention(q, k, v, allowed, scale):
    """q, k, v (N, D) fp64 for one head; allowed (N, N)."""
    scores = (q @ k.T * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def reference_dc(q, k, v, w1, w2, document_ids, scale, window, weight_dtype=None):
    """Loops over queries, heads and keys: corr_h[t] = w2_h[t] sum_j (sum_h' w1n_h'[t] P_h'[t,j]) v_h[j]."""
    seq_len, heads, _ = q.shape
    q, k, v, w1, w2 = (t.double() for t in (q, k, v, w1, w2))
    ids = document_ids.tolist()
    correction = torch.zeros_like(q)
    for t in range(seq_len):
        keys = [j for j in range(max(0, t - window + 1), t + 1) if ids[j] == ids[t]]
        w1_normed = w1[t] / (w1[t].square().mean() + 1e-6).sqrt()
        mixed = torch.zeros(len(keys), dtype=torch.float64)
        for other in range(heads):
            scores = torch.stack([scale * q[t, other] @ k[j, other] for j in keys])
            mixed += w1_normed[other] * scores.softmax(dim=0)
        for head in range(heads):
            for index, j in enumerate(keys):
                weight = w2[t, head] * mixed[index]
                if weight_dtype is not None:
                    weight = weight.to(weight_dtype).double()
                correction[t, head] += weight * v[j, head]
    return correction


def reference_layer(layer, x, qkvo, lambdas, document_ids, omegas, scale, aux_v=None, xsa_alpha=None,
                    output_gate=None, dc_w1=None, dc_w2=None):
    """The fact sheet's layer (2.5) in fp64, written out: masks from loops, paired heads as explicit
    interleaved sequences of the head pairs (h, h + 3)."""
    seq_len = x.size(0)
    ids = document_ids.tolist()
    long = layer in (3, 10)
    window = (LONG_BLOCKS if long else SHORT_BLOCKS) * BLOCK
    paired = layer in (0, 2, 5, 9)
    w_q, w_k, w_v, w_o = lambdas[0] * qkvo[0], lambdas[0] * qkvo[1], lambdas[0] * qkvo[2], lambdas[1] * qkvo[3]
    q, k, v = ((x @ w.T).view(seq_len, HEADS, HEAD_DIM) for w in (w_q, w_k, w_v))
    q, k = (t / (t.square().mean(-1, keepdim=True) + FLOAT32_EPS).sqrt() for t in (q, k))
    token = torch.arange(seq_len)[:, None].expand(seq_len, HEADS)
    head = torch.arange(HEADS)[None, :].expand(seq_len, HEADS)
    positions = 2 * token + head % 2 if paired else token
    q, k = reference_rotate(q, positions, omegas), reference_rotate(k, positions, omegas)
    if layer in (3, 10):
        shifted = k.clone()
        for t in range(1, seq_len):
            shifted[t, :, HEAD_DIM // 2:] = k[t - 1, :, HEAD_DIM // 2:]
        k = shifted
    if aux_v is not None:
        v = v + aux_v
    y = torch.zeros_like(q)
    if paired:
        allowed = reference_mask([ids[r // 2] for r in range(2 * seq_len)], window)
        for first in range(HEADS // 2):
            second = first + HEADS // 2
            rows = [torch.stack([t[r // 2, first if r % 2 == 0 else second] for r in range(2 * seq_len)])
                    for t in (q, k, v)]
            out = reference_softmax_attention(*rows, allowed, scale)
            y[:, first], y[:, second] = out[0::2], out[1::2]
    else:
        allowed = reference_mask(ids, window)
        for h in range(HEADS):
            y[:, h] = reference_softmax_attention(q[:, h], k[:, h], v[:, h], allowed, scale)
    if layer == 10:
        y = y + reference_dc(q, k, v, dc_w1, dc_w2, document_ids, scale, DC_WINDOW)
    if layer in (1, 3, 4, 7):
        def excluded(t, h):
            coefficient = (y[t, h] @ v[t, h]) / torch.clamp(v[t, h] @ v[t, h], min=1e-8)
            return y[t, h] - torch.tanh(xsa_alpha[t, h]) * coefficient * v[t, h]

        y = torch.stack([torch.stack([excluded(t, h) for h in range(HEADS)]) for t in range(seq_len)])
    if layer in (3, 10):
        y = y * output_gate[..., None]
    return y.reshape(seq_len, DIM) @ w_o.T


def layer_inputs(layer: int, generator: torch.Generator) -> dict:
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).requires_grad_()

    inputs = dict(x=randn(SEQ_LEN, DIM), lambdas=torch.tensor([0.7, 1.3], requires_grad=True))
    if layer in (1, 2, 8, 9, 10):
        inputs["aux_v"] = randn(SEQ_LEN, HEADS, HEAD_DIM, scale=0.5)
    if layer in (1, 3, 4, 7):
        inputs["xsa_alpha"] = randn(SEQ_LEN, HEADS)
    if layer in (3, 10):
        inputs["output_gate"] = randn(SEQ_LEN, HEADS)
    if layer == 10:
        inputs["dc_w1"], inputs["dc_w2"] = randn(SEQ_LEN, HEADS), randn(SEQ_LEN, HEADS)
    return inputs


YARN_CHANGES = [(LONG_BLOCKS * BLOCK // 3, LONG_BLOCKS * BLOCK)]  # one YaRN update, so scale and omega move


def model_parts(layer: int, seed: int):
    torch.manual_seed(seed)
    attention = R.CausalSelfAttention(settings(), layer)
    rotary = R.Rotary(HEAD_DIM)
    for old, new in YARN_CHANGES:
        rotary.apply_yarn(old, new)
    return attention, rotary


LAYERS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_forward_and_backward_match_fp64_reference(layer):
    generator = torch.Generator().manual_seed(layer)
    attention, rotary = model_parts(layer, seed=layer)
    inputs = layer_inputs(layer, generator)
    masks = R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")
    out = attention(masks=masks, rotary=rotary, **inputs)
    cotangent = torch.randn(out.shape, generator=generator)
    leaves = [attention.qkvo] + list(inputs.values())
    grads = torch.autograd.grad((out * cotangent).sum(), leaves)

    omegas, scale = reference_frequencies(HEAD_DIM, YARN_CHANGES)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    inputs64 = dict(zip(inputs, leaves64[1:]))
    expected = reference_layer(layer, qkvo=leaves64[0], document_ids=DOCUMENTS, omegas=omegas, scale=scale, **inputs64)
    expected_grads = torch.autograd.grad((expected * cotangent.double()).sum(), leaves64)
    error = (out.double() - expected).abs().max().item()
    assert error < 2e-5 * expected.abs().max().item(), f"layer {layer}: output differs by {error}"
    for name, grad, reference in zip(["qkvo"] + list(inputs), grads, expected_grads):
        error = (grad.double() - reference).abs().max().item()
        assert error < 2e-5 * reference.abs().max().item() + 1e-7, f"layer {layer}: d{name} differs by {error}"


@pytest.mark.parametrize("layer", LAYERS)
def test_flex_forward_matches_explicit_path(layer):
    """FlexAttention has a CPU forward (no backward): eager flex vs the dense-mask path, every layer kind."""
    generator = torch.Generator().manual_seed(100 + layer)
    attention, rotary = model_parts(layer, seed=layer)
    inputs = {name: t.detach() for name, t in layer_inputs(layer, generator).items()}
    with torch.no_grad():
        outputs = [attention(masks=R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, backend),
                             rotary=rotary, **inputs) for backend in ("flex", "explicit")]
    error = (outputs[0] - outputs[1]).abs().max().item()
    assert error < 1e-5 * outputs[1].abs().max().item(), f"layer {layer}: flex and explicit differ by {error}"


@pytest.mark.parametrize("layer", [0, 3, 10])
def test_bf16_layer_stays_bf16_and_close_to_fp32(layer):
    """The GPU's compute dtype: fp32 gates and additions do not promote the layer; results near fp32's."""
    generator = torch.Generator().manual_seed(300 + layer)
    attention, rotary = model_parts(layer, seed=layer)
    inputs = {name: t.detach() for name, t in layer_inputs(layer, generator).items()}
    low = {name: t.bfloat16() if name in ("x", "aux_v") else t for name, t in inputs.items()}  # gates stay fp32
    masks = R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")
    x = low.pop("x").requires_grad_()
    out = attention(x, masks=masks, rotary=rotary, **low)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    reference = attention(masks=masks, rotary=rotary, **inputs)
    error = (out.float() - reference).abs().max().item()
    assert error < 0.05 * reference.abs().max().item(), f"layer {layer}: bf16 differs from fp32 by {error}"


def materialise(block_mask, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (query, key) pairs a BlockMask lets through: its mask function on the partial blocks, every pair
    of the full blocks; and the two block lists as dense (Q blocks, K blocks) tables."""
    num_blocks = length // BLOCK
    allowed = torch.zeros(length, length, dtype=torch.bool)
    partial = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    full = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    positions = torch.arange(length)
    for q_block in range(num_blocks):
        rows = positions[q_block * BLOCK:(q_block + 1) * BLOCK]
        lists = ((partial, block_mask.kv_num_blocks, block_mask.kv_indices),
                 (full, block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
        for table, counts, indices in lists:
            for kv_block in indices[0, 0, q_block, :int(counts[0, 0, q_block])].tolist():
                table[q_block, kv_block] = True
                cols = positions[kv_block * BLOCK:(kv_block + 1) * BLOCK]
                if table is full:
                    allowed[rows[:, None], cols[None, :]] = True
                else:
                    allowed[rows[:, None], cols[None, :]] = block_mask.mask_mod(0, 0, rows[:, None], cols[None, :])
    return allowed, partial, full


def random_document_ids(length: int, num_docs: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.zeros(length, dtype=torch.int32)
    starts[torch.randperm(length - 1, generator=generator)[:num_docs - 1] + 1] = 1
    return starts.cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("trial", range(6))
def test_masks_match_the_reference_mask(trial):
    """Dense masks equal the reference; BlockMasks let through exactly the reference pairs, visit exactly the
    blocks holding some allowed pair and mark as full exactly the blocks whose pairs are all allowed."""
    generator = torch.Generator().manual_seed(trial)
    length = BLOCK * 8
    num_docs = [1, 2, 4, 9, 20, 60][trial]
    ids = random_document_ids(length, num_docs, generator)
    short, long = [(1, 2), (1, 3), (2, 5), (1, 9), (3, 4), (2, 2)][trial]
    window_options = (short, long) if trial % 2 else (torch.tensor(short), torch.tensor(long))  # ints or tensors
    explicit = R.attention_masks(ids, *window_options, BLOCK, "explicit")
    flex = R.attention_masks(ids, *window_options, BLOCK, "flex")
    assert set(explicit.by_kind) == set(flex.by_kind) == {"short", "long", "short_paired"}
    for kind, blocks in (("short", short), ("long", long), ("short_paired", short)):
        rows = ids.repeat_interleave(2) if kind.endswith("paired") else ids  # rows 2t, 2t + 1 of token t
        expected = reference_mask(rows.tolist(), blocks * BLOCK)
        assert torch.equal(explicit.by_kind[kind], expected), f"dense {kind} mask differs from the reference"
        allowed, partial, full = materialise(flex.by_kind[kind], rows.numel())
        assert torch.equal(allowed, expected), f"{kind} BlockMask lets through other pairs than the reference"
        per_block = expected.view(rows.numel() // BLOCK, BLOCK, -1, BLOCK).transpose(1, 2).flatten(2)
        assert torch.equal(partial | full, per_block.any(-1)), f"{kind} BlockMask visits the wrong blocks"
        assert torch.equal(full, per_block.all(-1)), f"{kind} BlockMask marks the wrong blocks as full"
        assert not (partial & full).any()


@pytest.mark.parametrize("window_tokens", [0, 7, 17, 30, 31, 33, 46, 50])
def test_block_mask_is_exact_for_windows_of_any_token_count(window_tokens):
    """The block tables do not rely on windows being whole blocks."""
    generator = torch.Generator().manual_seed(window_tokens)
    ids = random_document_ids(BLOCK * 8, 6, generator)
    block_mask = R.window_block_mask(ids, torch.tensor(window_tokens), BLOCK)
    expected = reference_mask(ids.tolist(), window_tokens)
    allowed, partial, full = materialise(block_mask, ids.numel())
    per_block = expected.view(8, BLOCK, 8, BLOCK).transpose(1, 2).flatten(2)
    assert torch.equal(allowed, expected), "BlockMask lets through other pairs than the reference"
    assert torch.equal(partial | full, per_block.any(-1)), "BlockMask visits the wrong blocks"
    assert torch.equal(full, per_block.all(-1)), "BlockMask marks the wrong blocks as full"


def test_window_counts_tokens_as_fa3():
    """FA3 window_size=(W, 0) with W = blocks * block_size: a query inside one long document sees W + 1 keys."""
    ids = torch.zeros(BLOCK * 8, dtype=torch.int32)
    masks = R.attention_masks(ids, 2, 5, BLOCK, "explicit").by_kind
    assert masks["short"][-1].sum() == 2 * BLOCK + 1 and masks["long"][-1].sum() == 5 * BLOCK + 1
    assert masks["short_paired"][-1].sum() == 2 * BLOCK + 1  # W interleaved rows back


def test_paired_heads_mix_values_only_within_pairs_h_and_h_plus_3():
    """With O the identity, value changes on head h reach only output heads h and h + 3 (mod 6) on paired
    layers, only head h elsewhere (fact sheet 2.5: the public module leaks only between (0,3),(1,4),(2,5))."""
    for layer, partners in ((0, lambda h: {h, (h + 3) % 6}), (8, lambda h: {h})):
        attention, rotary = model_parts(layer, seed=1)
        with torch.no_grad():
            attention.qkvo[3] = torch.eye(DIM)
        masks = R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(SEQ_LEN, DIM, generator=generator)
        aux_v = torch.randn(SEQ_LEN, HEADS, HEAD_DIM, generator=generator, requires_grad=True)
        out = attention(x, masks, rotary, torch.ones(2), aux_v=aux_v).view(SEQ_LEN, HEADS, HEAD_DIM)
        for head_out in range(HEADS):
            (grad,) = torch.autograd.grad(out[:, head_out].sum(), aux_v, retain_graph=True)
            reached = {h for h in range(HEADS) if grad[:, h].abs().max() > 0}
            assert reached == partners(head_out), f"layer {layer}: output head {head_out} reads values of {reached}"


def test_rotary_convention_and_positions():
    generator = torch.Generator().manual_seed(0)
    rotary = R.Rotary(16)
    omegas = [1024.0 ** (-j / 3) for j in range(4)]
    assert torch.allclose(rotary.frequencies.double(), torch.tensor(omegas, dtype=torch.float64), rtol=1e-6)
    x = torch.randn(40, HEADS, 16, generator=generator)
    token = torch.arange(40)[:, None].expand(40, HEADS)
    head = torch.arange(HEADS)[None, :].expand(40, HEADS)
    for paired, positions in ((False, token), (True, 2 * token + head % 2)):
        out = rotary(x, paired=paired)
        expected = reference_rotate(x.double(), positions, omegas)
        assert (out.double() - expected).abs().max() < 1e-5, f"rotation differs from the reference (paired {paired})"
        assert torch.equal(out[..., 8:], x[..., 8:]), "the second half of each head must stay stationary"
    unit = torch.zeros(4, 1, 16)
    unit[:, 0, 2] = 1.0  # even dimension of pair 1
    out = rotary(unit)[:, 0]
    angle = torch.arange(4) * omegas[1]
    assert torch.allclose(out[:, 2], angle.cos().float()) and torch.allclose(out[:, 3], -angle.sin().float())


def test_yarn_scale_and_frequencies_follow_the_record():
    """The record's long windows 384 -> 896 -> 1408 -> 1664 tokens: scale 0.11695, 0.12752, 0.13178 (fact
    sheet 2.5) and the frequencies of the formula; both are persistent buffers (training state)."""
    rotary = R.Rotary(128)
    assert rotary.scale.item() == pytest.approx(0.1)
    windows = [384, 896, 1408, 1664]
    for (old, new), scale in zip(zip(windows, windows[1:]), (0.11695, 0.12752, 0.13178)):
        rotary.apply_yarn(old, new)
        assert rotary.scale.item() == pytest.approx(scale, abs=5e-6)
        omegas, reference_scale = reference_frequencies(128, list(zip(windows, windows[1:]))[:windows.index(new)])
        assert rotary.scale.item() == pytest.approx(reference_scale, rel=1e-6)
        assert torch.allclose(rotary.frequencies.double(), torch.tensor(omegas, dtype=torch.float64), rtol=1e-5)
    first = reference_frequencies(128, [])[0]
    assert rotary.frequencies[0] == pytest.approx(first[0]), "fast frequencies (many turns) are kept"
    assert rotary.frequencies[-1] == pytest.approx(first[-1] * 384 / 1664, rel=1e-5), "slow ones interpolated"
    state = rotary.state_dict()
    assert set(state) == {"frequencies", "scale"}
    restored = R.Rotary(128)
    restored.load_state_dict(state)
    assert torch.equal(restored.frequencies, rotary.frequencies) and torch.equal(restored.scale, rotary.scale)


@pytest.mark.parametrize("seq_len,window", [(150, 14), (128, 112), (40, 70), (64, 1)])
def test_dc_correction_matches_loops_over_heads_and_keys(seq_len, window):
    generator = torch.Generator().manual_seed(seq_len + window)
    q, k, v = (torch.randn(seq_len, HEADS, HEAD_DIM, generator=generator) for _ in range(3))
    w1, w2 = torch.randn(seq_len, HEADS, generator=generator), torch.randn(seq_len, HEADS, generator=generator)
    ids = random_document_ids(seq_len, 5, generator) + 3
    out = R.dc_correction(q, k, v, w1, w2, ids, torch.tensor(0.4), window)
    expected = reference_dc(q, k, v, w1, w2, ids, 0.4, window)
    error = (out.double() - expected).abs().max().item()
    assert error < 1e-5 * expected.abs().max().item(), f"DC correction differs from the loops by {error}"


def test_dc_correction_rounds_its_weights_to_the_value_dtype():
    """With bf16 q, k, v the weights w2 * sum w1n P are rounded to bf16 before the product with v (the
    Triton kernel's bf16 MMA); the product itself and the sum are fp32."""
    generator = torch.Generator().manual_seed(7)
    seq_len, window = 80, 14
    q, k, v = (torch.randn(seq_len, HEADS, HEAD_DIM, generator=generator).bfloat16() for _ in range(3))
    w1, w2 = torch.randn(seq_len, HEADS, generator=generator), torch.randn(seq_len, HEADS, generator=generator)
    ids = random_document_ids(seq_len, 3, generator)
    out = R.dc_correction(q, k, v, w1, w2, ids, torch.tensor(0.3), window).double()
    rounded = reference_dc(q, k, v, w1, w2, ids, 0.3, window, weight_dtype=torch.bfloat16)
    unrounded = reference_dc(q, k, v, w1, w2, ids, 0.3, window)
    close_to_rounded = ((out - rounded).abs() < 1e-5).double().mean().item()
    close_to_unrounded = ((out - unrounded).abs() < 1e-5).double().mean().item()
    # a weight near a bf16 rounding edge may round the other way after fp32 vs fp64 softmax: allow a few
    assert close_to_rounded > 0.99 and close_to_unrounded < 0.5, (close_to_rounded, close_to_unrounded)


def test_xsa_matches_the_direct_formula():
    generator = torch.Generator().manual_seed(2)
    y, v = torch.randn(30, HEADS, HEAD_DIM, generator=generator), torch.randn(30, HEADS, HEAD_DIM, generator=generator)
    v[3, 2] = 0.0  # ||v||^2 below the floor: the projection coefficient stays finite
    v[4, 1] *= 1e-5  # ||v||^2 ~ 1e-9: the floor decides the coefficient
    v[5, 0] *= 1e-3  # ||v||^2 ~ 1e-5: just above the floor
    alpha = torch.randn(30, HEADS, generator=generator)
    out = R.exclusive_self_attention(y, v, alpha)
    for t in range(30):
        for h in range(HEADS):
            yd, vd = y[t, h].double(), v[t, h].double()
            expected = yd - math.tanh(alpha[t, h].item()) * (yd @ vd) / max((vd @ vd).item(), 1e-8) * vd
            assert torch.allclose(out[t, h].double(), expected, atol=1e-5), f"XSA differs at token {t}, head {h}"
    full = R.exclusive_self_attention(y, v, torch.full((30, HEADS), 50.0))  # tanh = 1: nothing left along v
    assert ((full * v).sum(-1).abs() < 1e-4).all()


def test_key_offset_shifts_the_stationary_half_across_documents():
    k = torch.randn(12, HEADS, HEAD_DIM)
    out = R.shift_stationary_keys(k)
    assert torch.equal(out[:, :, :HEAD_DIM // 2], k[:, :, :HEAD_DIM // 2])
    assert torch.equal(out[0], k[0])
    for t in range(1, 12):
        assert torch.equal(out[t, :, HEAD_DIM // 2:], k[t - 1, :, HEAD_DIM // 2:])


def test_gates_must_match_the_layer():
    attention, rotary = model_parts(3, seed=0)
    masks = R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")
    with pytest.raises(ValueError, match="output_gate"):
        attention(torch.randn(SEQ_LEN, DIM), masks, rotary, torch.ones(2), xsa_alpha=torch.zeros(SEQ_LEN, HEADS))
    with pytest.raises(R.SettingsError, match="paired"):
        R.AttentionFeatures(paired_heads=True, xsa=True)
    with pytest.raises(R.DataError, match="multiple of --block_size"):
        R.attention_masks(DOCUMENTS[:-1], SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")


@pytest.mark.parametrize("layer", [0, 10])
def test_flex_path_traces_as_one_graph_and_new_windows_reuse_it(layer):
    """Masks and layer in one fullgraph torch.compile (aot_eager: CPU inductor cannot lower flex on strided
    inputs; the GPU lowers with Triton), windows as device tensors: new windows and a YaRN update must not
    recompile."""
    generator = torch.Generator().manual_seed(200 + layer)
    attention, rotary = model_parts(layer, seed=layer)
    inputs = {name: t.detach() for name, t in layer_inputs(layer, generator).items()}

    def masks_and_layer(document_ids, short, long):
        masks = R.attention_masks(document_ids, short, long, BLOCK, "flex")
        return attention(masks=masks, rotary=rotary, **inputs)

    compiled = torch.compile(masks_and_layer, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        for short, long in ((SHORT_BLOCKS, LONG_BLOCKS), (SHORT_BLOCKS + 1, LONG_BLOCKS + 2)):
            if short != SHORT_BLOCKS:
                rotary.apply_yarn(LONG_BLOCKS * BLOCK, long * BLOCK)
            with torch.compiler.set_stance("fail_on_recompile" if short != SHORT_BLOCKS else "default"):
                out = compiled(DOCUMENTS, torch.tensor(short), torch.tensor(long))
            explicit = R.attention_masks(DOCUMENTS, short, long, BLOCK, "explicit")
            expected = attention(masks=explicit, rotary=rotary, **inputs)
            error = (out - expected).abs().max().item()
            assert error < 1e-5 * expected.abs().max().item(), f"layer {layer}: compiled flex differs by {error}"


@pytest.mark.slow
def test_compiled_dc_layer_matches_eager():
    """fullgraph torch.compile with inductor (no graph breaks, as the GPU run needs) of the DC layer (key
    offset, output gate, aux_v), explicit path on CPU, forward and backward."""
    layer = 10
    generator = torch.Generator().manual_seed(layer)
    attention, rotary = model_parts(layer, seed=layer)
    inputs = layer_inputs(layer, generator)
    masks = R.attention_masks(DOCUMENTS, SHORT_BLOCKS, LONG_BLOCKS, BLOCK, "explicit")
    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    results = []
    for module in (attention, compiled):
        out = module(masks=masks, rotary=rotary, **inputs)
        results.append([out] + list(torch.autograd.grad(out.square().sum(), [attention.qkvo, inputs["x"]])))
    for eager, compiled_result in zip(*results):
        error = (eager - compiled_result).abs().max().item()
        assert error < 1e-4 * eager.abs().max().item(), f"compiled differs by {error}"
