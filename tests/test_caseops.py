"""CaseOps: the transform is bijective, its byte sidecar counts the original text exactly, and
train_gpt.py scores every evaluation with those bytes and refuses any tokenizer/data mismatch."""

import json
import random
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SHARED, TINY, log_value, make_args, needs_shared, read_tokens, run_train, write_shard

import caseops as co
from convert_text import VAL_BYTES_MAGIC, read_shard, write_shards

TITLE, ALLCAPS, CAPNEXT, ESC = co.TITLE, co.ALLCAPS, co.CAPNEXT, co.ESC
CASEOPS_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
SP8192_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
CORPUS = SHARED / "corpora" / "english.jsonl"
CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)
# Letters whose case does not round-trip through one character, and other traps: dotted/dotless i,
# sharp s (upper 'SS') and capital sharp s, Kelvin and Angstrom signs, long s, micro sign, final
# sigma, titlecase digraphs, a ligature, Roman numerals (cased but not alphabetic), superscripts
# (alphanumeric, not alphabetic), a combining accent, Georgian, Cherokee, Deseret (4-byte capitals).
TRAPS = "İıiIßẞKÅſµσςΣǅǄǆǈﬁⅫⅻ²³\u0301ႠⴀᏣꭳ𐐀𐐨Ωω"
ALPHABET = ("abcxyzABCXYZ" + "  ..,'-\n\t0129" + "éÉçÇñÑœŒжЖщЩαΑ" + TRAPS + "中文😀" + "".join(sorted(co.OPERATORS)))


def random_texts(n, seed=0, max_len=40):
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.2:  # anything Unicode has, surrogates aside
            yield "".join(chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
                          for _ in range(rng.randrange(max_len)))
        else:
            yield "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(max_len)))


def corpus_texts(n):
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


# --- the transform ------------------------------------------------------------------------------


def test_decode_inverts_encode_on_random_unicode_and_costs_are_the_original_bytes():
    for text in random_texts(3000):
        encoded, costs = co.encode_with_costs(text)
        assert co.decode(encoded) == text
        assert len(costs) == len(encoded) and int(costs.sum()) == len(text.encode("utf-8", "surrogatepass"))


def test_every_cased_character_round_trips_alone_and_inside_words():
    cased = [chr(c) for c in range(sys.maxunicode + 1)
             if chr(c).lower() != chr(c) or chr(c).upper() != chr(c)]
    assert len(cased) > 2500
    for c in cased:
        for text in (c, c * 3, "a" + c + "b", "X" + c, c + "Y" + c, "AB" + c + "CD"):
            assert co.decode(co.encode(text)) == text, (hex(ord(c)), text)


def test_text_without_capitals_or_operators_is_unchanged():
    rng = random.Random(1)
    lower = "abcdefghijklmnopqrstuvwxyz  .,'\n0123éçœжщαßıſµς中😀ǆⅻ²"
    for _ in range(500):
        text = "".join(rng.choice(lower) for _ in range(rng.randrange(60)))
        encoded, costs = co.encode_with_costs(text)
        assert encoded == text
        np.testing.assert_array_equal(costs, co.utf8_lengths(text))


