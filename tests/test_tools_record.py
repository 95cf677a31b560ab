"""tools/make_record.py (records folder from logs) and tools/plot_curves.py."""

import json
import sys
from pathlib import Path

import pytest

import logparse
import make_record
import plot_curves

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT / "tests" / "fixtures"
SEED_LOGS = [FIXTURES / f"seed{s}.txt" for s in (1337, 42, 2025)]
SCRIPT = FIXTURES / "shipped_script.py"  # the file whose sha256 the fixture logs record


def record_args(tmp_path, *extra, script=SCRIPT):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch\nnumpy\n")
    return [*map(str, SEED_LOGS), "--script", str(script), "--name", "Fixture Run", "--author", "A. Author",
            "--github-id", "aauthor", "--blurb", "Three fixture seeds.", "--date", "2026-03-30T12:00:00Z",
            "--requirements", str(reqs), "--out-root", str(tmp_path / "records"), *extra]


def test_record_folder_holds_the_script_logs_submission_and_generated_readme(tmp_path, capsys):
    assert make_record.main(record_args(tmp_path, "--record-val-loss", "2.03", "--no-plot")) == 0
    folder = tmp_path / "records" / "2026-03-30_Fixture_Run"
    names = {p.name for p in folder.iterdir()}
    assert names == {"train_gpt.py", "requirements.txt", "submission.json", "README.md",
                     "seed1337.txt", "seed42.txt", "seed2025.txt"}
    assert (folder / "train_gpt.py").read_bytes() == SCRIPT.read_bytes()
    assert (folder / "seed42.txt").read_bytes() == SEED_LOGS[1].read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_code"] == SCRIPT.stat().st_size and sub["val_bpb"] == 1.19166342
    readme = (folder / "README.md").read_text()
    for expected in (
        "| 1337 | 2.01183341 | 1.19151690 | 7041 | 600.0 | 82.3 | 15,872,785 | 15,873,210 | `seed1337.txt` |",
        "| **mean ± std** | 2.01208080 ± 0.00124191 | 1.19166342 ± 0.00073553 |",
        "verdict: PASS (needs p < 0.01)",
        "mean gain: 0.01792 nats",
        "env python:3.12.3 torch:2.8.0 cuda:12.8 device:cuda device_name:NVIDIA_H100_80GB_HBM3 device_count:8",
        "| MLP_MULT | `3.0` |",
        "| SEED | per seed |",
        "DATA_PATH=./data/datasets/fineweb10B_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model "
        "VOCAB_SIZE=1024 RUN_ID=rec_seed42 SEED=42 MLP_MULT=3.0 TTT_ENABLED=False "
        "torchrun --standalone --nproc_per_node=8 train_gpt.py",
        f"- code: `train_gpt.py`, {SCRIPT.stat().st_size:,} bytes",
        "- total: 15,874,002 bytes at most, limit 16,000,000",
        "- training: 600.0 s at most",
        "- evaluation: 82.3 s at most (limit 600 s)",
        "Not drawn (--no-plot).",
    ):
        assert expected in readme, expected
    assert "verdict: PASS" in capsys.readouterr().out


def test_record_refuses_a_script_that_differs_from_the_logged_hash(tmp_path, capsys):
    edited = tmp_path / "train_gpt.py"
    edited.write_bytes(SCRIPT.read_bytes().replace(b"fixture script", b"fixture script!"))
    assert make_record.main(record_args(tmp_path, script=edited)) == 2
    err = capsys.readouterr().err
    assert "is not the file that produced the logs" in err and logparse.parse_log(SEED_LOGS[0]).code["code_sha256"] in err
    assert not (tmp_path / "records").exists()


def test_record_refuses_inconsistent_logs_and_an_existing_folder(tmp_path, capsys):
    args = record_args(tmp_path, "--no-plot")
    assert make_record.main(args) == 0
    assert make_record.main(args) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert make_record.main(args + ["--force"]) == 0
    other = tmp_path / "seed7.txt"
    other.write_text(SEED_LOGS[0].read_text().replace("SEED:1337", "SEED:7").replace("config VOCAB_SIZE:1024", "config VOCAB_SIZE:2048"))
    assert make_record.main([str(other)] + args) == 2
    assert "disagree on config" in capsys.readouterr().err


def test_readme_says_why_there_is_no_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert make_record.main(record_args(tmp_path)) == 0
    readme = (tmp_path / "records" / "2026-03-30_Fixture_Run" / "README.md").read_text()
    assert "Not drawn: matplotlib is not installed (pip install matplotlib)." in readme
    assert "Not computed: no current record value was given" in readme


def test_plot_tool_explains_missing_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_curves.main([str(SEED_LOGS[0]), "-o", str(tmp_path / "c.png")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_plot_and_record_include_curves_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    assert plot_curves.main([*map(str, SEED_LOGS), "-o", str(png), "--x", "time"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert make_record.main(record_args(tmp_path)) == 0
    folder = tmp_path / "records" / "2026-03-30_Fixture_Run"
    assert (folder / "curves.png").stat().st_size > 1000
    assert "![train and validation loss](curves.png)" in (folder / "README.md").read_text()


def test_record_carries_and_checks_the_artifact_sha256(tmp_path, capsys):
    import hashlib

    from test_tools_logs import small_artifact_log
    blob = b"\x01\x02" * 512
    sha = hashlib.sha256(blob).hexdigest()
    log = small_artifact_log(tmp_path, sha, len(blob))
    given = tmp_path / "seed42.pgart"
    given.write_bytes(blob)
    args = record_args(tmp_path, "--no-plot", "--artifact", str(given))
    args[:3] = [str(log)]  # one seed: the re-labelled seed42 log
    assert make_record.main(args) == 0
    folder = tmp_path / "records" / "2026-03-30_Fixture_Run"
    assert json.loads((folder / "submission.json").read_text())["seeds"][0]["artifact_sha256"] == sha
    assert f"- seed 42 artifact sha256 `{sha}`" in (folder / "README.md").read_text()
    given.write_bytes(blob[:-1])
    assert make_record.main(args + ["--force"]) == 2
    assert "is not the artifact" in capsys.readouterr().err
