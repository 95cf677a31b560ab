"""Export matrix: train one small model on CPU, then export it every way the issue asks about and
measure each: round-trip val_bpb, model bytes per compressor, compress/decompress seconds.

Variants (rows): RTN int6, GPTQ int6, GPTQ int6 + LQER, mixed GPTQ int5 MLP / int6 attention + LQER;
the embedding stays at EMBED_BITS throughout. Compressors (columns): zstd-22, brotli-11, lzma-9e on one
byte per value, brotli-11 on bit-packed values, and
an rANS entropy coder (`constriction`, optional) that codes each quantized tensor with its own
symbol histogram and compresses the rest of the payload with the best generic compressor.

    python bench/export_matrix.py --seconds 240            # english corpus, record preset
    python bench/export_matrix.py --data tiny --seconds 20 # smoke run
    python bench/export_matrix.py --record-payload         # compression options at the record size

--record-payload skips training: it quantizes the default 11L/d512/sp8192 model with random weights
shaped like trained ones (record_shape_model) and times each compression option on that ~36 MB
payload, then compares the pre-flight estimate with the real artifact size.

Appends one table per run to bench/RESULTS.md (--results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import repo_paths  # noqa: F401  (puts the repository on sys.path for train_gpt)
import train_gpt as tg
from minigolf import PRESETS, cpu_machine, english_data, git_commit, tiny_data

REPO = repo_paths.REPO

VARIANTS = {
    "RTN int6": dict(QUANT="rtn", ATTN_BITS=6, MLP_BITS=6, LQER_RANK=0),
    "GPTQ int6": dict(QUANT="gptq", ATTN_BITS=6, MLP_BITS=6, LQER_RANK=0),
    "GPTQ int6 + LQER": dict(QUANT="gptq", ATTN_BITS=6, MLP_BITS=6),
    "GPTQ int5 MLP / int6 attn + LQER": dict(QUANT="gptq", ATTN_BITS=6, MLP_BITS=5),
}
GENERIC = ("zstd", "brotli", "lzma")


def rans_bytes(qstate: dict, args) -> tuple[int, float, float] | None:
    """Bytes of an rANS coding of the quantized integers (one categorical model per tensor, its
    histogram stored as uint32 counts) + the other payload bytes under the best generic compressor;
    with encode and decode seconds. None when constriction is not installed."""
    try:
        import constriction
    except ImportError:
        return None
    total, enc_s, dec_s = 0, 0.0, 0.0
    rest = {}
    for name, t in qstate.items():
        if not isinstance(t, tg.QTensor):
            rest[name] = t
            continue
        qmax = 2 ** (t.bits - 1) - 1
        sym = (t.q.numpy().astype(np.int32) + qmax).reshape(-1)
        counts = np.bincount(sym, minlength=2 * qmax + 1)
        probs = counts.astype(np.float64) / counts.sum()
        t0 = time.perf_counter()
        model = constriction.stream.model.Categorical(probs, perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, model)
        data = coder.get_compressed()
        enc_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = constriction.stream.stack.AnsCoder(data).decode(model, sym.size)
        dec_s += time.perf_counter() - t0
        assert np.array_equal(decoded, sym), name
        total += data.nbytes + 4 * counts.size
        rest[name + ".scale"] = t.scale.half()
        if t.lqer is not None:
            for i, f in enumerate(t.lqer):
                rest[f"{name}.lqer{i}"] = f
    raw = b"".join(tg.serialize_chunks(rest, {}, False))
    total += min(len(tg.compressor(c)[0](raw, tg.MAX_LEVELS[c])) for c in GENERIC)
    return total, enc_s, dec_s


def roundtrip_bpb(raw: bytes, args, rt, val_tokens, val_bytes) -> float:
    _, state = tg.deserialize_state(raw)
    model = tg.GPT(args)
    model.load_state_dict(state)
    model.looping = args.num_loops > 1
    return tg.evaluate(model, val_tokens, val_bytes, args, rt, args.eval_seq_len).val_bpb


def report_heading(title: str) -> str:
    """A RESULTS.md heading that says when, at which commit and on what machine."""
    return f"{title}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {cpu_machine()}"


def append_report(path: str, section: list[str]):
    """Append a section's lines to RESULTS.md at path, and print them."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def record_shape_model(args):
    """The default record-shape model with random weights shaped like trained ones: zero-initialised
    projections get the orthogonal init of the others, and the small fp16 tensors (norm scales,
    gains) get noise, since constant ones would compress to nothing."""
    torch.manual_seed(0)
    model = tg.GPT(args)
    with torch.no_grad():
        for _, m in tg.quantizable_modules(model):
            if getattr(m, "zero_init", False):
                torch.nn.init.orthogonal_(m.weight)
        for p in model.parameters():
            if p.numel() < args.keep_float_numel:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def compression_options():
    """label -> (compress one buffer, decompress one buffer, chunked?)."""
    import brotli
    import zstandard as zs
    tuned = zs.ZstdCompressionParameters.from_level(19, strategy=zs.STRATEGY_BTULTRA2, window_log=17, search_log=1, min_match=7)
    zd = lambda b: zs.ZstdDecompressor().decompress(b)
    return {
        "brotli-11, one stream (reference)": (lambda b: brotli.compress(b, quality=11), brotli.decompress, False),
        "zstd-22, one stream": (lambda b: zs.ZstdCompressor(level=22).compress(b), zd, False),
        "brotli-11 lgwin 18, chunks": (lambda b: brotli.compress(b, quality=11, lgwin=18), brotli.decompress, True),
        "brotli-10 lgwin 18, chunks (default)": (lambda b: brotli.compress(b, quality=10, lgwin=18), brotli.decompress, True),
        "brotli-10 lgwin 16, chunks": (lambda b: brotli.compress(b, quality=10, lgwin=16), brotli.decompress, True),
        "zstd-22, chunks": (lambda b: zs.ZstdCompressor(level=22).compress(b), zd, True),
        "zstd btultra2 windowLog 17 searchLog 1 minMatch 7, chunks": (lambda b: zs.ZstdCompressor(compression_params=tuned).compress(b), zd, True),
    }


