"""Every bad input and failure during a run ends in one line naming the file, setting or step, with
exit status 2 (settings and data) or 3 (a diverged run), and no traceback. In-process runs of the recipe's
main where possible; subprocesses only where the case needs one (another user, run.sh). Each case runs
for the default recipe (train_gpt.py, record 89) and for the record-21 recipe kept under records/: both sit
on the same harness, and both must keep these guarantees."""
import contextlib
import dataclasses
import errno
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import harness as H
import train_gpt
from conftest import (RECIPES, REPO, SMALL_VOCAB, Recipe, descendants, live_processes, process_group, run_process,
                      trainer_command, with_settings, write_shard)

sys.path.insert(0, str(REPO / "data"))
import shards  # noqa: E402

def run_main(capsys, recipe: Recipe, args: list[str]) -> tuple[int, str]:
    code = recipe.module.main(args)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, expected_code: int, *names: str):
    assert code == expected_code, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"


def each_recipe(cases: str) -> list:
    """(recipe name, case) for every case the named tuple field of each recipe lists."""
    return [pytest.param(name, case, id=f"{name}-{case}") for name, r in RECIPES.items() for case in getattr(r, cases)]


# ----------------------------------------------------------------------------------------------------
# Settings: ranges and finiteness, in one place (the setting(...) lines)


@pytest.mark.parametrize("name", RECIPES)
def test_every_number_setting_has_its_valid_range_next_to_its_definition(name):
    T = RECIPES[name].module
    for f in dataclasses.fields(T.Settings):
        if type(f.default) in (int, float):
            assert isinstance(f.metadata["valid"], T.Range), f"--{f.name}: add a Range to its setting(...) line"
            assert f.default in f.metadata["valid"], f"--{f.name}: the default is outside its own range"


@pytest.mark.parametrize("name, setting", each_recipe("out_of_range"))
def test_out_of_range_settings_are_rejected(data_dir, capsys, name, setting):
    recipe = RECIPES[name]
    code, err = run_main(capsys, recipe, with_settings(recipe.fast_args(recipe.write_data(data_dir)), setting))
    assert_one_line(code, err, 2, f"{setting.split('=')[0]}=", "must be in ")
    assert not (data_dir / "logs").exists()


@pytest.mark.parametrize("name, setting", each_recipe("non_finite"))
def test_non_finite_settings_are_rejected(data_dir, capsys, name, setting):
    recipe = RECIPES[name]
    code, err = run_main(capsys, recipe, with_settings(recipe.fast_args(recipe.write_data(data_dir)), setting))
    assert_one_line(code, err, 2, setting.split("=")[0] + "=", "must be a finite number")


def test_help_aligns_columns_lists_ranges_presets_and_boolean_spellings(recipe):
    T = recipe.module
    text = T.settings_help()
    rows = [line for line in text.splitlines() if line.startswith("  --") and not line.startswith("  --preset=tiny:")]
    assert len(rows) == len(dataclasses.fields(T.Settings))
    columns = {re.match(r"  (--\S*=\S*)\s+", row).end() for row in rows}
    assert len(columns) == 1, "the descriptions must start in one column"
    for shown in recipe.help_shows:
        assert shown in text
    for spelling in ("true/1/yes/on", "false/0/no/off"):
        assert spelling in text
    tiny = text[text.index("--preset=tiny:"):]
    for key, value in T.PRESETS["tiny"].items():
        assert f"--{key}={str(value).lower() if isinstance(value, bool) else value}" in tiny
    for spellings in H.BOOLEAN_SPELLINGS.values():
        for spelling in spellings:
            assert H.parse_value("compile", bool, spelling.upper()) == (spellings is H.BOOLEAN_SPELLINGS[True])


# ----------------------------------------------------------------------------------------------------
# Resources