@pytest.mark.parametrize("text, encoded", [
    ("Paris", TITLE + "paris"),
    ("NASA", ALLCAPS + "nasa"),
    ("I am", TITLE + "i am"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("McDonald's", TITLE + "mc" + CAPNEXT + "donald's"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("The CAT", TITLE + "the " + ALLCAPS + "cat"),
    ("ΟΔΟΣ", ALLCAPS + "οδοσ"),  # letter by letter: no final-sigma rewrite
    ("Élan", TITLE + "élan"),
    ("İstanbul", "İstanbul"),  # 'İ'.lower() is two characters: left alone
    ("\u212a", "\u212a"),  # Kelvin sign lowercases to 'k', which uppercases to 'K'
    ("ǅemal", "ǅemal"),  # titlecase digraph
    ("STRAẞE", TITLE + "s" + CAPNEXT + "t" + CAPNEXT + "r" + CAPNEXT + "a" + "ẞ" + CAPNEXT + "e"),  # 'ß'.upper() == 'SS'
    ("CO²X", ALLCAPS + "co²" + TITLE + "x"),  # '²' is no letter, so it ends the word
    ("a" + TITLE + "b", "a" + ESC + TITLE + "b"),
    (ESC + ESC, ESC + ESC + ESC + ESC),
])
def test_case_patterns_map_to_their_operators(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


@pytest.mark.parametrize("bad", [TITLE, "a" + TITLE + "b", CAPNEXT + "a", TITLE + "1", ESC + "a", ALLCAPS + "x" + CAPNEXT + "y",
                                 TITLE + TITLE + "a", "a" + ESC])
def test_decode_rejects_operators_encode_cannot_produce(bad):
    with pytest.raises(ValueError):
        co.decode(bad)


@needs_shared("corpora", "english.jsonl")
def test_decode_inverts_encode_on_the_english_corpus():
    texts = corpus_texts(1000)
    encoded = [co.encode(t) for t in texts]
    assert all(co.decode(e) == t for e, t in zip(encoded, texts))
    assert sum(e != t for e, t in zip(encoded, texts)) > 900  # real text has capitals


# --- byte accounting ----------------------------------------------------------------------------

ADVERSARIAL = ["Hello  world\n\nNew", "  The END  ", "ＡＢＣ ﬁ ① Ⅻ ℌ", "İSTANBUL ǅemal \u212a ẞ ß", "x" + TITLE + "Y" + ESC,
               "emoji 😀 NASA's iPhone", "Ça va? ΟΔΟΣ ЖУК", "e\u0301 E\u0301", "tab\tand\u00a0nbsp",
               "A\u0344 x"]  # the normalizer composes 'A' + U+0344 only on a second pass


def lut_bytes(sp, luts, text):
    ids = torch.tensor([tg.BOS_ID] + sp.encode(text))
    return int(tg.target_bytes(ids[:-1], ids[1:], luts).sum())


@pytest.mark.slow
@needs_shared("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
@needs_shared("tokenizers", "fineweb_8192_bpe.model")
@needs_shared("corpora", "english.jsonl")
def test_sidecar_bytes_equal_the_sp8192_lut_count_and_each_token_costs_its_original_characters():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))
    plain = spm.SentencePieceProcessor(model_file=str(SP8192_MODEL))
    luts = tg.build_byte_luts(plain, plain.vocab_size())
    table = co.piece_bytes(sp)
    ops = {sp.piece_to_id(op) for op in co.OPERATORS}
    assert ops == {4, 5, 6, 7} and co.is_caseops_tokenizer(sp) and not co.is_caseops_tokenizer(plain)
    n_ops = 0
    for k, text in enumerate(ADVERSARIAL + corpus_texts(300)):
        ids, costs = co.encode_document(sp, table, text)
        assert int(costs.sum()) == lut_bytes(plain, luts, text), text[:80]
        if k >= len(ADVERSARIAL) + 40:
            continue  # the per-token check below is quadratic in the document length
        # cumulative bytes after each token = bytes of the original text its prefix decodes to
        spelled = b"".join(table[i] for i in ids).decode("utf-8")
        # per token, where the tokens spell the normalized text's encoding (not after U+0344 & co)
        exact = co.decode(spelled) == sp.normalize(text).replace("\u2581", " ")
        if co.OPERATORS.intersection(text) or not exact:
            continue  # escaped literal operators cost their bytes; checked by the total above
        prefix, cum = b"", 0
        for i, c in zip(ids, costs):
            prefix, cum = prefix + table[i], cum + int(c)
            if i in ops:
                assert c == 0
                n_ops += 1
            try:
                head = prefix.decode("utf-8")
            except UnicodeDecodeError:
                continue  # inside a byte-fallback character
            while head and head[-1] in co.OPERATORS:
                head = head[:-1]  # an operator waiting for its letter decodes to nothing yet
            assert cum == len(co.decode(head).encode("utf-8"))
    assert n_ops > 200


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
@needs_shared("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
@needs_shared("tokenizers", "fineweb_8192_bpe.model")
def test_sidecar_total_equals_the_lut_count_next_to_every_cased_letter_and_combining_mark():
    import unicodedata

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))
    plain = spm.SentencePieceProcessor(model_file=str(SP8192_MODEL))
    luts, table = tg.build_byte_luts(plain, plain.vocab_size()), co.piece_bytes(sp)
    chars = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000 and (
        chr(c).lower() != chr(c) or chr(c).upper() != chr(c) or unicodedata.category(chr(c)) == "Mn")]
    assert len(chars) > 4000
    for c in chars:
        text = "A" + c + "b " + c + "Q"
        assert int(co.encode_document(sp, table, text)[1].sum()) == lut_bytes(plain, luts, text), hex(ord(c))


