"""Read speedrun training logs and turn them into summaries, significance tests, comparisons and the
records table of the top-level README.

    python records/tool.py summary LOG... [--notes]
    python records/tool.py significance LOG... | --losses 3.279 3.281 ... [--track small|medium|optimization]
    python records/tool.py compare RUN... [--losses 4.0 3.5 3.28] [--plot out.png] [--diff]
    python records/tool.py table [--check]

LOG and RUN arguments are log files, folders of `*.txt` logs, or (quoted) glob patterns such as
'records/**/*.txt'; in `compare` each RUN argument is one run set whose logs are averaged. The reader
accepts the logs of train_gpt.py and of the public speedrun record scripts from 2024 on (see
records/README.md). An unreadable log is reported as `error: FILE:LINE: reason` and the others are still
used; the exit status is then 2.
"""

import argparse
import datetime
import difflib
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# scipy.stats and matplotlib are imported where they are used: together they take 2-3 s to import,
# longer than `summary` needs to read a hundred logs.

SEPARATOR = "=" * 100
# Logs written since the recipe/harness split embed two files: the recipe, then this banner line and
# harness.py (harness.source_banner writes it: `==== harness.py ====...`, 100 characters).
SOURCE_BANNER = re.compile(r"==== (\S+) (=+)")
TABLE_BEGIN = "<!-- records-table:begin -->"
TABLE_END = "<!-- records-table:end -->"
RECORDS_DIR = Path(__file__).resolve().parent
DEFAULT_README = RECORDS_DIR.parent / "README.md"
sys.path.insert(0, str(RECORDS_DIR.parent))  # harness.py, for `python records/tool.py`
RECORD_FOLDER_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][A-Za-z0-9._-]*")
PROGRESS_BAR_MIN_FILES = 36  # more logs than this get a progress bar on stderr
NOTES_KEPT = 100  # notes kept per log for `summary --notes`; all of them are counted
PLOT_DPI = 120
# The zoomed panel of `compare --plot` spans the target from this far below to this far above.
ZOOM_BELOW, ZOOM_ABOVE = 0.05, 0.3


@dataclass(frozen=True)
class Track:
    target: float
    test: str  # "t": one-sided one-sample t-test; "z": one-sided z-test with a fixed sigma
    level: float  # the verdict is PASS when p < level


TRACKS = {
    "small": Track(3.28, "t", 0.01),
    "medium": Track(2.92, "t", 0.01),
    # The optimization track counts steps to 3.28; its rule is a z-test with a fixed run-to-run sigma.
    "optimization": Track(3.28, "z", 0.001),
}
OPTIMIZATION_SIGMA = 0.0013

