"""Record 89's memory savers against the plain run (checkpointed layers: bit-identical in fp32 on CPU, FP8
emulated), the FP8 scales under recomputation, the loss chunk setting, the start-up memory bound, and
--memory=auto's choice from a record-89 table (synthetic, then the committed one)."""
import dataclasses
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import harness as H
import train_gpt as R
from conftest import REPO, shard_paths, tiktoken_cache

VOCAB = 200  # padded to 256: keeps the tiny model's tables small


def tiny_settings(**changes) -> R.Settings:
    return dataclasses.replace(R.Settings(), **{**R.PRESETS["tiny"], "vocab_size": VOCAB, **changes})


def train_tiny(checkpoint_blocks: int, steps: int = 3, slots: int = 2):
    """steps x slots FP8 (emulated) forwards and backwards of the tiny model's hidden states under a loss that
    reaches the head, crossing the MLP's switch to delayed weight scales (MLP_CURRENT_AMAX_STEPS); returns the
    losses, the gradients of the last step, the FP8 state, and how many scale records forward and backward made."""
    torch.manual_seed(0)
    model = R.GPT(tiny_settings(), "explicit")
    with torch.no_grad():  # random weights everywhere: zero-initialised projections would hide differences
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    model.checkpoint_blocks = checkpoint_blocks
    model.mlp_fp8.steps.fill_(R.MLP_CURRENT_AMAX_STEPS - 1)
    generator = torch.Generator().manual_seed(1)
    records = dict(forward=0, backward=0)
    phase = ["forward"]
    record = R.MLPFP8Slot.record

    def counting_record(self, *scales):
        records[phase[0]] += 1
        record(self, *scales)

    losses = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(R.MLPFP8Slot, "record", counting_record)
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            for slot in range(slots):
                tokens = torch.randint(0, VOCAB, (64,), generator=generator)
                tokens[[0, 30]] = 0
                batch = SimpleNamespace(inputs=tokens, document_ids=torch.cumsum(tokens == 0, 0).to(torch.int32))
                phase[0] = "forward"
                hidden = model.hidden(batch, model.masks_for(batch, 1, 3), torch.tensor(slot))
                loss = hidden.square().sum() + (hidden @ model.lm_head).square().sum()
                phase[0] = "backward"
                loss.backward()
                losses.append(loss.item())
            model.mlp_fp8.end_step()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return losses, gradients, model.mlp_fp8.state_dict(), records


@pytest.fixture(scope="module")
def plain_tiny():
    return train_tiny(0)


@pytest.mark.parametrize("checkpoint_blocks", [4, 11])
def test_checkpointed_layers_give_bit_identical_losses_gradients_and_fp8_scales(plain_tiny, checkpoint_blocks):
    losses, gradients, fp8_state, records = train_tiny(checkpoint_blocks)
    plain_losses, plain_gradients, plain_state, plain_records = plain_tiny
    assert losses == plain_losses
    assert gradients.keys() == plain_gradients.keys() and len(gradients) > 20
    for name, gradient in gradients.items():
        assert torch.equal(gradient, plain_gradients[name]), name
    for name, tensor in fp8_state.items():
        assert torch.equal(tensor, plain_state[name]), name
    # every layer records its two scales once per forward, and a recompute in backward records nothing
    assert records == plain_records == dict(forward=3 * 2 * R.NUM_LAYERS, backward=0)


@pytest.mark.slow
def test_checkpointed_layers_compile_as_one_graph_and_train_as_eager():
    """fullgraph compile of the forward with 4 checkpointed FP8 layers (aot_eager: AOTAutograd partitions the
    recompute, no code generation): no graph break, the same losses and FP8 scales as the eager plain run."""
    torch._dynamo.reset()
    plain_losses, _, plain_state, _ = train_tiny(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(R.GPT, "hidden", torch.compile(R.GPT.hidden, fullgraph=True, dynamic=False,
                                                      backend="aot_eager"))
        losses, _, fp8_state, records = train_tiny(4)
    torch._dynamo.reset()
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=0)
    for name, tensor in fp8_state.items():
        torch.testing.assert_close(tensor, plain_state[name], rtol=1e-5, atol=0, msg=name)
    assert records["backward"] == 0


