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


def script_command(script: Path, args: list[str], nproc: int = 1) -> list[str]:
    """The command line of a Python script, under torchrun when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + [str(script), *args]


def trainer_command(args: list[str], nproc: int = 1) -> list[str]:
    return script_command(REPO / "train_gpt.py", args, nproc)


def run_trainer(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run_logs(tmp_path_factory) -> list[Path]:
    """Logs of two real `--preset=tiny` CPU runs on the enwiki shards, with seeds 0 and 1.

    The runs go in parallel with one thread each: two 2-thread processes on a 2-core machine thrash."""
    train_files, val_files = enwiki_paths()
    log_dir = tmp_path_factory.mktemp("tiny_logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor_cache"))}
    runs = {}
    for seed in (0, 1):
        args = ["--preset=tiny", f"--seed={seed}", f"--train_files={train_files}", f"--val_files={val_files}",
                f"--log_dir={log_dir}", f"--run_id=tiny_seed{seed}"]
        output = open(log_dir / f"console_seed{seed}.out", "w+")
        runs[seed] = (subprocess.Popen(trainer_command(args), cwd=REPO, env=env, stdout=output,
                                       stderr=subprocess.STDOUT, text=True), output)
    for seed, (process, output) in runs.items():
        returncode = process.wait(timeout=900)
        output.seek(0)
        assert returncode == 0, f"tiny run (seed {seed}) failed:\n{output.read()[-4000:]}"
        output.close()
    return [log_dir / f"tiny_seed{seed}.txt" for seed in runs]
