"""Read speedrun training logs and turn them into summaries, significance tests, comparisons and the
records table of the top-level README.

    python records/tool.py summary LOG...
    python records/tool.py significance LOG... | --losses 3.279 3.281 ...
    python records/tool.py compare RUN RUN... [--losses 4.0 3.5 3.28] [--plot out.png] [--diff]
    python records/tool.py table [--check]

LOG and RUN arguments are log files, folders of `*.txt` logs, or (quoted) glob patterns; in `compare`
each RUN argument is one run set whose logs are averaged. See records/README.md for the log format.
"""

import argparse
import datetime
import difflib
import glob
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from scipy import stats

SEPARATOR = "=" * 100
TRACK_TARGETS = {"small": 3.28, "medium": 2.92}
SIGNIFICANCE_LEVEL = 0.01
TABLE_BEGIN = "<!-- records-table:begin -->"
TABLE_END = "<!-- records-table:end -->"
RECORDS_DIR = Path(__file__).resolve().parent
DEFAULT_README = RECORDS_DIR.parent / "README.md"
RECORD_FOLDER_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][A-Za-z0-9._-]*")

STEP_COUNTER = re.compile(r"step:(\d+)/(\d+)")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf)")
PEAK_MEMORY = re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
# Early public records wrote a single figure (max allocated) in this form.
PEAK_MEMORY_OLD = re.compile(r"peak memory consumption: (\d+) MiB")
# A GPU row of the nvidia-smi table: "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |".
NVIDIA_SMI_GPU_ROW = re.compile(r"\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")


# ----------------------------------------------------------------------------------------------------
# Reading logs


@dataclass(frozen=True)
class StepLine:
    """One `step:N/T ...` line; `val_loss` is set on validation lines only."""

    step: int
    train_time_ms: int
    val_loss: float | None = None
    train_loss: float | None = None
    step_avg_ms: float | None = None
    other: dict[str, float] = field(default_factory=dict)  # further numeric fields, units dropped


@dataclass(frozen=True)
class TrainingLog:
    path: Path
    source_code: str
    environment: list[str]
    device: str
    settings: dict | None  # the "Settings:" JSON of our trainer; public record logs have none
    total_steps: int | None  # the T of step:N/T; None when the log has no step line yet
    steps: list[StepLine]
    peak_memory_allocated_mib: int | None
    peak_memory_reserved_mib: int | None

    @property
    def val_steps(self) -> list[StepLine]:
        return [line for line in self.steps if line.val_loss is not None]

    @property
    def final_val_loss(self) -> float | None:
        val_steps = self.val_steps
        return val_steps[-1].val_loss if val_steps else None

    @property
    def last_step(self) -> int | None:
        return self.steps[-1].step if self.steps else None

    @property
    def training_time_ms(self) -> int | None:
        return self.steps[-1].train_time_ms if self.steps else None

    @property
    def ms_per_step(self) -> float | None:
        return self.training_time_ms / self.last_step if self.last_step else None

    @property
    def is_complete(self) -> bool:
        """True when the run got to its final validation (a val_loss at step T)."""
        val_steps = self.val_steps
        return bool(val_steps) and val_steps[-1].step == self.total_steps


