#!/usr/bin/env python3
"""Container check: build the project's Docker image on a local Debian base and run it (README, "Docker").

    python tools/container_check.py [--shared=DIR] [--steps=N]

Linux, as root, standard library only. Installs docker.io and debootstrap with apt when missing, starts
a dockerd of its own (data root, exec root, pid file and socket in a temporary folder; no bridge and no
iptables rules: builds use the host's network, containers none), makes a minimal Debian with debootstrap
and the host's CA certificates as the base (Docker Hub is not reachable here), builds the Dockerfile on
it, and runs in the container, on the code baked into the image: the import of every dependency with its
version, `python train_gpt.py --help`, `./run.sh --help`, `./run.sh` without data (the download hint),
N steps of the tiny preset on the enwiki test shards (mounted read-only) with the log written to a
mounted folder, and tests/test_bad_input.py. Then, also after a failure or SIGINT/SIGTERM, it stops its
dockerd by PID, removes everything it made, and checks that nothing is left.

--shared: the test data folder holding enwiki/ (default: $SPEEDRUN_TEST_DATA, else ../shared/data
beside the repository, as for the tests); --steps: tiny preset steps (default 4, at least 3: the recipe's three stages).
Exit status: 0 pass, 1 a failure, 2 bad arguments, 3 a registry hiccup (a download timed out or lost
its connection): the check is skipped, not failed.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
BASE_IMAGE, IMAGE = "speedrun-check/base", "speedrun-check/image"
REGISTRY_HICCUP = 3
# Output of apt, debootstrap and pip when a download times out or its connection fails. A missing
# package or version is not in this list: that is a real failure.
HICCUP_PATTERNS = re.compile("|".join([
    r"Read ?timed out", r"ReadTimeoutError", r"ConnectTimeoutError", r"Connection timed out",
    r"Connection reset", r"Connection refused", r"Connection aborted", r"Failed to establish a new connection",
    r"Temporary failure (in name resolution|resolving)", r"Could not resolve", r"Network is unreachable",
    r"IncompleteRead", r"Failed to fetch", r"Couldn't download", r"Failed getting release file",
]))
# Runs in the container's code folder: every requirement imports (versions printed), and nothing that
# .dockerignore leaves out came into the image.
IMAGE_CONTENT_CHECK = """
import importlib, importlib.metadata, pathlib, re, sys
print("python", sys.version.split()[0])
for line in pathlib.Path("requirements.txt").read_text().splitlines():
    name = re.match(r"[A-Za-z0-9_.-]*", line.strip())[0]
    if name:
        importlib.import_module(name.replace("-", "_"))
        print(name, importlib.metadata.version(name))
import torch
print("torch.version.cuda", torch.version.cuda, "| triton", importlib.metadata.version("triton"))
stray = [str(p) for p in pathlib.Path(".").rglob("*") if p.name == ".git" or p.suffix in (".bin", ".pt")]
sys.exit(f"files that .dockerignore should leave out: {stray[:5]}" if stray else 0)
"""


class UsageError(ValueError):
    """Bad arguments or a missing prerequisite (exit 2)."""


class StepFailed(RuntimeError):
    """A step did not do what it should (exit 1)."""


class RegistryHiccup(RuntimeError):
    """A download timed out or lost its connection (exit 3)."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that the cleanup runs (as KeyboardInterrupt does for SIGINT)."""


@dataclass
class Options:
    shared: Path
    steps: int


def default_shared() -> Path:
    return Path(os.environ["SPEEDRUN_TEST_DATA"]) if os.environ.get("SPEEDRUN_TEST_DATA") else REPO.parent / "shared" / "data"


def parse_args(argv: list[str]) -> Options:
    options = Options(shared=default_shared(), steps=4)
    for arg in argv:
        name, equals, value = arg.partition("=")
        if name == "--shared" and equals:
            options.shared = Path(value)
        elif name == "--steps" and equals:
            if not value.isdigit() or int(value) < 3:
                raise UsageError(f"--steps={value}: must be a whole number of at least 3 (the recipe's three stages)")
            options.steps = int(value)
        else:
            raise UsageError(f"unknown argument {arg!r}; valid: --shared=DIR, --steps=N (see --help)")
    enwiki = options.shared / "enwiki"
    if not (enwiki / "enwiki_val_000000.bin").is_file() or not list(enwiki.glob("enwiki_train_*.bin")):
        raise UsageError(f"no enwiki shards in {enwiki}: put the test data there or pass --shared=DIR "
                         "(README, 'Test data')")
    options.shared = options.shared.resolve()
    return options


