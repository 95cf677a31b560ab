"""Shared fixtures: tiny official-format data and a helper that runs train_gpt.py as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels (tests/test_fused_kernels.py) run in Triton's interpreter on CPU tensors.
# triton.jit reads this when a kernel is defined, i.e. when train_gpt is first imported: set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logparse

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
TINY = ROOT / "data" / "tiny"
SHARED = ROOT.parent / "shared"
# Where runs and tools write by default; a test must leave nothing new there (pytest tmp dirs only).
RUN_OUTPUTS = ("logs", "bench/runs", "sweeps", "records")

# A shape that trains in seconds on one CPU core and still exercises every default feature
# (XSA, partial RoPE, SmearGate, U-Net skips, depth recurrence, parallel residuals, gates).
TINY_ENV = dict(
    VOCAB_SIZE="512", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8",
    XSA_LAST_N="2", LOOP_START="1", LOOP_END="1", NUM_LOOPS="2", ENABLE_LOOPING_AT="0.5",
    PARALLEL_RESIDUAL_START="1", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="8",
    WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="4",
    EVAL_STRIDE="0", TTT_ENABLED="0", PHASED_TTT_ENABLED="0", KEEP_FLOAT_NUMEL="256", AVERAGING="none",
    GPTQ_CALIBRATION_BATCHES="2", COMPRESSOR="zstd", LQER_TOP_K="1", MUON_MOMENTUM_WARMUP_STEPS="0",
    MATRIX_LR="0.05", SCALAR_LR="0.05", TIED_EMBED_LR="0.1",
)


def pytest_collection_modifyitems(items):
    """tiny_env exists to run train_gpt.py as a process, so a test that takes it is slow even if unmarked."""
    for item in items:
        if "tiny_env" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second spinning thread slows tiny ops 10-40x."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_outputs():
    return {str(p.relative_to(ROOT)) for d in RUN_OUTPUTS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*")}


@pytest.fixture(autouse=True)
def writes_only_to_tmp():
    """Fails the test that leaves a log, artifact or run folder in the repository."""
    before = _run_outputs()
    yield
    left = sorted(_run_outputs() - before)
    assert not left, f"the test left files in the repository (write into tmp_path instead): {left[:5]}"


def make_args(**overrides):
    """Hyperparameters of the tiny shape on data/tiny, with overrides."""
    import train_gpt as tg
    env = dict(TINY_ENV, DATA_PATH=str(TINY), TOKENIZER_PATH=str(TINY / "tokenizer.model"))
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters(env)


def write_shard(path, tokens):
    import train_gpt as tg
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def read_tokens(path):
    import train_gpt as tg
    return np.fromfile(path, dtype="<u2", offset=tg.SHARD_HEADER_INTS * 4)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """data/tiny's train shard and the first 3001 val tokens (a length that is no multiple of 64)."""
    d = tmp_path_factory.mktemp("tiny_data")
    (d / "fineweb_train_000000.bin").symlink_to(TINY / "fineweb_train_000000.bin")
    write_shard(d / "fineweb_val_000000.bin", read_tokens(TINY / "fineweb_val_000000.bin")[:3001])
    return d


@pytest.fixture
def tiny_env(tmp_path, tiny_data):
    """Environment for running train_gpt.py as a process on the tiny shape (tests taking it are `slow`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TINY_ENV, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(TINY / "tokenizer.model"),
               RUN_ID="tiny", ARTIFACT_PATH=str(tmp_path / "model.pgart"), OMP_NUM_THREADS="1")
    return env


def run_train(env, cwd, nproc=1, script=SCRIPT, check=True, timeout=600):
    """Run the script (under torchrun when nproc > 1) in cwd; returns (process, rank-0 log text)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log_path = Path(cwd) / "logs" / f"{env['RUN_ID']}.txt"
    log = log_path.read_text() if log_path.exists() else ""
    if check and proc.returncode != 0:
        raise AssertionError(f"train_gpt.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, log


def log_value(log, label, key):
    """The value of key on the (last) label line of a log, as tools/logparse.py reads it: numbers as
    int/float, names as text. label: an eval label, an event (code, artifact, final_result, ...), "config",
    "step" (the last training step line), "error: <name>" or the first key of a key:value line (peak_mem_mib)."""
    run = logparse.parse_text(log)
    lines = {"final_result": run.final, "config": run.config, "stopping_early": run.stopping_early,
             "step": run.train_steps[-1] if run.train_steps else None,
             **{name: getattr(run, name) for name in ("code", "launch", "env", "artifact", "train_total", "eval_time")}}
    errors = [logparse._pairs(e.split()[2:]) for e in run.errors if e.split()[:2] == label.split()]
    line = (run.evals.get(label) or lines.get(label) or run.events.get(label) or (run.misc if label in run.misc else None)
            or (errors[-1] if errors else None))
    assert line, f"no '{label}' line in log"
    assert key in line, f"no {key} on the '{label}' line: {line}"
    return line[key]


def needs_shared(*parts):
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared is optional)")
