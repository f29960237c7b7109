"""GPT-2-small speedrun trainer, record-89 recipe (public record 89: 1,285 steps, ~339M tokens, 73.8 s on
8xH100). Under construction (issues #23-#26): it becomes train_gpt.py when the whole recipe is in and tested;
until then train_gpt.py (record 21) is the default, and this file is built and tested section by section.

Launch with torchrun, or plainly with `python train_gpt_record89.py` for one process; `--help` lists the
settings, `--schedule` prints the table of stages. harness.py starts, checks, logs, stops and saves the run
(and never imports this file). Facts and formulas: the speedrun fact sheets (RECORDS_29_89.md, section 2).
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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

# Before torch can initialise CUDA: growable segments keep the logits-sized blocks from fragmenting the
# caching allocator. setdefault, so a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

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

    @property
    def num_iterations(self) -> int:
        """Optimizer steps of the whole run: the stages, then the extension."""
        return int(self.stage_ends.split(",")[-1]) + self.extension_steps


PRESETS = {
    # Every component of the record at a size a 2-core CPU trains in a minute or two: the same 11 layers,
    # three stages and an extension, the untie, paired heads, key offset, XSA, DC, MUDD, smear, bigram,
    # value-embedding gates, MTP and the prefix loss, FP8 emulated. Sizes are the record's / 8.
    "tiny": dict(
        model_dim=48, num_heads=6, head_dim=8, mlp_hidden=192, block_size=16, bigram_buckets=4096,
        dc_window=14, gate_hidden=16, stage_ends="9,17,25", extension_steps=3, split_step=17,
        stage_batch_tokens="1024,2048,3072", stage_max_doc_len="112,256,256", val_seq_len=2048,
        val_tokens=8192, val_every=8, muon_momentum_warmup_steps=6, muon_momentum_cooldown_steps=2,
    ),
}

# The recipe's fixed numbers (those worth tuning are settings above) follow in the sections that use them.
BOS = 50256  # GPT-2's <|endoftext|>: every document starts with it
VOCAB_PAD_MULTIPLE = 128  # the LM head's columns: vocabulary rounded up to this (50257 -> 50304)


def settings_help() -> str:
    return harness.settings_help(Settings, PRESETS, program=RECIPE_FILE.name)


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        # bf16 on GPUs; fp32 on CPU, whose bf16 matmuls are ~3x slower than fp32.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

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
    notices, fp8 = [], s.fp8
    if device_type == "cuda":
        notices, _, has_fp8 = harness.check_gpu(device, backend, s.head_dim)
        if s.fp8 and not has_fp8:
            notices.append("FP8: this GPU has no FP8 matmuls: the LM head and MLP matmuls run in bf16 (the record "
                           "uses FP8; expect a slightly different loss curve)")
            fp8 = False
    elif s.fp8:
        notices.append("FP8: emulated on CPU (values rounded through float8, matmuls in fp32)")
    if rank == 0:
        for notice in notices:
            print(notice, flush=True)
    return Runtime(rank, world_size, device, backend, fp8, MemorySavers(), tuple(notices))


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
                            f"({room_blocks} blocks)")


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
    """The steps the untimed warm-up trains: 0, 1 and the two steps before and after each stage change (where
    shapes, windows and the YaRN rotary change)."""
    schedule = stages(s)
    changes = [stage.start for stage in schedule.all[1:] if stage.start < schedule.num_iterations]
    steps = {0, 1} | {change + offset for change in changes for offset in WARMUP_OFFSETS}
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


# 4b. The network: embeddings (tied head, smear, bigram hash, value embeddings), MUDD gates, the 11 layers


# ----------------------------------------------------------------------------------------------------
# 5. Loss and FP8 ops


# ----------------------------------------------------------------------------------------------------
# 6. Optimizers


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


class IndexedShard:
    """A training shard's tokens and its documents: each starts at a BOS and runs to the next BOS (the last
    to the shard's end). Tokens before the first BOS belong to no document and are never used."""

    def __init__(self, path: Path, tokens: Tensor):
        self.path, self.tokens = path, tokens  # (N,) uint16, pinned on CUDA
        self.doc_starts = np.flatnonzero(tokens.numpy() == BOS)  # (D,) int64
        if self.doc_starts.size == 0:
            raise DataError(f"{path}: no BOS token ({BOS}) in its {tokens.numel():,} tokens, so no document start; "
                            "make the shard with data/fineweb.py (which writes BOS before every document)")
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


