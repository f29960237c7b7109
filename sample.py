"""Generate text from a model trained by train_gpt.py, or by an earlier recipe kept under records/.

    python sample.py logs/RUN/step_001285.pt --prompt="The capital of France" --max_new_tokens=100 \
        --temperature=0.8 --top_k=50 --seed=0
    python sample.py CKPT --recipe=records/track_1_short/2025-02-01_Record21/train_gpt.py   # a record-21 run's

CHECKPOINT is a checkpoint (any world size) or its `final.safetensors` export, of the recipe --recipe names
(default: train_gpt.py, record 89); a file another recipe wrote is refused with the --recipe that reads it. The
model is the recipe's own, in evaluation mode, reading the tokens as its validation does (the prompt starts a
document: <|endoftext|> first) with the final attention windows. Decoding is incremental: each new token attends
to the cached keys and values of the tokens before it. `--no_cache` recomputes the whole context for every token
instead (the reference the tests compare with). Sampling is deterministic for a given --seed on a given device.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

import harness as H
from records import recipes

END_OF_TEXT = 50256  # GPT-2's <|endoftext|>, which starts every document
KNOWN_RECIPES = {recipes.DEFAULT: "record 89", recipes.RECORD21: "record 21"}


class SampleError(ValueError):
    """A bad argument or file; the message says what is wrong."""


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module  # in evaluation mode
    settings: object  # the recipe's Settings
    recipe: ModuleType


def read_weights(path: Path) -> tuple[dict, dict]:
    """(the settings as saved, the model's state dict) of a checkpoint or a safetensors export."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                settings_json, state = f.metadata()["settings"], {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types besides OSError and KeyError
            raise SampleError(f"{path}: cannot read the safetensors export ({error})") from None
        return json.loads(settings_json), state
    checkpoint = H.read_checkpoint(path)
    return checkpoint["settings"], checkpoint["model"]


def writes(recipe: ModuleType, saved_settings: dict) -> bool:
    """Could recipe have written these settings (each is one of its own)?"""
    return set(saved_settings) <= {field.name for field in dataclasses.fields(recipe.Settings)}


def recipe_name(path: Path) -> str:
    relative = path.relative_to(recipes.REPO) if path.is_relative_to(recipes.REPO) else path
    return f"{relative} ({KNOWN_RECIPES[path]})" if path in KNOWN_RECIPES else str(relative)


def load_recipe_for(path: Path, recipe_path: Path, saved_settings: dict) -> ModuleType:
    """The recipe at recipe_path, if it wrote these settings; else SampleError naming the one that did."""
    recipe_path = recipe_path.resolve()
    if not recipe_path.is_file():
        raise SampleError(f"--recipe={recipe_path}: no such file; give train_gpt.py or a record's train_gpt.py "
                          "under records/")
    recipe = recipes.load_recipe(recipe_path)
    if writes(recipe, saved_settings):
        return recipe
    writer = next((known for known in KNOWN_RECIPES if known != recipe_path
                   and writes(recipes.load_recipe(known), saved_settings)), None)
    if writer is None:
        raise SampleError(f"{path}: its settings are not those of {recipe_name(recipe_path)} nor of any recipe "
                          f"this repository knows ({', '.join(map(recipe_name, KNOWN_RECIPES))})")
    relative = writer.relative_to(recipes.REPO)
    raise SampleError(f"{path} was written by {recipe_name(writer)}, not {recipe_name(recipe_path)}: "
                      f"read it with sample.py --recipe={relative}")


def is_record21(recipe: ModuleType) -> bool:
    """Record 21 decodes through its model's own methods; the default recipe has train_gpt.Decoder (section 4c)."""
    return not hasattr(recipe, "Decoder")


def load_model(path: Path, device: torch.device, recipe_path: Path = recipes.DEFAULT) -> LoadedModel:
    """The model of a checkpoint or safetensors export of the recipe at recipe_path, on device."""
    saved_settings, state = read_weights(path)
    recipe = load_recipe_for(path, recipe_path, saved_settings)
    settings = recipe.Settings(**saved_settings)
    if is_record21(recipe):
        runtime = recipe.Runtime(rank=0, world_size=1, device=device, attention_backend="sdpa", grad_accum_steps=1)
    else:
        runtime = recipe.inference_runtime(device)
    model = recipe.build_model(settings, runtime)
    model.load_state_dict(state)
    return LoadedModel(model.eval(), settings, recipe)


class Decoder:
    """Next-token logits (vocab_size,) for a growing token sequence, by the recipe's incremental decoding (a
    key/value cache) or by recomputing the whole sequence each time."""

    def __init__(self, loaded: LoadedModel, use_cache: bool = True):
        self.model, self.settings, self.recipe = loaded.model, loaded.settings, loaded.recipe
        self.use_cache = use_cache
        self.tokens = torch.empty(0, dtype=torch.long, device=next(self.model.parameters()).device)
        if is_record21(self.recipe):
            self.window_blocks = torch.tensor(self.recipe.window_blocks_at(self.settings.num_iterations,
                                                                           self.settings), device=self.tokens.device)
            self.cache = self.recipe.DecodeCache(len(self.model.blocks))
        else:
            self.cache = self.recipe.Decoder(self.model, self.settings)

    @torch.no_grad()
    def feed(self, tokens: list[int]) -> Tensor:
        """Appends tokens; returns the logits (vocab_size,) for the token after them."""
        new = torch.tensor(tokens, dtype=torch.long, device=self.tokens.device)
        self.tokens = torch.cat([self.tokens, new])
        if is_record21(self.recipe):
            logits = self.record21_logits(new)
        else:
            logits = (self.cache.feed(new) if self.use_cache
                      else self.recipe.sequence_logits(self.model, self.tokens, self.settings))[-1]
        return logits[:self.settings.vocab_size]

    def record21_logits(self, new: Tensor) -> Tensor:
        if self.tokens.numel() > self.model.max_seq_len:
            raise SampleError(f"{self.tokens.numel()} tokens exceed the model's {self.model.max_seq_len}-token "
                              "context (rotary table): shorten the prompt or --max_new_tokens")
        if self.use_cache:
            hidden = self.model.final_hidden(new, self.window_blocks, self.cache)
        else:
            hidden = self.model.final_hidden(self.tokens, self.window_blocks)
        return self.model.capped_logits(hidden[-1:])[0]


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
        if len(sampled) == max_new_tokens or (stop_at_end_of_text and token == END_OF_TEXT):
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
    parser.add_argument("--recipe", type=Path, default=recipes.DEFAULT,
                        help="the recipe that wrote the checkpoint (default: train_gpt.py; record 21: "
                             f"{recipes.RECORD21.relative_to(recipes.REPO)})")
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
        loaded = load_model(args.checkpoint, device, args.recipe)
        tokenizer = gpt2_tokenizer()
        prompt = [END_OF_TEXT] + tokenizer.encode_ordinary(args.prompt)
        vocab_size = loaded.settings.vocab_size
        if max(prompt) >= vocab_size:
            raise SampleError(f"the prompt has token {max(prompt)}, outside the model's vocabulary of "
                              f"{vocab_size} (GPT-2 tokens are < 50257)")
        decoder = Decoder(loaded, use_cache=not args.no_cache)
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
