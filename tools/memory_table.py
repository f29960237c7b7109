#!/usr/bin/env python3
"""The memory table that `train_gpt.py --memory=auto` reads, built from GPU-check reports.

    python tools/memory_table.py records/benchmarks/memory/*/gpu_check.json

Each report is one `python tools/gpu_check.py --gpu=G --nproc=N --checkpoint_blocks=B --loss_chunk_tokens=C
--out=DIR` run with the savers set explicitly. A row of the table is one (ranks, FP8 head, savers) combination
with its predicted peak memory: the largest MemTracker total over the report's training and evaluation
phases, and over the GPUs checked with that combination. Writes records/benchmarks/memory_table.json
(atomically) and prints the README table "Running on other GPUs": for every GPU and rank count checked, the
savers that --memory=auto picks there (harness.choose_memory_savers itself) and their predicted peak.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import harness as H  # noqa: E402
import train_gpt as T  # noqa: E402

GIB = 2**30
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # the GPU check's table of fake GPUs: the README table covers these too
    from fake_gpu.gpus import GPUS
    README_GPUS = [GPUS[key] for key in ("h100", "a100-80gb", "a100-40gb", "l40s", "rtx4090")]
except ImportError:  # without the GPU check, the GPUs of the reports only
    README_GPUS = []
# The settings that size memory; every report of one table must agree on them.
SHAPE_SETTINGS = ("train_seq_len", "val_seq_len", "vocab_size", "num_layers", "model_dim", "num_heads", "head_dim",
                  "mlp_ratio", "attention_layout", "value_embed_layout", "block_size", "compile")


def recompute_flops_per_token(s: T.Settings, checkpoint_blocks: int, loss_chunk_tokens: int) -> int:
    """Extra forward FLOPs per token in backward: the linear layers of the checkpointed blocks, and the LM head
    when the loss is chunked (attention scores are left out: they depend on the window and the documents)."""
    with torch.device("meta"):
        model = T.GPT(s, "sdpa")
    block_weights = sum(p.numel() for block in model.blocks[:checkpoint_blocks] for p in block.parameters()
                        if p.ndim >= 2)
    return 2 * block_weights + (2 * model.lm_head.weight.numel() if loss_chunk_tokens else 0)


def read_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    meta, settings = report["meta"], report["meta"]["settings"]
    if settings["checkpoint_blocks"] < 0 or settings["loss_chunk_tokens"] < 0:
        raise SystemExit(f"{path}: run the GPU check with explicit --checkpoint_blocks and --loss_chunk_tokens")
    peaks = [phase["memory"]["Total"] for phase in report["phases"].values() if phase.get("memory")]
    if report.get("errors") or len(peaks) < 2:
        raise SystemExit(f"{path}: the check did not finish training and evaluation; see its gpu_check.md")
    return dict(path=path, gpu=meta["gpu"], world_size=meta["world_size"], settings=settings,
                peak=max(peaks), fatal=report["fatal"], commit=meta["git_commit"])


def build_table(reports: list[dict]) -> dict:
    shape = {name: reports[0]["settings"][name] for name in SHAPE_SETTINGS}
    rows = {}
    for report in reports:
        s = report["settings"]
        differing = [name for name in SHAPE_SETTINGS if s[name] != shape[name]]
        if differing:
            raise SystemExit(f"{report['path']}: {', '.join(differing)} differ from the other reports")
        key = (report["world_size"], s["fp8_head"], s["checkpoint_blocks"], s["loss_chunk_tokens"])
        row = rows.setdefault(key, dict(
            world_size=key[0], fp8_head=key[1], checkpoint_blocks=key[2], loss_chunk_tokens=key[3],
            recompute_flops_per_token=recompute_flops_per_token(T.Settings(**s), key[2], key[3]),
            peak_gib=0.0, gpus=[], reports=[]))
        row["peak_gib"] = max(row["peak_gib"], round(report["peak"] / GIB, 2))
        row["gpus"].append(report["gpu"]["key"])
        row["reports"].append(str(report["path"].relative_to(REPO)))
    commits = sorted({report["commit"] for report in reports})
    return dict(
        description="Predicted peak memory per rank of the record shape by memory savers, from tools/gpu_check.py "
                    "(MemTracker over one training step and one evaluation on a fake GPU; a prediction from "
                    "generated code, not a measurement). train_gpt.py --memory=auto reads it.",
        generated_by="python tools/memory_table.py " + " ".join(sorted(str(r["path"].relative_to(REPO)) for r in reports)),
        commits=commits, usable_memory="0.9 x the GPU's memory - 1 GiB (harness.usable_memory_gib)",
        shape=shape, rows=sorted(rows.values(), key=lambda row: (row["world_size"], row["fp8_head"],
                                                                 row["recompute_flops_per_token"])))


def readme_table(table: dict, reports: list[dict]) -> str:
    """GPU x ranks -> what --memory=auto picks and its predicted peak (the report of that very GPU when it has
    one, else the table row)."""
    lines = ["| GPU | ranks | FP8 head | savers --memory=auto picks | predicted peak per rank | usable | report |",
             "|---|---:|---|---|---:|---:|---|"]
    gpus = {report["gpu"]["key"]: report["gpu"] for report in reports}
    for gpu in README_GPUS:  # the GPU check's own table of fake GPUs (tools/fake_gpu/gpus.py)
        gpus.setdefault(gpu.key, dict(key=gpu.key, name=gpu.name, total_memory=gpu.total_memory, fp8=gpu.has_fp8))
    for key, gpu in gpus.items():
        for world_size in (1, 8):
            s = T.Settings(**{**reports[0]["settings"], "fp8_head": gpu["fp8"], "checkpoint_blocks": -1,
                              "loss_chunk_tokens": -1, "memory": "auto"})
            savers, notice = H.choose_memory_savers(s, world_size, gpu["total_memory"], table)
            own = [r for r in reports if r["gpu"]["key"] == key and r["world_size"] == world_size
                   and r["settings"]["fp8_head"] == gpu["fp8"]
                   and (r["settings"]["checkpoint_blocks"], r["settings"]["loss_chunk_tokens"])
                   == (savers.checkpoint_blocks, savers.loss_chunk_tokens)]
            if own:
                peak, source = f"{own[0]['peak'] / GIB:.1f} GiB", f"[{own[0]['path'].parent.name}]({own[0]['path'].parent.relative_to(REPO)}/gpu_check.md)"
            else:
                matching = [row for row in table["rows"] if row["world_size"] in (world_size, 1)
                            and row["fp8_head"] == gpu["fp8"] and row["checkpoint_blocks"] == savers.checkpoint_blocks
                            and row["loss_chunk_tokens"] == savers.loss_chunk_tokens]
                if matching:  # the largest: a 1-rank row bounds a world size the table lacks
                    row = max(matching, key=lambda row: row["peak_gib"])
                    peak = f"{row['peak_gib']:.1f} GiB"
                    source = f"table row: {row['world_size']} rank(s) on " + ", ".join(row["gpus"])
                else:
                    peak, source = "not checked", "no table row for this FP8 setting"
            saver_text = (f"`--checkpoint_blocks={savers.checkpoint_blocks} --loss_chunk_tokens={savers.loss_chunk_tokens}`"
                          if savers.checkpoint_blocks or savers.loss_chunk_tokens else "none")
            fits = "" if "does NOT fit" not in notice else " (does NOT fit)"
            lines.append(f"| {gpu['name']} | {world_size} | {'on' if gpu['fp8'] else 'off'} | {saver_text} | "
                         f"{peak}{fits} | {H.usable_memory_gib(gpu['total_memory']):.1f} GiB | {source} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="gpu_check.json files")
    parser.add_argument("--out", type=Path, default=H.MEMORY_TABLE_PATH)
    args = parser.parse_args(argv)
    reports = [read_report(path.resolve()) for path in args.reports]
    table = build_table(reports)
    H.write_file_atomically(args.out, [(json.dumps(table, indent=1) + "\n").encode()])
    print(readme_table(table, reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
