"""Optimizers, LR schedule, weight averaging and late QAT (issue 5)."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import make_args, run_train

HELPERS = Path(__file__).resolve().parent / "helpers"


def log_runtime(path):
    return tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(path))


# --- orthogonalisation --------------------------------------------------------------------------


def matrix_with_spectrum(rows, cols, cond, scale, seed):
    """U diag(s) V^T with singular values log-spaced from scale down to scale/cond."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return U @ torch.diag(torch.logspace(0, -math.log10(cond), k) * scale) @ V.T, U, V


# Measured on CPU fp32, 5 steps, condition number <= 100: NS5 singular values 0.68..1.15, Polar
# Express 0.86..1.15; for condition numbers 10 and 100 the mean |s - 1| is ~0.16-0.17 for NS5 and
# ~0.07-0.09 for Polar Express.
BOUNDS = {"ns5": (0.6, 1.25), "polar": (0.8, 1.2)}


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (40, 24)], ids=["square", "tall", "wide", "tall2"])
def test_orthogonalize_maps_matrices_to_near_orthogonal_polar_factor(shape):
    for seed, (cond, scale) in enumerate([(1, 1.0), (10, 37.0), (100, 0.01)]):
        G, U, V = matrix_with_spectrum(*shape, cond, scale, seed)
        dev = {}
        for method, (lo, hi) in BOUNDS.items():
            X = tg.orthogonalize(G, 5, method)
            assert X.shape == G.shape and X.dtype == G.dtype
            s = torch.linalg.svdvals(X)
            assert lo <= s.min() and s.max() <= hi, (method, cond, s.min(), s.max())
            # same singular vectors as G: U^T X V is diagonal
            core = U.T @ X @ V
            assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-4
            dev[method] = float((s - 1).abs().mean())
        if cond > 1:
            assert dev["polar"] < 0.11 and dev["ns5"] > 0.14, dev
    if shape[0] != shape[1]:  # random Gaussian tall/wide matrices are well conditioned too
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
        for method, (lo, hi) in BOUNDS.items():
            s = torch.linalg.svdvals(tg.orthogonalize(G, 5, method))
            assert lo <= s.min() and s.max() <= hi


def test_orthogonalize_more_polar_steps_do_not_blow_up():
    G, _, _ = matrix_with_spectrum(32, 32, 100, 1.0, 0)
    s = torch.linalg.svdvals(tg.orthogonalize(G, 8, "polar"))
    assert 0.8 <= s.min() and s.max() <= 1.2


# --- Muon ---------------------------------------------------------------------------------------


