"""Model features (issue 4): causality of every feature, BOS safety, document masking, XSA, the SDPA
path, and one test per env toggle proving it changes the parameter count / forward as documented."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import log_value, make_args, run_train


# Four layers, 4 query heads sharing 2 KV heads (head dim 8), every optional feature off.
BASE = dict(NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0,
            XSA_LAST_N=0, NUM_LOOPS=1, PARALLEL_RESIDUAL_START=-1, VE_DIM=0, ATTN_OUT_GATE=0, UNET_SKIPS=0,
            DOC_MASK=0, ROPE_DIMS=0)
HEAD_DIM = 8
FEATURES = {
    "smear_gate": dict(SMEAR_GATE=1, SMEAR_GATE_WIDTH=8),
    "bigram_hash": dict(BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=8),
    "xsa": dict(XSA_LAST_N=2),
    "depth_recurrence": dict(NUM_LOOPS=3, LOOP_START=1, LOOP_END=2),
    "parallel_residual": dict(PARALLEL_RESIDUAL_START=2, PARALLEL_RESIDUAL_LANES=1),
    "two_lane_residual": dict(PARALLEL_RESIDUAL_START=2, PARALLEL_RESIDUAL_LANES=2),
    "value_embeddings": dict(VE_DIM=8, VE_LAYERS="1,3"),
    "attn_out_gate": dict(ATTN_OUT_GATE=1, ATTN_GATE_WIDTH=8),
    "unet_skips": dict(UNET_SKIPS=1),
    "doc_mask": dict(DOC_MASK=1),
    "partial_rope": dict(ROPE_DIMS=4),
}
DOC2 = 13  # ids() puts BOS at 0 and at DOC2: two documents in every row
T = 24


def feature_env(features):
    env = dict(BASE)
    for f in features:
        env.update(FEATURES[f])
    return env


def randomized(model, seed=1, std=0.3):
    """Perturb every parameter so zero-initialised gates/projections are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def build(features=(), **extra):
    torch.manual_seed(0)
    model = randomized(tg.GPT(make_args(**dict(feature_env(features), **extra))))
    model.looping = "depth_recurrence" in features
    return model


