"""data/fineweb.py: text -> GPT-2 token shards, checked against independently parsed sources."""

import gzip
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from conftest import REPO, enwiki_dir, run_process, tiktoken_cache

sys.path.insert(0, str(REPO / "data"))

import fineweb  # noqa: E402
import shards  # noqa: E402

EOT = 50256


@pytest.fixture(autouse=True)
def offline_tokenizer(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))


def encoder():
    return tiktoken.get_encoding("gpt2")


def wikiextractor_documents(path: Path) -> list[str]:
    """The test's own parser: the text between each <doc ...> line and its </doc>, surrounding newlines removed."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return [body.strip("\n") for body in re.findall(r"<doc [^>]*>\n(.*?)</doc>", text, flags=re.S)]


def shard_paths(directory: Path, prefix: str) -> list[Path]:
    paths = sorted(directory.glob(f"{prefix}_*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    names = [p.name for p in paths]
    assert names == [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, len(paths))]
    return paths


def split_documents(tokens: np.ndarray) -> list[list[int]]:
    """Split a token stream that starts with <|endoftext|> into per-document token lists (EOT removed)."""
    assert len(tokens) and tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)], strict=True)]


def tokenize(args: list[str]) -> int:
    return fineweb.main([str(a) for a in args])


def test_wikiextractor_gz_shards_decode_to_the_source_documents(tmp_path):
    sources = [enwiki_dir() / "text" / "wiki_00.gz", enwiki_dir() / "text" / "wiki_01.gz"]
    documents = [doc for path in sources for doc in wikiextractor_documents(path)]
    shard_size = 150_000
    out = tmp_path / "out"
    result = run_process(
        [sys.executable, str(REPO / "data" / "fineweb.py"), *map(str, sources), "--output_dir", str(out),
         "--prefix", "wiki", "--shard_size", str(shard_size), "--workers", "2"],
        env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(tiktoken_cache())), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = shard_paths(out, "wiki")
    sizes = [shards.verify_shard(p) for p in paths]
    assert len(paths) >= 3
    assert sizes[:-1] == [shard_size] * (len(paths) - 1) and 0 < sizes[-1] <= shard_size

    val_tokens = shards.read_tokens(paths[0])
    train_tokens = np.concatenate([shards.read_tokens(p) for p in paths[1:]])
    val_docs, train_docs = split_documents(val_tokens), split_documents(train_tokens)
    # Every document has exactly one <|endoftext|>; the one cut by the validation boundary is not continued.
    assert len(val_docs) + len(train_docs) == len(documents)
    assert f"{len(documents):,} documents" in result.stdout
    enc = encoder()
    cut = len(val_docs) - 1
    assert [enc.decode(d) for d in val_docs[:cut]] == documents[:cut]
    cut_tokens = enc.encode_ordinary(documents[cut])
    assert 0 < len(val_docs[cut]) < len(cut_tokens) and val_docs[cut] == cut_tokens[: len(val_docs[cut])]
    assert f"dropped the last {len(cut_tokens) - len(val_docs[cut]):,} tokens" in result.stdout
    assert [enc.decode(d) for d in train_docs] == documents[cut + 1 :]


def test_reproduces_the_published_enwiki_shard(tmp_path):
    # The shared enwiki_train_000001.bin starts with wiki_00, wiki_01, ... with documents under 200 characters dropped.
    sources = [enwiki_dir() / "text" / "wiki_00.gz", enwiki_dir() / "text" / "wiki_01.gz"]
    assert tokenize([*sources, "--output_dir", tmp_path, "--min_chars", "200", "--shard_size", 10**6]) == 0
    # Smaller than one shard, so split into validation and training at a document boundary: together
    # they are the whole stream.
    ours = np.concatenate([shards.read_tokens(path) for path in shard_paths(tmp_path, tmp_path.name)])
    published = shards.read_tokens(enwiki_dir() / "enwiki_train_000001.bin")
    assert len(ours) > 400_000
    assert np.array_equal(ours, published[: len(ours)])
    assert published[len(ours)] == EOT  # we stopped exactly at a document boundary of the published stream


def test_output_does_not_depend_on_worker_count(tmp_path):
    source = enwiki_dir() / "text" / "wiki_02.gz"
    for workers in (1, 2):
        assert tokenize([source, "--output_dir", tmp_path / str(workers), "--prefix", "w",
                         "--shard_size", 100_000, "--workers", workers]) == 0  # fmt: skip
    one, two = shard_paths(tmp_path / "1", "w"), shard_paths(tmp_path / "2", "w")
    assert len(one) == len(two) > 1
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def write_text(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_jsonl_and_plain_text_inputs_plain_and_gzipped(tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "nested").mkdir(parents=True)
    write_text(inputs / "a.jsonl", jsonl([{"text": "First doc.", "id": 1}, {"text": "Second\n\ndoc\n"}]) + "\n")
    write_text(inputs / "b.jsonl.gz", jsonl([{"text": "  "}, {"text": "Zipped <|endoftext|> json"}]))
    write_text(inputs / "c.txt", "Alpha doc\n<|endoftext|>\n\nBeta doc<|endoftext|>Gamma\n")
    write_text(inputs / "nested" / "d.txt.gz", "\nOne file, one document.\n\nTwo paragraphs.\n\n")
    write_text(inputs / ".hidden.txt", "never read")
    expected = [
        "First doc.",
        "Second\n\ndoc\n",  # JSON text is kept verbatim
        "Zipped <|endoftext|> json",  # inside JSON it is ordinary text; the whitespace-only record is skipped
        "Alpha doc",
        "Beta doc",
        "Gamma",
        "One file, one document.\n\nTwo paragraphs.",
    ]
    out = tmp_path / "out"
    assert tokenize([inputs, "--output_dir", out, "--workers", 2]) == 0
    enc = encoder()
    ours = [t for path in shard_paths(out, "out") for t in shards.read_tokens(path).tolist()]  # val + train
    assert ours == [t for doc in expected for t in [EOT] + enc.encode_ordinary(doc)]


def test_shards_split_exactly_at_shard_size(tmp_path, capsys):
    documents = [f"Document number {i} says: " + "lorem ipsum " * (i % 5) for i in range(40)]
    source = write_text(tmp_path / "docs.jsonl", jsonl({"text": d} for d in documents))
    shard_size = 23
    assert tokenize([source, "--output_dir", tmp_path / "out", "--shard_size", shard_size, "--workers", 2]) == 0
    paths = shard_paths(tmp_path / "out", "out")

    enc = encoder()
    stream = [[EOT] + enc.encode_ordinary(d) for d in documents]
    flat = [t for doc in stream for t in doc]
    # Validation: the first shard_size tokens; the rest of the document they cut is dropped.
    val = flat[:shard_size]
    consumed = 0
    while consumed < shard_size:
        consumed += len(stream[0])
        stream.pop(0)
    train = [t for doc in stream for t in doc]
    expected = [val] + [train[i : i + shard_size] for i in range(0, len(train), shard_size)]
    assert [shards.read_tokens(p).tolist() for p in paths] == expected
    assert f"dropped the last {consumed - shard_size:,} tokens" in capsys.readouterr().out


def test_text_field_option_and_format_override(tmp_path):
    texts = ["Markdown file holding JSON lines.", "A second document."]
    source = write_text(tmp_path / "notes.md", jsonl([{"content": text} for text in texts]))
    assert tokenize([source, "--output_dir", tmp_path / "out", "--format", "jsonl", "--text_field", "content"]) == 0
    for name, text in zip(["out_val_000000.bin", "out_train_000001.bin"], texts):
        assert shards.read_tokens(tmp_path / "out" / name).tolist() == [EOT] + encoder().encode_ordinary(text)


def test_a_corpus_smaller_than_one_shard_leaves_training_data(tmp_path, capsys):
    """The first whole documents holding >= 10% of the tokens validate, the rest trains; nothing is dropped."""
    texts = [f"Document number {i} says something about topic {i % 7}. " * (1 + i % 5) for i in range(40)]
    source = write_text(tmp_path / "docs.jsonl", jsonl({"text": t} for t in texts))
    assert tokenize([source, "--output_dir", tmp_path / "out"]) == 0  # default shard size: 100M tokens
    stream = [[EOT] + encoder().encode_ordinary(t) for t in texts]
    total = sum(map(len, stream))
    val_documents = next(n for n in range(1, 41) if sum(map(len, stream[:n])) >= 0.1 * total)
    val = [t for doc in stream[:val_documents] for t in doc]
    assert shards.read_tokens(tmp_path / "out" / "out_val_000000.bin").tolist() == val
    train = shards.read_tokens(tmp_path / "out" / "out_train_000001.bin").tolist()
    assert train == [t for doc in stream[val_documents:] for t in doc]
    out = capsys.readouterr().out
    assert f"validation shard holds its first {val_documents} document(s) ({len(val):,} tokens" in out
    assert f"training shard the other {len(train):,} tokens" in out


def test_a_single_small_document_is_a_one_line_error(tmp_path, capsys):
    source = write_text(tmp_path / "one.txt", "Only one short document.")
    assert tokenize([source, "--output_dir", tmp_path / "out"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and "in 1 document(s): too few documents" in error and "add more text" in error
    assert list((tmp_path / "out").glob("*.bin")) == []


@pytest.mark.parametrize(
    "name, content, extra_args, message",
    [
        ("a.jsonl", '{"text": "ok"}\n{"body": "x"}\n', [],
         r"a\.jsonl:2: no string field 'text'; name the text field with --text_field"),
        ("b.jsonl", '{"text": "ok"}\n{"text": \n', [],
         r"b\.jsonl:2: not valid JSON \(.*\); a \.jsonl file holds one JSON object per line"),
        ("c.md", "# Title\n", [], r"c\.md: unknown input format; .* or say which with --format"),
        ("wiki_05", '<doc id="1">\nText\n', [], r"wiki_05: ends inside a <doc> block \(no closing </doc>\)"),
        ("wiki_06", "stray\n<doc id='1'>\nx\n</doc>\n", ["--format", "wiki"],
         r"wiki_06:1: text outside a <doc> \.\.\. </doc> block"),
        ("d.txt", "   \n<|endoftext|>\n", [], r"no documents to tokenize"),
        ("e.txt.gz", "not gzip data", [], r"e\.txt\.gz: broken gzip file"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_one_line_error(tmp_path, capsys, name, content, extra_args, message):
    (tmp_path / name).write_text(content, encoding="utf-8")  # written plainly even for .gz on purpose
    assert tokenize([tmp_path / name, "--output_dir", tmp_path / "out", *extra_args]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error
    assert list(tmp_path.glob("out/*.bin")) == []


def test_failure_midway_leaves_no_shards(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_text(inputs / "1_good.jsonl", jsonl({"text": f"document {i} " * 20} for i in range(50)))
    write_text(inputs / "2_bad.jsonl", "{not json\n")
    out = tmp_path / "out"
    assert tokenize([inputs, "--output_dir", out, "--shard_size", 100]) == 1
    assert "2_bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # several shards were complete before the error, and were removed


def test_existing_shards_are_not_overwritten(tmp_path, capsys):
    source = write_text(tmp_path / "a.txt", "some text")
    out = tmp_path / "out"
    out.mkdir()
    shards.write_shard(out / "out_val_000000.bin", [EOT, 1, 2])
    before = (out / "out_val_000000.bin").read_bytes()
    assert tokenize([source, "--output_dir", out]) == 1
    assert "already holds 1 out_*.bin shards" in capsys.readouterr().err
    assert (out / "out_val_000000.bin").read_bytes() == before


def test_hub_mode_without_datasets_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail even where it is installed
    assert tokenize(["--hub", "10B", "--output_dir", tmp_path]) == 1
    assert capsys.readouterr().err.strip() == "error: --hub needs the `datasets` package: pip install datasets"