def record_payload(opts) -> int:
    args = tg.Hyperparameters({"QUANT": "rtn"})
    model = record_shape_model(args)
    import pack_code
    code_bytes = len(pack_code.pack((REPO / "train_gpt.py").read_text())[0].encode())
    qstate, _ = tg.quantize_model(model, args, {})
    bits = {k: v.bits for k, v in qstate.items() if isinstance(v, tg.QTensor)}
    chunks = tg.serialize_chunks(qstate, dict(config=args.model_config(), looping=False, bits=bits), False)
    raw = b"".join(chunks)
    rows, ref = [], None
    for label, (enc, dec, chunked) in compression_options().items() if opts.options else ():
        parts = chunks if chunked else [raw]
        t0 = time.process_time()
        out = [enc(c) for c in parts]
        comp_s = time.process_time() - t0
        t0 = time.process_time()
        assert b"".join(dec(c) for c in out) == raw
        dec_s = time.process_time() - t0
        n = len(tg.frame_chunks(out)) if chunked else len(out[0])
        ref = ref or n
        rows.append([label, f"{n:,}", f"{100 * (n / ref - 1):+.3f}%", f"{comp_s:.1f}", f"{dec_s:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    t0, c0 = time.perf_counter(), time.process_time()  # compress_chunks' pool is threads: this process's CPU time
    pooled, _ = tg.compress_chunks(chunks, "brotli", 10, 2, {})
    pool_wall = time.perf_counter() - t0
    pool_cpu = time.process_time() - c0
    load = os.getloadavg()[0]
    est = tg.estimate_artifact_bytes(model, args, code_bytes)
    actual = code_bytes + tg.artifact_file_bytes("brotli", tg.frame_chunks(pooled))
    header = ["option", "bytes", "vs reference", "compress CPU s", "decompress CPU s"]
    table = markdown_table(header, rows)
    section = [
        "", report_heading("### Compression at the record size (`bench/export_matrix.py --record-payload`)"), "",
        f"Payload: the default 11L/d512/sp8192 model ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"with random weights shaped like trained ones (`record_shape_model`), through the real quantizer (RTN, "
        f"default bits and clips, {'asymmetric' if args.lqer_asym_group else 'int4'} LQER): {len(raw):,} bytes serialized in {len(chunks)} chunks. CPU seconds "
        "are one core's; chunks compress in parallel, one thread per core.", "", *(table + [""] if rows else []),
        f"Default (brotli-10, 256 KiB window, chunks) in a pool of 2 threads: {pool_wall:.1f} s wall, "
        f"{pool_cpu:.1f} CPU s, with load average {load:.1f} from other jobs on the 2 cores.", "",
        f"Pre-flight estimate vs real artifact at these defaults, code counted as the packed file ({code_bytes:,} bytes): "
        f"est_artifact_bytes {est:,}, real {actual:,} ({100 * (est / actual - 1):+.3f}%).",
    ]
    append_report(opts.results, section)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240, help="training wallclock (default 240)")
    ap.add_argument("--data", choices=("english", "tiny"), default="english")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="record")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    ap.add_argument("--record-payload", action="store_true", help="only the compression table at the record size (no training)")
    ap.add_argument("--no-options", dest="options", action="store_false",
                    help="with --record-payload: only the default export and the estimate check, no option table")
    opts = ap.parse_args(argv)
    if opts.record_payload:
        return record_payload(opts)

    env = {k: str(v) for k, v in PRESETS[opts.preset].items()}
    env.update({k: str(v) for k, v in (english_data(200, 5_000_000) if opts.data == "english" else tiny_data()).items()})
    env.update(MAX_WALLCLOCK_SECONDS=str(opts.seconds), GPTQ_RESERVE_SECONDS="0", RUN_ID="export_matrix")
    args = tg.Hyperparameters(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    import sentencepiece as spm
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=args.tokenizer_path), args.vocab_size)
    torch.manual_seed(args.seed)
    model = tg.GPT(args)
    stats = tg.train(model, args, rt, None, None)
    hessians = tg.collect_hessians(model, tg.calibration_batches(model, args, rt, stats.loader), rt)
    val_tokens, val_bytes = tg.load_validation(args, luts)
    pre = tg.evaluate(model, val_tokens, val_bytes, args, rt, args.eval_seq_len).val_bpb
    n_params = sum(p.numel() for p in model.parameters())
    print(f"trained {stats.steps} steps, {n_params} params, prequant val_bpb {pre:.4f}", flush=True)

    rows, best = [], None
    for name, overrides in VARIANTS.items():
        vargs = tg.Hyperparameters({**env, **{k: str(v) for k, v in overrides.items()}})
        t0 = time.perf_counter()
        qstate, _ = tg.quantize_model(model, vargs, hessians)
        quant_s = time.perf_counter() - t0
        meta = dict(config=vargs.model_config(), looping=model.looping)
        raw = b"".join(tg.serialize_chunks(qstate, meta, False))
        bpb = roundtrip_bpb(raw, vargs, rt, val_tokens, val_bytes)
        cells = []
        for comp, packed in [(c, False) for c in GENERIC] + [("brotli", True)]:
            raw = b"".join(tg.serialize_chunks(qstate, meta, packed))
            enc, dec = tg.compressor(comp)
            t0 = time.perf_counter()
            data = enc(raw, tg.MAX_LEVELS[comp])
            c_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert dec(data) == raw
            cells.append(f"{len(data):,} ({c_s:.1f}/{time.perf_counter() - t0:.2f}s)")
            if best is None or len(data) < best[0]:
                best = (len(data), f"{name} + {comp}{' bit-packed' if packed else ''}")
        r = rans_bytes(qstate, vargs)
        cells.append("not installed" if r is None else f"{r[0]:,} ({r[1]:.1f}/{r[2]:.2f}s)")
        if r is not None and r[0] < best[0]:
            best = (r[0], f"{name} + rANS")
        rows.append([name, f"{bpb:.4f}", f"{bpb - pre:+.4f}", f"{quant_s:.1f}", *cells])
        print(" | ".join(rows[-1]), flush=True)

    header = ["variant", "roundtrip bpb", "gap", "quantize s", "zstd-22 bytes (comp/decomp s)",
              "brotli-11", "lzma-9e", "brotli-11 bit-packed", "rANS + best generic"]
    table = markdown_table(header, rows)
    section = [
        "", report_heading("## Export matrix (`bench/export_matrix.py`)"), "",
        f"`python bench/export_matrix.py --data {opts.data} --preset {opts.preset} --seconds {opts.seconds:g}`: "
        f"{stats.steps} steps, {n_params:,} parameters, prequant val_bpb {pre:.4f}. Model bytes exclude the "
        f"artifact header and code; values stored one byte each unless bit-packed. Best: {best[1]}, {best[0]:,} bytes = "
        f"{best[0] / n_params:.3f} bytes/parameter.", "", *table,
    ]
    append_report(opts.results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
