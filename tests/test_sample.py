"""sample.py: the cached decode equals full recomputation, sampling is deterministic with a seed, and a
trained checkpoint and its safetensors export sample the same text."""
import json
import sys

import pytest
import torch

import harness as H
import train_gpt as T
from conftest import REPO, random_tiny_model_fp64, shard_paths, tiktoken_cache

sys.path.insert(0, str(REPO))
import sample  # noqa: E402


@pytest.fixture(scope="module")
def random_model():
    return random_tiny_model_fp64()


def test_cached_decode_equals_full_recomputation(random_model):
    model, settings = random_model
    generator = torch.Generator().manual_seed(1)
    # 300 tokens with documents starting at 0, 100 and 290: longer than the short (128) and the long
    # (256) final windows, so the window and document masks of the cache both matter.
    tokens = torch.randint(0, 50000, (300,), generator=generator).tolist()
    for start in (0, 100, 290):
        tokens[start] = T.END_OF_TEXT
    cached, full = sample.Decoder(model, settings), sample.Decoder(model, settings, use_cache=False)
    prompt = 250
    pairs = [(cached.feed(tokens[:prompt]), full.feed(tokens[:prompt]))]
    pairs += [(cached.feed([token]), full.feed([token])) for token in tokens[prompt:]]
    assert cached.cache.layers[0].length == len(tokens)
    for position, (a, b) in enumerate(pairs, start=prompt):
        assert a.shape == (settings.vocab_size,) and a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=0, atol=1e-10), f"after {position} tokens: {(a - b).abs().max()}"
    # The last document starts at 290 and hides what came before it (rotary angles are relative).
    assert torch.allclose(pairs[-1][0], sample.Decoder(model, settings).feed(tokens[290:]), rtol=0, atol=1e-10)
    assert not torch.allclose(pairs[-1][0], sample.Decoder(model, settings).feed(tokens[291:]), atol=1e-3)


def test_sampling_is_deterministic_with_a_seed(random_model):
    model, settings = random_model
    prompt = [T.END_OF_TEXT, 464, 3139, 286]

    def draw(seed, **kwargs):
        options = dict(max_new_tokens=12, temperature=1.0, top_k=0) | kwargs
        return sample.generate(sample.Decoder(model, settings), prompt, seed=seed, **options)

    first = draw(0)
    assert len(first) == 12 and first == draw(0)
    assert first != draw(1)
    greedy = draw(5, temperature=0.0)
    assert greedy == draw(6, temperature=0.0), "greedy decoding ignores the seed"
    top1 = draw(7, top_k=1)
    assert top1 == greedy, "top_k=1 is greedy"
    full = sample.generate(sample.Decoder(model, settings, use_cache=False), prompt, 12, 1.0, 0, seed=0)
    assert full == first


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint and a safetensors export after 2 steps of the tiny preset on real text."""
    train_files, val_files = shard_paths()
    log_dir = tmp_path_factory.mktemp("sample_run")
    settings = T.parse_settings([
        "--preset=tiny", "--compile=false", "--warmup_steps=0", "--num_iterations=2", "--train_batch_tokens=512",
        "--val_seq_len=512", "--val_tokens=512", f"--train_files={train_files}", f"--val_files={val_files}",
        f"--log_dir={log_dir}", "--run_id=run", "--save_checkpoint=true", "--save_safetensors=true"])
    assert T.train(settings, T.resolve_runtime(settings, 0, 1, 0)) is None
    return log_dir / "run" / "step_000002.pt", log_dir / "run" / "final.safetensors"


def test_sample_command_is_deterministic_and_reads_both_formats(trained_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    checkpoint, safetensors = trained_checkpoint

    def run(path, *extra):
        code = sample.main([str(path), "--prompt=The city of", "--max_new_tokens=8", "--device=cpu", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "tokens/s (cached decode, cpu, prompt 4 tokens)" in err or "full recomputation" in err
        return out

    text = run(checkpoint, "--seed=3")
    assert text.startswith("The city of") and len(text) > len("The city of\n")
    assert run(checkpoint, "--seed=3") == text
    assert run(safetensors, "--seed=3") == text, "the export holds the same weights"
    assert run(checkpoint, "--seed=3", "--no_cache") == text
    assert run(checkpoint, "--seed=4", "--temperature=2.0", "--top_k=0") != run(
        checkpoint, "--seed=5", "--temperature=2.0", "--top_k=0")

    model, _ = sample.load_model(safetensors, torch.device("cpu"))
    from safetensors import safe_open

    with safe_open(str(safetensors), framework="pt") as f:
        assert T.Settings(**json.loads(f.metadata()["settings"])).num_iterations == 2
    for name, tensor in H.read_checkpoint(checkpoint)["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_sample_command_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.pt"
    assert sample.main([str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.pt: cannot read the checkpoint" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert sample.main([str(tmp_path / "junk.pt")]) == 2
    assert "not a train_gpt.py checkpoint" in capsys.readouterr().err