def spy_orthogonalize(monkeypatch):
    fed = []
    real = tg.orthogonalize
    monkeypatch.setattr(tg, "orthogonalize", lambda G, steps, method: fed.append(G.clone()) or real(G, steps, method))
    return fed


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_row_normalize_feeds_unit_rows_to_orthogonalize(monkeypatch, row_normalize):
    fed = spy_orthogonalize(monkeypatch)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 32, generator=g))
    p.grad = torch.randn(16, 32, generator=g) * torch.linspace(0.1, 10, 16)[:, None]
    tg.Muon([p], lr=0.1, momentum=0.9, steps=5, method="polar", row_normalize=row_normalize, weight_decay=0).step()
    (bank,) = fed  # a bank of one matrix
    assert bank.shape == (1, 16, 32)
    G = bank[0]
    nesterov = p.grad * 1.9  # first step: buffer = grad, fed = grad + momentum * buffer
    if row_normalize:
        torch.testing.assert_close(G.norm(dim=1), torch.ones(16), rtol=0, atol=1e-5)
        torch.testing.assert_close(G, nesterov / nesterov.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(G, nesterov, rtol=0, atol=1e-5)
        assert G.norm(dim=1).max() / G.norm(dim=1).min() > 50


@pytest.mark.parametrize("method", ["ns5", "polar"])
@pytest.mark.parametrize("shape, aspect_scale", [((64, 16), 2.0), ((16, 64), 1.0), ((24, 24), 1.0)])
@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_two_steps_match_hand_computation(method, shape, aspect_scale, row_normalize):
    lr, mom, wd = 0.02, 0.9, 0.1
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(*shape, generator=g)
    grads = [torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)]
    p = torch.nn.Parameter(p0.clone())
    opt = tg.Muon([p], lr=lr, momentum=mom, steps=5, method=method, row_normalize=row_normalize, weight_decay=wd)
    expected, buf = p0.clone(), torch.zeros(shape)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        buf = mom * buf + grad
        nesterov = grad + mom * buf
        if row_normalize:
            nesterov = nesterov / (nesterov.norm(dim=1, keepdim=True) + 1e-7)
        update = tg.orthogonalize(nesterov, 5, method) * aspect_scale
        expected = expected * (1 - lr * wd) - lr * update
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    assert (p.detach() - p0).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 8])  # 8: the record's world size, where some ranks own no matrix of a bank
def test_distributed_muon_equals_one_process(tmp_path, nproc):
    spec = importlib.util.spec_from_file_location("muon_dist", HELPERS / "muon_dist.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HELPERS.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(HELPERS / "muon_dist.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = helper.run(0, 1)
    initial = helper.make_params()
    for r in range(nproc):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert len(got) == len(single) == len(helper.SHAPES)
        for a, b, p0 in zip(got, single, initial):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert (a - p0).abs().max() > 1e-3


# --- schedule -----------------------------------------------------------------------------------


def test_training_progress_by_steps_and_by_wallclock_minus_gptq_reserve():
    a = make_args(ITERATIONS=100, MAX_WALLCLOCK_SECONDS=0)
    assert tg.training_progress(a, 25, 1e12) == 0.25
    assert tg.training_progress(a, 150, 0) == 1.0
    a = make_args(ITERATIONS=100, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=2)  # budget 8000 ms
    assert tg.training_progress(a, 10, 4000) == pytest.approx(0.5)
    assert tg.training_progress(a, 90, 4000) == pytest.approx(0.9)
    assert tg.training_progress(a, 1, 9000) == 1.0
    a = make_args(ITERATIONS=100, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=0)
    assert tg.training_progress(a, 10, 4000) == pytest.approx(0.4)


def test_warmdown_fraction_from_frac_iters_and_wallclock():
    assert tg.warmdown_fraction(make_args(WARMDOWN_ITERS=0, WARMDOWN_FRAC=0.3), 123.0) == 0.3
    a = make_args(WARMDOWN_ITERS=30, ITERATIONS=100, MAX_WALLCLOCK_SECONDS=0)
    assert tg.warmdown_fraction(a, 5.0) == pytest.approx(0.3)
    assert tg.warmdown_fraction(make_args(WARMDOWN_ITERS=30, ITERATIONS=20, MAX_WALLCLOCK_SECONDS=0), 5.0) == 1.0
    # wallclock-bound run: 30 steps of 100 ms out of a 10 s - 2 s reserve budget
    a = make_args(WARMDOWN_ITERS=30, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=2)
    assert tg.warmdown_fraction(a, 100.0) == pytest.approx(30 * 100 / 8000)
    assert tg.warmdown_fraction(a, 1000.0) == 1.0


def test_warmdown_iters_applies_to_an_iteration_bound_run_with_a_wallclock_cap():
    # 100 steps of 10 ms finish in 1 s, far inside the 592 s budget: the run ends by ITERATIONS,
    # so WARMDOWN_ITERS=50 must warm down over steps 50..100.
    a = make_args(ITERATIONS=100, WARMDOWN_ITERS=50, MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=8, MIN_LR=0.1)
    step, elapsed = 75, 750.0
    w = tg.warmdown_fraction(a, elapsed / step)
    assert w == pytest.approx(0.5)
    assert tg.lr_scale(a, step, tg.training_progress(a, step, elapsed), w) == pytest.approx(0.1 + 0.9 * 0.25 / 0.5)


def test_lr_scale_warmup_flat_warmdown_and_min_lr_floor():
    a = make_args(MIN_LR=0.1, LR_WARMUP_STEPS=0)
    assert tg.lr_scale(a, 0, 0.4, 0.5) == 1.0
    assert tg.lr_scale(a, 0, 0.5, 0.5) == 1.0
    assert tg.lr_scale(a, 0, 0.75, 0.5) == pytest.approx(0.1 + 0.9 * 0.25 / 0.5)
    assert tg.lr_scale(a, 0, 1.0, 0.5) == pytest.approx(0.1)
    assert tg.lr_scale(a, 0, 1.0, 0.0) == 1.0  # no warmdown
    assert tg.lr_scale(make_args(MIN_LR=0), 0, 1.0, 0.5) == 0.0
    a = make_args(MIN_LR=0.1, LR_WARMUP_STEPS=10)
    assert tg.lr_scale(a, 0, 0.0, 0.5) == pytest.approx(0.1)
    assert tg.lr_scale(a, 4, 0.0, 0.5) == pytest.approx(0.5)
    assert tg.lr_scale(a, 9, 0.0, 0.5) == 1.0
    assert tg.lr_scale(a, 4, 0.75, 0.5) == pytest.approx(0.55 * 0.5)


def train_log(tmp_path, **overrides):
    args = make_args(**overrides)
    torch.manual_seed(0)
    model = tg.GPT(args)
    if args.late_qat_threshold > 0:
        tg.setup_late_qat(model, args)
    rt = log_runtime(tmp_path / "log.txt")
    stats = tg.train(model, args, rt, None, None)
    return model, stats, (tmp_path / "log.txt").read_text()


def test_training_applies_the_scheduled_lr_each_step(tmp_path, monkeypatch):
    seen = []
    real_step = tg.Muon.step
    monkeypatch.setattr(tg.Muon, "step", lambda self: seen.append(self.param_groups[0]["lr"]) or real_step(self))
    train_log(tmp_path, ITERATIONS=8, LR_WARMUP_STEPS=2, WARMDOWN_FRAC=0.5, MIN_LR=0.2, MATRIX_LR=0.04)
    expected = [0.04 * tg.lr_scale(make_args(LR_WARMUP_STEPS=2, MIN_LR=0.2), s, s / 8, 0.5) for s in range(8)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen == pytest.approx([0.02, 0.04, 0.04, 0.04, 0.04, 0.04 * 0.8, 0.04 * 0.6, 0.04 * 0.4])


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
def test_late_qat_waits_for_the_warmdown_not_the_warmup(tmp_path):
    # warmdown over the last 85%: lr_scale(step 7) = 0.1 + 0.9 * 0.125 / 0.85 = 0.232 < 0.3 <= lr_scale(step 6)
    _, _, log = train_log(tmp_path, ITERATIONS=8, LR_WARMUP_STEPS=4, LATE_QAT_THRESHOLD=0.3)
    assert re.search(r"^late_qat_enabled step:(\d+)", log, re.M).group(1) == "7"


# --- weight averaging ---------------------------------------------------------------------------


def averaging_setup(**overrides):
    args = make_args(**overrides)
    torch.manual_seed(0)
    model = tg.GPT(args)
    w0 = model.tok_emb.weight.detach().clone()
    delta = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3))
    others = {k: v.clone() for k, v in model.state_dict().items() if k != "tok_emb.weight"}
    return args, model, w0, delta, others


