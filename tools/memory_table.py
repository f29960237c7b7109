#!/usr/bin/env python3
"""The memory table that a recipe's --memory=auto reads, built from GPU-check reports.

    python tools/memory_table.py [--recipe=train_gpt.py] REPORT/gpu_check.json ...

Each report is one `python tools/gpu_check.py --recipe=R --gpu=G --nproc=N --checkpoint_blocks=B
--loss_chunk_tokens=C --out=DIR` run with the savers set explicitly. A row of the table is one (ranks, FP8, savers)
combination with its predicted peak memory: the largest MemTracker total over the report's training and
evaluation phases, and over the GPUs checked with that combination. The recipe names its table's file, the
settings that size memory and its FP8 setting (record 89: MEMORY_TABLE, MEMORY_SHAPE_SETTINGS, MEMORY_FP8_SETTING,
recompute_flops_per_token; record 21, which predates them, has its profile here). Writes the table (atomically)
and prints the README table "Which GPU fits which settings": for every GPU and rank count, the savers that
--memory=auto picks there (harness.choose_memory_savers itself) and their predicted peak.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import harness as H  # noqa: E402
from records.recipes import load_recipe  # noqa: E402

GIB = 2**30
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # the GPU check's table of fake GPUs: the README table covers these too
    from fake_gpu.gpus import GPUS
    README_GPUS = [GPUS[key] for key in ("h100", "a100-80gb", "a100-40gb", "l40s", "rtx4090")]
except ImportError:  # without the GPU check, the GPUs of the reports only
    README_GPUS = []


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a recipe's memory table needs from the recipe."""
    recipe: ModuleType
    table_path: Path
    shape_settings: tuple[str, ...]  # the settings that size memory; every report of one table must agree on them
    fp8_setting: str  # the setting that turns FP8 on (the rows' FP8 key)
    recompute_flops_per_token: Callable  # (settings, MemorySavers) -> extra forward FLOPs per token in backward


def record21_recompute_flops_per_token(T: ModuleType, s, savers) -> int:
    """Record 21: the linear layers of the checkpointed blocks, and the LM head when the loss is chunked
    (attention scores are left out: they depend on the window and the documents)."""
    with torch.device("meta"):
        model = T.GPT(s, "sdpa")
    block_weights = sum(p.numel() for block in model.blocks[:savers.checkpoint_blocks] for p in block.parameters()
                        if p.ndim >= 2)
    return 2 * block_weights + (2 * model.lm_head.weight.numel() if savers.loss_chunk_tokens else 0)


def recipe_profile(recipe_path: Path) -> Profile:
    T = load_recipe(recipe_path)
    if hasattr(T, "MEMORY_SHAPE_SETTINGS"):
        return Profile(T, T.MEMORY_TABLE, T.MEMORY_SHAPE_SETTINGS, T.MEMORY_FP8_SETTING, T.recompute_flops_per_token)
    return Profile(T, H.MEMORY_TABLE_PATH, ("train_seq_len", "val_seq_len", "vocab_size", "num_layers", "model_dim",
                                            "num_heads", "head_dim", "mlp_ratio", "attention_layout",
                                            "value_embed_layout", "block_size", "compile"),
                   "fp8_head", lambda s, savers: record21_recompute_flops_per_token(T, s, savers))


def read_report(path: Path, profile: Profile) -> dict:
    report = json.loads(path.read_text())
    meta, settings = report["meta"], report["meta"]["settings"]
    # a report of a commit before the recipe had savers ran without them
    savers = H.MemorySavers(settings.get("checkpoint_blocks", 0), settings.get("loss_chunk_tokens", 0))
    if savers.checkpoint_blocks < 0 or savers.loss_chunk_tokens < 0:
        raise SystemExit(f"{path}: run the GPU check with explicit --checkpoint_blocks and --loss_chunk_tokens")
    peaks = [phase["memory"]["Total"] for phase in report["phases"].values() if phase.get("memory")]
    if report.get("errors") or len(peaks) < 2:
        raise SystemExit(f"{path}: the check did not finish training and evaluation; see its gpu_check.md")
    # FP8 as the run trains: the setting, and a GPU with FP8 matmuls (record 89 falls back to bf16 without)
    fp8 = settings[profile.fp8_setting] and meta["gpu"]["fp8"]
    return dict(path=path, gpu=meta["gpu"], world_size=meta["world_size"], settings=settings, savers=savers, fp8=fp8,
                peak=max(peaks), fatal=report["fatal"], commit=meta["git_commit"])


