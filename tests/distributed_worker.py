"""Run under torchrun (gloo, CPU) by tests/test_train_distributed.py; also runs as a single process.

  python distributed_worker.py muon OUT      Muon on fixed random gradients; saves the final params
  python distributed_worker.py train OUT ... a few real training steps of the tiny model (float64);
                                             saves per-step losses (averaged over ranks) and params
  python distributed_worker.py train_fp32 OUT ...  the same in float32 (for the FP8 head)
  python distributed_worker.py reduce OUT    bucketed overlapped gradient reduction vs an all-reduce after
                                             backward, 2 micro-steps; saves both and the event order
Each rank writes OUT.rank<r>.pt.
  python distributed_worker.py trainer STOP ... train_gpt.train() in float64 with the given settings; with
                                             STOP = "K@R" rank R receives SIGTERM during step K (the real
                                             handler and agreement), "-" for none. Writes the run's own files.
"""
import copy
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness as H  # noqa: E402
from records.recipes import record21  # noqa: E402

T = record21()  # the record-21 recipe kept under records/

# Odd counts: some ranks idle in a group. Muon groups by element count: (32, 16) with (16, 32), and
# (16, 48) with (3, 16, 16).
MUON_SHAPES = [(32, 16)] * 3 + [(16, 32)] * 2 + [(16, 48)] * 3 + [(3, 16, 16)]
MUON_STEPS = 4


def muon_parameters_and_gradients():
    """Identical on every rank: parameters and one gradient per step per parameter."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in MUON_SHAPES]
    grads = [[torch.randn(shape, generator=generator) for shape in MUON_SHAPES] for _ in range(MUON_STEPS)]
    return params, grads


def run_muon(rank: int, world_size: int) -> dict:
    params, grads = muon_parameters_and_gradients()
    muon = T.Muon(params, lr=0.05, momentum=0.95, ns_steps=5, ns_dtype=torch.float32, rank=rank,
                  world_size=world_size)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        muon.step()
    return {"params": [p.detach().clone() for p in params]}


def run_training(rank: int, world_size: int, args: list[str], dtype: torch.dtype) -> dict:
    # float64 parameters: in fp32, gradients that are pure reduction-order noise (~1e-9) exceed Adam's
    # eps (1e-10) and become +-lr steps, so 1 and 2 ranks would drift apart for no real reason.
    # float32 only for the FP8 head (_scaled_mm has no float64 output).
    torch.set_default_dtype(dtype)
    settings = T.parse_settings(args)
    runtime = T.resolve_runtime(settings, rank, world_size, 0)
    model = T.build_model(settings, runtime)
    optimizers = T.build_optimizers(model, settings, runtime)
    reducer = T.GradientReducer(model.parameters(), runtime)
    batches = T.TrainLoader(T.find_shards(settings.train_files, "train_files"), settings, runtime)
    losses = []
    for step in range(settings.num_iterations):
        loss = T.train_step(model, optimizers, reducer, batches, step, settings, runtime)
        if world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return {"losses": losses, "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "grad_accum_steps": runtime.grad_accum_steps}


class SmallNet(nn.Module):
    """A bf16 embedding and four fp32 layers: gradients of two dtypes, finished layer by layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16).bfloat16()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, inputs, targets, window_blocks):
        x = self.embed(inputs).float()
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return F.cross_entropy(x, targets)


def small_batches(rank: int, accum_steps: int):
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randint(0, 32, (64,), generator=generator), torch.randint(0, 16, (64,), generator=generator))
            for _ in range(accum_steps)]


def run_reduction(rank: int, world_size: int) -> dict:
    """GradientReducer (eager, 2 micro-steps, small buckets) against summing the micro-steps' gradients,
    dividing by 2 and all-reducing each gradient after backward. Logs when each gradient is final and
    when each bucket's all-reduce is launched."""
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    runtime = T.Runtime(rank, world_size, torch.device("cpu"), "sdpa", grad_accum_steps=2)
    reducer = T.GradientReducer(model.parameters(), runtime, bucket_bytes=1200)  # a Linear's weight + bias
    events = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: events.append(("final", name)))
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: events.append(("all_reduce", tensor.numel())) or all_reduce(
        tensor, *args, **kwargs)
    try:
        loss = T.accumulate_gradients(model, reducer, iter(small_batches(rank, 2)), torch.tensor(1), 2)
    finally:
        dist.all_reduce = all_reduce
    reference_losses = []
    for inputs, targets in small_batches(rank, 2):
        reference_loss = reference(inputs, targets, None)
        reference_loss.backward()
        reference_losses.append(reference_loss.detach())
    for param in reference.parameters():
        param.grad = param.grad / 2
        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
    return {"grads": {name: p.grad for name, p in model.named_parameters()},
            "reference_grads": {name: p.grad for name, p in reference.named_parameters()},
            "loss": loss, "reference_loss": torch.stack(reference_losses).mean(), "events": events,
            "num_buckets": len(reducer.buckets)}


def run_trainer(rank: int, world_size: int, stop: str, args: list[str]) -> str | None:
    """train_gpt.train() in float64 (see run_training), with an optional SIGTERM to one rank mid-run."""
    torch.set_default_dtype(torch.float64)
    settings = T.parse_settings(args)
    runtime = T.resolve_runtime(settings, rank, world_size, 0)
    if stop != "-":
        stop_step, stop_rank = map(int, stop.split("@"))
        original_step = T.train_step

        def train_step_then_signal(model, optimizers, reducer, batches, step, *rest):
            loss = original_step(model, optimizers, reducer, batches, step, *rest)
            if step + 1 == stop_step and rank == stop_rank:
                signal.raise_signal(signal.SIGTERM)
            return loss

        T.train_step = train_step_then_signal
    with H.StopSignals() as signals:
        return T.train(settings, runtime, signals)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    if mode == "trainer":
        stopped_by = run_trainer(rank, world_size, out, sys.argv[3:])
        if world_size > 1:
            dist.destroy_process_group()
        sys.exit(H.STOPPED_EXIT_CODE if stopped_by else 0)
    if mode == "muon":
        result = run_muon(rank, world_size)
    elif mode == "reduce":
        result = run_reduction(rank, world_size)
    else:
        result = run_training(rank, world_size, sys.argv[3:], torch.float64 if mode == "train" else torch.float32)
    torch.save(result, f"{out}.rank{rank}.pt")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
