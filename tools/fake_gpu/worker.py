"""The GPU check itself; runs inside the check's venv (CUDA torch build) with the stub libraries preloaded.

    python -m fake_gpu.worker [--recipe=train_gpt.py] --gpu=h100 --nproc=8 --out=DIR [--no-kernels] [--only=train|eval]
                              [--name=value ...]

It runs the recipe's own code on FakeTensors of a fake GPU, in the order of the training loop. For
the record-21 recipe (records/track_1_short/2025-02-01_Record21/train_gpt.py; trace_record21):
  1. build_model, torch.compile, build_optimizers, GradientReducer, TrainLoader, as train() does;
  2. validation_loss at step 0 and train_step at step 0: dynamo, AOTAutograd and inductor generate the
     compiled graphs (forward, backward, evaluation) and every Triton kernel;
  3. train_step at the last step and validation_loss at the end, with the last window size: any new
     graph here is a recompile. These two run under MemTracker (predicted peak memory) and the host
     sync counter, so every op the rank runs in one optimizer step and one evaluation is seen: the
     generated wrappers' allocations, Triton launches (skipped), cuBLAS and custom ops (fake
     kernels), the eager optimizers, the stubbed collectives.
  4. each Triton kernel is compiled offline for the GPU's architecture (unless --no-kernels).
For train_gpt.py (the default, record 89; trace_record89): first windows as above, then the recipe's warm-up
(every warm-up step, every validation window pair), then one counted training step per stage (tied stages 0
and 1, the untie step, untied stage 2, the extension) and the final validation, each of which must compile
nothing (see trace_record89).
Then it writes gpu_check.json and gpu_check.md to --out and prints the table; exit 1 on a fatal finding.
"""

import argparse
import contextlib
import dataclasses
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
from records.recipes import RECORD21, load_recipe  # noqa: E402

GRAPHS: list[dict] = []  # one per compiled graph: kind, wrapper path, FLOPs, extern calls
CURRENT = dict(tokens=None)  # tokens per call of the model in the call now running (graphs compiled there)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="train_gpt.py",
                        help="the recipe file to check, relative to the repository (train_gpt.py or a record's under records/)")
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
        GRAPHS.append(dict(kind=kind, wrapper=module.__file__, flops=flops, uncounted=sorted(uncounted),
                           tokens=CURRENT["tokens"]))
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


def run_phase(results: dict, phase: str, fn) -> bool:
    """Runs one phase and records its graphs compiled, graph breaks, Triton launches and error (a compile or
    trace failure is the check's finding). A host read of a FakeTensor (`.item()`) ends the call normally."""
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


def run_counted_phase(results: dict, phase: str, fn, counter: HostSyncCounter, track, **flags) -> bool:
    """run_phase under MemTracker (predicted peak memory) and the host sync counter: syncs, copies, op counts,
    all-reduce overlap. track(tracker) registers the tensors that exist before the phase (model, optimizers).
    flags (e.g. counted=True, syncs_fatal=True) are stored with the phase for the findings."""
    tracker = PeakMemTracker()
    track(tracker)
    counter.clear()
    with tracker, counter:
        ok = run_phase(results, phase, fn)
    if ok:
        results["phases"][phase].update(
            memory=memory_breakdown(tracker), largest_at_peak=tracker.largest_at_peak(), syncs=counter.summary(),
            sync_count=counter.count("sync"), h2d_count=counter.count("h2d"),
            op_counts=dict(counter.op_counts),
            overlap=counter.communication_overlap(LAST_MICRO_STEP, BACKWARD_DONE), **flags)
    return ok


