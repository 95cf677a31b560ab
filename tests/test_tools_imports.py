"""Helpers import each other by module name: pytest.ini's pythonpath for tests, one bootstrap for bench/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The only places allowed to edit sys.path: bench/'s bootstrap, and knob_table.py, which imports
# train_gpt.py from the folder above its own. data/ is owned elsewhere and not scanned.
ALLOWED = {"bench/repo_paths.py", "tools/knob_table.py"}


def test_no_module_edits_sys_path_outside_the_bootstraps():
    offenders = [str(p.relative_to(ROOT)) for d in ("tests", "tools", "bench") for p in (ROOT / d).rglob("*.py")
                 if re.search(r"sys\.path\.(insert|append)\(", p.read_text(encoding="utf-8"))
                 and str(p.relative_to(ROOT)) not in ALLOWED]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench/gpu_probe.py", "bench/synthetic_shards.py", "tools/logparse.py"])
def test_helpers_still_run_as_documented_scripts_from_any_directory(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
