"""Tests of bench/: minigolf's log summary and results table, the GPU probe report, synthetic shards,
and (the issue's acceptance check) a 20-second CPU minigolf run on the embedded data."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigolf
import gpu_probe
import synthetic_shards
from convert_text import read_shard

REPO = Path(__file__).resolve().parent.parent

# A CPU run as train_gpt.py logs it (the line formats tools/logparse.py reads), with the noise a real log holds.
CPU_LOG = """\
code path:/work/main/train_gpt.py bytes_code:61234 code_sha256:aa11bb22cc33dd44ee55ff6677889900aa11bb22cc33dd44ee55ff6677889900
launch world_size:2 nproc_per_node:2 script:train_gpt.py
env python:3.11.7 torch:2.13.0+cpu cuda:none device:cpu device_name:cpu device_count:0
config DATA_PATH:/work/main/bench/cache/english_sp1024_val200_train5000000 source:env
config VOCAB_SIZE:1024 source:env
config NUM_LAYERS:4 source:env
config TRAIN_BATCH_TOKENS:4096 source:env
config MAX_WALLCLOCK_SECONDS:300 source:env
attention_backend:sdpa
model_params:2012345 est_artifact_bytes:1500000
UserWarning: a library being noisy
    log0(f"step:{step}/{n} train_loss:{loss:.4f}")  # source dump, not data