def ids(seed=2, batch=2):
    x = torch.randint(2, 512, (batch, T), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = tg.BOS_ID
    x[:, DOC2] = tg.BOS_ID
    return x


@torch.no_grad()
def logits(model, x):
    return model.logits(model.hidden(x))


def switch_off(model, feature):
    """The same weights with one feature disabled at run time."""
    if feature == "smear_gate":
        model.smear = None
    elif feature == "bigram_hash":
        model.bigram = None
    elif feature == "xsa":
        for b in model.blocks:
            b.attn.xsa = False
    elif feature == "depth_recurrence":
        model.looping = False
    elif feature == "parallel_residual":
        for b in model.blocks:
            b.parallel = False
    elif feature == "two_lane_residual":
        model.lane_post = None
    elif feature == "value_embeddings":
        model.ve_layers = set()
    elif feature == "attn_out_gate":
        for b in model.blocks:
            b.attn.gate = None
    elif feature == "unet_skips":
        model.skip_weights = None
    elif feature == "doc_mask":
        model.args.doc_mask = False
    elif feature == "partial_rope":
        for b in model.blocks:
            b.attn.rotary = tg.Rotary(HEAD_DIM, 10000.0)


def perturbed(x, t):
    y = x.clone()
    y[:, t] = (y[:, t] - 2 + 7) % 510 + 2  # another non-BOS token
    return y


# --- causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [[f] for f in FEATURES] + [list(FEATURES)], ids=list(FEATURES) + ["all"])
def test_perturbing_a_token_changes_no_earlier_logit(features):
    model = build(features)
    x = ids()
    base = logits(model, x)
    for t in (1, 5, DOC2 - 1, DOC2 + 3, T - 1):
        out = logits(model, perturbed(x, t))
        assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
        # the perturbation reaches every later position of its own document (so this test can fail)
        end = DOC2 if t < DOC2 else T
        assert (out[:, t:end] - base[:, t:end]).abs().amax(dim=(0, 2)).min() > 1e-2
    if len(features) == 1:  # the feature is live: switching it off changes the output
        switch_off(model, features[0])
        assert (logits(model, x) - base).abs().max() > 1e-2


# --- BOS safety and document masking ------------------------------------------------------------


def block0_input(model, x):
    """The residual stream entering the first block (token embedding + BigramHash, norm, SmearGate)."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    try:
        logits(model, x)
    finally:
        hook.remove()
    return seen[0]


def test_previous_documents_last_token_never_reaches_the_next_document_through_smear_or_bigram(monkeypatch):
    model = build(["smear_gate", "bigram_hash"])
    x = ids()
    y = perturbed(x, DOC2 - 1)  # the last token of the first document
    with torch.no_grad():
        emb = lambda i: F.rms_norm(model.tok_emb(i) + model.bigram(i), (32,))
        smear_x, smear_y = model.smear(emb(x), x), model.smear(emb(y), y)
        big_x, big_y = model.bigram(x), model.bigram(y)
    assert torch.equal(model.bigram.bucket_ids(x)[:, DOC2], torch.full((2,), 63))  # the reserved bucket
    assert torch.equal(big_x[:, DOC2:], big_y[:, DOC2:])
    assert torch.equal(smear_x[:, DOC2:], smear_y[:, DOC2:])
    assert torch.equal(block0_input(model, x)[:, DOC2:], block0_input(model, y)[:, DOC2:])
    assert (block0_input(model, x)[:, DOC2 - 1] - block0_input(model, y)[:, DOC2 - 1]).abs().max() > 1e-2
    # If BOS were not special, both features would leak the previous token into the BOS position.
    monkeypatch.setattr(tg, "BOS_ID", 0)
    with torch.no_grad():
        assert (model.smear(emb(x), x)[:, DOC2] - model.smear(emb(y), y)[:, DOC2]).abs().max() > 1e-3
        assert (model.bigram(x)[:, DOC2] - model.bigram(y)[:, DOC2]).abs().max() > 1e-3


def test_with_doc_mask_a_document_does_not_depend_on_the_one_before_it():
    x = ids()
    other = x.clone()
    other[:, 1:DOC2] = torch.randint(2, 512, (2, DOC2 - 1), generator=torch.Generator().manual_seed(9))
    masked = build(list(FEATURES))  # every feature on, DOC_MASK included
    unmasked = build([f for f in FEATURES if f != "doc_mask"])
    a, b = logits(masked, x), logits(masked, other)
    assert torch.equal(a[:, DOC2:], b[:, DOC2:])
    assert (a[:, 1:DOC2] - b[:, 1:DOC2]).abs().max() > 1e-2
    a, b = logits(unmasked, x), logits(unmasked, other)
    assert (a[:, DOC2:] - b[:, DOC2:]).abs().amax(dim=(0, 2)).min() > 1e-3  # every position of doc 2 sees doc 1


def test_doc_mask_segments_follow_bos_tokens():
    """One SDPA mask (or one cu_seqlens for FlashAttention) per forward, the same in every layer."""
    model = build(["doc_mask"])
    calls, _ = capture_attention(model, ids())
    doc = torch.tensor([1] * DOC2 + [2] * (T - DOC2))
    expected = ((doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()).expand(2, 1, T, T)
    assert len(calls) == 4 and all(c[4] is calls[0][4] for c in calls) and torch.equal(calls[0][4], expected)
    cu = tg.document_segments(ids(), "fa3")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, DOC2, T, T + DOC2, 2 * T]  # documents, also cut at rows


# --- attention ----------------------------------------------------------------------------------


def naive_attention(q, k, v, doc_ids=None):
    """Explicit softmax attention; query head j reads KV head j // (H / Hkv)."""
    B, T_, H, D = q.shape
    group = H // k.size(2)
    out = torch.empty_like(q)
    allowed = torch.ones(T_, T_, dtype=torch.bool).tril()[None].expand(B, T_, T_)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    for j in range(H):
        kj, vj = k[:, :, j // group], v[:, :, j // group]
        scores = torch.einsum("btd,bsd->bts", q[:, :, j].double(), kj.double()) / math.sqrt(D)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, j] = torch.einsum("bts,bsd->btd", scores.softmax(-1), vj.double()).float()
    return out


def test_sdpa_attention_equals_naive_reference_with_and_without_doc_ids():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 20, 4, 8, generator=g)
    k, v = torch.randn(3, 20, 2, 8, generator=g), torch.randn(3, 20, 2, 8, generator=g)
    torch.testing.assert_close(tg.attend(q, k, v, "sdpa", None), naive_attention(q, k, v), rtol=0, atol=1e-5)
    x = torch.randint(2, 9, (3, 20), generator=g)
    x[0, [0, 7, 8]] = tg.BOS_ID
    x[1, [3, 15]] = tg.BOS_ID  # first document has no BOS
    doc_ids = torch.cumsum(x == tg.BOS_ID, dim=1)
    masked = tg.attend(q, k, v, "sdpa", tg.document_segments(x, "sdpa"))
    torch.testing.assert_close(masked, naive_attention(q, k, v, doc_ids), rtol=0, atol=1e-5)
    assert (masked[0, 7:] - naive_attention(q, k, v)[0, 7:]).abs().max() > 1e-2  # the mask matters


