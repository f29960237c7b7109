#!/usr/bin/env bash
# GPU acceptance of the record-89 recipe on one CUDA GPU, in one command, writing one Markdown report:
#   1. the CUDA checks, python -m pytest -q tests/test_cuda.py;
#   2. a 50-step run at the record's shapes (its batch sizes, slots, windows, sequence lengths and model; only the
#      schedule is shortened: stages end at 15, 31, 45, then 5 extension steps; one validation sequence) on one
#      GPU: its ms/step and peak memory, read from its log;
#   3. the tiny preset compiled (FlexAttention) against eager (explicit attention): every val loss compared.
# Needs the FineWeb shards of `python data/cached_fineweb10B.py 1` (the 50-step run reads ~13.6M tokens).
#
#   tests/gpu_acceptance.sh [OUT_DIR]     (default logs/gpu_acceptance; the report is OUT_DIR/report.md)
#
# Exit status: 0 all passed, 1 a check failed (the report says which), 2 it cannot run here (no CUDA GPU, no data).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-logs/gpu_acceptance}
TRAIN_FILES=data/fineweb10B/fineweb_train_000001.bin
VAL_FILES=data/fineweb10B/fineweb_val_000000.bin
MAX_LOSS_DIFFERENCE=0.05  # compiled vs eager, each val loss of the tiny run (bf16 on both; flex vs explicit)

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_acceptance: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
if [[ ! -f $TRAIN_FILES || ! -f $VAL_FILES ]]; then
    echo "gpu_acceptance: missing $TRAIN_FILES or $VAL_FILES; download them with: python data/cached_fineweb10B.py 1" >&2
    exit 2
fi
mkdir -p "$OUT"
DATA=(--train_files="$TRAIN_FILES" --val_files="$VAL_FILES" --log_dir="$OUT")
RECORD_SHAPE=(--stage_ends=15,31,45 --extension_steps=5 --split_step=31 --muon_momentum_warmup_steps=20
              --muon_momentum_cooldown_steps=5 --val_tokens=262144 --val_every=0)
TINY=(--preset=tiny --device=cuda)

run() {  # run NAME COMMAND...: the command's output to OUT/NAME.out; prints the exit status
    local name=$1
    shift
    echo "gpu_acceptance: $name: $*" >&2
    "$@" >"$OUT/$name.out" 2>&1
    echo $?
}

TESTS_COMMAND=("$PYTHON" -m pytest -q tests/test_cuda.py)
RECORD_COMMAND=("$PYTHON" train_gpt.py "${RECORD_SHAPE[@]}" "${DATA[@]}" --run_id=record_shape_50)
COMPILED_COMMAND=("$PYTHON" train_gpt.py "${TINY[@]}" --compile=true "${DATA[@]}" --run_id=tiny_compiled)
EAGER_COMMAND=("$PYTHON" train_gpt.py "${TINY[@]}" --compile=false --attention_backend=explicit "${DATA[@]}"
               --run_id=tiny_eager)
rm -f "$OUT"/record_shape_50.txt "$OUT"/tiny_compiled.txt "$OUT"/tiny_eager.txt  # logs of an earlier call
TESTS_STATUS=$(run test_cuda "${TESTS_COMMAND[@]}")
RECORD_STATUS=$(run record_shape_50 "${RECORD_COMMAND[@]}")
COMPILED_STATUS=$(run tiny_compiled "${COMPILED_COMMAND[@]}")
EAGER_STATUS=$(run tiny_eager "${EAGER_COMMAND[@]}")

"$PYTHON" - "$OUT" "$MAX_LOSS_DIFFERENCE" "$TESTS_STATUS" "$RECORD_STATUS" "$COMPILED_STATUS" "$EAGER_STATUS" \
    "${TESTS_COMMAND[*]}" "${RECORD_COMMAND[*]}" "${COMPILED_COMMAND[*]}" "${EAGER_COMMAND[*]}" <<'EOF'
