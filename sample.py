"""Generate text from a model trained by train_gpt.py.

    python sample.py logs/RUN/step_001770.pt --prompt="The capital of France" --max_new_tokens=100 \
        --temperature=0.8 --top_k=50 --seed=0

CHECKPOINT is a train_gpt.py checkpoint (any world size) or its `final.safetensors` export. The model is
train_gpt.py's own, run in evaluation mode with dense masks made by the training mask function (the
prompt starts a document, as training documents do) and the final attention windows. Decoding is
incremental: each new token attends to the cached keys and values of the tokens before it.
`--no_cache` recomputes the whole context for every token instead (the reference the tests compare with).
Sampling is deterministic for a given --seed on a given device.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import harness as H
import train_gpt as T


class SampleError(ValueError):
    """A bad argument or file; the message says what is wrong."""


def load_model(path: Path, device: torch.device) -> tuple[T.GPT, T.Settings]:
    """The model of a checkpoint or safetensors export, in evaluation mode on device."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                settings_json, state = f.metadata()["settings"], {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types besides OSError and KeyError
            raise SampleError(f"{path}: cannot read the safetensors export ({error})") from None
        saved_settings = json.loads(settings_json)
    else:
        checkpoint = H.read_checkpoint(path)
        saved_settings, state = checkpoint["settings"], checkpoint["model"]
    known = {f.name for f in dataclasses.fields(T.Settings)}
    settings = T.Settings(**{name: value for name, value in saved_settings.items() if name in known})
    runtime = T.Runtime(rank=0, world_size=1, device=device, attention_backend="sdpa", grad_accum_steps=1)
    model = T.build_model(settings, runtime)
    model.load_state_dict(state)
    return model.eval(), settings


class Decoder:
    """Next-token logits for a growing token sequence, incrementally (a key/value cache) or by
    recomputing the whole sequence each time."""

    def __init__(self, model: T.GPT, settings: T.Settings, use_cache: bool = True):
        self.model, self.vocab_size = model, settings.vocab_size
        self.device = model.lm_head.weight.device
        self.window_blocks = torch.tensor(T.window_blocks_at(settings.num_iterations, settings), device=self.device)
        self.cache = T.DecodeCache(len(model.blocks)) if use_cache else None
        self.tokens = torch.empty(0, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def feed(self, tokens: list[int]) -> Tensor:
        """Appends tokens; returns the logits (vocab_size,) for the token after them."""
        new = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.tokens = torch.cat([self.tokens, new])
        if self.tokens.numel() > self.model.max_seq_len:
            raise SampleError(f"{self.tokens.numel()} tokens exceed the model's {self.model.max_seq_len}-token "
                              "context (rotary table): shorten the prompt or --max_new_tokens")
        if self.cache is not None:
            hidden = self.model.final_hidden(new, self.window_blocks, self.cache)
        else:
            hidden = self.model.final_hidden(self.tokens, self.window_blocks)
        return self.model.capped_logits(hidden[-1:])[0, :self.vocab_size]


def pick_token(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise a draw from softmax(logits / temperature) over the top_k."""
    logits = logits.double().cpu()  # on the host, so one seeded CPU generator serves every device
    if temperature == 0:
        return int(logits.argmax())
    if 0 < top_k < logits.numel():
        cutoff = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probabilities = torch.softmax(logits / temperature, dim=0)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def generate(decoder: Decoder, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int,
             seed: int, stop_at_end_of_text: bool = True) -> list[int]:
    """The tokens sampled after prompt, ending early at <|endoftext|> when stop_at_end_of_text."""
    generator = torch.Generator().manual_seed(seed)
    logits = decoder.feed(prompt)
    sampled = []
    for _ in range(max_new_tokens):
        token = pick_token(logits, temperature, top_k, generator)
        sampled.append(token)
        if len(sampled) == max_new_tokens or (stop_at_end_of_text and token == T.END_OF_TEXT):
            break
        logits = decoder.feed([token])
    return sampled


def gpt2_tokenizer():
    import tiktoken

    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = f"not in TIKTOKEN_CACHE_DIR={cache}" if cache else "TIKTOKEN_CACHE_DIR is not set"
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # tiktoken reports a failed download with various requests/OS errors
        raise SampleError(f"cannot load tiktoken's gpt2 tokenizer: {where} and the download failed; offline, set "
                          f"TIKTOKEN_CACHE_DIR to a folder holding it (README, 'Test data'), or run once with "
                          f"network ({type(error).__name__}: {error})") from None


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a train_gpt.py checkpoint (.pt) or final.safetensors")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise SampleError("--max_new_tokens must be >= 1, --temperature and --top_k >= 0")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SampleError("--device=cuda but no CUDA GPU is visible; use --device=cpu")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        model, settings = load_model(args.checkpoint, device)
        tokenizer = gpt2_tokenizer()
        prompt = [T.END_OF_TEXT] + tokenizer.encode_ordinary(args.prompt)
        if max(prompt) >= settings.vocab_size:
            raise SampleError(f"the prompt has token {max(prompt)}, outside the model's vocabulary of "
                              f"{settings.vocab_size} (GPT-2 tokens are < 50257)")
        decoder = Decoder(model, settings, use_cache=not args.no_cache)
        started = time.perf_counter()
        sampled = generate(decoder, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
        seconds = time.perf_counter() - started
    except (SampleError, H.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(sampled))
    way = "full recomputation" if args.no_cache else "cached decode"
    print(f"{len(sampled)} tokens in {seconds:.2f} s: {len(sampled) / seconds:.1f} tokens/s ({way}, {device.type}, "
          f"prompt {len(prompt)} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
