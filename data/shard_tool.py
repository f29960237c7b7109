"""Inspect and check token shards.

    python data/shard_tool.py info data/fineweb10B/fineweb_val_000000.bin
    python data/shard_tool.py verify data/fineweb10B/*.bin

`info` checks the shard, then prints its header, document count, token statistics and a decoded
sample. `verify` checks header, size and token range of each file, prints an OK line per file and
stops with exit status 1 at the first bad one, printing why.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import tiktoken

from shards import EOT, MAGIC, VERSION, VOCAB_SIZE, ShardError, read_tokens, verify_shard

_COUNT_CHUNK_TOKENS = 1 << 24  # np.bincount widens its input to int64: count in chunks to bound memory


def count_tokens(tokens: np.ndarray) -> np.ndarray:
    counts = np.zeros(2**16, dtype=np.int64)
    for start in range(0, len(tokens), _COUNT_CHUNK_TOKENS):
        counts += np.bincount(tokens[start : start + _COUNT_CHUNK_TOKENS], minlength=2**16)
    return counts


def load_decoder():
    """The GPT-2 tokenizer, or None and the reason when it cannot be loaded (e.g. offline without a cache)."""
    try:
        return tiktoken.get_encoding("gpt2"), None
    except Exception as error:  # tiktoken reports a failed download with various requests/OS errors
        return None, f"{type(error).__name__}: {error}"


def field(label: str, value: str) -> str:
    return f"{label:<13}{value}"


def describe_shard(path: Path, vocab_size: int, top: int, sample_tokens: int) -> list[str]:
    num_tokens = verify_shard(path, vocab_size)
    lines = [
        field("file", f"{path} ({path.stat().st_size:,} bytes)"),
        field("header", f"magic {MAGIC}, version {VERSION}, {num_tokens:,} tokens"),
    ]
    if num_tokens == 0:
        return lines
    tokens = read_tokens(path)
    counts = count_tokens(tokens)
    decoder, decoder_problem = load_decoder()

    def label(token: int) -> str:
        return f"{decoder.decode([token])!r} (id {token})" if decoder else f"id {token}"

    num_documents = int(counts[EOT])
    average = f", {num_tokens / num_documents:,.1f} tokens per document on average" if num_documents else ""
    lines.append(field("documents", f"{num_documents:,} (<|endoftext|> tokens){average}"))
    if tokens[0] == EOT:
        lines.append(field("first token", "<|endoftext|>: the shard starts at a document boundary"))
    else:
        first = label(int(tokens[0]))
        lines.append(field("first token", f"{first}: the shard continues a document from the previous shard"))
    present = np.flatnonzero(counts)
    lines.append(field("token ids", f"min {present[0]}, max {present[-1]}, {len(present):,} distinct"))
    most_common = np.argsort(counts, kind="stable")[::-1][: min(top, len(present))]
    shares = [f"{label(int(t))} {100 * counts[t] / num_tokens:.2f}%" for t in most_common]
    lines.append(field("most common", ", ".join(shares)))
    if decoder:
        lines.append(field("sample", repr(decoder.decode(tokens[:sample_tokens].tolist()))))
    else:
        lines.append(field("sample", f"not decoded, cannot load the gpt2 tokenizer ({decoder_problem})"))
    return lines


def main(argv: list[str] | None = None) -> int:
    vocab_option = argparse.ArgumentParser(add_help=False)
    vocab_option.add_argument(
        "--vocab_size", type=int, default=VOCAB_SIZE, help="token ids must be below this (default 50257)"
    )
    parser = argparse.ArgumentParser(description="Inspect (info) or check (verify) llm.c token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info", parents=[vocab_option], help="header, document count, token statistics and a decoded sample"
    )
    info.add_argument("file", type=Path)
    info.add_argument("--top", type=int, default=10, help="how many of the most common tokens to list")
    info.add_argument("--sample_tokens", type=int, default=64, help="how many tokens from the start to decode")
    verify = commands.add_parser(
        "verify", parents=[vocab_option], help="check files; exit status 1 at the first bad one"
    )
    verify.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            print("\n".join(describe_shard(args.file, args.vocab_size, args.top, args.sample_tokens)))
        else:
            for path in args.files:
                print(f"OK   {path}: {verify_shard(path, args.vocab_size):,} tokens")
    except (ShardError, OSError) as error:
        print(f"BAD  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
