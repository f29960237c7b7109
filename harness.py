"""harness.py: what starts, checks, logs, stops and saves a training run, for any recipe.

The recipe (train_gpt.py, or a record's own train_gpt.py under records/) holds everything that can change
a number, a kernel or the timing of the run; this file holds the rest and never imports the recipe. The
recipe hands it what it needs: its settings dataclass (a subclass of RunSettings), its runtime (rank,
world size, device), its source file, and callables for the work itself.

Sections, top to bottom:
  1. Settings: declaring, parsing, --help       5. Logs, metrics, console, clock
  2. Start-up checks: GPU, memory, log folder   6. Stop signals and the non-finite loss watch
  3. Token shards: the one reader               7. Checkpoints and exports
  4. Validation data not in the training data   8. The run: Run (train()'s services) and run_main
                                                 9. The launcher: torchrun for run.sh (python harness.py launch)
"""

import collections
import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

HARNESS_FILE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------------
# 1. Settings
# A recipe declares its settings as a dataclass that extends RunSettings, one setting() per field: the
# default, the help text, the valid range of a number, and whether a resumed run may change it.


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


def setting(default, help_text, valid: Range | None = None, free_on_resume: bool = False):
    """One setting. Float settings must be finite; `valid` adds the range checked by check_ranges.
    free_on_resume: the setting does not change the training (where the run logs, how it is checked or
    computed exactly the same way), so a resumed run may change it; any other difference is refused."""
    return field(default=default, metadata={"help": help_text, "valid": valid, "free_on_resume": free_on_resume})


@dataclass
class RunSettings:
    """The harness's own settings; a recipe's settings dataclass extends this one."""
    log_dir: str = setting("logs", "folder for the run log <run_id>.txt (rank 0)", free_on_resume=True)
    run_id: str = setting("", "log file name; empty: a random UUID", free_on_resume=True)
    checkpoint_every: int = setting(0, "checkpoint every this many steps and at the end, in <log_dir>/<run_id>/; "
                                       "0: off", NON_NEGATIVE, free_on_resume=True)
    checkpoint_keep: int = setting(2, "checkpoints to keep (the newest)", POSITIVE, free_on_resume=True)
    resume: str = setting("", "continue from a checkpoint file, or auto: the newest valid one of --run_id "
                              "(none: start)", free_on_resume=True)
    save_checkpoint: bool = setting(False, "write the final checkpoint even when --checkpoint_every=0",
                                    free_on_resume=True)
    save_safetensors: bool = setting(False, "also write the final weights as <log_dir>/<run_id>/final.safetensors",
                                     free_on_resume=True)
    preset: str = setting("", "apply a preset first (tiny: a small CPU-sized run), then the other flags",
                          free_on_resume=True)
    check_only: bool = setting(False, "check settings, memory, data and log folder, then exit (run.sh does this "
                                      "first)", free_on_resume=True)
    allow_val_in_train: bool = setting(False, "run even when a validation file is also a training file (warns)",
                                       free_on_resume=True)


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


def recipe_fields_first(settings_type: type) -> list[dataclasses.Field]:
    """The recipe's own settings, then the harness's (a subclass's fields come after its base's)."""
    harness_names = {f.name for f in dataclasses.fields(RunSettings)}
    fields = dataclasses.fields(settings_type)
    return [f for f in fields if f.name not in harness_names] + [f for f in fields if f.name in harness_names]


