"""Write random official-format shards for timing runs where no real data can travel (GPU probe).

Tokens follow a Zipf-like law over ids 4..VOCAB-1 (the special ids 0..3 never appear) and documents
of random length start with BOS=1, so the loader, the byte LUTs and BOS-aware code see the same
shapes as with FineWeb. The text means nothing: use these shards for speed and memory, never for
val_bpb.

Example: python bench/synthetic_shards.py --out /tmp/synth --vocab 8192 --train-tokens 8000000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import repo_paths  # noqa: F401  (puts data/ on sys.path for convert_text)
from convert_text import write_shard

BOS_ID = 1
FIRST_ORDINARY_ID = 4  # after pad, bos, eos, unk
MEAN_DOC_TOKENS = 700  # about a FineWeb document in sp1024 tokens


def synthetic_tokens(n: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """n tokens: BOS-led documents of geometric length, ids drawn with p(rank r) ~ 1/r."""
    ranks = np.arange(1, vocab - FIRST_ORDINARY_ID + 1)
    p = 1.0 / ranks
    tokens = rng.choice(ranks.size, size=n, p=p / p.sum()) + FIRST_ORDINARY_ID
    starts = np.cumsum(rng.geometric(1.0 / MEAN_DOC_TOKENS, size=n // 16 + 1))
    tokens[0] = BOS_ID
    tokens[starts[starts < n]] = BOS_ID
    return tokens.astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab", type=int, required=True, help="vocabulary size (ids stay below it)")
    p.add_argument("--train-tokens", type=int, default=8_000_000, help="tokens in fineweb_train_000000.bin")
    p.add_argument("--val-tokens", type=int, default=1_000_000, help="tokens in fineweb_val_000000.bin")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not FIRST_ORDINARY_ID < args.vocab <= 65536:
        p.error("--vocab must be in 5..65536")
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    write_shard(out / "fineweb_val_000000.bin", synthetic_tokens(args.val_tokens, args.vocab, rng))
    write_shard(out / "fineweb_train_000000.bin", synthetic_tokens(args.train_tokens, args.vocab, rng))
    print(f"wrote {out}: val {args.val_tokens} tokens, train {args.train_tokens} tokens, vocab {args.vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
