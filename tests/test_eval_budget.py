"""The evaluation's time budget (TimeBudget) and phased TTT's plan: rates never taken from a first
call, one stop line, batches split across ranks by cost, finished rows not computed."""

import pytest
import torch

import train_gpt as tg
from test_export_eval import CPU, make_args, val_bytes, val_tokens
from test_phased_ttt import LENGTHS, setup, stream


class FakeClock:
    """time.perf_counter that moves only when told to, so budget arithmetic is exact."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(tg.time, "perf_counter", c)
    return c


def test_rates_leave_out_each_shapes_first_call(clock):
    budget = tg.TimeBudget(CPU, clock.now, 100.0, None)
    for shape, seconds, units in [("a", 90.0, 10), ("a", 2.0, 10), ("a", 4.0, 20), ("b", 50.0, 10)]:
        with budget.timed("train", shape, units):
            clock.now += seconds
    assert budget.seconds("train", 15) == 15 * 6.0 / 30  # the 90 s and 50 s first calls are left out
    assert budget.seconds("score", 15) == 0.0  # nothing measured yet: no prediction


def test_allows_until_the_limit_then_refuses_with_one_stop_line(clock, tmp_path):
    log = tmp_path / "log.txt"
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(log))
    budget = tg.eval_budget(rt, clock.now, make_args(EVAL_MAX_SECONDS=10), "phased_ttt")
    clock.now += 5
    assert budget.allows(4.0, "chunk:0") and budget.allows(5.0, "chunk:1")
    assert not budget.allows(5.5, "chunk:2", all_ranks=False)
    assert not budget.allows(0.0, "chunk:3")  # refused once, refused for good
    assert log.read_text() == "ttt_stopped_adapting phase:phased_ttt at:chunk:2 reason:eval_budget elapsed_s:5.0 limit_s:10\n"


def test_chunk_ttt_adapts_on_every_chunk_when_only_its_first_step_was_slow(clock, monkeypatch, tmp_path):
    """Issue 12: a first TTT step that compiled for 100 s made the guard stop after one chunk."""
    steps = []

    def fake_step(*a, **k):
        clock.now += 100.0 if not steps else 1.0
        steps.append(a[3])

    monkeypatch.setattr(tg, "ttt_train_chunk", fake_step)
    log = tmp_path / "log.txt"
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, str(log))
    args = make_args(TTT_ENABLED=1, TTT_CHUNK_TOKENS=128, EVAL_MAX_SECONDS=120)
    torch.manual_seed(0)
    tokens = val_tokens(1000)
    tg.evaluate_ttt(tg.GPT(args), tokens, val_bytes(tokens), args, rt, clock.now)
    assert steps == list(range(1, 1000 - 128, 128))  # every chunk but the last (1..999 in 8 chunks)
    assert not log.exists() or "ttt_stopped_adapting" not in log.read_text()


def plan_on(world, docs, **knobs):
    args = make_args(**dict(dict(EVAL_SEQ_LEN=48, PHASED_TTT_CHUNK_TOKENS=16, PHASED_TTT_DOCS_PER_BATCH=3), **knobs))
    return [tg.plan_phased_ttt(docs, args, tg.Runtime(r, world, r, torch.device("cpu"), False, False, None))
            for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_covers_every_document_once_same_batches_on_any_world_size_costs_balanced(world):
    docs = tg.document_spans(stream(LENGTHS * 3))
    cost = lambda batch: sum(tg.document_forward_tokens(d, 16, 48) for d in batch)
    plans = plan_on(world, docs, PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=12)
    one_rank = plan_on(1, docs, PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=12)[0]
    for k, (segment, _) in enumerate(one_rank):
        batches = [b for plan in plans for b in plan[k][1]]
        assert sorted(batches) == sorted(one_rank[k][1])  # the same batches whatever the world size
        assert sorted(d for b in batches for d in b) == sorted(segment)
        for b in batches:  # longest row first: the unfinished rows are a prefix
            assert [e - s for s, e in b] == sorted((e - s for s, e in b), reverse=True)
        loads = [sum(cost(b) for b in plan[k][1]) for plan in plans]
        assert max(loads) - min(loads) <= max(cost(b) for b in batches)  # greedy by cost
    assert [seg for seg, _ in one_rank] == [docs[:6], docs[6:12], docs[12:]]


def test_a_rank_does_not_start_with_all_its_longest_batches():
    docs = tg.document_spans(stream(list(range(1, 200, 7))))
    batches = plan_on(1, docs)[0][0][1]
    lengths = [b[0][1] - b[0][0] for b in batches]
    assert lengths[0] == max(lengths) and lengths[1] == min(lengths)  # long, short, long, short, ...
    assert sorted(lengths, reverse=True) != lengths


def test_finished_rows_are_not_computed(monkeypatch):
    args, model = setup(PHASED_TTT_DOCS_PER_BATCH=3)
    shapes = []
    nll = model.token_nll
    monkeypatch.setattr(model, "token_nll", lambda x, y: shapes.append(tuple(x.shape)) or nll(x, y))
    tokens = stream([100, 20, 10])  # documents of 5, 101, 21 and 11 targets
    tg.evaluate_phased_ttt(model, tokens, val_bytes(tokens), args, CPU, tg.time.perf_counter())
    # batch (101, 21, 11) in 16-token chunks, windows at most 48 tokens: 3 rows, then 2, then 1;
    # then batch (5,) in one chunk
    assert shapes == [(3, 16), (2, 32)] + [(1, 48)] * 5 + [(1, 16)]
