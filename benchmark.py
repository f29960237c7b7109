"""Speed and learning benchmark on one device: the speed tables measure the record-21 recipe (kept under records/,
the default until record 89); --learning-curves compares it with the default recipe, train_gpt.py (record 89).

    python benchmark.py --out DIR          # CUDA GPU: the record shape (48K-token micro-batch, bf16, compiled)
    python benchmark.py --cpu-tiny --out DIR   # CPU: the tiny preset, fp32, eager (also automatic without CUDA)
    python benchmark.py --learning-curves --out DIR   # CPU: record 21 vs record 89, val loss vs training tokens

Measures, in one run, and prints one Markdown report that is also written to DIR/benchmark.md, with the
same figures in DIR/benchmark.json:
  1. the record-shape micro-batch (forward + backward), the Muon and Adam steps, and from them a predicted
     8-GPU step time and run total (communication is not measured);
  2. the device's ceilings (a large matmul, a device copy), the model's FLOPs per token counted from the
     shapes, and the MFU against the measured matmul ceiling;
  3. a breakdown of one micro-step into components timed in isolation, against the whole measured step;
  4. a learning proxy: a short run of the default recipe on enwiki with fixed settings (constants below);
  5. the data loaders on the CPU, record 21's TrainLoader against record 89's DocumentLoader: batches per
     second, and the share of its time a consumer with fixed work per batch waits for them.
Every figure is tagged with the device, torch version, git commit and command line.

--learning-curves is a separate mode (section 10): it trains the record-21 and the record-89 recipes, each as
its own process at its tiny preset with the same number of training tokens, reads their logs, and writes the
val loss against training tokens as a Markdown table, JSON and a PNG plot.

Sections, top to bottom:
  1. Fixed settings        4. Ceilings            7. Component breakdown
  2. Metadata              5. FLOP count          8. Learning proxy
  3. Timing helpers        6. Record-shape step   9. Report (JSON, Markdown) and main
                                                 10. Learning curves: record 21 vs record 89
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import harness as H  # noqa: E402
import train_gpt as R89  # noqa: E402
from data import testdata  # noqa: E402
from records.recipes import record21  # noqa: E402

T = record21()  # the speed and learning benchmarks below measure the record-21 recipe kept under records/

# ----------------------------------------------------------------------------------------------------
# 1. Fixed settings (keep them fixed so results compare across commits)

def default_data(first_shards: bool = True) -> tuple[str, str] | str:
    """(train files, val files) from the tests' test-data lookup (data/testdata.py: $SPEEDRUN_TEST_DATA,
    ../shared/data/enwiki, or FineWeb from data/cached_fineweb10B.py 1): the first shard of each, or with
    first_shards=False the lookup's globs. Returns the lookup's reason instead when it finds no data."""
    try:
        train_files, val_files = testdata.shard_paths()
    except testdata.MissingTestData as missing:
        return str(missing)
    if not first_shards:
        return train_files, val_files
    return str(testdata.first_file(train_files)), str(testdata.first_file(val_files))


PREDICTED_WORLD_SIZE = 8  # the record's GPU count
# Data loaders: enough 48K-token batches to pass a 16M-token enwiki shard (~320 of them) and so include a
# shard switch; the consumer's simulated work per batch stands for the device's step (the host is free then).
LOADER_BATCHES = 400
LOADER_CONSUMER_WORK_S = 0.005


@dataclass(frozen=True)
class Mode:
    name: str
    trainer_args: tuple[str, ...]  # train_gpt settings of the benchmarked recipe
    proxy_args: tuple[str, ...]  # learning proxy: overrides on top of trainer_args
    matmul_size: int  # ceiling: an n x n x n matmul in the compute dtype
    copy_bytes: int  # ceiling: a device-to-device copy of this many bytes
    warmup: int  # untimed calls before each timing
    reps: int  # timed repetitions; the median is reported
    matmul_inner: int  # matmuls per timed repetition


CUDA_MODE = Mode(
    name="record shape on CUDA: 48K-token packed micro-batch, bf16, compiled, FlexAttention, FP8 head",
    trainer_args=("--device=cuda", "--compile=true"),
    # ~15.7M training tokens of the 16M in enwiki_train_000001.bin, each used once: 160 steps x 2 x 48K.
    proxy_args=(f"--train_batch_tokens={2 * 48 * 1024}", "--num_iterations=160", f"--val_tokens={4 * 262144}",
                "--val_every=40"),
    matmul_size=8192, copy_bytes=2**30, warmup=3, reps=10, matmul_inner=20,
)
CPU_MODE = Mode(
    name="tiny preset on CPU: 512-token micro-batch, fp32, dense-mask SDPA attention, no FP8 head",
    trainer_args=("--preset=tiny", "--device=cpu"),
    # 20 steps of one 512-token micro-batch (~0.7 s each on the 2-core CI machine); eager, so no warmup steps are needed.
    proxy_args=("--train_batch_tokens=512", "--num_iterations=20", "--val_tokens=4096", "--val_every=10",
                "--warmup_steps=0"),
    matmul_size=1024, copy_bytes=2**26, warmup=1, reps=3, matmul_inner=2,
)


# ----------------------------------------------------------------------------------------------------
# 2. Metadata


def git_commit() -> tuple[str, bool | None]:
    """(short commit or "unknown", whether tracked files differ from it or None if unknown)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0 or not commit.stdout.strip():
            return "unknown", None
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True, timeout=10)
        return commit.stdout.strip(), diff.returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def metadata(runtime: T.Runtime, command: str, commit_override: str, mode: Mode, s: T.Settings) -> dict:
    commit, dirty = git_commit()
    if commit_override:
        commit, dirty = commit_override, None
    return dict(
        device=device_name(runtime.device), device_type=runtime.device.type,
        torch_version=torch.__version__, cuda_version=torch.version.cuda,
        python_version=sys.version.split()[0], git_commit=commit, git_dirty=dirty, command=command,
        mode=mode.name, compile=s.compile, attention_backend=runtime.attention_backend,
        first_call="compile + first fwd+bwd" if s.compile else "first fwd+bwd (eager, nothing compiled)",
        compute_dtype=str(runtime.compute_dtype).removeprefix("torch."), fp8_head=s.fp8_head,
        cpu_threads=torch.get_num_threads(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


# ----------------------------------------------------------------------------------------------------
# 3. Timing helpers
# CUDA: CUDA events around the calls (the GPU timeline, which includes any launch gaps). CPU, and
# host-side work such as data loading: wall time between two synchronisations. The median of the
# repetitions is reported.


def measure_ms(fn, runtime: T.Runtime, warmup: int, reps: int, inner: int = 1, wall: bool = False) -> float:
    for _ in range(warmup):
        fn()
    runtime.synchronize()
    use_events = runtime.device.type == "cuda" and not wall
    samples = []
    for _ in range(reps):
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            runtime.synchronize()
            samples.append(1000 * (time.perf_counter() - started) / inner)
    return statistics.median(samples)


def first_call_s(fn, runtime: T.Runtime) -> float:
    """Wall time of one call, synchronised: with torch.compile this is mostly compile time."""
    runtime.synchronize()
    started = time.perf_counter()
    fn()
    runtime.synchronize()
    return time.perf_counter() - started


def maybe_compile(fn, s: T.Settings):
    return torch.compile(fn, dynamic=False) if s.compile else fn


# ----------------------------------------------------------------------------------------------------
# 4. Ceilings


def measure_ceilings(mode: Mode, runtime: T.Runtime) -> dict:
    n, dtype, device = mode.matmul_size, runtime.compute_dtype, runtime.device
    torch.manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    matmul_ms = measure_ms(lambda: torch.mm(a, b, out=c), runtime, mode.warmup, mode.reps, mode.matmul_inner)
    del a, b, c
    source = torch.ones(mode.copy_bytes // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy_ms = measure_ms(lambda: target.copy_(source), runtime, mode.warmup, mode.reps, inner=5)
    del source, target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(
        matmul=dict(size=n, dtype=str(dtype).removeprefix("torch."), ms=matmul_ms,
                    tflops=2 * n**3 / (matmul_ms / 1e3) / 1e12),
        copy=dict(bytes=mode.copy_bytes, mib=mode.copy_bytes // 2**20, ms=copy_ms,
                  gb_per_s=2 * mode.copy_bytes / (copy_ms / 1e3) / 1e9),  # read + write
    )


# ----------------------------------------------------------------------------------------------------
# 5. FLOP count
# Training FLOPs per token = 6 x (matmul parameters in the blocks + LM head at the padded vocabulary)
# + 3 x forward attention FLOPs (QK^T and AV: 2 x 2 x heads x head_dim per attended key). The attended
# keys are averaged over the positions of one micro-batch for the final window under the causal,
# block-granular window mask; document boundaries are data-dependent and not subtracted.


def average_attended_keys(seq_len: int, block_size: int, window_blocks: int) -> float:
    """Mean over queries of the keys with key <= query and query_block - key_block < window_blocks."""
    total = 0
    for block in range(seq_len // block_size):
        earlier_keys = min(block, window_blocks - 1) * block_size  # whole earlier blocks in the window
        total += block_size * earlier_keys + block_size * (block_size + 1) // 2  # + causal part of own block
    return total / seq_len


def flops_per_token(s: T.Settings) -> dict:
    inner = s.num_heads * s.head_dim
    hidden = s.mlp_ratio * s.model_dim
    kinds = [kind for kind in s.attention_layout if kind != "-"]
    attention_params = len(kinds) * (3 * inner * s.model_dim + inner * s.model_dim)  # QKV + out-proj
    mlp_params = s.num_layers * 2 * s.model_dim * hidden
    head_params = s.model_dim * T.padded_vocab_size(s.vocab_size)
    long_blocks = T.window_blocks_at(s.num_iterations, s)  # the final window
    windows = {"L": long_blocks, "S": max(1, long_blocks // 2)}  # as GPT.attention_masks
    keys = {kind: average_attended_keys(s.train_seq_len, s.block_size, w) for kind, w in windows.items()}
    attention_forward = sum(2 * 2 * inner * keys[kind] for kind in kinds)
    matmul_params = attention_params + mlp_params + head_params
    return dict(
        matmul_params_blocks=attention_params + mlp_params, matmul_params_head=head_params,
        matmul_params=matmul_params, window_blocks_long=windows["L"], window_blocks_short=windows["S"],
        attended_keys_long=keys["L"], attended_keys_short=keys["S"],
        attention_layers_long=kinds.count("L"), attention_layers_short=kinds.count("S"),
        matmul_flops_per_token=6 * matmul_params, attention_flops_per_token=3 * attention_forward,
        flops_per_token=6 * matmul_params + 3 * attention_forward,
    )


# ----------------------------------------------------------------------------------------------------
# 6. Record-shape step
# One rank's micro-batch at the final window, timed as forward + backward of the compiled model, and as a
# whole train_gpt.train_step (data, forward, backward, Muon, Adam) with one micro-batch per step. The
# optimizers are timed on random gradients: Muon for the whole model, and the share that rank 0 of
# PREDICTED_WORLD_SIZE orthogonalises (Muon assigns matrices r, r+W, ... of each same-size group to rank r;
# rank 0 owns the most). Adam is not sharded in train_gpt: every rank runs all of it.


def step_settings(mode: Mode, train_files: str, val_files: str) -> tuple[T.Settings, T.Settings]:
    """(the recipe, the recipe with one micro-batch per optimizer step on this one device)."""
    recipe = T.parse_settings([*mode.trainer_args, f"--train_files={train_files}", f"--val_files={val_files}"])
    single = dataclasses.replace(recipe, train_batch_tokens=recipe.train_seq_len)
    T.check_settings(single)
    return recipe, single


def muon_rank_share_step(muon: T.Muon, rank: int, world_size: int):
    """What rank `rank` of `world_size` computes in Muon.step, without a process group: Muon's own
    ownership loop (momentum and Newton-Schulz for its matrices), then applying every matrix's update
    (its own result stands in for the ones an all-gather would deliver; the cost is the same)."""
    with torch.no_grad():
        for update, chunk, lr in muon.owned_updates(rank, world_size):
            for param in chunk:
                muon.apply_update(param, update, lr)


def muon_rank_share_count(muon: T.Muon, rank: int, world_size: int) -> tuple[int, int]:
    """(Muon parameters rank `rank` orthogonalises, all Muon parameters)."""
    owned = sum(len(group["params"][rank::world_size]) for group in muon.param_groups)
    return owned, sum(len(group["params"]) for group in muon.param_groups)


def old_load_shard(path, vocab_size: int, pin_memory: bool) -> torch.Tensor:
    """The trainer's shard load before the uint16 loader (kept here to measure the change)."""
    num_tokens = T.read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=H.SHARD_HEADER_BYTES)
    H.check_token_range(tokens, vocab_size, path)
    tokens = torch.from_numpy(tokens.astype(np.int32))
    return tokens.pin_memory() if pin_memory else tokens


def shard_load_seconds(path, vocab_size: int, runtime: T.Runtime, reps: int = 3) -> tuple[float, float]:
    """Median wall time to load one shard with the old and the new path, alternating, after one read
    of each to fill the page cache (so both read from memory, as for a shard read before)."""
    pin = runtime.device.type == "cuda"
    loaders = (lambda: old_load_shard(path, vocab_size, pin), lambda: T.load_shard(path, vocab_size, pin))
    samples = ([], [])
    for rep in range(reps + 1):
        for load, times in zip(loaders, samples):
            started = time.perf_counter()
            load()
            if rep:
                times.append(time.perf_counter() - started)
    return statistics.median(samples[0]), statistics.median(samples[1])


def fill_random_grads(model: torch.nn.Module):
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p).mul_(1e-3)


def peak_memory_mib(runtime: T.Runtime) -> float:
    if runtime.device.type == "cuda":
        return torch.cuda.max_memory_allocated(runtime.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: peak resident set (KiB on Linux)


class StepBench:
    """The model and optimizers of the record-shape measurements, shared with the breakdown."""

    def __init__(self, mode: Mode, recipe: T.Settings, single: T.Settings, runtime: T.Runtime):
        self.mode, self.recipe, self.s, self.runtime = mode, recipe, single, runtime
        self.model = T.build_model(single, runtime)
        if single.compile:
            T.compile_model(self.model)  # compiled by region in training mode, as train() compiles it
        self.muon, self.adam = T.build_optimizers(self.model, single, runtime)
        self.files = T.find_shards(single.train_files, "train_files")
        self.reducer = T.GradientReducer(self.model.parameters(), runtime)
        self.batches = T.TrainLoader(self.files, single, runtime)
        self.inputs, self.targets = next(self.batches)
        self.final_step = single.num_iterations  # window_blocks_at(num_iterations) is the final window
        self.window = torch.tensor(T.window_blocks_at(self.final_step, single), dtype=torch.int32,
                                   device=runtime.device)

    def timed(self, fn, wall: bool = False) -> float:
        return measure_ms(fn, self.runtime, self.mode.warmup, self.mode.reps, wall=wall)

    def forward_backward(self):
        loss = self.model(self.inputs, self.targets, self.window)
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def train_step(self):
        T.train_step(self.model, (self.muon, self.adam), self.reducer, self.batches, self.final_step, self.s,
                     self.runtime)

    def run(self) -> dict:
        runtime, tokens = self.runtime, self.s.train_seq_len
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        compile_s = first_call_s(self.forward_backward, runtime)
        fwd_bwd_ms = self.timed(self.forward_backward)
        peak_mib = peak_memory_mib(runtime)
        train_step_ms = self.timed(self.train_step)

        shard_load_s = first_call_s(lambda: T.TrainLoader(self.files, self.s, runtime), runtime)
        data_batches = T.TrainLoader(self.files, self.s, runtime)
        data_ms = self.timed(lambda: next(data_batches), wall=True)
        del data_batches
        shard_load_old_s, shard_load_new_s = shard_load_seconds(self.files[0], self.s.vocab_size, runtime)

        fill_random_grads(self.model)
        muon_ms = self.timed(self.muon.step)
        adam_ms = self.timed(self.adam.step)
        world = math.gcd(PREDICTED_WORLD_SIZE, self.recipe.train_batch_tokens // self.recipe.train_seq_len)
        muon_share_ms = self.timed(lambda: muon_rank_share_step(self.muon, 0, world))
        owned, total = muon_rank_share_count(self.muon, 0, world)
        self.model.zero_grad(set_to_none=True)
        return dict(
            tokens_per_micro_batch=tokens, window_blocks=int(self.window), compile_and_first_step_s=compile_s,
            fwd_bwd_ms=fwd_bwd_ms, fwd_bwd_tokens_per_s=tokens / (fwd_bwd_ms / 1e3), peak_memory_mib=peak_mib,
            train_step_ms=train_step_ms, data_ms=data_ms, shard_load_s=shard_load_s,
            shard_load_old_s=shard_load_old_s, shard_load_new_s=shard_load_new_s,
            muon_ms=muon_ms, adam_ms=adam_ms, muon_rank_share_ms=muon_share_ms,
            muon_rank_share_params=owned, muon_params=total, predicted_world_size=world,
            micro_batches_per_rank=self.recipe.train_batch_tokens // self.recipe.train_seq_len // world,
            num_iterations=self.recipe.num_iterations,
        )


def derive_figures(results: dict):
    """MFU and the multi-GPU prediction from the measured figures (whatever of them exist)."""
    step, flops, ceilings = results.get("step"), results.get("flops"), results.get("ceilings")
    if not step:
        return
    per_rank_ms = step["micro_batches_per_rank"] * (step["data_ms"] + step["fwd_bwd_ms"])
    step["predicted_step_ms"] = per_rank_ms + step["muon_rank_share_ms"] + step["adam_ms"]
    step["predicted_total_s"] = step["predicted_step_ms"] * step["num_iterations"] / 1e3
    if flops:
        step["achieved_tflops"] = flops["flops_per_token"] * step["fwd_bwd_tokens_per_s"] / 1e12
        rank_tokens = step["micro_batches_per_rank"] * step["tokens_per_micro_batch"]
        step["predicted_tflops_per_device"] = flops["flops_per_token"] * rank_tokens / step["predicted_step_ms"] / 1e9
        if ceilings:
            step["mfu_percent"] = 100 * step["achieved_tflops"] / ceilings["matmul"]["tflops"]
            step["predicted_mfu_percent"] = 100 * step["predicted_tflops_per_device"] / ceilings["matmul"]["tflops"]


def consume(next_batch, batches: int, work_s: float) -> tuple[float, float]:
    """(batches per second, share of the wall time spent inside next_batch) of a consumer that sleeps
    work_s after each batch (a sleep leaves the loader's reader thread the CPU, as a device step would)."""
    waiting = 0.0
    started = time.perf_counter()
    for _ in range(batches):
        asked = time.perf_counter()
        next_batch()
        waiting += time.perf_counter() - asked
        time.sleep(work_s)
    total = time.perf_counter() - started
    return batches / total, waiting / total


def compare_data_loaders(train_files: str) -> dict:
    """Record 21's TrainLoader (48K-token sequences, 8 per step) and record 89's DocumentLoader (its last
    stage: 8 slots of 48K tokens, documents cut at 2,048) on the CPU, each run twice from a fresh loader:
    as fast as the consumer can take batches, and with LOADER_CONSUMER_WORK_S of work per batch. The first
    shard's load (in the constructors) is not timed; the read-ahead and the switch to the next shard are."""
    cpu = torch.device("cpu")
    files = T.find_shards(train_files, "train_files")
    old_settings = T.parse_settings(["--device=cpu", f"--train_files={train_files}"])
    old_runtime = T.Runtime(0, 1, cpu, "sdpa", old_settings.train_batch_tokens // old_settings.train_seq_len)
    new_settings = dataclasses.replace(R89.Settings(), train_files=train_files)
    new_runtime = R89.Runtime(0, 1, cpu, "explicit", fp8=False)
    slot_tokens, max_doc_len = R89.stage_slot_sizes(new_settings)[-1]

    def old_loader():
        batches = T.TrainLoader(files, old_settings, old_runtime)
        return lambda: next(batches)

    def new_loader():
        loader = R89.DocumentLoader(files, new_settings, new_runtime)
        return lambda: loader.next_batch(slot_tokens, max_doc_len)

    figures = dict(batches=LOADER_BATCHES, consumer_work_ms=1e3 * LOADER_CONSUMER_WORK_S,
                   tokens_per_batch=old_settings.train_seq_len, max_doc_len=max_doc_len)
    for name, make_loader in (("old", old_loader), ("new", new_loader)):
        figures[f"{name}_batches_per_s"], _ = consume(make_loader(), LOADER_BATCHES, 0.0)
        _, waiting = consume(make_loader(), LOADER_BATCHES, LOADER_CONSUMER_WORK_S)
        figures[f"{name}_wait_percent"] = 100 * waiting
    return figures


# ----------------------------------------------------------------------------------------------------
# 7. Component breakdown
# Pieces of the model timed in isolation on inputs of the micro-batch's shape (forward + backward, gradients
# for inputs and weights), each compiled on its own when the model is, times the number of times one
# micro-step runs it; compared with the whole measured train_step. "other" is the remainder (embeddings,
# norms, residual mixing, U-net skips, launch gaps, overlap): it can be negative when isolated timings
# overstate their share.


def mask_tensors(masks: dict) -> list[torch.Tensor]:
    tensors = []
    for mask in masks.values():
        if isinstance(mask, T.BlockMask):
            tensors += [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
        else:
            tensors.append(mask)
    return tensors


def component_breakdown(bench: StepBench, step: dict) -> dict:
    model, s, runtime = bench.model, bench.s, bench.runtime
    dtype, dim, tokens = runtime.compute_dtype, s.model_dim, s.train_seq_len
    device = runtime.device
    torch.manual_seed(2)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    components, errors = [], {}

    def add(name: str, count: int, how: str, make_fn):
        try:
            fn = make_fn()
            first_s = first_call_s(fn, runtime)
            ms = bench.timed(fn)
            components.append(dict(name=name, count=count, ms_each=ms, ms=ms * count, how=how, first_call_s=first_s))
        except Exception as error:  # keep the other components; the report lists the failure
            errors[name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()

    components.append(dict(name="data loading", count=1, ms_each=step["data_ms"], ms=step["data_ms"],
                           how="TrainLoader next(), wall time", first_call_s=step["shard_load_s"]))

    def masks_fn():
        build = maybe_compile(lambda inputs, window: mask_tensors(model.attention_masks(inputs, window)), s)

        def run():
            with torch.no_grad():
                build(bench.inputs, bench.window)
        return run
    add("attention masks", 1, "GPT.attention_masks (long + short)", masks_fn)

    attention_module = next(block.attn for block in model.blocks if block.attn is not None)
    masks = model.attention_masks(bench.inputs, bench.window)
    value_embed = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    for kind, label in (("L", "long"), ("S", "short")):
        count = s.attention_layout.count(kind)
        if count == 0:
            continue

        def attention_fn(kind=kind):
            attention = maybe_compile(attention_module, s)
            params = list(attention_module.parameters())

            def run():
                y = attention(x, value_embed, masks[kind])
                torch.autograd.grad(y, [x, value_embed, *params], grad_out)
            return run
        window = step["window_blocks"] if kind == "L" else max(1, step["window_blocks"] // 2)
        add(f"attention, {label} window ({window} blocks)", count,
            "one CausalSelfAttention (with value embedding) fwd+bwd", attention_fn)

    def mlp_fn():
        mlp_module = model.blocks[0].mlp
        mlp = maybe_compile(mlp_module, s)
        params = list(mlp_module.parameters())

        def run():
            torch.autograd.grad(mlp(x), [x, *params], grad_out)
        return run
    add("MLP", s.num_layers, "one MLP fwd+bwd", mlp_fn)

    def head_fn():
        head_loss = maybe_compile(lambda h, targets: model.loss(h, targets), s)
        h = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)

        def run():
            torch.autograd.grad(head_loss(h, bench.targets), [h, model.lm_head.weight])
        return run
    add("LM head + softcap + cross-entropy", 1, "GPT.loss fwd+bwd" + (" (FP8 head)" if s.fp8_head else ""), head_fn)

    components.append(dict(name="optimizer: Muon", count=1, ms_each=step["muon_ms"], ms=step["muon_ms"],
                           how="Muon.step, whole model, this device", first_call_s=None))
    components.append(dict(name="optimizer: Adam", count=1, ms_each=step["adam_ms"], ms=step["adam_ms"],
                           how="Adam.step, whole model", first_call_s=None))
    whole = step["train_step_ms"]
    named = sum(c["ms"] for c in components)
    for c in components:
        c["percent"] = 100 * c["ms"] / whole
    return dict(whole_step_ms=whole, named_ms=named, other_ms=whole - named,
                other_percent=100 * (whole - named) / whole, components=components, errors=errors)


# ----------------------------------------------------------------------------------------------------
# 8. Learning proxy: train_gpt.train() itself with the fixed settings, its log parsed for the val losses.

VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d+) train_time:(\d+)ms", re.MULTILINE)


def proxy_settings(mode: Mode, train_files: str, val_files: str, log_dir: Path) -> T.Settings:
    return T.parse_settings([*mode.trainer_args, *mode.proxy_args, f"--train_files={train_files}",
                             f"--val_files={val_files}", f"--log_dir={log_dir}", "--run_id=learning_proxy"])


def learning_proxy(s: T.Settings) -> dict:
    runtime = T.resolve_runtime(s, 0, 1, 0)  # its own: the proxy has more micro-batches per step
    started = time.perf_counter()
    trainer_output = io.StringIO()
    with contextlib.redirect_stdout(trainer_output):  # train() prints every step line
        T.train(s, runtime)
    wall_s = time.perf_counter() - started
    log_path = Path(s.log_dir) / f"{s.run_id}.txt"
    points = [dict(step=int(m[1]), tokens=int(m[1]) * s.train_batch_tokens, train_time_s=int(m[4]) / 1e3,
                   val_loss=float(m[3])) for m in VAL_LINE.finditer(log_path.read_text())]
    if not points or points[-1]["step"] != s.num_iterations:
        raise RuntimeError(f"{log_path}: no final validation line; trainer output:\n"
                           f"{trainer_output.getvalue()[-2000:]}")
    final = points[-1]
    micro_steps = re.search(r"(\d+) micro-step", trainer_output.getvalue())
    return dict(
        settings={name: getattr(s, name) for name in PROXY_SETTING_NAMES}, points=points,
        micro_batches_per_step=int(micro_steps[1]) if micro_steps else None,
        initial_val_loss=points[0]["val_loss"], final_val_loss=final["val_loss"], tokens=final["tokens"],
        train_time_s=final["train_time_s"], tokens_per_s=final["tokens"] / max(final["train_time_s"], 1e-9),
        wall_s=wall_s, log_file=str(log_path),
    )


PROXY_SETTING_NAMES = ("train_batch_tokens", "train_seq_len", "num_iterations", "val_tokens", "val_seq_len",
                       "val_every", "warmup_steps", "compile", "train_files", "val_files")


# ----------------------------------------------------------------------------------------------------
# 9. Report (JSON, Markdown) and main

# (JSON path, label, unit) of the figures table; labels may use {step[...]} / {flops[...]} / ... fields.
FIGURES = [
    ("ceilings.matmul.tflops", "matmul ceiling, {ceilings[matmul][size]}^3 {ceilings[matmul][dtype]}", "TFLOP/s"),
    ("ceilings.copy.gb_per_s", "device copy ceiling, {ceilings[copy][mib]} MiB copied (read + write counted)", "GB/s"),
    ("flops.matmul_params", "matmul parameters (blocks + head at padded vocab)", "params"),
    ("flops.attended_keys_long", "mean attended keys, long window ({flops[window_blocks_long]} blocks)", "keys"),
    ("flops.attended_keys_short", "mean attended keys, short window ({flops[window_blocks_short]} blocks)", "keys"),
    ("flops.attention_flops_per_token", "attention FLOPs per token (fwd+bwd)", "FLOP"),
    ("flops.flops_per_token", "model FLOPs per token (fwd+bwd)", "FLOP"),
    ("step.fwd_bwd_ms", "micro-batch fwd+bwd ({step[tokens_per_micro_batch]} tokens, final window)", "ms"),
    ("step.fwd_bwd_tokens_per_s", "micro-batch throughput", "tokens/s"),
    ("step.achieved_tflops", "achieved model FLOP/s, fwd+bwd", "TFLOP/s"),
    ("step.mfu_percent", "MFU, fwd+bwd vs the measured matmul ceiling", "%"),
    ("step.compile_and_first_step_s", "{meta[first_call]}", "s"),
    ("step.peak_memory_mib", "peak memory after fwd+bwd (CUDA: allocated; CPU: process RSS)", "MiB"),
    ("step.train_step_ms", "whole train_step, 1 micro-batch, 1 device", "ms"),
    ("step.muon_ms", "Muon step, whole model, 1 device", "ms"),
    ("step.muon_rank_share_ms", "Muon step, rank 0 of {step[predicted_world_size]} share "
     "({step[muon_rank_share_params]} of {step[muon_params]} params)", "ms"),
    ("step.adam_ms", "Adam step (whole on every rank)", "ms"),
    ("step.data_ms", "data loading, one micro-batch", "ms"),
    ("step.shard_load_new_s", "shard load, one file: uint16 read straight into (pinned on CUDA) memory", "s"),
    ("step.shard_load_old_s", "shard load, one file, previous path: np.fromfile + int32 (+ pin on CUDA)", "s"),
    ("step.predicted_step_ms", "predicted step on {step[predicted_world_size]} x this device "
     "({step[micro_batches_per_rank]} micro-batch/rank + optimizer share), communication unmeasured", "ms"),
    ("step.predicted_total_s", "predicted training time, {step[num_iterations]} steps", "s"),
    ("step.predicted_mfu_percent", "predicted MFU per device", "%"),
    ("loaders.old_batches_per_s", "data loader, record 21 TrainLoader: {loaders[tokens_per_batch]}-token batches "
     "per second, CPU, consumer without work", "batches/s"),
    ("loaders.new_batches_per_s", "data loader, record 89 DocumentLoader: same, last stage (documents cut at "
     "{loaders[max_doc_len]})", "batches/s"),
    ("loaders.old_wait_percent", "data loader, record 21: consumer's time waiting, {loaders[consumer_work_ms]} ms "
     "work per batch, {loaders[batches]} batches incl. a shard switch", "%"),
    ("loaders.new_wait_percent", "data loader, record 89: consumer's time waiting, same", "%"),
    ("learning_proxy.initial_val_loss", "learning proxy: val loss at step 0", "nats"),
    ("learning_proxy.final_val_loss", "learning proxy: final val loss, after {learning_proxy[tokens]} training tokens",
     "nats"),
    ("learning_proxy.train_time_s", "learning proxy: training time (validation excluded)", "s"),
    ("learning_proxy.wall_s", "learning proxy: wall time (compile, warmup, validation included)", "s"),
]


def lookup(results: dict, path: str):
    value = results
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.4e}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


def figure_rows(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for path, label, unit in FIGURES:
        value = lookup(results, path)
        try:
            text = label.format(**results)
        except (KeyError, IndexError, TypeError):  # a section failed: leave its fields out of the label
            text = re.sub(r"\{[^}]*\}", "?", label)
        rows.append((path, text, fmt(value), unit))
    return rows


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    tag = f"{meta['device']}, torch {meta['torch_version']}, commit {meta['git_commit']}"
    lines = [
        "# GPT-2 speedrun benchmark", "",
        f"- device: **{meta['device']}** ({meta['device_type']}), torch {meta['torch_version']}"
        f" (CUDA {meta['cuda_version']}), python {meta['python_version']}, torch threads {meta['cpu_threads']}",
        f"- commit: {meta['git_commit']}" + (" (tracked files modified)" if meta["git_dirty"] else ""),
        f"- command: `{meta['command']}`",
        f"- mode: {meta['mode']}; compile {meta['compile']}, attention {meta['attention_backend']}, "
        f"{meta['compute_dtype']}, FP8 head {meta['fp8_head']}; started {meta['started']}",
        *(f"- note: {note}" for note in results["notes"]), "",
        f"## Figures ({tag})", "",
        "| figure | value | unit | key |", "|---|---:|---|---|",
    ]
    lines += [f"| {label} | {value} | {unit} | {path} |" for path, label, value, unit in figure_rows(results)]
    breakdown = results.get("breakdown")
    if breakdown:
        lines += ["", f"## Breakdown of one micro-step ({tag})", "",
                  "| component | count | ms | % of step | how |", "|---|---:|---:|---:|---|"]
        for c in breakdown["components"]:
            lines.append(f"| {c['name']} | {c['count']} | {fmt(c['ms'])} | {fmt(c['percent'])} | {c['how']} |")
        lines.append(f"| other (remainder) | 1 | {fmt(breakdown['other_ms'])} | {fmt(breakdown['other_percent'])} "
                     "| whole step - named components |")
        lines.append(f"| whole step | 1 | {fmt(breakdown['whole_step_ms'])} | 100 | train_gpt.train_step |")
    proxy = results.get("learning_proxy")
    if proxy:
        settings = ", ".join(f"{k}={v}" for k, v in proxy["settings"].items())
        lines += ["", f"## Learning proxy ({tag})", "", f"Fixed settings: {settings}", "",
                  "| step | tokens | train time (s) | val loss |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['step']} | {p['tokens']} | {fmt(p['train_time_s'])} | {fmt(p['val_loss'])} |"
                  for p in proxy["points"]]
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {name}: {error}" for name, error in results["errors"].items()]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(results)
    for name, content in (("benchmark.json", json.dumps(results, indent=2) + "\n"), ("benchmark.md", text)):
        H.write_file_atomically(out / name, [content.encode()])
    return text


def progress(message: str):
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "logs" / "benchmark"),
                        help="folder for benchmark.json, benchmark.md and the learning proxy's log")
    parser.add_argument("--cpu-tiny", action="store_true",
                        help="CPU with the tiny preset (the default when no CUDA GPU is visible)")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="torch.compile in the CPU mode too (off by default: compile time would dominate)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads in the CPU mode (default 1: steadier when other processes load the CPUs)")
    parser.add_argument("--train-files",
                        help="glob of training shards (default: the first training shard the tests' data "
                        "lookup finds, e.g. ../shared/data/enwiki/enwiki_train_000001.bin)")
    parser.add_argument("--val-files",
                        help="glob of validation shards (default: the validation shard the tests' data lookup "
                        "finds, e.g. ../shared/data/enwiki/enwiki_val_000000.bin)")
    parser.add_argument("--commit", default="",
                        help="git commit to record when the tree has no .git (e.g. a copied working tree)")
    parser.add_argument("--skip-proxy", action="store_true", help="leave out the learning proxy")
    parser.add_argument("--learning-curves", action="store_true",
                        help="instead of the benchmark: train record 21 and record 89 on the CPU at the same "
                        "training tokens and write learning_curves.{md,json,png} and their logs to --out "
                        "(section 10; 14 minutes on the shared 2-core development machine)")
    return parser.parse_args(argv)


def run_section(results: dict, name: str, fn):
    progress(f"{name} ...")
    started = time.perf_counter()
    try:
        value = fn()
        if value is not None:
            results[name] = value
    except Exception as error:  # keep going: the report shows what failed and the exit code is 1
        results["errors"][name] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    progress(f"{name} done in {time.perf_counter() - started:.1f} s")


def main(argv: list[str], command: str | None = None) -> int:
    args = parse_args(argv)
    command = command or shlex.join(["python", "benchmark.py", *argv])
    use_cpu = args.cpu_tiny or not torch.cuda.is_available()
    mode = CPU_MODE if use_cpu else CUDA_MODE
    if use_cpu:
        mode = dataclasses.replace(mode, trainer_args=(*mode.trainer_args, f"--compile={args.cpu_compile}"))
        torch.set_num_threads(args.cpu_threads)
    out = Path(args.out).resolve()
    if args.train_files is None or args.val_files is None:
        found = default_data(first_shards=not args.learning_curves)
        if isinstance(found, str):
            print(f"error: {found.removeprefix('test data missing: ')} (or pass --train-files and --val-files)",
                  file=sys.stderr)
            return 2
        args.train_files = args.train_files or found[0]
        args.val_files = args.val_files or found[1]
    try:  # fail before any measurement, not after minutes of GPU time
        T.find_shards(args.train_files, "train_files")
        T.find_shards(args.val_files, "val_files")
    except T.DataError as error:
        print(f"error: {error} (benchmark flags: --train-files, --val-files)", file=sys.stderr)
        return 2
    if args.learning_curves:
        return learning_curves(args, command)
    recipe, single = step_settings(mode, args.train_files, args.val_files)
    runtime = T.resolve_runtime(single, 0, 1, 0)
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    notes = [
        "communication (gradient all-reduce, Muon all-gather) is not measured; the predicted multi-GPU step "
        "is data + fwd+bwd per micro-batch on a rank, + rank 0's Muon share + the whole Adam step",
        "attention is timed at the final (largest) window, so the predicted total is an upper bound for it",
        "FLOPs count matmuls and attention QK^T/AV only, head at the padded vocabulary; "
        "MFU is against the measured matmul ceiling in the compute dtype"
        + (" (the head runs in FP8, whose ceiling is higher)" if single.fp8_head else ""),
    ]
    if use_cpu and not single.compile:
        notes.append("torch.compile is off on CPU: compile time would dominate this short run (--cpu-compile)")
    results = dict(meta=metadata(runtime, command, args.commit, mode, single), notes=notes,
                   settings=dataclasses.asdict(recipe), errors={})
    progress(f"{results['meta']['device']}: {mode.name}")

    run_section(results, "ceilings", lambda: measure_ceilings(mode, runtime))
    run_section(results, "flops", lambda: flops_per_token(single))
    write_report(results, out)
    bench = None

    def step_section():
        nonlocal bench
        bench = StepBench(mode, recipe, single, runtime)
        return bench.run()
    run_section(results, "step", step_section)
    derive_figures(results)
    write_report(results, out)
    if bench is not None and "step" in results:
        run_section(results, "breakdown", lambda: component_breakdown(bench, results["step"]))
        for name, error in results.get("breakdown", {}).get("errors", {}).items():
            results["errors"][f"breakdown: {name}"] = error
        write_report(results, out)
    del bench
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    run_section(results, "loaders", lambda: compare_data_loaders(args.train_files))
    write_report(results, out)
    if not args.skip_proxy:
        run_section(results, "learning_proxy",
                    lambda: learning_proxy(proxy_settings(mode, args.train_files, args.val_files, out)))
    text = write_report(results, out)
    print(text, end="", flush=True)
    progress(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 1 if results["errors"] else 0



# ----------------------------------------------------------------------------------------------------
# 10. Learning curves: record 21 vs record 89 on the CPU, at the same number of training tokens
# Each recipe runs as its own process (its own imports and settings, as a user runs it) at its tiny preset,
# eager, one thread, and its val losses are read back from its log. What the two share: the training shards,
# the validation tokens (the first CURVE_VAL_TOKENS of the val shard, in 2048-token sequences), the seed and
# the number of training tokens. Record 89's schedule is its tiny preset's with every step count doubled (the
# stage ends, the extension, the momentum ramps; the untie stays at the end of stage 2); record 21 then takes
# as many of its preset's steps as give the same token total, its momentum warm-up the preset's third of the
# run. Each model keeps its preset's size, which differ (the report gives both parameter counts).

CURVE_VAL_TOKENS = 8192
CURVE_COMMON_ARGS = ("--preset=tiny", "--device=cpu", "--compile=false", f"--val_tokens={CURVE_VAL_TOKENS}",
                     "--val_seq_len=2048")
R89_CURVE_ARGS = (*CURVE_COMMON_ARGS, "--stage_ends=18,35,53", "--extension_steps=6", "--split_step=35",
                  "--muon_momentum_warmup_steps=12", "--muon_momentum_cooldown_steps=4", "--val_every=10",
                  "--warmup=false")
R21_VAL_EVERY = 5


@dataclass(frozen=True)
class CurveRecipe:
    label: str
    run_id: str
    path: Path
    args: tuple[str, ...]  # the recipe's settings; the data files, log folder and run id are added
    parameters: int


def r89_tokens_before(settings: dict) -> list[int]:
    """Training tokens seen before each step 0..num_iterations of a record-89 run with these logged settings
    (the sum of step_plan(step).batch_tokens over the earlier steps)."""
    known = {field.name for field in dataclasses.fields(R89.Settings)}
    s = dataclasses.replace(R89.Settings(), **{name: value for name, value in settings.items() if name in known})
    tokens = [0]
    for step in range(s.num_iterations):
        tokens.append(tokens[-1] + R89.step_plan(step, s).batch_tokens)
    return tokens


def r21_tokens_before(settings: dict) -> list[int]:
    """The same for record 21: a fixed train_batch_tokens per step."""
    return [step * settings["train_batch_tokens"] for step in range(settings["num_iterations"] + 1)]


TOKENS_BEFORE = {"record21": r21_tokens_before, "record89": r89_tokens_before}


def parameter_count(module, s) -> int:
    with torch.device("meta"):  # shapes only
        return sum(p.numel() for p in module.GPT(s, "explicit").parameters())


def curve_recipes() -> list[CurveRecipe]:
    """Record 21 and record 89 at the same training tokens (section comment); SettingsError if they cannot be."""
    r89 = R89.parse_settings(list(R89_CURVE_ARGS))
    total = r89_tokens_before(dataclasses.asdict(r89))[-1]
    r21_preset = T.parse_settings(list(CURVE_COMMON_ARGS))
    if total % r21_preset.train_batch_tokens:
        raise H.SettingsError(f"record 89's {total:,} training tokens are not a whole number of record 21's "
                              f"{r21_preset.train_batch_tokens}-token steps; change R89_CURVE_ARGS")
    steps = total // r21_preset.train_batch_tokens
    r21_args = (*CURVE_COMMON_ARGS, f"--num_iterations={steps}", f"--val_every={R21_VAL_EVERY}",
                f"--muon_momentum_warmup_steps={steps // 3}", "--warmup_steps=0")
    r21 = T.parse_settings(list(r21_args))
    return [CurveRecipe("record 21", "record21", RECIPE_PATHS["record21"], r21_args, parameter_count(T, r21)),
            CurveRecipe("record 89", "record89", RECIPE_PATHS["record89"], R89_CURVE_ARGS, parameter_count(R89, r89))]


RECIPE_PATHS = {"record21": Path(T.__file__).resolve(), "record89": Path(R89.__file__).resolve()}


def read_curve(log_path: Path, run_id: str) -> dict:
    """The val losses of a complete run's log with the training tokens before each, via records.tool.read_log."""
    from records.tool import read_log
    log = read_log(log_path, keep_source=False, keep_steps=False)
    if not log.is_complete:
        raise RuntimeError(f"{log_path}: the run did not finish ({log.status})")
    if log.settings is None:
        raise RuntimeError(f"{log_path}: no 'Settings:' line; not a log of this repository's trainers")
    tokens_before = TOKENS_BEFORE[run_id](log.settings)
    if len(tokens_before) != log.total_steps + 1:
        raise RuntimeError(f"{log_path}: the logged settings give {len(tokens_before) - 1} steps, the step lines "
                           f"{log.total_steps}")
    points = [dict(step=line.step, tokens=tokens_before[line.step], val_loss=line.val_loss,
                   train_time_s=line.train_time_ms / 1e3) for line in log.val_steps]
    return dict(device=log.device, total_steps=log.total_steps, points=points,
                peak_memory_mib=log.peak_memory_allocated_mib)


def curves_table(curves: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Markdown rows: one per token count at which any run validated, each run's (step, val loss) or blank."""
    names = list(curves)
    by_tokens: dict[int, dict[str, dict]] = {}
    for name in names:
        for point in curves[name]["points"]:
            by_tokens.setdefault(point["tokens"], {})[name] = point
    header = "| training tokens | " + " | ".join(f"{labels[name]}: step | {labels[name]}: val loss"
                                                for name in names) + " |"
    rows = [header, "|---:|" + "---:|---:|" * len(names)]
    for tokens in sorted(by_tokens):
        cells = []
        for name in names:
            point = by_tokens[tokens].get(name)
            cells += [str(point["step"]), f"{point['val_loss']:.4f}"] if point else ["", ""]
        rows.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return rows


def plot_curves(curves: dict[str, dict], labels: dict[str, str], title: str, path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        axes.plot([p["tokens"] for p in curve["points"]], [p["val_loss"] for p in curve["points"]], marker="o",
                  label=f"{labels[name]} (final {curve['points'][-1]['val_loss']:.4f})")
    axes.set_xlabel("training tokens")
    axes.set_ylabel(f"val loss (first {CURVE_VAL_TOKENS:,} val tokens)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)


def render_curves_markdown(results: dict) -> str:
    meta, curves = results["meta"], results["curves"]
    labels = {run["run_id"]: run["label"] for run in results["runs"]}
    lines = ["# Learning curves: record 21 vs record 89, tiny presets on the CPU", "",
             f"- device: **{meta['device']}**, torch {meta['torch_version']}, python {meta['python_version']}, "
             f"OMP_NUM_THREADS={meta['omp_threads']} per run, runs one after the other",
             f"- commit: {meta['git_commit']}" + (" (tracked files modified)" if meta["git_dirty"] else ""),
             f"- command: `{meta['command']}`; started {meta['started']}",
             f"- training data: `{meta['train_files']}`; validation: the first {CURVE_VAL_TOKENS:,} tokens of "
             f"`{meta['val_files']}`", ""]
    for run in results["runs"]:
        curve = curves[run["run_id"]]
        lines.append(f"- {run['label']}: {run['parameters']:,} parameters, {curve['total_steps']} steps, "
                     f"{curve['points'][-1]['tokens']:,} training tokens, wall {run['wall_s']:.0f} s (information "
                     f"only), peak memory {curve['peak_memory_mib']} MiB; "
                     f"`{run['command']}`")
    lines += ["", "## Val loss vs training tokens", "", *curves_table(curves, labels), ""]
    finals = {name: curve["points"][-1] for name, curve in curves.items()}
    (first, a), (second, b) = finals.items()
    lines.append(f"At {a['tokens']:,} training tokens: {labels[first]} {a['val_loss']:.4f}, {labels[second]} "
                 f"{b['val_loss']:.4f} ({labels[second]} minus {labels[first]}: {b['val_loss'] - a['val_loss']:+.4f}).")
    return "\n".join(lines) + "\n"


def run_recipe(recipe: CurveRecipe, train_files: str, val_files: str, logs: Path) -> tuple[dict, str, float]:
    """Trains recipe in its own process (one thread); returns its curve, its command and its wall time."""
    # paths relative to the repository, where the process runs, so that the report's commands are portable
    command = [sys.executable, os.path.relpath(recipe.path, REPO), *recipe.args,
               f"--train_files={os.path.relpath(train_files, REPO)}", f"--val_files={os.path.relpath(val_files, REPO)}",
               f"--log_dir={os.path.relpath(logs, REPO)}", f"--run_id={recipe.run_id}"]
    log_path = logs / f"{recipe.run_id}.txt"
    log_path.unlink(missing_ok=True)  # this mode's own output from an earlier run: start afresh
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(logs / f"{recipe.run_id}.out", "w") as output:
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - started
    shown = shlex.join(["python", *command[1:]])
    if returncode != 0:
        raise RuntimeError(f"{recipe.label} exited with {returncode}; see {logs / (recipe.run_id + '.out')}")
    return read_curve(log_path, recipe.run_id), shown, wall_s


def learning_curves(args: argparse.Namespace, command: str) -> int:
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    if args.commit:
        commit, dirty = args.commit, None
    meta = dict(device="cpu", torch_version=torch.__version__, python_version=sys.version.split()[0],
                git_commit=commit, git_dirty=dirty, command=command, omp_threads=1,
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), train_files=args.train_files,
                val_files=args.val_files)
    results = dict(meta=meta, runs=[], curves={})
    for recipe in curve_recipes():
        progress(f"learning curve of {recipe.label} ({recipe.parameters:,} parameters) ...")
        curve, shown, wall_s = run_recipe(recipe, args.train_files, args.val_files, logs)
        progress(f"{recipe.label}: final val loss {curve['points'][-1]['val_loss']:.4f} in {wall_s:.0f} s")
        results["runs"].append(dict(label=recipe.label, run_id=recipe.run_id, command=shown, wall_s=wall_s,
                                    parameters=recipe.parameters))
        results["curves"][recipe.run_id] = curve
    totals = {name: curve["points"][-1]["tokens"] for name, curve in results["curves"].items()}
    if len(set(totals.values())) != 1:
        raise RuntimeError(f"the runs trained on different token totals: {totals}")
    text = render_curves_markdown(results)
    labels = {run["run_id"]: run["label"] for run in results["runs"]}
    plot_curves(results["curves"], labels, f"{meta['device']}, torch {meta['torch_version']}, commit {commit}",
                out / "learning_curves.png")
    for name, content in (("learning_curves.json", json.dumps(results, indent=2) + "\n"),
                          ("learning_curves.md", text)):
        H.write_file_atomically(out / name, [content.encode()])
    print(text, end="", flush=True)
    progress(f"wrote {out / 'learning_curves.md'}, .json and .png")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command=shlex.join([Path(sys.executable).name, *sys.argv])))
