"""sample.py with the default recipe (train_gpt.py, record 89): its cached decode equals full recomputation,
sampling is deterministic with a seed, a trained checkpoint and its safetensors export give the same model (tied
or untied), a record-21 file is refused with the option that reads it (and read with it), errors are one line."""
import dataclasses
import sys

import pytest
import torch

import harness as H
import train_gpt as R
from conftest import REPO, random_tiny_model_fp64, shard_paths, tiktoken_cache
from records import recipes

sys.path.insert(0, str(REPO))
import sample  # noqa: E402


@pytest.fixture(autouse=True)
def offline_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prefix table's cache


@pytest.fixture(scope="module")
def random_model() -> sample.LoadedModel:
    model, settings = random_tiny_model_fp64()
    return sample.LoadedModel(model, settings, R)


def test_cached_decode_equals_full_recomputation(random_model):
    settings = random_model.settings
    # (tests/test_r89_decode.py compares the decode itself over windows and documents, in depth)
    tokens = torch.randint(0, 50257, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens[0] = tokens[45] = sample.END_OF_TEXT  # a second document starts at 45
    cached, full = sample.Decoder(random_model), sample.Decoder(random_model, use_cache=False)
    prompt = 30
    pairs = [(cached.feed(tokens[:prompt]), full.feed(tokens[:prompt]))]
    pairs += [(cached.feed([token]), full.feed([token])) for token in tokens[prompt:]]
    for position, (a, b) in enumerate(pairs, start=prompt):
        assert a.shape == (settings.vocab_size,) and a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=0, atol=1e-10), f"after {position} tokens: {(a - b).abs().max()}"