def build_table(reports: list[dict], profile: Profile) -> dict:
    shape = {name: reports[0]["settings"][name] for name in profile.shape_settings}
    rows = {}
    for report in reports:
        s = report["settings"]
        differing = [name for name in profile.shape_settings if s[name] != shape[name]]
        if differing:
            raise SystemExit(f"{report['path']}: {', '.join(differing)} differ from the other reports")
        savers = report["savers"]
        key = (report["world_size"], report["fp8"], savers.checkpoint_blocks, savers.loss_chunk_tokens)
        known = {f.name for f in dataclasses.fields(profile.recipe.Settings)}
        row = rows.setdefault(key, {
            "world_size": key[0], profile.fp8_setting: key[1], "checkpoint_blocks": key[2], "loss_chunk_tokens": key[3],
            "recompute_flops_per_token": profile.recompute_flops_per_token(
                profile.recipe.Settings(**{name: value for name, value in s.items() if name in known}), savers),
            "peak_gib": 0.0, "gpus": [], "reports": []})
        row["peak_gib"] = max(row["peak_gib"], round(report["peak"] / GIB, 2))
        row["gpus"].append(report["gpu"]["key"])
        row["reports"].append(str(report["path"].relative_to(REPO)))
    commits = sorted({report["commit"] for report in reports})
    recipe = Path(profile.recipe.__file__).resolve().relative_to(REPO)
    return dict(
        description=f"Predicted peak memory per rank of the record shape by memory savers, from tools/gpu_check.py "
                    "(MemTracker over the counted training steps and the final evaluation on a fake GPU; a "
                    f"prediction from generated code, not a measurement). {recipe} --memory=auto reads it.",
        generated_by=f"python tools/memory_table.py --recipe={recipe} "
                     + " ".join(sorted(str(r["path"].relative_to(REPO)) for r in reports)),
        commits=commits, usable_memory="0.9 x the GPU's memory - 1 GiB (harness.usable_memory_gib)",
        fp8_setting=profile.fp8_setting, shape=shape,
        rows=sorted(rows.values(), key=lambda row: (row["world_size"], row[profile.fp8_setting],
                                                    *H.recompute_order(row))))


def readme_table(table: dict, reports: list[dict], profile: Profile) -> str:
    """GPU x ranks -> what --memory=auto picks and its predicted peak (the report of that very GPU when it has
    one, else the table row)."""
    lines = ["| GPU | ranks | FP8 | savers --memory=auto picks | predicted peak per rank | usable | report |",
             "|---|---:|---|---|---:|---:|---|"]
    gpus = {report["gpu"]["key"]: report["gpu"] for report in reports}
    for gpu in README_GPUS:  # the GPU check's own table of fake GPUs (tools/fake_gpu/gpus.py)
        gpus.setdefault(gpu.key, dict(key=gpu.key, name=gpu.name, total_memory=gpu.total_memory, fp8=gpu.has_fp8))
    defaults = profile.recipe.Settings()
    for key, gpu in gpus.items():
        for world_size in (1, 8):
            s = dataclasses.replace(defaults, **{name: reports[0]["settings"][name] for name in profile.shape_settings},
                                    checkpoint_blocks=-1, loss_chunk_tokens=-1, memory="auto")
            fp8 = getattr(s, profile.fp8_setting) and gpu["fp8"]
            savers, notice = H.choose_memory_savers(s, world_size, gpu["total_memory"], table, fp8, profile.table_path)
            own = [r for r in reports if r["gpu"]["key"] == key and r["world_size"] == world_size and r["fp8"] == fp8
                   and r["savers"] == savers]
            if own:
                folder = own[0]["path"].parent
                peak = f"{own[0]['peak'] / GIB:.1f} GiB"
                source = f"[{folder.name}]({folder.relative_to(REPO)}/gpu_check.md)"
            else:
                matching = [row for row in table["rows"] if row["world_size"] in (world_size, 1)
                            and row[profile.fp8_setting] == fp8 and row["checkpoint_blocks"] == savers.checkpoint_blocks
                            and row["loss_chunk_tokens"] == savers.loss_chunk_tokens]
                if matching:  # the largest: a 1-rank row bounds a world size the table lacks
                    row = max(matching, key=lambda row: row["peak_gib"])
                    peak = f"{row['peak_gib']:.1f} GiB"
                    source = f"table row: {row['world_size']} rank(s) on " + ", ".join(row["gpus"])
                else:
                    peak, source = "not checked", "no table row for this FP8 setting"
            saver_text = (f"`--checkpoint_blocks={savers.checkpoint_blocks} "
                          f"--loss_chunk_tokens={savers.loss_chunk_tokens}`"
                          if savers.checkpoint_blocks or savers.loss_chunk_tokens else "none")
            fits = "" if "does NOT fit" not in notice else " (does NOT fit)"
            lines.append(f"| {gpu['name']} | {world_size} | {'on' if fp8 else 'off'} | {saver_text} | "
                         f"{peak}{fits} | {H.usable_memory_gib(gpu['total_memory']):.1f} GiB | {source} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="gpu_check.json files")
    parser.add_argument("--recipe", type=Path, default=REPO / "train_gpt.py")
    parser.add_argument("--out", type=Path, help="the table's file (default: the one the recipe reads)")
    args = parser.parse_args(argv)
    profile = recipe_profile(args.recipe if args.recipe.is_absolute() else Path.cwd() / args.recipe)
    reports = [read_report(path.resolve(), profile) for path in args.reports]
    table = build_table(reports, profile)
    H.write_file_atomically(args.out or profile.table_path, [(json.dumps(table, indent=1) + "\n").encode()])
    print(readme_table(table, reports, profile))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
