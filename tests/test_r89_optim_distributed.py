"""Sections 6 and 8 of train_gpt.py on several ranks (gloo, CPU): W ranks with one micro-step each
compute what 1 rank computes with W micro-steps (NorMuon units sharded and reduce-scattered, padded when
W does not divide their number; Adam every other step; the untie), and a checkpoint written at W ranks
continues identically at 1 rank. This file is also the worker: torchrun runs it with an output prefix."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, run_process, script_command  # noqa: E402
from test_r89_optim import StandIn, T, run_steps, runtime, tiny_settings  # noqa: E402

STEPS_BEFORE_CHECKPOINT = 2  # steps 0 and 1 (an Adam step, then the untie), then the checkpoint
STEPS = 4
# NorMuon's weights: bf16 with mantissa sidecars at 2 ranks (there a bf16 gradient summed over 2 micro-steps
# and halved equals the sum of the halves: the same rounding); fp32 at 3 ranks, where the sums of 3
# gradients in another order would differ by a bf16 ulp. Polar Express is fp32 on CPU.
MATRIX_DTYPES = {2: torch.bfloat16, 3: torch.float32}


def settings(world_size: int) -> T.Settings:
    return tiny_settings(slots_per_step=world_size)  # 1 micro-step per rank; world_size at 1 rank


def build(s: T.Settings, rank: int, world_size: int, matrix_dtype: torch.dtype):
    rt = runtime(rank, world_size)
    model = StandIn(s, matrix_dtype=matrix_dtype)
    optimizers = T.build_optimizers(model, s, rt)
    return model, optimizers, T.GradientCommunicator(optimizers, s, rt), rt


def run_worker(out: str):
    """Runs STEPS steps at this world size; rank 0 saves the checkpoint after STEPS_BEFORE_CHECKPOINT."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    s = settings(world_size)
    model, optimizers, communicator, rt = build(s, rank, world_size, MATRIX_DTYPES[world_size])
    run_steps(model, optimizers, communicator, s, rt, range(STEPS_BEFORE_CHECKPOINT), untie_at=1)
    state = T.optimizer_state(optimizers, rt)
    if rank == 0:
        torch.save(dict(model=model.state_dict(), optimizers=state), f"{out}.checkpoint.pt")
    run_steps(model, optimizers, communicator, s, rt, range(STEPS_BEFORE_CHECKPOINT, STEPS))
    torch.save({name: p.detach() for name, p in model.named_parameters()}, f"{out}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def one_rank(s: T.Settings, matrix_dtype: torch.dtype, steps: range, checkpoint: dict | None = None) -> dict:
    """The same run in this process at world size 1 (from the checkpoint, when given)."""
    model, optimizers, communicator, rt = build(s, 0, 1, matrix_dtype)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        T.load_optimizer_state(optimizers, checkpoint["optimizers"])
    run_steps(model, optimizers, communicator, s, rt, steps, untie_at=1)
    return {name: p.detach() for name, p in model.named_parameters()}


def assert_same_run(reference: dict, other: dict, what: str, tolerance: float):
    start = dict(StandIn(settings(1)).named_parameters())
    for name, value in reference.items():
        assert not torch.equal(value.float(), start[name].detach()), f"{name} never moved"
        difference = ((value.double() - other[name].double()).norm() / value.double().norm()).item()
        assert difference < tolerance, f"{name}: {what} (relative {difference:.2e})"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_compute_what_one_rank_computes_and_resume_at_one_rank(tmp_path, world_size):
    """2 ranks: the unit groups (60 Q/K, 20 V/O, 22 MLP) split evenly; 3 ranks: V/O and MLP are padded."""
    out = tmp_path / "run"
    result = run_process(script_command(Path(__file__), [str(out)], world_size), cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    ranks = [torch.load(f"{out}.rank{rank}.pt") for rank in range(world_size)]
    for rank in range(1, world_size):
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[rank][name]), f"rank {rank} disagrees with rank 0 on {name}"
    s, dtype = settings(world_size), MATRIX_DTYPES[world_size]
    checkpoint = torch.load(f"{out}.checkpoint.pt")
    assert checkpoint["optimizers"]["adam"]["updates"] == 1
    assert len(checkpoint["optimizers"]["normuon"]) == 60 + 20 + 22, "every NorMuon unit's state is gathered"
    sidecars = ["mantissa" in entry for entry in checkpoint["optimizers"]["normuon"].values()]
    assert all(sidecars) if dtype == torch.bfloat16 else not any(sidecars)
    # Adam's gradients sum the two steps in another order on W ranks: ~1e-8 relative after one Adam step;
    # at 3 ranks the gradients are divided by 3 before the sum, not after: ~1e-6 after Polar Express
    tolerance = 1e-6 if world_size == 2 else 1e-5
    before_checkpoint = {name: checkpoint["model"][name] for name in ranks[0]}
    assert_same_run(one_rank(s, dtype, range(STEPS_BEFORE_CHECKPOINT)), before_checkpoint,
                    f"{world_size} ranks differ from 1 rank with {world_size} micro-steps", tolerance)
    assert_same_run(ranks[0], one_rank(s, dtype, range(STEPS_BEFORE_CHECKPOINT, STEPS), checkpoint),
                    f"resumed at 1 rank from {world_size} ranks, it differs", tolerance)
    if dtype == torch.float32:
        # in bf16 the ~1e-8 differences of Adam's order of summation flip roundings of the bf16 matrices
        # in the next forward, and Polar Express amplifies them: only the fp32 run compares over 4 steps
        assert_same_run(one_rank(s, dtype, range(STEPS)), ranks[0],
                        f"{world_size} ranks differ from 1 rank with {world_size} micro-steps", tolerance)


if __name__ == "__main__":
    run_worker(sys.argv[1])
