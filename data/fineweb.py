"""Tokenize text into GPT-2 token shards (llm.c format) that train_gpt.py can read.

    python data/fineweb.py FILE_OR_DIR... --output_dir DIR [--prefix NAME]   # your own text
    python data/fineweb.py --hub 10B                                         # FineWeb sample-10BT

Every document becomes [<|endoftext|>] + tiktoken "gpt2" encode_ordinary(text). Every shard holds
exactly --shard_size tokens except the last. The first shard is the validation shard
(<prefix>_val_000000.bin), then come the training shards (<prefix>_train_000001.bin, ...).
Documents continue across training-shard boundaries as in llm.c, so no tokens are wasted. The one
document cut by the end of the validation shard is not continued in the first training shard: its
remaining tokens are dropped, so no validation text is ever trained on. A corpus smaller than one
shard is split at a document boundary instead: the first documents holding at least 10% of its
tokens become the validation shard, the rest the training shard (a single document is an error).

Local input formats (a trailing .gz is decompressed on the fly; directories are read recursively,
files in sorted order):
  .txt      documents separated by the text <|endoftext|>; a file without it is one document
  .jsonl    one JSON object per line; the document is the string in --text_field (default "text")
  WikiExtractor output, i.e. <doc ...> ... </doc> blocks (recognised by content, e.g. wiki_00)
Leading and trailing newlines of .txt and WikiExtractor documents are removed (they belong to the
file layout, not the text); whitespace-only documents are skipped in every format.
"""

import argparse
import gzip
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from shards import EOT, MAX_TOKENS, ShardError, write_shard

DATA_DIR = Path(__file__).resolve().parent
DOC_SEPARATOR = "<|endoftext|>"
WIKI_DOC_OPENINGS = ("<doc ", "<doc>")  # WikiExtractor: <doc id=".." url=".." title="..">
INPUT_FORMATS = ("txt", "jsonl", "wiki")
VAL_FRACTION = 0.1  # validation share of a corpus smaller than one shard


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    config: str
    output_dir_name: str  # the same folders and prefixes the pre-tokenized downloads use
    prefix: str


HUB_SOURCES = {
    "10B": HubSource("HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B", "fineweb"),
    "100B": HubSource("HuggingFaceFW/fineweb", "sample-100BT", "fineweb100B", "fineweb"),
    "edu10B": HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "finewebedu10B", "finewebedu"),
}


class InputError(ValueError):
    """The input text cannot be read as asked; the message says where and how to fix it."""


def open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def detect_format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    if name.endswith(".txt"):
        return "txt"
    if name.endswith(".jsonl"):
        return "jsonl"
    with open_text(path) as f:  # WikiExtractor files have no extension (wiki_00): look at the content
        first_line = next((line for line in f if line.strip()), "")
    if first_line.startswith(WIKI_DOC_OPENINGS):
        return "wiki"
    raise InputError(
        f"{path}: unknown input format; expected .txt, .jsonl or WikiExtractor <doc> files (optionally .gz), "
        "or say which with --format"
    )


def read_txt(path: Path) -> Iterator[str]:
    with open_text(path) as f:
        pieces: list[str] = []
        for line in f:
            *finished, unfinished = line.split(DOC_SEPARATOR)
            for piece in finished:
                pieces.append(piece)
                yield "".join(pieces).strip("\n")
                pieces = []
            pieces.append(unfinished)
        yield "".join(pieces).strip("\n")


def read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open_text(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}:{line_number}: not valid JSON ({error.msg}); a .jsonl file holds one JSON object per line"
                ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InputError(
                    f"{path}:{line_number}: no string field {text_field!r}; name the text field with --text_field"
                )
            yield text


def read_wikiextractor(path: Path) -> Iterator[str]:
    with open_text(path) as f:
        body: list[str] | None = None  # lines of the open <doc> block; None between blocks
        for line_number, line in enumerate(f, 1):
            if body is None:
                if line.startswith(WIKI_DOC_OPENINGS):
                    body = []
                elif line.strip():
                    raise InputError(
                        f"{path}:{line_number}: text outside a <doc> ... </doc> block; is this WikiExtractor output?"
                    )
            elif line.rstrip() == "</doc>":
                yield "".join(body).strip("\n")
                body = None
            else:
                body.append(line)
    if body is not None:
        raise InputError(f"{path}: ends inside a <doc> block (no closing </doc>); the file is truncated")


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, plus every file under each directory (sorted, hidden names skipped)."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not files:
        raise InputError(f"no input files in {', '.join(map(str, inputs))}")
    return files


