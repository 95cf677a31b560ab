"""Log parsing, submission.json from logs, and the significance test (tools/)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

import logparse
import make_submission
import significance

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT / "tests" / "fixtures"
SEED_LOGS = [FIXTURES / f"seed{s}.txt" for s in (1337, 42, 2025)]
IDENTITY = dict(name="Fixture run", author="A. Author", github_id="aauthor", blurb="fixture", date="2026-03-30T12:00:00Z")


def final_numbers(path):
    """The last final_result line's numbers, read with a regex independent of logparse."""
    line = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("final_result ")][-1]
    return {k: float(v) for k, v in re.findall(r"(\w+):([\d.]+)", line)}


def edited_log(tmp_path, src, edit, name=None):
    """A copy of a fixture log with `edit(text) -> text` applied."""
    out = tmp_path / (name or Path(src).name)
    out.write_text(edit(Path(src).read_text()))
    return out


def refusal(paths):
    with pytest.raises(logparse.LogError) as e:
        make_submission.build_submission([logparse.parse_log(p) for p in paths], **IDENTITY)
    return str(e.value)


def test_parser_reads_every_event_and_ignores_source_dump_and_noise():
    run = logparse.parse_log(SEED_LOGS[0])
    # The source copied into the log holds a fake 'config NUM_LAYERS:99' and a fake final_result.
    assert run.config["NUM_LAYERS"] == "11"
    assert run.final["val_loss"] == 2.01183341 and run.final["label"] == "final_sliding"
    assert run.seed == 1337 and run.run_id == "rec_seed1337"
    assert run.code["bytes_code"] == (FIXTURES / "shipped_script.py").stat().st_size
    assert run.env["cuda"] == "12.8" and run.env["device_count"] == 8
    assert set(run.evals) == {"final_prequant", "final_roundtrip", "final_sliding"}
    assert [s["step"] for s in run.train_steps] == [1, 1000, 2000, 4000, 6000]
    assert [s["step"] for s in run.val_steps] == [2000, 4000, 7041]
    assert run.last_step == 7041 and run.step_avg_ms == 85.22
    assert run.stopping_early["reason"] == "wallclock_cap"
    assert run.misc["peak_mem_mib"] == 21873.4 and run.misc["attention_backend"] == "fa3"
    assert run.env_overrides == {"DATA_PATH": "./data/datasets/fineweb10B_sp1024",
                                 "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model", "VOCAB_SIZE": "1024",
                                 "RUN_ID": "rec_seed1337", "SEED": "1337", "MLP_MULT": "3.0", "TTT_ENABLED": "False"}
    assert run.problems() == []


