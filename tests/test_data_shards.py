"""data/shards.py (shard reader/writer/verifier) and data/shard_tool.py."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from conftest import REPO, enwiki_dir, run_process, tiktoken_cache

sys.path.insert(0, str(REPO / "data"))

import shard_tool  # noqa: E402
import shards  # noqa: E402

# Token counts published in the test data's enwiki/SOURCE.txt
ENWIKI_SHARDS = {
    "enwiki_val_000000.bin": 10_489_930,
    "enwiki_train_000001.bin": 16_000_000,
    "enwiki_train_000002.bin": 16_000_000,
}


def shard_bytes(tokens) -> bytes:
    """A shard built byte by byte, independently of shards.write_shard."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def make_shard(path: Path, tokens) -> Path:
    path.write_bytes(shard_bytes(tokens))
    return path


def test_format_constants():
    assert (shards.MAGIC, shards.VERSION, shards.HEADER_INTS) == (20240520, 1, 256)
    assert (shards.VOCAB_SIZE, shards.EOT) == (50257, 50256)


def test_write_then_read_round_trip(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 40000, 50256, 7], dtype=np.int64)
    shards.write_shard(tmp_path / "x.bin", tokens)
    data = (tmp_path / "x.bin").read_bytes()
    assert data == make_shard(tmp_path / "ref.bin", tokens).read_bytes()  # byte-exact llm.c layout
    assert shards.read_header(tmp_path / "x.bin") == 7
    read = shards.read_tokens(tmp_path / "x.bin")
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()
    shards.write_shard(tmp_path / "empty.bin", [])
    assert shards.read_tokens(tmp_path / "empty.bin").tolist() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.bin", "ref.bin", "x.bin"]  # no temporary files


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([1, 2, 65536], r"token 65536 at position 2 does not fit in uint16 \(0\.\.65535\)"),
        ([1, -3, 2], r"token -3 at position 1 does not fit in uint16"),
        (np.array([[1, 2]]), r"tokens must be a 1-D sequence, got shape \(1, 2\)"),
        ([1.0, 2.5], r"tokens must be integers, got dtype float64"),
    ],
)
def test_write_rejects_tokens_that_do_not_fit_and_keeps_the_old_file(tmp_path, tokens, message):
    target = make_shard(tmp_path / "x.bin", [1, 2, 3])
    before = target.read_bytes()
    with pytest.raises(shards.ShardError, match=message):
        shards.write_shard(target, tokens)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    target = make_shard(tmp_path / "x.bin", [1, 2, 3])
    before = target.read_bytes()

    def crash(*args):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        shards.write_shard(target, np.arange(1000))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def corrupt(tmp_path: Path, kind: str) -> Path:
    good = shard_bytes([50256, 10, 20, 30])
    header = np.frombuffer(good[:1024], dtype="<i4").copy()
    body = good[1024:]
    if kind == "short":
        data = good[:1000]
    elif kind == "magic":
        header[0] = 20240521
        data = header.tobytes() + body
    elif kind == "version":
        header[1] = 7
        data = header.tobytes() + body
    elif kind == "negative":
        header[2] = -4
        data = header.tobytes() + body
    elif kind == "truncated":
        data = good[:-2]
    elif kind == "trailing":
        data = good + b"\0"
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    return path


HEADER_FAILURES = {
    "short": r"short\.bin: too short for a shard header \(1000 bytes, the header alone is 1024\)",
    "magic": r"magic\.bin: bad magic number 20240521 \(expected 20240520\)",
    "version": r"version\.bin: unsupported shard version 7 \(expected 1\)",
    "negative": r"negative\.bin: negative token count -4 in the header",
    "truncated": r"truncated\.bin: truncated: the header declares 4 tokens \(1,032 bytes\) but the file has only 1,030",
    "trailing": r"trailing\.bin: 1 trailing bytes after the 4 tokens the header declares",
}


@pytest.mark.parametrize("kind", HEADER_FAILURES)
def test_each_header_failure_has_its_own_message(tmp_path, kind):
    path = corrupt(tmp_path, kind)
    for check in (shards.read_header, shards.read_tokens, shards.verify_shard):
        with pytest.raises(shards.ShardError) as caught:
            check(path)
        message = str(caught.value)
        assert re.search(HEADER_FAILURES[kind], message), message
        assert "\n" not in message
        assert all(re.search(other, message) is None for k, other in HEADER_FAILURES.items() if k != kind)


def test_verifier_rejects_out_of_vocabulary_tokens_with_position(tmp_path, monkeypatch):
    path = make_shard(tmp_path / "oov.bin", [50256, 5, 6, 7, 8, 9, 50257, 3, 60000])
    assert shards.read_header(path) == 9  # header and size are fine ...
    monkeypatch.setattr(shards, "_VERIFY_CHUNK_TOKENS", 4)  # ... and the bad token sits in the second chunk
    with pytest.raises(shards.ShardError, match=r"oov\.bin: token 50257 at position 6 is outside the vocabulary"):
        shards.verify_shard(path)
    assert shards.verify_shard(path, vocab_size=60001) == 9


def test_verifier_accepts_the_shared_enwiki_shards():
    for name, num_tokens in ENWIKI_SHARDS.items():
        assert shards.verify_shard(enwiki_dir() / name) == num_tokens


def test_shard_tool_verify_stops_at_the_first_bad_file(tmp_path, capsys):
    good = make_shard(tmp_path / "good.bin", [50256, 1, 2])
    bad = corrupt(tmp_path, "truncated")
    assert shard_tool.main(["verify", str(good), str(bad), str(good)]) == 1
    out, err = capsys.readouterr()
    assert out == f"OK   {good}: 3 tokens\n"
    assert err.startswith(f"BAD  {bad}: truncated:")
    assert shard_tool.main(["verify", str(tmp_path / "missing.bin")]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_shard_tool_verify_command_line_on_enwiki():
    enwiki = enwiki_dir()
    result = run_process(
        [sys.executable, str(REPO / "data" / "shard_tool.py"), "verify", *(str(enwiki / n) for n in ENWIKI_SHARDS)],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"OK   {enwiki / n}: {c:,} tokens" for n, c in ENWIKI_SHARDS.items()]


def test_shard_tool_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    enc = tiktoken.get_encoding("gpt2")
    docs = ["The cat sat on the mat.", "The dog sat on the log, the end."]
    tokens = [t for doc in docs for t in [50256] + enc.encode_ordinary(doc)]
    path = make_shard(tmp_path / "two_docs.bin", tokens)
    assert shard_tool.main(["info", str(path), "--top", "2", "--sample_tokens", "7"]) == 0
    lines = {line[:13].strip(): line[13:] for line in capsys.readouterr().out.splitlines()}  # "label" + value
    assert lines["header"] == f"magic 20240520, version 1, {len(tokens)} tokens"
    assert lines["documents"] == f"2 (<|endoftext|> tokens), {len(tokens) / 2:,.1f} tokens per document on average"
    assert lines["first token"] == "<|endoftext|>: the shard starts at a document boundary"
    assert lines["token ids"] == f"min {min(tokens)}, max 50256, {len(set(tokens))} distinct"
    the_share = 100 * tokens.count(enc.encode_ordinary(" the")[0]) / len(tokens)
    assert lines["most common"].startswith(f"' the' (id 262) {the_share:.2f}%, ")
    assert lines["sample"] == repr("<|endoftext|>The cat sat on the mat")
