"""benchmark.py: the CPU mode end to end (report sections, Markdown = JSON, breakdown, learning proxy,
metadata), and its FLOP count and Muon rank share checked against independent computations."""
import copy
import json
import math
import re
import sys

import numpy as np
import pytest
import torch

import benchmark as B
from conftest import REPO, run_process, shard_paths

T = B.T  # the record-21 recipe (records/recipes.py) whose speed and learning the benchmark measures

# Figures every CPU report must give as positive finite numbers (JSON paths).
REQUIRED_FIGURES = [
    "ceilings.matmul.tflops", "ceilings.matmul.ms", "ceilings.copy.gb_per_s", "ceilings.copy.ms",
    "flops.matmul_params", "flops.attended_keys_long", "flops.attended_keys_short",
    "flops.attention_flops_per_token", "flops.flops_per_token",
    "step.fwd_bwd_ms", "step.fwd_bwd_tokens_per_s", "step.achieved_tflops", "step.mfu_percent",
    "step.train_step_ms", "step.muon_ms", "step.muon_rank_share_ms", "step.adam_ms", "step.data_ms",
    "step.shard_load_old_s", "step.shard_load_new_s",
    "step.predicted_step_ms", "step.predicted_total_s", "step.predicted_mfu_percent",
    "breakdown.whole_step_ms",
    "learning_proxy.initial_val_loss", "learning_proxy.final_val_loss", "learning_proxy.train_time_s",
    "learning_proxy.wall_s",
]


