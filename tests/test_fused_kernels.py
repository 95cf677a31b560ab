"""FUSED_KERNELS: the Triton softcapped cross-entropy and LeakyReLU^2 MLP against the eager path,
forward and backward, fp32 and bf16, with sizes that leave every block's last tile partial. Without
CUDA they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); without
triton they skip."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_args

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def test_fused_kernels_choice_is_logged_truthfully(monkeypatch):
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: False)
    assert tg.fused_kernels_choice("0") == (False, "FUSED_KERNELS=0")
    monkeypatch.setattr(tg, "triton", None)
    assert tg.fused_kernels_choice("auto") == (False, "no_triton")
    with pytest.raises(tg.ConfigError, match="FUSED_KERNELS=1: no_triton"):
        tg.fused_kernels_choice("1")


@needs_triton
def test_fused_kernels_choice_with_triton(monkeypatch):
    import triton
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tg.fused_kernels_choice("auto") == (False, "no_cuda")
    with pytest.raises(tg.ConfigError, match="FUSED_KERNELS=1: no_cuda"):
        tg.fused_kernels_choice("1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tg.fused_kernels_choice("auto") == (False, "no_cuda")  # auto never picks the interpreter
    assert tg.fused_kernels_choice("1") == (True, f"triton_{triton.__version__}_interpreter")


def eager_ce(x, t, cap):
    z = x.float()
    return F.cross_entropy(cap * torch.tanh(z / cap) if cap else z, t, reduction="none")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_softcap_cross_entropy_matches_eager(dtype, cap):
    torch.manual_seed(0)
    n, v = 3, 1500  # blocks of 1024 columns: the second is partial
    scale = torch.tensor([[1.0], [25.0], [4.0]], device=DEV)  # near-linear, saturated, between
    x = (torch.randn(n, v, device=DEV) * scale).to(dtype).requires_grad_()
    t = torch.tensor([0, v - 1, 1030], device=DEV)  # first column, last column, inside the partial block
    g = torch.randn(n, device=DEV)
    loss = tg.SoftcapCrossEntropy.apply(x, t, cap)
    (grad,) = torch.autograd.grad(loss, x, g)
    ref = eager_ce(x, t, cap)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)  # bf16: 1 ulp
    torch.testing.assert_close(grad, ref_grad, **tol)


def eager_mlp(x, w1, w2, slope):
    return F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)


@needs_triton
@pytest.mark.parametrize("dtype,slope", [(torch.float32, 0.5), (torch.bfloat16, 0.5),
                                         pytest.param(torch.float32, 0.0, marks=pytest.mark.slow)])  # 0: relu2
def test_leaky_relu2_mlp_matches_eager(dtype, slope):
    torch.manual_seed(0)
    m, d, h = 130, 70, 150  # tiles of 128 x 128 x 64: two of each, the last partial, in both passes
    x = torch.randn(m, d, device=DEV)
    w1, w2 = torch.randn(h, d, device=DEV) / 8, torch.randn(d, h, device=DEV) / 12
    g = torch.randn(m, d, device=DEV)

    def run(fn, dt):
        ins = [a.to(dt).requires_grad_() for a in (x, w1, w2)]
        y = fn(*ins, slope)
        return [y, *torch.autograd.grad(y, ins, g.to(dt))]

    truth = run(eager_mlp, torch.float64)
    fused, eager = run(tg.LeakyReLU2MLP.apply, dtype), run(eager_mlp, dtype)
    for name, f, e, t in zip(("y", "dx", "dw1", "dw2"), fused, eager, truth):
        assert f.dtype == dtype, name
        err, eager_err = (f.double() - t).abs().max(), (e.double() - t).abs().max()
        # fp32: both near exact; bf16: no worse than eager bf16's own rounding (the fused path rounds less)
        assert err <= 3 * eager_err + 1e-5 * t.abs().max(), (name, err.item(), eager_err.item())


@needs_triton
def test_model_trains_through_fused_kernels(monkeypatch):
    calls = []
    for cls in (tg.SoftcapCrossEntropy, tg.LeakyReLU2MLP):
        monkeypatch.setattr(cls, "apply", (lambda f: lambda *a: calls.append(f.__self__.__name__) or f(*a))(cls.apply))
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    losses, grads = [], []
    for on in ("0", "1"):
        torch.manual_seed(1)
        model = tg.GPT(make_args(FUSED_KERNELS=on))
        for p in model.parameters():  # zero-initialised projections would leave the MLP's gradient 0
            torch.nn.init.normal_(p, std=0.05)
        loss = model(ids[:, :-1], ids[:, 1:])
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    # only the FUSED_KERNELS=1 model: its loss once, its MLP at every block applied (loops included)
    assert calls.count("SoftcapCrossEntropy") == 1 and calls.count("LeakyReLU2MLP") == len(list(model.layer_order())) > 1
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_triton
def test_gptq_calibration_sees_every_mlp_input_with_fused_kernels():
    """GPTQ's Hessians come from hooks on fc and proj, which the fused MLP bypasses: without grad
    (calibration, evaluation) the MLP stays eager, so the Hessians are those of FUSED_KERNELS=0."""
    ids = torch.randint(0, 512, (2, 16))
    hess = []
    for on in ("0", "1"):
        torch.manual_seed(1)
        model = tg.GPT(make_args(FUSED_KERNELS=on))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        hess.append(tg.collect_hessians(model, [(ids, None)], tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)))
    assert sorted(hess[1]) == sorted(hess[0]) and any(".mlp.fc" in k for k in hess[0])
    for k in hess[0]:
        torch.testing.assert_close(hess[1][k], hess[0][k])


@pytest.mark.slow
@needs_triton
def test_fused_kernels_compile_without_graph_breaks():
    """fullgraph=True fails on a graph break: the custom ops keep the kernels, and MLP.forward's
    autocast casts, inside one graph."""
    torch.manual_seed(0)
    mlp = tg.MLP(make_args(FUSED_KERNELS="1")).to(DEV)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, mlp.fc.weight.shape[1], device=DEV, requires_grad=True)
    t = torch.randint(0, x.shape[-1], (10,), device=DEV)

    def step(x):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return tg.SoftcapCrossEntropy.apply(mlp(x).view(10, -1), t, 30.0).mean()

    got, want = torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x)
    torch.testing.assert_close(got, want)
    params = [x, *mlp.parameters()]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
@needs_triton
def test_self_check_passes_the_real_kernels_and_names_a_broken_one(monkeypatch):
    """FUSED_KERNELS=auto trusts the kernels only after they match eager on this device: a kernel that
    raises, or computes something else, is reported (run() then logs a self_check_failed downgrade)."""
    assert tg.fused_kernels_fault(torch.device(DEV)) == ""

    def broken(*a):
        raise RuntimeError("no kernel image for this device")
    monkeypatch.setattr(tg.LeakyReLU2MLP, "apply", broken)
    assert tg.fused_kernels_fault(torch.device(DEV)) == "RuntimeError"
    monkeypatch.undo()
    monkeypatch.setattr(tg.SoftcapCrossEntropy, "apply", lambda x, t, cap: F.cross_entropy(x.float(), t, reduction="none") * 1.5)
    assert tg.fused_kernels_fault(torch.device(DEV)) == "mismatch_vs_eager"
