"""Every bad input and failure during a run ends in one line naming the file, setting or step, with
exit status 2 (settings and data) or 3 (a diverged run), and no traceback. In-process runs of
train_gpt.main where possible; subprocesses only where the case needs one (another user, run.sh)."""
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

import harness as H
import train_gpt as T
from conftest import (REPO, SMALL_VOCAB, descendants, live_processes, process_group, run_process, trainer_command,
                      with_settings, write_shard)

sys.path.insert(0, str(REPO / "data"))
import shards  # noqa: E402



def fast_args(data_dir: Path, train="ok_train_*.bin", val="ok_val_*.bin", vocab_size=SMALL_VOCAB) -> list[str]:
    """The tiny preset, shrunk to ~0.1 s a step: one 512-token micro-step, a small vocabulary, eager."""
    return ["--preset=tiny", "--compile=false", "--warmup_steps=0", f"--vocab_size={vocab_size}",
            "--train_batch_tokens=512", "--val_tokens=2048", "--val_every=0", "--run_id=run",
            f"--train_files={data_dir / train}", f"--val_files={data_dir / val}", f"--log_dir={data_dir / 'logs'}"]


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    code = T.main(args)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, expected_code: int, *names: str):
    assert code == expected_code, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"


# ----------------------------------------------------------------------------------------------------
# Settings: ranges and finiteness, in one place (the setting(...) lines)


def test_every_number_setting_has_its_valid_range_next_to_its_definition():
    for f in dataclasses.fields(T.Settings):
        if type(f.default) in (int, float):
            assert isinstance(f.metadata["valid"], T.Range), f"--{f.name}: add a Range to its setting(...) line"
            assert f.default in f.metadata["valid"], f"--{f.name}: the default is outside its own range"


@pytest.mark.parametrize("setting", ["--adam_beta1=5", "--adam_beta2=1", "--adam_eps=-1", "--adam_eps=0",
                                     "--muon_momentum=2", "--muon_momentum_start=-0.1", "--muon_lr=-0.05",
                                     "--head_lr=-1", "--embed_lr=-1", "--scalar_lr=-1", "--cooldown_frac=1.5",
                                     "--vocab_size=70000", "--logit_cap=0", "--seed=-1", "--val_every=-1"])
def test_out_of_range_settings_are_rejected(data_dir, capsys, setting):
    code, err = run_main(capsys, with_settings(fast_args(data_dir), setting))
    name = setting.split("=")[0]
    assert_one_line(code, err, 2, f"{name}=", "must be in ")
    assert not (data_dir / "logs").exists()


@pytest.mark.parametrize("setting", ["--muon_lr=nan", "--embed_lr=inf", "--head_lr=-inf", "--adam_beta1=nan",
                                     "--adam_eps=nan", "--muon_momentum=NaN", "--attn_scale=inf"])
def test_non_finite_settings_are_rejected(data_dir, capsys, setting):
    code, err = run_main(capsys, with_settings(fast_args(data_dir), setting))
    assert_one_line(code, err, 2, setting.split("=")[0] + "=", "must be a finite number")


def test_help_aligns_columns_lists_ranges_presets_and_boolean_spellings():
    text = T.settings_help()
    rows = [line for line in text.splitlines() if line.startswith("  --") and not line.startswith("  --preset=tiny:")]
    assert len(rows) == len(dataclasses.fields(T.Settings))
    columns = {re.match(r"  (--\S*=\S*)\s+", row).end() for row in rows}
    assert len(columns) == 1, "the descriptions must start in one column"
    assert "--adam_beta1=0.8" in text and "valid: [0, 1)" in text and "--fp8_head=true" in text
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


def test_default_recipe_on_cpu_stops_in_seconds_with_the_tiny_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, err = run_main(capsys, [])
    assert time.perf_counter() - started < 30, "must stop before building or compiling anything"
    assert_one_line(code, err, 2, "GiB", "on cpu", "--preset=tiny", "python train_gpt.py --preset=tiny")
    assert not (tmp_path / "logs").exists()


def test_settings_too_big_for_the_machine_name_the_setting(data_dir, capsys):
    code, err = run_main(capsys, with_settings(fast_args(data_dir), "--val_seq_len=1048576", "--val_tokens=1048576"))
    assert_one_line(code, err, 2, "dense attention masks (evaluation)", "lower --val_seq_len")