def get(results: dict, path: str):
    for key in path.split("."):
        results = results[key]
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One real `--cpu-tiny` run on the enwiki shards: (JSON, Markdown text, stdout)."""
    train_files, val_files = shard_paths()
    out = tmp_path_factory.mktemp("benchmark")
    command = [sys.executable, str(REPO / "benchmark.py"), "--cpu-tiny", f"--out={out}",
               f"--train-files={train_files}", f"--val-files={val_files}"]
    result = run_process(command, cwd=REPO, timeout=900)
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    results = json.loads((out / "benchmark.json").read_text())
    return results, (out / "benchmark.md").read_text(), result.stdout


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells) of the first table after the heading line starting with `heading`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # drop the header and the |---| line


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow
def test_report_has_every_section_with_positive_finite_figures(report):
    results, _, _ = report
    assert results["errors"] == {}
    for section in ("meta", "settings", "ceilings", "flops", "step", "breakdown", "learning_proxy"):
        assert section in results, f"missing section {section}"
    for path in REQUIRED_FIGURES:
        value = get(results, path)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), path
        assert math.isfinite(value) and value > 0, f"{path} = {value}"


@pytest.mark.slow
def test_markdown_lists_the_same_figures_as_the_json(report):
    results, text, stdout = report
    assert text in stdout, "the printed report must be the Markdown file"
    figures = {row[3]: row for row in markdown_table(text, "## Figures")}
    for path in REQUIRED_FIGURES:
        if path == "breakdown.whole_step_ms" or path.endswith(".ms"):
            continue  # timings of the ceilings are in the JSON only; the whole step is in the breakdown table
        assert path in figures, f"{path} not in the Markdown figures table"
    for path, row in figures.items():
        assert number(row[1]) == pytest.approx(get(results, path), rel=1e-3), path

    breakdown = markdown_table(text, "## Breakdown")
    components = results["breakdown"]["components"]
    assert [row[0] for row in breakdown] == [c["name"] for c in components] + ["other (remainder)", "whole step"]
    for row, component in zip(breakdown, components):
        assert int(row[1]) == component["count"]
        assert number(row[2]) == pytest.approx(component["ms"], rel=1e-3, abs=1e-9)
        assert number(row[3]) == pytest.approx(component["percent"], rel=1e-3, abs=1e-9)
    assert number(breakdown[-1][2]) == pytest.approx(results["breakdown"]["whole_step_ms"], rel=1e-3)
    assert number(breakdown[-2][2]) == pytest.approx(results["breakdown"]["other_ms"], rel=1e-3, abs=1e-6)

    proxy = markdown_table(text, "## Learning proxy")
    points = results["learning_proxy"]["points"]
    assert [int(row[0]) for row in proxy] == [p["step"] for p in points]
    for row, point in zip(proxy, points):
        assert int(row[1]) == point["tokens"]
        assert number(row[3]) == pytest.approx(point["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_breakdown_components_are_consistent_with_the_whole_step(report):
    results, _, _ = report
    breakdown, settings = results["breakdown"], results["settings"]
    whole = breakdown["whole_step_ms"]
    components = {c["name"]: c for c in breakdown["components"]}
    names = list(components)
    for expected in ("data loading", "attention masks", "MLP", "LM head + softcap + cross-entropy",
                     "optimizer: Muon", "optimizer: Adam"):
        assert expected in names
    attention = [c for name, c in components.items() if name.startswith("attention, ")]
    assert sum(c["count"] for c in attention) == sum(kind != "-" for kind in settings["attention_layout"])
    assert components["MLP"]["count"] == settings["num_layers"]
    for c in components.values():
        assert math.isfinite(c["ms"]) and c["ms"] >= 0, c
        assert c["ms"] == pytest.approx(c["ms_each"] * c["count"])
        assert c["percent"] == pytest.approx(100 * c["ms"] / whole)
    named = sum(c["ms"] for c in components.values())
    assert breakdown["named_ms"] == pytest.approx(named)
    assert breakdown["other_ms"] == pytest.approx(whole - named)
    # Isolated timings on a shared CPU are noisy: only an absurd mismatch fails.
    assert 0.2 * whole < named < 4 * whole, f"components sum to {named} ms, the whole step took {whole} ms"
    step = results["step"]
    assert components["optimizer: Muon"]["ms"] == step["muon_ms"] and whole == step["train_step_ms"]


@pytest.mark.slow
def test_prediction_and_mfu_follow_from_the_measurements(report):
    results, _, _ = report
    step, flops, ceiling = results["step"], results["flops"], results["ceilings"]["matmul"]
    settings = results["settings"]
    sequences = settings["train_batch_tokens"] // settings["train_seq_len"]
    assert step["predicted_world_size"] == math.gcd(8, sequences)
    assert step["micro_batches_per_rank"] == sequences // step["predicted_world_size"]
    assert step["tokens_per_micro_batch"] == settings["train_seq_len"]
    assert step["num_iterations"] == settings["num_iterations"]
    assert step["window_blocks"] == settings["max_window_tokens"] // settings["block_size"]
    predicted = (step["micro_batches_per_rank"] * (step["data_ms"] + step["fwd_bwd_ms"])
                 + step["muon_rank_share_ms"] + step["adam_ms"])
    assert step["predicted_step_ms"] == pytest.approx(predicted)
    assert step["predicted_total_s"] == pytest.approx(predicted * settings["num_iterations"] / 1000)
    assert ceiling["tflops"] == pytest.approx(2 * ceiling["size"] ** 3 / ceiling["ms"] / 1e9)
    assert step["fwd_bwd_tokens_per_s"] == pytest.approx(settings["train_seq_len"] / step["fwd_bwd_ms"] * 1000)
    achieved = flops["flops_per_token"] * step["fwd_bwd_tokens_per_s"] / 1e12
    assert step["achieved_tflops"] == pytest.approx(achieved)
    assert step["mfu_percent"] == pytest.approx(100 * achieved / ceiling["tflops"])
    assert 0 < step["mfu_percent"] < 100


def independent_flops_per_token(s: T.Settings) -> float:
    """6 x matmul weights (counted on a model built on the meta device) + 3 x forward attention FLOPs
    (keys per query counted query by query)."""
    with torch.device("meta"):
        model = T.GPT(s, "sdpa")
    matmul_weights = sum(p.numel() for p in model.blocks.parameters() if p.ndim >= 2)
    matmul_weights += model.lm_head.weight.numel()
    final_blocks = s.max_window_tokens // s.block_size
    forward_attention = 0.0
    for kind in s.attention_layout:
        if kind == "-":
            continue
        window = final_blocks if kind == "L" else max(1, final_blocks // 2)
        keys = attended_keys_per_query(s.train_seq_len, s.block_size, window)
        # QK^T and AV: a multiply-add (2 FLOPs) per head dimension per key, for every head, twice.
        forward_attention += 2 * 2 * s.num_heads * s.head_dim * keys.mean()
    return 6 * matmul_weights + 3 * forward_attention


def attended_keys_per_query(seq_len: int, block_size: int, window_blocks: int) -> np.ndarray:
    query = np.arange(seq_len)
    oldest_key = np.maximum(0, (query // block_size - window_blocks + 1) * block_size)
    return query - oldest_key + 1


@pytest.mark.slow
def test_flops_per_token_matches_an_independent_count(report):
    results, _, _ = report
    tiny = T.Settings(**results["settings"])
    assert results["flops"]["flops_per_token"] == pytest.approx(independent_flops_per_token(tiny), rel=1e-9)
    record = T.Settings()
    counted = B.flops_per_token(record)
    assert counted["flops_per_token"] == pytest.approx(independent_flops_per_token(record), rel=1e-9)
    # The record: ~121M matmul weights (11 attention blocks, 12 MLPs, head at vocab 50304); keys per query
    # = 128 * (earlier whole blocks, min(block, window - 1), averaged over 384 blocks) + 64.5 in its own.
    assert counted["matmul_params"] == 11 * 4 * 768**2 + 12 * 2 * 768 * 3072 + 768 * 50304
    assert counted["attended_keys_long"] == pytest.approx(128 * (78 + 371 * 13) / 384 + 64.5)
    assert counted["attended_keys_short"] == pytest.approx(128 * (15 + 378 * 6) / 384 + 64.5)


@pytest.mark.parametrize("seq_len,block_size,window", [(512, 32, 8), (512, 32, 1), (256, 64, 9), (384, 128, 2)])
def test_average_attended_keys_matches_the_trainers_mask(seq_len, block_size, window):
    positions = torch.arange(seq_len)
    single_document = torch.zeros(seq_len, dtype=torch.long)
    mask_mod = T.make_mask_mod(single_document, torch.tensor(window), block_size)
    dense = mask_mod(None, None, positions[:, None], positions[None, :])
    expected = dense.sum().item() / seq_len
    assert B.average_attended_keys(seq_len, block_size, window) == pytest.approx(expected, rel=1e-12)
    assert attended_keys_per_query(seq_len, block_size, window).mean() == pytest.approx(expected, rel=1e-12)


@pytest.fixture
def one_thread():
    """Tiny Muon steps are thousands of small ops: with 2 threads on a loaded 2-core machine each can wait
    milliseconds for a descheduled thread (seconds per step), with 1 they take microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_and_muon():
    s = T.parse_settings(["--preset=tiny", "--device=cpu", "--compile=false"])
    runtime = T.resolve_runtime(s, 0, 1, 0)
    model = T.build_model(s, runtime)
    muon, _ = T.build_optimizers(model, s, runtime)
    B.fill_random_grads(model)
    return model, muon