def test_default_recipe_on_cpu_stops_in_seconds_with_the_tiny_command(tmp_path, capsys, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, err = run_main(capsys, recipe, [])
    assert time.perf_counter() - started < 30, "must stop before building or compiling anything"
    command = f"python {recipe.script.relative_to(REPO)} --preset=tiny"  # from the repository root
    assert_one_line(code, err, 2, "GiB", "on cpu", "--preset=tiny", command)
    assert not (tmp_path / "logs").exists()


def test_settings_too_big_for_the_machine_name_the_setting(recipe, recipe_data, capsys):
    code, err = run_main(capsys, recipe, with_settings(recipe.fast_args(recipe_data), "--val_seq_len=1048576",
                                                       "--val_tokens=1048576"))
    assert_one_line(code, err, 2, "dense attention masks (evaluation)", "lower --val_seq_len")


def test_memory_estimate_counts_the_dense_masks_and_logits_record89():
    T = train_gpt
    settings = T.parse_settings(["--preset=tiny"])
    runtime = T.resolve_runtime(settings, 0, 1, 0)
    parts = T.estimate_memory(settings, runtime)
    slot_tokens = max(int(tokens) for tokens in settings.stage_batch_tokens.split(",")) // settings.slots_per_step
    # the paired-head layers attend over a doubled sequence: masks of (2 T)^2 for each kind of layer
    assert parts["dense attention masks (training)"][0] == len(T.MASK_KINDS) * (2 * slot_tokens) ** 2
    assert parts["dense attention masks (evaluation)"][0] == len(T.MASK_KINDS) * (2 * settings.val_seq_len) ** 2
    assert parts["logits of one micro-step"][0] == 3 * min(T.CPU_LOSS_CHUNK_TOKENS, slot_tokens) * 50304 * 4
    with torch.device("meta"):
        num_params = sum(p.numel() for p in T.GPT(settings, "explicit").parameters())
    assert parts["weights and optimizer state"][0] == 16 * num_params


def test_memory_estimate_counts_the_dense_masks_and_logits_record21():
    T = RECIPES["record21"].module
    settings = T.parse_settings(["--preset=tiny"])
    runtime = T.resolve_runtime(settings, 0, 1, 0)
    parts = T.estimate_memory(settings, runtime)
    kinds = len(set(settings.attention_layout) - {"-"})
    assert parts["dense attention masks (evaluation)"][0] == (kinds + 4) * settings.val_seq_len**2
    assert parts["logits of one micro-step"][0] == settings.train_seq_len * T.padded_vocab_size(50257) * 12
    num_params = sum(p.numel() for p in T.GPT(settings, "sdpa").parameters())
    assert parts["weights and optimizer state"][0] == 16 * num_params


# ----------------------------------------------------------------------------------------------------
# Token range, one rule for the trainer and data/shards.py


def test_token_rule_is_the_same_in_the_trainer_and_the_data_tools(tmp_path):
    cases = {"max_ok": [0, 5, SMALL_VOCAB - 1], "at_vocab": [1, SMALL_VOCAB, 3, SMALL_VOCAB + 5],
             "uint16_max": [0, 65535], "empty": []}
    for name, tokens in cases.items():
        path = write_shard(tmp_path / f"{name}.bin", tokens)
        for vocab_size in (SMALL_VOCAB, 50257, 65536):
            trainer_error = data_error = None
            try:
                H.load_shard(path, vocab_size)
            except H.DataError as error:
                trainer_error = str(error)
            try:
                shards.verify_shard(path, vocab_size)
            except shards.ShardError as error:
                data_error = str(error)
            assert (trainer_error is None) == (data_error is None), (name, vocab_size, trainer_error, data_error)
            if trainer_error:  # both name the same first offending token and position
                token, position = re.search(r"token (?:id )?(\d+) at position ([\d,]+)", trainer_error).groups()
                assert f"token {token} at position {position}" in data_error


def test_out_of_range_token_in_a_training_shard_stops_with_file_position_and_cause(recipe, recipe_data, capsys):
    tokens = recipe.tokens(np.random.default_rng(1), 12000)
    tokens[777] = 60000
    bad = write_shard(recipe_data / "bad_train_000001.bin", tokens)
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data, train="bad_train_*.bin"))
    assert_one_line(code, err, 2, str(bad), "token 60000 at position 777", "different tokenizer?")


def test_out_of_range_token_in_the_validation_shard_stops_before_training(recipe, recipe_data, capsys):
    tokens = recipe.tokens(np.random.default_rng(2), 5000)
    tokens[1234] = recipe.vocab_size
    bad = write_shard(recipe_data / "bad_val_000000.bin", tokens)
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data, val="bad_val_*.bin"))
    assert_one_line(code, err, 2, str(bad), f"token {recipe.vocab_size} at position 1,234",
                    f"--vocab_size={recipe.vocab_size}")
    assert not (recipe_data / "logs").exists(), "nothing must be logged for a run that never started"