def settings_help(settings_type: type, presets: dict[str, dict], program: str = "train_gpt.py") -> str:
    def flag(name, value):
        return f"--{name}={str(value).lower() if isinstance(value, bool) else value}"

    fields = recipe_fields_first(settings_type)
    width = max(len(flag(f.name, f.default)) for f in fields)
    lines = [f"usage: torchrun --nproc_per_node=N {program} [--name=value ...]   (or: python {program} ...)",
             "", "settings (--name=default, then what it does and, for numbers, the valid range):"]
    for f in fields:
        valid = f"; valid: {f.metadata['valid']}" if f.metadata["valid"] is not None else ""
        lines.append(f"  {flag(f.name, f.default):<{width}}  {f.metadata['help']}{valid}")
    spellings = " or ".join("/".join(spellings) for spellings in BOOLEAN_SPELLINGS.values())
    lines += ["", f"true/false settings accept {spellings}, in any letter case.", "", "presets:"]
    for name, values in presets.items():
        flags = " ".join(flag(key, value) for key, value in values.items())
        lines += textwrap.wrap(flags, 110, initial_indent=f"  --preset={name}: ", subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_settings(settings_type: type, presets: dict[str, dict], argv: list[str], check: Callable):
    """--name=value arguments over the preset's values over the defaults; check(settings) raises
    SettingsError for combinations the recipe cannot run (after check_ranges)."""
    fields = {f.name: f for f in dataclasses.fields(settings_type)}
    types = {f.name: type(f.default) for f in fields.values()}
    overrides, given = {}, {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SettingsError(f"bad argument {arg!r}: settings are given as --name=value (see --help)")
        name, text = arg[2:].split("=", 1)
        if name not in fields:
            raise SettingsError(f"unknown setting --{name} (see --help for the list)")
        if name in given:  # last-wins would silently drop one of two values the user typed
            raise SettingsError(f"--{name} is given twice (--{name}={given[name]} and --{name}={text}); give it once")
        given[name] = text
        overrides[name] = parse_value(name, types[name], text)
    preset = overrides.get("preset", "")
    if preset and preset not in presets:
        raise SettingsError(f"--preset={preset}: unknown preset; choose one of {', '.join(presets)}")
    settings = settings_type(**{**presets.get(preset, {}), **overrides})
    check_ranges(settings)
    check(settings)
    return settings


def check_ranges(s):
    """Every float finite, every number inside its declared range."""
    for f in dataclasses.fields(s):
        value, valid = getattr(s, f.name), f.metadata["valid"]
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"--{f.name}={value}: must be a finite number")
        if valid is not None and value not in valid:
            raise SettingsError(f"--{f.name}={value}: must be in {valid} (see --help)")


def settings_free_on_resume(settings_type: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(settings_type) if f.metadata["free_on_resume"])


# ----------------------------------------------------------------------------------------------------
# 2. Start-up checks

@dataclass(frozen=True)
class MemorySavers:
    """Exact memory savers: what they drop in forward is recomputed in backward."""
    checkpoint_blocks: int = 0  # the first N transformer blocks keep only their inputs
    loss_chunk_tokens: int = 0  # training head + cap + loss per chunk of this many tokens; 0: one piece


# Shared memory per block that FlexAttention's largest kernel needs with inductor's default tiles (bf16, head_dim
# 128), by compute capability: offline compilation for each target with the GPU check's method (README, "Running
# on other GPUs"; sm_80/sm_89 at 2,048 tokens, the tiles do not depend on the length). The
# tiles, hence the need, depend on the architecture; what a GPU offers is its own property (sm_86/sm_89 cards
# such as RTX 3090/4090 and L40S: 101,376 bytes; A100: 166,912; H100: 232,448).
FLEX_SHARED_MEMORY_NEEDED = {(8, 0): 99_328, (8, 9): 99_328, (9, 0): 166_400}


def check_gpu(device: torch.device, backend: str, head_dim: int) -> tuple[list[str], int, bool]:
    """Start-up capability checks of the visible GPU: bf16 and, with backend "flex", FlexAttention's shared
    memory at this head_dim. Returns one-line notices, the GPU's memory in bytes, and whether it has FP8
    matmuls (compute capability 8.9 or newer), which each recipe turns into an error or a fallback."""
    props = torch.cuda.get_device_properties(device)
    capability = f"compute capability {props.major}.{props.minor}"
    if (props.major, props.minor) < (8, 0):
        raise SettingsError(f"{props.name} ({capability}) has no bfloat16 support, which training computes in: "
                            "it needs compute capability 8.0 or newer (A100, RTX 30xx/40xx, L40S, H100)")
    has_fp8 = (props.major, props.minor) >= (8, 9)
    notices = [f"GPU: {props.name}, {capability}, {props.total_memory / 2**30:.1f} GiB: bf16 yes, "
               f"FP8 matmuls {'yes' if has_fp8 else 'no'}"]
    if backend == "flex":
        needed = FLEX_SHARED_MEMORY_NEEDED.get((props.major, props.minor)) if head_dim == 128 else None
        offered = props.shared_memory_per_block_optin
        if needed is None:
            notices.append(f"FlexAttention: the GPU check has not compiled its kernels for {capability} at "
                           f"head_dim {head_dim}; if compilation stops with 'out of resource: shared memory', "
                           f"this GPU's {offered} bytes per block are too few")
        elif offered < needed:
            raise SettingsError(f"FlexAttention's kernels need {needed} bytes of shared memory per block on "
                                f"{capability} (GPU check); {props.name} offers {offered}: use a GPU with more")
        else:
            notices.append(f"FlexAttention: kernels need {needed} of the {offered} bytes of shared memory per block")
    return notices, props.total_memory, has_fp8


# --memory=auto reads the GPU check's predicted peak memory per combination of savers for the record shape, from
# the recipe's own table (record 21's is this one; record 89 names its own).
MEMORY_TABLE_PATH = HARNESS_FILE.parent / "records" / "benchmarks" / "memory_table.json"


def load_memory_table(path: Path = MEMORY_TABLE_PATH) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def usable_memory_gib(total_memory: int) -> float:
    """What a prediction may fill: 90% of the GPU less 1 GiB, for the CUDA context, NCCL buffers, cuBLAS
    workspaces and allocator fragmentation, none of which the generated code's allocation plan shows."""
    return 0.9 * total_memory / 2**30 - 1.0


def recompute_order(row: dict) -> tuple:
    """Rows by recomputation; among equal ones the larger loss chunk first (fewer, larger matmuls; 0: the
    recipe's own chunking, the largest)."""
    return row["recompute_flops_per_token"], -(row["loss_chunk_tokens"] or math.inf)


def choose_memory_savers(s, world_size: int, total_memory: int | None, table: dict | None, fp8: bool | None = None,
                         table_path: Path = MEMORY_TABLE_PATH) -> tuple[MemorySavers, str]:
    """Savers set explicitly (>= 0) stay; with --memory=auto on a GPU the others come from the table row with
    the least recomputation whose predicted peak fits usable_memory_gib. The table names the settings that size
    memory (its shape: they must equal the run's) and its rows' FP8 key (fp8_setting, record 21's fp8_head when
    absent); fp8 is whether the run trains in FP8 (None: that setting's value). Returns the savers and a notice."""
    as_set = MemorySavers(max(s.checkpoint_blocks, 0), max(s.loss_chunk_tokens, 0))
    chosen = f"checkpoint_blocks={as_set.checkpoint_blocks} loss_chunk_tokens={as_set.loss_chunk_tokens}"
    if s.checkpoint_blocks >= 0 and s.loss_chunk_tokens >= 0:
        return as_set, f"memory savers as set: {chosen}"
    if s.memory == "off" or total_memory is None:
        reason = "--memory=off" if s.memory == "off" else "no GPU"
        return as_set, f"memory savers ({reason}): {chosen}"
    if table is None:
        return as_set, f"--memory=auto: no table at {table_path}: {chosen}"
    differing = [name for name, value in table["shape"].items() if getattr(s, name) != value]
    if differing:
        return as_set, (f"--memory=auto: the memory table covers the record shape only ({', '.join(differing)} "
                        f"differ): {chosen}")
    fp8_key = table.get("fp8_setting", "fp8_head")
    if fp8 is None:
        fp8 = getattr(s, fp8_key)
    matching = [row for row in table["rows"] if row[fp8_key] == fp8
                and s.checkpoint_blocks in (-1, row["checkpoint_blocks"])
                and s.loss_chunk_tokens in (-1, row["loss_chunk_tokens"])]
    # Ranks share the optimizer state, so a combination the table lacks at this world size is bounded by its
    # 1-rank row.
    checked = {(row["checkpoint_blocks"], row["loss_chunk_tokens"]) for row in matching
               if row["world_size"] == world_size}
    candidates = sorted((row for row in matching if row["world_size"] == world_size or (
        row["world_size"] == 1 and (row["checkpoint_blocks"], row["loss_chunk_tokens"]) not in checked)),
        key=recompute_order)
    if not candidates:
        return as_set, f"--memory=auto: no table row matches these settings: {chosen}"
    usable = usable_memory_gib(total_memory)
    fitting = [row for row in candidates if row["peak_gib"] <= usable]
    row = fitting[0] if fitting else min(candidates, key=lambda row: row["peak_gib"])
    savers = MemorySavers(row["checkpoint_blocks"], row["loss_chunk_tokens"])
    verdict = "fits" if fitting else "does NOT fit (expect out-of-memory)"
    return savers, (f"--memory=auto: checkpoint_blocks={savers.checkpoint_blocks} "
                    f"loss_chunk_tokens={savers.loss_chunk_tokens}: predicted peak {row['peak_gib']:.1f} GiB "
                    f"(GPU check, {row['world_size']} rank(s)) {verdict} in the {usable:.1f} GiB usable of "
                    f"{total_memory / 2**30:.1f} GiB")


GIB = 2**30


def available_memory(runtime) -> int:
    """Bytes one rank may use: the GPU's memory, or the machine's available memory shared by its ranks."""
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_properties(runtime.device).total_memory
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))