def registry_hiccup(output: str) -> str | None:
    """The connection problem in the output's last lines (where a failed download's error is), if any. Earlier
    lines may show retries that then succeeded."""
    found = HICCUP_PATTERNS.search("\n".join(output.splitlines()[-40:]))
    return found[0] if found else None


def stop_group(process: subprocess.Popen):
    """SIGTERM to the step's process group, SIGKILL after 10 s (apt and dpkg get the chance to stop cleanly)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run(command: list[str], what: str, timeout: float, env: dict | None = None, download: bool = False,
        expect: int = 0) -> str:
    """Runs a step with its output streamed to the console; returns the output. A download step that times out
    or whose output shows a connection problem raises RegistryHiccup; any other unexpected exit, StepFailed.
    The step runs in its own session, killed on timeout or interruption."""
    print(f"$ {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, errors="replace", env=env, start_new_session=True)
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), stop_group(process)))
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        process.wait()
    finally:
        timer.cancel()
        stop_group(process)
    output = "".join(lines)
    if timed_out.is_set():
        message = f"{what}: no result in {timeout:.0f} s (stopped)"
        raise RegistryHiccup(message) if download else StepFailed(message)
    if process.returncode != expect:
        if download and (problem := registry_hiccup(output)):
            raise RegistryHiccup(f"{what}: a download failed ({problem})")
        raise StepFailed(f"{what}: exit status {process.returncode}, expected {expect} (output above)")
    return output


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or under root, deepest first (from /proc/self/mountinfo; \\040 is a space)."""
    points = [line.split()[4].replace("\\040", " ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p == str(root) or p.startswith(f"{root}/")), key=len, reverse=True)


def iptables_rules() -> str:
    if not shutil.which("iptables-save"):
        return ""
    result = subprocess.run(["iptables-save"], capture_output=True, text=True)
    return "\n".join(line for line in result.stdout.splitlines() if not line.startswith("#"))


class Daemon:
    """A dockerd whose state lives in one temporary folder, and its removal. Folders that dockerd and its
    containerd make outside it (/run/docker for plugins, /run/containerd for shim sockets, /etc/docker)
    go too, when they were not there before (another Docker on this machine keeps its own)."""

    OUTSIDE = (Path("/run/docker"), Path("/run/containerd"), Path("/etc/docker"))

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="speedrun-container-check-"))
        self.socket = self.root / "docker.sock"
        self.process: subprocess.Popen | None = None
        self.outside_before = {path for path in self.OUTSIDE if path.exists()}
        self.docker0_before = Path("/sys/class/net/docker0").exists()
        self.iptables_before = iptables_rules()
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.root / "client"),
                    "DOCKER_BUILDKIT": "0"}  # the daemon's own builder: no buildx plugin needed

    def start(self):
        # Its own config file: the machine's /etc/docker/daemon.json does not apply, and the daemon's identity
        # key (only settable there) goes into the folder instead of /etc/docker.
        config = self.root / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.root / "key.json")}))
        with open(self.root / "dockerd.log", "w") as log:
            self.process = subprocess.Popen(
                ["dockerd", f"--config-file={config}", f"--data-root={self.root / 'data'}",
                 f"--exec-root={self.root / 'exec'}", f"--pidfile={self.root / 'dockerd.pid'}",
                 f"--host=unix://{self.socket}", "--bridge=none", "--iptables=false", "--ip6tables=false"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            if subprocess.run(["docker", "version"], env=self.env, capture_output=True).returncode == 0:
                print(f"dockerd {self.process.pid} up, state in {self.root}", flush=True)
                return
            time.sleep(0.5)
        log = (self.root / "dockerd.log").read_text().strip().splitlines()[-3:]
        state = "did not answer in 60 s" if self.process.poll() is None else f"exited ({self.process.returncode})"
        raise StepFailed(f"dockerd {state}: {' | '.join(log)}")

    def docker(self, *args: str) -> list[str]:
        return subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=120).stdout.split()

    def remove_everything(self):
        """Containers and images through the daemon, then the daemon (SIGTERM by PID, SIGKILL after 60 s), any
        process still naming the folder (containerd, shims), mounts under it, and the folder."""
        if self.process and self.process.poll() is None:
            try:
                if containers := self.docker("ps", "--all", "--quiet"):
                    self.docker("rm", "--force", *containers)
                if images := self.docker("images", "--all", "--quiet"):
                    self.docker("rmi", "--force", *set(images))
            except subprocess.TimeoutExpired:
                print("container_check: the daemon did not answer; stopping it", file=sys.stderr)
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in processes_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while processes_mentioning(str(self.root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for point in mounts_under(self.root):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        if not mounts_under(self.root):  # never delete through a mount (debootstrap mounts /proc in its target)
            shutil.rmtree(self.root, ignore_errors=True)
        for path in self.OUTSIDE:
            if path not in self.outside_before:
                shutil.rmtree(path, ignore_errors=True)

    def left_behind(self) -> list[str]:
        left = []
        if self.process and self.process.poll() is None:
            left.append(f"dockerd (pid {self.process.pid})")
        left += [f"process {pid}" for pid in processes_mentioning(str(self.root))]
        left += [f"mount {point}" for point in mounts_under(self.root)]
        left += [str(path) for path in (self.root, *self.OUTSIDE) if path.exists() and path not in self.outside_before]
        if Path("/sys/class/net/docker0").exists() and not self.docker0_before:
            left.append("network bridge docker0")
        if iptables_rules() != self.iptables_before:
            left.append("iptables rules")
        return left


def install_missing_tools():
    missing = [package for package, command in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
               if not shutil.which(command)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], "apt-get update", 600, env, download=True)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], f"installing {' '.join(missing)}",
        600, env, download=True)


