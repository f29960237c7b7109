"""CUDA-only checks, run on a lent GPU machine (`python -m pytest -q tests/test_cuda.py`); skipped on CPU.

PLATFORM_NOTES.md saw compiled FlexAttention on CPU silently miscompute when v came from a merged QKV
projection; these tests look for the same class of error on CUDA at the model level."""
import pytest
import torch

import train_gpt as T
from conftest import with_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The record's model at a short sequence (eager FlexAttention materialises T x T scores).
SHORT = ["--train_seq_len=4096", "--val_seq_len=4096", "--train_batch_tokens=4096", "--val_tokens=4096"]


def cuda_model(backend: str, extra=()):
    settings = T.parse_settings(with_settings(SHORT, *extra))
    runtime = T.Runtime(rank=0, world_size=1, device=torch.device("cuda"), attention_backend=backend,
                        grad_accum_steps=1)
    model = T.build_model(settings, runtime)
    with torch.no_grad():  # zero-initialised projections would hide attention differences
        for block in model.blocks:
            if block.attn is not None:
                block.attn.proj.weight.normal_(0, 0.02)
            block.mlp.proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    return settings, model


def packed_tokens(seq_len=4097, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50256, (seq_len,), generator=generator)
    tokens[torch.randperm(seq_len, generator=generator)[:12]] = T.END_OF_TEXT
    return tokens.to("cuda", torch.int32)


def test_compiled_flex_model_matches_eager_flex_and_dense_sdpa():
    _, model = cuda_model("flex", ["--fp8_head=false"])
    model.eval()
    tokens = packed_tokens()
    inputs, targets = tokens[:-1], tokens[1:].long()
    window = torch.tensor(4, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        eager = model(inputs, targets, window).item()
        compiled = T.compile_model(model)(inputs, targets, window).item()  # evaluation: one graph
        model.attention_backend = "sdpa"
        dense = model(inputs, targets, window).item()
    assert abs(compiled - eager) < 2e-2, f"compiled flex {compiled} vs eager flex {eager}"
    assert abs(compiled - dense) < 2e-2, f"compiled flex {compiled} vs dense sdpa {dense}"


def test_compiled_flex_gradients_match_dense_sdpa():
    _, flex_model = cuda_model("flex", ["--fp8_head=false"])
    _, dense_model = cuda_model("sdpa", ["--fp8_head=false"])
    dense_model.load_state_dict(flex_model.state_dict())
    tokens = packed_tokens(seed=1)
    window = torch.tensor(4, dtype=torch.int32, device="cuda")
    T.compile_model(flex_model)  # training: compiled regions, called through the model itself
    flex_model(tokens[:-1], tokens[1:].long(), window).backward()
    dense_model(tokens[:-1], tokens[1:].long(), window).backward()
    for (name, a), b in zip(flex_model.named_parameters(), dense_model.parameters()):
        difference = (a.grad.float() - b.grad.float()).norm() / b.grad.float().norm().clamp_min(1e-12)
        assert difference < 5e-2, f"{name}: relative gradient difference {difference:.3g}"


def test_fp8_matmul_on_cuda_matches_fp32():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 768, generator=generator).cuda().bfloat16().requires_grad_()
    w = (torch.randn(50304, 768, generator=generator) * 0.02).cuda().requires_grad_()
    grad = (torch.randn(4096, 50304, generator=generator) * 1e-4).cuda().bfloat16()
    out = T.fp8_matmul(x, w)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad)
    reference = x.float() @ w.float().T
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(out, reference) < 0.06
    assert relative(grad_x, grad.float() @ w.float()) < 0.12
    assert relative(grad_w, grad.float().T @ x.float()) < 0.12
