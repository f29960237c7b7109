"""The FP8 LM-head op against its previous implementation, and issue 15: gradient accumulation must not
change what the FP8 backward sees (1 rank with 8 micro-steps vs 8 ranks with 1)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from records.recipes import record21

T = record21()  # these tests cover the record-21 recipe kept under records/

# ---- the previous implementation (train_gpt.py before the sync-free op), kept only as the reference ----


@torch.library.custom_op("speedrun_reference::old_fp8_matmul", mutates_args=())
def old_fp8_matmul_op(x: Tensor, w: Tensor, x_scale: float, w_scale: float,
                      grad_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    x_f8 = x.mul(x_scale).to(torch.float8_e4m3fn)
    w_f8 = w.mul(w_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=x.dtype, use_fast_accum=True,
                           scale_a=x.new_tensor(1 / x_scale, dtype=torch.float32),
                           scale_b=x.new_tensor(1 / w_scale, dtype=torch.float32))
    return out, x_f8, w_f8


@old_fp8_matmul_op.register_fake
def _(x, w, x_scale, w_scale, grad_scale):
    return (x.new_empty(x.size(0), w.size(0)), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("speedrun_reference::old_fp8_matmul_backward", mutates_args=())
def old_fp8_matmul_backward_op(grad: Tensor, x_f8: Tensor, w_f8: Tensor, x_scale: float, w_scale: float,
                               grad_scale: float) -> tuple[Tensor, Tensor]:
    grad_f8 = grad.mul(grad_scale).to(torch.float8_e5m2)
    inv_grad_scale = grad.new_tensor(1 / grad_scale, dtype=torch.float32)
    grad_x = torch._scaled_mm(grad_f8, w_f8.T.contiguous().T, out_dtype=grad.dtype, scale_a=inv_grad_scale,
                              scale_b=grad.new_tensor(1 / w_scale, dtype=torch.float32))
    grad_w = torch._scaled_mm(grad_f8.T.contiguous(), x_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=inv_grad_scale, scale_b=grad.new_tensor(1 / x_scale, dtype=torch.float32))
    return grad_x, grad_w


@old_fp8_matmul_backward_op.register_fake
def _(grad, x_f8, w_f8, x_scale, w_scale, grad_scale):
    return grad.new_empty(x_f8.shape), grad.new_empty(w_f8.shape, dtype=torch.float32)


def _old_setup_context(ctx, inputs, output):
    _, _, x_scale, w_scale, grad_scale = inputs
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.set_materialize_grads(False)


def _old_backward(ctx, grad_out, *_unused_grads):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = old_fp8_matmul_backward_op(grad_out, x_f8, w_f8, *ctx.scales)
    return grad_x, grad_w, None, None, None


old_fp8_matmul_op.register_autograd(_old_backward, setup_context=_old_setup_context)


def old_fp8_matmul(x: Tensor, w: Tensor) -> Tensor:
    return old_fp8_matmul_op(x, w, T.FP8_X_SCALE, T.FP8_W_SCALE, T.FP8_GRAD_SCALE)[0]


# ---- the op against the previous implementation ----


def head_operands(tokens: int, dim: int, vocab: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=generator).to(dtype)
    w = torch.randn(vocab, dim, generator=generator) * 0.05
    # output gradients from 1e-13 to 1e-4: across e5m2's normal, subnormal and flushed-to-zero ranges
    magnitude = 10 ** (torch.rand(tokens, vocab, generator=generator) * 9 - 13)
    grad = (torch.randn(tokens, vocab, generator=generator).sign() * magnitude).to(dtype)
    return x, w, grad


def forward_and_gradients(matmul, x, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = matmul(x, w)
    return (out, *torch.autograd.grad(out, (x, w), grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,dim,vocab", [(64, 32, 128), (256, 64, 512), (512, 48, 256)])
def test_fp8_op_equals_the_previous_implementation_bit_for_bit(tokens, dim, vocab, dtype):
    x, w, grad = head_operands(tokens, dim, vocab, dtype, seed=tokens + dim)
    new, old = forward_and_gradients(T.fp8_matmul, x, w, grad), forward_and_gradients(old_fp8_matmul, x, w, grad)
    for name, a, b in zip(("output", "grad_x", "grad_w"), new, old):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"{name} differs from the previous implementation at {tokens}x{dim}x{vocab} {dtype}"
    flushed = grad.mul(T.FP8_GRAD_SCALE).to(torch.float8_e5m2).float() == 0
    assert 0.1 < flushed.float().mean() < 0.9, "the output gradients should be partly flushed to zero in e5m2"


@pytest.mark.slow
def test_compiled_fp8_bodies_equal_the_previous_implementation_bit_for_bit():
    """The bodies CUDA runs compiled, compiled here for CPU: fusing scale + cast changes no bit."""
    x, w, grad = head_operands(256, 64, 512, torch.bfloat16, seed=7)
    old_out, old_grad_x, old_grad_w = forward_and_gradients(old_fp8_matmul, x, w, grad)
    out, x_f8, w_f8 = T.fp8_forward_compiled(x, w)
    grad_x, grad_w = T.fp8_backward_compiled(grad, x_f8, w_f8)
    assert torch.equal(out, old_out) and torch.equal(grad_x, old_grad_x) and torch.equal(grad_w, old_grad_w)
    assert grad_w.stride() == (1, grad_w.size(0)), "grad_w is computed transposed, (x_f8.T @ grad_f8).T"
    # the fake implementation (what torch.compile plans with) must declare the real strides
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = T.fp8_matmul_backward_op(torch.empty(256, 512, dtype=torch.bfloat16),
                                        torch.empty(256, 64, dtype=torch.float8_e4m3fn),
                                        torch.empty(512, 64, dtype=torch.float8_e4m3fn))
    assert fake[1].stride() == grad_w.stride() and fake[0].stride() == grad_x.stride()


# ---- issue 15: 1 rank with 8 micro-steps against 8 ranks with 1 ----

RECORD_TOKENS, RECORD_VOCAB = 48 * 1024, 50304  # tokens per micro-batch and padded vocabulary of the record
TOKENS, DIM, VOCAB, MICRO_STEPS = 256, 64, 512, 8


class FP8Head(nn.Module):
    """Embedding -> rms_norm -> FP8 head -> softcap -> cross-entropy, the trainer's head path at a small
    shape. The loss is scaled by (TOKENS / RECORD_TOKENS) * (VOCAB / RECORD_VOCAB) so the logit gradients
    have the record's magnitudes (a 1/49152 share per token of probabilities spread over 50304 tokens)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(VOCAB, DIM, generator=generator))
        self.head = nn.Parameter(torch.randn(VOCAB, DIM, generator=generator) * 0.25 / DIM**0.5 * 4)
        self.loss_divisor = 1  # the previous trainer divided each micro-step's loss by grad_accum_steps

    def forward(self, inputs: Tensor, targets: Tensor, window_blocks: Tensor) -> Tensor:
        logits = T.fp8_matmul(T.rms_norm(self.embed[inputs]), self.head)
        capped = 30 * torch.sigmoid(logits.float() / 7.5)
        scale = (TOKENS / RECORD_TOKENS) * (VOCAB / RECORD_VOCAB) / self.loss_divisor
        return F.cross_entropy(capped, targets) * scale