step:1/1000000 train_loss:6.9400 train_time:410 step_avg:410.00 tok_s:9990
step:10/1000000 train_loss:5.8000 train_time:4000 step_avg:400.00 tok_s:10240
step:20/1000000 train_loss:5.1234 train_time:8000 step_avg:400.00 tok_s:10240
progress phase:train done:20 total:750 elapsed_s:8.0 eta_s:292.0
stopping_early: wallclock_cap train_time:300100 step:745/1000000
step:745/1000000 train_loss:3.9876 train_time:300100 step_avg:402.82 tok_s:10168
final_prequant val_loss:3.10000000 val_bpb:1.84567890 tokens:97285 bytes:235586 eval_ms:5100
final_roundtrip val_loss:3.12000000 val_bpb:1.85757657 tokens:97285 bytes:235586 eval_ms:5200
final_sliding val_loss:3.09000000 val_bpb:1.83972999 tokens:97285 bytes:235586 eval_ms:10400
artifact path:/work/main/bench/runs/x/model.pgart bytes_code:61234 bytes_model:1400000 bytes_total:1461234 limit:16000000 compressor:brotli
eval_time total_ms:23456 limit_ms:600000
peak_mem_mib:812.5
final_result label:final_sliding val_loss:3.09000000 val_bpb:1.83972999 bytes_total:1461234 train_time_ms:300100 eval_time_ms:23456
"""


# ----------------------------------------------------------------------------- log summary

def test_summarize_log_reads_every_reported_figure():
    fig = minigolf.summarize_log(CPU_LOG)
    assert fig["steps"] == 745
    assert fig["tok_s"] == pytest.approx(745 * 4096 / 300.1)
    assert fig["train_loss"] == 3.9876
    assert (fig["prequant_bpb"], fig["roundtrip_bpb"], fig["sliding_bpb"]) == (1.8456789, 1.85757657, 1.83972999)
    assert fig["ttt_bpb"] is None
    assert fig["artifact_bytes"] == 1461234
    assert fig["eval_s"] == pytest.approx(23.456)
    assert fig["complete"] and fig["score_label"] == "final_sliding" and fig["errors"] == []
    assert fig["device"] == "cpu"


def test_summarize_log_of_a_crashed_run_has_gaps_not_guesses():
    cut = CPU_LOG.split("final_prequant")[0] + "Traceback (most recent call last):\n"
    fig = minigolf.summarize_log(cut)
    assert fig["steps"] == 745 and not fig["complete"]
    assert fig["prequant_bpb"] is None and fig["artifact_bytes"] is None and fig["eval_s"] is None
    assert minigolf.summarize_log("")["steps"] is None


# ----------------------------------------------------------------------------- results table

def table_rows(path):
    return [line for line in Path(path).read_text().splitlines() if line.startswith("|")]


def test_results_rows_are_well_formed_and_escape_pipes(tmp_path):
    path = tmp_path / "RESULTS.md"
    cells = ["2025-01-01 00:00Z", "abc1234", "cpu-2core X", "python bench/minigolf.py --set A=b|c", "ok", 745,
             minigolf.fmt(10168.2, ".0f"), "3.9876", minigolf.fmt(1.84567890, ".4f"), None, "1.8397", None,
             1461234, "23.5", "812/790"]
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cells)
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cells)
    text = path.read_text()
    assert text.startswith(minigolf.RESULTS_INTRO) and text.count("## CPU mini-golf") == 1
    header, rule, *rows = table_rows(path)
    assert header == minigolf.markdown_row(minigolf.COLUMNS) and rule == "|" + "---|" * len(minigolf.COLUMNS)
    assert len(rows) == 2
    cells_out = [c.strip() for c in rows[0].replace("\\|", "¦").strip("|").split("|")]
    assert len(cells_out) == len(minigolf.COLUMNS)
    assert cells_out[3] == "python bench/minigolf.py --set A=b¦c"
    assert cells_out[6:10] == ["10168", "3.9876", "1.8457", "-"]
    with pytest.raises(ValueError, match="cells"):
        minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cells[:-1])


def test_rows_go_to_their_own_table_when_the_file_holds_two(tmp_path):
    path = tmp_path / "RESULTS.md"
    other_columns, other_section = ["x", "y"], "## Another table\n\nIts words.\n"
    cpu, other = ["c"] * len(minigolf.COLUMNS), ["o", "p"]
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cpu)
    minigolf.append_row(path, other_section, other_columns, other)
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cpu)
    lines = path.read_text().splitlines()
    cpu_header = lines.index(minigolf.markdown_row(minigolf.COLUMNS))
    other_header = lines.index(minigolf.markdown_row(other_columns))
    assert lines[cpu_header + 2:cpu_header + 4] == [minigolf.markdown_row(cpu)] * 2
    assert lines[cpu_header + 4] == "" and other_header > cpu_header
    assert lines[other_header + 2:] == [minigolf.markdown_row(other)]


def test_committed_results_file_has_the_cpu_table_and_the_gpu_probe_section():
    text = (REPO / "bench" / "RESULTS.md").read_text()
    assert minigolf.markdown_row(minigolf.COLUMNS) in text.splitlines()
    assert "## GPU acceptance run (`bench/gpu_probe.sh`)" in text


def test_set_overrides_must_name_knobs():
    assert minigolf.parse_sets(["NUM_LAYERS=3", "VE_LAYERS=1,2"], {"NUM_LAYERS", "VE_LAYERS"}) == {
        "NUM_LAYERS": "3", "VE_LAYERS": "1,2"}
    with pytest.raises(SystemExit):
        minigolf.parse_sets(["NUM_LAYER=3"], {"NUM_LAYERS"})
    with pytest.raises(SystemExit):
        minigolf.parse_sets(["NUM_LAYERS"], {"NUM_LAYERS"})


def test_command_column_reproduces_the_run():
    args = minigolf.build_parser().parse_args(["--preset", "baseline", "--set", "SEED=7", "--repeats", "3",
                                               "--results", "/tmp/x.md"])
    assert minigolf.command_line(args) == (
        "python bench/minigolf.py --preset baseline --nproc 2 --seconds 300 --data english --set SEED=7")


def test_presets_differ_only_in_features_not_shape():
    record, baseline = minigolf.PRESETS["record"], minigolf.PRESETS["baseline"]
    for knob in ("NUM_LAYERS", "MODEL_DIM", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "NUM_HEADS"):
        assert record[knob] == baseline[knob]
    assert baseline["XSA_LAST_N"] == 0 and baseline["QUANT"] == "rtn" and baseline["NUM_LOOPS"] == 1
    # layer-indexed knobs of the record preset must point inside its 4 layers
    assert record["LOOP_END"] < record["NUM_LAYERS"] and record["XSA_LAST_N"] <= record["NUM_LAYERS"]


@pytest.mark.parametrize("preset", sorted(minigolf.PRESETS))
def test_presets_are_valid_train_gpt_configs(preset):
    import train_gpt

    env = {k: str(v) for k, v in {**minigolf.PRESETS[preset], **minigolf.tiny_data()}.items()}
    args = train_gpt.Hyperparameters(env)  # raises ConfigError on an invalid combination
    assert not args.misspelt and args.num_layers == minigolf.PRESETS[preset]["NUM_LAYERS"]


# ----------------------------------------------------------------------------- GPU probe pieces

def test_synthetic_shards_are_bos_led_and_inside_the_vocab(tmp_path):
    assert synthetic_shards.main(["--out", str(tmp_path), "--vocab", "300", "--train-tokens", "20000",
                                  "--val-tokens", "5000"]) == 0
    train = read_shard(tmp_path / "fineweb_train_000000.bin")
    val = read_shard(tmp_path / "fineweb_val_000000.bin")
    assert (train.size, val.size) == (20000, 5000)
    assert train[0] == 1 and val[0] == 1 and train.max() < 300
    assert not np.isin(train, [0, 2, 3]).any()
    assert 5 <= (train == 1).sum() <= 200  # documents of a few hundred tokens


def stamp(lines, t0=1000.0):
    return "".join(f"{t0 + dt:.3f} {line}\n" for dt, line in lines)


def probe_main_log(compile_after_clock: bool, refit: bool, calibration_ms: int):
    steps = [(92.0 + i, f"step:{10 * i}/20000 train_loss:6.0 train_time:{t} step_avg:1.0 tok_s:1")
             for i, t in enumerate([0, 900, 1800, 2700, 3700, 4900, 6100, 7300], start=1)]
    return stamp([
        (0.0, "env python:3.12.3 torch:2.11.0 cuda:13.0 device:cuda device_name:NVIDIA_H200 device_count:1 compile:1 autocast:1"),
        (0.1, "config VOCAB_SIZE:8192 source:env"),
        (0.1, "config NUM_LAYERS:11 source:default"),
        (0.1, "config COMPILE:auto source:default"),
        (0.1, "config PHASED_TTT_ENABLED:1 source:default"),
        (1.0, "attention_backend:sdpa reason:auto_flash_attn_not_installed"),
        (5.0, "gptq_reserve seconds:12.0 source:auto calibration_s:2.00 quantize_s:3.00 compress_s:3.00"),
        (90.0, "probe_compile_start"),
        (91.0, "probe_priming_done"),
        *steps[:4],
        (95.5, "looping_enabled step:40 train_time:2700 layers:0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10"),
        *steps[4:],
        *([(99.5, "probe_compile_start")] if compile_after_clock else []),
        (100.0, "probe_phase name:train s:99.0 peak_mib:60000"),
        (101.0, "probe_phase name:calibration s:1.0 peak_mib:81000"),
        *([(102.0, "budget_fit tensor:blocks.0.mlp.fc bits:6->5 over_by:1000")] if refit else []),
        (103.0, f"train_total steps:80 train_ms:7300 calibration_ms:{calibration_ms} export_ms:25000 export_on_clock:0 "
                "total_ms:20000 cap_ms:600000 reserve_ms:12000"),
        (104.0, "artifact path:/o/model.pgart bytes_code:40000 bytes_model:15900000 bytes_total:15940000 limit:16000000 "
                "compressor:brotli sha256:ab"),
        (110.0, "probe_phase name:eval_roundtrip s:4.0 peak_mib:20000"),
        (110.0, "final_roundtrip val_loss:3.0 val_bpb:1.30 tokens:100000 bytes:400000 eval_ms:4000"),
        (120.0, "probe_phase name:eval_sliding s:10.0 peak_mib:20000"),
        (120.0, "final_sliding val_loss:3.0 val_bpb:1.28 tokens:100000 bytes:400000 eval_ms:10000"),
        (150.0, "ttt_stopped_adapting phase:phased_ttt at:chunk:3 reason:eval_budget elapsed_s:30.0 limit_s:600"),
        (150.0, "phased_ttt docs:300 chunk_tokens:48 global_phases_trained:1"),
        (150.0, "probe_phase name:eval_phased_ttt s:30.0 peak_mib:70000"),
        (150.0, "final_phased_ttt val_loss:3.0 val_bpb:1.26 tokens:100000 bytes:400000 eval_ms:30000"),
        (151.0, "final_result label:final_phased_ttt val_loss:3.0 val_bpb:1.26 bytes_total:15940000 train_time_ms:20000 "
                "eval_time_ms:44000"),
        (152.0, "probe_exit code:0"),
    ])


def table_checks(text):
    """{check: (measured, result)} of a probe table."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ") and " | " in line]
    return {cells[0].strip(): (cells[1], cells[3].strip()) for cells in rows[1:]}