STEP_COUNTER = re.compile(r"step:(\d+)/(\d+)")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A field value: a number (nan/inf included, as in `step_avg:nanms`) with an optional ms or s unit.
FIELD_VALUE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))(ms|s)?")
PEAK_MEMORY = re.compile(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
# Early public records wrote a single figure (max allocated) in this form.
PEAK_MEMORY_OLD = re.compile(r"peak memory consumption: (\d+) MiB")
# A GPU row of the nvidia-smi table: "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |".
NVIDIA_SMI_GPU_ROW = re.compile(r"\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")
# The optimization track's harness names the device in one line instead of an nvidia-smi table.
DEVICE_NAME_LINE = re.compile(r"Running on device_name=(.+?) with world_size=(\d+)")
UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


# ----------------------------------------------------------------------------------------------------
# Reading logs


class LogError(ValueError):
    """A log that cannot be read; the message is 'FILE:LINE: reason'."""


@dataclass(slots=True)  # not frozen: a frozen dataclass takes several times longer to build, per step line
class StepLine:
    """One `step:N/T ...` line; `val_loss` is set on validation lines only."""

    step: int
    train_time_ms: float  # whole milliseconds in the `ms` format; seconds with decimals in the `s` format
    val_loss: float | None = None
    train_loss: float | None = None
    step_avg_ms: float | None = None
    other: dict[str, float] = field(default_factory=dict)  # further numeric fields, units dropped


@dataclass(frozen=True, slots=True)
class Note:
    """A line the reader kept but did not use: a status line, a parameter dump, a printed tensor..."""

    line_number: int
    text: str


@dataclass(frozen=True)
class TrainingLog:
    path: Path
    source_code: str | None  # the embedded script; None when read without keep_source
    environment: list[str]  # the lines between the separators after the source, separators left out
    device: str
    settings: dict | None  # the "Settings:" JSON of our trainer; public record logs have none
    total_steps: int | None  # the T of step:N/T; None when the log has no step line yet
    steps: list[StepLine]  # every step line, or without keep_steps only the val lines and the last line
    peak_memory_allocated_mib: int | None
    peak_memory_reserved_mib: int | None
    note_count: int = 0
    notes: tuple[Note, ...] = ()  # the first NOTES_KEPT notes

    @property
    def sources(self) -> dict[str, str]:
        """The embedded files by name: the script first (as train_gpt.py), then each file that a banner
        line opens. Empty when read without keep_source."""
        if self.source_code is None:
            return {}
        files, name, lines = {}, "train_gpt.py", []
        for line in self.source_code.split("\n"):
            banner = SOURCE_BANNER.fullmatch(line)
            if banner and len(line) == len(SEPARATOR):
                files[name], name, lines = "\n".join(lines), banner[1], []
            else:
                lines.append(line)
        files[name] = "\n".join(lines)
        return files

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
    def training_time_ms(self) -> float | None:
        return self.steps[-1].train_time_ms if self.steps else None

    @property
    def ms_per_step(self) -> float | None:
        return self.training_time_ms / self.last_step if self.last_step else None

    @property
    def is_complete(self) -> bool:
        """True when the run got to its final validation (a val_loss at step T)."""
        val_steps = self.val_steps
        return bool(val_steps) and val_steps[-1].step == self.total_steps

    @property
    def status(self) -> str:
        """'complete', or 'incomplete (last step N/T)' for a run that stopped before its final validation."""
        if self.is_complete:
            return "complete"
        if not self.steps:
            return "incomplete (no step line)"
        return f"incomplete (last step {self.last_step}/{self.total_steps})"


def read_log(path: str | Path, keep_source: bool = True, keep_steps: bool = True) -> TrainingLog:
    """Parse a training log; raise LogError ('FILE:LINE: reason') when it cannot be read.

    The source code is the text before the first separator line that is followed by the
    "Running ..." version line (or, without one, before the first separator; a separator on the
    first line, as the October 2024 logs have, is skipped); the environment is
    every block between that separator and the last separator before the first step line (two to
    four separators in the known layouts). After it, step lines and the peak memory line are read and
    every other non-blank line is kept as a note."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise LogError(f"{path}:1: empty file; not a log")
    nul = data.find(b"\0")
    if nul >= 0:
        line_number = data.count(b"\n", 0, nul) + 1
        raise LogError(f"{path}:{line_number}: binary data (NUL byte at byte offset {nul}); not a text log")
    try:
        text, clean = data.decode("utf-8"), True
    except UnicodeDecodeError:
        # Keep the stray bytes as surrogates to place them; only the embedded source may hold them.
        text, clean = data.decode("utf-8", errors="surrogateescape"), False
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    notes: list[Note] = []
    if lines[-1] == "":  # the text ends with a newline
        lines.pop()
    else:  # a log cut while being written: its last line may end inside a number
        cut = lines.pop()
        notes.append(Note(len(lines) + 1, f"last line has no newline (the log was cut), ignored: {_quote(cut)}"))

    # The first public logs (October 2024) open with a separator line before the source as well.
    source_start = 1 if lines and lines[0] == SEPARATOR else 0
    separators = [index for index, line in enumerate(lines) if line == SEPARATOR and index >= source_start]
    source_end = next((index for index in separators
                       if index + 1 < len(lines) and lines[index + 1].startswith("Running ")),
                      separators[0] if separators else None)
    first_step = next((index for index in range(source_end + 1, len(lines))
                       if lines[index].lstrip().startswith("step:")), len(lines)) if source_end is not None else 0
    header_separators = [index for index in separators if source_end is not None and source_end <= index < first_step]
    if len(header_separators) < 2:
        raise LogError(
            f"{path}:{max(len(lines), 1)}: log has {len(header_separators)} of the at least 2 separator lines "
            f"('=' * 100) that close the source code and the environment; is it truncated or not a log?"
        )
    body_start = header_separators[-1] + 1
    if not clean:
        _check_undecodable_bytes(path, data, lines, source_end, notes)

    environment = [line for line in lines[source_end + 1 : body_start - 1] if line != SEPARATOR]
    device, settings = _read_environment(path, lines, source_end + 1, body_start - 1)
    body = _read_body(path, lines, body_start, keep_steps, notes)
    return TrainingLog(
        path=path,
        source_code="\n".join(lines[source_start:source_end]) if keep_source else None,
        environment=environment,
        device=device,
        settings=settings,
        total_steps=body.total_steps,
        steps=body.steps,
        peak_memory_allocated_mib=body.peak_allocated,
        peak_memory_reserved_mib=body.peak_reserved,
        note_count=len(notes) + body.dropped_notes,
        notes=tuple(notes[:NOTES_KEPT]),
    )


def _check_undecodable_bytes(path: Path, data: bytes, lines: list[str], source_end: int, notes: list[Note]) -> None:
    """Replace stray non-UTF-8 bytes in the embedded source (with a note); anywhere else they are an error."""
    for index, line in enumerate(lines):
        bad = UNDECODABLE.search(line)
        if bad:
            if index >= source_end:
                line_start = sum(len(raw) + 1 for raw in data.split(b"\n", index)[:index])
                offset = line_start + len(line[: bad.start()].encode("utf-8", errors="surrogateescape"))
                raise LogError(f"{path}:{index + 1}: not UTF-8 text (byte 0x{ord(bad[0]) - 0xDC00:02x} at byte "
                               f"offset {offset}); a log is UTF-8 after its embedded source")
            count = len(UNDECODABLE.findall(line))
            notes.append(Note(index + 1, f"{count} non-UTF-8 byte(s) in the embedded source, decoded as U+FFFD"))
            lines[index] = UNDECODABLE.sub("\ufffd", line)
    notes.sort(key=lambda note: note.line_number)


def _read_environment(path: Path, lines: list[str], begin: int, end: int) -> tuple[str, dict | None]:
    device = settings = None
    gpu_counts: dict[str, int] = {}
    for index in range(begin, end):
        line = lines[index]
        if line.startswith("Device:"):
            device = line.removeprefix("Device:").strip()
        elif line.startswith("Settings:"):
            try:
                settings = json.loads(line.removeprefix("Settings:"))
            except json.JSONDecodeError as error:
                raise LogError(f"{path}:{index + 1}: Settings line is not valid JSON ({error})") from None
            if not isinstance(settings, dict):
                raise LogError(f"{path}:{index + 1}: Settings line must hold one JSON object")
        elif named := DEVICE_NAME_LINE.match(line):
            device = device or f"{named[2]} x {named[1]}"
        elif row := NVIDIA_SMI_GPU_ROW.match(line):
            gpu_counts[row[1]] = gpu_counts.get(row[1], 0) + 1
    counted = ", ".join(f"{count} x {name}" for name, count in gpu_counts.items())
    return device or counted or "unknown", settings


@dataclass
class _Body:
    steps: list[StepLine]
    total_steps: int | None
    peak_allocated: int | None
    peak_reserved: int | None
    dropped_notes: int  # notes counted but not kept


def _read_body(path: Path, lines: list[str], body_start: int, keep_steps: bool, notes: list[Note]) -> _Body:
    kept: list[StepLine] = []  # every step line, or only the val lines when not keep_steps
    last: StepLine | None = None
    total_steps = peak_allocated = peak_reserved = None
    dropped_notes = 0
    resume_marker = None  # the note line of a "resumed ..." marker since the previous step line
    ignored_fields, first_ignored = 0, None
    for index in range(body_start, len(lines)):
        text = lines[index].strip()
        if not text:
            continue
        line_number = index + 1
        if text.startswith("step:"):
            try:
                step_line, line_total, unreadable = _parse_step_line(text)
            except ValueError as error:
                raise LogError(f"{path}:{line_number}: {error}") from None
            if unreadable:
                ignored_fields += unreadable
                first_ignored = first_ignored or (line_number, text)
            if total_steps is not None and line_total != total_steps:
                raise LogError(
                    f"{path}:{line_number}: total step count changed from {total_steps} to {line_total}: "
                    f"{_quote(text)}; a log must hold one run"
                )
            # A validation line repeats the step of the training line before it, so equal steps are fine.
            if last is not None and step_line.step < last.step:
                if resume_marker is None:
                    raise LogError(
                        f"{path}:{line_number}: step {step_line.step} comes after step {last.step}; "
                        f"steps must not decrease within one run"
                    )
                # A resumed run repeats the steps after its checkpoint: the later lines replace them (a
                # repeated val line replaces only the val line of its step).
                repeated_val = step_line.val_loss is not None
                kept_before = len(kept)
                kept = [line for line in kept if line.step < step_line.step
                        or (line.step == step_line.step and repeated_val and line.val_loss is None)]
                replaced = kept_before - len(kept)
                notes.append(Note(line_number, f"resumed at step {step_line.step} after step {last.step} "
                                               f"(marker on line {resume_marker}); {replaced} kept step line(s) "
                                               f"of the interrupted attempt replaced"))
            resume_marker = None
            total_steps, last = line_total, step_line
            if keep_steps or step_line.val_loss is not None:
                kept.append(step_line)
        elif memory := PEAK_MEMORY.fullmatch(text):
            peak_allocated, peak_reserved = int(memory[1]), int(memory[2])
        elif memory := PEAK_MEMORY_OLD.fullmatch(text):
            peak_allocated, peak_reserved = int(memory[1]), None
        else:
            if "resum" in text.lower():
                resume_marker = line_number
            if len(notes) < NOTES_KEPT:
                notes.append(Note(line_number, _quote(text)))
            else:
                dropped_notes += 1
    if ignored_fields:
        notes.append(Note(first_ignored[0], f"{ignored_fields} step-line field(s) that are not name:number were "
                                            f"ignored, the first in {_quote(first_ignored[1])}"))
    notes.sort(key=lambda note: note.line_number)
    if last is not None and (not kept or kept[-1] is not last):
        kept.append(last)  # the last line gives the training time even when train lines are not kept
    return _Body(kept, total_steps, peak_allocated, peak_reserved, dropped_notes)


KNOWN_FIELDS = ("val_loss", "train_loss", "train_time", "step_avg")
# The step lines of nearly every log, matched in one go (a third of the time of the general parser).
COMMON_STEP_LINE = re.compile(r"step:(\d+)/(\d+)(?: val_loss:(\d+\.\d+))?(?: train_loss:(\d+\.\d+))?"
                              r" train_time:(\d+)ms step_avg:(\d+\.\d+|nan)ms")


def _parse_step_line(text: str) -> tuple[StepLine, int, int]:
    """Return the step line, its total step count T and the number of fields it ignored (fields that
    are not name:number and are none of val_loss/train_loss/train_time/step_avg); raise ValueError
    saying what is malformed when a figure the tool uses cannot be read."""
    if common := COMMON_STEP_LINE.fullmatch(text):
        step, total, val_loss, train_loss, train_time, step_avg = common.groups()
        return StepLine(int(step), int(train_time), val_loss and float(val_loss), train_loss and float(train_loss),
                        float(step_avg)), int(total), 0
    counter, *fields = text.split()
    match = STEP_COUNTER.fullmatch(counter)
    if not match:
        raise ValueError(f"malformed step line, expected 'step:N/T' first: {_quote(text)}")
    values: dict[str, tuple[str, str | None]] = {}
    ignored = 0
    for item in fields:
        name, colon, raw_value = item.partition(":")
        value = FIELD_VALUE.fullmatch(raw_value)
        if not (colon and FIELD_NAME.fullmatch(name) and value):
            if name in KNOWN_FIELDS:
                raise ValueError(f"malformed step line, field {item!r} is not name:number[ms]: {_quote(text)}")
            ignored += 1
            continue
        if name in values:
            raise ValueError(f"malformed step line, field {name!r} appears twice: {_quote(text)}")
        values[name] = (value[1], value[2])
    if "train_time" not in values:
        raise ValueError(f"malformed step line, needs train_time:<whole number>ms or <seconds>s: {_quote(text)}")
    number, unit = values.pop("train_time")
    if unit == "s":
        train_time_ms = float(number) * 1000
    elif number.isdigit():
        train_time_ms = int(number)
    else:
        raise ValueError(f"malformed step line, train_time must be a whole number of ms (or seconds with an "
                         f"s): {_quote(text)}")

    def pop_float(name: str) -> float | None:
        value = values.pop(name, None)
        return None if value is None else float(value[0])

    step_line = StepLine(
        step=int(match[1]),
        train_time_ms=train_time_ms,
        val_loss=pop_float("val_loss"),
        train_loss=pop_float("train_loss"),
        step_avg_ms=pop_float("step_avg"),
        other={name: float(number) for name, (number, _) in values.items()},
    )
    return step_line, int(match[2]), ignored


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def expand_log_argument(argument: str) -> list[Path]:
    """The logs an argument names: a file, every `*.txt` in a folder, or the files a glob matches."""
    path = Path(argument)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.txt"))
    return sorted(Path(match) for match in glob.glob(argument, recursive=True) if Path(match).is_file())


class ErrorReport:
    """Prints each problem as one `error: ...` line on stderr (above a progress bar) and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str) -> None:
        self.count += 1
        tqdm.write(f"error: {message}", file=sys.stderr)

    def exit_status(self, status: int) -> int:
        """`status`, or 2 when any problem was reported."""
        return 2 if self.count else status


