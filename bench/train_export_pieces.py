"""Issue 21's training/export pieces on CPU: what each costs.

    python bench/train_export_pieces.py            # all three parts, one section in bench/RESULTS.md
    python bench/train_export_pieces.py --parts steps,trained

Parts:
  steps    TRAIN_SEQ_SCHEDULE's step time: the mean ms per step of the record's 1024@0.1,2048@0.7,3072@1
           schedule at a quarter of the lengths against the fixed longest length, in one process, at
           the small preset's width and depth (same tokens per step at every length).
  record   AWQ-lite on/off at the record shape on the random stand-in (record_shape_model, random
           diagonal Hessians): the pre-flight estimate and the real artifact bytes.
  trained  AWQ-lite on/off on a small model trained for --seconds on data/tiny: bytes, Hessian-weighted
           error and round-trip val_bpb.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import repo_paths  # noqa: F401  (puts the repository on sys.path for train_gpt)
import train_gpt as tg
from export_matrix import append_report, markdown_table, record_shape_model, report_heading, roundtrip_bpb
from minigolf import PRESETS, tiny_data

REPO = repo_paths.REPO
CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)


def artifact_bytes(model, args, hessians) -> tuple[int, float, bytes]:
    """Model bytes (compressed payload as written), total Hessian-weighted error, raw payload."""
    qstate, errors = tg.quantize_model(model, args, hessians)
    chunks = tg.serialize_chunks(qstate, dict(config=args.model_config(), looping=model.looping, bits={}), False)
    comp, data = tg.compress_payload(chunks, args, CPU, {})
    return tg.artifact_file_bytes(comp, data), sum(errors.values()), b"".join(chunks)


def step_times(steps: int) -> list[str]:
    # the record's 1024/2048/3072 at a quarter: 256/512/768, 8 sequences of 768 tokens per step
    env = {k: str(v) for k, v in {**PRESETS["record"], **tiny_data(), "TRAIN_SEQ_LEN": 768, "TRAIN_BATCH_TOKENS": 6144}.items()}
    args = tg.Hyperparameters(env)
    T = args.train_seq_len
    schedule = [(T // 3, 0.1), (2 * T // 3, 0.7), (T, 1.0)]
    torch.manual_seed(0)
    model = tg.GPT(args)
    opts = tg.build_optimizers(model, args, CPU)
    accum = tg.grad_accum_steps(args, CPU)
    loader = tg.TrainLoader(args, CPU, accum)
    ms = {}
    for L, _ in schedule:
        tg.train_step(model, model, opts, loader.next_batch(L), args, CPU)  # first call: allocation
    for _ in range(steps):  # interleaved rounds, the fastest of each length: least disturbed by other jobs
        for L, _ in schedule:
            t0 = time.perf_counter()
            tg.train_step(model, model, opts, loader.next_batch(L), args, CPU)
            ms[L] = min(ms.get(L, float("inf")), 1000 * (time.perf_counter() - t0))
    ends = [0.0] + [p for _, p in schedule]
    mean = sum(ms[L] * (ends[i + 1] - ends[i]) for i, (L, _) in enumerate(schedule))
    rows = [[str(L), f"{ms[L]:.0f}", f"{ms[L] / ms[T]:.3f}"] for L, _ in schedule]
    return [f"Step time at the small preset's shape ({args.num_layers}L d{args.model_dim}, {args.train_batch_tokens:,} "
            f"tokens per step, fastest of {steps} interleaved rounds after one untimed step each, eager fp32, 1 thread):", "",
            *markdown_table(["sequence length", "ms/step", "vs longest"], rows), "",
            f"Schedule {','.join(f'{L}@{p:g}' for L, p in schedule)} by progress: mean {mean:.0f} ms/step vs "
            f"{ms[T]:.0f} fixed at {T}: ratio {mean / ms[T]:.3f} (step-time weighted by progress, so on a wallclock "
            f"cap the schedule fits {ms[T] / mean:.2f}x the steps)."]


def record_shape() -> list[str]:
    rows = []
    import pack_code
    code_bytes = len(pack_code.pack((REPO / "train_gpt.py").read_text())[0].encode())
    for groups in (0, 1):
        args = tg.Hyperparameters({"AWQ_LITE_GROUPS": str(groups)})
        model = record_shape_model(args)
        g = torch.Generator().manual_seed(0)
        hess = {n: torch.diag(torch.rand(m.weight.size(1), generator=g) + 0.5) for n, m in tg.quantizable_modules(model)}
        n, err, _ = artifact_bytes(model, args, hess)
        est = tg.estimate_artifact_bytes(model, args, code_bytes)
        rows.append([str(groups), f"{code_bytes + n:,}", f"{est:,}", f"{100 * (est / (code_bytes + n) - 1):+.3f}%", f"{err:.4g}"])
        print(" | ".join(rows[-1]), flush=True)
    return ["AWQ-lite at the record shape on the random stand-in (`record_shape_model`, random diagonal Hessians, "
            "default knobs: GPTQ, brotli-10, LQER asymmetric g32; code counted packed):", "",
            *markdown_table(["AWQ_LITE_GROUPS", "artifact bytes", "est_artifact_bytes", "estimate error",
                             "Hessian-weighted error"], rows)]


def trained(seconds: float) -> list[str]:
    env = {k: str(v) for k, v in {**PRESETS["tiny"], **tiny_data()}.items()}
    env.update(MAX_WALLCLOCK_SECONDS=str(seconds), GPTQ_RESERVE_SECONDS="0", RUN_ID="train_export_pieces")
    args = tg.Hyperparameters(env)
    torch.manual_seed(args.seed)
    model = tg.GPT(args)
    stats = tg.train(model, args, CPU, None, None)
    hessians = tg.collect_hessians(model, tg.calibration_batches(model, args, CPU, stats.loader), CPU)
    import sentencepiece as spm
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=args.tokenizer_path), args.vocab_size)
    val_tokens, val_bytes = tg.load_validation(args, luts)
    rows = []
    for groups in (0, 1, 3):
        vargs = tg.Hyperparameters({**env, "AWQ_LITE_GROUPS": str(groups)})
        n, err, raw = artifact_bytes(model, vargs, hessians)
        bpb = roundtrip_bpb(raw, vargs, CPU, val_tokens, val_bytes)
        rows.append([str(groups), f"{n:,}", f"{err:.5g}", f"{bpb:.4f}"])
        print(" | ".join(rows[-1]), flush=True)
    return [f"AWQ-lite on a small model trained on CPU (`tiny` preset, data/tiny, {seconds:g} s: {stats.steps} steps, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters; kept small: the machine is shared):", "",
            *markdown_table(["AWQ_LITE_GROUPS", "model bytes", "Hessian-weighted error", "round-trip val_bpb"], rows)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="steps,record,trained")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per sequence length")
    ap.add_argument("--seconds", type=float, default=30, help="training time of the trained part")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    opts = ap.parse_args(argv)
    torch.set_num_threads(1)
    parts = dict(steps=lambda: step_times(opts.steps), record=record_shape, trained=lambda: trained(opts.seconds))
    section = ["", report_heading("## Training and export pieces of issue 21 (`bench/train_export_pieces.py`)"), ""]
    for name in opts.parts.split(","):
        section += parts[name]() + [""]
    section.append("CPU timings on the shared 2-core machine (other jobs running): noisy; no GPU figure.")
    append_report(opts.results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