def check_memory(s, runtime, parts: dict[str, tuple[int, str]], program: str = "train_gpt.py"):
    """Stops when the recipe's lower bound of one rank's peak memory (parts: name -> (bytes, the setting that
    sizes it), training and evaluation parts) exceeds what this rank may use; program: the recipe's file name,
    for the advice."""
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
                  f"&& python {program} --preset=tiny`")
    raise SettingsError(
        f"these settings need at least {needed / GIB:.1f} GiB per rank on {runtime.device.type} but "
        f"{available / GIB:.1f} GiB is available (largest part: {largest}, {size / GIB:.1f} GiB); {advice}")


def log_dir_problem(log_dir: Path, error: OSError) -> str:
    if isinstance(error, FileExistsError) or (log_dir.exists() and not log_dir.is_dir()):
        problem = "is a file, not a folder"
    elif error.errno == errno.ENOSPC:
        problem = "is on a full disk"
    else:
        problem = f"cannot be written ({error.strerror or error})"
    return f"--log_dir={log_dir}: the log folder {problem}; choose another --log_dir"


def check_log_dir(s):
    """Writes, fsyncs and deletes a 64 KiB file in the log folder, so an unwritable folder, a file in its
    place or a full disk stop the run before it starts. Folders it had to create are removed again."""
    log_dir = Path(s.log_dir)
    created = [folder for folder in [log_dir, *log_dir.parents] if not folder.exists()]
    probe = log_dir / f".write_check_{os.getpid()}.tmp"
    temporaries_being_written.add(probe)  # a second stop signal deletes it; a kill leaves it to remove_orphans
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
        temporaries_being_written.discard(probe)


def on_rank0_for_all(runtime, check: Callable, elsewhere: str):
    """Runs check() on rank 0; if it raises SettingsError every rank stops: rank 0 with its error (which it
    prints), the others with SettingsError(elsewhere). Returns check()'s result on rank 0, else None."""
    problem = result = None
    if runtime.is_main:
        try:
            result = check()
        except SettingsError as error:
            problem = error
    if runtime.world_size > 1:
        failed = torch.tensor(int(problem is not None), device=runtime.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and problem is None:
            problem = SettingsError(elsewhere)
    if problem is not None:
        raise problem
    return result


def check_log_dir_on_rank0(s, runtime):
    """Rank 0 checks the folder it will log to; all ranks stop together if it fails."""
    on_rank0_for_all(runtime, lambda: check_log_dir(s), "rank 0 cannot write its log folder")


class DiskFull(SettingsError):
    """A write during the run found no space (or no quota) left. Run adds the last good checkpoint and
    whether the log took the stop line; str() is the one line for the console."""

    def __init__(self, path: Path, needed: int):
        super().__init__(str(path))
        self.path, self.needed = path, needed
        try:
            self.free = shutil.disk_usage(path.parent).free
        except OSError:
            self.free = 0
        self.last_checkpoint: Path | None = None
        self.logged: bool | None = None  # None: not tried yet

    def __str__(self) -> str:
        kept = f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint is not None \
            else "no checkpoint was saved before"
        unlogged = "; the log lacks this line (no space for it either)" if self.logged is False else ""
        return (f"the disk of {self.path.parent} is full: writing {self.path.name} needs {self.needed:,} bytes but "
                f"{self.free:,} are free; {kept}; free space or choose another --log_dir, then continue with "
                f"--resume=auto{unlogged}")


@contextlib.contextmanager
def disk_full_as_error(path: Path, needed: int):
    """Turns a write's ENOSPC or EDQUOT into DiskFull(path, needed)."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, needed) from None
        raise


class RunFolderLock:
    """<log_dir>/<run_id>.lock, flock-ed by rank 0 for the whole run, so one process at a time writes a
    run's log, metrics and checkpoints. The OS drops the lock when the process ends, however it ends: a
    lock file that a killed run left behind is free and is taken over."""

    def __init__(self, log_dir: Path, run_id: str):
        self.path = log_dir / f"{run_id}.lock"
        log_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()  # empty while the holder starts up
                os.close(fd)
                raise SettingsError(f"--log_dir={log_dir} --run_id={run_id}: the run folder is in use by "
                                    f"{f'process {holder}' if holder else 'another process'} (lock {self.path}); "
                                    "wait for that run to end or stop it, or choose another --run_id") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # a finishing holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody locks a file that is about to go
            os.close(self.fd)
            self.fd = None


LOG_DIR_PROBE = re.compile(r"\.write_check_(\d+)\.tmp")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(log_dir: Path, run_id: str) -> list[Path]:
    """Deletes what a killed run left half-written: run_id's temporary checkpoint, export and log header
    files, and log-folder probes of processes that no longer run. Call it holding the run's lock."""
    orphans = [log_dir / f"{run_id}.txt{TEMPORARY_SUFFIX}", *sorted((log_dir / run_id).glob(f"*{TEMPORARY_SUFFIX}")),
               *(path for path in log_dir.glob(".write_check_*.tmp")
                 if (match := LOG_DIR_PROBE.fullmatch(path.name)) and not process_alive(int(match[1])))]
    removed = []
    for path in orphans:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------------
# 3. Token shards
# Shard = 256 little-endian int32 header [magic, version, token count, 0...] + uint16 tokens. The one
# reader of token files: the trainer, data/shards.py (the data tools) and benchmark.py use it.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")


def unreadable(path: Path, error: OSError) -> DataError:
    return DataError(f"{path}: cannot read it ({error.strerror or error}); check that it exists and that this user "
                     "may read it")


def read_shard_header(path: Path) -> int:
    """Returns the token count after checking magic, version, count and file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_bytes = f.read(SHARD_HEADER_BYTES)
    except OSError as error:
        raise unreadable(path, error) from None
    if len(header_bytes) < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: too short for a shard header ({size} bytes, the header alone is "
                        f"{SHARD_HEADER_BYTES}); the file is empty or an interrupted download/write: delete it and "
                        "fetch or make it again")
    header = np.frombuffer(header_bytes, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard: "
                        "check --train_files/--val_files")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION}); make it again "
                        "with data/fineweb.py")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise DataError(f"{path}: negative token count {num_tokens} in the header; the header is corrupt")
    expected = SHARD_HEADER_BYTES + SHARD_TOKEN_DTYPE.itemsize * num_tokens
    if size < expected:
        raise DataError(f"{path}: truncated: the header declares {num_tokens:,} tokens ({expected:,} bytes) but the "
                        f"file has only {size:,} bytes; delete it and fetch or make it again")
    if size > expected:
        raise DataError(f"{path}: {size - expected:,} trailing bytes after the {num_tokens:,} tokens the header "
                        f"declares ({expected:,} bytes expected, {size:,} found); delete it and fetch or make it again")
    return num_tokens


def read_shard_tokens(path: Path) -> np.ndarray:
    """A shard's tokens (after checking its header) as a read-only uint16 memory map, for tools that scan."""
    num_tokens = read_shard_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=SHARD_TOKEN_DTYPE)  # np.memmap cannot map zero bytes
    try:
        return np.memmap(path, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))
    except OSError as error:
        raise unreadable(Path(path), error) from None