def iter_logs(arguments: list[str], report: ErrorReport, keep_source: bool = False,
              keep_steps: bool = False) -> Iterator[TrainingLog]:
    """Read the logs the arguments name one at a time, reporting each unreadable one and going on."""
    paths: list[Path] = []
    for argument in arguments:
        found = expand_log_argument(argument)
        if not found:
            report(f"{argument!r} names no log: give a log file, a folder of *.txt logs, or a quoted glob")
        paths += found
    for path in tqdm(paths, desc="reading logs", unit="log", file=sys.stderr,
                     disable=len(paths) <= PROGRESS_BAR_MIN_FILES):
        try:
            yield read_log(path, keep_source=keep_source, keep_steps=keep_steps)
        except LogError as error:
            report(str(error))
        except OSError as error:
            report(f"{path}:1: cannot be read ({error.strerror})")


# ----------------------------------------------------------------------------------------------------
# Statistics and curves


@dataclass(frozen=True)
class SignificanceResult:
    losses: tuple[float, ...]
    target: float
    test: str  # "t" or "z"
    statistic: float  # t, or z = (target - mean) * sqrt(n) / sigma
    p_value: float
    level: float
    sigma: float | None = None  # the fixed sigma of a z-test

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        return float(np.std(self.losses, ddof=1)) if len(self.losses) > 1 else math.nan

    @property
    def passed(self) -> bool:
        return self.p_value < self.level