def test_checkpointed_layers_keep_only_their_inputs():
    """What autograd keeps of the first layers' activations for backward: all of it without the saver, only
    the inputs of the checkpointed layers with it."""
    torch.manual_seed(0)
    model = R.GPT(tiny_settings(), "explicit")
    tokens = torch.randint(1, VOCAB, (64,))
    batch = SimpleNamespace(inputs=tokens, document_ids=torch.zeros(64, dtype=torch.int32))
    masks = model.masks_for(batch, 1, 3)

    def saved_elements(checkpoint_blocks: int) -> int:
        model.checkpoint_blocks = checkpoint_blocks
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model.hidden(batch, masks, torch.tensor(0)).sum().backward()
        return sum(sizes)

    plain, checkpointed = saved_elements(0), saved_elements(R.NUM_LAYERS)
    assert checkpointed < plain / 3, (checkpointed, plain)


@pytest.fixture
def offline_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prefix table's cache


def short_run(tmp_path, run_id: str, *savers: str) -> tuple[list[str], dict]:
    """A 5-step tiny run (three stages, the untie, validations) through main: its log lines and final checkpoint."""
    train_files, val_files = shard_paths()
    args = ["--preset=tiny", "--device=cpu", "--compile=false", "--warmup=false", "--stage_ends=2,4,5",
            "--extension_steps=0", "--split_step=3", "--val_every=2", "--muon_momentum_warmup_steps=2",
            "--muon_momentum_cooldown_steps=1", "--val_tokens=2048", f"--train_files={train_files}",
            f"--val_files={val_files}", f"--log_dir={tmp_path}", f"--run_id={run_id}", "--checkpoint_every=5",
            *savers]
    assert R.main(args) == 0
    lines = (tmp_path / f"{run_id}.txt").read_text().splitlines()
    return lines, H.read_checkpoint(H.checkpoint_paths(tmp_path / run_id)[-1])


def loss_lines(lines: list[str]) -> list[str]:
    return [line.split(" train_time")[0] for line in lines if line.startswith("step:") and "loss:" in line]


@pytest.mark.slow
def test_a_tiny_run_with_savers_trains_as_without(tmp_path, offline_tokenizer):
    """Through main: the settings reach the runtime and the model; every logged loss and the final weights are
    bit-identical. (A smaller loss chunk adds the same sums in another order: test_r89_loss covers chunking.)"""
    plain_lines, plain = short_run(tmp_path, "plain", "--checkpoint_blocks=0", "--loss_chunk_tokens=0")
    lines, saving = short_run(tmp_path, "saving", "--checkpoint_blocks=11", "--loss_chunk_tokens=0")
    assert "memory savers as set: checkpoint_blocks=11 loss_chunk_tokens=0" in "\n".join(lines)
    assert len(loss_lines(plain_lines)) >= 6 and loss_lines(lines) == loss_lines(plain_lines)
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, saving["model"][name]), name


def test_the_loss_chunk_is_the_savers_or_the_devices():
    def runtime(device: str, chunk: int):
        return R.Runtime(0, 1, torch.device(device), "explicit", False, H.MemorySavers(0, chunk))

    assert R.train_loss_chunk_tokens(runtime("cpu", 48)) == 48
    assert R.train_loss_chunk_tokens(runtime("cpu", 0)) == R.CPU_LOSS_CHUNK_TOKENS
    assert R.train_loss_chunk_tokens(runtime("cuda", 0)) == R.TRAIN_LOSS_CHUNK_TOKENS
    assert R.train_loss_chunk_tokens(runtime("cuda", 8192)) == 8192


@pytest.mark.parametrize("setting,message", [
    ("--checkpoint_blocks=12", "--checkpoint_blocks=12"),
    ("--loss_chunk_tokens=100", "--loss_chunk_tokens=100: choose a positive multiple of 16, 0 (the record's 16,384) "
                                "or -1 (--memory chooses)"),
    ("--memory=max", "--memory=max: choose auto or off"),
])
def test_bad_saver_settings_are_refused_in_one_line(setting, message):
    with pytest.raises(R.SettingsError) as error:
        R.parse_settings([setting])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_start_up_memory_lower_bound_counts_the_savers():
    s = R.parse_settings(["--preset=tiny"])
    plain, saving = (R.estimate_memory(s, R.Runtime(0, 1, torch.device("cpu"), "explicit", True, savers))
                     for savers in (H.MemorySavers(), H.MemorySavers(checkpoint_blocks=5, loss_chunk_tokens=48)))
    # 11 layers stored -> 6 stored + 1 recomputed at a time; 96-token loss chunks (CPU) -> 48
    assert saving["activations of one micro-step"][0] * 11 == plain["activations of one micro-step"][0] * 7
    assert saving["logits of one micro-step"][0] * 96 == plain["logits of one micro-step"][0] * 48


