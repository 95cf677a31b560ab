"""Depth recurrence (issue 24): the U-Net skips follow the layer order as run (looped or not), as in
the 1.0810/1.0611 records, so turning looping on mid-training does not make the loss jump."""

import statistics

import torch

import train_gpt as tg
from conftest import make_args

CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None, muted=True)
# Six layers with 2..3 looped three times: plain order 0..5 (3 encoder positions), looped order
# 0,1,2,3,2,3,2,3,4,5 (5 encoder positions), parallel residuals from layer 4.
LOOPED = dict(NUM_LAYERS=6, LOOP_START=2, LOOP_END=3, NUM_LOOPS=3, XSA_LAST_N=6, PARALLEL_RESIDUAL_START=4)


def test_skips_are_sized_by_the_looped_order_and_exist_before_looping_turns_on():
    model = tg.GPT(make_args(**LOOPED))
    assert model.layer_order() == list(range(6))
    assert model.layer_order(looping=True) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert model.skip_weights.shape == model.skip_gates.shape == (5, 32)
    assert tg.GPT(make_args(**dict(LOOPED, NUM_LOOPS=1))).skip_weights.shape == (3, 32)


def reference_hidden(model, ids):
    """The records' wiring written out: encoder positions push their output, decoder position k
    pops the latest and blends x = lerp(w_k * skip, x, sigmoid(g_k)) before its block."""
    x = tg.rms_norm(model.tok_emb(ids))
    if model.smear is not None:
        x = model.smear(x, ids)
    x0, order = x, model.layer_order()
    enc, skips = len(order) // 2, []
    for pos, i in enumerate(order):
        if pos >= enc and skips:
            k = pos - enc
            g = torch.sigmoid(model.skip_gates[k])
            x = g * x + (1 - g) * model.skip_weights[k] * skips.pop()
        x = model.blocks[i](x, x0, None, None)
        if pos < enc:
            skips.append(x)
    return tg.rms_norm(x)


def test_hidden_pairs_each_decoder_position_with_the_mirrored_encoder_position_in_both_orders():
    torch.manual_seed(0)
    model = tg.GPT(make_args(**LOOPED))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    for looping in (False, True):
        model.looping = looping
        with torch.no_grad():
            torch.testing.assert_close(model.hidden(ids), reference_hidden(model, ids), rtol=1e-5, atol=1e-5)


def loss_curve_through_the_loop_switch(monkeypatch, **env):
    """Train with tg.train, looping switching on at step 12 of 14; before every step, the loss of
    one fixed training batch in the layer order that step trains (a curve without batch noise)."""
    args = make_args(**dict(LOOPED, MODEL_DIM=32, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=512, GRAD_ACCUM_STEPS=1,
                            ITERATIONS=14, ENABLE_LOOPING_AT=0.85, WARMDOWN_FRAC=0, TRAIN_LOG_EVERY=100), **env)
    torch.manual_seed(args.seed)
    model = tg.GPT(args, "sdpa")
    fixed = tg.TrainLoader(args, CPU, 1).next_batch()[0]
    curve, step = [], tg.train_step

    def probed_step(model_fn, model, *rest):
        with torch.no_grad():
            curve.append((model.looping, model(*fixed).item()))
        return step(model_fn, model, *rest)

    monkeypatch.setattr(tg, "train_step", probed_step)
    tg.train(model, args, CPU, None, None)
    return curve


def test_train_loss_does_not_jump_when_looping_turns_on(monkeypatch):
    curve = loss_curve_through_the_loop_switch(monkeypatch)
    switch = [looped for looped, _ in curve].index(True)
    assert switch == 12 and all(looped for looped, _ in curve[switch:])
    loss = [v for _, v in curve]
    # Step-to-step changes of the 5 steps before the switch: the switch may change the loss by at
    # most their largest plus their spread (measured: old wiring +0.16, new -0.13, before -0.08..-0.16)
    before = [loss[i] - loss[i - 1] for i in range(switch - 5, switch)]
    allowed = max(before) + (max(before) - min(before))
    jump = loss[switch] - loss[switch - 1]
    assert jump <= allowed, f"loss jumped by {jump:+.3f} at the loop switch (before: {before}, allowed {allowed:+.3f})"
    assert statistics.mean(loss[switch:]) < loss[switch - 1]
