"""GPT-2-small speedrun trainer: the record-21 recipe on any number of GPUs, or on CPU for tests.

Launch with torchrun (`./run.sh` does it), or plainly with `python train_gpt.py` for one process.
Every setting below can be overridden as `--name=value`; `--help` lists them.

Sections, top to bottom:
  1. Settings            5. Model
  2. Distributed setup   6. Attention masks
  3. FP8 matmul op       7. Data loading
  4. Optimizers          8. Training loop, logs, stop signals and checkpoints
"""

import collections
import contextlib
import copy
import dataclasses
import errno
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Before torch can initialise CUDA: growable segments keep the logits-sized blocks from fragmenting the
# caching allocator. setdefault, so a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------
# 1. Settings


@dataclass(frozen=True)
class Range:
    """The valid values of a number setting: low..high, each end closed ([, ]) or open ((, ))."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def end(x):
            if math.isinf(x):
                return "inf" if x > 0 else "-inf"
            return f"{x:g}" if isinstance(x, float) else str(x)
        return f"{'(' if self.low_open else '['}{end(self.low)}, {end(self.high)}{')' if self.high_open else ']'}"


POSITIVE = Range(0, math.inf, low_open=True, high_open=True)
NON_NEGATIVE = Range(0, math.inf, high_open=True)
FRACTION = Range(0, 1)
MOMENTUM = Range(0, 1, high_open=True)  # a decay factor: 1 would never forget, so it is excluded


def setting(default, help_text, valid: Range | None = None):
    """One setting. Float settings must be finite; `valid` adds the range checked by check_settings."""
    return field(default=default, metadata={"help": help_text, "valid": valid})


@dataclass
class Settings:
    # data
    train_files: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training token shards")
    val_files: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation token shards")
    val_tokens: int = setting(10_485_760, "validation tokens, taken from the start of val_files", POSITIVE)
    train_seq_len: int = setting(48 * 1024, "tokens in one packed training sequence (one micro-batch)", POSITIVE)
    val_seq_len: int = setting(4 * 64 * 1024, "tokens in one packed validation sequence", POSITIVE)
    train_batch_tokens: int = setting(8 * 48 * 1024, "tokens per optimizer step, over all ranks", POSITIVE)
    # schedule
    num_iterations: int = setting(1770, "optimizer steps", POSITIVE)
    cooldown_frac: float = setting(0.4, "final fraction of steps over which the LR decays to 0.1x", FRACTION)
    val_every: int = setting(125, "validate every this many steps (and at the end); 0: only at the end", NON_NEGATIVE)
    warmup_steps: int = setting(10, "untimed compile/kernel warmup steps on dummy data, then state is restored",
                                NON_NEGATIVE)
    # model
    vocab_size: int = setting(50257, "token vocabulary (GPT-2)", Range(1, 2**16))
    num_layers: int = setting(12, "transformer blocks (even: half encoder, half decoder for U-net skips)", POSITIVE)
    model_dim: int = setting(768, "residual stream width", POSITIVE)
    num_heads: int = setting(6, "attention heads", POSITIVE)
    head_dim: int = setting(128, "width of one attention head (num_heads * head_dim == model_dim)", POSITIVE)
    mlp_ratio: int = setting(4, "MLP hidden width / model_dim", POSITIVE)
    attention_layout: str = setting("LSSSLSS-SSSL", "per block: L long window, S short window, - no attention")
    value_embed_layout: str = setting("012------012", "per block: index of its value-embedding table, - none")
    block_size: int = setting(128, "attention mask block size in tokens", POSITIVE)
    max_window_tokens: int = setting(1792, "final long sliding window; grows linearly from one block", POSITIVE)
    attn_scale: float = setting(0.12, "fixed softmax scale for QK-normed attention", POSITIVE)
    logit_cap: float = setting(30.0, "logits soft cap: cap * sigmoid(z / (cap / 4))", POSITIVE)
    fp8_head: bool = setting(True, "LM head matmul in FP8 during training (evaluation stays in 16/32 bit)")
    # memory savers: the same mathematics, recomputed in backward instead of kept (see README)
    checkpoint_blocks: int = setting(-1, "recompute the first N blocks in backward: 0 (none) .. num_layers (all); "
                                         "-1: --memory chooses", Range(-1, math.inf, high_open=True))
    loss_chunk_tokens: int = setting(-1, "training head + cap + loss in chunks of N tokens (a multiple of 16), each "
                                         "recomputed in backward; 0: one piece; -1: --memory chooses",
                                     Range(-1, math.inf, high_open=True))
    memory: str = setting("auto", "savers left at -1: auto (on CUDA, the cheapest that fits this GPU by "
                                  "records/benchmarks/memory_table.json) or off (none)")
    # optimizers
    muon_lr: float = setting(0.05, "Muon learning rate (hidden matrices)", NON_NEGATIVE)
    muon_momentum: float = setting(0.95, "Muon momentum after warmup", MOMENTUM)
    muon_momentum_start: float = setting(0.85, "Muon momentum at step 0", MOMENTUM)
    muon_momentum_warmup_steps: int = setting(300, "steps over which Muon momentum rises linearly", NON_NEGATIVE)
    newton_schulz_steps: int = setting(5, "Newton-Schulz iterations in Muon", POSITIVE)
    head_lr: float = setting(0.008, "Adam learning rate for the LM head", NON_NEGATIVE)
    embed_lr: float = setting(0.6, "Adam learning rate for token and value embeddings", NON_NEGATIVE)
    scalar_lr: float = setting(0.04, "Adam learning rate for scalars (lambdas, skip weights)", NON_NEGATIVE)
    adam_beta1: float = setting(0.8, "Adam beta1", MOMENTUM)
    adam_beta2: float = setting(0.95, "Adam beta2", MOMENTUM)
    adam_eps: float = setting(1e-10, "Adam epsilon", POSITIVE)
    # machinery
    device: str = setting("auto", "auto (cuda if available), cuda or cpu")
    attention_backend: str = setting("auto", "auto (flex on cuda, sdpa on cpu), flex or sdpa (dense mask)")
    compile: bool = setting(True, "torch.compile the model")
    seed: int = setting(0, "random seed for the model init", Range(0, 2**63 - 1))
    log_dir: str = setting("logs", "folder for the run log <run_id>.txt (rank 0)")
    run_id: str = setting("", "log file name; empty: a random UUID")
    checkpoint_every: int = setting(0, "checkpoint every this many steps and at the end, in <log_dir>/<run_id>/; 0: off",
                                    NON_NEGATIVE)
    checkpoint_keep: int = setting(2, "checkpoints to keep (the newest)", POSITIVE)
    resume: str = setting("", "continue from a checkpoint file, or auto: the newest valid one of --run_id (none: start)")
    save_checkpoint: bool = setting(False, "write the final checkpoint even when --checkpoint_every=0")
    save_safetensors: bool = setting(False, "also write the final weights as <log_dir>/<run_id>/final.safetensors")
    preset: str = setting("", "apply a preset first (tiny: a small CPU-sized run), then the other flags")
    check_only: bool = setting(False, "check settings, memory, data and log folder, then exit (run.sh does this first)")
    allow_val_in_train: bool = setting(False, "run even when a validation file is also a training file (warns)")


PRESETS = {
    # A run with validation on a 2-core CPU in a minute or two. Same code paths as the record except
    # attention (dense-mask SDPA on CPU) and the FP8 head, which CPUs only emulate, several times
    # slower than fp32 (the FP8 op has its own tests). The 32-wide head learns faster at 5x the head LR.
    "tiny": dict(
        num_layers=6, model_dim=32, num_heads=2, head_dim=16, attention_layout="LSS-SL",
        value_embed_layout="01--01", block_size=32, max_window_tokens=256, train_seq_len=512,
        train_batch_tokens=2048, val_seq_len=2048, val_tokens=16384, num_iterations=60, val_every=20,
        warmup_steps=2, muon_momentum_warmup_steps=20, head_lr=0.04, fp8_head=False,
    ),
}


class SettingsError(ValueError):
    """A bad setting or environment; the message says what is wrong and how to fix it."""


class DataError(ValueError):
    """A missing, corrupt or too small data file; the message names the file."""


BOOLEAN_SPELLINGS = {True: ("true", "1", "yes", "on"), False: ("false", "0", "no", "off")}  # any letter case


def parse_value(name: str, kind: type, text: str):
    if kind is bool:
        for value, spellings in BOOLEAN_SPELLINGS.items():
            if text.lower() in spellings:
                return value
        raise SettingsError(f"--{name}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"--{name}={text}: expected a value of type {kind.__name__}") from None


def settings_help() -> str:
    def flag(name, value):
        return f"--{name}={str(value).lower() if isinstance(value, bool) else value}"

    fields = dataclasses.fields(Settings)
    width = max(len(flag(f.name, f.default)) for f in fields)
    lines = ["usage: torchrun --nproc_per_node=N train_gpt.py [--name=value ...]   (or: python train_gpt.py ...)",
             "", "settings (--name=default, then what it does and, for numbers, the valid range):"]
    for f in fields:
        valid = f"; valid: {f.metadata['valid']}" if f.metadata["valid"] is not None else ""
        lines.append(f"  {flag(f.name, f.default):<{width}}  {f.metadata['help']}{valid}")
    spellings = " or ".join("/".join(spellings) for spellings in BOOLEAN_SPELLINGS.values())
    lines += ["", f"true/false settings accept {spellings}, in any letter case.", "", "presets:"]
    for name, values in PRESETS.items():
        flags = " ".join(flag(key, value) for key, value in values.items())
        lines += textwrap.wrap(flags, 110, initial_indent=f"  --preset={name}: ", subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_settings(argv: list[str]) -> Settings:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    types = {f.name: type(f.default) for f in fields.values()}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SettingsError(f"bad argument {arg!r}: settings are given as --name=value (see --help)")
        name, text = arg[2:].split("=", 1)
        if name not in fields:
            raise SettingsError(f"unknown setting --{name} (see --help for the list)")
        overrides[name] = parse_value(name, types[name], text)
    preset = overrides.get("preset", "")
    if preset and preset not in PRESETS:
        raise SettingsError(f"--preset={preset}: unknown preset; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **overrides}
    settings = Settings(**values)
    check_settings(settings)
    return settings


def check_settings(s: Settings):
    def require(condition: bool, message: str):
        if not condition:
            raise SettingsError(message)

    for f in dataclasses.fields(Settings):
        value, valid = getattr(s, f.name), f.metadata["valid"]
        if isinstance(value, float):
            require(math.isfinite(value), f"--{f.name}={value}: must be a finite number")
        if valid is not None:
            require(value in valid, f"--{f.name}={value}: must be in {valid} (see --help)")
    require(s.num_layers % 2 == 0, f"--num_layers={s.num_layers}: must be even (U-net encoder/decoder halves)")
    require(s.num_heads * s.head_dim == s.model_dim,
            f"num_heads * head_dim = {s.num_heads * s.head_dim} must equal model_dim = {s.model_dim}")
    require(s.head_dim % 4 == 0, f"--head_dim={s.head_dim}: must be a multiple of 4 (rotary layout)")
    require(len(s.attention_layout) == s.num_layers and set(s.attention_layout) <= set("LS-"),
            f"--attention_layout={s.attention_layout}: needs one of L, S, - per block ({s.num_layers} blocks)")
    require(len(s.value_embed_layout) == s.num_layers and set(s.value_embed_layout) <= set("0123456789-"),
            f"--value_embed_layout={s.value_embed_layout}: needs a digit or - per block ({s.num_layers} blocks)")
    for name in ("train_seq_len", "val_seq_len", "max_window_tokens"):
        require(getattr(s, name) % s.block_size == 0,
                f"--{name}={getattr(s, name)}: must be a multiple of block_size={s.block_size}")
    require(s.train_batch_tokens % s.train_seq_len == 0,
            f"--train_batch_tokens={s.train_batch_tokens}: must be a multiple of train_seq_len={s.train_seq_len}")
    require(s.val_tokens % s.val_seq_len == 0,
            f"--val_tokens={s.val_tokens}: must be a multiple of val_seq_len={s.val_seq_len}")
    require(s.device in ("auto", "cuda", "cpu"), f"--device={s.device}: choose auto, cuda or cpu")
    require(s.attention_backend in ("auto", "flex", "sdpa"),
            f"--attention_backend={s.attention_backend}: choose auto, flex or sdpa")
    require(-1 <= s.checkpoint_blocks <= s.num_layers,
            f"--checkpoint_blocks={s.checkpoint_blocks}: choose 0..{s.num_layers} blocks, or -1 to let --memory choose")
    require(s.loss_chunk_tokens == -1 or (s.loss_chunk_tokens >= 0 and s.loss_chunk_tokens % 16 == 0),
            f"--loss_chunk_tokens={s.loss_chunk_tokens}: choose 0 (one piece) or a positive multiple of 16 "
            "(the FP8 matmul's row granularity), or -1 to let --memory choose")
    require(s.memory in ("auto", "off"), f"--memory={s.memory}: choose auto or off")


# ----------------------------------------------------------------------------------------------------
# 2. Distributed setup


@dataclass(frozen=True)
class MemorySavers:
    """Exact memory savers: what they drop in forward is recomputed in backward."""
    checkpoint_blocks: int = 0  # the first N transformer blocks keep only their inputs
    loss_chunk_tokens: int = 0  # training head + cap + loss per chunk of this many tokens; 0: one piece


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    attention_backend: str  # "flex" or "sdpa"
    grad_accum_steps: int
    savers: MemorySavers = MemorySavers()
    notices: tuple[str, ...] = ()  # what the start-up checks found and chose, one line each (printed and logged)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        # bf16 on GPUs; fp32 on CPU, whose bf16 matmuls are ~3x slower than fp32.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_runtime(s: Settings, rank: int, world_size: int, local_rank: int) -> Runtime:
    """Checks device, attention backend and world size before any process group exists."""
    has_cuda = torch.cuda.is_available()
    if s.device == "cuda" and not has_cuda:
        raise SettingsError("--device=cuda but no CUDA GPU is visible; use --device=cpu (e.g. with --preset=tiny)")
    device_type = "cuda" if s.device == "cuda" or (s.device == "auto" and has_cuda) else "cpu"
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    backend = s.attention_backend
    if backend == "auto":
        backend = "flex" if device_type == "cuda" else "sdpa"
    if backend == "flex" and device_type == "cpu":
        raise SettingsError("--attention_backend=flex needs a CUDA GPU (FlexAttention has no backward on CPU); "
                            "use --attention_backend=sdpa on CPU")
    if backend == "flex" and not s.compile:
        raise SettingsError("--attention_backend=flex needs --compile=true (eager FlexAttention materialises "
                            "the full score matrix); use --attention_backend=sdpa to run uncompiled")
    sequences_per_step = s.train_batch_tokens // s.train_seq_len
    if sequences_per_step % world_size != 0:
        raise SettingsError(
            f"world size {world_size} cannot split a step of {sequences_per_step} sequences "
            f"(train_batch_tokens={s.train_batch_tokens} / train_seq_len={s.train_seq_len}); "
            f"run with {', '.join(map(str, divisors(sequences_per_step)))} processes")
    notices, total_memory = [], None
    if device_type == "cuda":
        notices, total_memory = check_gpu(s, device, backend)
    savers, memory_notice = choose_memory_savers(s, world_size, total_memory, load_memory_table())
    notices.append(memory_notice)
    if rank == 0:
        for notice in notices:
            print(notice, flush=True)
    return Runtime(rank, world_size, device, backend, sequences_per_step // world_size, savers, tuple(notices))


# Shared memory per block that FlexAttention's largest kernel needs with inductor's default tiles (bf16, head_dim
# 128), by compute capability: offline compilation for each target with the GPU check's method (README, "Running
# on other GPUs"; sm_80/sm_89 at 2,048 tokens, the tiles do not depend on the length). The
# tiles, hence the need, depend on the architecture; what a GPU offers is its own property (sm_86/sm_89 cards
# such as RTX 3090/4090 and L40S: 101,376 bytes; A100: 166,912; H100: 232,448).
FLEX_SHARED_MEMORY_NEEDED = {(8, 0): 99_328, (8, 9): 99_328, (9, 0): 166_400}


def check_gpu(s: Settings, device: torch.device, backend: str) -> tuple[list[str], int]:
    """Start-up capability checks of the visible GPU: bf16, FP8 and FlexAttention's shared memory.
    Returns one-line notices and the GPU's memory in bytes."""
    props = torch.cuda.get_device_properties(device)
    capability = f"compute capability {props.major}.{props.minor}"
    if (props.major, props.minor) < (8, 0):
        raise SettingsError(f"{props.name} ({capability}) has no bfloat16 support, which training computes in: "
                            "it needs compute capability 8.0 or newer (A100, RTX 30xx/40xx, L40S, H100)")
    if s.fp8_head and (props.major, props.minor) < (8, 9):
        raise SettingsError(f"--fp8_head=true needs FP8 matmuls, which need compute capability 8.9 or newer (Ada, "
                            f"Hopper, Blackwell); {props.name} has {capability}: run with --fp8_head=false")
    notices = [f"GPU: {props.name}, {capability}, {props.total_memory / 2**30:.1f} GiB: bf16 yes, "
               f"FP8 head {'on' if s.fp8_head else 'off'}"]
    if backend == "flex":
        needed = FLEX_SHARED_MEMORY_NEEDED.get((props.major, props.minor)) if s.head_dim == 128 else None
        offered = props.shared_memory_per_block_optin
        if needed is None:
            notices.append(f"FlexAttention: the GPU check has not compiled its kernels for {capability} at "
                           f"head_dim {s.head_dim}; if compilation stops with 'out of resource: shared memory', "
                           f"this GPU's {offered} bytes per block are too few")
        elif offered < needed:
            raise SettingsError(f"FlexAttention's kernels need {needed} bytes of shared memory per block on "
                                f"{capability} (GPU check); {props.name} offers {offered}: use a GPU with more")
        else:
            notices.append(f"FlexAttention: kernels need {needed} of the {offered} bytes of shared memory per block")
    return notices, props.total_memory