@needs_shared("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
@needs_shared("tokenizers", "fineweb_8192_bpe.model")
def test_convert_text_caseops_writes_a_sidecar_aligned_with_every_val_shard(tmp_path):
    import sentencepiece as spm
    docs = ADVERSARIAL * 3 + ["The Quick Brown Fox. " * 20, "TRAIN Docs Only"] * 4
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "shards"
    summary = write_shards([json.loads(ln)["text"] for ln in src.read_text().splitlines()], CASEOPS_MODEL, out,
                           val_docs=len(ADVERSARIAL) * 3, shard_tokens=50, caseops=True)
    assert len(summary["files_val"]) >= 3 and len(summary["files_val_bytes"]) == len(summary["files_val"])
    tokens = np.concatenate([read_shard(f) for f in summary["files_val"]])
    nbytes = np.concatenate([read_shard(f, VAL_BYTES_MAGIC) for f in summary["files_val_bytes"]])
    assert [np.fromfile(f, "<i4", 1)[0] for f in summary["files_val_bytes"]] == [VAL_BYTES_MAGIC] * len(summary["files_val"])
    assert len(nbytes) == len(tokens) == summary["tokens_val"]
    emitted_op = np.isin(tokens, [4, 5, 6, 7]) & (np.concatenate([[0], tokens[:-1]]) != 7)  # not an escaped literal
    assert (nbytes[tokens == tg.BOS_ID] == 0).all() and (nbytes[emitted_op] == 0).all() and emitted_op.sum() > 20
    plain = spm.SentencePieceProcessor(model_file=str(SP8192_MODEL))
    luts = tg.build_byte_luts(plain, plain.vocab_size())
    assert int(nbytes.sum()) == summary["bytes_val"] == sum(lut_bytes(plain, luts, t) for t in ADVERSARIAL * 3)
    with pytest.raises(ValueError, match="not a CaseOps tokenizer"):
        write_shards(docs, SP8192_MODEL, tmp_path / "x", val_docs=2, caseops=True)
    with pytest.raises(ValueError, match="pass --caseops"):
        write_shards(docs, CASEOPS_MODEL, tmp_path / "y", val_docs=2)


# --- train_gpt.py -------------------------------------------------------------------------------


def write_sidecar(path, counts, magic=VAL_BYTES_MAGIC):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, 1, len(counts))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(counts, dtype="<u2").tobytes())


def data_dir(tmp_path, sidecar_lengths=None, magic=VAL_BYTES_MAGIC):
    """Two val shards (300 + 201 tokens of data/tiny) and, optionally, sidecars of the given lengths."""
    tokens = read_tokens(TINY / "fineweb_val_000000.bin")[:501]
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:300])
    write_shard(tmp_path / "fineweb_val_000001.bin", tokens[300:])
    counts = np.random.default_rng(0).integers(0, 9, size=sum(sidecar_lengths or []))
    for k, n in enumerate(sidecar_lengths or []):
        write_sidecar(tmp_path / f"fineweb_val_bytes_{k:06d}.bin", counts[:n], magic)
        counts = counts[n:]
    return tokens


@pytest.mark.parametrize("magic", [VAL_BYTES_MAGIC, tg.SHARD_MAGIC])  # ours, and the published sidecars'
def test_load_validation_reads_the_sidecar_parallel_to_the_tokens(tmp_path, magic):
    tokens = data_dir(tmp_path, [300, 201], magic)
    args = make_args(DATA_PATH=str(tmp_path))
    got_tokens, got_bytes = tg.load_validation(args, None)
    assert got_tokens.tolist() == tokens.astype(np.int64).tolist()  # the sidecar is not read as tokens
    expected = np.concatenate([np.fromfile(tmp_path / f"fineweb_val_bytes_{k:06d}.bin", "<u2", offset=1024) for k in (0, 1)])
    assert got_bytes.tolist() == expected.tolist()
    (tmp_path / "fineweb_val_bytes_000001.bin").unlink()
    write_sidecar(tmp_path / "fineweb_val_bytes_000001.bin", np.ones(200))
    with pytest.raises(ValueError, match="500 entries for 501"):
        tg.load_validation(args, None)


