"""Export (GPTQ, budget fitting, EVAL_ONLY) and evaluation (sliding, score-first TTT) behaviour."""

import copy
import os
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY, log_value, make_args, read_tokens, run_train

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)


def val_tokens(n):
    return torch.from_numpy(read_tokens(TINY / "fineweb_val_000000.bin")[:n].astype(np.int64))


def val_bytes(tokens):
    """LUT bytes of every target of tokens, as load_validation gives them for a plain tokenizer."""
    import sentencepiece as spm
    return tg.lut_val_bytes(tokens, tg.build_byte_luts(spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model")), 512))


# --- quantization -------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=g) * (torch.rand(128, generator=g) ** 4)  # few strong directions
    x_cal, x_test = torch.randn(4096, 128, generator=g) @ mix, torch.randn(2048, 128, generator=g) @ mix
    w = torch.randn(64, 128, generator=g) * 0.05
    H = x_cal.T @ x_cal
    for bits in (4, 5, 6):
        scale = tg.row_scales(w, bits, 6.0, False)
        rtn = tg.quantize_rtn(w, scale, bits) * scale
        gptq = tg.gptq_quantize(w, H, scale, bits, damp=0.01, block=32) * scale
        err = lambda wq: float(((x_test @ (w - wq).T) ** 2).mean())
        assert err(gptq) < 0.7 * err(rtn), (bits, err(gptq), err(rtn))


def test_gptq_with_identity_hessian_equals_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    scale = tg.row_scales(w, 6, 10.0, False)
    q = tg.gptq_quantize(w, torch.eye(64), scale, 6, damp=0.0, block=16)
    torch.testing.assert_close(q, tg.quantize_rtn(w, scale, 6))


def test_calibration_and_gptq_run_without_tf32_and_restore_the_flags(monkeypatch):
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen, real_gptq = [], tg.gptq_quantize
    monkeypatch.setattr(tg, "gptq_quantize", lambda *a: seen.append(flags()) or real_gptq(*a))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # as setup_runtime leaves them on CUDA
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    args = make_args(QUANT="gptq")
    torch.manual_seed(0)
    model = tg.GPT(args)
    model.blocks[0].mlp.register_forward_pre_hook(lambda m, inp: seen.append(flags()))
    hessians = tg.collect_hessians(model, [(torch.randint(0, 512, (2, 64)), None)], CPU)
    tg.quantize_model(model, args, hessians)
    assert len(seen) > 2 and set(seen) == {(False, False)}
    assert flags() == (True, True)


def salient_group_problem(start=64, g=64):
    """A 64 x 256 matrix whose inputs in columns [start, start + g) are 8x larger than the others'."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 256, generator=gen)
    x[:, start:start + g] *= 8
    return torch.randn(64, 256, generator=gen) * 0.05, x.T @ x


def test_awq_lite_keeps_the_salient_group_at_8_bits_and_lowers_the_hessian_weighted_error():
    args = make_args(QUANT="gptq", AWQ_LITE_GROUPS=1, AWQ_LITE_GROUP_SIZE=64)
    w, H = salient_group_problem()
    specs = {"m.weight": ("m", (4, 6.0)), "n.weight": ("n", (4, 6.0))}
    n_w, n_H = torch.randn(64, 256) * 0.01, torch.eye(256)  # a less salient matrix: never chosen
    assert tg.awq_lite_groups({"m.weight": w, "n.weight": n_w}, specs, {"m": H, "n": n_H}, args) == {"m.weight": 64}
    plain, err_plain = tg.quantize_tensor(w, H, 4, 6.0, args)
    awq, err_awq = tg.quantize_tensor(w, H, 4, 6.0, args, 64)
    a, b, s_hi = awq.awq
    assert (a, b) == (64, 128) and int(awq.q[:, a:b].abs().max()) > 7  # 8-bit values, beyond int4's range
    # act-order quantizes the salient columns first: their error is 8-bit rounding (plus what the group's
    # own earlier columns push onto the later ones), where plain GPTQ leaves int4-level errors
    group_err = lambda qt: float(((w - qt.dequantize())[:, a:b].abs() / s_hi).max())
    assert group_err(awq) <= 1.0 and group_err(plain) > 4
    assert err_awq < 0.5 * err_plain, (err_awq, err_plain)
    for pack in (False, True):  # the artifact stores and restores it exactly
        _, state = tg.deserialize_state(b"".join(tg.serialize_chunks({"m.weight": awq}, {}, pack)))
        torch.testing.assert_close(state["m.weight"], awq.dequantize(), rtol=0, atol=0)


def test_awq_lite_groups_are_counted_by_the_estimate_and_by_budget_fitting():
    on, off = make_args(AWQ_LITE_GROUPS=2, KEEP_FLOAT_NUMEL=0), make_args(AWQ_LITE_GROUPS=0, KEEP_FLOAT_NUMEL=0)
    model = tg.GPT(on)
    rows = [m.weight.size(0) for n, m in tg.quantizable_modules(model) if m.weight.size(1) >= 64]
    extra = tg.estimate_artifact_bytes(model, on, 0) - tg.estimate_artifact_bytes(model, off, 0)
    assert 0 < extra <= 2 * max(rows) * (64 * 8 / 8 + tg.SCALE_CODE_BYTES)
    qstate, errors = tg.quantize_model(model, on, {n: torch.eye(m.weight.size(1)) for n, m in tg.quantizable_modules(model)})
    protected = [k for k, v in qstate.items() if isinstance(v, tg.QTensor) and v.awq is not None]
    assert len(protected) == 2
    key = protected[0]
    errors = {k: (0.0 if k == key else 1e9) for k in errors}  # the protected tensor is the cheapest to lower
    w, (bits, clip) = model.state_dict()[key], tg.quant_spec(key[:-7], 1, on)
    per_value = (tg.estimate_quantized_bits(bits, clip) - tg.estimate_quantized_bits(bits - 1, clip)) / 8
    full, kept = w.numel() * per_value, (w.numel() - 64 * w.size(0)) * per_value
    excess = (full + kept) / 2 / 1.1  # covered by lowering it only if its group were lowered too
    plain = dict(qstate, **{key: tg.replace(qstate[key], awq=None)})
    assert len(tg.bits_to_lower(model, on, plain, errors, {}, excess)) == 1
    assert len(tg.bits_to_lower(model, on, qstate, errors, {}, excess)) == 2


@pytest.mark.parametrize("group", [0, 32])
def test_lqer_reduces_the_error_of_the_corrected_tensors(group):
    args = make_args(QUANT="rtn", MLP_BITS=3, ATTN_BITS=3, LQER_RANK=4, LQER_TOP_K=2, LQER_ASYM_GROUP=group)
    torch.manual_seed(0)
    model = tg.GPT(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with_lqer, errors = tg.quantize_model(model, args, {})
    args.lqer_rank = 0
    plain, _ = tg.quantize_model(model, args, {})
    state = model.state_dict()
    corrected = [k for k, v in with_lqer.items() if isinstance(v, tg.QTensor) and v.lqer is not None]
    assert sorted(corrected) == sorted(sorted(errors, key=errors.get)[-2:])
    for k in corrected:
        e_plain = (state[k] - plain[k].dequantize()).norm()
        e_lqer = (state[k] - with_lqer[k].dequantize()).norm()
        assert e_lqer < 0.95 * e_plain
        qa, sa, qb, sb = with_lqer[k].lqer
        if group:  # the records' asymmetric form: A int2 in [-2, 1] on one scale, B int4 on a scale per 32 values
            assert sa.numel() == 1 and -2 <= int(qa.min()) and int(qa.max()) <= 1
            # each group's largest value maps to about 7.5 steps: 7 or 8 in magnitude, -8 only when negative
            groups = qb.reshape(-1, 32)
            assert sb.numel() == groups.size(0) and -8 <= int(qb.min()) and int(qb.max()) <= 7
            assert bool((groups.abs().amax(1) >= 7).all())
        else:
            assert sa.numel() == sb.numel() == 4 and int(qa.abs().max()) == int(qb.abs().max()) == 7
    _, restored = tg.deserialize_state(b"".join(tg.serialize_chunks(with_lqer, {}, False)))
    for k in corrected:
        torch.testing.assert_close(restored[k], with_lqer[k].dequantize(), rtol=0, atol=0)


def test_budget_fitting_lowers_bits_until_the_artifact_fits(tmp_path):
    args = make_args(QUANT="rtn", LQER_RANK=0, KEEP_FLOAT_NUMEL=64, MODEL_DIM=64, MLP_BITS=8, ATTN_BITS=8, EMBED_BITS=8)
    torch.manual_seed(0)
    model = tg.GPT(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    log = tmp_path / "log.txt"
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(log))
    tg.export_artifact(model, args, rt, {}, 0, str(tmp_path / "full.pgart"))
    full = os.path.getsize(tmp_path / "full.pgart")
    args.artifact_budget = int(full * 0.75)
    tg.export_artifact(model, args, rt, {}, 1000, str(tmp_path / "fit.pgart"))
    assert 1000 + os.path.getsize(tmp_path / "fit.pgart") <= args.artifact_budget
    text = log.read_text()
    assert "budget_fit tensor:" in text
    meta, _ = tg.read_artifact(str(tmp_path / "fit.pgart"))
    assert min(meta["bits"].values()) < 8


# --- evaluation -----------------------------------------------------------------------------------


def naive_window_nll(model, tokens, windows):
    """Independent scorer: one forward per window, sum of the scored targets' NLL."""
    total, count = 0.0, 0
    for s, e, a in windows:
        with torch.no_grad():
            nll = model.token_nll(tokens[None, s:e], tokens[None, s + 1:e + 1])[0]
        total += float(nll[a - s - 1:].double().sum())
        count += e - a + 1
    return total, count


@pytest.mark.parametrize("stride", [64, 16, 5])
def test_sliding_eval_equals_an_independent_per_window_computation(stride):
    args = make_args(EVAL_BATCH_SEQS=3)
    torch.manual_seed(0)
    model = tg.GPT(args).eval()
    tokens = val_tokens(333)
    r = tg.evaluate(model, tokens, val_bytes(tokens), args, CPU, stride)
    total, count = naive_window_nll(model, tokens, tg.plan_windows(1, 332, 64, stride))
    assert r.tokens == count == 332
    assert r.nll == pytest.approx(total, rel=1e-6)


def ttt_setup(**overrides):
    args = make_args(**dict(dict(TTT_ENABLED=1, TTT_CHUNK_TOKENS=128, TTT_LR=0.05, EVAL_STRIDE=16, TTT_BATCH_SEQS=2), **overrides))
    torch.manual_seed(0)
    return args, tg.GPT(args)


def test_ttt_is_score_first_perturbing_the_future_leaves_past_losses_unchanged():
    args, model = ttt_setup()
    tokens = val_tokens(700)
    t = 300  # mid-chunk: chunk 2 covers targets 257..384
    losses = []
    for toks in (tokens, torch.cat([tokens[:t + 1], torch.randint(2, 512, (len(tokens) - t - 1,))])):
        out = torch.full((len(toks),), float("nan"), dtype=torch.float64)
        tg.evaluate_ttt(copy.deepcopy(model), toks, val_bytes(toks), args, CPU, eval_t0=time.perf_counter(), token_losses=out)
        losses.append(out)
    assert not torch.isnan(losses[0][1:]).any()
    torch.testing.assert_close(losses[0][1:t + 1], losses[1][1:t + 1], rtol=0, atol=0)
    assert not torch.allclose(losses[0][t + 1:], losses[1][t + 1:])


def test_ttt_with_zero_lr_equals_the_plain_sliding_score():
    args, model = ttt_setup(TTT_LR=0, TTT_CHUNK_TOKENS=64)
    tokens = val_tokens(555)
    ttt = tg.evaluate_ttt(copy.deepcopy(model), tokens, val_bytes(tokens), args, CPU, time.perf_counter())
    plain = tg.evaluate(model, tokens, val_bytes(tokens), args, CPU, 16)
    assert ttt.tokens == plain.tokens == 554
    assert ttt.val_loss == pytest.approx(plain.val_loss, abs=1e-6)


def test_ttt_adapts_and_improves_on_repetitive_text():
    args, model = ttt_setup(TTT_LR=0.02, TTT_EPOCHS=2)
    tokens = val_tokens(200).repeat(4)
    ttt = tg.evaluate_ttt(copy.deepcopy(model), tokens, val_bytes(tokens), args, CPU, time.perf_counter())
    plain = tg.evaluate(model, tokens, val_bytes(tokens), args, CPU, 16)
    assert ttt.tokens == plain.tokens and ttt.val_loss < plain.val_loss - 0.05


# --- whole-program runs -------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_only_reproduces_round_trip_on_one_and_two_ranks(tmp_path, tiny_env):
    tiny_env.update(EVAL_STRIDE="16")
    _, log = run_train(tiny_env, tmp_path)
    art = tiny_env["ARTIFACT_PATH"]
    env = {k: v for k, v in tiny_env.items() if k not in ("NUM_LAYERS", "MODEL_DIM")}
    env.update(EVAL_ONLY=art, RUN_ID="eval1")
    _, log1 = run_train(env, tmp_path)
    _, log2 = run_train(dict(env, RUN_ID="eval2"), tmp_path, nproc=2)
    assert "step:" not in log1.split("\ncode_end\n")[1]  # no training happened
    for label in ("final_roundtrip", "final_sliding"):
        ref = float(log_value(log, label, "val_loss"))
        assert float(log_value(log1, label, "val_loss")) == pytest.approx(ref, abs=1e-6)
        assert float(log_value(log2, label, "val_loss")) == pytest.approx(ref, abs=1e-6 if label == "final_sliding" else 1e-4)
    clash, _ = run_train(dict(env, RUN_ID="eval3", NUM_LAYERS="3"), tmp_path, check=False)
    assert clash.returncode != 0 and "NUM_LAYERS=3 (artifact: 2)" in clash.stderr


@pytest.mark.slow
def test_ttt_stops_adapting_at_the_eval_budget_but_scores_every_token(tmp_path, tiny_env):
    tiny_env.update(TTT_ENABLED="1", TTT_CHUNK_TOKENS="256", EVAL_MAX_SECONDS="0.001")
    _, log = run_train(tiny_env, tmp_path)
    assert "ttt_stopped_adapting phase:ttt at:chunk:0/" in log
    assert int(log_value(log, "final_ttt", "tokens")) == 3000
    assert log_value(log, "final_result", "val_loss") == log_value(log, "final_ttt", "val_loss")


def test_clip_search_never_does_worse_than_the_fixed_sdclip_per_row():
    w = torch.distributions.StudentT(3).sample((32, 128))
    fixed = tg.row_scales(w, 5, 12.0, False)
    searched = tg.row_scales(w, 5, 12.0, True)
    err = lambda s: (w - tg.quantize_rtn(w, s, 5) * s).square().sum(1)
    assert (err(searched) <= err(fixed) + 1e-6).all() and (err(searched) < err(fixed) - 1e-6).any()


def test_self_generated_calibration_is_model_text_from_bos():
    args = make_args(GPTQ_CALIBRATION="selfgen", GPTQ_CALIBRATION_BATCHES=2, TRAIN_SEQ_LEN=16)
    torch.manual_seed(0)
    model = tg.GPT(args)
    batches = tg.self_generated_batches(model, args, CPU, 2, 3)
    assert len(batches) == 2
    for ids, _ in batches:
        assert ids.shape == (3, 16) and (ids[:, 0] == tg.BOS_ID).all() and ids.max() < 512
    again = tg.self_generated_batches(model, args, CPU, 2, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    hess = tg.collect_hessians(model, batches, CPU)
    assert hess["blocks.0.attn.c_q"].shape == (32, 32) and "tok_emb" in hess