def capture_attention(model, x):
    """Per block: (q, k, v, attend output, doc_ids) and the input of attn.proj."""
    calls, proj_in = [], []
    real = tg.attend

    def spy(q, k, v, backend, doc_ids):
        y = real(q, k, v, backend, doc_ids)
        calls.append((q, k, v, y, doc_ids))
        return y

    hooks = [b.attn.proj.register_forward_pre_hook(lambda mod, a: proj_in.append(a[0])) for b in model.blocks]
    tg.attend = spy
    try:
        logits(model, x)
    finally:
        tg.attend = real
        for h in hooks:
            h.remove()
    return calls, proj_in


def test_xsa_output_is_orthogonal_to_each_heads_own_gqa_value():
    # value embeddings on the XSA layer: the excluded direction is the value actually attended to
    model = build(["xsa", "value_embeddings"])
    calls, proj_in = capture_attention(model, ids())
    for i, ((q, k, v, y, _), out) in enumerate(zip(calls, proj_in)):
        out = out.view_as(y)
        dots = torch.stack([(out[:, :, j] * v[:, :, j // 2]).sum(-1) for j in range(4)], dim=2)
        scale = torch.stack([y[:, :, j].norm(dim=-1) * v[:, :, j // 2].norm(dim=-1) for j in range(4)], dim=2)
        if model.blocks[i].attn.xsa:
            assert i >= 2
            assert (dots.abs() / scale).max() < 1e-5
            expected = torch.stack([y[:, :, j] - (y[:, :, j] * v[:, :, j // 2]).sum(-1, keepdim=True)
                                    * v[:, :, j // 2] / v[:, :, j // 2].square().sum(-1, keepdim=True)
                                    for j in range(4)], dim=2)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
            # position 0 attends only to itself: its whole output is its own value, projected away
            assert out[:, 0].abs().max() < 1e-5 and y[:, 0].abs().max() > 0.1
        else:
            assert i < 2
            assert torch.equal(out, y)
            assert (dots.abs() / scale).max() > 0.1


# --- one test per toggle ------------------------------------------------------------------------


def nparams(**env):
    return sum(p.numel() for p in tg.GPT(make_args(**dict(BASE, **env))).parameters())


def test_bigram_vocab_size_adds_table_projection_and_scale():
    assert nparams(BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=8) - nparams() == 64 * 8 + 8 * 32 + 1
    assert nparams(BIGRAM_VOCAB_SIZE=100, BIGRAM_DIM=16) - nparams() == 100 * 16 + 16 * 32 + 1


def test_smear_gate_adds_width_plus_one():
    assert nparams(SMEAR_GATE=1, SMEAR_GATE_WIDTH=12) - nparams() == 12 + 1
    assert nparams(SMEAR_GATE=1, SMEAR_GATE_WIDTH=5) - nparams() == 5 + 1


def test_attn_out_gate_adds_layers_times_heads_times_width():
    assert nparams(ATTN_OUT_GATE=1, ATTN_GATE_WIDTH=12) - nparams() == 4 * 4 * 12
    assert nparams(ATTN_OUT_GATE=1, ATTN_GATE_WIDTH=3, NUM_LAYERS=6) - nparams(NUM_LAYERS=6) == 6 * 4 * 3


def test_ve_dim_adds_vocab_table_and_projection_to_kv_width():
    kv_dim = 2 * HEAD_DIM
    assert nparams(VE_DIM=8, VE_LAYERS="3") - nparams() == 512 * 8 + 8 * kv_dim
    assert nparams(VE_DIM=4, VE_LAYERS="0,1,2") - nparams() == 512 * 4 + 4 * kv_dim


def test_unet_skips_add_weights_and_gates_per_encoder_layer():
    assert nparams(UNET_SKIPS=1) - nparams() == 2 * 2 * 32
    assert nparams(UNET_SKIPS=1, NUM_LAYERS=5) - nparams(NUM_LAYERS=5) == 2 * 2 * 32
    assert nparams(UNET_SKIPS=1, NUM_LAYERS=1) - nparams(NUM_LAYERS=1) == 0


def test_untied_embeddings_add_an_output_head():
    assert nparams(TIE_EMBEDDINGS=0) - nparams() == 512 * 32


def test_mlp_mult_sets_the_hidden_width():
    assert nparams(MLP_MULT=3) - nparams(MLP_MULT=2) == 4 * 2 * 32 * 32
    model = tg.GPT(make_args(**dict(BASE, MLP_MULT=1.5)))
    assert model.blocks[0].mlp.fc.weight.shape == (48, 32) and model.blocks[0].mlp.proj.weight.shape == (32, 48)


def test_num_loops_repeats_the_loop_layers_without_new_parameters():
    model = tg.GPT(make_args(**dict(BASE, NUM_LAYERS=8, NUM_LOOPS=3, LOOP_START=3, LOOP_END=5)))
    assert model.layer_order() == list(range(8))  # looping starts off
    model.looping = True
    assert model.layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7]
    assert nparams(NUM_LAYERS=8, NUM_LOOPS=3, LOOP_START=3, LOOP_END=5) == nparams(NUM_LAYERS=8)
    model = tg.GPT(make_args(**dict(BASE, NUM_LOOPS=1)))
    model.looping = True
    assert model.layer_order() == [0, 1, 2, 3]


def test_rope_dims_rotates_only_the_first_dims_by_the_documented_angles():
    rot = tg.Rotary(4, 10000.0)
    x = torch.randn(2, 9, 3, 8, generator=torch.Generator().manual_seed(0))
    y = rot(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    pos = torch.arange(9.0)[None, :, None, None]
    for i in range(2):  # channel i pairs with channel i + dims/2, angle t * base^(-2i/dims)
        theta = pos[..., 0] * 10000.0 ** (-2 * i / 4)
        z = torch.complex(x[..., i], x[..., i + 2]) * torch.exp(1j * theta)
        torch.testing.assert_close(y[..., i], z.real, rtol=0, atol=1e-5)
        torch.testing.assert_close(y[..., i + 2], z.imag, rtol=0, atol=1e-5)
    assert (y[:, 1:, :, :4] - x[:, 1:, :, :4]).abs().max() > 0.1
    assert tg.GPT(make_args(**dict(BASE, ROPE_DIMS=4))).blocks[0].attn.rotary.dims == 4
    assert tg.GPT(make_args(**dict(BASE, ROPE_DIMS=0))).blocks[0].attn.rotary.dims == HEAD_DIM


def attn_and_mlp_inputs(model, x):
    seen, hooks = {}, []

    def record(key):
        def hook(module, inputs):
            seen.setdefault(key, inputs[0])
        return hook

    for i, b in enumerate(model.blocks):
        hooks.append(b.attn.register_forward_pre_hook(record(("attn", i))))
        hooks.append(b.mlp.register_forward_pre_hook(record(("mlp", i))))
    try:
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("ln_scale", [1, 0])
def test_ln_scale_scales_each_blocks_norm_output_by_inverse_sqrt_depth(ln_scale):
    model = build(LN_SCALE=ln_scale)
    expected = [1 / math.sqrt(i + 1) if ln_scale else 1.0 for i in range(4)]
    assert [b.ln for b in model.blocks] == expected
    seen = attn_and_mlp_inputs(model, ids())
    for i in range(4):
        rms = seen[("attn", i)].square().mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, expected[i]), rtol=1e-4, atol=0)


def test_xsa_last_n_marks_exactly_the_last_n_blocks():
    for n in (0, 1, 3, 4):
        model = tg.GPT(make_args(**dict(BASE, XSA_LAST_N=n)))
        assert [b.attn.xsa for b in model.blocks] == [i >= 4 - n for i in range(4)]


def test_parallel_residual_start_makes_mlp_read_the_attention_input():
    for start in (-1, 0, 2):
        model = build(PARALLEL_RESIDUAL_START=start, PARALLEL_RESIDUAL_LANES=1)
        parallel = [start >= 0 and i >= start for i in range(4)]
        assert [b.parallel for b in model.blocks] == parallel
        seen = attn_and_mlp_inputs(model, ids())
        for i in range(4):
            same = torch.equal(seen[("attn", i)], seen[("mlp", i)])
            assert same == parallel[i], (start, i)


@pytest.mark.parametrize("act, slope", [("relu2", 0.0), ("leaky_relu2", 0.5), ("leaky_relu2", 0.25)])
def test_mlp_act_forward_values(act, slope):
    torch.manual_seed(0)
    mlp = tg.MLP(make_args(**dict(BASE, MLP_ACT=act, MLP_LEAKY_SLOPE=slope, MLP_MULT=2)))
    torch.nn.init.normal_(mlp.fc.weight, std=0.2)
    torch.nn.init.normal_(mlp.proj.weight, std=0.1)
    x = torch.randn(3, 5, 32)
    h = x @ mlp.fc.weight.T
    h = torch.where(h > 0, h, h * slope)
    expected = h.square() @ mlp.proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        if act == "leaky_relu2":  # differs from relu2 wherever a hidden unit is negative
            assert (mlp(x) - (x @ mlp.fc.weight.T).relu().square() @ mlp.proj.weight.T).abs().max() > 1e-2


def test_logit_softcap_bounds_logits():
    h = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    for cap in (30.0, 5.0):
        model = tg.GPT(make_args(**dict(BASE, LOGIT_SOFTCAP=cap)))
        with torch.no_grad():
            model.tok_emb.weight.normal_(0, 3.0)
            raw = h @ model.tok_emb.weight.T
            out = model.logits(h)
        assert raw.abs().max() > 2 * cap
        assert out.abs().max() <= cap and out.abs().max() > 0.95 * cap
        torch.testing.assert_close(out, cap * torch.tanh(raw / cap), rtol=1e-5, atol=1e-5)
    model = tg.GPT(make_args(**dict(BASE, LOGIT_SOFTCAP=0)))
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 3.0)
        torch.testing.assert_close(model.logits(h), h @ model.tok_emb.weight.T, rtol=1e-5, atol=1e-4)


def test_qk_gain_init_sets_the_query_scale():
    model = tg.GPT(make_args(**dict(BASE, QK_GAIN_INIT=2.5)))
    assert all(torch.equal(b.attn.q_gain, torch.full((4,), 2.5)) for b in model.blocks)
    calls, _ = capture_attention(model, ids())
    for q, k, v, y, _ in calls:  # q = rotary(rms_norm(q)) * gain: per-head RMS is the gain
        torch.testing.assert_close(q.square().mean(-1).sqrt(), torch.full(q.shape[:3], 2.5), rtol=1e-4, atol=0)
        torch.testing.assert_close(k.square().mean(-1).sqrt(), torch.ones(k.shape[:3]), rtol=1e-4, atol=0)


def test_attention_backend_on_cpu():
    cpu = torch.device("cpu")
    assert tg.select_attention_backend("auto", cpu) == ("sdpa", "no_cuda")
    assert tg.select_attention_backend("sdpa", cpu) == ("sdpa", "requested")
    for name in ("fa3", "fa2"):
        with pytest.raises(tg.ConfigError, match=f"ATTN_BACKEND={name} needs a CUDA device"):
            tg.select_attention_backend(name, cpu)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_with_every_feature_learns_and_round_trips(tmp_path, tiny_env):
    tiny_env.update(ITERATIONS="30", TRAIN_LOG_EVERY="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="8",
                    VE_LAYERS="0,1", DOC_MASK="1", QUANT="rtn")
    _, log = run_train(tiny_env, tmp_path)
    losses = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step:(\d+)/30 train_loss:(\S+)", log, re.M)}
    assert sorted(losses) == list(range(1, 31))
    assert losses[1] == pytest.approx(math.log(512), abs=0.3)  # untrained: about uniform
    assert max(losses[28], losses[29], losses[30]) < losses[1] - 3.0  # measured: 6.24 -> 2.3..2.6
    assert "looping_enabled step:15 " in log
    pre, post = (float(log_value(log, label, "val_bpb")) for label in ("final_prequant", "final_roundtrip"))
    assert abs(post - pre) < 0.05
    uniform_bpb = math.log2(512) * int(log_value(log, "final_prequant", "tokens")) \
        / int(log_value(log, "final_prequant", "bytes"))
    assert pre < 0.6 * uniform_bpb  # measured: 1.03 vs 2.69