def read_log(path: str | Path) -> TrainingLog:
    """Parse a training log; raise ValueError naming the file and line for anything malformed."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":  # the text ends with a newline
        lines.pop()
    separators = [index for index, line in enumerate(lines) if line == SEPARATOR]
    if len(separators) < 2:
        raise ValueError(
            f"{path}:{max(len(lines), 1)}: log ends after {len(separators)} of the 2 separator lines "
            f"('=' * 100) that close the source code and the environment; is it truncated or not a log?"
        )
    # The last two separators delimit the environment, so a separator-like line inside the embedded
    # source code cannot confuse the reader.
    source_end, environment_end = separators[-2], separators[-1]
    environment = lines[source_end + 1 : environment_end]
    device, settings = _read_environment(path, environment, first_line_number=source_end + 2)

    steps: list[StepLine] = []
    total_steps = None
    peak_allocated = peak_reserved = None
    for line_number, line in enumerate(lines[environment_end + 1 :], start=environment_end + 2):
        text = line.strip()
        if not text:
            continue
        if memory := PEAK_MEMORY.fullmatch(text):
            peak_allocated, peak_reserved = int(memory[1]), int(memory[2])
            continue
        if memory := PEAK_MEMORY_OLD.fullmatch(text):
            peak_allocated, peak_reserved = int(memory[1]), None
            continue
        if not text.startswith("step:"):
            raise ValueError(
                f"{path}:{line_number}: not a step line: {_quote(text)}; after the second separator "
                f"a log holds only step lines, the peak memory line and blank lines"
            )
        try:
            step_line, line_total = _parse_step_line(text)
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        if total_steps is not None and line_total != total_steps:
            raise ValueError(
                f"{path}:{line_number}: total step count changed from {total_steps} to {line_total}: "
                f"{_quote(text)}; a log must hold one run"
            )
        # A validation line repeats the step of the training line before it, so equal steps are fine.
        if steps and step_line.step < steps[-1].step:
            raise ValueError(
                f"{path}:{line_number}: step {step_line.step} comes after step {steps[-1].step}; "
                f"steps must not decrease within one run"
            )
        total_steps = line_total
        steps.append(step_line)

    return TrainingLog(
        path=path,
        source_code="\n".join(lines[:source_end]),
        environment=environment,
        device=device,
        settings=settings,
        total_steps=total_steps,
        steps=steps,
        peak_memory_allocated_mib=peak_allocated,
        peak_memory_reserved_mib=peak_reserved,
    )


def _read_environment(path: Path, environment: list[str], first_line_number: int) -> tuple[str, dict | None]:
    device = None
    settings = None
    for line_number, line in enumerate(environment, start=first_line_number):
        if line.startswith("Device:"):
            device = line.removeprefix("Device:").strip()
        elif line.startswith("Settings:"):
            try:
                settings = json.loads(line.removeprefix("Settings:"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: Settings line is not valid JSON ({error})") from None
            if not isinstance(settings, dict):
                raise ValueError(f"{path}:{line_number}: Settings line must hold one JSON object")
    return device or _device_from_nvidia_smi(environment), settings


def _device_from_nvidia_smi(environment: list[str]) -> str:
    """The device counted from the GPU rows of an nvidia-smi table ("8 x NVIDIA H100 80GB HBM3"), or "unknown"."""
    counts: dict[str, int] = {}
    for line in environment:
        if row := NVIDIA_SMI_GPU_ROW.match(line):
            counts[row[1]] = counts.get(row[1], 0) + 1
    return ", ".join(f"{count} x {name}" for name, count in counts.items()) or "unknown"


def _parse_step_line(text: str) -> tuple[StepLine, int]:
    """Return the step line and its total step count T; raise ValueError saying what is malformed."""
    counter, *fields = text.split()
    match = STEP_COUNTER.fullmatch(counter)
    if not match:
        raise ValueError(f"malformed step line, expected 'step:N/T' first: {_quote(text)}")
    values: dict[str, str] = {}
    for item in fields:
        name, colon, value = item.partition(":")
        value = value.removesuffix("ms")
        if not (colon and FIELD_NAME.fullmatch(name) and NUMBER.fullmatch(value)):
            raise ValueError(f"malformed step line, field {item!r} is not name:number[ms]: {_quote(text)}")
        if name in values:
            raise ValueError(f"malformed step line, field {name!r} appears twice: {_quote(text)}")
        values[name] = value
    train_time = values.pop("train_time", None)
    if train_time is None or not train_time.isdigit():
        raise ValueError(f"malformed step line, needs train_time:<whole number>ms: {_quote(text)}")

    def pop_float(name: str) -> float | None:
        value = values.pop(name, None)
        return None if value is None else float(value)

    step_line = StepLine(
        step=int(match[1]),
        train_time_ms=int(train_time),
        val_loss=pop_float("val_loss"),
        train_loss=pop_float("train_loss"),
        step_avg_ms=pop_float("step_avg"),
        other={name: float(value) for name, value in values.items()},
    )
    return step_line, int(match[2])


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def expand_log_argument(argument: str) -> list[Path]:
    """The logs an argument names: a file, every `*.txt` in a folder, or the files a glob matches."""
    path = Path(argument)
    if path.is_file():
        return [path]
    if path.is_dir():
        logs = sorted(path.glob("*.txt"))
    else:
        logs = sorted(Path(match) for match in glob.glob(argument, recursive=True) if Path(match).is_file())
    if not logs:
        raise ValueError(f"{argument!r} names no log: give a log file, a folder of *.txt logs, or a quoted glob")
    return logs


def read_logs(arguments: list[str]) -> list[TrainingLog]:
    return [read_log(path) for argument in arguments for path in expand_log_argument(argument)]


def require_complete(log: TrainingLog) -> None:
    if not log.is_complete:
        progress = f"stops at step {log.last_step} of {log.total_steps}" if log.steps else "has no step lines"
        raise ValueError(
            f"{log.path}: incomplete run ({progress} without a final val_loss); "
            f"only finished runs count for results: leave this log out"
        )


# ----------------------------------------------------------------------------------------------------
# Statistics and curves


@dataclass(frozen=True)
class SignificanceResult:
    losses: tuple[float, ...]
    target: float
    t_statistic: float
    p_value: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        return float(np.std(self.losses, ddof=1))

    @property
    def passed(self) -> bool:
        return self.p_value < SIGNIFICANCE_LEVEL


def significance_test(losses: list[float], target: float) -> SignificanceResult:
    """One-sided one-sample t-test of H1 "mean final val loss < target", as the speedrun rules ask."""
    if len(losses) < 2:
        raise ValueError(f"a t-test needs the final losses of at least 2 runs, got {len(losses)}: add runs")
    if len(set(losses)) == 1:
        # scipy would report p = 0 (or 1) here, which says nothing about run-to-run noise.
        raise ValueError(
            f"all {len(losses)} losses equal {losses[0]}; the t-test needs run-to-run variation "
            f"(did the runs share a seed?)"
        )
    result = stats.ttest_1samp(losses, target, alternative="less")
    return SignificanceResult(
        tuple(float(loss) for loss in losses), target, float(result.statistic), float(result.pvalue)
    )


@dataclass(frozen=True)
class RunSet:
    """One or more logs of the same configuration, averaged into one validation curve."""

    label: str
    logs: tuple[TrainingLog, ...]
    val_steps: tuple[int, ...]
    val_losses: tuple[float, ...]
    val_times_ms: tuple[float, ...]


def build_run_set(label: str, logs: list[TrainingLog]) -> RunSet:
    """Average the val loss and training time of the logs at the val steps they all share."""
    curves = [{line.step: line for line in log.val_steps} for log in logs]
    shared_steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    if not shared_steps:
        raise ValueError(f"run {label!r}: its logs share no step with a val_loss; average only runs of one schedule")
    return RunSet(
        label=label,
        logs=tuple(logs),
        val_steps=tuple(shared_steps),
        val_losses=tuple(float(np.mean([curve[step].val_loss for curve in curves])) for step in shared_steps),
        val_times_ms=tuple(float(np.mean([curve[step].train_time_ms for curve in curves])) for step in shared_steps),
    )


def time_to_reach(times_ms: list[float], losses: list[float], target: float) -> float | None:
    """Training time (ms) at which the val curve first gets to `target`, interpolated linearly in time
    between the two val points around the crossing; None if it never does."""
    previous = None
    for time_ms, loss in zip(times_ms, losses):
        if loss <= target:
            if previous is None:
                return time_ms
            previous_time, previous_loss = previous
            fraction = (previous_loss - target) / (previous_loss - loss)
            return previous_time + fraction * (time_ms - previous_time)
        previous = (time_ms, loss)
    return None


def plot_runs(run_sets: list[RunSet]) -> Figure:
    """Two panels, val loss vs step and vs training time, one curve per run set."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    by_step, by_time = figure.subplots(1, 2)
    for run in run_sets:
        by_step.plot(run.val_steps, run.val_losses, marker=".", label=run.label)
        by_time.plot(np.array(run.val_times_ms) / 1000, run.val_losses, marker=".", label=run.label)
    for axes, x_label in ((by_step, "step"), (by_time, "training time (s)")):
        # Log scale keeps the final approach to the target readable next to the initial ~10.8.
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axes.set_xlabel(x_label)
        axes.set_ylabel("val loss")
        axes.grid(True, which="both", alpha=0.3)
    by_step.set_title("val loss vs step")
    by_time.set_title("val loss vs training time")
    by_step.legend()
    return figure


