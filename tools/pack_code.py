"""Pack a Python script into a smaller self-extracting script that runs the same code.

Steps: minify (drop comments, blank lines and docstrings by re-emitting the parsed syntax
tree; refuse unless the result parses to the same tree), compress with the smallest of
lzma/zlib/bz2, base85-encode, and wrap in a one-screen stub that only uses the standard
library. The stub compiles the source under the packed file's own name and runs it in its
own module namespace, so __name__ and __file__ (the packed file: bytes_code counts the bytes
that actually run) are what they were. The source is registered with linecache, so
inspect.getsource (torch.compile reads source) and the traceback module see real lines;
line numbers in tracebacks are those of the unpacked source.

Reviewers can read a packed file back with --unpack.
"""

import argparse
import ast
import base64
import bz2
import hashlib
import os
import lzma
import re
import sys
import zlib

# Each codec: compress function and the module whose .decompress the stub calls.
CODECS = {
    "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME),
    "zlib": lambda b: zlib.compress(b, 9),
    "bz2": lambda b: bz2.compress(b, 9),
}
STUB = (
    "import {codec},base64,linecache as _l\n"
    '_s={codec}.decompress(base64.b85decode("{payload}")).decode()\n'
    "_l.cache[__file__]=(len(_s),None,_s.splitlines(True),__file__)\n"
    'exec(compile(_s,__file__,"exec"))\n'
)
_STUB_RE = re.compile(r'import (\w+),base64.*\n_s=\1\.decompress\(base64\.b85decode\("([^"]*)"\)\)')


def _has_docstring(node):
    return (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str))


def minify(source, keep_docstrings=False):
    """Source without comments, blank lines or docstrings; raises if the meaning could change."""
    tree = ast.parse(source)
    # Code that reads __doc__ (argparse descriptions, ...) would change without docstrings.
    uses_doc = any(isinstance(n, ast.Name) and n.id == "__doc__" or isinstance(n, ast.Attribute) and n.attr == "__doc__"
                   for n in ast.walk(tree))
    if not (keep_docstrings or uses_doc):
        for node in ast.walk(tree):
            if _has_docstring(node):
                node.body = node.body[1:] or [ast.Pass()]
    out = ast.unparse(tree) + "\n"
    if ast.dump(ast.parse(out)) != ast.dump(tree):
        raise ValueError("minified source does not parse back to the same syntax tree")
    return out


def pack(source, codec="auto", keep_docstrings=False):
    """Return (packed script text, minified source, codec used)."""
    small = minify(source, keep_docstrings)
    names = list(CODECS) if codec == "auto" else [codec]
    candidates = []
    for name in names:
        payload = base64.b85encode(CODECS[name](small.encode("utf-8"))).decode("ascii")
        candidates.append(STUB.format(codec=name, payload=payload))
    packed = min(candidates, key=len)
    if unpack(packed) != small:
        raise ValueError("packed script does not decode to the minified source")
    return packed, small, _STUB_RE.match(packed).group(1)


def unpack(packed):
    """The source a packed script runs."""
    m = _STUB_RE.match(packed)
    if not m:
        raise ValueError("not a script written by pack_code.py")
    codec = {"lzma": lzma, "zlib": zlib, "bz2": bz2}[m.group(1)]
    return codec.decompress(base64.b85decode(m.group(2))).decode("utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Typical use: pack, run the packed file for every seed, then ship it with make_record.py.")
    ap.add_argument("script", help="script to pack (or, with --unpack, a packed script)")
    ap.add_argument("-o", "--out", help="where to write the packed script (default: <script>_packed.py)")
    ap.add_argument("--codec", choices=["auto", *CODECS], default="auto", help="compressor (default: smallest)")
    ap.add_argument("--keep-docstrings", action="store_true", help="minify without dropping docstrings")
    ap.add_argument("--unpack", action="store_true", help="print the source a packed script runs, and exit")
    args = ap.parse_args(argv)
    try:
        with open(args.script, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: {args.script}: cannot read: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    try:
        if args.unpack:
            sys.stdout.write(unpack(text))
            return 0
        packed, small, codec = pack(text, args.codec, args.keep_docstrings)
    except (ValueError, SyntaxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or re.sub(r"(\.py)?$", "_packed.py", args.script, count=1)
    if os.path.exists(out) and os.path.samefile(out, args.script):
        print(f"error: -o {out} is the script being packed; it would be replaced", file=sys.stderr)
        return 2
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(packed)
    sizes = [len(s.encode("utf-8")) for s in (text, small, packed)]
    print(f"{args.script}: {sizes[0]} bytes -> minified {sizes[1]} -> packed ({codec}) {sizes[2]} bytes: {out}")
    print(f"code_sha256:{hashlib.sha256(packed.encode('utf-8')).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
