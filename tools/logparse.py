"""Parse train_gpt.py run logs (one `key:value ...` event per line) into RunLog objects.

Every tool in tools/ reads logs through this module, so a change to a log line is
made here once. Only lines that match an event's shape are read: a log may also hold
tracebacks, warnings or a dump of the source, and those must never be taken for data.
"""

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass, field

# Knobs that legitimately differ between the seeds of one submission.
PER_SEED_KNOBS = ("SEED", "RUN_ID", "ARTIFACT_PATH")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NUMBER = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|nan|inf)\Z")
_STEP = re.compile(r"(\d+)/(\d+)\Z")
# Values that are names or versions even when they look like numbers ("12.10" must not become 12.1).
_TEXT_KEYS = {"path", "code_sha256", "sha256", "script", "python", "torch", "cuda", "device", "device_name",
              "label", "compressor", "phase", "source"}
# Bare words that open a line and are followed only by key:value pairs.
_EVENTS = ("code", "launch", "env", "config", "artifact", "train_total", "eval_time", "final_result")
# Every key final_result carries; a line without all of them was cut or hand-edited.
FINAL_KEYS = ("label", "val_loss", "val_bpb", "bytes_total", "train_time_ms", "eval_time_ms")
EVAL_KEYS = ("val_loss", "val_bpb", "tokens", "bytes")


class LogError(ValueError):
    """A log cannot back a claim (or cannot be read); the message says why."""


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
    artifact: dict = None  # with sha256 (hex text) when train_gpt.py logged the artifact's hash
    errors: list = field(default_factory=list)  # raw "error:" lines
    train_total: dict = None
    eval_time: dict = None
    stopping_early: dict = None
    final: dict = None
    misc: dict = field(default_factory=dict)  # attention_backend, model_params, peak_mem_mib, ...
    events: dict = field(default_factory=dict)  # other "word key:value ..." lines (warmup, quantize, ...), last wins
    progress: list = field(default_factory=list)  # "progress phase:... elapsed_s:..." lines, in order
    runs_in_file: int = 0  # number of "code" lines: more than one means logs were concatenated
    defects: list = field(default_factory=list)  # lines that contradict themselves or the rest of the log
    line_counts: dict = field(default_factory=dict)  # event or eval label -> lines seen

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

    @property
    def eval_only(self):
        return bool(self.config.get("EVAL_ONLY"))

    def problems(self):
        """Reasons this log cannot stand as a finished, in-budget training run (empty list = fine)."""
        out = []
        if self.code is None:
            out.append("no 'code' line (not a train_gpt.py log?)")
        out.extend(self._more_than_one_run())
        out.extend(self.errors)
        out.extend(self.defects)
        if self.eval_only:
            out.append(f"EVAL_ONLY run of {self.config['EVAL_ONLY']}: it evaluates an artifact and trains nothing")
        elif self.last_step == 0 and not (self.train_total or {}).get("steps"):
            out.append("trained 0 steps")
        out.extend(self._final_problems())
        out.extend(self._artifact_problems())
        t = self.train_total or {}
        if t.get("cap_ms", 0) > 0 and t["total_ms"] > t["cap_ms"]:  # training + calibration (+ export if on the clock)
            out.append(f"training clock over the cap: total_ms {t['total_ms']} > cap_ms {t['cap_ms']}")
        t = self.eval_time
        if t is None:
            out += [] if "eval_time" in self.line_counts else ["no eval_time line"]
        elif t["total_ms"] > t["limit_ms"]:
            out.append(f"eval over time: total_ms {t['total_ms']} > limit_ms {t['limit_ms']}")
        return out

    def _more_than_one_run(self):
        if self.runs_in_file > 1:
            return [f"holds {self.runs_in_file} runs (concatenated logs, or two runs with one RUN_ID)"]
        repeated = [f"{n} '{name}' lines" for name, n in self.line_counts.items() if n > 1]
        if repeated:
            return ["holds " + ", ".join(repeated) + " (two runs wrote this log?)"]
        return []

    def _final_problems(self):
        f = self.final
        if f is None:  # a cut final_result line is already reported as a defect
            cut = "final_result" in self.line_counts
            return [] if cut else ["incomplete: no final_result line (run crashed or is still running)"]
        bad = [k for k in FINAL_KEYS[1:] if not math.isfinite(f[k])]
        if bad:
            return [f"final_result {', '.join(bad)} are not finite numbers ({', '.join(str(f[k]) for k in bad)})"]
        if self.score is None:
            return [f"final_result names eval '{f['label']}' but no such eval line exists"]
        out = []
        if (self.score["val_loss"], self.score["val_bpb"]) != (f["val_loss"], f["val_bpb"]):
            out.append(f"final_result numbers differ from its eval line '{f['label']}'")
        for key, line, theirs in (("train_time_ms", self.train_total, "total_ms"),
                                  ("eval_time_ms", self.eval_time, "total_ms")):
            if line is not None and line.get(theirs) != f[key]:
                out.append(f"final_result {key} {f[key]} differs from the {theirs} {line.get(theirs)} logged before it")
        return out

    def _artifact_problems(self):
        a = self.artifact
        if a is None:
            return [] if "artifact" in self.line_counts else ["no artifact line"]
        out = []
        if a["bytes_total"] > a["limit"]:
            out.append(f"over budget: bytes_total {a['bytes_total']} > limit {a['limit']}")
        if a["bytes_code"] + a["bytes_model"] != a["bytes_total"]:
            out.append("artifact bytes_code + bytes_model != bytes_total")
        if self.code is not None and a["bytes_code"] != self.code["bytes_code"]:
            out.append("artifact bytes_code differs from the code line's")
        if self.final is not None and self.final["bytes_total"] != a["bytes_total"]:
            out.append("final_result bytes_total differs from the artifact line's")
        return out

    def require_complete(self):
        bad = self.problems()
        if bad:
            raise LogError(f"{self.path}: " + "; ".join(bad))


