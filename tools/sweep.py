"""Run train_gpt.py over a grid or list of env-var settings, one run after another.

Each run gets its own folder under --out with the log (log.txt), everything the process
printed (output.txt) and its artifact. A run that crashes, times out or goes over budget
is reported and the sweep goes on. Re-running the same command resumes: runs whose log
already has a final_result line are not run again (failed ones are retried). At the end
a table of config -> final metrics, bytes and step time is printed, best val_bpb first.

  python tools/sweep.py --grid NUM_LAYERS=9,11 --grid MLP_MULT=3,4 --out sweeps/depth
  python tools/sweep.py --run "QUANT=rtn" --run "QUANT=gptq EVAL_STRIDE=64" --nproc 8
"""

import argparse
import hashlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from logparse import parse_log


def parse_assignments(text):
    """'A=1 B=x' -> {'A': '1', 'B': 'x'}."""
    out = {}
    for tok in shlex.split(text):
        key, sep, val = tok.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise ValueError(f"expected KNOB=value, got {tok!r}")
        out[key] = val
    return out


def expand(runs, grid):
    """Every listed run (or one empty run) crossed with the grid's cartesian product."""
    axes = []
    for spec in grid:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"expected KNOB=v1,v2,..., got {spec!r}")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(base, **dict(combo)) for base in (runs or [{}]) for combo in itertools.product(*axes)]


def run_name(config):
    """Readable and stable, so a resumed sweep finds its earlier runs."""
    name = "_".join(f"{k}-{v}" for k, v in config.items()) or "base"
    name = re.sub(r"[^A-Za-z0-9.,+-]+", "_", name)
    if len(name) > 80:
        name = name[:60] + "_" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def command(script, nproc, python):
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return [python, script]


def finished(folder):
    log = os.path.join(folder, "log.txt")
    return os.path.isfile(log) and parse_log(log).final is not None


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1][:160] if lines else ""


def run_one(config, folder, run_id, args):
    """Run one config; return a short status ('ok', 'failed rc=1: ...', 'timeout after ...')."""
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, **config, RUN_ID=run_id)
    if "ARTIFACT_PATH" not in config:  # keep each run's artifact with its log
        env["ARTIFACT_PATH"] = os.path.join(folder, "model.pgart")
        if os.path.exists(env["ARTIFACT_PATH"]):
            os.remove(env["ARTIFACT_PATH"])  # a failed attempt's; train_gpt.py refuses to replace it unasked
    train_log = os.path.join("logs", f"{run_id}.txt")
    if os.path.exists(train_log):
        os.remove(train_log)  # else a retry that dies before logging would show the old attempt's log
    out_path = os.path.join(folder, "output.txt")
    start = time.time()
    with open(out_path, "w") as out:
        # Own process group, so a timeout or Ctrl-C also ends torchrun's workers.
        proc = subprocess.Popen(command(args.script, args.nproc, args.python), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    # The process's own log is the record; its console copy stands in when it never got written.
    shutil.copyfile(train_log if os.path.exists(train_log) else out_path, os.path.join(folder, "log.txt"))
    took = time.time() - start
    if rc is None:
        return f"timeout after {took:.0f}s"
    return "ok" if rc == 0 else f"failed rc={rc}: {last_line(out_path)}"


def result_row(name, config, folder, status):
    log = os.path.join(folder, "log.txt")
    run = parse_log(log) if os.path.isfile(log) else None
    row = {"run": name, "config": config, "status": status,
           "val_loss": None, "val_bpb": None, "bytes_total": None, "step_avg_ms": None, "steps": None}
    if run is not None:
        if run.final:
            row.update(val_loss=run.final["val_loss"], val_bpb=run.final["val_bpb"])
        if run.artifact:
            row["bytes_total"] = run.artifact["bytes_total"]
        row.update(step_avg_ms=run.step_avg_ms, steps=run.last_step or None)
        bad = run.problems()
        # A run that got to its final line failed for a logged reason (e.g. over budget): show that.
        if bad and (status.startswith("ok") or run.final is not None):
            row["status"] = "; ".join(bad)
    return row


def format_table(rows, keys):
    """Plain-text table, best val_bpb first; runs without one go last in run order."""
    rows = sorted(rows, key=lambda r: (r["val_bpb"] is None, r["val_bpb"] or 0.0))
    header = [*keys, "val_loss", "val_bpb", "bytes_total", "step_ms", "steps", "status"]
    fmt = {"val_loss": "{:.6f}", "val_bpb": "{:.6f}", "step_avg_ms": "{:.1f}"}
    body = []
    for r in rows:
        cells = [r["config"].get(k, "") for k in keys]
        for k in ("val_loss", "val_bpb", "bytes_total", "step_avg_ms", "steps"):
            v = r[k]
            cells.append("-" if v is None else fmt.get(k, "{}").format(v))
        cells.append(r["status"])
        body.append([str(c) for c in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", action="append", default=[], metavar="KNOB=v1,v2", help="sweep a knob over values (repeatable; crossed)")
    ap.add_argument("--run", action="append", default=[], metavar="'A=1 B=2'", help="one listed config (repeatable)")
    ap.add_argument("--runs-file", help="file with one listed config per line (# comments)")
    ap.add_argument("--out", default=os.path.join("sweeps", "sweep"), help="sweep folder (default %(default)s)")
    ap.add_argument("--script", default="train_gpt.py", help="default %(default)s")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run; >1 launches torchrun (default 1)")
    ap.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
    ap.add_argument("--timeout", type=float, help="seconds before a run is killed and reported")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = ap.parse_args(argv)
    try:
        listed = [parse_assignments(r) for r in args.run]
        if args.runs_file:
            with open(args.runs_file) as f:
                listed += [parse_assignments(ln) for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        configs = expand(listed, args.grid)
    except ValueError as e:
        ap.error(str(e))
    keys = list(dict.fromkeys(k for c in configs for k in c))
    sweep_name = os.path.basename(os.path.normpath(args.out))
    rows = []
    for i, config in enumerate(configs, 1):
        name = run_name(config)
        folder = os.path.join(args.out, name)
        if args.dry_run:
            print(f"[{i}/{len(configs)}] {name}: " + " ".join(command(args.script, args.nproc, args.python)))
            continue
        if finished(folder):
            status = "ok (done before)"
        else:
            print(f"[{i}/{len(configs)}] {name} ...", flush=True)
            status = run_one(config, folder, f"{sweep_name}_{name}", args)
            print(f"[{i}/{len(configs)}] {name}: {status}", flush=True)
        rows.append(result_row(name, config, folder, status))
    if rows:
        print(format_table(rows, keys))
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
