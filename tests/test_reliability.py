"""Issue #27: a full disk, two runs on one run folder, files half-written by a killed run, and settings
that used to be taken silently. Tiny in-process runs on synthetic shards; a small tmpfs (as root) plays
the full disk, and a file wrapper that runs out of space after N bytes plays it for single writes."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import harness as H
from conftest import RECIPES, REPO, Recipe, process_group, trainer_command, with_settings
from records import tool


def run_args(recipe: Recipe, data_dir: Path, log_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    """The recipe's fast settings (well under a second a step on an idle machine) on its test shards in
    data_dir, steps optimizer steps, a checkpoint every 2 steps; extra replaces these (a setting may be given
    once)."""
    recipe.write_data(data_dir)
    args = recipe.fast_args(data_dir) + recipe.length_settings(steps) + ["--checkpoint_every=2"]
    return with_settings(with_settings(args, f"--log_dir={log_dir}"), *extra)


def run_main(capsys, recipe: Recipe, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = recipe.module.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code: int, err: str, expected_code: int, *parts: str):
    assert code == expected_code, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp") or path.suffix == ".lock"]


def last_log_line(log_dir: Path) -> str:
    return (log_dir / "run.txt").read_text().rstrip("\n").splitlines()[-1]


# ----------------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes, unmounted at the end (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected-fault tests below cover the same writes")
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"small{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def page_rounded(size: int) -> int:
    return -(-size // 4096) * 4096


def test_a_checkpoint_that_does_not_fit_stops_with_one_line_and_keeps_the_last_good_one(
        recipe, data_dir, small_filesystem, capsys):
    sizes_run = data_dir / "sizes"
    assert run_main(capsys, recipe, run_args(recipe, data_dir, sizes_run, steps=3))[0] == 0
    checkpoint_size = (sizes_run / "run" / "step_000002.pt").stat().st_size
    files_size = sum(page_rounded(path.stat().st_size) for path in sizes_run.glob("run.*"))
    # room for the log, the metrics, the first checkpoint and half of the second
    log_dir = small_filesystem(files_size + page_rounded(checkpoint_size) + checkpoint_size // 2 + 8 * 4096)
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--checkpoint_keep=1"))
    first = log_dir / "run" / "step_000002.pt"
    assert_one_line(code, err, 2, f"the disk of {log_dir / 'run'} is full", "writing step_000004.pt needs",
                    "are free", f"the last good checkpoint {first} is kept", "--resume=auto")
    assert H.read_checkpoint(first)["step"] == 2
    assert H.checkpoint_paths(log_dir / "run") == [first]
    assert leftovers(log_dir) == []
    assert last_log_line(log_dir) == f"stopped: {err.removeprefix('error: ').rstrip()}"


def test_a_log_header_that_does_not_fit_stops_with_one_line(recipe, data_dir, small_filesystem, capsys):
    log_dir = small_filesystem(96 * 1024)  # passes the 64 KiB start-up check; the header is larger
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir))
    assert_one_line(code, err, 2, f"the disk of {log_dir} is full", "writing run.txt needs",
                    "no checkpoint was saved before", "the log lacks this line")
    assert leftovers(log_dir) == [] and not (log_dir / "run.txt").exists()


class FillsUpAfter:
    """A file that takes `room` more bytes: a write beyond that writes what fits, then fails with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()