# ----------------------------------------------------------------------------------------------------
# Output formatting


def markdown_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table padded so it also reads well in a terminal; `align` holds 'l'/'r' per column."""
    cells = [[cell.replace("|", "\\|") for cell in row] for row in [headers, *rows]]
    widths = [max(3, *(len(row[column]) for row in cells)) for column in range(len(headers))]

    def format_row(row: list[str]) -> str:
        padded = [cell.rjust(width) if side == "r" else cell.ljust(width)
                  for cell, width, side in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (width - 1) + ":" if side == "r" else "-" * width for width, side in zip(widths, align)]
    return "\n".join([format_row(cells[0]), "| " + " | ".join(rule) + " |", *map(format_row, cells[1:])])


def format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def format_seconds(milliseconds: float | None) -> str:
    return "-" if milliseconds is None else f"{milliseconds / 1000:.2f} s"


def format_ms_per_step(ms_per_step: float | None) -> str:
    return "-" if ms_per_step is None else f"{ms_per_step:.2f} ms"


def format_peak_memory(log: TrainingLog) -> str:
    allocated, reserved = log.peak_memory_allocated_mib, log.peak_memory_reserved_mib
    if allocated is None:
        return "-"
    if reserved is None or reserved == allocated:
        return f"{allocated} MiB"
    return f"{allocated} MiB ({reserved} reserved)"


def format_devices(logs: Iterable[TrainingLog]) -> str:
    return ", ".join(dict.fromkeys(log.device for log in logs))


# ----------------------------------------------------------------------------------------------------
# Commands


def command_summary(args: argparse.Namespace) -> int:
    rows = []
    for log in read_logs(args.logs):
        steps = "-" if log.last_step is None else f"{log.last_step}/{log.total_steps}"
        final_loss = format_loss(log.final_val_loss)
        if log.val_steps and not log.is_complete:  # an unfinished run: say where its last val loss is from
            final_loss += f" (step {log.val_steps[-1].step})"
        rows.append([
            str(log.path), log.device, steps, final_loss,
            format_seconds(log.training_time_ms), format_ms_per_step(log.ms_per_step), format_peak_memory(log),
        ])
    headers = ["log", "device", "steps", "final val loss", "train time", "ms/step", "peak memory"]
    print(markdown_table(headers, rows, align="llrrrrr"))
    return 0


def command_significance(args: argparse.Namespace) -> int:
    if bool(args.logs) == (args.losses is not None):
        raise ValueError("give either log files or --losses, not both or neither")
    target = resolve_target(args)
    times_ms = None
    if args.losses is not None:
        losses = args.losses
    else:
        logs = read_logs(args.logs)
        for log in logs:
            require_complete(log)
        losses = [log.final_val_loss for log in logs]
        times_ms = [log.training_time_ms for log in logs]
    result = significance_test(losses, target)

    print(f"runs: {len(losses)}")
    listed = " ".join(f"{loss:.4f}" for loss in losses)
    print(f"final val loss: mean {result.mean:.5f}, std {result.std:.5f} ({listed})")
    if times_ms is not None:
        print(f"training time: mean {np.mean(times_ms) / 1000:.2f} s, std {np.std(times_ms, ddof=1) / 1000:.2f} s")
    print(f"one-sided t-test of mean < {target:g}: t = {result.t_statistic:.3f}, p = {result.p_value:.3g}")
    if result.passed:
        print(f"PASS: p = {result.p_value:.3g} < {SIGNIFICANCE_LEVEL}")
        return 0
    print(f"FAIL: p = {result.p_value:.3g} >= {SIGNIFICANCE_LEVEL}; "
          f"mean {result.mean:.5f} is not significantly below {target:g}")
    return 1


def command_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise ValueError("compare needs at least two runs (log files, folders or globs)")
    if args.diff and len(args.runs) != 2:
        raise ValueError(f"--diff compares the source code of exactly two runs, got {len(args.runs)}")
    run_sets = [build_run_set(label, read_logs([argument]))
                for label, argument in zip(run_labels(args.runs), args.runs)]
    labels = [run.label for run in run_sets]

    print("## Runs\n")
    rows = []
    for run in run_sets:
        final_step = run.val_steps[-1]
        rows.append([
            run.label, str(len(run.logs)), format_devices(run.logs), str(final_step),
            format_loss(run.val_losses[-1]), format_seconds(run.val_times_ms[-1]),
            format_ms_per_step(run.val_times_ms[-1] / final_step if final_step else None),
        ])
    headers = ["run", "logs", "device", "last val step", "val loss", "train time", "ms/step"]
    print(markdown_table(headers, rows, align="lrlrrrr"))

    print("\n## Val loss at common steps\n")
    common_steps = sorted(set.intersection(*(set(run.val_steps) for run in run_sets)))
    curves = [dict(zip(run.val_steps, run.val_losses)) for run in run_sets]
    rows = [[str(step), *(format_loss(curve[step]) for curve in curves)] for step in common_steps]
    if rows:
        print(markdown_table(["step", *labels], rows, align="r" * (len(labels) + 1)))
    else:
        print("(no val step shared by all runs)")

    print("\n## Time to reach val loss\n")
    rows = []
    for target in args.losses:
        times = [time_to_reach(run.val_times_ms, run.val_losses, target) for run in run_sets]
        rows.append([f"{target:g}", *("not reached" if time is None else format_seconds(time) for time in times)])
    print(markdown_table(["val loss", *labels], rows, align="r" * (len(labels) + 1)))

    if args.plot:
        plot_runs(run_sets).savefig(args.plot, dpi=120)
        print(f"\nplot written to {args.plot}")
    if args.diff:
        first, second = run_sets[0].logs[0], run_sets[1].logs[0]
        diff = difflib.unified_diff(
            first.source_code.split("\n"), second.source_code.split("\n"),
            fromfile=str(first.path), tofile=str(second.path), lineterm="",
        )
        print("\n## Source diff\n")
        print("\n".join(diff) or f"(source code of {first.path} and {second.path} is identical)")
    return 0


def run_labels(arguments: list[str]) -> list[str]:
    """Short labels (file stem, folder name or the glob itself); the arguments as given if those clash."""
    labels = []
    for argument in arguments:
        path = Path(argument)
        labels.append(path.stem if path.is_file() else path.name if path.is_dir() else argument)
    return labels if len(set(labels)) == len(labels) else list(arguments)


@dataclass(frozen=True)
class RecordFolder:
    path: Path
    date: str
    title: str
    logs: tuple[TrainingLog, ...]


def find_records(records_dir: Path) -> list[RecordFolder]:
    """Every `YYYY-MM-DD_ShortName/` folder under `records_dir`, oldest first; other entries are ignored."""
    records = []
    for folder in sorted(records_dir.iterdir()):
        name = RECORD_FOLDER_NAME.fullmatch(folder.name)
        if not (folder.is_dir() and name):
            continue
        try:
            datetime.date.fromisoformat(name[1])
        except ValueError:
            raise ValueError(
                f"{folder}: {name[1]!r} is not a valid date; name record folders YYYY-MM-DD_ShortName"
            ) from None
        logs = sorted(folder.glob("*.txt"))
        if not logs:
            raise ValueError(f"{folder}: no *.txt logs; a record folder holds the logs of its runs")
        records.append(RecordFolder(folder, name[1], record_title(folder / "README.md"), tuple(map(read_log, logs))))
    return records


def record_title(readme: Path) -> str:
    if not readme.is_file():
        raise ValueError(f"{readme}: missing; every record folder needs a README.md starting with a '# Title' line")
    for line in readme.read_text(encoding="utf-8").split("\n"):
        if line.startswith("# "):
            return line.removeprefix("# ").strip()
    raise ValueError(f"{readme}: no '# ' heading; start the README with '# <title of the record>'")


def records_table(records: list[RecordFolder], target: float, link_base: Path) -> str:
    """The markdown results table; folder links are relative to `link_base` (the README's folder)."""
    rows = []
    for record in records:
        for log in record.logs:
            require_complete(log)
        losses = [log.final_val_loss for log in record.logs]
        if len(losses) < 2:
            p_value = "- (1 run)"
        else:
            try:
                p_value = f"{significance_test(losses, target).p_value:.3g}"
            except ValueError as error:
                raise ValueError(f"{record.path}: {error}") from None
        link = Path(os.path.relpath(record.path.resolve(), link_base.resolve())).as_posix()
        rows.append([
            record.date, f"[{record.title}]({link}/)", str(len(losses)), f"{np.mean(losses):.4f}", p_value,
            format_seconds(float(np.mean([log.training_time_ms for log in record.logs]))), format_devices(record.logs),
        ])
    headers = ["date", "record", "runs", "mean val loss", f"p (mean < {target:g})", "mean train time", "device"]
    return markdown_table(headers, rows, align="llrrrrl")


def replace_table(text: str, table: str, readme: Path) -> str:
    """`text` with everything between the records-table markers replaced by `table`."""
    for marker in (TABLE_BEGIN, TABLE_END):
        if text.count(marker) != 1:
            raise ValueError(
                f"{readme}: needs exactly one {marker!r} line, found {text.count(marker)}; "
                f"put {TABLE_BEGIN!r} and {TABLE_END!r} around the place for the records table"
            )
    begin, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    if end < begin:
        raise ValueError(f"{readme}: {TABLE_END!r} comes before {TABLE_BEGIN!r}; swap them")
    return text[:begin] + "\n" + table + "\n" + text[end:]


def command_table(args: argparse.Namespace) -> int:
    records = find_records(args.records_dir)
    table = records_table(records, resolve_target(args), link_base=args.readme.parent)
    text = args.readme.read_text(encoding="utf-8")
    updated = replace_table(text, table, args.readme)
    if args.check:
        if updated != text:
            print(f"{args.readme}: records table is out of date; run `python records/tool.py table` and commit")
            return 1
        print(f"{args.readme}: records table is up to date ({len(records)} records)")
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"{args.readme}: records table updated ({len(records)} records)")
    else:
        print(f"{args.readme}: records table already up to date ({len(records)} records)")
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line


