"""Benchmark of the log reader: `summary` over a generated tree of record-sized logs.

    python records/bench_reader.py [--logs 1000] [--keep DIR]

Writes N logs of about 220 KB each (an embedded source of ~120 KB, an nvidia-smi block, the status
lines of the 2026 record scripts, 1,770 step lines with a val line every 125 steps, the peak memory
line) into a temporary folder, then runs `python records/tool.py summary 'DIR/*.txt'` in a child
process and prints logs/s, MB/s, the child's CPU time and peak resident memory (ru_maxrss). This is a
measurement script, not a test: run it on an otherwise idle machine and name the device and commit
with its figures.
"""

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOL = Path(__file__).resolve().parent / "tool.py"
SEPARATOR = "=" * 100
TOTAL_STEPS, VAL_EVERY = 1770, 125


def embedded_source(target_bytes: int = 120_000) -> str:
    """Python-looking text of about `target_bytes`, standing in for the training script a log starts with."""
    block = [
        "def muon_update(grad, momentum, beta=0.95, ns_steps=5):",
        "    momentum.lerp_(grad, 1 - beta)  # the record scripts carry long lines like this one",
        "    update = grad.lerp_(momentum, beta)",
        "    update = zeropower_via_newtonschulz5(update, steps=ns_steps)",
        "    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5",
        "    return update",
        "",
    ]
    text = "\n".join(block) + "\n"
    return text * (target_bytes // len(text))


def environment(gpus: int = 8) -> list[str]:
    rule = "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+"
    lines = ["Running Python 3.12.3 (main, Jan 22 2026, 20:57:42) [GCC 13.3.0]",
             "Running PyTorch 2.10.0+cu128 compiled for CUDA 12.8", "Running Triton version 3.6.0",
             "Thu Sep  3 05:02:36 2026", rule]
    for gpu in range(gpus):
        lines += [f"|   {gpu}  NVIDIA H100 80GB HBM3          On  |   00000000:06:{gpu:02d}.0 Off |"
                  f"                    0 |",
                  "| N/A   29C    P0            118W /  700W |    1519MiB /  81559MiB |      0%      Default |",
                  rule]
    return lines


def write_log(path: Path, source: str, rng: np.random.Generator) -> None:
    final_loss = 3.278 + rng.normal(0, 0.0015)
    step_ms = 101.6 + rng.normal(0, 0.3)
    lines = [SEPARATOR, *environment(), SEPARATOR,
             "Compiling model and warming up kernels (~7 minutes on first execution)",
             "Sampling steps [0, 1, 589, 590, 1180, 1181] for warmup", "Resetting Model",
             f"step:0/{TOTAL_STEPS} val_loss:10.8258 train_time:0ms step_avg:0.02ms"]
    times = np.cumsum(step_ms + rng.normal(0, 0.5, size=TOTAL_STEPS)).astype(int)
    for step, time_ms in enumerate(times, start=1):
        lines.append(f"step:{step}/{TOTAL_STEPS} train_time:{time_ms}ms step_avg:{time_ms / step:.2f}ms")
        if step % VAL_EVERY == 0 or step == TOTAL_STEPS:
            loss = final_loss + (10.8258 - final_loss) * (1 - step / TOTAL_STEPS) ** 2
            lines.append(f"step:{step}/{TOTAL_STEPS} val_loss:{loss:.4f} train_time:{time_ms}ms "
                         f"step_avg:{time_ms / step:.2f}ms")
    lines.append("peak memory allocated: 32150 MiB reserved: 38992 MiB")
    path.write_text(source + "\n".join(lines) + "\n", encoding="utf-8")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=int, default=1000, help="number of logs to generate (default 1000)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        source, rng = embedded_source(), np.random.default_rng(0)
        for index in range(args.logs):
            write_log(folder / f"{index:05d}.txt", source, rng)
        total_bytes = sum(path.stat().st_size for path in folder.glob("*.txt"))

        command = [sys.executable, str(TOOL), "summary", str(folder / "*.txt")]
        start = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mib, cpu_seconds = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss in KiB on Linux
        rows = sum(1 for line in result.stdout.splitlines() if line.startswith(f"| {folder}"))
        if result.returncode != 0 or rows != args.logs:
            sys.exit(f"summary failed: exit status {result.returncode}, {rows} of {args.logs} logs summarised")

    print(f"device: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"command: python records/tool.py summary 'DIR/*.txt' over {args.logs} generated logs, "
          f"{total_bytes / 1e6:.0f} MB ({total_bytes / args.logs / 1e3:.0f} KB per log)")
    print(f"wall time: {seconds:.2f} s, {args.logs / seconds:.0f} logs/s, {total_bytes / 1e6 / seconds:.0f} MB/s; "
          f"CPU time of the summary process: {cpu_seconds:.2f} s ({args.logs / cpu_seconds:.0f} logs per CPU-second); "
          f"its peak memory (max RSS): {peak_mib:.0f} MiB")
    print(f"load average during the run (other work on the machine slows the wall time): "
          f"{' '.join(f'{load:.1f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
