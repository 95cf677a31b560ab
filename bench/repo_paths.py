"""Lets bench/ scripts run as `python bench/<script>.py` import train_gpt.py and the modules of data/ and
tools/ by name, as pytest.ini's pythonpath does for the tests. Appended, so nothing shadows the stdlib."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

for folder in (REPO, REPO / "data", REPO / "tools"):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