def test_lut_val_bytes_are_the_lut_bytes_of_each_target():
    import sentencepiece as spm
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model")), 512)
    tokens = torch.from_numpy(read_tokens(TINY / "fineweb_val_000000.bin")[:400].astype(np.int64))
    b = tg.lut_val_bytes(tokens, luts)
    assert b.dtype == torch.int32 and b[0] == 0 and b.numel() == 400
    assert b[1:].tolist() == tg.target_bytes(tokens[:-1], tokens[1:], luts).tolist()


def caseops_tokenizer_or_skip():
    if not CASEOPS_MODEL.exists():
        pytest.skip(f"{CASEOPS_MODEL} not present (../shared is optional)")
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))


def test_byte_accounting_follows_the_tokenizer_and_refuses_any_mismatch(tmp_path):
    import sentencepiece as spm
    plain = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    bare, with_sidecar = tmp_path / "bare", tmp_path / "sidecar"
    bare.mkdir(), with_sidecar.mkdir()
    data_dir(bare)
    data_dir(with_sidecar, [300, 201])
    assert tg.byte_accounting(make_args(DATA_PATH=str(bare)), plain) == "luts"
    with pytest.raises(tg.ConfigError, match="has fineweb_val_bytes"):
        tg.byte_accounting(make_args(DATA_PATH=str(with_sidecar)), plain)
    with pytest.raises(tg.ConfigError, match="CASEOPS=1"):
        tg.byte_accounting(make_args(DATA_PATH=str(bare), CASEOPS=1), plain)
    caseops = caseops_tokenizer_or_skip()
    assert tg.byte_accounting(make_args(DATA_PATH=str(with_sidecar)), caseops) == "caseops"
    assert tg.byte_accounting(make_args(DATA_PATH=str(with_sidecar), CASEOPS=1), caseops) == "caseops"
    with pytest.raises(tg.ConfigError, match="lacks fineweb_val_bytes"):
        tg.byte_accounting(make_args(DATA_PATH=str(bare)), caseops)
    with pytest.raises(tg.ConfigError, match="CASEOPS=0"):
        tg.byte_accounting(make_args(DATA_PATH=str(with_sidecar), CASEOPS=0), caseops)


def test_artifact_trained_with_other_byte_accounting_is_refused():
    args = make_args()
    tg.check_artifact_accounting({}, args, "old.pgart")  # artifacts from before the key: plain
    tg.check_artifact_accounting({"byte_accounting": "luts"}, args, "a.pgart")
    with pytest.raises(tg.ConfigError, match="byte_accounting:caseops"):
        tg.check_artifact_accounting({"byte_accounting": "caseops"}, args, "a.pgart")
    args.byte_accounting = "caseops"
    with pytest.raises(tg.ConfigError, match="byte_accounting:luts"):
        tg.check_artifact_accounting({}, args, "a.pgart")


@pytest.mark.slow  # over a second of CPU: kept out of the fast tier
def test_every_evaluation_sums_the_given_target_bytes():
    """Standard, sliding, chunk TTT and phased TTT all count exactly val_bytes[1:], whatever the
    tokens are (here: bytes no LUT could produce)."""
    args = make_args(EVAL_SEQ_LEN=48, TTT_CHUNK_TOKENS=96, PHASED_TTT_CHUNK_TOKENS=16, PHASED_TTT_DOCS_PER_BATCH=3,
                     PHASED_TTT_NUM_PHASES=1, PHASED_TTT_PREFIX_DOCS=2)
    tokens = torch.from_numpy(read_tokens(TINY / "fineweb_val_000000.bin")[:700].astype(np.int64))
    val_bytes = torch.from_numpy(np.random.default_rng(3).integers(0, 1000, size=700).astype(np.int32))
    expected = int(val_bytes[1:].sum())
    torch.manual_seed(0)
    model = tg.GPT(args)
    results = [tg.evaluate(model, tokens, val_bytes, args, CPU, 48), tg.evaluate(model, tokens, val_bytes, args, CPU, 16),
               tg.evaluate_ttt(tg.GPT(args), tokens, val_bytes, args, CPU, time.perf_counter()),
               tg.evaluate_phased_ttt(tg.GPT(args), tokens, val_bytes, args, CPU, time.perf_counter())]
    assert [(r.tokens, r.bytes) for r in results] == [(699, expected)] * 4