def full_disk_for(monkeypatch, suffix: str, room_after_open: int):
    """Files opened by the harness whose name ends with suffix fill up after room_after_open bytes."""
    def opening(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FillsUpAfter(file, room_after_open) if str(path).endswith(suffix) else file

    monkeypatch.setattr(H, "open", opening, raising=False)


@pytest.mark.parametrize("suffix, room", [("run.txt", 300), ("run.metrics.jsonl", 250), ("run.txt", 0)])
def test_a_log_or_metrics_line_that_does_not_fit_stops_with_one_line(recipe, data_dir, capsys, monkeypatch, suffix,
                                                                    room):
    full_disk_for(monkeypatch, suffix, room)
    log_dir = data_dir / "logs"
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir))
    assert_one_line(code, err, 2, f"writing {suffix} needs", "--resume=auto")
    assert leftovers(log_dir) == []
    text = (log_dir / "run.txt").read_text()
    assert text.endswith("\n"), "a line that did not fit is cut off whole"
    if suffix == "run.txt":
        assert "the log lacks this line" in err and not text.splitlines()[-1].startswith("stopped:")
    else:
        assert text.splitlines()[-1] == f"stopped: {err.removeprefix('error: ').rstrip()}"
        for line in (log_dir / "run.metrics.jsonl").read_text().splitlines():
            json.loads(line)


def test_a_safetensors_export_that_does_not_fit_stops_with_one_line(recipe, data_dir, capsys, monkeypatch):
    full_disk_for(monkeypatch, "final.safetensors.tmp", 1000)
    log_dir = data_dir / "logs"
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--save_safetensors=true"))
    final = log_dir / "run" / "step_000006.pt"
    assert_one_line(code, err, 2, "writing final.safetensors needs", f"the last good checkpoint {final} is kept")
    assert H.read_checkpoint(final)["finished"]
    assert leftovers(log_dir) == [] and not (log_dir / "run" / "final.safetensors").exists()
    assert last_log_line(log_dir).startswith("stopped: the disk of")


