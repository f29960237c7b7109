"""Shared paths and fixtures. Shared data lives beside the project as ../shared (CI has the same layout)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ENWIKI = SHARED / "data" / "enwiki"
sys.path.insert(0, str(REPO))


def enwiki_paths() -> tuple[str, str]:
    if not (ENWIKI / "enwiki_val_000000.bin").exists():
        pytest.fail(f"shared test data missing: expected {ENWIKI} beside the project (../shared/data/enwiki)")
    return str(ENWIKI / "enwiki_train_*.bin"), str(ENWIKI / "enwiki_val_*.bin")


def run_trainer(args: list[str], nproc: int = 1, timeout: int = 600, env_extra: dict | None = None):
    """Runs train_gpt.py (under torchrun when nproc > 1) and returns the CompletedProcess."""
    env = {**os.environ, **(env_extra or {})}
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        command = [sys.executable]
    return subprocess.run(command + [str(REPO / "train_gpt.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run_logs(tmp_path_factory) -> list[Path]:
    """Logs of two real `--preset=tiny` CPU runs on the enwiki shards, with seeds 0 and 1."""
    train_files, val_files = enwiki_paths()
    log_dir = tmp_path_factory.mktemp("tiny_logs")
    # One compile cache for both runs: the second compiles from it.
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor_cache"))}
    logs = []
    for seed in (0, 1):
        run_id = f"tiny_seed{seed}"
        result = run_trainer(["--preset=tiny", f"--seed={seed}", f"--train_files={train_files}",
                              f"--val_files={val_files}", f"--log_dir={log_dir}", f"--run_id={run_id}"],
                             env_extra=cache)
        assert result.returncode == 0, f"tiny run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        logs.append(log_dir / f"{run_id}.txt")
    return logs
