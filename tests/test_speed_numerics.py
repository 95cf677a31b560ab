"""Throughput changes keep the numerics (issue 13): banked Muon equals the per-matrix update, XSA by
broadcasting equals the repeat_interleave form, the stop decision needs no per-step tensor read and
is the same on every rank, and the FA4 backend is selected and called truthfully."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_args

HELPERS = Path(__file__).resolve().parent / "helpers"


def two_rank_run(helper, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HELPERS.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HELPERS / helper), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


# --- Muon banks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ns5", "polar"])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_batched_orthogonalize_equals_one_matrix_at_a_time(method, shape):
    G = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    stacked = tg.orthogonalize(G, 5, method)
    assert stacked.shape == G.shape
    for g, x in zip(G, stacked):
        # same fp32 ops per matrix; only the batched matmul's summation order may differ (~1e-7 relative
        # per product on entries of size <= 1.2, amplified by at most ~10x over five iterations)
        torch.testing.assert_close(x, tg.orthogonalize(g, 5, method), rtol=0, atol=1e-5)


def reference_muon(params, grads_per_step, lr, moms, wd, method, row_normalize):
    """The per-matrix Muon update (one orthogonalisation and one momentum buffer per matrix)."""
    ps = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for grads, mom in zip(grads_per_step, moms):
        for p, buf, grad in zip(ps, bufs, grads):
            buf.mul_(mom).add_(grad)
            g = grad + mom * buf
            if row_normalize:
                g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
            update = tg.orthogonalize(g, 5, method) * math.sqrt(max(1.0, p.size(0) / p.size(1)))
            p.mul_(1 - lr * wd).add_(update, alpha=-lr)
    return ps


SHAPES = [(16, 16), (8, 16), (16, 16), (64, 16), (16, 16), (16, 64), (8, 16), (16, 16)]


@pytest.mark.parametrize("method", ["ns5", "polar"])
@pytest.mark.parametrize("row_normalize", [True, False])
def test_banked_muon_equals_the_per_matrix_update(method, row_normalize):
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(3)]
    moms, lr, wd = [0.85, 0.9, 0.95], 0.05, 0.1
    expected = reference_muon(params, grads, lr, moms, wd, method, row_normalize)
    opt = tg.Muon(params, lr=lr, momentum=moms[0], steps=5, method=method, row_normalize=row_normalize, weight_decay=wd)
    assert sorted(len(b.params) for b in opt.banks) == [1, 1, 2, 4]
    for step_grads, mom in zip(grads, moms):
        opt.param_groups[0]["momentum"] = mom
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    for p, e, p0 in zip(params, expected, grads[0]):
        # updates are lr * O(1); batched vs single matmul rounding is ~1e-6 of that (see above)
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
        assert (p.detach() - e).abs().max() <= 1e-6 and not torch.equal(p.detach(), p0)


def test_muon_step_allocates_no_buffers_and_keeps_momentum_in_place(monkeypatch):
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]
    opt = tg.Muon(params, lr=0.05, momentum=0.9, steps=5, method="polar", row_normalize=True, weight_decay=0.1)
    ptrs = [opt.state[p]["momentum_buffer"].data_ptr() for p in params]
    calls = []
    for name in ("zeros", "zeros_like", "empty", "empty_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert calls == []
    assert [opt.state[p]["momentum_buffer"].data_ptr() for p in params] == ptrs
    # the first step's buffer is the gradient; after two steps it is g2 + 0.9 g1, i.e. nonzero
    assert all(opt.state[p]["momentum_buffer"].abs().max() > 0 for p in params)


@pytest.mark.parametrize("n, world, shares", [(11, 8, [2, 2, 2, 2, 2, 1, 0, 0]), (22, 8, [3] * 7 + [1]),
                                               (3, 2, [2, 1]), (1, 2, [1, 0]), (5, 1, [5])])
def test_bank_shares_are_contiguous_cover_every_matrix_once(n, world, shares):
    params = [torch.zeros(4, 2) for _ in range(n)]
    banks = [tg.MuonBank({}, params, r, world) for r in range(world)]
    assert [b.hi - b.lo for b in banks] == shares
    assert [i for b in banks for i in range(b.lo, b.hi)] == list(range(n))
    assert all(b.lo == min(n, r * b.chunk) for r, b in enumerate(banks))


# --- XSA ----------------------------------------------------------------------------------------


def xsa_by_repeat_interleave(y, v, groups):
    vhat = F.normalize(v, dim=-1).repeat_interleave(groups, dim=2)
    return y - (y * vhat).sum(-1, keepdim=True) * vhat


def test_xsa_broadcast_equals_the_repeat_interleave_form(monkeypatch):
    args = make_args(MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, ATTN_OUT_GATE=1)
    torch.manual_seed(0)
    attn = tg.Attention(args, xsa=True, backend="sdpa")
    for m in attn.modules():
        if isinstance(m, tg.CastedLinear):
            torch.nn.init.normal_(m.weight, std=0.3)
    x, ve = torch.randn(2, 12, 32), torch.randn(2, 12, 16)
    got = attn(x, ve, None)
    real = tg.attend
    monkeypatch.setattr(tg, "attend", lambda q, k, v, b, d: xsa_by_repeat_interleave(real(q, k, v, b, d), v, 2))
    attn.xsa = False
    want = attn(x, ve, None)
    # the same products and sums per element in the same order: equal up to fp32 rounding of O(1) values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.abs().max() > 0.1


# --- wallclock stop -----------------------------------------------------------------------------


def test_training_loop_reads_no_tensor_per_step(tmp_path, monkeypatch):
    reads = []  # .item() calls made by train_gpt.py itself (CPU AdamW reads its step counters too)
    real = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(sys._getframe(1).f_code.co_filename) or real(self))
    args = make_args(ITERATIONS=6, TRAIN_LOG_EVERY=100, MAX_WALLCLOCK_SECONDS=3600, GPTQ_RESERVE_SECONDS=0)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(tmp_path / "log.txt"))
    stats = tg.train(tg.GPT(args), args, rt, None, None)
    assert stats.steps == 6
    assert [f for f in reads if f == tg.__file__] == [tg.__file__]  # the loss of the one logged step (step 6); before: one stop-flag read per step too


def test_wallclock_cap_still_stops_after_the_first_step(tmp_path):
    args = make_args(ITERATIONS=50, MAX_WALLCLOCK_SECONDS=1.000001, GPTQ_RESERVE_SECONDS=1.0)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(tmp_path / "log.txt"))
    assert tg.train(tg.GPT(args), args, rt, None, None).steps == 1
    assert "stopping_early: wallclock_cap" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_ranks_that_disagree_on_the_clock_stop_after_the_same_step(tmp_path):
    verdicts = two_rank_run("stop_dist.py", tmp_path)
    # rank 0 is over budget from step 2, rank 1 from step 3: both stop at step 2
    assert verdicts == [[False, False, True, True, True, True]] * 2


# --- attention backends -------------------------------------------------------------------------


def test_fa4_is_an_error_without_cuda_or_without_the_package(monkeypatch):
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa4 needs a CUDA device"):
        tg.select_attention_backend("fa4", torch.device("cpu"))
    monkeypatch.setattr(tg, "load_flash_attention", lambda backend: None)
    with pytest.raises(tg.ConfigError, match="flash-attn-4"):
        tg.select_attention_backend("fa4", torch.device("cuda"))


@pytest.mark.parametrize("major, installed, want", [(9, {"fa3", "fa4", "fa2"}, ("fa3", "auto_hopper")),
                                                    (9, {"fa4", "fa2"}, ("fa4", "auto_fa3_unavailable")),
                                                    (10, {"fa3", "fa4"}, ("fa4", "auto_fa3_unavailable")),
                                                    (8, {"fa4", "fa2"}, ("fa2", "auto_fa3_unavailable")),
                                                    (8, {"fa4"}, ("sdpa", "auto_flash_attn_not_installed"))])
def test_auto_prefers_fa3_then_fa4_on_hopper_or_newer(monkeypatch, major, installed, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (major, 0))
    monkeypatch.setattr(tg, "load_flash_attention", lambda backend: object() if backend in installed else None)
    assert tg.select_attention_backend("auto", torch.device("cuda")) == want


def test_compiled_muon_equals_eager_muon():
    """The compiled orthogonalisation (used on CUDA) is the same function: compiled here on CPU."""
    g = torch.Generator().manual_seed(5)
    shapes = [(16, 8), (16, 8), (8, 16)]
    compiled = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in compiled]
    kw = dict(lr=0.05, momentum=0.9, steps=5, method="polar", row_normalize=True, weight_decay=0.1)
    opts = [tg.Muon(compiled, compile=True, **kw), tg.Muon(eager, **kw)]
    for _ in range(2):
        for p, q in zip(compiled, eager):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for p, q in zip(compiled, eager):  # fused kernels may reorder fp32 sums: ~1e-6 of updates of size lr
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
