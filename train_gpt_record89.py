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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

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

    def forward(self, x: Tensor, paired: bool = False) -> Tensor:
        """x (T, H, D) rotated at position t (its index in the buffer); paired: head h at position 2t + h % 2,
        as the public script's paired layout (so heads 1 and 4 sit on the row of the other position)."""
        seq_len, num_heads, _ = x.shape
        pairs = self.frequencies.numel()
        positions = torch.arange(2 * seq_len if paired else seq_len, device=x.device, dtype=torch.float32)
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
    """The dynamically composable attention correction (fact sheet 3), fp32 (T, H, D):
    corr_h[t] = w2_h[t] * sum_j (sum_h' w1n_h'[t] P_h'[t, j]) v_h[j], with P_h[t, j] the softmax of
    scale * q_h[t].k_h[j] over the window keys t - window < j <= t of t's document and w1n = w1 RMS-normed
    over the heads. q, k, v (T, H, D); w1, w2 (T, H). The weights are rounded to v's dtype before the product
    with v, as the Triton kernel's bf16 MMA. Plain PyTorch for torch.compile to fuse: chunks of
    DC_QUERY_CHUNK queries against their band of chunk + window - 1 keys, all chunks at once."""
    seq_len, num_heads, head_dim = q.shape
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
    queries = padded(q.float())[front:].view(num_chunks, chunk, num_heads, head_dim)
    # scores (chunks, H, chunk, band): products of the compute-dtype q and k, accumulated in fp32
    scores = torch.einsum("nchd,nhdb->nhcb", queries, bands(padded(k.float()))) * scale
    query_in_chunk = torch.arange(chunk, device=q.device)[:, None]
    key_in_band = torch.arange(band, device=q.device)[None, :]
    in_window = (key_in_band >= query_in_chunk) & (key_in_band < query_in_chunk + window)  # (chunk, band)
    allowed = in_window & (query_ids[:, :, None] == bands(padded_ids)[:, None, :])  # (chunks, chunk, band)
    probabilities = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    head_mix = F.rms_norm(w1.float(), (num_heads,), eps=DC_GATE_NORM_EPS)  # (T, H)
    head_mix, head_out = (padded(t)[front:].view(num_chunks, chunk, num_heads).transpose(1, 2)[..., None]
                          for t in (head_mix, w2.float()))  # (chunks, H, chunk, 1)
    mixed = (head_mix * probabilities).sum(dim=1, keepdim=True)  # (chunks, 1, chunk, band)
    weights = (head_out * mixed).to(v.dtype).float()  # (chunks, H, chunk, band), rounded as the kernel's
    correction = torch.einsum("nhcb,nhdb->nchd", weights, bands(padded(v.float())))  # (chunks, chunk, H, D)
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
                dc_w2: Tensor | None = None) -> Tensor:
        """x (T, d) normed input; lambdas (2,): the Q/K/V and the O weight multipliers; aux_v (T, H, D) added
        to v; per token and head (T, H): xsa_alpha (XSA layers), output_gate (gated layers), dc_w1 and dc_w2
        (the DC layer). Returns the projected output (T, d) in x's dtype (the additions and gates are cast to it;
        the DC arithmetic is fp32)."""
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
        q, k = rotary(q, features.paired_heads), rotary(k, features.paired_heads)
        if features.key_offset:
            k = shift_stationary_keys(k)
        if aux_v is not None:
            v = v + aux_v.type_as(v)
        mask = masks.by_kind[features.mask_kind]
        if features.paired_heads:  # (T, H, D) -> (2T, H/2, D): row 2t holds heads 0..H/2-1, row 2t+1 the rest
            rows = (t.reshape(2 * seq_len, num_heads // 2, head_dim) for t in (q, k, v))
            y = attend(*rows, mask, rotary.scale).reshape(seq_len, num_heads, head_dim)
        else:
            y = attend(q, k, v, mask, rotary.scale)
        if features.dc:  # base + correction in fp32, rounded once, as the kernel
            correction = dc_correction(q, k, v, dc_w1, dc_w2, masks.document_ids, rotary.scale, self.dc_window)
            y = (y.float() + correction).type_as(y)
        if features.xsa:
            y = exclusive_self_attention(y, v, xsa_alpha)
        if features.output_gate:
            y = y * output_gate.type_as(y)[..., None]
        return F.linear(y.reshape(seq_len, num_heads * head_dim), lambdas[1] * self.qkvo[3].type_as(y))


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
