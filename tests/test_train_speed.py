"""The speed work of train_gpt.py against simple references: the uint16 read-ahead loader against the
previous generator, Muon grouped by element count against a per-matrix loop, compiled Newton-Schulz
against eager, the bucketed overlapped gradient reduction against an all-reduce after backward (2 gloo
ranks), 1 vs 2 ranks with the FP8 head, and the cached window tensors."""
import dataclasses
import functools
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import harness as H
from records.recipes import record21
from conftest import REPO, script_command

T = record21()  # these tests cover the record-21 recipe kept under records/

WORKER = REPO / "tests" / "distributed_worker.py"


def launch(nproc: int, *args: str):
    result = subprocess.run(script_command(WORKER, list(args), nproc), cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (H.SHARD_MAGIC, H.SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


# ---- data loading ----

SEQ_LEN, STEP_TOKENS = 16, 64  # 4 sequences a step: 1 rank x 4 micro-steps, 2 x 2 or 4 x 1


def loader_settings() -> T.Settings:
    return dataclasses.replace(T.Settings(), train_seq_len=SEQ_LEN, train_batch_tokens=STEP_TOKENS)


def cpu_runtime(rank: int, world_size: int) -> T.Runtime:
    return T.Runtime(rank, world_size, torch.device("cpu"), "sdpa", STEP_TOKENS // SEQ_LEN // world_size)


def previous_loader(files, s, runtime, moves_on):
    """train_gpt.py's loader before TrainLoader (np.fromfile -> int32), its shard-boundary test a parameter."""
    seq_len = s.train_seq_len

    def load(path):
        count = T.read_shard_header(path)
        return torch.from_numpy(np.fromfile(path, dtype="<u2", count=count, offset=H.SHARD_HEADER_BYTES)
                                .astype(np.int32))

    file_index, tokens, position = 0, load(files[0]), 0
    while True:
        if moves_on(position, s.train_batch_tokens, tokens.numel()):
            file_index = (file_index + 1) % len(files)
            tokens, position = load(files[file_index]), 0
        for micro_step in range(runtime.grad_accum_steps):
            start = position + (micro_step * runtime.world_size + runtime.rank) * seq_len
            window = tokens[start:start + seq_len + 1].to(runtime.device, non_blocking=True)
            yield window[:-1], window[1:].long()
        position += s.train_batch_tokens


def todays_rule(position, batch, tokens):
    return position + batch + 1 > tokens


def public_rule(position, batch, tokens):
    return position + batch + 1 >= tokens


def shards(tmp_path, sizes):
    generator = np.random.default_rng(0)
    return [write_shard(tmp_path / f"train_{i:06d}.bin", generator.integers(0, 50257, size))
            for i, size in enumerate(sizes)]


def take(batches, runtime, steps):
    return [next(batches) for _ in range(steps * runtime.grad_accum_steps)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loader_yields_the_previous_stream_over_shard_boundaries(tmp_path, world_size):
    # 3b + 5 and 2b + 40 tokens: both boundary rules agree here; 12 steps cross four boundaries
    files = shards(tmp_path, [3 * STEP_TOKENS + 5, 2 * STEP_TOKENS + 40])
    for rank in range(world_size):
        runtime = cpu_runtime(rank, world_size)
        new = take(T.TrainLoader(files, loader_settings(), runtime), runtime, 12)
        old = take(previous_loader(files, loader_settings(), runtime, todays_rule), runtime, 12)
        for (inputs, targets), (old_inputs, old_targets) in zip(new, old, strict=True):
            assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
            assert torch.equal(inputs, old_inputs) and torch.equal(targets, old_targets)


def test_shard_of_3_batches_plus_1_token_gives_2_steps_as_the_public_loader(tmp_path):
    files = shards(tmp_path, [3 * STEP_TOKENS + 1, 3 * STEP_TOKENS + 1])
    runtime = cpu_runtime(0, 1)
    loader = T.TrainLoader(files, loader_settings(), runtime)
    file_of_step = []
    for _ in range(6):
        take(loader, runtime, 1)
        file_of_step.append(loader.file_index)
    assert file_of_step == [0, 0, 1, 1, 0, 0]
    new = take(T.TrainLoader(files, loader_settings(), runtime), runtime, 6)
    public = take(previous_loader(files, loader_settings(), runtime, public_rule), runtime, 6)
    today = take(previous_loader(files, loader_settings(), runtime, todays_rule), runtime, 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(new, public, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(new, today, strict=True)), "today's rule takes 3 steps"
    assert T.check_train_files(files, STEP_TOKENS) == 2 * 2 * STEP_TOKENS


def test_steps_in_shard_counts_what_the_loader_takes():
    for num_tokens in range(STEP_TOKENS, 4 * STEP_TOKENS + 3):
        position, steps = 0, 0
        while not public_rule(position, STEP_TOKENS, num_tokens):
            position, steps = position + STEP_TOKENS, steps + 1
        assert T.steps_in_shard(num_tokens, STEP_TOKENS) == steps, num_tokens


def test_loader_restarts_from_its_file_index_and_position(tmp_path):
    files = shards(tmp_path, [3 * STEP_TOKENS + 5, 2 * STEP_TOKENS + 40, 2 * STEP_TOKENS + 9])
    runtime = cpu_runtime(1, 2)
    loader = T.TrainLoader(files, loader_settings(), runtime)
    take(loader, runtime, 5)
    restarted = T.TrainLoader(files, loader_settings(), runtime, loader.file_index, loader.position)
    for a, b in zip(take(loader, runtime, 7), take(restarted, runtime, 7), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_loader_reads_the_next_shard_on_a_background_thread(tmp_path, monkeypatch):
    files = shards(tmp_path, [2 * STEP_TOKENS + 5] * 3)
    reads, load_shard = [], T.load_shard
    monkeypatch.setattr(T, "load_shard", lambda path, *args: reads.append(
        (path.name, threading.current_thread().name)) or load_shard(path, *args))
    runtime = cpu_runtime(0, 1)
    loader = T.TrainLoader(files, loader_settings(), runtime)
    take(loader, runtime, 5)  # steps 3 and 5 start files 1 and 2
    loader.next_tokens.result()
    assert reads[0] == (files[0].name, threading.current_thread().name)
    assert [name for name, _ in reads[1:]] == [files[1].name, files[2].name, files[0].name]
    assert all(thread.startswith("shard-reader") for _, thread in reads[1:]), reads


def test_load_shard_reads_uint16_tokens_and_validation_stays_int32(tmp_path):
    tokens = np.arange(1000) * 50 % 50257
    path = write_shard(tmp_path / "val_000000.bin", tokens)
    loaded = T.load_shard(path, 50257)
    assert loaded.dtype == torch.uint16 and np.array_equal(loaded.numpy(), tokens)
    s = dataclasses.replace(T.Settings(), val_tokens=512)
    val = T.load_val_tokens([path], s)
    assert val.dtype == torch.int32 and torch.equal(val, torch.from_numpy(tokens[:513]).int())


# ---- Muon ----


def reference_muon(params, steps_of_grads, lr=0.05, momentum=0.95, ns_steps=5):
    """Per matrix, as the previous implementation grouped by shape: momentum, Nesterov, Newton-Schulz,
    the shape factor applied to the update, then the step."""
    params = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in steps_of_grads:
        for param, buffer, grad in zip(params, buffers, grads):
            buffer.lerp_(grad, 1 - momentum)
            update = T.newton_schulz_orthogonalize(grad.lerp(buffer, momentum), ns_steps, torch.float32)
            param -= lr * update * max(1.0, param.size(-2) / param.size(-1)) ** 0.5
    return params


def test_muon_grouped_by_element_count_equals_a_per_matrix_loop():
    """One process here; test_train_distributed checks that 2 gloo ranks equal this one process."""
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker

    params, grads = distributed_worker.muon_parameters_and_gradients()
    expected = reference_muon(params, grads)
    muon = T.Muon(params, lr=0.05, momentum=0.95, ns_steps=5, ns_dtype=torch.float32)
    assert [len(group["params"]) for group in muon.param_groups] == [4, 5], "groups by element count"
    result = distributed_worker.run_muon(rank=0, world_size=1)["params"]
    for index, (a, b, start) in enumerate(zip(result, expected, params, strict=True)):
        assert not torch.allclose(a, start), f"parameter {index} never moved"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"parameter {index}")


def test_record_muon_needs_7_gathers_on_8_ranks():
    with torch.device("meta"):
        model = T.GPT(T.Settings(), "sdpa")
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    muon = T.Muon(matrices, lr=0.05, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16, rank=0, world_size=8)
    assert sum(math.ceil(len(group["params"]) / 8) for group in muon.param_groups) == 7
    by_shape = {tuple(p.shape) for p in matrices}
    assert sum(math.ceil(sum(tuple(p.shape) == shape for p in matrices) / 8) for shape in by_shape) == 8


@pytest.mark.slow
def test_compiled_newton_schulz_equals_eager_within_bf16_rounding():
    """The record's Muon shapes scaled down 8x: qkv (3, 96, 96), attention out (96, 96), MLP in (384, 96)
    and out (96, 384); bf16 as on GPUs. The compiled function fuses elementwise steps (fewer roundings), so
    the two differ by bf16 rounding: much less than either differs from the float32 result."""
    compiled = T.newton_schulz_compiled
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 96, 96), (96, 96), (384, 96), (96, 384)]:
        grad = torch.randn(shape, generator=generator)
        eager = T.newton_schulz_orthogonalize(grad, 5, torch.bfloat16).float()
        fused = compiled(grad, 5, torch.bfloat16).float()
        exact = T.newton_schulz_orthogonalize(grad, 5, torch.float32)
        eager_error = ((eager - exact).norm() / exact.norm()).item()
        difference = ((fused - eager).norm() / exact.norm()).item()
        assert fused.shape == eager.shape == grad.shape
        assert 1e-4 < eager_error < 0.05, f"{shape}: bf16 rounding of eager {eager_error:.2e}"
        assert difference < 2 * eager_error, f"{shape}: compiled vs eager {difference:.2e}, bf16 {eager_error:.2e}"


# ---- gradient reduction and world-size equivalence ----


def test_bucketed_reduction_equals_all_reduce_after_backward_and_starts_during_backward(tmp_path):
    launch(2, "reduce", str(tmp_path / "reduce"))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"reduce.rank{rank}.pt")
        assert result["grads"].keys() == result["reference_grads"].keys()
        for name, grad in result["grads"].items():
            reference = result["reference_grads"][name]
            assert grad.dtype == reference.dtype and torch.equal(grad, reference), f"rank {rank}: {name} differs"
        assert torch.allclose(result["loss"], result["reference_loss"], rtol=1e-6, atol=0)
        events = result["events"]
        reductions = [i for i, (kind, _) in enumerate(events) if kind == "all_reduce"]
        finals = [i for i, (kind, _) in enumerate(events) if kind == "final"]
        assert len(reductions) == result["num_buckets"] == 5
        assert len(finals) == 2 * 9, "each of the 9 gradients is final once per micro-step"
        assert reductions[0] < finals[-1], "the first bucket must be reduced before backward ends"
        assert reductions[0] > finals[8], "nothing is reduced during the first micro-step"


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_with_the_fp8_head_in_fp32(tmp_path):
    generator = np.random.default_rng(0)
    for name, size in (("train_000001", 20000), ("val_000000", 5000)):
        write_shard(tmp_path / f"{name}.bin", generator.integers(0, 256, size))
    args = ["--preset=tiny", "--compile=false", "--num_iterations=3", "--fp8_head=true", "--vocab_size=256",
            f"--train_files={tmp_path}/train_*.bin", f"--val_files={tmp_path}/val_*.bin",
            "--num_layers=2", "--attention_layout=LS", "--value_embed_layout=0-"]
    launch(1, "train_fp32", str(tmp_path / "one"), *args)
    launch(2, "train_fp32", str(tmp_path / "two"), *args)
    one = torch.load(tmp_path / "one.rank0.pt")
    two = [torch.load(tmp_path / f"two.rank{rank}.pt") for rank in (0, 1)]
    assert one["grad_accum_steps"] == 2 * two[0]["grad_accum_steps"] == 4
    assert one["params"]["lm_head.weight"].dtype == torch.float32
    for step, (a, b) in enumerate(zip(one["losses"], two[0]["losses"])):
        assert abs(a - b) < 1e-5 * abs(a), f"step {step}: loss {a} on 1 rank vs {b} on 2 ranks"
    for name, reference in one["params"].items():
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), f"ranks disagree on {name}"
        difference = (reference - two[0]["params"][name]).norm() / reference.norm().clamp_min(1e-12)
        assert difference < 1e-4, f"{name} differs between 1 and 2 ranks (relative {difference:.2e})"


# ---- host hygiene ----


def test_window_tensors_are_cached_one_per_distinct_window():
    s = T.Settings()
    tensors = [T.window_blocks_tensor(step, s, torch.device("cpu")) for step in range(s.num_iterations + 1)]
    assert [int(t) for t in tensors] == [T.window_blocks_at(step, s) for step in range(s.num_iterations + 1)]
    assert len({id(t) for t in tensors}) == len({int(t) for t in tensors}) == 14
    assert all(t.dtype == torch.int32 and t.ndim == 0 for t in tensors)


def test_cuda_allocator_setting_defaults_to_expandable_segments_and_yields_to_the_user():
    show = "import train_gpt, os; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    for preset, expected in ((None, "expandable_segments:True"), ("max_split_size_mb:64", "max_split_size_mb:64")):
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
        if preset:
            env["PYTORCH_CUDA_ALLOC_CONF"] = preset
        out = subprocess.run([sys.executable, "-c", show], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_makes_no_host_device_synchronisation_on_cuda():
    s = T.parse_settings(["--preset=tiny", "--fp8_head=true", "--compile=false", "--attention_backend=sdpa",
                          "--train_files=unused", "--val_files=unused"])
    runtime = T.resolve_runtime(s, 0, 1, 0)
    model = T.build_model(s, runtime)
    optimizers = T.build_optimizers(model, s, runtime)
    reducer = T.GradientReducer(model.parameters(), runtime)
    tokens = torch.randint(0, s.vocab_size, (runtime.grad_accum_steps, s.train_seq_len + 1), device="cuda")
    batches = [(row[:-1].int(), row[1:].long()) for row in tokens] * 2
    T.train_step(model, optimizers, reducer, iter(batches), 0, s, runtime)  # first step: lazy state, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        T.train_step(model, optimizers, reducer, iter(batches[runtime.grad_accum_steps:]), 1, s, runtime)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def eager_and_regionally_compiled(s: T.Settings, savers: T.MemorySavers) -> tuple[T.GPT, T.GPT]:
    """Two models with the same weights: one eager, one through compile_model (aot_eager: the same graph split
    as inductor, without code generation; seconds on CPU)."""
    torch._dynamo.reset()  # GPT.run_blocks' graphs of other tests' models (dynamo caches per code object)
    torch.manual_seed(0)
    eager = T.GPT(s, "sdpa", savers)
    model = T.GPT(s, "sdpa", savers)
    model.load_state_dict(eager.state_dict())
    T.compile_model(model, backend="aot_eager")
    return eager, model


def assert_same_loss_and_gradients(model: T.GPT, loss: torch.Tensor, eager: T.GPT, tokens: torch.Tensor, window):
    reference = eager(tokens[:-1], tokens[1:], window)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-5, atol=0)
    for (name, param), reference_param in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(param.grad, reference_param.grad, rtol=1e-4, atol=1e-6), name


def test_regional_compile_finishes_gradients_region_by_region_during_backward():
    """compile_model compiles the embeddings, groups of 2 blocks and the head separately, so backward is one
    autograd node per region: the head's gradients are final (and GradientReducer's hooks can start reducing
    them) before the last group's backward starts, and each group's before the previous group's. Compiled
    as one graph, every gradient would be final only after all of backward. aot_eager: the same graph split
    as inductor, without code generation (seconds on CPU); the loss and gradients equal the eager model's."""
    s = T.parse_settings(["--model_dim=32", "--num_heads=2", "--head_dim=16", "--train_seq_len=256",
                          "--block_size=32", "--max_window_tokens=128", "--vocab_size=1000", "--fp8_head=false"])
    # checkpointing inside a region, across a region boundary
    eager, model = eager_and_regionally_compiled(s, T.MemorySavers(checkpoint_blocks=3))
    regions = model.training_regions
    assert regions.block_ranges == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    events = []
    names = {param: name for name, param in model.named_parameters()}
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(lambda p: events.append(("final", names[p])))
    compiled_run_blocks = regions.run_blocks

    def run_blocks(first, last, *args):  # the gradient of a group's output arrives just before its backward
        x, encoder_outputs = compiled_run_blocks(first, last, *args)
        x.register_hook(lambda grad: events.append(("backward of group", first)))
        return x, encoder_outputs

    regions.run_blocks = run_blocks
    tokens = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(2))
    window = torch.tensor(2)
    loss = model(tokens[:-1], tokens[1:], window)
    loss.backward()
    assert_same_loss_and_gradients(model, loss, eager, tokens, window)

    def position(event):
        return events.index(event)

    assert position(("final", "lm_head.weight")) < position(("backward of group", 10))
    for first, last in regions.block_ranges[1:]:  # a group's weights are final before the previous group runs
        for i in range(first, last):
            for name, _ in model.blocks[i].named_parameters():
                assert position(("final", f"blocks.{i}.{name}")) < position(("backward of group", first - 2)), name
    assert position(("backward of group", 0)) < position(("final", "embed.weight"))