def run_updates(model, averager, w0, delta, steps):
    """Set the embedding to w0 + k * delta before update k (k = 1..steps, progress k / steps)."""
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.tok_emb.weight.copy_(w0 + k * delta)
        averager.update(k, k / steps)


def ema_weights(decay, n):
    """Weights of the initial value and of update 1..n in the EMA, from the documented decay of the
    j-th update, min(EMA_DECAY, (1 + j) / (10 + j))."""
    d = [min(decay, (1 + j) / (10 + j)) for j in range(1, n + 1)]
    return math.prod(d), [(1 - d[j - 1]) * math.prod(d[j:]) for j in range(1, n + 1)]


@pytest.mark.parametrize("decay, every, steps", [(0.3, 1, 5), (0.9, 3, 7)])
def test_ema_equals_closed_form(tmp_path, decay, every, steps):
    args, model, w0, delta, others = averaging_setup(AVERAGING="ema", EMA_DECAY=decay, EMA_EVERY=every)
    av = tg.WeightAverager(model, args)
    run_updates(model, av, w0, delta, steps)
    updates = [k for k in range(1, steps + 1) if k % every == 0]
    c0, cs = ema_weights(decay, len(updates))
    assert c0 + sum(cs) == pytest.approx(1.0)
    expected = c0 * w0.double() + sum(c * (w0 + k * delta).double() for c, k in zip(cs, updates))
    assert av.apply(model, log_runtime(tmp_path / "log.txt")) == "ema"
    torch.testing.assert_close(model.tok_emb.weight.detach().double(), expected, rtol=0, atol=1e-5)
    for k, v in model.state_dict().items():
        if k != "tok_emb.weight":
            torch.testing.assert_close(v, others[k], rtol=0, atol=1e-6)
    n = len(updates)
    assert (tmp_path / "log.txt").read_text() == f"averaging exported:ema ema_updates:{n} swa_snapshots:0\n"