def check_token_range(tokens: np.ndarray, vocab_size: int, path: Path, offset: int = 0):
    """Every token id must be < vocab_size, or the embedding lookup fails (on CUDA as a device-side assert
    that names no file). A vectorised max; the position is searched for only when the check fails.
    tokens may be a chunk of the file that starts at token offset."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token {int(tokens[position])} at position {offset + position:,} is outside the "
                        f"vocabulary (ids must be < --vocab_size={vocab_size}); made with a different tokenizer? "
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


# ----------------------------------------------------------------------------------------------------
# 4. Validation data not in the training data, and the --check_only preflight


def file_fingerprint(path: Path) -> str:
    """sha256 of the header and first MiB: equal for copies of one shard, different for distinct shards."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SHARD_HEADER_BYTES + 2**20)).hexdigest()


def val_train_overlap(s) -> str | None:
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


def check_val_not_in_train(s, is_main: bool):
    """Stops when a validation file is also a training file, unless --allow_val_in_train=true (then rank 0
    warns; the log header repeats the warning)."""
    overlap = val_train_overlap(s)
    if overlap and not s.allow_val_in_train:
        raise DataError(f"{overlap}, so the validation loss would measure memorisation; use separate files, "
                        "or --allow_val_in_train=true to run anyway")
    if overlap and is_main:
        print(f"warning: {overlap}; the validation loss measures memorisation", file=sys.stderr, flush=True)


def preflight(s, train_files: list[Path], usable_train_tokens: int, vocab_size: int,
              check_tokens: Callable[[Path, np.ndarray], None] | None = None):
    """--check_only=true, after the recipe's data checks: the token range of every training shard (a run
    meets them only when it reaches them), the recipe's own check_tokens(path, tokens) of each, and the log
    folder, in one process."""
    for path in train_files:
        tokens = read_shard_tokens(path)
        check_token_range(tokens, vocab_size, path)
        if check_tokens is not None:
            check_tokens(path, tokens)
    check_log_dir(s)
    print(f"checked: settings, memory, {len(train_files)} training file(s) ({usable_train_tokens} usable tokens), "
          f"validation data and --log_dir={s.log_dir}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 5. Logs, metrics, console, clock

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


def progress_note(step: int, total_steps: int, session_start_step: int, session_start_ms: float, now_ms: float) -> str:
    """' | 9.8 steps/s, ETA 0:02:48' for the console, from this session's steps and training time."""
    if step == session_start_step or now_ms <= session_start_ms:
        return ""
    steps_per_s = (step - session_start_step) / ((now_ms - session_start_ms) / 1000)
    eta_s = round((total_steps - step) / steps_per_s)
    return f" | {steps_per_s:.2f} steps/s, ETA {eta_s // 3600}:{eta_s // 60 % 60:02d}:{eta_s % 60:02d}"


# A log embeds the code that produced it: the recipe's source, a banner line, this file's source, then the
# record format's separator and environment lines. records/tool.py splits the two sources at the banner.
SEPARATOR = "=" * 100


def source_banner(name: str) -> str:
    """The line that opens an embedded file after the first: `==== harness.py ====...`, 100 wide."""
    return f"==== {name} ".ljust(100, "=")


def log_header(recipe_file: Path, environment: str) -> str:
    return "\n".join([recipe_file.read_text().rstrip("\n"), source_banner(HARNESS_FILE.name),
                      HARNESS_FILE.read_text().rstrip("\n"), SEPARATOR, environment, SEPARATOR, ""])


def settings_dict(s) -> dict:
    """The settings as logged and checkpointed: the recipe's first, then the harness's."""
    return {f.name: getattr(s, f.name) for f in recipe_fields_first(type(s))}


def append_durably(file, path: Path, data: bytes, durable: bool):
    """Appends data to an unbuffered file (fsynced when durable). On a full disk the file is cut back to
    where it was, so it never ends in half a line, and DiskFull is raised."""
    start = file.tell()
    try:
        with disk_full_as_error(path, len(data)):
            written = 0
            while written < len(data):  # a short write means the disk filled up: the next write raises
                written += file.write(data[written:])
            if durable:
                os.fsync(file.fileno())
    except DiskFull:
        file.truncate(start)
        file.seek(start)  # the failed write may have moved the offset past the cut
        raise


class RunLog:
    """Rank 0's log file in the record format. The header is written atomically; each line is then
    appended and flushed, and fsynced at validation lines and at the end, so a crash loses nothing
    the OS has accepted. A resumed run cuts the log back to the length its checkpoint recorded (lines
    of steps that will be redone go) and appends to it."""

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
                content = header.encode()
                with disk_full_as_error(path, len(content)):
                    write_file_atomically(path, [content])
            self.file = open(path, "ab", buffering=0)
        except OSError as error:
            raise SettingsError(log_dir_problem(path.parent, error)) from None

    def line(self, text: str, durable: bool = False, console_note: str = ""):
        if self.path is None:
            return
        print(text + console_note, flush=True)
        append_durably(self.file, self.path, (text + "\n").encode(), durable)

    def bytes_written(self) -> int:
        """The log's length, made durable first (a checkpoint records it)."""
        if self.file is None:
            return 0
        with disk_full_as_error(self.path, 0):
            os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self):
        if self.file is not None:
            with disk_full_as_error(self.path, 0):
                os.fsync(self.file.fileno())
            self.file.close()


