"""Print (or write into README.md) the markdown table of train_gpt.py's environment knobs.

The table is generated from the KNOBS list in train_gpt.py, so the README cannot drift from the
code; tests/test_train_core.py checks that README.md holds exactly this table.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- knobs:begin -->", "<!-- knobs:end -->"


def knob_table() -> str:
    sys.path.insert(0, str(ROOT))
    import train_gpt

    rows = ["| Variable | Default | Values | Meaning |", "|---|---|---|---|"]
    for k in train_gpt.KNOBS:
        values = "/".join(k.kind) if isinstance(k.kind, tuple) else {bool: "0/1"}.get(k.kind, k.kind.__name__)
        rows.append(f"| `{k.name}` | `{k.default}` | {values} | {k.help} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="README", help="replace the table between the knobs markers in this file")
    args = ap.parse_args()
    if not args.write:
        print(knob_table())
        return
    path = Path(args.write)
    try:
        text = path.read_text()
    except OSError as e:
        sys.exit(f"error: {path}: cannot read: {e.strerror or e}")
    if BEGIN not in text or END not in text:
        sys.exit(f"error: {path}: no {BEGIN} ... {END} markers")
    table = knob_table()
    path.write_text(re.sub(f"{BEGIN}.*?{END}", lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S))


if __name__ == "__main__":
    main()
