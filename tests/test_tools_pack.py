"""tools/pack_code.py: the packed script runs the same code, and its bytes are what gets counted."""

import ast
import hashlib
import subprocess
import sys

import pytest

import pack_code


SAMPLE = '''"""Module docstring that the packer drops."""
from __future__ import annotations

import inspect
import os
import sys
import traceback

# a comment


class Model:
    """Class docstring."""

    def forward(self, x: int) -> int:
        """Method docstring."""
        return x * 2  # trailing comment


def only_docstring():
    """Nothing but a docstring: the body must stay valid."""


def main():
    print("name", __name__)
    print("file", os.path.basename(__file__))
    print("size", os.path.getsize(__file__))
    print("forward", Model().forward(21))
    print("empty", only_docstring())
    print("src", inspect.getsource(Model.forward).split("(")[0].strip())
    print("weird", f"{'a'!r:>5}|{3.0:.2f}|{1e-8}", b"\\x00\\xff", "\\u2581")
    if len(sys.argv) > 1:
        try:
            raise RuntimeError("boom " + sys.argv[1])
        except RuntimeError:
            traceback.print_exc()
            sys.exit(1)


if __name__ == "__main__":
    main()
'''


def run(path, *args):
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=60)


def without_docstrings(tree):
    for node in ast.walk(tree):
        if pack_code._has_docstring(node):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_minify_drops_comments_and_docstrings_but_keeps_the_syntax_tree():
    small = pack_code.minify(SAMPLE)
    for dropped in ("a comment", "trailing comment", "Module docstring", "Class docstring", "Nothing but", "\n\n\n"):
        assert dropped not in small
    assert ast.dump(ast.parse(small)) == without_docstrings(ast.parse(SAMPLE))


def test_minify_keeps_docstrings_when_code_reads_doc():
    src = '"""Usage text."""\nimport argparse\nprint(argparse.ArgumentParser(description=__doc__).description)\n'
    assert "Usage text." in pack_code.minify(src)


def test_packed_script_behaves_like_the_original(tmp_path):
    orig = tmp_path / "prog.py"
    orig.write_text(SAMPLE)
    packed_text, small, codec = pack_code.pack(SAMPLE)
    packed = tmp_path / "prog_packed.py"
    packed.write_text(packed_text)
    assert pack_code.unpack(packed_text) == small and codec in pack_code.CODECS
    a, b = run(orig), run(packed)
    assert a.returncode == b.returncode == 0, b.stderr
    lines_a, lines_b = a.stdout.splitlines(), b.stdout.splitlines()
    assert lines_b[0] == "name __main__"
    assert lines_b[1] == "file prog_packed.py"  # __file__ is the packed file ...
    assert lines_b[2] == f"size {packed.stat().st_size}"  # ... so the counted bytes are the packed bytes
    assert lines_a[3:] == lines_b[3:]  # same results; inspect.getsource and literals survive
    assert lines_b[3:5] == ["forward 42", "empty None"]
    err = run(packed, "x")
    assert err.returncode == 1 and "RuntimeError: boom x" in err.stderr
    # Tracebacks printed through the traceback module show the real (minified) source line.
    assert 'raise RuntimeError("boom " + sys.argv[1])' in err.stderr.replace("'", '"')


def test_pack_cli_writes_smaller_file_and_reports_bytes(tmp_path, capsys):
    src = tmp_path / "big.py"
    src.write_text(SAMPLE * 1 + "\n".join(f"def f{i}(x):\n    # note {i}\n    return x + {i}\n" for i in range(300)))
    assert pack_code.main([str(src)]) == 0
    out = tmp_path / "big_packed.py"
    report = capsys.readouterr().out
    assert f"{src.stat().st_size} bytes" in report and f"{out.stat().st_size} bytes" in report
    assert out.stat().st_size < src.stat().st_size / 3
    assert f"code_sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}" in report
    assert pack_code.main([str(out), "--unpack"]) == 0
    assert capsys.readouterr().out == pack_code.minify(src.read_text())


def test_pack_refuses_to_write_over_the_script_it_packs(tmp_path, capsys):
    src = tmp_path / "train.py"
    src.write_text(SAMPLE)
    assert pack_code.main([str(src), "-o", str(src)]) == 2
    assert src.read_text() == SAMPLE and "is the script being packed" in capsys.readouterr().err


def test_unpack_refuses_a_file_it_did_not_write():
    with pytest.raises(ValueError, match="not a script written by pack_code.py"):
        pack_code.unpack(SAMPLE)