class MetricsFile:
    """<log_dir>/<run_id>.metrics.jsonl (rank 0): a JSON object per training step (step, train_loss,
    lr_factor, train_time_ms, tokens) and per validation (step, val_loss, train_time_ms, tokens).

    Train losses reach the host without a sync: each step's loss is copied to pinned memory behind a
    CUDA event, and its line is written once the event has passed (at once on CPU; every pending line
    at validations, checkpoints, loss checks, a stop and the end, where the device is synchronised anyway).
    Each train_step's `then(train_loss)` runs when its line is written: the log's step line, in order."""

    def __init__(self, path: Path | None, resume_bytes: int | None = None):
        self.file, self.pending = None, collections.deque()  # pending: (record, host loss, event or None, then)
        if path is None:
            return
        self.path = path
        if resume_bytes is not None and path.exists() and path.stat().st_size >= resume_bytes:
            os.truncate(path, resume_bytes)
            self.file = open(path, "ab", buffering=0)
        else:
            self.file = open(path, "wb", buffering=0)

    def train_step(self, record: dict, loss: Tensor, then: Callable[[float], None]):
        if self.file is None:
            return
        if loss.is_cuda:
            host_loss = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host_loss.copy_(loss.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host_loss, event = loss.detach(), None
        self.pending.append((record, host_loss, event, then))
        self.write_ready(wait=False)

    def write_ready(self, wait: bool):
        while self.pending and (wait or self.pending[0][2] is None or self.pending[0][2].query()):
            record, host_loss, event, then = self.pending.popleft()
            if event is not None:
                event.synchronize()
            train_loss = host_loss.item()
            self._write(dict(record, train_loss=train_loss))
            then(train_loss)

    def validation(self, record: dict):
        if self.file is not None:
            self.write_ready(wait=True)
            self._write(record)

    def _write(self, record: dict):
        append_durably(self.file, self.path, (json.dumps(record) + "\n").encode(), durable=False)

    def bytes_written(self) -> int:
        """The file's length with every pending line written, made durable first."""
        if self.file is None:
            return 0
        self.write_ready(wait=True)
        with disk_full_as_error(self.path, 0):
            os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self):
        if self.file is not None:
            self.write_ready(wait=True)
            with disk_full_as_error(self.path, 0):
                os.fsync(self.file.fileno())
            self.file.close()


class TrainingClock:
    """Training time in ms: runs during training steps and stops for validation and checkpoints (after
    a device sync, so queued work is counted). read_ms() while running does not sync."""

    def __init__(self, runtime, total_ms: float = 0.0):
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


def environment_report(s, runtime) -> str:
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
        f"Settings: {json.dumps(settings_dict(s))}",
        *([f"Warning: {overlap} (allowed by --allow_val_in_train=true)"] if overlap else []),
        *(f"Start-up: {notice}" for notice in runtime.notices),
        smi or "nvidia-smi: not available",
    ])


def peak_memory_line(runtime) -> str:
    if runtime.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(runtime.device) // 2**20
        reserved = torch.cuda.max_memory_reserved(runtime.device) // 2**20
    else:  # CPU: the process's peak resident set size stands for both
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB"


# ----------------------------------------------------------------------------------------------------
# 6. Stop signals and the non-finite loss watch
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
            for temporary in list(temporaries_being_written):
                with contextlib.suppress(OSError):
                    temporary.unlink()
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

    def __init__(self, signals: StopSignals, runtime):
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
            f"lower the learning rates (see --help) or check the data{saved}")


class NonFiniteLossWatch:
    def __init__(self, runtime):
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

# ----------------------------------------------------------------------------------------------------
# 7. Checkpoints and exports
# A file is CHECKPOINT_MAGIC, the payload's length (8 bytes, little-endian) and SHA-256 (32 bytes), then
# the payload: a torch.save dict, loadable with weights_only=True. It holds everything a continuation
# needs, independent of the world size: the harness's part (step, time, settings, source hash, RNG states,
# log lengths) and the recipe's (model, optimizer state, data position), which the recipe gathers.

CHECKPOINT_MAGIC = b"train_gpt ckpt1\n"
CHECKPOINT_PREFIX_BYTES = len(CHECKPOINT_MAGIC) + 8 + 32
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})\.pt")


class CheckpointError(DataError):
    """A checkpoint that is not one, is truncated or corrupt, or cannot continue this run."""


TEMPORARY_SUFFIX = ".tmp"
temporaries_being_written: set[Path] = set()  # a second stop signal removes them before exiting at once


