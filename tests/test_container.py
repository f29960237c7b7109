"""The Docker pieces that need no Docker: what .dockerignore keeps out of the image, the container check's
arguments and its registry-hiccup rule, the Dockerfile's base and pins, and run.sh's data hint in the
image. tools/container_check.py itself (run by .ci/run) builds and runs the image."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_process

CHECK = REPO / "tools" / "container_check.py"


def load_check():
    spec = importlib.util.spec_from_file_location("container_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# .dockerignore, matched as Docker matches it (moby/patternmatcher, used by the build context): patterns
# cleaned of a leading "/", "*" and "?" never cross a "/", "**" crosses any number of folders, a pattern
# also matches a file through any of its parent folders, and the last matching pattern wins ("!" keeps).


def docker_regex(pattern: str) -> re.Pattern:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 3 if pattern.startswith("**/", i) else 2
            regex += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
        i += 1
    return re.compile(f"^{regex}$")


def dockerignore_rules() -> list[tuple[re.Pattern, int, bool]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((docker_regex(pattern), pattern.count("/") + 1, keep))
    return rules


def left_out(path: str, rules) -> bool:
    parts = path.split("/")
    excluded = False
    for regex, depth, keep in rules:
        if regex.match(path) or (len(parts) > depth and regex.match("/".join(parts[:depth]))):
            excluded = not keep
    return excluded


def test_the_matcher_follows_dockers_rules():
    rules = [(docker_regex("data/*"), 2, False), (docker_regex("data/*.py"), 2, True), (docker_regex("**/*.pt"), 2, False)]
    assert left_out("data/fineweb10B/a.bin", rules)  # through its parent folder data/fineweb10B
    assert not left_out("data/a.py", rules) and not left_out("a.py", rules)  # the "!" pattern came last
    assert left_out("model.pt", rules) and left_out("logs/run/step_000001.pt", rules)
    assert docker_regex("*.pt").match("model.pt") and not docker_regex("*.pt").match("logs/model.pt")


def test_dockerignore_leaves_out_data_logs_checkpoints_environments_and_caches():
    rules = dockerignore_rules()
    for path in ["data/fineweb10B/fineweb_train_000001.bin", "data/fineweb10B/.cache/huggingface/x.lock",
                 "data/enwiki/enwiki_val_000000.bin", "data/mytext/mytext_train_000000.bin", "devdata/a/b.bin",
                 "logs/run.txt", "logs/run/step_000010.pt", "logs/run/final.safetensors", "model.pt",
                 "shard.bin", ".venv/bin/python", "venv/lib/x.py", "tools/__pycache__/gpu_check.cpython-311.pyc",
                 "__pycache__/train_gpt.cpython-311.pyc", ".pytest_cache/v/cache/nodeids", ".git/HEAD", ".git",
                 "train_gpt.py.tmp"]:
        assert left_out(path, rules), f"{path} would be copied into the image"


def test_dockerignore_keeps_every_tracked_file():
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout
    rules = dockerignore_rules()
    assert [path for path in tracked.splitlines() if left_out(path, rules)] == []
    assert "data/cached_fineweb10B.py" in tracked and "tests/test_bad_input.py" in tracked


# ----------------------------------------------------------------------------------------------------
# The container check's arguments: every mistake is one line and exit 2, before anything is installed


def run_check(args: list[str]) -> subprocess.CompletedProcess:
    return run_process([sys.executable, str(CHECK), *args], timeout=60, cwd=REPO)


def test_container_check_help():
    result = run_check(["--help"])
    assert result.returncode == 0 and "--shared" in result.stdout and "--steps" in result.stdout
    assert "3 a registry hiccup" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--stpes=4"], "unknown argument '--stpes=4'"),
    (["--steps"], "unknown argument '--steps'"),
    (["--steps=2"], "--steps=2: must be a whole number of at least 3"),
    (["--steps=two"], "--steps=two: must be a whole number"),
    (["--shared=/nonexistent/data"], "no enwiki shards in /nonexistent/data/enwiki"),
])
def test_container_check_rejects_bad_arguments_in_one_line(args, message):
    result = run_check(args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_container_check_reads_the_arguments(tmp_path):
    check = load_check()
    (tmp_path / "enwiki").mkdir()
    for name in ("enwiki_train_000001.bin", "enwiki_val_000000.bin"):
        (tmp_path / "enwiki" / name).write_bytes(b"")
    options = check.parse_args([f"--shared={tmp_path}", "--steps=7"])
    assert options.shared == tmp_path.resolve() and options.steps == 7


def test_registry_hiccup_is_a_timeout_or_a_lost_connection_near_the_end():
    check = load_check()
    pip_timeout = ("Collecting torch==2.11.0\n  Downloading torch-2.11.0.whl (900 MB)\n"
                   "pip._vendor.urllib3.exceptions.ReadTimeoutError: HTTPSConnectionPool(host='files.pythonhosted.org', "
                   "port=443): Read timed out.\n")
    assert check.registry_hiccup(pip_timeout) == "ReadTimeoutError"
    assert check.registry_hiccup("E: Failed to fetch http://deb.debian.org/x.deb  Temporary failure resolving "
                                 "'deb.debian.org'\n") == "Failed to fetch"
    assert check.registry_hiccup("E: Couldn't download packages: python3\n") == "Couldn't download"
    # a wrong pin or a failing build step is a finding, also after a retry that then succeeded
    wrong_pin = ("WARNING: Retrying (Retry(total=4)) after connection broken by 'ReadTimeoutError'\n" + "ok\n" * 50 +
                 "ERROR: Could not find a version that satisfies the requirement torch==9.9\n"
                 "ERROR: No matching distribution found for torch==9.9\n")
    assert check.registry_hiccup(wrong_pin) is None
    assert check.registry_hiccup("E: Unable to locate package python4\n") is None


# ----------------------------------------------------------------------------------------------------
# The Dockerfile and run.sh's hint inside the image


def test_dockerfile_defaults_to_the_cuda_image_and_bakes_in_the_code():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE=nvidia/cuda:13.0.0-devel-ubuntu24.04\nFROM ${BASE}\n" in dockerfile
    assert re.search(r"\bRUN pip install torch==2\.11\.0\n", dockerfile), "torch from PyPI, no other index"
    assert "--index-url" not in dockerfile
    assert dockerfile.rstrip().endswith('COPY . .\nCMD ["./run.sh"]')


def test_run_sh_in_the_image_without_data_names_the_download_command(tmp_path):
    shutil.copy(REPO / "run.sh", tmp_path / "run.sh")  # an empty folder: no data/fineweb10B, no train_gpt.py
    env = {**os.environ, "SPEEDRUN_IMAGE": "1", "NPROC": "1"}
    result = run_process(["bash", str(tmp_path / "run.sh")], timeout=60, env=env)
    download = ('docker run --rm -v "$PWD/data/fineweb10B":/speedrun/data/fineweb10B speedrun '
                'python data/cached_fineweb10B.py 5')
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and download in result.stderr, result.stderr
    assert download in (REPO / "README.md").read_text()
    # own shards given, or outside the image: no hint (here the missing trainer fails next)
    for extra_env, args in (({}, ["--train_files=x/*.bin"]), ({"SPEEDRUN_IMAGE": ""}, [])):
        result = run_process(["bash", str(tmp_path / "run.sh"), *args], timeout=60, env={**env, **extra_env})
        assert "docker run" not in result.stderr and "train_gpt.py" in result.stderr
