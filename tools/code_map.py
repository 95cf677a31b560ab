"""Print (or write into README.md) a one-screen map of train_gpt.py: its sections with line ranges.

Sections are read from the banner comments that open them in train_gpt.py,

    # -----------------------------------------------------------------------------
    # TITLE
    # -----------------------------------------------------------------------------

so the map follows the file when it is reorganised; tests/test_tools_code_map.py checks that
README.md holds exactly this map.
"""

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- code-map:begin -->", "<!-- code-map:end -->"
_RULE = re.compile(r"# -{10,}\s*\Z")
MAX_NAMES = 6  # top-level names shown per section; the rest are counted


def sections(source):
    """[(title, first line, last line)] in file order; lines before the first banner are the header."""
    lines = source.splitlines()
    starts = [(i + 1, lines[i + 1][1:].strip()) for i in range(len(lines) - 2)
              if _RULE.match(lines[i]) and lines[i + 1].startswith("# ") and _RULE.match(lines[i + 2])]
    if starts and starts[0][0] > 1:
        starts.insert(0, (1, "(imports and constants)"))
    ends = [first - 1 for first, _ in starts[1:]] + [len(lines)]
    return [(title, first, last) for (first, title), last in zip(starts, ends)]


def top_level_names(source):
    """{line: name} of every top-level def and class."""
    return {node.lineno: node.name for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def code_map(path=ROOT / "train_gpt.py"):
    source = Path(path).read_text(encoding="utf-8")
    names = top_level_names(source)
    rows = [f"| Lines | Section | Top-level definitions ({Path(path).name}) |", "|---|---|---|"]
    for title, first, last in sections(source):
        inside = [f"`{names[n]}`" for n in sorted(names) if first <= n <= last]
        more = f" +{len(inside) - MAX_NAMES} more" if len(inside) > MAX_NAMES else ""
        rows.append(f"| {first}–{last} | {title} | {', '.join(inside[:MAX_NAMES])}{more} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", default=str(ROOT / "train_gpt.py"), help="file to map (default train_gpt.py)")
    ap.add_argument("--write", metavar="README", help="replace the map between the code-map markers in this file")
    args = ap.parse_args(argv)
    try:
        table = code_map(args.script)
        if not args.write:
            print(table)
            return 0
        path = Path(args.write)
        text = path.read_text(encoding="utf-8")
    except (OSError, SyntaxError) as e:
        print(f"error: {getattr(e, 'filename', None) or args.script}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    if BEGIN not in text or END not in text:
        print(f"error: {path}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    path.write_text(re.sub(f"{BEGIN}.*?{END}", lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
