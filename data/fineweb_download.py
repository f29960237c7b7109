"""Download pre-tokenized FineWeb shards from the Hugging Face Hub, checking every file.

The command-line entry points are cached_fineweb10B.py, cached_fineweb100B.py and
cached_finewebedu10B.py; they all call main() here with their dataset's name.

A shard already on disk is kept if its header and size are valid (no network needed); an invalid one
is deleted and fetched again. Downloads land in a staging folder and are moved into place only after
their header and size check out, so a file with a shard's final name is never partial or corrupt.
"""

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from tqdm import tqdm

from shards import ShardError, read_header

DATA_DIR = Path(__file__).resolve().parent
STAGING_DIR_NAME = ".incoming"  # inside the destination folder, so the final rename stays on one filesystem


@dataclass(frozen=True)
class HubDataset:
    repo_id: str  # a dataset repo on the Hub
    file_prefix: str  # files are <prefix>_val_000000.bin and <prefix>_train_000001.bin onwards
    num_train_shards: int

    def shard_names(self, num_train_shards: int) -> list[str]:
        """The validation shard followed by the first num_train_shards training shards."""
        return [f"{self.file_prefix}_val_000000.bin"] + [
            f"{self.file_prefix}_train_{index:06d}.bin" for index in range(1, num_train_shards + 1)
        ]


# Every shard holds 100M tokens (200,001,024 bytes), the last training shard of a repo possibly fewer.
DATASETS = {
    "fineweb10B": HubDataset("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": HubDataset("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": HubDataset("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}


class DownloadError(RuntimeError):
    """A shard could not be fetched or failed its check; the message names the file."""


def _hub_description(repo_id: str, endpoint: str | None) -> str:
    return f"{repo_id} at {endpoint or hub_constants.ENDPOINT}"


def _check_hub_reachable(repo_id: str, filename: str, endpoint: str | None) -> None:
    """Ask the Hub for the file's metadata once, without retries.

    hf_hub_download retries a failed connection for about 25 s before giving up with a generic
    message; this single request turns "no network" into an immediate error that names the file.
    """
    url = hf_hub_url(repo_id, filename, repo_type="dataset", endpoint=endpoint)
    try:
        get_hf_file_metadata(url)
    except Exception as error:  # the HTTP client (requests or httpx) and its errors vary with huggingface_hub's version
        raise DownloadError(
            f"could not fetch {filename} from {_hub_description(repo_id, endpoint)}: {type(error).__name__}: "
            f"{error}; check the network connection (and HF_ENDPOINT if set), then run again"
        ) from error


def fetch_shard(repo_id: str, filename: str, local_dir: Path, endpoint: str | None = None) -> bool:
    """Make local_dir/filename a valid shard, downloading it if needed. Returns True if it was downloaded."""
    target = local_dir / filename
    if target.exists():
        try:
            read_header(target)
            return False
        except ShardError as problem:
            tqdm.write(f"replacing invalid file: {problem}")
            target.unlink()
    _check_hub_reachable(repo_id, filename, endpoint)
    try:
        staged = Path(
            hf_hub_download(
                repo_id, filename, repo_type="dataset", local_dir=local_dir / STAGING_DIR_NAME, endpoint=endpoint
            )
        )
    except Exception as error:  # see _check_hub_reachable: the error types depend on huggingface_hub's version
        raise DownloadError(
            f"could not fetch {filename} from {_hub_description(repo_id, endpoint)}: {type(error).__name__}: {error}"
        ) from error
    try:
        read_header(staged)
    except ShardError as problem:
        staged.unlink()
        raise DownloadError(
            f"downloaded file failed its check and was deleted, run again to retry: {problem}"
        ) from None
    os.replace(staged, target)
    return True


def download_shards(dataset: HubDataset, num_train_shards: int, local_dir, endpoint: str | None = None) -> list[Path]:
    """Ensure the validation shard and the first num_train_shards training shards are in local_dir."""
    if not 0 <= num_train_shards <= dataset.num_train_shards:
        raise DownloadError(
            f"{dataset.repo_id} has {dataset.num_train_shards} training shards; "
            f"asked for {num_train_shards}, choose a number from 0 to {dataset.num_train_shards}"
        )
    local_dir = Path(local_dir)
    created = [folder for folder in [local_dir, *local_dir.parents] if not folder.exists()]  # deepest first
    local_dir.mkdir(parents=True, exist_ok=True)
    names = dataset.shard_names(num_train_shards)
    downloaded = 0
    progress = tqdm(total=len(names), desc=f"{dataset.repo_id} shards", unit="file")
    try:
        for name in names:
            downloaded += fetch_shard(dataset.repo_id, name, local_dir, endpoint)
            progress.update(1)
    except BaseException:
        progress.leave = False  # clear the bar instead of printing it a second time above the error
        progress.close()
        # Everything was moved out of the staging folder; what remains is download bookkeeping. Folders
        # this call created go too when they hold nothing (earlier shards that arrived are kept).
        shutil.rmtree(local_dir / STAGING_DIR_NAME, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    progress.close()
    shutil.rmtree(local_dir / STAGING_DIR_NAME, ignore_errors=True)
    print(
        f"{len(names)} shards ready in {local_dir} ({downloaded} downloaded, {len(names) - downloaded} already present)"
    )
    return [local_dir / name for name in names]


def main(argv: list[str] | None, dataset_name: str) -> int:
    dataset = DATASETS[dataset_name]
    parser = argparse.ArgumentParser(
        description=f"Download the validation shard and the first N training shards of {dataset.repo_id} "
        "(100M tokens, 200,001,024 bytes each). Valid files already present are skipped."
    )
    parser.add_argument(
        "num_train_shards",
        type=int,
        nargs="?",
        default=dataset.num_train_shards,
        help=f"training shards to fetch (default: all {dataset.num_train_shards})",
    )
    parser.add_argument(
        "--local_dir",
        type=Path,
        default=DATA_DIR / dataset_name,
        help=f"destination folder (default: data/{dataset_name})",
    )
    args = parser.parse_args(argv)
    try:
        download_shards(dataset, args.num_train_shards, args.local_dir)
    except (DownloadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