def resolve_target(args: argparse.Namespace) -> float:
    return args.target if args.target is not None else TRACK_TARGETS[args.track]


def add_target_options(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--track", choices=TRACK_TARGETS, default="small",
                        help="speedrun track whose target loss to test against: small 3.28 (default), medium 2.92")
    choice.add_argument("--target", type=float, help="test against this val loss instead of a track's target")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python records/tool.py",
        description="Summarise, test and compare speedrun training logs; maintain the README records table.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    log_help = "log file, folder of *.txt logs, or quoted glob"

    summary = commands.add_parser("summary", help="final val loss, time, steps, ms/step, memory, device per log")
    summary.add_argument("logs", nargs="+", metavar="LOG", help=log_help)
    summary.set_defaults(run=command_summary)

    significance = commands.add_parser(
        "significance", help="t-test that the mean final val loss is below the target (exit 0 PASS, 1 FAIL)")
    significance.add_argument("logs", nargs="*", metavar="LOG", help=log_help)
    significance.add_argument("--losses", nargs="+", type=float, metavar="LOSS",
                              help="final val losses to test instead of reading logs")
    add_target_options(significance)
    significance.set_defaults(run=command_significance)

    compare = commands.add_parser("compare", help="val curves, time to reach losses, plot and source diff of runs")
    compare.add_argument("runs", nargs="+", metavar="RUN", help=f"{log_help}; the logs of one RUN are averaged")
    compare.add_argument("--losses", nargs="+", type=float, default=[TRACK_TARGETS["small"]], metavar="LOSS",
                         help="val losses to report the time to reach (default: 3.28)")
    compare.add_argument("--plot", metavar="PNG", help="write val loss vs step and vs training time to this PNG")
    compare.add_argument("--diff", action="store_true", help="unified diff of the embedded source of the two runs")
    compare.set_defaults(run=command_compare)

    table = commands.add_parser("table", help="rewrite the records table between the markers of the README")
    table.add_argument("--readme", type=Path, default=DEFAULT_README, help="README to update (default: top-level)")
    table.add_argument("--records-dir", type=Path, default=RECORDS_DIR, help="folder of YYYY-MM-DD_ShortName records")
    table.add_argument("--check", action="store_true", help="change nothing; exit 1 if the table is out of date")
    add_target_options(table)
    table.set_defaults(run=command_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
