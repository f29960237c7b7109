"""Findings, JSON and Markdown of the GPU check (standard library only, so it is unit-tested anywhere)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
EXTERN_CALL = re.compile(r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")
TRITON_DEFINITION = re.compile(r"= async_compile\.triton\(")
# ops that run outside Triton, per optimizer step (cuBLAS matmuls, FP8 matmuls, fused Adam, collectives)
EXTERN_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::_fused_adam_",
              "c10d::allreduce_", "c10d::allgather_", "c10d::reduce_scatter_", "c10d::_allgather_base_",
              "c10d::_reduce_scatter_base_")


def count_extern_calls(wrapper_source: str) -> dict[str, int]:
    """Calls in a generated wrapper that are not Triton kernels: cuBLAS via extern_kernels, and ops."""
    counts: dict[str, int] = {}
    start = wrapper_source.find("def call(")
    for name in EXTERN_CALL.findall(wrapper_source[start:] if start >= 0 else ""):
        counts[name] = counts.get(name, 0) + 1
    return counts


def count_triton_kernels(wrapper_source: str) -> int:
    return len(TRITON_DEFINITION.findall(wrapper_source))


def git_commit(repo: Path) -> tuple[str, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo, capture_output=True, timeout=10)
        return commit.stdout.strip(), dirty.returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None


def findings(traced: dict, gpu_total_memory: int, gpu_name: str, has_fp8: bool) -> tuple[list[str], list[str]]:
    """(fatal, notes): fatal findings make the check fail; notes are reported only."""
    fatal, notes = [], []
    for error in traced.get("errors", []):
        fatal.append(f"{error['phase']}: {error['error']}")
    for phase, info in traced.get("phases", {}).items():
        if info.get("graph_breaks"):
            fatal.append(f"{phase}: {info['graph_breaks']} graph break(s): {'; '.join(info['break_reasons'])[:300]}")
        if info.get("counted", phase.endswith("last_window")) and info.get("graphs_compiled"):
            fatal.append(f"{phase}: {info['graphs_compiled']} graph(s) compiled after the first window and the "
                         "warm-up (recompiles)")
        peak = info.get("memory", {}).get("Total")
        if peak is not None and peak > gpu_total_memory:
            fatal.append(f"{phase}: predicted peak memory {peak / GIB:.1f} GiB exceeds the {gpu_name}'s "
                         f"{gpu_total_memory / GIB:.1f} GiB")
        # eager calls are aten::_scaled_mm, compiled code's aten::_scaled_mm.out
        if not has_fp8 and any(count for name, count in info.get("op_counts", {}).items()
                               if name.split(".")[0] == "aten::_scaled_mm"):
            fatal.append(f"{phase}: FP8 matmuls (torch._scaled_mm) need compute capability 8.9 or newer, which the "
                         f"{gpu_name} lacks: run with --fp8_head=false")
        if info.get("sync_count") and info.get("syncs_fatal"):
            fatal.append(f"{phase}: {info['sync_count']} host-device sync(s) in a training step")
        elif info.get("sync_count"):
            notes.append(f"{phase}: {info['sync_count']} host-device sync(s)")
    if traced.get("unpadded_matmuls"):
        notes.append(f"{len(traced['unpadded_matmuls'])} compute-bound matmul shape(s) with unaligned sizes: inductor "
                     "decides whether to pad them by timing on the GPU; the check assumes no padding (see "
                     "gpu_check.json, unpadded_matmuls)")
    kernel_summary = traced.get("kernels")
    if kernel_summary:
        fatal.extend(kernel_summary["fatal"])
        notes.extend(kernel_summary["notes"])
        if kernel_summary["kernels_with_stack"]:
            notes.append(f"register spills (stack > 0) in {len(kernel_summary['kernels_with_stack'])} kernel(s): "
                         + ", ".join(kernel_summary["kernels_with_stack"]))
    return fatal, notes


def assemble(traced: dict, gpu, s, runtime, args, trainer_args: list[str], commit: tuple[str, bool | None]) -> dict:
    import dataclasses

    import torch
    import triton
    commit, dirty = commit
    if args.commit:
        commit, dirty = args.commit, None
    fatal, notes = findings(traced, gpu.total_memory, gpu.name, gpu.has_fp8)
    meta = dict(
        tool="tools/gpu_check.py", command=args.command or " ".join(["python tools/gpu_check.py", *sys.argv[1:]]),
        git_commit=commit, git_dirty=dirty, torch_version=torch.__version__, cuda_version=torch.version.cuda,
        triton_version=triton.__version__, python_version=sys.version.split()[0],
        gpu=dict(key=gpu.key, name=gpu.name, arch=f"sm_{gpu.arch}", total_memory=gpu.total_memory,
                 shared_memory_per_block_optin=gpu.shared_memory_per_block_optin, fp8=gpu.has_fp8),
        world_size=runtime.world_size, grad_accum_steps=getattr(runtime, "grad_accum_steps", None), trainer_args=trainer_args,
        settings=dataclasses.asdict(s), kernels_compiled=not args.no_kernels,
        host=os.uname().nodename, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        memory_estimator="torch.distributed._tools.mem_tracker.MemTracker over the whole step on FakeTensors",
        flop_counter="torch.utils.flop_counter via torch._inductor.fx_utils.count_flops_fx on each post-grad graph")
    return dict(meta=meta, fatal=fatal, notes=notes, **traced)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def render_markdown(results: dict) -> str:
    meta, gpu = results["meta"], results["meta"]["gpu"]
    lines = [
        f"# GPU check of {results.get('recipe', 'train_gpt.py')}: {gpu['name']} ({gpu['arch']}), "
        f"{meta['world_size']} rank(s), commit {meta['git_commit']}",
        "",
        f"- recipe: `{results.get('recipe', 'train_gpt.py')}`",
        f"- command: `{meta['command']}`",
        f"- commit: {meta['git_commit']}" + (" (tracked files modified)" if meta["git_dirty"] else ""),
        f"- torch {meta['torch_version']} (CUDA {meta['cuda_version']}), triton {meta['triton_version']}, "
        f"python {meta['python_version']}, on {meta['host']} with no GPU: a fake {gpu['name']}",
        f"- {results['step_shape']}" if results.get("step_shape") else
        f"- rank 0 of {meta['world_size']}: {meta['grad_accum_steps']} micro-step(s) of "
        f"{meta['settings']['train_seq_len']} tokens per optimizer step; evaluation sequences of "
        f"{meta['settings']['val_seq_len']} tokens",
        f"- result: **{'FAIL' if results['fatal'] else 'PASS'}**"
        + ("" if meta["kernels_compiled"] else " (kernels not compiled: --no-kernels)"),
        "",
        "| phase | graphs compiled | graph breaks | Triton launches | host syncs | H2D copies | predicted peak | error |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for phase, info in results.get("phases", {}).items():
        lines.append(f"| {phase} | {info['graphs_compiled']} | {info['graph_breaks']} | {info['triton_launches']} | "
                     f"{info.get('sync_count', '-')} | {info.get('h2d_count', '-')} | "
                     f"{_gib(info.get('memory', {}).get('Total'))} | {info['error'] or ''} |")
    lines += ["", f"Predicted peak memory against the {gpu['name']}'s {_gib(gpu['total_memory'])} "
              f"(MemTracker categories at the peak; CUDA context and allocator fragmentation not included):", "",
              "| phase | total | parameters | gradients | optimizer state | activations | temporaries | other |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, info in results.get("phases", {}).items():
        memory = info.get("memory")
        if memory:
            lines.append(f"| {phase} | {_gib(memory.get('Total'))} | {_gib(memory.get('Parameter'))} | "
                         f"{_gib(memory.get('Gradient'))} | {_gib(memory.get('Optstate'))} | "
                         f"{_gib(memory.get('Activation'))} | {_gib(memory.get('Temp'))} | "
                         f"{_gib(memory.get('Other', 0) + memory.get('Buffer', 0))} |")
    for phase, info in results.get("phases", {}).items():
        if info.get("largest_at_peak"):
            lines += ["", f"Largest tensors live at the peak of {phase} (64 MiB or more; where the step allocated them):",
                      "", "| size | count | category | allocated by |", "|---:|---:|---|---|"]
            lines += [f"| {_gib(row['bytes'])} | {row['count']} | {row['category']} | `{row['allocated']}` |"
                      for row in info["largest_at_peak"]]
    lines += ["", "Compiled graphs (FLOPs from torch.utils.flop_counter; allocation plan replayed from the wrapper):", "",
              "| graph | Triton kernels | extern calls | GFLOP per call | FLOPs per token | not counted | plan peak | plan live at return |",
              "|---|---:|---|---:|---:|---|---:|---:|"]
    for graph in results.get("graphs", []):
        externs = ", ".join(f"{name.split('.')[-2] if name.endswith('default') else name.split('.')[-1]} x{count}"
                            for name, count in graph["extern_calls"].items())
        lines.append(f"| {graph['kind']} | {graph['triton_kernels']} | {externs} | {graph['flops'] / 1e9:.1f} | "
                     f"{'-' if graph['flops_per_token'] is None else format(graph['flops_per_token'] / 1e6, '.1f') + ' M'} | {', '.join(graph['flops_not_counted']) or '-'} | "
                     f"{_gib(graph['plan_peak_bytes'])} | {_gib(graph['plan_live_at_return_bytes'])} |")
    kernel_summary = results.get("kernels")
    lines += [""]
    if kernel_summary:
        lines += [f"Triton kernels compiled offline for {gpu['arch']} (triton's ptxas): "
                  f"{kernel_summary['compiled']}/{kernel_summary['kernels']} compiled; largest shared memory "
                  f"{kernel_summary['max_shared']} B of {gpu['shared_memory_per_block_optin']} B per block; most registers "
                  f"{kernel_summary['max_registers']}; kernels with stack (spills): "
                  f"{len(kernel_summary['kernels_with_stack'])}. Compile time {results.get('kernel_compile_seconds')} s.", ""]
    else:
        lines += [f"Triton kernels generated: {results.get('triton_kernels', 0)} (not compiled).", ""]
    for phase, info in results.get("phases", {}).items():
        if info.get("syncs"):
            lines += [f"Host syncs and host-to-device copies in {phase} (outside data loading):", "",
                      "| kind | op | count | where | code |", "|---|---|---:|---|---|"]
            lines += [f"| {row['kind']} | {row['op']} | {row['count']} | {row['where']} | `{row['code']}` |"
                      for row in info["syncs"]]
            lines += [""]
        overlap = info.get("overlap") or {}
        if overlap.get("all_reduces"):
            lines += [f"Gradient all-reduce overlap in {phase}: {overlap['all_reduces']} bucket all-reduce(s) launched "
                      f"during the last micro-step; {overlap['matmuls_after_first_all_reduce']} of its "
                      f"{overlap['matmuls']} matmul calls were queued after the first of them, so they can run "
                      "while it is in flight (0 when the whole backward is one compiled graph).", ""]
        externs = {name: count for name, count in info.get("op_counts", {}).items() if name in EXTERN_OPS}
        if externs:
            lines += [f"Calls outside Triton in {phase}: " + ", ".join(f"{name} x{n}" for name, n in externs.items()), ""]
    lines += ["Fatal findings:", ""] + [f"- {item}" for item in results["fatal"] or ["none"]]
    lines += ["", "Notes:", ""] + [f"- {item}" for item in results["notes"] or ["none"]]
    lines += ["", f"Trace {results.get('trace_seconds')} s. What this cannot establish: no kernel runs, so no "
              "numerics, no timing, no NCCL, no autotuning, and no run-time launch limits; the memory figure is a "
              "prediction of allocated bytes."]
    return "\n".join(lines) + "\n"


def write(results: dict, markdown: str, out: Path):
    # imported here, not at the top: harness (torch) may be imported only after fake_cuda.install (worker.main)
    from harness import write_file_atomically
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / "gpu_check.json", [(json.dumps(results, indent=1, default=str) + "\n").encode()])
    write_file_atomically(out / "gpu_check.md", [markdown.encode()])