def test_training_shard_without_a_document_start_stops_naming_it(recipe_data, capsys):
    """Record 89 cuts its batches at document starts (BOS): a shard with none has no batch to give."""
    recipe = RECIPES["record89"]
    bad = write_shard(recipe_data / "nobos_train_000001.bin", np.random.default_rng(4).integers(0, SMALL_VOCAB, 12000))
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe.write_data(recipe_data), train="nobos_train_*.bin"))
    assert_one_line(code, err, 2, str(bad), "no BOS token")


# ----------------------------------------------------------------------------------------------------
# A diverging run stops


@pytest.mark.slow
def test_non_finite_loss_mid_run_stops_at_that_step(recipe, recipe_data, capsys, monkeypatch):
    """A test hook makes step 13's loss NaN; the run stops at the next check (step 20), naming step 13."""
    real_train_step = recipe.module.train_step
    losses = 0

    def train_step(*args):
        nonlocal losses
        losses += 1
        loss = real_train_step(*args)
        return loss * float("nan") if losses == 13 else loss

    monkeypatch.setattr(recipe.module, "train_step", train_step)
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data) + recipe.length_settings(25))
    assert_one_line(code, err, 3, "training loss is not finite", "at step 13")
    log = (recipe_data / "logs" / "run.txt").read_text().splitlines()
    assert log[-1] == f"stopped: {H.nonfinite_loss_message(13, 'training')}"
    assert log[-2].startswith(f"step:{H.LOSS_CHECK_EVERY * 2}/25 "), "stops at the first check after the bad step"


# ----------------------------------------------------------------------------------------------------
# Validation data that is training data


def test_validation_file_that_is_a_training_file_stops(recipe, recipe_data, capsys):
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data, val="ok_train_*.bin"))
    assert_one_line(code, err, 2, "ok_train_000001.bin is also a training file", "--allow_val_in_train=true")


def test_validation_file_with_a_training_file_content_stops(recipe, recipe_data, capsys):
    shutil.copy(recipe_data / "ok_train_000001.bin", recipe_data / "copy_val_000000.bin")
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data, val="copy_val_*.bin"))
    assert_one_line(code, err, 2, "copy_val_000000.bin has the same content as training file", "ok_train_000001.bin")


def test_allowed_overlap_warns_in_the_console_and_the_log_header(recipe, recipe_data, capsys):
    args = recipe.fast_args(recipe_data, val="ok_train_*.bin") + ["--allow_val_in_train=true"]
    code, err = run_main(capsys, recipe, args + recipe.length_settings(9))
    assert code == 0 and "warning: validation file" in err and "Traceback" not in err
    header = (recipe_data / "logs" / "run.txt").read_text().split("\n" + "=" * 100 + "\n")[1]
    assert "Warning: validation file" in header and "also a training file" in header


# ----------------------------------------------------------------------------------------------------
# Files and folders


def test_a_folder_as_train_files(recipe, recipe_data, capsys):
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data, train=""))
    assert_one_line(code, err, 2, "--train_files=", f"matches the folder {recipe_data}", "give a glob of shard files")


def test_log_dir_that_is_a_file(recipe, recipe_data, capsys):
    (recipe_data / "a_file").write_text("x")
    args = with_settings(recipe.fast_args(recipe_data), f"--log_dir={recipe_data / 'a_file'}")
    code, err = run_main(capsys, recipe, args)
    assert_one_line(code, err, 2, f"--log_dir={recipe_data / 'a_file'}", "is a file, not a folder")


def test_log_dir_that_cannot_be_created(recipe, recipe_data, capsys):
    code, err = run_main(capsys, recipe, with_settings(recipe.fast_args(recipe_data), "--log_dir=/proc/x"))
    assert_one_line(code, err, 2, "--log_dir=/proc/x", "cannot be written")