def write_file_atomically(path: Path, chunks):
    """Writes a temporary file, fsyncs it, renames it over path and fsyncs the folder: a crash leaves
    either the old file or the complete new one (and at worst a <name>.tmp, which remove_orphans
    deletes). Any failure removes the temporary file."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    temporaries_being_written.add(temporary)
    try:
        with open(temporary, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    finally:
        temporaries_being_written.discard(temporary)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_checkpoint(path: Path, state: dict):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    prefix = CHECKPOINT_MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest()
    with disk_full_as_error(path, len(prefix) + len(payload)):
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


def source_sha256(recipe_file: Path) -> str:
    """SHA-256 of the recipe's source followed by the harness's: the code a log embeds."""
    return hashlib.sha256(recipe_file.read_bytes() + HARNESS_FILE.read_bytes()).hexdigest()


def find_resume_checkpoint(s, folder: Path, console: Console) -> tuple[Path, dict] | None:
    """--resume=PATH: that checkpoint. --resume=auto: the newest valid one in folder (saying which it
    skips), or None when there is none yet; it refuses when checkpoints exist but none is valid."""
    if s.resume != "auto":
        path = Path(s.resume)
        return path, read_checkpoint(path)
    candidates = checkpoint_paths(folder)
    for path in reversed(candidates):
        try:
            checkpoint = read_checkpoint(path)
            console.say(f"--resume=auto: continuing from {path} (step {checkpoint['step']}), the newest complete "
                        "checkpoint")
            return path, checkpoint
        except CheckpointError as error:
            console.say(f"--resume=auto: skipping {error}; falling back to the previous checkpoint")
    if candidates:
        raise CheckpointError(f"--resume=auto: none of the {len(candidates)} checkpoints in {folder} is valid "
                              "(see above); delete them to start the run afresh")
    console.say(f"--resume=auto: no checkpoint in {folder} yet: starting the run from step 0")
    return None


def check_resumable(path: Path, checkpoint: dict, s):
    saved, free = checkpoint["settings"], settings_free_on_resume(type(s))
    differing = [f"{name} (checkpoint {saved.get(name)!r}, now {value!r})" for name, value in settings_dict(s).items()
                 if name not in free and saved.get(name, value) != value]
    if differing:
        raise CheckpointError(f"cannot resume from {path}: these settings differ from the run's: "
                              f"{', '.join(differing)}; resume with the settings the run started with")
    if checkpoint["finished"]:
        raise CheckpointError(f"{path} is the final checkpoint of a finished run (step {checkpoint['step']}/"
                              f"{s.num_iterations}): there is nothing to resume")


class Checkpoints:
    """The run's checkpoints in <log_dir>/<run_id>/step_NNNNNN.pt, the newest checkpoint_keep kept."""

    def __init__(self, folder: Path, s, runtime, run_id: str, recipe_file: Path):
        self.folder, self.s, self.runtime, self.run_id, self.recipe_file = folder, s, runtime, run_id, recipe_file
        self.last_path: Path | None = None

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.pt"

    def save(self, step: int, finished: bool, training_time_ms: float, recipe_state: dict | None, log: "RunLog",
             metrics: "MetricsFile") -> Path:
        """Rank 0 writes the file; recipe_state is the recipe's part (None on the other ranks, which took
        part in gathering it). If rank 0 cannot write it (a full disk), every rank stops."""
        path = self.path_for(step)

        def write():
            self.folder.mkdir(parents=True, exist_ok=True)
            state = dict(
                step=step, finished=finished, training_time_ms=training_time_ms, run_id=self.run_id,
                settings=settings_dict(self.s), source_sha256=source_sha256(self.recipe_file),
                world_size=self.runtime.world_size, **recipe_state,
                # recipes draw random numbers from torch only (and from their own seeded generators)
                rng=dict(torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state(self.runtime.device) if self.runtime.device.type == "cuda"
                         else None),
                log_bytes=log.bytes_written(), metrics_bytes=metrics.bytes_written(),
            )
            write_checkpoint(path, state)
            for old in checkpoint_paths(self.folder)[:-self.s.checkpoint_keep]:
                old.unlink()

        on_rank0_for_all(self.runtime, write, f"rank 0 could not write the checkpoint {path}")
        self.last_path = path
        return path

    def restore_rng(self, checkpoint: dict):
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.runtime.device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.runtime.device)


def export_safetensors(state_dict: dict[str, Tensor], s, recipe_file: Path, path: Path):
    """The weights alone as safetensors, the settings as JSON metadata, for other tools."""
    from safetensors.torch import save  # imported here: only this export needs the package

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    metadata = {"settings": json.dumps(settings_dict(s)), "source_sha256": source_sha256(recipe_file)}
    content = save(tensors, metadata=metadata)
    with disk_full_as_error(path, len(content)):
        write_file_atomically(path, [content])


# ----------------------------------------------------------------------------------------------------
# 8. The run
# Run holds the services a recipe's train() calls in order: find_checkpoint, open_log, warm_up, resume,
# then per step validate / step_done, then finish. run_main turns a recipe's main into one line and an
# exit status for every way a run ends.


