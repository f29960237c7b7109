"""Tests of records/tool.py: the log reader, significance, compare (interpolation, plot, diff), the
README records table, and an end-to-end run on logs of the real trainer."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.lines import Line2D
from scipy import stats

from conftest import run_process
from records import tool  # importable from the repository root, which tests/conftest.py puts on sys.path

REPO_ROOT = Path(__file__).resolve().parents[1]

SEPARATOR = "=" * 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GPU_NAME = "NVIDIA H100 80GB HBM3"


# ----------------------------------------------------------------------------------------------------
# Writing synthetic logs in the trainer's format


def make_steps(total_steps, val_every, final_loss, rng, ms_per_step=100.0, train_loss=False, extra=False):
    """Train lines for steps 1..T and val lines every `val_every` steps and at T, in the order the
    trainer prints them (a val line repeats the step of the train line before it)."""
    start_loss = 10.8258
    steps = [tool.StepLine(step=0, train_time_ms=0, val_loss=start_loss, step_avg_ms=0.0)]
    time_ms = 0
    for step in range(1, total_steps + 1):
        time_ms += int(ms_per_step + rng.integers(0, 10))
        # Reaches exactly final_loss at the last step.
        loss = final_loss + (start_loss - final_loss) * (1 - step / total_steps) ** 2
        steps.append(tool.StepLine(
            step=step,
            train_time_ms=time_ms,
            train_loss=round(loss + float(rng.normal(0, 0.05)), 4) if train_loss else None,
            step_avg_ms=round(time_ms / step, 2),
            other={"tokens_per_second": float(rng.integers(1000, 2000))} if extra else {},
        ))
        if step % val_every == 0 or step == total_steps:
            steps.append(tool.StepLine(step=step, train_time_ms=time_ms, val_loss=round(loss, 4),
                                       step_avg_ms=round(time_ms / step, 2)))
    return steps


def format_step_line(line, total_steps):
    fields = [f"step:{line.step}/{total_steps}"]
    if line.val_loss is not None:
        fields.append(f"val_loss:{line.val_loss:.4f}")
    if line.train_loss is not None:
        fields.append(f"train_loss:{line.train_loss:.4f}")
    fields.append(f"train_time:{line.train_time_ms}ms")
    if line.step_avg_ms is not None:
        fields.append(f"step_avg:{line.step_avg_ms:.2f}ms")
    fields += [f"{name}:{value!r}" for name, value in line.other.items()]
    return " ".join(fields)


def our_environment(settings, device="2 x cpu"):
    return [
        "Running Python 3.11.7 (main, Dec  8 2023, 14:22:46) [GCC 12.2.0]",
        "Running PyTorch 2.13.0+cpu compiled for CUDA None",
        f"Device: {device}",
        "Settings: " + json.dumps(settings),
        "nvidia-smi: not available",
    ]


def public_environment(gpu_count):
    """Python/PyTorch lines and an nvidia-smi table as public record logs have them."""
    rule = "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+"
    lines = [
        "Running Python 3.12.7 (main, Oct 16 2024, 04:37:19) [Clang 18.1.8 ]",
        "Running PyTorch 2.7.0.dev20250110+cu126 compiled for CUDA 12.6",
        "Sat Feb  1 10:00:00 2025",
        rule,
        "| NVIDIA-SMI 550.127.05             Driver Version: 550.127.05     CUDA Version: 12.6     |",
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
        "|=========================================+========================+======================|",
    ]
    for gpu in range(gpu_count):
        lines += [
            f"|   {gpu}  {GPU_NAME}          On  |   00000000:{gpu:02d}:00.0 Off |                    0 |",
            "| N/A   39C    P0            125W /  700W |    7746MiB /  81559MiB |      0%      Default |",
            rule,
        ]
    lines += ["| Processes:                                                                              |",
              "|    0   N/A  N/A     12345      C   /usr/bin/python3                            0MiB |"]
    return lines


def log_lines(steps, total_steps, environment, source="import torch\nprint('train')", peak=(2300, 2400)):
    lines = [*source.split("\n"), SEPARATOR, *environment, SEPARATOR]
    lines += [format_step_line(line, total_steps) for line in steps]
    lines.append(f"peak memory allocated: {peak[0]} MiB reserved: {peak[1]} MiB")
    return lines


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_run(path, seed, final_loss, total_steps=20, val_every=5, ms_per_step=100.0, source="print('train')"):
    rng = np.random.default_rng(seed)
    steps = make_steps(total_steps, val_every, final_loss, rng, ms_per_step=ms_per_step)
    environment = our_environment({"seed": seed, "num_iterations": total_steps})
    return write_lines(path, log_lines(steps, total_steps, environment, source=source))


# ----------------------------------------------------------------------------------------------------
# Reader


def test_reader_round_trips_our_log(tmp_path):
    rng = np.random.default_rng(0)
    steps = make_steps(total_steps=30, val_every=10, final_loss=3.2791, rng=rng, extra=True)
    settings = {"num_iterations": 30, "train_batch_tokens": 393216, "seed": 7}
    # A separator-like line inside the source must stay part of the source.
    source = f'"""Docstring with a rule:\n{SEPARATOR}\n"""\nimport torch\n\nprint("go")\n'
    path = write_lines(tmp_path / "run.txt", log_lines(steps, 30, our_environment(settings), source, (2345, 2400)))

    log = tool.read_log(path)

    assert log.path == path
    assert log.source_code == source
    assert log.environment == our_environment(settings)
    assert log.device == "2 x cpu"
    assert log.settings == settings
    assert log.total_steps == 30
    assert log.steps == steps
    assert (log.peak_memory_allocated_mib, log.peak_memory_reserved_mib) == (2345, 2400)
    assert log.final_val_loss == 3.2791
    assert log.training_time_ms == steps[-1].train_time_ms
    assert log.ms_per_step == pytest.approx(steps[-1].train_time_ms / 30)
    assert [line.step for line in log.val_steps] == [0, 10, 20, 30]
    assert log.is_complete


def test_reader_public_style_log(tmp_path):
    rng = np.random.default_rng(1)
    steps = make_steps(total_steps=12, val_every=4, final_loss=3.2785, rng=rng, train_loss=True)
    lines = log_lines(steps, 12, public_environment(gpu_count=8))
    # Early public logs print a NaN step average at step 0.
    first_step = lines.index(format_step_line(steps[0], 12))
    lines[first_step] = lines[first_step].replace("step_avg:0.00ms", "step_avg:nanms")
    path = write_lines(tmp_path / "public.txt", lines)

    log = tool.read_log(path)

    assert log.device == f"8 x {GPU_NAME}"
    assert log.settings is None
    assert math.isnan(log.steps[0].step_avg_ms)
    assert log.steps[1:] == steps[1:]
    assert [line.train_loss for line in log.steps] == [line.train_loss for line in steps]
    assert log.final_val_loss == 3.2785

    # Early public logs also wrote one peak memory figure in another form.
    lines[-1] = "peak memory consumption: 37858 MiB"
    log = tool.read_log(write_lines(path, lines))
    assert (log.peak_memory_allocated_mib, log.peak_memory_reserved_mib) == (37858, None)


def test_reader_device_unknown_without_device_line_or_gpu_table(tmp_path):
    steps = make_steps(4, 2, 5.0, np.random.default_rng(2))
    path = write_lines(tmp_path / "bare.txt", log_lines(steps, 4, ["Running Python 3.11.7"]))
    assert tool.read_log(path).device == "unknown"


def test_reader_accepts_incomplete_run(tmp_path):
    steps = make_steps(20, 5, 4.0, np.random.default_rng(3))[:9]  # stopped early, as a killed run does
    log = tool.read_log(write_lines(tmp_path / "partial.txt", log_lines(steps, 20, our_environment({}))[:-1]))
    assert not log.is_complete
    assert log.peak_memory_allocated_mib is None
    assert log.status == f"incomplete (last step {steps[-1].step}/20)"


def body_start(lines):
    """Index of the first body line: just after the last separator."""
    return len(lines) - 1 - lines[::-1].index(SEPARATOR) + 1


def drop_last_separator(lines):
    broken = list(lines)
    del broken[body_start(broken) - 1]
    return broken, len(broken), "separator"


def insert_into_body(text, message, offset=3):
    def mutate(lines):
        index = body_start(lines) + offset
        return [*lines[:index], text, *lines[index:]], index + 1, message
    return mutate


@pytest.mark.parametrize("mutate", [
    drop_last_separator,
    insert_into_body("step:3/20 val_loss:abc train_time:300ms", "malformed step line"),
    insert_into_body("step:3/20 val_loss:4.5", "train_time"),
    insert_into_body("step:3 train_time:300ms", "malformed step line"),
    insert_into_body("step:3/20 train_time:300ms train_time:301ms", "appears twice"),
    insert_into_body("step:3/20 train_time:300.5ms", "whole number"),
    insert_into_body("step:1/20 train_time:100ms", "step 1 comes after step 3", offset=4),
    insert_into_body("step:3/25 train_time:300ms", "total step count changed", offset=4),
], ids=["missing separator", "bad value", "no train_time", "no total", "duplicate field",
        "fractional train_time", "decreasing step", "total changes"])
def test_reader_rejects_broken_logs_with_file_and_line(tmp_path, mutate):
    steps = make_steps(20, 5, 4.0, np.random.default_rng(4))
    lines = log_lines(steps, 20, our_environment({}))
    path = tmp_path / "broken.txt"
    write_lines(path, lines)
    tool.read_log(path)  # the unbroken log is fine

    broken, line_number, message = mutate(lines)
    write_lines(path, broken)
    with pytest.raises(ValueError) as error:
        tool.read_log(path)
    assert str(error.value).startswith(f"{path}:{line_number}: ")
    assert message in str(error.value)


def test_reader_rejects_invalid_settings_json(tmp_path):
    environment = our_environment({})
    environment[3] = "Settings: {not json"
    lines = log_lines(make_steps(4, 2, 5.0, np.random.default_rng(5)), 4, environment)
    path = write_lines(tmp_path / "settings.txt", lines)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:{lines.index(environment[3]) + 1}: Settings"):
        tool.read_log(path)


# ----------------------------------------------------------------------------------------------------
# Significance


@pytest.mark.parametrize("runs", [2, 5, 12])
def test_significance_matches_scipy(runs):
    rng = np.random.default_rng(runs)
    losses = list(rng.normal(3.2785, 0.0018, size=runs))
    for target in (3.28, 2.92, 3.279):
        expected = stats.ttest_1samp(losses, target, alternative="less")
        result = tool.significance_test(losses, target)
        assert result.test == "t"
        assert result.statistic == pytest.approx(expected.statistic)
        assert result.p_value == pytest.approx(expected.pvalue)
        assert result.mean == pytest.approx(np.mean(losses))
        assert result.std == pytest.approx(np.std(losses, ddof=1))
        assert result.passed == (expected.pvalue < 0.01)


def losses_with_p_near_threshold(scale, runs=6, target=3.28):
    """Losses whose t statistic is `scale` times the critical value of the 1% one-sided test."""
    spread = np.random.default_rng(6).normal(0, 0.0015, size=runs)
    spread -= spread.mean()
    critical_offset = stats.t.ppf(0.01, runs - 1) * spread.std(ddof=1) / math.sqrt(runs)
    return [float(loss) for loss in target + scale * critical_offset + spread]


@pytest.mark.parametrize("scale, passes", [(1.001, True), (0.999, False)])
def test_significance_verdict_flips_at_one_percent(capsys, scale, passes):
    losses = losses_with_p_near_threshold(scale)
    p_value = stats.ttest_1samp(losses, 3.28, alternative="less").pvalue
    assert abs(p_value - 0.01) < 1e-4 and (p_value < 0.01) == passes  # the construction is right

    assert tool.significance_test(losses, 3.28).passed == passes
    exit_code = tool.main(["significance", "--losses", *map(repr, losses)])
    output = capsys.readouterr().out
    assert exit_code == (0 if passes else 1)
    assert ("PASS" in output) == passes and ("FAIL" in output) == (not passes)


@pytest.mark.parametrize("options, target", [([], 3.28), (["--track", "medium"], 2.92), (["--target", "2.9"], 2.9)])
def test_significance_target_by_track_or_value(capsys, options, target):
    losses = [2.912, 2.914, 2.913, 2.9135]
    expected = stats.ttest_1samp(losses, target, alternative="less").pvalue
    assert tool.main(["significance", *options, "--losses", *map(str, losses)]) == (0 if expected < 0.01 else 1)
    output = capsys.readouterr().out
    assert f"mean < {target:g}: t = " in output and f"p = {expected:.3g}" in output


def test_significance_needs_two_distinct_losses(capsys):
    with pytest.raises(ValueError, match="at least 2"):
        tool.significance_test([3.27], 3.28)
    with pytest.raises(ValueError, match="run-to-run variation"):
        tool.significance_test([3.27, 3.27, 3.27], 3.28)
    assert tool.main(["significance", "--losses", "3.27"]) == 2
    assert "error: a t-test needs the final losses of at least 2 runs" in capsys.readouterr().err


def test_significance_reads_final_losses_and_times_from_logs(tmp_path, capsys):
    finals = [3.2781, 3.2769, 3.2775]
    paths = [write_run(tmp_path / f"run{seed}.txt", seed, final) for seed, final in enumerate(finals)]
    times = [tool.read_log(path).training_time_ms / 1000 for path in paths]

    assert tool.main(["significance", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    expected = stats.ttest_1samp(finals, 3.28, alternative="less")
    assert f"p = {expected.pvalue:.3g}" in output
    assert f"mean {np.mean(finals):.5f}" in output
    assert f"training time: mean {np.mean(times):.2f} s, std {np.std(times, ddof=1):.2f} s" in output


# ----------------------------------------------------------------------------------------------------
# Compare


def test_time_to_reach_matches_piecewise_linear_crossing():
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.uniform(500, 1500, size=12))
    losses = np.sort(rng.uniform(3.0, 11.0, size=12))[::-1]
    for target in rng.uniform(losses[-1], losses[0], size=50):
        # np.interp needs increasing x: walk the decreasing curve backwards.
        expected = np.interp(target, losses[::-1], times[::-1])
        assert tool.time_to_reach(list(times), list(losses), target) == pytest.approx(expected)
    assert tool.time_to_reach(list(times), list(losses), losses[-1] - 0.01) is None
    assert tool.time_to_reach(list(times), list(losses), losses[0] + 1.0) == times[0]


def test_time_to_reach_takes_the_first_crossing():
    # Dips to 3.2 between t=1000 and t=2000, bounces back up, crosses again later.
    times, losses = [0.0, 1000.0, 2000.0, 3000.0, 4000.0], [4.0, 3.5, 3.0, 3.6, 3.1]
    assert tool.time_to_reach(times, losses, 3.2) == pytest.approx(np.interp(3.2, [3.0, 3.5], [2000.0, 1000.0]))


def test_run_set_averages_shared_val_steps(tmp_path):
    logs = [tool.read_log(write_run(tmp_path / f"r{seed}.txt", seed, 3.0 + seed / 10, val_every=val_every))
            for seed, val_every in enumerate([5, 10, 5])]
    run = tool.build_run_set("set", logs)
    assert run.val_steps == (0, 10, 20)  # only the steps every log validates at
    assert run.val_losses[-1] == pytest.approx(np.mean([log.final_val_loss for log in logs]))
    assert run.val_times_ms[-1] == pytest.approx(np.mean([log.training_time_ms for log in logs]))


def test_compare_reports_common_steps_and_time_to_loss(tmp_path, capsys):
    fast = write_run(tmp_path / "fast.txt", 1, 3.27, total_steps=20, val_every=5, ms_per_step=80)
    slow_dir = tmp_path / "slow"
    slow_dir.mkdir()
    slow = [write_run(slow_dir / f"s{seed}.txt", seed, 3.30, total_steps=20, val_every=10) for seed in (2, 3)]

    assert tool.main(["compare", str(fast), str(slow_dir), "--losses", "5.0", "3.28"]) == 0
    output = capsys.readouterr().out
    fast_log = tool.read_log(fast)
    slow_set = tool.build_run_set("slow", [tool.read_log(path) for path in slow])
    val_table = output.split("## Val loss at common steps")[1].split("##")[0]
    # Only the steps both runs validate at (every 10th) appear.
    assert [row.split("|")[1].strip() for row in val_table.strip().splitlines()[2:]] == ["0", "10", "20"]
    fast_time = tool.time_to_reach([s.train_time_ms for s in fast_log.val_steps],
                                   [s.val_loss for s in fast_log.val_steps], 5.0)
    slow_time = tool.time_to_reach(slow_set.val_times_ms, slow_set.val_losses, 5.0)
    assert f" {fast_time / 1000:.2f} s |" in output and f" {slow_time / 1000:.2f} s |" in output
    assert "not reached" in output.split("## Time to reach val loss")[1]  # slow ends at 3.30 > 3.28


def test_compare_reports_and_plots_a_single_run(tmp_path, capsys):
    path = write_run(tmp_path / "one.txt", 0, 3.25)
    plot = tmp_path / "one.png"
    assert tool.main(["compare", str(path), "--plot", str(plot)]) == 0
    output = capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "| one |    1 | 2 x cpu |" in output and "## Time to reach val loss" in output
    figure = tool.plot_runs([tool.build_run_set("one", [tool.read_log(path)])])
    panels = figure.get_axes()
    assert [panel.get_xlabel() for panel in panels] == ["step", "training time (s)", "training time (s)"]
    for panel in panels:
        assert [line.get_label().split(":")[0] for line in panel.get_lines() if line.get_label().startswith("one")] \
            == ["one"]


def test_compare_diff_needs_exactly_two_runs(tmp_path, capsys):
    first, second = write_run(tmp_path / "a.txt", 0, 3.5), write_run(tmp_path / "b.txt", 1, 3.5)
    assert tool.main(["compare", str(first), "--diff"]) == 2
    assert capsys.readouterr().err == "error: --diff compares the source code of exactly two runs, got 1\n"
    no_val = write_lines(tmp_path / "noval.txt", log_lines(make_steps(20, 5, 3.5, np.random.default_rng(0))[1:3],
                                                             20, our_environment({}))[:-1])
    assert tool.main(["compare", str(first), str(no_val), "--diff"]) == 2
    error_lines = capsys.readouterr().err.splitlines()
    assert error_lines[-1] == "error: --diff compares the source code of exactly two runs, 1 left with usable logs"
    assert tool.main(["compare", str(no_val)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: compare needs at least one run with usable logs, none left"
    assert tool.main(["compare", str(first), str(second), "--diff"]) == 0


@pytest.mark.parametrize("run_count", [2, 3])
def test_plot_has_one_curve_per_run_in_each_panel(tmp_path, run_count):
    run_sets = [tool.build_run_set(f"run{seed}", [tool.read_log(write_run(tmp_path / f"{seed}.txt", seed, 3.3))])
                for seed in range(run_count)]
    figure = tool.plot_runs(run_sets)
    panels = figure.get_axes()
    assert len(panels) == 3  # vs step, vs time, zoom on the target
    labels = [run.label for run in run_sets]
    for panel in panels:
        curves = [line for line in panel.get_lines() if isinstance(line, Line2D)
                  and line.get_label().split(":")[0] in labels]
        assert [curve.get_label().split(":")[0] for curve in curves] == labels


def test_compare_writes_png_and_source_diff(tmp_path, capsys):
    old = write_run(tmp_path / "old.txt", 0, 3.29, source="lr = 0.05\nsteps = 1770")
    new = write_run(tmp_path / "new.txt", 1, 3.28, source="lr = 0.04\nsteps = 1770")
    plot = tmp_path / "curves.png"

    assert tool.main(["compare", str(old), str(new), "--plot", str(plot), "--diff"]) == 0
    output = capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert f"--- {old}\n+++ {new}\n" in output
    assert "\n-lr = 0.05\n+lr = 0.04\n" in output

    assert tool.main(["compare", str(old), str(old), "--diff"]) == 0
    assert "is identical" in capsys.readouterr().out


def test_logs_with_recipe_and_harness_are_split_and_diffed_per_file(tmp_path, capsys):
    """Logs since the recipe/harness split embed train_gpt.py, a banner line, then harness.py."""
    import harness

    def two_files(recipe, harness_source):
        return "\n".join([recipe, harness.source_banner("harness.py"), harness_source])

    old = write_run(tmp_path / "old.txt", 0, 3.29, source=two_files("lr = 0.05", "log_every = 1"))
    new = write_run(tmp_path / "new.txt", 1, 3.28, source=two_files("lr = 0.05", "log_every = 2"))
    assert tool.read_log(old).sources == {"train_gpt.py": "lr = 0.05", "harness.py": "log_every = 1"}
    single = write_run(tmp_path / "single.txt", 0, 3.3, source="lr = 0.05")
    assert tool.read_log(single).sources == {"train_gpt.py": "lr = 0.05"}

    assert tool.main(["compare", str(old), str(new), "--diff"]) == 0
    output = capsys.readouterr().out
    assert f"--- {old} (harness.py)\n+++ {new} (harness.py)\n" in output
    assert "\n-log_every = 1\n+log_every = 2" in output
    assert f"--- {old}\n" not in output  # the recipes are equal: no hunk for train_gpt.py


def test_real_log_header_embeds_both_files(tmp_path):
    import harness
    import train_gpt

    recipe = tmp_path / "recipe.py"
    recipe.write_text("lr = 0.05\n")
    header = harness.log_header(recipe, "Running Python x\nDevice: 1 x cpu")
    log = tmp_path / "run.txt"
    log.write_text(header + "step:0/1 val_loss:10.0000 train_time:0ms step_avg:0.00ms\n")
    sources = tool.read_log(log).sources
    assert sources["train_gpt.py"] == "lr = 0.05"
    assert sources["harness.py"] == harness.HARNESS_FILE.read_text().rstrip("\n")
    assert harness.source_sha256(recipe) != harness.source_sha256(train_gpt.RECIPE_FILE)


def test_script_runs_from_the_command_line(tmp_path):
    log = write_run(tmp_path / "cli.txt", 0, 3.4)
    result = run_process([sys.executable, str(REPO_ROOT / "records" / "tool.py"), "summary", str(log)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3.4000" in result.stdout and "2 x cpu" in result.stdout


# ----------------------------------------------------------------------------------------------------
# README records table


def make_record(records_dir, name, title, finals, device="2 x cpu"):
    folder = records_dir / name
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"\n# {title}\n\nWhat changed.\n", encoding="utf-8")
    for seed, final in enumerate(finals):
        steps = make_steps(10, 5, final, np.random.default_rng(seed))
        write_lines(folder / f"run{seed}.txt", log_lines(steps, 10, our_environment({"seed": seed}, device)))
    return folder


def table_rows(readme_text):
    table = readme_text.split(tool.TABLE_BEGIN)[1].split(tool.TABLE_END)[0].strip().splitlines()
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in table[2:]]


def test_table_lists_record_folders(tmp_path, capsys):
    records_dir = tmp_path / "records"
    baseline = [3.2801, 3.2772, 3.2790]  # mean differs from median
    faster = [3.2771]
    make_record(records_dir, "2026-01-02_Baseline", "Record-21 baseline", baseline)
    make_record(records_dir, "2026-03-04_Faster", "Faster | shorter", faster, device=f"8 x {GPU_NAME}")
    (records_dir / "notes").mkdir()  # not a record folder: ignored
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nResults:\n", "\nMore text.\n"
    readme.write_text(f"{before}{tool.TABLE_BEGIN}\nold table\n{tool.TABLE_END}{after}", encoding="utf-8")
    args = ["table", "--readme", str(readme), "--records-dir", str(records_dir)]

    assert tool.main([*args, "--check"]) == 1
    assert tool.main(args) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(before + tool.TABLE_BEGIN) and text.endswith(tool.TABLE_END + after)
    expected_p = stats.ttest_1samp(baseline, 3.28, alternative="less").pvalue
    mean_seconds = [np.mean([tool.read_log(log).training_time_ms for log in (records_dir / name).glob("*.txt")]) / 1000
                    for name in ("2026-01-02_Baseline", "2026-03-04_Faster")]
    assert table_rows(text) == [
        ["2026-01-02", "[Record-21 baseline](records/2026-01-02_Baseline/)", "3", f"{np.mean(baseline):.4f}",
         f"{expected_p:.3g}", f"{mean_seconds[0]:.2f} s", "2 x cpu"],
        ["2026-03-04", "[Faster \\| shorter](records/2026-03-04_Faster/)", "1", f"{faster[0]:.4f}",
         "- (1 run)", f"{mean_seconds[1]:.2f} s", f"8 x {GPU_NAME}"],
    ]

    assert tool.main([*args, "--check"]) == 0
    # A new run makes the table stale; --check notices and changes nothing.
    write_lines(records_dir / "2026-03-04_Faster" / "run9.txt",
                log_lines(make_steps(10, 5, 3.2765, np.random.default_rng(9)), 10, our_environment({})))
    assert tool.main([*args, "--check"]) == 1
    assert readme.read_text(encoding="utf-8") == text
    assert "out of date" in capsys.readouterr().out
    assert tool.main(args) == 0
    assert table_rows(readme.read_text(encoding="utf-8"))[1][2] == "2"
    assert tool.main([*args, "--target", "3.2795"]) == 0
    assert "p (mean < 3.2795)" in readme.read_text(encoding="utf-8")


@pytest.mark.parametrize("readme_text, message", [
    ("# Project\n", "records-table:begin"),
    (f"{tool.TABLE_BEGIN}\n", "records-table:end"),
    (f"{tool.TABLE_END}\n{tool.TABLE_BEGIN}\n", "comes before"),
])
def test_table_needs_markers(tmp_path, capsys, readme_text, message):
    readme = tmp_path / "README.md"
    readme.write_text(readme_text, encoding="utf-8")
    (tmp_path / "records").mkdir()
    assert tool.main(["table", "--readme", str(readme), "--records-dir", str(tmp_path / "records")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {readme}: ") and message in error
    assert readme.read_text(encoding="utf-8") == readme_text


def test_table_rejects_incomplete_record_folders(tmp_path):
    records_dir = tmp_path / "records"
    folder = make_record(records_dir, "2026-05-06_NoTitle", "x", [3.28, 3.27])
    (folder / "README.md").write_text("no heading here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '# ' heading"):
        tool.find_records(records_dir)
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="README.md: missing"):
        tool.find_records(records_dir)
    (folder / "README.md").write_text("# Title\n", encoding="utf-8")
    tool.find_records(records_dir)
    (tmp_path / "records" / "2026-13-01_BadDate").mkdir()
    with pytest.raises(ValueError, match="not a valid date"):
        tool.find_records(records_dir)


def test_repository_readme_table_is_up_to_date(capsys):
    """CI guard: after adding or changing a record folder, run `python records/tool.py table`."""
    assert tool.main(["table", "--check"]) == 0, capsys.readouterr()


# ----------------------------------------------------------------------------------------------------
# Logs of the real trainer (tiny CPU runs provided by tests/conftest.py)


@pytest.mark.slow
def test_real_trainer_logs_through_all_commands(tiny_run_logs, tmp_path, capsys):
    first, second = tiny_run_logs
    logs = [tool.read_log(path) for path in tiny_run_logs]
    for log in logs:
        assert log.is_complete and log.settings is not None and log.device != "unknown"
        assert log.source_code == logs[0].source_code  # same script, different seeds

    assert tool.main(["summary", str(first), str(second)]) == 0
    output = capsys.readouterr().out
    for log in logs:
        assert str(log.path) in output and f"{log.final_val_loss:.4f}" in output and log.device in output

    losses = [log.final_val_loss for log in logs]
    target = max(losses) + 1.0
    expected = stats.ttest_1samp(losses, target, alternative="less")
    exit_code = tool.main(["significance", str(first), str(second), "--target", str(target)])
    output = capsys.readouterr().out
    assert exit_code == (0 if expected.pvalue < 0.01 else 1)
    assert f"p = {expected.pvalue:.3g}" in output

    plot = tmp_path / "tiny.png"
    assert tool.main(["compare", str(first), str(second), "--losses", str(target), "--plot", str(plot), "--diff"]) == 0
    output = capsys.readouterr().out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "is identical" in output
    assert "not reached" not in output  # both runs end below max(final losses) + 1


# ----------------------------------------------------------------------------------------------------
# Public log layouts of every era (synthetic: the layouts of the public record logs, 2024 to 2026)

ERAS = ["ours", "2024_october_leading_separator", "2024_three_separators", "2024_four_separators",
        "2025_record21", "2026_status_lines", "optimization_track", "optimization_harness"]


def era_log(era, final_loss=3.2781, total_steps=40, seed=0, source="import torch\nprint('train')"):
    """Lines of a finished run in one era's layout, and what the reader must return for it."""
    rng = np.random.default_rng(seed)
    steps = make_steps(total_steps, 10, final_loss, rng, train_loss=era.startswith("2024"))
    notes = []
    peak = "peak memory allocated: 30012 MiB reserved: 31000 MiB"
    device = f"8 x {GPU_NAME}"
    if era == "ours":
        environment, device = our_environment({"num_iterations": total_steps}), "2 x cpu"
        header = [SEPARATOR, *environment, SEPARATOR]
    elif era == "2024_october_leading_separator":
        # The first record logs open with a separator, then the source, then versions and nvidia-smi.
        header = [SEPARATOR, "Running pytorch 2.4.1+cu121 compiled for CUDA 12.1", "nvidia-smi:",
                  *public_environment(8)[2:], SEPARATOR]
        peak = "peak memory consumption: 37858 MiB"
    elif era.startswith("2024"):
        # Three or four separators: source / nvidia-smi / data-loader info (/ hyperparameters).
        header = [SEPARATOR, *public_environment(8), SEPARATOR,
                  "Training DataLoader: total number of tokens: 1800000000 across 18 files",
                  "Validation DataLoader: total number of tokens: 100000000 across 1 files", SEPARATOR]
        if era == "2024_four_separators":
            header += ["num_iterations=40 warmup_iters=0 cooldown_iters=12", SEPARATOR]
        peak = "peak memory consumption: 37858 MiB"
    elif era == "2025_record21":
        header = [SEPARATOR, *public_environment(8), SEPARATOR]
    elif era == "2026_status_lines":
        header = [SEPARATOR, *public_environment(8)[:2], "Running Triton version 3.6.0",
                  *public_environment(8)[2:], SEPARATOR]
        notes = ["Compiling model and warming up kernels (~7 minutes on first execution)",
                 "Sampling steps [0, 1, 13, 14, 26, 27] for warmup", "Warmup step 1/10", "Resetting Model",
                 "scalars: torch.Size([64]) torch.float32 1.0 5.0",
                 "embed.weight: torch.Size([50304, 768]) torch.bfloat16 -4.1 4.3",
                 "Created 22 gradient buckets", "Bucket 0: 1 params, 147.4 MB",
                 "inductor_output_code: /tmp/torchinductor_root/ab/cabcdef.py",
                 "Parameter containing:", "tensor([1., 1., 1., 1.], device='cuda:0', requires_grad=True)", "0.5"]
    else:  # the optimization track: seconds, five-decimal losses, the device on one line, no peak memory
        device = "8 x NVIDIA H200"
        header = [SEPARATOR, "Running PyTorch 2.11.0+cu130 compiled for CUDA 13.0",
                  "Running on device_name=NVIDIA H200 with world_size=8", "Using seed=1", SEPARATOR]
        peak = None
        if era == "optimization_harness":
            notes = ["trial:1/25 seed:0", "config data_dir=/data/fineweb10B train_steps=40", "Using seed=1"]
    body = [format_step_line(line, total_steps) for line in steps]
    if era.startswith("2024"):
        # step_avg is NaN until timing starts, and train_time restarts after 10 untimed warmup steps.
        body = [line.replace(f"step_avg:{step.step_avg_ms:.2f}ms", "step_avg:nanms") if step.step <= 11 else line
                for line, step in zip(body, steps)]
        body = [line.replace(f"train_time:{step.train_time_ms}ms", f"train_time:{step.train_time_ms + 44000}ms")
                if 1 <= step.step <= 10 else line for line, step in zip(body, steps)]
    if era.startswith("optimization"):
        body = [re.sub(r"train_time:(\d+)ms", lambda m: f"train_time:{int(m[1]) / 1000:.3f}s", line)
                .replace(f"val_loss:{step.val_loss or 0:.4f}", f"val_loss:{step.val_loss or 0:.5f}")
                for line, step in zip(body, steps)]
    lines = [*source.split("\n"), *header, *notes[:len(notes) // 2], *body[:3], *notes[len(notes) // 2:], *body[3:]]
    if era == "2024_october_leading_separator":
        lines.insert(0, SEPARATOR)
    if peak:
        lines.append(peak)
    expected = dict(final=final_loss, time_ms=steps[-1].train_time_ms, steps=total_steps, device=device,
                    notes=len(notes), source=source, val_steps=[line.step for line in steps if line.val_loss])
    return lines, expected


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("keep_steps", [True, False])
def test_reader_reads_every_era(tmp_path, era, keep_steps):
    source = f"import torch\n# a rule inside the source\n{'=' * 100}\nprint('train')"
    lines, expected = era_log(era, source=source)
    log = tool.read_log(write_lines(tmp_path / f"{era}.txt", lines), keep_steps=keep_steps)
    assert log.final_val_loss == pytest.approx(expected["final"])
    assert log.training_time_ms == pytest.approx(expected["time_ms"])
    assert (log.last_step, log.total_steps, log.is_complete) == (expected["steps"], expected["steps"], True)
    assert log.device == expected["device"]
    assert log.note_count == expected["notes"] and len(log.notes) == expected["notes"]
    assert log.source_code == expected["source"]
    assert [line.step for line in log.val_steps] == expected["val_steps"]
    assert len(log.steps) == (expected["steps"] + len(expected["val_steps"]) if keep_steps
                              else len(expected["val_steps"]))
    if era.startswith("2024") and keep_steps:
        assert math.isnan(log.steps[1].step_avg_ms) and log.steps[1].train_loss is not None
        assert log.peak_memory_allocated_mib == 37858
    assert not any("Running" in line for line in log.source_code.split("\n"))


def test_summary_lists_notes(tmp_path, capsys):
    lines, _ = era_log("2026_status_lines")
    path = write_lines(tmp_path / "status.txt", lines)
    assert tool.main(["summary", str(path), "--notes"]) == 0
    output = capsys.readouterr().out
    row = next(line for line in output.splitlines() if line.startswith(f"| {path} "))
    assert row.split("|")[-2].strip() == "12"  # the notes column
    assert f"{path}:{lines.index('Resetting Model') + 1}: 'Resetting Model'" in output


def test_reader_ignores_a_cut_last_line(tmp_path):
    lines, expected = era_log("ours")
    text = "\n".join(lines[:-2]) + "\n" + "step:40/40 val_loss:3.27"  # cut inside the final val loss
    path = tmp_path / "cut.txt"
    path.write_text(text, encoding="utf-8")
    log = tool.read_log(path)
    assert not log.is_complete and log.status == "incomplete (last step 40/40)"
    assert log.final_val_loss != pytest.approx(3.27)
    assert any("no newline" in note.text and "3.27" in note.text for note in log.notes)
    # Cut inside train_time:974 must not report 0.97 s.
    path.write_text("\n".join(lines[:-3]) + "\nstep:40/40 train_time:974", encoding="utf-8")
    log = tool.read_log(path)
    assert log.training_time_ms == expected["time_ms"] - (expected["time_ms"] - log.steps[-1].train_time_ms)
    assert log.last_step == 39 and log.training_time_ms > 974


def test_reader_treats_a_resumed_run_as_one_run(tmp_path):
    lines, expected = era_log("ours")
    start = body_start(lines)
    # Continuing after a marker line: one run, the marker a note.
    marked = [*lines[:start + 20], "resumed from logs/run/checkpoint_step000018.pt", *lines[start + 20:]]
    log = tool.read_log(write_lines(tmp_path / "marker.txt", marked))
    assert log.is_complete and log.final_val_loss == pytest.approx(expected["final"]) and log.note_count == 1
    # Steps repeated after the marker replace those of the interrupted attempt.
    repeated = [*lines[:start + 30], "resumed from step 20", *lines[start + 23:]]
    log = tool.read_log(write_lines(tmp_path / "repeat.txt", repeated))
    assert log.is_complete and [line.step for line in log.steps] == [line.step for line in tool.read_log(
        write_lines(tmp_path / "plain.txt", lines)).steps]
    assert any("resumed at step" in note.text for note in log.notes)
    # Without the marker, going back is still an error.
    with pytest.raises(tool.LogError, match="steps must not decrease"):
        tool.read_log(write_lines(tmp_path / "back.txt", [*lines[:start + 30], *lines[start + 22:]]))


def test_step_lines_with_unknown_text_fields_are_read(tmp_path):
    lines, expected = era_log("ours")
    start = body_start(lines)
    lines[start + 5] += " lr:[0.1,0.2] note"
    log = tool.read_log(write_lines(tmp_path / "fields.txt", lines))
    assert log.is_complete and log.note_count == 1 and "2 step-line field(s)" in log.notes[0].text


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def test_mixed_tree_reports_every_bad_log_and_summarises_the_good(tmp_path, capsys):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    good = {}
    for index, era in enumerate(ERAS):
        lines, expected = era_log(era, final_loss=3.27 + index / 1000, seed=index)
        good[write_lines(tree / "sub" / f"{era}.txt", lines)] = expected
    lines, _ = era_log("2025_record21")
    latin1_source = write_bytes(tree / "latin1_source.txt", "\n".join(lines).encode().replace(
        b"print('train')", b"print('caf\xe9')") + b"\n")
    cut = write_bytes(tree / "cut_in_number.txt", "\n".join(lines[:-3]).encode() + b"\nstep:40/40 train_time:97")
    crashed = write_lines(tree / "crashed.txt", [*lines[:body_start(lines) + 25], "Traceback (most recent call last):",
                                                 "torch.OutOfMemoryError: CUDA out of memory."])
    empty = write_bytes(tree / "empty.txt", b"")
    binary = write_bytes(tree / "binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    body_byte = "\n".join(lines).encode()
    offset = body_byte.index(b"Running Python")
    latin1_body = write_bytes(tree / "latin1_env.txt", body_byte[:offset] + b"Running Python \xff" +
                              body_byte[offset + len(b"Running Python "):] + b"\n")
    no_separator = write_lines(tree / "notes.txt", ["just some notes", "step:1/2 train_time:3ms"])

    exit_code = tool.main(["summary", str(tree / "**" / "*.txt")])
    captured = capsys.readouterr()
    assert exit_code == 2
    for path, expected in good.items():
        row = next(line for line in captured.out.splitlines() if line.startswith(f"| {path} "))
        assert f"{expected['final']:.4f}" in row and expected["device"] in row
    for path in (latin1_source, cut, crashed):
        assert f"| {path} " in captured.out
    assert "incomplete (last step 39/40)" in captured.out.split(str(cut))[1].split("\n")[0]
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == sorted([
        f"error: {empty}:1: empty file; not a log",
        f"error: {binary}:3: binary data (NUL byte at byte offset 8); not a text log",
        f"error: {latin1_body}:{lines.index(public_environment(8)[0]) + 1}: not UTF-8 text (byte 0xff at byte "
        f"offset {offset + len(b'Running Python ')}); a log is UTF-8 after its embedded source",
        f"error: {no_separator}:2: log has 0 of the at least 2 separator lines ('=' * 100) that close the source "
        f"code and the environment; is it truncated or not a log?",
    ])
    log = tool.read_log(latin1_source)
    assert log.is_complete and "caf\ufffd" in log.source_code and "non-UTF-8" in log.notes[0].text
    assert tool.read_log(crashed).note_count == 2


def test_progress_bar_for_many_logs(tmp_path, capsys):
    for seed in range(tool.PROGRESS_BAR_MIN_FILES + 1):
        write_run(tmp_path / f"run{seed:02d}.txt", seed, 3.3, total_steps=4, val_every=2)
    assert tool.main(["summary", str(tmp_path)]) == 0
    assert "reading logs" in capsys.readouterr().err
    assert tool.main(["summary", str(tmp_path / "run0*.txt")]) == 0
    assert "reading logs" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# The three tracks' tests


@pytest.mark.parametrize("runs", [1, 3, 8])
def test_z_test_matches_the_formula(runs):
    losses = list(np.random.default_rng(runs).normal(3.2785, 0.0013, size=runs))
    for target, sigma in ((3.28, 0.0013), (3.279, 0.002)):
        z = (target - np.mean(losses)) * math.sqrt(runs) / sigma
        result = tool.significance_test(losses, target, test="z", sigma=sigma)
        assert result.statistic == pytest.approx(z)
        assert result.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))  # the normal upper tail
        assert result.level == 0.001 and result.passed == (result.p_value < 0.001)


def test_significance_optimization_track_reports_steps_and_time(tmp_path, capsys):
    finals = [3.2779, 3.2775, 3.2781, 3.2770]
    for index, final in enumerate(finals):
        write_lines(tmp_path / f"opt{index}.txt", era_log("optimization_harness", final_loss=final, seed=index)[0])
    exit_code = tool.main(["significance", str(tmp_path), "--track", "optimization"])
    output = capsys.readouterr().out
    z = (3.28 - np.mean(finals)) * 2 / 0.0013
    p = 0.5 * math.erfc(z / math.sqrt(2))
    assert exit_code == (0 if p < 0.001 else 1)
    assert f"z-test of mean < 3.28 with sigma 0.0013: z = {z:.3f}, p = {p:.3g}" in output
    assert "steps: mean 40.0, min 40, max 40" in output and "training time: mean" in output


def test_significance_leaves_out_incomplete_runs_with_one_line(tmp_path, capsys):
    finals = [3.2781, 3.2769, 3.2775]
    for seed, final in enumerate(finals):
        write_run(tmp_path / f"run{seed}.txt", seed, final)
    steps = make_steps(20, 5, 4.0, np.random.default_rng(3))[:9]
    write_lines(tmp_path / "partial.txt", log_lines(steps, 20, our_environment({}))[:-1])
    diverged = log_lines(make_steps(20, 5, 4.0, np.random.default_rng(4)), 20, our_environment({}))
    diverged[-2] = re.sub(r"val_loss:\S+", "val_loss:nan", diverged[-2])
    write_lines(tmp_path / "diverged.txt", [*diverged, "stopped: non-finite validation loss at step 20"])
    assert tool.main(["significance", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert f"not counted: {tmp_path / 'partial.txt'}: the run stopped at step {steps[-1].step} of 20 before its " \
           f"final validation\n" in output
    assert f"not counted: {tmp_path / 'diverged.txt'}: the final val loss is nan (the run diverged)\n" in output
    assert "runs: 3" in output
    assert f"p = {stats.ttest_1samp(finals, 3.28, alternative='less').pvalue:.3g}" in output


# ----------------------------------------------------------------------------------------------------
# Compare: the zoomed plot, incomplete runs, logs without a val line


def zoom_run(tmp_path, name, final_loss, total_steps=200, ms_per_step=100.0, cut_at=None):
    rng = np.random.default_rng(len(name))
    steps = make_steps(total_steps, 10, final_loss, rng, ms_per_step=ms_per_step)
    if cut_at is not None:
        steps = [line for line in steps if line.step <= cut_at]
    path = write_lines(tmp_path / f"{name}.txt", log_lines(steps, total_steps, our_environment({}))[:None])
    return tool.build_run_set(name, [tool.read_log(path)])


def test_zoomed_plot_shows_the_decision(tmp_path):
    runs = [zoom_run(tmp_path, "a", 3.2780), zoom_run(tmp_path, "b", 3.2820, ms_per_step=96.0)]
    figure = tool.plot_runs(runs, target=3.28)
    figure.canvas.draw()
    zoom = figure.get_axes()[2]
    target_lines = [line for line in zoom.get_lines() if line.get_gid() == "target"]
    assert len(target_lines) == 1 and target_lines[0].get_linestyle() == "--"
    assert list(target_lines[0].get_ydata()) == [3.28, 3.28]
    low, high = zoom.get_ylim()
    assert low == pytest.approx(3.23) and high == pytest.approx(3.58)
    assert zoom.get_yticklabels() and all(label.get_text() for label in zoom.get_yticklabels())
    crossings = [line for line in zoom.get_lines() if line.get_gid() == "crossing"]
    expected = tool.time_to_reach(list(runs[0].val_times_ms), list(runs[0].val_losses), 3.28) / 1000
    assert len(crossings) == 1 and crossings[0].get_xdata()[0] == pytest.approx(expected)  # b never reaches
    # Runs that end 0.004 apart are clearly apart in the saved image.
    end_points = [zoom.transData.transform((run.val_times_ms[-1] / 1000, run.val_losses[-1])) for run in runs]
    assert abs(end_points[0][1] - end_points[1][1]) > 6
    left, right = zoom.get_xlim()
    assert all(left <= run.val_times_ms[-1] / 1000 <= right for run in runs)


def test_compare_draws_incomplete_runs_and_names_logs_without_val(tmp_path, capsys):
    complete = zoom_run(tmp_path, "complete", 3.27, total_steps=40)
    partial_steps = make_steps(40, 10, 3.27, np.random.default_rng(5))[:25]
    partial = write_lines(tmp_path / "partial.txt", log_lines(partial_steps, 40, our_environment({}))[:-1])
    no_val = write_lines(tmp_path / "noval.txt", log_lines(make_steps(40, 10, 3.27, np.random.default_rng(6))[1:5],
                                                             40, our_environment({}))[:-1])
    plot = tmp_path / "plot.png"
    args = ["compare", str(complete.logs[0].path), str(partial), str(no_val), "--plot", str(plot)]
    assert tool.main(args) == 2
    captured = capsys.readouterr()
    assert f"error: {no_val}: no val_loss line (the run stopped before its first validation)" in captured.err
    assert "mismatched" not in captured.err
    assert f"incomplete (last step {partial_steps[-1].step}/40)" in captured.out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    run = tool.build_run_set("partial", [tool.read_log(partial)])
    figure = tool.plot_runs([complete, run])
    for panel in figure.get_axes():
        dashed = [line for line in panel.get_lines() if line.get_label().startswith("partial, incomplete")]
        assert len(dashed) == 1 and dashed[0].get_linestyle() == "--"
        assert [line.get_gid() for line in panel.get_lines()].count("incomplete-end") == 1


def lines_with_data_in_view(panel):
    """The lines of the panel with at least one finite point inside its view limits."""
    (left, right), (bottom, top) = panel.get_xlim(), panel.get_ylim()
    inside = []
    for line in panel.get_lines():
        x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
        if np.any((left <= x) & (x <= right) & (bottom <= y) & (y <= top)):
            inside.append(line)
    return inside


@pytest.mark.parametrize("final_losses, panel_count", [((7.55, 7.51), 2), ((3.278, 3.282), 3), ((7.5, 3.3), 3)])
def test_plot_has_no_empty_panel(tmp_path, final_losses, panel_count):
    """Tiny CPU runs end far above 3.28: a zoom on the target would show nothing, so it is left out."""
    runs = [zoom_run(tmp_path, f"run{index}", loss) for index, loss in enumerate(final_losses)]
    figure = tool.plot_runs(runs, target=3.28)
    figure.canvas.draw()
    assert len(figure.get_axes()) == panel_count
    for panel in figure.get_axes():
        assert any(line.get_gid() is None for line in lines_with_data_in_view(panel)), panel.get_title()
    if panel_count == 2:
        assert figure.get_suptitle() == ("no zoom on the target 3.28: no run's val loss came within 0.3 of it "
                                         f"(lowest {min(final_losses):.4f})")
        legend = [text.get_text() for text in figure.get_axes()[0].get_legend().get_texts()]
        assert legend == [f"run{index}: final {loss:.4f}" for index, loss in enumerate(final_losses)]


def train_loss_run(tmp_path, name, seed, train_loss):
    steps = make_steps(40, 10, 3.3, np.random.default_rng(seed), train_loss=train_loss)
    return write_lines(tmp_path / f"{name}.txt", log_lines(steps, 40, our_environment({})))


def test_plot_draws_train_loss_where_logged(tmp_path, capsys, monkeypatch):
    logs = [tool.read_log(train_loss_run(tmp_path, f"seed{seed}", seed, True)) for seed in (0, 1)]
    averaged = tool.build_run_set("logged", logs)
    train_lines = [[line for line in log.steps if line.train_loss is not None] for log in logs]
    assert averaged.train_steps == tuple(range(1, 41))
    assert averaged.train_losses == pytest.approx([(first.train_loss + second.train_loss) / 2
                                                   for first, second in zip(*train_lines)])
    assert averaged.train_times_ms == pytest.approx([(first.train_time_ms + second.train_time_ms) / 2
                                                     for first, second in zip(*train_lines)])
    unlogged = tool.build_run_set("unlogged", [tool.read_log(train_loss_run(tmp_path, "plain", 2, False))])
    assert unlogged.train_steps == unlogged.train_losses == unlogged.train_times_ms == ()

    figure = tool.plot_runs([averaged, unlogged])
    by_step, by_time, zoom = figure.get_axes()
    for panel, x_data in ((by_step, averaged.train_steps), (by_time, np.array(averaged.train_times_ms) / 1000)):
        train = [line for line in panel.get_lines() if line.get_gid() == "train-loss"]
        assert len(train) == 1  # the run without train_loss has none
        val = next(line for line in panel.get_lines() if line.get_label().startswith("logged"))
        assert train[0].get_color() == val.get_color() and train[0].get_linewidth() < val.get_linewidth()
        assert train[0].get_alpha() < 1 and train[0].get_zorder() < val.get_zorder()
        assert list(train[0].get_xdata()) == pytest.approx(list(x_data))
        assert list(train[0].get_ydata()) == pytest.approx(list(averaged.train_losses))
    assert not [line for line in zoom.get_lines() if line.get_gid() == "train-loss"]
    assert "logged train loss" in [text.get_text() for text in by_step.get_legend().get_texts()]
    assert by_step.get_title() == "val loss (train loss thin) vs step"
    assert tool.plot_runs([unlogged]).get_axes()[0].get_title() == "val loss vs step"

    # compare keeps the train lines for its plot.
    plotted = []
    monkeypatch.setattr(tool, "plot_runs", lambda run_sets, target: plotted.append(run_sets) or figure)
    assert tool.main(["compare", str(logs[0].path), "--plot", str(tmp_path / "train.png")]) == 0
    assert plotted[0][0].train_steps == tuple(range(1, 41))


def test_table_title_only_from_the_top_heading(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("\n# Faster Muon\n\n```bash\n# run it like this\n```\n", encoding="utf-8")
    assert tool.record_title(readme) == "Faster Muon"
    readme.write_text("Results below.\n\n```bash\n# torchrun ...\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '# ' heading at the top"):
        tool.record_title(readme)
    readme.write_text("```\n# comment\n```\n# Title\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '# ' heading at the top"):
        tool.record_title(readme)


def test_table_reports_every_bad_record_and_changes_nothing(tmp_path, capsys):
    records_dir = tmp_path / "records"
    make_record(records_dir, "2026-01-02_Good", "Good", [3.2801, 3.2772])
    bad = make_record(records_dir, "2026-01-03_Bad", "Bad", [3.2801, 3.2772])
    (bad / "run0.txt").write_bytes(b"")
    (bad / "README.md").write_text("no title\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(f"{tool.TABLE_BEGIN}\nold\n{tool.TABLE_END}\n", encoding="utf-8")
    assert tool.main(["table", "--readme", str(readme), "--records-dir", str(records_dir)]) == 2
    err = capsys.readouterr().err
    assert "no '# ' heading at the top" in err
    assert readme.read_text(encoding="utf-8").count("old") == 1


def test_byte_offset_of_a_bad_byte_in_a_crlf_log(tmp_path):
    lines, _ = era_log("2025_record21")
    data = "\r\n".join(lines).encode() + b"\r\n"
    offset = data.index(b"Running PyTorch") + len(b"Running ")
    path = write_bytes(tmp_path / "crlf.txt", data[:offset] + b"\xfe" + data[offset + 1:])
    with pytest.raises(tool.LogError, match=f"byte 0xfe at byte offset {offset}\\)"):
        tool.read_log(path)
    path.write_bytes(data)
    assert tool.read_log(path).is_complete
