"""The record-89 recipe as a whole, on CPU: a tiny run trains; the warm-up leaves the run exactly as without it;
a run resumed before a stage change and before the untie ends exactly as the uninterrupted one; 1 rank with 8
micro-steps trains as 2 gloo ranks with 4. A short schedule (stages end at steps 3, 5 and 7, the untie after step
5, one extension step) crosses every boundary in 8 steps."""
import copy
import dataclasses
import functools
import os
import re

import pytest
import torch

import harness as H
import train_gpt as R
from conftest import REPO, run_process, script_command, shard_paths, tiktoken_cache

FP64_WORKER = REPO / "tests" / "r89_fp64_worker.py"
SHORT_SCHEDULE = ["--stage_ends=3,5,7", "--extension_steps=1", "--split_step=5", "--val_every=4",
                  "--muon_momentum_warmup_steps=2", "--muon_momentum_cooldown_steps=1", "--val_tokens=2048"]


@pytest.fixture(autouse=True)
def offline_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prefix table's cache


def short_run_args(log_dir, run_id: str, *extra: str) -> list[str]:
    train_files, val_files = shard_paths()
    return ["--preset=tiny", "--device=cpu", "--compile=false", "--warmup=false", *SHORT_SCHEDULE,
            f"--train_files={train_files}", f"--val_files={val_files}", f"--log_dir={log_dir}", f"--run_id={run_id}",
            *extra]


def with_settings(args: list[str], *extra: str) -> list[str]:
    replaced = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in args if arg.split("=", 1)[0] not in replaced] + list(extra)


def val_losses(log: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"^step:(\d+)/\d+ val_loss:(\S+)", log, re.M)}


def final_checkpoint(log_dir, run_id: str) -> dict:
    return H.read_checkpoint(H.checkpoint_paths(log_dir / run_id)[-1])


def assert_same_training_state(first: dict, second: dict):
    assert first["step"] == second["step"]
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    assert_same_nested(first["optimizers"], second["optimizers"], "optimizers")
    assert first["data"] == second["data"]
    assert_same_nested(first["pending_gradients"], second["pending_gradients"], "pending_gradients")


def assert_same_nested(a, b, where: str):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_schedule_flag_prints_the_stages(capsys):
    assert R.main(["--preset=tiny", "--schedule"]) == 0
    table = capsys.readouterr().out
    for stage_steps in ("0-8 (9)", "9-16 (8)", "17-24 (8)", "25-27 (3)"):
        assert stage_steps in table


def test_help_names_the_schedule_flag(capsys):
    assert R.main(["--help"]) == 0
    assert "--schedule" in capsys.readouterr().out


