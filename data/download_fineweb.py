"""Download the official cached FineWeb shards and tokenizer from Hugging Face.

The challenge publishes pre-tokenized FineWeb as dataset repos on the Hugging Face Hub, laid out as
  <root>/manifest.json                              which datasets/tokenizers exist, shard counts
  <root>/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
  <root>/tokenizers/<name>.model, <name>.vocab
with <root> = "datasets". sp1024 lives in willdepueoai/parameter-golf (the one openai/parameter-golf
uses); sp8192 in kevclark/parameter-golf (the one the SP8192 records use); sp8192_caseops (CaseOps
text, tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved) in romeerp/parameter-golf-caseops-v1,
the repo the 1.0611 / 1.065 CaseOps records download, with one fineweb_val_bytes_NNNNNN.bin byte
sidecar per validation shard (train_gpt.py scores CaseOps with it). The manifest decides how many
validation shards exist (always all downloaded) and which tokenizer files belong to a variant.

Local layout, under --out (default ./data):
  datasets/fineweb10B_<variant>/...    DATA_PATH for train_gpt.py
  tokenizers/<name>.model              TOKENIZER_PATH for train_gpt.py
  manifests/<owner>__<repo>.json       the manifest that was used

Files already present are kept, so an interrupted download resumes. --dry-run prints the plan
without touching the network (it reads a local manifest if one exists, else states its assumptions).
Without network access the download stops at once with one line saying so. A finished download
writes tokenizer_record.json beside the shards (the tokenizer's sha256, which train_gpt.py checks).

Example:
  python data/download_fineweb.py --variant sp1024 --train-shards 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_text import shard_token_count, write_tokenizer_record  # noqa: E402

# ----------------------------------------------------------------------------- sources

REMOTE_ROOT = "datasets"
VARIANTS = {
    "sp1024": dict(repo="willdepueoai/parameter-golf", vocab_size=1024),
    "sp8192": dict(repo="kevclark/parameter-golf", vocab_size=8192),
    "sp8192_caseops": dict(repo="romeerp/parameter-golf-caseops-v1", vocab_size=8192, val_bytes=True,
                           dataset="fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                           tokenizer="fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"),
}
# Used only when no manifest is at hand (dry run): the published manifests list one val shard.
ASSUMED_VAL_SHARDS = 1
CONNECT_TIMEOUT_S = 5


class DownloadError(Exception):
    pass


@dataclass(frozen=True)
class Fetch:
    remote: str  # path inside the Hugging Face dataset repo
    local: Path  # where it lands under --out


def dataset_name(variant: str) -> str:
    return VARIANTS[variant].get("dataset", f"fineweb10B_{variant}")


def local_path(remote: str, out: Path) -> Path:
    """Map a repo path to --out: strip the remote root so datasets/ and tokenizers/ land under out."""
    parts = Path(remote).parts
    if parts[:1] == (REMOTE_ROOT,):
        parts = parts[1:]
    return out.joinpath(*parts)


def manifest_local_path(repo: str, out: Path) -> Path:
    return out / "manifests" / (repo.replace("/", "__") + ".json")


# ----------------------------------------------------------------------------- planning

@dataclass
class Plan:
    fetches: list[Fetch]
    notes: list[str]


def plan_downloads(variant: str, train_shards: int, out: Path, manifest: dict | None) -> Plan:
    """List every file to fetch for a variant. With manifest=None, fall back to stated assumptions."""
    if train_shards < 0:
        raise ValueError("--train-shards must be >= 0")
    name = dataset_name(variant)
    vocab = VARIANTS[variant]["vocab_size"]
    notes: list[str] = []
    if manifest is None:
        val_shards = ASSUMED_VAL_SHARDS
        tok = VARIANTS[variant].get("tokenizer", f"fineweb_{vocab}_bpe")
        tokenizer_files = [f"tokenizers/{tok}.model", f"tokenizers/{tok}.vocab"]
        notes.append(f"no manifest read: assuming {val_shards} val shard(s) and tokenizer files "
                     f"{', '.join(tokenizer_files)}; a real run takes both from the manifest")
    else:
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
        if entry is None:
            raise ValueError(f"dataset {name} is not in the manifest")
        stats = entry.get("stats") or {}
        val_shards = int(stats["files_val"])
        max_train = int(stats["files_train"])
        if train_shards > max_train:
            raise ValueError(f"{variant} has only {max_train} train shards, {train_shards} requested")
        tok_name = entry.get("tokenizer_name")
        tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
        if tok is None:
            raise ValueError(f"tokenizer {tok_name} is not in the manifest")
        tokenizer_files = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
        if not tokenizer_files:
            raise ValueError(f"tokenizer entry {tok_name} names no files")
    prefix = f"{REMOTE_ROOT}/datasets/{name}"
    remotes = [f"{prefix}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    if VARIANTS[variant].get("val_bytes"):
        remotes += [f"{prefix}/fineweb_val_bytes_{i:06d}.bin" for i in range(val_shards)]
    remotes += [f"{prefix}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    remotes += [f"{REMOTE_ROOT}/{f}" for f in tokenizer_files]
    return Plan([Fetch(r, local_path(r, out)) for r in remotes], notes)


# ----------------------------------------------------------------------------- fetching

def _hf_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        sys.exit("error: huggingface_hub is not installed; run `pip install huggingface_hub`")
    return hf_hub_download


def check_hub_reachable() -> None:
    """One quick connection to the hub, so that an offline machine gets one line now rather than the
    hub client's retries (25 s) and a long traceback."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise DownloadError(f"cannot reach {host}:{port} ({e}); the download needs network access "
                            "(data/tiny works offline: see the README quickstart)") from None


