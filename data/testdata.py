"""The one lookup of the test data (README, "Test data"), for the tests (tests/conftest.py) and benchmark.py.

The folder named by $SPEEDRUN_TEST_DATA, else ../shared/data beside the repository. It holds enwiki/
(enwiki_train_*.bin, enwiki_val_000000.bin and the text they were made from) and gpt2/tiktoken_cache/
(the GPT-2 tokenizer, for offline tokenizing). Callers that only need some train and validation shards
fall back to FineWeb from `python data/cached_fineweb10B.py 1`. Missing data raises MissingTestData, whose
message says what is missing and how to provide it.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_DATA_ENV = "SPEEDRUN_TEST_DATA"
FINEWEB_DIR = REPO / "data" / "fineweb10B"
PROVIDE_TEST_DATA = (f"put the shared test data at {SHARED / 'data'} or set {TEST_DATA_ENV} to a folder with "
                     "enwiki/ and gpt2/tiktoken_cache/ (see README, 'Test data')")
PROVIDE_SHARDS = f"{PROVIDE_TEST_DATA}, or run `python data/cached_fineweb10B.py 1` for FineWeb shards"


class MissingTestData(Exception):
    pass


def data_root() -> Path:
    return Path(os.environ[TEST_DATA_ENV]) if os.environ.get(TEST_DATA_ENV) else SHARED / "data"


def has_enwiki_shards(enwiki: Path) -> bool:
    return (enwiki / "enwiki_val_000000.bin").is_file() and bool(list(enwiki.glob("enwiki_train_*.bin")))


def enwiki_dir(root: Path | None = None) -> Path:
    """The enwiki shards and their source text (for comparisons with the published data)."""
    enwiki = (root or data_root()) / "enwiki"
    if not has_enwiki_shards(enwiki):
        raise MissingTestData(f"test data missing: no enwiki shards in {enwiki}; {PROVIDE_TEST_DATA}")
    return enwiki


def tiktoken_cache(root: Path | None = None) -> Path:
    """A tiktoken cache holding the GPT-2 encoding, so tokenizing needs no network."""
    cache = (root or data_root()) / "gpt2" / "tiktoken_cache"
    if not cache.is_dir() or not any(cache.iterdir()):
        raise MissingTestData(f"test data missing: no tiktoken cache in {cache}; {PROVIDE_TEST_DATA}")
    return cache


def shard_paths(root: Path | None = None, fineweb_dir: Path = FINEWEB_DIR) -> tuple[str, str]:
    """(train glob, val glob) of real token shards: enwiki, else the FineWeb shards of
    `data/cached_fineweb10B.py 1` (their first training shard and the validation shard)."""
    enwiki = (root or data_root()) / "enwiki"
    if has_enwiki_shards(enwiki):
        return str(enwiki / "enwiki_train_*.bin"), str(enwiki / "enwiki_val_*.bin")
    train, val = fineweb_dir / "fineweb_train_000001.bin", fineweb_dir / "fineweb_val_000000.bin"
    if train.is_file() and val.is_file():
        return str(train), str(val)
    raise MissingTestData(f"test data missing: no enwiki shards in {enwiki} and no FineWeb shards in {fineweb_dir}; "
                          f"{PROVIDE_SHARDS}")


def first_file(pattern: str) -> Path:
    return Path(sorted(Path(pattern).parent.glob(Path(pattern).name))[0])
