"""Nothing lost, nothing silently wrong (issue 14): logs, artifacts, datasets and start-up checks."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, SCRIPT, TINY, log_value, make_args, read_tokens, run_train, write_shard

import convert_text

CPU = torch.device("cpu")
TINY_SHA = hashlib.sha256((TINY / "tokenizer.model").read_bytes()).hexdigest()


def tiny_dir(path: Path, val_tokens: int = 3001) -> Path:
    """A data dir like the tiny_data fixture: the tiny train shard and a short val shard."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "fineweb_train_000000.bin").symlink_to(TINY / "fineweb_train_000000.bin")
    write_shard(path / "fineweb_val_000000.bin", read_tokens(TINY / "fineweb_val_000000.bin")[:val_tokens])
    return path


# --- logs: one log is one run, and writing it never stops the run --------------------------------


def test_reused_run_id_is_refused_and_a_live_log_is_never_replaced(tmp_path):
    path = str(tmp_path / "logs" / "run.txt")
    fd = tg.open_run_log(path, overwrite=False)
    os.write(fd, b"step:1/2 train_loss:3.0\n")
    with pytest.raises(tg.ConfigError, match=r"run.txt exists: an earlier run used RUN_ID=run; .*LOG_OVERWRITE=1"):
        tg.open_run_log(path, overwrite=False)
    with pytest.raises(tg.ConfigError, match="being written by a running process"):
        tg.open_run_log(path, overwrite=True)  # two live runs never share a log
    assert Path(path).read_bytes() == b"step:1/2 train_loss:3.0\n"
    os.close(fd)  # that run ended; an explicit overwrite may now replace its log
    fd = tg.open_run_log(path, overwrite=True)
    os.write(fd, b"second\n")
    os.close(fd)
    assert Path(path).read_bytes() == b"second\n"
    assert sorted(os.listdir(tmp_path / "logs")) == ["run.txt"]  # no temporary files left


def test_artifact_path_is_locked_and_never_replaces_a_log_or_an_unasked_artifact(tmp_path):
    """Issue 19: two live runs shared an artifact (one scored the other's model); an ARTIFACT_PATH
    naming a log replaced it with the artifact; an earlier artifact was replaced without an opt-in."""
    log = tmp_path / "logs" / "run.txt"
    os.close(tg.open_run_log(str(log), overwrite=False))
    log.write_text("code path:x\n")
    with pytest.raises(tg.ConfigError, match="exists and is not an artifact; it is never overwritten"):
        tg.lock_artifact_path(str(log), overwrite=True)
    assert log.read_text() == "code path:x\n"
    art = tmp_path / "m.pgart"
    art.write_bytes(tg.ARTIFACT_MAGIC + b"earlier run")
    with pytest.raises(tg.ConfigError, match="holds an earlier run's artifact; .*LOG_OVERWRITE=1"):
        tg.lock_artifact_path(str(art), overwrite=False)
    tg.lock_artifact_path(str(art), overwrite=True)  # held until this process ends
    with pytest.raises(tg.ConfigError, match="m.pgart is being written by another running process"):
        tg.lock_artifact_path(str(art), overwrite=True)


@pytest.mark.slow
def test_artifact_lock_holds_across_processes_and_an_ended_run_leaves_no_lock_file(tmp_path):
    art = tmp_path / "m.pgart"
    tg.lock_artifact_path(str(art), overwrite=False)  # held until this process ends
    held = subprocess.run([sys.executable, "-c", "import train_gpt as tg, sys; tg.lock_artifact_path(sys.argv[1], True)",
                           str(art)], cwd=ROOT, capture_output=True, text=True)
    assert held.returncode != 0 and "being written by another running process" in held.stderr
    fresh = tmp_path / "fresh.pgart"
    subprocess.run([sys.executable, "-c", "import train_gpt as tg, sys; tg.lock_artifact_path(sys.argv[1], False)",
                    str(fresh)], cwd=ROOT, check=True)
    assert not (tmp_path / "fresh.pgart.lock").exists()  # an ended run leaves no lock file