# Keys each event must carry; a line without all of them was cut or hand-edited and is not used.
_REQUIRED = {"code": ("bytes_code", "code_sha256"), "artifact": ("bytes_code", "bytes_model", "bytes_total", "limit"),
             "train_total": ("steps", "total_ms"), "eval_time": ("total_ms", "limit_ms"), "final_result": FINAL_KEYS}


def _is_number(value):
    return isinstance(value, (int, float))


def _decimals(token):
    return len(token.partition(":")[2].partition(".")[2])


def _eval_defect(label, tokens, pairs):
    """val_bpb must equal val_loss / ln 2 * tokens / bytes up to the rounding of the printed digits."""
    loss, bpb, ntok, nbytes = (pairs[k] for k in EVAL_KEYS)
    if not all(map(_is_number, (loss, bpb, ntok, nbytes))):
        return f"'{label}' line is cut or edited: val_loss, val_bpb, tokens and bytes must be numbers"
    if not (math.isfinite(loss) and math.isfinite(bpb)) or nbytes <= 0:
        return None
    digits = {tok.partition(":")[0]: _decimals(tok) for tok in tokens}
    ratio = ntok / nbytes / math.log(2)
    # Half a unit in the last printed digit of each number, plus float64 noise.
    tol = 0.5 * 10 ** -digits["val_loss"] * ratio + 0.5 * 10 ** -digits["val_bpb"] + 1e-12 * abs(bpb)
    want = loss * ratio
    if abs(bpb - want) > tol:
        return (f"'{label}' val_bpb {bpb} disagrees with its val_loss {loss}: val_loss / ln 2 * tokens / bytes "
                f"= {want:.8f}")
    return None


def _add_step(run, head, rest, last_steps):
    m = _STEP.match(head.partition(":")[2])
    pairs = _pairs(rest)
    if not m or pairs is None:
        return
    pairs["step"], pairs["iterations"] = int(m.group(1)), int(m.group(2))
    kind = "val" if "val_loss" in pairs else "train" if "train_loss" in pairs else None
    if kind is None:
        return
    if pairs["step"] <= last_steps.get(kind, -1):
        run.defects.append(f"{kind} step {pairs['step']} logged after step {last_steps[kind]} "
                           "(two runs wrote this log?)")
    last_steps[kind] = max(pairs["step"], last_steps.get(kind, -1))
    (run.val_steps if kind == "val" else run.train_steps).append(pairs)


def _add_event(run, head, rest, pairs):
    if head not in ("code", "config"):  # code lines are counted as runs; config lines once per knob
        run.line_counts[head] = run.line_counts.get(head, 0) + 1
    missing = [k for k in _REQUIRED.get(head, ()) if k not in pairs or not _is_number(pairs[k]) and k not in _TEXT_KEYS]
    if missing:
        run.defects.append(f"'{head}' line is cut or edited: {', '.join(missing)} missing or not a number")
        return
    if head == "config":
        if len(pairs) != 2 or "source" not in pairs:
            return
        knob = next(k for k in pairs if k != "source")
        if knob in run.config:
            run.defects.append(f"config {knob} logged twice (two runs wrote this log?)")
        # Raw text: configs are compared and re-emitted as env vars, never as numbers.
        run.config[knob] = rest[0].partition(":")[2]
        run.config_source[knob] = pairs["source"]
    elif head == "code":
        run.runs_in_file += 1
        run.code = pairs
    else:
        setattr(run, head if head != "final_result" else "final", pairs)


