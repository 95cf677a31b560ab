"""Parse train_gpt.py run logs (one `key:value ...` event per line) into RunLog objects.

Every tool in tools/ reads logs through this module, so a change to a log line is
made here once. Only lines that match an event's shape are read: a log may also hold
tracebacks, warnings or a dump of the source, and those must never be taken for data.
"""

import argparse
import math
import re
import sys
from dataclasses import dataclass, field

# Knobs that legitimately differ between the seeds of one submission.
PER_SEED_KNOBS = ("SEED", "RUN_ID", "ARTIFACT_PATH")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NUMBER = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf)\Z")
_STEP = re.compile(r"(\d+)/(\d+)\Z")
# Values that are names or versions even when they look like numbers ("12.10" must not become 12.1).
_TEXT_KEYS = {"path", "code_sha256", "script", "python", "torch", "cuda", "device", "device_name",
              "label", "compressor", "phase", "source"}
# Bare words that open a line and are followed only by key:value pairs.
_EVENTS = ("code", "launch", "env", "config", "artifact", "eval_time", "final_result")


class LogError(ValueError):
    """A log cannot back a claim; the message says why."""


def _value(key, text):
    """Numbers become int/float (so JSON output keeps the logged digits); the rest stays text."""
    if key not in _TEXT_KEYS and _NUMBER.match(text):
        return float(text) if any(c in text for c in ".eEni") else int(text)
    return text


def _pairs(tokens):
    """key:value tokens -> dict, or None if any token is not one (then the line is not an event)."""
    out = {}
    for tok in tokens:
        key, sep, val = tok.partition(":")
        if not sep or not _KEY.match(key) or "{" in val or "}" in val:
            return None
        out[key] = _value(key, val)
    return out


@dataclass
class RunLog:
    path: str
    code: dict = None
    launch: dict = None
    env: dict = None
    config: dict = field(default_factory=dict)  # knob -> value, as text
    config_source: dict = field(default_factory=dict)  # knob -> "env" | "default"
    train_steps: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    evals: dict = field(default_factory=dict)  # label -> {val_loss, val_bpb, tokens, bytes, eval_ms}
    artifact: dict = None
    errors: list = field(default_factory=list)  # raw "error:" lines
    eval_time: dict = None
    stopping_early: dict = None
    final: dict = None
    misc: dict = field(default_factory=dict)  # attention_backend, model_params, peak_mem_mib, ...
    runs_in_file: int = 0  # number of "code" lines: more than one means logs were concatenated

    @property
    def seed(self):
        seed = self.config.get("SEED")
        return int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed

    @property
    def run_id(self):
        return self.config.get("RUN_ID")

    @property
    def env_overrides(self):
        """Knobs set through the environment, in logged order."""
        return {k: v for k, v in self.config.items() if self.config_source.get(k) == "env"}

    @property
    def score(self):
        """The eval line named by final_result (the run's official numbers)."""
        return self.evals.get(self.final["label"]) if self.final else None

    @property
    def last_step_line(self):
        return max(self.train_steps + self.val_steps, key=lambda s: s["step"], default=None)

    @property
    def last_step(self):
        return self.last_step_line["step"] if self.last_step_line else 0

    @property
    def step_avg_ms(self):
        """Mean training step time at the last logged step (train_gpt.py excludes validation time)."""
        return self.last_step_line["step_avg"] if self.last_step_line else None

    @property
    def tokens_per_byte(self):
        """tokens/bytes of the scoring eval: val_loss = val_bpb * ln(2) * bytes / tokens."""
        s = self.score
        return s["tokens"] / s["bytes"] if s else None

    def problems(self):
        """Reasons this log cannot stand as a finished, in-budget run (empty list = fine)."""
        out = []
        if self.code is None:
            out.append("no 'code' line (not a train_gpt.py log?)")
        if self.runs_in_file > 1:
            out.append(f"holds {self.runs_in_file} runs (concatenated logs?)")
        out.extend(self.errors)
        if self.final is None:
            out.append("incomplete: no final_result line (run crashed or is still running)")
        elif self.score is None:
            out.append(f"final_result names eval '{self.final['label']}' but no such eval line exists")
        elif not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.final["val_loss"], self.final["val_bpb"])):
            out.append(f"final val_loss/val_bpb are not finite numbers ({self.final['val_loss']}, {self.final['val_bpb']})")
        elif (self.score["val_loss"], self.score["val_bpb"]) != (self.final["val_loss"], self.final["val_bpb"]):
            out.append("final_result numbers differ from its eval line")
        a = self.artifact
        if a is None:
            out.append("no artifact line")
        else:
            if a["bytes_total"] > a["limit"]:
                out.append(f"over budget: bytes_total {a['bytes_total']} > limit {a['limit']}")
            if a["bytes_code"] + a["bytes_model"] != a["bytes_total"]:
                out.append("artifact bytes_code + bytes_model != bytes_total")
            if self.code is not None and a["bytes_code"] != self.code["bytes_code"]:
                out.append("artifact bytes_code differs from the code line's")
            if self.final is not None and self.final["bytes_total"] != a["bytes_total"]:
                out.append("final_result bytes_total differs from the artifact line's")
        t = self.eval_time
        if t is None:
            out.append("no eval_time line")
        elif t["total_ms"] > t["limit_ms"]:
            out.append(f"eval over time: total_ms {t['total_ms']} > limit_ms {t['limit_ms']}")
        return out

    def require_complete(self):
        bad = self.problems()
        if bad:
            raise LogError(f"{self.path}: " + "; ".join(bad))


