"""The GPU check itself; runs inside the check's venv (CUDA torch build) with the stub libraries preloaded.

    python -m fake_gpu.worker --gpu=h100 --nproc=8 --out=DIR [--no-kernels] [--only=train|eval] [--name=value ...]

It runs train_gpt.py's own code on FakeTensors of a fake GPU, in the order of the training loop:
  1. build_model, torch.compile, build_optimizers, GradientReducer, TrainLoader, as train() does;
  2. validation_loss at step 0 and train_step at step 0: dynamo, AOTAutograd and inductor generate the
     compiled graphs (forward, backward, evaluation) and every Triton kernel;
  3. train_step at the last step and validation_loss at the end, with the last window size: any new
     graph here is a recompile. These two run under MemTracker (predicted peak memory) and the host
     sync counter, so every op the rank runs in one optimizer step and one evaluation is seen: the
     generated wrappers' allocations, Triton launches (skipped), cuBLAS and custom ops (fake
     kernels), the eager optimizers, the stubbed collectives.
  4. each Triton kernel is compiled offline for the GPU's architecture (unless --no-kernels).
Then it writes gpu_check.json and gpu_check.md to --out and prints the table; exit 1 on a fatal finding.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

from . import fake_cuda, kernels, report, wrapper_memory
from .gpus import DEFAULT_GPU, GPUS
from .fake_cuda import custom_op_function
from .peak import PeakMemTracker
from .syncs import HostSyncCounter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GRAPHS: list[dict] = []  # one per compiled graph: kind, wrapper path, FLOPs, extern calls


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default=DEFAULT_GPU, choices=sorted(GPUS), help="the GPU to fake")
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the run (world size); rank 0 is traced")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--no-kernels", action="store_true",
                        help="skip the offline kernel compilation (codegen, graphs, memory and syncs only)")
    parser.add_argument("--only", choices=("train", "eval"), default=None, help="check only training or evaluation")
    parser.add_argument("--commit", default="", help="commit to record when the tree has no .git")
    parser.add_argument("--command", default="", help=argparse.SUPPRESS)  # the user's command line, from the launcher
    return parser.parse_known_args(argv)


# ----------------------------------------------------------------------------------------------------
# Recording the compiled graphs


def custom_op_flops(node) -> int:
    """count_flops_fx runs a custom op's fake kernel, which counts nothing: run its Python code instead.
    Eagerly (force_eager): a torch.compile'd function inside it would otherwise be compiled here, inside
    inductor, fail, and be skipped by dynamo for the rest of the check (the step would then run it eagerly)."""
    from torch._inductor.fx_utils import get_fake_args_kwargs
    from torch.utils.flop_counter import FlopCounterMode
    with fake_cuda.FakeGPUMode(allow_non_fake_inputs=True), torch.compiler.set_stance("force_eager"):
        success, args, kwargs = get_fake_args_kwargs(node)
        if not success:
            return 0
        with FlopCounterMode(display=False) as flop_counter:
            custom_op_function(node.target)(*args, **kwargs)
    return flop_counter.get_total_flops()


def _record_graphs():
    """Wraps inductor's final codegen step to note each graph's kind, wrapper file, FLOPs and extern calls."""
    from torch._inductor.fx_utils import count_flops_fx
    from torch._inductor.graph import GraphLowering
    original = GraphLowering.compile_to_module

    def compile_to_module(self):
        module = original(self)
        kind = "backward" if self.is_backward else "inference" if self.is_inference else "forward"
        flops, uncounted = 0, set()
        for node in self.module.graph.nodes:
            if node.op != "call_function":
                continue
            counted = custom_op_flops(node) if custom_op_function(node.target) else count_flops_fx(node)
            if isinstance(counted, int):
                flops += counted
            elif counted is not None:  # a symbolic count (graph compiled with dynamic shapes)
                uncounted.add("dynamic-shape ops")
            elif "flex_attention" in str(node.target):
                uncounted.add(str(node.target))
        GRAPHS.append(dict(kind=kind, wrapper=module.__file__, flops=flops, uncounted=sorted(uncounted)))
        return module

    GraphLowering.compile_to_module = compile_to_module


# ----------------------------------------------------------------------------------------------------
# Tracing train_gpt.py on the fake GPU


@contextlib.contextmanager
def module_conversion_by_replacement():
    """nn.Module._apply swaps tensors in place when parameters are FakeTensors, which FakeTensors refuse
    (they carry weak references). During build_model, replace parameters and buffers instead."""
    def apply(self, fn, recurse=True):
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(fn(param.detach()),
                                                                  requires_grad=param.requires_grad)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = fn(buffer)
        return self

    original = torch.nn.Module._apply
    torch.nn.Module._apply = apply
    try:
        yield
    finally:
        torch.nn.Module._apply = original


def write_token_shard(path: Path, num_tokens: int):
    """A shard of zeros in the trainer's format, so its own loaders run (token values do not matter)."""
    from harness import SHARD_MAGIC, SHARD_VERSION  # imported after fake_cuda.install, as train_gpt is

    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, num_tokens)
    with open(path, "wb") as file:
        file.write(header.tobytes())
        file.write(np.zeros(num_tokens, dtype="<u2").tobytes())