class Run:
    """One training run's console, log and metrics files, training clock, stop agreement across ranks,
    non-finite loss watch and checkpoints. Rank 0 writes the files; every method is called on every rank."""

    def __init__(self, s, runtime, signals: "StopSignals | None", recipe_file: Path):
        if s.resume == "auto" and not s.run_id:
            raise SettingsError("--resume=auto needs --run_id=NAME: the run whose newest checkpoint to continue")
        self.s, self.runtime, self.recipe_file = s, runtime, recipe_file
        self.signals = signals or StopSignals()
        self.signals.announce = runtime.is_main
        self.console = Console(runtime.is_main)
        self.run_id, self.checkpoint_path, self.checkpoint = s.run_id, None, None
        self.start_step, self.validated = 0, False
        self.lock, self.log, self.metrics, self.checkpoints = None, None, None, None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, traceback):
        """Whatever ends the run: a full disk gets its stop line in the log (when that still fits), and the
        run folder's lock is released."""
        if isinstance(error, DiskFull):
            error.last_checkpoint = self.last_checkpoint
            stop_line = f"stopped: {error}"
            error.logged = False  # also when the log header itself did not fit
            if self.log is not None and self.log.file is not None:
                with contextlib.suppress(DiskFull):
                    self.log.line(stop_line, durable=True)
                    error.logged = True
        if error is not None:  # the files stay open otherwise, and keep their filesystem busy
            for file in (self.log and self.log.file, self.metrics and self.metrics.file):
                if file is not None:
                    file.close()
        self.release_lock()

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last_path if self.checkpoints is not None else self.checkpoint_path

    def find_checkpoint(self) -> dict | None:
        """With --resume, the checkpoint to continue from (checked against the settings), else None. Fixes
        the run id (the setting, the checkpoint's, or a new UUID), then rank 0 locks the run folder and
        removes what a killed run left half-written."""
        s = self.s
        if s.resume:
            found = find_resume_checkpoint(s, Path(s.log_dir) / s.run_id, self.console)
            if found is not None:
                check_resumable(*found, s)
                self.checkpoint_path, self.checkpoint = found
                self.run_id = self.run_id or self.checkpoint["run_id"]
        self.run_id = self.run_id or str(uuid.uuid4())
        self.lock = on_rank0_for_all(self.runtime, lambda: RunFolderLock(Path(s.log_dir), self.run_id),
                                     "rank 0 found the run folder in use by another process")
        if self.runtime.is_main:
            removed = remove_orphans(Path(s.log_dir), self.run_id)
            if removed:
                self.console.say(f"removed {len(removed)} half-written file(s) left by a run that was killed: "
                                 f"{', '.join(map(str, removed))}")
        return self.checkpoint

    def release_lock(self):
        if self.lock is not None:
            self.lock.release()

    def open_log(self, environment: str, layout: str):
        """The log (header: both sources and the environment) and the metrics file; on resume both are cut
        back to their lengths at the checkpoint. layout: how the recipe splits a step, for the console."""
        path = Path(self.s.log_dir) / f"{self.run_id}.txt"
        main, checkpoint = self.runtime.is_main, self.checkpoint
        self.log = RunLog(path if main else None, log_header(self.recipe_file, environment),
                          resume_bytes=checkpoint["log_bytes"] if checkpoint else None)
        self.metrics = MetricsFile(path.with_suffix(".metrics.jsonl") if main else None,
                                   resume_bytes=checkpoint["metrics_bytes"] if checkpoint else None)
        self.console.say(f"logging to {path}; {layout}")

    def warm_up(self, warm_up: Callable[[], None]):
        try:
            warm_up()
        except RunInterrupted as interrupted:
            self.log.line(f"stopped by {interrupted.signal_name} during the warmup, before training started",
                          durable=True)
            raise

    def resume(self, restore: Callable[[dict], object]):
        """Sets up the stop agreement, loss watch and checkpoints; on resume, restore(checkpoint) loads the
        recipe's state (its result is returned), the RNG states follow and the log gets a marker line."""
        self.agreement = StopAgreement(self.signals, self.runtime)
        self.loss_watch = NonFiniteLossWatch(self.runtime)
        self.checkpoints = Checkpoints(Path(self.s.log_dir) / self.run_id, self.s, self.runtime, self.run_id,
                                       self.recipe_file)
        self.clock = TrainingClock(self.runtime)
        checkpoint, path = self.checkpoint, self.checkpoint_path
        if checkpoint is None:
            return None
        with self.console.activity(f"restoring step {checkpoint['step']} from {path}"):
            restored = restore(checkpoint)
            self.checkpoints.restore_rng(checkpoint)
        self.start_step, self.clock.total_ms = checkpoint["step"], checkpoint["training_time_ms"]
        self.checkpoints.last_path = path
        notes = [f"written by {checkpoint['world_size']} rank(s)"]
        if self.log.dropped_lines:
            notes.append(f"{self.log.dropped_lines} log lines after the checkpoint dropped (steps to redo)")
        if self.log.path is not None and self.log.restarted:
            notes.append("the earlier log was missing or shorter than the checkpoint says: new log")
        if checkpoint["source_sha256"] != source_sha256(self.recipe_file):
            notes.append(f"{self.recipe_file.name} or {HARNESS_FILE.name} has changed since (the header above "
                         "holds the old source)")
        self.log.line(f"resumed at step {self.start_step}/{self.s.num_iterations} from {path} on "
                      f"{self.runtime.world_size} rank(s): {'; '.join(notes)}", durable=True)
        return restored

    @property
    def cpu_group(self):
        """The gloo group of the stop agreement, for gathering the recipe's checkpoint state (None: 1 rank)."""
        return self.agreement.group

    def start_training(self, recipe_state: Callable[[], dict | None]):
        """recipe_state(): the recipe's part of a checkpoint (collective; the dict on rank 0, None elsewhere)."""
        self.recipe_state = recipe_state
        self.signals.training = True
        self.stopped_by = None
        self.session_start_ms = self.clock.total_ms  # steps/s and the ETA count this session's steps only
        self.clock.start()

    def validate(self, step: int, tokens: int, compute: Callable[[], float]) -> float:
        """compute() the validation loss with the clock stopped; logs it and stops the run if it, or any
        training loss so far, is not finite."""
        self.clock.stop()
        self.metrics.write_ready(wait=True)
        first = "first validation (compiling the evaluation graph)" if not self.validated and self.s.compile else None
        with self.console.activity(first) if first else contextlib.nullcontext():
            val_loss = compute()
        self.validated = True
        total_ms = self.clock.total_ms
        self.log.line(f"step:{step}/{self.s.num_iterations} val_loss:{val_loss:.4f} train_time:{total_ms:.0f}ms "
                      f"step_avg:{total_ms / max(step, 1):.2f}ms", durable=True)
        self.metrics.validation(dict(step=step, val_loss=val_loss, train_time_ms=total_ms, tokens=tokens))
        if not math.isfinite(val_loss):
            message = nonfinite_loss_message(step, "validation", self.checkpoints.last_path)
            self.log.line(f"stopped: {message}", durable=True)
            raise RunDiverged(message)
        self.check_losses()
        self.clock.start()
        return val_loss

    def step_done(self, step: int, loss: Tensor, tokens: int, lr_factor: float) -> bool:
        """After training step `step` (1-based count of steps done): the step line, the metrics line (no
        host sync), the loss watch, the stop agreement and a due checkpoint. True: stop now."""
        s, clock = self.s, self.clock
        if self.runtime.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # queued on the device: no host sync
        self.loss_watch.record(loss, step)
        elapsed_ms = clock.read_ms()
        progress = progress_note(step, s.num_iterations, self.start_step, self.session_start_ms, elapsed_ms)

        def step_line(train_loss: float):
            self.log.line(f"step:{step}/{s.num_iterations} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
                          f"step_avg:{elapsed_ms / step:.2f}ms", console_note=progress)

        self.metrics.train_step(dict(step=step, lr_factor=lr_factor, train_time_ms=elapsed_ms, tokens=tokens), loss,
                                then=step_line)
        if self.agreement.should_stop():
            clock.stop()
            self.metrics.write_ready(wait=True)
            self.stopped_by = self.signals.received or "a signal to another rank"
            saving = s.checkpoint_every > 0 or s.save_checkpoint
            where = f"checkpoint {self.checkpoints.path_for(step)}; continue with --resume=auto" if saving \
                else "no checkpoint (--checkpoint_every=0)"
            self.log.line(f"stopped by {self.stopped_by} after step {step}/{s.num_iterations}: {where}", durable=True)
            if saving:
                self.check_losses()  # only finite runs are checkpointed
                self.save_checkpoint(step, finished=False)
            return True
        if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.num_iterations:
            clock.stop()  # the clock stops for checkpoints as for validation
            self.check_losses()
            self.save_checkpoint(step, finished=False)
            clock.start()
        elif step % LOSS_CHECK_EVERY == 0:
            self.check_losses()
        return False

    def check_losses(self):
        """The loss watch's check (a host sync), after the pending step lines it makes ready: a "stopped:" line
        follows the step lines before it."""
        self.metrics.write_ready(wait=True)
        self.loss_watch.check(self.log, self.checkpoints.last_path)

    def save_checkpoint(self, step: int, finished: bool):
        self.metrics.write_ready(wait=True)  # the log length the checkpoint records includes every step line
        self.checkpoints.save(step, finished, self.clock.total_ms, self.recipe_state(), self.log, self.metrics)

    def finish(self, weights: Callable[[], dict[str, Tensor]]) -> str | None:
        """Closes the run: the peak-memory line, the final checkpoint and safetensors export (when asked for)
        after a complete run. Returns None, or the name of the signal that stopped it early."""
        s = self.s
        self.metrics.write_ready(wait=True)  # the last step lines come before the closing lines
        if self.stopped_by is None:
            self.log.line(peak_memory_line(self.runtime), durable=True)
            if s.checkpoint_every or s.save_checkpoint:
                self.save_checkpoint(s.num_iterations, finished=True)
            if s.save_safetensors and self.runtime.is_main:
                export_safetensors(weights(), s, self.recipe_file, self.checkpoints.folder / "final.safetensors")
        self.agreement.close()
        self.metrics.close()
        self.log.close()
        self.release_lock()
        if self.runtime.world_size > 1:
            dist.barrier()  # ranks leave together: gloo can abort a rank that tears down while others work
        return self.stopped_by