def read_local_documents(files: list[Path], input_format: str | None, text_field: str) -> Iterator[str]:
    for path in files:
        try:
            file_format = input_format or detect_format(path)
            if file_format == "jsonl":
                yield from read_jsonl(path, text_field)
            elif file_format == "txt":
                yield from read_txt(path)
            else:
                yield from read_wikiextractor(path)
        except UnicodeDecodeError as error:
            raise InputError(f"{path}: not UTF-8 text ({error.reason}); convert it to UTF-8") from None
        except (gzip.BadGzipFile, EOFError) as error:
            raise InputError(f"{path}: broken gzip file ({error}); recompress it or pass the plain file") from None


def load_hub_documents(source: HubSource) -> Iterator[str]:
    """Stream FineWeb documents from the Hub (needs network and the `datasets` package)."""
    try:
        import datasets  # only this mode needs the large `datasets` package
    except ImportError:
        raise InputError("--hub needs the `datasets` package: pip install datasets") from None
    rows = datasets.load_dataset(source.repo_id, name=source.config, split="train", streaming=True)
    return (row["text"] for row in rows)


def check_tokenizer_available() -> None:
    try:
        tiktoken.get_encoding("gpt2")
    except Exception as error:  # tiktoken surfaces download problems as various requests/OS errors
        raise InputError(
            f"cannot load tiktoken's gpt2 tokenizer ({type(error).__name__}: {error}); it is downloaded once and "
            "cached, so run once with network access or point TIKTOKEN_CACHE_DIR at a cache that has it"
        ) from error


def tokenize_document(text: str) -> np.ndarray:
    """[<|endoftext|>] + the document's tokens (runs in the worker processes; tiktoken caches the encoding)."""
    return np.array([EOT] + tiktoken.get_encoding("gpt2").encode_ordinary(text), dtype=np.uint16)


class ShardWriter:
    """Cuts a stream of tokenized documents into shards of exactly shard_size tokens (the last may be shorter)."""

    def __init__(self, output_dir: Path, prefix: str, shard_size: int):
        self.output_dir = output_dir
        self.prefix = prefix
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0
        self.paths: list[Path] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.dropped_tokens = 0  # tail of the document cut by the end of the validation shard
        self.small_corpus_split = None  # (validation documents, validation tokens) when the corpus < one shard
        self.progress = tqdm(unit="tok", unit_scale=True, desc="tokenizing", postfix="0 shards written")

    def _next_name(self) -> str:
        index = len(self.paths)
        return f"{self.prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"

    def add(self, tokens: np.ndarray) -> None:
        self.num_documents += 1
        start = 0
        while start < len(tokens):
            count = min(len(self.buffer) - self.filled, len(tokens) - start)
            self.buffer[self.filled : self.filled + count] = tokens[start : start + count]
            self.filled += count
            start += count
            self.progress.update(count)
            if self.filled == len(self.buffer):
                closing_validation = not self.paths
                self._write()
                if closing_validation:
                    self.dropped_tokens = len(tokens) - start
                    return

    def _write(self) -> None:
        path = self.output_dir / self._next_name()
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.num_tokens += self.filled
        self.filled = 0
        self.progress.set_postfix_str(f"{len(self.paths)} shards written")

    def close(self) -> None:
        if self.filled and not self.paths:
            self._split_small_corpus()
        elif self.filled:
            self._write()
        self.progress.close()

    def _split_small_corpus(self) -> None:
        """The whole corpus is smaller than one shard: rather than a validation shard and no training data,
        the validation shard gets the first whole documents holding at least VAL_FRACTION of the tokens
        and the training shard the rest (no document is cut, so no token is dropped)."""
        tokens = self.buffer[: self.filled]
        starts = np.flatnonzero(tokens == EOT)  # every document starts with <|endoftext|>
        later = starts[starts >= max(1, int(np.ceil(VAL_FRACTION * len(tokens))))]
        if len(later) == 0:
            raise InputError(
                f"the corpus holds {len(tokens):,} tokens in {len(starts)} document(s): too few documents to leave "
                "training data after the validation shard; add more text"
            )
        cut = int(later[0])
        self.small_corpus_split = (int(np.sum(starts < cut)), cut)
        train_part = tokens[cut:].copy()
        self.filled = cut
        self._write()
        self.buffer[: len(train_part)] = train_part
        self.filled = len(train_part)
        self._write()