def test_memory_estimate_counts_the_dense_masks_and_logits():
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
                T.load_shard(path, vocab_size)
            except T.DataError as error:
                trainer_error = str(error)
            try:
                shards.verify_shard(path, vocab_size)
            except shards.ShardError as error:
                data_error = str(error)
            assert (trainer_error is None) == (data_error is None), (name, vocab_size, trainer_error, data_error)
            if trainer_error:  # both name the same first offending token and position
                token, position = re.search(r"token (?:id )?(\d+) at position ([\d,]+)", trainer_error).groups()
                assert f"token {token} at position {position}" in data_error


def test_out_of_range_token_in_a_training_shard_stops_with_file_position_and_cause(data_dir, capsys):
    tokens = np.random.default_rng(1).integers(0, SMALL_VOCAB, 12000)
    tokens[777] = 60000
    bad = write_shard(data_dir / "bad_train_000001.bin", tokens)
    code, err = run_main(capsys, fast_args(data_dir, train="bad_train_*.bin"))
    assert_one_line(code, err, 2, str(bad), "token 60000 at position 777", "different tokenizer?")


def test_out_of_range_token_in_the_validation_shard_stops_before_training(data_dir, capsys):
    tokens = np.random.default_rng(2).integers(0, SMALL_VOCAB, 5000)
    tokens[1234] = SMALL_VOCAB
    bad = write_shard(data_dir / "bad_val_000000.bin", tokens)
    code, err = run_main(capsys, fast_args(data_dir, val="bad_val_*.bin"))
    assert_one_line(code, err, 2, str(bad), f"token {SMALL_VOCAB} at position 1,234", "--vocab_size=1024")
    assert not (data_dir / "logs").exists(), "nothing must be logged for a run that never started"


# ----------------------------------------------------------------------------------------------------
# A diverging run stops


@pytest.mark.slow
def test_non_finite_loss_mid_run_stops_at_that_step(data_dir, capsys, monkeypatch):
    """A test hook makes step 13's loss NaN; the run stops at the next check (step 20), naming step 13."""
    real_train_step = T.train_step

    def train_step(model, optimizers, reducer, batches, step, *args):
        loss = real_train_step(model, optimizers, reducer, batches, step, *args)
        return loss * float("nan") if step + 1 == 13 else loss

    monkeypatch.setattr(T, "train_step", train_step)
    code, err = run_main(capsys, fast_args(data_dir) + ["--num_iterations=25"])
    assert_one_line(code, err, 3, "training loss is not finite", "at step 13")
    log = (data_dir / "logs" / "run.txt").read_text().splitlines()
    assert log[-1] == f"stopped: {H.nonfinite_loss_message(13, 'training')}"
    assert log[-2].startswith(f"step:{H.LOSS_CHECK_EVERY * 2}/25 "), "stops at the first check after the bad step"


# ----------------------------------------------------------------------------------------------------
# Validation data that is training data


def test_validation_file_that_is_a_training_file_stops(data_dir, capsys):
    code, err = run_main(capsys, fast_args(data_dir, val="ok_train_*.bin"))
    assert_one_line(code, err, 2, "ok_train_000001.bin is also a training file", "--allow_val_in_train=true")


def test_validation_file_with_a_training_file_content_stops(data_dir, capsys):
    shutil.copy(data_dir / "ok_train_000001.bin", data_dir / "copy_val_000000.bin")
    code, err = run_main(capsys, fast_args(data_dir, val="copy_val_*.bin"))
    assert_one_line(code, err, 2, "copy_val_000000.bin has the same content as training file", "ok_train_000001.bin")


def test_allowed_overlap_warns_in_the_console_and_the_log_header(data_dir, capsys):
    code, err = run_main(capsys, fast_args(data_dir, val="ok_train_*.bin") + ["--allow_val_in_train=true",
                                                                              "--num_iterations=1"])
    assert code == 0 and "warning: validation file" in err and "Traceback" not in err
    header = (data_dir / "logs" / "run.txt").read_text().split("\n" + "=" * 100 + "\n")[1]
    assert "Warning: validation file" in header and "also a training file" in header


# ----------------------------------------------------------------------------------------------------
# Files and folders


