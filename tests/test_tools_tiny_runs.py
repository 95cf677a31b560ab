"""tools/ against real tiny CPU runs of train_gpt.py (conftest's tiny_env: a few seconds each)."""

import json

import pytest
from conftest import SCRIPT, TINY, run_train

import logparse
import make_record
import pack_code
import sweep


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY / "tokenizer.model").exists(), reason="needs data/tiny")]


def test_packed_train_gpt_logs_the_same_values_and_counts_its_own_bytes(tmp_path, tiny_env):
    source = SCRIPT.read_text(encoding="utf-8")
    original = tmp_path / "train_gpt_original.py"  # a snapshot: train_gpt.py may be edited meanwhile
    original.write_text(source, encoding="utf-8")
    packed = tmp_path / "train_gpt.py"
    packed.write_text(pack_code.pack(source)[0], encoding="utf-8")
    runs = {}
    for run_id, script in (("orig", original), ("packed", packed)):
        run_train(dict(tiny_env, RUN_ID=run_id, ARTIFACT_PATH=str(tmp_path / f"{run_id}.pgart")), tmp_path, script=script)
        runs[run_id] = logparse.parse_log(tmp_path / "logs" / f"{run_id}.txt")
    orig, new = runs["orig"], runs["packed"]
    assert orig.problems() == [] and new.problems() == []
    assert orig.evals.keys() == new.evals.keys()
    for label, result in orig.evals.items():
        assert new.evals[label]["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6), label
        assert new.evals[label]["val_bpb"] == pytest.approx(result["val_bpb"], abs=1e-6), label
    assert [s["train_loss"] for s in new.train_steps] == [s["train_loss"] for s in orig.train_steps]
    size = packed.stat().st_size
    assert size < len(source.encode("utf-8")) / 2
    assert new.code["bytes_code"] == size and new.artifact["bytes_code"] == size
    assert new.artifact["bytes_total"] == size + new.artifact["bytes_model"]
    assert orig.code["bytes_code"] == original.stat().st_size

    # The packager ships the packed file that produced the log, and nothing else.
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch\n")
    args = [new.path, "--name", "tiny packed", "--author", "t", "--github-id", "t", "--date", "2026-01-01",
            "--requirements", str(reqs), "--out-root", str(tmp_path / "records"), "--no-plot"]
    assert make_record.main(args + ["--script", str(original)]) == 2
    assert make_record.main(args + ["--script", str(packed)]) == 0
    folder = tmp_path / "records" / "2026-01-01_tiny_packed"
    assert (folder / "train_gpt.py").read_bytes() == packed.read_bytes()
    assert json.loads((folder / "submission.json").read_text())["bytes_code"] == size
    assert "self-extracting" in (folder / "README.md").read_text()


def test_sweep_of_tiny_runs_reports_a_failing_config_and_runs_the_next(tmp_path, tiny_env, monkeypatch, capsys):
    for key, value in tiny_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    rc = sweep.main(["--run", "MLP_ACT=bogus", "--run", "SEED=7", "--run", "SEED=8 MLP_MULT=3",
                     "--script", str(SCRIPT), "--out", "sweeps/tiny"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    body = lines[next(i for i, ln in enumerate(lines) if ln.startswith("--")) + 1:]
    assert len(body) == 3 and "failed rc=1" in body[-1] and "MLP_ACT" in body[-1]
    runs = {seed: logparse.parse_log(tmp_path / "sweeps/tiny" / name / "log.txt")
            for seed, name in ((7, "SEED-7"), (8, "SEED-8_MLP_MULT-3"))}
    # Table rows: best first, each with the logged val_bpb and bytes_total.
    for row, (bpb, seed) in zip(body, sorted((r.final["val_bpb"], seed) for seed, r in runs.items())):
        assert f"{bpb:.6f}" in row and str(runs[seed].final["bytes_total"]) in row and row.rstrip().endswith("ok")
    assert runs[8].config["MLP_MULT"] == "3.0" and runs[8].seed == 8
