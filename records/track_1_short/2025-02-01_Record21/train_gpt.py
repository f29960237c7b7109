"""The record-21 recipe (public speedrun record 21, Feb 2025: 3.2788 in 179.8 s on 8xH100, 1,770 steps), kept
runnable over the repository's harness after the default recipe moved on. See README.md beside this file.

Launch from the repository root with torchrun, or plainly with python for one process, e.g.
`python records/track_1_short/2025-02-01_Record21/train_gpt.py --preset=tiny`.
Every setting below can be overridden as `--name=value`; `--help` lists them.

This file is the recipe: everything that can change a number, a kernel or the timing of the run.
harness.py beside it starts, checks, logs, stops and saves the run (and never imports this file);
every log embeds both files. Sections, top to bottom:
  1. Settings and constants    5. Attention masks      9. Training step, validation, warm-up
  2. Runtime                   6. FP8 matmul op       10. Checkpoint state
  3. Model                     7. Data loading        11. train() and main()
  4. Optimizers and schedules  8. Speed machinery (gradient reducer, compilation by region)
"""

import copy
import functools
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Before torch can initialise CUDA: growable segments keep the logits-sized blocks from fragmenting the
# caching allocator. setdefault, so a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, which holds harness.py
import harness  # noqa: E402
from harness import (FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, DataError, MemorySavers, Range,  # noqa: E402
                     RunSettings, SettingsError, find_shards, load_shard, read_shard_header, setting, to_cpu)

RECIPE_FILE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------------
# 1. Settings and constants
# Every setting of the recipe, grouped; free_on_resume marks those a resumed run may change (they do not
# change the mathematics). The harness adds its own (log folder, run id, checkpoints, resume, preset).


@dataclass
class Settings(RunSettings):
    # data
    train_files: str = setting("data/fineweb10B/fineweb_train_*.bin", "glob of training token shards")
    val_files: str = setting("data/fineweb10B/fineweb_val_*.bin", "glob of validation token shards")
    val_tokens: int = setting(10_485_760, "validation tokens, taken from the start of val_files", POSITIVE)
    train_seq_len: int = setting(48 * 1024, "tokens in one packed training sequence (one micro-batch)", POSITIVE)
    val_seq_len: int = setting(4 * 64 * 1024, "tokens in one packed validation sequence", POSITIVE)
    train_batch_tokens: int = setting(8 * 48 * 1024, "tokens per optimizer step, over all ranks", POSITIVE)
    # schedule
    num_iterations: int = setting(1770, "optimizer steps", POSITIVE)
    cooldown_frac: float = setting(0.4, "final fraction of steps over which the LR decays to LR_FLOOR", FRACTION)
    val_every: int = setting(125, "validate every this many steps (and at the end); 0: only at the end", NON_NEGATIVE,
                             free_on_resume=True)
    warmup_steps: int = setting(10, "untimed compile/kernel warmup steps on dummy data, then state is restored",
                                NON_NEGATIVE, free_on_resume=True)
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
    seed: int = setting(0, "random seed for the model init", Range(0, 2**63 - 1))
    # machinery: where and how the same mathematics is computed
    device: str = setting("auto", "auto (cuda if available), cuda or cpu", free_on_resume=True)
    attention_backend: str = setting("auto", "auto (flex on cuda, sdpa on cpu), flex or sdpa (dense mask)",
                                     free_on_resume=True)
    compile: bool = setting(True, "torch.compile the model", free_on_resume=True)
    # memory savers: the same mathematics, recomputed in backward instead of kept (see README)
    checkpoint_blocks: int = setting(-1, "recompute the first N blocks in backward: 0 (none) .. num_layers (all); "
                                         "-1: --memory chooses", Range(-1, math.inf, high_open=True),
                                     free_on_resume=True)
    loss_chunk_tokens: int = setting(-1, "training head + cap + loss in chunks of N tokens (a multiple of 16), each "
                                         "recomputed in backward; 0: one piece; -1: --memory chooses",
                                     Range(-1, math.inf, high_open=True), free_on_resume=True)
    memory: str = setting("auto", "savers left at -1: auto (on CUDA, the cheapest that fits this GPU by "
                                  "records/benchmarks/memory_table.json) or off (none)", free_on_resume=True)


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

