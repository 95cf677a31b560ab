"""Turn a GPU probe's timestamped train_gpt.py output into the report bench/gpu_probe.sh writes.

Input: stdout of one train_gpt.py run with each line prefixed by the wall time it arrived
("<unix seconds> <line>", as gpu_probe.sh's filter writes it), ending with gpu_probe.sh's own
"probe_exit code:<rc> wall_s:<s>" line. Everything in the report is read from that log or its
timestamps; extrapolations are labelled and state their assumptions.

--results appends the probe's headline figures as one row of the GPU table in bench/RESULTS.md; run
it here on the log that came back from the device:
  python bench/probe_report.py --log <files_at>/train_stdout_ts.txt --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path

import repo_paths  # noqa: F401  (puts tools/ on sys.path for logparse)
from logparse import parse_text
from minigolf import append_row, git_commit

FULL_VAL_TOKENS_SP1024 = 62_021_632  # fineweb_val_000000.bin of the published sp1024 export
TARGET_GPUS = 8
BUDGET_S = 600.0


def split_timestamps(text: str) -> list[tuple[float, str]]:
    """[(seconds, line)] for lines that carry a leading timestamp; others are skipped."""
    out = []
    for raw in text.splitlines():
        stamp, _, line = raw.partition(" ")
        try:
            out.append((float(stamp), line))
        except ValueError:
            continue
    return out


def _num(text: str | None, scale: float = 1.0) -> float | None:
    try:
        return float(text) * scale
    except (TypeError, ValueError):
        return None


def steady_step_ms(train_steps: list[dict]) -> float | None:
    """Median ms/step between consecutive logged step lines in the second half of training
    (after compilation, warmup and the switch to looping have settled)."""
    half = train_steps[len(train_steps) // 2:]
    deltas = [(b["train_time"] - a["train_time"]) / (b["step"] - a["step"])
              for a, b in zip(half, half[1:]) if b["step"] > a["step"]]
    return statistics.median(deltas) if deltas else None


def report(text: str, full_val_tokens: int) -> tuple[str, dict]:
    """(report text, figures by key) for one probe log."""
    lines = split_timestamps(text)
    run = parse_text("\n".join(line for _, line in lines) + "\n")
    cfg, env, misc, ev = run.config, run.env or {}, run.misc, run.events
    out: list[str] = []
    fig: dict = {}

    def put(key: str, value, note: str = "") -> None:
        fig[key] = value
        if isinstance(value, float):
            value = f"{value:.3f}"
        out.append(f"{key}: {'n/a' if value is None else value}" + (f"    # {note}" if note else ""))

    out.append("# GPU probe (one GPU, record shape, synthetic data)")
    code = ev.get("probe_exit", {}).get("code")
    put("exit_code", code if isinstance(code, int) else None, "124 = killed by the probe's timeout")
    put("complete", run.final is not None)
    put("wall_s", _num(ev.get("probe_exit", {}).get("wall_s")))
    fig["finished_at"] = lines[-1][0] if lines else None
    put("device_name", env.get("device_name"))
    put("device_count", env.get("device_count"))
    put("torch", env.get("torch"))
    put("cuda", env.get("cuda"))
    for knob in ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "GRAD_ACCUM_STEPS",
                 "ITERATIONS", "WARMUP_STEPS", "COMPILE", "QUANT", "COMPRESSOR", "EVAL_STRIDE", "TTT_ENABLED",
                 "GPTQ_RESERVE_SECONDS", "FUSED_KERNELS"):
        put(f"config.{knob}", cfg.get(knob))
    put("attention_backend", misc.get("attention_backend"))
    put("fused_kernels", misc.get("fused_kernels"))  # 1: the Triton CE and MLP ran (FUSED_KERNELS)
    put("model_params", misc.get("model_params"))

    # --- training speed
    steps = run.train_steps
    last = steps[-1] if steps else None
    put("train_steps_logged", len(steps))
    put("last_step", last["step"] if last else None)
    put("step_avg_ms", last["step_avg"] if last else None, "train_gpt.py's running average, all steps")
    steady = steady_step_ms(steps)
    put("steady_ms_per_step", steady, "median between step lines in the second half of training")
    batch = int(cfg["TRAIN_BATCH_TOKENS"]) if cfg.get("TRAIN_BATCH_TOKENS") else None
    tok_s = batch * 1000 / steady if batch and steady else None
    put("train_tokens_per_s", tok_s, "TRAIN_BATCH_TOKENS / steady step time, this GPU")
    put("peak_mem_mib", misc.get("peak_mem_mib"), "as logged by train_gpt.py")

    # --- phase times: train_gpt.py's own event lines, then line arrival times
    put("compile_warmup_s", _num(ev.get("warmup", {}).get("ms"), 1e-3),
        "WARMUP_STEPS priming steps incl. torch.compile of the plain and looped graphs (logged)")
    t_first_step = next((t for t, line in lines if line.startswith("step:") and "train_loss:" in line), None)
    put("start_to_first_step_line_s", t_first_step - lines[0][0] if t_first_step and lines else None,
        "process output start -> first logged training step (arrival times)")
    put("looping_enabled_at_step", ev.get("looping_enabled", {}).get("step"))
    calib = _num(ev.get("gptq_calibration", {}).get("seconds"))
    quant = _num(ev.get("quantize", {}).get("seconds"))
    put("gptq_calibration_s", calib, "Hessian collection (logged)")
    put("quantize_s", quant, f"method {ev.get('quantize', {}).get('method')} (logged)")
    put("gptq_s", calib + quant if calib is not None and quant is not None else None, "calibration + quantization")
    put("calibration_and_export_s", _num((run.train_total or {}).get("export_ms"), 1e-3),
        "calibration + quantization + compression + write, counted against GPTQ_RESERVE_SECONDS (logged)")
    progress = {p.get("phase"): p.get("elapsed_s") for p in run.progress}
    for phase, elapsed in progress.items():
        put(f"phase.{phase}_s", f"{elapsed:g}", "last progress line of that eval phase")
    t_train_end = max((t for t, line in lines if line.startswith(("step:", "stopping_early:"))), default=None)
    if t_train_end is not None:
        out.append("# timeline after training (seconds after the last step line, by line arrival)")
        for t, line in lines:
            if t > t_train_end and not line.startswith(("progress ", "probe_exit ")):
                out.append(f"#   +{t - t_train_end:8.2f}s  {line[:110]}")

    # --- evaluation
    for label, result in run.evals.items():
        ms = result.get("eval_ms")
        rate = result["tokens"] * 1000 / ms if ms else None
        put(f"eval.{label}", f"val_bpb:{result['val_bpb']} tokens:{result['tokens']} eval_ms:{ms}")
        put(f"eval.{label}.tokens_per_s", rate)
        fig[f"{label}_tokens_per_s"] = rate
    put("eval_time_total_ms", run.eval_time["total_ms"] if run.eval_time else None)
    put("artifact_bytes_total", run.artifact["bytes_total"] if run.artifact else None,
        "trained on random tokens: size is not representative")

    # --- extrapolation to the 8-GPU, 600 s record run
    out.append(f"# extrapolation to {TARGET_GPUS} GPUs, {BUDGET_S:.0f} s; assumes the per-GPU step time measured here "
               "is unchanged at 8 GPUs (same per-GPU batch) and ignores all-reduce overhead")
    # GPTQ_RESERVE_SECONDS=auto is resolved at run time and logged on the gptq_reserve line
    reserve = _num(ev.get("gptq_reserve", {}).get("seconds")) or _num(cfg.get("GPTQ_RESERVE_SECONDS")) or 0.0
    put("extrapolated_steps_8gpu_600s",
        int((BUDGET_S - reserve) * 1000 / steady) if steady else None,
        f"({BUDGET_S:.0f} - GPTQ_RESERVE_SECONDS {reserve:g}) s / steady_ms_per_step")
    put("extrapolated_train_tokens_8gpu_600s",
        int((BUDGET_S - reserve) * 1000 / steady * batch * TARGET_GPUS) if steady and batch else None)
    sliding = run.evals.get("final_sliding")
    if sliding and sliding.get("eval_ms"):
        rate = sliding["tokens"] * 1000 / sliding["eval_ms"]
        put("extrapolated_full_val_sliding_s_8gpu", full_val_tokens / (rate * TARGET_GPUS),
            f"{full_val_tokens} val tokens / ({TARGET_GPUS} x this GPU's sliding tokens/s)")
    return "\n".join(out) + "\n", fig


# ----------------------------------------------------------------------------- results row

GPU_COLUMNS = ["date", "commit", "device", "command", "vocab", "status", "ms/step", "tok/s/GPU", "compile s",
               "peak MiB", "attention", "GPTQ s", "sliding tok/s/GPU", "steps 8x600s (extrapolated)"]

GPU_SECTION = """## GPU probe (`bench/gpu_probe.sh`, one GPU, record shape, synthetic data)