def test_the_record_shape_on_a_cpu_stops_with_one_line_before_building_anything(capsys):
    assert R.main(["--device=cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("error: these settings need at least")
    assert "GPU-sized settings" in error and "python train_gpt.py --preset=tiny" in error


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted short run, checkpointed after every step: (log folder, run id)."""
    folder = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        assert R.main(short_run_args(folder, "run", *CHECKPOINTS)) == 0
    return folder, "run"


CHECKPOINTS = ("--checkpoint_every=1", "--checkpoint_keep=9")


def test_short_run_learns_and_logs_every_boundary(whole_run):
    folder, run_id = whole_run
    log = (folder / f"{run_id}.txt").read_text()
    losses = val_losses(log)
    assert sorted(losses) == [0, 4, 8]
    assert losses[8] < losses[0] - 0.5, losses  # 10.8 at init, learning within 8 steps
    assert "==== harness.py ====" in log and "def step_plan(" in log  # the log embeds both sources


def test_warmup_leaves_the_run_exactly_as_without_it(tmp_path, whole_run):
    folder, run_id = whole_run
    assert R.main(with_settings(short_run_args(tmp_path, "warm", *CHECKPOINTS), "--warmup=true")) == 0
    assert val_losses((folder / f"{run_id}.txt").read_text()) == val_losses((tmp_path / "warm.txt").read_text())
    assert_same_training_state(final_checkpoint(folder, run_id), final_checkpoint(tmp_path, "warm"))


# resumed at step 2: before the stage change at 3; 3: Adam's gradients of step 2 pending (it updates after odd
# steps); 4: before the untie after step 5
@pytest.mark.parametrize("resume_step", [2, 3, 4])
def test_resume_before_a_stage_change_and_the_untie_ends_exactly_as_the_uninterrupted_run(tmp_path, whole_run,
                                                                                          resume_step):
    folder, run_id = whole_run
    (tmp_path / run_id).mkdir()
    checkpoint = folder / run_id / f"step_{resume_step:06d}.pt"
    (tmp_path / run_id / checkpoint.name).write_bytes(checkpoint.read_bytes())
    assert R.main(short_run_args(tmp_path, run_id, *CHECKPOINTS, "--resume=auto")) == 0
    assert_same_training_state(final_checkpoint(folder, run_id), final_checkpoint(tmp_path, run_id))
    resumed_losses = val_losses((tmp_path / f"{run_id}.txt").read_text())
    whole_losses = val_losses((folder / f"{run_id}.txt").read_text())
    assert 8 in resumed_losses and all(whole_losses[step] == loss for step, loss in resumed_losses.items())


@pytest.mark.slow
def test_a_compiled_run_compiles_nothing_after_the_warmup(tmp_path, monkeypatch):
    """Every stage's shapes, the untie and every validation window pair compile in the warm-up; the timed run
    then reuses them. Dynamo's graphs are the same for any backend: aot_eager keeps the test fast."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(R, "compile_model", functools.partial(R.compile_model, backend="aot_eager"))
    monkeypatch.setattr(R, "training_loss_chunk_compiled",
                        torch.compile(R.training_loss_chunk, dynamic=False, backend="aot_eager"))
    graphs_after_warmup = []
    warm_up = R.warm_up_kernels

    def warm_up_then_count(*args, **kwargs):
        warm_up(*args, **kwargs)
        graphs_after_warmup.append(counters["stats"]["unique_graphs"])

    monkeypatch.setattr(R, "warm_up_kernels", warm_up_then_count)
    torch._dynamo.reset()
    counters.clear()
    args = with_settings(short_run_args(tmp_path, "compiled"), "--compile=true", "--warmup=true")
    assert R.main(args) == 0
    assert graphs_after_warmup[0] >= 8  # the network: 3 stage shapes x tied/untied + validation; the loss chunks
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup[0], dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def run_ranks(script, args: list[str], nproc: int):
    result = run_process(script_command(script, args, nproc), 900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_one_rank_with_accumulation_trains_as_two_ranks_in_float64(tmp_path):
    """FP8 off (float8 has no float64 path): 1 rank x 8 micro-steps and 2 ranks x 4 agree to 1e-9 (float64
    rounding, through Adam) over every stage change and the untie, validation losses and weights. In float32 they
    agree only to
    rounding amplified by Adam: its first updates are nearly sign(gradient) at lr_mul 75, so an element whose
    summed gradient cancels to rounding level can move either way (the FP8 test below)."""
    args = short_run_args(tmp_path, "one", "--save_checkpoint=true", "--fp8=false")
    run_ranks(FP64_WORKER, args, 1)
    run_ranks(FP64_WORKER, with_settings(args, "--run_id=two"), 2)
    one, two = val_losses((tmp_path / "one.txt").read_text()), val_losses((tmp_path / "two.txt").read_text())
    assert one == two and sorted(one) == [0, 4, 8]  # to the printed 4 decimals
    first, second = final_checkpoint(tmp_path, "one"), final_checkpoint(tmp_path, "two")
    assert first["model"]["embed"].dtype == torch.float64
    for name, tensor in first["model"].items():
        torch.testing.assert_close(second["model"][name], tensor, rtol=1e-8, atol=1e-9, msg=name)
    assert first["data"] == second["data"]


@pytest.mark.slow
def test_one_rank_with_accumulation_and_two_ranks_reach_the_same_val_losses_with_fp8(tmp_path):
    """The FP8 path (emulated) with its per-slot delayed scales, float32: the validation losses agree closely."""
    args = short_run_args(tmp_path, "one")
    run_ranks(REPO / "train_gpt.py", args, 1)
    run_ranks(REPO / "train_gpt.py", with_settings(args, "--run_id=two"), 2)
    one, two = val_losses((tmp_path / "one.txt").read_text()), val_losses((tmp_path / "two.txt").read_text())
    assert one.keys() == two.keys() and all(abs(one[step] - two[step]) < 2e-3 for step in one), (one, two)


@pytest.mark.slow
def test_one_step_compiled_by_inductor_matches_eager():
    """The whole tiny model and its loss compiled (compile_model and the compiled loss chunk, inductor, CPU)
    against eager, one training step in fp32 on random weights (the zero-initialised ones too): the loss agrees to
    1e-5 relative and every gradient to 1e-4 of its largest element (measured: 2e-7 and 2e-5). FP8 off: with the
    emulated FP8, a value the two compute one fp32 rounding apart can round to neighbouring e4m3 numbers, 12%
    apart, and the gradients then differ by a few per cent."""
    s = R.parse_settings(["--preset=tiny", "--device=cpu", "--compile=false", "--fp8=false"])
    runtime = R.resolve_runtime(s, 0, 1, 0)
    eager = R.build_model(s, runtime)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    compiled = copy.deepcopy(eager)
    R.compile_model(compiled)
    plan = R.step_plan(10, s)  # stage 1: two MTP offsets and the prefix target
    inputs = R.StepInputs(s, runtime.device)
    tokens = torch.randint(0, 50257, (plan.slot_tokens + 1,), generator=generator)
    tokens[0] = tokens[plan.slot_tokens // 2] = R.BOS
    batch = R.Batch(tokens[:-1].int(), tokens[1:].long(), R.document_ids_of(tokens[:-1].int()))
    eager_loss = R.step_loss(eager, batch, plan, inputs, 0, runtime)
    eager_loss.backward()
    compiled_loss = R.step_loss(compiled, batch, plan, inputs, 0, dataclasses.replace(runtime, compile=True))
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for (name, eager_parameter), compiled_parameter in zip(eager.named_parameters(), compiled.parameters()):
        if eager_parameter.grad is None:  # the embedding while tied (the head's transpose is read instead)
            assert name == "embed" and compiled_parameter.grad is None
            continue
        largest = eager_parameter.grad.abs().max().item()
        assert largest > 0, f"{name}: a zero gradient compares nothing"
        error = (compiled_parameter.grad - eager_parameter.grad).abs().max().item()
        assert error <= 1e-4 * largest, f"{name}: compiled and eager gradients differ by {error} (largest {largest})"
