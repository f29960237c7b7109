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

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Before torch can initialise CUDA: growable segments keep the logits-sized blocks from fragmenting the
# caching allocator. setdefault, so a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
from torch import Tensor, nn

import harness
from harness import (FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, DataError, MemorySavers, Range, RunSettings,
                     SettingsError, setting)

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
        dc_window=14, gate_hidden=16, stage_ends="8,16,24", extension_steps=3, split_step=16,
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


# ----------------------------------------------------------------------------------------------------
# 3. Schedules: every number of the run that changes with the step, in one place


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


# ----------------------------------------------------------------------------------------------------
# 8. Speed machinery: gradient communication, compilation


# ----------------------------------------------------------------------------------------------------
# 9. Training step, validation, warm-up


# ----------------------------------------------------------------------------------------------------
# 10. Checkpoint state: the recipe's part of a checkpoint (the harness adds step, time, settings, RNG)


# ----------------------------------------------------------------------------------------------------
# 11. train() and main()
