"""Download logic of data/fineweb_download.py against a local stand-in for the Hugging Face Hub.

The stand-in is a small HTTP server on 127.0.0.1 that answers the HEAD and GET requests
huggingface_hub's hf_hub_download makes on /datasets/<repo>/resolve/<revision>/<file>.
In-process tests pass its URL as `endpoint=`; command-line tests set HF_ENDPOINT, which
huggingface_hub reads at import time, so they run the entry point in a subprocess.
"""

import hashlib
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_process

sys.path.insert(0, str(REPO / "data"))

import shards  # noqa: E402
from fineweb_download import STAGING_DIR_NAME, DownloadError, HubDataset, download_shards  # noqa: E402

TINY = HubDataset("test-org/tiny-gpt2", "tiny", num_train_shards=3)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves in-memory files the way the Hub's /resolve/ route does, and logs every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._respond(send_body=False)

            def do_GET(self):
                self._respond(send_body=True)

            def _respond(self, send_body):
                hub.requests.append((self.command, self.path))
                body = hub.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, repo_id: str, filename: str, body: bytes) -> None:
        self.files[f"/datasets/{repo_id}/resolve/main/{filename}"] = body

    def requested(self, filename: str) -> list[str]:
        return [method for method, path in self.requests if path.endswith("/" + filename)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def shard_bytes(tmp_path: Path, num_tokens: int, seed: int) -> bytes:
    path = tmp_path / f"source_{seed}.bin"
    shards.write_shard(path, np.random.default_rng(seed).integers(0, shards.VOCAB_SIZE, num_tokens))
    return path.read_bytes()


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


@pytest.fixture
def tiny_files(hub, tmp_path):
    """Serve val + 3 train shards of the TINY dataset; returns {filename: bytes}."""
    files = {name: shard_bytes(tmp_path, 500 + 10 * seed, seed) for seed, name in enumerate(TINY.shard_names(3))}
    for name, body in files.items():
        hub.serve(TINY.repo_id, name, body)
    return files


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_downloads_val_then_first_train_shards(hub, tiny_files, tmp_path):
    dest = tmp_path / "dest"
    paths = download_shards(TINY, 2, dest, endpoint=hub.url)
    assert [p.name for p in paths] == ["tiny_val_000000.bin", "tiny_train_000001.bin", "tiny_train_000002.bin"]
    for path in paths:
        assert path.read_bytes() == tiny_files[path.name]
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in paths)  # no staging leftovers
    assert hub.requested("tiny_train_000003.bin") == []


def test_valid_files_are_skipped_without_network(hub, tiny_files, tmp_path):
    dest = tmp_path / "dest"
    download_shards(TINY, 2, dest, endpoint=hub.url)
    before = [p.stat().st_mtime_ns for p in sorted(dest.iterdir())]
    # A dead endpoint proves that nothing is fetched, not even metadata.
    download_shards(TINY, 2, dest, endpoint=closed_port_url())
    assert [p.stat().st_mtime_ns for p in sorted(dest.iterdir())] == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda body: body[:1500],  # interrupted download
        lambda body: b"\0" * 4 + body[4:],  # bad magic
        lambda body: body + b"\0\0",  # trailing bytes
    ],
    ids=["truncated", "bad-magic", "trailing-bytes"],
)
def test_invalid_local_file_is_downloaded_again(hub, tiny_files, tmp_path, capsys, damage):
    dest = tmp_path / "dest"
    dest.mkdir()
    name = "tiny_train_000001.bin"
    (dest / name).write_bytes(damage(tiny_files[name]))
    download_shards(TINY, 1, dest, endpoint=hub.url)
    assert (dest / name).read_bytes() == tiny_files[name]
    assert hub.requested(name) == ["HEAD", "HEAD", "GET"]  # our reachability check, then hf_hub_download
    assert f"replacing invalid file: {dest / name}" in capsys.readouterr().out


def test_corrupt_download_never_gets_the_shard_name(hub, tiny_files, tmp_path):
    dest = tmp_path / "dest"
    name = "tiny_train_000002.bin"
    hub.serve(TINY.repo_id, name, tiny_files[name][:-100])  # complete HTTP transfer of a truncated shard
    with pytest.raises(DownloadError, match=rf"failed its check and was deleted.*{name}: truncated"):
        download_shards(TINY, 3, dest, endpoint=hub.url)
    assert not (dest / name).exists()
    assert list((dest / STAGING_DIR_NAME).rglob(name)) == []
    # Shards before the bad one are complete; the one after was never started.
    assert (dest / "tiny_train_000001.bin").read_bytes() == tiny_files["tiny_train_000001.bin"]
    assert not (dest / "tiny_train_000003.bin").exists()


def test_file_missing_on_hub_is_named(hub, tiny_files, tmp_path):
    del hub.files[f"/datasets/{TINY.repo_id}/resolve/main/tiny_train_000001.bin"]
    with pytest.raises(DownloadError, match=r"could not fetch tiny_train_000001\.bin from test-org/tiny-gpt2"):
        download_shards(TINY, 1, tmp_path / "dest", endpoint=hub.url)


def test_asking_for_more_shards_than_exist_is_refused(tmp_path):
    with pytest.raises(DownloadError, match=r"has 3 training shards; asked for 4"):
        download_shards(TINY, 4, tmp_path / "dest", endpoint=closed_port_url())


def run_entry_point(script: str, args: list[str], endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"))
    return run_process([sys.executable, str(REPO / "data" / script), *args], env=env, timeout=120)


def test_entry_point_downloads_through_hf_endpoint(hub, tmp_path):
    repo_id = "kjj0/fineweb10B-gpt2"
    bodies = {
        "fineweb_val_000000.bin": shard_bytes(tmp_path, 300, 1),
        "fineweb_train_000001.bin": shard_bytes(tmp_path, 400, 2),
    }
    for name, body in bodies.items():
        hub.serve(repo_id, name, body)
    dest = tmp_path / "fineweb10B"
    result = run_entry_point("cached_fineweb10B.py", ["1", "--local_dir", str(dest)], hub.url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == bodies
    assert "2 shards ready" in result.stdout


def test_entry_point_reports_unreachable_hub(tmp_path):
    dest = tmp_path / "finewebedu10B"
    result = run_entry_point("cached_finewebedu10B.py", ["2", "--local_dir", str(dest)], closed_port_url(), tmp_path)
    assert result.returncode == 1
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith(
        "error: could not fetch finewebedu_val_000000.bin from kjj0/finewebedu10B-gpt2 at http://127.0.0.1:"
    )
    assert "check the network connection" in error_line
    assert not dest.exists(), "a failed download removes the folder it created"
    assert result.stderr.count("shards:") == 1, "one progress bar, not a second one above the error"


def test_failed_download_removes_only_the_folders_it_created(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    for dest in (existing, tmp_path / "new" / "fineweb10B"):
        with pytest.raises(DownloadError, match="could not fetch tiny_val_000000.bin"):
            download_shards(TINY, 1, dest, endpoint=closed_port_url())
    assert existing.is_dir() and list(existing.iterdir()) == []
    assert not (tmp_path / "new").exists()
