"""GPT-2-small speedrun trainer: the record-89 recipe (public speedrun record 89, 2026-08: 3.28 validation loss
in 1,285 steps, ~339M tokens, 73.8 s on 8xH100) on any number of GPUs, or on CPU for tests.

Launch with torchrun (`./run.sh` does it), or plainly with `python train_gpt.py` for one process; `--help`
lists the settings, `--schedule` prints the table of stages. harness.py starts, checks, logs, stops and saves
the run (and never imports this file). Facts and formulas: the speedrun fact sheets (RECORDS_29_89.md,
section 2). The previous default, record 21, stays runnable under records/track_1_short/2025-02-01_Record21/.

Sections, top to bottom:
  1. Settings and constants     5. Loss and FP8 ops         9. Training step, validation, warm-up
  2. Runtime                    6. Optimizers              10. Checkpoint state
  3. Schedules                  7. Data loading            11. train() and main()
  4. Model                      8. Speed machinery (gradient communication, compilation)
"""

import copy
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

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

import harness
from harness import (FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, DataError, MemorySavers, Range, RunSettings,
                     SettingsError, setting, to_cpu)

RECIPE_FILE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------------
# 1. Settings and constants
# Every setting of the recipe, grouped; free_on_resume marks those a resumed run may change (they do not
# change the mathematics). The harness adds its own (log folder, run id, checkpoints, resume, preset).
# Per-stage settings are comma-separated lists, one entry per stage; windows are short/long in blocks.


@dataclass
class Settings(RunSettings):
    # data
    train_files: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training token shards")
    val_files: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation token shards")
    val_tokens: int = setting(10_485_760, "validation tokens, taken from the start of val_files", POSITIVE)
    val_seq_len: int = setting(262_144, "tokens in one validation sequence (documents split at BOS, no cap)",
                               POSITIVE)
    slots_per_step: int = setting(8, "training buffers per optimizer step; rank r of W takes slots r, r+W, ... "
                                     "(the world size must divide it)", POSITIVE)
    # schedule
    stage_ends: str = setting("423,847,1270", "the step at which each stage ends; the last is the scheduled length")
    extension_steps: int = setting(15, "steps after the last stage, at the LR floor with the extension windows",
                                   NON_NEGATIVE)
    stage_batch_tokens: str = setting("131072,262144,393216", "tokens per optimizer step in each stage, all ranks")
    stage_lr: str = setting("1.0,1.52,1.73", "learning-rate multiplier of each stage")
    stage_max_doc_len: str = setting("896,2048,2048", "training documents are cut into pieces of at most this "
                                                      "many tokens, per stage")
    stage_windows: str = setting("1/3,3/7,5/11", "attention windows short/long in blocks, per stage")
    extension_windows: str = setting("6/13", "attention windows short/long in blocks in the extension")
    final_windows: str = setting("6/20", "attention windows short/long in blocks for the final validation")
    cooldown_frac: float = setting(0.4, "the LR cools down to lr_floor from this fraction of the scheduled steps",
                                   FRACTION)
    lr_floor: float = setting(0.15, "LR multiplier at the end of the cooldown and in the extension", FRACTION)
    split_step: int = setting(847, "the step after whose update the embedding and the LM head are untied",
                              NON_NEGATIVE)
    val_every: int = setting(250, "validate every this many steps (and at the end); 0: only at the end",
                             NON_NEGATIVE, free_on_resume=True)
    warmup: bool = setting(True, "untimed warm-up of every shape the run will see on real data, then state "
                                 "is restored", free_on_resume=True)
    # model
    vocab_size: int = setting(50257, "token vocabulary (GPT-2)", Range(1, 2**16))
    model_dim: int = setting(768, "residual stream width", POSITIVE)
    num_heads: int = setting(6, "attention heads (6: paired attention pairs heads h and h+3)", POSITIVE)
    head_dim: int = setting(128, "width of one attention head (num_heads * head_dim == model_dim)", POSITIVE)
    mlp_hidden: int = setting(3072, "MLP hidden width", POSITIVE)
    block_size: int = setting(128, "attention window block size in tokens", POSITIVE)
    bigram_buckets: int = setting(377_280, "rows of the hashed bigram embedding table", Range(2, 2**31 - 1))
    dc_window: int = setting(112, "keys seen by the dynamically composable attention correction of layer 10",
                             POSITIVE)
    gate_hidden: int = setting(64, "hidden width of the MUDD gate networks", POSITIVE)
    fp8: bool = setting(True, "LM head and MLP matmuls in FP8 during training (evaluation is bf16)")
    # optimizers
    muon_lr: float = setting(0.023, "NorMuon base learning rate (attention and MLP matrices)", NON_NEGATIVE)
    muon_wd: float = setting(1.2, "NorMuon cautious weight decay", NON_NEGATIVE)
    muon_beta2: float = setting(0.9, "NorMuon second-moment decay", MOMENTUM)
    muon_momentum: float = setting(0.95, "NorMuon momentum after the warm-up", MOMENTUM)
    muon_momentum_start: float = setting(0.85, "NorMuon momentum at step 0 and at the end", MOMENTUM)
    muon_momentum_warmup_steps: int = setting(300, "steps over which the momentum rises", NON_NEGATIVE)
    muon_momentum_cooldown_steps: int = setting(50, "final steps over which the momentum falls back",
                                                NON_NEGATIVE)
    adam_lr: float = setting(0.008, "Adam base learning rate (times each parameter's lr_mul)", NON_NEGATIVE)
    adam_wd: float = setting(0.005, "Adam cautious weight decay (times each parameter's wd_mul)", NON_NEGATIVE)
    adam_eps: float = setting(1e-10, "Adam epsilon", POSITIVE)
    seed: int = setting(0, "random seed for the model init and the bigram sign table", Range(0, 2**63 - 1))
    # machinery: where and how the same mathematics is computed
    device: str = setting("auto", "auto (cuda if available), cuda or cpu", free_on_resume=True)
    attention_backend: str = setting("auto", "auto (flex on cuda, explicit on cpu), flex or explicit (dense mask)",
                                     free_on_resume=True)
    compile: bool = setting(True, "torch.compile the model", free_on_resume=True)
    # memory savers: the same mathematics, recomputed in backward instead of kept (README, "Running on other GPUs")
    checkpoint_blocks: int = setting(-1, "recompute the first N of the 11 layers in backward: 0 (none) .. 11 "
                                         "(all); -1: --memory chooses", Range(-1, 11), free_on_resume=True)
    loss_chunk_tokens: int = setting(-1, "training head + loss in chunks of N tokens (a positive multiple of 16), "
                                         "each recomputed in backward; 0: the record's 16,384 (96 on CPU); "
                                         "-1: --memory chooses", Range(-1, 2**31 - 1), free_on_resume=True)
    memory: str = setting("auto", "savers left at -1: auto (on CUDA, the least recomputation whose predicted "
                                  "peak fits this GPU, from the GPU check's table "
                                  "records/benchmarks/memory_table_record89.json) or off (none)", free_on_resume=True)

    @property
    def num_iterations(self) -> int:
        """Optimizer steps of the whole run: the stages, then the extension."""
        return int(self.stage_ends.split(",")[-1]) + self.extension_steps


PRESETS = {
    # Every component of the record at a size a 2-core CPU trains in a minute or two: the same 11 layers,
    # three stages and an extension, the untie, paired heads, key offset, XSA, DC, MUDD, smear, bigram,
    # value-embedding gates, MTP and the prefix loss, FP8 emulated. Widths are the record's / 16, tokens per
    # step / 256 (the 50,304-wide head over every token dominates the CPU time). Eager and without the
    # warm-up: on a CPU, compiling the graphs of every stage takes longer than the whole run.
    "tiny": dict(
        model_dim=48, num_heads=6, head_dim=8, mlp_hidden=192, block_size=8, bigram_buckets=4096,
        dc_window=14, gate_hidden=16, stage_ends="9,17,25", extension_steps=3, split_step=17,
        stage_batch_tokens="512,1024,1536", stage_max_doc_len="112,256,256", val_seq_len=2048,
        val_tokens=8192, val_every=8, muon_momentum_warmup_steps=6, muon_momentum_cooldown_steps=2,
        compile=False, warmup=False,
    ),
}

# The recipe's fixed numbers (those worth tuning are settings above) follow in the sections that use them.
BOS = 50256  # GPT-2's <|endoftext|>: every document starts with it
VOCAB_PAD_MULTIPLE = 128  # the LM head's columns: vocabulary rounded up to this (50257 -> 50304)


def settings_help() -> str:
    return (harness.settings_help(Settings, PRESETS, program=RECIPE_FILE.name)
            + "\n\n--schedule: print the table of stages of these settings and exit")


def parse_settings(argv: list[str]) -> Settings:
    return harness.parse_settings(Settings, PRESETS, argv, check_settings)


def check_settings(s: Settings):
    """The combinations this recipe cannot run (each number's own range is checked by the harness)."""
    def require(condition: bool, message: str):
        if not condition:
            raise SettingsError(message)

    require(s.num_heads * s.head_dim == s.model_dim,
            f"num_heads * head_dim = {s.num_heads * s.head_dim} must equal model_dim = {s.model_dim}")
    require(s.num_heads == 6, f"--num_heads={s.num_heads}: the record's layer structure (paired heads h and h+3, "
                              "gates per head) needs 6")
    require(s.head_dim % 4 == 0, f"--head_dim={s.head_dim}: must be a multiple of 4 (rotary layout)")
    require(s.model_dim >= 12, f"--model_dim={s.model_dim}: the smear gate reads 12 dimensions; choose >= 12")
    require(s.device in ("auto", "cuda", "cpu"), f"--device={s.device}: choose auto, cuda or cpu")
    require(s.attention_backend in ("auto", "flex", "explicit"),
            f"--attention_backend={s.attention_backend}: choose auto, flex or explicit")
    require(s.val_tokens % s.val_seq_len == 0,
            f"--val_tokens={s.val_tokens}: must be a multiple of --val_seq_len={s.val_seq_len}")
    require(s.val_seq_len % s.block_size == 0,
            f"--val_seq_len={s.val_seq_len}: must be a multiple of --block_size={s.block_size}")
    require(s.loss_chunk_tokens in (-1, 0) or (s.loss_chunk_tokens > 0 and s.loss_chunk_tokens % 16 == 0),
            f"--loss_chunk_tokens={s.loss_chunk_tokens}: choose a positive multiple of 16, 0 (the record's "
            "16,384) or -1 (--memory chooses)")
    require(s.memory in ("auto", "off"), f"--memory={s.memory}: choose auto or off")
    check_schedule(s)


# ----------------------------------------------------------------------------------------------------
# 2. Runtime: this process's rank, device and share of a step


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    attention_backend: str  # "flex" or "explicit"
    fp8: bool  # FP8 matmuls in training (emulated on CPU; off on GPUs below compute capability 8.9)
    savers: MemorySavers = MemorySavers()
    notices: tuple[str, ...] = ()  # what the start-up checks found and chose, one line each (printed and logged)
    compile: bool = False  # the network and the loss run compiled (section 8)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        # bf16 on GPUs; on CPU, whose bf16 matmuls are ~3x slower than fp32, the default dtype: fp32 (fp64 in
        # tests that compare world sizes beyond rounding)
        return torch.bfloat16 if self.device.type == "cuda" else torch.get_default_dtype()

    def slots(self, s: Settings) -> range:
        """The training buffers of a step this rank takes, in order: one per micro-step."""
        return range(self.rank, s.slots_per_step, self.world_size)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_runtime(s: Settings, rank: int, world_size: int, local_rank: int) -> Runtime:
    """Checks device, attention backend, FP8 and world size before any process group exists."""
    has_cuda = torch.cuda.is_available()
    if s.device == "cuda" and not has_cuda:
        raise SettingsError("--device=cuda but no CUDA GPU is visible; use --device=cpu (e.g. with --preset=tiny)")
    device_type = "cuda" if s.device == "cuda" or (s.device == "auto" and has_cuda) else "cpu"
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    backend = s.attention_backend
    if backend == "auto":
        backend = "flex" if device_type == "cuda" else "explicit"
    if backend == "flex" and device_type == "cpu":
        raise SettingsError("--attention_backend=flex needs a CUDA GPU (FlexAttention has no backward on CPU); "
                            "use --attention_backend=explicit on CPU")
    if backend == "flex" and not s.compile:
        raise SettingsError("--attention_backend=flex needs --compile=true (eager FlexAttention materialises "
                            "the full score matrix); use --attention_backend=explicit to run uncompiled")
    if s.slots_per_step % world_size != 0:
        raise SettingsError(f"world size {world_size} cannot split a step of {s.slots_per_step} slots "
                            f"(--slots_per_step); run with {', '.join(map(str, divisors(s.slots_per_step)))} "
                            "processes")
    notices, fp8, total_memory = [], s.fp8, None
    if device_type == "cuda":
        notices, total_memory, has_fp8 = harness.check_gpu(device, backend, s.head_dim)
        if s.fp8 and not has_fp8:
            notices.append("FP8: this GPU has no FP8 matmuls: the LM head and MLP matmuls run in bf16 (the record "
                           "uses FP8; expect a slightly different loss curve)")
            fp8 = False
    elif s.fp8:
        notices.append("FP8: emulated on CPU (values rounded through float8, matmuls in fp32)")
    savers, memory_notice = harness.choose_memory_savers(s, world_size, total_memory,
                                                         harness.load_memory_table(MEMORY_TABLE), fp8, MEMORY_TABLE)
    notices.append(memory_notice)
    if rank == 0:
        for notice in notices:
            print(notice, flush=True)
    return Runtime(rank, world_size, device, backend, fp8, savers, tuple(notices), s.compile)


# --memory=auto's table: the GPU check's predicted peak per rank of the record shape for each combination of
# savers (tools/memory_table.py builds it from the GPU-check reports its rows name). These settings size memory:
# the table holds for them only.
MEMORY_TABLE = RECIPE_FILE.parent / "records" / "benchmarks" / "memory_table_record89.json"
MEMORY_SHAPE_SETTINGS = ("val_seq_len", "slots_per_step", "stage_batch_tokens", "stage_max_doc_len", "vocab_size",
                         "model_dim", "num_heads", "head_dim", "mlp_hidden", "block_size", "bigram_buckets",
                         "dc_window", "gate_hidden", "compile")
MEMORY_FP8_SETTING = "fp8"  # the table's rows are per FP8 on/off (resolved: off on GPUs without FP8 matmuls)


def recompute_flops_per_token(s: Settings, savers: MemorySavers) -> int:
    """Extra forward matmul FLOPs per token that backward spends on the savers: the Q/K/V/O projections of the
    checkpointed layers. That is what the compiled backward recomputes (GPU check at ff14606: its backward
    graph gains exactly these matmuls, and FlexAttention's forward, whose FLOPs the counter leaves out); the
    MLP, an autograd.Function, keeps its saved tensors there (eager code, as on CPU, recomputes it too). The
    loss chunks are recomputed whatever their size, so the chunk size adds none."""
    with torch.device("meta"):
        weights = sum(Block(s, i).attn.qkvo.numel() for i in range(savers.checkpoint_blocks)
                      if i in ATTENTION_LAYERS)
    return 2 * weights


# ----------------------------------------------------------------------------------------------------
# 3. Schedules: every number of the run that changes with the step, in one place
# The run is a list of stages (stage_ends), then the extension: extension_steps more steps at the LR floor
# with the extension windows and the last stage's batch. The per-stage settings are parsed and checked once
# per distinct settings (stages(s), cached); step_plan reads the parsed Stages.
#
# "Interpolated linearly within each stage" (MTP and prefix weights): at step t of a stage that runs from
# `start` to `end` (exclusive) the fraction is (t - start) / (end - start). A weight has its start value on the
# stage's first step and would reach its end value on the next stage's first step, where that stage's weights
# take over (as the public script's TrainingSchedule.lookup does). Step num_iterations, the final
# validation's, counts as the end of the extension (fraction 1).