# --memory=auto reads the GPU check's predicted peak memory per combination of savers for the record shape.
MEMORY_TABLE_PATH = Path(__file__).resolve().parent / "records" / "benchmarks" / "memory_table.json"


def load_memory_table() -> dict | None:
    return json.loads(MEMORY_TABLE_PATH.read_text()) if MEMORY_TABLE_PATH.exists() else None


def usable_memory_gib(total_memory: int) -> float:
    """What a prediction may fill: 90% of the GPU less 1 GiB, for the CUDA context, NCCL buffers, cuBLAS
    workspaces and allocator fragmentation, none of which the generated code's allocation plan shows."""
    return 0.9 * total_memory / 2**30 - 1.0


def choose_memory_savers(s: Settings, world_size: int, total_memory: int | None,
                         table: dict | None) -> tuple[MemorySavers, str]:
    """Savers set explicitly (>= 0) stay; with --memory=auto on a GPU the others come from the table row with
    the least recomputation whose predicted peak fits usable_memory_gib. Returns the savers and a notice."""
    as_set = MemorySavers(max(s.checkpoint_blocks, 0), max(s.loss_chunk_tokens, 0))
    chosen = f"checkpoint_blocks={as_set.checkpoint_blocks} loss_chunk_tokens={as_set.loss_chunk_tokens}"
    if s.checkpoint_blocks >= 0 and s.loss_chunk_tokens >= 0:
        return as_set, f"memory savers as set: {chosen}"
    if s.memory == "off" or total_memory is None:
        reason = "--memory=off" if s.memory == "off" else "no GPU"
        return as_set, f"memory savers ({reason}): {chosen}"
    if table is None:
        return as_set, f"--memory=auto: no table at {MEMORY_TABLE_PATH}: {chosen}"
    differing = [name for name, value in table["shape"].items() if getattr(s, name) != value]
    if differing:
        return as_set, (f"--memory=auto: the memory table covers the record shape only ({', '.join(differing)} "
                        f"differ): {chosen}")
    # Ranks share Muon's momentum, so a world size missing from the table is bounded by the 1-rank rows.
    table_world = world_size if any(row["world_size"] == world_size for row in table["rows"]) else 1
    candidates = sorted((row for row in table["rows"] if row["world_size"] == table_world
                         and row["fp8_head"] == s.fp8_head
                         and s.checkpoint_blocks in (-1, row["checkpoint_blocks"])
                         and s.loss_chunk_tokens in (-1, row["loss_chunk_tokens"])),
                        key=lambda row: row["recompute_flops_per_token"])
    if not candidates:
        return as_set, f"--memory=auto: no table row matches these settings: {chosen}"
    usable = usable_memory_gib(total_memory)
    fitting = [row for row in candidates if row["peak_gib"] <= usable]
    row = fitting[0] if fitting else min(candidates, key=lambda row: row["peak_gib"])
    savers = MemorySavers(row["checkpoint_blocks"], row["loss_chunk_tokens"])
    verdict = "fits" if fitting else "does NOT fit (expect out-of-memory)"
    return savers, (f"--memory=auto: checkpoint_blocks={savers.checkpoint_blocks} "
                    f"loss_chunk_tokens={savers.loss_chunk_tokens}: predicted peak {row['peak_gib']:.1f} GiB "
                    f"(GPU check, {table_world} rank(s)) {verdict} in the {usable:.1f} GiB usable of "
                    f"{total_memory / 2**30:.1f} GiB")


def init_distributed(runtime: Runtime):
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if runtime.world_size > 1:
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        device_id = runtime.device if runtime.device.type == "cuda" else None
        dist.init_process_group(backend=backend, device_id=device_id)


# ----------------------------------------------------------------------------------------------------
# 3. FP8 matmul op (LM head)
# out = x @ w.T with x, w cast to float8_e4m3fn and the output gradient to float8_e5m2. Fixed
# power-of-two scales multiply before the cast and are divided out by _scaled_mm. torch._scaled_mm has
# no autograd, so the op is a custom op with its own backward. On CUDA the bodies run under
# torch.compile, which fuses each scale + cast (+ transposed copy) into one kernel and keeps the scale
# tensors on the device; on CPU they run eagerly (the same arithmetic: the scales are exact).
# No host-device synchronisation: the inverse scales are made on the device (torch.full), never copied.

FP8_X_SCALE = 2.0
FP8_W_SCALE = 2.0**9
FP8_GRAD_SCALE = 2.0**19


def check_fp8_operands(x: Tensor, w: Tensor):
    # cuBLAS FP8 needs row-major operands with dims divisible by 16; CPU accepts more, so check here.
    if x.ndim != 2 or w.ndim != 2 or not x.is_contiguous() or not w.is_contiguous():
        raise ValueError("fp8 matmul needs contiguous 2-D x (tokens, in) and w (out, in)")
    if x.size(0) % 16 or x.size(1) % 16 or w.size(0) % 16:
        raise ValueError(f"fp8 matmul needs dims divisible by 16, got x {tuple(x.shape)}, w {tuple(w.shape)}")


def inverse_scale(scale: float, like: Tensor) -> Tensor:
    return torch.full((), 1 / scale, dtype=torch.float32, device=like.device)


def fp8_forward_body(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x_f8 = x.mul(FP8_X_SCALE).to(torch.float8_e4m3fn)
    w_f8 = w.mul(FP8_W_SCALE).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=x.dtype, use_fast_accum=True,
                           scale_a=inverse_scale(FP8_X_SCALE, x), scale_b=inverse_scale(FP8_W_SCALE, x))
    return out, x_f8, w_f8


def fp8_backward_body(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    grad_f8 = grad.mul(FP8_GRAD_SCALE).to(torch.float8_e5m2)
    # _scaled_mm wants a row-major first and a column-major second operand: hence the .T.contiguous().T
    grad_x = torch._scaled_mm(grad_f8, w_f8.T.contiguous().T, out_dtype=grad.dtype,
                              scale_a=inverse_scale(FP8_GRAD_SCALE, grad), scale_b=inverse_scale(FP8_W_SCALE, grad))
    # grad_w (out, in) as the transpose of x_f8.T @ grad_f8: for a 50304 x 768 result this orientation
    # is the faster one on H100 (the public record's measurement)
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), grad_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=inverse_scale(FP8_X_SCALE, grad), scale_b=inverse_scale(FP8_GRAD_SCALE, grad)).T
    return grad_x, grad_w