def test_sampling_is_deterministic_with_a_seed(random_model):
    prompt = [sample.END_OF_TEXT, 464, 3139, 286]

    def draw(seed, **kwargs):
        options = dict(max_new_tokens=12, temperature=1.0, top_k=0) | kwargs
        return sample.generate(sample.Decoder(random_model), prompt, seed=seed, **options)

    first = draw(0)
    assert len(first) == 12 and first == draw(0)
    assert first != draw(1)
    greedy = draw(5, temperature=0.0)
    assert greedy == draw(6, temperature=0.0), "greedy decoding ignores the seed"
    assert draw(7, top_k=1) == greedy, "top_k=1 is greedy"
    full = sample.generate(sample.Decoder(random_model, use_cache=False), prompt, 12, 1.0, 0, seed=0)
    assert full == first


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A final checkpoint and safetensors export after 3 steps of the tiny preset on real text, one stage a step,
    untied after step 1."""
    train_files, val_files = shard_paths()
    log_dir = tmp_path_factory.mktemp("sample_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
        patch.setenv("XDG_CACHE_HOME", str(log_dir / "cache"))
        assert R.main([
            "--preset=tiny", "--device=cpu", "--compile=false", "--warmup=false", "--stage_ends=1,2,3",
            "--extension_steps=0", "--split_step=1", "--val_every=0", "--val_tokens=2048",
            "--muon_momentum_warmup_steps=1", "--muon_momentum_cooldown_steps=1", f"--train_files={train_files}",
            f"--val_files={val_files}", f"--log_dir={log_dir}", "--run_id=run", "--save_checkpoint=true",
            "--save_safetensors=true"]) == 0
    return log_dir / "run" / "step_000003.pt", log_dir / "run" / "final.safetensors"


def test_the_safetensors_export_gives_the_checkpoint_s_logits(trained_run):
    checkpoint, safetensors = trained_run
    from_checkpoint = sample.load_model(checkpoint, torch.device("cpu"))
    from_export = sample.load_model(safetensors, torch.device("cpu"))
    assert not from_export.model.embedding_is_head, "the run untied after step 1"
    assert from_export.settings == from_checkpoint.settings and from_export.settings.num_iterations == 3
    tokens = torch.randint(0, 50257, (100,), generator=torch.Generator().manual_seed(2))
    tokens[0] = R.BOS
    logits = R.sequence_logits(from_checkpoint.model, tokens, from_checkpoint.settings)
    assert torch.equal(R.sequence_logits(from_export.model, tokens, from_export.settings), logits)
    # the run trained: its logits are not those of the initial model
    initial = R.build_model(from_checkpoint.settings, R.inference_runtime(torch.device("cpu")))
    assert not torch.allclose(R.sequence_logits(initial, tokens, from_checkpoint.settings), logits, atol=1e-3)


@pytest.mark.parametrize("untied", [False, True])
def test_an_export_before_and_after_the_untie_loads_as_the_model(tmp_path, untied):
    """Before the untie the embedding is the head (the separate embedding parameter is unused and saved as it is);
    after it, its own: the export records which, and the loaded model reads the tokens as the saved one did."""
    settings = R.parse_settings(["--preset=tiny", "--compile=false", "--device=cpu"])
    model = R.build_model(settings, R.inference_runtime(torch.device("cpu"))).eval()
    if untied:
        model.untie()
    with torch.no_grad():
        model.embed.normal_()  # a stale embedding while tied; a trained one after the untie
    path = tmp_path / "final.safetensors"
    H.export_safetensors(model.state_dict(), settings, R.RECIPE_FILE, path)
    loaded = sample.load_model(path, torch.device("cpu"))
    assert loaded.model.embedding_is_head == (not untied)
    tokens = torch.tensor([R.BOS, 464, 3139, 286, 4881])
    expected = R.sequence_logits(model, tokens, settings)
    assert torch.equal(R.sequence_logits(loaded.model, tokens, loaded.settings), expected)


def run_sample(capsys, path, *extra):
    code = sample.main([str(path), "--prompt=The city of", "--max_new_tokens=8", "--device=cpu", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_sample_command_is_deterministic_and_reads_both_formats(trained_run, capsys):
    checkpoint, safetensors = trained_run
    text, err = run_sample(capsys, checkpoint, "--seed=3")
    assert "tokens/s (cached decode, cpu, prompt 4 tokens)" in err
    assert text.startswith("The city of") and len(text) > len("The city of\n")
    assert run_sample(capsys, checkpoint, "--seed=3")[0] == text
    assert run_sample(capsys, safetensors, "--seed=3")[0] == text, "the export holds the same weights"
    recomputed, err = run_sample(capsys, checkpoint, "--seed=3", "--no_cache")
    assert recomputed == text and "full recomputation" in err
    draws = {run_sample(capsys, checkpoint, f"--seed={seed}", "--temperature=2.0", "--top_k=0")[0] for seed in (4, 5)}
    assert len(draws) == 2


def record21_checkpoint(path):
    """An untrained record-21 tiny model's checkpoint (record 21's own settings and state dict)."""
    r21 = recipes.record21()
    settings = r21.parse_settings(["--preset=tiny", "--compile=false"])
    model = r21.build_model(settings, r21.resolve_runtime(settings, 0, 1, 0))
    H.write_checkpoint(path, dict(settings=dataclasses.asdict(settings), model=model.state_dict()))
    return path


def test_a_record21_checkpoint_names_its_recipe_and_samples_with_it(tmp_path, capsys):
    checkpoint = record21_checkpoint(tmp_path / "r21.pt")
    capsys.readouterr()  # what building the model printed
    assert sample.main([str(checkpoint), "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    record21 = recipes.RECORD21.relative_to(REPO)
    assert err.count("\n") == 0
    assert err == (f"error: {checkpoint} was written by {record21} (record 21), not train_gpt.py (record 89): "
                   f"read it with sample.py --recipe={record21}")
    cached, _ = run_sample(capsys, checkpoint, f"--recipe={recipes.RECORD21}", "--seed=1")
    recomputed, _ = run_sample(capsys, checkpoint, f"--recipe={recipes.RECORD21}", "--seed=1", "--no_cache")
    assert cached == recomputed and cached.startswith("The city of")


def test_sample_command_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.pt"
    assert sample.main([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.pt: cannot read the checkpoint" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert sample.main([str(tmp_path / "junk.pt")]) == 2
    assert "not a train_gpt.py checkpoint" in capsys.readouterr().err
    settings = R.parse_settings(["--preset=tiny", "--compile=false", "--device=cpu"])
    checkpoint = tmp_path / "r89.pt"
    H.write_checkpoint(checkpoint, dict(settings=dataclasses.asdict(settings), model={}))
    assert sample.main([str(checkpoint), f"--recipe={recipes.RECORD21}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "written by train_gpt.py (record 89), not records/" in err
    assert sample.main([str(checkpoint), f"--recipe={tmp_path / 'nothing.py'}"]) == 2
    assert "nothing.py: no such file" in capsys.readouterr().err
    H.write_checkpoint(checkpoint, dict(settings=dict(unknown_setting=1), model={}))
    assert sample.main([str(checkpoint)]) == 2
    assert "nor of any recipe this repository knows" in capsys.readouterr().err
