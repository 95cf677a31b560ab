"""The frontier's evaluation recipe (issue 20): context past the training length, short-document
chunks, per-token losses and causality of every evaluation, bounded phased-TTT memory."""

import copy
import types
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_args
from test_export_eval import CPU, naive_window_nll, val_bytes, val_tokens


@pytest.mark.parametrize("seq_len,stride", [(160, 64), (192, 96)])  # 2.5x TRAIN_SEQ_LEN=64 (#2135), 3x with half stride (#2014)
def test_evaluations_past_the_training_length_equal_one_forward_per_window(seq_len, stride):
    args = make_args(EVAL_SEQ_LEN=seq_len, EVAL_STRIDE=stride, EVAL_BATCH_SEQS=3, TTT_CHUNK_TOKENS=200)
    assert args.eval_seq_len > args.train_seq_len
    torch.manual_seed(0)
    model = tg.GPT(args).eval()
    tokens = val_tokens(700)
    for step in (seq_len, stride):
        windows = tg.plan_windows(1, len(tokens) - 1, seq_len, step)
        assert max(e - s for s, e, _ in windows) == seq_len
        r = tg.evaluate(model, tokens, val_bytes(tokens), args, CPU, step)
        total, count = naive_window_nll(model, tokens, windows)
        assert r.tokens == count == len(tokens) - 1 and r.nll == pytest.approx(total, rel=1e-5)
    # chunk TTT scores its first chunk before any update: equal to sliding on those targets
    first, _ = naive_window_nll(model, tokens, tg.plan_windows(1, 200, seq_len, stride))
    out = torch.full((len(tokens),), float("nan"), dtype=torch.float64)
    r = tg.evaluate_ttt(copy.deepcopy(model), tokens, val_bytes(tokens), args, CPU, time.perf_counter(), out)
    assert r.tokens == len(tokens) - 1 and not out[1:].isnan().any()
    assert float(out[1:201].sum()) == pytest.approx(first, rel=1e-5)


def test_rotary_scores_depend_only_on_relative_position_far_past_training():
    rot = tg.Rotary(16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    x = torch.zeros(1, 3072, 2, 16)
    for t, s in ((10, 0), (3071, 3061), (2600, 2590)):
        x[0, t, 0], x[0, s, 1] = q, k
    y = rot(x)
    near = y[0, 10, 0] @ y[0, 0, 1]
    for t, s in ((3071, 3061), (2600, 2590)):
        assert float(y[0, t, 0] @ y[0, s, 1]) == pytest.approx(float(near), abs=2e-3)


def test_short_documents_take_the_chunk_of_the_first_limit_that_holds_their_batch():
    args = make_args(PHASED_TTT_SHORT_CHUNKS="2000:24,256:8", PHASED_TTT_CHUNK_TOKENS=48, EVAL_SEQ_LEN=2560)
    chunk = lambda *lengths: tg.batch_chunk_tokens([(0, n) for n in lengths], args)
    assert (chunk(100), chunk(256, 3), chunk(257), chunk(2000, 1), chunk(2001, 5)) == (8, 8, 24, 24, 48)
    assert tg.batch_chunk_tokens([(0, 100)], make_args(PHASED_TTT_SHORT_CHUNKS="256:80", EVAL_SEQ_LEN=32)) == 32
    assert tg.batch_chunk_tokens([(0, 100)], make_args(PHASED_TTT_CHUNK_TOKENS=48)) == 48  # off by default (#2135)
    for bad in ("256-8", "256:8:1", "0:8", "a:b"):
        with pytest.raises(tg.ConfigError, match="PHASED_TTT_SHORT_CHUNKS"):
            make_args(PHASED_TTT_SHORT_CHUNKS=bad)


def test_short_document_batches_are_scored_and_stepped_in_their_own_chunks(monkeypatch):
    from test_phased_ttt import setup, stream
    args, model = setup(PHASED_TTT_DOCS_PER_BATCH=3, PHASED_TTT_SHORT_CHUNKS="10:4,50:8")
    shapes, nll = [], model.token_nll
    monkeypatch.setattr(model, "token_nll", lambda x, y: shapes.append(tuple(x.shape)) or nll(x, y))
    tokens = stream([100, 20, 10])  # documents of 5, 101, 21 and 11 targets
    out = torch.full((len(tokens),), float("nan"), dtype=torch.float64)
    r = tg.evaluate_phased_ttt(model, tokens, val_bytes(tokens), args, CPU, time.perf_counter(), out)
    # batch (101, 21, 11): longest > 50, 16-token chunks as before; batch (5,): 4-token chunks
    assert shapes == [(3, 16), (2, 32)] + [(1, 48)] * 5 + [(1, 4), (1, 8)]
    assert r.tokens == len(tokens) - 1 and not out[1:].isnan().any()


EVALUATIONS = {  # knobs -> the labels final_evaluations writes
    "chunk_ttt": (dict(TTT_ENABLED=1, TTT_CHUNK_TOKENS=96), ["final_roundtrip", "final_sliding", "final_ttt"]),
    "phased_ttt": (dict(PHASED_TTT_ENABLED=1, PHASED_TTT_PREFIX_DOCS=2, PHASED_TTT_SHORT_CHUNKS="40:8", PHASED_TTT_GLOBAL_CHUNK_TOKENS=32),
                   ["final_roundtrip", "final_sliding", "final_phased_ttt"]),
}


def context_model(args):
    """A seeded model whose zero-initialised projections are made nonzero, so that every loss
    depends on the whole context the model sees, not just the previous token."""
    torch.manual_seed(0)
    model = tg.GPT(args)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.1)
    return model


