"""COMPRESSOR=rans: the block-class ANS coder decodes a committed chunk byte-exactly and round-trips
every kind of chunk the payload has."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import train_gpt as tg

pytest.importorskip("constriction")

FIXTURES = Path(__file__).parent / "fixtures"


def test_committed_chunk_decodes_byte_exactly():
    """tests/fixtures/rans_chunk.bin: rans_code(raw, 4) of 64 rows x 256 int6 values (offset 31),
    Laplace with row spreads 1, 6, 2.5, 12 (numpy default_rng(22)); any machine must decode it to
    exactly these bytes."""
    data = (FIXTURES / "rans_chunk.bin").read_bytes()
    assert data[0] == 1  # the ANS path, not the brotli fallback
    raw = tg.rans_decompress(data)
    assert len(raw) == 64 * 256
    assert hashlib.sha256(raw).hexdigest() == "db98a0df118b7deacaccf9cf03dcd7fbf40cc6e19626cab96ec6cbecef9c0f24"


def chunks():
    rng = np.random.default_rng(0)
    rows = np.clip(np.round(rng.normal(0, rng.uniform(1, 12, (300, 1)), (300, 700))), -31, 31) + 31
    return {
        "int6 rows, partial last block": rows.astype(np.uint8).tobytes()[:-37],
        "int7 wide": (np.clip(np.round(rng.laplace(0, 9, 200_000)), -63, 63) + 63).astype(np.uint8).tobytes(),
        "all byte values": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "one symbol": bytes([7]) * 3000,
        "shorter than a block": bytes(range(100)),
        "empty": b"",
        "json": json.dumps({"tensors": [{"name": f"w{i}", "shape": [512, 512]} for i in range(200)]}).encode(),
    }


@pytest.mark.parametrize("kind", list(chunks()))
def test_chunks_round_trip(kind):
    raw = chunks()[kind]
    enc = tg.rans_compress(raw, 8)
    assert tg.rans_decompress(enc) == raw
    if kind == "json":
        assert enc[0] == 0  # text goes to brotli


def test_row_spreads_beat_one_table():
    """Rows of very different spread: more than one class must code shorter than a single table."""
    raw = chunks()["int6 rows, partial last block"]
    assert len(tg.rans_compress(raw, 8)) < 0.97 * len(tg.rans_code(raw, 1))
