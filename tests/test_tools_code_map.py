"""tools/code_map.py: README's map of train_gpt.py is derived from its section banners and kept current."""

from pathlib import Path

import code_map

ROOT = Path(__file__).resolve().parents[1]
RULE = "# " + "-" * 77

SAMPLE = f'''import os

{RULE}
# ALPHA
{RULE}

def a():
    pass
# a comment line, not a banner
# ---
class B:
    pass

{RULE}
# BETA: TWO
{RULE}
def c():
    return 1
'''


def test_sections_and_their_definitions_come_from_the_banners(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(SAMPLE)
    assert code_map.sections(SAMPLE) == [("(imports and constants)", 1, 2), ("ALPHA", 3, 13), ("BETA: TWO", 14, 18)]
    rows = code_map.code_map(path).splitlines()[2:]
    assert rows == ["| 1–2 | (imports and constants) |  |", "| 3–13 | ALPHA | `a`, `B` |", "| 14–18 | BETA: TWO | `c` |"]


def test_readme_map_of_train_gpt_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert code_map.code_map(ROOT / "train_gpt.py") in readme, \
        "README's map of train_gpt.py is stale: run python tools/code_map.py --write README.md"
    # Every line of the file is in exactly one section.
    spans = code_map.sections((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    assert spans[0][1] == 1 and all(b[1] == a[2] + 1 for a, b in zip(spans, spans[1:]))
    assert spans[-1][2] == len((ROOT / "train_gpt.py").read_text(encoding="utf-8").splitlines())


def test_write_refuses_a_file_without_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert code_map.main(["--write", str(readme)]) == 2
    assert "no <!-- code-map:begin -->" in capsys.readouterr().err and readme.read_text() == "# no markers\n"
