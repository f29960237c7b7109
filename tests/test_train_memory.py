"""Memory savers (activation checkpointing, chunked training loss) against the plain model, the GPU
capability checks on mocked devices, and --memory=auto's choice from the memory table."""
import json
import sys
import types

import pytest
import torch

import harness as H
from records.recipes import record21
from conftest import REPO, shard_paths, with_settings
from test_train_distributed import launch

T = record21()  # these tests cover the record-21 recipe kept under records/

# The record's 12-block layout at a width small enough to build and run quickly: 256 tokens, 1024 logits.
SHAPE = ["--model_dim=32", "--num_heads=2", "--head_dim=16", "--train_seq_len=256", "--val_seq_len=256",
         "--train_batch_tokens=512", "--val_tokens=256", "--block_size=32", "--max_window_tokens=128",
         "--vocab_size=1000", "--fp8_head=false"]
STEPS = 3


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def random_batches(seed: int):
    """Micro-batches of 256 random tokens, the same for every run with this seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, 1000, (257,), generator=generator)
        yield tokens[:-1].int(), tokens[1:]


def train_and_record(savers: T.MemorySavers, compiled: bool, args=()):
    """STEPS optimizer steps of 2 micro-batches; returns the micro-batch losses and each step's gradients."""
    settings = T.parse_settings(with_settings(SHAPE, *args))
    runtime = T.Runtime(0, 1, torch.device("cpu"), "sdpa", grad_accum_steps=2, savers=savers)
    model = T.build_model(settings, runtime)
    with torch.no_grad():  # zero-initialised projections and head would leave most gradients zero
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    optimizers = T.build_optimizers(model, settings, runtime)
    forward = torch.compile(model, dynamic=False) if compiled else model
    batches, losses, gradients = random_batches(seed=2), [], []
    for step in range(STEPS):
        window = torch.tensor(T.window_blocks_at(step, settings) + 1)
        for _ in range(runtime.grad_accum_steps):
            inputs, targets = next(batches)
            loss = forward(inputs, targets, window) / runtime.grad_accum_steps
            loss.backward()
            losses.append(loss.item())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return losses, gradients


def assert_same_training(reference, other, tolerance: float):
    (losses_a, grads_a), (losses_b, grads_b) = reference, other
    assert losses_a[-1] != losses_a[0], "the model must change between steps"
    for i, (a, b) in enumerate(zip(losses_a, losses_b)):
        assert abs(a - b) <= tolerance * abs(a), f"micro-batch {i}: loss {a} vs {b}"
    for step, (step_a, step_b) in enumerate(zip(grads_a, grads_b)):
        for name, a in step_a.items():
            assert a.abs().max() > 0, f"{name} gets no gradient: the comparison would be empty"
            difference = (a - step_b[name]).abs().max() / a.abs().max()
            assert difference <= tolerance, f"step {step}: {name} gradient differs by {difference:.2e} (relative)"


@pytest.fixture(scope="module")
def plain_training():
    torch.set_default_dtype(torch.float64)
    try:
        return train_and_record(T.MemorySavers(), False)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("savers", [T.MemorySavers(checkpoint_blocks=12), T.MemorySavers(checkpoint_blocks=5),
                                    T.MemorySavers(checkpoint_blocks=12, loss_chunk_tokens=96)])
def test_checkpointed_blocks_train_exactly_like_stored_activations(plain_training, float64, savers):
    assert_same_training(plain_training, train_and_record(savers, False), 1e-12)


@pytest.mark.slow
def test_compiled_savers_train_like_the_plain_model(float64):
    # Inductor's partitioner does the recompute here. One compilation (against the eager plain model) and
    # 2 blocks keep the test short on CPU.
    small = ["--num_layers=2", "--attention_layout=LS", "--value_embed_layout=0-"]
    plain = train_and_record(T.MemorySavers(), False, small)
    saving = train_and_record(T.MemorySavers(checkpoint_blocks=1, loss_chunk_tokens=112), True, small)
    assert_same_training(plain, saving, 1e-10)


