"""HellaSwag (validation, 10,042 examples) accuracy of a train_gpt.py checkpoint, completion style.

    python evals/hellaswag.py logs/RUN/step_001285.pt                  # fetches the jsonl once
    python evals/hellaswag.py CHECKPOINT --file=hellaswag_val.jsonl    # a local copy
    torchrun --standalone --nproc_per_node=8 evals/hellaswag.py CHECKPOINT

Each example is a context and four endings. Every ending is scored by the model's cross-entropy on the
ending's tokens after the context; as in llm.c, `acc_norm` picks the ending with the lowest mean token
loss and `acc` the lowest summed loss. Each candidate is its own sequence, <|endoftext|> + context + ending,
read as train_gpt.py's validation reads one (train_gpt.sequence_logits): the context is decoded once and
each ending continues a copy of its key/value cache. (Packing the four as documents of one sequence would
not keep them apart: the smear, the bigram hash and the key offset read the token before a document start.)
Examples are split over ranks (example i on rank i % W) and the counts summed.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness as H  # noqa: E402
import train_gpt as T  # noqa: E402
from sample import SampleError, gpt2_tokenizer, load_model  # noqa: E402

# The validation set in its usual form: one JSON object per line with "ctx", "endings" (4) and "label".
VALIDATION_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VALIDATION_EXAMPLES = 10_042
DEFAULT_FILE = Path(__file__).resolve().parents[1] / "data" / "hellaswag" / "hellaswag_val.jsonl"


class EvalError(ValueError):
    """A missing or malformed file or a bad argument; the message says what to do."""


def fetch_validation_file(url: str, path: Path) -> Path:
    """The validation jsonl at path, downloaded from url first if it is not there (atomically)."""
    if path.exists():
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise EvalError(f"could not fetch {path.name} from {url} ({reason}); download it by hand from that "
                        f"address and pass --file=PATH, or put it at {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    H.write_file_atomically(path, [content])
    return path


def read_examples(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file; pass the HellaSwag validation jsonl with --file=PATH")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ok = (isinstance(example["ctx"], str) and len(example["endings"]) == 4
                      and all(isinstance(e, str) for e in example["endings"]) and example["label"] in (0, 1, 2, 3))
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise EvalError(f"{path}:{line_number}: not a HellaSwag example (a JSON object with a string "
                                "'ctx', 4 string 'endings' and a 'label' 0-3)")
            examples.append(example)
    if not examples:
        raise EvalError(f"{path}: holds no examples")
    return examples


def ending_losses(decoder: "T.Decoder", context: list[int], endings: list[list[int]]) -> list[torch.Tensor]:
    """Per-token cross-entropies of each ending after <|endoftext|> + context. decoder: a fresh T.Decoder (or
    anything with its feed and fork); the context is fed once, each ending to a fork of it."""
    context_logits = decoder.feed(torch.tensor([T.BOS, *context]))[-1:]  # the ending's first token follows it
    losses = []
    for ending in endings:
        logits = torch.cat([context_logits, decoder.fork().feed(torch.tensor(ending))[:-1]])  # (len(ending), V)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as the validation's: bf16 -> fp32
        losses.append(F.cross_entropy(wide, torch.tensor(ending, device=wide.device), reduction="none"))
    return losses


def score(new_decoder: Callable[[], "T.Decoder"], examples: list[dict], encode, rank: int = 0, world_size: int = 1
          ) -> torch.Tensor:
    """[examples, correct by summed loss, correct by mean loss] over this rank's share (float64)."""
    counts = torch.zeros(3, dtype=torch.float64)
    for example in examples[rank::world_size]:
        losses = ending_losses(new_decoder(), encode(example["ctx"]),
                               [encode(" " + ending) for ending in example["endings"]])
        sums = torch.stack([loss.sum() for loss in losses])
        means = torch.stack([loss.mean() for loss in losses])
        label = int(example["label"])
        counts += torch.tensor([1.0, float(sums.argmin() == label), float(means.argmin() == label)],
                               dtype=torch.float64)
    return counts


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a train_gpt.py checkpoint (.pt) or final.safetensors")
    parser.add_argument("--file", type=Path, default=None,
                        help=f"the validation jsonl (default: {DEFAULT_FILE}, fetched from --url when missing)")
    parser.add_argument("--url", default=VALIDATION_URL, help="where to fetch the validation jsonl")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N examples (0: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device=cuda but no CUDA GPU is visible; use --device=cpu")
        use_cuda = args.device != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        path = args.file if args.file is not None else fetch_validation_file(args.url, DEFAULT_FILE)
        examples = read_examples(path)
        if args.limit:
            examples = examples[:args.limit]
        loaded = load_model(args.checkpoint, device)
        encode = gpt2_tokenizer().encode_ordinary
    except (EvalError, SampleError, H.CheckpointError) as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    counts = score(lambda: T.Decoder(loaded.model, loaded.settings), examples, encode, rank, world_size)
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        dist.destroy_process_group()
    total, correct, correct_norm = counts.tolist()
    if rank == 0:
        note = "" if total == VALIDATION_EXAMPLES else f" (not the full {VALIDATION_EXAMPLES}-example set)"
        print(f"hellaswag: {int(total)} examples{note}: acc {correct / total:.4f} acc_norm {correct_norm / total:.4f} "
              f"({args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