def make_base(daemon: Daemon):
    """A minimal Debian as the base image, with the host's CA certificates: pip in the build then trusts the
    same certificates as the host (an intercepting proxy's included)."""
    rootfs = daemon.root / "base"
    run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], "debootstrap", 900,
        download=True)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle, rootfs / "etc/ssl/certs")
    local_certificates = Path("/usr/local/share/ca-certificates")
    if local_certificates.is_dir():  # kept if the build installs ca-certificates, which rebuilds the bundle
        shutil.copytree(local_certificates, rootfs / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    run(["bash", "-o", "pipefail", "-c", f"tar -C '{rootfs}' -c . | docker import - {BASE_IMAGE}"],
        "importing the base", 300, daemon.env)


def build_image(daemon: Daemon) -> str:
    run(["docker", "build", "--network=host", f"--build-arg=BASE={BASE_IMAGE}", f"--tag={IMAGE}", str(REPO)],
        "docker build", 1800, daemon.env, download=True)
    size = int(daemon.docker("image", "inspect", "--format={{.Size}}", IMAGE)[0])
    history = subprocess.run(["docker", "history", "--format={{.Size}}\t{{.CreatedBy}}", IMAGE], env=daemon.env,
                             capture_output=True, text=True).stdout
    print("layers (size, instruction):")
    for line in history.splitlines():
        print(f"  {line[:110]}")
    return f"{size / 1e9:.2f} GB"


def container(*args: str, mounts: dict[Path, str] | None = None, env: dict | None = None) -> list[str]:
    """docker run on the image without network and without a code mount: the code is the image's own. Without
    a network Docker puts no entry for the container's hostname in /etc/hosts, and torchrun's rendezvous on
    that hostname would retry forever: it is given one, on the loopback."""
    volumes = [f"--volume={host}:{inside}" for host, inside in (mounts or {}).items()]
    variables = [f"--env={name}={value}" for name, value in (env or {}).items()]
    return ["docker", "run", "--rm", "--network=none", "--hostname=speedrun", "--add-host=speedrun:127.0.0.1",
            "--ipc=host", *volumes, *variables, IMAGE, *args]


def run_in_container(daemon: Daemon, options: Options, phases: "Phases"):
    shared_ro = {options.shared: "/shared/data:ro"}  # conftest's default test data folder for /speedrun
    with phases("imports"):
        run(container("python", "-c", IMAGE_CONTENT_CHECK), "imports and versions", 600, daemon.env)
    with phases("train_gpt.py --help"):
        output = run(container("python", "train_gpt.py", "--help"), "train_gpt.py --help", 300, daemon.env)
        require("--preset=tiny" in output, "train_gpt.py --help does not list the tiny preset")
    with phases("run.sh --help"):
        output = run(container("./run.sh", "--help"), "./run.sh --help", 300, daemon.env)
        require("--preset=tiny" in output, "./run.sh --help does not print the trainer's settings")
    with phases("run.sh without data"):
        output = run(container(env={"NPROC": "1"}), "the image's default command without data", 300,
                     daemon.env, expect=2)
        require(output.count("\n") == 1 and "python data/cached_fineweb10B.py 5" in output,
                "run.sh without data does not give the one-line download command")
    with phases(f"tiny preset, {options.steps} steps"):
        logs = daemon.root / "logs"
        logs.mkdir()
        steps = options.steps  # the recipe's three stages, eager, without the warm-up's compilation
        run(container("./run.sh", "--preset=tiny", "--compile=false", "--warmup=false",
                      "--train_files=/shared/data/enwiki/enwiki_train_*.bin",
                      "--val_files=/shared/data/enwiki/enwiki_val_000000.bin",
                      f"--stage_ends={steps - 2},{steps - 1},{steps}", "--extension_steps=0",
                      f"--split_step={steps - 1 if steps % 2 == 0 else steps - 2}", "--muon_momentum_warmup_steps=1",
                      "--muon_momentum_cooldown_steps=1", "--run_id=container_check",
                      mounts={**shared_ro, logs: "/speedrun/logs"},
                      # the prefix-token table is built from tiktoken's GPT-2 encoding; the container is offline
                      env={"NPROC": "1", "TIKTOKEN_CACHE_DIR": "/shared/data/gpt2/tiktoken_cache"}),
            "tiny preset", 1200, daemon.env)
        log = logs / "container_check.txt"
        require(log.is_file() and f"step:{options.steps}/{options.steps} val_loss:" in log.read_text(),
                f"the tiny run wrote no final validation to the mounted log folder ({log})")
    with phases("bad-input tests"):
        run(container("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_input.py",
                      mounts=shared_ro), "tests/test_bad_input.py", 1800, daemon.env)


def require(condition: bool, message: str):
    if not condition:
        raise StepFailed(message)


class Phases:
    """Times each phase; the summary goes to the console at the end, whatever happened."""

    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"\n=== container_check: {name}", flush=True)
        start, outcome = time.monotonic(), "interrupted"
        try:
            yield
            outcome = "ok"
        except RegistryHiccup:
            outcome = "skipped (registry)"
            raise
        except StepFailed:
            outcome = "FAILED"
            raise
        finally:
            self.rows.append((name, time.monotonic() - start, outcome))

    def summary(self) -> str:
        return "\n".join(f"  {name:<28} {seconds:7.1f} s  {outcome}" for name, seconds, outcome in self.rows)