@pytest.mark.slow
def test_two_ranks_with_savers_train_like_one_rank(tmp_path):
    train_files, val_files = shard_paths()
    args = ["--preset=tiny", "--compile=false", "--num_iterations=3", f"--train_files={train_files}",
            f"--val_files={val_files}", "--muon_momentum_warmup_steps=2", "--num_layers=4",
            "--attention_layout=LS-L", "--value_embed_layout=01-1", "--checkpoint_blocks=3",
            "--loss_chunk_tokens=208"]
    launch(1, "train", str(tmp_path / "one"), *args)
    launch(2, "train", str(tmp_path / "two"), *args)
    one = torch.load(tmp_path / "one.rank0.pt")
    two = torch.load(tmp_path / "two.rank0.pt")
    assert one["grad_accum_steps"] == 2 * two["grad_accum_steps"]
    for step, (a, b) in enumerate(zip(one["losses"], two["losses"])):
        assert abs(a - b) < 1e-6, f"step {step}: loss {a} on 1 rank vs {b} on 2 ranks"
    for name, reference in one["params"].items():
        difference = (reference - two["params"][name]).norm() / reference.norm().clamp_min(1e-12)
        assert difference < 1e-5, f"{name} differs between 1 and 2 ranks (relative {difference:.2e})"


def head_model(args, chunk: int):
    settings = T.parse_settings(with_settings(SHAPE, *args))
    torch.manual_seed(0)
    model = T.GPT(settings, "sdpa", T.MemorySavers(loss_chunk_tokens=chunk))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    return model


def loss_and_gradients(model, x: torch.Tensor, targets: torch.Tensor):
    x = x.clone().requires_grad_()
    loss = model.loss(x, targets)
    grad_x, grad_w = torch.autograd.grad(loss, (x, model.lm_head.weight))
    return loss, grad_x, grad_w


@pytest.mark.parametrize("chunk", [96, 16, 256, 4096])  # 96: chunks of 96, 96, 64 tokens
def test_chunked_training_loss_equals_unchunked(float64, chunk):
    generator = torch.Generator().manual_seed(3)
    x, targets = torch.randn(256, 32, generator=generator), torch.randint(0, 1000, (256,), generator=generator)
    reference = loss_and_gradients(head_model([], 0), x, targets)
    chunked = loss_and_gradients(head_model([], chunk), x, targets)
    for name, a, b in zip(("loss", "x gradient", "head gradient"), reference, chunked):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), f"{name} differs with {chunk}-token chunks"


def test_chunked_fp8_training_loss_equals_unchunked_fp8():
    # CPU emulates FP8 matmuls ~2000x slower than fp32: 64 tokens, a 128-wide padded vocabulary
    generator = torch.Generator().manual_seed(4)
    x, targets = torch.randn(64, 32, generator=generator), torch.randint(0, 100, (64,), generator=generator)
    fp8 = ["--fp8_head=true", "--vocab_size=100"]
    reference = loss_and_gradients(head_model(fp8, 0), x, targets)
    chunked = loss_and_gradients(head_model(fp8, 48), x, targets)  # chunks of 48 and 16 tokens
    exact = head_model(["--vocab_size=100"], 0)
    assert torch.equal(exact.lm_head.weight, head_model(fp8, 0).lm_head.weight)
    assert not torch.allclose(reference[0], exact.loss(x, targets), rtol=1e-6), "the FP8 head must be in use"
    for name, a, b in zip(("loss", "x gradient", "head gradient"), reference, chunked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), f"FP8 {name} differs with chunks"


