"""torch.compile on CPU (issues 4 and 12): a full tiny run with COMPILE=1 AUTOCAST=bf16 through the
depth-recurrence switch, the late-QAT switch, sliding evaluation and TTT compiles every graph before
the training clock starts and recompiles only where the design expects.

Expected recompilations (3), all in the warm-up (prime_compile), and why:
  forward    x1  looping False -> True (`self.looping` guard): a different layer order is a different
                 graph, run during WARMUP_STEPS, before the "warmup steps:" line; the timed training
                 loop (looping_enabled, late_qat_enabled) recompiles nothing: the late-QAT switch is
                 a tensor (qat_alpha), not a Python attribute.
  token_nll  x1  the artifact model carries no fake-quantizers (`.qat` guard): its graph differs from
                 the training model's; warmed on a fresh model built like the artifact's.
  token_nll  x1  TTT trains (grad_mode on) after scoring under no_grad; warmed by a TTT pass over a
                 dummy stream.
Evaluation batches all have EVAL_BATCH_SEQS rows (VAL_BATCH_SIZE is set to the same 32 sequences,
the short last batch is padded) and every TTT backward is one sequence, so standard, sliding and TTT
scoring share one graph and TTT training has one.

The recompilation check runs dynamo with the "eager" backend (same tracing, guards and recompiles,
no code generation: ~15 s). The same run through inductor took 210 s (inductor cache partly warm) to
~10 min (cold cache, loaded machine) on the shared 2-core CPU, so it only runs with RUN_SLOW=1.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import SCRIPT, TINY_ENV, TINY, log_value
from tests.helpers import fake_flash

HELPER = Path(__file__).resolve().parent / "helpers" / "compile_backend.py"

COMPILE_ENV = dict(COMPILE="1", AUTOCAST="bf16", WARMUP_STEPS="2", NUM_LOOPS="2", ENABLE_LOOPING_AT="0.5",
                   LATE_QAT_THRESHOLD="0.5", EVAL_STRIDE="32", TTT_ENABLED="1", TTT_CHUNK_TOKENS="1024",
                   EVAL_BATCH_SEQS="32", VAL_BATCH_SIZE=str(32 * 64), QUANT="rtn", TORCH_LOGS="recompiles")


def compiled_run(tmp_path, tiny_env, backend, timeout, **overrides):
    env = {**tiny_env, **COMPILE_ENV, **overrides, "PG_TEST_COMPILE_BACKEND": backend}
    proc = subprocess.run([sys.executable, str(HELPER), str(SCRIPT)], cwd=tmp_path, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # one stream: ordered
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def recompilations(output):
    """[(function, guard failure reasons, index of the last log line before it)]"""
    found, log_lines = [], []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\[__recompiles\] Recompiling function (\w+)", line)
        if m:
            reasons = []
            for nxt in lines[i + 1:]:
                if "[__recompiles]" not in nxt:
                    break
                r = re.search(r"\[__recompiles\]\s+- \d+/\d+: (.*)", nxt)
                if r:
                    reasons.append(r.group(1))
            found.append((m.group(1), reasons, len(log_lines)))
        elif "[__recompiles]" not in line:
            log_lines.append(line)
    return found, log_lines


def check_expected_recompilations(output):
    found, log_lines = recompilations(output)
    where = lambda prefix: next(i for i, ln in enumerate(log_lines) if ln.startswith(prefix))
    summary = [(fn, reasons[:1], log_lines[at - 1] if at else "") for fn, reasons, at in found]
    assert len(found) == 3, summary
    (f1, r1, at1), (f2, r2, at2), (f3, r3, at3) = found
    assert f1 == "forward" and "self.looping == False" in r1[0]
    assert at1 <= where("warmup steps:2 ")  # during compile priming, not in the timed loop
    assert f2 == "token_nll" and ".qat" in r2[0] and at2 <= where("compile_warmup graph:eval_artifact_model looping:1 ")
    assert f3 == "token_nll" and all("grad_mode" in r for r in r3) and at3 <= where("compile_warmup graph:ttt_score_and_step ")
    assert max(at1, at2, at3) < where("step:4/8 ")  # nothing recompiles once the training clock runs
    # the switches really happened inside the compiled training loop
    assert where("warmup steps:2 ") < where("looping_enabled step:4 ") < where("late_qat_enabled step:5 ")
    assert "cache_size_limit" not in output and "recompile_limit" not in output
    log = "\n".join(log_lines)
    assert "compile:1 autocast:1" in log
    for label in ("final_prequant", "final_roundtrip", "final_sliding", "final_ttt"):
        assert int(log_value(log, label, "tokens")) == 3000
    return log


@pytest.mark.slow
def test_compiled_run_recompiles_only_where_the_design_expects(tmp_path, tiny_env):
    check_expected_recompilations(compiled_run(tmp_path, tiny_env, "eager", 600))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="inductor on CPU compiles for 3-10 minutes; set RUN_SLOW=1")
def test_inductor_bf16_run_recompiles_only_where_expected_and_matches_eager_numbers(tmp_path, tiny_env):
    log = check_expected_recompilations(compiled_run(tmp_path, tiny_env, "inductor", 1800))
    pre, post = float(log_value(log, "final_prequant", "val_bpb")), float(log_value(log, "final_roundtrip", "val_bpb"))
    assert abs(post - pre) < 0.01
    assert float(log_value(log, "final_ttt", "val_bpb")) < pre + 0.01
    first = float(re.search(r"^step:4/8 train_loss:(\S+)", log, re.M).group(1))
    last = float(re.search(r"^step:8/8 train_loss:(\S+)", log, re.M).group(1))
    assert last < first < 6.0


@pytest.mark.slow
def test_bf16_autocast_cpu_run_without_compile_matches_fp32_closely(tmp_path, tiny_env):
    """AUTOCAST=bf16 on CPU without compile: the same pipeline, numbers within bf16 noise of fp32."""
    results = {}
    for autocast in ("off", "bf16"):
        d = tmp_path / autocast
        d.mkdir()
        env = dict(tiny_env, AUTOCAST=autocast, COMPILE="0", QUANT="rtn", ARTIFACT_PATH=str(d / "m.pgart"))
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = (d / "logs" / "tiny.txt").read_text()
        assert f"compile:0 autocast:{int(autocast == 'bf16')}" in log
        results[autocast] = float(log_value(log, "final_roundtrip", "val_bpb"))
    assert results["bf16"] != results["off"]  # bf16 really ran
    assert abs(results["bf16"] - results["off"]) < 0.01  # measured: 0.0007


def test_gptq_hessians_are_fp32_and_export_works_under_bf16_autocast():
    env = dict(TINY_ENV, DATA_PATH=str(TINY), TOKENIZER_PATH=str(TINY / "tokenizer.model"), QUANT="gptq")
    args = tg.Hyperparameters(env)
    torch.manual_seed(0)
    model = tg.GPT(args)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), True, False, None)  # autocast on, as on CUDA by default
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    hessians = tg.collect_hessians(model, [(x, None)], rt)
    assert {str(h.dtype) for h in hessians.values()} == {"torch.float32"}
    qstate, errors = tg.quantize_model(model, args, hessians)
    assert len(errors) == 13


def test_no_graph_is_compiled_after_training_starts(tmp_path, tiny_env):
    """Issue 12: every dynamo compilation (each one prints a line, in order with the log) happens in
    the warm-up, also with periodic validation in both layer orders, the artifact model's evaluation
    and chunk TTT; each warm-up graph's time is logged."""
    tiny_env.update(VAL_LOSS_EVERY="4")
    out = compiled_run(tmp_path, tiny_env, "count", 600)
    lines = [ln for ln in out.splitlines() if not ln.startswith(("config ", "V", " ", "\t"))]
    compiled = [i for i, ln in enumerate(lines) if ln.startswith("dynamo_graph_compiled ")]
    clock = next(i for i, ln in enumerate(lines) if ln.startswith("step:"))
    assert len(compiled) >= 5 and max(compiled) < clock, [lines[i - 1] for i in compiled]
    warmed = [ln.split(" ms:")[0] for ln in lines if ln.startswith("compile_warmup ")]
    assert warmed == ["compile_warmup graph:eval_training_model looping:0", "compile_warmup graph:eval_training_model looping:1",
                      "compile_warmup graph:eval_artifact_model looping:1", "compile_warmup graph:ttt_score_and_step"]
    assert all(int(ln.split("ms:")[1]) > 0 for ln in lines if ln.startswith("compile_warmup "))
    for label in ("step:4/8 val_loss", "step:8/8 val_loss", "final_prequant", "final_roundtrip", "final_sliding", "final_ttt"):
        assert any(ln.startswith(label) for ln in lines[clock:]), label