@pytest.mark.slow
@needs_shared("tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
@needs_shared("tokenizers", "fineweb_8192_bpe.model")
@needs_shared("corpora", "english.jsonl")
def test_train_gpt_scores_a_caseops_dataset_on_its_original_bytes(tmp_path, tiny_env):
    summary = write_shards(corpus_texts(120), CASEOPS_MODEL, tmp_path / "data", val_docs=20, caseops=True)
    env = dict(tiny_env, DATA_PATH=str(tmp_path / "data"), TOKENIZER_PATH=str(CASEOPS_MODEL), VOCAB_SIZE="8192",
               EVAL_SEQ_LEN="128", EVAL_STRIDE="64", TTT_ENABLED="1", TTT_CHUNK_TOKENS="1024", ITERATIONS="4")
    _, log = run_train(env, tmp_path)
    assert "byte_accounting:caseops" in log
    for label in ("final_prequant", "final_roundtrip", "final_sliding", "final_ttt"):
        assert int(log_value(log, label, "bytes")) == summary["bytes_val"]
        assert int(log_value(log, label, "tokens")) == summary["tokens_val"] - 1
    # the plain sp8192 tokenizer on these shards: with the tokenizer record the identity check refuses it;
    # without it the sidecar does
    proc, _ = run_train(dict(env, TOKENIZER_PATH=str(SP8192_MODEL), RUN_ID="plain"), tmp_path, check=False)
    assert proc.returncode != 0 and "sha256" in proc.stderr, proc.stderr
    (tmp_path / "data" / tg.TOKENIZER_RECORD).unlink()
    proc, _ = run_train(dict(env, TOKENIZER_PATH=str(SP8192_MODEL), RUN_ID="plain2"), tmp_path, check=False)
    assert proc.returncode != 0 and "has fineweb_val_bytes" in proc.stderr, proc.stderr
    # a damaged sidecar stops the run before its first step, not after training
    sidecar = sorted((tmp_path / "data").glob("fineweb_val_bytes_*.bin"))[0]
    sidecar.write_bytes(sidecar.read_bytes()[:-2])
    proc, log = run_train(dict(env, RUN_ID="damaged", ARTIFACT_PATH=str(tmp_path / "damaged.pgart")), tmp_path, check=False)
    assert proc.returncode != 0 and sidecar.name in proc.stderr and "\nstep:" not in log.split("code_end")[-1], proc.stderr


def test_download_plan_for_caseops_adds_a_byte_sidecar_per_val_shard(tmp_path, capsys):
    import download_fineweb as dl
    name = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    manifest = {"datasets": [{"name": name, "tokenizer_name": "caseops", "stats": {"files_val": 2, "files_train": 80}}],
                "tokenizers": [{"name": "caseops", "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}]}
    plan = dl.plan_downloads("sp8192_caseops", 1, tmp_path, manifest)
    prefix = f"datasets/datasets/{name}/"
    assert [f.remote for f in plan.fetches] == [
        prefix + "fineweb_val_000000.bin", prefix + "fineweb_val_000001.bin",
        prefix + "fineweb_val_bytes_000000.bin", prefix + "fineweb_val_bytes_000001.bin",
        prefix + "fineweb_train_000000.bin", "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"]
    assert plan.fetches[2].local == tmp_path / "datasets" / name / "fineweb_val_bytes_000000.bin"
    assert dl.main(["--variant", "sp8192_caseops", "--train-shards", "1", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "romeerp/parameter-golf-caseops-v1" in out and f"would fetch: {prefix}fineweb_val_bytes_000000.bin" in out