def check(options: Options, phases: Phases) -> str:
    """Returns the image size; the daemon and everything it made are gone when this returns or raises."""
    with phases("install docker.io, debootstrap"):
        install_missing_tools()
    daemon = Daemon()
    try:
        with phases("start dockerd"):
            daemon.start()
        with phases("debootstrap + import base"):
            make_base(daemon)
        with phases("docker build"):
            size = build_image(daemon)
        print(f"image size: {size}", flush=True)
        run_in_container(daemon, options, phases)
        return size
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with phases("cleanup"):
            daemon.remove_everything()
            if left := daemon.left_behind():
                raise StepFailed(f"left behind after cleanup: {', '.join(left)}")


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        options = parse_args(argv)
        if sys.platform != "linux" or os.geteuid() != 0:
            raise UsageError("needs Linux and root (it installs packages and runs its own dockerd)")
    except UsageError as error:
        print(f"container_check: error: {error}", file=sys.stderr)
        return 2

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    phases = Phases()
    status, verdict = 1, ""
    try:
        size = check(options, phases)
        status, verdict = 0, f"container check passed; image {size}"
    except RegistryHiccup as hiccup:
        status, verdict = REGISTRY_HICCUP, f"registry hiccup: {hiccup}"
    except StepFailed as failure:
        verdict = f"FAILED: {failure}"
    except (KeyboardInterrupt, Terminated):
        status, verdict = 130, "interrupted (cleaned up)"
    print(f"\n=== container_check: phase times\n{phases.summary()}", flush=True)
    print(f"container_check: {verdict}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
