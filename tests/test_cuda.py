"""CUDA-only checks of the record-89 recipe (train_gpt.py), run on a lent GPU machine
(`python -m pytest -q tests/test_cuda.py`; tests/gpu_acceptance.sh runs them); skipped on CPU.

PLATFORM_NOTES.md saw compiled FlexAttention on CPU silently miscompute when v came from a merged QKV
projection; these tests look for the same class of error on CUDA at the model level: FlexAttention against the
explicit dense-mask attention, the compiled network against the eager one, the FP8 ops (torch._scaled_mm)
against their CPU emulation on the same FP8 values, and a short tiny-preset run end to end."""
import sys

import pytest
import torch

import train_gpt as R
from conftest import REPO, run_process, shard_paths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ_LEN = 2048  # the record's model at a short sequence: the explicit path's dense masks are (2T)^2 bytes
WINDOWS = (3, 7)  # (short, long) in blocks: stage 2's


def has_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def cuda_model(backend: str) -> R.GPT:
    """The record-shape model on the GPU (bf16 but the fp32 parameters), every zero-initialised weight made
    random so that each path shows in the loss; the same weights for every backend (seeded)."""
    settings = R.Settings()
    runtime = R.Runtime(rank=0, world_size=1, device=torch.device("cuda"), attention_backend=backend, fp8=False)
    model = R.build_model(settings, runtime)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator, device="cuda"))
    return model


def packed_batch(seed=0) -> R.Batch:
    """SEQ_LEN random tokens with a dozen documents, starting at a BOS as a training slot does."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, R.BOS, (SEQ_LEN + 1,), generator=generator)
    tokens[torch.randperm(SEQ_LEN, generator=generator)[:12]] = R.BOS
    tokens[0] = R.BOS
    tokens = tokens.to("cuda")
    inputs = tokens[:-1].to(torch.int32)
    return R.Batch(inputs, tokens[1:].long(), R.document_ids_of(inputs))


def mean_loss(model: R.GPT, batch: R.Batch) -> torch.Tensor:
    """Mean CE of the record's validation path (bf16 head, soft cap), differentiable."""
    hidden = model.hidden(batch, model.masks_for(batch, *WINDOWS), None)
    return R.validation_loss_sum(hidden, model.lm_head, batch.targets) / SEQ_LEN


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_flex_attention_matches_explicit_attention_eager_and_compiled():
    explicit, flex = cuda_model("explicit"), cuda_model("flex")
    flex.load_state_dict(explicit.state_dict())
    batch = packed_batch()
    with torch.no_grad():
        reference = mean_loss(explicit, batch).item()
        eager_flex = mean_loss(flex, batch).item()
        R.compile_model(flex)
        compiled_flex = mean_loss(flex, batch).item()
    assert abs(eager_flex - reference) < 2e-2, f"eager flex {eager_flex} vs explicit {reference}"
    assert abs(compiled_flex - reference) < 2e-2, f"compiled flex {compiled_flex} vs explicit {reference}"


def test_compiled_flex_gradients_match_eager_explicit():
    explicit, flex = cuda_model("explicit"), cuda_model("flex")
    flex.load_state_dict(explicit.state_dict())
    R.compile_model(flex)
    batch = packed_batch(seed=1)
    mean_loss(flex, batch).backward()
    mean_loss(explicit, batch).backward()
    for (name, a), b in zip(flex.named_parameters(), explicit.parameters()):
        if b.grad is None:  # a path the validation forward does not take (e.g. the untied embedding)
            assert a.grad is None, name
            continue
        assert relative(a.grad, b.grad) < 5e-2, f"{name}: relative gradient difference {relative(a.grad, b.grad):.3g}"


def test_compiled_network_matches_eager_on_a_record_validation_sequence():
    model = cuda_model("flex")
    batch = packed_batch(seed=2)
    with torch.no_grad():
        eager_hidden = model.hidden(batch, model.masks_for(batch, *WINDOWS), None)
        R.compile_model(model)
        compiled_hidden = model.hidden(batch, model.masks_for(batch, *WINDOWS), None)
    assert relative(compiled_hidden, eager_hidden) < 2e-2


