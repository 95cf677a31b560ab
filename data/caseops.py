"""CaseOps: a lossless transform that moves capitalization out of the text into operator characters.

A SentencePiece model trained on the transformed text spends its vocabulary on content instead of
"the/The/THE". Four private-use characters (user-defined pieces 4-7 of
fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model) carry the case:

  U+E001 TITLE    the next letter, the first of a word, is a capital     "Paris"  -> TITLE "paris"
  U+E002 ALLCAPS  every letter of the next word is a capital            "NASA"   -> ALLCAPS "nasa"
  U+E003 CAPNEXT  the next letter, inside a word, is a capital          "iPhone" -> "i" CAPNEXT "phone"
  U+E004 ESC      the next character is a literal operator character from the input

A word is a maximal run of characters for which str.isalpha() holds. Only "caseable" capitals are
lowered: those whose lowercase is one letter that uppercases back to them. Everything else is left
alone, which keeps the transform bijective: 'İ' (lowercases to two characters), the Kelvin sign
(lowercases to 'k', which uppercases to 'K'), titlecase digraphs such as 'ǅ' and capitals with no
lowercase stay literal, and 'ß' or any other lowercase letter is never touched. Letters are lowered
one at a time (str.lower on a whole word would turn a final 'Σ' into 'ς'). Text without caseable
capitals and without operator characters is returned unchanged.

encode_with_costs() also returns, for every output character, the UTF-8 bytes of the original
characters it stands for (0 for an operator, including an ESC), which is what the per-token byte
sidecar is built from (see token_original_bytes).

Command line: `python data/caseops.py encode|decode < in > out` transforms stdin.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = frozenset((TITLE, ALLCAPS, CAPNEXT, ESC))


def _caseable_capitals() -> dict[str, str]:
    """Every capital letter whose case survives lower() then upper() as one letter -> its lowercase."""
    table = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        lo = ch.lower()
        if ch.isalpha() and lo != ch and len(lo) == 1 and lo.isalpha() and lo.upper() == ch:
            table[ch] = lo
    return table


LOWER = _caseable_capitals()
UPPER = {lo: up for up, lo in LOWER.items()}


def utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 byte length of every character of text (int32)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return (1 + (cps >= 0x80).astype(np.int32) + (cps >= 0x800) + (cps >= 0x10000)).astype(np.int32)


# Runs of [^\W\d_]: every alphabetic character plus a few numerics such as '²' (split off below),
# so the text between runs holds no letters.
_ALPHA_RUN = re.compile(r"[^\W\d_]+")


def _encode_word(word: str, out: list[str], src: list[str]) -> None:
    """Append the encoding of one word (a maximal alphabetic run) to out and, aligned with it,
    the original characters to src ("" under each operator)."""
    lows = [LOWER.get(c) for c in word]
    if not any(lows):
        out.append(word)
        src.append(word)
    elif len(word) >= 2 and all(lows):
        out += [ALLCAPS, "".join(lows)]
        src += ["", word]
    else:
        for k, (c, lo) in enumerate(zip(word, lows)):
            if lo:
                out += [TITLE if k == 0 else CAPNEXT, lo]
                src += ["", c]
            else:
                out.append(c)
                src.append(c)


def _copy(run: str, out: list[str], src: list[str]) -> None:
    """Append text without caseable capitals, escaping literal operator characters."""
    for k, piece in enumerate(_OPERATOR.split(run)):
        if k % 2:
            out += [ESC, piece]
            src += ["", piece]
        elif piece:
            out.append(piece)
            src.append(piece)


_OPERATOR = re.compile("([%s])" % "".join(sorted(OPERATORS)))


def encode_with_costs(text: str) -> tuple[str, np.ndarray]:
    """The CaseOps encoding of text, and the original UTF-8 bytes each of its characters stands for."""
    out: list[str] = []
    src: list[str] = []
    pos = 0
    for m in _ALPHA_RUN.finditer(text):
        if m.group().islower():  # the common case: nothing to lower
            continue
        _copy(text[pos:m.start()], out, src)
        for is_word, group in itertools.groupby(m.group(), str.isalpha):
            run = "".join(group)
            if is_word:
                _encode_word(run, out, src)
            else:
                out.append(run)
                src.append(run)
        pos = m.end()
    _copy(text[pos:], out, src)
    lengths = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    is_op = np.fromiter((not s for s in src), dtype=bool, count=len(src))
    costs = utf8_lengths("".join(s or o for o, s in zip(out, src)))
    costs[(np.cumsum(lengths) - lengths)[is_op]] = 0
    return "".join(out), costs


def encode(text: str) -> str:
    return encode_with_costs(text)[0]


def decode(text: str) -> str:
    """Inverse of encode; raises ValueError on an operator that encode cannot have produced there."""
    out: list[str] = []
    pending = None  # TITLE / ALLCAPS / CAPNEXT waiting for its letter, or ESC for its literal
    in_word = allcaps = False
    for c in text:
        if pending == ESC:
            if c not in OPERATORS:
                raise ValueError(f"ESC before {c!r}: only operator characters are escaped")
            out.append(c)
            pending, in_word, allcaps = None, False, False
        elif c in OPERATORS:
            # TITLE/ALLCAPS open a word, CAPNEXT sits inside a mixed-case one, ESC goes anywhere
            if pending is not None or not (c == ESC or (c == CAPNEXT) == in_word and not allcaps):
                raise ValueError(f"operator U+{ord(c):04X} out of place at output offset {len(out)}")
            pending = c
        elif c.isalpha():
            allcaps = allcaps or pending == ALLCAPS
            if pending is not None or allcaps:
                if c not in UPPER:
                    raise ValueError(f"{c!r} follows a case operator but has no caseable capital")
                c = UPPER[c]
            out.append(c)
            pending, in_word = None, True
        else:
            if pending is not None:
                raise ValueError(f"operator U+{ord(pending):04X} not followed by a letter")
            out.append(c)
            in_word = allcaps = False
    if pending is not None:
        raise ValueError("dangling operator at the end of the text")
    return "".join(out)


def token_original_bytes(encoded: str, costs: np.ndarray, pieces: list[bytes]) -> np.ndarray:
    """Original-text bytes of each token of a tokenized CaseOps text.

    pieces are the UTF-8 bytes each token decodes to; together they must spell `encoded` exactly
    (the caller tokenizes text its normalizer leaves unchanged). A token gets the original bytes
    of the characters it covers; a byte-fallback token covering part of a character gets one byte
    per byte of that character when lowering did not change its length, else the character's cost
    falls on the token holding its last byte. Totals are exact: sum == costs.sum()."""
    enc = encoded.encode("utf-8")
    if b"".join(pieces) != enc:
        raise ValueError("the tokens do not spell the encoded text (was it normalized first?)")
    lengths = utf8_lengths(encoded)
    per_byte = np.zeros(len(enc), dtype=np.int64)
    same = np.repeat(costs == lengths, lengths)
    per_byte[same] = 1
    last = np.cumsum(lengths) - 1
    changed = costs != lengths
    per_byte[last[changed]] = costs[changed]
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(per_byte)])
    return np.diff(np.concatenate([[0], cum[ends]])).astype(np.int64)


def is_caseops_tokenizer(sp) -> bool:
    """Whether a SentencePiece model has the four operators as pieces of their own."""
    return all(sp.piece_to_id(op) != sp.unk_id() for op in sorted(OPERATORS))


def piece_bytes(sp) -> list[bytes]:
    """The UTF-8 bytes each token id decodes to inside a text (control tokens: none)."""
    table = []
    for i in range(sp.vocab_size()):
        if sp.is_control(i):
            table.append(b"")
        elif sp.is_byte(i):
            table.append(bytes([int(sp.id_to_piece(i)[1:-1], 16)]))
        else:
            table.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return table


def encode_document(sp, table: list[bytes], text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of a document's CaseOps text and each token's byte cost in the original text.

    The text is first normalized as the tokenizer would (NFKC, whitespace runs collapsed, ends
    stripped), because the official metric counts the bytes of the text the tokens decode to; so
    the costs sum to exactly what the byte LUTs of a plain tokenizer with the same normalizer count."""
    normalized = sp.normalize(text).replace("\u2581", " ")
    encoded, costs = encode_with_costs(normalized)
    # The normalizer is not idempotent on a few sequences ('A' + U+0344 composes to 'Ä' only on a
    # second pass), and the tokens spell the encoded text normalized again: carry each character's
    # cost onto what it became, so every original byte is counted once.
    renormalized, offsets = sp.normalize(encoded, with_offsets=True)
    costs = np.diff(np.concatenate([[0], np.cumsum(costs)])[offsets])
    ids = sp.encode(encoded, out_type=int)
    return ids, token_original_bytes(renormalized.replace("\u2581", " "), costs, [table[i] for i in ids])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("encode", "decode"), help="transform stdin to stdout")
    args = p.parse_args(argv)
    text = sys.stdin.read()
    sys.stdout.write(encode(text) if args.direction == "encode" else decode(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