def significance_test(losses: list[float], target: float, test: str = "t", level: float | None = None,
                      sigma: float = OPTIMIZATION_SIGMA) -> SignificanceResult:
    """One-sided test of H1 "mean final val loss < target".

    "t": the one-sample t-test the speedrun rules ask for (scipy.stats.ttest_1samp, alternative="less").
    "z": the optimization track's z-test with a fixed run-to-run `sigma`: z = (target - mean) * sqrt(n) / sigma,
    p = P(N(0,1) > z). `level` defaults to 0.01 for t and 0.001 for z."""
    from scipy import stats

    if level is None:
        level = TRACKS["small"].level if test == "t" else TRACKS["optimization"].level
    losses = [float(loss) for loss in losses]
    if test == "z":
        if not losses:
            raise ValueError("a z-test needs the final loss of at least 1 run")
        if not sigma > 0:
            raise ValueError(f"the z-test sigma must be positive, got {sigma}")
        z = (target - float(np.mean(losses))) * math.sqrt(len(losses)) / sigma
        return SignificanceResult(tuple(losses), target, "z", z, float(stats.norm.sf(z)), level, sigma)
    if test != "t":
        raise ValueError(f"unknown test {test!r}; use 't' or 'z'")
    if len(losses) < 2:
        raise ValueError(f"a t-test needs the final losses of at least 2 runs, got {len(losses)}: add runs")
    if len(set(losses)) == 1:
        # scipy would report p = 0 (or 1) here, which says nothing about run-to-run noise.
        raise ValueError(
            f"all {len(losses)} losses equal {losses[0]}; the t-test needs run-to-run variation "
            f"(did the runs share a seed?)"
        )
    result = stats.ttest_1samp(losses, target, alternative="less")
    return SignificanceResult(tuple(losses), target, "t", float(result.statistic), float(result.pvalue), level)