"""Reads the runs' logs and writes OUT/report.md; exits 1 when a check failed."""
import subprocess
import sys
from pathlib import Path

import torch

from records.tool import LogError, read_log

out, max_difference = Path(sys.argv[1]), float(sys.argv[2])
tests_status, record_status, compiled_status, eager_status = (int(value) for value in sys.argv[3:7])
tests_command, record_command, compiled_command, eager_command = sys.argv[7:11]
failures = []


def log_of(name: str, status: int):
    """The run's log when it finished, else None (and the failure is noted)."""
    if status != 0:
        failures.append(f"{name} exited with status {status} (see {out / (name + '.out')})")
        return None
    try:
        log = read_log(out / f"{name}.txt", keep_source=False)
    except (OSError, LogError) as error:
        failures.append(f"{name}: {error}")
        return None
    if not log.is_complete:
        failures.append(f"{name}: {log.status}")
        return None
    return log


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"]).returncode != 0
lines = ["# GPU acceptance of the record-89 recipe", "",
         f"- device: **{torch.cuda.get_device_name(0)}** (compute capability "
         f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}), torch {torch.__version__}, CUDA "
         f"{torch.version.cuda}",
         f"- commit: {commit or 'unknown'}" + (" (tracked files modified)" if dirty else ""),
         "- command: `tests/gpu_acceptance.sh`", ""]

lines += ["## 1. CUDA checks", "", f"`{tests_command}`: " + ("passed" if tests_status == 0 else
          f"**failed** (status {tests_status})"), "", "```",
          *(out / "test_cuda.out").read_text().strip().splitlines()[-5:], "```", ""]
if tests_status != 0:
    failures.append(f"tests/test_cuda.py failed (status {tests_status})")

lines += ["## 2. Record shapes, 50 steps, one GPU", "", f"`{record_command}`", ""]
record = log_of("record_shape_50", record_status)
if record:
    lines += ["| figure | value |", "|---|---:|",
              f"| steps | {record.last_step} |",
              f"| ms/step (training time / steps; the warm-up, which compiles, is not timed) | "
              f"{record.ms_per_step:.1f} |",
              f"| training time | {record.training_time_ms / 1e3:.1f} s |",
              f"| peak memory allocated / reserved | {record.peak_memory_allocated_mib} / "
              f"{record.peak_memory_reserved_mib} MiB |",
              f"| final val loss (one 262,144-token sequence) | {record.final_val_loss:.4f} |", ""]
    if record.peak_memory_allocated_mib is None:
        failures.append("record_shape_50: no peak memory line in its log")

lines += ["## 3. Compiled vs eager, tiny preset", "", f"- compiled: `{compiled_command}`",
          f"- eager: `{eager_command}`", ""]
compiled, eager = log_of("tiny_compiled", compiled_status), log_of("tiny_eager", eager_status)
if compiled and eager:
    eager_losses = {line.step: line.val_loss for line in eager.val_steps}
    lines += ["| step | compiled val loss | eager val loss | difference |", "|---:|---:|---:|---:|"]
    for line in compiled.val_steps:
        other = eager_losses.get(line.step)
        if other is None:
            failures.append(f"tiny_eager has no val loss at step {line.step}")
            continue
        difference = line.val_loss - other
        lines.append(f"| {line.step} | {line.val_loss:.4f} | {other:.4f} | {difference:+.4f} |")
        if abs(difference) > max_difference:
            failures.append(f"compiled vs eager at step {line.step}: {line.val_loss:.4f} vs {other:.4f}, "
                            f"more than {max_difference} apart")
    lines.append("")

lines += ["## Result", "", "**passed**" if not failures else "**failed**:", *(f"- {f}" for f in failures), ""]
(out / "report.md").write_text("\n".join(lines))
print(f"gpu_acceptance: {'passed' if not failures else 'FAILED: ' + '; '.join(failures)}; report: "
      f"{out / 'report.md'}")
sys.exit(1 if failures else 0)
EOF
