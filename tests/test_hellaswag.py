"""evals/hellaswag.py on small synthetic files in the HellaSwag jsonl format (no network)."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import harness as H
import train_gpt as T
from conftest import random_tiny_model_fp64, tiktoken_cache
from evals import hellaswag


@pytest.fixture(autouse=True)
def offline_tokenizer(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))


def encoder():
    from sample import gpt2_tokenizer

    return gpt2_tokenizer().encode_ordinary


class ControlledDecoder:
    """A stand-in for train_gpt.Decoder with the same logits at every position: each token then has a fixed
    loss, so every ending's summed and mean loss are known in advance. It records what it is fed."""

    def __init__(self, bias: torch.Tensor, fed: list):
        self.bias, self.fed = bias, fed

    def feed(self, tokens):
        self.fed.append(tokens.tolist())
        return self.bias.expand(tokens.numel(), -1)

    def fork(self):
        return ControlledDecoder(self.bias, self.fed)


def controlled_model_and_examples():
    """' the' is cheap (about 1.2 nats), every other token costs about 11.2. Per example: which ending
    has the lowest summed loss, and which the lowest mean loss."""
    encode = encoder()
    bias = torch.zeros(50304)
    bias[encode(" the")[0]] = 10.0
    many_the = " ".join(["the"] * 12)
    examples = [  # (ctx, endings, label); comments: lowest sum / lowest mean
        ("A dog", ["the the the", "runs away.", "sleeps on a mat.", "cat"], 0),  # 0 / 0: both right
        ("A man", ["cat", f"{many_the} dog", "eats an apple.", "sings loudly."], 1),  # 0 / 1: mean right
        ("A child", ["cat", f"{many_the} dog", "plays a game.", "reads."], 0),  # 0 / 1: sum right
        ("A woman", ["the the", "laughs.", "cooks dinner now.", "the cat"], 3),  # 0 / 0: both wrong
    ]
    lines = [dict(ind=i, ctx=ctx, endings=endings, label=label, split="val")
             for i, (ctx, endings, label) in enumerate(examples)]
    return bias, lines


def reference_choices(bias: torch.Tensor, example: dict) -> tuple[int, int]:
    """Lowest summed and lowest mean loss, straight from the token costs."""
    costs = -torch.log_softmax(bias, dim=0)
    losses = [costs[encoder()(" " + ending)] for ending in example["endings"]]
    return (int(torch.stack([loss.sum() for loss in losses]).argmin()),
            int(torch.stack([loss.mean() for loss in losses]).argmin()))


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_scores_match_the_known_answers_of_a_controlled_model(tmp_path):
    bias, lines = controlled_model_and_examples()
    assert [reference_choices(bias, line) for line in lines] == [(0, 0), (0, 1), (0, 1), (0, 0)]
    examples = hellaswag.read_examples(write_jsonl(tmp_path / "val.jsonl", lines))
    fed = []
    counts = hellaswag.score(lambda: ControlledDecoder(bias, fed), examples, encoder())
    assert counts.tolist() == [4, 2, 2]  # acc 2/4 (examples 0, 2), acc_norm 2/4 (examples 0, 1)
    first_context = [T.BOS, *encoder()(lines[0]["ctx"])]
    assert fed[:5] == [first_context] + [encoder()(" " + ending) for ending in lines[0]["endings"]]
    per_example = [hellaswag.score(lambda: ControlledDecoder(bias, []), [e], encoder()).tolist() for e in examples]
    assert per_example == [[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0]]
    split = sum(hellaswag.score(lambda: ControlledDecoder(bias, []), examples, encoder(), rank, 3)
                for rank in range(3))
    assert split.tolist() == counts.tolist(), "the ranks' shares must add up to the whole"


def test_candidates_sharing_a_decoded_context_score_like_separate_sequences():
    """Each candidate continues a fork of the decoded context; it must score as its own sequence
    <|endoftext|> + context + ending does in the training forward. Packing the four as documents of one
    sequence would not: the smear, the bigram hash and the key offset read across a document start."""
    model, settings = random_tiny_model_fp64()
    context = list(range(1000, 1040))
    endings = [list(range(2000, 2000 + n)) for n in (3, 7, 1, 12)]
    scored = hellaswag.ending_losses(T.Decoder(model, settings), context, endings)
    packed = torch.tensor([token for ending in endings for token in (T.BOS, *context, *ending)])
    packed_losses = F.cross_entropy(T.sequence_logits(model, packed, settings)[:-1], packed[1:], reduction="none")
    end = 0
    for index, (ending, losses) in enumerate(zip(endings, scored)):
        alone = torch.tensor([T.BOS, *context, *ending])
        expected = F.cross_entropy(T.sequence_logits(model, alone, settings)[:-1], alone[1:],
                                   reduction="none")[-len(ending):]
        assert losses.shape == (len(ending),)
        assert torch.allclose(losses, expected, rtol=0, atol=1e-10), (losses - expected).abs().max()
        end += len(alone)
        in_packed = packed_losses[end - 1 - len(ending):end - 1]
        assert torch.allclose(in_packed, expected, atol=1e-6) == (index == 0), "only the first is alone in the pack"


def test_command_scores_a_checkpoint_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    settings = T.parse_settings(["--preset=tiny", "--compile=false"])
    model = T.build_model(settings, T.resolve_runtime(settings, 0, 1, 0))
    checkpoint = tmp_path / "model.pt"
    H.write_checkpoint(checkpoint, dict(settings=dataclasses.asdict(settings), model=model.state_dict()))
    _, lines = controlled_model_and_examples()
    examples_file = write_jsonl(tmp_path / "val.jsonl", lines)

    capsys.readouterr()  # drop what building the model printed
    assert hellaswag.main([str(checkpoint), f"--file={examples_file}", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    expected = hellaswag.score(lambda: T.Decoder(model.eval(), settings), lines, encoder())
    assert out.startswith("hellaswag: 4 examples (not the full 10042-example set): "
                          f"acc {expected[1] / 4:.4f} acc_norm {expected[2] / 4:.4f}")

    monkeypatch.setattr(hellaswag, "DEFAULT_FILE", tmp_path / "cache" / "hellaswag_val.jsonl")
    assert hellaswag.main([str(checkpoint), "--url=http://127.0.0.1:9/hellaswag_val.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: could not fetch hellaswag_val.jsonl from http://127.0.0.1:9/hellaswag_val.jsonl")
    assert "download it by hand from that address and pass --file=PATH" in err

    write_jsonl(tmp_path / "bad.jsonl", [lines[0], dict(ctx="x", endings=["a", "b"], label=0)])
    assert hellaswag.main([str(checkpoint), f"--file={tmp_path / 'bad.jsonl'}"]) == 2
    assert "bad.jsonl:2: not a HellaSwag example" in capsys.readouterr().err