def test_log_dir_on_a_full_disk(recipe, recipe_data, capsys, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    code, err = run_main(capsys, recipe, recipe.fast_args(recipe_data))
    assert_one_line(code, err, 2, f"--log_dir={recipe_data / 'logs'}", "full disk")
    assert not (recipe_data / "logs").exists(), "the check removes the folder it created"


@contextlib.contextmanager
def unprivileged_user():
    """Runs the block as a user that file permissions apply to (root ignores them): as root, the
    effective user becomes 'nobody' for the block (a child process cannot be used: the interpreter
    may live in root's home)."""
    if os.getuid() != 0:
        yield
        return
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("running as root and there is no 'nobody' user to check file permissions with")
    os.seteuid(nobody)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_dir(recipe):
    """A folder another user can read, with a log folder it can write (pytest's tmp_path is private)."""
    folder = Path(tempfile.mkdtemp(prefix="speedrun_perm_"))
    folder.chmod(0o755)
    for shard in recipe.write_data(folder).glob("*.bin"):
        shard.chmod(0o644)
    (folder / "logs").mkdir()
    (folder / "logs").chmod(0o777)
    yield folder
    shutil.rmtree(folder)


def test_read_only_log_dir(recipe, shared_dir, capsys):
    # lazy imports happen as root
    assert run_main(capsys, recipe, recipe.fast_args(shared_dir) + ["--check_only=true"])[0] == 0
    (shared_dir / "logs").chmod(0o555)
    with unprivileged_user():
        code, err = run_main(capsys, recipe, recipe.fast_args(shared_dir))
    assert_one_line(code, err, 2, f"--log_dir={shared_dir / 'logs'}", "cannot be written", "Permission denied")


def test_unreadable_shard(recipe, shared_dir, capsys):
    # lazy imports happen as root
    assert run_main(capsys, recipe, recipe.fast_args(shared_dir) + ["--check_only=true"])[0] == 0
    (shared_dir / "ok_val_000000.bin").chmod(0o000)
    with unprivileged_user():
        code, err = run_main(capsys, recipe, recipe.fast_args(shared_dir))
    assert_one_line(code, err, 2, str(shared_dir / "ok_val_000000.bin"), "cannot read it", "Permission denied")


def test_nvidia_smi_that_cannot_be_executed_is_reported_unavailable(tmp_path, monkeypatch, recipe):
    T = recipe.module
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho should not run\n")
    (tmp_path / "nvidia-smi").chmod(0o644)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    settings = T.parse_settings(["--preset=tiny"])
    report = H.environment_report(settings, T.resolve_runtime(settings, 0, 1, 0))
    assert report.splitlines()[-1] == "nvidia-smi: not available"


# ----------------------------------------------------------------------------------------------------
# run.sh checks before torchrun


@pytest.mark.parametrize("case", ["setting", "token"])
def test_run_sh_shows_the_trainers_one_line_before_torchrun(data_dir, capsys, case):
    recipe = RECIPES["record89"]  # run.sh launches the default recipe
    recipe_data = recipe.write_data(data_dir)
    args = with_settings(recipe.fast_args(recipe_data), *recipe.two_rank_settings)
    if case == "setting":
        args.append("--muon_lr=nan")
    else:  # an out-of-range token in the second training shard: a run would meet it only mid-run
        tokens = recipe.tokens(np.random.default_rng(3), 12000)
        tokens[-1] = 65535
        write_shard(recipe_data / "ok_train_000002.bin", tokens)
    result = run_process(["bash", str(REPO / "run.sh"), *args], cwd=REPO, timeout=300,
                         env={**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"})
    code, direct = run_main(capsys, recipe, args + ["--check_only=true"])
    assert result.returncode == 2 and result.stderr == direct, f"{result.stderr!r} vs {direct!r}"
    assert_one_line(code, direct, 2, "--muon_lr=nan" if case == "setting" else "ok_train_000002.bin")
    assert "torchrun" not in result.stdout + result.stderr and not (recipe_data / "logs").exists()


# ----------------------------------------------------------------------------------------------------
# Processes the tests start die with the test


def test_an_interrupted_two_rank_run_leaves_no_process_behind(data_dir):
    """torchrun puts each worker in a session of its own: killing the launcher's group would leave
    them running. The fixture helper must kill the whole tree when the test is interrupted."""
    recipe = RECIPES["record89"]
    args = with_settings(recipe.fast_args(recipe.write_data(data_dir)), *recipe.length_settings(100_000),
                         *recipe.two_rank_settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with pytest.raises(KeyboardInterrupt):
        with process_group(trainer_command(args, nproc=2), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) as launcher:
            deadline = time.monotonic() + 120
            while len(workers := descendants(launcher.pid)) < 2:  # torchrun's two workers
                assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
                time.sleep(0.2)
            time.sleep(1)  # let the workers get going
            raise KeyboardInterrupt  # as Ctrl-C in the test would
    assert launcher.returncode is not None
    still_running = set(workers) & set(live_processes())
    assert not still_running, f"processes left behind: {still_running}"
