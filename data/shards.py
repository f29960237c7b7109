"""Write token shards in the llm.c / speedrun format; reading and checking come from harness.py.

A shard is a header of 256 little-endian int32 values, [MAGIC, VERSION, ntok, 0, ...], followed by
ntok little-endian uint16 token ids. The reader (header checks, memory map, token range) is the trainer's
own, harness.py's, so the trainer and every script in data/ accept and reject the same files.
"""

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds harness.py
import harness  # noqa: E402

MAGIC = harness.SHARD_MAGIC
VERSION = harness.SHARD_VERSION
HEADER_INTS = harness.SHARD_HEADER_INTS
HEADER_BYTES = harness.SHARD_HEADER_BYTES
TOKEN_DTYPE = harness.SHARD_TOKEN_DTYPE
HEADER_DTYPE = np.dtype("<i4")
VOCAB_SIZE = 50257  # GPT-2 vocabulary (tiktoken "gpt2")
EOT = 50256  # <|endoftext|>, written before every document
MAX_TOKENS = 2**31 - 1  # the header stores ntok as an int32

# verify_shard scans in chunks so checking a 100M-token shard needs little extra memory.
_VERIFY_CHUNK_TOKENS = 1 << 24

ShardError = harness.DataError  # a file that is not a valid token shard; the message names the file
read_header = harness.read_shard_header
read_tokens = harness.read_shard_tokens


def verify_shard(path, vocab_size: int = VOCAB_SIZE) -> int:
    """Check header, size and that every token is < vocab_size; return the token count."""
    tokens = read_tokens(path)
    for start in range(0, len(tokens), _VERIFY_CHUNK_TOKENS):
        harness.check_token_range(tokens[start:start + _VERIFY_CHUNK_TOKENS], vocab_size, Path(path), offset=start)
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