def micro_batches():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (MICRO_STEPS, TOKENS + 1), generator=generator)
    return [(row[:-1], row[1:]) for row in tokens]


def gradient_operands_of(run) -> list[Tensor]:
    """The e5m2 operands entering _scaled_mm while `run` executes (one per FP8 backward)."""
    seen, scaled_mm = [], torch._scaled_mm

    def recording(a, b, *args, **kwargs):
        if a.dtype == torch.float8_e5m2:
            seen.append(a.clone())
        return scaled_mm(a, b, *args, **kwargs)

    torch._scaled_mm = recording
    try:
        run()
    finally:
        torch._scaled_mm = scaled_mm
    return seen


def runtime_with(accum_steps: int) -> T.Runtime:
    return T.Runtime(rank=0, world_size=1, device=torch.device("cpu"), attention_backend="sdpa",
                     grad_accum_steps=accum_steps)


@pytest.mark.slow
def test_fp8_backward_sees_the_same_gradients_at_1_rank_with_8_micro_steps_as_at_8_ranks():
    batches, window = micro_batches(), torch.tensor(1)
    model = FP8Head()

    # 1 rank, 8 micro-steps, through the trainer's accumulation and reduction
    one_rank = copy.deepcopy(model)
    runtime = runtime_with(MICRO_STEPS)
    reducer = T.GradientReducer(one_rank.parameters(), runtime)
    one_rank_operands = gradient_operands_of(
        lambda: T.accumulate_gradients(one_rank, reducer, iter(batches), window, MICRO_STEPS))

    # 8 simulated ranks, 1 micro-step each; the all-reduce averages their gradients
    rank_grads, rank_operands = [], []
    for batch in batches:
        rank = copy.deepcopy(model)
        rank_reducer = T.GradientReducer(rank.parameters(), runtime_with(1))
        rank_operands += gradient_operands_of(lambda: T.accumulate_gradients(rank, rank_reducer, iter([batch]), window, 1))
        rank_grads.append({name: p.grad for name, p in rank.named_parameters()})

    assert len(one_rank_operands) == len(rank_operands) == MICRO_STEPS
    for micro_step, (a, b) in enumerate(zip(one_rank_operands, rank_operands)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"micro-batch {micro_step}: e5m2 gradients differ"
    for name, p in one_rank.named_parameters():
        mean = torch.stack([grads[name] for grads in rank_grads]).sum(0) / MICRO_STEPS
        torch.testing.assert_close(p.grad, mean, rtol=1e-6, atol=0, msg=f"{name}: mean gradient differs")

    flushed = torch.stack([(op.float() == 0).float().mean() for op in one_rank_operands]).mean().item()
    eight_rank_flushed = torch.stack([(op.float() == 0).float().mean() for op in rank_operands]).mean().item()
    assert flushed == eight_rank_flushed

    # The previous design (each micro-step's loss divided by 8 before backward) flushes far more: this
    # test's shape reproduces the gap, so it would have caught it.
    old_design = copy.deepcopy(model)
    old_design.loss_divisor = MICRO_STEPS
    old_operands = gradient_operands_of(lambda: T.accumulate_gradients(
        old_design, T.GradientReducer(old_design.parameters(), runtime_with(1)), iter(batches), window, MICRO_STEPS))
    old_flushed = torch.stack([(op.float() == 0).float().mean() for op in old_operands]).mean().item()
    assert flushed < 0.02 and old_flushed > 0.15, f"flushed to zero: {flushed:.1%} now, {old_flushed:.1%} before"
