"""Export matrix: train one small model on CPU, then export it every way the issue asks about and
measure each: round-trip val_bpb, model bytes per compressor, compress/decompress seconds.

Variants (rows): RTN int6, GPTQ int6, GPTQ int6 + LQER, mixed GPTQ int5 MLP / int6 attention + LQER;
the embedding stays at EMBED_BITS throughout. Compressors (columns): zstd-22, brotli-11, lzma-9e on one
byte per value, brotli-11 on bit-packed values, and
an rANS entropy coder (`constriction`, optional) that codes each quantized tensor with its own
symbol histogram and compresses the rest of the payload with the best generic compressor.

    python bench/export_matrix.py --seconds 240            # english corpus, record preset
    python bench/export_matrix.py --data tiny --seconds 20 # smoke run

Appends one table per run to bench/RESULTS.md (--results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import train_gpt as tg  # noqa: E402
from minigolf import PRESETS, cpu_machine, english_data, git_commit, tiny_data  # noqa: E402

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
        rest[name + ".scale"] = t.scale
        if t.lqer is not None:
            for i, f in enumerate(t.lqer):
                rest[f"{name}.lqer{i}"] = f
    raw = tg.serialize_state(rest, {}, False)
    total += min(len(tg.compressor(c)[0](raw, tg.MAX_LEVELS[c])) for c in GENERIC)
    return total, enc_s, dec_s


def roundtrip_bpb(raw: bytes, args, rt, val_tokens, val_bytes) -> float:
    _, state = tg.deserialize_state(raw)
    model = tg.GPT(args)
    model.load_state_dict(state)
    model.looping = args.num_loops > 1
    return tg.evaluate(model, val_tokens, val_bytes, args, rt, args.eval_seq_len).val_bpb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240, help="training wallclock (default 240)")
    ap.add_argument("--data", choices=("english", "tiny"), default="english")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="record")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    opts = ap.parse_args(argv)

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
    hessians = tg.collect_hessians(model, tg.calibration_batches(model, args, rt, stats["loader"]), rt)
    val_tokens, val_bytes = tg.load_validation(args, luts)
    pre = tg.evaluate(model, val_tokens, val_bytes, args, rt, args.eval_seq_len).val_bpb
    n_params = sum(p.numel() for p in model.parameters())
    print(f"trained {stats['steps']} steps, {n_params} params, prequant val_bpb {pre:.4f}", flush=True)

    rows, best = [], None
    for name, overrides in VARIANTS.items():
        vargs = tg.Hyperparameters({**env, **{k: str(v) for k, v in overrides.items()}})
        t0 = time.perf_counter()
        qstate, _ = tg.quantize_model(model, vargs, hessians)
        quant_s = time.perf_counter() - t0
        meta = dict(config=vargs.model_config(), looping=model.looping)
        raw = tg.serialize_state(qstate, meta, False)
        bpb = roundtrip_bpb(raw, vargs, rt, val_tokens, val_bytes)
        cells = []
        for comp, packed in [(c, False) for c in GENERIC] + [("brotli", True)]:
            raw = tg.serialize_state(qstate, meta, packed)
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
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    section = [
        "", f"## Export matrix (`bench/export_matrix.py`), {stamp} UTC, commit {git_commit()}, {cpu_machine()}", "",
        f"`python bench/export_matrix.py --data {opts.data} --preset {opts.preset} --seconds {opts.seconds:g}`: "
        f"{stats['steps']} steps, {n_params:,} parameters, prequant val_bpb {pre:.4f}. Model bytes exclude the "
        f"artifact header and code; values stored one byte each unless bit-packed. Best: {best[1]}, {best[0]:,} bytes = "
        f"{best[0] / n_params:.3f} bytes/parameter.", "", *table,
    ]
    with open(opts.results, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