# ----------------------------------------------------------------------------------------------------
# 9. Training step, validation, warm-up
# A step: each of this rank's slots (micro-steps) takes its batch, runs forward and backward on the summed
# loss, and the last one arms the gradient communication; then the optimizers step by the plan, and at the
# split step the embedding is untied. No host sync: losses stay on the device, the per-step numbers the
# compiled code reads are rows of one device table.


class LossWeights:
    """The MTP and prefix weights of every step as one device table, made once: a step's weights are a view of
    its row (no host-to-device copy per step, and a tensor, so new values do not recompile)."""

    def __init__(self, s: Settings, device: torch.device):
        plans = [step_plan(step, s) for step in range(s.num_iterations)]
        width = max(len(plan.mtp_weights) for plan in plans)
        rows = [list(plan.mtp_weights) + [0.0] * (width - len(plan.mtp_weights)) + [plan.prefix_weight]
                for plan in plans]
        self.table = torch.tensor(rows, dtype=torch.float32).to(device)  # (steps, width + 1)

    def at(self, plan: StepPlan) -> tuple[Tensor, Tensor]:
        """(mtp weights (K,), prefix weight ()) of plan's step, K the offsets its stage predicts."""
        row = self.table[plan.step]
        return row[:len(plan.mtp_weights)], row[-1]


def step_loss(model: "GPT", batch: "Batch", plan: StepPlan, weights: LossWeights, slot: int,
              runtime: Runtime) -> Tensor:
    """The training objective of one slot: the summed multi-target loss of section 5 (a sum over tokens, so
    the FP8 gradient scales do not depend on the batch size)."""
    masks = model.masks_for(batch, plan.short_window_blocks, plan.long_window_blocks)
    hidden = model.hidden(batch, masks, slot)
    mtp_weights, prefix_weight = weights.at(plan)
    return training_loss(hidden, model.head_weight(), batch.targets, model.prefix_table[batch.targets],
                         mtp_weights, prefix_weight, runtime.fp8)


def train_step(model: "GPT", optimizers, communication, loader: "DocumentLoader", plan: StepPlan,
               weights: LossWeights, s: Settings, runtime: Runtime) -> Tensor:
    """One optimizer step; returns this rank's mean loss per token (a device tensor: no sync)."""
    model.set_long_window(plan.long_window_blocks * s.block_size)
    slots = runtime.slots(s)
    total = torch.zeros((), device=runtime.device)
    for micro_step, slot in enumerate(slots):
        if micro_step == len(slots) - 1:
            communication.arm(plan)
        batch = loader.next_batch(plan.slot_tokens, plan.max_doc_len)
        loss = step_loss(model, batch, plan, weights, slot, runtime)
        loss.backward()
        total += loss.detach()
    communication.finish()
    step_optimizers(optimizers, plan)
    if plan.untie_after:
        model.untie()
        untie_optimizer_state(optimizers, model)
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
        loss_sum += validation_loss_sum(hidden, model.head_weight(), batch.targets).double()
    if runtime.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    model.train()
    return loss_sum.item() / s.val_tokens


