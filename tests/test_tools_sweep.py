"""tools/sweep.py: runs configs in turn, survives failures, resumes, prints a sorted table."""

import pytest

import sweep


# Stands in for train_gpt.py: writes contract log lines (self-consistent) whose val_bpb depends on LR, fails on LR=bad,
# and counts its launches so the resume test can see which runs were repeated.
FAKE_TRAIN = r'''
import math, os, sys
run_id, lr = os.environ["RUN_ID"], os.environ.get("LR", "1")
with open("launches.txt", "a") as f:
    f.write(run_id + "\n")
if lr == "bad":
    sys.exit("ConfigError: LR='bad': expected a number")
if os.path.exists(os.environ["ARTIFACT_PATH"]):  # like train_gpt.py without LOG_OVERWRITE=1
    sys.exit("ConfigError: ARTIFACT_PATH holds an earlier run's artifact")
bpb, model = 1.0 + abs(float(lr) - 2) / 10, int(900 * float(lr))
loss = bpb * math.log(2) * 20 / 10  # val_bpb = val_loss / ln 2 * tokens / bytes, as tools/logparse.py checks
total = 100 + model
os.makedirs("logs", exist_ok=True)
lines = [
    "code path:fake.py bytes_code:100 code_sha256:" + "0" * 64,
    "step:10/10 train_loss:3.0000 train_time:500 step_avg:50.00 tok_s:1000",
    f"final_roundtrip val_loss:{loss:.8f} val_bpb:{bpb:.8f} tokens:10 bytes:20 eval_ms:5",
    f"artifact path:{os.environ['ARTIFACT_PATH']} bytes_code:100 bytes_model:{model} bytes_total:{total} limit:4000 compressor:zstd",
    "eval_time total_ms:5 limit_ms:600000",
    f"final_result label:final_roundtrip val_loss:{loss:.8f} val_bpb:{bpb:.8f} bytes_total:{total} train_time_ms:500 eval_time_ms:5",
]
with open(f"logs/{run_id}.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if total > 4000 else 0)  # like train_gpt.py: over budget still logs, then fails
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return script


def table_rows(out):
    """Data rows of the printed table (after the dashes line), as lists of cells."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("--")) + 1
    return [ln.split() for ln in lines[start:]]


def test_failing_config_is_reported_and_the_sweep_goes_on(fake_train, tmp_path, capsys):
    rc = sweep.main(["--grid", "LR=1,bad,2.5", "--script", str(fake_train), "--out", "sweeps/lr"])
    out = capsys.readouterr().out
    assert rc == 1  # not every run succeeded
    assert (tmp_path / "launches.txt").read_text().split() == ["lr_LR-1", "lr_LR-bad", "lr_LR-2.5"]
    rows = table_rows(out)
    # best val_bpb first: LR=2.5 -> 1.05, LR=1 -> 1.1; the failed run last with its reason
    assert [r[0] for r in rows] == ["2.5", "1", "bad"]
    assert rows[0][1:6] == ["1.455609", "1.050000", "2350", "50.0", "10"]  # val_loss = 1.05 * ln 2 * 2
    assert rows[1][6] == "ok"
    assert rows[2][1:5] == ["-"] * 4 and "failed rc=1: ConfigError: LR='bad'" in " ".join(rows[2])
    assert (tmp_path / "sweeps/lr/LR-1/log.txt").read_text().startswith("code path:fake.py")
    assert "ConfigError" in (tmp_path / "sweeps/lr/LR-bad/output.txt").read_text()


def test_resumed_sweep_skips_finished_runs_and_retries_failed_ones(fake_train, tmp_path, capsys):
    args = ["--run", "LR=1", "--run", "LR=bad", "--script", str(fake_train), "--out", "sweeps/r"]
    sweep.main(args)
    capsys.readouterr()
    sweep.main(args)
    assert (tmp_path / "launches.txt").read_text().split() == ["r_LR-1", "r_LR-bad", "r_LR-bad"]
    assert "ok (done before)" in capsys.readouterr().out


def test_a_retry_replaces_the_failed_attempts_artifact_in_its_own_folder(fake_train, tmp_path, capsys):
    (tmp_path / "sweeps/a/LR-1").mkdir(parents=True)
    (tmp_path / "sweeps/a/LR-1/model.pgart").write_bytes(b"attempt that died before its final_result")
    assert sweep.main(["--run", "LR=1", "--script", str(fake_train), "--out", "sweeps/a"]) == 0
    assert not (tmp_path / "sweeps/a/LR-1/model.pgart").exists()  # the fake writes none


def test_over_budget_and_timeout_are_reported(fake_train, tmp_path, capsys):
    assert sweep.main(["--run", "LR=5", "--script", str(fake_train), "--out", "sweeps/b"]) == 1
    assert "over budget: bytes_total 4600 > limit 4000" in capsys.readouterr().out
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    assert sweep.main(["--run", "LR=1", "--script", str(slow), "--out", "sweeps/t", "--timeout", "0.5"]) == 1
    assert "timeout after" in capsys.readouterr().out


def test_grid_and_list_expand_to_their_product():
    configs = sweep.expand([{"A": "1"}, {"A": "2", "B": "x"}], ["C=3,4"])
    assert configs == [{"A": "1", "C": "3"}, {"A": "1", "C": "4"}, {"A": "2", "B": "x", "C": "3"},
                       {"A": "2", "B": "x", "C": "4"}]
    assert sweep.run_name({"NUM_LAYERS": "9", "VE_LAYERS": "9,10"}) == "NUM_LAYERS-9_VE_LAYERS-9,10"
    with pytest.raises(ValueError):
        sweep.parse_assignments("lower=1")
