"""Core pipeline behaviour: config, data validation, byte accounting, coverage, export, end to end."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SCRIPT, SHARED, TINY, log_value, make_args, needs_shared, read_tokens, run_train, write_shard


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS='abc': expected an integer"),
    ({"MODEL_DIM": "-8"}, "MODEL_DIM='-8': must be a finite value >= 8"),
    ({"MODEL_DIM": "96", "NUM_HEADS": "5"}, "MODEL_DIM=96 is not divisible by NUM_HEADS=5"),
    ({"NUM_HEADS": "4", "NUM_KV_HEADS": "3"}, "NUM_HEADS=4 is not divisible by NUM_KV_HEADS=3"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast': expected a number"),
    ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS='yes': expected 0 or 1"),
    ({"COMPRESSOR": "gzip"}, "COMPRESSOR='gzip': expected one of zstd, brotli, lzma, rans, auto"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000 must be a multiple of TRAIN_SEQ_LEN=64"),
    ({"VE_DIM": "8", "VE_LAYERS": "0,7"}, "VE_LAYERS='0,7': layer indices must be in [0, NUM_LAYERS)"),
])
def test_malformed_env_value_names_the_variable(env, message):
    with pytest.raises(tg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_args(**env)


def test_misspelt_knob_warns_and_strict_env_refuses():
    args = make_args(NUM_LAYER="3", WARMDOWN_ITER="10", HOME_DIR="x")
    assert sorted(args.misspelt) == [("NUM_LAYER", "NUM_LAYERS"), ("WARMDOWN_ITER", "WARMDOWN_ITERS")]
    with pytest.raises(tg.ConfigError, match=r"unknown env var NUM_LAYER \(did you mean NUM_LAYERS\?\)"):
        make_args(NUM_LAYER="3", STRICT_ENV="1")


def test_resolved_config_logs_every_knob_with_its_source():
    lines = make_args(SEED="7").log_lines()
    assert len(lines) == len(tg.KNOBS)
    assert "config SEED:7 source:env" in lines
    assert "config QUANT:gptq source:default" in lines


def test_readme_knob_table_is_generated_from_hyperparameters():
    from knob_table import knob_table
    readme = (SCRIPT.parent / "README.md").read_text()
    assert knob_table() in readme, "README knob table is stale: run python tools/knob_table.py --write README.md"
    table = readme.split("<!-- knobs:begin -->")[1].split("<!-- knobs:end -->")[0]
    documented = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert documented == {k.name for k in tg.KNOBS}


# --- data ---------------------------------------------------------------------------------------


def test_shard_errors_name_the_file(tmp_path):
    good = tmp_path / "fineweb_val_000000.bin"
    write_shard(good, [1, 5, 6, 7])
    assert tg.shard_token_count(str(good)) == 4
    bad_magic = tmp_path / "bad_magic.bin"
    data = bytearray(good.read_bytes())
    data[0] ^= 0xFF
    bad_magic.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{bad_magic}: bad shard header magic"):
        tg.shard_token_count(str(bad_magic))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(ValueError, match=f"{truncated}: file is 1030 bytes but its header promises 4 tokens"):
        tg.shard_token_count(str(truncated))
    stub = tmp_path / "stub.bin"
    stub.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=f"{stub}: truncated shard"):
        tg.shard_token_count(str(stub))
    big_id = tmp_path / "big_id.bin"
    write_shard(big_id, [1, 600])
    with pytest.raises(ValueError, match=f"{big_id}: token id 600 >= VOCAB_SIZE=512"):
        tg.load_shard(str(big_id), 512)
    with pytest.raises(FileNotFoundError, match="no train shards match"):
        tg.shard_files(str(tmp_path), "train")


def test_tokenizer_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError, match="has vocab size 512 but VOCAB_SIZE=1024"):
        tg.load_tokenizer(str(TINY / "tokenizer.model"), 1024)


def test_token_stream_ranks_read_disjoint_spans_of_one_global_batch(tmp_path):
    tokens = np.arange(1, 400) % 500
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens[:150])
    write_shard(tmp_path / "fineweb_train_000001.bin", tokens[150:])
    single = tg.TokenStream(str(tmp_path), 512)
    streams = [tg.TokenStream(str(tmp_path), 512) for _ in range(3)]
    for _ in range(4):  # crosses the shard boundary
        whole = single.take(96, 0, 1)
        parts = [s.take(96, r, 3) for r, s in enumerate(streams)]
        assert len(whole) == 97 and all(len(p) == 33 for p in parts)
        for r, p in enumerate(parts):
            np.testing.assert_array_equal(p, whole[32 * r:32 * r + 33])


def test_seq_schedule_keeps_tokens_per_step_and_the_stream_when_the_length_changes():
    args = make_args(TRAIN_SEQ_SCHEDULE="16@0.1,32@0.7,64@1")
    assert args.seq_schedule == [(16, 0.1), (32, 0.7), (64, 1.0)]
    assert [tg.train_seq_len_at(args, p) for p in (0.0, 0.099, 0.1, 0.69, 0.7, 1.0)] == [16, 16, 32, 32, 64, 64]
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    switching, steady = tg.TrainLoader(args, rt, 2), tg.TrainLoader(args, rt, 2)
    for seq_len in (16, 32, 64, 16):  # a switch neither re-reads nor skips: the same tokens, reshaped
        got, ref = switching.next_batch(seq_len), steady.next_batch()
        assert [x.shape for x, _ in got] == [(1024 // seq_len // 2, seq_len)] * 2
        torch.testing.assert_close(torch.cat([x.reshape(-1) for x, _ in got]), torch.cat([x.reshape(-1) for x, _ in ref]))
        torch.testing.assert_close(torch.cat([y.reshape(-1) for _, y in got]), torch.cat([y.reshape(-1) for _, y in ref]))


@pytest.mark.parametrize("raw", ["16@0.5,32@1", "64@0.5,16@1", "16@0.7,64@0.5,64@1", "16,64@1", "16@0.5,64@0.9"])
def test_seq_schedule_must_rise_to_one_and_end_at_train_seq_len(raw):
    with pytest.raises(tg.ConfigError, match="TRAIN_SEQ_SCHEDULE"):
        make_args(TRAIN_SEQ_SCHEDULE=raw)  # TRAIN_SEQ_LEN=64


def test_seq_schedule_lengths_must_divide_the_micro_batch():
    args = make_args(TRAIN_SEQ_SCHEDULE="48@0.5,64@1")
    with pytest.raises(tg.ConfigError, match="sequence length 48"):
        tg.grad_accum_steps(args, tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None))


def test_warmup_primes_every_length_in_each_layer_order_with_at_least_a_step_each(monkeypatch):
    args = make_args(TRAIN_SEQ_SCHEDULE="16@0.1,32@0.7,64@1", WARMUP_STEPS=1, NUM_LOOPS=2)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    model, seen = tg.GPT(args), []
    monkeypatch.setattr(tg, "train_step", lambda fn, m, opts, batches, *a: seen.append((m.looping, batches[0][0].size(1))))
    tg.prime_compile(model, model, args, rt, tg.TrainLoader(args, rt, 1))
    assert seen == [(False, 16), (False, 32), (False, 64), (True, 16), (True, 32), (True, 64)] and not model.looping


def test_training_path_never_opens_a_validation_file(tmp_path, monkeypatch):
    args = make_args(ITERATIONS=2, GPTQ_CALIBRATION_BATCHES=1)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    opened = []
    real_memmap, real_fromfile, real_open = np.memmap, np.fromfile, open
    monkeypatch.setattr(np, "memmap", lambda path, *a, **k: opened.append(str(path)) or real_memmap(path, *a, **k))
    monkeypatch.setattr(np, "fromfile", lambda path, *a, **k: opened.append(str(path)) or real_fromfile(path, *a, **k))
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    model = tg.GPT(args)
    stats = tg.train(model, args, rt, None, None)
    tg.collect_hessians(model, tg.calibration_batches(model, args, rt, stats.loader), rt)
    assert any("fineweb_train_" in p for p in opened)
    assert not any("fineweb_val_" in p for p in opened)


# --- metric -------------------------------------------------------------------------------------


def lut_bytes_of_document(ids, luts):
    """Bytes the scorer assigns to the targets of one [BOS] + ids document."""
    seq = torch.tensor([tg.BOS_ID] + list(ids))
    return int(tg.target_bytes(seq[:-1], seq[1:], luts).sum())


def check_luts_against_decoded_text(tokenizer_path, texts):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    checked = 0
    for text in texts:
        ids = sp.encode(text)
        if sp.unk_id() in ids:
            continue  # the decoded text of an unknown piece is a placeholder, not the source bytes
        assert lut_bytes_of_document(ids, luts) == len(sp.decode(ids).encode("utf-8"))
        checked += 1
    return checked


def test_byte_luts_match_decoded_text_on_embedded_tokenizer():
    texts = ["the cat sat on the mat.", "Monday came before Tuesday, as always!", "  spaced   out  ", "x"]
    assert check_luts_against_decoded_text(TINY / "tokenizer.model", texts) >= 3


@needs_shared("tokenizers", "fineweb_1024_bpe.model")
@needs_shared("corpora", "english.jsonl")
def test_byte_luts_match_decoded_text_on_official_sp1024():
    import json
    with open(SHARED / "corpora" / "english.jsonl") as f:
        texts = [json.loads(next(f))["text"] for _ in range(200)]
    assert check_luts_against_decoded_text(SHARED / "tokenizers" / "fineweb_1024_bpe.model", texts) >= 50


def test_bpb_matches_independent_per_token_computation():
    """val_bpb = sum of per-token nats / ln 2 / sum of per-token bytes, checked token by token."""
    args = make_args()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    luts = tg.build_byte_luts(sp, 512)
    tokens = torch.from_numpy(read_tokens(TINY / "fineweb_val_000000.bin")[:300].astype(np.int64))
    torch.manual_seed(0)
    model = tg.GPT(args)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    r = tg.evaluate(model, tokens, tg.lut_val_bytes(tokens, luts), args, rt, 64)
    with torch.no_grad():
        nll = model.token_nll(tokens[None, :-1], tokens[None, 1:])[0]
    expected_bytes = sum(len(sp.id_to_piece(int(t)).replace("\u2581", " " if int(p) != tg.BOS_ID else "").encode())
                         for p, t in zip(tokens[:-1], tokens[1:]) if int(t) != tg.BOS_ID)
    assert r.tokens == 299 and r.bytes == expected_bytes
    # stride == seq_len windows see less context than one long forward, so compare the first window exactly
    first = tg.evaluate(model, tokens[:65], tg.lut_val_bytes(tokens[:65], luts), args, rt, 64)
    assert first.val_loss == pytest.approx(float(nll[:64].mean()), abs=1e-6)


@pytest.mark.parametrize("n", [2, 3, 64, 65, 128, 129, 1000, 1001])
@pytest.mark.parametrize("seq_len, stride", [(64, 64), (64, 16), (64, 1), (64, 63), (7, 3), (128, 64)])
def test_plan_scores_every_target_exactly_once(n, seq_len, stride):
    scored = []
    for s, e, a in tg.plan_windows(1, n - 1, seq_len, stride):
        assert 0 <= s < a <= e + 0 and e - s <= seq_len and e <= n - 1
        scored.extend(range(a, e + 1))
    assert sorted(scored) == list(range(1, n))
    assert len(scored) == n - 1


def test_sliding_windows_give_every_scored_token_enough_context():
    for s, e, a in tg.plan_windows(1, 999, 64, 16):
        assert a - s - 1 >= 64 - 16 or s == 0


# --- export -------------------------------------------------------------------------------------


def test_rtn_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in (8, 6, 5):
        scale = tg.row_scales(w, bits, 12.0, False)
        deq = tg.quantize_rtn(w, scale, bits) * scale
        qmax = 2 ** (bits - 1) - 1
        inside = w.abs() <= qmax * scale
        assert inside.float().mean() > 0.999
        assert ((w - deq).abs()[inside] <= scale.expand_as(w)[inside] / 2 + 1e-6).all()
    # int8, 12-sigma clip: uniform rounding error has RMS step/sqrt(12), step = 12 std / 127
    s8 = tg.row_scales(w, 8, 12.0, False)
    assert (w - tg.quantize_rtn(w, s8, 8) * s8).norm() / w.norm() < 1.05 * 12 / 127 / 12 ** 0.5


def test_bit_packing_is_lossless():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 7, 8):
        vals = rng.integers(0, 2 ** bits, size=1001).astype(np.uint8)
        packed = tg.pack_bits(vals, bits)
        assert len(packed) == -(-1001 * bits // 8)
        np.testing.assert_array_equal(tg.unpack_bits(packed, bits, 1001), vals)


def trained_artifact(tmp_path, **overrides):
    args = make_args(**overrides)
    torch.manual_seed(0)
    model = tg.GPT(args)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
    path = tmp_path / "m.pgart"
    tg.export_artifact(model, args, rt, {}, 0, str(path))
    return args, model, path


@pytest.mark.parametrize("comp", ["zstd", "brotli", "lzma", "rans"])
def test_artifact_round_trips_with_every_compressor(tmp_path, comp):
    args, model, path = trained_artifact(tmp_path, COMPRESSOR=comp, QUANT="rtn", LQER_RANK=0)
    meta, state = tg.read_artifact(str(path))
    assert meta["compressor"] == comp and meta["config"] == args.model_config()
    qstate, _ = tg.quantize_model(model, args, {})
    for k, v in qstate.items():
        expected = v.dequantize() if isinstance(v, tg.QTensor) else v.float()
        torch.testing.assert_close(state[k], expected, rtol=0, atol=0)


def test_corrupt_artifacts_give_specific_errors(tmp_path):
    _, _, path = trained_artifact(tmp_path)
    data = path.read_bytes()
    cases = {
        "flipped": (data[:-10] + bytes([data[-10] ^ 1]) + data[-9:], "checksum mismatch, the artifact is corrupt"),
        "truncated": (data[:-100], "truncated or padded artifact"),
        "magic": (b"X" + data[1:], "not a Parameter Golf artifact"),
        "version": (data[:8] + b"\x09\x00" + data[10:], "artifact format version 9"),
        "short": (data[:9], "truncated artifact header"),
    }
    for name, (blob, message) in cases.items():
        bad = tmp_path / f"{name}.pgart"
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            tg.read_artifact(str(bad))


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_tiny_run_logs_artifact_and_round_trips(tmp_path, tiny_env):
    _, log = run_train(tiny_env, tmp_path)
    for label in ("step:8/8 train_loss:", "attention_backend:sdpa", "fused_kernels:0 reason:no_", "model_params:",
                  "final_prequant ", "final_roundtrip ", "artifact ", "final_result ", "config NUM_LAYERS:2 source:env"):
        assert any(line.startswith(label) for line in log.splitlines()), label
    assert int(log_value(log, "final_roundtrip", "tokens")) == 3000
    pre, post = float(log_value(log, "final_prequant", "val_bpb")), float(log_value(log, "final_roundtrip", "val_bpb"))
    assert abs(post - pre) < 0.01
    art = Path(log_value(log, "artifact", "path"))
    code_bytes = os.path.getsize(SCRIPT)
    assert int(log_value(log, "artifact", "bytes_code")) == code_bytes
    assert int(log_value(log, "artifact", "bytes_model")) == os.path.getsize(art)
    assert int(log_value(log, "artifact", "bytes_total")) == code_bytes + os.path.getsize(art)
    assert log_value(log, "code", "code_sha256") == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()


@pytest.mark.slow
def test_every_token_scored_once_when_val_length_is_a_multiple_of_seq_len(tmp_path, tiny_env):
    write_shard(tmp_path / "fineweb_val_000000.bin", read_tokens(TINY / "fineweb_val_000000.bin")[:641])
    (tmp_path / "fineweb_train_000000.bin").symlink_to(TINY / "fineweb_train_000000.bin")
    tiny_env.update(DATA_PATH=str(tmp_path), ITERATIONS="2", EVAL_STRIDE="16")
    _, log = run_train(tiny_env, tmp_path)
    for label in ("final_prequant", "final_roundtrip", "final_sliding"):
        assert int(log_value(log, label, "tokens")) == 640


@pytest.mark.slow
def test_over_budget_artifact_is_saved_logged_and_fails(tmp_path, tiny_env):
    tiny_env.update(ARTIFACT_BUDGET="50000")
    proc, log = run_train(tiny_env, tmp_path, check=False)
    assert proc.returncode != 0
    assert Path(tiny_env["ARTIFACT_PATH"]).exists() and "final_result" in log
    assert log.splitlines()[-1].startswith("error: artifact_over_budget")  # the README's last-line rule


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, tiny_env):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _, log1 = run_train(dict(tiny_env, ARTIFACT_PATH=str(one / "m.pgart")), one, nproc=1)
    _, log2 = run_train(dict(tiny_env, ARTIFACT_PATH=str(two / "m.pgart")), two, nproc=2)
    assert "launch world_size:2" in log2
    l1, l2 = (float(log_value(log, "final_prequant", "val_loss")) for log in (log1, log2))
    assert abs(l1 - l2) < 1e-4


@pytest.mark.slow
def test_eight_ranks_match_one_process(tmp_path, tiny_env):
    """The record's world size: 2 training sequences per rank, Muon banks of 2 to 6 matrices shared
    unevenly (ranks with no share), evaluation batches on 2 of 8 ranks, one TTT sequence per rank."""
    tiny_env.update(MAX_WALLCLOCK_SECONDS="3600", GPTQ_RESERVE_SECONDS="0", TTT_ENABLED="1", TTT_CHUNK_TOKENS="512",
                    TTT_LR="0.02", PHASED_TTT_CHUNK_TOKENS="32", PHASED_TTT_DOCS_PER_BATCH="3",
                    PHASED_TTT_NUM_PHASES="2", PHASED_TTT_PREFIX_DOCS="8")
    one, eight = tmp_path / "one", tmp_path / "eight"
    one.mkdir(), eight.mkdir()
    env1, env8 = (dict(tiny_env, ARTIFACT_PATH=str(d / "m.pgart")) for d in (one, eight))
    _, train1 = run_train(env1, one)  # chunk TTT on its artifact
    _, train8 = run_train(dict(env8, PHASED_TTT_ENABLED="1"), eight, nproc=8)  # phased TTT on its artifact
    assert "launch world_size:8" in train8
    # Training: the same steps and schedule (the wallclock budget is agreed every step but never binds);
    # gradients are fp32 sums in another order (8 micro-batches accumulated vs 8 ranks all-reduced), a
    # ~1e-7 relative difference per step that 8 steps leave far below 1e-4 of the loss.
    assert log_value(train1, "train_total", "steps") == log_value(train8, "train_total", "steps") == 8
    for label in ("step", "final_prequant"):
        key = "train_loss" if label == "step" else "val_loss"
        assert float(log_value(train1, label, key)) == pytest.approx(float(log_value(train8, label, key)), abs=1e-4)
    # Evaluation of one artifact: every row and TTT gradient is computed alike on any world size and
    # summed in float64, so the printed 8 decimals agree (chunk TTT: 1-process artifact on 8 ranks;
    # phased TTT: 8-rank artifact on 1 process).
    _, eval8 = run_train(dict(env1, EVAL_ONLY=env1["ARTIFACT_PATH"], RUN_ID="eval8"), one, nproc=8)
    _, eval1 = run_train(dict(env8, EVAL_ONLY=env8["ARTIFACT_PATH"], RUN_ID="eval1", PHASED_TTT_ENABLED="1"), eight)
    for a, b, label in ((train1, eval8, "final_roundtrip"), (train1, eval8, "final_ttt"),
                        (train8, eval1, "final_phased_ttt")):
        assert float(log_value(b, label, "val_loss")) == pytest.approx(float(log_value(a, label, "val_loss")), abs=2e-8), label
