"""Write submission.json from run logs, so that every number in it is one a log printed.

Refuses (exit 2, with the reason) when a log cannot be read, is incomplete, holds an error line,
is an EVAL_ONLY run, holds more than one run, contradicts itself, is over the byte budget or over
the eval time limit, or when the logs disagree on code hash, config or hardware; and when an
artifact file (given with --artifact, or present at the path its log names) is not the one the
log measured.
With several seed logs the headline val_loss/val_bpb are the mean over seeds, bytes_total
is the largest seed's (every seed must fit), and each seed's own numbers are listed.
"""

import argparse
import datetime
import json
import os
import sys

from logparse import LogError, check_artifact, check_consistent, mean_std, parse_log

TRACK = "10min_16mb"


def hardware(run):
    """'8xNVIDIA_H100_80GB_HBM3' from the env line (device names have no spaces in logs)."""
    env = run.env or {}
    return f"{env.get('device_count', '?')}x{env.get('device_name', '?')}"


def seed_entry(run):
    sha = {"artifact_sha256": run.artifact["sha256"]} if "sha256" in run.artifact else {}
    return {
        "seed": run.seed,
        "log": os.path.basename(run.path),
        "val_loss": run.final["val_loss"],
        "val_bpb": run.final["val_bpb"],
        "bytes_total": run.artifact["bytes_total"],
        "bytes_model": run.artifact["bytes_model"],
        "steps": run.last_step,
        "train_time_ms": run.final["train_time_ms"],
        "eval_time_ms": run.final["eval_time_ms"],
        **sha,
    }


def build_submission(runs, name, author, github_id, blurb="", date=None, artifacts=None):
    """artifacts: one file per run to check against its log (None: check those present at the logged paths)."""
    check_consistent(runs)
    if artifacts is not None and len(artifacts) != len(runs):
        raise LogError(f"{len(artifacts)} --artifact files for {len(runs)} logs (give one per log, in the same order)")
    for run, path in zip(runs, artifacts or [None] * len(runs)):
        check_artifact(run, path)
    first = runs[0]
    loss_mean, loss_std = mean_std([r.final["val_loss"] for r in runs])
    bpb_mean, bpb_std = mean_std([r.final["val_bpb"] for r in runs])
    return {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "track": TRACK,
        # 8 decimals: the precision the logs print at.
        "val_loss": round(loss_mean, 8),
        "val_bpb": round(bpb_mean, 8),
        "val_loss_std": round(loss_std, 8),
        "val_bpb_std": round(bpb_std, 8),
        "bytes_total": max(r.artifact["bytes_total"] for r in runs),
        "bytes_code": first.artifact["bytes_code"],
        "code_sha256": first.code["code_sha256"],
        "score_label": first.final["label"],
        "hardware": hardware(first),
        "seeds": [seed_entry(r) for r in runs],
    }


def write_submission(sub, path):
    with open(path, "w") as f:
        json.dump(sub, f, indent=2)
        f.write("\n")


def add_identity_args(ap):
    ap.add_argument("--name", required=True, help="submission name, e.g. 'Int6 GPTQ + sliding eval'")
    ap.add_argument("--author", required=True, help="author's name")
    ap.add_argument("--github-id", required=True, help="author's GitHub user name")
    ap.add_argument("--blurb", default="", help="one or two sentences on what the submission does")
    ap.add_argument("--date", help="ISO date/time (default: now, UTC)")
    ap.add_argument("--artifact", action="append", metavar="FILE",
                    help="the artifact a log measured, once per log in the same order (default: the file at the "
                         "log's artifact path, when present)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="one log per seed (logs/<RUN_ID>.txt)")
    add_identity_args(ap)
    ap.add_argument("-o", "--out", default="submission.json", help="output path (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        sub = build_submission([parse_log(p) for p in args.logs], args.name, args.author,
                               args.github_id, args.blurb, args.date, args.artifact)
    except LogError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    try:
        write_submission(sub, args.out)
    except OSError as e:
        print(f"error: {args.out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: val_loss {sub['val_loss']} val_bpb {sub['val_bpb']} "
          f"bytes_total {sub['bytes_total']} over {len(sub['seeds'])} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