def fetch(repo: str, remote: str, dest: Path) -> None:
    """Download one repo file into the HF cache, then hard-link (or copy) it to dest."""
    try:
        cached = Path(_hf_download()(repo_id=repo, filename=remote, repo_type="dataset"))
    except (ImportError, SystemExit):
        raise
    except Exception as e:  # the hub client's errors have no common base; each is one line here
        raise DownloadError(f"downloading {remote} from {repo} failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    # cache entries are symlinks into a blob store; link the blob itself so dest is a real file
    blob = cached.resolve(strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(blob, tmp)
    except OSError:
        shutil.copy2(blob, tmp)
    tmp.replace(dest)


def load_manifest(repo: str, out: Path) -> dict:
    path = manifest_local_path(repo, out)
    if not path.is_file():
        if not os.environ.get("HF_HUB_OFFLINE"):
            check_hub_reachable()
        fetch(repo, f"{REMOTE_ROOT}/manifest.json", path)
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024", help="tokenizer family (default sp1024)")
    p.add_argument("--train-shards", type=int, default=80,
                   help="train shards to fetch, a prefix of the frozen order; 100M tokens each (default 80)")
    p.add_argument("--out", default="./data", help="local data root (default ./data)")
    p.add_argument("--repo", default=None, help="override the Hugging Face dataset repo for the variant")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched; no network")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    repo = args.repo or VARIANTS[args.variant]["repo"]
    manifest_path = manifest_local_path(repo, out)
    try:
        if args.dry_run:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else None
        else:
            manifest = load_manifest(repo, out)
        plan = plan_downloads(args.variant, args.train_shards, out, manifest)
        if not args.dry_run:
            return download(plan, repo, out, args.variant)
    except (ValueError, KeyError, OSError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_plan(plan, repo, manifest_path, dry_run=True)
    return 0


def print_plan(plan: Plan, repo: str, manifest_path: Path, dry_run: bool) -> None:

    print(f"repo: {repo} (dataset)  manifest: {manifest_path}")
    for note in plan.notes:
        print(f"note: {note}")
    present = sum(f.local.is_file() for f in plan.fetches)
    print(f"files: {len(plan.fetches)} planned, {present} already present")
    for f in plan.fetches:
        state = "present" if f.local.is_file() else ("would fetch" if dry_run else "fetch")
        print(f"{state}: {f.remote} -> {f.local}")


def download(plan: Plan, repo: str, out: Path, variant: str) -> int:
    print_plan(plan, repo, manifest_local_path(repo, out), dry_run=False)
    todo = [f for f in plan.fetches if not f.local.is_file()]
    if todo and not os.environ.get("HF_HUB_OFFLINE"):
        check_hub_reachable()
    for f in todo:
        fetch(repo, f.remote, f.local)
        if f.local.suffix == ".bin":
            shard_token_count(str(f.local))  # fail loudly on a truncated or foreign file
    dataset_dir = out / "datasets" / dataset_name(variant)
    model = next((f.local for f in plan.fetches if f.local.suffix == ".model"), None)
    vocab = VARIANTS[variant]["vocab_size"]
    if model is not None:
        write_tokenizer_record(dataset_dir, model, vocab)
    print(f"done. DATA_PATH={dataset_dir} TOKENIZER_PATH={model} VOCAB_SIZE={vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