def _add_step(run, head, rest):
    m = _STEP.match(head.partition(":")[2])
    pairs = _pairs(rest)
    if not m or pairs is None:
        return
    pairs["step"], pairs["iterations"] = int(m.group(1)), int(m.group(2))
    if "val_loss" in pairs:
        run.val_steps.append(pairs)
    elif "train_loss" in pairs:
        run.train_steps.append(pairs)


def parse_text(text, path="<text>"):
    run = RunLog(path=path)
    in_code = False
    for line in text.splitlines():
        line = line.rstrip("\r")
        # train_gpt.py copies its source into the log between these markers.
        if line in ("code_begin", "code_end"):
            in_code = line == "code_begin"
            continue
        if in_code:
            continue
        tokens = line.split(" ")
        head, rest = tokens[0], tokens[1:]
        if not head or head != head.strip():
            continue
        if head.startswith("step:"):
            _add_step(run, head, rest)
        elif head in ("error:", "stopping_early:"):
            pairs = _pairs(rest[1:]) if rest else None
            if pairs is None:
                continue
            if head == "error:":
                run.errors.append("error: " + " ".join(rest))
            else:
                run.stopping_early = dict(pairs, reason=rest[0])
        elif head in _EVENTS:
            pairs = _pairs(rest)
            if pairs is None:
                continue
            if head == "config":
                if len(pairs) != 2 or "source" not in pairs:
                    continue
                knob = next(k for k in pairs if k != "source")
                # Raw text: configs are compared and re-emitted as env vars, never as numbers.
                run.config[knob] = rest[0].partition(":")[2]
                run.config_source[knob] = pairs["source"]
            elif head == "code":
                run.runs_in_file += 1
                run.code = pairs
            else:
                setattr(run, head if head != "final_result" else "final", pairs)
        elif ":" not in head and re.match(r"\w+\Z", head):
            pairs = _pairs(rest)
            if pairs and {"val_loss", "val_bpb", "tokens", "bytes"} <= pairs.keys():
                run.evals[head] = pairs
        else:
            pairs = _pairs(tokens)
            if pairs:
                run.misc.update(pairs)
    return run


def parse_log(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_text(f.read(), path=str(path))


def check_consistent(runs):
    """Refuse a set of seed logs that are not the same code and config on the same setup."""
    if not runs:
        raise LogError("no logs given")
    for r in runs:
        r.require_complete()
    first = runs[0]

    def setup(r):
        return {
            "code_sha256": r.code["code_sha256"],
            "world_size": (r.launch or {}).get("world_size"),
            "device_name": (r.env or {}).get("device_name"),
            "device_count": (r.env or {}).get("device_count"),
            "final_result label": r.final["label"],
        }

    for r in runs[1:]:
        for key, want in setup(first).items():
            got = setup(r)[key]
            if got != want:
                raise LogError(f"logs disagree on {key}: {first.path} has {want}, {r.path} has {got}")
        knobs = (first.config.keys() | r.config.keys()) - set(PER_SEED_KNOBS)
        diff = sorted(k for k in knobs if first.config.get(k) != r.config.get(k))
        if diff:
            shown = ", ".join(f"{k}={first.config.get(k)} vs {r.config.get(k)}" for k in diff)
            raise LogError(f"logs disagree on config ({first.path} vs {r.path}): {shown}")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise LogError(f"the same seed appears twice: {seeds}")


def mean_std(values):
    """Mean and sample standard deviation (n-1); std is 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Summarise train_gpt.py logs and say whether each is a complete, in-budget run.")
    ap.add_argument("logs", nargs="+", help="log files (logs/<RUN_ID>.txt)")
    args = ap.parse_args(argv)
    status = 0
    for path in args.logs:
        run = parse_log(path)
        bad = run.problems()
        s = run.score
        nums = f"val_loss:{s['val_loss']} val_bpb:{s['val_bpb']} bytes_total:{run.final['bytes_total']}" if s else ""
        print(f"{path}: {'ok' if not bad else 'REFUSED'} seed:{run.seed} {nums}".rstrip())
        for reason in bad:
            print(f"  - {reason}")
        status |= bool(bad)
    return status


if __name__ == "__main__":
    sys.exit(main())
