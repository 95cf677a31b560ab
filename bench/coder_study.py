"""Coder study: the quantized payload of one artifact coded every way issue 22 asks about, side by side.

Rows: today's brotli-10 chunks; COMPRESSOR=rans chunks (train_gpt.py's block-class ANS coder); the
records' per-group pipeline (tensors bucketed by role, rows of each tensor reordered by a greedy L1
nearest-neighbour sort with the permutation stored as uint16, each group through `lrzip -z -L 9`);
zstd-22 and brotli-10 on the same sorted groups; the rans coder per tensor with and without the row
sort. Per-tensor pipelines code the quantized values only and add one brotli-10 stream of everything
else (JSON header, scales, LQER factors, fp16 tensors) and the brotli-coded permutations. Columns:
bytes, wall seconds to compress and decompress, and the gap to the sum of the tensors' empirical
order-0 entropies (per tensor, and per row, tables not counted).

    python bench/coder_study.py --artifact /tmp/model.pgart   # a trained artifact (any COMPRESSOR)
    python bench/coder_study.py --random                      # the record-shape random stand-in

lrzip rows need the `lrzip` binary (benchmark only: apt-get install lrzip); without it they are skipped.
Appends one section to bench/RESULTS.md (--results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import repo_paths  # noqa: F401  (puts the repository on sys.path for train_gpt)
import train_gpt as tg
from export_matrix import markdown_table, record_shape_model, report_heading

ROLES = ("tok_emb", "c_q", "c_k", "c_v", "attn.proj", "mlp.fc", "mlp.proj")


def payload_chunks(opts) -> list[bytes]:
    """The decompressed payload chunks, as the export made them."""
    if opts.random:
        args = tg.Hyperparameters({"QUANT": "rtn"})
        qstate, _ = tg.quantize_model(record_shape_model(args), args, {})
        return tg.serialize_chunks(qstate, dict(config=args.model_config(), looping=False), False)
    buf = Path(opts.artifact).read_bytes()
    pos = len(tg.ARTIFACT_MAGIC) + 2
    name = buf[pos + 1:pos + 1 + buf[pos]].decode()
    data = buf[pos + 1 + buf[pos] + 40:]
    return [tg.compressor(name)[1](c) for c in tg.unframe_chunks(data)]


def split_payload(raw: bytes) -> tuple[dict, bytes]:
    """{tensor name: (uint8 symbols as rows x cols)} and every other payload byte joined."""
    (n,) = struct.unpack_from("<I", raw)
    table = json.loads(raw[4:4 + n])["tensors"]
    blob, keep, q = raw[4 + n:], np.ones(len(raw) - 4 - n, bool), {}
    for e in table:
        if e["kind"] == "q" and not e["packed"] and len(e["shape"]) == 2:
            off, size = e["q"]
            q[e["name"]] = np.frombuffer(blob, np.uint8, size, off).reshape(e["shape"])
            keep[off:off + size] = False
    return q, raw[:4 + n] + np.frombuffer(blob, np.uint8)[keep].tobytes()


def l1_order(x: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour row order under L1 distance, from row 0."""
    x = x.astype(np.int16)
    left, order = np.ones(len(x), bool), [0]
    left[0] = False
    for _ in range(len(x) - 1):
        cand = np.flatnonzero(left)
        nxt = cand[np.abs(x[cand] - x[order[-1]]).sum(1).argmin()]
        order.append(nxt)
        left[nxt] = False
    return np.array(order)