# The recipe's fixed numbers (those worth tuning are settings above).
LR_FLOOR = 0.1  # lr_factor at the end of the cooldown
HIDDEN_INIT_STD = 0.5  # hidden matrices: uniform with std HIDDEN_INIT_STD / sqrt(fan_in)
EMBED_INIT_STD = 1.0  # token and value embeddings: normal
ROTARY_MIN_FREQUENCY = 1 / 1024  # rotary frequencies from 1 down to this, on half of each head
VALUE_LAMBDAS_INIT = (0.5, 0.5)  # v <- a * v + b * value embedding
EMBED_MIX_INIT = (1.0, 0.0)  # each block: x <- a * x + b * x0
SKIP_WEIGHT_INIT = 1.0  # U-net skip: decoder block input += w * encoder output
LOGIT_CAP_SOFTNESS = 4  # logits -> cap * sigmoid(z / (cap / LOGIT_CAP_SOFTNESS))
VOCAB_PAD_MULTIPLE = 128  # the LM head's rows: vocabulary rounded up to this
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic; pushes singular values into ~[0.7, 1.2]
NEWTON_SCHULZ_EPS = 1e-7  # in the normalisation before the iteration
# FP8 LM head: power-of-two scales multiply before the cast to FP8 and are divided out by _scaled_mm
FP8_X_SCALE = 2.0
FP8_W_SCALE = 2.0**9
FP8_GRAD_SCALE = 2.0**19
EVAL_LOGITS_CHUNK = 16 * 1024  # tokens per head+loss chunk in evaluation (bounds the fp32 logits)


def settings_help() -> str:
    return harness.settings_help(Settings, PRESETS)


def parse_settings(argv: list[str]) -> Settings:
    return harness.parse_settings(Settings, PRESETS, argv, check_settings)