# dynamic=False: one static graph per operand shape (the record has one), as for the model
fp8_forward_compiled = torch.compile(fp8_forward_body, dynamic=False)
fp8_backward_compiled = torch.compile(fp8_backward_body, dynamic=False)


@torch.library.custom_op("speedrun::fp8_matmul", mutates_args=())
def fp8_matmul_op(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_fp8_operands(x, w)
    return (fp8_forward_compiled if x.is_cuda else fp8_forward_body)(x, w)


@fp8_matmul_op.register_fake
def _(x: Tensor, w: Tensor):
    return (x.new_empty(x.size(0), w.size(0)), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("speedrun::fp8_matmul_backward", mutates_args=())
def fp8_matmul_backward_op(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    return (fp8_backward_compiled if grad.is_cuda else fp8_backward_body)(grad, x_f8, w_f8)


@fp8_matmul_backward_op.register_fake
def _(grad: Tensor, x_f8: Tensor, w_f8: Tensor):
    # grad_w is the transpose of a row-major (in, out) matrix: the fake must have the same strides
    return grad.new_empty(x_f8.shape), grad.new_empty(w_f8.size(1), w_f8.size(0), dtype=torch.float32).T


def _fp8_setup_context(ctx, inputs, output):
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.set_materialize_grads(False)


def _fp8_backward(ctx, grad_out, *_unused_grads):
    x_f8, w_f8 = ctx.saved_tensors
    return fp8_matmul_backward_op(grad_out, x_f8, w_f8)


fp8_matmul_op.register_autograd(_fp8_backward, setup_context=_fp8_setup_context)


def fp8_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x (tokens, in) @ w (out, in).T in FP8 with the record's fixed scales; output in x's dtype.

    The e5m2 cast of the output gradient sees whatever magnitude the caller's loss gives it, so the
    trainer backpropagates each micro-batch's undivided mean loss (see accumulate_gradients)."""
    return fp8_matmul_op(x, w)[0]


# ----------------------------------------------------------------------------------------------------
# 4. Optimizers

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic; pushes singular values into ~[0.7, 1.2]


def newton_schulz_orthogonalize(grad: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximates U V^T of grad = U S V^T for each matrix in the last two dims."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


# On CUDA 15 matmuls + 12-18 fused kernels instead of ~44 launches per call; on CPU eager (compiling
# each shape costs seconds, and the tests compare the two). dynamic=False: one static graph for each of
# the record's 4 matrix shapes.
newton_schulz_compiled = torch.compile(newton_schulz_orthogonalize, dynamic=False)


class Muon(torch.optim.Optimizer):
    """Momentum + Nesterov, then orthogonalised updates for 2-D (or stacked 2-D) weights.

    Parameters with the same number of elements form a group, in the order given (the MLP's 3072 x 768
    and 768 x 3072 matrices share one). Ownership rule: within a group, rank r orthogonalises, and keeps
    the momentum buffers of, matrices r, r + W, r + 2W, ... (W = world size). For each chunk of W
    matrices, an all-gather into one [W, numel] tensor hands every rank every update, so all ranks apply
    the same update as a single process would. Gradients must already be averaged across ranks.
    """

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, ns_dtype: torch.dtype,
                 rank: int = 0, world_size: int = 1):
        params = list(params)
        sizes = sorted({p.numel() for p in params}, reverse=True)
        groups = [dict(params=[p for p in params if p.numel() == size]) for size in sizes]
        super().__init__(groups, dict(lr=lr, momentum=momentum))
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        self.rank, self.world_size = rank, world_size

    def _orthogonal_update(self, param: Tensor, momentum: float) -> Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - momentum)
        nesterov_grad = param.grad.lerp(buffer, momentum)
        orthogonalize = newton_schulz_compiled if param.is_cuda else newton_schulz_orthogonalize
        return orthogonalize(nesterov_grad, self.ns_steps, self.ns_dtype)

    @staticmethod
    def apply_update(param: Tensor, update: Tensor, lr: float):
        """param -= lr * sqrt(max(1, rows / cols)) * update; update has param's shape or is flat. The
        shape factor rides on add_'s alpha: no separate scaling kernel, no fp32 copy of the update."""
        scale = max(1.0, param.size(-2) / param.size(-1)) ** 0.5
        param.add_(update.view(param.shape), alpha=-lr * scale)

    def chunks(self, world_size: int):
        """Yields (chunk, group): runs of world_size same-size matrices of a group; by the ownership rule
        rank r owns chunk[r], and a chunk shorter than world_size leaves the last ranks idle."""
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                yield params[base:base + world_size], group

    def owned_parameters(self, rank: int, world_size: int) -> list[Tensor]:
        """The matrices whose momentum buffers rank keeps (checkpoints gather and scatter them by this)."""
        return [chunk[rank] for chunk, _ in self.chunks(world_size) if rank < len(chunk)]

    def owned_updates(self, rank: int, world_size: int):
        """Yields (update, chunk, lr) for every chunk: the update is rank's own orthogonalised matrix of
        the chunk (zeros, flat, when the chunk is too short to give it one). step() runs this with the
        optimizer's own rank; benchmark.py times one rank's share with it."""
        for chunk, group in self.chunks(world_size):
            if rank < len(chunk):
                update = self._orthogonal_update(chunk[rank], group["momentum"])
            else:
                update = chunk[0].new_zeros(chunk[0].numel(), dtype=self.ns_dtype)
            yield update, chunk, group["lr"]

    @torch.no_grad()
    def step(self):
        pending = []  # (all-gather handle, gathered updates [W, numel], params they belong to, lr)
        for update, chunk, lr in self.owned_updates(self.rank, self.world_size):
            if self.world_size == 1:
                self.apply_update(chunk[0], update, lr)
                continue
            gathered = update.new_empty(self.world_size * update.numel())  # flat: gloo wants 1-D
            handle = dist.all_gather_into_tensor(gathered, update.flatten(), async_op=True)
            pending.append((handle, gathered.view(self.world_size, -1), chunk, lr))
        for handle, gathered, chunk, lr in pending:
            handle.wait()
            for param, update in zip(chunk, gathered):
                self.apply_update(param, update, lr)


def build_optimizers(model: "GPT", s: Settings, runtime: Runtime) -> tuple[Muon, torch.optim.Adam]:
    hidden_matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    embeddings = [model.embed.weight, *(table.weight for table in model.value_embeds)]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    head = [model.lm_head.weight]
    assert len(hidden_matrices) + len(embeddings) + len(scalars) + len(head) == len(list(model.parameters()))
    adam = torch.optim.Adam(
        [dict(params=head, lr=s.head_lr), dict(params=embeddings, lr=s.embed_lr),
         dict(params=scalars, lr=s.scalar_lr)],
        betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps, fused=runtime.device.type == "cuda")
    muon = Muon(hidden_matrices, lr=s.muon_lr, momentum=s.muon_momentum, ns_steps=s.newton_schulz_steps,
                ns_dtype=runtime.compute_dtype, rank=runtime.rank, world_size=runtime.world_size)
    for optimizer in (muon, adam):
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return muon, adam


def lr_factor(step: int, s: Settings) -> float:
    """1.0, then a linear decay to 0.1 over the last cooldown_frac of the steps."""
    progress = step / s.num_iterations
    if progress < 1 - s.cooldown_frac:
        return 1.0
    remaining = (1 - progress) / s.cooldown_frac
    return remaining + (1 - remaining) * 0.1


def muon_momentum(step: int, s: Settings) -> float:
    ramp = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps else 1.0
    return (1 - ramp) * s.muon_momentum_start + ramp * s.muon_momentum


# ----------------------------------------------------------------------------------------------------
# 5. Model


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def init_uniform_(weight: Tensor) -> Tensor:
    fan_in = weight.size(-1)
    bound = 3**0.5 * 0.5 / fan_in**0.5  # uniform with std 0.5 / sqrt(fan_in)
    return weight.uniform_(-bound, bound)


class CastedLinear(nn.Module):
    """Bias-free linear layer with an fp32 master weight, computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            init_uniform_(self.weight.data)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Rotary embedding on half of each head: head_dim/4 frequencies from 1 down to 1/1024 rotate the
    first and third quarters against the second and fourth; the other head_dim/4 pairs keep frequency
    0 (cos 1, sin 0) and are not rotated."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        quarter = head_dim // 4
        frequencies = torch.cat([(1 / 1024) ** torch.linspace(0, 1, quarter), torch.zeros(quarter)])
        angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * frequencies[None, :]  # (T, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:  # x (B, T, H, D) at positions offset...offset+T-1
        seq_len = x.size(1)
        cos, sin = (table[None, offset:offset + seq_len, None, :] for table in (self.cos, self.sin))
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


AttentionMask = BlockMask | Tensor  # a FlexAttention BlockMask, or a dense (T, T) bool mask for SDPA


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> Tensor:
    """q, k, v (B, T, H, D) -> (B, T, H, D), with FlexAttention or dense-mask SDPA."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if isinstance(mask, BlockMask):
        out = flex_attention(q, k, v, block_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, s: Settings, max_seq_len: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = s.num_heads, s.head_dim, s.attn_scale
        # Q, K and V weights stacked: one matmul, but Muon orthogonalises the three separately.
        self.qkv_weight = nn.Parameter(init_uniform_(torch.empty(3, s.num_heads * s.head_dim, s.model_dim)))
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.rotary = Rotary(s.head_dim, max_seq_len)
        self.proj = CastedLinear(s.num_heads * s.head_dim, s.model_dim, zero_init=True)

    def forward(self, x: Tensor, value_embed: Tensor | None, mask: AttentionMask,
                cache: "LayerCache | None" = None) -> Tensor:
        batch, seq_len, _ = x.shape
        offset = 0 if cache is None else cache.length
        qkv = F.linear(x, self.qkv_weight.flatten(end_dim=1).type_as(x))  # (B, T, 3*H*D)
        q, k, v = qkv.view(batch, seq_len, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)  # (B, T, H, D)
        q, k = self.rotary(rms_norm(q), offset), self.rotary(rms_norm(k), offset)
        if value_embed is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * value_embed.view_as(v)
        else:
            v = self.value_lambdas[0] * v
        if cache is not None:  # attend over the cached keys and values too: (B, offset + T, H, D)
            k, v = cache.append(k, v)
        y = attention(q, k, v, mask, self.scale)
        return self.proj(y.reshape(batch, seq_len, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, s: Settings, has_attention: bool, max_seq_len: int):
        super().__init__()
        self.attn = CausalSelfAttention(s, max_seq_len) if has_attention else None
        self.mlp = MLP(s.model_dim, s.mlp_ratio * s.model_dim)
        self.embed_mix = nn.Parameter(torch.tensor([1.0, 0.0]))  # x <- a*x + b*x0

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None, mask: AttentionMask | None,
                cache: "LayerCache | None" = None) -> Tensor:
        x = self.embed_mix[0] * x + self.embed_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), value_embed, mask, cache)
        return x + self.mlp(rms_norm(x))


EVAL_LOGITS_CHUNK = 16 * 1024  # tokens per head+loss chunk in evaluation


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // 128) * 128


class GPT(nn.Module):
    def __init__(self, s: Settings, attention_backend: str, savers: MemorySavers = MemorySavers()):
        super().__init__()
        self.max_seq_len = max_seq_len = max(s.train_seq_len, s.val_seq_len)  # rotary table length
        self.block_size, self.logit_cap, self.fp8_head = s.block_size, s.logit_cap, s.fp8_head
        self.attention_backend = attention_backend  # "flex" or "sdpa"
        self.savers = savers
        self.window_kinds = [None if kind == "-" else kind for kind in s.attention_layout]
        self.value_embed_tables = [None if c == "-" else int(c) for c in s.value_embed_layout]
        num_tables = 1 + max((t for t in self.value_embed_tables if t is not None), default=-1)
        self.embed = nn.Embedding(s.vocab_size, s.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(s.vocab_size, s.model_dim) for _ in range(num_tables))
        self.blocks = nn.ModuleList(Block(s, kind is not None, max_seq_len) for kind in self.window_kinds)
        self.skip_weights = nn.Parameter(torch.ones(s.num_layers // 2))  # U-net: decoder block i <- encoder
        self.lm_head = CastedLinear(s.model_dim, padded_vocab_size(s.vocab_size), zero_init=True)
        for embedding in (self.embed, *self.value_embeds):
            nn.init.normal_(embedding.weight)
        self.training_regions: TrainingRegions | None = None  # set by compile_model

    def windows(self, window_blocks: Tensor) -> dict[str, Tensor]:
        """Window in blocks per block kind: long (L) window_blocks, short (S) half of it, at least one."""
        return {"L": window_blocks, "S": torch.clamp_min(window_blocks // 2, 1)}

    def attention_masks(self, input_seq: Tensor, window_blocks: Tensor) -> dict[str, AttentionMask]:
        return attention_masks(input_seq, self.windows(window_blocks), self.block_size, self.attention_backend)

    def forward(self, input_seq: Tensor, target_seq: Tensor, window_blocks: Tensor) -> Tensor:
        """input_seq, target_seq (T,) one packed sequence; window_blocks: 0-d int tensor, the long window
        in blocks. Returns the mean cross-entropy."""
        regions = self.training_regions if self.training and torch.is_grad_enabled() else None
        head_loss = regions.head_loss if regions is not None else self.head_loss
        return head_loss(self.hidden(input_seq, window_blocks, regions=regions), target_seq)

    def embed_inputs(self, input_seq: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x0 (1, T, dim), the normed token embeddings, and one value embedding (T, dim) per table."""
        return rms_norm(self.embed(input_seq)[None]), [table(input_seq) for table in self.value_embeds]

    def hidden(self, input_seq: Tensor, window_blocks: Tensor, cache: "DecodeCache | None" = None,
               regions: "TrainingRegions | None" = None) -> Tensor:
        """The last hidden states (1, T, dim) of input_seq (T,), before the final norm. With a cache (sampling,
        dense masks), input_seq continues the cached tokens, and its keys and values join the cache."""
        if cache is None:
            masks = self.attention_masks(input_seq, window_blocks)
        else:
            masks = cache.extend(input_seq, window_blocks, self)
        x0, value_embeds = (regions.embed_inputs if regions is not None else self.embed_inputs)(input_seq)
        if regions is None:
            return self.run_blocks(0, len(self.blocks), x0, x0, [], value_embeds, masks, cache)[0]
        x, encoder_outputs = x0, []
        for first, last in regions.block_ranges:
            x, encoder_outputs = regions.run_blocks(first, last, x, x0, encoder_outputs, value_embeds, masks)
        return x

    def run_blocks(self, first: int, last: int, x: Tensor, x0: Tensor, encoder_outputs: list[Tensor],
                   value_embeds: list[Tensor], masks: dict[str, AttentionMask], cache: "DecodeCache | None" = None
                   ) -> tuple[Tensor, list[Tensor]]:
        """Blocks first .. last - 1 on x (1, T, dim); returns x and the encoder outputs so far (U-net skips)."""
        num_encoder = len(self.blocks) // 2
        encoder_outputs = list(encoder_outputs)
        for i in range(first, last):
            block = self.blocks[i]
            if i >= num_encoder:  # decoder block num_encoder + j gets encoder block num_encoder - 1 - j
                x = x + self.skip_weights[i - num_encoder] * encoder_outputs.pop()
            table = self.value_embed_tables[i]
            kind = self.window_kinds[i]
            inputs = (x, x0, None if table is None else value_embeds[table], None if kind is None else masks[kind])
            if i < self.savers.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *inputs, use_reentrant=False)  # keeps the inputs, recomputes the rest
            else:
                x = block(*inputs) if cache is None else block(*inputs, cache.layers[i])
            if i < num_encoder:
                encoder_outputs.append(x)
        return x, encoder_outputs

    def final_hidden(self, input_seq: Tensor, window_blocks: Tensor, cache: "DecodeCache | None" = None) -> Tensor:
        """The normed last hidden states (T, dim) of input_seq (T,); cache as in hidden()."""
        return rms_norm(self.hidden(input_seq, window_blocks, cache))[0]

    def head_loss(self, x: Tensor, targets: Tensor, summed_loss: Callable | None = None) -> Tensor:
        """Final norm, LM head and mean cross-entropy of the hidden states x (1, T, dim) against targets (T,);
        summed_loss as in loss()."""
        return self.loss(rms_norm(x)[0], targets, summed_loss)

    def capped_logits(self, x: Tensor) -> Tensor:
        if self.training and self.fp8_head:
            logits = fp8_matmul(x, self.lm_head.weight)
        else:
            logits = self.lm_head(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        return self.logit_cap * torch.sigmoid(logits / (self.logit_cap / 4))

    def summed_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.capped_logits(x), targets, reduction="sum")

    def loss(self, x: Tensor, targets: Tensor, summed_loss: Callable | None = None) -> Tensor:
        """Mean cross-entropy of x (T, dim) against targets (T,). Evaluation sequences are long (256K tokens):
        chunked so fp32 logits never exceed ~3 GiB. Training with loss_chunk_tokens set is chunked too, and
        each chunk is recomputed in backward, so one chunk's logits exist at a time in both directions (when
        the loop is not compiled: see compile_model). summed_loss: one chunk's summed loss (default
        self.summed_loss)."""
        summed_loss = summed_loss or self.summed_loss
        chunk = self.savers.loss_chunk_tokens
        if not self.training:
            chunk, recompute = EVAL_LOGITS_CHUNK, False
        elif chunk and torch.is_grad_enabled():
            recompute = True
        else:
            return F.cross_entropy(self.capped_logits(x), targets)
        total = 0.0
        for x_chunk, t_chunk in zip(x.split(chunk), targets.split(chunk)):
            if recompute:
                total = total + checkpoint(summed_loss, x_chunk, t_chunk, use_reentrant=False)
            else:
                total = total + summed_loss(x_chunk, t_chunk)
        return total / targets.numel()


class LayerCache:
    """One attention layer's keys and values so far, for incremental decoding."""

    def __init__(self):
        self.keys = self.values = None  # (1, T, H, D)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.size(1)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=1)
        return self.keys, self.values


class DecodeCache:
    """The state of an incremental decode: the tokens so far and every layer's keys and values. New
    tokens attend through dense masks (new tokens x all tokens) made by the training mask function."""

    def __init__(self, num_layers: int):
        self.tokens = None
        self.layers = [LayerCache() for _ in range(num_layers)]

    def extend(self, new_tokens: Tensor, window_blocks: Tensor, model: GPT) -> dict[str, Tensor]:
        start = 0 if self.tokens is None else self.tokens.numel()
        self.tokens = new_tokens if self.tokens is None else torch.cat([self.tokens, new_tokens])
        document_ids = (self.tokens == END_OF_TEXT).cumsum(0)
        queries = torch.arange(start, self.tokens.numel(), device=new_tokens.device)[:, None]
        keys = torch.arange(self.tokens.numel(), device=new_tokens.device)[None, :]
        return {kind: make_mask_mod(document_ids, blocks, model.block_size)(None, None, queries, keys)
                for kind, blocks in model.windows(window_blocks).items()}  # each (new, all)


def build_model(s: Settings, runtime: Runtime) -> GPT:
    torch.manual_seed(s.seed)
    model = GPT(s, runtime.attention_backend, runtime.savers).to(runtime.device)
    if runtime.compute_dtype == torch.bfloat16:
        for embedding in (model.embed, *model.value_embeds):
            embedding.bfloat16()
    return model


TRAINING_BLOCK_REGIONS = 6  # compiled groups of blocks in training (dynamo compiles a function at most 8 ways)


@dataclass
class TrainingRegions:
    """The separately compiled pieces of the training forward (see compile_model)."""
    embed_inputs: Callable
    block_ranges: list[tuple[int, int]]  # (first, last + 1) per group of blocks
    run_blocks: Callable  # compiled GPT.run_blocks: one graph per block range
    head_loss: Callable  # final norm + head + loss: one graph, or with --loss_chunk_tokens one graph per chunk


def compile_model(model: GPT, backend: str = "inductor") -> nn.Module:
    """Compiles the model for training (in place) and returns the compiled model for evaluation.

    Evaluation is one graph. Training is compiled by region: the input embeddings, 6 groups of consecutive
    blocks (2 each in the record), and the final norm with the head and the loss (with --loss_chunk_tokens:
    the head and loss of one chunk, the chunk loop eager), joined by eager Python.
    Backward then has one autograd node per region, so a region's gradients are final as soon as its
    backward ends: GradientReducer's hooks start their all-reduce while the regions before it are still in
    backward. As one graph, backward would be one node, and every hook would fire after all of it. Each
    group is its own graph of GPT.run_blocks (fixed block range), so 6 graphs whatever the block layout:
    under dynamo's limit of 8 graphs per function (a graph per block would need up to 7 in the record:
    attention or not, value embedding or not, U-net skip or not, aliased inputs)."""
    compile = functools.partial(torch.compile, dynamic=False, backend=backend)
    num_layers = len(model.blocks)
    size = -(-num_layers // TRAINING_BLOCK_REGIONS)
    ranges = [(first, min(first + size, num_layers)) for first in range(0, num_layers, size)]
    if model.savers.loss_chunk_tokens:
        # the chunk loop stays eager around one compiled chunk, so backward recomputes and frees one chunk's
        # logits at a time (compiled as one graph, inductor fuses the chunks and keeps all their logits)
        head_loss = functools.partial(model.head_loss, summed_loss=compile(model.summed_loss))
    else:
        head_loss = compile(model.head_loss)
    model.training_regions = TrainingRegions(
        embed_inputs=compile(model.embed_inputs), block_ranges=ranges,
        run_blocks=compile(model.run_blocks), head_loss=head_loss)
    return compile(model)


# ----------------------------------------------------------------------------------------------------
# 6. Attention masks
# A query attends to keys that are (a) not in the future, (b) in the same document (documents start
# at token 50256), and (c) in its own mask block or the window_blocks - 1 blocks before it. The same
# mask function serves FlexAttention (with block tables, so it skips empty blocks) and dense SDPA.

END_OF_TEXT = 50256


def make_mask_mod(document_ids: Tensor, window_blocks: Tensor, block_size: int):
    def mask_mod(batch, head, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        same_document = document_ids[q_idx] == document_ids[kv_idx]
        in_window = q_idx // block_size - kv_idx // block_size < window_blocks
        return causal & same_document & in_window

    return mask_mod


def block_tables(document_ids: Tensor, block_size: int, window_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """For each (query block, key block): does any (query, key) pair pass the mask, do all pairs pass?
    Exact because document ids never decrease: two blocks share a document iff their id ranges
    overlap, and then the closest pair across them is in that document."""
    num_blocks = document_ids.numel() // block_size
    blocks = document_ids.view(num_blocks, block_size)
    first_doc, last_doc = blocks[:, 0], blocks[:, -1]
    block_index = torch.arange(num_blocks, device=document_ids.device)
    distance = block_index[:, None] - block_index[None, :]  # (q block, kv block)
    in_window = (distance >= 0) & (distance < window_blocks)
    share_document = (first_doc[:, None] <= last_doc[None, :]) & (first_doc[None, :] <= last_doc[:, None])
    single_doc = first_doc == last_doc
    same_single_doc = single_doc[:, None] & single_doc[None, :] & (first_doc[:, None] == first_doc[None, :])
    any_allowed = in_window & share_document
    all_allowed = in_window & (distance > 0) & same_single_doc
    return any_allowed, all_allowed


def dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, K) bool -> per row the count of True columns (Q,) and the column indices, True ones first (Q, K)."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def attention_masks(input_seq: Tensor, window_blocks_by_kind: dict[str, Tensor], block_size: int,
                    backend: str) -> dict[str, AttentionMask]:
    document_ids = (input_seq == END_OF_TEXT).cumsum(0)
    masks = {}
    for kind, window_blocks in window_blocks_by_kind.items():
        mask_mod = make_mask_mod(document_ids, window_blocks, block_size)
        if backend == "flex":
            any_allowed, all_allowed = block_tables(document_ids, block_size, window_blocks)
            partial_counts, partial_indices = dense_to_ordered(any_allowed & ~all_allowed)
            full_counts, full_indices = dense_to_ordered(all_allowed)
            masks[kind] = BlockMask.from_kv_blocks(
                partial_counts[None, None], partial_indices[None, None], full_counts[None, None],
                full_indices[None, None], BLOCK_SIZE=block_size, mask_mod=mask_mod)
        else:
            positions = torch.arange(input_seq.numel(), device=input_seq.device)
            masks[kind] = mask_mod(None, None, positions[:, None], positions[None, :])  # (T, T)
    return masks


def window_blocks_tensor(step: int, s: Settings, device: torch.device) -> Tensor:
    """window_blocks_at as a 0-d device tensor: a tensor, so the compiled graph is reused as the window
    grows. Cached, one per distinct window (14 in the record), and made on the device (no host copy)."""
    return window_tensor(window_blocks_at(step, s), device)


@functools.cache
def window_tensor(blocks: int, device: torch.device) -> Tensor:
    return torch.full((), blocks, dtype=torch.int32, device=device)


def window_blocks_at(step: int, s: Settings) -> int:
    """Long sliding window in blocks: grows linearly from 1 to max_window_tokens / block_size. With the
    defaults this is the record's next_multiple_of_128(1728 * progress) / 128."""
    final_blocks = s.max_window_tokens // s.block_size
    return max(1, math.ceil(step / s.num_iterations * (final_blocks - 0.5)))


# ----------------------------------------------------------------------------------------------------
# 7. Data loading
# Shard = 256 little-endian int32 header [magic, version, token count, 0...] + uint16 tokens.
# (data/shards.py has the full reader/writer for the data tools; this copy keeps the trainer standalone.)

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4


def unreadable(path: Path, error: OSError) -> DataError:
    return DataError(f"{path}: cannot read it ({error.strerror or error}); check that it exists and that this user "
                     "may read it")


def read_shard_header(path: Path) -> int:
    """Returns the token count after checking magic, version and file size."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=256) if size >= SHARD_HEADER_BYTES else None
    except OSError as error:
        raise unreadable(path, error) from None
    if header is None:
        raise DataError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header; "
                        "the file is truncated: delete it and fetch it again")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); "
                        "not a token shard: check --train_files/--val_files")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise DataError(f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has "
                        f"{size} bytes ({problem}): delete it and fetch it again")
    return num_tokens


def check_token_range(tokens: np.ndarray, vocab_size: int, path: Path):
    """Every token id must be < vocab_size, or the embedding lookup fails (on CUDA as a device-side assert
    that names no file). A vectorised max; the position is searched for only when the check fails.
    data/shards.py's verify_shard applies the same rule; a test checks that both agree."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[position])} at position {position} is outside the vocabulary "
                        f"(ids must be < --vocab_size={vocab_size}); made with a different tokenizer? "
                        "Re-tokenize with data/fineweb.py (GPT-2) or set --vocab_size to the tokenizer's")


def load_shard(path: Path, vocab_size: int, pin_memory: bool = False) -> Tensor:
    """A shard's tokens as uint16, read from the file straight into the tensor (pinned memory on CUDA,
    so copies to the GPU do not stall the host), after checking its header and that every token is
    < vocab_size. The one place that reads tokens from disk."""
    num_tokens = read_shard_header(path)
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=pin_memory)
    try:
        with open(path, "rb") as f:
            f.seek(SHARD_HEADER_BYTES)
            num_bytes = f.readinto(tokens.numpy())  # the file's little-endian uint16 = the host's (x86, ARM)
    except OSError as error:
        raise unreadable(path, error) from None
    if num_bytes != 2 * num_tokens:
        raise DataError(f"{path}: read {num_bytes} bytes of tokens, expected {2 * num_tokens}: the file "
                        "changed while being read")
    check_token_range(tokens.numpy(), vocab_size, path)
    return tokens


def find_shards(pattern: str, setting_name: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise DataError(f"no files match --{setting_name}={pattern!r}; download FineWeb with "
                        "`python data/cached_fineweb10B.py 9` or point the setting at your shards")
    folders = [path for path in files if path.is_dir()]
    if folders:
        raise DataError(f"--{setting_name}={pattern!r} matches the folder {folders[0]}; give a glob of shard files, "
                        f"e.g. --{setting_name}='{folders[0] / '*.bin'}'")
    return files


def steps_in_shard(num_tokens: int, step_tokens: int) -> int:
    """Optimizer steps TrainLoader takes from a shard: positions 0, b, 2b, ... while position + b + 1 <
    num_tokens (b = step_tokens; the public loader's rule), i.e. (num_tokens - 2) // b."""
    return max(0, (num_tokens - 2) // step_tokens)


def check_train_files(files: list[Path], step_tokens: int) -> int:
    """Validates every training shard up front; returns the tokens the loader uses in one pass."""
    usable = 0
    for path in files:
        num_tokens = read_shard_header(path)
        if steps_in_shard(num_tokens, step_tokens) == 0:
            raise DataError(f"{path}: holds {num_tokens} tokens, fewer than one training step needs "
                            f"({step_tokens} + 2, as the loader moves on when position + batch + 1 >= tokens); "
                            "use larger shards or a smaller --train_batch_tokens")
        usable += steps_in_shard(num_tokens, step_tokens) * step_tokens
    return usable


class TrainLoader:
    """This rank's (inputs int32, targets int64) micro-batches on its device, forever, cycling the files.

    A step takes train_batch_tokens consecutive tokens from `position` in file `file_index` as sequences
    j = 0, 1, ... of train_seq_len (+1 for the shifted targets); sequence j goes to rank j % W at
    micro-step j // W. So 1 rank with 8 micro-steps and 8 ranks with 1 see the same sequences in the
    same optimizer step. A step that would reach a shard's last token starts the next file instead (the
    public loader's rule: position + batch + 1 >= tokens). Between optimizer steps (file_index,
    position) is the whole state: a loader made with them continues the same stream. The next file is
    read on a background thread while this one is in use; tokens cross to the GPU as uint16.
    """

    def __init__(self, files: list[Path], s: Settings, runtime: Runtime, file_index: int = 0, position: int = 0):
        self.files, self.runtime, self.vocab_size = files, runtime, s.vocab_size
        self.seq_len, self.step_tokens = s.train_seq_len, s.train_batch_tokens
        self.file_index, self.position, self.micro_step = file_index, position, 0
        self.pin_memory = runtime.device.type == "cuda"
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self.tokens = load_shard(files[file_index], self.vocab_size, self.pin_memory)
        self.next_tokens = self._read_ahead()

    def _read_ahead(self) -> Future:
        next_file = self.files[(self.file_index + 1) % len(self.files)]
        return self.reader.submit(load_shard, next_file, self.vocab_size, self.pin_memory)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        runtime = self.runtime
        if self.micro_step == 0 and self.position + self.step_tokens + 1 >= self.tokens.numel():
            self.file_index, self.position = (self.file_index + 1) % len(self.files), 0
            self.tokens = self.next_tokens.result()
            self.next_tokens = self._read_ahead()
        start = self.position + (self.micro_step * runtime.world_size + runtime.rank) * self.seq_len
        window = self.tokens[start:start + self.seq_len + 1].to(runtime.device, non_blocking=True)  # (T+1,) uint16
        self.micro_step += 1
        if self.micro_step == runtime.grad_accum_steps:
            self.micro_step, self.position = 0, self.position + self.step_tokens
        return window[:-1].to(torch.int32), window[1:].to(torch.int64)


def load_val_tokens(files: list[Path], s: Settings) -> Tensor:
    """The first val_tokens + 1 tokens (int32) of the concatenated validation files (+1 for the last target)."""
    needed = s.val_tokens + 1
    parts, have = [], 0
    for path in files:
        if have >= needed:
            break
        parts.append(load_shard(path, s.vocab_size)[:needed - have])
        have += parts[-1].numel()
    if have < needed:
        raise DataError(f"--val_files={s.val_files!r} hold {have} tokens, fewer than --val_tokens={s.val_tokens} "
                        "+ 1; lower --val_tokens (a multiple of --val_seq_len) or add validation data")
    return torch.cat(parts).to(torch.int32)


# ----------------------------------------------------------------------------------------------------
# 8. Training loop, logs, stop signals and checkpoints


GRADIENT_BUCKET_BYTES = 32 * 2**20  # all-reduce granularity: large enough for bandwidth, small enough to start early


class GradientReducer:
    """Turns the summed gradients of A micro-steps on W ranks into their mean: grad <- sum / (A * W).

    Each micro-step backpropagates its own undivided mean loss, so every backward (the FP8 head's e5m2
    cast in particular) sees the magnitudes of a run with one micro-step per rank; the accumulated
    gradients are divided by A once, here (exact when A is a power of two, as at 1, 2, 4, 8 ranks).

    With W > 1 ranks the parameters form buckets of one dtype, in reverse model order (about the order
    backward finishes them). During the last micro-step's backward, post-accumulate-grad hooks count the
    finished gradients; when a bucket's last one is final, its gradients are divided by A into one flat
    buffer, which is all-reduced (average over ranks) asynchronously while backward goes on. finish()
    waits for every bucket and points each .grad at its slice of the reduced buffer. The hooks fire when a
    parameter's autograd node has run: compile_model compiles the training forward by region so that
    backward has a node per region (as one compiled graph, every hook would fire after all of backward).
    """

    def __init__(self, params, runtime: Runtime, bucket_bytes: int = GRADIENT_BUCKET_BYTES):
        self.world_size, self.accum_steps = runtime.world_size, runtime.grad_accum_steps
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[Tensor]] = []
        self.bucket_of: dict[Tensor, int] = {}
        self.ready_counts: list[int] = []
        self.pending = []  # (all-reduce handle, flat reduced buffer, its parameters)
        self.last_micro_step = False
        if self.world_size == 1:
            return
        open_bucket: dict[torch.dtype, tuple[int, int]] = {}  # dtype -> (bucket index, bytes so far)
        for param in reversed(self.params):
            index, size = open_bucket.get(param.dtype, (-1, bucket_bytes))
            if size + param.numel() * param.element_size() > bucket_bytes:
                index, size = len(self.buckets), 0
                self.buckets.append([])
            self.buckets[index].append(param)
            self.bucket_of[param] = index
            open_bucket[param.dtype] = (index, size + param.numel() * param.element_size())
            param.register_post_accumulate_grad_hook(self._gradient_ready)
        self.ready_counts = [0] * len(self.buckets)

    def start_last_micro_step(self):
        """Arms the hooks: the next backward completes the gradients."""
        self.last_micro_step = True

    def _gradient_ready(self, param: Tensor):
        if not self.last_micro_step:
            return
        index = self.bucket_of[param]
        self.ready_counts[index] += 1
        if self.ready_counts[index] == len(self.buckets[index]):
            self._launch(self.buckets[index])

    def _launch(self, params: list[Tensor]):
        flat = params[0].new_empty(sum(p.numel() for p in params))
        offset = 0
        for param in params:
            torch.div(param.grad, self.accum_steps, out=flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        self.pending.append((dist.all_reduce(flat, op=dist.ReduceOp.AVG, async_op=True), flat, params))

    def finish(self):
        """Waits for the reductions; afterwards every .grad holds the mean over micro-steps and ranks."""
        self.last_micro_step = False
        if self.world_size == 1:
            if self.accum_steps > 1:
                torch._foreach_div_([p.grad for p in self.params], self.accum_steps)
            return
        if len(self.pending) != len(self.buckets):
            missing = [i for i, count in enumerate(self.ready_counts) if count < len(self.buckets[i])]
            raise RuntimeError(f"gradient buckets {missing} never completed: a parameter got no gradient")
        for handle, flat, params in self.pending:
            handle.wait()
            offset = 0
            for param in params:
                param.grad = flat[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
        self.pending, self.ready_counts = [], [0] * len(self.buckets)


def accumulate_gradients(model: nn.Module, reducer: GradientReducer, batches, window_blocks: Tensor,
                         accum_steps: int) -> Tensor:
    """Forward and backward of accum_steps micro-batches, each on its own (undivided) mean loss, then the
    reduction; returns this rank's mean loss (a device tensor: no sync)."""
    losses = []
    for micro_step in range(accum_steps):
        if micro_step == accum_steps - 1:
            reducer.start_last_micro_step()
        inputs, targets = next(batches)
        loss = model(inputs, targets, window_blocks)
        loss.backward()
        losses.append(loss.detach())
    reducer.finish()
    return losses[0] if accum_steps == 1 else torch.stack(losses).mean()


def train_step(model: nn.Module, optimizers, reducer: GradientReducer, batches, step: int, s: Settings,
               runtime: Runtime) -> Tensor:
    """One optimizer step over grad_accum_steps micro-batches; returns this rank's mean loss (no sync)."""
    window_blocks = window_blocks_tensor(step, s, runtime.device)
    loss = accumulate_gradients(model, reducer, batches, window_blocks, runtime.grad_accum_steps)
    factor = lr_factor(step, s)
    muon = optimizers[0]
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step, s)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def validation_loss(model: nn.Module, val_tokens: Tensor, step: int, s: Settings, runtime: Runtime) -> float:
    """Mean loss over exactly val_tokens tokens: sequence i goes to rank i % W; sums are all-reduced."""
    model.eval()
    window_blocks = window_blocks_tensor(step, s, runtime.device)
    num_sequences = s.val_tokens // s.val_seq_len
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for i in range(runtime.rank, num_sequences, runtime.world_size):
        window = val_tokens[i * s.val_seq_len:(i + 1) * s.val_seq_len + 1].to(runtime.device, non_blocking=True)
        loss_sum += model(window[:-1], window[1:].long(), window_blocks).double()
    if runtime.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    model.train()
    return loss_sum.item() / num_sequences


def warm_up_kernels(model: nn.Module, optimizers, reducer: GradientReducer, s: Settings, runtime: Runtime,
                    console: "Console"):
    """Compiles and warms kernels on random tokens, then restores the initial model and optimizer state,
    so the timed run starts from exactly the same point as an unwarmed one."""
    if s.warmup_steps == 0:
        return
    initial_state = copy.deepcopy(dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers]))
    generator = torch.Generator().manual_seed(1234 + runtime.rank)

    def random_batches():
        while True:
            tokens = torch.randint(0, s.vocab_size, (s.train_seq_len + 1,), generator=generator)
            tokens = tokens.to(runtime.device, dtype=torch.int32)
            yield tokens[:-1], tokens[1:].long()

    batches = random_batches()
    for step in range(s.warmup_steps):
        what = "compiling the model" if step == 0 and s.compile else "running kernels"
        with console.activity(f"warmup step {step + 1}/{s.warmup_steps} on random tokens ({what})"):
            train_step(model, optimizers, reducer, batches, step, s, runtime)
            runtime.synchronize()
    model.load_state_dict(initial_state["model"])
    for optimizer, state in zip(optimizers, initial_state["optimizers"]):
        optimizer.load_state_dict(state)


class Console:
    """Rank 0's progress messages on stdout. They never go into the log file, which keeps the record format."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def say(self, text: str):
        if self.enabled:
            print(text, flush=True)

    @contextlib.contextmanager
    def activity(self, text: str, every_s: float = 15.0):
        """Says text, then the elapsed time every every_s seconds while the block runs, then its duration."""
        if not self.enabled:
            yield
            return
        self.say(f"{text} ...")
        started, done = time.perf_counter(), threading.Event()

        def tick():
            while not done.wait(every_s):
                self.say(f"  ... {text}: {time.perf_counter() - started:.0f} s so far")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        self.say(f"{text}: done in {time.perf_counter() - started:.1f} s")


def progress_note(step: int, s: Settings, session_start_step: int, session_start_ms: float, now_ms: float) -> str:
    """' | 9.8 steps/s, ETA 0:02:48' for the console, from this session's steps and training time."""
    if step == session_start_step or now_ms <= session_start_ms:
        return ""
    steps_per_s = (step - session_start_step) / ((now_ms - session_start_ms) / 1000)
    eta_s = round((s.num_iterations - step) / steps_per_s)
    return f" | {steps_per_s:.2f} steps/s, ETA {eta_s // 3600}:{eta_s // 60 % 60:02d}:{eta_s % 60:02d}"


class RunLog:
    """Rank 0's log file in the record format. The header is written atomically; each line is then
    appended and flushed, and fsynced at validation lines and at the end, so a crash loses nothing
    the OS has accepted. A resumed run cuts the log back to the length its checkpoint recorded (lines
    of steps that will be redone go) and appends to it."""

    SEPARATOR = "=" * 100

    def __init__(self, path: Path | None, header: str, resume_bytes: int | None = None):
        self.path, self.file, self.dropped_lines = path, None, 0
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.restarted = resume_bytes is not None and not (path.exists() and path.stat().st_size >= resume_bytes)
            if resume_bytes is not None and not self.restarted:
                with open(path, "r+b") as f:
                    f.seek(resume_bytes)
                    self.dropped_lines = f.read().count(b"\n")
                    f.truncate(resume_bytes)
                    os.fsync(f.fileno())
            else:
                write_file_atomically(path, [header.encode()])
            self.file = open(path, "a")
        except OSError as error:
            raise SettingsError(log_dir_problem(path.parent, error)) from None

    def line(self, text: str, durable: bool = False, console_note: str = ""):
        if self.path is None:
            return
        print(text + console_note, flush=True)
        self.file.write(text + "\n")
        self.file.flush()
        if durable:
            os.fsync(self.file.fileno())

    def bytes_written(self) -> int:
        """The log's length, made durable first (a checkpoint records it)."""
        if self.file is None:
            return 0
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self):
        if self.file is not None:
            os.fsync(self.file.fileno())
            self.file.close()


class MetricsFile:
    """<log_dir>/<run_id>.metrics.jsonl (rank 0): a JSON object per training step (step, train_loss,
    lr_factor, train_time_ms, tokens) and per validation (step, val_loss, train_time_ms, tokens).

    Train losses reach the host without a sync: each step's loss is copied to pinned memory behind a
    CUDA event, and its line is written once the event has passed (at once on CPU; every pending line
    at validations, checkpoints and the end, where the device is synchronised anyway)."""

    def __init__(self, path: Path | None, resume_bytes: int | None = None):
        self.file, self.pending = None, collections.deque()  # pending: (record, host loss, event or None)
        if path is None:
            return
        if resume_bytes is not None and path.exists() and path.stat().st_size >= resume_bytes:
            os.truncate(path, resume_bytes)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")

    def train_step(self, record: dict, loss: Tensor):
        if self.file is None:
            return
        if loss.is_cuda:
            host_loss = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host_loss.copy_(loss.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host_loss, event = loss.detach(), None
        self.pending.append((record, host_loss, event))
        self.write_ready(wait=False)

    def write_ready(self, wait: bool):
        while self.pending and (wait or self.pending[0][2] is None or self.pending[0][2].query()):
            record, host_loss, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            self._write(dict(record, train_loss=host_loss.item()))

    def validation(self, record: dict):
        if self.file is not None:
            self.write_ready(wait=True)
            self._write(record)

    def _write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def bytes_written(self) -> int:
        """The file's length with every pending line written, made durable first."""
        if self.file is None:
            return 0
        self.write_ready(wait=True)
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self):
        if self.file is not None:
            self.write_ready(wait=True)
            os.fsync(self.file.fileno())
            self.file.close()


class TrainingClock:
    """Training time in ms: runs during training steps and stops for validation and checkpoints (after
    a device sync, so queued work is counted). read_ms() while running does not sync."""

    def __init__(self, runtime: Runtime, total_ms: float = 0.0):
        self.runtime, self.total_ms, self.started = runtime, total_ms, None

    def start(self):
        self.runtime.synchronize()
        self.started = time.perf_counter()

    def stop(self):
        self.runtime.synchronize()
        self.total_ms = self.read_ms()
        self.started = None

    def read_ms(self) -> float:
        running = 0.0 if self.started is None else 1000 * (time.perf_counter() - self.started)
        return self.total_ms + running


def environment_report(s: Settings, runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        device = f"{runtime.world_size} x {torch.cuda.get_device_name(runtime.device)}"
    else:
        device = f"{runtime.world_size} x cpu"
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.rstrip()
    except (OSError, subprocess.TimeoutExpired):  # missing, not executable for this user, or hung
        smi = "nvidia-smi: not available"
    overlap = val_train_overlap(s)
    return "\n".join([
        f"Running Python {sys.version}",
        f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}",
        f"Device: {device}",
        f"Settings: {json.dumps(dataclasses.asdict(s))}",
        *([f"Warning: {overlap} (allowed by --allow_val_in_train=true)"] if overlap else []),
        *(f"Start-up: {notice}" for notice in runtime.notices),
        smi or "nvidia-smi: not available",
    ])


def peak_memory_line(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(runtime.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(runtime.device) // 2**20
    else:  # CPU: the process's peak resident set size stands for both
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB"


# Stop signals. SIGINT (Ctrl-C) and SIGTERM (preemption; torchrun forwards both to every rank) before
# training starts end the setup at once; during training they let the current step finish, the ranks
# agree on the step to stop at, a checkpoint and a last log line are written, and the process exits with
# STOPPED_EXIT_CODE. A second signal exits at once with 128 + the signal number.

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early and cleanly; run again with --resume=auto to continue


class RunInterrupted(BaseException):
    """A stop signal before training started (a BaseException like KeyboardInterrupt, so that library
    code catching Exception does not swallow it)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignals:
    """Installs the SIGINT/SIGTERM handlers while in a `with` block; `received` names the first signal."""

    def __init__(self):
        self.received: str | None = None
        self.training = False  # before training: raise RunInterrupted; during: only set `received`
        self.announce = True  # rank 0 says what happens; the other ranks stay quiet
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exception):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"{name} again: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = name
        if not self.training:
            raise RunInterrupted(name)
        if self.announce:
            print(f"{name}: finishing the current step, then saving and stopping (send it again to exit at once)",
                  file=sys.stderr, flush=True)


class StopAgreement:
    """All ranks stop after the same step, without a GPU sync: after every step each rank puts its stop
    flag into an async MAX all-reduce on a CPU (gloo) group and reads the result one step later, so a
    signal that reaches any rank stops every rank after the same step (one step later than on one rank).
    The gloo group also carries the checkpoint's gather of Muon momentum buffers."""

    def __init__(self, signals: StopSignals, runtime: Runtime):
        self.signals, self.pending = signals, None
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.group = dist.new_group(backend="gloo") if runtime.world_size > 1 else None

    def should_stop(self) -> bool:
        if self.group is None:
            return self.signals.received is not None
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            if self.flag.item():
                return True
        self.flag.fill_(int(self.signals.received is not None))
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return False

    def close(self):
        if self.pending is not None:
            self.pending.wait()


# Checkpoints. A file is CHECKPOINT_MAGIC, the payload's length (8 bytes, little-endian) and SHA-256
# (32 bytes), then the payload: a torch.save dict, loadable with weights_only=True. It holds everything
# a continuation needs, independent of the world size (Muon momentum is gathered from its owners).

CHECKPOINT_MAGIC = b"train_gpt ckpt1\n"
CHECKPOINT_PREFIX_BYTES = len(CHECKPOINT_MAGIC) + 8 + 32
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})\.pt")
# Settings that do not change the training (the memory savers recompute the same mathematics), so a
# resumed run may change them; any other difference is refused.
SETTINGS_FREE_ON_RESUME = ("device", "attention_backend", "compile", "warmup_steps", "val_every", "log_dir",
                           "run_id", "checkpoint_every", "checkpoint_keep", "resume", "save_checkpoint",
                           "save_safetensors", "preset", "check_only", "allow_val_in_train", "checkpoint_blocks",
                           "loss_chunk_tokens", "memory")


class CheckpointError(DataError):
    """A checkpoint that is not one, is truncated or corrupt, or cannot continue this run."""


def write_file_atomically(path: Path, chunks):
    """Writes a temporary file, fsyncs it, renames it over path and fsyncs the folder: a crash leaves
    either the old file or the complete new one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# Checks before anything is built. main() runs them on every rank (their results agree, so all ranks
# stop together); with --check_only=true, run.sh runs them once before it launches torchrun.

GIB = 2**30


def estimate_memory(s: Settings, runtime: Runtime) -> dict[str, tuple[int, str]]:
    """A lower bound of one rank's peak memory in bytes, by part, each with the setting that sizes it.
    Counted: weights, gradients and optimizer state; activations of one training micro-step (~16
    model_dim-wide values a token and block, the saved tensors of attention and MLP); the fp32 logits
    of one micro-step (3 copies on CPU/eager: logits, capped logits, their gradient; the bf16 head
    output when compiled on CUDA); and the dense attention masks of the SDPA path (a bool mask per
    window kind and the float copy SDPA makes of it), in training and in evaluation."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in GPT(s, runtime.attention_backend).parameters())
    value_bytes = torch.finfo(runtime.compute_dtype).bits // 8
    vocab = padded_vocab_size(s.vocab_size)
    compiled_gpu = runtime.device.type == "cuda" and s.compile
    logits_per_token = vocab * (value_bytes if compiled_gpu else 4 * 3)
    # Checkpointed blocks keep no activations, but backward recomputes one of them at a time.
    stored_blocks = s.num_layers - runtime.savers.checkpoint_blocks + min(runtime.savers.checkpoint_blocks, 1)
    logits_tokens = min(runtime.savers.loss_chunk_tokens or s.train_seq_len, s.train_seq_len)
    parts = {
        "weights and optimizer state": (16 * num_params, "--model_dim / --num_layers"),
        "activations of one micro-step": (16 * s.model_dim * stored_blocks * s.train_seq_len * value_bytes,
                                          "--train_seq_len"),
        "logits of one micro-step": (logits_tokens * logits_per_token, "--train_seq_len"),
        "evaluation logits": (min(s.val_seq_len, EVAL_LOGITS_CHUNK) * vocab * 4, "--val_seq_len"),
    }
    if runtime.attention_backend == "sdpa":
        kinds = len(set(s.attention_layout) - {"-"})
        parts["dense attention masks (training)"] = ((kinds + 4) * s.train_seq_len**2, "--train_seq_len")
        parts["dense attention masks (evaluation)"] = ((kinds + 4) * s.val_seq_len**2, "--val_seq_len")
    return parts


def available_memory(runtime: Runtime) -> int:
    """Bytes one rank may use: the GPU's memory, or the machine's available memory shared by its ranks."""
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_properties(runtime.device).total_memory
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))


