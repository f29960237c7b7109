"""benchmark.py --learning-curves without training: the token counts behind each val point, the log reading,
the merged table, the plot, and that the two recipes' settings give the same token total."""
import json
import re

import pytest

import benchmark as B
from records.tool import SEPARATOR

# A record-89 schedule small enough to sum by hand: 2 steps of 1024 tokens, 2 of 2048, 2 of 3072, then a
# 1-step extension at the last stage's 3072.
R89_SCHEDULE = dict(stage_ends="2,4,6", extension_steps=1, stage_batch_tokens="1024,2048,3072", block_size=8,
                    split_step=3, muon_momentum_warmup_steps=2, muon_momentum_cooldown_steps=1)
R89_TOKENS_BEFORE = [0, 1024, 2048, 4096, 6144, 9216, 12288, 15360]


def write_log(path, settings: dict, val_points: list[tuple[int, float]], total_steps: int, complete=True):
    """A log in the trainers' layout: source, separator, environment (with the Settings JSON), separator,
    step lines, the peak memory line."""
    lines = ["print('the recipe')", SEPARATOR, "Running Python 3", "Device: 1 x cpu",
             f"Settings: {json.dumps(settings)}", SEPARATOR]
    for step, loss in val_points:
        if step:
            lines.append(f"step:{step}/{total_steps} train_loss:{loss + 0.1:.4f} train_time:{100 * step}ms "
                         f"step_avg:100.00ms")
        if complete or step < total_steps:
            lines.append(f"step:{step}/{total_steps} val_loss:{loss:.4f} train_time:{100 * step}ms "
                         f"step_avg:100.00ms")
    lines.append("peak memory allocated: 12 MiB reserved: 12 MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_r89_tokens_follow_the_stage_batches():
    assert B.r89_tokens_before(R89_SCHEDULE) == R89_TOKENS_BEFORE


def test_r21_tokens_are_steps_times_the_batch():
    assert B.r21_tokens_before(dict(train_batch_tokens=2048, num_iterations=3)) == [0, 2048, 4096, 6144]


def test_read_curve_attaches_tokens_to_val_points(tmp_path):
    log = write_log(tmp_path / "r89.txt", R89_SCHEDULE, [(0, 10.8), (4, 9.5), (7, 8.25)], total_steps=7)
    curve = B.read_curve(log, "record89")
    assert [(p["step"], p["tokens"], p["val_loss"]) for p in curve["points"]] == \
        [(0, 0, 10.8), (4, 6144, 9.5), (7, 15360, 8.25)]
    assert curve["device"] == "1 x cpu" and curve["total_steps"] == 7 and curve["peak_memory_mib"] == 12


def test_read_curve_refuses_an_unfinished_run(tmp_path):
    log = write_log(tmp_path / "cut.txt", R89_SCHEDULE, [(0, 10.8), (4, 9.5), (7, 8.25)], total_steps=7,
                    complete=False)
    with pytest.raises(RuntimeError, match="did not finish"):
        B.read_curve(log, "record89")


def test_read_curve_refuses_settings_that_disagree_with_the_steps(tmp_path):
    log = write_log(tmp_path / "r21.txt", dict(train_batch_tokens=2048, num_iterations=5), [(0, 10.8), (3, 9.0)],
                    total_steps=3)
    with pytest.raises(RuntimeError, match="5 steps"):
        B.read_curve(log, "record21")


def table_cells(rows: list[str]) -> list[list[str]]:
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_table_merges_the_runs_by_tokens():
    curves = {"record21": dict(points=[dict(step=0, tokens=0, val_loss=10.8), dict(step=2, tokens=4096, val_loss=9.0),
                                       dict(step=3, tokens=6144, val_loss=8.5)]),
              "record89": dict(points=[dict(step=0, tokens=0, val_loss=10.9), dict(step=3, tokens=2048, val_loss=9.7),
                                       dict(step=5, tokens=6144, val_loss=8.4)])}
    rows = B.curves_table(curves, {"record21": "r21", "record89": "r89"})
    assert re.fullmatch(r"\| training tokens \| r21: step \| r21: val loss \| r89: step \| r89: val loss \|", rows[0])
    assert table_cells(rows) == [["0", "0", "10.8000", "0", "10.9000"],
                                 ["2,048", "", "", "3", "9.7000"],
                                 ["4,096", "2", "9.0000", "", ""],
                                 ["6,144", "3", "8.5000", "5", "8.4000"]]


def test_plot_writes_a_png(tmp_path):
    curves = {"record21": dict(points=[dict(tokens=0, val_loss=10.8), dict(tokens=4096, val_loss=9.0)])}
    B.plot_curves(curves, {"record21": "r21"}, "title", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_two_recipes_train_on_the_same_tokens():
    record21, record89 = B.curve_recipes()
    r21_settings = B.T.parse_settings(list(record21.args))
    r89_settings = B.R89.parse_settings(list(record89.args))
    r21_total = r21_settings.num_iterations * r21_settings.train_batch_tokens
    r89_total = sum(B.R89.step_plan(step, r89_settings).batch_tokens for step in range(r89_settings.num_iterations))
    assert r21_total == r89_total > 0
    for name in ("val_tokens", "val_seq_len", "seed", "compile", "device"):
        assert getattr(r21_settings, name) == getattr(r89_settings, name), name