# --- in-process: whole graphs, no recompiles (issue 23) ----------------------------------------------

GRAPH_KNOBS = dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=16, EVAL_BATCH_SEQS=4, VAL_BATCH_SIZE=4 * 32, TTT_CHUNK_TOKENS=64,
                   TTT_BATCH_SEQS=2)


@pytest.fixture
def whole_graphs(monkeypatch):
    """torch.compile as the run calls it, but fullgraph=True (a graph break is an error) through
    aot_eager (dynamo's tracing and guards and AOT autograd's joint graph, no code generation);
    returns the list of graphs dynamo hands over, one per compilation."""
    from torch._dynamo.backends.debugging import aot_eager
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, fullgraph=True, backend=counting)))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def check_whole_graphs(graphs, backend, doc_mask):
    """Training steps in both layer orders, evaluation and chunk TTT compile once each and never again:
    graph counts per phase, then a second round that compiles nothing."""
    args = tg.Hyperparameters(dict(TINY_ENV, **GRAPH_KNOBS, DATA_PATH=str(TINY), TOKENIZER_PATH=str(TINY / "tokenizer.model"),
                                   DOC_MASK=str(doc_mask)))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), True, True, None)  # bf16 autocast and compile, as on CUDA
    torch.manual_seed(0)
    model = tg.GPT(args, backend)
    model_fn = torch.compile(model)
    opts = tg.build_optimizers(model, args, rt)
    tokens = torch.arange(6 * 64 + 1) % 500 + 2
    tokens[::37] = tg.BOS_ID  # documents of 37 tokens: several per row
    batch = [(tokens[:128].view(2, 64), tokens[1:129].view(2, 64))]
    val = tokens[:200]
    nbytes = torch.ones_like(val, dtype=torch.int32)
    counts = []
    for rounds in range(2):
        for looping in (False, True):
            model.looping = looping
            for _ in range(2):
                tg.train_step(model_fn, model, opts, batch, args, rt)
                counts.append(len(graphs))
        tg.evaluate(model, val, nbytes, args, rt, args.eval_stride)
        counts.append(len(graphs))
        tg.evaluate_ttt(model, val, nbytes, args, rt, time.perf_counter())
        counts.append(len(graphs))
    steps = [b - a for a, b in zip([0] + counts, counts)]
    # first round: the training graph (looping off), nothing on step 2, the looped training graph,
    # nothing on step 4, the evaluation graph, TTT's training graph; second round: nothing at all
    assert steps == [1, 0, 1, 0, 1, 1] + [0] * 6, steps