STAGE_MTP_WEIGHTS = (  # per stage: the weights of predicted offsets k = 1, 2, ... at its start and at its end
    ((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
    ((1.0, 0.5), (1.0, 0.0)),
    ((1.0,), (1.0,)),
)
STAGE_PREFIX_WEIGHT = ((0.25, 0.25), (0.25, 0.0), (0.0, 0.0))  # per stage: at its start and at its end
EXTENSION_MTP_WEIGHTS = (1.0,)
EXTENSION_PREFIX_WEIGHT = 0.0
WARMUP_OFFSETS = (-2, -1, 0, 1)  # the warm-up trains these steps around each stage change, and steps 0 and 1


@dataclass(frozen=True)
class Stage:
    index: int  # 0, 1, 2; the extension's is the number of scheduled stages (3)
    start: int  # its first step
    end: int  # one past its last step
    batch_tokens: int  # tokens of one optimizer step, all ranks together
    lr_multiplier: float  # the extension's is lr_floor
    max_doc_len: int
    windows: tuple[int, int]  # (short, long) in blocks
    mtp_weights: tuple[tuple[float, ...], tuple[float, ...]]  # (at the start, at the end)
    prefix_weight: tuple[float, float]  # (at the start, at the end)

    @property
    def steps(self) -> int:
        return self.end - self.start

    def fraction(self, step: int) -> float:
        """How far step is into the stage: 0 on its first step, 1 at its end (see the section's comment)."""
        return (step - self.start) / self.steps if step < self.end else 1.0


@dataclass(frozen=True)
class Stages:
    scheduled: tuple[Stage, ...]
    extension: Stage  # holds no step when extension_steps is 0
    cooldown_start: int  # the LR cools down from this step to the end of the scheduled steps

    @property
    def scheduled_steps(self) -> int:
        return self.extension.start

    @property
    def num_iterations(self) -> int:
        return self.extension.end

    @property
    def all(self) -> tuple[Stage, ...]:
        return (*self.scheduled, self.extension)

    def at(self, step: int) -> Stage:
        """The stage that trains step; step == num_iterations (the final validation) is the extension's."""
        return next((stage for stage in self.scheduled if step < stage.end), self.extension)


def stages(s: Settings) -> Stages:
    """The parsed stages of s; a one-line SettingsError where the per-stage settings are inconsistent."""
    return _parse_stages(s.stage_ends, s.extension_steps, s.stage_batch_tokens, s.stage_lr, s.stage_max_doc_len,
                         s.stage_windows, s.extension_windows, s.cooldown_frac, s.lr_floor, s.slots_per_step,
                         s.block_size)


def parse_windows(name: str, text: str) -> list[tuple[int, int]]:
    """'1/3,3/7' -> [(1, 3), (3, 7)]: (short, long) in blocks."""
    try:
        windows = [tuple(int(blocks) for blocks in item.split("/")) for item in text.split(",")]
    except ValueError:
        windows = []
    if not windows or any(len(window) != 2 for window in windows):
        raise SettingsError(f"--{name}={text}: give windows as short/long in blocks, e.g. 1/3 (comma-separated "
                            "for stages)")
    return windows


def check_windows(name: str, text: str, windows: tuple[int, int], room_blocks: int, room: str):
    short, long = windows
    if short < 1 or long < 1:
        raise SettingsError(f"--{name}={text}: a window must be at least 1 block")
    if short > long:
        raise SettingsError(f"--{name}={text}: the short window ({short} blocks) must not exceed the long one "
                            f"({long})")
    if long > room_blocks:
        raise SettingsError(f"--{name}={text}: the long window of {long} blocks is longer than {room} "
                            f"({room_blocks} blocks): shorten the window or make the sequences longer")


@functools.lru_cache(maxsize=8)
def _parse_stages(stage_ends: str, extension_steps: int, stage_batch_tokens: str, stage_lr: str,
                  stage_max_doc_len: str, stage_windows: str, extension_windows: str, cooldown_frac: float,
                  lr_floor: float, slots_per_step: int, block_size: int) -> Stages:
    def numbers(name: str, text: str, kind: type) -> list:
        try:
            return [kind(item) for item in text.split(",")]
        except ValueError:
            raise SettingsError(f"--{name}={text}: give comma-separated {'whole ' if kind is int else ''}numbers, "
                                "one per stage") from None

    ends = numbers("stage_ends", stage_ends, int)
    if len(ends) != len(STAGE_MTP_WEIGHTS):
        raise SettingsError(f"--stage_ends={stage_ends}: the recipe has {len(STAGE_MTP_WEIGHTS)} stages (its MTP "
                            f"and prefix-loss weights are set per stage); give {len(STAGE_MTP_WEIGHTS)} stage ends")
    if any(end <= start for start, end in zip([0, *ends], ends)):
        raise SettingsError(f"--stage_ends={stage_ends}: must increase, starting above 0 (every stage needs a step)")
    texts = dict(stage_batch_tokens=stage_batch_tokens, stage_lr=stage_lr, stage_max_doc_len=stage_max_doc_len,
                 stage_windows=stage_windows)
    per_stage = dict(stage_batch_tokens=numbers("stage_batch_tokens", stage_batch_tokens, int),
                     stage_lr=numbers("stage_lr", stage_lr, float),
                     stage_max_doc_len=numbers("stage_max_doc_len", stage_max_doc_len, int),
                     stage_windows=parse_windows("stage_windows", stage_windows))
    for name, values in per_stage.items():
        if len(values) != len(ends):
            raise SettingsError(f"--{name}={texts[name]}: {len(values)} entries, but --stage_ends has {len(ends)}; "
                                "give one per stage")
    extension_window = parse_windows("extension_windows", extension_windows)
    if len(extension_window) != 1:
        raise SettingsError(f"--extension_windows={extension_windows}: give one short/long pair, e.g. 6/13")
    slot_quantum = slots_per_step * block_size  # every slot of a step holds whole attention blocks
    for batch_tokens in per_stage["stage_batch_tokens"]:
        if batch_tokens <= 0 or batch_tokens % slot_quantum:
            raise SettingsError(f"--stage_batch_tokens={stage_batch_tokens}: {batch_tokens} is not a positive "
                                f"multiple of --slots_per_step * --block_size = {slot_quantum}")
    for lr in per_stage["stage_lr"]:
        if not (math.isfinite(lr) and lr >= 0):
            raise SettingsError(f"--stage_lr={stage_lr}: {lr} is not a finite number >= 0")
    for doc_len in per_stage["stage_max_doc_len"]:
        if doc_len <= 0:
            raise SettingsError(f"--stage_max_doc_len={stage_max_doc_len}: {doc_len} is not positive")
    slot_blocks = [batch_tokens // slot_quantum for batch_tokens in per_stage["stage_batch_tokens"]]
    for windows, room_blocks in zip(per_stage["stage_windows"], slot_blocks):
        check_windows("stage_windows", stage_windows, windows, room_blocks, "its stage's slot")
    check_windows("extension_windows", extension_windows, extension_window[0], slot_blocks[-1],
                  "the last stage's slot")

    scheduled = tuple(Stage(index, start, end, per_stage["stage_batch_tokens"][index], per_stage["stage_lr"][index],
                            per_stage["stage_max_doc_len"][index], per_stage["stage_windows"][index],
                            STAGE_MTP_WEIGHTS[index], STAGE_PREFIX_WEIGHT[index])
                      for index, (start, end) in enumerate(zip([0, *ends], ends)))
    last = scheduled[-1]
    extension = Stage(len(ends), last.end, last.end + extension_steps, last.batch_tokens, lr_floor,
                      last.max_doc_len, extension_window[0], (EXTENSION_MTP_WEIGHTS, EXTENSION_MTP_WEIGHTS),
                      (EXTENSION_PREFIX_WEIGHT, EXTENSION_PREFIX_WEIGHT))
    # floor, as the record: floor(1270 * 0.4) = 508
    return Stages(scheduled, extension, cooldown_start=math.floor(last.end * cooldown_frac))


def check_schedule(s: Settings):
    """The per-stage settings, the untie step, the momentum ramps and the final windows fit together."""
    schedule = stages(s)
    if not 0 <= s.split_step < schedule.num_iterations:
        raise SettingsError(f"--split_step={s.split_step}: must be a training step, below the run's "
                            f"{schedule.num_iterations} steps")
    if s.split_step % 2 == 0:
        raise SettingsError(f"--split_step={s.split_step}: must be odd, a step after which Adam updates (the public "
                            "recipe's rule), so no half-accumulated gradient is carried across the untie")
    ramps = s.muon_momentum_warmup_steps + s.muon_momentum_cooldown_steps
    if ramps > schedule.num_iterations:
        raise SettingsError(f"--muon_momentum_warmup_steps + --muon_momentum_cooldown_steps = {ramps} exceeds the "
                            f"run's {schedule.num_iterations} steps; the rise and the fall must not overlap")
    final = parse_windows("final_windows", s.final_windows)
    if len(final) != 1:
        raise SettingsError(f"--final_windows={s.final_windows}: give one short/long pair, e.g. 6/20")
    check_windows("final_windows", s.final_windows, final[0], s.val_seq_len // s.block_size,
                  "a validation sequence (--val_seq_len)")


@dataclass(frozen=True)
class StepPlan:
    step: int
    stage: int  # 0, 1, 2; 3 = extension
    batch_tokens: int  # all ranks together
    slot_tokens: int  # one training buffer: batch_tokens // slots_per_step
    max_doc_len: int
    lr_factor: float  # times every base learning rate
    muon_momentum: float
    short_window_blocks: int
    long_window_blocks: int
    mtp_weights: tuple[float, ...]  # one per predicted offset k = 1, 2, ...
    prefix_weight: float
    adam_updates: bool  # Adam steps after this step: odd steps that train (gradients accumulate over two)
    untie_after: bool  # the embedding and the LM head untie after this step's update


def lr_factor_at(step: int, stage: Stage, schedule: Stages, s: Settings) -> float:
    """The stage's multiplier, from cooldown_start blended linearly into lr_floor, reached at the end of the
    scheduled steps: m (1 - tau) + floor tau with tau = (step - cooldown_start) / (scheduled - cooldown_start)."""
    if step < schedule.cooldown_start:
        return stage.lr_multiplier
    if step >= schedule.scheduled_steps:
        return s.lr_floor
    tau = (step - schedule.cooldown_start) / (schedule.scheduled_steps - schedule.cooldown_start)
    return stage.lr_multiplier * (1 - tau) + s.lr_floor * tau


def muon_momentum_at(step: int, num_iterations: int, s: Settings) -> float:
    """muon_momentum_start rising linearly to muon_momentum over the warm-up steps, then muon_momentum, then
    falling linearly over the last muon_momentum_cooldown_steps: it would reach muon_momentum_start exactly at
    step num_iterations, which trains nothing, so the last update (num_iterations - 1) uses
    start + (peak - start) / cooldown_steps (0.852 for the record), as the public script does."""
    low, peak = s.muon_momentum_start, s.muon_momentum
    fall_start = num_iterations - s.muon_momentum_cooldown_steps
    if step < s.muon_momentum_warmup_steps:
        return low + (peak - low) * step / s.muon_momentum_warmup_steps
    if step > fall_start:
        return peak + (low - peak) * (step - fall_start) / s.muon_momentum_cooldown_steps
    return peak


def step_plan(step: int, s: Settings) -> StepPlan:
    """Every scheduled number of step (0 <= step <= num_iterations; num_iterations: the final validation's)."""
    schedule = stages(s)
    if not 0 <= step <= schedule.num_iterations:
        raise ValueError(f"step {step} is outside the run's steps 0..{schedule.num_iterations}")
    stage = schedule.at(step)
    fraction = stage.fraction(step)
    (mtp_start, mtp_end), (prefix_start, prefix_end) = stage.mtp_weights, stage.prefix_weight
    return StepPlan(
        step=step, stage=stage.index, batch_tokens=stage.batch_tokens,
        slot_tokens=stage.batch_tokens // s.slots_per_step, max_doc_len=stage.max_doc_len,
        lr_factor=lr_factor_at(step, stage, schedule, s),
        muon_momentum=muon_momentum_at(step, schedule.num_iterations, s),
        short_window_blocks=stage.windows[0], long_window_blocks=stage.windows[1],
        mtp_weights=tuple(a + (b - a) * fraction for a, b in zip(mtp_start, mtp_end)),
        prefix_weight=prefix_start + (prefix_end - prefix_start) * fraction,
        adam_updates=step % 2 == 1 and step < schedule.num_iterations, untie_after=step == s.split_step)


def final_windows(s: Settings) -> tuple[int, int]:
    """(short, long) blocks of the final validation (its long window widens with no YaRN update, as the record)."""
    [windows] = parse_windows("final_windows", s.final_windows)
    return windows


def warmup_steps(s: Settings) -> list[int]:
    """The steps the untimed warm-up trains: 0, 1, the two steps before and after each stage change (where
    shapes, windows and the YaRN rotary change), and the untie step and the next (the untied graphs)."""
    schedule = stages(s)
    changes = [stage.start for stage in schedule.all[1:] if stage.start < schedule.num_iterations]
    steps = {0, 1, s.split_step, s.split_step + 1} | {change + offset for change in changes for offset in WARMUP_OFFSETS}
    return sorted(step for step in steps if 0 <= step < schedule.num_iterations)


def schedule_table(s: Settings) -> str:
    """The stages as a printable table, with the schedules that do not follow the stages (for --schedule)."""
    schedule = stages(s)

    def change(start: float, end: float) -> str:
        return f"{start:g}" if start == end else f"{start:g}->{end:g}"

    header = ("stage", "steps", "tokens/step", "tokens/slot", "max doc", "windows", "LR mult", "MTP weights",
              "prefix", "tokens")
    rows = [header]
    for stage in (stage for stage in schedule.all if stage.steps):  # an extension of 0 steps is left out
        name = "extension" if stage is schedule.extension else str(stage.index)
        rows.append((name, f"{stage.start}-{stage.end - 1} ({stage.steps})", f"{stage.batch_tokens:,}",
                     f"{stage.batch_tokens // s.slots_per_step:,}", str(stage.max_doc_len),
                     "/".join(map(str, stage.windows)), f"{stage.lr_multiplier:g}",
                     ", ".join(change(*pair) for pair in zip(*stage.mtp_weights)), change(*stage.prefix_weight),
                     f"{stage.batch_tokens * stage.steps:,}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    total_tokens = sum(stage.batch_tokens * stage.steps for stage in schedule.all)
    final_short, final_long = final_windows(s)
    lines += [
        f"total: {schedule.num_iterations:,} steps, {total_tokens:,} tokens; windows are short/long in blocks of "
        f"{s.block_size} tokens; MTP and prefix weights change linearly within a stage",
        f"LR factor: the stage's multiplier until step {schedule.cooldown_start}, then blended linearly into "
        f"{s.lr_floor:g}, reached at step {schedule.scheduled_steps}; {s.lr_floor:g} in the extension",
        f"Muon momentum: {s.muon_momentum_start:g} -> {s.muon_momentum:g} over steps 0-"
        f"{s.muon_momentum_warmup_steps}, then {s.muon_momentum:g}; it falls linearly from step "
        f"{schedule.num_iterations - s.muon_momentum_cooldown_steps} toward {s.muon_momentum_start:g} (reached at "
        f"step {schedule.num_iterations}, which trains nothing)",
        f"Adam updates after odd steps; the embedding and the LM head untie after step {s.split_step}",
        f"validation: {f'every {s.val_every} steps and ' if s.val_every else ''}at step {schedule.num_iterations} "
        f"(final windows {final_short}/{final_long})",
        f"warm-up steps: {', '.join(map(str, warmup_steps(s)))}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# 4. Model

# 4a. Attention: rotary with YaRN, document-aware sliding-window masks, paired heads, key offset, XSA, DC
# Facts: RECORDS_29_89.md 2.5 (attention) and 3 (FA3 varlen and DC semantics). Each layer i != 6 has its own
# [Q; K; V; O]; the features below are switched on per layer by these tuples of layer indices.

ATTENTION_LAYERS = (0, 1, 2, 3, 4, 5, 7, 8, 9, 10)  # layer 6 has no attention
LONG_WINDOW_LAYERS = (3, 10)  # the others use the short window
PAIRED_HEAD_LAYERS = (0, 2, 5, 9)  # heads h and h + 3 attend together over a doubled sequence
KEY_OFFSET_LAYERS = (3, 10)  # the stationary half of each key comes from the previous token
XSA_LAYERS = (1, 3, 4, 7)  # exclusive self-attention: the output loses its component along its own value
OUTPUT_GATE_LAYERS = (3, 10)  # y * g, one gate per token and head
DC_LAYERS = (10,)  # the dynamically composable attention correction
ROTARY_MIN_FREQUENCY = 1 / 1024  # frequencies run from 1 down to this many radians per position
ATTENTION_SCALE_INIT = 0.1  # softmax scale before any YaRN update
# YaRN's ramp (alpha, beta) in turns over the old window: a frequency turning <= alpha times is interpolated
# fully, >= beta times kept. The public script's fixed defaults, not tied to head_dim (beta - alpha = 31 equals
# head_dim/4 - 1 at head_dim 128 by coincidence; the tiny preset's head_dim 8 keeps 31).
YARN_RAMP = (1, 32)
YARN_SCALE_SLOPE = 0.2  # the scale grows by 1 + 0.2 ln(new/old) at each long-window change
QKVO_INIT_STD = 0.5  # uniform init of Q, K, V and O with this std times 1/sqrt(model_dim) (+-0.03125 at 768)
XSA_NORM_FLOOR = 1e-8  # ||v||^2 is clamped to this in the XSA projection
DC_GATE_NORM_EPS = 1e-6  # epsilon of the RMSNorm over the six DC w1 gate values
DC_QUERY_CHUNK = 64  # DC queries per chunk: its intermediates are (T, H, 64 + dc_window - 1), never (T, T)


@dataclass(frozen=True)
class AttentionFeatures:
    """What one layer's attention does beyond windowed document-causal attention."""
    long_window: bool = False
    paired_heads: bool = False
    key_offset: bool = False
    xsa: bool = False
    output_gate: bool = False
    dc: bool = False

    def __post_init__(self):
        if self.paired_heads and (self.key_offset or self.xsa or self.dc):
            raise SettingsError("a paired-head layer cannot have a key offset, XSA or DC: its keys and values are "
                                "interleaved rows, not tokens (the record has none there)")

    @classmethod
    def of_layer(cls, layer: int) -> "AttentionFeatures":
        if layer not in ATTENTION_LAYERS:
            raise SettingsError(f"layer {layer} has no attention (layers with attention: {ATTENTION_LAYERS})")
        return cls(long_window=layer in LONG_WINDOW_LAYERS, paired_heads=layer in PAIRED_HEAD_LAYERS,
                   key_offset=layer in KEY_OFFSET_LAYERS, xsa=layer in XSA_LAYERS,
                   output_gate=layer in OUTPUT_GATE_LAYERS, dc=layer in DC_LAYERS)

    @property
    def mask_kind(self) -> str:
        return ("long" if self.long_window else "short") + ("_paired" if self.paired_heads else "")


MASK_KINDS = tuple(sorted({AttentionFeatures.of_layer(layer).mask_kind for layer in ATTENTION_LAYERS}))


class Rotary(nn.Module):
    """Rotary embedding shared by all layers. P = head_dim/4 frequencies omega_j = 1024^(-j/(P-1)) turn the
    adjacent pairs (0,1), (2,3), ... of the first half of each head; the second half is stationary.
    The frequencies and the softmax scale are persistent buffers: YaRN changes them during the run, so they
    are training state (checkpoints and the warm-up's restore carry them)."""

    def __init__(self, head_dim: int):
        super().__init__()
        pairs = head_dim // 4
        if pairs < 2:
            raise SettingsError(f"--head_dim={head_dim}: rotary needs head_dim >= 8 (two rotated pairs)")
        self.register_buffer("frequencies", ROTARY_MIN_FREQUENCY ** torch.linspace(0, 1, pairs))
        self.register_buffer("scale", torch.tensor(ATTENTION_SCALE_INIT))

    @torch.no_grad()
    def apply_yarn(self, old_long_tokens: int, new_long_tokens: int):
        """The YaRN update when the long window grows from old to new tokens (fact sheet 2.5): a frequency
        that turns r = old * omega / 2pi times over the old window is scaled by old/new if r <= alpha, kept if
        r >= beta, ramped in between; the scale is multiplied by 1 + 0.2 ln(new/old)."""
        if old_long_tokens <= 0 or new_long_tokens <= 0:
            raise SettingsError(f"YaRN window change {old_long_tokens} -> {new_long_tokens}: windows must be positive")
        ratio = old_long_tokens / new_long_tokens
        alpha, beta = YARN_RAMP
        turns = old_long_tokens * self.frequencies / (2 * math.pi)
        kept = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
        self.frequencies.mul_(ratio + kept * (1 - ratio))
        self.scale.mul_(1 + YARN_SCALE_SLOPE * math.log(new_long_tokens / old_long_tokens))

    def forward(self, x: Tensor, paired: bool = False, start: int = 0) -> Tensor:
        """x (T, H, D) rotated at position t (its index in the buffer); paired: head h at position 2t + h % 2,
        as the public script's paired layout (so heads 1 and 4 sit on the row of the other position). start:
        the buffer index of x's first row (decoding continues a buffer, section 4c)."""
        seq_len, num_heads, _ = x.shape
        pairs = self.frequencies.numel()
        rows, first = (2 * seq_len, 2 * start) if paired else (seq_len, start)
        positions = torch.arange(first, first + rows, device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.frequencies[None, :]  # (positions, P) in fp32, as the record's tables
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # stored in bf16 on GPU, as the record's
        if paired:  # (2T, P) -> (T, H, P): even heads at 2t, odd heads at 2t + 1
            cos, sin = (table.view(seq_len, 2, pairs).repeat(1, num_heads // 2, 1) for table in (cos, sin))
        else:
            cos, sin = cos[:, None, :], sin[:, None, :]
        turning = x[..., :2 * pairs].unflatten(-1, (pairs, 2))  # (T, H, P, 2)
        even, odd = turning[..., 0], turning[..., 1]
        turned = torch.stack((even * cos + odd * sin, odd * cos - even * sin), dim=-1).flatten(-2)  # (T, H, 2P)
        return torch.cat((turned, x[..., 2 * pairs:]), dim=-1)


# Masks. Query t sees key j iff j is in t's document and t - W <= j <= t, with W = window blocks * block_size
# tokens: the record's FA3 window_size=(W, 0), W + 1 keys (fact sheet 2.5 "Windows" and 3 "FA3"). Record 21
# had block-granular windows; record 89 has token windows, so the window is exact to the token here too.
# Paired layers attend over 2T rows (token t's rows 2t and 2t + 1, both in t's document) with the same W,
# which then covers W interleaved rows, as the record's doubled cu_seqlens do. The window sizes may be ints
# or 0-d device tensors (then a new window reuses the compiled graph).
AttentionMask = BlockMask | Tensor  # a FlexAttention BlockMask, or a dense (N, N) bool mask


@dataclass
class AttentionMasks:
    """One buffer's masks: one per kind in MASK_KINDS, and the document ids the DC correction reads."""
    by_kind: dict[str, AttentionMask]
    document_ids: Tensor  # (T,) int32, never decreasing


def window_mask_mod(document_ids: Tensor, window_tokens: Tensor | int):
    def mask_mod(batch, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        same_document = document_ids[q_idx] == document_ids[kv_idx]
        return (distance >= 0) & (distance <= window_tokens) & same_document

    return mask_mod


def window_block_tables(document_ids: Tensor, block_size: int, window_tokens: Tensor | int) -> tuple[Tensor, Tensor]:
    """For each (query block, key block): does some (query, key) pair pass the mask, do all pairs pass?
    Exact because document ids never decrease: an earlier key block shares a document with a query block
    iff the closest pair across them (first query, last key) is in one document, and that pair is also the
    one nearest in distance; all pairs pass iff the farthest pair is in the window and both blocks lie in a
    single document."""
    num_blocks = document_ids.numel() // block_size
    blocks = document_ids.view(num_blocks, block_size)
    first_document, last_document = blocks[:, 0], blocks[:, -1]
    block_index = torch.arange(num_blocks, device=document_ids.device)
    block_distance = block_index[:, None] - block_index[None, :]  # (query block, key block)
    nearest = (block_distance - 1) * block_size + 1  # distance of the closest pair (first query, last key)
    farthest = block_distance * block_size + block_size - 1
    closest_pair_same_document = first_document[:, None] == last_document[None, :]
    all_same_document = last_document[:, None] == first_document[None, :]
    earlier = block_distance > 0
    any_allowed = (block_distance == 0) | (earlier & (nearest <= window_tokens) & closest_pair_same_document)
    all_allowed = earlier & (farthest <= window_tokens) & all_same_document
    return any_allowed, all_allowed


def ordered_blocks(table: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, K) bool -> per row the count of True columns (Q,) and the column indices, True ones first (Q, K)."""
    counts = table.sum(dim=-1, dtype=torch.int32)
    indices = table.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def window_block_mask(document_ids: Tensor, window_tokens: Tensor | int, block_size: int) -> BlockMask:
    """The FlexAttention BlockMask, built on the device from the document ids (no host synchronisation)."""
    length = document_ids.numel()
    any_allowed, all_allowed = window_block_tables(document_ids, block_size, window_tokens)
    partial_counts, partial_indices = ordered_blocks(any_allowed & ~all_allowed)
    full_counts, full_indices = ordered_blocks(all_allowed)
    return BlockMask.from_kv_blocks(partial_counts[None, None], partial_indices[None, None],
                                    full_counts[None, None], full_indices[None, None], BLOCK_SIZE=block_size,
                                    mask_mod=window_mask_mod(document_ids, window_tokens),
                                    seq_lengths=(length, length))


def attention_masks(document_ids: Tensor, short_blocks: Tensor | int, long_blocks: Tensor | int, block_size: int,
                    backend: str) -> AttentionMasks:
    """document_ids (T,) int32, never decreasing (a new id at each document piece); the windows in blocks of
    block_size tokens; backend "flex" (BlockMasks) or "explicit" (dense bool masks)."""
    if backend not in ("flex", "explicit"):
        raise SettingsError(f"attention backend {backend!r}: choose flex or explicit")
    if document_ids.numel() % block_size:
        raise DataError(f"a buffer of {document_ids.numel()} tokens: must be a multiple of --block_size={block_size}")
    window_blocks = {"short": short_blocks, "long": long_blocks}
    masks = {}
    for kind in MASK_KINDS:
        window, _, paired = kind.partition("_")
        window_tokens = window_blocks[window] * block_size
        rows = document_ids.repeat_interleave(2) if paired else document_ids  # paired: rows 2t, 2t + 1 of token t
        if backend == "flex":
            masks[kind] = window_block_mask(rows, window_tokens, block_size)
        else:
            positions = torch.arange(rows.numel(), device=rows.device)
            masks[kind] = window_mask_mod(rows, window_tokens)(None, None, positions[:, None], positions[None, :])
    return AttentionMasks(masks, document_ids)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: Tensor) -> Tensor:
    """q, k, v (N, H, D) -> (N, H, D): softmax over the allowed keys of scale * q.k, then the values."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, D)
    if isinstance(mask, BlockMask):
        def scaled(score, batch, head, q_idx, kv_idx):  # on the fp32 scores, as FA3's softmax_scale
            return score * scale

        y = flex_attention(q, k, v, score_mod=scaled, block_mask=mask, scale=1.0)
    else:  # SDPA takes no tensor scale: it goes into q (exact in fp32 on CPU; one more rounding in bf16)
        y = F.scaled_dot_product_attention(q * scale, k, v, attn_mask=mask, scale=1.0)
    return y[0].transpose(0, 1)


def shift_stationary_keys(k: Tensor) -> Tensor:
    """Key offset: k[t, :, D/2:] <- k[t-1, :, D/2:] for t >= 1. As the public script, across document
    boundaries too; functionally (the public in-place copy is a shift only in its compiled graph)."""
    half = k.size(-1) // 2
    stationary = torch.cat((k[:1, :, half:], k[:-1, :, half:]), dim=0)
    return torch.cat((k[..., :half], stationary), dim=-1)


def exclusive_self_attention(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """XSA: y (T, H, D) loses tanh(alpha) times its projection on the same token's and head's v (T, H, D);
    alpha (T, H)."""
    projection = (y * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp_min(XSA_NORM_FLOOR)
    return y - torch.tanh(alpha).type_as(y)[..., None] * projection * v


def dc_correction(q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, document_ids: Tensor, scale: Tensor,
                  window: int) -> Tensor:
    """The dynamically composable attention correction (fact sheet 3), fp32 (fp64 stays) (T, H, D):
    corr_h[t] = w2_h[t] * sum_j (sum_h' w1n_h'[t] P_h'[t, j]) v_h[j], with P_h[t, j] the softmax of
    scale * q_h[t].k_h[j] over the window keys t - window < j <= t of t's document and w1n = w1 RMS-normed
    over the heads. q, k, v (T, H, D); w1, w2 (T, H). The weights are rounded to v's dtype before the product
    with v, as the Triton kernel's bf16 MMA. Plain PyTorch for torch.compile to fuse: chunks of
    DC_QUERY_CHUNK queries against their band of chunk + window - 1 keys, all chunks at once."""
    seq_len, num_heads, head_dim = q.shape
    wide = torch.promote_types(q.dtype, torch.float32)
    chunk = DC_QUERY_CHUNK
    num_chunks = -(-seq_len // chunk)
    band = chunk + window - 1
    back = num_chunks * chunk - seq_len  # padding queries (attend to themselves, then dropped)
    front = window - 1  # padding keys of the first queries' bands (a document id nobody has)

    def padded(t: Tensor) -> Tensor:  # (T, ...) -> (window - 1 + T + back, ...)
        return F.pad(t, (0, 0) * (t.dim() - 1) + (front, back))

    def bands(t: Tensor) -> Tensor:  # (window - 1 + T + back, ...) -> (chunks, ..., band): each chunk's keys
        return t.unfold(0, band, chunk)

    # ids never decrease: the front padding's id is nobody's; the back padding's only its own
    padded_ids = torch.cat(((document_ids[:1] - 1).expand(front), document_ids, (document_ids[-1:] + 1).expand(back)))
    query_ids = padded_ids[front:].view(num_chunks, chunk)
    queries = padded(q.to(wide))[front:].view(num_chunks, chunk, num_heads, head_dim)
    # scores (chunks, H, chunk, band): products of the compute-dtype q and k, accumulated in fp32 (fp64 stays)
    scores = torch.einsum("nchd,nhdb->nhcb", queries, bands(padded(k.to(wide)))) * scale
    query_in_chunk = torch.arange(chunk, device=q.device)[:, None]
    key_in_band = torch.arange(band, device=q.device)[None, :]
    in_window = (key_in_band >= query_in_chunk) & (key_in_band < query_in_chunk + window)  # (chunk, band)
    allowed = in_window & (query_ids[:, :, None] == bands(padded_ids)[:, None, :])  # (chunks, chunk, band)
    probabilities = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    head_mix = F.rms_norm(w1.to(wide), (num_heads,), eps=DC_GATE_NORM_EPS)  # (T, H)
    head_mix, head_out = (padded(t)[front:].view(num_chunks, chunk, num_heads).transpose(1, 2)[..., None]
                          for t in (head_mix, w2.to(wide)))  # (chunks, H, chunk, 1)
    mixed = (head_mix * probabilities).sum(dim=1, keepdim=True)  # (chunks, 1, chunk, band)
    weights = (head_out * mixed).to(v.dtype).to(wide)  # (chunks, H, chunk, band), rounded as the kernel's
    correction = torch.einsum("nhcb,nhdb->nchd", weights, bands(padded(v.to(wide))))  # (chunks, chunk, H, D)
    return correction.reshape(num_chunks * chunk, num_heads, head_dim)[:seq_len]


class CausalSelfAttention(nn.Module):
    """One layer's attention, with the features AttentionFeatures.of_layer(layer) switches on. One parameter
    qkvo (4, d, d) = [Q; K; V; O], rows out and columns in (NorMuon orthogonalises each of the four)."""

    def __init__(self, s: Settings, layer: int):
        super().__init__()
        self.features = AttentionFeatures.of_layer(layer)
        self.num_heads, self.head_dim, self.dc_window = s.num_heads, s.head_dim, s.dc_window
        bound = 3**0.5 * QKVO_INIT_STD / s.model_dim**0.5  # uniform: std = bound / sqrt(3)
        self.qkvo = nn.Parameter(torch.empty(4, s.model_dim, s.model_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor, masks: AttentionMasks, rotary: Rotary, lambdas: Tensor, aux_v: Tensor | None = None,
                xsa_alpha: Tensor | None = None, output_gate: Tensor | None = None, dc_w1: Tensor | None = None,
                dc_w2: Tensor | None = None, past: "LayerCache | None" = None) -> Tensor:
        """x (T, d) normed input; lambdas (2,): the Q/K/V and the O weight multipliers; aux_v (T, H, D) added
        to v; per token and head (T, H): xsa_alpha (XSA layers), output_gate (gated layers), dc_w1 and dc_w2
        (the DC layer). Returns the projected output (T, d) in x's dtype (the additions and gates are cast to it;
        the DC arithmetic is fp32, fp64 stays). past (decoding, section 4c): x's tokens follow past's, whose keys and values
        they attend to as well; masks are then those of x's tokens (rows) over all tokens (columns)."""
        features = self.features
        needed = {"xsa_alpha": (features.xsa, xsa_alpha), "output_gate": (features.output_gate, output_gate),
                  "dc_w1": (features.dc, dc_w1), "dc_w2": (features.dc, dc_w2)}
        for name, (used, gate) in needed.items():
            if used != (gate is not None):
                raise ValueError(f"{name} must be given exactly on the layers that use it (this layer: {features})")
        seq_len, num_heads, head_dim = x.size(0), self.num_heads, self.head_dim
        qkv_weight = lambdas[0] * self.qkvo[:3].type_as(x)  # (3, d, d)
        q, k, v = F.linear(x, qkv_weight.flatten(end_dim=1)).view(seq_len, 3, num_heads, head_dim).unbind(1)
        # No eps, as the public script: PyTorch then uses fp32's epsilon, bf16 input included (fact sheet 2.1).
        q, k = F.rms_norm(q, (head_dim,)), F.rms_norm(k, (head_dim,))
        start = 0 if past is None else past.length
        q, k = rotary(q, features.paired_heads, start), rotary(k, features.paired_heads, start)
        if features.key_offset:
            k = shift_stationary_keys(k) if past is None else past.shift_stationary_keys(k)
        if aux_v is not None:
            v = v + aux_v.type_as(v)
        keys, values = (k, v) if past is None else past.append(k, v)  # (N, H, D): N = T, or all tokens decoded
        mask = masks.by_kind[features.mask_kind]
        if features.paired_heads:  # (N, H, D) -> (2N, H/2, D): row 2t holds heads 0..H/2-1, row 2t+1 the rest
            rows = (t.reshape(2 * t.size(0), num_heads // 2, head_dim) for t in (q, keys, values))
            y = attend(*rows, mask, rotary.scale).reshape(seq_len, num_heads, head_dim)
        else:
            y = attend(q, keys, values, mask, rotary.scale)
        if features.dc:  # base + correction in fp32, rounded once, as the kernel
            correct = dc_correction if past is None else dc_correction_of_last
            correction = correct(q, keys, values, dc_w1, dc_w2, masks.document_ids, rotary.scale, self.dc_window)
            y = (y.to(correction.dtype) + correction).type_as(y)
        if features.xsa:
            y = exclusive_self_attention(y, v, xsa_alpha)
        if features.output_gate:
            y = y * output_gate.type_as(y)[..., None]
        return F.linear(y.reshape(seq_len, num_heads * head_dim), lambdas[1] * self.qkvo[3].type_as(y))


# 4b. The network: embeddings (tied head, smear, bigram hash, value embeddings), MUDD gates, the 11 layers
# Fact sheet 2.1-2.4 and 2.6. Layer i's update, for i != 6, 10 (a: attention input, b: signed bigram vector):
#   x = r[i,0] x + p[i,0] Attn(norm(a)) + g_x0 x0 (+ g_b b for i > 0);  x = r[i,1] x + p[i,1] MLP(norm(x))
# Layer 6 has no attention (a gated skip from layer 3 instead); layer 10 is mixed by MUDD0 and the final
# residual by MUDD1. Per-token gates come from two small gate networks: the pre gate (on x0) serves layers
# 0-3, the post gate (on x at the start of layer 4) serves layers 4-10.

NUM_LAYERS = 11
SKIP_LAYER = 6  # no attention: x += sigmoid(skip lambda) * skip gate * cache[3]
CACHED_LAYERS = (3, 7)  # residual snapshots after these layers' MLPs
LAYER7_READERS = (8, 9, 10)  # attend from norm(cache[7]) instead of norm(x)
POST_GATE_LAYER = 4  # the post gate reads x at the start of this layer
MUDD_LAYER = 10

RESID_LAMBDA_INIT = 1.1**0.5
POST_LAMBDA_INIT = 1.0
# scalars (24,): (Q/K/V, O) lambdas of layer i at [2i, 2i+1], then the smear and the skip lambdas
ATTENTION_LAMBDAS_INIT = (0.5, 1.0)
SMEAR_LAMBDA, SKIP_LAMBDA = 2 * NUM_LAYERS, 2 * NUM_LAYERS + 1
SMEAR_LAMBDA_INIT, SKIP_LAMBDA_INIT = 0.0, -1.5

HEAD_INIT_STD = 0.005  # tied LM head / token embedding
VALUE_EMBED_INIT_STD = 0.01
MATRIX_INIT_STD = 0.5  # times 1/sqrt(fan_in): uniform init of c_fc (as QKVO_INIT_STD of Q/K/V/O)
SMEAR_GATE_INPUTS = 12  # the smear gate reads e_t[:12]

# Bigram hash (fact sheet 2.2): h_t = ((36313 x_t) XOR (27191 x_{t-1})) mod (buckets - 1), h_0 = buckets - 1;
# the looked-up row is multiplied by a +-1 sign row (x_{t-1} XOR x_t) mod 8192 (row 0 at t = 0).
BIGRAM_MULTIPLIERS = (36313, 27191)  # of x_t, x_{t-1}
SIGN_ROWS = 8192
SIGN_MULTIPLIERS = (1, 1)

# Value embeddings: table k of value_embeds (rows k*V .. (k+1)*V - 1) feeds layer VALUE_EMBED_LAYERS[k]. Layers
# 1, 2, 8, 9 gate it per head with ve_gate_bank[k]: 2 sigmoid([a[:6], ve[:6]] G_k^T); layer 10's gate comes
# from MUDD0 (ve_gate_bank[4] is not read: the public script keeps it).
VALUE_EMBED_LAYERS = (1, 2, 8, 9, 10)
VE_GATE_INPUTS = 6  # dims of the attention input and of the value embedding the gate reads

# MUDD gate networks: (GELU(z W1^T) W2^T + b2) * scale, W2 zero at init, so each output starts at its init
# value; b2 is stored divided by the scale. The pre and post gates learn their scale; MUDD0/1 use it fixed.
GATE_SCALE_INIT = 0.1
PRE_GATE_OUTPUTS, POST_GATE_OUTPUTS = 26, 41
# Where each per-token gate is read: (gate network, its output columns).
XSA_ALPHA_COLUMNS = {1: ("pre", slice(0, 6)), 3: ("pre", slice(6, 12)),
                     4: ("post", slice(0, 6)), 7: ("post", slice(6, 12))}  # XSA coefficient tanh(alpha)
OUTPUT_GATE_COLUMNS = {3: ("pre", slice(12, 18)), 10: ("post", slice(12, 18))}
INJECTED_LAYERS = {"pre": (0, 1, 2, 3), "post": (4, 5, 7, 8, 9)}  # the j-th: x0 gate at 18+2j, bigram 19+2j
INJECTION_FIRST_COLUMN = 18
X0_GATE_COLUMNS = {layer: (net, slice(INJECTION_FIRST_COLUMN + 2 * j, INJECTION_FIRST_COLUMN + 2 * j + 1))
                   for net, layers in INJECTED_LAYERS.items() for j, layer in enumerate(layers)}
BIGRAM_GATE_COLUMNS = {layer: (net, slice(columns.start + 1, columns.stop + 1))
                       for layer, (net, columns) in X0_GATE_COLUMNS.items()}
SKIP_GATE_COLUMNS = ("post", slice(28, 29))
DC_W1_COLUMNS, DC_W2_COLUMNS = ("post", slice(29, 35)), ("post", slice(35, 41))  # layer 10's DC weights
OUTPUT_GATE_INIT, BIGRAM_GATE_INIT, SKIP_GATE_INIT, DC_W1_INIT = 0.25, 0.05, 0.5, 1.0  # the other gates: 0

# MUDD0: 14 per-token coefficients mu for layer 10 (cache0: layer 0's input, cache7: after layer 7, x: layer
# 10's input). v_mudd = mu0 cache0 + mu1 cache7 + mu2 x;  x <- (1 + mu5) x + mu3 cache0 + mu4 cache7;
# aux_v = (mu6 on heads 0-2, mu7 on heads 3-5) ve_4 + v_mudd;  after attention y:
# x <- mu8 x + mu9 y + mu10 cache0 + mu11 b;  after the MLP: x <- mu12 x + mu13 MLP(norm(x)).
(MU_V_CACHE0, MU_V_CACHE7, MU_V_X, MU_X_CACHE0, MU_X_CACHE7, MU_X_EXTRA, MU_VE_FIRST_HEADS, MU_VE_LAST_HEADS,
 MU_ATTN_X, MU_ATTN_Y, MU_ATTN_CACHE0, MU_ATTN_BIGRAM, MU_MLP_X, MU_MLP_Y) = range(14)
MUDD0_INIT = {MU_VE_FIRST_HEADS: 2.0, MU_VE_LAST_HEADS: 2.0, MU_ATTN_X: RESID_LAMBDA_INIT, MU_ATTN_Y: 1.0,
              MU_ATTN_BIGRAM: BIGRAM_GATE_INIT, MU_MLP_X: RESID_LAMBDA_INIT, MU_MLP_Y: 1.0}
MUDD0_OUTPUTS = 14
# MUDD1, after the loop: x += nu0 cache0 + nu1 cache7 + nu2 cache9 + nu3 ve_0 + nu4 cache3 (cache9: layer 10's
# input). nu1 starts at -0.5: the earlier records' "backout" of the layer-7 residual.
NU_CACHE0, NU_CACHE7, NU_CACHE9, NU_VE0, NU_CACHE3 = range(5)
MUDD1_INIT = {NU_CACHE7: -0.5}
MUDD1_OUTPUTS = 5

# Kept in fp32 on the GPU (fact sheet 2.8); every other parameter is bf16 there.
FP32_PARAMETERS = ("scalars", "resid_lambdas", "post_lambdas", "pre_gate.scale", "post_gate.scale")


def rms_norm(x: Tensor) -> Tensor:
    # no eps, as the public script: PyTorch then uses finfo(float32).eps, also for bf16 input (fact sheet 2.1)
    return F.rms_norm(x, (x.size(-1),))


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def uniform_init_(weight: Tensor, std_times_sqrt_fan_in: float) -> Tensor:
    """U(-b, b) with b = sqrt(3) * std: std = std_times_sqrt_fan_in / sqrt(fan_in), fan_in = the last dim."""
    bound = 3**0.5 * std_times_sqrt_fan_in / weight.size(-1) ** 0.5
    return weight.uniform_(-bound, bound)


def ngram_hash(inputs: Tensor, multipliers: tuple[int, ...], modulus: int, missing: int) -> Tensor:
    """(XOR over k of multipliers[k] * x_{t-k}) mod modulus for every position t of inputs (T,), in int32 (the
    products wrap around as on the GPU; the remainder is non-negative). The first len(multipliers) - 1
    positions, short of history, get `missing`. Over the packed stream: it crosses documents, as the public
    script's. Returns (T,) int32."""
    tokens = inputs.to(torch.int32)
    length, history = tokens.numel(), len(multipliers) - 1
    mixed = tokens[history:] * multipliers[0]
    for k in range(1, history + 1):
        mixed = mixed ^ (tokens[history - k:length - k] * multipliers[k])
    return torch.cat([tokens.new_full((min(history, length),), missing), torch.remainder(mixed, modulus)])


def bigram_hash(inputs: Tensor, buckets: int) -> Tensor:
    """The bigram table's row of every position of inputs (T,): (T,) int32 in [0, buckets)."""
    return ngram_hash(inputs, BIGRAM_MULTIPLIERS, buckets - 1, missing=buckets - 1)


def bigram_sign_rows(inputs: Tensor) -> Tensor:
    """The sign table's row of every position of inputs (T,): (T,) int32 in [0, SIGN_ROWS)."""
    return ngram_hash(inputs, SIGN_MULTIPLIERS, SIGN_ROWS, missing=0)


def bigram_sign_table(seed: int, dim: int) -> Tensor:
    """(SIGN_ROWS, dim) of +-1 from a generator of its own: the same table on every rank without a broadcast
    (the public script's is unseeded and broadcast), and the other initialisations keep their random stream."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (SIGN_ROWS, dim), generator=generator, device="cpu")
    return (2 * bits - 1).float()


def smear(e: Tensor, gate_weight: Tensor, smear_lambda: Tensor) -> Tensor:
    """e (T, d): e_t + lambda * sigmoid(w . e_t[:12]) * e_{t-1} for t >= 1. Crosses document boundaries, as the
    public script does."""
    gate = torch.sigmoid(F.linear(e[1:, :SMEAR_GATE_INPUTS], gate_weight))  # (T - 1, 1)
    return torch.cat([e[:1], e[1:] + smear_lambda * gate * e[:-1]])


class GateNetwork(nn.Module):
    """Per-token gates (T, outputs) from z (T, d): (GELU(z W1^T) W2^T + b2) * scale. W1 is Kaiming-uniform
    (U(+-1/sqrt(d))), W2 zero: at init every output equals its init value, whatever z."""

    def __init__(self, dim: int, hidden: int, init_values: Tensor, learnable_scale: bool):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, dim).uniform_(-dim**-0.5, dim**-0.5))
        self.w2 = nn.Parameter(torch.zeros(len(init_values), hidden))
        self.b2 = nn.Parameter(init_values / GATE_SCALE_INIT)  # stored divided by the scale
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(GATE_SCALE_INIT))
        else:
            self.scale = GATE_SCALE_INIT

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(z, self.w1)), self.w2, self.b2) * self.scale


def gate_init_values(net: str, outputs: int) -> Tensor:
    """(outputs,) the init value of each output of the pre or the post gate, from the column tables above."""
    values = torch.zeros(outputs)
    assignments = [(OUTPUT_GATE_COLUMNS.values(), OUTPUT_GATE_INIT), (BIGRAM_GATE_COLUMNS.values(), BIGRAM_GATE_INIT),
                   ([SKIP_GATE_COLUMNS], SKIP_GATE_INIT), ([DC_W1_COLUMNS], DC_W1_INIT)]
    for places, value in assignments:
        for place_net, columns in places:
            if place_net == net:
                values[columns] = value
    return values


def coefficient_init_values(init: dict[int, float], outputs: int) -> Tensor:
    return torch.tensor([init.get(k, 0.0) for k in range(outputs)])


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Parameter(uniform_init_(torch.empty(hidden, dim), MATRIX_INIT_STD))
        self.proj = nn.Parameter(torch.zeros(hidden, dim))  # (hidden, d): out = relu(x fc^T)^2 proj

    def forward(self, x: Tensor, fp8_state: "MLPFP8Slot | None" = None) -> Tensor:
        return mlp_forward(x, self.fc, self.proj, fp8_state)


class Block(nn.Module):
    """Layer i's weights: attention (none on layer 6) and the MLP; the update itself is GPT.layer."""

    def __init__(self, s: Settings, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(s, layer) if layer in ATTENTION_LAYERS else None
        self.mlp = MLP(s.model_dim, s.mlp_hidden)


@dataclass
class LayerInputs:
    """What the layers read besides the residual x, for one forward over T tokens."""
    x0: Tensor  # (T, d) normed smeared token embedding
    bigram: Tensor  # (T, d) signed bigram vector b
    value_embeds: Tensor  # (5, T, d): table k feeds layer VALUE_EMBED_LAYERS[k]
    pre_gates: Tensor  # (T, PRE_GATE_OUTPUTS)
    masks: AttentionMasks  # this buffer's, from GPT.masks_for
    slot: Tensor | None  # 0-d int64: the accumulation slot, whose FP8 MLP scales training uses; None: no FP8
    caches: dict[int, Tensor]  # residual snapshots: 0 (layer 0's input), 3, 7 (after their MLPs), 9
    post_gates: Tensor | None = None  # (T, POST_GATE_OUTPUTS), from the start of layer 4
    past: "dict[int, LayerCache] | None" = None  # decoding (section 4c): each attention layer's earlier tokens

    def gate(self, place: tuple[str, slice]) -> Tensor:
        net, columns = place
        return (self.pre_gates if net == "pre" else self.post_gates)[:, columns]


class GPT(nn.Module):
    """The record's 11-layer network up to the normed final hidden states (the loss is section 5's). Parameter
    names are the optimizer's keys (section 6); the buffers tied, long_window_tokens and the rotary's are
    training state."""

    def __init__(self, s: Settings, attention_backend: str):
        super().__init__()
        self.block_size, self.attention_backend = s.block_size, attention_backend
        self.num_heads, self.head_dim, self.bigram_buckets = s.num_heads, s.head_dim, s.bigram_buckets
        dim, vocab = s.model_dim, padded_vocab_size(s.vocab_size)
        self.lm_head = nn.Parameter(torch.empty(dim, vocab).normal_(0.0, HEAD_INIT_STD))  # (d, V)
        # The token embedding is lm_head^T while tied (its gradient flows into lm_head); untie() fills embed.
        self.embed = nn.Parameter(self.lm_head.detach().T.clone())  # (V, d)
        self.register_buffer("tied", torch.tensor(True))
        self.embedding_is_head = True  # Python copy of `tied`: the forward branches on it without a device read
        self.bigram_embed = nn.Parameter(torch.zeros(s.bigram_buckets, dim))
        self.register_buffer("bigram_signs", bigram_sign_table(s.seed, dim).to(torch.get_default_device()))
        self.value_embeds = nn.Parameter(torch.randn(len(VALUE_EMBED_LAYERS) * vocab, dim) * VALUE_EMBED_INIT_STD)
        self.smear_gate = nn.Parameter(torch.zeros(1, SMEAR_GATE_INPUTS))
        scalars = torch.tensor(ATTENTION_LAMBDAS_INIT * NUM_LAYERS + (SMEAR_LAMBDA_INIT, SKIP_LAMBDA_INIT))
        self.scalars = nn.Parameter(scalars)
        self.resid_lambdas = nn.Parameter(torch.full((NUM_LAYERS, 2), RESID_LAMBDA_INIT))  # (attention, MLP)
        self.post_lambdas = nn.Parameter(torch.full((NUM_LAYERS, 2), POST_LAMBDA_INIT))
        self.ve_gate_bank = nn.Parameter(torch.zeros(len(VALUE_EMBED_LAYERS), s.num_heads, 2 * VE_GATE_INPUTS))
        self.pre_gate = GateNetwork(dim, s.gate_hidden, gate_init_values("pre", PRE_GATE_OUTPUTS), True)
        self.post_gate = GateNetwork(dim, s.gate_hidden, gate_init_values("post", POST_GATE_OUTPUTS), True)
        self.mudd0 = GateNetwork(dim, s.gate_hidden, coefficient_init_values(MUDD0_INIT, MUDD0_OUTPUTS), False)
        self.mudd1 = GateNetwork(dim, s.gate_hidden, coefficient_init_values(MUDD1_INIT, MUDD1_OUTPUTS), False)
        self.blocks = nn.ModuleList(Block(s, i) for i in range(NUM_LAYERS))
        self.rotary = Rotary(s.head_dim)  # shared by the layers; YaRN changes it with the long window
        self.register_buffer("long_window_tokens", torch.tensor(0))  # the rotary's long window; 0: not set yet
        self.mlp_fp8 = MLPFP8State(s.slots_per_step, NUM_LAYERS)  # the MLPs' delayed FP8 scales, per slot
        self.long_window = 0  # Python copy of long_window_tokens
        self.checkpoint_blocks = 0  # training recomputes layers 0..N-1 in backward (MemorySavers; build_model sets it)
        self.register_load_state_dict_post_hook(GPT._read_host_copies)

    @staticmethod
    def _read_host_copies(module: "GPT", incompatible_keys):
        # a loaded checkpoint decides; one device read per buffer, at load, never in a step
        module.embedding_is_head = bool(module.tied)
        module.long_window = int(module.long_window_tokens)

    def untie(self):
        """From now on the token embedding is its own parameter, starting as lm_head^T."""
        if not self.embedding_is_head:
            raise RuntimeError("the embedding and the LM head are already untied")
        with torch.no_grad():
            self.embed.copy_(self.lm_head.T)
            self.tied.fill_(False)
        self.embedding_is_head = False

    def set_long_window(self, tokens: int):
        """The training long window, in tokens; call it before each step (it acts only on a change). The first
        call only records it: the rotary starts at the first stage's window. A change updates the rotary by
        YaRN. The final validation's wider window takes no update (as the public script), so it is not set."""
        if tokens == self.long_window:
            return
        if self.long_window:
            self.rotary.apply_yarn(self.long_window, tokens)
        self.long_window = tokens
        self.long_window_tokens.fill_(tokens)

    def masks_for(self, batch, short_blocks: int, long_blocks: int) -> AttentionMasks:
        return attention_masks(batch.document_ids, short_blocks, long_blocks, self.block_size, self.attention_backend)

    def hidden(self, batch, masks: AttentionMasks, slot: Tensor | None) -> Tensor:
        """The normed final hidden states (T, d) of batch.inputs (T,). slot (0-d int64 device tensor): a training
        forward with the FP8 MLP, using that accumulation slot's delayed scales; None: no FP8 (evaluation)."""
        x, inputs = self.embed_inputs(batch.inputs, masks, slot)
        for i in range(NUM_LAYERS):
            x = self.layer(i, x, inputs)
        return rms_norm(self.final_mix(x, inputs))

    def embed_inputs(self, tokens: Tensor, masks: AttentionMasks, slot: Tensor | None) -> tuple[Tensor, LayerInputs]:
        """Layer 0's input x = x0 + g_b b (T, d), and what the layers read."""
        table = self.lm_head.T if self.embedding_is_head else self.embed  # (V, d)
        x0 = rms_norm(smear(F.embedding(tokens, table), self.smear_gate, self.scalars[SMEAR_LAMBDA]))
        bigram = (F.embedding(bigram_hash(tokens, self.bigram_buckets), self.bigram_embed)
                  * F.embedding(bigram_sign_rows(tokens), self.bigram_signs))
        vocab = self.lm_head.size(1)
        table_offsets = torch.arange(len(VALUE_EMBED_LAYERS), device=tokens.device)[:, None] * vocab
        value_embeds = F.embedding(tokens[None, :] + table_offsets, self.value_embeds)  # (5, T, d)
        inputs = LayerInputs(x0, bigram, value_embeds, self.pre_gate(x0), masks, slot, caches={})
        x = inputs.caches[0] = x0 + inputs.gate(BIGRAM_GATE_COLUMNS[0]) * bigram
        return x, inputs

    def layer(self, i: int, x: Tensor, inputs: LayerInputs) -> Tensor:
        """Layer i's update of the residual x (T, d); records the post gate, the caches and the FP8 MLP's
        measured scales on the way. A checkpointed layer (i < checkpoint_blocks, with gradients) keeps only x
        and recomputes the update in backward (compiled, inductor's partitioner keeps the FP8 MLP's saved
        tensors: an autograd.Function); the records stay outside the recomputed part, so a recompute
        writes no FP8 scale a second time, and reads the scales the forward read (end_step changes them only
        after the step's last backward)."""
        if i == POST_GATE_LAYER:
            inputs.post_gates = self.post_gate(x)
        if i == MUDD_LAYER:
            inputs.caches[9] = x
        update = functools.partial(self.layer_update, i, inputs=inputs)
        if i < self.checkpoint_blocks and torch.is_grad_enabled():
            x, *measured = checkpoint(update, x, use_reentrant=False)
        else:
            x, *measured = update(x)
        if measured:
            self.mlp_fp8.at(inputs.slot, i).record(*measured)
        if i in CACHED_LAYERS:
            inputs.caches[i] = x
        return x

    def layer_update(self, i: int, x: Tensor, inputs: LayerInputs) -> tuple[Tensor, ...]:
        """(x after layer i, then with the FP8 MLP the next scales it measured: act, weight); reads inputs only."""
        if i == MUDD_LAYER:
            return self.mudd_layer(x, inputs)
        if i == SKIP_LAYER:
            skip_weight = torch.sigmoid(self.scalars[SKIP_LAMBDA]) * inputs.gate(SKIP_GATE_COLUMNS)
            x = x + skip_weight * inputs.caches[3]
        else:
            a = rms_norm(inputs.caches[7] if i in LAYER7_READERS else x)
            y = self.attention(i, a, inputs, self.value_addition(i, a, inputs))
            x = (self.resid_lambdas[i, 0] * x + self.post_lambdas[i, 0] * y
                 + inputs.gate(X0_GATE_COLUMNS[i]) * inputs.x0)
            if i > 0:  # layer 0's bigram vector is in its input already
                x = x + inputs.gate(BIGRAM_GATE_COLUMNS[i]) * inputs.bigram
        out, *measured = self.mlp(i, rms_norm(x), inputs)
        return self.resid_lambdas[i, 1] * x + self.post_lambdas[i, 1] * out, *measured

    def attention(self, i: int, a: Tensor, inputs: LayerInputs, aux_v: Tensor | None) -> Tensor:
        """Layer i's attention on the normed input a (T, d), with the per-token gates it takes."""
        def columns(table: dict) -> Tensor | None:
            return inputs.gate(table[i]) if i in table else None

        dc = (inputs.gate(DC_W1_COLUMNS), inputs.gate(DC_W2_COLUMNS)) if i == MUDD_LAYER else (None, None)
        return self.blocks[i].attn(a, inputs.masks, self.rotary, self.scalars[2 * i:2 * i + 2], aux_v=aux_v,
                                   xsa_alpha=columns(XSA_ALPHA_COLUMNS), output_gate=columns(OUTPUT_GATE_COLUMNS),
                                   dc_w1=dc[0], dc_w2=dc[1], past=None if inputs.past is None else inputs.past[i])

    def value_addition(self, i: int, a: Tensor, inputs: LayerInputs) -> Tensor | None:
        """aux_v (T, heads, head_dim) added to layer i's values: the value embedding, gated per head by
        2 sigmoid([a[:6], ve[:6]] G^T) (G = 0 at init: gate 1). Layer 10's comes from mudd_layer."""
        if i not in VALUE_EMBED_LAYERS:
            return None
        table = VALUE_EMBED_LAYERS.index(i)
        ve = inputs.value_embeds[table]  # (T, d)
        gate_input = torch.cat([a[:, :VE_GATE_INPUTS], ve[:, :VE_GATE_INPUTS]], dim=-1)  # (T, 12)
        head_gates = 2 * torch.sigmoid(F.linear(gate_input, self.ve_gate_bank[table]))  # (T, heads)
        return head_gates[:, :, None] * ve.view(-1, self.num_heads, self.head_dim)

    def mudd_layer(self, x: Tensor, inputs: LayerInputs) -> tuple[Tensor, ...]:
        """Layer 10, mixed by MUDD0's 14 coefficients (see MU_* above); returns as layer_update."""
        caches, num_tokens = inputs.caches, x.size(0)
        mu = self.mudd0(x)  # (T, 14)

        def m(k: int) -> Tensor:
            return mu[:, k:k + 1]  # (T, 1)

        v_mudd = m(MU_V_CACHE0) * caches[0] + m(MU_V_CACHE7) * caches[7] + m(MU_V_X) * x
        x = (1 + m(MU_X_EXTRA)) * x + m(MU_X_CACHE0) * caches[0] + m(MU_X_CACHE7) * caches[7]
        half = self.num_heads // 2
        head_gates = torch.cat([m(MU_VE_FIRST_HEADS).expand(num_tokens, half),
                                m(MU_VE_LAST_HEADS).expand(num_tokens, half)], dim=1)  # (T, heads)
        ve = inputs.value_embeds[VALUE_EMBED_LAYERS.index(MUDD_LAYER)]
        aux_v = (head_gates[:, :, None] * ve.view(num_tokens, self.num_heads, self.head_dim)
                 + v_mudd.view(num_tokens, self.num_heads, self.head_dim))
        y = self.attention(MUDD_LAYER, rms_norm(caches[7]), inputs, aux_v)
        x = m(MU_ATTN_X) * x + m(MU_ATTN_Y) * y + m(MU_ATTN_CACHE0) * caches[0] + m(MU_ATTN_BIGRAM) * inputs.bigram
        out, *measured = self.mlp(MUDD_LAYER, rms_norm(x), inputs)
        return m(MU_MLP_X) * x + m(MU_MLP_Y) * out, *measured

    def mlp(self, i: int, x: Tensor, inputs: LayerInputs) -> tuple[Tensor, ...]:
        """Layer i's MLP on the normed x: (out,), or in a training forward with a slot (out, next act scale,
        next weight scale) in FP8 with the slot's scales (mlp_forward_measured); the caller records them."""
        if inputs.slot is None:
            return (self.blocks[i].mlp(x),)
        mlp = self.blocks[i].mlp
        return mlp_forward_measured(x, mlp.fc, mlp.proj, self.mlp_fp8.at(inputs.slot, i))

    def final_mix(self, x: Tensor, inputs: LayerInputs) -> Tensor:
        """MUDD1 after the loop: x + sum of nu_k * (cache0, cache7, cache9, ve_0, cache3)."""
        nu = self.mudd1(x)  # (T, 5)
        caches = inputs.caches
        sources = {NU_CACHE0: caches[0], NU_CACHE7: caches[7], NU_CACHE9: caches[9],
                   NU_VE0: inputs.value_embeds[0], NU_CACHE3: caches[3]}
        for k, source in sources.items():
            x = x + nu[:, k:k + 1] * source
        return x


def build_model(s: Settings, runtime: Runtime) -> GPT:
    """The seeded model on the runtime's device, in the fact sheet's dtypes (bf16 on the GPU but the
    FP32_PARAMETERS; fp32 on CPU)."""
    torch.manual_seed(s.seed)
    with runtime.device:
        model = GPT(s, runtime.attention_backend)
    for name, parameter in model.named_parameters():
        if name not in FP32_PARAMETERS:
            parameter.data = parameter.data.to(runtime.compute_dtype)
    model.bigram_signs = model.bigram_signs.to(runtime.compute_dtype)
    model.checkpoint_blocks = runtime.savers.checkpoint_blocks
    return model


# 4c. Decoding (sample.py, evals/hellaswag.py): the network as a language model over a token sequence read as the
# validation reads one: documents start at BOS, the final validation's windows, no FP8, the same logits (soft-capped,
# in the compute dtype, over every column of the head: the padded columns past vocab_size are in the validation
# loss's softmax too; a sampler drops them). sequence_logits runs the training forward, GPT.hidden, on the whole
# sequence. A Decoder takes the tokens a few at a time: each new token attends to the cached keys and values of
# the tokens before it, and whatever reads the previous token gets it from the cache: the smear and the bigram
# hash (its id), the key offset (its key), the DC correction (the last dc_window - 1 keys). The rest is per token.


def inference_runtime(device: torch.device) -> Runtime:
    """One process evaluating on device: dense masks (no compilation needed, CPU or CUDA), no FP8."""
    return Runtime(rank=0, world_size=1, device=device, attention_backend="explicit", fp8=False)


def evaluation_logits(hidden: Tensor, head_weight: Tensor) -> Tensor:
    """hidden (T, d) -> (T, padded vocab): validation_loss_sum's soft-capped logits."""
    return softcap(head_logits(hidden, head_weight, fp8=False))


@torch.no_grad()
def sequence_logits(model: GPT, tokens: Tensor, s: Settings) -> Tensor:
    """tokens (T,) -> the logits (T, padded vocab) of the token after each, by the training forward."""
    length = tokens.numel()
    # the masks take whole blocks: BOS pads the end (no token sees a later one)
    inputs = F.pad(tokens, (0, -length % s.block_size), value=BOS)
    batch = Batch(inputs, targets=None, document_ids=document_ids_of(inputs))  # no targets: nothing is scored
    hidden = model.hidden(batch, model.masks_for(batch, *final_windows(s)), None)
    return evaluation_logits(hidden[:length], model.lm_head)


class LayerCache:
    """One attention layer's keys and values (N, H, D) of the N tokens decoded so far, as the layer attended
    with them (rotated, key offset applied, value additions in), and the last token's key before the offset."""

    def __init__(self):
        self.keys = self.values = self.last_key = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.size(0)

    def shift_stationary_keys(self, k: Tensor) -> Tensor:
        """shift_stationary_keys of k (T, H, D) continuing the cached tokens: k's first token takes the last's."""
        previous, self.last_key = self.last_key, k[-1:]
        return shift_stationary_keys(k) if previous is None else shift_stationary_keys(torch.cat([previous, k]))[1:]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds the new tokens' keys and values (T, H, D); returns all (N + T, H, D)."""
        self.keys = k if self.keys is None else torch.cat([self.keys, k])
        self.values = v if self.values is None else torch.cat([self.values, v])
        return self.keys, self.values


def decode_masks(document_ids: Tensor, new: int, short_blocks: int, long_blocks: int, block_size: int
                 ) -> AttentionMasks:
    """attention_masks' dense masks ("explicit"), of the last `new` tokens of document_ids (T,) (rows; 2 per
    token on the paired layers) over all T (columns), with no whole-block requirement."""
    window_blocks = {"short": short_blocks, "long": long_blocks}
    masks = {}
    for kind in MASK_KINDS:
        window, _, paired = kind.partition("_")
        rows = document_ids.repeat_interleave(2) if paired else document_ids
        positions = torch.arange(rows.numel(), device=rows.device)
        queries = positions[rows.numel() - new * (2 if paired else 1):]
        masks[kind] = window_mask_mod(rows, window_blocks[window] * block_size)(None, None, queries[:, None],
                                                                                positions[None, :])
    return AttentionMasks(masks, document_ids)


def dc_correction_of_last(q: Tensor, keys: Tensor, values: Tensor, w1: Tensor, w2: Tensor, document_ids: Tensor,
                          scale: Tensor, window: int) -> Tensor:
    """dc_correction of the last T = len(q) tokens of N (keys, values (N, H, D), document_ids (N,)): they see the
    last T + window - 1 keys at most. The tokens before them in that stretch get zero queries and weights, and
    their rows are dropped."""
    new, total = q.size(0), keys.size(0)
    first = max(0, total - new - window + 1)
    earlier = total - first - new

    def padded(t: Tensor) -> Tensor:  # (T, ...) -> (earlier + T, ...)
        return F.pad(t, (0, 0) * (t.dim() - 1) + (earlier, 0))

    return dc_correction(padded(q), keys[first:], values[first:], padded(w1), padded(w2), document_ids[first:],
                         scale, window)[earlier:]


class Decoder:
    """Incremental decoding of one token sequence: feed(tokens) appends tokens and returns the logits of the
    token after each (sequence_logits' rows for them); fork() is an independent copy (candidates that share a
    context)."""

    def __init__(self, model: GPT, s: Settings):
        self.model, self.windows, self.block_size = model, final_windows(s), s.block_size
        self.tokens = torch.empty(0, dtype=torch.int64, device=model.lm_head.device)
        self.layers = {i: LayerCache() for i in ATTENTION_LAYERS}

    @torch.no_grad()
    def feed(self, tokens: Tensor) -> Tensor:
        """tokens (T,) -> (T, padded vocab)."""
        model, start = self.model, self.tokens.numel()
        self.tokens = torch.cat([self.tokens, tokens.to(self.tokens)])
        masks = decode_masks(document_ids_of(self.tokens), tokens.numel(), *self.windows, self.block_size)
        # the smear and the bigram hash read the previous token: it is embedded again, and its row dropped
        x, inputs = model.embed_inputs(self.tokens[max(start - 1, 0):], masks, None)
        if start:
            x, inputs = x[1:], replace(inputs, x0=inputs.x0[1:], bigram=inputs.bigram[1:],
                                       value_embeds=inputs.value_embeds[:, 1:], pre_gates=inputs.pre_gates[1:],
                                       caches={0: x[1:]})
        inputs.past = self.layers
        for i in range(NUM_LAYERS):
            x = model.layer(i, x, inputs)
        return evaluation_logits(rms_norm(model.final_mix(x, inputs)), model.lm_head)

    def fork(self) -> "Decoder":
        twin = copy.copy(self)  # the caches' tensors are replaced, never changed in place: sharing them is safe
        twin.layers = {i: copy.copy(layer) for i, layer in self.layers.items()}
        return twin


# ----------------------------------------------------------------------------------------------------
# 5. Loss and FP8 ops
# The training loss (soft-capped logits, multi-token prediction and the prefix target, summed over tokens),
# the validation loss, the prefix table, and the FP8 matmuls of training (LM head, MLP) with record 89's
# numerics. Every FP8 product goes through scaled_mm: torch._scaled_mm on CUDA; on CPU the same arithmetic
# as an fp32 matmul of the FP8 values (CPU _scaled_mm is ~2,000x slower than fp32). No host syncs: scales
# stay on the device.

LOGIT_CAP = 23.0  # soft-capped logits z = LOGIT_CAP * sigmoid((logits + LOGIT_SHIFT) / LOGIT_SOFTNESS)
LOGIT_SHIFT = 5.0
LOGIT_SOFTNESS = 7.5
TRAIN_LOSS_CHUNK_TOKENS = 16 * 1024  # tokens per head+loss chunk in training (recomputed in backward)
EVAL_LOGITS_CHUNK = 16 * 1024  # tokens per head+loss chunk in validation (bounds the fp32 logits)
# On CPU both use chunks of 96 tokens: a 96 x 50,304 fp32 block (19 MB) stays under glibc's 32 MB mmap threshold;
# larger blocks are mapped and page-faulted afresh at every allocation, which doubled a tiny step's time.
CPU_LOSS_CHUNK_TOKENS = 96


def loss_chunk_tokens(device: torch.device, gpu_chunk: int) -> int:
    return gpu_chunk if device.type == "cuda" else CPU_LOSS_CHUNK_TOKENS


def train_loss_chunk_tokens(runtime) -> int:
    """The training loss's chunk: the memory saver's when set, else the device's default."""
    return runtime.savers.loss_chunk_tokens or loss_chunk_tokens(runtime.device, TRAIN_LOSS_CHUNK_TOKENS)


FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
HEAD_X_RANGE = 100.0  # FP8 head, fixed scales: x / (HEAD_X_RANGE / 448) and W / (HEAD_W_RANGE / 448) to e4m3,
HEAD_W_RANGE = 1.6  # the logit gradient / (HEAD_GRAD_RANGE / 448) to e5m2
HEAD_GRAD_RANGE = 0.75
MLP_ACT_HEADROOM = 1.8  # MLP down-projection, delayed scaling: next scale = headroom * this forward's amax / 448
MLP_WEIGHT_HEADROOM = 1.12
MLP_CURRENT_AMAX_STEPS = 16  # the first steps scale the down-projection weight by its current amax, no headroom
AMAX_FLOOR = 1e-12  # an all-zero tensor (the zero-initialised c_proj) still gets a finite scale
PREFIX_TABLE_FORMAT = 1  # bump when the table's definition changes: cached tables of another format are rebuilt


def fp32_scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d fp32 tensor on like's device (made there: no host-to-device copy)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def to_e4m3(t: Tensor) -> Tensor:
    return t.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def to_e5m2(t: Tensor) -> Tensor:
    return t.clamp(-FP8_E5M2_MAX, FP8_E5M2_MAX).to(torch.float8_e5m2)  # saturating, as the public kernel


def check_fp8_shapes(a: Tensor, b: Tensor):
    # cuBLAS FP8 needs every dimension divisible by 16; the CPU emulation accepts more, so check everywhere
    if a.ndim != 2 or b.ndim != 2 or a.size(1) != b.size(0) or a.size(0) % 16 or a.size(1) % 16 or b.size(1) % 16:
        raise ValueError(f"FP8 matmul needs (m, k) @ (k, n) with m, k, n divisible by 16, got {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")


def scaled_mm(a8: Tensor, b8: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
              fast_accum: bool) -> Tensor:
    """(a8 @ b8) * scale_a * scale_b in out_dtype, accumulated in fp32: a8 (m, k), b8 (k, n) FP8, scales 0-d fp32."""
    check_fp8_shapes(a8, b8)
    if a8.is_cuda:
        # cuBLAS wants a row-major first and a column-major second operand (no copy when they already are)
        return torch._scaled_mm(a8.contiguous(), b8.T.contiguous().T, scale_a=scale_a, scale_b=scale_b,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    return (a8.float() @ b8.float()).mul_(scale_a * scale_b).to(out_dtype)


# The FP8 LM head: logits = x @ W with fixed scales, as a custom op with its own backward (torch._scaled_mm has
# no autograd). On CUDA the bodies run under torch.compile, which fuses each scale + cast (+ transposed copy)
# into one kernel; on CPU they run eagerly.


def fp8_head_forward_body(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x_f8 = to_e4m3(x.float() / (HEAD_X_RANGE / FP8_E4M3_MAX))
    w_f8 = to_e4m3(w.float() / (HEAD_W_RANGE / FP8_E4M3_MAX))
    logits = scaled_mm(x_f8, w_f8, fp32_scalar(HEAD_X_RANGE / FP8_E4M3_MAX, x),
                       fp32_scalar(HEAD_W_RANGE / FP8_E4M3_MAX, x), x.dtype, fast_accum=True)
    return logits, x_f8, w_f8


def fp8_head_backward_body(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    grad_f8 = to_e5m2(grad.float() / (HEAD_GRAD_RANGE / FP8_E4M3_MAX))
    grad_scale = fp32_scalar(HEAD_GRAD_RANGE / FP8_E4M3_MAX, grad)
    grad_x = scaled_mm(grad_f8, w_f8.T, grad_scale, fp32_scalar(HEAD_W_RANGE / FP8_E4M3_MAX, grad), grad.dtype,
                       fast_accum=False)
    grad_w = scaled_mm(x_f8.T, grad_f8, fp32_scalar(HEAD_X_RANGE / FP8_E4M3_MAX, grad), grad_scale, torch.float32,
                       fast_accum=False)
    return grad_x, grad_w


# dynamic=False: one static graph per operand shape (one per chunk length)
fp8_head_forward_compiled = torch.compile(fp8_head_forward_body, dynamic=False)
fp8_head_backward_compiled = torch.compile(fp8_head_backward_body, dynamic=False)


@torch.library.custom_op("record89::fp8_head", mutates_args=())
def fp8_head_op(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, d) @ w (d, V) in FP8: (logits in x's dtype, x in e4m3, w in e4m3)."""
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("the FP8 head needs contiguous x (tokens, d) and w (d, vocab)")
    return (fp8_head_forward_compiled if x.is_cuda else fp8_head_forward_body)(x, w)


@fp8_head_op.register_fake
def _(x: Tensor, w: Tensor):
    return (x.new_empty(x.size(0), w.size(1)), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("record89::fp8_head_backward", mutates_args=())
def fp8_head_backward_op(grad: Tensor, x_f8: Tensor, w_f8: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x in grad's dtype, grad_w in fp32) of the FP8 head."""
    return (fp8_head_backward_compiled if grad.is_cuda else fp8_head_backward_body)(grad, x_f8, w_f8)


@fp8_head_backward_op.register_fake
def _(grad: Tensor, x_f8: Tensor, w_f8: Tensor):
    return grad.new_empty(x_f8.shape), grad.new_empty(w_f8.shape, dtype=torch.float32)


def _fp8_head_setup_context(ctx, inputs, output):
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.weight_dtype = inputs[1].dtype
    ctx.set_materialize_grads(False)


def _fp8_head_backward(ctx, grad_logits, *_unused_grads):
    x_f8, w_f8 = ctx.saved_tensors
    grad_x, grad_w = fp8_head_backward_op(grad_logits, x_f8, w_f8)
    return grad_x, grad_w.to(ctx.weight_dtype)  # dW comes out in fp32; the parameter's gradient has its dtype


fp8_head_op.register_autograd(_fp8_head_backward, setup_context=_fp8_head_setup_context)


def head_logits(x: Tensor, head_weight: Tensor, fp8: bool) -> Tensor:
    """x (T, d) @ head_weight (d, V): through the FP8 head op, or a plain matmul in x's dtype."""
    if fp8:
        return fp8_head_op(x, head_weight)[0]
    return x @ head_weight.type_as(x)


def softcap(logits: Tensor) -> Tensor:
    """z = 23 sigmoid((logits + 5) / 7.5), in the logits' dtype (bf16 on GPU, as the public validation)."""
    return LOGIT_CAP * torch.sigmoid((logits + LOGIT_SHIFT) / LOGIT_SOFTNESS)


def softcap_fraction(logits: Tensor) -> Tensor:
    """u = sigmoid((logits + 5) / 7.5) (z = 23 u): fp32 (fp64 stays), rounded to the logits' dtype as the public
    kernel stores it in bf16."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.sigmoid((wide + LOGIT_SHIFT) / LOGIT_SOFTNESS).to(logits.dtype).to(wide.dtype)


class SoftcappedMultiTargetCE(torch.autograd.Function):
    """sum over rows and targets of weight * CE(softcap(logits row), target); the gradient of a row is the
    public kernel's: grad_scale * (23/7.5) u(1-u) (softmax_weight * softmax(z) - sum of the matching weights)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target_ids: Tensor, target_weights: Tensor, softmax_weight: Tensor) -> Tensor:
        # logits (C, V); target_ids, target_weights (C, J) with weight 0 where the id is -1; softmax_weight (C,)
        z = LOGIT_CAP * softcap_fraction(logits)  # (C, V) fp32
        lse = torch.logsumexp(z, dim=-1)  # (C,): once per row for all J targets
        target_z = z.gather(1, target_ids.clamp_min(0))  # (C, J)
        ctx.save_for_backward(logits, target_ids, target_weights, softmax_weight, lse)
        return (target_weights * (lse[:, None] - target_z)).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, target_ids, target_weights, softmax_weight, lse = ctx.saved_tensors
        u = softcap_fraction(logits)
        grad_z = torch.exp(LOGIT_CAP * u - lse[:, None]).mul_(softmax_weight[:, None])
        grad_z.scatter_add_(1, target_ids.clamp_min(0), -target_weights.to(grad_z.dtype))
        grad_logits = grad_z.mul_(u * (1 - u)).mul_(grad_loss * (LOGIT_CAP / LOGIT_SOFTNESS))
        return grad_logits.to(logits.dtype), None, None, None


def training_loss_chunk(hidden: Tensor, head_weight: Tensor, target_ids: Tensor, target_weights: Tensor,
                        softmax_weight: Tensor, fp8: bool) -> Tensor:
    """The summed loss of one chunk of rows (see training_loss); section 8 may compile it."""
    return SoftcappedMultiTargetCE.apply(head_logits(hidden, head_weight, fp8), target_ids, target_weights,
                                         softmax_weight)


def training_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, prefix_targets: Tensor, mtp_weights: Tensor,
                  prefix_weight: Tensor, fp8: bool, chunk_tokens: int = TRAIN_LOSS_CHUNK_TOKENS,
                  chunk_loss: Callable = training_loss_chunk) -> Tensor:
    """The training objective of one buffer, SUMMED over its tokens (fact sheet 2.7):
    sum_t [ sum_k w_k CE(z_t, targets[t + k - 1]) (k = 1..K, only where t + k - 1 < T) + w_p CE(z_t, prefix_t)
    (only where prefix_t >= 0) ], with z = 23 sigmoid((hidden @ head_weight + 5) / 7.5) over all padded columns
    and no masking at document boundaries.

    hidden (T, d) normed final states in the compute dtype; head_weight (d, V); targets (T,) int64, the buffer's
    shifted targets; prefix_targets (T,) int64, -1 where none; mtp_weights (K,) and prefix_weight () device
    tensors (they change per step without a recompile; K changes per stage). fp8: the head matmul in FP8.
    Chunks of chunk_tokens rows are recomputed in backward, so only one chunk's logits live at a time.
    The gradient is the public kernel's: the softmax term of a row is weighted by prefix_weight (where the prefix
    is valid) plus ALL K MTP weights, also in the last K - 1 rows whose loss skips the targets past the buffer's
    end. There the gradient is not that of the loss returned, as in the public script (fact sheet section 3)."""
    num_mtp = mtp_weights.numel()
    # column k - 1 holds the target of offset k, -1 past the buffer's end; the last column the prefix target
    offset_targets = [F.pad(targets[k:], (0, k), value=-1) for k in range(num_mtp)]
    target_ids = torch.stack(offset_targets + [prefix_targets], dim=1)  # (T, K + 1)
    weights = torch.cat([mtp_weights, prefix_weight.view(1)]).float()  # (K + 1,)
    target_weights = torch.where(target_ids >= 0, weights, 0.0)  # (T, K + 1)
    # the public kernel's S_w: ALL K MTP weights, also in the last K - 1 rows (its odd gradient there), + w_p if valid
    softmax_weight = mtp_weights.float().sum() + torch.where(prefix_targets >= 0, prefix_weight.float(), 0.0)  # (T,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        chunk = (hidden[rows], head_weight, target_ids[rows], target_weights[rows], softmax_weight[rows], fp8)
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, *chunk, use_reentrant=False)  # keeps the inputs, recomputes logits
        else:
            total = total + chunk_loss(*chunk)
    return total


def validation_loss_sum(hidden: Tensor, head_weight: Tensor, targets: Tensor,
                        chunk_tokens: int = EVAL_LOGITS_CHUNK) -> Tensor:
    """sum of CE(z_t, targets_t) over hidden (T, d): head matmul and softcap in the compute dtype (bf16 on GPU,
    as the public validation), CE in fp32. Chunked so the fp32 logits of a 262,144-token sequence never exist."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        capped = softcap(head_logits(hidden_chunk, head_weight, fp8=False))
        total = total + F.cross_entropy(capped.float(), target_chunk, reduction="sum")
    return total


# The prefix table: prefix(y) = the longest proper byte-prefix of token y's bytes that is itself a GPT-2 token,
# -1 if none (single bytes, the special token, padded ids). Built once from tiktoken's GPT-2 encoding and cached
# as a small file, so a run (and a GPU machine without the tokenizer) only loads it, outside the timed region.


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "speedrun"


def gpt2_encoding():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = f"not in TIKTOKEN_CACHE_DIR={cache}" if cache else "TIKTOKEN_CACHE_DIR is not set"
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # ImportError, or a failed download with various requests/OS errors
        raise DataError(f"the prefix table needs tiktoken's GPT-2 encoding, which could not be loaded ({where}; "
                        f"{type(error).__name__}): pip install tiktoken, and offline set TIKTOKEN_CACHE_DIR to a "
                        f"folder holding the encoding") from None


def compute_prefix_table(vocab_size: int, padded_vocab: int) -> Tensor:
    encoding = gpt2_encoding()
    if vocab_size > encoding.n_vocab:
        raise DataError(f"--vocab_size={vocab_size} exceeds the GPT-2 encoding's {encoding.n_vocab} tokens: the "
                        "prefix table needs GPT-2 token ids")
    special = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    token_bytes = {token: encoding.decode_single_token_bytes(token) for token in range(vocab_size)
                   if token not in special}
    token_of = {data: token for token, data in token_bytes.items()}
    table = [-1] * padded_vocab
    for token, data in token_bytes.items():
        for end in range(len(data) - 1, 0, -1):  # longest proper prefix first
            if data[:end] in token_of:
                table[token] = token_of[data[:end]]
                break
    return torch.tensor(table, dtype=torch.int64)


def load_cached_prefix_table(path: Path, vocab_size: int, padded_vocab: int) -> Tensor | None:
    """The cached table, or None when it is missing, unreadable or of another format or size (stale)."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception:  # missing, truncated or not a torch file: rebuilt
        return None
    expected = dict(format=PREFIX_TABLE_FORMAT, encoding="gpt2", vocab_size=vocab_size, padded_vocab=padded_vocab)
    if not isinstance(cached, dict) or any(cached.get(key) != value for key, value in expected.items()):
        return None
    table = cached.get("table")
    if (not isinstance(table, Tensor) or table.dtype != torch.int64 or table.shape != (padded_vocab,)
            or table.min() < -1 or table.max() >= vocab_size or (table[vocab_size:] != -1).any()):
        return None
    return table


def build_prefix_table(vocab_size: int, padded_vocab: int, cache_dir: Path | None = None) -> Tensor:
    """(padded_vocab,) int64: each token's prefix token (-1 where none). Loaded from cache_dir (default
    ~/.cache/speedrun) when a valid copy is there, else built from tiktoken's GPT-2 encoding and cached. Call it
    at start-up, outside the timed region."""
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"gpt2_prefix_table_{vocab_size}_{padded_vocab}.pt"
    table = load_cached_prefix_table(path, vocab_size, padded_vocab)
    if table is not None:
        return table
    table = compute_prefix_table(vocab_size, padded_vocab)
    record = dict(format=PREFIX_TABLE_FORMAT, encoding="gpt2", vocab_size=vocab_size, padded_vocab=padded_vocab,
                  table=table)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(record, partial)
        os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:  # a read-only cache only costs the rebuild next time
        pass
    return table


# The MLP: out = relu(x fc^T)^2 proj, x (T, d), fc and proj (H, d). With FP8 (training):
# - up-projection: x scaled by 448/amax(x) per call, fc by its own amax/448; scales and quotients in the compute
#   dtype (bf16 on GPU: the public script rounds them so), the dequant factor in fp32; the pre-activation is
#   rounded to the compute dtype and squared in it.
# - down-projection, delayed scaling: post / s_act and proj / s_w to e4m3 (clamped at 448), s_act = 1.8 amax(post
#   of the previous forward) / 448 (initially 1), s_w = 1.12 amax(proj at the previous forward) / 448, except in
#   the first 16 steps where s_w = amax(current proj) / 448. Every training forward measures both for its slot.
# - fc's scale and e4m3 copy are recomputed in every forward (the public script: once after each optimizer step;
#   the same values, as fc does not change within a step).
# - backward in the compute dtype from the saved x, fc, proj and post: dpre = 2 (g proj^T) sqrt(post).


class MLPFP8State(nn.Module):
    """The delayed scales of the FP8 MLP down-projection, per accumulation slot and layer: training state, kept
    in buffers so that checkpoints and the warm-up's restore include them.

    A slot is one training buffer of a step (Runtime.slots): micro-step k of one rank reads and writes slot k's
    row, so one rank with 8 micro-steps scales exactly as 8 ranks with one micro-step each (the public script
    keeps one s_act per rank, rewritten by each forward). A forward reads the scales in use and writes what it
    measured into the next_ buffers; end_step() makes those the scales of the next step. So a forward recomputed
    in backward (activation checkpointing) reads the same scales as the first time; GPT.layer records the
    measurements outside the recomputed part, so a recompute writes nothing. On W ranks a rank
    measures only its own slots' rows; the others stay stale here until combined.
    Pass the slot as a 0-d int64 device tensor in compiled code: torch.compile specialises on a python int's
    value and would compile the step once per slot; a tensor is an input, read with index_select (no .item())."""

    def __init__(self, slots_per_step: int, num_layers: int, device: torch.device | None = None):
        super().__init__()
        shape = (slots_per_step, num_layers)
        for name in ("act_scale", "weight_scale", "next_act_scale", "next_weight_scale"):
            self.register_buffer(name, torch.ones(shape, device=device))  # s_act, s_w (fp32); initially 1
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))  # steps ended so far

    def at(self, slot: Tensor | int, layer: int) -> "MLPFP8Slot":
        """The handle mlp_forward takes for this slot's forward of this layer."""
        if not isinstance(slot, Tensor):
            slot = torch.tensor(slot, device=self.act_scale.device)
        return MLPFP8Slot(self, slot.view(1), layer)

    @torch.no_grad()
    def end_step(self):
        """Call once per optimizer step, after its last backward: this step's measurements become the scales of
        the next step's forwards (no host sync)."""
        self.act_scale.copy_(self.next_act_scale)
        self.weight_scale.copy_(self.next_weight_scale)
        self.steps.add_(1)


@dataclass
class MLPFP8Slot:
    state: MLPFP8State
    slot: Tensor  # (1,) int64
    layer: int

    def read(self, buffer: Tensor) -> Tensor:
        return buffer[:, self.layer].index_select(0, self.slot).view(())

    def write(self, buffer: Tensor, value: Tensor):
        buffer[:, self.layer].index_copy_(0, self.slot, value.view(1).to(buffer.dtype))

    def record(self, next_act_scale: Tensor, next_weight_scale: Tensor):
        """This forward's measurements (0-d fp32): the scales of the next step."""
        self.write(self.state.next_act_scale, next_act_scale)
        self.write(self.state.next_weight_scale, next_weight_scale)


def fp8_up_projection(x: Tensor, fc: Tensor) -> Tensor:
    """post = relu(x fc^T)^2 (T, H) in x's dtype, from e4m3 x and fc with per-tensor current scales."""
    # scales and quotients each rounded once to x's dtype (bf16 on GPU), as the public script; float / tensor
    # would round a reciprocal first
    x_amax = x.abs().amax().clamp_min(AMAX_FLOOR)
    x_f8 = to_e4m3(x * (FP8_E4M3_MAX / x_amax.float()).to(x.dtype))
    fc = fc.type_as(x)
    fc_scale = (fc.abs().amax().float().clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX).to(x.dtype)
    fc_f8 = to_e4m3(fc / fc_scale)
    dequant = fc_scale.float() * x_amax.float() / FP8_E4M3_MAX  # fp32
    pre = scaled_mm(x_f8, fc_f8.T, dequant, fp32_scalar(1.0, x), x.dtype, fast_accum=True)
    return torch.relu(pre).square()


def fp8_down_projection(post: Tensor, proj: Tensor, act_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """post (T, H) @ proj (H, d) from e4m3 operands scaled by the given fp32 scales; output in post's dtype."""
    post_f8 = to_e4m3(post.float() / act_scale)
    proj_f8 = to_e4m3(proj.float() / weight_scale)
    return scaled_mm(post_f8, proj_f8, act_scale, weight_scale, post.dtype, fast_accum=True)


class ReLUSquareMLP(torch.autograd.Function):
    """(out, post): out = relu(x fc^T)^2 proj, through FP8 when the down-projection scales are given; post is
    returned for its amax (no gradient). Backward in the compute dtype from x, fc, proj and post only."""

    @staticmethod
    def forward(ctx, x: Tensor, fc: Tensor, proj: Tensor, act_scale: Tensor | None,
                weight_scale: Tensor | None) -> tuple[Tensor, Tensor]:
        if act_scale is None:
            post = torch.relu(x @ fc.type_as(x).T).square()  # (T, H)
            out = post @ proj.type_as(x)
        else:
            post = fp8_up_projection(x, fc)
            out = fp8_down_projection(post, proj, act_scale, weight_scale)
        ctx.save_for_backward(x, fc, proj, post)
        ctx.mark_non_differentiable(post)
        ctx.set_materialize_grads(False)
        return out, post

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_post: None):
        x, fc, proj, post = ctx.saved_tensors
        grad_relu = grad_out @ proj.type_as(x).T  # (T, H) g proj^T, rounded to the compute dtype
        # relu'(pre) relu(pre) = sqrt(post): the public kernel keeps only post
        wide = torch.promote_types(x.dtype, torch.float32)
        grad_pre = (2 * grad_relu.to(wide) * post.to(wide).sqrt()).to(x.dtype)
        grad_x = grad_pre @ fc.type_as(x)
        grad_fc = grad_pre.T @ x
        grad_proj = post.T @ grad_out
        return grad_x, grad_fc.to(fc.dtype), grad_proj.to(proj.dtype), None, None


def mlp_forward_measured(x: Tensor, fc: Tensor, proj: Tensor, fp8_state: MLPFP8Slot) -> tuple[Tensor, Tensor, Tensor]:
    """(out, next act scale, next weight scale): the FP8 training forward of relu(x fc^T)^2 proj (T, d), which
    reads fp8_state's delayed scales and returns what it measured for the next step without writing it (a
    recompute in backward then writes nothing: MLPFP8Slot.record stays outside it)."""
    state = fp8_state.state
    proj_amax = proj.detach().abs().amax().float().clamp_min(AMAX_FLOOR)
    delayed = state.steps >= MLP_CURRENT_AMAX_STEPS
    weight_scale = torch.where(delayed, fp8_state.read(state.weight_scale), proj_amax / FP8_E4M3_MAX)
    out, post = ReLUSquareMLP.apply(x, fc, proj, fp8_state.read(state.act_scale), weight_scale)
    post_amax = post.amax().float().clamp_min(AMAX_FLOOR)
    # fp32, in the public kernels' order: amax * headroom / 448
    return out, post_amax * MLP_ACT_HEADROOM / FP8_E4M3_MAX, proj_amax * MLP_WEIGHT_HEADROOM / FP8_E4M3_MAX


def mlp_forward(x: Tensor, fc: Tensor, proj: Tensor, fp8_state: MLPFP8Slot | None) -> Tensor:
    """relu(x fc^T)^2 proj (T, d) for x (T, d) and fc, proj (H, d). fp8_state (MLPFP8State.at(slot, layer)):
    a training forward in FP8, which reads that slot's delayed scales and records its measurements for the next
    step. None: the compute dtype (evaluation, or FP8 off), and no state is touched."""
    if fp8_state is None:
        return ReLUSquareMLP.apply(x, fc, proj, None, None)[0]
    out, next_act_scale, next_weight_scale = mlp_forward_measured(x, fc, proj, fp8_state)
    fp8_state.record(next_act_scale, next_weight_scale)
    return out


# ----------------------------------------------------------------------------------------------------
# 6. Optimizers


# torch 2.13 renamed the flat collectives (the old names warn); torch 2.11, on the GPU machines, has only the old
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

# NorMuon (fact sheet 2.8) orthogonalises these units: Q and K in groups of two adjacent heads (2j, 2j+1),
# V and O whole (rows of a layer's qkvo (4, d, d) viewed as (4d, d)); the MLP's fc and proj whole.
POLAR_EXPRESS_COEFFS = ((8.1566, -22.4833, 15.8788), (4.0429, -2.8089, 0.5000), (3.8917, -2.7725, 0.5061),
                        (3.2858, -2.3681, 0.4645), (2.3465, -1.7098, 0.4232))
POLAR_EXPRESS_NORM_SCALE = 1.02  # X = u / (1.02 ||u||_F + eps): singular values start safely below 1
POLAR_EXPRESS_EPS = 1e-6
NORMUON_VARIANCE_FLOOR = 1e-10  # v / sqrt(max(s, floor))
# Effective lr = muon_lr * sqrt(max(1, rows / cols)) * multiplier of the unit's kind: 0.023 for Q/K/V/O,
# 0.046 for fc (the shape factor 2), 0.092 for proj (the record's extra x2 for c_proj).
MUON_KIND_LR_MUL = {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "fc": 1.0, "proj": 2.0}
HEADS_PER_QK_UNIT = 2


@dataclass(frozen=True)
class AdamRow:
    betas: tuple[float, float]
    lr_mul: float
    wd_mul: float


# The Adam table of fact sheet 2.8, keyed by parameter name (section 4b's names).
ADAM_TABLE = {
    "scalars": AdamRow((0.9, 0.99), 5.0, 0.0),
    "smear_gate": AdamRow((0.9, 0.99), 0.01, 0.0),
    "ve_gate_bank": AdamRow((0.9, 0.99), 1.0, 1.0),
    "lm_head": AdamRow((0.5, 0.95), 1.0, 150.0),
    "embed": AdamRow((0.5, 0.95), 1.0, 150.0),
    "bigram_embed": AdamRow((0.75, 0.95), 75.0, 5.0),
    "value_embeds": AdamRow((0.75, 0.95), 75.0, 5.0),
    "post_lambdas": AdamRow((0.9, 0.95), 1.0, 0.0),
    "resid_lambdas": AdamRow((0.9, 0.95), 5.0, 0.0),
    **{f"{net}.{name}": AdamRow((0.9, 0.99), 0.25, 1.0 if name in ("w1", "w2") else 0.0)
       for net in ("mudd0", "mudd1") for name in ("w1", "w2", "b2")},
    **{f"{net}.{name}": AdamRow((0.9, 0.99), 0.1, 1.0 if name in ("w1", "w2") else 0.0)
       for net in ("pre_gate", "post_gate") for name in ("w1", "w2", "b2", "scale")},
}


def is_muon_parameter(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith((".attn.qkvo", ".mlp.fc", ".mlp.proj"))


def polar_express(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Approximates U V^T of x = U S V^T for each matrix of a stack x (..., rows, cols), computed in dtype.

    The roundings follow the record: B = bA + cA^2 is one baddbmm; square and wide matrices take
    aX + BX as one baddbmm, tall ones (the MLP's) X B, then + aX (rounded twice)."""
    shape = x.shape
    x = x.reshape(-1, *shape[-2:]).to(dtype)  # (units, rows, cols)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_NORM_SCALE + POLAR_EXPRESS_EPS)
    tall = shape[-2] > shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS:
        gram = x.mT @ x if tall else x @ x.mT  # the smaller Gram matrix
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.bmm(x, poly).add_(x, alpha=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x.view(shape)


# On CUDA one graph per unit shape (3 in the record); on CPU eager (the tests compare against it).
polar_express_compiled = torch.compile(polar_express, dynamic=False)


def normuon_variance_step(v: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon's per-row (rows >= cols) or per-column second-moment normalisation of v (units, rows, cols);
    second_moment (units, max(rows, cols)) is updated in place. The result keeps each unit's Frobenius norm."""
    by_rows = v.size(-2) >= v.size(-1)
    mean_square = v.square().mean(dim=-1 if by_rows else -2)  # (units, max(rows, cols))
    second_moment.lerp_(mean_square, 1 - beta2)
    scale = second_moment.clamp_min(NORMUON_VARIANCE_FLOOR).rsqrt()
    normalised = v * (scale.unsqueeze(-1) if by_rows else scale.unsqueeze(-2))
    norm_before = v.norm(dim=(-2, -1), keepdim=True)
    # all-zero units (padding, or a matrix with no gradient) stay zero instead of 0/0
    return normalised * (norm_before / normalised.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))


def cautious_decay_update(p: Tensor, update: Tensor, lr: Tensor | float, decay: Tensor | float,
                          strict: bool) -> Tensor:
    """p - lr * update - decay * p where update and p agree in sign ([update * p > 0] when strict, else >= 0)."""
    agree = update * p > 0 if strict else update * p >= 0
    return p - lr * update - decay * p * agree


def join_master(weight: Tensor, mantissa: Tensor) -> Tensor:
    """fp32 master = (bf16 bits << 16) | mantissa, as a bit view (little-endian: the low half comes first)."""
    return torch.stack([mantissa, weight.view(torch.int16)], dim=-1).view(torch.float32).squeeze(-1)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of join_master: the truncated bf16 weight and the 16 low bits (int16) of fp32 master."""
    halves = master.contiguous().view(torch.int16).unflatten(-1, (-1, 2))  # (..., cols, 2): low, high
    return halves[..., 1].contiguous().view(torch.bfloat16), halves[..., 0].contiguous()


@dataclass(frozen=True)
class MuonUnit:
    """One orthogonalised matrix: rows [start, stop) of the parameter viewed as (-1, cols)."""
    name: str
    param: nn.Parameter
    kind: str  # a key of MUON_KIND_LR_MUL
    start: int
    stop: int

    def rows(self, tensor: Tensor) -> Tensor:
        return tensor.view(-1, tensor.size(-1))[self.start:self.stop]


class MuonUnitGroup:
    """The units of one shape, padded with zero units to a multiple of the world size; rank r owns the
    contiguous chunk r (what a reduce-scatter of the stacked gradients hands it) and keeps its state:
    fp32 momentum and second moments and, for bf16 parameters, the 16-bit mantissa sidecars."""

    def __init__(self, units: list[MuonUnit], rank: int, world_size: int):
        self.units = units
        self.rows, self.cols = units[0].stop - units[0].start, units[0].param.size(-1)
        self.params = list({id(u.param): u.param for u in units}.values())
        self.per_rank = -(-len(units) // world_size)
        self.padded = self.per_rank * world_size
        self.owned = range(rank * self.per_rank, (rank + 1) * self.per_rank)
        self.owned_units = [units[i] if i < len(units) else None for i in self.owned]  # None: padding
        param = units[0].param
        self.sidecar = param.dtype == torch.bfloat16
        shape, device = (self.per_rank, self.rows, self.cols), param.device
        self.momentum = torch.zeros(shape, device=device)
        self.second_moment = torch.zeros(self.per_rank, max(self.rows, self.cols), device=device)
        self.mantissa = torch.zeros(shape, dtype=torch.int16, device=device) if self.sidecar else None
        lr_mul = [MUON_KIND_LR_MUL[u.kind] * max(1.0, self.rows / self.cols) ** 0.5 if u else 0.0
                  for u in self.owned_units]
        self.lr_mul = torch.tensor(lr_mul, device=device).view(-1, 1, 1)
        self.reduced_gradient: Tensor | None = None  # this rank's chunk, set by GradientCommunicator

    def stack_gradients(self, divisor: float = 1.0) -> Tensor:
        """All units' gradients / divisor, (padded, rows, cols), zeros for padding and missing gradients."""
        grads = [u.param.grad for u in self.units if u.param.grad is not None]
        dtype = grads[0].dtype if grads else self.units[0].param.dtype
        stack = torch.zeros(self.padded, self.rows, self.cols, dtype=dtype, device=self.momentum.device)
        for index, unit in enumerate(self.units):
            if unit.param.grad is not None:
                torch.div(unit.rows(unit.param.grad), divisor, out=stack[index])
        return stack

    def owned_gradient(self) -> Tensor:
        """(per_rank, rows, cols): the communicator's reduced chunk, or else this chunk of the .grads (which
        must then already be the mean over ranks)."""
        if self.reduced_gradient is not None:
            return self.reduced_gradient
        return self.stack_gradients()[self.owned.start:self.owned.stop]

    def owned_masters(self) -> Tensor:
        """fp32 master weights of the owned units, (per_rank, rows, cols), zeros for padding."""
        masters = torch.zeros_like(self.momentum)
        for index, unit in enumerate(self.owned_units):
            if unit is None:
                continue
            weight = unit.rows(unit.param.data)
            masters[index] = join_master(weight, self.mantissa[index]) if self.sidecar else weight
        return masters


class NorMuon:
    """NorMuon (fact sheet 2.8) for the attention and MLP matrices, sharded by unit over the ranks.

    Per unit: Nesterov momentum in fp32, Polar Express (bf16 on GPU), the NorMuon variance step, then the
    update with cautious weight decay on the fp32 master weights. Each rank updates the units it owns and
    the new weights are all-gathered, so every world size computes what one process computes."""

    state_key = "normuon"  # its part of optimizer_state's dict

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], s: "Settings", runtime: Runtime):
        self.rank, self.world_size = runtime.rank, runtime.world_size
        self.lr, self.wd, self.beta2 = s.muon_lr, s.muon_wd, s.muon_beta2
        self.polar_dtype = runtime.compute_dtype
        units = [unit for name, param in named_params for unit in self.units_of(name, param, s)]
        shapes = list(dict.fromkeys((u.stop - u.start, u.param.size(-1), u.param.dtype) for u in units))
        self.groups = [MuonUnitGroup([u for u in units if (u.stop - u.start, u.param.size(-1), u.param.dtype)
                                      == shape], self.rank, self.world_size) for shape in shapes]
        self.params = [param for _, param in named_params]
        self.sharded_groups, self.replicated_params = self.groups, []  # what GradientCommunicator reduces

    @staticmethod
    def units_of(name: str, param: nn.Parameter, s: "Settings") -> list[MuonUnit]:
        if name.endswith(".attn.qkvo"):  # (4, d, d) = [Q; K; V; O], viewed as (4d, d)
            d, group_rows = s.model_dim, HEADS_PER_QK_UNIT * s.head_dim
            qk = [MuonUnit(name, param, kind, offset + j, offset + j + group_rows)
                  for kind, offset in (("q", 0), ("k", d)) for j in range(0, d, group_rows)]
            vo = [MuonUnit(name, param, kind, offset, offset + d)
                  for kind, offset in (("v", 2 * d), ("o", 3 * d))]
            return qk + vo
        return [MuonUnit(name, param, "fc" if name.endswith(".fc") else "proj", 0, param.size(0))]

    def updates_at(self, plan: "StepPlan") -> bool:
        return True

    @torch.no_grad()
    def step(self, plan: "StepPlan"):
        mu, lr = plan.muon_momentum, self.lr * plan.lr_factor
        orthogonalise = polar_express_compiled if self.params[0].is_cuda else polar_express
        pending = []  # (all-gather handle, gathered weights, group)
        for group in self.groups:
            grad = group.owned_gradient().to(group.momentum.dtype)
            group.momentum.lerp_(grad, 1 - mu)
            nesterov = torch.lerp(grad, group.momentum, mu)  # (1 - mu) g + mu buf
            v = normuon_variance_step(orthogonalise(nesterov, self.polar_dtype).to(grad.dtype), group.second_moment,
                                      self.beta2)
            unit_lr = group.lr_mul * lr  # (per_rank, 1, 1)
            # the decay is lr_eff * (wd * base lr * f): fact sheet 2.8, step 5
            master = cautious_decay_update(group.owned_masters(), v, unit_lr, unit_lr * (self.wd * lr),
                                           strict=False)
            if group.sidecar:
                weights, group.mantissa = split_master(master)
            else:
                weights = master.to(group.params[0].dtype)
            group.reduced_gradient = None
            if self.world_size == 1:
                self.write_weights(weights, group.owned_units)
                continue
            gathered = weights.new_empty(group.padded * weights[0].numel())  # flat: gloo wants 1-D
            handle = all_gather_single(gathered, weights.flatten(), async_op=True)
            pending.append((handle, gathered.view(group.padded, group.rows, group.cols), group))
        for handle, gathered, group in pending:
            handle.wait()
            self.write_weights(gathered, group.units)
        for param in self.params:
            param.grad = None

    @staticmethod
    def write_weights(weights: Tensor, units: list[MuonUnit | None]):
        for weight, unit in zip(weights, units):
            if unit is not None:
                unit.rows(unit.param.data).copy_(weight)

    def named_state(self) -> dict[tuple[str, int], dict[str, Tensor]]:
        """This rank's state by (parameter name, first row of the unit), on the CPU."""
        state = {}
        for group in self.groups:
            for index, unit in enumerate(group.owned_units):
                if unit is None:
                    continue
                entry = dict(momentum=group.momentum[index], second_moment=group.second_moment[index])
                if group.sidecar:
                    entry["mantissa"] = group.mantissa[index]
                state[unit.name, unit.start] = {key: value.cpu().clone() for key, value in entry.items()}
        return state

    def load_named_state(self, state: dict[tuple[str, int], dict[str, Tensor]]):
        for group in self.groups:
            for index, unit in enumerate(group.owned_units):
                if unit is None:
                    continue
                entry = state[unit.name, unit.start]
                group.momentum[index].copy_(entry["momentum"])
                group.second_moment[index].copy_(entry["second_moment"])
                if group.sidecar:
                    group.mantissa[index].copy_(entry["mantissa"])


class Adam:
    """Adam with the per-parameter table of fact sheet 2.8, bias correction by the number of Adam updates,
    and cautious weight decay. Replicated: every rank updates every parameter from the all-reduced gradient.
    A parameter without a gradient (the embedding while tied to the head) is left alone."""

    state_key = "adam"  # its part of optimizer_state's dict

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], s: "Settings"):
        for name, _ in named_params:
            if name not in ADAM_TABLE:
                raise ValueError(f"parameter {name} has no row in ADAM_TABLE (section 6): add its betas, lr_mul "
                                 "and wd_mul")
        self.named_params = named_params
        self.params = [param for _, param in named_params]
        self.sharded_groups, self.replicated_params = [], self.params  # what GradientCommunicator reduces
        self.lr, self.wd, self.eps = s.adam_lr, s.adam_wd, s.adam_eps
        self.updates = 0  # t of the bias correction
        # fp32 state (fp64 for fp64 parameters, in tests)
        self.moments = {name: (torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32)),
                               torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32)))
                        for name, param in named_params}

    def updates_at(self, plan: "StepPlan") -> bool:
        return plan.adam_updates

    @torch.no_grad()
    def step(self, plan: "StepPlan"):
        """On Adam steps only: one update from the gradients summed since the last one, which it then clears."""
        if not plan.adam_updates:
            return
        self.updates += 1
        t = self.updates
        for name, param in self.named_params:
            if param.grad is None:
                continue
            row = ADAM_TABLE[name]
            beta1, beta2 = row.betas
            exp_avg, exp_avg_sq = self.moments[name]
            grad = param.grad.to(exp_avg.dtype)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            lr = self.lr * row.lr_mul * plan.lr_factor
            update = exp_avg / (exp_avg_sq.sqrt() + self.eps) * (lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t))
            param.copy_(cautious_decay_update(param.to(exp_avg.dtype), update, 1.0, lr * lr * self.wd * row.wd_mul,
                                              strict=True))
            param.grad = None

    def untie(self, head: str = "lm_head", embed: str = "embed"):
        """The embedding's moments become the head's, transposed (head (d, V), embedding (V, d))."""
        for head_moment, embed_moment in zip(self.moments[head], self.moments[embed]):
            embed_moment.copy_(head_moment.mT)

    def named_state(self) -> dict:
        return dict(updates=self.updates, moments={name: (m.cpu().clone(), v.cpu().clone())
                                                   for name, (m, v) in self.moments.items()})

    def load_named_state(self, state: dict):
        self.updates = state["updates"]
        for name, (exp_avg, exp_avg_sq) in self.moments.items():
            exp_avg.copy_(state["moments"][name][0])
            exp_avg_sq.copy_(state["moments"][name][1])


def build_optimizers(model: nn.Module, s: "Settings", runtime: Runtime) -> tuple[NorMuon, Adam]:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return (NorMuon([(n, p) for n, p in named if is_muon_parameter(n)], s, runtime),
            Adam([(n, p) for n, p in named if not is_muon_parameter(n)], s))


def step_optimizers(optimizers, plan: "StepPlan"):
    """Every optimizer's update of this step (at plan.lr_factor; NorMuon at plan.muon_momentum, Adam only when
    plan.adam_updates). Each clears the gradients it consumed; Adam's gradients accumulate until it updates."""
    for optimizer in optimizers:
        optimizer.step(plan)


def untie_optimizer_state(optimizers):
    """At the untie (after GPT.untie()): the embedding's Adam moments become the head's, transposed."""
    next(o for o in optimizers if isinstance(o, Adam)).untie()


def optimizer_state(optimizers, runtime: Runtime, group=None) -> dict | None:
    """Every optimizer's state by parameter name (under its state_key), gathered to rank 0 over the (CPU)
    process group: NorMuon's momentum, second moments and mantissa sidecars by (name, first row of the unit)
    from the ranks that own them; Adam's moments and update count. Collective: every rank calls it; rank 0
    gets the dict, the others None."""
    state = {}
    for optimizer in optimizers:
        local = optimizer.named_state()
        if optimizer.sharded_groups and runtime.world_size > 1:
            parts = [None] * runtime.world_size if runtime.is_main else None
            dist.gather_object(local, parts, dst=0, group=group)
            local = {key: entry for part in parts for key, entry in part.items()} if runtime.is_main else None
        state[optimizer.state_key] = local
    return state if runtime.is_main else None


def load_optimizer_state(optimizers, state: dict):
    """Loads optimizer_state's dict on every rank (each takes the NorMuon units it owns at this world size)."""
    for optimizer in optimizers:
        optimizer.load_named_state(state[optimizer.state_key])


# ----------------------------------------------------------------------------------------------------
# 7. Data loading (the shard files are read by harness.load_shard)
# Training: a step is slots_per_step buffers of slot_tokens + 1 tokens, cut in stream order from one shard's
# documents (each starts at BOS); slot k of a step is rank k % W's micro-batch at micro-step k // W. Every
# rank cuts all slots of the step from the shard's BOS index, so the data do not depend on the world size.
# Validation: contiguous sequences of the first val_tokens, documents split at BOS with no length cap.


@dataclass
class Batch:
    """One micro-batch on the device."""
    inputs: Tensor  # (L,) int32
    targets: Tensor  # (L,) int64
    document_ids: Tensor  # (L,) int32: equal ids = one document piece; the attention masks keep pieces apart


def document_ids_of(inputs: Tensor) -> Tensor:
    """(L,) int32: the cumulative count of BOS, a new id at each document start, computed on the device.
    A training piece begins at a BOS and holds no other (it ends at the next BOS at the latest), so in
    training these ids mark exactly the pieces, cuts included."""
    return torch.cumsum(inputs == BOS, dim=0, dtype=torch.int32)


def stage_slot_sizes(s: Settings) -> list[tuple[int, int]]:
    """(slot_tokens, max_doc_len) of each stage; the extension keeps the last stage's."""
    return [(stage.batch_tokens // s.slots_per_step, stage.max_doc_len) for stage in stages(s).scheduled]


def no_document_start(path: Path, num_tokens: int) -> DataError:
    return DataError(f"{path}: no BOS token ({BOS}) in its {num_tokens:,} tokens, so no document start; make the "
                     "shard with data/fineweb.py (which writes BOS before every document)")


def check_documents(path: Path, tokens: np.ndarray):
    """--check_only: what the loader checks of a training shard when it reaches it, up front."""
    if not (tokens == BOS).any():
        raise no_document_start(path, tokens.size)


class IndexedShard:
    """A training shard's tokens and its documents: each starts at a BOS and runs to the next BOS (the last
    to the shard's end). Tokens before the first BOS belong to no document and are never used."""

    def __init__(self, path: Path, tokens: Tensor):
        self.path, self.tokens = path, tokens  # (N,) uint16, pinned on CUDA
        self.doc_starts = np.flatnonzero(tokens.numpy() == BOS)  # (D,) int64
        if self.doc_starts.size == 0:
            raise no_document_start(path, tokens.numel())
        self.doc_lengths = np.diff(self.doc_starts, append=tokens.numel())  # (D,)
        self.filled_by_cap: dict[int, np.ndarray] = {}

    @property
    def num_docs(self) -> int:
        return self.doc_starts.size

    def filled(self, max_doc_len: int) -> np.ndarray:
        """(D + 1,) int64: tokens in the first j document pieces when pieces are cut at max_doc_len."""
        if max_doc_len not in self.filled_by_cap:
            capped = np.minimum(self.doc_lengths, max_doc_len)
            self.filled_by_cap[max_doc_len] = np.concatenate(([0], np.cumsum(capped)))
        return self.filled_by_cap[max_doc_len]

    def position(self, doc: int) -> int:
        """Token position of document doc's BOS (the shard's length past the last document)."""
        return int(self.doc_starts[doc]) if doc < self.num_docs else self.tokens.numel()


Pieces = tuple[np.ndarray, np.ndarray]  # (starts, lengths) of one buffer's document pieces, in order


def cut_slot(shard: IndexedShard, doc: int, slot_tokens: int, max_doc_len: int) -> tuple[Pieces, int] | None:
    """One buffer of slot_tokens + 1 tokens from document doc on: each piece is min(document length,
    max_doc_len, space left) long. Returns (pieces, the next buffer's first document), or None when the
    shard's remaining documents cannot fill the buffer. A document's rest after a cut is skipped."""
    need = slot_tokens + 1
    filled = shard.filled(max_doc_len)
    end = int(np.searchsorted(filled, filled[doc] + need))  # documents doc..end-1 reach `need` tokens
    if end == filled.size:
        return None
    lengths = np.minimum(shard.doc_lengths[doc:end], max_doc_len)
    lengths[-1] -= filled[end] - filled[doc] - need  # the last piece ends where the buffer is full
    return (shard.doc_starts[doc:end], lengths), end


def cut_step(shard: IndexedShard, doc: int, slots: int, slot_tokens: int,
             max_doc_len: int) -> tuple[list[Pieces], int] | None:
    """All slots of one step, consecutive in the stream, and the next step's first document; None when
    they do not fit in the rest of the shard."""
    step = []
    for _ in range(slots):
        cut = cut_slot(shard, doc, slot_tokens, max_doc_len)
        if cut is None:
            return None
        pieces, doc = cut
        step.append(pieces)
    return step, doc


def index_shard(path: Path, s: Settings, pin_memory: bool) -> IndexedShard:
    """Reads and indexes a training shard (on the reader thread: the BOS scan stays off the training loop),
    and checks that it holds one step of every stage from its first document."""
    shard = IndexedShard(path, harness.load_shard(path, s.vocab_size, pin_memory))
    for slot_tokens, max_doc_len in stage_slot_sizes(s):
        if cut_step(shard, 0, s.slots_per_step, slot_tokens, max_doc_len) is None:
            raise DataError(f"{path}: its {shard.num_docs:,} documents, cut at {max_doc_len} tokens, do not fill one "
                            f"training step ({s.slots_per_step} buffers of {slot_tokens + 1} tokens); use larger "
                            "shards or smaller --stage_batch_tokens")
    return shard


class DocumentLoader:
    """This rank's micro-batches on its device, forever, cycling the files.

    The first next_batch of a step cuts the step's slots_per_step buffers from document `doc` of the
    current shard; this rank's slots (runtime.slots) are returned by this and the following calls, one
    per micro-step, all with the same sizes. When the rest of the shard cannot fill the whole step at the
    step's sizes, the rest is dropped and the step starts at the first document of the next file. Between
    steps, state() is the whole position in the stream: a loader made with it continues identically, at any
    world size and whatever sizes the next step has. The next file is read and indexed on a background
    thread; buffers cross to the GPU as uint16 from pinned memory, without a host sync.
    """

    def __init__(self, files: list[Path], s: Settings, runtime: Runtime, state: dict | None = None):
        self.files, self.s, self.runtime = files, s, runtime
        self.my_slots = list(runtime.slots(s))
        self.pin_memory = runtime.device.type == "cuda"
        self.file_index = state["file_index"] if state else 0
        if state:
            listed = files[self.file_index].name if self.file_index < len(files) else "nothing"
            if listed != state["file"]:
                raise DataError(f"the checkpoint's training data position is in {state['file']} (file "
                                f"{self.file_index} of --train_files), but --train_files lists {listed} there; give "
                                "the checkpointed run's training files")
        self.shard = index_shard(files[self.file_index], s, self.pin_memory)
        self.doc = self.resume_doc(state["position"]) if state else 0
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader")
        self.next_shard = self.read_ahead()
        self.step_slots: list[Pieces] = []  # this rank's slots of the current step not yet returned
        self.step_sizes: tuple[int, int] | None = None

    def resume_doc(self, position: int) -> int:
        doc = int(np.searchsorted(self.shard.doc_starts, position))
        if self.shard.position(doc) != position:
            raise DataError(f"{self.shard.path}: the checkpoint's training data position {position} is not a document "
                            "start in this file, so it changed since the checkpoint; give the checkpointed run's files")
        return doc

    def read_ahead(self) -> Future:
        next_file = self.files[(self.file_index + 1) % len(self.files)]
        return self.reader.submit(index_shard, next_file, self.s, self.pin_memory)

    def start_step(self, slot_tokens: int, max_doc_len: int):
        cut = cut_step(self.shard, self.doc, self.s.slots_per_step, slot_tokens, max_doc_len)
        if cut is None:  # the shard's rest cannot fill this step: drop it
            self.file_index = (self.file_index + 1) % len(self.files)
            self.shard, self.doc = self.next_shard.result(), 0
            self.next_shard = self.read_ahead()
            cut = cut_step(self.shard, self.doc, self.s.slots_per_step, slot_tokens, max_doc_len)
            if cut is None:  # index_shard checked the settings' stages; these sizes are another's
                raise DataError(f"{self.shard.path}: its documents, cut at {max_doc_len} tokens, do not fill one "
                                f"training step ({self.s.slots_per_step} buffers of {slot_tokens + 1} tokens); "
                                "use larger shards")
        step, self.doc = cut
        self.step_slots = [step[slot] for slot in self.my_slots]
        self.step_sizes = (slot_tokens, max_doc_len)

    def next_batch(self, slot_tokens: int, max_doc_len: int) -> Batch:
        """This rank's next slot of the current step: slot_tokens inputs, their targets and document ids."""
        if not self.step_slots:
            self.start_step(slot_tokens, max_doc_len)
        elif (slot_tokens, max_doc_len) != self.step_sizes:
            raise ValueError(f"next_batch({slot_tokens}, {max_doc_len}) within a step cut at {self.step_sizes}")
        starts, lengths = self.step_slots.pop(0)
        # buffer position p of piece k holds token starts[k] + (p - offset of piece k)
        offsets = np.cumsum(lengths) - lengths
        index = np.repeat(starts - offsets, lengths) + np.arange(slot_tokens + 1)  # (slot_tokens + 1,)
        buffer = torch.empty(slot_tokens + 1, dtype=torch.uint16, pin_memory=self.pin_memory)
        np.take(self.shard.tokens.numpy(), index, out=buffer.numpy())
        # the caching host allocator keeps the pinned buffer until the copy has run, so it is safe to drop
        buffer = buffer.to(self.runtime.device, non_blocking=True)
        inputs = buffer[:-1].to(torch.int32)
        return Batch(inputs, buffer[1:].to(torch.int64), document_ids_of(inputs))

    def state(self) -> dict:
        """The position in the stream between steps (plain numbers and a file name, for checkpoints)."""
        if self.step_slots:
            raise RuntimeError("DocumentLoader.state() in the middle of a step; call it between optimizer steps")
        return dict(file_index=self.file_index, file=self.shard.path.name, position=self.shard.position(self.doc))


def load_val_tokens(files: list[Path], s: Settings) -> Tensor:
    """The first val_tokens + 1 tokens (int32) of the concatenated validation files (+1 for the last target)."""
    needed = s.val_tokens + 1
    parts, have = [], 0
    for path in files:
        if have >= needed:
            break
        parts.append(harness.load_shard(path, s.vocab_size)[:needed - have])
        have += parts[-1].numel()
    names = ", ".join(str(path) for path in files)
    if have < s.val_seq_len + 1:
        raise DataError(f"{names}: {have:,} validation tokens, fewer than one validation sequence "
                        f"(--val_seq_len={s.val_seq_len} + 1); add validation data or lower --val_seq_len")
    if have < needed:
        usable = (have - 1) // s.val_seq_len * s.val_seq_len
        raise DataError(f"{names}: {have:,} validation tokens, fewer than --val_tokens={s.val_tokens} + 1; "
                        f"use --val_tokens={usable} or less (a multiple of --val_seq_len) or add validation data")
    return torch.cat(parts).to(torch.int32)


def validation_batches(val_tokens: Tensor, s: Settings, runtime: Runtime) -> Iterator[Batch]:
    """This rank's share of the validation tokens: sequence i (val_seq_len tokens, +1 for the last target)
    goes to rank i % W; documents are split at every BOS with no length cap."""
    seq_len = s.val_seq_len
    for i in range(runtime.rank, s.val_tokens // seq_len, runtime.world_size):
        window = val_tokens[i * seq_len:(i + 1) * seq_len + 1].to(runtime.device, non_blocking=True)  # (T+1,)
        inputs = window[:-1]
        yield Batch(inputs, window[1:].to(torch.int64), document_ids_of(inputs))


def check_train_files(files: list[Path], s: Settings):
    """Every training shard's header, up front: each must hold at least the tokens of one step of every
    stage (whether its documents fill one is checked when the loader reads it)."""
    for path in files:
        num_tokens = harness.read_shard_header(path)
        for slot_tokens, _ in stage_slot_sizes(s):
            if num_tokens < s.slots_per_step * (slot_tokens + 1):
                raise DataError(f"{path}: holds {num_tokens:,} tokens, fewer than one training step needs "
                                f"({s.slots_per_step} buffers of {slot_tokens + 1} tokens); use larger shards or "
                                "smaller --stage_batch_tokens")


def check_data(s: Settings, is_main: bool = True) -> tuple[list[Path], Tensor]:
    """Training files (headers), validation tokens (loaded, range-checked) and their overlap, before anything
    is built. Returns (training files, validation tokens)."""
    train_files = harness.find_shards(s.train_files, "train_files")
    val_files = harness.find_shards(s.val_files, "val_files")
    check_train_files(train_files, s)
    val_tokens = load_val_tokens(val_files, s)
    harness.check_val_not_in_train(s, is_main)
    return train_files, val_tokens


# ----------------------------------------------------------------------------------------------------
# 8. Speed machinery: gradient communication, compilation


GRADIENT_BUCKET_BYTES = 32 * 2**20  # all-reduce granularity: large enough for bandwidth, small enough to start early


class GradientCommunicator:
    """Turns the gradients summed over A micro-steps on W ranks into their mean, sum / (A * W), launched
    from post-accumulate-grad hooks while the last micro-step's backward goes on.

    - NorMuon's units, by group of one shape: when all of a group's parameters have their final gradient,
      the stacked gradients / (A * W) are reduce-scattered, so each rank receives the summed chunk it owns
      (group.reduced_gradient); NorMuon all-gathers the updated weights. That moves as many bytes as one
      all-reduce; an all-reduce of the gradients plus the all-gather would move 1.5 times as many.
    - Adam's parameters: buckets of one dtype, in reverse model order (about the order backward finishes
      them), all-reduced only on steps where Adam updates; in between their gradients keep accumulating
      locally. Adam is replicated, so every rank needs the whole mean (a ring all-reduce moves the same
      bytes as the record's reduce-scatter and all-gather of the big tables, at the price of 8 ranks
      each computing the whole Adam update).
    Dividing before the sum is exact when A * W is a power of two (1, 2, 4, 8 slots). A group or bucket
    one of whose parameters gets no gradient (the embedding while tied) is launched by finish(), with
    the gradients there are: every rank has the same ones, so the collectives match."""

    def __init__(self, optimizers, s: "Settings", runtime: Runtime, bucket_bytes: int = GRADIENT_BUCKET_BYTES):
        self.world_size, self.micro_steps = runtime.world_size, s.slots_per_step // runtime.world_size
        self.divisor = self.micro_steps * self.world_size
        self.sharded = [(optimizer, group) for optimizer in optimizers for group in optimizer.sharded_groups]
        self.buckets = [(optimizer, bucket) for optimizer in optimizers  # replicated parameters
                        for bucket in self.split(optimizer.replicated_params, bucket_bytes)]
        self.waiting_on: dict[Tensor, list[int]] = {}  # parameter -> the collectives it belongs to
        self.members = [group.params for _, group in self.sharded] + [bucket for _, bucket in self.buckets]
        for index, params in enumerate(self.members):
            for param in params:
                self.waiting_on.setdefault(param, []).append(index)
        self.active: list[bool] = []  # per collective: reduced at this step
        self.ready_counts: list[int] = []
        self.launched: list[bool] = []
        self.pending = []  # (handle, result, collective index)
        self.armed = False
        if self.world_size > 1:
            for param in self.waiting_on:
                param.register_post_accumulate_grad_hook(self._gradient_ready)

    @staticmethod
    def split(params: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
        buckets: list[list[Tensor]] = []
        open_bucket: dict[torch.dtype, tuple[int, int]] = {}  # dtype -> (bucket index, bytes so far)
        for param in reversed(params):
            index, size = open_bucket.get(param.dtype, (-1, bucket_bytes))
            if size + param.numel() * param.element_size() > bucket_bytes:
                index, size = len(buckets), 0
                buckets.append([])
            buckets[index].append(param)
            open_bucket[param.dtype] = (index, size + param.numel() * param.element_size())
        return buckets

    def start_last_micro_step(self, plan: "StepPlan"):
        """Arms the hooks: the next backward completes this step's gradients."""
        optimizers = [optimizer for optimizer, _ in self.sharded] + [optimizer for optimizer, _ in self.buckets]
        self.active = [optimizer.updates_at(plan) for optimizer in optimizers]
        self.ready_counts = [0] * len(self.members)
        self.launched = [False] * len(self.members)
        self.armed = True

    def _gradient_ready(self, param: Tensor):
        if not self.armed:
            return
        for index in self.waiting_on[param]:
            self.ready_counts[index] += 1
            if self.ready_counts[index] == len(self.members[index]) and self.active[index]:
                self._launch(index)

    def _launch(self, index: int):
        self.launched[index] = True
        if index < len(self.sharded):
            group = self.sharded[index][1]
            stack = group.stack_gradients(self.divisor)  # (padded, rows, cols)
            owned = stack.new_empty(group.per_rank, group.rows, group.cols)
            handle = reduce_scatter_single(owned.view(-1), stack.view(-1), async_op=True)
            self.pending.append((handle, owned, index))
            return
        params = [p for p in self.members[index] if p.grad is not None]
        if not params:
            return
        flat = params[0].grad.new_empty(sum(p.numel() for p in params))
        offset = 0
        for param in params:
            torch.div(param.grad, self.divisor, out=flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        self.pending.append((dist.all_reduce(flat, async_op=True), flat, index))

    def finish(self):
        """Waits for the reductions: NorMuon groups hold their owned chunk of the mean gradient, and on Adam
        steps every Adam .grad is the mean over ranks and micro-steps of the gradients summed since Adam's
        last update."""
        if not self.armed:
            raise RuntimeError("GradientCommunicator.finish() without start_last_micro_step(plan)")
        self.armed = False
        if self.world_size == 1:
            self._divide_in_place()
            return
        for index, active in enumerate(self.active):
            if active and not self.launched[index]:
                self._launch(index)
        for handle, result, index in self.pending:
            handle.wait()
            if index < len(self.sharded):
                self.sharded[index][1].reduced_gradient = result
                continue
            offset = 0
            for param in (p for p in self.members[index] if p.grad is not None):
                param.grad = result[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
        self.pending = []

    def _divide_in_place(self):
        if self.divisor == 1:
            return
        for index, params in enumerate(self.members):
            grads = [p.grad for p in params if p.grad is not None]
            if self.active[index] and index >= len(self.sharded) and grads:
                torch._foreach_div_(grads, self.divisor)
        for _, group in self.sharded:
            group.reduced_gradient = group.stack_gradients(self.divisor)[group.owned.start:group.owned.stop]


# Compilation (--compile): the network, GPT.hidden, is one graph per shape and mode (FlexAttention needs it), the
# training loss one graph per chunk shape, run from the eager chunk loop that recomputes each chunk in backward.
# The attention masks are built eagerly from the document ids (device ops, no host sync). Graphs: training, 3
# stage shapes x tied/untied plus the extension's windows; validation, one per window pair it validates with;
# so a function gets up to ~10, over dynamo's default limit of 8 recompiles (beyond it, it would run eagerly).
RECOMPILE_LIMIT = 16

training_loss_chunk_compiled = torch.compile(training_loss_chunk, dynamic=False)


def compile_model(model: "GPT", backend: str = "inductor"):
    """Replaces model.hidden by its compiled version (the parameters and state_dict stay the model's)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.hidden = torch.compile(model.hidden, dynamic=False, fullgraph=True, backend=backend)


# ----------------------------------------------------------------------------------------------------
# 9. Training step, validation, warm-up
# A step: each of this rank's slots (micro-steps) takes its batch, runs forward and backward on the summed
# loss, and the last one arms the gradient communication; then the optimizers step by the plan, and at the
# split step the embedding is untied. No host sync: losses stay on the device, the per-step numbers the
# compiled code reads are rows of one device table.


class StepInputs:
    """The device tensors the training steps read, made once at start-up (no host-to-device copy per step):
    the MTP and prefix weights of every step as one table (a step's weights are a view of its row, and a tensor,
    so new values do not recompile), the prefix table, and the slot ids (the FP8 MLP scales' index)."""

    def __init__(self, s: Settings, device: torch.device):
        plans = [step_plan(step, s) for step in range(s.num_iterations)]
        width = max(len(plan.mtp_weights) for plan in plans)
        rows = [list(plan.mtp_weights) + [0.0] * (width - len(plan.mtp_weights)) + [plan.prefix_weight]
                for plan in plans]
        self.loss_weights = torch.tensor(rows, dtype=torch.float32).to(device)  # (steps, width + 1)
        self.prefix_table = build_prefix_table(s.vocab_size, padded_vocab_size(s.vocab_size)).to(device)  # (V,)
        self.slot_ids = torch.arange(s.slots_per_step, device=device)  # (slots,) int64

    def weights(self, plan: StepPlan) -> tuple[Tensor, Tensor]:
        """(MTP weights (K,), prefix weight ()) of plan's step, K the offsets its stage predicts."""
        row = self.loss_weights[plan.step]
        return row[:len(plan.mtp_weights)], row[-1]


def step_loss(model: "GPT", batch: Batch, plan: StepPlan, inputs: StepInputs, slot: int, runtime: Runtime) -> Tensor:
    """The training objective of one slot: the summed multi-target loss of section 5 (a sum over tokens, so
    the FP8 gradient scales do not depend on the batch size). Replace this function to train on another loss."""
    masks = model.masks_for(batch, plan.short_window_blocks, plan.long_window_blocks)
    hidden = model.hidden(batch, masks, inputs.slot_ids[slot] if runtime.fp8 else None)
    mtp_weights, prefix_weight = inputs.weights(plan)
    return training_loss(hidden, model.lm_head, batch.targets, inputs.prefix_table[batch.targets], mtp_weights,
                         prefix_weight, runtime.fp8, train_loss_chunk_tokens(runtime),
                         training_loss_chunk_compiled if runtime.compile else training_loss_chunk)


def train_step(model: "GPT", optimizers, communicator: GradientCommunicator, loader: DocumentLoader,
               plan: StepPlan, inputs: StepInputs, s: Settings, runtime: Runtime) -> Tensor:
    """One optimizer step; returns this rank's mean loss per token (a device tensor: no sync). Gradients are
    not zeroed here: each optimizer clears those it used (Adam's accumulate over two steps)."""
    model.set_long_window(plan.long_window_blocks * s.block_size)
    slots = runtime.slots(s)
    total = torch.zeros((), device=runtime.device)
    for micro_step, slot in enumerate(slots):
        if micro_step == len(slots) - 1:
            communicator.start_last_micro_step(plan)
        batch = loader.next_batch(plan.slot_tokens, plan.max_doc_len)
        # each slot backpropagates its own undivided sum, so the FP8 gradient scales see the record's magnitudes
        loss = step_loss(model, batch, plan, inputs, slot, runtime)
        loss.backward()
        total += loss.detach()
    communicator.finish()
    model.mlp_fp8.end_step()
    step_optimizers(optimizers, plan)
    if plan.untie_after:
        model.untie()
        untie_optimizer_state(optimizers)
    return total / (len(slots) * plan.slot_tokens)


@torch.no_grad()
def validation_loss(model: "GPT", val_tokens: Tensor, windows: tuple[int, int], s: Settings,
                    runtime: Runtime) -> float:
    """Mean cross-entropy over exactly s.val_tokens tokens with the given (short, long) windows; every
    rank's sum is all-reduced, so 1 and W ranks give the same value."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for batch in validation_batches(val_tokens, s, runtime):
        hidden = model.hidden(batch, model.masks_for(batch, *windows), None)
        loss_sum += validation_loss_sum(hidden, model.lm_head, batch.targets,
                                        loss_chunk_tokens(runtime.device, EVAL_LOGITS_CHUNK)).double()
    if runtime.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    model.train()
    return loss_sum.item() / s.val_tokens


def warm_up_kernels(model: "GPT", optimizers, communicator: GradientCommunicator, inputs: StepInputs,
                    train_files: list[Path], val_tokens: Tensor, s: Settings, runtime: Runtime,
                    console: harness.Console):
    """Trains the steps of warmup_steps(s) on real data (every stage's batch and window shapes, the untie, the
    extension) and validates one sequence with every window pair the run validates with, so that nothing
    compiles inside the timed run; then restores the model (with its tied flag, YaRN rotary and FP8 scales) and
    the optimizers, so the run starts exactly as an unwarmed one would."""
    if not s.warmup:
        return
    initial_model = copy.deepcopy(model.state_dict())
    initial_optimizers = copy.deepcopy({o.state_key: o.named_state() for o in optimizers})
    loader = DocumentLoader(train_files, s, runtime)
    one_sequence = replace(s, val_tokens=s.val_seq_len)

    def validate(tied: bool):  # every window pair the run validates with while tied (before the untie) or after
        for windows in sorted({validation_windows_at(step, s) for step in validation_steps(s)
                               if (step <= s.split_step) == tied}):
            with console.activity(f"warm-up validation with windows {windows[0]}/{windows[1]} blocks"):
                validation_loss(model, val_tokens, windows, one_sequence, runtime)

    validate(tied=True)
    steps = warmup_steps(s)
    for i, step in enumerate(steps):
        what = "compiling" if i == 0 and s.compile else "running kernels"
        with console.activity(f"warm-up step {i + 1}/{len(steps)} (the shapes of step {step}; {what})"):
            train_step(model, optimizers, communicator, loader, step_plan(step, s), inputs, s, runtime)
            runtime.synchronize()
    validate(tied=False)  # the warm-up steps include the untie
    model.load_state_dict(initial_model)
    load_optimizer_state(optimizers, initial_optimizers)
    model.zero_grad(set_to_none=True)


def validation_steps(s: Settings) -> list[int]:
    """The steps validated before (the last: after) training: every val_every (none with 0), and the end."""
    every = range(0, s.num_iterations, s.val_every) if s.val_every else ()
    return sorted({*every, s.num_iterations})


def validation_windows_at(step: int, s: Settings) -> tuple[int, int]:
    """(short, long) window blocks of the validation at step: its stage's, the final ones at the end."""
    if step == s.num_iterations:
        return final_windows(s)
    plan = step_plan(step, s)
    return plan.short_window_blocks, plan.long_window_blocks


def estimate_memory(s: Settings, runtime: Runtime) -> dict[str, tuple[int, str]]:
    """A lower bound of one rank's peak memory in bytes, by part, each with the setting that sizes it (the
    harness compares it with what the device has before anything is built): weights, gradients and optimizer
    state (16 bytes a parameter); activations of the largest micro-step (~16 model_dim-wide values a token and
    stored layer: a checkpointed layer keeps its input only, and one is recomputed at a time); one loss chunk's
    fp32 logits (3 copies: logits, softmax, gradient); the evaluation logits; and on the explicit (CPU) path the
    dense masks, twice as long on the paired-head layers."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in GPT(s, runtime.attention_backend).parameters())
    value_bytes = torch.finfo(runtime.compute_dtype).bits // 8
    vocab = padded_vocab_size(s.vocab_size)
    slot_tokens = max(stage.batch_tokens for stage in stages(s).scheduled) // s.slots_per_step
    train_chunk = min(train_loss_chunk_tokens(runtime), slot_tokens)
    stored_layers = NUM_LAYERS - runtime.savers.checkpoint_blocks + min(runtime.savers.checkpoint_blocks, 1)
    eval_chunk = min(loss_chunk_tokens(runtime.device, EVAL_LOGITS_CHUNK), s.val_seq_len)
    parts = {
        "weights and optimizer state": (16 * num_params, "--model_dim / --bigram_buckets"),
        "activations of one micro-step": (16 * s.model_dim * stored_layers * slot_tokens * value_bytes,
                                          "--stage_batch_tokens"),
        "logits of one micro-step": (3 * train_chunk * vocab * 4, "--stage_batch_tokens"),
        "evaluation logits": (eval_chunk * vocab * 4, "--val_seq_len"),
    }
    if runtime.attention_backend == "explicit":
        parts["dense attention masks (training)"] = (len(MASK_KINDS) * (2 * slot_tokens) ** 2, "--stage_batch_tokens")
        parts["dense attention masks (evaluation)"] = (len(MASK_KINDS) * (2 * s.val_seq_len) ** 2, "--val_seq_len")
    return parts


# ----------------------------------------------------------------------------------------------------
# 10. Checkpoint state: the recipe's part of a checkpoint (the harness adds step, time, settings, RNG)


def gather_slot_rows(state: MLPFP8State, runtime: Runtime, group) -> dict[str, Tensor]:
    """The FP8 MLP scales with every slot's row from the rank that runs that slot (on W ranks a rank measures
    only its own slots). Collective over the CPU group."""
    buffers = {name: buffer.cpu() for name, buffer in state.named_buffers()}
    if runtime.world_size == 1:
        return buffers
    for name, buffer in buffers.items():
        if buffer.ndim == 0:  # the step count: the same on every rank
            continue
        parts = [torch.empty_like(buffer) for _ in range(runtime.world_size)]
        dist.all_gather(parts, buffer, group=group)
        for slot in range(buffer.size(0)):
            buffer[slot] = parts[slot % runtime.world_size][slot]
    return buffers


def gather_pending_gradients(model: "GPT", runtime: Runtime, group) -> list[dict[str, Tensor]] | None:
    """Every rank's gradients still waiting for their optimizer between steps (Adam's after an even step: its
    gradients accumulate over two steps, unreduced, on each rank), by parameter name, one dict per rank.
    Collective over the CPU group; rank 0 gets the list, the others None."""
    pending = {name: param.grad.cpu() for name, param in model.named_parameters() if param.grad is not None}
    if runtime.world_size == 1:
        return [pending]
    parts = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(pending, parts, dst=0, group=group)
    return parts


def restore_pending_gradients(model: "GPT", by_rank: list[dict[str, Tensor]], runtime: Runtime):
    """At the same world size each rank takes its own; at another, rank 0 takes their sum (the reduction at
    the next Adam step sums over ranks anyway) and the others zeros."""
    if len(by_rank) == runtime.world_size:
        pending = by_rank[runtime.rank]
    elif runtime.is_main:
        pending = {name: sum(part[name].double() for part in by_rank) for name in by_rank[0]}
    else:
        pending = {name: torch.zeros_like(grad) for name, grad in by_rank[0].items()}
    for name, param in model.named_parameters():
        param.grad = pending[name].to(param.device, param.dtype) if name in pending else None


def training_state(model: "GPT", optimizers, loader: DocumentLoader, runtime: Runtime, group) -> dict | None:
    """Weights and buffers (tied flag, YaRN rotary, FP8 scales of every slot), every optimizer's state by
    parameter name (gathered from the ranks that own it, so it loads at any world size), the gradients still
    accumulating for Adam, and the data position. Collective: every rank calls it; rank 0 gets the dict, the
    others None."""
    fp8_scales = gather_slot_rows(model.mlp_fp8, runtime, group)
    optimizer = optimizer_state(optimizers, runtime, group)
    pending = gather_pending_gradients(model, runtime, group)
    if not runtime.is_main:
        return None
    model_state = to_cpu(model.state_dict())
    model_state.update({f"mlp_fp8.{name}": buffer for name, buffer in fp8_scales.items()})
    return dict(model=model_state, optimizers=to_cpu(optimizer), pending_gradients=pending, data=loader.state())


def restore_training_state(checkpoint: dict, model: "GPT", optimizers, runtime: Runtime) -> dict:
    """Loads training_state's dict (each rank takes the optimizer state it owns); returns the data position."""
    model.load_state_dict(checkpoint["model"])
    load_optimizer_state(optimizers, checkpoint["optimizers"])
    restore_pending_gradients(model, checkpoint["pending_gradients"], runtime)
    return checkpoint["data"]


# ----------------------------------------------------------------------------------------------------
# 11. train() and main()


def train(s: Settings, runtime: Runtime, signals: harness.StopSignals | None = None) -> str | None:
    """Runs the training, or continues it with --resume. Returns None when it ran to the end, or the
    name of the signal that stopped it early (after a checkpoint, when checkpoints are on)."""
    with harness.Run(s, runtime, signals, RECIPE_FILE) as run:
        with run.console.activity("checking the data and loading the validation tokens"):
            train_files, val_tokens = check_data(s, runtime.is_main)
        run.find_checkpoint()
        with run.console.activity("building the model and optimizers"):
            model = build_model(s, runtime)
            if runtime.compile:
                compile_model(model)
            optimizers = build_optimizers(model, s, runtime)
            communicator = GradientCommunicator(optimizers, s, runtime)
            inputs = StepInputs(s, runtime.device)
        run.open_log(harness.environment_report(s, runtime),
                     f"{runtime.world_size} rank(s) x {len(runtime.slots(s))} slot(s) per step on {runtime.device.type}")
        run.warm_up(lambda: warm_up_kernels(model, optimizers, communicator, inputs, train_files, val_tokens, s,
                                            runtime, run.console))
        data_state = run.resume(lambda checkpoint: restore_training_state(checkpoint, model, optimizers, runtime))
        loader = DocumentLoader(train_files, s, runtime, data_state)
        run.start_training(lambda: training_state(model, optimizers, loader, runtime, run.cpu_group))
        tokens = sum(step_plan(step, s).batch_tokens for step in range(run.start_step))
        validate_at = set(validation_steps(s))
        for step in range(run.start_step, s.num_iterations + 1):
            last_step = step == s.num_iterations
            if step in validate_at:
                windows = validation_windows_at(step, s)
                run.validate(step, tokens, lambda: validation_loss(model, val_tokens, windows, s, runtime))
            if last_step:
                break
            plan = step_plan(step, s)
            loss = train_step(model, optimizers, communicator, loader, plan, inputs, s, runtime)
            tokens += plan.batch_tokens
            if run.step_done(step + 1, loss, tokens, plan.lr_factor):
                break
        return run.finish(model.state_dict)


def main(argv: list[str]) -> int:
    def command(signals: harness.StopSignals) -> str | None:
        s = parse_settings([arg for arg in argv if arg != "--schedule"])
        if "--schedule" in argv:
            print(schedule_table(s))
            return None
        runtime = resolve_runtime(s, *harness.process_ranks())
        harness.check_memory(s, runtime, estimate_memory(s, runtime), RECIPE_FILE.name)
        if s.check_only:
            train_files, _ = check_data(s)
            shard_tokens = sum(harness.read_shard_header(path) for path in train_files)
            harness.preflight(s, train_files, shard_tokens, s.vocab_size, check_documents)
            return None
        with harness.process_group(runtime):
            harness.check_log_dir_on_rank0(s, runtime)
            return train(s, runtime, signals)

    return harness.run_main(argv, settings_help, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
