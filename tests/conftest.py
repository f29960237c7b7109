"""Shared paths, the test-data lookup as skips, and process helpers that never leave a child behind.

Test data (README "Test data"): the lookup lives in data/testdata.py, which benchmark.py uses too; here a
missing folder skips the test with the lookup's reason, which says how to provide the data.
"""
import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data import testdata  # noqa: E402
from data.testdata import TEST_DATA_ENV, data_root, first_file  # noqa: E402,F401  (the tests import them from here)
import train_gpt  # noqa: E402
from records.recipes import RECORD21, record21  # noqa: E402


def skip_if_missing(lookup):
    """The lookup, with its MissingTestData turned into a skip of the calling test."""
    @functools.wraps(lookup)
    def skipping(*args, **kwargs):
        try:
            return lookup(*args, **kwargs)
        except testdata.MissingTestData as missing:
            pytest.skip(str(missing))
    return skipping


enwiki_dir = skip_if_missing(testdata.enwiki_dir)
tiktoken_cache = skip_if_missing(testdata.tiktoken_cache)
shard_paths = skip_if_missing(testdata.shard_paths)



@pytest.fixture(autouse=True, scope="session")
def gpt2_encoding_offline():
    """Record 89 builds its prefix-token table from tiktoken's GPT-2 encoding, which tiktoken downloads: point
    it at the test data's copy (CI has no network), for in-process runs and the processes tests start. A
    TIKTOKEN_CACHE_DIR already set wins; without the test data the recipe's own one-line error shows."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        with contextlib.suppress(testdata.MissingTestData):
            os.environ["TIKTOKEN_CACHE_DIR"] = str(testdata.tiktoken_cache())


SMALL_VOCAB = 1024  # tokens of the synthetic shards of data_dir; a small head keeps in-process runs fast


def write_shard(path: Path, tokens) -> Path:
    """A token shard holding tokens (the data tools' own writer), for a test's synthetic data; returns path."""
    from data import shards

    shards.write_shard(path, tokens)
    return path


@pytest.fixture
def data_dir(tmp_path):
    """A training and a validation shard of random tokens below SMALL_VOCAB."""
    generator = np.random.default_rng(0)
    write_shard(tmp_path / "ok_train_000001.bin", generator.integers(0, SMALL_VOCAB, 12000))
    write_shard(tmp_path / "ok_val_000000.bin", generator.integers(0, SMALL_VOCAB, 5000))
    return tmp_path

# ----------------------------------------------------------------------------------------------------
# The recipes under test: the default (train_gpt.py, record 89) and record 21 kept under records/, both on the
# same harness. Tests of what the harness guarantees (one-line errors, locks, atomic writes) take the
# `recipe` fixture and run for both; tests of one recipe's mathematics import it directly.

DOCUMENT_TOKENS = 100  # record 89 reads documents: its test shards start one at every 100th token


@dataclasses.dataclass(frozen=True)
class Recipe:
    module: ModuleType
    script: Path
    fast_settings: tuple[str, ...]  # the tiny preset shrunk to a fraction of a second a step, eager, one validation
    vocab_size: int  # of the test shards: record 89's documents start at BOS (50256), so it keeps GPT-2's
    out_of_range: tuple[str, ...]
    non_finite: tuple[str, ...]
    help_shows: tuple[str, ...]  # default values and ranges --help must print
    length_settings: Callable[[int], list[str]]  # a run of this many optimizer steps (at least 3: record 89's stages)
    two_rank_settings: tuple[str, ...]  # what lets 2 ranks split a step
    long_run_steps: int  # a run that lasts ~30 s at fast_settings, for another process to act on beside it

    def tokens(self, generator: np.random.Generator, count: int) -> np.ndarray:
        """Random tokens below SMALL_VOCAB; for record 89 a document starts (BOS) every DOCUMENT_TOKENS."""
        tokens = generator.integers(0, SMALL_VOCAB, count)
        if self.vocab_size > train_gpt.BOS:
            tokens[::DOCUMENT_TOKENS] = train_gpt.BOS
        return tokens

    def write_data(self, folder: Path, generator: np.random.Generator | None = None) -> Path:
        """The training and validation shards fast_args reads, in folder; returns folder."""
        generator = generator or np.random.default_rng(0)
        write_shard(folder / "ok_train_000001.bin", self.tokens(generator, 12000))
        write_shard(folder / "ok_val_000000.bin", self.tokens(generator, 5000))
        return folder

    def fast_args(self, data_dir: Path, train="ok_train_*.bin", val="ok_val_*.bin") -> list[str]:
        return [*self.fast_settings, f"--vocab_size={self.vocab_size}", "--run_id=run",
                f"--train_files={data_dir / train}", f"--val_files={data_dir / val}", f"--log_dir={data_dir / 'logs'}"]


RECIPES = {
    "record89": Recipe(
        train_gpt, REPO / "train_gpt.py",
        # 2 buffers of 128 tokens a step: the tiny preset's ~6 ms per token (the 50,304-wide head and its MTP
        # targets) makes its 512-1,536-token steps too slow for runs that only exercise the harness
        ("--preset=tiny", "--compile=false", "--warmup=false", "--slots_per_step=2", "--stage_batch_tokens=256,256,256",
         "--val_tokens=2048", "--val_every=0"),
        50257,
        ("--adam_lr=-1", "--adam_wd=-1", "--adam_eps=0", "--muon_beta2=1", "--muon_momentum=2",
         "--muon_momentum_start=-0.1", "--muon_lr=-0.05", "--muon_wd=-1", "--cooldown_frac=1.5", "--lr_floor=2",
         "--vocab_size=70000", "--seed=-1", "--val_every=-1", "--bigram_buckets=1"),
        ("--muon_lr=nan", "--adam_lr=inf", "--muon_wd=-inf", "--adam_eps=nan", "--muon_momentum=NaN",
         "--lr_floor=inf"),
        ("--adam_lr=0.008", "--fp8=true", "valid: [0, 1)"),
        lambda steps: [f"--stage_ends={steps - 2},{steps - 1},{steps}", "--extension_steps=0",
                       f"--split_step={steps - 1 if steps % 2 == 0 else steps - 2}",
                       f"--muon_momentum_warmup_steps={steps // 3}", f"--muon_momentum_cooldown_steps={steps // 4}"],
        (),
        30,
    ),
    "record21": Recipe(
        record21(), RECORD21,
        ("--preset=tiny", "--compile=false", "--warmup_steps=0", "--train_batch_tokens=512", "--val_tokens=2048",
         "--val_every=0"),
        SMALL_VOCAB,
        ("--adam_beta1=5", "--adam_beta2=1", "--adam_eps=-1", "--adam_eps=0", "--muon_momentum=2",
         "--muon_momentum_start=-0.1", "--muon_lr=-0.05", "--head_lr=-1", "--embed_lr=-1", "--scalar_lr=-1",
         "--cooldown_frac=1.5", "--vocab_size=70000", "--logit_cap=0", "--seed=-1", "--val_every=-1"),
        ("--muon_lr=nan", "--embed_lr=inf", "--head_lr=-inf", "--adam_beta1=nan", "--adam_eps=nan",
         "--muon_momentum=NaN", "--attn_scale=inf"),
        ("--adam_beta1=0.8", "--fp8_head=true", "valid: [0, 1)"),
        lambda steps: [f"--num_iterations={steps}"],
        ("--train_batch_tokens=1024",),  # 2 sequences a step
        300,
    ),
}


@pytest.fixture(params=RECIPES)
def recipe(request) -> Recipe:
    return RECIPES[request.param]


@pytest.fixture
def recipe_data(recipe, data_dir) -> Path:
    """data_dir with shards the recipe reads (record 89: documents, GPT-2's vocabulary)."""
    return recipe.write_data(data_dir)


# ----------------------------------------------------------------------------------------------------
# Processes. Every child starts in its own session (its own process group, which also keeps the
# terminal's Ctrl-C away from it), and when the test ends for any reason (pass, failure, timeout,
# KeyboardInterrupt) the child and all its descendants are killed. Killing the group alone is not
# enough: torchrun starts each worker in a session of its own. Timeouts are 10-20x an idle 2-core
# machine's time: room for a heavily loaded machine, but a stuck run ends.


def with_settings(args: list[str], *extra: str) -> list[str]:
    """args with each --name=value of extra replacing the same setting (the trainer refuses one given twice)."""
    replaced = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in args if arg.split("=", 1)[0] not in replaced] + list(extra)


def random_tiny_model_fp64():
    """The tiny preset in float64, eager, with every weight random (the zero-initialised ones too), so that
    each path of the model shows in its logits. Returns (model in eval mode, settings)."""
    import torch
    import train_gpt as T
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        settings = T.parse_settings(["--preset=tiny", "--compile=false"])
        model = T.build_model(settings, T.resolve_runtime(settings, 0, 1, 0)).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    finally:
        torch.set_default_dtype(previous)
    return model, settings


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that is not a zombie, from /proc (Linux)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state ppid pgrp ...
            if fields[0] != "Z":
                table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(pid: int) -> list[int]:
    table = live_processes()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, (parent, _) in table.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_process_tree(process: subprocess.Popen):
    """Stops the child and its descendants (SIGSTOP, so none can start another) until the tree is
    complete, then SIGKILLs them all. The tree must be walked while the child lives: the descendants
    of a dead process are adopted by init and cannot be told from other processes."""
    tree = set()
    while True:
        new = {process.pid, *descendants(process.pid)} - tree
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        tree |= new
        if not new:
            break
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    # SIGKILL is delivered at once, but a process with much memory takes a moment to exit: wait for the
    # tree, so that on return none of it runs (the workers of a killed torchrun are not our children)
    deadline = time.monotonic() + 60
    while tree & live_processes().keys() and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def process_group(command: list[str], **popen_kwargs):
    process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    try:
        yield process
    finally:
        kill_process_tree(process)


def run_process(command: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with capture_output and text, in its own process group that is killed afterwards."""
    with process_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(map(str, command))} did not finish in {timeout} s (killed)")
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def script_command(script: Path, args: list[str], nproc: int = 1) -> list[str]:
    """The command line of a Python script, under torchrun when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + [str(script), *args]


def trainer_command(args: list[str], nproc: int = 1, recipe: Path = REPO / "train_gpt.py") -> list[str]:
    """The command line of a recipe (default: the default recipe, train_gpt.py), under torchrun when nproc > 1."""
    return script_command(recipe, args, nproc)


def run_trainer(args: list[str], timeout: int = 600, recipe: Path = REPO / "train_gpt.py",
                **popen_kwargs) -> subprocess.CompletedProcess:
    return run_process(trainer_command(args, recipe=recipe), timeout, cwd=REPO, **popen_kwargs)


@pytest.fixture(scope="session")
def tiny_run_logs(tmp_path_factory) -> list[Path]:
    """Logs of two real `--preset=tiny` CPU runs on the test shards, with seeds 0 and 1.

    The runs go in parallel with one thread each: two 2-thread processes on a 2-core machine thrash."""
    train_files, val_files = shard_paths()
    log_dir = tmp_path_factory.mktemp("tiny_logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor_cache"))}
    with contextlib.ExitStack() as stack:
        runs = {}
        for seed in (0, 1):
            args = ["--preset=tiny", f"--seed={seed}", f"--train_files={train_files}", f"--val_files={val_files}",
                    f"--log_dir={log_dir}", f"--run_id=tiny_seed{seed}"]
            output = stack.enter_context(open(log_dir / f"console_seed{seed}.out", "w+"))
            process = stack.enter_context(process_group(trainer_command(args), cwd=REPO, env=env, stdout=output,
                                                        stderr=subprocess.STDOUT, text=True))
            runs[seed] = (process, output)
        for seed, (process, output) in runs.items():
            try:  # ~80 s each on an idle 2-core machine; several times that while other work loads it
                returncode = process.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                pytest.fail(f"tiny run (seed {seed}) did not finish in 1800 s (killed)")
            output.seek(0)
            assert returncode == 0, f"tiny run (seed {seed}) failed:\n{output.read()[-4000:]}"
    return [log_dir / f"tiny_seed{seed}.txt" for seed in runs]