@pytest.mark.slow
def test_training_evaluation_and_ttt_compile_whole_graphs_once(whole_graphs):
    check_whole_graphs(whole_graphs, "sdpa", 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend, doc_mask", [("sdpa", 1), ("fa2", 0), ("fa2", 1), ("fa3", 0), ("fa3", 1), ("fa4", 0), ("fa4", 1)])
def test_whole_graphs_through_the_flash_attention_fakes(whole_graphs, monkeypatch, backend, doc_mask):
    """Also with the kernel-contract fakes (FA2/FA3 custom ops as the real ones register, FA4 through
    train_gpt's custom op) under emulated CUDA autocast, and DOC_MASK's varlen segments."""
    fake_flash.emulate_cuda_autocast_policy(monkeypatch)
    calls = fake_flash.install(monkeypatch)
    check_whole_graphs(whole_graphs, backend, doc_mask)
    assert backend == "sdpa" or sum(calls.values()) > 0


def test_no_graph_is_compiled_after_training_starts_with_a_seq_schedule(tmp_path, tiny_env):
    """TRAIN_SEQ_SCHEDULE: each length's graph, in each layer order, is compiled in the warm-up; the
    training loop switches lengths (and turns looping on) without compiling."""
    tiny_env.update(TRAIN_SEQ_SCHEDULE="16@0.25,32@0.6,64@1")
    out = compiled_run(tmp_path, tiny_env, "count", 600)  # WARMUP_STEPS=2: stretched to the 6 graphs
    assert any(ln.startswith("warmup steps:6 ") for ln in out.splitlines())
    lines = [ln for ln in out.splitlines() if not ln.startswith(("config ", "V", " ", "\t"))]
    compiled = [i for i, ln in enumerate(lines) if ln.startswith("dynamo_graph_compiled ")]
    clock = next(i for i, ln in enumerate(lines) if ln.startswith("step:"))
    assert max(compiled) < clock, [lines[i - 1] for i in compiled]
    switches = [ln.split(" train_time:")[0] + " " + ln.split()[-1] for ln in lines if ln.startswith("train_seq_len ")]
    assert switches == ["train_seq_len step:0 seq_len:16", "train_seq_len step:2 seq_len:32", "train_seq_len step:5 seq_len:64"]
