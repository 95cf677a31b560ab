"""CPU mini-golf: run train_gpt.py for a fixed wallclock on 1 or 2 CPU processes and record the result.

Data (--data):
  english  official-format shards built once from ../shared/corpora/english.jsonl with
           ../shared/tokenizers/fineweb_1024_bpe.model into bench/cache/ (git-ignored); the first
           --val-docs documents are validation, training is capped at --train-tokens.
  tiny     the embedded data/tiny/ set (vocab 512); for smoke runs, not for comparing techniques.

Configurations are named presets (PRESETS below); --set KEY=VAL overrides one knob, so an ablation
is one flag:  python bench/minigolf.py --preset record --set SMEAR_GATE=0 --repeats 3
Knobs inherited from the calling shell are dropped, so a preset plus --set is the whole config.

Per run it reports steps, tokens/s (all processes), last train loss, final_prequant / final_roundtrip
/ final_sliding / final_ttt val_bpb, artifact bytes, eval seconds and each process's peak RSS
(measured by GNU time), and appends one markdown row to bench/RESULTS.md (--results). Compare
configurations at equal wallclock, and only when the difference beats the min..max spread of
--repeats 3 (printed at the end). Run files go to bench/runs/<run_id>/ (git-ignored; --runs-dir), train_gpt.py's
own log included (it runs there, so it writes nothing into logs/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import repo_paths  # noqa: F401  (puts the repository, data/ and tools/ on sys.path)
from convert_text import iter_texts, write_shards
from logparse import parse_text

REPO = repo_paths.REPO

SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpora" / "english.jsonl"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
CACHE = REPO / "bench" / "cache"
RUNS = REPO / "bench" / "runs"
RESULTS = REPO / "bench" / "RESULTS.md"
GNU_TIME = "/usr/bin/time"
GUARD_SECONDS = 900  # beyond --seconds: eval, GPTQ and TTT time before a hung run is killed

# ----------------------------------------------------------------------------- presets

# Shape that suits 2 CPU cores: ~2M parameters, 16 sequences of 256 tokens per step.
SMALL_SHAPE = dict(
    NUM_LAYERS=4, MODEL_DIM=192, NUM_HEADS=6, NUM_KV_HEADS=3, TRAIN_SEQ_LEN=256, TRAIN_BATCH_TOKENS=4096,
    GRAD_ACCUM_STEPS=1,
    ITERATIONS=1_000_000,  # the wallclock cap ends training, never the step count
    WARMUP_STEPS=0,  # compile priming only; nothing is compiled on CPU
    VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10,
    VAL_BATCH_SIZE=16384,  # the 8xH100 default would hold GBs of logits on CPU
    EVAL_STRIDE=128,  # same context/cost trade as stride 64 at seq 2048, but 2x not 32x the eval work
    KEEP_FLOAT_NUMEL=8192,  # 65536 scaled by (192/512)^2, so every matrix is quantized as at d=512
    # Step-count schedules scaled from ~5000 steps (8xH100) to the ~300 a 300 s CPU run makes: the
    # EMA starts at the initial weights, so decay 0.9965 would export mostly untrained weights.
    EMA_DECAY=0.95, MUON_MOMENTUM_WARMUP_STEPS=30,
    GPTQ_RESERVE_SECONDS=15,  # GPTQ calibration + export take ~14 s on 2 cores
)
# The contract's tiny CPU shape, for smoke tests.
TINY_SHAPE = dict(
    NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=2048,
    GRAD_ACCUM_STEPS=1, ITERATIONS=1_000_000, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10,
    VAL_BATCH_SIZE=8192, EVAL_STRIDE=0, TTT_ENABLED=0, KEEP_FLOAT_NUMEL=1024,
    EMA_DECAY=0.9, MUON_MOMENTUM_WARMUP_STEPS=10,  # ~100 steps in 20 s
    GPTQ_CALIBRATION_BATCHES=4,  # exercises GPTQ without dominating a 20 s smoke run
)
# Features of the plain baseline: everything the record stack adds, switched off.
PLAIN_BASELINE = dict(
    XSA_LAST_N=0, ROPE_DIMS=0, LN_SCALE=0, SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0, VE_DIM=0, UNET_SKIPS=0,
    NUM_LOOPS=1, PARALLEL_RESIDUAL_START=-1, ATTN_OUT_GATE=0, DOC_MASK=0, MLP_ACT="relu2", MLP_MULT=2,
    QK_GAIN_INIT=1.5, AVERAGING="none", QUANT="rtn",
)
PRESETS = {
    # train_gpt.py defaults (the record stack) at the small shape; knobs that name layers are mapped
    # from 11 layers to 4: XSA on all layers, loop the middle two, parallel residual from layer 3,
    # value embeddings (off unless --set VE_DIM=...) on the last two.
    "record": {**SMALL_SHAPE, "XSA_LAST_N": 4, "LOOP_START": 1, "LOOP_END": 2, "PARALLEL_RESIDUAL_START": 3,
               "VE_LAYERS": "2,3"},
    "baseline": {**SMALL_SHAPE, **PLAIN_BASELINE},
    # the record stack at the tiny shape, without sliding eval and TTT: a fast end-to-end check
    "tiny": {**TINY_SHAPE, "XSA_LAST_N": 2, "LOOP_START": 0, "LOOP_END": 1, "PARALLEL_RESIDUAL_START": 1,
             "VE_LAYERS": "1"},
}

# ----------------------------------------------------------------------------- data


def english_data(val_docs: int, train_tokens: int) -> dict:
    """Shards of the shared English corpus, built on first use and cached by their parameters."""
    for need in (CORPUS, SP1024):
        if not need.is_file():
            sys.exit(f"error: {need} not found; --data english needs ../shared (or use --data tiny)")
    out = CACHE / f"english_sp1024_val{val_docs}_train{train_tokens}"
    stamp = out / "summary.json"  # written last, so its presence means the shards are complete
    if not stamp.is_file():
        print(f"building {out} (once) ...", flush=True)
        t0 = time.time()
        summary = write_shards(iter_texts([CORPUS]), SP1024, out, val_docs=val_docs, max_train_tokens=train_tokens)
        summary["build_seconds"] = round(time.time() - t0, 1)
        stamp.write_text(json.dumps(summary, indent=2))
    return {"DATA_PATH": str(out), "TOKENIZER_PATH": str(SP1024), "VOCAB_SIZE": 1024}


def tiny_data() -> dict:
    return {"DATA_PATH": str(REPO / "data" / "tiny"), "TOKENIZER_PATH": str(REPO / "data" / "tiny" / "tokenizer.model"),
            "VOCAB_SIZE": 512}


# ----------------------------------------------------------------------------- log summary


def summarize_log(text: str) -> dict:
    """Figures of one run from its train_gpt.py log (read by tools/logparse.py); missing ones are None."""
    run = parse_text(text)
    last = run.train_steps[-1] if run.train_steps else None
    # the wallclock stop may fall between logged step lines; its line has the final step and time
    steps, train_ms = (last["step"], last["train_time"]) if last else (None, None)
    if run.stopping_early:
        steps = int(str(run.stopping_early["step"]).split("/")[0])
        train_ms = run.stopping_early["train_time"]
    # tokens/s as a wallclock average over training: steps x global batch / train time
    tok_s = None
    batch = run.config.get("TRAIN_BATCH_TOKENS")
    if steps and batch and train_ms:
        tok_s = steps * int(batch) / (train_ms / 1000)
    bpb = {label: run.evals[label]["val_bpb"] if label in run.evals else None
           for label in ("final_prequant", "final_roundtrip", "final_sliding", "final_ttt")}
    return {
        "steps": steps,
        "tok_s": tok_s,
        "train_loss": last["train_loss"] if last else None,
        "prequant_bpb": bpb["final_prequant"],
        "roundtrip_bpb": bpb["final_roundtrip"],
        "sliding_bpb": bpb["final_sliding"],
        "ttt_bpb": bpb["final_ttt"],
        "artifact_bytes": run.artifact["bytes_total"] if run.artifact else None,
        "eval_s": run.eval_time["total_ms"] / 1000 if run.eval_time else None,
        "score_label": run.final["label"] if run.final else None,
        "complete": run.final is not None,
        "errors": run.errors,
        "device": (run.env or {}).get("device"),
        "device_name": (run.env or {}).get("device_name"),
        "device_count": (run.env or {}).get("device_count"),
    }


# ----------------------------------------------------------------------------- results table

COLUMNS = ["date", "commit", "machine", "command", "status", "steps", "tok/s", "train_loss", "prequant bpb",
           "roundtrip bpb", "sliding bpb", "ttt bpb", "artifact bytes", "eval s", "peak RSS MiB/proc"]

RESULTS_INTRO = """# Mini-golf results

