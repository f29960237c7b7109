"""Read, write and verify GPT-2 token shards in the llm.c / speedrun format.

A shard is a header of 256 little-endian int32 values, [MAGIC, VERSION, ntok, 0, ...], followed by
ntok little-endian uint16 token ids. This module is the one implementation used by every script in
data/; train_gpt.py keeps its own minimal header check so that the trainer runs as a single file.
"""

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_SIZE = 50257  # GPT-2 vocabulary (tiktoken "gpt2")
EOT = 50256  # <|endoftext|>, written before every document
TOKEN_DTYPE = np.dtype("<u2")
HEADER_DTYPE = np.dtype("<i4")
MAX_TOKENS = 2**31 - 1  # the header stores ntok as an int32

# verify_shard scans in chunks so checking a 100M-token shard needs little extra memory.
_VERIFY_CHUNK_TOKENS = 1 << 24


class ShardError(ValueError):
    """A file is not a valid token shard; the message names the file and what is wrong."""


def read_header(path) -> int:
    """Check the header and the file size of a shard and return its token count."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        header_bytes = f.read(HEADER_BYTES)
    if len(header_bytes) < HEADER_BYTES:
        raise ShardError(
            f"{path}: too short for a shard header ({file_size} bytes, the header alone is "
            f"{HEADER_BYTES}); the file is empty or an interrupted download/write, delete it and recreate it"
        )
    header = np.frombuffer(header_bytes, dtype=HEADER_DTYPE)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); this is not an llm.c token shard")
    if header[1] != VERSION:
        raise ShardError(
            f"{path}: unsupported shard version {header[1]} (expected {VERSION}); regenerate it with data/fineweb.py"
        )
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(f"{path}: negative token count {num_tokens} in the header; the header is corrupt")
    expected_size = HEADER_BYTES + TOKEN_DTYPE.itemsize * num_tokens
    if file_size < expected_size:
        raise ShardError(
            f"{path}: truncated: the header declares {num_tokens:,} tokens ({expected_size:,} bytes) but the file "
            f"has only {file_size:,} bytes; delete it and download/regenerate it"
        )
    if file_size > expected_size:
        raise ShardError(
            f"{path}: {file_size - expected_size:,} trailing bytes after the {num_tokens:,} tokens the header "
            f"declares ({expected_size:,} bytes expected, {file_size:,} found); delete it and download/regenerate it"
        )
    return num_tokens


def read_tokens(path) -> np.ndarray:
    """Return the tokens of a shard (after checking its header) as a read-only uint16 memory map."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def verify_shard(path, vocab_size: int = VOCAB_SIZE) -> int:
    """Check header, size and that every token is < vocab_size; return the token count."""
    tokens = read_tokens(path)
    for start in range(0, len(tokens), _VERIFY_CHUNK_TOKENS):
        chunk = tokens[start : start + _VERIFY_CHUNK_TOKENS]
        if chunk.max() >= vocab_size:
            offset = int(np.argmax(chunk >= vocab_size))
            raise ShardError(
                f"{path}: token {int(chunk[offset])} at position {start + offset:,} is outside the vocabulary "
                f"(ids must be < {vocab_size}); the file is corrupt or was made with another tokenizer"
            )
    return len(tokens)


def write_shard(path, tokens) -> None:
    """Write tokens as a shard atomically: readers see either the old file or the complete new one."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D sequence, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
    if len(tokens) > MAX_TOKENS:
        raise ShardError(f"{path}: {len(tokens):,} tokens do not fit in one shard (at most {MAX_TOKENS:,})")
    if tokens.size:
        lowest, highest = int(tokens.min()), int(tokens.max())
        if lowest < 0 or highest >= 2**16:
            bad = lowest if lowest < 0 else highest
            position = int(np.argmax(tokens == bad))
            raise ShardError(
                f"{path}: token {bad} at position {position:,} does not fit in uint16 (0..65535); "
                f"shards store token ids as 16-bit integers"
            )
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = MAGIC, VERSION, len(tokens)
    # The temporary file lives in the same directory so os.replace is an atomic rename.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as f:
            f.write(memoryview(header))
            f.write(memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself, so a crash right after write_shard cannot lose the new file."""
    if os.name != "posix":  # Windows cannot open directories; its rename is durable enough
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