def compressing_pid(job):
    return str(os.getpid()).encode()


def test_compression_workers_live_in_the_run_so_they_die_with_it(monkeypatch):
    """Issue 19/23: forked compression workers outlived a killed run, holding its log's lock, and
    were forked from a parent running CUDA/NCCL threads. They are threads of the run now."""
    monkeypatch.setattr(tg, "compress_chunk", compressing_pid)
    out, fresh = tg.compress_chunks([bytes([i]) * 100 for i in range(4)], "zstd", 1, 4, {})
    assert fresh == 4 and set(out) == {str(os.getpid()).encode()}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")
def test_a_failed_log_write_warns_once_and_does_not_raise(capsys):
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        rt = tg.Runtime(0, 1, 0, CPU, False, False, "/dev/full", fd)
        rt.log("step:1/2 train_loss:3.0")
        rt.log("step:2/2 train_loss:2.0")
    finally:
        os.close(fd)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["step:1/2 train_loss:3.0", "step:2/2 train_loss:2.0"]  # stdout keeps every line
    assert len(err.splitlines()) == 1 and "cannot write /dev/full" in err


# --- artifacts: replaced atomically ---------------------------------------------------------------


class DiesAfterFirstWrite:
    """A file whose second write kills the process (here: raises), as a crash mid-write would."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise KeyboardInterrupt("killed mid-write")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_artifact_killed_mid_write_leaves_the_earlier_artifact(tmp_path, monkeypatch):
    path = tmp_path / "model.pgart"
    tg.write_artifact(str(path), "zstd", b"earlier payload")
    earlier = path.read_bytes()
    monkeypatch.setattr(tg, "open", lambda *a, **k: DiesAfterFirstWrite(open(*a, **k)), raising=False)
    with pytest.raises(KeyboardInterrupt):
        tg.write_artifact(str(path), "zstd", b"new payload that never completes")
    assert path.read_bytes() == earlier
    assert sorted(os.listdir(tmp_path)) == ["model.pgart"]


# --- config: small shapes, lower-case names, booleans ---------------------------------------------


def test_num_layers_2_alone_follows_the_shape_and_builds():
    args = tg.Hyperparameters({"NUM_LAYERS": "2"})
    assert (args.xsa_last_n, args.loop_start, args.loop_end, args.parallel_residual_start) == (2, 1, 1, 1)
    assert {n for n, s in args.sources.items() if s == "shape"} == {
        "XSA_LAST_N", "LOOP_START", "LOOP_END", "PARALLEL_RESIDUAL_START"}
    assert "config XSA_LAST_N:2 source:shape" in args.log_lines()
    assert "config_adjusted XSA_LAST_N:2 default:11 follows:NUM_LAYERS=2" in args.adjusted_lines()
    assert tg.Hyperparameters({"NUM_LAYERS": "2", "VE_DIM": "8"}).ve_layer_ids == [0, 1]  # the last two, as 9,10 of 11
    model = tg.GPT(args)
    assert len(model.blocks) == 2 and model.layer_order() == [0, 1]


def test_width_defaults_follow_the_head_dim_and_model_dim():
    args = tg.Hyperparameters({"NUM_LAYERS": "2", "MODEL_DIM": "8", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"})
    assert (args.rope_dims, args.smear_gate_width, args.attn_gate_width) == (4, 8, 8)
    assert "config_adjusted ROPE_DIMS:4 default:16 follows:head_dim=4" in args.adjusted_lines()


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "2", "XSA_LAST_N": "3"}, "XSA_LAST_N=3 exceeds NUM_LAYERS=2"),
    ({"NUM_LAYERS": "2", "LOOP_END": "2"}, "LOOP_START=1..LOOP_END=2 must lie within the 2 layers"),
    ({"NUM_LAYERS": "2", "ROPE_DIMS": "128"}, "ROPE_DIMS=128 must be even and <= head dim 64"),
])
def test_explicit_impossible_values_stay_errors(env, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.Hyperparameters(env)


def test_default_shape_is_untouched():
    args = tg.Hyperparameters({})
    assert args.adjusted == {} and "shape" not in args.sources.values()
    assert (args.xsa_last_n, args.loop_start, args.loop_end, args.parallel_residual_start) == (11, 3, 5, 8)


def test_lower_case_knob_is_caught():
    args = tg.Hyperparameters({"num_layers": "3"})
    assert args.num_layers == 11 and args.misspelt == [("num_layers", "NUM_LAYERS")]
    with pytest.raises(tg.ConfigError, match=r"unknown env var num_layers \(did you mean NUM_LAYERS\?\)"):
        tg.Hyperparameters({"num_layers": "3", "STRICT_ENV": "1"})


def test_boolean_knobs_are_logged_as_0_and_1():
    lines = tg.Hyperparameters({"TTT_ENABLED": "true", "SMEAR_GATE": "False"}).log_lines()
    assert "config TTT_ENABLED:1 source:env" in lines and "config SMEAR_GATE:0 source:env" in lines
    assert "config TIE_EMBEDDINGS:1 source:default" in lines


# --- inputs checked before the first step ---------------------------------------------------------


def corrupt_header(path: Path):
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "fineweb_val_000000.bin").unlink(), "no val shards match"),
    (lambda d: write_shard(d / "fineweb_val_000000.bin", [1, 2, 700]), "token id 700 >= VOCAB_SIZE=512"),
    (lambda d: write_shard(d / "fineweb_val_000000.bin", [1]), "fewer than 2 tokens"),
    (lambda d: (write_shard(d / "fineweb_train_000001.bin", [1, 2, 3]), corrupt_header(d / "fineweb_train_000001.bin")),
     "fineweb_train_000001.bin: bad shard header magic"),
    (lambda d: (d / "fineweb_train_000002.bin").write_bytes(
        (d / "fineweb_val_000000.bin").read_bytes()[:-2]), "fineweb_train_000002.bin: file is"),
    # issue 19: the loader waited forever on an empty train split; a bad id in a later shard was a traceback mid-run
    (lambda d: ((d / "fineweb_train_000000.bin").unlink(), write_shard(d / "fineweb_train_000000.bin", [])),
     "train shards under .* hold 0 tokens; one step needs TRAIN_BATCH_TOKENS \\+ 1 = 1025"),
    (lambda d: write_shard(d / "fineweb_train_000001.bin", [1, 2, 600]), "fineweb_train_000001.bin: token id 600 >= VOCAB_SIZE=512"),
    (lambda d: (d / tg.TOKENIZER_RECORD).write_text("{"), "tokenizer_record.json is malformed \\(JSONDecodeError"),
    (lambda d: (d / tg.TOKENIZER_RECORD).write_text("{}"), "tokenizer_record.json is malformed \\(KeyError"),
    (lambda d: (d / tg.TOKENIZER_RECORD).write_text("[1]"), "tokenizer_record.json is malformed \\(TypeError"),
])
def test_bad_shards_are_found_before_training(tmp_path, damage, message):
    d = tiny_dir(tmp_path / "data")
    damage(d)
    args = make_args(DATA_PATH=str(d), ARTIFACT_PATH=str(tmp_path / "m.pgart"))
    with pytest.raises(tg.ConfigError, match=message):
        tg.check_inputs(args)


def test_a_tokenizer_that_is_not_a_sentencepiece_model_is_one_line(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(tg.ConfigError, match="TOKENIZER_PATH=.*tok.model is not a SentencePiece model"):
        tg.load_tokenizer(str(bad), 512)
    with pytest.raises(ValueError, match="tok.model is not a SentencePiece model"):
        convert_text.write_shards(["some text"], bad, tmp_path / "out", val_docs=1)


def test_a_peer_rank_that_dies_is_one_error_line_not_a_gloo_traceback(monkeypatch, capsys):
    def lost(args, rt):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20904. "
                           "This is typically caused by a remote worker crashing.")

    monkeypatch.setattr(tg, "run", lost)
    monkeypatch.setattr(tg, "setup_runtime", lambda args: None)
    monkeypatch.setattr(tg.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tg.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        tg.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0].startswith("error: peer_lost rank:1 world_size:2 message:[gloo") and "Connection closed by peer" in err[0]


def test_artifact_path_is_checked_before_training(tmp_path):
    (tmp_path / "adir").mkdir()
    for path, message in ((tmp_path / "missing" / "m.pgart", "directory .*missing does not exist"),
                          (tmp_path / "adir", "is a directory")):
        with pytest.raises(tg.ConfigError, match=f"ARTIFACT_PATH=.*: {message}"):
            tg.check_inputs(make_args(ARTIFACT_PATH=str(path)))
    assert tg.check_inputs(make_args(ARTIFACT_PATH=str(tmp_path / "m.pgart"))) == "record"


def test_tokenizer_must_be_the_one_the_shards_and_artifact_were_made_with(tmp_path):
    d = tiny_dir(tmp_path / "mine")
    other = "ab" * 32
    (d / tg.TOKENIZER_RECORD).write_text(json.dumps({"sha256": other}))
    args = make_args(DATA_PATH=str(d), ARTIFACT_PATH=str(tmp_path / "m.pgart"))
    with pytest.raises(tg.ConfigError, match=f"sha256 {TINY_SHA}.* not the tokenizer the shards were made with .*sha256 {other}"):
        tg.check_inputs(args)
    (d / tg.TOKENIZER_RECORD).unlink()
    assert tg.check_inputs(args) == "none"  # unknown provenance: a warning in the log, not an error
    args.artifact_tokenizer_sha256 = other
    with pytest.raises(tg.ConfigError, match=f"sha256 {TINY_SHA}.* not the tokenizer the EVAL_ONLY artifact was trained with .*{other}"):
        tg.check_inputs(args)
    official = tiny_dir(tmp_path / "fineweb10B_sp1024")  # the official layout, no record
    with pytest.raises(tg.ConfigError, match="is not an official tokenizer, but .*fineweb10B_sp1024 holds official shards"):
        tg.check_inputs(make_args(DATA_PATH=str(official), ARTIFACT_PATH=str(tmp_path / "m.pgart")))


@pytest.mark.parametrize("name", ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model",
                                  "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"])
def test_known_hashes_are_the_official_tokenizers(name):
    path = ROOT.parent / "shared" / "tokenizers" / name
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is optional)")
    assert tg.OFFICIAL_TOKENIZERS[tg.file_sha256(str(path))] == name.removesuffix(".model")


def test_artifact_records_the_tokenizer_and_eval_settings(tmp_path):
    args = make_args(ARTIFACT_PATH=str(tmp_path / "m.pgart"))
    tg.check_inputs(args)
    cfg = args.model_config()
    assert cfg["TOKENIZER_SHA256"] == TINY_SHA and (cfg["TRAIN_SEQ_LEN"], cfg["EVAL_SEQ_LEN"]) == (64, 64)


def test_eval_only_adopts_what_the_artifact_records():
    cfg = make_args(TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="1024", EVAL_SEQ_LEN="128").model_config()
    cfg["TOKENIZER_SHA256"] = "cd" * 32
    args = tg.Hyperparameters({"EVAL_ONLY": "m.pgart"})  # no VOCAB_SIZE, shape or lengths given
    tg.adopt_artifact_config(args, {"config": cfg})
    assert (args.vocab_size, args.num_layers, args.model_dim, args.train_seq_len, args.eval_seq_len) == (512, 2, 32, 256, 128)
    assert args.sources["TRAIN_SEQ_LEN"] == args.sources["VOCAB_SIZE"] == "artifact"
    assert args.artifact_tokenizer_sha256 == "cd" * 32
    assert args.run_id.startswith("m_eval_")  # never the training run's log
    with pytest.raises(tg.ConfigError, match=r"TRAIN_SEQ_LEN=2048 \(artifact: 256\)"):
        tg.adopt_artifact_config(tg.Hyperparameters({"EVAL_ONLY": "m.pgart", "TRAIN_SEQ_LEN": "2048"}), {"config": cfg})


# --- data/: one shard format, safe conversion, a quick offline failure ----------------------------


def test_shard_format_has_one_home():
    for path in (ROOT / "data" / "convert_text.py", ROOT / "data" / "download_fineweb.py",
                 ROOT / "data" / "make_tiny.py", ROOT / "tests" / "conftest.py"):
        assert "20240520" not in path.read_text(), path
    assert convert_text.SHARD_MAGIC is tg.SHARD_MAGIC and convert_text.shard_token_count is tg.shard_token_count


def dataset_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_converter_failures_leave_the_old_dataset_intact(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Anna went to the farm on day {i}."}) + "\n" for i in range(6)))
    out = tmp_path / "set"
    tok = str(TINY / "tokenizer.model")
    assert convert_text.main([str(docs), "--tokenizer", tok, "--out", str(out), "--val-docs", "2"]) == 0
    before = dataset_files(out)
    assert json.loads(before[tg.TOKENIZER_RECORD])["sha256"] == TINY_SHA
    # a typo in the input path, then a bad line halfway through the input
    assert convert_text.main([str(tmp_path / "dcos.jsonl"), "--tokenizer", tok, "--out", str(out), "--val-docs", "2"]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(docs.read_text() * 100 + "not json\n" + docs.read_text())
    assert convert_text.main([str(bad), "--tokenizer", tok, "--out", str(out), "--val-docs", "2",
                              "--shard-tokens", "100"]) == 1
    assert dataset_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl", "set"]  # no build dir left


def test_offline_download_fails_in_one_line_without_the_hub_clients_retries(tmp_path, monkeypatch, capsys):
    import download_fineweb
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as good as offline
    # the hub client retries a dead connection for 25 s and ends in a 45-line traceback
    monkeypatch.setattr(download_fineweb, "_hf_download", lambda: pytest.fail("the hub client was called"))
    assert download_fineweb.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot reach 127.0.0.1:9")


def test_quickstart_is_iteration_bound_and_logs_progress_early():
    env = dict(line.split("=", 1) for line in (TINY / "quickstart.env").read_text().split())
    assert float(env["MAX_WALLCLOCK_SECONDS"]) == 0 and int(env["ITERATIONS"]) > 0
    assert int(env["TRAIN_LOG_EVERY"]) <= 5
    assert tg.Hyperparameters(env).iterations == int(env["ITERATIONS"])


def test_readme_troubleshooting_lists_the_start_up_errors():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1]
    for needle in ("exists: an earlier run used RUN_ID", "being written by a running process", "does not exist",
                   "is not the tokenizer", "is not an official tokenizer", "bad shard header magic",
                   "EVAL_ONLY artifact was trained with a different model", "did you mean", "cannot write",
                   "error: signal", "error: exception", "cannot reach"):
        assert needle in section, needle


# --- whole program -------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_data_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in tg.KNOB_BY_NAME}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DATA_PATH=./data/datasets/fineweb10B_sp8192 does not exist")
    assert "data/download_fineweb.py" in lines[0] and "data/tiny/quickstart.env" in lines[0]


@pytest.mark.slow
def test_rerun_with_the_same_run_id_keeps_the_first_log_and_eval_only_gets_its_own(tmp_path, tiny_env):
    d = tiny_dir(tmp_path / "data")
    convert_text.write_tokenizer_record(d, TINY / "tokenizer.model", 512)
    env = {k: v for k, v in tiny_env.items() if k != "ARTIFACT_PATH"}
    env["DATA_PATH"] = str(d)
    _, log = run_train(env, tmp_path)
    first = (tmp_path / "logs" / "tiny.txt").read_bytes()
    proc, _ = run_train(env, tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "error: logs/tiny.txt exists: an earlier run used RUN_ID=tiny; choose another RUN_ID or set LOG_OVERWRITE=1 "
        "to replace that log"]
    assert (tmp_path / "logs" / "tiny.txt").read_bytes() == first
    # issue 19: another run's ARTIFACT_PATH at this log replaced it; at this artifact, replaced it unasked
    artifact = (tmp_path / "logs" / "tiny.pgart").read_bytes()
    for run_id, path, message in (("other", "logs/tiny.txt", "exists and is not an artifact"),
                                  ("other2", "logs/tiny.pgart", "holds an earlier run's artifact")):
        proc, _ = run_train(dict(env, RUN_ID=run_id, ARTIFACT_PATH=path), tmp_path, check=False)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: ARTIFACT_PATH={path} {message}" + (
            "; it is never overwritten" if run_id == "other" else "; choose another ARTIFACT_PATH or set LOG_OVERWRITE=1 to replace it")]
    assert (tmp_path / "logs" / "tiny.txt").read_bytes() == first and (tmp_path / "logs" / "tiny.pgart").read_bytes() == artifact
    # EVAL_ONLY with nothing but the data and the artifact: shape, lengths and vocab come from it
    ev = {k: v for k, v in env.items() if k not in tg.MODEL_KNOBS and k != "RUN_ID"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=dict(ev, EVAL_ONLY="logs/tiny.pgart"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "logs" / "tiny.txt").read_bytes() == first
    [eval_log] = [p for p in (tmp_path / "logs").glob("tiny_eval_*.txt")]
    text = eval_log.read_text()
    for line in ("config TRAIN_SEQ_LEN:64 source:artifact", "config NUM_LAYERS:2 source:artifact",
                 "config VOCAB_SIZE:512 source:artifact", "config EVAL_SEQ_LEN:64 source:artifact"):
        assert line in text.splitlines(), line
    assert f"sha256:{TINY_SHA} checked:record,artifact" in text
    assert log_value(text, "final_roundtrip", "val_loss") == log_value(log, "final_roundtrip", "val_loss")


@pytest.mark.slow
def test_a_bad_later_train_shard_fails_before_the_first_step(tmp_path, tiny_env):
    d = tiny_dir(tmp_path / "data")
    write_shard(d / "fineweb_train_000001.bin", [1, 2, 3])
    corrupt_header(d / "fineweb_train_000001.bin")
    proc, log = run_train(dict(tiny_env, DATA_PATH=str(d)), tmp_path, check=False)
    assert proc.returncode != 0 and "step:" not in log.split("\ncode_end\n")[1]
    assert log.splitlines()[-1].startswith("error: ") and "fineweb_train_000001.bin: bad shard header magic" in log
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_out_of_range_ids_in_a_later_shard_stop_the_run_with_an_error_line(tmp_path, tiny_env):
    d = tmp_path / "data"
    d.mkdir()
    tokens = read_tokens(TINY / "fineweb_train_000000.bin")
    write_shard(d / "fineweb_train_000000.bin", tokens[:2000])
    write_shard(d / "fineweb_train_000001.bin", np.r_[tokens[:100], 600])  # read only after 2000 tokens of training
    write_shard(d / "fineweb_val_000000.bin", read_tokens(TINY / "fineweb_val_000000.bin")[:3001])
    proc, log = run_train(dict(tiny_env, DATA_PATH=str(d)), tmp_path, check=False)
    assert proc.returncode == 1 and "step:" not in log.split("\ncode_end\n")[1]  # refused before training
    assert log.splitlines()[-1] == f"error: {d / 'fineweb_train_000001.bin'}: token id 600 >= VOCAB_SIZE=512"
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_leaves_an_error_line_and_a_non_zero_exit(tmp_path, tiny_env):
    env = dict(tiny_env, ITERATIONS="100000", TRAIN_LOG_EVERY="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "tiny.txt"
    deadline = time.time() + 300
    while not (log.exists() and "\nstep:1/" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert log.read_text().splitlines()[-1] == "error: signal name:SIGTERM"
    assert proc.stderr.read().strip().splitlines()[-1] == "error: signal name:SIGTERM"
