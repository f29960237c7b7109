#!/usr/bin/env python3
"""GPU check without a GPU: compile a recipe's CUDA path for a chosen GPU and report its graphs,
Triton kernels, predicted peak memory and host syncs (see README.md, "GPU check").

    python tools/gpu_check.py [--recipe=train_gpt.py|records/.../train_gpt.py] [--gpu=h100] [--nproc=8] [--out=DIR]
                              [--no-kernels] [--only=train|eval] [--name=value ...]

Any python runs this launcher (standard library only). It creates once, and then reuses, a venv outside
the repository with exactly the torch and triton the Dockerfile pins (CUDA build), builds the two stub
libraries with the system C compiler, and re-executes the check (fake_gpu/worker.py) inside that venv.
The user's own environment is never touched. Trainer settings (`--name=value`) are passed on to
the recipe's own parse_settings (default recipe: train_gpt.py). Exit status: 0 pass, 1 a fatal finding, 2 bad settings, 3 the
environment could not be made (the one-line message says why).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
STUBS = TOOLS / "fake_gpu" / "stubs"
# The triton release each pinned torch declares as its dependency (torch's wheel metadata).
TRITON_FOR_TORCH = {"2.11.0": "3.6.0"}
MARKER = "gpu-check-complete"
ENVIRONMENT_ERROR = 3


class EnvironmentProblem(RuntimeError):
    """The venv or the stubs cannot be made; the message says why and what to do."""


def pinned_versions(dockerfile: Path = REPO / "Dockerfile") -> tuple[str, str]:
    """(torch, triton) versions: torch from the Dockerfile's `pip install torch==X`, triton from torch's pin."""
    match = re.search(r"\btorch==([0-9][\w.]*)", dockerfile.read_text())
    if not match:
        raise EnvironmentProblem(f"{dockerfile}: no `torch==VERSION` pin found")
    torch_version = match.group(1)
    if torch_version not in TRITON_FOR_TORCH:
        raise EnvironmentProblem(f"torch {torch_version} (Dockerfile) has no triton version in TRITON_FOR_TORCH "
                                 "of tools/gpu_check.py: add the triton that torch release requires")
    return torch_version, TRITON_FOR_TORCH[torch_version]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "speedrun-gpu-check"


def venv_dir(torch_version: str, triton_version: str) -> Path:
    return cache_root() / f"venv-torch{torch_version}-triton{triton_version}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def imports_pinned_builds(venv: Path, torch_version: str, triton_version: str) -> bool:
    probe = ("import torch, triton, numpy; "
             "print(torch.__version__.split('+')[0], triton.__version__, torch.version.cuda is not None)")
    try:
        result = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.split() == [torch_version, triton_version, "True"]


def venv_is_valid(venv: Path, torch_version: str, triton_version: str) -> bool:
    """The marker is written only after an install finished and imported; a venv without it (made by hand,
    or interrupted) is adopted only if it imports the pinned CUDA builds, and is rebuilt otherwise."""
    if not venv_python(venv).exists() or not imports_pinned_builds(venv, torch_version, triton_version):
        return False
    if not (venv / MARKER).exists():
        (venv / MARKER).write_text(f"torch=={torch_version} triton=={triton_version}\n")
    return True


def run_step(command: list[str], what: str, log: Path):
    with open(log, "a") as file:
        file.write(f"$ {' '.join(command)}\n")
        file.flush()
        result = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        reason = " | ".join(line.strip() for line in tail)
        if "No space left" in reason:
            raise EnvironmentProblem(f"{what}: no disk space left under {log.parent} (the venv needs ~5 GB)")
        if any(word in reason for word in ("No matching distribution", "Could not find", "connection", "Connection")):
            raise EnvironmentProblem(f"{what}: the package registry is unreachable or lacks the package ({reason[:200]}); "
                                     f"retry later (log: {log})")
        raise EnvironmentProblem(f"{what} failed: {reason[:300]} (log: {log})")


def ensure_venv(torch_version: str, triton_version: str) -> Path:
    venv = venv_dir(torch_version, triton_version)
    if venv_is_valid(venv, torch_version, triton_version):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(venv.parent).free < 8 * 2**30:
        raise EnvironmentProblem(f"less than 8 GB free under {venv.parent}: the venv needs ~5 GB; free disk space "
                                 "or set XDG_CACHE_HOME to a larger disk")
    if venv.exists():  # half-built or broken: start again
        shutil.rmtree(venv)
    log = venv.parent / "install.log"
    log.write_text("")
    print(f"gpu_check: creating {venv} (torch {torch_version} CUDA build, triton {triton_version}; "
          "several GB, one time)", file=sys.stderr, flush=True)
    run_step([sys.executable, "-m", "venv", str(venv)], "creating the venv", log)
    run_step([str(venv_python(venv)), "-m", "pip", "install", "--quiet", f"torch=={torch_version}",
              f"triton=={triton_version}", "numpy"], "installing torch and triton", log)
    if not venv_is_valid(venv, torch_version, triton_version):
        raise EnvironmentProblem(f"the venv {venv} does not import torch {torch_version} (CUDA) and triton "
                                 f"{triton_version}; delete it and retry (log: {log})")
    return venv


def build_stubs(venv: Path) -> Path:
    """libcudart_shim.so (preloaded) and libcuda.so.1 (found through LD_LIBRARY_PATH), built once per source."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise EnvironmentProblem("no C compiler found (cc or gcc): install one (e.g. apt-get install gcc) or set CC")
    out = venv / "gpu-check-stubs"
    out.mkdir(exist_ok=True)
    for source, library in (("cudart_shim.c", "libcudart_shim.so"), ("libcuda_stub.c", "libcuda.so.1")):
        target = out / library
        if target.exists() and target.stat().st_mtime >= (STUBS / source).stat().st_mtime:
            continue
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(target), str(STUBS / source)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EnvironmentProblem(f"{compiler} could not build {library}: {result.stderr.strip()[:300]}")
    return out


def worker_environment(stubs: Path) -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(stubs / "libcudart_shim.so"), env.get("LD_PRELOAD", "")]))
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(stubs), env.get("LD_LIBRARY_PATH", "")]))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor-cache"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH", "")]))
    env["PYTHONWARNINGS"] = "ignore"
    return env


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("tool flags: --recipe=FILE (train_gpt.py, or a record's under records/), --gpu=h100|h200|a100-80gb|a100-40gb|l40s|rtx4090, --nproc=N, --out=DIR, --no-kernels, "
              "--only=train|eval, --commit=SHA; every other --name=value is a setting of the recipe")
        return 0
    try:
        torch_version, triton_version = pinned_versions()
        venv = ensure_venv(torch_version, triton_version)
        stubs = build_stubs(venv)
    except EnvironmentProblem as problem:
        print(f"gpu_check: environment error: {problem}", file=sys.stderr)
        return ENVIRONMENT_ERROR
    command = " ".join(["python tools/gpu_check.py", *argv])
    worker = [str(venv_python(venv)), "-m", "fake_gpu.worker", f"--command={command}", *argv]
    return subprocess.run(worker, env=worker_environment(stubs), cwd=str(REPO)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