def test_submission_numbers_are_the_logged_numbers():
    sub = make_submission.build_submission([logparse.parse_log(p) for p in SEED_LOGS], **IDENTITY)
    finals = [final_numbers(p) for p in SEED_LOGS]
    n = len(finals)
    assert sub["val_loss"] == pytest.approx(sum(f["val_loss"] for f in finals) / n, abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(sum(f["val_bpb"] for f in finals) / n, abs=1e-8)
    bpbs = [f["val_bpb"] for f in finals]
    std = math.sqrt(sum((b - sum(bpbs) / n) ** 2 for b in bpbs) / (n - 1))
    assert sub["val_bpb_std"] == pytest.approx(std, abs=1e-8)
    assert sub["bytes_total"] == max(int(f["bytes_total"]) for f in finals)
    assert sub["bytes_code"] == (FIXTURES / "shipped_script.py").stat().st_size
    assert [s["seed"] for s in sub["seeds"]] == [1337, 42, 2025]
    for entry, f in zip(sub["seeds"], finals):
        assert (entry["val_loss"], entry["val_bpb"], entry["bytes_total"]) == (f["val_loss"], f["val_bpb"], f["bytes_total"])
        assert entry["train_time_ms"] == f["train_time_ms"] and entry["eval_time_ms"] == f["eval_time_ms"]
    for key in ("name", "author", "github_id", "blurb", "date"):
        assert sub[key] == IDENTITY[key]
    assert sub["hardware"] == "8xNVIDIA_H100_80GB_HBM3" and sub["score_label"] == "final_sliding"


def test_submission_from_one_log_copies_its_numbers_exactly(tmp_path):
    out = tmp_path / "submission.json"
    rc = make_submission.main([str(SEED_LOGS[1]), "--name", "n", "--author", "a", "--github-id", "g", "-o", str(out)])
    assert rc == 0
    sub = json.loads(out.read_text())
    f = final_numbers(SEED_LOGS[1])
    assert (sub["val_loss"], sub["val_bpb"], sub["bytes_total"]) == (f["val_loss"], f["val_bpb"], f["bytes_total"])
    assert sub["val_bpb_std"] == 0.0


def test_submission_refuses_log_without_final_line(tmp_path):
    cut = edited_log(tmp_path, SEED_LOGS[1], lambda t: t[: t.index("final_result ")])
    assert "no final_result line" in refusal([SEED_LOGS[0], cut])


def test_submission_refuses_log_over_budget(tmp_path):
    def over(text):
        text = text.replace("limit:16000000", "limit:15000000")
        return text + "error: artifact_over_budget bytes_total:15871455 limit:15000000\n"

    msg = refusal([edited_log(tmp_path, SEED_LOGS[1], over)])
    assert "over budget: bytes_total 15871455 > limit 15000000" in msg and "artifact_over_budget" in msg


def test_submission_refuses_eval_over_time(tmp_path):
    slow = edited_log(tmp_path, SEED_LOGS[2], lambda t: t.replace("eval_time total_ms:82326", "eval_time total_ms:612000"))
    assert "eval over time: total_ms 612000 > limit_ms 600000" in refusal([SEED_LOGS[0], slow])


def test_submission_refuses_diverged_run(tmp_path):
    def diverge(text):
        return re.sub(r"(final_sliding|final_result label:final_sliding) val_loss:\S+ val_bpb:\S+",
                      r"\1 val_loss:nan val_bpb:nan", text)

    assert "not finite numbers (nan, nan)" in refusal([edited_log(tmp_path, SEED_LOGS[0], diverge)])


def test_submission_refuses_logs_of_different_code(tmp_path):
    other = edited_log(tmp_path, SEED_LOGS[1], lambda t: re.sub(r"code_sha256:\w+", "code_sha256:" + "ab" * 32, t))
    assert "disagree on code_sha256" in refusal([SEED_LOGS[0], other])


def test_submission_refuses_logs_of_different_config(tmp_path):
    other = edited_log(tmp_path, SEED_LOGS[1], lambda t: t.replace("config MLP_MULT:3.0", "config MLP_MULT:4.0"))
    assert "disagree on config" in (msg := refusal([SEED_LOGS[0], other])) and "MLP_MULT=3.0 vs 4.0" in msg


def test_submission_refuses_repeated_seed_and_appended_runs(tmp_path):
    assert "same seed appears twice" in refusal([SEED_LOGS[0], SEED_LOGS[0]])
    twice = edited_log(tmp_path, SEED_LOGS[0], lambda t: t + t)
    assert "holds 2 runs" in refusal([twice])


def test_tools_refuse_one_model_scored_twice_and_zero_spread(tmp_path):
    """Issue 19: two runs that shared an ARTIFACT_PATH logged one artifact sha and one score; the
    tools took them as two seeds (std 0.0, t = inf, p = 0, PASS)."""
    import hashlib
    sha = hashlib.sha256(b"one model").hexdigest()
    same = [edited_log(tmp_path, src, lambda t: re.sub(r"(\nartifact path:.*compressor:\w+)", rf"\1 sha256:{sha}", t),
                       name=f"s{i}.txt") for i, src in enumerate(SEED_LOGS[:2])]
    assert "the same artifact (sha256) appears in two logs" in refusal(same)
    # seed 42's log with seed 1337's score (same tokens and bytes): one result twice
    zero = [SEED_LOGS[0], edited_log(tmp_path, SEED_LOGS[1], lambda t: t.replace(
        "val_loss:2.01342779 val_bpb:1.19246118", "val_loss:2.01183341 val_bpb:1.19151690"))]
    assert "zero spread" in refusal(zero)
    with pytest.raises(ValueError, match="zero spread"):
        significance.gain_ttest([0.01, 0.01, 0.01])
    assert significance.main([str(p) for p in zero] + ["--record-val-loss", "2.1"]) == 2


def test_submission_cli_reports_reason_and_writes_nothing(tmp_path, capsys):
    cut = edited_log(tmp_path, SEED_LOGS[0], lambda t: t.replace("final_result", "final_resul"))
    out = tmp_path / "submission.json"
    rc = make_submission.main([str(cut), "--name", "n", "--author", "a", "--github-id", "g", "-o", str(out)])
    assert rc == 2 and not out.exists()
    assert "refused:" in capsys.readouterr().err


# --- significance ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.0, 11.0])
def test_t_sf_matches_closed_forms_for_df_1_and_2(t):
    assert significance.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-14)
    assert significance.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-14)