One row per run, appended by the tools named in each section. Every figure comes from a real run on
the machine named in its row (GPU rows name the device that run reported); none is estimated or
copied. **commit** is `git rev-parse --short HEAD` (`+dirty` when train_gpt.py differs from it,
`uncommitted` before the first commit); **date** is UTC; `-` means the run did not produce that figure.
"""

CPU_SECTION = """## CPU mini-golf (`bench/minigolf.py`)

**machine** `cpu-<cores>core <CPU model>` · **command** reproduces the run · **status** `ok`, `exit N`,
`timeout` or `incomplete` · **steps** optimizer steps in the wallclock · **tok/s** training tokens per
second, all processes together · **train_loss** last logged · **prequant / roundtrip / sliding / ttt
bpb** val_bpb of `final_prequant`, `final_roundtrip`, `final_sliding`, `final_ttt` · **artifact bytes**
code + compressed model · **eval s** everything after training · **peak RSS MiB/proc** maximum resident
set of each training process, rank 0 first, measured by GNU time.
Data `english`: the first 200 documents of `../shared/corpora/english.jsonl` are validation, sp1024
tokenizer; val_bpb compares configurations with each other, not with the FineWeb leaderboard. Claim a
difference only when it beats the min..max spread of `--repeats 3`.
"""


def fmt(value, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def markdown_row(cells: list) -> str:
    def cell(v) -> str:
        return "-" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    return "| " + " | ".join(cell(c) for c in cells) + " |"


def append_row(path: Path, section: str, columns: list[str], cells: list) -> str:
    """Add a row at the end of the table whose header is `columns`, creating the file (with the
    intro) and the section (text, header, rule) when missing. Returns the row."""
    if len(cells) != len(columns):
        raise ValueError(f"{len(cells)} cells for {len(columns)} columns")
    header, row = markdown_row(columns), markdown_row(cells)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else RESULTS_INTRO.splitlines()
    if header not in lines:
        lines += ["", *section.rstrip("\n").splitlines(), "", header, "|" + "---|" * len(columns)]
    end = lines.index(header) + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return row


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "uncommitted"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train_gpt.py"], cwd=REPO).returncode != 0
    return head + ("+dirty" if dirty else "")


def cpu_machine() -> str:
    model = "unknown-cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{cpu_count()}core {model}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- running


def run_train(env: dict, nproc: int, run_dir: Path, guard_s: float) -> tuple[str, list[float]]:
    """Run train_gpt.py under GNU time per process; return (status, peak RSS MiB per rank)."""
    if not Path(GNU_TIME).is_file():
        sys.exit(f"error: {GNU_TIME} (GNU time) is needed to measure peak RSS; apt-get install time")
    # each training process runs as: time -f %M -o run_dir/rss_rank<RANK>.txt python train_gpt.py
    shim = 'exec "$0" -f %M -o "$1/rss_rank${RANK:-0}.txt" "$2" "$3"'
    shim_args = [GNU_TIME, str(run_dir), sys.executable, str(REPO / "train_gpt.py")]
    if nproc == 1:
        cmd = ["sh", "-c", shim, *shim_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--no-python", "sh", "-c", shim, *shim_args]
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        # own session, so a hung run is killed with all its workers; run_dir as cwd keeps its logs/ there
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=guard_s)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
    rss = []
    for rank in range(nproc):
        f = run_dir / f"rss_rank{rank}.txt"
        lines = f.read_text().split() if f.is_file() else []
        rss.append(int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None)
    return status, rss


def parse_sets(pairs: list[str], known: set[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep:
            sys.exit(f"error: --set expects KEY=VAL, got {pair!r}")
        if key not in known:
            sys.exit(f"error: --set {key}: not a train_gpt.py knob")
        out[key] = val
    return out


def train_gpt_knobs() -> set[str]:
    import train_gpt  # the KNOBS list is the one definition of what can be set

    return set(train_gpt.KNOB_BY_NAME)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="record", help="named configuration (default record)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="override one knob (repeatable)")
    p.add_argument("--seconds", type=float, default=300, help="training wallclock (MAX_WALLCLOCK_SECONDS), default 300")
    p.add_argument("--nproc", type=int, choices=(1, 2), default=2, help="CPU training processes (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="identical runs, for run-to-run noise (use 3 to compare)")
    p.add_argument("--data", choices=("english", "tiny"), default="english", help="dataset (default english)")
    p.add_argument("--val-docs", type=int, default=200, help="english: validation documents (default 200, ~97k tokens)")
    p.add_argument("--train-tokens", type=int, default=5_000_000,
                   help="english: training tokens cached (default 5M, more than a 300 s CPU run reads)")
    p.add_argument("--results", default=str(RESULTS), help="markdown table to append to (default bench/RESULTS.md)")
    p.add_argument("--runs-dir", default=str(RUNS), help="where each run's folder goes (default bench/runs)")
    return p


def command_line(args) -> str:
    """The command that reproduces one run (repeats and the results path left out)."""
    parts = ["python", "bench/minigolf.py", "--preset", args.preset, "--nproc", str(args.nproc),
             "--seconds", f"{args.seconds:g}", "--data", args.data]
    if args.data == "english" and (args.val_docs, args.train_tokens) != (200, 5_000_000):
        parts += ["--val-docs", str(args.val_docs), "--train-tokens", str(args.train_tokens)]
    for pair in args.set:
        parts += ["--set", pair]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    knobs = train_gpt_knobs()
    overrides = parse_sets(args.set, knobs)
    data = english_data(args.val_docs, args.train_tokens) if args.data == "english" else tiny_data()

    config = {**PRESETS[args.preset], **data, "MAX_WALLCLOCK_SECONDS": args.seconds, **overrides}
    base_env = {k: v for k, v in os.environ.items() if k not in knobs}
    # split the cores between processes so two ranks do not oversubscribe them
    base_env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // args.nproc))
    machine, commit, command = cpu_machine(), git_commit(), command_line(args)
    results_path = Path(args.results)

    figures = []
    for i in range(args.repeats):
        stamp = dt.datetime.now(dt.timezone.utc)
        run_id = f"minigolf_{args.preset}_{stamp:%Y%m%d_%H%M%S}_{os.getpid()}_r{i}"
        run_dir = Path(args.runs_dir).resolve() / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**base_env, **{k: str(v) for k, v in config.items()},
               "RUN_ID": run_id, "ARTIFACT_PATH": str(run_dir / "model.pgart")}
        print(f"[{i + 1}/{args.repeats}] {command}  ->  {run_dir}", flush=True)
        t0 = time.time()
        status, rss = run_train(env, args.nproc, run_dir, args.seconds + GUARD_SECONDS)
        wall = time.time() - t0
        fig = summarize_log((run_dir / "stdout.txt").read_text(errors="replace"))
        if status == "ok" and not fig["complete"]:
            status = "incomplete"
        run_machine = machine
        if fig["device"] == "cuda":
            run_machine = f"{fig['device_count']}x{fig['device_name']}"
        bpb = [fmt(fig[k], ".4f") for k in ("prequant_bpb", "roundtrip_bpb", "sliding_bpb", "ttt_bpb")]
        row = append_row(results_path, CPU_SECTION, COLUMNS, [
            f"{stamp:%Y-%m-%d %H:%MZ}", commit, run_machine, command, status, fig["steps"], fmt(fig["tok_s"], ".0f"),
            fmt(fig["train_loss"], ".4f"), *bpb, fig["artifact_bytes"], fmt(fig["eval_s"], ".1f"),
            "/".join("-" if r is None else f"{r:.0f}" for r in rss),
        ])
        print(f"  {status} in {wall:.0f}s: {row}", flush=True)
        if status != "ok":
            tail = (run_dir / "stderr.txt").read_text(errors="replace").strip().splitlines()[-15:]
            print("  stderr tail:\n    " + "\n    ".join(tail), flush=True)
        figures.append(dict(fig, rss_max=max((r for r in rss if r is not None), default=None)))

    if args.repeats > 1:
        print(f"\nover {args.repeats} runs: min / median / max")
        for key in ("steps", "tok_s", "train_loss", "prequant_bpb", "roundtrip_bpb", "sliding_bpb", "ttt_bpb",
                    "artifact_bytes", "eval_s", "rss_max"):
            vals = [f[key] for f in figures if f[key] is not None]
            if vals:
                print(f"  {key:15s} {min(vals):12.4f} {statistics.median(vals):12.4f} {max(vals):12.4f}")
    return 0 if all(f["complete"] for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
