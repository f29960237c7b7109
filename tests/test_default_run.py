"""The default recipe (train_gpt.py, record 89) end to end: the tiny preset on enwiki writes a record-format
log and learns, and run.sh launches it, explains a machine without a GPU, and stops cleanly on a signal."""
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

import harness as H
import train_gpt as T
from conftest import RECIPES, REPO, process_group, run_process, shard_paths

STEP_LINE = re.compile(r"step:(\d+)/(\d+) (?:val_loss:(\d+\.\d{4})|train_loss:(\d+\.\d{4})) train_time:(\d+)ms "
                       r"step_avg:(\d+\.\d{2})ms")


@pytest.mark.slow
def test_tiny_run_writes_record_format_log_and_learns(tiny_run_logs):
    text = tiny_run_logs[0].read_text()
    parts = text.split("\n" + "=" * 100 + "\n")
    assert len(parts) == 3, "log must be: source, separator, environment, separator, steps"
    source, environment, body = parts
    recipe, harness_source = source.split("\n" + H.source_banner("harness.py") + "\n")
    assert recipe == (REPO / "train_gpt.py").read_text().rstrip("\n"), "log must embed the recipe's source"
    assert harness_source == (REPO / "harness.py").read_text().rstrip("\n"), "log must embed the harness's source"
    env_lines = environment.splitlines()
    assert env_lines[0].startswith("Running Python ") and env_lines[1].startswith("Running PyTorch ")
    assert "Device: 1 x cpu" in env_lines and any(line.startswith("Settings: {") for line in env_lines)

    lines = body.strip().splitlines()
    settings = T.parse_settings(["--preset=tiny"])
    total = settings.num_iterations
    assert re.fullmatch(r"peak memory allocated: \d+ MiB reserved: \d+ MiB", lines[-1])
    steps = [STEP_LINE.fullmatch(line) for line in lines[:-1]]
    for line, match in zip(lines, steps):
        assert match, f"not a step line: {line!r}"
    train_steps = [int(m[1]) for m in steps if m[4] is not None]
    val = {int(m[1]): float(m[3]) for m in steps if m[3] is not None}
    assert train_steps == list(range(1, total + 1))
    assert sorted(val) == T.validation_steps(settings) == list(range(0, total, settings.val_every)) + [total]
    assert all(int(m[2]) == total for m in steps)
    times = [int(m[5]) for m in steps]
    assert times == sorted(times), "train_time must not decrease"

    # the head starts small (std 0.005) and the logits are soft-capped: near-uniform over the padded vocabulary
    initial, final = val[0], val[total]
    assert initial == pytest.approx(np.log(T.padded_vocab_size(50257)), abs=0.05)
    # 28 steps see only ~29K tokens (10.83 -> 8.41 measured on enwiki): far from a unigram model (7.7 there)
    assert final < initial - 2.0, f"val loss fell only from {initial} to {final}"
    assert val[16] < val[8] < val[0], "the loss falls through the stages"


def test_run_sh_help_prints_the_trainers_settings_without_a_gpu():
    result = run_process(["bash", str(REPO / "run.sh"), "--help"], cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("usage:") and "--preset=tiny" in result.stdout
    assert "--stage_ends=423,847,1270" in result.stdout, "run.sh launches the record-89 recipe"


def test_run_sh_without_gpu_explains_and_passes_arguments_through():
    result = run_process(["bash", str(REPO / "run.sh")], cwd=REPO, timeout=300)
    assert result.returncode == 1 and "no CUDA GPU is visible" in result.stderr
    assert "python train_gpt.py --preset=tiny" in result.stderr
    # NPROC=3: run.sh's check before torchrun rejects a world size that cannot split the step
    result = run_process(["bash", str(REPO / "run.sh"), "--preset=tiny"], cwd=REPO, timeout=300,
                         env={**os.environ, "NPROC": "3", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "world size 3 cannot split a step of 8 slots" in result.stderr
    assert "run with 1, 2, 4, 8 processes" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_sh_stopped_by_a_signal_exits_75_with_the_ranks_lines_only(tmp_path, stop_signal):
    """NPROC=2 ./run.sh, stopped by Ctrl-C (SIGINT to its process group) or a scheduler's SIGTERM once training
    started: the ranks stop cleanly and run.sh exits with their status, without torchrun's traceback."""
    train_files, val_files = shard_paths()
    args = ["--preset=tiny", "--compile=false", "--warmup=false", *RECIPES["record89"].length_settings(200),
            f"--train_files={train_files}", f"--val_files={val_files}", f"--log_dir={tmp_path}", "--run_id=stopped"]
    console = tmp_path / "console.out"
    with open(console, "w") as output, process_group(["bash", str(REPO / "run.sh"), *args], cwd=REPO,
                                                      stdout=output, stderr=subprocess.STDOUT,
                                                      env={**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"}) as run:
        deadline = time.monotonic() + 600
        while not re.search(r"^step:1/200 ", console.read_text(), re.MULTILINE):
            assert run.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(run.pid, stop_signal)
        returncode = run.wait(timeout=600)
    text = console.read_text()
    name = signal.Signals(stop_signal).name
    assert returncode == H.STOPPED_EXIT_CODE, text[-3000:]
    assert "Traceback" not in text and "torch.distributed.elastic" not in text, text[-3000:]
    assert text.count(f"stopped by {name} (exit status {H.STOPPED_EXIT_CODE})") == 1
    last_line = f"stopped by {name} (exit status {H.STOPPED_EXIT_CODE}); see the last log line"
    assert text.rstrip().splitlines()[-1] == last_line
    assert re.search(rf"^stopped by {name} after step \d+/200: no checkpoint", text, re.MULTILINE)