def test_t_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 40):
        for t in (-6.0, -1.1, 0.3, 1.7, 2.9, 8.5, 30.0):
            assert significance.t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_known_gains_give_known_t_and_p():
    res = significance.gain_ttest([0.010, 0.012, 0.011])
    # mean 0.011, sample std 0.001: t = 0.006 / (0.001 / sqrt(3)), df = 2
    t = 0.006 / (0.001 / math.sqrt(3))
    assert res["t"] == pytest.approx(t, rel=1e-9) and res["df"] == 2
    assert res["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert res["passed"]
    weak = significance.gain_ttest([0.004, 0.009, 0.006])
    assert not weak["passed"] and weak["p_value"] > 0.01


def test_significance_against_scipy_ttest():
    stats = pytest.importorskip("scipy.stats")
    gains = [0.0071, 0.0093, 0.0062, 0.0088, 0.0079]
    res = significance.gain_ttest(gains)
    ref = stats.ttest_1samp(gains, 0.005, alternative="greater")
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_record_bpb_is_converted_with_the_logs_tokens_per_byte():
    runs = [logparse.parse_log(p) for p in SEED_LOGS]
    tokens, nbytes = 62021632, 151080891  # the fixture eval lines
    res = significance.significance_from_runs(runs, record_bpb=1.2)
    record_nats = 1.2 * math.log(2) * nbytes / tokens
    assert res["record_val_loss"] == pytest.approx(record_nats, rel=1e-12)
    assert res["gains_nats"] == pytest.approx([record_nats - final_numbers(p)["val_loss"] for p in SEED_LOGS])
    same = significance.significance_from_runs(runs, record_val_loss=record_nats)
    assert same["t"] == pytest.approx(res["t"]) and same["p_value"] == pytest.approx(res["p_value"])


def test_significance_cli_verdict_and_exit_code(capsys):
    logs = [str(p) for p in SEED_LOGS]
    assert significance.main(logs + ["--record-val-loss", "2.03"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "mean gain: 0.01792 nats" in out
    assert significance.main(logs + ["--record-val-loss", "2.018"]) == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    assert significance.main(logs[:1] + ["--record-val-loss", "2.03"]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err


# --- refusals: unreadable input, non-submissions, cut or contradictory logs ------------------

TOOLS = ROOT / "tools"
MISSING = "no_such_dir/seed1.txt"
ID_ARGS = ["--name", "n", "--author", "a", "--github-id", "g"]


@pytest.mark.parametrize("argv", [
    ["logparse.py", MISSING],
    ["make_submission.py", MISSING, *ID_ARGS],
    ["make_record.py", MISSING, *ID_ARGS],
    ["make_record.py", str(SEED_LOGS[0]), *ID_ARGS, "--script", "no_such_dir/train_gpt.py"],
    ["significance.py", MISSING, "--record-bpb", "1.2"],
    ["plot_curves.py", MISSING],
    ["pack_code.py", "no_such_dir/train_gpt.py"],
    ["knob_table.py", "--write", "no_such_dir/README.md"],
    ["logparse.py", "."],  # a directory: unreadable as a log
], ids=lambda argv: " ".join(argv[:1] + argv[-1:]))
def test_tool_names_an_unreadable_input_in_one_line(argv, tmp_path):
    import subprocess
    proc = subprocess.run([sys.executable, str(TOOLS / argv[0]), *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert argv[-1] in err or argv[-3] in err  # the line names the file


def test_eval_only_log_is_no_submission(tmp_path):
    def eval_only(text):
        text = re.sub(r"^(step:|stopping_early:).*\n", "", text, flags=re.M)
        return text.replace("config TTT_ENABLED:False source:env\n",
                            "config TTT_ENABLED:False source:env\nconfig EVAL_ONLY:logs/rec.pgart source:env\n")
    msg = refusal([edited_log(tmp_path, SEED_LOGS[0], eval_only)])
    assert "EVAL_ONLY run of logs/rec.pgart" in msg and "trained 0 steps" not in msg
    no_steps = edited_log(tmp_path, SEED_LOGS[0], lambda t: re.sub(r"^step:.*\n", "", t, flags=re.M), "nosteps.txt")
    assert "trained 0 steps" in refusal([no_steps])


def test_training_and_calibration_over_the_cap_refuse_the_log_and_export_after_the_clock_does_not(tmp_path):
    def with_train_total(total_ms, export_ms, on_clock):
        line = (f"train_total steps:7041 train_ms:{total_ms - 400} calibration_ms:400 export_ms:{export_ms} "
                f"export_on_clock:{on_clock} total_ms:{total_ms} cap_ms:600000 reserve_ms:1500\n")
        return lambda t: t.replace("train_time_ms:600034", f"train_time_ms:{total_ms}").replace("eval_time ", line + "eval_time ", 1)
    # quantization and compression after the training clock: 90 s of export, training + calibration inside the cap
    ok = edited_log(tmp_path, SEED_LOGS[0], with_train_total(599_600, 90_000, 0), "ok.txt")
    assert not logparse.parse_log(ok).problems()
    over = edited_log(tmp_path, SEED_LOGS[0], with_train_total(600_300, 90_000, 0), "over.txt")
    assert "training clock over the cap: total_ms 600300 > cap_ms 600000" in refusal([over])


@pytest.mark.parametrize("line", ["error: training_over_wallclock_cap train_ms:612000 cap_ms:600000",
                                  "error: exception ValueError: shard ids out of range (see traceback above)"])
def test_any_error_line_refuses_the_log(tmp_path, line):
    bad = edited_log(tmp_path, SEED_LOGS[0], lambda t: t.replace("eval_time ", line + "\neval_time ", 1))
    assert line in refusal([bad])


def test_two_concurrent_runs_in_one_log_are_refused(tmp_path):
    """Two runs with one RUN_ID append to one file: their step lines interleave and final_result repeats."""
    lines = SEED_LOGS[0].read_text().splitlines(keepends=True)
    steps = [ln for ln in lines if ln.startswith("step:") and "train_loss" in ln]
    mixed = lines[:lines.index(steps[2])] + steps[:2] + lines[lines.index(steps[2]):]
    msg = refusal([edited_log(tmp_path, SEED_LOGS[0], lambda t: "".join(mixed), "mixed.txt")])
    assert "train step 1 logged after step 1000" in msg
    final = [ln for ln in lines if ln.startswith("final_result ")][0]
    msg = refusal([edited_log(tmp_path, SEED_LOGS[0], lambda t: t + final, "final2.txt")])
    assert "holds 2 'final_result' lines" in msg


@pytest.mark.parametrize("cut_after, reason", [
    ("eval_time_ms:82", "final_result eval_time_ms 82 differs from the total_ms 82326"),
    ("val_loss:2.0118", "'final_result' line is cut or edited: val_bpb, bytes_total, train_time_ms, eval_time_ms missing"),
    ("label:final_sl", "'final_result' line is cut or edited: val_loss, val_bpb,"),
    ("bytes_total:", "'final_result' line is cut or edited: bytes_total, train_time_ms, eval_time_ms missing"),
])
def test_cut_final_result_is_refused_never_misread(tmp_path, cut_after, reason):
    def cut(text):
        head = text[:text.rindex("final_result ")]
        return head + "final_result " + text[len(head) + len("final_result "):].split(cut_after)[0] + cut_after
    assert "the log ends inside a line" in refusal([edited_log(tmp_path, SEED_LOGS[0], cut)])
    # Even when a newline follows the cut (a copy that re-terminated it), no number is taken from it.
    assert reason in refusal([edited_log(tmp_path, SEED_LOGS[0], lambda t: cut(t) + "\n", "retermed.txt")])


def test_eval_line_whose_loss_and_bpb_disagree_is_refused(tmp_path):
    # 1e-6 nats is 200 units of the printed 8th decimal: far beyond rounding (bpb moves 7e-7).
    edit = lambda t: t.replace("final_roundtrip val_loss:2.04583341", "final_roundtrip val_loss:2.04583441")
    msg = refusal([edited_log(tmp_path, SEED_LOGS[0], edit)])
    assert "'final_roundtrip' val_bpb 1.21165355 disagrees with its val_loss 2.04583441" in msg
    # Every eval line of the committed logs holds within half a unit of the last printed digit.
    for path in SEED_LOGS + [ROOT / "logs" / "submission_quickstart_cpu.txt"]:
        assert logparse.parse_log(path).defects == []


def small_artifact_log(tmp_path, sha=None, size=1000):
    """seed42's log re-labelled for a `size`-byte artifact at tmp_path/rec.pgart (sha256 logged when given)."""
    def edit(text):
        text = re.sub(r"artifact path:\S+ bytes_code:425 bytes_model:\d+ bytes_total:\d+",
                      f"artifact path:{tmp_path / 'rec.pgart'} bytes_code:425 bytes_model:{size} bytes_total:{425 + size}"
                      + (f" sha256:{sha}" if sha else ""), text)
        return text.replace("bytes_total:15871455 train_time_ms", f"bytes_total:{425 + size} train_time_ms")
    return edited_log(tmp_path, SEED_LOGS[1], edit)


def test_artifact_sha256_is_parsed_carried_and_checked(tmp_path):
    import hashlib
    blob = bytes(range(256)) * 4  # 1024 bytes
    sha = hashlib.sha256(blob).hexdigest()
    log = small_artifact_log(tmp_path, sha, len(blob))
    run = logparse.parse_log(log)
    assert run.artifact["sha256"] == sha and run.problems() == []
    (tmp_path / "rec.pgart").write_bytes(blob)
    sub = make_submission.build_submission([run], **IDENTITY)
    assert sub["seeds"][0]["artifact_sha256"] == sha
    # The file at the logged path is checked; so is one given explicitly.
    (tmp_path / "rec.pgart").write_bytes(blob[::-1])
    assert "is not the artifact" in refusal([log])
    other = tmp_path / "given.pgart"
    other.write_bytes(blob)
    assert make_submission.build_submission([run], **IDENTITY, artifacts=[str(other)])["seeds"][0]["artifact_sha256"] == sha
    with pytest.raises(logparse.LogError, match="cannot read"):
        make_submission.build_submission([run], **IDENTITY, artifacts=[str(tmp_path / "missing.pgart")])