def test_ema_decay_warms_up_then_is_capped():
    args = make_args(AVERAGING="ema", EMA_DECAY=0.9965)
    av = tg.WeightAverager(tg.GPT(args), args)
    assert av.ema_decay(1) == pytest.approx(2 / 11)
    assert av.ema_decay(100) == pytest.approx(101 / 110)
    assert av.ema_decay(10 ** 6) == 0.9965


def test_swa_average_is_the_mean_of_the_snapshots(tmp_path):
    args, model, w0, delta, others = averaging_setup(AVERAGING="swa", SWA_EVERY=2, SWA_START_FRAC=0.5)
    av = tg.WeightAverager(model, args)
    run_updates(model, av, w0, delta, 8)  # snapshots at steps 4, 6, 8 (progress >= 0.5, even)
    assert av.apply(model, log_runtime(tmp_path / "log.txt")) == "swa"
    torch.testing.assert_close(model.tok_emb.weight.detach(), w0 + 6 * delta, rtol=0, atol=1e-5)
    assert (tmp_path / "log.txt").read_text() == "averaging exported:swa ema_updates:0 swa_snapshots:3\n"


def test_ema_plus_swa_averages_snapshots_of_the_ema(tmp_path):
    args, model, w0, delta, _ = averaging_setup(AVERAGING="ema+swa", EMA_DECAY=0.5, SWA_EVERY=2, SWA_START_FRAC=0.5)
    av = tg.WeightAverager(model, args)
    run_updates(model, av, w0, delta, 8)
    snaps = []
    for k in (4, 6, 8):  # the EMA right after update k
        c0, cs = ema_weights(0.5, k)
        snaps.append(c0 * w0.double() + sum(c * (w0 + j * delta).double() for j, c in enumerate(cs, 1)))
    assert av.apply(model, log_runtime(tmp_path / "log.txt")) == "ema+swa"
    torch.testing.assert_close(model.tok_emb.weight.detach().double(), sum(snaps) / 3, rtol=0, atol=1e-5)
    assert (tmp_path / "log.txt").read_text() == "averaging exported:ema+swa ema_updates:8 swa_snapshots:3\n"


@pytest.mark.parametrize("mode, used", [("swa", "none"), ("ema+swa", "ema")])
def test_swa_without_snapshot_warns_and_reports_what_was_exported(tmp_path, mode, used):
    args, model, w0, delta, _ = averaging_setup(AVERAGING=mode, EMA_DECAY=0.5, SWA_EVERY=2, SWA_START_FRAC=0.99)
    av = tg.WeightAverager(model, args)
    run_updates(model, av, w0, delta, 3)
    raw = model.tok_emb.weight.detach().clone()
    assert av.apply(model, log_runtime(tmp_path / "log.txt")) == used
    ema_n = 3 if "ema" in mode else 0
    assert (tmp_path / "log.txt").read_text().splitlines() == [
        f"warning: AVERAGING={mode} but no SWA snapshot was taken (SWA_START_FRAC not reached)",
        f"averaging exported:{used} ema_updates:{ema_n} swa_snapshots:0"]
    if used == "none":
        assert torch.equal(model.tok_emb.weight.detach(), raw)
    else:
        c0, cs = ema_weights(0.5, 3)
        expected = c0 * w0 + sum(c * (w0 + k * delta) for k, c in enumerate(cs, 1))
        torch.testing.assert_close(model.tok_emb.weight.detach(), expected, rtol=0, atol=1e-5)