@dataclass(frozen=True)
class RunSet:
    """One or more logs of the same configuration, averaged into one validation curve and, where every
    log has train_loss on its step lines (and was read with its steps kept), one training curve."""

    label: str
    logs: tuple[TrainingLog, ...]
    val_steps: tuple[int, ...]
    val_losses: tuple[float, ...]
    val_times_ms: tuple[float, ...]
    train_steps: tuple[int, ...]
    train_losses: tuple[float, ...]
    train_times_ms: tuple[float, ...]

    @property
    def incomplete(self) -> list[TrainingLog]:
        return [log for log in self.logs if not log.is_complete]

    @property
    def status(self) -> str:
        incomplete = self.incomplete
        if not incomplete:
            return "complete"
        if len(self.logs) == 1:
            return incomplete[0].status
        return f"{len(incomplete)} of {len(self.logs)} logs {incomplete[0].status.split(' ')[0]}"


def build_run_set(label: str, logs: list[TrainingLog]) -> RunSet:
    """Average the val loss and training time of the logs at the val steps they all share, and the train
    loss and time at the train steps they all share."""
    for log in logs:
        if not log.val_steps:
            raise ValueError(f"{log.path}: no val_loss line (the run stopped before its first validation); "
                             f"a run needs at least one to be compared")
    val_steps, val_losses, val_times_ms = _average_curves(
        [{line.step: line for line in log.val_steps} for log in logs], "val_loss")
    if not val_steps:
        raise ValueError(f"run {label!r}: its logs share no step with a val_loss; average only runs of one schedule")
    train_steps, train_losses, train_times_ms = _average_curves(
        [{line.step: line for line in log.steps if line.train_loss is not None} for log in logs], "train_loss")
    return RunSet(label, tuple(logs), val_steps, val_losses, val_times_ms, train_steps, train_losses, train_times_ms)


def _average_curves(curves: list[dict[int, StepLine]], loss_field: str) -> tuple[tuple, tuple, tuple]:
    """Steps all curves share, with the mean of `loss_field` and of the training time at each."""
    shared_steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    losses = tuple(float(np.mean([getattr(curve[step], loss_field) for curve in curves])) for step in shared_steps)
    times_ms = tuple(float(np.mean([curve[step].train_time_ms for curve in curves])) for step in shared_steps)
    return tuple(shared_steps), losses, times_ms


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