def test_a_folder_as_train_files(data_dir, capsys):
    code, err = run_main(capsys, fast_args(data_dir, train=""))
    assert_one_line(code, err, 2, "--train_files=", f"matches the folder {data_dir}", "give a glob of shard files")


def test_log_dir_that_is_a_file(data_dir, capsys):
    (data_dir / "a_file").write_text("x")
    code, err = run_main(capsys, with_settings(fast_args(data_dir), f"--log_dir={data_dir / 'a_file'}"))
    assert_one_line(code, err, 2, f"--log_dir={data_dir / 'a_file'}", "is a file, not a folder")


def test_log_dir_that_cannot_be_created(data_dir, capsys):
    code, err = run_main(capsys, with_settings(fast_args(data_dir), "--log_dir=/proc/x"))
    assert_one_line(code, err, 2, "--log_dir=/proc/x", "cannot be written")


def test_log_dir_on_a_full_disk(data_dir, capsys, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(T.os, "fsync", full_disk)
    code, err = run_main(capsys, fast_args(data_dir))
    assert_one_line(code, err, 2, f"--log_dir={data_dir / 'logs'}", "full disk")
    assert not (data_dir / "logs").exists(), "the check removes the folder it created"


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
def shared_dir():
    """A folder another user can read, with a log folder it can write (pytest's tmp_path is private)."""
    folder = Path(tempfile.mkdtemp(prefix="speedrun_perm_"))
    folder.chmod(0o755)
    generator = np.random.default_rng(0)
    for name, count in (("ok_train_000001.bin", 12000), ("ok_val_000000.bin", 5000)):
        write_shard(folder / name, generator.integers(0, SMALL_VOCAB, count)).chmod(0o644)
    (folder / "logs").mkdir()
    (folder / "logs").chmod(0o777)
    yield folder
    shutil.rmtree(folder)


def test_read_only_log_dir(shared_dir, capsys):
    assert run_main(capsys, fast_args(shared_dir) + ["--check_only=true"])[0] == 0  # lazy imports happen as root
    (shared_dir / "logs").chmod(0o555)
    with unprivileged_user():
        code, err = run_main(capsys, fast_args(shared_dir))
    assert_one_line(code, err, 2, f"--log_dir={shared_dir / 'logs'}", "cannot be written", "Permission denied")


def test_unreadable_shard(shared_dir, capsys):
    assert run_main(capsys, fast_args(shared_dir) + ["--check_only=true"])[0] == 0  # lazy imports happen as root
    (shared_dir / "ok_val_000000.bin").chmod(0o000)
    with unprivileged_user():
        code, err = run_main(capsys, fast_args(shared_dir))
    assert_one_line(code, err, 2, str(shared_dir / "ok_val_000000.bin"), "cannot read it", "Permission denied")


def test_nvidia_smi_that_cannot_be_executed_is_reported_unavailable(tmp_path, monkeypatch):
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
    args = with_settings(fast_args(data_dir), "--train_batch_tokens=1024")  # 2 sequences a step: 2 ranks can split it
    if case == "setting":
        args.append("--muon_lr=nan")
    else:  # an out-of-range token in the second training shard: a run would meet it only mid-run
        tokens = np.random.default_rng(3).integers(0, SMALL_VOCAB, 12000)
        tokens[-1] = 65535
        write_shard(data_dir / "ok_train_000002.bin", tokens)
    result = run_process(["bash", str(REPO / "run.sh"), *args], cwd=REPO, timeout=300,
                         env={**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"})
    code, direct = run_main(capsys, args + ["--check_only=true"])
    assert result.returncode == 2 and result.stderr == direct, f"{result.stderr!r} vs {direct!r}"
    assert_one_line(code, direct, 2, "--muon_lr=nan" if case == "setting" else "ok_train_000002.bin")
    assert "torchrun" not in result.stdout + result.stderr and not (data_dir / "logs").exists()


# ----------------------------------------------------------------------------------------------------
# Processes the tests start die with the test


def test_an_interrupted_two_rank_run_leaves_no_process_behind(data_dir):
    """torchrun puts each worker in a session of its own: killing the launcher's group would leave
    them running. The fixture helper must kill the whole tree when the test is interrupted."""
    args = with_settings(fast_args(data_dir), "--num_iterations=100000", "--train_batch_tokens=1024")
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
