"""Section 4c of train_gpt.py, decoding: the cached decode gives the logits of the full training forward, and the
full-sequence logits are the validation's. fp64, the tiny preset with every weight random (the zero-initialised
ones too, so that every path shows), over a sequence longer than the long final window with a second document."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt as R
from conftest import random_tiny_model_fp64

SECOND_DOCUMENT = 203  # a BOS here starts a second document (not at a block edge)


@pytest.fixture(scope="module")
def random_model():
    return random_tiny_model_fp64()


def random_tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(seed))


def two_documents(length: int) -> torch.Tensor:
    tokens = random_tokens(length, seed=1)
    tokens[0] = tokens[SECOND_DOCUMENT] = R.BOS
    return tokens


def test_cached_decode_equals_the_full_forward(random_model):
    model, s = random_model
    short, long = R.final_windows(s)
    tokens = two_documents(300)
    # the sequence crosses many attention blocks, the short and the long window of the first document, and the
    # DC window of both
    assert tokens.numel() - SECOND_DOCUMENT > short * s.block_size + s.dc_window
    assert SECOND_DOCUMENT > long * s.block_size + s.dc_window
    full = R.sequence_logits(model, tokens, s)
    assert full.shape == (300, R.padded_vocab_size(s.vocab_size)) and full.dtype == torch.float64
    assert full.std(dim=1).min() > 0.5, "the random model's logits must differ between tokens to tell anything"

    decoder = R.Decoder(model, s)
    # a 100-token prompt, single tokens, 7 tokens at once across the document start, single tokens again
    pieces = [tokens[:100], *tokens[100:200].split(1), tokens[200:207], *tokens[207:].split(1)]
    cached = torch.cat([decoder.feed(piece) for piece in pieces])
    assert all(layer.length == 300 for layer in decoder.layers.values())
    error = (cached - full).abs().amax(dim=1)
    assert error.max() < 1e-10, f"first bad position {(error >= 1e-10).nonzero()[0].item()}: {error.max()}"


def test_the_full_forward_of_a_prefix_is_the_start_of_the_whole(random_model):
    """Padding to whole blocks (203 is not a multiple of 8) and later tokens change nothing before them."""
    model, s = random_model
    tokens = two_documents(300)
    prefix = R.sequence_logits(model, tokens[:SECOND_DOCUMENT + 1], s)
    assert torch.allclose(prefix, R.sequence_logits(model, tokens, s)[:SECOND_DOCUMENT + 1], rtol=0, atol=1e-12)


def test_forked_decoders_continue_independently(random_model):
    model, s = random_model
    tokens = two_documents(260)
    context = R.Decoder(model, s)
    context.feed(tokens[:180])
    other = random_tokens(80, seed=2)
    other[40] = R.BOS
    endings = [tokens[180:260], other]
    for ending in endings:
        fork = context.fork()
        logits = torch.cat([fork.feed(piece) for piece in ending.split(30)])
        expected = R.sequence_logits(model, torch.cat([tokens[:180], ending]), s)[180:]
        assert torch.allclose(logits, expected, rtol=0, atol=1e-10)
    assert context.tokens.numel() == 180 and all(layer.length == 180 for layer in context.layers.values())


def test_full_sequence_logits_give_the_validation_loss(random_model):
    """The same tokens as one validation sequence: validation_loss (the training script's own, with the final
    windows) equals the mean cross-entropy of sequence_logits over all the head's columns."""
    model, s = random_model
    val_tokens = two_documents(257)
    one_sequence = dataclasses.replace(s, val_seq_len=256, val_tokens=256)
    runtime = R.inference_runtime(torch.device("cpu"))
    loss = R.validation_loss(model, val_tokens, R.final_windows(s), one_sequence, runtime)
    model.eval()
    logits = R.sequence_logits(model, val_tokens[:256], s)
    expected = F.cross_entropy(logits, val_tokens[1:].long()).item()
    assert loss == pytest.approx(expected, rel=1e-6)  # the validation's cross-entropy is fp32
    with torch.no_grad():  # another window pair gives another loss: the windows are the final ones
        other = R.validation_loss(model, val_tokens, (1, 2), one_sequence, runtime)
    assert abs(other - loss) > 1e-3