def plot_runs(run_sets: list[RunSet], target: float = TRACKS["small"].target) -> "Figure":
    """Val loss vs step and vs training time (log scale, whole run), each run's train loss as a thin,
    lighter line of its colour where its logs have one, and below them a zoomed panel of val loss vs
    time from target - 0.05 to target + 0.3 with the target dashed and each run's crossing time marked.
    The zoom is left out when no run's val loss gets within 0.3 of the target (it would be empty); the
    figure's title then says so and the legend gives each run's final val loss. An incomplete run is
    dashed and ends in an x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MultipleLocator

    zoom_top = target + ZOOM_ABOVE
    with_zoom = any(loss <= zoom_top for run in run_sets for loss in run.val_losses)
    if with_zoom:
        figure = Figure(figsize=(13, 11), dpi=PLOT_DPI, layout="constrained")
        panels = figure.subplot_mosaic([["step", "time"], ["zoom", "zoom"]], height_ratios=[1, 1.5])
    else:
        figure = Figure(figsize=(13, 5.5), dpi=PLOT_DPI, layout="constrained")
        panels = figure.subplot_mosaic([["step", "time"]])
        lowest = min((loss for run in run_sets for loss in run.val_losses if not math.isnan(loss)), default=math.nan)
        figure.suptitle(f"no zoom on the target {target:g}: no run's val loss came within {ZOOM_ABOVE:g} of it "
                        f"(lowest {lowest:.4f})")
    FigureCanvasAgg(figure)
    by_step, by_time, zoom = panels["step"], panels["time"], panels.get("zoom")
    for index, run in enumerate(run_sets):
        times_s = np.array(run.val_times_ms) / 1000
        complete = not run.incomplete
        style = dict(marker=".", linestyle="-" if complete else "--")
        label = run.label if complete else f"{run.label}, {run.status}"
        # Without the zoom and its legend, the final val loss goes in the legend of the step panel.
        step_label = label if with_zoom else f"{label}: final {run.val_losses[-1]:.4f}"
        color = by_step.plot(run.val_steps, run.val_losses, label=step_label, **style)[0].get_color()
        by_time.plot(times_s, run.val_losses, label=label, color=color, **style)
        if run.train_losses:
            # Behind the val line and faint: train loss is noisy and only the val loss counts for a record.
            train_style = dict(color=color, linewidth=0.8, alpha=0.45, zorder=1.5, gid="train-loss")
            by_step.plot(run.train_steps, run.train_losses, label=f"{run.label} train loss", **train_style)
            by_time.plot(np.array(run.train_times_ms) / 1000, run.train_losses, **train_style)
        ends = [(by_step, run.val_steps[-1]), (by_time, times_s[-1])]
        if zoom is not None:
            crossing = time_to_reach(list(run.val_times_ms), list(run.val_losses), target)
            reached = "not reached" if crossing is None else f"reached at {crossing / 1000:.2f} s"
            # The zoom's legend carries the figures, so curves ending a few pixels apart stay legible.
            zoom.plot(times_s, run.val_losses, color=color, label=f"{label}: final {run.val_losses[-1]:.4f}, "
                                                                    f"{target:g} {reached}", **style)
            ends.append((zoom, times_s[-1]))
            if crossing is not None:
                zoom.axvline(crossing / 1000, color=color, linestyle=":", linewidth=1)
                zoom.plot([crossing / 1000], [target], marker="o", markersize=7, color=color, gid="crossing")
                zoom.annotate(f"{crossing / 1000:.2f} s", (crossing / 1000, target), xytext=(4, -14 - 12 * index),
                              textcoords="offset points", color=color, fontsize=9)
        if not complete:
            for axes, x in ends:
                axes.plot([x], [run.val_losses[-1]], marker="x", markersize=10, color=color, gid="incomplete-end")
    curves = "val loss (train loss thin)" if any(run.train_losses for run in run_sets) else "val loss"
    for axes, x_label in ((by_step, "step"), (by_time, "training time (s)")):
        # Log scale keeps the final approach to the target readable next to the initial ~10.8.
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axes.axhline(target, color="black", linestyle="--", linewidth=1)
        axes.set_xlabel(x_label)
        axes.set_ylabel("loss")
        axes.grid(True, which="both", alpha=0.3)
    by_step.set_title(f"{curves} vs step")
    by_time.set_title(f"{curves} vs training time")
    by_step.legend()
    if zoom is None:
        return figure

    zoom.axhline(target, color="black", linestyle="--", linewidth=1.2, label=f"target {target:g}", gid="target")
    zoom.set_ylim(target - ZOOM_BELOW, zoom_top)
    zoom.set_xlim(*_zoom_time_range(run_sets, zoom_top))
    zoom.yaxis.set_major_locator(MultipleLocator(0.05))
    zoom.yaxis.set_minor_locator(MultipleLocator(0.01))
    zoom.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    zoom.grid(True, which="major", alpha=0.4)
    zoom.grid(True, which="minor", alpha=0.15)
    zoom.set_xlabel("training time (s)")
    zoom.set_ylabel("val loss")
    zoom.set_title(f"near the target: val loss {target - ZOOM_BELOW:g} to {zoom_top:g}, "
                   f"dotted lines and dots where each run reaches {target:g}")
    zoom.legend(loc="upper right")
    return figure


def _zoom_time_range(run_sets: list[RunSet], top: float) -> tuple[float, float]:
    """Seconds from when the first run comes below `top` to the end of the longest run, padded a little."""
    entries = [time_to_reach(list(run.val_times_ms), list(run.val_losses), top) for run in run_sets]
    start = min(entry for entry in entries if entry is not None) / 1000  # plot_runs zooms only then
    end = max(run.val_times_ms[-1] for run in run_sets) / 1000
    pad = 0.04 * max(end - start, 1e-9)
    return start - pad, end + pad


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
    report = ErrorReport()
    rows, noted = [], []
    for log in iter_logs(args.logs, report):
        steps = "-" if log.last_step is None else f"{log.last_step}/{log.total_steps}"
        if log.is_complete:
            final_loss = format_loss(log.final_val_loss)
        else:  # an unfinished run: say so, and where its last val loss is from
            final_loss = log.status
            if log.val_steps:
                final_loss += f"; val {format_loss(log.final_val_loss)} at step {log.val_steps[-1].step}"
        rows.append([
            str(log.path), log.device, steps, final_loss, format_seconds(log.training_time_ms),
            format_ms_per_step(log.ms_per_step), format_peak_memory(log), str(log.note_count),
        ])
        if args.notes and log.note_count:
            noted.append((log.path, log.note_count, log.notes))
    headers = ["log", "device", "steps", "final val loss", "train time", "ms/step", "peak memory", "notes"]
    print(markdown_table(headers, rows, align="llrrrrrr") if rows else "(no readable log)")
    for path, count, notes in noted:
        print(f"\n## Notes of {path} ({count})\n")
        for note in notes:
            print(f"{path}:{note.line_number}: {note.text}")
        if count > len(notes):
            print(f"... and {count - len(notes)} more")
    if report.count:
        print(f"\n{len(rows)} log(s) read, {report.count} problem(s) reported on stderr", file=sys.stderr)
    return report.exit_status(0)


def command_significance(args: argparse.Namespace) -> int:
    if bool(args.logs) == (args.losses is not None):
        raise ValueError("give either log files or --losses, not both or neither")
    track = TRACKS[args.track]
    target = args.target if args.target is not None else track.target
    test = args.test or track.test
    level = args.level if args.level is not None else (track.level if test == track.test else None)
    report = ErrorReport()
    times_ms = steps = None
    if args.losses is not None:
        losses = args.losses
    else:
        losses, times_ms, steps = [], [], []
        for log in iter_logs(args.logs, report):
            if not log.is_complete:
                print(f"not counted: {log.path}: the run stopped at step {log.last_step} of {log.total_steps} "
                      f"before its final validation" if log.steps else
                      f"not counted: {log.path}: the log has no step line")
                continue
            if not math.isfinite(log.final_val_loss):
                print(f"not counted: {log.path}: the final val loss is {log.final_val_loss} (the run diverged)")
                continue
            losses.append(log.final_val_loss)
            times_ms.append(log.training_time_ms)
            steps.append(log.last_step)
    result = significance_test(losses, target, test=test, level=level, sigma=args.sigma)

    print(f"runs: {len(losses)}")
    listed = " ".join(f"{loss:.4f}" for loss in losses)
    std = "-" if len(losses) < 2 else f"{result.std:.5f}"
    print(f"final val loss: mean {result.mean:.5f}, std {std} ({listed})")
    if times_ms:
        std = f"{np.std(times_ms, ddof=1) / 1000:.2f} s" if len(times_ms) > 1 else "-"
        print(f"training time: mean {np.mean(times_ms) / 1000:.2f} s, std {std}")
        print(f"steps: mean {np.mean(steps):.1f}, min {min(steps)}, max {max(steps)}")
    if result.test == "t":
        print(f"one-sided t-test of mean < {target:g}: t = {result.statistic:.3f}, p = {result.p_value:.3g}")
    else:
        print(f"one-sided z-test of mean < {target:g} with sigma {result.sigma:g}: "
              f"z = {result.statistic:.3f}, p = {result.p_value:.3g}")
    if result.passed:
        print(f"PASS: p = {result.p_value:.3g} < {result.level:g}")
        return report.exit_status(0)
    print(f"FAIL: p = {result.p_value:.3g} >= {result.level:g}; "
          f"mean {result.mean:.5f} is not significantly below {target:g}")
    return report.exit_status(1)


def command_compare(args: argparse.Namespace) -> int:
    if args.diff and len(args.runs) != 2:
        raise ValueError(f"--diff compares the source code of exactly two runs, got {len(args.runs)}")
    report = ErrorReport()
    run_sets = []
    for label, argument in zip(run_labels(args.runs), args.runs):
        logs = []
        # The train lines are kept only for the plot: they are most of a log.
        for log in iter_logs([argument], report, keep_source=args.diff, keep_steps=bool(args.plot)):
            if log.val_steps:
                logs.append(log)
            else:
                report(f"{log.path}: no val_loss line (the run stopped before its first validation); "
                       f"compare needs at least one, so this log is left out")
        if not logs:
            report(f"run {label!r} is left out: none of its logs can be compared")
            continue
        try:
            run_sets.append(build_run_set(label, logs))
        except ValueError as error:  # logs of different schedules in one run set
            report(f"{error}; run {label!r} is left out")
    if not run_sets:
        raise ValueError("compare needs at least one run with usable logs, none left")
    if args.diff and len(run_sets) != 2:
        raise ValueError(f"--diff compares the source code of exactly two runs, {len(run_sets)} left with usable logs")
    labels = [run.label for run in run_sets]
    losses = args.losses if args.losses else [args.target if args.target is not None else TRACKS[args.track].target]

    print("## Runs\n")
    rows = []
    for run in run_sets:
        final_step = run.val_steps[-1]
        rows.append([
            run.label, str(len(run.logs)), format_devices(run.logs), str(final_step),
            format_loss(run.val_losses[-1]), format_seconds(run.val_times_ms[-1]),
            format_ms_per_step(run.val_times_ms[-1] / final_step if final_step else None), run.status,
        ])
    headers = ["run", "logs", "device", "last val step", "val loss", "train time", "ms/step", "status"]
    print(markdown_table(headers, rows, align="lrlrrrrl"))

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
    for target in losses:
        times = [time_to_reach(run.val_times_ms, run.val_losses, target) for run in run_sets]
        rows.append([f"{target:g}", *("not reached" if time is None else format_seconds(time) for time in times)])
    print(markdown_table(["val loss", *labels], rows, align="r" * (len(labels) + 1)))

    if args.plot:
        plot_runs(run_sets, target=min(losses)).savefig(args.plot, dpi=PLOT_DPI)
        print(f"\nplot written to {args.plot}")
    if args.diff:
        first, second = run_sets[0].logs[0], run_sets[1].logs[0]
        first_files, second_files = first.sources, second.sources
        diff = []
        for index, name in enumerate(dict.fromkeys([*first_files, *second_files])):  # in order of appearance
            suffix = f" ({name})" if index else ""  # the script is the log's own source: named by the log
            diff += difflib.unified_diff(
                first_files.get(name, "").split("\n"), second_files.get(name, "").split("\n"),
                fromfile=f"{first.path}{suffix}", tofile=f"{second.path}{suffix}", lineterm="",
            )
        print("\n## Source diff\n")
        print("\n".join(diff) or f"(source code of {first.path} and {second.path} is identical)")
    return report.exit_status(0)


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


def find_records(records_dir: Path, report: ErrorReport | None = None) -> list[RecordFolder]:
    """Every `YYYY-MM-DD_ShortName/` folder under `records_dir`, oldest first; other entries are ignored.

    With `report`, each problem (bad date, missing README or title, no logs, an unreadable or
    incomplete log) is reported and that record left out; without, the first one raises ValueError."""
    def problem(message: str) -> None:
        if report is None:
            raise ValueError(message)
        report(message)

    records = []
    for folder in sorted(records_dir.iterdir()):
        name = RECORD_FOLDER_NAME.fullmatch(folder.name)
        if not (folder.is_dir() and name):
            continue
        try:
            datetime.date.fromisoformat(name[1])
        except ValueError:
            problem(f"{folder}: {name[1]!r} is not a valid date; name record folders YYYY-MM-DD_ShortName")
            continue
        try:
            title = record_title(folder / "README.md")
        except ValueError as error:
            problem(str(error))
            continue
        paths = sorted(folder.glob("*.txt"))
        if not paths:
            problem(f"{folder}: no *.txt logs; a record folder holds the logs of its runs")
            continue
        logs, usable = [], True
        for path in paths:
            try:
                log = read_log(path, keep_source=False, keep_steps=False)
            except LogError as error:
                problem(str(error))
                usable = False
                continue
            if not log.is_complete:
                problem(f"{path}: {log.status}: a record folder holds finished runs only; move this log out")
                usable = False
            logs.append(log)
        if usable:
            records.append(RecordFolder(folder, name[1], title, tuple(logs)))
    return records


def record_title(readme: Path) -> str:
    """The title from the `# Title` line a record README starts with (blank lines before it are fine)."""
    if not readme.is_file():
        raise ValueError(f"{readme}: missing; every record folder needs a README.md starting with a '# Title' line")
    for line in readme.read_text(encoding="utf-8", errors="replace").split("\n"):
        if line.strip():
            if line.startswith("# ") and line[2:].strip():
                return line[2:].strip()
            break
    raise ValueError(f"{readme}: no '# ' heading at the top; start the README with '# <title of the record>'")


def records_table(records: list[RecordFolder], target: float, link_base: Path) -> str:
    """The markdown results table; folder links are relative to `link_base` (the README's folder)."""
    rows = []
    for record in records:
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
    report = ErrorReport()
    records = find_records(args.records_dir, report)
    target = args.target if args.target is not None else TRACKS[args.track].target
    table = records_table(records, target, link_base=args.readme.parent)
    text = args.readme.read_text(encoding="utf-8")
    updated = replace_table(text, table, args.readme)
    if report.count:
        print(f"{args.readme}: not changed: {report.count} problem(s) in the record folders (above); fix them first")
        return 2
    if args.check:
        if updated != text:
            print(f"{args.readme}: records table is out of date; run `python records/tool.py table` and commit")
            return 1
        print(f"{args.readme}: records table is up to date ({len(records)} records)")
        return 0
    if updated != text:
        # the project's one atomic writer; imported only here because harness.py loads torch
        from harness import write_file_atomically

        write_file_atomically(args.readme, [updated.encode()])
        print(f"{args.readme}: records table updated ({len(records)} records)")
    else:
        print(f"{args.readme}: records table already up to date ({len(records)} records)")
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--track", choices=TRACKS, default="small",
                        help="speedrun track: small (3.28, t-test, p < 0.01; the default), medium (2.92, t-test, "
                             "p < 0.01), optimization (3.28, z-test with sigma 0.0013, p < 0.001)")
    parser.add_argument("--target", type=float, help="val loss to test against instead of the track's target")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python records/tool.py",
        description="Summarise, test and compare speedrun training logs; maintain the README records table. "
                    "Unreadable logs are reported one per line (error: FILE:LINE: reason), the others are "
                    "still used, and the exit status is then 2.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    log_help = "log file, folder of *.txt logs, or quoted glob (e.g. 'records/**/*.txt')"

    summary = commands.add_parser(
        "summary", help="final val loss (or 'incomplete (last step N/T)'), time, steps, ms/step, memory, device, "
                        "notes per log")
    summary.add_argument("logs", nargs="+", metavar="LOG", help=log_help)
    summary.add_argument("--notes", action="store_true",
                         help="also list the notes: lines the reader kept but did not use (status lines, "
                              "parameter dumps, a cut last line...)")
    summary.set_defaults(run=command_summary)

    significance = commands.add_parser(
        "significance", help="one-sided test that the mean final val loss is below the target (exit 0 PASS, 1 FAIL); "
                             "incomplete runs are not counted")
    significance.add_argument("logs", nargs="*", metavar="LOG", help=log_help)
    significance.add_argument("--losses", nargs="+", type=float, metavar="LOSS",
                              help="final val losses to test instead of reading logs")
    add_target_options(significance)
    significance.add_argument("--test", choices=["t", "z"],
                              help="t: one-sample t-test; z: z-test with a fixed sigma (default: the track's)")
    significance.add_argument("--sigma", type=float, default=OPTIMIZATION_SIGMA,
                              help=f"run-to-run sigma of the z-test (default {OPTIMIZATION_SIGMA})")
    significance.add_argument("--level", type=float,
                              help="PASS when p is below this (default: 0.01 for the t-test, 0.001 for the z-test)")
    significance.set_defaults(run=command_significance)

    compare = commands.add_parser(
        "compare", help="val curves, time to reach losses, plot (with a zoom on the target) and source diff of runs; "
                        "one run is enough except for --diff")
    compare.add_argument("runs", nargs="+", metavar="RUN", help=f"{log_help}; the logs of one RUN are averaged")
    compare.add_argument("--losses", nargs="+", type=float, metavar="LOSS",
                         help="val losses to report the time to reach (default: the track's target, 3.28); "
                              "the plot zooms on the lowest")
    add_target_options(compare)
    compare.add_argument("--plot", metavar="PNG",
                         help="write val loss (and train loss where logged) vs step and vs time, and a zoom "
                              "around the target when a run comes within 0.3 of it, to this PNG")
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
