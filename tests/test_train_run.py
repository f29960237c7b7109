"""End to end: the tiny preset on enwiki writes a record-format log and learns; bad input fails clearly."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import harness as H
from records.recipes import RECORD21, record21
from conftest import (REPO, first_file, process_group, run_process, run_trainer, shard_paths, trainer_command,
                      with_settings)

T = record21()  # these tests cover the record-21 recipe kept under records/

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
    assert sorted(val) == list(range(0, total + 1, settings.val_every))
    assert all(int(m[2]) == total for m in steps)
    times = [int(m[5]) for m in steps]
    assert times == sorted(times), "train_time must not decrease"

    initial, final = val[0], val[total]
    assert initial == pytest.approx(np.log(T.padded_vocab_size(50257)), abs=0.01), "zero head: uniform start"
    assert final < initial - 2.5, f"val loss fell only from {initial} to {final}"
    assert final < unigram_cross_entropy(settings.val_tokens), "the model must beat a unigram model"


def unigram_cross_entropy(val_tokens: int) -> float:
    """Cross-entropy on the validation tokens of a unigram model counted on the first training shard
    (add-one smoothing)."""
    train_files, val_files = shard_paths()
    train = T.load_shard(first_file(train_files), 50257).numpy()
    counts = np.bincount(train, minlength=50257).astype(np.float64) + 1
    log_probs = np.log(counts / counts.sum())
    targets = T.load_shard(first_file(val_files), 50257).numpy()[1:val_tokens + 1]
    return float(-log_probs[targets].mean())


def write_shard(path, tokens, magic=H.SHARD_MAGIC, version=H.SHARD_VERSION, declared=None, extra=b""):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if declared is None else declared)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return path


@pytest.fixture
def data_dir(tmp_path):
    generator = np.random.default_rng(0)
    write_shard(tmp_path / "ok_train_000001.bin", generator.integers(0, 50257, 5000))
    write_shard(tmp_path / "ok_val_000000.bin", generator.integers(0, 50257, 20000))
    return tmp_path


def run_main(capsys, args):
    code = T.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def tiny_args(data_dir, train="ok_train_*.bin", val="ok_val_*.bin"):
    return ["--preset=tiny", f"--train_files={data_dir / train}", f"--val_files={data_dir / val}",
            f"--log_dir={data_dir / 'logs'}"]


BAD_FILE_CASES = {
    "magic": (dict(magic=1234), "bad magic number 1234"),
    "version": (dict(version=7), "unsupported shard version 7"),
    "truncated": (dict(declared=6000), "truncated"),
    "trailing": (dict(extra=b"\0\0\0\0"), "trailing bytes"),
}


@pytest.mark.parametrize("case", BAD_FILE_CASES)
@pytest.mark.parametrize("which", ["train", "val"])
def test_corrupt_shards_are_rejected_before_training(data_dir, capsys, case, which):
    kwargs, message = BAD_FILE_CASES[case]
    write_shard(data_dir / f"bad_{which}_000001.bin", np.arange(5000) % 50257, **kwargs)
    args = tiny_args(data_dir, **{which: f"bad_{which}_*.bin"})
    code, err = run_main(capsys, args)
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("error: ") and f"bad_{which}_000001.bin" in err and message in err
    assert not (data_dir / "logs").exists(), "nothing must be logged for a run that never started"


def test_header_only_fragment_is_rejected(data_dir, capsys):
    (data_dir / "frag_train_000001.bin").write_bytes(b"\0" * 100)
    code, err = run_main(capsys, tiny_args(data_dir, train="frag_train_*.bin"))
    assert code == 2 and "too short for a shard header (100 bytes, the header alone is 1024)" in err


BAD_SETTING_CASES = [
    (["--train_files=nothing/here_*.bin"], "no files match --train_files='nothing/here_*.bin'"),
    (["--val_files=nothing/here_*.bin"], "no files match --val_files="),
    (["--val_tokens=32768"], "fewer than --val_tokens=32768"),
    (["--train_batch_tokens=8192"], "fewer than one training step needs (8192 + 2"),
    (["--device=cuda"], "no CUDA GPU is visible"),
    (["--attention_backend=flex"], "FlexAttention has no backward on CPU"),
    (["--num_iteration=5"], "unknown setting --num_iteration"),
    (["--num_iterations=five"], "--num_iterations=five: expected a value of type int"),
    (["--compile=maybe"], "--compile=maybe: expected true or false"),
    (["--attention_layout=LSS"], "--attention_layout=LSS: needs one of L, S, - per block (6 blocks)"),
    (["--head_dim=8"], "must equal model_dim"),
    (["--train_seq_len=500"], "must be a multiple of block_size=32"),
    (["--preset=huge"], "unknown preset"),
    (["num_iterations=5"], "settings are given as --name=value"),
]


@pytest.mark.parametrize("extra,message", BAD_SETTING_CASES)
def test_bad_settings_and_environment_give_one_line_errors(data_dir, capsys, extra, message):
    code, err = run_main(capsys, with_settings(tiny_args(data_dir), *extra))
    assert code == 2 and err.count("\n") == 0, err
    assert message in err


def test_impossible_world_size_names_the_valid_choices(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_main(capsys, tiny_args(data_dir))
    assert code == 2
    assert "world size 3 cannot split a step of 4 sequences" in err and "run with 1, 2, 4 processes" in err


@pytest.mark.slow
def test_command_line_help_and_error_exit_codes(tmp_path):
    result = run_trainer(["--help"], recipe=RECORD21)
    assert result.returncode == 0
    for name in ("--train_files=", "--num_iterations=1770", "--preset=", "tiny"):
        assert name in result.stdout
    result = run_trainer(["--preset=tiny", "--train_files=" + str(tmp_path / "none_*.bin")], recipe=RECORD21)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no files match")


def test_trainer_and_data_tools_agree_on_shards(tmp_path):
    sys.path.insert(0, str(REPO / "data"))
    import shards

    cases = {name: dict(kwargs) for name, (kwargs, _) in BAD_FILE_CASES.items()} | {"good": {}}
    for name, kwargs in cases.items():
        path = write_shard(tmp_path / f"{name}.bin", np.arange(3000) % 50257, **kwargs)
        trainer_error = data_error = None
        try:
            trainer_count = T.read_shard_header(path)
        except T.DataError as error:
            trainer_error = error
        try:
            data_count = shards.read_header(path)
        except shards.ShardError as error:
            data_error = error
        assert (trainer_error is None) == (data_error is None), f"{name}: {trainer_error} vs {data_error}"
        if trainer_error is None:
            assert trainer_count == data_count == 3000
    val = first_file(shard_paths()[1])
    assert np.array_equal(T.load_shard(val, 50257).numpy(), shards.read_tokens(val).astype(np.int32))


@pytest.mark.slow
def test_two_rank_run_logs_once_and_validates_the_same_tokens(tmp_path):
    """torchrun with 2 gloo ranks: one log (rank 0), and the step-0 validation loss, over 3 sequences
    split unevenly across the ranks, equals the single-process one."""
    train_files, val_files = shard_paths()
    val_losses = {}
    for nproc in (1, 2):
        args = ["--preset=tiny", "--compile=false", "--num_iterations=2", "--val_every=2", "--warmup_steps=1",
                "--val_tokens=6144", f"--train_files={train_files}", f"--val_files={val_files}",
                f"--log_dir={tmp_path / str(nproc)}", f"--run_id=run{nproc}"]
        result = run_process(trainer_command(args, nproc, RECORD21), cwd=REPO, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        written = sorted(p.name for p in (tmp_path / str(nproc)).iterdir())
        assert written == [f"run{nproc}.metrics.jsonl", f"run{nproc}.txt"], "one log and its metrics, from rank 0"
        text = (tmp_path / str(nproc) / f"run{nproc}.txt").read_text()
        assert f"Device: {nproc} x cpu" in text
        val_losses[nproc] = re.search(r"step:0/2 val_loss:(\d+\.\d+)", text)[1]
        assert re.search(r"step:2/2 val_loss:", text)
    assert val_losses[1] == val_losses[2]


def test_run_sh_help_prints_the_trainers_settings_without_a_gpu():
    result = run_process(["bash", str(REPO / "run.sh"), "--help"], cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("usage:") and "--preset=tiny" in result.stdout


def test_run_sh_without_gpu_explains_and_passes_arguments_through():
    result = run_process(["bash", str(REPO / "run.sh")], cwd=REPO, timeout=300)
    assert result.returncode == 1 and "no CUDA GPU is visible" in result.stderr
    assert "python train_gpt.py --preset=tiny" in result.stderr
    # NPROC=3: run.sh's check before torchrun rejects a world size that cannot split the batch
    result = run_process(["bash", str(REPO / "run.sh"), "--preset=tiny"], cwd=REPO, timeout=300,
                         env={**os.environ, "NPROC": "3", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "world size 3 cannot split a step of 4 sequences" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_sh_stopped_by_a_signal_exits_75_with_the_ranks_lines_only(tmp_path, stop_signal):
    """NPROC=2 ./run.sh, stopped by Ctrl-C (SIGINT to its process group) or a scheduler's SIGTERM once training
    started: the ranks stop cleanly and run.sh exits with their status, without torchrun's traceback."""
    train_files, val_files = shard_paths()
    args = ["--preset=tiny", "--compile=false", "--warmup_steps=0", "--num_iterations=200",
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
    assert text.rstrip().splitlines()[-1] == f"stopped by {name} (exit status {H.STOPPED_EXIT_CODE}); see the last log line"
    assert re.search(rf"^stopped by {name} after step \d+/200: no checkpoint", text, re.MULTILINE)