def warm_up_kernels(model: "GPT", optimizers, communication, weights: LossWeights, train_files: list[Path],
                    val_tokens: Tensor, s: Settings, runtime: Runtime, console: harness.Console):
    """Runs the steps of warmup_steps(s) on real data (every stage's batch and window shapes, the extension)
    and a validation with each stage's windows and the final ones, so that nothing compiles inside the timed
    run; then restores the model, the optimizers and the FP8 scales, so the run starts exactly as an unwarmed
    one would."""
    if not s.warmup:
        return
    initial = copy.deepcopy(dict(model=model.state_dict(), optimizers=local_optimizer_state(optimizers)))
    initial_long_window = model.long_window_tokens
    loader = DocumentLoader(train_files, s, runtime)
    steps = warmup_steps(s)
    for i, step in enumerate(steps):
        what = "compiling" if i == 0 and s.compile else "running kernels"
        with console.activity(f"warm-up step {i + 1}/{len(steps)} (step {step} shapes, {what})"):
            train_step(model, optimizers, communication, loader, step_plan(step, s), weights, s, runtime)
            runtime.synchronize()
    validation_windows = {(plan.short_window_blocks, plan.long_window_blocks)
                          for plan in map(lambda step: step_plan(step, s), steps)} | {final_windows(s)}
    one_sequence = val_tokens[:s.val_seq_len + 1]
    for windows in sorted(validation_windows):
        with console.activity(f"warm-up validation with windows {windows[0]}/{windows[1]} blocks"):
            validation_loss(model, one_sequence, windows, replace(s, val_tokens=s.val_seq_len), runtime)
    model.load_state_dict(initial["model"])
    model.long_window_tokens = initial_long_window
    load_local_optimizer_state(optimizers, initial["optimizers"])
    model.zero_grad(set_to_none=True)




# ----------------------------------------------------------------------------------------------------
# 10. Checkpoint state: the recipe's part of a checkpoint (the harness adds step, time, settings, RNG)


def training_state(model: "GPT", optimizers, loader: "DocumentLoader", runtime: Runtime, group) -> dict | None:
    """Weights and buffers (tied flag, YaRN frequencies and scale, FP8 delayed scales), the optimizers' state
    by parameter name (gathered from the ranks that own it, so it loads at any world size) and the data
    position. Collective: every rank calls it; rank 0 gets the dict, the others None."""
    optimizer = optimizer_state(optimizers, model, runtime, group)
    if not runtime.is_main:
        return None
    return dict(model=to_cpu(model.state_dict()), optimizers=optimizer, data=loader.state(),
                long_window_tokens=model.long_window_tokens)


def restore_training_state(checkpoint: dict, model: "GPT", optimizers, runtime: Runtime) -> dict:
    """Loads training_state's dict (each rank takes the optimizer state it owns); returns the data position."""
    model.load_state_dict(checkpoint["model"])
    model.long_window_tokens = checkpoint["long_window_tokens"]
    load_optimizer_state(optimizers, model, checkpoint["optimizers"], runtime)
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
            optimizers = build_optimizers(model, s, runtime)
            communication = GradientCommunication(model, optimizers, runtime)
            weights = LossWeights(s, runtime.device)
        run.open_log(harness.environment_report(s, runtime),
                     f"{runtime.world_size} rank(s) x {len(runtime.slots(s))} slot(s) per step on {runtime.device.type}")
        run.warm_up(lambda: warm_up_kernels(model, optimizers, communication, weights, train_files, val_tokens, s,
                                            runtime, run.console))
        data_state = run.resume(lambda checkpoint: restore_training_state(checkpoint, model, optimizers, runtime))
        loader = DocumentLoader(train_files, s, runtime, data_state)
        run.start_training(lambda: training_state(model, optimizers, loader, runtime, run.cpu_group))
        tokens = sum(step_plan(step, s).batch_tokens for step in range(run.start_step))
        for step in range(run.start_step, s.num_iterations + 1):
            last_step = step == s.num_iterations
            if last_step or (s.val_every and step % s.val_every == 0):
                plan = step_plan(step, s)
                windows = final_windows(s) if last_step else (plan.short_window_blocks, plan.long_window_blocks)
                run.validate(step, tokens, lambda: validation_loss(model, val_tokens, windows, s, runtime))
            if last_step:
                break
            plan = step_plan(step, s)
            loss = train_step(model, optimizers, communication, loader, plan, weights, s, runtime)
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
        if s.check_only:
            train_files, _ = check_data(s)
            return None
        with harness.process_group(runtime):
            harness.check_log_dir_on_rank0(s, runtime)
            return train(s, runtime, signals)

    return harness.run_main(argv, settings_help, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
