"""Checkpoints, exact resume (1 rank, and across 1 <-> 2 ranks), refusals, corrupt checkpoints, stop
signals and the metrics file. Tiny runs on synthetic 256-token-vocabulary shards, mostly in-process."""
import contextlib
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import harness as H
from records.recipes import RECORD21, record21
from conftest import REPO, process_group, run_process, script_command, trainer_command, with_settings
from records import tool

T = record21()  # these tests cover the record-21 recipe kept under records/

WORKER = REPO / "tests" / "distributed_worker.py"
VOCAB, STEPS = 256, 6


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (H.SHARD_MAGIC, H.SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A learnable stream (a repeating pattern plus noise). At 1,024 tokens a step the first shard
    holds 4 steps, so a 6-step run crosses into the second shard."""
    folder = tmp_path_factory.mktemp("resume_data")
    rng = np.random.default_rng(0)
    pattern = np.tile(np.arange(64), 100)
    write_shard(folder / "syn_train_000001.bin", (pattern[:5000] + rng.integers(0, 3, 5000)) % VOCAB)
    write_shard(folder / "syn_train_000002.bin", (3 * pattern[:4000] + rng.integers(0, 3, 4000)) % VOCAB)
    write_shard(folder / "syn_val_000000.bin", (pattern[:3000] + rng.integers(0, 3, 3000)) % VOCAB)
    return folder


def run_args(data, log_dir, run_id, *extra):
    return with_settings(["--preset=tiny", f"--vocab_size={VOCAB}", "--compile=false", "--warmup_steps=0",
            f"--num_iterations={STEPS}", "--val_every=3", "--train_batch_tokens=1024", "--val_seq_len=512",
            "--val_tokens=1024", "--muon_momentum_warmup_steps=3", f"--train_files={data}/syn_train_*.bin",
            f"--val_files={data}/syn_val_*.bin", f"--log_dir={log_dir}", f"--run_id={run_id}",
            "--checkpoint_every=2", "--checkpoint_keep=3"], *extra)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def sigterm_after_step(stop_step: int | None):
    """SIGTERM to this process as training step stop_step ends (the real handler then stops the run)."""
    original = T.train_step

    def train_step_then_signal(model, optimizers, reducer, batches, step, *rest):
        loss = original(model, optimizers, reducer, batches, step, *rest)
        if step + 1 == stop_step:
            signal.raise_signal(signal.SIGTERM)
        return loss

    T.train_step = train_step_then_signal
    try:
        yield
    finally:
        T.train_step = original


def train_in_process(args, stop_step=None):
    settings = T.parse_settings(args)
    with sigterm_after_step(stop_step), H.StopSignals() as signals:
        return T.train(settings, T.resolve_runtime(settings, 0, 1, 0), signals)


def metrics(log_dir, run_id) -> list[dict]:
    return [json.loads(line) for line in (log_dir / f"{run_id}.metrics.jsonl").read_text().splitlines()]


def losses(records) -> list[tuple]:
    """Everything but the training clock, which differs from run to run."""
    return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("lr_factor"), r["tokens"]) for r in records]


def final_model(log_dir, run_id) -> dict:
    final = H.read_checkpoint(log_dir / run_id / f"step_{STEPS:06d}.pt")
    assert final["finished"] and final["step"] == STEPS
    return final["model"]


def step_lines(log_path) -> list[str]:
    """The step lines without their clock fields."""
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("step:")]
    return [re.sub(r" train_time:.*", "", line) for line in lines]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted float64 run: (log_dir, run_id)."""
    log_dir = tmp_path_factory.mktemp("reference")
    with default_dtype(torch.float64):
        assert train_in_process(run_args(data, log_dir, "whole")) is None
    return log_dir, "whole"


def test_step_lines_carry_the_metrics_train_loss_and_come_before_the_stop_line(data, tmp_path):
    """Each step line's train_loss is the metrics file's (to 4 decimals), the records tool reads it, and
    every step line is written before the stop line that follows it."""
    assert train_in_process(run_args(data, tmp_path, "stopped"), stop_step=5) == "SIGTERM"
    train_losses = {r["step"]: r["train_loss"] for r in metrics(tmp_path, "stopped") if "train_loss" in r}
    log_path = tmp_path / "stopped.txt"
    lines = log_path.read_text().splitlines()
    logged = {int(m[1]): m[2] for line in lines if (m := re.fullmatch(r"step:(\d+)/6 train_loss:(\d+\.\d{4}) .*", line))}
    assert list(logged) == [1, 2, 3, 4, 5]
    assert logged == {step: f"{loss:.4f}" for step, loss in train_losses.items()}
    assert lines[-1].startswith("stopped by SIGTERM after step 5/6: checkpoint ")
    read = tool.read_log(log_path)
    assert [(line.step, line.train_loss) for line in read.steps if line.val_loss is None] == \
        [(step, float(loss)) for step, loss in logged.items()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(data, reference, tmp_path, dtype):
    whole_dir, whole_id = reference
    if dtype == torch.float32:
        whole_dir, whole_id = tmp_path / "whole32", "whole32"
        assert train_in_process(run_args(data, whole_dir, whole_id)) is None
    with default_dtype(dtype):
        assert train_in_process(run_args(data, tmp_path, "cut"), stop_step=3) == "SIGTERM"
        assert [p.name for p in H.checkpoint_paths(tmp_path / "cut")] == ["step_000002.pt", "step_000003.pt"]
        assert train_in_process(run_args(data, tmp_path, "cut", "--resume=auto")) is None

    whole, cut = metrics(whole_dir, whole_id), metrics(tmp_path, "cut")
    assert losses(cut) == losses(whole), "the resumed run must repeat the uninterrupted one bit for bit"
    assert [r["step"] for r in whole if "train_loss" in r] == list(range(1, STEPS + 1)), "one line per step"
    assert [r["step"] for r in whole if "val_loss" in r] == [0, 3, 6]
    reference_model, resumed_model = final_model(whole_dir, whole_id), final_model(tmp_path, "cut")
    for name, tensor in reference_model.items():
        assert tensor.dtype == dtype and torch.equal(tensor, resumed_model[name]), name

    log_path = tmp_path / "cut.txt"
    text = log_path.read_text()
    assert text.count("\n" + "=" * 100 + "\n") == 2, "one header: the resumed run appends to the log"
    assert "stopped by SIGTERM after step 3/6: checkpoint" in text
    assert f"resumed at step 3/6 from {tmp_path / 'cut' / 'step_000003.pt'} on 1 rank(s)" in text
    assert step_lines(log_path) == step_lines(whole_dir / f"{whole_id}.txt")
    log = tool.read_log(log_path)
    assert log.is_complete and log.total_steps == STEPS and log.final_val_loss == tool.read_log(
        whole_dir / f"{whole_id}.txt").final_val_loss


@pytest.mark.slow
def test_a_run_moved_from_1_to_2_ranks_and_back_trains_the_same(data, reference, tmp_path):
    """Steps 1-2 on 1 rank; 3-4 on 2 ranks, where rank 1 alone gets SIGTERM during step 3 and the ranks
    agree to stop after step 4; 5-6 on 1 rank again. float64, but Muon's Newton-Schulz runs in fp32 on
    CPU, so 1 and 2 ranks agree to ~1e-6 (as in test_train_distributed), not bit for bit."""
    args = run_args(data, tmp_path, "moved")
    with default_dtype(torch.float64):
        assert train_in_process(args, stop_step=2) == "SIGTERM"
    result = run_process(script_command(WORKER, ["trainer", "3@1", *args, "--resume=auto"], nproc=2), timeout=600,
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "exitcode  : 75" in result.stderr, result.stderr[-3000:]
    with default_dtype(torch.float64):
        assert train_in_process(args + ["--resume=auto"]) is None
    text = (tmp_path / "moved.txt").read_text()
    assert "resumed at step 2/6 from" in text and "on 2 rank(s): written by 1 rank(s)" in text
    assert "stopped by a signal to another rank after step 4/6" in text
    assert "resumed at step 4/6 from" in text and "on 1 rank(s): written by 2 rank(s)" in text

    whole_dir, whole_id = reference
    whole, moved = metrics(whole_dir, whole_id), metrics(tmp_path, "moved")
    assert [r["step"] for r in moved] == [r["step"] for r in whole]
    for a, b in zip(whole, moved):
        loss = "train_loss" if "train_loss" in a else "val_loss"
        assert abs(a[loss] - b[loss]) < 1e-6, f"step {a['step']}: {loss} {a[loss]} vs {b[loss]}"
    moved_model = final_model(tmp_path, "moved")
    for name, tensor in final_model(whole_dir, whole_id).items():
        difference = (tensor - moved_model[name]).norm() / tensor.norm().clamp_min(1e-12)
        assert difference < 1e-5, f"{name} differs (relative {difference:.2e})"
    assert tool.read_log(tmp_path / "moved.txt").is_complete


def run_main(capsys, args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier runs in this test printed
    code = T.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_resuming_with_other_recipe_settings_is_refused(data, tmp_path, capsys):
    assert train_in_process(run_args(data, tmp_path, "run"), stop_step=2) == "SIGTERM"
    changed = ["--num_iterations=8", "--model_dim=64", "--head_dim=32"]
    code, _, err = run_main(capsys, run_args(data, tmp_path, "run", "--resume=auto", *changed))
    assert code == 2 and err.count("\n") == 0, err
    assert "cannot resume from" in err and "step_000002.pt" in err
    for difference in ("num_iterations (checkpoint 6, now 8)", "model_dim (checkpoint 32, now 64)",
                       "head_dim (checkpoint 16, now 32)"):
        assert difference in err
    assert "compile" not in err and "log_dir" not in err
    log_before = (tmp_path / "run.txt").read_text()
    assert log_before.rstrip().endswith("continue with --resume=auto"), "a refused resume must leave the log alone"

    code, _, err = run_main(capsys, run_args(data, tmp_path / "other", "fresh", "--resume=auto", "--run_id="))
    assert code == 2 and "--resume=auto needs --run_id" in err


def test_corrupt_checkpoints_are_detected_and_auto_falls_back(data, reference, tmp_path, capsys):
    with default_dtype(torch.float64):
        assert train_in_process(run_args(data, tmp_path, "run"), stop_step=5) == "SIGTERM"
    folder = tmp_path / "run"
    assert [p.name for p in H.checkpoint_paths(folder)] == ["step_000002.pt", "step_000004.pt", "step_000005.pt"]
    newest = folder / "step_000005.pt"
    data_bytes = newest.read_bytes()
    cases = {
        "truncated": (data_bytes[:-100], "truncated or padded checkpoint"),
        "flipped": (data_bytes[:-100] + bytes([data_bytes[-100] ^ 1]) + data_bytes[-99:], "corrupt checkpoint"),
        "foreign": (b"PK\x03\x04" + data_bytes[4:], "not a train_gpt.py checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        with pytest.raises(H.CheckpointError, match=message):
            H.read_checkpoint(tmp_path / f"{name}.pt")
    code, _, err = run_main(capsys, run_args(data, tmp_path, "run", f"--resume={tmp_path / 'flipped.pt'}"))
    assert code == 2 and err.count("\n") == 0 and "flipped.pt: corrupt checkpoint" in err

    newest.write_bytes(cases["flipped"][0])
    with default_dtype(torch.float64):
        assert train_in_process(run_args(data, tmp_path, "run", "--resume=auto")) is None
    out = capsys.readouterr().out
    assert "--resume=auto: skipping" in out and "step_000005.pt: corrupt checkpoint" in out
    assert "falling back to the previous checkpoint" in out
    text = (tmp_path / "run.txt").read_text()
    assert "resumed at step 4/6" in text and "2 log lines after the checkpoint dropped" in text
    whole_dir, whole_id = reference
    assert losses(metrics(tmp_path, "run")) == losses(metrics(whole_dir, whole_id))
    assert step_lines(tmp_path / "run.txt") == step_lines(whole_dir / f"{whole_id}.txt")


def test_ctrl_c_during_the_warmup_ends_setup_with_one_line(data, tmp_path, capsys, monkeypatch):
    def interrupted_warmup(*args):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(T, "warm_up_kernels", interrupted_warmup)
    code, _, err = run_main(capsys, run_args(data, tmp_path, "early"))
    assert code == H.STOPPED_EXIT_CODE
    assert err == "stopped by SIGINT before training started: nothing to save"
    text = (tmp_path / "early.txt").read_text()
    assert text.rstrip().endswith("stopped by SIGINT during the warmup, before training started")
    assert not tool.read_log(tmp_path / "early.txt").is_complete


def test_sigint_mid_run_checkpoints_and_exits_cleanly(data, tmp_path):
    """A real Ctrl-C (SIGINT) to the trainer process: one line on stderr, no traceback, exit status 75, a
    valid checkpoint at the step the log ends with, and a log the records tool reads as incomplete."""
    args = run_args(data, tmp_path, "live", "--num_iterations=200", "--checkpoint_every=1000", "--val_every=0")
    log_path = tmp_path / "live.txt"
    with process_group(trainer_command(args, recipe=RECORD21), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}) as process:
        deadline = time.monotonic() + 600
        while not (log_path.exists() and "step:2/200 " in log_path.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=600)
    assert process.returncode == H.STOPPED_EXIT_CODE, err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().splitlines()[-1] == f"stopped by SIGINT (exit status {H.STOPPED_EXIT_CODE}); see the last log line"
    log = tool.read_log(log_path)
    assert not log.is_complete and 2 <= log.last_step < 200
    last_line = log_path.read_text().rstrip().splitlines()[-1]
    checkpoint_path = tmp_path / "live" / f"step_{log.last_step:06d}.pt"
    assert last_line == (f"stopped by SIGINT after step {log.last_step}/200: checkpoint {checkpoint_path}; "
                         "continue with --resume=auto")
    checkpoint = H.read_checkpoint(checkpoint_path)
    assert checkpoint["step"] == log.last_step and not checkpoint["finished"]
    # the checkpoint's clock was read after a device sync, a moment after the step line's (printed rounded)
    assert log.training_time_ms <= round(checkpoint["training_time_ms"]) < log.training_time_ms + 1000


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(T.os, "_exit", fake_exit)
    with H.StopSignals() as signals:
        signals.training = True
        signal.raise_signal(signal.SIGTERM)
        assert signals.received == "SIGTERM", "the first signal only asks the run to stop"
        with pytest.raises(Exited) as exited:
            signal.raise_signal(signal.SIGINT)
    assert exited.value.args == (128 + signal.SIGINT,)
    assert "SIGINT again: exiting at once, without a checkpoint" in capsys.readouterr().err