def test_probe_table_passes_and_fails_each_check_from_the_logs(tmp_path):
    (tmp_path / "main.log").write_text(probe_main_log(compile_after_clock=False, refit=False, calibration_ms=9000))
    (tmp_path / "model.pgart").write_bytes(b"x")
    checks = table_checks(gpu_probe.report(tmp_path, "synthetic", dry_run=False))
    assert checks["main run: no crash"][1] == "PASS"
    assert checks["ms/step before loops"] == ("90.0", "PASS")  # 900 ms per 10 steps; the switch interval left out
    assert checks["ms/step after loops"] == ("120.0", "PASS")
    assert checks["torch.compile after the training clock started"] == ("0 compiles", "PASS")
    assert checks["calibration inside the reserve"] == ("9.0 s", "PASS")
    assert checks["export after the training clock"][0] == "25.0 s"
    assert checks["artifact, no refit"][1] == "PASS"
    assert checks["peak memory: main/calibration"] == ("81,000 MiB", "FAIL")  # over what an 80 GB H100 leaves
    assert checks["peak memory: main/train"][1] == "PASS"
    phased = checks["eval final_phased_ttt"]
    assert "10.00 docs/s" in phased[0] and "stopped adapting at chunk:3" in phased[0] and phased[1] == "FAIL"
    # 45,530,000 targets / 100,000 scored here / 8 GPUs x 30 s
    assert "full val on 8 GPUs ~1707 s" in phased[0]
    assert checks["evaluation clock, extrapolated"][1] == "FAIL"
    assert checks["final_phased_ttt gain over sliding"] == ("-0.0200 bpb", "PASS")
    assert checks["artifact saved"][1] == "PASS"

    (tmp_path / "main.log").write_text(probe_main_log(compile_after_clock=True, refit=True, calibration_ms=13000))
    checks = table_checks(gpu_probe.report(tmp_path, "synthetic", dry_run=False))
    assert checks["torch.compile after the training clock started"] == ("1 compiles", "FAIL")
    assert checks["calibration inside the reserve"] == ("13.0 s", "FAIL")
    assert checks["artifact, no refit"] == ("15940000 bytes, 1 refits", "FAIL")