def test_recompute_flops_count_the_checkpointed_layers_attention_projections():
    s = R.Settings()
    attention = 4 * 768 * 768  # qkvo
    assert R.recompute_flops_per_token(s, H.MemorySavers(2, 8192)) == 2 * 2 * attention
    assert R.recompute_flops_per_token(s, H.MemorySavers(0, 8192)) == 0
    assert 6 not in R.ATTENTION_LAYERS  # layer 6 has no attention: checkpointing it recomputes no projection
    assert R.recompute_flops_per_token(s, H.MemorySavers(7, 0)) == 2 * 6 * attention


# --memory=auto


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], memory_gib: float, shared_memory: int):
    properties = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                       total_memory=int(memory_gib * 2**30),
                                       shared_memory_per_block_optin=shared_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)


def synthetic_table() -> dict:
    """Peaks 30 (none), 28 (8,192-token chunks), 26 (4,096), 24 / 18 / 12 GiB with 2 / 6 / 11 layers
    checkpointed and 8,192-token chunks; bf16 (FP8 off) 2 GiB more; 8 ranks 3 GiB less."""
    s = R.Settings()
    rows = []
    for world_size, rank_gib in ((1, 0.0), (8, -3.0)):
        for fp8, fp8_gib in ((True, 0.0), (False, 2.0)):
            for blocks, chunk, peak in ((0, 0, 30), (0, 8192, 28), (0, 4096, 26), (2, 8192, 24), (6, 8192, 18),
                                        (11, 8192, 12)):
                recompute = R.recompute_flops_per_token(s, H.MemorySavers(blocks, chunk))
                rows.append(dict(world_size=world_size, fp8=fp8, checkpoint_blocks=blocks, loss_chunk_tokens=chunk,
                                 recompute_flops_per_token=recompute, peak_gib=peak + fp8_gib + rank_gib))
    return dict(fp8_setting="fp8", shape={name: getattr(s, name) for name in R.MEMORY_SHAPE_SETTINGS}, rows=rows)


H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 79.6, 232_448)
A100_40GB = ("NVIDIA A100-SXM4-40GB", (8, 0), 40.0, 166_912)


@pytest.mark.parametrize("memory_gib,capability,world_size,expected", [
    (79.6, (9, 0), 1, (0, 0)),
    (33.5, (9, 0), 1, (0, 8192)),  # usable 29.2: the larger chunk of the two that fit without recomputation
    (30.5, (9, 0), 1, (0, 4096)),  # usable 26.5
    (24.0, (8, 9), 1, (6, 8192)),  # usable 20.6
    (26.0, (8, 9), 8, (2, 8192)),  # usable 22.4; 8 ranks: 21 GiB with 2 layers (1 rank: 24)
    (24.0, (8, 9), 4, (6, 8192)),  # 4 ranks: not in the table, bounded by the 1-rank rows
    (24.0, (8, 0), 1, (6, 8192)),  # compute capability 8.0: no FP8, the bf16 rows (20 GiB)
    (22.0, (8, 0), 1, (11, 8192)),  # usable 18.8: bf16 needs 11 layers where FP8 needed 6
])
def test_memory_auto_picks_the_least_recomputation_that_fits(tmp_path, monkeypatch, memory_gib, capability,
                                                             world_size, expected):
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps(synthetic_table()))
    monkeypatch.setattr(R, "MEMORY_TABLE", table_path)
    fake_gpu(monkeypatch, "a GPU", capability, memory_gib, 232_448)
    runtime = R.resolve_runtime(R.Settings(), 0, world_size, 0)
    assert (runtime.savers.checkpoint_blocks, runtime.savers.loss_chunk_tokens) == expected
    assert runtime.fp8 == (capability >= (8, 9))
    assert any(notice.startswith(f"--memory=auto: checkpoint_blocks={expected[0]} loss_chunk_tokens={expected[1]}")
               and " fits " in notice for notice in runtime.notices)


