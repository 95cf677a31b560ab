"""Tests of bench/: minigolf's log summary and results table, the GPU probe report, synthetic shards,
and (the issue's acceptance check) a 20-second CPU minigolf run on the embedded data."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigolf
import probe_report
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
    cpu = ["c"] * len(minigolf.COLUMNS)
    gpu = ["g"] * len(probe_report.GPU_COLUMNS)
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cpu)
    probe_report.append_row(path, probe_report.GPU_SECTION, probe_report.GPU_COLUMNS, gpu)
    minigolf.append_row(path, minigolf.CPU_SECTION, minigolf.COLUMNS, cpu)
    lines = path.read_text().splitlines()
    cpu_header = lines.index(minigolf.markdown_row(minigolf.COLUMNS))
    gpu_header = lines.index(minigolf.markdown_row(probe_report.GPU_COLUMNS))
    assert lines[cpu_header + 2:cpu_header + 4] == [minigolf.markdown_row(cpu)] * 2
    assert lines[cpu_header + 4] == "" and gpu_header > cpu_header
    assert lines[gpu_header + 2:] == [minigolf.markdown_row(gpu)]


def test_committed_results_file_has_both_tables():
    lines = (REPO / "bench" / "RESULTS.md").read_text().splitlines()
    assert minigolf.markdown_row(minigolf.COLUMNS) in lines
    assert minigolf.markdown_row(probe_report.GPU_COLUMNS) in lines


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


def test_probe_report_times_phases_and_extrapolates():
    log = stamp([
        (0.0, "env python:3.12.3 torch:2.11.0 cuda:13.0 device:cuda device_name:NVIDIA_H100_80GB_HBM3 device_count:1"),
        (0.1, "config TRAIN_BATCH_TOKENS:98304 source:env"),
        (0.2, "config GPTQ_RESERVE_SECONDS:8.0 source:default"),
        (1.0, "attention_backend:sdpa"),
        (1.1, "fused_kernels:1 reason:triton_3.6.0"),
        (2.0, "model_params:35000000 est_artifact_bytes:15900000"),
        (92.0, "warmup steps:20 ms:88500 (compile priming, weights restored)"),
        (92.5, "step:5/100 train_loss:7.0 train_time:500 step_avg:100.00 tok_s:983040"),
        (93.0, "step:10/100 train_loss:6.5 train_time:1000 step_avg:100.00 tok_s:983040"),
        (93.5, "step:15/100 train_loss:6.0 train_time:1500 step_avg:100.00 tok_s:983040"),
        (94.0, "step:20/100 train_loss:5.5 train_time:2000 step_avg:100.00 tok_s:983040"),
        (94.1, "stopping_early: wallclock_cap train_time:2000 step:20/100"),
        (96.0, "gptq_calibration seconds:1.50 batches:16 source:train"),
        (99.0, "quantize method:gptq tensors:66 lqer:3 seconds:3.25"),
        (99.5, "train_total steps:20 train_ms:2000 export_ms:6400 total_ms:8400"),
        (100.0, "progress phase:sliding done:8 total:8 elapsed_s:19.9 eta_s:0.0"),
        (108.0, "final_sliding val_loss:5.0 val_bpb:3.0 tokens:1000000 bytes:2400000 eval_ms:20000"),
        (109.0, "probe_exit code:124 wall_s:120.0"),
    ])
    text, fig = probe_report.report(log, full_val_tokens=62_021_632)
    fields = dict(line.split("    #")[0].split(": ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert fields["device_name"] == "NVIDIA_H100_80GB_HBM3" and fields["attention_backend"] == "sdpa"
    assert fields["fused_kernels"] == "1"
    assert fields["steady_ms_per_step"] == "100.000"
    assert fields["train_tokens_per_s"] == "983040.000"
    assert fields["compile_warmup_s"] == "88.500"
    assert fields["start_to_first_step_line_s"] == "92.500"
    assert (fields["gptq_calibration_s"], fields["quantize_s"], fields["gptq_s"]) == ("1.500", "3.250", "4.750")
    assert fields["calibration_and_export_s"] == "6.400"
    assert fields["phase.sliding_s"] == "19.9"
    assert "+   13.90s  final_sliding" in text  # timeline, relative to the stop line
    assert fields["eval.final_sliding.tokens_per_s"] == "50000.000"
    assert fields["extrapolated_steps_8gpu_600s"] == "5920"  # (600 - 8) s / 0.1 s
    assert float(fields["extrapolated_full_val_sliding_s_8gpu"]) == pytest.approx(62_021_632 / 400_000, abs=1e-3)
    assert (fields["complete"], fields["exit_code"], fields["wall_s"]) == ("False", "124", "120.000")
    assert "# extrapolation" in text and "ignores all-reduce" in text
    cells = dict(zip(probe_report.GPU_COLUMNS, probe_report.results_cells(fig)))
    assert cells["device"] == "1xNVIDIA_H100_80GB_HBM3" and cells["status"] == "timeout"
    assert (cells["ms/step"], cells["tok/s/GPU"], cells["compile s"], cells["GPTQ s"]) == ("100.0", "983040", "88.5", "4.8")
    assert cells["steps 8x600s (extrapolated)"] == 5920 and cells["date"] == "1970-01-01 00:18Z"


def test_gpu_probe_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_probe.sh")]).returncode == 0


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_twenty_second_cpu_minigolf_run_on_tiny_data_writes_a_results_row(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "minigolf.py"), "--data", "tiny", "--preset", "tiny", "--nproc", "1",
         "--seconds", "20", "--results", str(results), "--runs-dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header, _, *rows = table_rows(results)
    assert len(rows) == 1
    cells = dict(zip(minigolf.COLUMNS, (c.strip() for c in rows[0].strip("|").split("|"))))
    assert cells["status"] == "ok" and cells["machine"].startswith("cpu-")
    assert int(cells["steps"]) > 0 and float(cells["tok/s"]) > 0
    assert 0 < float(cells["roundtrip bpb"]) < 20 and int(cells["artifact bytes"]) > 0
    assert float(cells["peak RSS MiB/proc"]) > 50  # a torch process, measured
