"""The record-21 recipe kept under records/, end to end: bad shards, settings and world sizes fail clearly, and
2 ranks validate the same tokens as one. (The default recipe's runs: test_default_run.py.)"""
import os
import re
import sys

import numpy as np
import pytest

import harness as H
from records.recipes import RECORD21, record21
from conftest import REPO, first_file, run_process, run_trainer, shard_paths, trainer_command, with_settings

T = record21()  # these tests cover the record-21 recipe kept under records/


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