def paused_during(batches, counter: HostSyncCounter):
    """Data loading (shard slicing and its copy to the device) is excluded from the sync count."""
    while True:
        with counter.pause():
            item = next(batches)
        yield item


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return dict(graphs=sum(counters["stats"].get(key, 0) for key in ("unique_graphs",)),
                breaks=dict(counters["graph_break"]))


def memory_breakdown(tracker) -> dict:
    peak = tracker.get_tracker_snapshot("peak")
    for device, categories in peak.items():
        if torch.device(device).type == "cuda":
            return {name: int(value) for name, value in categories.items()}
    return {}


LAST_MICRO_STEP, BACKWARD_DONE = "<last micro-step>", "<gradients reduced>"


def mark_calls(obj, method: str, counter: HostSyncCounter, label: str):
    """Marks each call of obj.method in the counter's op order."""
    original = getattr(obj, method)

    def marked(*args, **kwargs):
        counter.mark(label)
        return original(*args, **kwargs)

    setattr(obj, method, marked)


def trace(T, s, runtime, gpu, only: str | None, work_dir: Path) -> dict:
    results = dict(phases={}, errors=[])
    fake_mode = fake_cuda.FakeGPUMode(allow_non_fake_inputs=True, run_custom_ops=True)
    shard = work_dir / "tokens.bin"
    write_token_shard(shard, max(s.train_batch_tokens, s.val_tokens) + 1)
    do_train, do_eval = only in (None, "train"), only in (None, "eval")
    # host-side data is real (read from the shard outside the fake mode); only device tensors are fake
    val_tokens = T.load_val_tokens([shard], s) if do_eval else None
    counter = HostSyncCounter("cuda")
    batches = paused_during(iter(T.TrainLoader([shard], s, runtime)), counter)
    with fake_mode:
        with module_conversion_by_replacement():
            raw_model = T.build_model(s, runtime)
        eval_model = T.compile_model(raw_model) if s.compile else raw_model  # training: raw_model's regions
        optimizers = T.build_optimizers(raw_model, s, runtime)
        reducer = T.GradientReducer(raw_model.parameters(), runtime)
        mark_calls(reducer, "start_last_micro_step", counter, LAST_MICRO_STEP)
        mark_calls(reducer, "finish", counter, BACKWARD_DONE)
        last_step = s.num_iterations - 1

        def run(phase: str, fn):
            before = dynamo_counts()
            launches_before = sum(fake_cuda.LAUNCHES.values())
            started = time.perf_counter()
            try:
                fn()
                error = None
            except DataDependentOutputException as exc:
                error = None if exc.func is torch.ops.aten._local_scalar_dense.default else repr(exc)
            except Exception as exc:  # a compile or trace failure is the check's finding
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
                frames = [f"{frame.filename}:{frame.lineno} {frame.line}" for frame in traceback.extract_tb(exc.__traceback__)
                          if "site-packages" not in frame.filename]
                results["errors"].append(dict(phase=phase, error=error, frames=frames,
                                              traceback=traceback.format_exc()[-3000:]))
            after = dynamo_counts()
            results["phases"][phase] = dict(
                seconds=round(time.perf_counter() - started, 1), error=error,
                graphs_compiled=after["graphs"] - before["graphs"],
                graph_breaks=sum(after["breaks"].values()) - sum(before["breaks"].values()),
                break_reasons=sorted(set(after["breaks"]) - set(before["breaks"])),
                triton_launches=sum(fake_cuda.LAUNCHES.values()) - launches_before)
            return error is None

        # 1-2: first window: compile, as at the start of training (validation at step 0 comes first).
        # No dispatch mode may be active here (dynamo would not compile), so a host read of a FakeTensor
        # (`.item()`) ends the call: by then its graphs exist, and the counted phases see the whole call.
        if do_eval:
            run("eval_first_window", lambda: T.validation_loss(eval_model, val_tokens, 0, s, runtime))
            raw_model.train()
        if do_train:
            run("train_first_window", lambda: T.train_step(raw_model, optimizers, reducer, batches, 0, s, runtime))
        # 3: last window, counted: syncs, copies, memory, recompiles
        for phase, enabled, fn in (
                ("train_last_window", do_train, lambda: T.train_step(raw_model, optimizers, reducer, batches, last_step, s, runtime)),
                ("eval_last_window", do_eval, lambda: T.validation_loss(eval_model, val_tokens, s.num_iterations, s, runtime))):
            if not enabled or results["errors"]:
                continue
            tracker = PeakMemTracker()
            tracker.track_external(raw_model, *optimizers)
            counter.clear()
            with tracker, counter:
                ok = run(phase, fn)
            if ok:
                results["phases"][phase].update(
                    memory=memory_breakdown(tracker), largest_at_peak=tracker.largest_at_peak(), syncs=counter.summary(),
                    sync_count=counter.count("sync"), h2d_count=counter.count("h2d"),
                    op_counts=dict(counter.op_counts),
                    overlap=counter.communication_overlap(LAST_MICRO_STEP, BACKWARD_DONE))
    results["parameters"] = sum(p.numel() for p in raw_model.parameters())
    return results


