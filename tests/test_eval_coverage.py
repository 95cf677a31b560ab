"""Issue 19: every evaluation scores every validation target exactly once, for every knob
combination the run accepts; a combination that would not is refused before training."""

import itertools
import random
import time

import pytest
import torch

import train_gpt as tg
from test_export_eval import make_args, val_bytes
from test_phased_ttt import stream

# Knobs that change which windows, chunks, batches or documents an evaluation scores.
GRID = dict(
    EVAL_SEQ_LEN=[1, 16, 24, 400],
    EVAL_STRIDE=[0, 1, 5, 16, 24, 40],
    EVAL_BATCH_SEQS=[1, 4],
    VAL_BATCH_SIZE=[1, 48, 524288],
    TTT_CHUNK_TOKENS=[2, 7, 50, 1000],
    TTT_BATCH_SEQS=[1, 3],
        PHASED_TTT_CHUNK_TOKENS=[1, 7, 16, 40],
    PHASED_TTT_DOCS_PER_BATCH=[1, 3],
    PHASED_TTT_NUM_PHASES=[0, 2],
    PHASED_TTT_PREFIX_DOCS=[0, 1, 3, 100],
)


COMBINATIONS = 10


class RankRuntime(tg.Runtime):
    """Rank r of a simulated world: collectives are the identity, so each rank's share is seen alone."""

    def all_reduce(self, t, op=None):
        return t

    def host_max(self, values):
        return values


def combinations(n, seed=0):
    rng = random.Random(seed)
    keys = list(GRID)
    for _ in range(n):
        yield {k: rng.choice(GRID[k]) for k in keys}


def scored_counts(monkeypatch, evaluation, tokens, args, world):
    """How often each target was scored by `evaluation`, summed over the ranks of `world`."""
    counts = torch.zeros(len(tokens), dtype=torch.long)
    record = tg.Evaluator.record

    def counting(self, starts, y, mask, nll, token_losses):
        rows, cols = mask.nonzero(as_tuple=True)
        counts.index_add_(0, starts[rows] + cols + 1, torch.ones_like(rows))
        return record(self, starts, y, mask, nll, token_losses)

    monkeypatch.setattr(tg.Evaluator, "record", counting)
    for rank in range(world):
        rt = RankRuntime(rank, world, rank, torch.device("cpu"), False, False, None)
        torch.manual_seed(0)
        evaluation(tg.GPT(args), tokens, val_bytes(tokens), args, rt)
    monkeypatch.setattr(tg.Evaluator, "record", record)
    return counts


EVALUATIONS = {
    "roundtrip": lambda m, t, b, a, rt: tg.evaluate(m, t, b, a, rt, a.eval_seq_len),
    "sliding": lambda m, t, b, a, rt: tg.evaluate(m, t, b, a, rt, a.eval_stride) if 0 < a.eval_stride < a.eval_seq_len else None,
    "ttt": lambda m, t, b, a, rt: tg.evaluate_ttt(m, t, b, a, rt, time.perf_counter()),
    "phased_ttt": lambda m, t, b, a, rt: tg.evaluate_phased_ttt(m, t, b, a, rt, time.perf_counter()),
}


@pytest.mark.slow  # ~25 s: every evaluation (TTT, phased TTT) for each combination
@pytest.mark.parametrize("knobs", list(combinations(COMBINATIONS)), ids=lambda k: ",".join(f"{v}" for v in k.values()))
def test_every_accepted_knob_combination_scores_every_target_exactly_once(monkeypatch, knobs):
    try:
        args = make_args(**knobs, TTT_ENABLED=1, PHASED_TTT_ENABLED=1, TTT_LR=0.01, PHASED_TTT_LR=0.01)
    except tg.ConfigError:
        return  # refused before training: allowed
    tokens = stream([3, 20, 0, 30, 9])
    for name, evaluation in EVALUATIONS.items():
        if name == "sliding" and not 0 < args.eval_stride < args.eval_seq_len:
            continue
        counts = scored_counts(monkeypatch, evaluation, tokens, args, world=2)
        assert counts[0] == 0 and (counts[1:] == 1).all(), f"{name}: targets scored {counts.tolist()}"


@pytest.mark.parametrize("knobs, message", [
    (dict(EVAL_SEQ_LEN=16, EVAL_STRIDE=40), "EVAL_STRIDE=40 exceeds EVAL_SEQ_LEN=16"),
    (dict(EVAL_STRIDE=65), "EVAL_STRIDE=65 exceeds EVAL_SEQ_LEN=64"),  # EVAL_SEQ_LEN=0 means TRAIN_SEQ_LEN
])
def test_combinations_that_would_miss_targets_are_refused_in_one_line(knobs, message):
    with pytest.raises(tg.ConfigError, match=message):
        make_args(**knobs)


def test_the_grid_reaches_both_refused_and_accepted_combinations():
    """The property test above proves something only if it runs evaluations and meets a refusal."""
    accepted = 0
    for knobs in combinations(COMBINATIONS):
        try:
            make_args(**knobs)
            accepted += 1
        except tg.ConfigError as e:
            assert "EVAL_STRIDE" in str(e)
    assert COMBINATIONS // 2 <= accepted < COMBINATIONS