def check_settings(s: Settings):
    """The combinations this recipe cannot run (each number's own range is checked by the harness)."""
    def require(condition: bool, message: str):
        if not condition:
            raise SettingsError(message)

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
    # Validation may use other lengths: longer sequences are still seen through the trained window, and a
    # shorter one than the window is plain causal attention over the whole sequence.
    require(s.max_window_tokens <= s.train_seq_len,
            f"--max_window_tokens={s.max_window_tokens}: the attention window is longer than a training sequence "
            f"(--train_seq_len={s.train_seq_len}), so training never fills it; choose {s.block_size}.."
            f"{s.train_seq_len} (a multiple of block_size={s.block_size}) or a longer --train_seq_len")
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
# 2. Runtime: this process's rank, device and share of a step


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
        notices, total_memory, has_fp8 = harness.check_gpu(device, backend, s.head_dim)
        if s.fp8_head and not has_fp8:
            props = torch.cuda.get_device_properties(device)
            raise SettingsError(f"--fp8_head=true needs FP8 matmuls, which need compute capability 8.9 or newer "
                                f"(Ada, Hopper, Blackwell); {props.name} has compute capability "
                                f"{props.major}.{props.minor}: run with --fp8_head=false")
        notices[0] += f"; FP8 head {'on' if s.fp8_head else 'off'}"
    savers, memory_notice = harness.choose_memory_savers(s, world_size, total_memory, harness.load_memory_table())
    notices.append(memory_notice)
    if rank == 0:
        for notice in notices:
            print(notice, flush=True)
    return Runtime(rank, world_size, device, backend, sequences_per_step // world_size, savers, tuple(notices))


# ----------------------------------------------------------------------------------------------------
# 3. Model


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def init_uniform_(weight: Tensor) -> Tensor:
    fan_in = weight.size(-1)
    bound = 3**0.5 * HIDDEN_INIT_STD / fan_in**0.5  # uniform: std = bound / sqrt(3)
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
        frequencies = torch.cat([ROTARY_MIN_FREQUENCY ** torch.linspace(0, 1, quarter), torch.zeros(quarter)])
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
        self.value_lambdas = nn.Parameter(torch.tensor(VALUE_LAMBDAS_INIT))
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
        self.embed_mix = nn.Parameter(torch.tensor(EMBED_MIX_INIT))  # x <- a*x + b*x0

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None, mask: AttentionMask | None,
                cache: "LayerCache | None" = None) -> Tensor:
        x = self.embed_mix[0] * x + self.embed_mix[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), value_embed, mask, cache)
        return x + self.mlp(rms_norm(x))


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


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
        self.skip_weights = nn.Parameter(torch.full((s.num_layers // 2,), SKIP_WEIGHT_INIT))  # U-net: decoder block i <- encoder
        self.lm_head = CastedLinear(s.model_dim, padded_vocab_size(s.vocab_size), zero_init=True)
        for embedding in (self.embed, *self.value_embeds):
            nn.init.normal_(embedding.weight, std=EMBED_INIT_STD)
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
        return self.logit_cap * torch.sigmoid(logits / (self.logit_cap / LOGIT_CAP_SOFTNESS))

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



# ----------------------------------------------------------------------------------------------------
# 4. Optimizers and schedules


def newton_schulz_orthogonalize(grad: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximates U V^T of grad = U S V^T for each matrix in the last two dims."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NEWTON_SCHULZ_EPS)
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



# The schedules: every number of the run that changes with the step.


def lr_factor(step: int, s: Settings) -> float:
    """1.0, then a linear decay to LR_FLOOR over the last cooldown_frac of the steps."""
    progress = step / s.num_iterations
    if progress < 1 - s.cooldown_frac:
        return 1.0
    remaining = (1 - progress) / s.cooldown_frac
    return remaining + (1 - remaining) * LR_FLOOR


def muon_momentum(step: int, s: Settings) -> float:
    ramp = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps else 1.0
    return (1 - ramp) * s.muon_momentum_start + ramp * s.muon_momentum



def window_blocks_at(step: int, s: Settings) -> int:
    """Long sliding window in blocks: grows linearly from 1 to max_window_tokens / block_size. With the
    defaults this is the record's next_multiple_of_128(1728 * progress) / 128."""
    final_blocks = s.max_window_tokens // s.block_size
    return max(1, math.ceil(step / s.num_iterations * (final_blocks - 0.5)))



# ----------------------------------------------------------------------------------------------------
# 5. Attention masks
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



# ----------------------------------------------------------------------------------------------------
# 6. FP8 matmul op (LM head)
# out = x @ w.T with x, w cast to float8_e4m3fn and the output gradient to float8_e5m2. Fixed
# power-of-two scales multiply before the cast and are divided out by _scaled_mm. torch._scaled_mm has
# no autograd, so the op is a custom op with its own backward. On CUDA the bodies run under
# torch.compile, which fuses each scale + cast (+ transposed copy) into one kernel and keeps the scale
# tensors on the device; on CPU they run eagerly (the same arithmetic: the scales are exact).
# No host-device synchronisation: the inverse scales are made on the device (torch.full), never copied.


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
# 7. Data loading (the shard files are read by harness.load_shard)


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


def check_data(s: Settings, is_main: bool = True) -> tuple[list[Path], int, Tensor]:
    """Training files (headers), validation tokens (range-checked) and their overlap, before anything is
    built. Returns (training files, usable training tokens, validation tokens)."""
    train_files = find_shards(s.train_files, "train_files")
    val_files = find_shards(s.val_files, "val_files")
    usable_train_tokens = check_train_files(train_files, s.train_batch_tokens)
    val_tokens = load_val_tokens(val_files, s)
    harness.check_val_not_in_train(s, is_main)
    return train_files, usable_train_tokens, val_tokens


# ----------------------------------------------------------------------------------------------------
# 8. Speed machinery: compilation by region, overlapped gradient reduction


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


# ----------------------------------------------------------------------------------------------------
# 9. Training step, validation, warm-up


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
                    console: harness.Console):
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


# ----------------------------------------------------------------------------------------------------
# 10. Checkpoint state: the recipe's part of a checkpoint (the harness adds step, time, settings, RNG)


def training_state(raw_model: nn.Module, optimizers, loader: TrainLoader, runtime: Runtime, group) -> dict | None:
    """Weights, Adam's state, every Muon momentum buffer by parameter name (gathered over the CPU group
    from the rank that owns it, so the state loads at any world size) and the data position. Collective:
    every rank calls it; rank 0 gets the dict, the others None."""
    muon, adam = optimizers
    names = {param: name for name, param in raw_model.named_parameters()}
    momentum = {names[param]: muon.state[param]["momentum_buffer"].cpu()
                for param in muon.owned_parameters(runtime.rank, runtime.world_size)
                if "momentum_buffer" in muon.state[param]}
    if runtime.world_size > 1:
        parts = [None] * runtime.world_size if runtime.is_main else None
        dist.gather_object(momentum, parts, dst=0, group=group)
        momentum = {name: buffer for part in parts for name, buffer in part.items()} if runtime.is_main else None
    if not runtime.is_main:
        return None
    return dict(model=to_cpu(raw_model.state_dict()), adam=to_cpu(adam.state_dict()), muon_momentum=momentum,
                data=dict(file_index=loader.file_index, position=loader.position))


def restore_training_state(checkpoint: dict, raw_model: nn.Module, optimizers, runtime: Runtime) -> tuple[int, int]:
    """Loads training_state's dict (each rank takes the Muon buffers it owns); returns the data position."""
    muon, adam = optimizers
    raw_model.load_state_dict(checkpoint["model"])
    adam.load_state_dict(checkpoint["adam"])
    names = {param: name for name, param in raw_model.named_parameters()}
    muon.state.clear()
    for param in muon.owned_parameters(runtime.rank, runtime.world_size):
        buffer = checkpoint["muon_momentum"].get(names[param])
        if buffer is not None:
            muon.state[param]["momentum_buffer"] = buffer.to(param.device, param.dtype)
    return checkpoint["data"]["file_index"], checkpoint["data"]["position"]


# ----------------------------------------------------------------------------------------------------
# 11. train() and main()


def train(s: Settings, runtime: Runtime, signals: harness.StopSignals | None = None) -> str | None:
    """Runs the training, or continues it with --resume. Returns None when it ran to the end, or the
    name of the signal that stopped it early (after a checkpoint, when checkpoints are on)."""
    if runtime.grad_accum_steps * runtime.world_size * s.train_seq_len != s.train_batch_tokens:
        raise ValueError("runtime was resolved for other settings: call resolve_runtime with these settings")
    with harness.Run(s, runtime, signals, RECIPE_FILE) as run:
        with run.console.activity("checking the data and loading the validation tokens"):
            train_files, usable_train_tokens, val_tokens = check_data(s, runtime.is_main)
        run.find_checkpoint()
        with run.console.activity("building the model and optimizers"):
            raw_model = build_model(s, runtime)
            eval_model = compile_model(raw_model) if s.compile else raw_model
            optimizers = build_optimizers(raw_model, s, runtime)
            reducer = GradientReducer(raw_model.parameters(), runtime)
        run.open_log(harness.environment_report(s, runtime), f"{runtime.world_size} rank(s) x "
                     f"{runtime.grad_accum_steps} micro-step(s) of {s.train_seq_len} tokens on {runtime.device.type}")
        if s.num_iterations * s.train_batch_tokens > usable_train_tokens:
            run.console.say(f"note: the run needs {s.num_iterations * s.train_batch_tokens} training tokens but the "
                            f"files hold {usable_train_tokens}: the data will be repeated")
        run.warm_up(lambda: warm_up_kernels(raw_model, optimizers, reducer, s, runtime, run.console))
        data_position = run.resume(
            lambda checkpoint: restore_training_state(checkpoint, raw_model, optimizers, runtime))
        loader = TrainLoader(train_files, s, runtime, *(data_position or (0, 0)))
        run.start_training(lambda: training_state(raw_model, optimizers, loader, runtime, run.cpu_group))
        for step in range(run.start_step, s.num_iterations + 1):
            last_step = step == s.num_iterations
            if last_step or (s.val_every and step % s.val_every == 0):
                run.validate(step, step * s.train_batch_tokens,
                             lambda: validation_loss(eval_model, val_tokens, step, s, runtime))
            if last_step:
                break
            loss = train_step(raw_model, optimizers, reducer, loader, step, s, runtime)
            if run.step_done(step + 1, loss, (step + 1) * s.train_batch_tokens, lr_factor(step, s)):
                break
        return run.finish(raw_model.state_dict)


def main(argv: list[str]) -> int:
    def command(signals: harness.StopSignals) -> str | None:
        s = parse_settings(argv)
        runtime = resolve_runtime(s, *harness.process_ranks())
        repository = Path(__file__).resolve().parents[3]
        harness.check_memory(s, runtime, estimate_memory(s, runtime), str(Path(__file__).resolve().relative_to(repository)))
        if s.check_only:
            train_files, usable_train_tokens, _ = check_data(s)
            harness.preflight(s, train_files, usable_train_tokens, s.vocab_size)
            return None
        with harness.process_group(runtime):
            harness.check_log_dir_on_rank0(s, runtime)
            return train(s, runtime, signals)

    return harness.run_main(argv, settings_help, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