def tokenize_to_shards(
    documents: Iterable[str], output_dir: Path, prefix: str, shard_size: int, workers: int
) -> ShardWriter:
    """Tokenize documents in worker processes and write them, in order, as shards; returns the writer's totals."""
    existing = sorted(output_dir.glob(f"{prefix}_*.bin"))
    if existing:
        raise InputError(
            f"{output_dir} already holds {len(existing)} {prefix}_*.bin shards (e.g. {existing[0].name}); "
            "delete them or choose another --output_dir or --prefix"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    check_tokenizer_available()  # fail early, and forked workers inherit the loaded encoding
    writer = ShardWriter(output_dir, prefix, shard_size)
    try:
        with multiprocessing.Pool(workers) as pool:
            # imap keeps document order, so the output does not depend on the number of workers.
            for tokens in pool.imap(tokenize_document, documents, chunksize=64):
                writer.add(tokens)
        writer.close()
        if not writer.paths:
            raise InputError("no documents to tokenize (all inputs are empty or shorter than --min_chars)")
    except BaseException:
        # A partial set of shards would look like a complete, smaller dataset: remove it.
        writer.progress.close()
        for path in writer.paths:
            path.unlink(missing_ok=True)
        raise
    return writer


def positive_int(text: str) -> int:
    value = int(text)  # accepts 100_000_000 too
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize text with GPT-2's tokenizer into llm.c token shards (first shard = validation).",
        epilog="Input formats and shard boundaries are described at the top of data/fineweb.py and in data/README.md.",
    )
    parser.add_argument(
        "inputs", nargs="*", type=Path, help="text files or directories (.txt, .jsonl, WikiExtractor, .gz)"
    )
    parser.add_argument(
        "--hub", choices=sorted(HUB_SOURCES), help="tokenize a FineWeb sample streamed from the Hub instead"
    )
    parser.add_argument(
        "--output_dir", type=Path, help="where to write shards (default with --hub: data/fineweb10B etc.)"
    )
    parser.add_argument(
        "--prefix", help="shard file name prefix (default: the output folder's name; with --hub: fineweb or finewebedu)"
    )
    parser.add_argument("--shard_size", type=positive_int, default=10**8, help="tokens per shard (default 100,000,000)")
    parser.add_argument(
        "--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes"
    )
    parser.add_argument(
        "--format", choices=INPUT_FORMATS, help="input format of all files (default: from the name/content)"
    )
    parser.add_argument(
        "--text_field", default="text", help="JSON field holding the text in .jsonl input (default: text)"
    )
    parser.add_argument("--min_chars", type=int, default=0, help="skip documents shorter than this many characters")
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.hub):
        parser.error("give input files/directories or --hub (exactly one of the two)")
    if args.shard_size > MAX_TOKENS:
        parser.error(f"--shard_size must be at most {MAX_TOKENS:,} (the header stores it as int32)")
    if args.hub:
        source = HUB_SOURCES[args.hub]
        args.output_dir = args.output_dir or DATA_DIR / source.output_dir_name
        args.prefix = args.prefix or source.prefix
    elif args.output_dir is None:
        parser.error("--output_dir is required with input files")
    args.prefix = args.prefix or args.output_dir.resolve().name
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.hub:
            documents = load_hub_documents(HUB_SOURCES[args.hub])
        else:
            documents = read_local_documents(expand_inputs(args.inputs), args.format, args.text_field)
        kept = (text for text in documents if len(text) >= args.min_chars and text.strip())
        result = tokenize_to_shards(kept, args.output_dir, args.prefix, args.shard_size, args.workers)
    except (InputError, ShardError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(result.paths)} shards to {args.output_dir}: 1 validation + {len(result.paths) - 1} training, "
        f"{result.num_tokens:,} tokens, {result.num_documents:,} documents"
    )
    if result.dropped_tokens:
        print(
            f"dropped the last {result.dropped_tokens:,} tokens of the document cut by the end of the validation shard"
        )
    if result.small_corpus_split:
        documents, val_tokens = result.small_corpus_split
        print(
            f"note: the corpus is smaller than --shard_size={args.shard_size:,} tokens, so the validation shard holds "
            f"its first {documents:,} document(s) ({val_tokens:,} tokens, at least {VAL_FRACTION:.0%}) and the "
            f"training shard the other {result.num_tokens - val_tokens:,} tokens"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