def check_memory(s: Settings, runtime: Runtime):
    parts = estimate_memory(s, runtime)
    train_parts = [name for name in parts if "evaluation" not in name]
    eval_parts = ["weights and optimizer state"] + [name for name in parts if "evaluation" in name]
    needed = max(sum(parts[name][0] for name in names) for names in (train_parts, eval_parts))
    available = available_memory(runtime)
    if needed <= available:
        return
    largest = max(parts, key=lambda name: parts[name][0])
    size, setting_name = parts[largest]
    advice = f"lower {setting_name}"
    if runtime.device.type == "cpu" and s.preset != "tiny":
        advice = ("these are GPU-sized settings: on CPU use the tiny preset, e.g. `python data/cached_fineweb10B.py 1 "
                  "&& python train_gpt.py --preset=tiny`")
    raise SettingsError(
        f"these settings need at least {needed / GIB:.1f} GiB per rank on {runtime.device.type} but "
        f"{available / GIB:.1f} GiB is available (largest part: {largest}, {size / GIB:.1f} GiB); {advice}")


def file_fingerprint(path: Path) -> str:
    """sha256 of the header and first MiB: equal for copies of one shard, different for distinct shards."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SHARD_HEADER_BYTES + 2**20)).hexdigest()


def val_train_overlap(s: Settings) -> str | None:
    """Names a validation file that is also a training file (same path or same content), else None."""
    try:
        train_files, val_files = find_shards(s.train_files, "train_files"), find_shards(s.val_files, "val_files")
        train_by_path = {path.resolve(): path for path in train_files}
        for val in val_files:
            if val.resolve() in train_by_path:
                return f"validation file {val} is also a training file"
        train_by_print = {file_fingerprint(path): path for path in train_files}
        for val in val_files:
            twin = train_by_print.get(file_fingerprint(val))
            if twin is not None:
                return f"validation file {val} has the same content as training file {twin}"
    except (DataError, OSError):  # missing or unreadable files are reported by the data checks
        return None
    return None


def check_data(s: Settings, is_main: bool = True) -> tuple[list[Path], list[Path], int, Tensor]:
    """Training files (headers), validation tokens (range-checked) and their overlap, before anything is
    built; rank 0 (is_main) prints the warning. Returns (train files, val files, usable training tokens,
    validation tokens)."""
    train_files = find_shards(s.train_files, "train_files")
    val_files = find_shards(s.val_files, "val_files")
    usable_train_tokens = check_train_files(train_files, s.train_batch_tokens)
    val_tokens = load_val_tokens(val_files, s)
    overlap = val_train_overlap(s)
    if overlap and not s.allow_val_in_train:
        raise DataError(f"{overlap}, so the validation loss would measure memorisation; use separate files, "
                        "or --allow_val_in_train=true to run anyway")
    if overlap and is_main:
        print(f"warning: {overlap}; the validation loss measures memorisation", file=sys.stderr, flush=True)
    return train_files, val_files, usable_train_tokens, val_tokens


def log_dir_problem(log_dir: Path, error: OSError) -> str:
    if isinstance(error, FileExistsError) or (log_dir.exists() and not log_dir.is_dir()):
        problem = "is a file, not a folder"
    elif error.errno == errno.ENOSPC:
        problem = "is on a full disk"
    else:
        problem = f"cannot be written ({error.strerror or error})"
    return f"--log_dir={log_dir}: the log folder {problem}; choose another --log_dir"


def check_log_dir(s: Settings):
    """Writes, fsyncs and deletes a 64 KiB file in the log folder, so an unwritable folder, a file in its
    place or a full disk stop the run before it starts. Folders it had to create are removed again."""
    log_dir = Path(s.log_dir)
    created = [folder for folder in [log_dir, *log_dir.parents] if not folder.exists()]
    probe = log_dir / f".write_check_{os.getpid()}.tmp"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(64 * 1024))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise SettingsError(log_dir_problem(log_dir, error)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
            for folder in created:  # deepest first
                folder.rmdir()


def check_log_dir_on_rank0(s: Settings, runtime: Runtime):
    """Rank 0 checks the folder it will log to; all ranks stop together if it fails."""
    problem = None
    if runtime.is_main:
        try:
            check_log_dir(s)
        except SettingsError as error:
            problem = error
    if runtime.world_size > 1:
        failed = torch.tensor(int(problem is not None), device=runtime.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and problem is None:
            problem = SettingsError("rank 0 cannot write its log folder")  # rank 0 prints the reason
    if problem is not None:
        raise problem


def preflight(s: Settings, runtime: Runtime):
    """--check_only=true: everything train() checks before it builds the model, plus the token range of
    every training shard (a run meets them only when it reaches them), in one process."""
    train_files, _, usable_train_tokens, _ = check_data(s)
    for path in train_files:
        num_tokens = read_shard_header(path)
        try:
            tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))
        except OSError as error:
            raise unreadable(path, error) from None
        check_token_range(tokens, s.vocab_size, path)
    check_log_dir(s)
    print(f"checked: settings, memory, {len(train_files)} training file(s) ({usable_train_tokens} usable tokens), "
          f"validation data and --log_dir={s.log_dir}", flush=True)


# A run whose loss is not finite stops. Reading the loss every step would make the host wait for the
# device every step, so each step only records the first bad step on the device, and the host reads
# that every LOSS_CHECK_EVERY steps and at each validation (one sync and one all-reduce of an int).

LOSS_CHECK_EVERY = 10
NO_BAD_STEP = 2**62


class RunDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def nonfinite_loss_message(step: int, kind: str, last_checkpoint: Path | None = None) -> str:
    saved = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint is not None else ""
    return (f"the {kind} loss is not finite (nan or inf) at step {step}: the run diverged and was stopped; "
            f"lower the learning rates (--muon_lr, --embed_lr, --head_lr, --scalar_lr) or check the data{saved}")


class NonFiniteLossWatch:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=runtime.device)

    def record(self, loss: Tensor, step: int):
        """Remembers step if loss is not finite; no host sync."""
        bad_step = torch.where(torch.isfinite(loss), NO_BAD_STEP, step)
        torch.minimum(self.first_bad_step, bad_step, out=self.first_bad_step)

    def check(self, log: "RunLog", last_checkpoint: Path | None):
        """Stops the run (on every rank) if any rank recorded a non-finite loss."""
        if self.runtime.world_size > 1:
            dist.all_reduce(self.first_bad_step, op=dist.ReduceOp.MIN)
        first_bad_step = int(self.first_bad_step.item())
        if first_bad_step != NO_BAD_STEP:
            message = nonfinite_loss_message(first_bad_step, "training", last_checkpoint)
            log.line(f"stopped: {message}", durable=True)
            raise RunDiverged(message)


def write_checkpoint(path: Path, state: dict):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    prefix = CHECKPOINT_MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest()
    write_file_atomically(path, [prefix, payload])


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, on CPU; CheckpointError says why a file is not a whole, intact checkpoint."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    if not data.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"{path}: not a train_gpt.py checkpoint (bad magic bytes)")
    declared = int.from_bytes(data[len(CHECKPOINT_MAGIC):len(CHECKPOINT_MAGIC) + 8], "little")
    payload = memoryview(data)[CHECKPOINT_PREFIX_BYTES:]
    if len(payload) != declared:
        raise CheckpointError(f"{path}: truncated or padded checkpoint ({len(payload)} payload bytes, "
                              f"the header says {declared})")
    if hashlib.sha256(payload).digest() != data[CHECKPOINT_PREFIX_BYTES - 32:CHECKPOINT_PREFIX_BYTES]:
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 of the contents does not match its header)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def checkpoint_paths(folder: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := CHECKPOINT_NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def to_cpu(value):
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def source_sha256() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def find_resume_checkpoint(s: Settings, folder: Path, console: Console) -> tuple[Path, dict] | None:
    """--resume=PATH: that checkpoint. --resume=auto: the newest valid one in folder (saying which it
    skips), or None when there is none yet; it refuses when checkpoints exist but none is valid."""
    if s.resume != "auto":
        path = Path(s.resume)
        return path, read_checkpoint(path)
    candidates = checkpoint_paths(folder)
    for path in reversed(candidates):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            console.say(f"--resume=auto: skipping {error}; falling back to the previous checkpoint")
    if candidates:
        raise CheckpointError(f"--resume=auto: none of the {len(candidates)} checkpoints in {folder} is valid "
                              "(see above); delete them to start the run afresh")
    console.say(f"--resume=auto: no checkpoint in {folder} yet: starting the run from step 0")
    return None


def check_resumable(path: Path, checkpoint: dict, s: Settings):
    saved, current = checkpoint["settings"], dataclasses.asdict(s)
    differing = [f"{name} (checkpoint {saved.get(name)!r}, now {value!r})" for name, value in current.items()
                 if name not in SETTINGS_FREE_ON_RESUME and saved.get(name, value) != value]
    if differing:
        raise CheckpointError(f"cannot resume from {path}: these settings differ from the run's: "
                              f"{', '.join(differing)}; resume with the settings the run started with")
    if checkpoint["finished"]:
        raise CheckpointError(f"{path} is the final checkpoint of a finished run (step {checkpoint['step']}/"
                              f"{s.num_iterations}): there is nothing to resume")


class Checkpoints:
    """The run's checkpoints in <log_dir>/<run_id>/step_NNNNNN.pt, the newest checkpoint_keep kept."""

    def __init__(self, folder: Path, s: Settings, runtime: Runtime, run_id: str, raw_model: nn.Module,
                 optimizers, group):
        self.folder, self.s, self.runtime, self.run_id = folder, s, runtime, run_id
        self.raw_model, self.optimizers, self.group = raw_model, optimizers, group
        self.names = {param: name for name, param in raw_model.named_parameters()}
        self.last_path: Path | None = None

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.pt"

    def gather_muon_momentum(self) -> dict[str, Tensor] | None:
        """Every Muon momentum buffer by parameter name on rank 0 (None elsewhere); each rank holds
        those of the matrices it owns."""
        muon, runtime = self.optimizers[0], self.runtime
        own = {self.names[param]: muon.state[param]["momentum_buffer"].cpu()
               for param in muon.owned_parameters(runtime.rank, runtime.world_size)
               if "momentum_buffer" in muon.state[param]}
        if runtime.world_size == 1:
            return own
        parts = [None] * runtime.world_size if runtime.is_main else None
        dist.gather_object(own, parts, dst=0, group=self.group)
        return {name: buffer for part in parts for name, buffer in part.items()} if runtime.is_main else None

    def save(self, step: int, finished: bool, training_time_ms: float, loader: TrainLoader, log: RunLog,
             metrics: MetricsFile) -> Path:
        """Collective: every rank calls it; rank 0 writes the file."""
        momentum = self.gather_muon_momentum()
        path = self.path_for(step)
        if self.runtime.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = dict(
                step=step, finished=finished, training_time_ms=training_time_ms, run_id=self.run_id,
                settings=dataclasses.asdict(self.s), source_sha256=source_sha256(),
                world_size=self.runtime.world_size, model=to_cpu(self.raw_model.state_dict()),
                adam=to_cpu(self.optimizers[1].state_dict()), muon_momentum=momentum,
                data=dict(file_index=loader.file_index, position=loader.position),
                # the trainer draws random numbers from torch only (and from its own seeded generators)
                rng=dict(torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state(self.runtime.device) if self.runtime.device.type == "cuda"
                         else None),
                log_bytes=log.bytes_written(), metrics_bytes=metrics.bytes_written(),
            )
            write_checkpoint(path, state)
            for old in checkpoint_paths(self.folder)[:-self.s.checkpoint_keep]:
                old.unlink()
        self.last_path = path
        return path

    def restore(self, checkpoint: dict):
        muon, adam = self.optimizers
        self.raw_model.load_state_dict(checkpoint["model"])
        adam.load_state_dict(checkpoint["adam"])
        muon.state.clear()
        for param in muon.owned_parameters(self.runtime.rank, self.runtime.world_size):
            buffer = checkpoint["muon_momentum"].get(self.names[param])
            if buffer is not None:
                muon.state[param]["momentum_buffer"] = buffer.to(param.device, param.dtype)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.runtime.device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.runtime.device)