Rows appended by `bench/probe_report.py --results` from the log a device run returned. **device** as
train_gpt.py reported it · **ms/step** median between step lines in the second half of the run ·
**tok/s/GPU** TRAIN_BATCH_TOKENS / ms/step · **compile s** the WARMUP_STEPS priming, torch.compile
included · **peak MiB** torch.cuda.max_memory_allocated · **GPTQ s** calibration + quantization ·
**sliding tok/s/GPU** final_sliding tokens / eval time · **steps 8x600s** (600 - GPTQ_RESERVE_SECONDS)
s / ms/step: an extrapolation that assumes the same per-GPU step time on 8 GPUs and ignores all-reduce.
"""


def results_cells(fig: dict) -> list:
    """One GPU_COLUMNS row from report()'s figures."""
    code = fig["exit_code"]
    if code in (124, 137):
        status = "timeout"
    elif code != 0:
        status = f"exit {code if code is not None else '?'}"
    else:
        status = "ok" if fig["complete"] else "incomplete"
    date = dt.datetime.fromtimestamp(fig["finished_at"], dt.timezone.utc) if fig["finished_at"] else None
    devices = f"{fig['device_count']}x{fig['device_name']}" if fig["device_name"] else None

    def f(key, spec):
        return None if fig.get(key) is None else format(fig[key], spec)

    return [
        f"{date:%Y-%m-%d %H:%MZ}" if date else None, git_commit(), devices,
        f"ITERATIONS={fig['config.ITERATIONS']} bash bench/gpu_probe.sh", fig["config.VOCAB_SIZE"], status,
        f("steady_ms_per_step", ".1f"), f("train_tokens_per_s", ".0f"), f("compile_warmup_s", ".1f"),
        fig["peak_mem_mib"], fig["attention_backend"], f("gptq_s", ".1f"), f("final_sliding_tokens_per_s", ".0f"),
        fig["extrapolated_steps_8gpu_600s"],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="timestamped stdout of the probe run (train_stdout_ts.txt)")
    p.add_argument("--full-val-tokens", type=int, default=FULL_VAL_TOKENS_SP1024,
                   help=f"validation size to extrapolate sliding eval to (default {FULL_VAL_TOKENS_SP1024}, sp1024)")
    p.add_argument("--results", default=None, help="also append a row to this results table (bench/RESULTS.md)")
    args = p.parse_args(argv)
    text, fig = report(Path(args.log).read_text(errors="replace"), args.full_val_tokens)
    sys.stdout.write(text)
    if args.results:
        print(append_row(Path(args.results), GPU_SECTION, GPU_COLUMNS, results_cells(fig)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