def entropy_bytes(sym: np.ndarray) -> float:
    p = np.bincount(sym.reshape(-1), minlength=256)
    p = p[p > 0] / sym.size
    return -(p * np.log2(p)).sum() * sym.size / 8


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def lrzip(data: bytes, decompress: bool = False) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / ("x.lrz" if decompress else "x"), Path(d) / ("x" if decompress else "x.lrz")
        src.write_bytes(data)
        flags = ["-d"] if decompress else ["-z", "-L", "9"]
        subprocess.run(["lrzip", "-q", "-f", *flags, "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def group_of(name: str) -> str:
    return next((r for r in ROLES if r in name), "other")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="a .pgart written by train_gpt.py")
    src.add_argument("--random", action="store_true", help="the record-shape random stand-in (RTN, no training)")
    ap.add_argument("--label", default="", help="what the payload is, for the table's heading")
    ap.add_argument("--workers", type=int, default=2, help="processes for the chunked rows (default 2)")
    ap.add_argument("--no-sort", dest="sort", action="store_false", help="skip the row-sorted pipelines (slow on 8192-row tables)")
    ap.add_argument("--results", type=Path, default=Path(repo_paths.REPO) / "bench" / "RESULTS.md")
    opts = ap.parse_args(argv)

    chunks = payload_chunks(opts)
    raw = b"".join(chunks)
    q, rest = split_payload(raw)
    ent_tensor = sum(entropy_bytes(v) for v in q.values())
    ent_row = sum(entropy_bytes(r) for v in q.values() for r in v)
    rows, ref = [], None

    def add(label, nbytes, comp_s, dec_s):
        nonlocal ref
        ref = ref or nbytes
        rows.append([label, f"{nbytes:,}", f"{100 * (nbytes / ref - 1):+.2f}%", f"{comp_s:.1f}", f"{dec_s:.1f}",
                     f"{100 * ((nbytes - len(rest_b)) / ent_tensor - 1):+.2f}%"])
        print(" | ".join(rows[-1]), flush=True)

    rest_b, rest_s = timed(tg.compressor("brotli")[0], rest, 10)
    for name, lvl in (("brotli", 10), ("rans", tg.DEFAULT_LEVELS["rans"])):
        (out, _), comp_s = timed(tg.compress_chunks, chunks, name, lvl, opts.workers, {})
        back, dec_s = timed(lambda: b"".join(tg.compressor(name)[1](c) for c in out))
        assert back == raw
        add(f"{name}-{lvl} chunks, {opts.workers} processes", len(tg.frame_chunks(out)), comp_s, dec_s)

    orders = {}
    if opts.sort:
        t0 = time.perf_counter()
        orders = {k: l1_order(v) for k, v in q.items()}
        sort_s = time.perf_counter() - t0
        perm_b = len(tg.compressor("brotli")[0](b"".join(o.astype(np.uint16).tobytes() for o in orders.values()), 10))
        print(f"L1 sort {sort_s:.1f} s, permutations {perm_b:,} bytes (brotli)", flush=True)
    for sort in (False, True) if opts.sort else (False,):
        side = len(rest_b) + (perm_b if sort else 0)
        extra_s = rest_s + (sort_s if sort else 0)
        tensors = {k: (v[orders[k]] if sort else v) for k, v in q.items()}
        groups = {}
        for k, v in tensors.items():
            groups.setdefault(group_of(k), []).append(v.tobytes())
        tag = "sorted rows" if sort else "unsorted"
        enc, dec = tg.compressor("rans")
        coded, comp_s = timed(lambda: [enc(v.tobytes(), tg.DEFAULT_LEVELS["rans"]) for v in tensors.values()])
        _, dec_s = timed(lambda: [dec(c) for c in coded])
        add(f"rans per tensor, {tag}", side + sum(map(len, coded)), comp_s + extra_s, dec_s)
        candidates = [("zstd-22", lambda b: tg.compressor("zstd")[0](b, 22), tg.compressor("zstd")[1]),
                      ("brotli-10", lambda b: tg.compressor("brotli")[0](b, 10), tg.compressor("brotli")[1])]
        if shutil.which("lrzip"):
            candidates.append(("lrzip -z -L 9", lrzip, lambda b: lrzip(b, True)))
        for label, genc, gdec in candidates:
            coded, comp_s = timed(lambda: [genc(b"".join(g)) for g in groups.values()])
            _, dec_s = timed(lambda: [gdec(c) for c in coded])
            add(f"{label} per role group, {tag}", side + sum(map(len, coded)), comp_s + extra_s, dec_s)

    values = sum(v.size for v in q.values())
    section = [
        "", report_heading(f"## Coder study, issue 22 (`bench/coder_study.py`): {opts.label or ('random stand-in' if opts.random else opts.artifact)}"), "",
        f"{values:,} quantized values in {len(q)} tensors, {len(raw):,} payload bytes in {len(chunks)} chunks. Empirical "
        f"order-0 entropy of the values: per tensor {ent_tensor:,.0f} bytes, per row {ent_row:,.0f} ({100 * (ent_row / ent_tensor - 1):+.2f}%), "
        f"tables not counted. The rest of the payload (header, scales, LQER, fp16) is {len(rest):,} bytes, {len(rest_b):,} as brotli-10, "
        "counted in every row. Seconds are wall time on the shared 2-core machine under load (noisy); chunked rows "
        f"use {opts.workers} processes, per-tensor rows one. 'vs entropy' = (bytes - coded rest) / per-tensor entropy - 1.", "",
        *markdown_table(["coder", "bytes", "vs first row", "compress s", "decompress s", "vs entropy"], rows),
    ]
    with open(opts.results, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