def trace_record21(T, s, runtime, gpu, only: str | None, work_dir: Path) -> dict:
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

        # 1-2: first window: compile, as at the start of training (validation at step 0 comes first).
        # No dispatch mode may be active here (dynamo would not compile), so a host read of a FakeTensor
        # (`.item()`) ends the call: by then its graphs exist, and the counted phases see the whole call.
        if do_eval:
            run_phase(results, "eval_first_window", lambda: T.validation_loss(eval_model, val_tokens, 0, s, runtime))
            raw_model.train()
        if do_train:
            run_phase(results, "train_first_window",
                      lambda: T.train_step(raw_model, optimizers, reducer, batches, 0, s, runtime))
        # 3: last window, counted: syncs, copies, memory, recompiles
        for phase, enabled, fn in (
                ("train_last_window", do_train, lambda: T.train_step(raw_model, optimizers, reducer, batches, last_step, s, runtime)),
                ("eval_last_window", do_eval, lambda: T.validation_loss(eval_model, val_tokens, s.num_iterations, s, runtime))):
            if not enabled or results["errors"]:
                continue
            run_counted_phase(results, phase, fn, counter, lambda tracker: tracker.track_external(raw_model, *optimizers))
    results["parameters"] = sum(p.numel() for p in raw_model.parameters())
    return results


# ----------------------------------------------------------------------------------------------------
# Tracing the record-89 recipe (train_gpt.py) on the fake GPU


BOS_EVERY = 1000  # the record-89 shard: a document start (BOS) every this many tokens


def write_document_shard(path: Path, num_tokens: int, bos: int):
    """A shard in the trainer's format whose documents are BOS_EVERY tokens long (the record-89 loader cuts
    documents at BOS); the other tokens are zeros (token values do not matter on FakeTensors)."""
    from harness import SHARD_MAGIC, SHARD_VERSION

    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, num_tokens)
    tokens = np.zeros(num_tokens, dtype="<u2")
    tokens[::BOS_EVERY] = bos
    with open(path, "wb") as file:
        file.write(header.tobytes())
        file.write(tokens.tobytes())


def host_read_ends(fn):
    """Runs fn; a host read of a FakeTensor (validation_loss's final `.item()`) ends it, as in run_phase."""
    try:
        fn()
    except DataDependentOutputException as exc:
        if exc.func is not torch.ops.aten._local_scalar_dense.default:
            raise


def optimizer_tensors(optimizers, parameters) -> list[torch.Tensor]:
    """Every tensor the recipe's own optimizers hold (moments, second moments, mantissa sidecars, ...), found by
    walking their attributes; the parameters themselves are the model's. MemTracker knows only torch.optim."""
    found, seen, skip = [], set(), {id(p) for p in parameters}

    def walk(obj, depth):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in skip and not isinstance(obj, torch.nn.Parameter):
                found.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for value in vars(obj).values():
                walk(value, depth + 1)

    for optimizer in optimizers:
        walk(optimizer, 0)
    return found


def track_model_and_optimizers(model, optimizers):
    from torch.distributed._tools.mem_tracker import _MemRefType

    def track(tracker):
        tracker.track_external(model)
        for tensor in optimizer_tensors(optimizers, list(model.parameters())):
            tracker._update_and_maybe_create_winfos(tensor, _MemRefType.OPT)
    return track


def device_batches(R, loader, device, counter: HostSyncCounter):
    """loader (a DocumentLoader on the CPU, real tensors) cuts each slot on the host, outside the fake mode; the
    slot then goes to the device and is converted there exactly as DocumentLoader.next_batch does on CUDA. The
    host-to-device copy is data loading, excluded from the sync count (as in record 21's trace)."""
    from torch.utils._python_dispatch import _disable_current_modes
    original = loader.next_batch

    def next_batch(slot_tokens: int, max_doc_len: int):
        with _disable_current_modes():
            host = original(slot_tokens, max_doc_len)
            buffer = torch.cat([host.inputs, host.targets[-1:].to(torch.int32)]).to(torch.uint16)
        with counter.pause():
            buffer = buffer.to(device, non_blocking=True)
        inputs = buffer[:-1].to(torch.int32)
        return R.Batch(inputs, buffer[1:].to(torch.int64), R.document_ids_of(inputs))

    loader.next_batch = next_batch
    return loader


