"""Multi-rank logic on CPU with gloo: sharded Muon and data-parallel training equal one process, also launched
as two nodes with README's multi-node command, and a node that dies stops the other."""
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, process_group, run_process, script_command, shard_paths
from records.recipes import RECORD21

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


# ----------------------------------------------------------------------------------------------------
# Two nodes on this machine: README's multi-node command, one process per node.

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_command(script: Path, args: list[str], port: int, node_rank: int, worker_logs: Path) -> list[str]:
    """README's multi-node torchrun command for one of 2 nodes with 1 process each. Both nodes run here and
    both match the endpoint, so is_host names the one that hosts the rendezvous store (on real nodes the
    host is the one named by the endpoint); each worker's output goes to its own files under worker_logs."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_conf=is_host={node_rank == 0}",
            f"--node_rank={node_rank}", f"--log-dir={worker_logs}", "--redirects=3", str(script), *args]


def tiny_args(log_dir: Path, run_id: str, *extra: str) -> list[str]:
    train_files, val_files = shard_paths()
    return ["--preset=tiny", "--compile=false", "--warmup_steps=0", "--val_tokens=4096", f"--train_files={train_files}",
            f"--val_files={val_files}", f"--log_dir={log_dir}", f"--run_id={run_id}", *extra]


STEPS_AND_VALS = ("--num_iterations=2", "--val_every=1")


def logged_val_losses(log: Path) -> list[tuple[int, float]]:
    return [(int(step), float(loss)) for step, loss in re.findall(r"^step:(\d+)/\d+ val_loss:(\S+)", log.read_text(),
                                                                   re.M)]


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tmp_path):
    """float64 training (distributed_worker.py trainer: train_gpt.train as main() runs it), so 1 process and
    2 nodes agree to 1e-6 as in the 1-vs-2-rank tests above. The three processes run at once, 1 thread each."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {"1 process": script_command(WORKER, ["trainer", "-", *tiny_args(tmp_path, "one", *STEPS_AND_VALS)])}
    for node_rank in (0, 1):
        commands[f"node {node_rank}"] = node_command(WORKER, ["trainer", "-", *tiny_args(tmp_path, "two", *STEPS_AND_VALS)],
                                                     port, node_rank, tmp_path / f"node{node_rank}")
    with contextlib.ExitStack() as stack:
        runs = {name: stack.enter_context(process_group(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True))
                for name, command in commands.items()}
        for name, run in runs.items():
            try:  # under a minute on an idle 2-core machine
                output, _ = run.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in 900 s (killed)")
            assert run.returncode == 0, f"{name} failed:\n{output[-4000:]}"
    one, two = logged_val_losses(tmp_path / "one.txt"), logged_val_losses(tmp_path / "two.txt")
    assert [step for step, _ in one] == [step for step, _ in two] == [0, 1, 2]
    assert one[-1][1] < one[0][1], "training did not reduce the val loss"
    for (step, a), (_, b) in zip(one, two):  # the log prints 4 decimals: values 1e-6 apart can round apart
        assert abs(a - b) <= 1e-4 + 1e-6, f"step {step}: val_loss {a} on 1 process vs {b} on 2 nodes"
    metrics = {run: [json.loads(line) for line in (tmp_path / f"{run}.metrics.jsonl").read_text().splitlines()]
               for run in ("one", "two")}
    val_records = {run: [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] for run, records in metrics.items()}
    for (step, a), (_, b) in zip(val_records["one"], val_records["two"], strict=True):
        assert abs(a - b) < 1e-6, f"step {step}: val_loss {a} on 1 process vs {b} on 2 nodes"


SURVIVOR_STOP_SECONDS = 180  # a few steps of a loaded machine; gloo's default timeout would be 30 min


@pytest.mark.slow
def test_a_node_that_dies_mid_run_stops_the_other_with_one_line(tmp_path):
    """Node 1's launch (torchrun and its worker) is killed after step 2: node 0 must stop within
    SURVIVOR_STOP_SECONDS, its worker saying why in one line."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_args(tmp_path, "died", "--num_iterations=1000", "--val_every=0")
    log = tmp_path / "died.txt"

    def launch(node_rank):
        return process_group(node_command(RECORD21, args, port, node_rank, tmp_path / f"node{node_rank}"),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    with launch(0) as survivor:
        with launch(1) as dying:
            deadline = time.monotonic() + 900
            while not (log.exists() and "step:2/1000 " in log.read_text()):
                if survivor.poll() is not None or dying.poll() is not None:
                    pytest.fail(f"a node stopped before step 2:\n{survivor.communicate()[0][-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("training did not reach step 2 in 900 s")
                time.sleep(0.2)
        # leaving the block killed node 1's torchrun and its worker
        try:
            output, _ = survivor.communicate(timeout=SURVIVOR_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still ran {SURVIVOR_STOP_SECONDS} s after node 1 died (killed)")
    assert survivor.returncode != 0, output[-3000:]
    [worker_stderr] = (tmp_path / "node0").glob("**/stderr.log")
    text = worker_stderr.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in text and len(errors) == 1 and text.strip().endswith(errors[0]), text[-3000:]
    assert "lost another rank" in errors[0]