# ----------------------------------------------------------------------------------------------------
# Graph details and kernels


def graph_details(s) -> list[dict]:
    details = []
    for graph in GRAPHS:
        source = Path(graph["wrapper"]).read_text()
        plan = wrapper_memory.replay(source)
        tokens = s.val_seq_len if graph["kind"] == "inference" else s.train_seq_len  # per call of the model
        details.append(dict(
            kind=graph["kind"], wrapper=graph["wrapper"], triton_kernels=report.count_triton_kernels(source),
            extern_calls=report.count_extern_calls(source), flops=graph["flops"],
            flops_per_token=graph["flops"] / tokens, flops_not_counted=graph["uncounted"],
            plan_peak_bytes=plan.peak_bytes, plan_live_at_return_bytes=plan.live_at_return_bytes,
            plan_symbolic_allocations=plan.symbolic_allocations))
    return details


def compile_all_kernels(gpu) -> list[kernels.KernelResult]:
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for index, (name, source) in enumerate(sorted(fake_cuda.TRITON_KERNELS.items())):
        results.append(kernels.compile_kernel(name, source, cuobjdump))
        if (index + 1) % 10 == 0:
            print(f"gpu_check: compiled {index + 1}/{len(fake_cuda.TRITON_KERNELS)} kernels for sm_{gpu.arch}",
                  file=sys.stderr, flush=True)
    return results


def main(argv: list[str]) -> int:
    args, trainer_args = parse_args(argv)
    gpu = GPUS[args.gpu]
    fake_cuda.install(gpu)
    _record_graphs()
    import train_gpt as T
    try:
        s = T.parse_settings(trainer_args)
        if args.nproc < 1:
            raise T.SettingsError(f"--nproc={args.nproc}: must be at least 1")
        runtime = T.resolve_runtime(s, 0, args.nproc, 0)
        if runtime.device.type != "cuda":
            raise T.SettingsError("the GPU check traces the CUDA path: drop --device=cpu")
    except T.SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.nproc > 1:  # collectives are stubbed: a fake process group answers them without communicating
        from torch.testing._internal.distributed.fake_pg import FakeStore
        torch.distributed.init_process_group("fake", rank=0, world_size=args.nproc, store=FakeStore())
    commit = report.git_commit(REPO)  # before tracing: the tree may change during a long check
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work_dir:
        traced = trace(T, s, runtime, gpu, args.only, Path(work_dir))
    traced["trace_seconds"] = round(time.perf_counter() - started, 1)
    traced["graphs"] = graph_details(s)
    traced["triton_kernels"] = len(fake_cuda.TRITON_KERNELS)
    if not args.no_kernels and fake_cuda.TRITON_KERNELS:
        started = time.perf_counter()
        compiled = compile_all_kernels(gpu)
        traced["kernel_compile_seconds"] = round(time.perf_counter() - started, 1)
        traced["kernels"] = kernels.judge(compiled, gpu.shared_memory_per_block_optin)
        traced["kernel_details"] = [result.to_json() for result in compiled]
    results = report.assemble(traced, gpu, s, runtime, args, trainer_args, commit)
    text = report.render_markdown(results)
    print(text)
    if args.out is not None:
        report.write(results, text, args.out)
        print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", file=sys.stderr)
    return 1 if results["fatal"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
