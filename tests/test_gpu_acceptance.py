"""tests/gpu_acceptance.sh on a machine without CUDA (or with the GPUs hidden): it is there, executable, and
refuses with one clear line and exit status 2, before running or writing anything."""
import os

from conftest import REPO, run_process

SCRIPT = REPO / "tests" / "gpu_acceptance.sh"


def test_script_is_executable():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = run_process([str(SCRIPT), str(out)], cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_acceptance: no CUDA GPU visible") and "NVIDIA GPU" in line
    assert not out.exists()
