"""The recipe/harness split: harness.py serves any recipe and never imports one."""
import ast

import harness as H
import train_gpt as T
from conftest import REPO
from records.recipes import RECORD21, record21


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_harness_never_imports_a_recipe():
    assert "train_gpt" not in imported_modules(REPO / "harness.py")
    assert "harness" in imported_modules(REPO / "train_gpt.py") and "harness" in imported_modules(RECORD21)


HARNESS_FREE_ON_RESUME = {"log_dir", "run_id", "checkpoint_every", "checkpoint_keep", "resume", "save_checkpoint",
                          "save_safetensors", "preset", "check_only", "allow_val_in_train"}


def test_settings_free_on_resume_are_declared_per_setting():
    # record 21: the list kept beside the checkpoint code before the split, now a flag on each setting
    assert H.settings_free_on_resume(record21().Settings) == HARNESS_FREE_ON_RESUME | {
        "device", "attention_backend", "compile", "warmup_steps", "val_every", "checkpoint_blocks", "loss_chunk_tokens",
        "memory"}
    # record 89: where and how the same mathematics is computed, and when it is validated
    assert H.settings_free_on_resume(T.Settings) == HARNESS_FREE_ON_RESUME | {
        "device", "attention_backend", "compile", "warmup", "val_every", "checkpoint_blocks", "loss_chunk_tokens",
        "memory"}


def test_help_lists_the_recipe_settings_before_the_harness_settings():
    settings_part = T.settings_help().split("\npresets:")[0]
    names = [line.split("=", 1)[0].strip()[2:] for line in settings_part.splitlines() if line.startswith("  --")]
    harness_names = [name for name in names if name in H.RunSettings.__dataclass_fields__]
    assert names[:3] == ["train_files", "val_files", "val_tokens"]
    assert names[-len(harness_names):] == harness_names == list(H.RunSettings.__dataclass_fields__)


def test_logged_settings_are_every_setting_recipe_first():
    s = T.parse_settings(["--preset=tiny"])
    logged = H.settings_dict(s)
    assert set(logged) == set(T.Settings.__dataclass_fields__)
    assert list(logged)[0] == "train_files" and list(logged)[-1] == "allow_val_in_train"