def process_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; 0, 1, 0 for a plain `python` launch."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(runtime):
    """The default process group for several ranks (NCCL on CUDA, gloo on CPU), destroyed on the way out."""
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if runtime.world_size > 1:
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        device_id = runtime.device if runtime.device.type == "cuda" else None
        dist.init_process_group(backend=backend, device_id=device_id)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


LOST_RANK_EXIT_CODE = 4  # another rank's process or node died, or the network between them failed


def lost_another_rank(error: RuntimeError) -> bool:
    """A collective failed because a peer is gone: NCCL and the stores raise DistError; gloo raises a plain
    RuntimeError from its transport ("Connection closed by peer", "Connection reset by peer", timeouts)."""
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def run_main(argv: list[str], help_text: Callable[[], str], command: Callable[["StopSignals"], str | None]) -> int:
    """A recipe's main: --help, or command(signals) under the stop-signal handlers. Every way it ends is one
    line on rank 0 and an exit status: 0 done, 2 bad settings or data, 3 diverged, 4 lost another rank (said
    by every rank that sees it: rank 0 may be the one that died), 75 stopped by a signal. command returns
    None when the run finished, or the name of the signal that stopped it."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    rank = process_ranks()[0]
    with StopSignals() as signals:
        try:
            stopped_by = command(signals)
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
        except RuntimeError as error:
            if process_ranks()[1] == 1 or not lost_another_rank(error):
                raise
            reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])  # gloo's [file:line] prefix
            print(f"error: rank {rank} lost another rank (its process or node died, or the network failed): {reason}; "
                  "continue with --resume=auto once every node runs again", file=sys.stderr, flush=True)
            return LOST_RANK_EXIT_CODE
    if stopped_by is not None:
        if rank == 0:
            print(f"stopped by {stopped_by} (exit status {STOPPED_EXIT_CODE}); see the last log line",
                  file=sys.stderr, flush=True)
        return STOPPED_EXIT_CODE
    return 0


# ----------------------------------------------------------------------------------------------------
# 9. The launcher. run.sh starts the ranks with `python harness.py launch NPROC SCRIPT ARGS...`: torchrun's
# agent, run in a thread of this process. torchrun on its own meets a stop signal with a traceback and exit
# status 1, and after 30 s kills ranks that are still saving their checkpoint. Here the agent's thread cannot
# receive signals: this process passes each SIGINT/SIGTERM on to the ranks (its children, each in a session
# of its own), waits for them however long their checkpoint takes, and exits with their exit status.


def child_pids() -> set[int]:
    """The pids of this process's living children, from /proc (Linux)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state ppid ...
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                children.add(int(stat.parent.name))
    return children


def ranks_exit_status(failures: dict) -> int:
    """The exit status of the rank that failed first (its one line says why): a rank killed by a signal,
    which said nothing, gets a line here and the shell's 128 + signal number."""
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    if failure.exitcode >= 0:
        return failure.exitcode
    name = signal.Signals(-failure.exitcode).name
    print(f"launcher: rank {rank} was killed by {name} (out of host memory?)", file=sys.stderr, flush=True)
    return 128 - failure.exitcode


def launch(nproc: int, script: str, script_args: list[str]) -> int:
    """Runs `torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS` and returns the ranks' exit status."""
    import logging
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    # the agent logs each rank's exit and each rank it stops; the ranks say why themselves (see ranks_exit_status)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    outcome = {}

    def run_agent():
        try:
            run(parse_args(["--standalone", f"--nproc_per_node={nproc}", script, *script_args]))
            outcome["status"] = 0
        except ChildFailedError as failed:
            outcome["failures"] = failed.failures
        except BaseException as error:  # torchrun's own failure (rendezvous, port): raised again below
            outcome["error"] = error

    received, passed_on = [], collections.defaultdict(int)  # signals received; pid -> how many passed on
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    agent = threading.Thread(target=run_agent, name="torchrun agent")
    try:
        agent.start()
        while agent.is_alive():
            agent.join(timeout=0.2)
            if received:  # ranks started after a signal get it too
                for pid in child_pids():
                    for signum in received[passed_on[pid]:]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signum)
                    passed_on[pid] = len(received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if "error" in outcome:
        raise outcome["error"]
    return ranks_exit_status(outcome["failures"]) if "failures" in outcome else outcome["status"]


if __name__ == "__main__":
    if sys.argv[1:2] != ["launch"] or len(sys.argv) < 4:
        sys.exit("usage: python harness.py launch NPROC SCRIPT [ARGS...]   (run.sh does this)")
    sys.exit(launch(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
