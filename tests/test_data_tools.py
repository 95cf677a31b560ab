"""Tests of data/: the shard converter, the embedded tiny dataset and the downloader's plan."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import convert_text
import download_fineweb
import make_tiny
from convert_text import HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, iter_texts, read_shard, write_shard, write_shards

REPO = Path(__file__).resolve().parent.parent

TINY = REPO / "data" / "tiny"
TINY_TOKENIZER = TINY / "tokenizer.model"
SHARED = REPO.parent / "shared"

DOCS = [
    "Anna went to the farm on Monday.",
    "The brown cows eat the hay. Two hens sat near the barn.",
    "Where is the boat? The boat is behind the dock.",
    "Tom had seven apples. He gave three to Ben. Now he has four apples.",
    "It was a rainy day at the market.",
    "The old horse followed the tractor slowly.",
    "Because the bread was warm, Ada baked another cake.",
    "The next day was Tuesday.",
]


def header(path):
    return np.fromfile(path, dtype="<i4", count=256)


def split_docs(tokens):
    """Documents of a BOS-led token stream, each with its BOS."""
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    return [tokens[a:b].tolist() for a, b in zip(starts, starts[1:])]


# ----------------------------------------------------------------------------- shard format

def test_shard_header_holds_magic_version_and_count(tmp_path):
    write_shard(tmp_path / "s.bin", [1, 5, 65535, 0])
    h = header(tmp_path / "s.bin")
    assert (h[0], h[1], h[2]) == (SHARD_MAGIC, SHARD_VERSION, 4)
    assert not h[3:].any()
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 4 * 2
    assert read_shard(tmp_path / "s.bin").tolist() == [1, 5, 65535, 0]


def test_write_shard_refuses_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "s.bin", [1, 65536])
    with pytest.raises(ValueError, match="-1"):
        write_shard(tmp_path / "s.bin", [-1])


def test_read_shard_refuses_bad_magic_and_truncation(tmp_path):
    write_shard(tmp_path / "s.bin", list(range(10)))
    raw = bytearray((tmp_path / "s.bin").read_bytes())
    (tmp_path / "short.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_shard(tmp_path / "short.bin")
    raw[0] ^= 0xFF
    (tmp_path / "magic.bin").write_bytes(raw)
    with pytest.raises(ValueError, match="header"):
        read_shard(tmp_path / "magic.bin")


# ----------------------------------------------------------------------------- converter

def test_round_trip_gives_bos_plus_encode_per_doc_with_val_first(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
    # 40-token shards force documents to straddle files, as in the official export
    summary = write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=3, shard_tokens=40)
    expected = [[1] + sp.encode(d) for d in DOCS]
    val = np.concatenate([read_shard(p) for p in summary["files_val"]])
    train = np.concatenate([read_shard(p) for p in summary["files_train"]])
    assert split_docs(val) == expected[:3]
    assert split_docs(train) == expected[3:]
    assert (summary["docs_val"], summary["docs_train"]) == (3, 5)
    assert summary["tokens_val"] == sum(map(len, expected[:3])) == val.size
    assert summary["tokens_train"] == sum(map(len, expected[3:])) == train.size
    assert len(summary["files_train"]) == -(-train.size // 40)
    assert all(header(p)[2] == 40 for p in summary["files_train"][:-1])
    names = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert names[0] == "fineweb_train_000000.bin" and names[-1].startswith("fineweb_val_")


def test_rewrite_removes_stale_shards(tmp_path):
    write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=3, shard_tokens=10)
    summary = write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=3)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert summary["files_val"] == [str(tmp_path / "fineweb_val_000000.bin")]


def test_caps_stop_at_whole_documents(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
    lengths = [len(sp.encode(d)) + 1 for d in DOCS]
    cap = sum(lengths[2:4]) + 1  # room for two train docs, not three
    summary = write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=2, max_train_tokens=cap)
    assert (summary["docs_train"], summary["tokens_train"]) == (2, cap - 1)
    summary = write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=2, max_docs=5)
    assert (summary["docs_val"], summary["docs_train"]) == (2, 3)


def test_both_splits_must_be_non_empty(tmp_path):
    with pytest.raises(ValueError, match="not enough documents"):
        write_shards(DOCS[:3], TINY_TOKENIZER, tmp_path, val_docs=3)
    with pytest.raises(ValueError, match="val_docs"):
        write_shards(DOCS, TINY_TOKENIZER, tmp_path, val_docs=0)


def test_iter_texts_reads_txt_blocks_and_jsonl_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond line\n\n\n  \nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "  "}) + "\n"
                                      + json.dumps({"text": "fourth", "id": 4}) + "\n")
    assert list(iter_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == [
        "first doc\nsecond line", "second doc", "third", "fourth"]


@pytest.mark.parametrize("content, match", [
    ("not json\n", "JSON object"),
    (json.dumps({"body": "x"}) + "\n", "text"),
    (json.dumps({"text": 5}) + "\n", "string"),
])
def test_iter_texts_rejects_bad_jsonl(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        list(iter_texts([tmp_path / "bad.jsonl"]))


def test_iter_texts_rejects_unknown_extension(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_texts([tmp_path / "x.csv"]))


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "out"
    assert convert_text.main([str(src), "--tokenizer", str(TINY_TOKENIZER), "--out", str(out), "--val-docs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["docs_train"] == len(DOCS) - 2
    assert convert_text.main([str(src), "--tokenizer", str(TINY_TOKENIZER), "--out", str(out), "--val-docs", "99"]) == 1
    assert "not enough documents" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "tokenizers" / "fineweb_1024_bpe.model").is_file(),
                    reason="../shared/tokenizers is not present on this machine")
def test_official_sp1024_conversion_of_shared_corpus(tmp_path):
    model = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
    summary = write_shards(iter_texts([SHARED / "corpora" / "english.jsonl"]), model, tmp_path, val_docs=5,
                           max_docs=20)
    train = read_shard(summary["files_train"][0])
    assert summary["vocab_size"] == 1024 and summary["docs_train"] == 15
    assert train.max() < 1024 and train[0] == 1 and len(split_docs(train)) == 15


# ----------------------------------------------------------------------------- data/tiny

def test_tiny_tokenizer_has_vocab_512_and_official_special_ids():
    sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
    assert sp.vocab_size() == 512
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.mark.parametrize("split, lo, hi", [("train", 250_000, 300_000), ("val", 40_000, 45_000)])
def test_tiny_shards_are_well_formed(split, lo, hi):
    path = TINY / f"fineweb_{split}_000000.bin"
    h = header(path)
    tokens = read_shard(path)
    assert (h[0], h[1]) == (SHARD_MAGIC, SHARD_VERSION)
    assert h[2] == tokens.size and lo <= tokens.size <= hi
    assert tokens.max() < 512
    assert not np.isin(tokens, [0, 2, 3]).any()  # no pad, eos or unk in the text
    docs = split_docs(tokens)
    assert tokens[0] == 1 and min(map(len, docs)) > 20
    if split == "val":
        assert tokens.size % 128 != 0  # eval code must handle a ragged tail


def test_tiny_shards_decode_to_generated_text():
    sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
    first = split_docs(read_shard(TINY / "fineweb_val_000000.bin"))[0]
    expected = " ".join(make_tiny.generate_docs(1, seed=1234)[0].split())  # nmt_nfkc folds newlines
    assert sp.decode(first[1:]) == expected


def test_make_tiny_reproduces_committed_files(tmp_path):
    assert make_tiny.main(["--out", str(tmp_path)]) == 0
    for name in ("tokenizer.model", "fineweb_train_000000.bin", "fineweb_val_000000.bin", "tokenizer_record.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


def test_tiny_dataset_stays_small():
    assert sum(p.stat().st_size for p in TINY.iterdir()) < 1_500_000


# ----------------------------------------------------------------------------- downloader

def fake_manifest(val_files=2, train_files=5):
    return {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": val_files, "files_train": train_files}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }


def test_plan_follows_manifest_and_maps_paths_under_out(tmp_path):
    plan = download_fineweb.plan_downloads("sp1024", 3, tmp_path, fake_manifest())
    remotes = [f.remote for f in plan.fetches]
    assert remotes == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin",
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
    ]
    assert plan.fetches[0].local == tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert plan.fetches[-2].local == tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    assert plan.notes == []


def test_plan_refuses_more_train_shards_than_published(tmp_path):
    with pytest.raises(ValueError, match="only 5"):
        download_fineweb.plan_downloads("sp1024", 6, tmp_path, fake_manifest())
    with pytest.raises(ValueError, match="not in the manifest"):
        download_fineweb.plan_downloads("sp8192", 1, tmp_path, fake_manifest())


def test_dry_run_plans_offline_and_states_assumptions(tmp_path, capsys):
    assert download_fineweb.main(["--variant", "sp8192", "--train-shards", "2", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kevclark/parameter-golf" in out and "note: no manifest read" in out
    assert "would fetch: datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin" in out
    assert str(tmp_path / "tokenizers" / "fineweb_8192_bpe.model") in out
    assert not (tmp_path / "datasets").exists()  # nothing written


def test_dry_run_uses_a_local_manifest_and_sees_present_files(tmp_path, capsys):
    path = download_fineweb.manifest_local_path("willdepueoai/parameter-golf", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(fake_manifest(val_files=1)))
    write_shard(tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", [1, 2])
    assert download_fineweb.main(["--train-shards", "1", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "files: 4 planned, 1 already present" in out and "note:" not in out


def test_download_fetches_plan_into_out_through_the_hub_cache(tmp_path, monkeypatch, capsys):
    """The whole non-dry path against a fake hub: manifest first, then shards and tokenizer files."""
    hub = tmp_path / "hub"
    asked = []

    def fake_hf_hub_download(repo_id, filename, repo_type):
        asked.append((repo_id, filename, repo_type))
        blob = hub / filename
        blob.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith("manifest.json"):
            blob.write_text(json.dumps(fake_manifest(val_files=1, train_files=3)))
        elif filename.endswith(".bin"):
            write_shard(blob, [1, 7, 8])
        else:
            blob.write_text("tokenizer bytes")
        return str(blob)

    monkeypatch.setattr(download_fineweb, "_hf_download", lambda: fake_hf_hub_download)
    monkeypatch.setattr(download_fineweb, "check_hub_reachable", lambda: None)
    out = tmp_path / "data"
    assert download_fineweb.main(["--train-shards", "2", "--out", str(out)]) == 0
    assert asked[0] == ("willdepueoai/parameter-golf", "datasets/manifest.json", "dataset")
    assert len(asked) == 1 + 1 + 2 + 2
    shards = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in shards.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "tokenizer_record.json"]
    assert json.loads((shards / "tokenizer_record.json").read_text())["sha256"] == hashlib.sha256(b"tokenizer bytes").hexdigest()
    assert read_shard(shards / "fineweb_val_000000.bin").tolist() == [1, 7, 8]
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_text() == "tokenizer bytes"
    assert f"DATA_PATH={shards}" in capsys.readouterr().out
    # a second run finds everything present and asks the hub for nothing
    asked.clear()
    assert download_fineweb.main(["--train-shards", "2", "--out", str(out)]) == 0
    assert asked == []


def test_downloader_rejects_bad_arguments(capsys):
    assert download_fineweb.main(["--train-shards", "-1", "--dry-run"]) == 1
    with pytest.raises(SystemExit):
        download_fineweb.main(["--variant", "sp4096"])


def test_missing_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(SystemExit, match="pip install huggingface_hub"):
        download_fineweb._hf_download()
