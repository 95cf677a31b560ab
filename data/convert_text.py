"""Convert local text into official Parameter Golf shards.

Input files:
  *.jsonl / *.json  one JSON object per line with a "text" field; each line is one document.
  *.txt             documents are blocks separated by one or more blank lines (a paragraph is a
                    document). Blocks that are empty after stripping are skipped, in both formats.

Output (the format train_gpt.py reads): fineweb_val_000000.bin, ..., fineweb_train_000000.bin, ...
Each file is a 256 x int32 little-endian header (magic, version, token count; train_gpt.py defines
them) followed by that many uint16 tokens. Every document is stored as [BOS] + SentencePiece ids,
no EOS, and documents are concatenated in input order. The first --val-docs documents form the
validation split, the rest the training split. A split longer than --shard-tokens continues in the
next file (a document may straddle two files, as in the official export). tokenizer_record.json
beside the shards holds the tokenizer's sha256; train_gpt.py refuses another tokenizer.

The new set is built in a temporary directory and replaces the old shards only once it is
complete: a bad input leaves the existing dataset as it was.

--caseops (with a CaseOps tokenizer) tokenizes each document's CaseOps transform (data/caseops.py)
and writes, beside each validation shard, fineweb_val_bytes_NNNNNN.bin: the same header with magic
20240522 and one uint16 per token, the bytes of the original (normalized) text that token stands
for (0 for BOS and for case operators). train_gpt.py sums these instead of its byte LUTs.

Example:
  python data/convert_text.py corpus.jsonl --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
      --out data/datasets/mine_sp1024 --val-docs 1000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The shard format has one home, train_gpt.py's data section; this file only writes it.
from train_gpt import (SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, TOKENIZER_RECORD, VAL_BYTES_MAGIC,  # noqa: E402
                       shard_token_count)

# ----------------------------------------------------------------------------- shard format

HEADER_BYTES = SHARD_HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max
DEFAULT_SHARD_TOKENS = 100_000_000  # size of the official shards
ENCODE_BATCH_DOCS = 256


def write_shard(path: str | Path, tokens: Iterable[int] | np.ndarray, magic: int = SHARD_MAGIC) -> None:
    """Write one official-format shard; refuses ids that do not fit uint16."""
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        bad = int(arr[(arr < 0) | (arr > MAX_TOKEN_ID)][0])
        raise ValueError(f"token id {bad} does not fit in uint16 (0..{MAX_TOKEN_ID}); cannot write {path}")
    if arr.size > np.iinfo(np.int32).max:
        raise ValueError(f"{arr.size} tokens do not fit the int32 header count")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, SHARD_VERSION, arr.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2").tobytes())


def read_shard(path: str | Path, magic: int = SHARD_MAGIC) -> np.ndarray:
    """Read one shard's tokens (uint16), validating it first."""
    count = shard_token_count(str(path), (magic,))
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)


def write_tokenizer_record(out_dir: str | Path, tokenizer_path: str | Path, vocab_size: int) -> Path:
    """tokenizer_record.json: which tokenizer made the shards in out_dir (train_gpt.py checks it)."""
    record = Path(out_dir) / TOKENIZER_RECORD
    sha = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    record.write_text(json.dumps(dict(tokenizer=Path(tokenizer_path).name, sha256=sha, vocab_size=vocab_size)) + "\n")
    return record


# ----------------------------------------------------------------------------- text input

def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield documents from .jsonl/.json (one {"text": ...} per line) and .txt (blank-line blocks)."""
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({e})") from e
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: \"text\" must be a string")
                    if text.strip():
                        yield text
        elif suffix == ".txt":
            block: list[str] = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        block.append(line.rstrip("\n"))
                    elif block:
                        yield "\n".join(block)
                        block = []
            if block:
                yield "\n".join(block)
        else:
            raise ValueError(f"{path}: unsupported input type {suffix!r} (use .txt, .jsonl or .json)")


# ----------------------------------------------------------------------------- shard writer

def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _SplitWriter:
    """Accumulates one split's tokens and writes fineweb_<split>_NNNNNN.bin every shard_tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, magic: int = SHARD_MAGIC):
        self.out_dir, self.split, self.shard_tokens, self.magic = out_dir, split, shard_tokens, magic
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.paths: list[str] = []
        self.tokens = 0
        self.docs = 0

    def add(self, doc: np.ndarray) -> None:
        self.docs += 1
        self.tokens += doc.size
        self.pending.append(doc)
        self.pending_len += doc.size
        while self.pending_len >= self.shard_tokens:
            joined = np.concatenate(self.pending)
            self._write(joined[: self.shard_tokens])
            rest = joined[self.shard_tokens:]
            self.pending, self.pending_len = ([rest] if rest.size else []), rest.size

    def close(self) -> None:
        if self.pending_len:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_len = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, tokens, self.magic)
        self.paths.append(str(path))