def test_muon_rank_share_with_one_rank_is_the_whole_muon_step(one_thread):
    model, muon = tiny_model_and_muon()
    model_copy = copy.deepcopy(model)
    muon_copy = T.Muon([p for p in model_copy.blocks.parameters() if p.ndim >= 2], lr=muon.defaults["lr"],
                       momentum=muon.defaults["momentum"], ns_steps=muon.ns_steps, ns_dtype=muon.ns_dtype)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        q.grad = p.grad.clone()
    for _ in range(2):  # the second step uses the momentum buffers of the first
        muon.step()
        B.muon_rank_share_step(muon_copy, rank=0, world_size=1)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_muon_rank_share_orthogonalises_only_rank_zeros_matrices(one_thread):
    model, muon = tiny_model_and_muon()
    calls = []
    original = muon._orthogonal_update
    muon._orthogonal_update = lambda param, momentum: calls.append(param) or original(param, momentum)
    B.muon_rank_share_step(muon, rank=0, world_size=8)
    expected = [p for group in muon.param_groups for p in group["params"][0::8]]
    assert [id(p) for p in calls] == [id(p) for p in expected]
    owned, total = B.muon_rank_share_count(muon, 0, 8)
    assert owned == len(expected) == sum(math.ceil(len(g["params"]) / 8) for g in muon.param_groups)
    assert total == sum(p.ndim >= 2 for p in model.blocks.parameters())


@pytest.mark.slow
def test_learning_proxy_uses_the_fixed_settings_and_learns(report):
    results, text, _ = report
    proxy = results["learning_proxy"]
    fixed = dict(arg[2:].split("=", 1) for arg in B.CPU_MODE.proxy_args)
    for name, value in fixed.items():
        assert str(proxy["settings"][name]) == value, name
    assert proxy["micro_batches_per_step"] == int(fixed["train_batch_tokens"]) // proxy["settings"]["train_seq_len"]
    steps = int(fixed["num_iterations"])
    assert [p["step"] for p in proxy["points"]] == list(range(0, steps + 1, int(fixed["val_every"])))
    assert [p["tokens"] for p in proxy["points"]] == [p["step"] * int(fixed["train_batch_tokens"])
                                                    for p in proxy["points"]]
    times = [p["train_time_s"] for p in proxy["points"]]
    assert times == sorted(times)
    assert proxy["initial_val_loss"] == pytest.approx(math.log(T.padded_vocab_size(50257)), abs=0.01)
    assert proxy["final_val_loss"] < proxy["initial_val_loss"] - 0.5
    assert "Fixed settings: train_batch_tokens=" in text


@pytest.mark.slow
def test_metadata_names_device_torch_commit_and_command(report):
    results, text, _ = report
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["device_type"] == "cpu"
    assert meta["torch_version"] == torch.__version__
    head = run_process(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, timeout=60)
    assert meta["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert "benchmark.py" in meta["command"] and "--cpu-tiny" in meta["command"]
    assert meta["compile"] is False and meta["attention_backend"] == "sdpa" and meta["compute_dtype"] == "float32"
    assert any("compile is off" in note for note in results["notes"])
    assert any("communication" in note and "not measured" in note for note in results["notes"])
    for heading in ("## Figures", "## Breakdown", "## Learning proxy"):
        line = next(line for line in text.splitlines() if line.startswith(heading))
        assert f"cpu, torch {torch.__version__}, commit {meta['git_commit']}" in line
    assert f"`{meta['command']}`" in text
    assert re.search(r"^- device: \*\*cpu\*\*", text, re.MULTILINE)


@pytest.mark.slow
def test_labels_say_what_was_measured(report):
    """No compile in the CPU mode: the first-call row must not claim one; the proxy's token count is
    the training tokens it saw."""
    results, markdown, _ = report
    assert results["meta"]["compile"] is False
    assert "first fwd+bwd (eager, nothing compiled)" in markdown and "compile + first" not in markdown
    tokens = results["learning_proxy"]["tokens"]
    assert tokens == results["learning_proxy"]["settings"]["train_batch_tokens"] * results["learning_proxy"][
        "settings"]["num_iterations"]
    assert f"final val loss, after {tokens} training tokens" in markdown
