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
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg
from conftest import TINY, TINY_ENV, make_args

HELPERS = Path(__file__).resolve().parent / "helpers"


def two_rank_run(helper, tmp_path, knobs=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(knobs or {})
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


@pytest.mark.parametrize("counts", [[2, 2, 2, 2, 1, 1, 1, 0], [1, 2], [1, 0], [5]])
def test_bank_shares_are_contiguous_cover_every_matrix_once(counts):
    n, world = sum(counts), len(counts)
    params = [torch.zeros(4, 2) for _ in range(n)]
    banks = [tg.MuonBank({}, params, r, world, counts) for r in range(world)]
    assert [b.hi - b.lo for b in banks] == counts
    assert [i for b in banks for i in range(b.lo, b.hi)] == list(range(n))
    # param i's update sits in the gathered slot of its owner's share
    assert banks[0].rows == [r * max(counts) + i - b.lo for r, b in enumerate(banks) for i in range(b.lo, b.hi)]


def test_muon_shares_balance_the_record_banks_over_eight_ranks():
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters({}))  # the record's shape: banks of 22, 22, 11 and 11 matrices
    banks = {}
    for m in model.modules():
        if isinstance(m, tg.CastedLinear) and m is not model.lm_head:  # Muon's matrices (build_optimizers)
            banks.setdefault(tuple(m.weight.shape), []).append(m.weight)
    sizes = [(len(ps), ps[0].numel() * min(ps[0].shape)) for ps in banks.values()]
    assert sorted(n for n, _ in sizes) == [11, 11, 22, 22]
    shares = tg.muon_shares(sizes, 8)
    assert all(sum(c) == n and max(c) == -(-n // 8) for c, (n, _) in zip(shares, sizes))  # no gather grows
    load = [sum(c[r] * cost for c, (_, cost) in zip(shares, sizes)) for r in range(8)]
    # within one of the largest matrices of each other (before: ranks 6-7 had 1/16 of rank 0's work)
    assert max(load) - min(load) <= max(cost for _, cost in sizes)


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


@pytest.mark.slow
def test_ranks_whose_clocks_disagree_switch_schedule_at_the_same_step(tmp_path):
    knobs = dict(TINY_ENV, DATA_PATH=str(TINY), TOKENIZER_PATH=str(TINY / "tokenizer.model"), ITERATIONS="1000",
                 MAX_WALLCLOCK_SECONDS="0.06", GPTQ_RESERVE_SECONDS="0", ENABLE_LOOPING_AT="0.3",
                 LATE_QAT_THRESHOLD="0.4", WARMDOWN_FRAC="0.8", TRAIN_LOG_EVERY="1000", TRAIN_SEQ_SCHEDULE="32@0.5,64@1")
    traces = two_rank_run("clock_dist.py", tmp_path, knobs)
    # rank 1's clock runs twice as fast as rank 0's; the ranks train with one schedule, the faster clock's
    assert traces[0] == traces[1]
    lrs, looping, qat, seq_len = zip(*traces[0])
    assert 10 < len(lrs) < 40 and lrs[0] > lrs[-1] and not looping[0] and looping[-1] and not qat[0] and qat[-1]
    assert seq_len[0] == 32 and seq_len[-1] == 64


# --- host syncs in hot loops --------------------------------------------------------------------


class DataDependentOps(TorchDispatchMode):
    """Records ops that make the host wait for the device: boolean indexing, nonzero, tensor reads."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        index_by_mask = func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if index_by_mask or func in (torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
                                     torch.ops.aten._local_scalar_dense.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_evaluation_batches_need_no_host_sync(monkeypatch):
    args = make_args(EVAL_SEQ_LEN=32, EVAL_BATCH_SEQS=2)
    tokens = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    ev = tg.Evaluator(tg.GPT(args).eval(), tokens, torch.ones(200, dtype=torch.int32), args,
                      tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None))
    made_on = []  # torch.tensor(list, device=cuda) copies from pageable memory: a host sync per batch
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made_on.append(k.get("device")) or real_tensor(*a, **k))
    with DataDependentOps() as ops:
        ev.score(tg.plan_windows(1, 199, 32, 16), 2)
    assert ops.seen == [] and set(made_on) == {None} and len(made_on) > 0
    assert int(ev.totals[1]) == 199


def test_loader_copies_from_pinned_memory_on_cuda(monkeypatch):
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: copies.append("pinned") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(("to", k.get("non_blocking"))) or t)
    args = make_args(GRAD_ACCUM_STEPS=2)
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"), False, False, None)
    micro = tg.TrainLoader(args, rt, 2).next_batch()
    assert copies == ["pinned", ("to", True)] and len(micro) == 2


def test_chunk_ttt_all_reduces_once_per_step(monkeypatch):
    args = make_args(EVAL_SEQ_LEN=32, TTT_BATCH_SEQS=2, TTT_PARAMS="all")
    torch.manual_seed(0)
    model = tg.GPT(args)
    params = tg.ttt_parameters(model, args)
    rt = tg.Runtime(0, 2, 0, torch.device("cpu"), False, False, None)
    reduced = []
    monkeypatch.setattr(rt, "all_reduce", lambda t, op=None: reduced.append(t.numel()) or t)
    opt = torch.optim.SGD(params, lr=0.0)
    tokens = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    tg.ttt_train_chunk(model, model.token_nll, tokens, 1, 128, params, opt, args, rt)
    assert reduced == [sum(p.numel() for p in params)] * 2  # 4 sequences, 2 per step


@pytest.mark.slow
def test_every_rank_primes_the_evaluation_graphs(tmp_path):
    knobs = dict(TINY_ENV, DATA_PATH=str(TINY), TOKENIZER_PATH=str(TINY / "tokenizer.model"), EVAL_SEQ_LEN="64",
                 EVAL_BATCH_SEQS="2", VAL_BATCH_SIZE="4096", TTT_ENABLED="0", TTT_CHUNK_TOKENS="64")
    counts = two_rank_run("prime_dist.py", tmp_path, knobs)
    # each rank primes the one evaluation graph (the artifact-like model shares it); the real
    # evaluations (3 batches per rank, the last one padded) compile nothing on either rank. Before:
    # the dummy stream's 2 windows made one batch, rank 0's, and rank 1 compiled while evaluating.
    assert counts == [[1, 0], [1, 0]]


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


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
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