def token_loss_files(tmp_path, name, tokens, knobs):
    """{label: per-target losses} that final_evaluations writes with EVAL_TOKEN_LOSSES=1."""
    args = make_args(EVAL_TOKEN_LOSSES=1, EVAL_SEQ_LEN=48, EVAL_STRIDE=16, PHASED_TTT_CHUNK_TOKENS=16,
                     PHASED_TTT_DOCS_PER_BATCH=3, PHASED_TTT_LR=0.01, PHASED_TTT_GLOBAL_LR=0.05, TTT_LR=0.05, **knobs)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(tmp_path / f"{name}.txt"))
    tg.final_evaluations(context_model(args), tokens, val_bytes(tokens), args, rt, time.perf_counter())
    return {f.name.split(".")[1]: torch.from_numpy(np.fromfile(f, dtype=np.float32)) for f in tmp_path.glob(f"{name}.*.f32")}


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
@pytest.mark.parametrize("recipe", EVALUATIONS)
def test_token_losses_are_written_per_target_and_no_evaluation_looks_ahead(tmp_path, recipe):
    """Changing the tokens from position u on never changes the loss of any target t < u, in every
    evaluation (as the files written with EVAL_TOKEN_LOSSES show), for cuts inside the phased
    prefix and after it; and it does change later losses. (test_phased_ttt also merges all
    later documents into one.) The loss at t itself is of the token at t, so it may change."""
    knobs, labels = EVALUATIONS[recipe]
    tokens = val_tokens(300)
    ref = token_loss_files(tmp_path, "ref", tokens, knobs)
    assert sorted(ref) == sorted(labels)
    for label in labels:
        assert ref[label].shape == (len(tokens) - 1,) and (ref[label] > 0).all()  # every target, in order
    args = make_args(EVAL_SEQ_LEN=48)
    total = tg.evaluate(context_model(args), tokens, val_bytes(tokens), args, CPU, 48)
    assert not torch.allclose(ref["final_roundtrip"], ref["final_sliding"])  # context matters
    if recipe == "phased_ttt":
        assert "global_phases_trained:1" in (tmp_path / "ref.txt").read_text()
    # documents 0..179, 179..270 (the phased prefix), 270..299; global chunks of 32 targets so that a
    # global phase that trained past the prefix would train on the second cut's tokens
    for u in (97, 285):
        # new tokens, documents where they were: the same batches and shapes, so rounding is the same
        noise = torch.randint(2, 512, (len(tokens) - u,), generator=torch.Generator().manual_seed(u))
        later = torch.where(tokens[u:] == tg.BOS_ID, tokens[u:], noise)
        (tmp_path / str(u)).mkdir()
        out = token_loss_files(tmp_path / str(u), "cut", torch.cat([tokens[:u], later]), knobs)
        for label in labels:  # entry i is target i + 1
            torch.testing.assert_close(out[label][:u - 1], ref[label][:u - 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[label][u - 1:], ref[label][u - 1:])
    assert float(ref["final_roundtrip"].double().sum()) == pytest.approx(total.nll, rel=1e-5)


def test_chunked_loss_equals_the_unchunked_loss_and_its_gradients(monkeypatch):
    args = make_args(LOGIT_SOFTCAP=30)
    model = context_model(args)
    g = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, 512, (3, 52), generator=g), torch.randint(0, 512, (3, 52), generator=g)
    logits = model.logits(model.hidden(ids))  # the whole (B, T, vocab) at once
    full = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 52)
    full.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(tg, "LOSS_CHUNK_TOKENS", 16)  # 3 rows x 5 positions a slice: 10 and a ragged one
    shapes, logits_fn = [], model.logits
    monkeypatch.setattr(model, "logits", lambda h: shapes.append(tuple(h.shape)) or logits_fn(h))
    chunked = model.token_nll(ids, targets)
    assert shapes == [(3, 5, 32)] * 10 + [(3, 2, 32)]  # never more than 16 rows of logits
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    chunked.sum().backward()
    for p, grad in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.token_nll(ids, targets), full.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
def test_rows_per_forward_give_the_result_of_one_forward_per_chunk(monkeypatch):
    from test_phased_ttt import LENGTHS, run, setup, stream
    tokens = stream(LENGTHS)
    args, model = setup(PHASED_TTT_NUM_PHASES=0)
    ref, ref_losses = run(model, args, tokens)
    args, model = setup(PHASED_TTT_NUM_PHASES=0, PHASED_TTT_FORWARD_ROWS=2)
    shapes, nll = [], model.token_nll
    monkeypatch.setattr(model, "token_nll", lambda x, y: shapes.append(tuple(x.shape)) or nll(x, y))
    losses = torch.full((len(tokens),), float("nan"), dtype=torch.float64)
    r = tg.evaluate_phased_ttt(model, tokens, val_bytes(tokens), args, CPU, time.perf_counter(), losses)
    assert shapes[:2] == [(2, 16), (1, 16)]  # the first batch's 3 rows, adapting, in two forwards
    assert r.tokens == ref.tokens
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, equal_nan=True)  # rounding of other batch shapes


def test_rows_per_forward_on_cuda_follow_free_memory(monkeypatch):
    args = make_args(MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4, PHASED_TTT_DOCS_PER_BATCH=64)
    model = types.SimpleNamespace(layer_order=lambda: range(17))  # the record's 17 layer passes, unbuilt
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"), False, False, None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (75 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**30)
    per_row = 2560 * 17 * 512 * tg.ACTIVATION_BYTES  # ~1.5 GB at 2560 tokens
    assert tg.forward_rows(model, args, rt, 2560) == int(0.8 * 76 * 2**30) // per_row == 44
    assert tg.forward_rows(model, args, tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None), 2560) == 64
    assert tg.forward_rows(model, make_args(PHASED_TTT_FORWARD_ROWS=5), rt, 2560) == 5
