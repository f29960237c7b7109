"""Multi-rank logic on CPU with gloo: sharded Muon and data-parallel training equal one process."""
import os
import sys

import pytest
import torch

from conftest import REPO, run_process, script_command, shard_paths

WORKER = REPO / "tests" / "distributed_worker.py"


def launch(nproc: int, *args: str):
    result = run_process(script_command(WORKER, list(args), nproc), cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def test_muon_sharded_over_two_ranks_equals_single_process(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker

    single = distributed_worker.run_muon(rank=0, world_size=1)["params"]
    launch(2, "muon", str(tmp_path / "muon"))
    initial, _ = distributed_worker.muon_parameters_and_gradients()
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"muon.rank{rank}.pt")["params"]
        for index, (a, b, start) in enumerate(zip(single, sharded, initial)):
            assert not torch.allclose(a, start), f"parameter {index} never moved"
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f"rank {rank} parameter {index} differs from 1 process"


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_with_twice_the_accumulation(tmp_path):
    train_files, val_files = shard_paths()
    args = ["--preset=tiny", "--compile=false", "--num_iterations=4", f"--train_files={train_files}",
            f"--val_files={val_files}", "--muon_momentum_warmup_steps=2", "--num_layers=4",
            "--attention_layout=LS-L", "--value_embed_layout=01-1"]
    launch(1, "train", str(tmp_path / "one"), *args)
    launch(2, "train", str(tmp_path / "two"), *args)
    one = torch.load(tmp_path / "one.rank0.pt")
    two = [torch.load(tmp_path / f"two.rank{rank}.pt") for rank in (0, 1)]
    assert one["grad_accum_steps"] == 2 * two[0]["grad_accum_steps"]
    assert one["losses"][-1] < one["losses"][0], "training did not reduce the loss"
    assert one["params"]["embed.weight"].dtype == torch.float64
    for step, (a, b) in enumerate(zip(one["losses"], two[0]["losses"])):
        assert abs(a - b) < 1e-6, f"step {step}: loss {a} on 1 rank vs {b} on 2 ranks"
    for name, reference in one["params"].items():
        assert torch.equal(two[0]["params"][name], two[1]["params"][name]), f"ranks disagree on {name}"
        difference = (reference - two[0]["params"][name]).norm() / reference.norm().clamp_min(1e-12)
        # Muon still orthogonalises in fp32 (the CPU compute dtype): ~1e-6 relative rounding
        assert difference < 1e-5, f"{name} differs between 1 and 2 ranks (relative {difference:.2e})"