def parse_text(text, path="<text>"):
    run = RunLog(path=path)
    in_code = False
    last_steps = {}
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
            _add_step(run, head, rest, last_steps)
        elif head == "error:":  # any error line refuses the run, whatever its shape
            run.errors.append(line)
        elif head == "stopping_early:":
            pairs = _pairs(rest[1:]) if rest else None
            if pairs is not None:
                run.stopping_early = dict(pairs, reason=rest[0])
        elif head in _EVENTS:
            pairs = _pairs(rest)
            if pairs is not None:
                _add_event(run, head, rest, pairs)
        elif ":" not in head and re.match(r"\w+\Z", head):
            pairs = _pairs(rest)
            if pairs and set(EVAL_KEYS) <= pairs.keys():
                run.line_counts[head] = run.line_counts.get(head, 0) + 1
                run.evals[head] = pairs
                defect = _eval_defect(head, rest, pairs)
                if defect:
                    run.defects.append(defect)
            elif pairs is None:  # free text after the pairs, e.g. "warmup steps:20 ms:88500 (compile priming)"
                pairs = _pairs(tok for tok in rest if ":" in tok)
                if pairs:
                    run.events[head] = pairs
            elif head == "progress":
                run.progress.append(pairs)
            elif pairs:
                run.events[head] = pairs
        else:
            pairs = _pairs(tokens)
            if pairs:
                run.misc.update(pairs)
    if text and not text.endswith("\n") and not in_code:
        run.defects.append("the log ends inside a line (cut while being written or copied?)")
    return run


def parse_log(path):
    """RunLog of a log file; LogError (one line, no traceback) when the file cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_text(f.read(), path=str(path))
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from None


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
    # Two logs of one model are one sample, not two: runs that shared an ARTIFACT_PATH score the same file.
    hashes = [r.artifact["sha256"] for r in runs if "sha256" in r.artifact]
    if len(set(hashes)) != len(hashes):
        raise LogError(f"the same artifact (sha256) appears in two logs: {hashes} "
                       "(two runs shared an ARTIFACT_PATH, or one model was scored twice)")
    losses = {r.final["val_loss"] for r in runs}
    if len(runs) > 1 and len(losses) == 1:
        raise LogError(f"every seed scored val_loss {losses.pop()} exactly: zero spread is no sample of seeds "
                       "(one model scored twice?)")


def check_artifact(run, path=None):
    """Refuse when the artifact file is not the one the log measured (size, and sha256 when logged).
    path: the file given by the user (must exist); default: the artifact line's path, checked only if present.
    Returns the file's sha256, or None when there was no file to check."""
    a = run.artifact
    if path is None:
        path = a.get("path")
        if not path or not os.path.isfile(path):
            return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != a["bytes_model"] or a.get("sha256", digest) != digest:
        raise LogError(f"{path} is not the artifact {run.path} measured: it has {len(data)} bytes, sha256 {digest}; "
                       f"the log records {a['bytes_model']} bytes, sha256 {a.get('sha256', '(not logged)')}")
    return digest


def mean_std(values):
    """Mean and sample standard deviation (n-1); std is 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Summarise train_gpt.py logs and say whether each is a complete, in-budget run.",
                                 epilog="Exit status 0 when every log is ok, 1 when one is refused, 2 when one cannot be read.")
    ap.add_argument("logs", nargs="+", help="log files (logs/<RUN_ID>.txt)")
    args = ap.parse_args(argv)
    status = 0
    for path in args.logs:
        try:
            run = parse_log(path)
        except LogError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        bad = run.problems()
        s = run.score
        nums = f"val_loss:{s['val_loss']} val_bpb:{s['val_bpb']} bytes_total:{run.final['bytes_total']}" if s else ""
        print(f"{path}: {'ok' if not bad else 'REFUSED'} seed:{run.seed} {nums}".rstrip())
        for reason in bad:
            print(f"  - {reason}")
        status = max(status, int(bool(bad)))
    return status


if __name__ == "__main__":
    sys.exit(main())