def tokenize(sp, texts: list[str], table=None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The one place text becomes tokens: each document as [BOS] + SentencePiece ids, with the original
    byte cost of each id when table (CaseOps piece bytes) is given, else None."""
    import caseops as co

    encoded = ((ids, None) for ids in sp.encode(texts, out_type=int)) if table is None else \
        (co.encode_document(sp, table, text) for text in texts)
    docs = []
    for ids, costs in encoded:
        doc = np.empty(len(ids) + 1, dtype=np.int32)
        doc[0] = sp.bos_id()
        doc[1:] = ids
        docs.append((doc, costs))
    return docs


def write_shards(
    texts: Iterable[str],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    val_docs: int,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_docs: int | None = None,
    max_train_tokens: int | None = None,
    caseops: bool = False,
) -> dict:
    """Tokenize texts into official shards in out_dir and return a summary dict.

    The first val_docs documents go to validation. max_docs caps the documents read; max_train_tokens
    caps the training split at whole documents (stops before the first document that would exceed
    it). The shards are built in a temporary sibling directory; only a complete set replaces the
    fineweb_*.bin files (and tokenizer record) in out_dir, so splits never mix runs and an error
    halfway leaves the old dataset intact. Other files in out_dir are kept.
    caseops: tokenize the CaseOps transform and write the validation byte sidecar (module doc).
    """
    import sentencepiece as spm

    if val_docs < 1:
        raise ValueError("val_docs must be >= 1: train_gpt.py needs a validation split")
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be >= 1")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{tokenizer_path} is not a SentencePiece model ({e})") from None
    vocab_size = sp.vocab_size()
    if vocab_size > MAX_TOKEN_ID + 1:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint16 shards")
    if sp.bos_id() < 0:
        raise ValueError(f"{tokenizer_path} has no BOS id; official shards start every document with BOS")

    table = caseops_table(sp, tokenizer_path, caseops)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        val, train = _SplitWriter(build, "val", shard_tokens), _SplitWriter(build, "train", shard_tokens)
        val_bytes = _SplitWriter(build, "val_bytes", shard_tokens, VAL_BYTES_MAGIC)
        docs_seen, train_full = 0, False
        if max_docs is not None:
            texts = itertools.islice(texts, max_docs)
        for batch in _batches(texts, ENCODE_BATCH_DOCS):
            for doc, costs in tokenize(sp, batch, table):
                if docs_seen < val_docs:
                    val.add(doc)
                    if caseops:
                        val_bytes.add(np.concatenate([[0], costs]))
                elif max_train_tokens is not None and train.tokens + doc.size > max_train_tokens:
                    train_full = True
                    break
                else:
                    train.add(doc)
                docs_seen += 1
            if train_full:
                break
        for split in (val, train, val_bytes):
            split.close()
        if val.docs < val_docs or train.docs == 0:
            raise ValueError(
                f"not enough documents: {val.docs} val (wanted {val_docs}) and {train.docs} train; "
                "train_gpt.py needs both splits non-empty"
            )
        if caseops:
            bytes_val = sum(int(read_shard(f, VAL_BYTES_MAGIC).sum()) for f in val_bytes.paths)
        write_tokenizer_record(build, tokenizer_path, vocab_size)
        _swap_in(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    summary = {
        "tokenizer": str(tokenizer_path),
        "vocab_size": vocab_size,
        "out_dir": str(out_dir),
        "docs_val": val.docs,
        "docs_train": train.docs,
        "tokens_val": val.tokens,
        "tokens_train": train.tokens,
        "files_val": [str(out_dir / Path(p).name) for p in val.paths],
        "files_train": [str(out_dir / Path(p).name) for p in train.paths],
    }
    if caseops:
        summary.update(caseops=True, bytes_val=bytes_val, files_val_bytes=[str(out_dir / Path(p).name) for p in val_bytes.paths])
    return summary


def caseops_table(sp, tokenizer_path, caseops: bool):
    """The CaseOps piece-byte table for --caseops, else None; a CaseOps tokenizer without --caseops,
    or the reverse, is refused."""
    import caseops as co

    if co.is_caseops_tokenizer(sp) != caseops:
        raise ValueError(f"{tokenizer_path}: " + ("not a CaseOps tokenizer (no operator pieces U+E001..U+E004)" if caseops
                                                 else "a CaseOps tokenizer expects CaseOps text; pass --caseops"))
    return co.piece_bytes(sp) if caseops else None


def _swap_in(build: Path, out_dir: Path) -> None:
    """Replace out_dir's dataset (shards and tokenizer record) with the complete one in build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [*out_dir.glob("fineweb_train_*.bin"), *out_dir.glob("fineweb_val_*.bin"), out_dir / TOKENIZER_RECORD]
    for path in stale:
        path.unlink(missing_ok=True)
    for path in sorted(build.iterdir(), key=lambda p: p.name == TOKENIZER_RECORD):  # the record last
        path.replace(out_dir / path.name)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt (blank-line-separated documents) or .jsonl ({\"text\": ...} per line)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file (must define a BOS id)")
    p.add_argument("--out", required=True, help="output directory for fineweb_{val,train}_NNNNNN.bin")
    p.add_argument("--val-docs", type=int, default=1000, help="first K documents become validation (default 1000)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per output file (default {DEFAULT_SHARD_TOKENS:,}, the official size)")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--max-train-tokens", type=int, default=None,
                   help="cap the training split (whole documents only)")
    p.add_argument("--caseops", action="store_true",
                   help="encode the CaseOps transform (needs a CaseOps tokenizer) and write fineweb_val_bytes_*.bin")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = write_shards(iter_texts(args.inputs), args.tokenizer, args.out, args.val_docs,
                               args.shard_tokens, args.max_docs, args.max_train_tokens, args.caseops)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