# --- late QAT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_search", [False, True])
def test_fake_quantize_forward_is_the_export_value_and_gradient_is_identity(clip_search):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g, requires_grad=True)
    upstream = torch.randn(16, 64, generator=g)
    out = tg.fake_quantize(w, 6, 12.0, clip_search, torch.tensor(1.0))
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    s = tg.row_scales(w.detach(), 6, 12.0, clip_search)
    dq = tg.quantize_rtn(w.detach(), s, 6) * s
    torch.testing.assert_close(out.detach(), dq, rtol=0, atol=1e-6)
    assert (dq - w.detach()).abs().max() > 1e-3
    assert torch.equal(tg.fake_quantize(w, 6, 12.0, clip_search, torch.tensor(0.0)).detach(), w.detach())


def qat_model(**overrides):
    args = make_args(LATE_QAT_THRESHOLD=0.5, QUANT="rtn", LQER_RANK=0, BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=8,
                     VE_DIM=8, VE_LAYERS="1", **overrides)
    torch.manual_seed(0)
    model = tg.GPT(args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # live gates; fp16-exact so tensors the export keeps in fp16 match too
            p.copy_((p + 0.1 * torch.randn(p.shape, generator=g)).half().float())
    return args, model


@pytest.mark.parametrize("tie", [1, 0])
def test_late_qat_forward_equals_the_exported_model_forward(tie):
    args, model = qat_model(TIE_EMBEDDINGS=tie)
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    x[:, 0] = tg.BOS_ID
    with torch.no_grad():
        float_logits = model.logits(model.hidden(x))
    tg.setup_late_qat(model, args)
    with torch.no_grad():
        assert torch.equal(model.logits(model.hidden(x)), float_logits)  # set up but off: the float forward
        tg.set_late_qat(model, True)
        qat_logits = model.logits(model.hidden(x))
    qstate, _ = tg.quantize_model(model, args, {})
    quantized = {k for k, v in qstate.items() if isinstance(v, tg.QTensor)}
    assert "tok_emb.weight" in quantized and "bigram.emb.weight" in quantized
    assert ("lm_head.weight" in quantized) == (not tie)
    assert len(quantized) >= 14
    exported = tg.GPT(args)
    exported.load_state_dict({k: v.dequantize() if isinstance(v, tg.QTensor) else v.float() for k, v in qstate.items()})
    with torch.no_grad():
        export_logits = exported.logits(exported.hidden(x))
    torch.testing.assert_close(qat_logits, export_logits, rtol=0, atol=1e-5)
    assert (qat_logits - float_logits).abs().max() > 1e-3
    tg.set_late_qat(model, False)
    with torch.no_grad():
        assert torch.equal(model.logits(model.hidden(x)), float_logits)


@pytest.mark.slow
def test_end_to_end_late_qat_switches_on_in_warmdown_and_ema_is_exported(tmp_path, tiny_env):
    # lr_scale(step) = 0.1 + 0.9 * (1 - step/8) / 0.85 in the warmdown: first below 0.5 at step 5
    tiny_env.update(LATE_QAT_THRESHOLD="0.5", AVERAGING="ema", EMA_DECAY="0.9", QUANT="rtn")
    _, log = run_train(tiny_env, tmp_path)
    assert re.findall(r"^late_qat_enabled .*", log, re.M) == ["late_qat_enabled step:5 lr_scale:0.4971"]
    assert re.findall(r"^averaging exported:.*", log, re.M) == ["averaging exported:ema ema_updates:8 swa_snapshots:0"]
