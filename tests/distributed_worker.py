"""Run under torchrun (gloo, CPU) by tests/test_train_distributed.py; also runs as a single process.

  python distributed_worker.py muon OUT      Muon on fixed random gradients; saves the final params
  python distributed_worker.py train OUT ... a few real training steps of the tiny model on enwiki;
                                             saves per-step losses (averaged over ranks) and params
Each rank writes OUT.rank<r>.pt.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as T  # noqa: E402

MUON_SHAPES = [(32, 16)] * 5 + [(16, 48)] * 3 + [(3, 16, 16)]  # odd counts: some ranks idle in a group
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


def run_training(rank: int, world_size: int, args: list[str]) -> dict:
    # float64 parameters: in fp32, gradients that are pure reduction-order noise (~1e-9) exceed Adam's
    # eps (1e-10) and become +-lr steps, so 1 and 2 ranks would drift apart for no real reason.
    torch.set_default_dtype(torch.float64)
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


def main():
    mode, out = sys.argv[1], sys.argv[2]
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    result = run_muon(rank, world_size) if mode == "muon" else run_training(rank, world_size, sys.argv[3:])
    torch.save(result, f"{out}.rank{rank}.pt")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