def test_chunked_loss_never_keeps_full_logits_for_backward():
    """What autograd saves for backward, outside the recomputed chunks: never a (tokens x vocab) tensor."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 32, generator=generator).requires_grad_()
    targets = torch.randint(0, 1000, (256,), generator=generator)
    full_logits = 256 * 1024

    def largest_saved(model):
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model.loss(x, targets).backward()
        return max(sizes)

    assert largest_saved(head_model([], 0)) >= full_logits, "the probe must see the unchunked logits"
    assert largest_saved(head_model([], 96)) < 96 * 1024 + 1


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], memory_gb: float, shared_memory: int):
    properties = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                       total_memory=int(memory_gb * 10**9), shared_memory_per_block_optin=shared_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)


A100_40GB = ("NVIDIA A100-SXM4-40GB", (8, 0), 42.4, 166_912)
RTX_4090 = ("NVIDIA GeForce RTX 4090", (8, 9), 25.3, 101_376)


def test_fp8_head_on_compute_capability_8_0_stops_with_the_flag_that_turns_it_off(monkeypatch, capsys):
    fake_gpu(monkeypatch, *A100_40GB)
    with pytest.raises(T.SettingsError) as error:
        T.resolve_runtime(T.parse_settings([]), 0, 1, 0)
    message = str(error.value)
    assert "\n" not in message
    assert "--fp8_head=true needs FP8 matmuls, which need compute capability 8.9 or newer" in message
    assert "NVIDIA A100-SXM4-40GB has compute capability 8.0: run with --fp8_head=false" in message
    assert T.main(["--fp8_head=true"]) == 2  # main turns it into one line on stderr and exit status 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    runtime = T.resolve_runtime(T.parse_settings(["--fp8_head=false"]), 0, 1, 0)
    assert runtime.device.type == "cuda" and runtime.notices[0].startswith("GPU: NVIDIA A100-SXM4-40GB")


def test_gpu_without_bfloat16_is_refused(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), 17.0, 98_304)
    with pytest.raises(T.SettingsError, match=r"Tesla V100-SXM2-16GB \(compute capability 7.0\) has no bfloat16"):
        T.resolve_runtime(T.parse_settings(["--fp8_head=false"]), 0, 1, 0)


def test_flexattention_shared_memory_is_checked_against_the_gpu_checks_figures(monkeypatch):
    fake_gpu(monkeypatch, *RTX_4090)
    notices = T.resolve_runtime(T.parse_settings([]), 0, 1, 0).notices
    assert "FlexAttention: kernels need 99328 of the 101376 bytes of shared memory per block" in notices
    fake_gpu(monkeypatch, "hypothetical sm_89 GPU", (8, 9), 25.0, 65_536)
    with pytest.raises(T.SettingsError, match="need 99328 bytes of shared memory per block on compute capability "
                                              "8.9 .GPU check.; hypothetical sm_89 GPU offers 65536"):
        T.resolve_runtime(T.parse_settings([]), 0, 1, 0)
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3090", (8, 6), 25.4, 101_376)
    notices = T.resolve_runtime(T.parse_settings(["--fp8_head=false"]), 0, 1, 0).notices
    assert any(notice.startswith("FlexAttention: the GPU check has not compiled its kernels for compute "
                                 "capability 8.6") for notice in notices)
    notices = T.resolve_runtime(T.parse_settings(["--fp8_head=false", "--attention_backend=sdpa"]), 0, 1, 0).notices
    assert not any(notice.startswith("FlexAttention") for notice in notices), "SDPA needs no FlexAttention check"


def synthetic_table() -> dict:
    shape = {name: getattr(T.Settings(), name) for name in ("train_seq_len", "model_dim", "num_layers")}
    rows = []
    for world_size, optimizer_gib in ((1, 2.0), (8, 1.0)):
        for blocks, chunk, activations_gib in ((0, 0, 40.0), (0, 8192, 30.0), (6, 8192, 17.0), (12, 8192, 9.0)):
            rows.append(dict(world_size=world_size, fp8_head=True, checkpoint_blocks=blocks, loss_chunk_tokens=chunk,
                             recompute_flops_per_token=blocks * 10 + (80 if chunk else 0),
                             peak_gib=activations_gib + optimizer_gib))
    return dict(shape=shape, rows=rows)


@pytest.mark.parametrize("memory_gb,world_size,expected", [
    (85.0, 8, (0, 0)), (40.0, 8, (0, 8192)), (25.3, 1, (6, 8192)), (25.3, 8, (6, 8192)), (16.0, 1, (12, 8192)),
    (25.3, 4, (6, 8192)),  # 4 ranks: not in the table, bounded by the 1-rank rows
])
def test_memory_auto_picks_the_least_recomputation_that_fits(memory_gb, world_size, expected):
    savers, notice = H.choose_memory_savers(T.Settings(), world_size, int(memory_gb * 10**9), synthetic_table())
    assert (savers.checkpoint_blocks, savers.loss_chunk_tokens) == expected
    assert notice.startswith(f"--memory=auto: checkpoint_blocks={expected[0]} loss_chunk_tokens={expected[1]}")


def test_memory_auto_keeps_explicit_settings_and_says_when_nothing_fits():
    table = synthetic_table()
    savers, _ = H.choose_memory_savers(T.parse_settings(["--checkpoint_blocks=12"]), 1, 25 * 10**9, table)
    assert savers == T.MemorySavers(12, 8192), "explicit checkpoint_blocks wins; auto fills the chunk"
    savers, notice = H.choose_memory_savers(T.parse_settings(["--checkpoint_blocks=3", "--loss_chunk_tokens=0"]),
                                            1, 25 * 10**9, table)
    assert savers == T.MemorySavers(3, 0) and notice.startswith("memory savers as set")
    savers, notice = H.choose_memory_savers(T.Settings(), 1, 8 * 10**9, table)
    assert savers == T.MemorySavers(12, 8192) and "does NOT fit" in notice
    savers, notice = H.choose_memory_savers(T.parse_settings(["--train_seq_len=2048"]), 1, 8 * 10**9, table)
    assert savers == T.MemorySavers(0, 0) and "train_seq_len" in notice
    savers, notice = H.choose_memory_savers(T.parse_settings(["--memory=off"]), 1, 8 * 10**9, table)
    assert savers == T.MemorySavers(0, 0) and "--memory=off" in notice
    savers, notice = H.choose_memory_savers(T.Settings(), 1, None, table)
    assert savers == T.MemorySavers(0, 0) and "no GPU" in notice


@pytest.mark.parametrize("setting,message", [
    ("--checkpoint_blocks=13", "--checkpoint_blocks=13: choose 0..12 blocks"),
    ("--loss_chunk_tokens=100", "--loss_chunk_tokens=100: choose 0 (one piece) or a positive multiple of 16"),
    ("--memory=max", "--memory=max: choose auto or off"),
])
def test_bad_saver_settings_are_refused(setting, message):
    with pytest.raises(T.SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T.parse_settings([setting])


def test_start_up_memory_lower_bound_counts_the_savers():
    settings = T.parse_settings(["--preset=tiny"])
    parts = {savers: T.estimate_memory(settings, T.Runtime(0, 1, torch.device("cpu"), "sdpa", 4, savers))
             for savers in (T.MemorySavers(), T.MemorySavers(checkpoint_blocks=4, loss_chunk_tokens=96))}
    plain, saving = parts.values()
    # 6 blocks stored -> 2 stored + 1 recomputed at a time; 512 tokens of logits -> 96
    assert saving["activations of one micro-step"][0] * 6 == plain["activations of one micro-step"][0] * 3
    assert saving["logits of one micro-step"][0] * 512 == plain["logits of one micro-step"][0] * 96


# What README "Running on other GPUs" documents --memory=auto picks from the committed table (1 rank, FP8 head).
DOCUMENTED_CHOICES = [(24, T.MemorySavers(checkpoint_blocks=2, loss_chunk_tokens=8192)),
                      (40, T.MemorySavers()), (80, T.MemorySavers())]


@pytest.mark.parametrize("memory_gib,expected", DOCUMENTED_CHOICES)
def test_memory_auto_picks_the_documented_savers_from_the_committed_table(monkeypatch, memory_gib, expected):
    fake_gpu(monkeypatch, f"a {memory_gib} GiB GPU", (9, 0), memory_gib * 2**30 / 10**9, 232_448)
    runtime = T.resolve_runtime(T.parse_settings([]), 0, 1, 0)
    assert runtime.savers == expected
    assert any(notice.startswith("--memory=auto:") and "fits" in notice for notice in runtime.notices)
    explicit = T.resolve_runtime(T.parse_settings(["--checkpoint_blocks=0", "--loss_chunk_tokens=0"]), 0, 1, 0)
    assert explicit.savers == T.MemorySavers(), "explicit settings win over the table"


def test_committed_memory_table_is_the_one_its_reports_give():
    sys.path.insert(0, str(REPO / "tools"))
    import memory_table

    from records.recipes import RECORD21

    profile = memory_table.recipe_profile(RECORD21)
    assert profile.table_path == H.MEMORY_TABLE_PATH
    reports = [memory_table.read_report(path, profile)
               for path in sorted((REPO / "records/benchmarks/memory").glob("*/gpu_check.json"))]
    built = memory_table.build_table(reports, profile)
    committed = json.loads(H.MEMORY_TABLE_PATH.read_text())
    assert built["shape"] == committed["shape"] and built["rows"] == committed["rows"], \
        f"stale table: rerun python tools/memory_table.py --recipe={RECORD21.relative_to(REPO)} " \
        "records/benchmarks/memory/*/gpu_check.json"
    assert {row["fp8_head"] for row in built["rows"]} == {True, False}