def export_safetensors(raw_model: nn.Module, s: Settings, path: Path):
    """The weights alone as safetensors, the settings as JSON metadata, for other tools."""
    from safetensors.torch import save  # imported here: only this export needs the package

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in raw_model.state_dict().items()}
    metadata = {"settings": json.dumps(dataclasses.asdict(s)), "source_sha256": source_sha256()}
    write_file_atomically(path, [save(tensors, metadata=metadata)])


def train(s: Settings, runtime: Runtime, signals: StopSignals | None = None) -> str | None:
    """Runs the training, or continues it with --resume. Returns None when it ran to the end, or the
    name of the signal that stopped it early (after a checkpoint, when checkpoints are on)."""
    if runtime.grad_accum_steps * runtime.world_size * s.train_seq_len != s.train_batch_tokens:
        raise ValueError("runtime was resolved for other settings: call resolve_runtime with these settings")
    signals = signals or StopSignals()
    signals.announce = runtime.is_main
    console = Console(runtime.is_main)
    if s.resume == "auto" and not s.run_id:
        raise SettingsError("--resume=auto needs --run_id=NAME: the run whose newest checkpoint to continue")
    with console.activity("checking the data and loading the validation tokens"):
        train_files, val_files, usable_train_tokens, val_tokens = check_data(s, runtime.is_main)

    resumed = None
    run_id = s.run_id
    if s.resume:
        resumed = find_resume_checkpoint(s, Path(s.log_dir) / s.run_id, console)
        if resumed is not None:
            check_resumable(*resumed, s)
            run_id = run_id or resumed[1]["run_id"]
    run_id = run_id or str(uuid.uuid4())
    checkpoint = resumed[1] if resumed is not None else None

    with console.activity("building the model and optimizers"):
        raw_model = build_model(s, runtime)
        eval_model = compile_model(raw_model) if s.compile else raw_model
        optimizers = build_optimizers(raw_model, s, runtime)
        reducer = GradientReducer(raw_model.parameters(), runtime)

    log_path = Path(s.log_dir) / f"{run_id}.txt"
    header = "\n".join([Path(__file__).read_text().rstrip("\n"), RunLog.SEPARATOR,
                        environment_report(s, runtime), RunLog.SEPARATOR, ""])
    log = RunLog(log_path if runtime.is_main else None, header,
                 resume_bytes=checkpoint["log_bytes"] if checkpoint else None)
    metrics = MetricsFile(log_path.with_suffix(".metrics.jsonl") if runtime.is_main else None,
                          resume_bytes=checkpoint["metrics_bytes"] if checkpoint else None)
    console.say(f"logging to {log_path}; {runtime.world_size} rank(s) x {runtime.grad_accum_steps} micro-step(s) "
                f"of {s.train_seq_len} tokens on {runtime.device.type}")
    needed = s.num_iterations * s.train_batch_tokens
    if needed > usable_train_tokens:
        console.say(f"note: the run needs {needed} training tokens but the files hold {usable_train_tokens}: "
                    "the data will be repeated")

    try:
        warm_up_kernels(raw_model, optimizers, reducer, s, runtime, console)
    except RunInterrupted as interrupted:
        log.line(f"stopped by {interrupted.signal_name} during the warmup, before training started", durable=True)
        raise
    agreement = StopAgreement(signals, runtime)
    loss_watch = NonFiniteLossWatch(runtime)
    checkpoints = Checkpoints(Path(s.log_dir) / run_id, s, runtime, run_id, raw_model, optimizers, agreement.group)
    start_step, clock, data_position = 0, TrainingClock(runtime), (0, 0)
    if checkpoint is not None:
        path = resumed[0]
        with console.activity(f"restoring step {checkpoint['step']} from {path}"):
            checkpoints.restore(checkpoint)
        start_step, clock.total_ms = checkpoint["step"], checkpoint["training_time_ms"]
        data_position = (checkpoint["data"]["file_index"], checkpoint["data"]["position"])
        checkpoints.last_path = path
        notes = [f"written by {checkpoint['world_size']} rank(s)"]
        if log.dropped_lines:
            notes.append(f"{log.dropped_lines} log lines after the checkpoint dropped (steps to redo)")
        if log.path is not None and log.restarted:
            notes.append("the earlier log was missing or shorter than the checkpoint says: new log")
        if checkpoint["source_sha256"] != source_sha256():
            notes.append("train_gpt.py has changed since (the header above holds the old source)")
        log.line(f"resumed at step {start_step}/{s.num_iterations} from {path} on {runtime.world_size} rank(s): "
                 f"{'; '.join(notes)}", durable=True)
    loader = TrainLoader(train_files, s, runtime, *data_position)

    signals.training = True
    stopped_by = None
    session_start_ms = clock.total_ms  # steps/s and the ETA count this session's steps only
    clock.start()
    for step in range(start_step, s.num_iterations + 1):
        last_step = step == s.num_iterations
        if last_step or (s.val_every and step % s.val_every == 0):
            clock.stop()  # the clock stops for validation
            metrics.write_ready(wait=True)
            compiling = step == start_step and s.compile
            with console.activity("first validation (compiling the evaluation graph)") if compiling \
                    else contextlib.nullcontext():
                val_loss = validation_loss(eval_model, val_tokens, step, s, runtime)
            log.line(f"step:{step}/{s.num_iterations} val_loss:{val_loss:.4f} train_time:{clock.total_ms:.0f}ms "
                     f"step_avg:{clock.total_ms / max(step, 1):.2f}ms", durable=True)
            metrics.validation(dict(step=step, val_loss=val_loss, train_time_ms=clock.total_ms,
                                    tokens=step * s.train_batch_tokens))
            if not math.isfinite(val_loss):
                message = nonfinite_loss_message(step, "validation", checkpoints.last_path)
                log.line(f"stopped: {message}", durable=True)
                raise RunDiverged(message)
            loss_watch.check(log, checkpoints.last_path)
            clock.start()
        if last_step:
            break
        loss = train_step(raw_model, optimizers, reducer, loader, step, s, runtime)
        if runtime.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # queued on the device: no host sync
        loss_watch.record(loss, step + 1)
        elapsed_ms = clock.read_ms()
        metrics.train_step(dict(step=step + 1, lr_factor=lr_factor(step, s), train_time_ms=elapsed_ms,
                                tokens=(step + 1) * s.train_batch_tokens), loss)
        log.line(f"step:{step + 1}/{s.num_iterations} train_time:{elapsed_ms:.0f}ms "
                 f"step_avg:{elapsed_ms / (step + 1):.2f}ms",
                 console_note=progress_note(step + 1, s, start_step, session_start_ms, elapsed_ms))
        if agreement.should_stop():
            clock.stop()
            stopped_by = signals.received or "a signal to another rank"
            saving = s.checkpoint_every > 0 or s.save_checkpoint
            where = f"checkpoint {checkpoints.path_for(step + 1)}; continue with --resume=auto" if saving \
                else "no checkpoint (--checkpoint_every=0)"
            log.line(f"stopped by {stopped_by} after step {step + 1}/{s.num_iterations}: {where}", durable=True)
            if saving:
                loss_watch.check(log, checkpoints.last_path)  # a checkpoint is written only when all is finite
                checkpoints.save(step + 1, False, clock.total_ms, loader, log, metrics)
            break
        if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.num_iterations:
            clock.stop()  # and for checkpoints
            loss_watch.check(log, checkpoints.last_path)
            checkpoints.save(step + 1, False, clock.total_ms, loader, log, metrics)
            clock.start()
        elif (step + 1) % LOSS_CHECK_EVERY == 0:
            loss_watch.check(log, checkpoints.last_path)
    if stopped_by is None:
        log.line(peak_memory_line(runtime), durable=True)
        if s.checkpoint_every or s.save_checkpoint:
            checkpoints.save(s.num_iterations, True, clock.total_ms, loader, log, metrics)
        if s.save_safetensors and runtime.is_main:
            export_safetensors(raw_model, s, checkpoints.folder / "final.safetensors")
    agreement.close()
    metrics.close()
    log.close()
    if runtime.world_size > 1:
        dist.barrier()  # ranks leave together: gloo can abort a rank that tears down while others work
    return stopped_by


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(settings_help())
        return 0
    rank = int(os.environ.get("RANK", 0))
    with StopSignals() as signals:
        try:
            settings = parse_settings(argv)
            runtime = resolve_runtime(settings, rank, int(os.environ.get("WORLD_SIZE", 1)),
                                      int(os.environ.get("LOCAL_RANK", 0)))
            check_memory(settings, runtime)
            if settings.check_only:
                preflight(settings, runtime)
                return 0
            init_distributed(runtime)
            try:
                check_log_dir_on_rank0(settings, runtime)
                stopped_by = train(settings, runtime, signals)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
        except (SettingsError, DataError) as error:
            if rank == 0:
                print(f"error: {error}", file=sys.stderr)
            return 2
        except RunDiverged as error:
            if rank == 0:
                print(f"error: {error}", file=sys.stderr)
            return 3
        except RunInterrupted as interrupted:
            if rank == 0:
                print(f"stopped by {interrupted.signal_name} before training started: nothing to save",
                      file=sys.stderr, flush=True)
            return STOPPED_EXIT_CODE
    if stopped_by is not None:
        if rank == 0:
            print(f"stopped by {stopped_by} (exit status {STOPPED_EXIT_CODE}); see the last log line",
                  file=sys.stderr, flush=True)
        return STOPPED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
