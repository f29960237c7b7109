"""Attention masks and attention paths against a naive fp64 reference written independently here."""
import pytest
import torch

from records.recipes import record21

T = record21()  # these tests cover the record-21 recipe kept under records/

EOT = 50256


def random_packed_tokens(seq_len: int, num_docs: int, generator: torch.Generator) -> torch.Tensor:
    """Random tokens with num_docs - 1 document starts (EOT) at random positions after position 0, plus
    one at 0, so documents of very different lengths share the sequence."""
    tokens = torch.randint(0, EOT, (seq_len,), generator=generator)
    starts = torch.randperm(seq_len - 1, generator=generator)[:num_docs - 1] + 1
    tokens[starts] = EOT
    tokens[0] = EOT
    return tokens


def reference_mask(tokens: torch.Tensor, block_size: int, window_blocks: int) -> torch.Tensor:
    """allowed[q, k]: k not after q, same document, k's block at most window_blocks - 1 blocks back."""
    doc, docs = -1, []
    for token in tokens.tolist():
        doc += token == EOT
        docs.append(doc)
    n = len(docs)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(q + 1):
            allowed[q, k] = docs[q] == docs[k] and (q // block_size - k // block_size) < window_blocks
    return allowed


def reference_attention(q, k, v, allowed, scale):
    """q, k, v (B, T, H, D); explicit masked softmax in fp64."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


CASES = [  # (seq_len, block_size, num_docs, long window blocks)
    (256, 32, 1, 3),
    (256, 32, 7, 3),
    (384, 64, 12, 2),
    (512, 32, 40, 5),
]


@pytest.mark.parametrize("seq_len,block_size,num_docs,long_blocks", CASES)
def test_flex_forward_sdpa_and_reference_agree(seq_len, block_size, num_docs, long_blocks):
    generator = torch.Generator().manual_seed(seq_len + num_docs)
    tokens = random_packed_tokens(seq_len, num_docs, generator)
    windows = {"L": torch.tensor(long_blocks), "S": torch.tensor(max(1, long_blocks // 2))}
    flex_masks = T.attention_masks(tokens, windows, block_size, "flex")
    dense_masks = T.attention_masks(tokens, windows, block_size, "sdpa")
    compiled_attention = torch.compile(T.attention, dynamic=False)
    for kind, window in windows.items():
        allowed = reference_mask(tokens, block_size, int(window))
        assert torch.equal(dense_masks[kind], allowed), "dense SDPA mask differs from the reference mask"
        q, k, v = (torch.randn(1, seq_len, 2, 16, generator=generator) for _ in range(3))
        expected = reference_attention(q, k, v, allowed, 0.12)
        with torch.no_grad():
            outputs = {
                "flex eager": T.attention(q, k, v, flex_masks[kind], 0.12),
                "flex compiled": compiled_attention(q, k, v, flex_masks[kind], 0.12),
                "sdpa": T.attention(q, k, v, dense_masks[kind], 0.12),
                "sdpa compiled": compiled_attention(q, k, v, dense_masks[kind], 0.12),
            }
        for name, out in outputs.items():
            error = (out.double() - expected).abs().max().item()
            assert error < 1e-5, f"{name} attention ({kind} window) differs from the reference by {error}"


def test_sdpa_training_path_gradients_match_reference():
    generator = torch.Generator().manual_seed(5)
    tokens = random_packed_tokens(256, 6, generator)
    mask = T.attention_masks(tokens, {"L": torch.tensor(3)}, 32, "sdpa")["L"]
    allowed = reference_mask(tokens, 32, 3)
    q, k, v = (torch.randn(1, 256, 2, 16, generator=generator, requires_grad=True) for _ in range(3))
    weights = torch.randn(1, 256, 2, 16, generator=generator)
    for attention in (T.attention, torch.compile(T.attention, dynamic=False)):
        grads = torch.autograd.grad((attention(q, k, v, mask, 0.12) * weights).sum(), (q, k, v))
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = torch.autograd.grad((reference_attention(qd, kd, vd, allowed, 0.12) * weights).sum(), (qd, kd, vd))
        for name, grad, reference in zip("qkv", grads, expected):
            assert (grad.double() - reference).abs().max().item() < 1e-5, f"d{name} differs from the reference"


@pytest.mark.parametrize("trial", range(6))
def test_block_tables_are_exactly_the_blocks_with_allowed_pairs(trial):
    generator = torch.Generator().manual_seed(100 + trial)
    block_size = [16, 32][trial % 2]
    num_blocks = 12
    seq_len = block_size * num_blocks
    num_docs = [1, 2, 5, 12, 30, 80][trial]
    tokens = random_packed_tokens(seq_len, num_docs, generator)
    document_ids = (tokens == EOT).cumsum(0)
    for window_blocks in (1, 2, 4, num_blocks + 1):
        allowed = reference_mask(tokens, block_size, window_blocks)
        per_block = allowed.view(num_blocks, block_size, num_blocks, block_size).transpose(1, 2)  # (Q, K, b, b)
        expected_any = per_block.flatten(2).any(-1)
        expected_all = per_block.flatten(2).all(-1)
        any_allowed, all_allowed = T.block_tables(document_ids, block_size, torch.tensor(window_blocks))
        assert torch.equal(any_allowed, expected_any), f"blocks with some allowed pair wrong (window {window_blocks})"
        assert torch.equal(all_allowed, expected_all), f"fully allowed blocks wrong (window {window_blocks})"
        block_mask = T.attention_masks(tokens, {"L": torch.tensor(window_blocks)}, block_size, "flex")["L"]
        assert torch.equal(block_mask.to_dense()[0, 0].bool(), expected_any), "BlockMask visits the wrong blocks"
        full_dense = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
        for q_block in range(num_blocks):
            count = int(block_mask.full_kv_num_blocks[0, 0, q_block])
            full_dense[q_block, block_mask.full_kv_indices[0, 0, q_block, :count].long()] = True
        assert torch.equal(full_dense, expected_all), "BlockMask marks the wrong blocks as fully allowed"


def test_window_schedule_matches_the_record():
    settings = T.Settings()
    for step in range(0, settings.num_iterations + 1, 7):
        progress_window = 1728 * step / settings.num_iterations
        # the record's next_multiple_of_n(v, n=128): the smallest multiple of 128, at least 128, >= v
        record_window = next(w for w in range(128, 1728 + 256, 128) if w >= progress_window)
        assert T.window_blocks_at(step, settings) * 128 == record_window
    assert T.window_blocks_at(0, settings) == 1
    assert T.window_blocks_at(settings.num_iterations, settings) == 14


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, seq_len = 32, 64
    rotary = T.Rotary(head_dim, seq_len)
    generator = torch.Generator().manual_seed(0)
    q_vector, k_vector = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    q = rotary(q_vector.expand(1, seq_len, 1, head_dim))[0, :, 0]  # (T, D)
    k = rotary(k_vector.expand(1, seq_len, 1, head_dim))[0, :, 0]
    scores = q @ k.T  # scores[m, n] for query position m, key position n
    for shift in (1, 5, 20):
        assert torch.allclose(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-4)
    assert not torch.allclose(scores[0, 0], scores[10, 0]), "rotary did not rotate anything"


def test_rotary_leaves_half_the_dimensions_unrotated():
    head_dim, seq_len = 32, 16
    rotary = T.Rotary(head_dim, seq_len)
    x = torch.randn(1, seq_len, 3, head_dim)
    y = rotary(x)
    quarter = head_dim // 4
    unrotated = torch.cat([torch.arange(quarter, 2 * quarter), torch.arange(3 * quarter, 4 * quarter)])
    rotated = torch.cat([torch.arange(0, quarter), torch.arange(2 * quarter, 3 * quarter)])
    assert torch.equal(y[..., unrotated], x[..., unrotated])
    assert torch.equal(y[:, 0], x[:, 0]), "position 0 must be the identity"
    changed = (y[:, 1:, :, rotated] - x[:, 1:, :, rotated]).abs().amax(dim=(0, 1, 2))
    assert (changed > 1e-6).all(), "every rotated dimension must change after position 0"
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5), "rotation must preserve norms"