def test_gpu_probe_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_probe.sh")]).returncode == 0


@pytest.mark.slow
def test_gpu_probe_dry_run_runs_the_whole_acceptance_pipeline_on_cpu(tmp_path):
    """The acceptance script end to end on CPU (tiny shape, SDPA): every run exits 0 and the table has its rows."""
    out = tmp_path / "probe"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_probe.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = table_checks((out / "gpu_probe.md").read_text())
    assert checks["main run: no crash"][1] == "PASS" and checks["artifact saved"][1] == "PASS"
    for check in ("ms/step before loops", "ms/step after loops", "peak memory: main/train", "eval final_sliding",
                  "calibration inside the reserve", "artifact, no refit"):
        assert check in checks and checks[check][1] == "n/a", check  # measured, but no GPU verdict on CPU
    assert {"eval final_ttt", "eval final_phased_ttt"} <= checks.keys()  # one in the main run, one EVAL_ONLY
    assert "adapted every chunk" in checks["eval final_phased_ttt"][0]
    assert (out / "model.pgart").stat().st_size > 0 and (out / "main.log").is_file()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_twenty_second_cpu_minigolf_run_on_tiny_data_writes_a_results_row(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "minigolf.py"), "--data", "tiny", "--preset", "tiny", "--nproc", "1",
         "--seconds", "20", "--set", "GPTQ_RESERVE_SECONDS=8",  # a fixed reserve: a load spike in calibration must not fail the run
         "--results", str(results), "--runs-dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header, _, *rows = table_rows(results)
    assert len(rows) == 1
    cells = dict(zip(minigolf.COLUMNS, (c.strip() for c in rows[0].strip("|").split("|"))))
    assert cells["status"] == "ok" and cells["machine"].startswith("cpu-")
    assert int(cells["steps"]) > 0 and float(cells["tok/s"]) > 0
    assert 0 < float(cells["roundtrip bpb"]) < 20 and int(cells["artifact bytes"]) > 0
    assert float(cells["peak RSS MiB/proc"]) > 50  # a torch process, measured