@pytest.mark.skipif(not has_fp8(), reason="needs FP8 matmuls (compute capability 8.9 or newer)")
def test_fp8_head_on_cuda_matches_its_cpu_emulation():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 768, generator=generator).bfloat16()  # (T, d)
    w = torch.randn(768, 50304, generator=generator) * 0.02  # (d, V) fp32, as the head parameter
    grad = (torch.randn(256, 50304, generator=generator) * 1e-3).bfloat16()  # (T, V)
    logits, x_f8, w_f8 = R.fp8_head_op(x.cuda(), w.cuda())
    cpu_logits, cpu_x_f8, cpu_w_f8 = R.fp8_head_forward_body(x, w)
    assert torch.equal(x_f8.cpu().view(torch.uint8), cpu_x_f8.view(torch.uint8))  # the same FP8 values
    assert torch.equal(w_f8.cpu().view(torch.uint8), cpu_w_f8.view(torch.uint8))
    assert relative(logits.cpu(), cpu_logits) < 1e-2
    grad_x, grad_w = R.fp8_head_backward_op(grad.cuda(), x_f8, w_f8)
    cpu_grad_x, cpu_grad_w = R.fp8_head_backward_body(grad, cpu_x_f8, cpu_w_f8)
    assert relative(grad_x.cpu(), cpu_grad_x) < 1e-2
    assert relative(grad_w.cpu(), cpu_grad_w) < 1e-3  # fp32 output
    # and the FP8 head is close to the plain product (the scales are right)
    assert relative(logits.cpu(), x.float() @ w) < 0.06


@pytest.mark.skipif(not has_fp8(), reason="needs FP8 matmuls (compute capability 8.9 or newer)")
def test_fp8_mlp_projections_on_cuda_match_their_cpu_emulation():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 768, generator=generator).bfloat16()  # (T, d)
    fc = torch.randn(3072, 768, generator=generator) * 0.02  # (H, d)
    proj = torch.randn(3072, 768, generator=generator) * 0.02  # (H, d): post (T, H) @ proj
    post = R.fp8_up_projection(x.cuda(), fc.cuda())
    cpu_post = R.fp8_up_projection(x, fc)
    assert relative(post.cpu(), cpu_post) < 1e-2
    assert relative(cpu_post, torch.relu(x.float() @ fc.T).square()) < 0.1
    act_scale = (cpu_post.float().abs().amax() / R.FP8_E4M3_MAX).reshape(())
    weight_scale = (proj.abs().amax() / R.FP8_E4M3_MAX).reshape(())
    out = R.fp8_down_projection(post, proj.cuda(), act_scale.cuda(), weight_scale.cuda())
    cpu_out = R.fp8_down_projection(cpu_post, proj, act_scale, weight_scale)
    assert relative(out.cpu(), cpu_out) < 1e-2
    assert relative(cpu_out, cpu_post.float() @ proj) < 0.1


def test_tiny_preset_trains_on_the_gpu(tmp_path):
    """A short run of the real trainer: compiled, FlexAttention, FP8 where the GPU has it; it finishes and
    its val loss falls."""
    from records.tool import read_log
    train_files, val_files = shard_paths()
    command = [sys.executable, str(REPO / "train_gpt.py"), "--preset=tiny", "--device=cuda", "--compile=true",
               f"--train_files={train_files}", f"--val_files={val_files}", f"--log_dir={tmp_path}", "--run_id=cuda_tiny"]
    result = run_process(command, cwd=REPO, timeout=1200)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    log = read_log(tmp_path / "cuda_tiny.txt", keep_source=False)
    assert log.is_complete, log.status
    losses = [line.val_loss for line in log.val_steps]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0] - 0.5, losses