def test_memory_auto_bounds_combinations_missing_at_a_world_size_by_their_1_rank_rows(tmp_path, monkeypatch):
    table = synthetic_table()
    table["rows"] = [row for row in table["rows"] if row["world_size"] == 1 or row["checkpoint_blocks"] == 0]
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps(table))
    monkeypatch.setattr(R, "MEMORY_TABLE", table_path)
    fake_gpu(monkeypatch, "a GPU", (8, 9), 24.0, 232_448)  # usable 20.6: 8 ranks' rows without savers do not fit
    runtime = R.resolve_runtime(R.Settings(), 0, 8, 0)
    assert runtime.savers == H.MemorySavers(6, 8192)
    assert any("(GPU check, 1 rank(s)) fits" in notice for notice in runtime.notices)
    fake_gpu(monkeypatch, "a GPU", (8, 9), 31.0, 232_448)  # usable 26.9: the 8-rank row of 25 GiB fits
    runtime = R.resolve_runtime(R.Settings(), 0, 8, 0)
    assert runtime.savers == H.MemorySavers(0, 8192)
    assert any("(GPU check, 8 rank(s)) fits" in notice for notice in runtime.notices)


def test_memory_auto_keeps_explicit_settings_and_other_shapes(tmp_path, monkeypatch):
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps(synthetic_table()))
    monkeypatch.setattr(R, "MEMORY_TABLE", table_path)
    fake_gpu(monkeypatch, *H100[:2], 24.0, 232_448)

    def savers(*args: str) -> tuple[H.MemorySavers, str]:
        runtime = R.resolve_runtime(R.parse_settings(list(args)), 0, 1, 0)
        return runtime.savers, next(n for n in runtime.notices if "savers" in n or "--memory" in n)

    assert savers("--checkpoint_blocks=11")[0] == H.MemorySavers(11, 8192), "explicit layers stay; auto fills the chunk"
    chosen, notice = savers("--checkpoint_blocks=3", "--loss_chunk_tokens=0")
    assert chosen == H.MemorySavers(3, 0) and notice.startswith("memory savers as set")
    chosen, notice = savers("--memory=off")
    assert chosen == H.MemorySavers() and "--memory=off" in notice
    chosen, notice = savers("--mlp_hidden=2048")
    assert chosen == H.MemorySavers() and "record shape only (mlp_hidden differ)" in notice
    fake_gpu(monkeypatch, *H100[:2], 12.0, 232_448)
    chosen, notice = savers()
    assert chosen == H.MemorySavers(11, 8192) and "does NOT fit" in notice


def committed_table() -> dict:
    return json.loads(R.MEMORY_TABLE.read_text())


@pytest.mark.skipif(not R.MEMORY_TABLE.exists(), reason="no record-89 memory table committed yet")
def test_committed_table_is_the_one_its_reports_give():
    sys.path.insert(0, str(REPO / "tools"))
    import memory_table

    profile = memory_table.recipe_profile(REPO / "train_gpt.py")
    committed = committed_table()
    paths = sorted({REPO / path for row in committed["rows"] for path in row["reports"]})
    built = memory_table.build_table([memory_table.read_report(path, profile) for path in paths], profile)
    assert built["shape"] == committed["shape"] and built["rows"] == committed["rows"], \
        f"stale table: rerun {committed['generated_by']}"
    assert {name: getattr(R.Settings(), name) for name in R.MEMORY_SHAPE_SETTINGS} == committed["shape"]


@pytest.mark.skipif(not R.MEMORY_TABLE.exists(), reason="no record-89 memory table committed yet")
def test_a_24_gb_card_runs_the_record_with_the_savers_auto_picks(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 24564 / 1024, 101_376)
    runtime = R.resolve_runtime(R.Settings(), 0, 1, 0)
    notice = next(notice for notice in runtime.notices if notice.startswith("--memory=auto:"))
    assert " fits " in notice, notice
    row = next(row for row in committed_table()["rows"] if row["world_size"] == 1 and row["fp8"]
               and (row["checkpoint_blocks"], row["loss_chunk_tokens"])
               == (runtime.savers.checkpoint_blocks, runtime.savers.loss_chunk_tokens))
    assert row["peak_gib"] <= H.usable_memory_gib(24564 * 2**20)