def trace_record89(R, s, runtime, gpu, only: str | None, work_dir: Path) -> dict:
    """Record 89 (train_gpt.py), in the order of its train():
    - build_model, compile_model (--compile), build_optimizers, GradientCommunicator, StepInputs (with a prefix
      table of -1: the real one needs tiktoken, which the check's venv lacks; values do not matter here),
      DocumentLoader over a shard written here (a BOS every BOS_EVERY tokens);
    - eval_first_window: validation_loss with step 0's windows; train_first_window: train_step at step 0;
    - warm_up: what warm_up_kernels runs (one validation sequence per window pair validated while tied, every
      step of warmup_steps, one per untied window pair), each validation ending at its host read; then the
      warm-up's restore, by hand (load_state_dict's host reads of `tied` and `long_window_tokens` cannot run
      on FakeTensors; values do not matter, the Python state does): tied again, no long window yet, Adam's
      update count 0, gradients cleared;
    - counted (MemTracker, sync counter; any graph compiled is a recompile): one step per stage in run order
      (stage 0, stage 1, the untie step, untied stage 2, the extension), then the final validation."""
    results = dict(phases={}, errors=[])
    fake_mode = fake_cuda.FakeGPUMode(allow_non_fake_inputs=True, run_custom_ops=True)
    do_train, do_eval = only in (None, "train"), only in (None, "eval")
    last_step = s.num_iterations - 1
    counted_steps = []  # (phase, step): the third step of each stage and the untie step, in run order
    untied = False
    for index, stage in enumerate(R.stages(s).scheduled):
        step = min(stage.start + 2, stage.end - 1)
        if not untied and step > s.split_step:
            counted_steps.append((f"train_untie_step{s.split_step}", s.split_step))
            untied = True
        counted_steps.append((f"train_stage{index}{'_untied' if untied else ''}_step{step}", step))
    if R.stages(s).extension.steps:
        counted_steps.append((f"train_extension_step{last_step}", last_step))
    steps_run = [0, *R.warmup_steps(s), *(step for _, step in counted_steps)]
    train_tokens = sum(R.step_plan(step, s).batch_tokens * BOS_EVERY // min(R.step_plan(step, s).max_doc_len, BOS_EVERY)
                       + s.slots_per_step * BOS_EVERY for step in steps_run)
    shard = work_dir / "tokens.bin"
    write_document_shard(shard, max(train_tokens * 5 // 4, s.val_tokens + 1), R.BOS)
    val_tokens = R.load_val_tokens([shard], s) if do_eval else None
    counter = HostSyncCounter("cuda")
    cpu_runtime = dataclasses.replace(runtime, device=torch.device("cpu"))
    loader = device_batches(R, R.DocumentLoader([shard], s, cpu_runtime), runtime.device, counter) if do_train else None
    # StepInputs' prefix table comes from tiktoken (absent in the check's venv): a table of -1, the same shape
    padded_vocab = R.padded_vocab_size(s.vocab_size)
    R.build_prefix_table = lambda vocab_size, padded, cache_dir=None: torch.full((padded,), -1, dtype=torch.int64)
    one_sequence = dataclasses.replace(s, val_tokens=s.val_seq_len)
    windows_of = {tied: sorted({R.validation_windows_at(step, s) for step in R.validation_steps(s)
                                if (step <= s.split_step) == tied}) for tied in (True, False)}
    with fake_mode:
        with module_conversion_by_replacement():
            model = R.build_model(s, runtime)
        if s.compile:
            R.compile_model(model)
        optimizers = R.build_optimizers(model, s, runtime)
        communicator = R.GradientCommunicator(optimizers, s, runtime)
        inputs = R.StepInputs(s, runtime.device)
        assert inputs.prefix_table.shape == (padded_vocab,)
        mark_calls(communicator, "start_last_micro_step", counter, LAST_MICRO_STEP)
        mark_calls(communicator, "finish", counter, BACKWARD_DONE)

        def train(step: int):
            plan = R.step_plan(step, s)
            CURRENT["tokens"] = plan.slot_tokens
            R.train_step(model, optimizers, communicator, loader, plan, inputs, s, runtime)

        def validate(windows, settings):
            CURRENT["tokens"] = s.val_seq_len
            host_read_ends(lambda: R.validation_loss(model, val_tokens, tuple(windows), settings, runtime))

        def warm_up():
            if do_eval:
                for windows in windows_of[True]:
                    validate(windows, one_sequence)
            if do_train:
                for step in R.warmup_steps(s):
                    train(step)
            elif model.embedding_is_head:  # --only=eval: untie as the split step would
                model.untie()
                R.untie_optimizer_state(optimizers)
            if do_eval:
                for windows in windows_of[False]:
                    validate(windows, one_sequence)
            # warm_up_kernels' restore, the Python state by hand (see the docstring)
            with torch.no_grad():
                model.tied.fill_(True)
                model.long_window_tokens.fill_(0)
            model.embedding_is_head, model.long_window = True, 0
            for optimizer in optimizers:
                if hasattr(optimizer, "updates"):
                    optimizer.updates = 0
            model.zero_grad(set_to_none=True)

        if do_eval:
            run_phase(results, "eval_first_window", lambda: validate(R.validation_windows_at(0, s), s))
        if do_train:
            run_phase(results, "train_first_window", lambda: train(0))
        if not results["errors"]:
            run_phase(results, "warm_up", warm_up)
        track = track_model_and_optimizers(model, optimizers)
        for phase, step in counted_steps if do_train else []:
            if results["errors"]:
                break
            run_counted_phase(results, phase, (lambda step=step: train(step)), counter, track,
                              counted=True, syncs_fatal=True, step=step, stage=R.step_plan(step, s).stage)
        if do_eval and not results["errors"]:
            if model.embedding_is_head:  # --only=eval: the final validation is untied
                model.untie()
                R.untie_optimizer_state(optimizers)
            run_counted_phase(results, "eval_final", lambda: validate(R.final_windows(s), s), counter, track,
                              counted=True, step=s.num_iterations)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    slot_sizes = ", ".join(f"{slot_tokens:,}" for slot_tokens, _ in R.stage_slot_sizes(s))
    results["step_shape"] = (f"rank 0 of {runtime.world_size}: {len(runtime.slots(s))} slot(s) (micro-steps) per "
                             f"optimizer step of {slot_sizes} tokens in stages 0-{len(R.stages(s).scheduled) - 1} "
                             f"(the extension keeps the last); evaluation sequences of {s.val_seq_len} tokens; "
                             "StepInputs' prefix table replaced by -1 (tiktoken is not in the check's venv)")
    return results


# ----------------------------------------------------------------------------------------------------
# Graph details and kernels


def graph_details(s) -> list[dict]:
    details = []
    for graph in GRAPHS:
        source = Path(graph["wrapper"]).read_text()
        plan = wrapper_memory.replay(source)
        tokens = graph["tokens"]  # per call of the model, where the trace said (record 89: per stage)
        if tokens is None:
            tokens = s.val_seq_len if graph["kind"] == "inference" else getattr(s, "train_seq_len", None)
        details.append(dict(
            kind=graph["kind"], wrapper=graph["wrapper"], triton_kernels=report.count_triton_kernels(source),
            extern_calls=report.count_extern_calls(source), flops=graph["flops"],
            flops_per_token=graph["flops"] / tokens if tokens else None, tokens_per_call=tokens, flops_not_counted=graph["uncounted"],
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
    recipe = (REPO / args.recipe).resolve()
    if not recipe.is_relative_to(REPO) or recipe.suffix != ".py" or not recipe.is_file():
        print(f"error: --recipe={args.recipe}: not a .py file in the repository {REPO} (train_gpt.py, or "
              f"{RECORD21.relative_to(REPO)})", file=sys.stderr)
        return 2
    T = load_recipe(recipe)
    trace = trace_record89 if hasattr(T, "warmup_steps") else trace_record21
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
    traced["recipe"] = str(recipe.relative_to(REPO))
    traced["trace_seconds"] = round(time.perf_counter() - started, 1)
    traced["graphs"] = graph_details(s)
    traced["triton_kernels"] = len(fake_cuda.TRITON_KERNELS)
    if fake_cuda.UNPADDED_MATMULS:
        traced["unpadded_matmuls"] = sorted(set(fake_cuda.UNPADDED_MATMULS))
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