def test_regional_compile_recomputes_one_loss_chunk_at_a_time_in_backward():
    """With --loss_chunk_tokens, compile_model leaves the chunk loop eager around one compiled chunk
    (GPT.summed_loss): backward then recomputes each chunk's head and loss just before that chunk's
    backward, so one chunk's logits exist at a time. Compiled as one graph, inductor fuses the chunks and
    keeps them all (the GPU check saw 5 of 6 chunks' logits live at the training peak). The loss and the
    gradients equal the eager model's."""
    s = T.parse_settings(["--num_layers=2", "--model_dim=32", "--num_heads=2", "--head_dim=16",
                          "--train_seq_len=256", "--block_size=32", "--max_window_tokens=128", "--vocab_size=1000",
                          "--fp8_head=false", "--attention_layout=LL", "--value_embed_layout=--"])
    eager, model = eager_and_regionally_compiled(s, T.MemorySavers(loss_chunk_tokens=64))  # 4 chunks
    regions = model.training_regions
    compiled_summed_loss, events = regions.head_loss.keywords["summed_loss"], []

    def summed_loss(x_chunk, targets):
        events.append("chunk head+loss" + (" (backward)" if backward_started else ""))
        loss = compiled_summed_loss(x_chunk, targets)
        loss.register_hook(lambda grad: events.append("chunk backward"))
        return loss

    regions.head_loss = functools.partial(model.head_loss, summed_loss=summed_loss)
    backward_started = False
    tokens = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(3))
    window = torch.tensor(2)
    loss = model(tokens[:-1], tokens[1:], window)
    backward_started = True
    loss.backward()
    # forward: 4 chunks; backward: per chunk, its gradient arrives, then its head+loss is recomputed
    assert events == ["chunk head+loss"] * 4 + ["chunk backward", "chunk head+loss (backward)"] * 4
    assert_same_loss_and_gradients(model, loss, eager, tokens, window)