@pytest.mark.parametrize("failing_call", ["write", "fsync", "replace"])
def test_write_file_atomically_removes_its_temporary_file_on_any_failure(tmp_path, monkeypatch, failing_call):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if failing_call == "write":
        full_disk_for(monkeypatch, ".tmp", 0)
    else:
        monkeypatch.setattr(H.os, failing_call, fail)
    with pytest.raises(OSError):
        H.write_file_atomically(target, [b"new" * 1000])
    monkeypatch.undo()
    assert sorted(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"


# ----------------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_run_on_the_same_run_folder_refuses_and_the_first_finishes(recipe, data_dir, capsys, monkeypatch):
    """The second run starts while the first one trains (from inside its second step, in this process: a
    flock held through another open file refuses this process too)."""
    log_dir, second = data_dir / "logs", {}
    original_step, steps = recipe.module.train_step, 0

    def step_then_start_another_run(*args):
        nonlocal steps
        steps += 1
        if steps == 2:
            second["code"] = recipe.module.main(run_args(recipe, data_dir, log_dir))
            second["err"] = capsys.readouterr().err
        return original_step(*args)

    monkeypatch.setattr(recipe.module, "train_step", step_then_start_another_run)
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir))
    assert code == 0, err
    assert_one_line(second["code"], second["err"], 2, f"--log_dir={log_dir} --run_id=run",
                    f"the run folder is in use by process {os.getpid()}", "choose another --run_id")
    assert tool.read_log(log_dir / "run.txt").is_complete
    records = [json.loads(line) for line in (log_dir / "run.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not (log_dir / "run.lock").exists(), "a finished run removes its lock file"


@pytest.mark.slow  # a real trainer process
def test_a_run_started_beside_a_running_trainer_process_refuses(recipe, data_dir, capsys):
    log_dir = data_dir / "logs"
    steps = recipe.long_run_steps
    args = run_args(recipe, data_dir, log_dir, f"--checkpoint_every={steps // 3}", steps=steps)
    with process_group(trainer_command(args, recipe=recipe.script), cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) as first:
        deadline = time.monotonic() + 600
        while not ((log_dir / "run.txt").exists() and f"step:2/{steps} " in (log_dir / "run.txt").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        code, _, err = run_main(capsys, recipe, args)
        assert first.poll() is None, "the first run must still be running when the second one starts"
        _, first_err = first.communicate(timeout=600)
    assert_one_line(code, err, 2, f"the run folder is in use by process {first.pid}")
    assert first.returncode == 0, first_err
    assert tool.read_log(log_dir / "run.txt").is_complete
    records = [json.loads(line) for line in (log_dir / "run.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, steps + 1))
    assert H.read_checkpoint(log_dir / "run" / f"step_{steps:06d}.pt")["finished"]


def test_a_run_without_run_id_locks_its_random_one(recipe, data_dir, capsys, monkeypatch):
    log_dir, locks = data_dir / "logs", []
    original_step = recipe.module.train_step

    def step_and_look(*args):
        locks.extend(path.name for path in log_dir.glob("*.lock"))
        return original_step(*args)

    monkeypatch.setattr(recipe.module, "train_step", step_and_look)
    assert run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--run_id=", steps=3))[0] == 0
    run_id = [path.stem for path in log_dir.glob("*.txt")]
    assert set(locks) == {f"{run_id[0]}.lock"} and list(log_dir.glob("*.lock")) == []


def test_check_only_takes_no_lock_and_leaves_no_file(recipe, data_dir, capsys):
    log_dir = data_dir / "logs"
    code, out, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--check_only=true"))
    assert code == 0 and "checked:" in out, err
    assert not log_dir.exists()


def test_a_killed_runs_lock_and_half_written_files_do_not_block_resume(recipe, data_dir, capsys):
    log_dir = data_dir / "logs"
    assert run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--checkpoint_keep=3", steps=4))[0] == 0
    final = log_dir / "run" / "step_000004.pt"
    final.unlink()  # as if the run had been killed after step 3: its last complete checkpoint is step 2
    holder = [sys.executable, "-c", "import sys, time, harness; from pathlib import Path; "
              "harness.RunFolderLock(Path(sys.argv[1]), 'run'); print('locked', flush=True); time.sleep(600)",
              str(log_dir)]
    with process_group(holder, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline() == "locked\n"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    orphans = [log_dir / "run" / "step_000004.pt.tmp", log_dir / "run.txt.tmp",
               log_dir / f".write_check_{process.pid}.tmp"]  # the killed process's start-up probe
    live_probe = log_dir / f".write_check_{os.getppid()}.tmp"  # (this process's own name is its run's probe)
    for path in [*orphans, live_probe]:
        path.write_bytes(b"half")
    assert (log_dir / "run.lock").exists(), "SIGKILL leaves the lock file; the OS has dropped the lock"
    code, out, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--checkpoint_keep=3",
                                                       "--resume=auto", steps=4))
    assert code == 0, err
    assert f"--resume=auto: continuing from {log_dir / 'run' / 'step_000002.pt'} (step 2)" in out
    assert "removed 3 half-written file(s) left by a run that was killed: " in out
    for path in orphans:
        assert str(path) in out and not path.exists()
    assert live_probe.exists(), "a probe of a running process is not an orphan"
    assert "resumed at step 2/4" in (log_dir / "run.txt").read_text()


# ----------------------------------------------------------------------------------------------------
# Checkpoint writes interrupted at any byte


@pytest.mark.slow  # seven resumed runs
def test_resume_takes_the_newest_complete_checkpoint_after_a_write_cut_at_any_byte(recipe, data_dir, capsys,
                                                                                   monkeypatch):
    log_dir = data_dir / "logs"
    assert run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--checkpoint_keep=3", steps=4))[0] == 0
    folder = log_dir / "run"
    complete = (folder / "step_000004.pt").read_bytes()
    (folder / "step_000004.pt").unlink()
    generator = np.random.default_rng(0)
    offsets = [0, 10, H.CHECKPOINT_PREFIX_BYTES, *generator.integers(1, len(complete), 3), len(complete)]
    for offset in offsets:
        # a failure inside the write (here: the disk fills at this byte) leaves no temporary file ...
        full_disk_for(monkeypatch, "step_000004.pt.tmp", int(offset))
        if offset < len(complete):
            with pytest.raises(OSError, match="No space left"):
                H.write_file_atomically(folder / "step_000004.pt", [complete])
            assert sorted(path.name for path in folder.iterdir()) == ["step_000002.pt"]
        monkeypatch.undo()
        # ... and a kill at this byte leaves one, which the next start removes
        (folder / "step_000004.pt.tmp").write_bytes(complete[:offset])
        code, out, err = run_main(capsys, recipe, run_args(recipe, data_dir, log_dir, "--checkpoint_keep=3",
                                                           "--resume=auto", "--checkpoint_every=1000", steps=4))
        assert code == 0, err
        assert f"--resume=auto: continuing from {folder / 'step_000002.pt'} (step 2)" in out, offset
        assert f"removed 1 half-written file(s) left by a run that was killed: {folder / 'step_000004.pt.tmp'}" in out
        assert leftovers(log_dir) == []
        (folder / "step_000004.pt").unlink()  # the resumed run's final checkpoint: cut the next write again


@pytest.mark.parametrize("writer", ["checkpoint", "log folder check"])
def test_a_second_signal_during_a_write_removes_the_temporary_file_before_exiting(tmp_path, monkeypatch, capsys,
                                                                                  writer):
    class Exited(Exception):
        pass

    def exit_with_nothing_left(status):
        assert list(tmp_path.iterdir()) == [], "the temporary file must be gone before the process exits"
        raise Exited(status)

    def second_signal_while_writing(fd):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(H.os, "_exit", exit_with_nothing_left)
    monkeypatch.setattr(H.os, "fsync", second_signal_while_writing)
    with H.StopSignals() as signals:
        signals.training = True
        signals.received = "SIGTERM"
        with pytest.raises(Exited):
            if writer == "checkpoint":
                H.write_file_atomically(tmp_path / "step_000002.pt", [b"x" * 10000])
            else:
                H.check_log_dir(type("Settings", (), {"log_dir": str(tmp_path)}))
    assert "SIGTERM again: exiting at once" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Settings that used to be taken silently


def test_a_setting_given_twice_is_refused(recipe, data_dir, capsys):
    args = run_args(recipe, data_dir, data_dir / "logs") + ["--muon_lr=1", "--muon_lr=2"]
    code, _, err = run_main(capsys, recipe, args)
    assert_one_line(code, err, 2, "--muon_lr is given twice (--muon_lr=1 and --muon_lr=2); give it once")
    assert not (data_dir / "logs").exists()


def test_an_attention_window_longer_than_a_training_sequence_is_refused_record89(data_dir, capsys):
    recipe = RECIPES["record89"]
    args = run_args(recipe, data_dir, data_dir / "logs", "--stage_windows=1/3,3/7,5/40")
    code, _, err = run_main(capsys, recipe, args)
    assert_one_line(code, err, 2, "--stage_windows=1/3,3/7,5/40", "longer than its stage's slot (16 blocks)")


def test_an_attention_window_longer_than_a_training_sequence_is_refused_record21(data_dir, capsys):
    recipe = RECIPES["record21"]
    T = recipe.module
    code, _, err = run_main(capsys, recipe, run_args(recipe, data_dir, data_dir / "logs", "--max_window_tokens=1024"))
    assert_one_line(code, err, 2, "--max_window_tokens=1024", "--train_seq_len=512", "choose 32..512")
    for settings in (T.parse_settings([]), T.parse_settings(["--preset=tiny"]),
                     T.parse_settings(["--preset=tiny", "--val_seq_len=128", "--val_tokens=2048"])):
        assert settings.max_window_tokens <= settings.train_seq_len


def test_the_log_folder_probe_of_a_killed_check_is_removed_at_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    probe = tmp_path / f".write_check_{int(dead.stdout)}.tmp"
    probe.write_bytes(bytes(64 * 1024))
    assert H.remove_orphans(tmp_path, "run") == [probe] and not probe.exists()
