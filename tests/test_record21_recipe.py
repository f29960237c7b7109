"""The record-21 recipe kept under records/ runs over today's harness: its log embeds it and the harness,
it learns, and a resumed run continues exactly."""
import re

import pytest

import harness
from conftest import REPO, run_process, script_command, shard_paths

RECIPE = REPO / "records" / "track_1_short" / "2025-02-01_Record21" / "train_gpt.py"


def val_losses(log_text: str) -> list[float]:
    return [float(value) for value in re.findall(r"^step:\d+/\d+ val_loss:(\S+)", log_text, re.M)]


@pytest.mark.slow
def test_record21_recipe_runs_on_the_tiny_shape(tmp_path):
    train_files, val_files = shard_paths()
    common = ["--preset=tiny", "--compile=false", "--num_iterations=4", "--val_every=2", "--warmup_steps=0",
              "--val_tokens=4096", f"--train_files={train_files}", f"--val_files={val_files}", f"--log_dir={tmp_path}",
              "--checkpoint_every=2"]
    whole = run_process(script_command(RECIPE, [*common, "--run_id=whole"]), timeout=900, cwd=REPO)
    assert whole.returncode == 0, whole.stderr
    log = (tmp_path / "whole.txt").read_text()
    recipe_end = log.index(harness.source_banner("harness.py"))
    assert log[:recipe_end].rstrip("\n") == RECIPE.read_text().rstrip("\n")
    assert harness.HARNESS_FILE.read_text().rstrip("\n") in log
    losses = val_losses(log)
    assert len(losses) == 3 and losses[-1] < losses[0]

    # a run resumed from a copy of the step-2 checkpoint ends on the same loss
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "half").mkdir()
    (stopped / "half" / "step_000002.pt").write_bytes((tmp_path / "whole" / "step_000002.pt").read_bytes())
    resumed = run_process(script_command(RECIPE, [*common[:-2], f"--log_dir={stopped}", "--checkpoint_every=2",
                                                      "--run_id=half", "--resume=auto"]), timeout=900, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert val_losses((stopped / "half.txt").read_text())[-1] == losses[-1]
