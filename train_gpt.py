"""Parameter Golf training script: train a small GPT in 10 minutes on 8xH100, export it under
16,000,000 bytes (code + compressed weights) and score it in bits per byte on FineWeb validation.

Every knob is an environment variable (see KNOBS). Runs as `python train_gpt.py` or under
`torchrun --standalone --nproc_per_node=N train_gpt.py`; on CPU it uses gloo, fp32 and no compile.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import glob
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

BOS_ID = 1
SHARD_MAGIC = 20240520
VAL_BYTES_MAGIC = 20240522  # data/convert_text.py --caseops sidecars; published ones reuse SHARD_MAGIC
SHARD_VERSION = 1
CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE, ALLCAPS, CAPNEXT, ESC pieces of a CaseOps tokenizer
SHARD_HEADER_INTS = 256
# Written beside the shards by data/convert_text.py and data/download_fineweb.py: the sha256 of the
# tokenizer that made them. Official shards (fineweb10B_*) without one need an official tokenizer.
TOKENIZER_RECORD = "tokenizer_record.json"
OFFICIAL_TOKENIZERS = {
    "849ea920119b5135ace5016137e82ab397738fc29d723d5f9a6b74c4e31af191": "fineweb_1024_bpe",
    "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516": "fineweb_8192_bpe",
    "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d": "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved",
}
DATA_HINT = ("get FineWeb with `python data/download_fineweb.py --variant sp8192`, or try the bundled tiny "
             "dataset: `env $(cat data/tiny/quickstart.env) python train_gpt.py` (README, quickstart)")
ARTIFACT_MAGIC = b"PGOLFART"
ARTIFACT_VERSION = 2  # 2: payload split into independently compressed chunks

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Each knob: env var name, default, type, one-line meaning. The defaults are the strongest
# configuration we know for 8xH100 / 600 s; the README table is checked against this list.


@dataclass(frozen=True)
class Knob:
    name: str
    default: object
    kind: type | tuple
    help: str
    min: float | None = None


K = Knob


KNOBS = [
    # run and data
    K("DATA_PATH", "./data/datasets/fineweb10B_sp8192", str, "directory with fineweb_{train,val}_*.bin shards"),
    K("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model", str, "SentencePiece model: its identity is checked, its byte LUTs count val bytes (CaseOps: the sidecar does)"),
    K("CASEOPS", "auto", ("auto", "0", "1"), "val bytes from the fineweb_val_bytes_* sidecar (auto: iff the tokenizer is CaseOps; 0/1 also assert it)"),
    K("VOCAB_SIZE", 8192, int, "vocabulary size; must equal the tokenizer's", 2),
    K("RUN_ID", "", str, "log/artifact name (default: a fresh uuid)"),
    K("SEED", 1337, int, "random seed (model init and data order are fixed by it)"),
    K("STRICT_ENV", 0, bool, "1: an unknown env var that looks like a misspelt knob is an error"),
    K("LOG_OVERWRITE", 0, bool, "1: replace an earlier run's logs/<RUN_ID>.txt (0: reusing a RUN_ID is an error)"),
    K("COMPILE", "auto", ("auto", "0", "1"), "torch.compile (auto: on for CUDA)"),
    K("AUTOCAST", "auto", ("auto", "bf16", "off"), "bf16 autocast (auto: on for CUDA)"),
    K("ATTN_BACKEND", "auto", ("auto", "fa4", "fa3", "fa2", "sdpa"), "attention kernel; an unavailable explicit choice is an error"),
    # model shape
    K("NUM_LAYERS", 11, int, "transformer blocks", 1),
    K("MODEL_DIM", 512, int, "residual width", 8),
    K("NUM_HEADS", 8, int, "query heads", 1),
    K("NUM_KV_HEADS", 4, int, "key/value heads (GQA); divides NUM_HEADS", 1),
    K("MLP_MULT", 4.0, float, "MLP hidden width = MLP_MULT * MODEL_DIM", 0.25),
    K("MLP_ACT", "leaky_relu2", ("relu2", "leaky_relu2"), "MLP activation: relu(x)^2 or leaky_relu(x, slope)^2"),
    K("MLP_LEAKY_SLOPE", 0.5, float, "negative slope of leaky_relu2", 0.0),
    K("TIE_EMBEDDINGS", 1, bool, "share the input embedding with the output head"),
    K("TIED_EMBED_INIT_STD", 0.005, float, "init std of the (tied) embedding", 0.0),
    K("ROPE_BASE", 10000.0, float, "RoPE base frequency", 1.0),
    K("ROPE_DIMS", 16, int, "rotate only the first ROPE_DIMS dims of each head (0: all)", 0),
    K("LOGIT_SOFTCAP", 30.0, float, "logits = cap * tanh(logits / cap) (0: off)", 0.0),
    K("QK_GAIN_INIT", 5.0, float, "init of the learned per-head query gain", 0.0),
    K("XSA_LAST_N", 11, int, "exclusive self-attention on the last N layers (0: off)", 0),
    K("LN_SCALE", 1, bool, "scale each block's norm outputs by 1/sqrt(layer+1)"),
    K("SMEAR_GATE", 1, bool, "BOS-safe SmearGate: mix the previous token's embedding into each token"),
    K("SMEAR_GATE_WIDTH", 12, int, "residual dims feeding the SmearGate", 1),
    K("BIGRAM_VOCAB_SIZE", 0, int, "BigramHash buckets (0: off)", 0),
    K("BIGRAM_DIM", 128, int, "BigramHash embedding width", 1),
    K("VE_DIM", 0, int, "value-embedding width (0: off)", 0),
    K("VE_LAYERS", "9,10", str, "comma-separated layers that add value embeddings"),
    K("UNET_SKIPS", 1, bool, "encoder->decoder skip connections with learned weights and gates"),
    K("NUM_LOOPS", 3, int, "passes through layers LOOP_START..LOOP_END once looping is on (1: off)", 1),
    K("LOOP_START", 3, int, "first looped layer", 0),
    K("LOOP_END", 5, int, "last looped layer (inclusive)", 0),
    K("ENABLE_LOOPING_AT", 0.35, float, "training progress at which depth recurrence turns on", 0.0),
    K("PARALLEL_RESIDUAL_START", 7, int, "attention and MLP read the same input from this layer (-1: off)", -1),
    K("ATTN_OUT_GATE", 1, bool, "per-head sigmoid gate on the attention output"),
    K("ATTN_GATE_WIDTH", 12, int, "residual dims feeding the attention output gate", 1),
    K("DOC_MASK", 0, bool, "attend only within the current BOS-delimited document"),
    # training
    K("TRAIN_SEQ_LEN", 2048, int, "training sequence length", 2),
    K("TRAIN_BATCH_TOKENS", 786432, int, "global tokens per optimizer step", 2),
    K("GRAD_ACCUM_STEPS", 0, int, "micro-batches per rank per step (0: 8 // world_size)", 0),
    K("ITERATIONS", 20000, int, "maximum optimizer steps", 0),
    K("MAX_WALLCLOCK_SECONDS", 600.0, float, "training time cap in seconds (0: none)", 0.0),
    K("GPTQ_RESERVE_SECONDS", "auto", float, "seconds of the cap kept for GPTQ calibration and export (auto: predicted from timed samples)", 0.0),
    K("WARMUP_STEPS", 20, int, "compile-priming steps, undone before training", 0),
    K("LR_WARMUP_STEPS", 0, int, "linear LR warmup steps", 0),
    K("WARMDOWN_ITERS", 0, int, "LR warmdown length in steps (0: use WARMDOWN_FRAC)", 0),
    K("WARMDOWN_FRAC", 0.85, float, "LR warmdown as a fraction of training progress", 0.0),
    K("MIN_LR", 0.1, float, "LR floor at the end of warmdown, as a fraction of peak", 0.0),
    K("VAL_LOSS_EVERY", 0, int, "validate every N steps (0: only at the end)", 0),
    K("VAL_BATCH_SIZE", 524288, int, "baseline name; here it only caps EVAL_BATCH_SEQS at VAL_BATCH_SIZE // (EVAL_SEQ_LEN * world_size)", 1),
    K("TRAIN_LOG_EVERY", 100, int, "log a step line every N steps", 1),
    # optimizers
    K("MATRIX_LR", 0.026, float, "Muon learning rate for 2-D weights", 0.0),
    K("SCALAR_LR", 0.02, float, "Adam learning rate for vectors and scalars", 0.0),
    K("TIED_EMBED_LR", 0.03, float, "AdamW learning rate of every embedding table: token (tied or not), BigramHash, value embeddings", 0.0),
    K("HEAD_LR", 0.008, float, "Adam learning rate for an untied output head", 0.0),
    K("MUON_MOMENTUM", 0.97, float, "Muon Nesterov momentum", 0.0),
    K("MUON_MOMENTUM_WARMUP_START", 0.85, float, "Muon momentum at step 0", 0.0),
    K("MUON_MOMENTUM_WARMUP_STEPS", 500, int, "steps to ramp Muon momentum", 0),
    K("MUON_BACKEND_STEPS", 5, int, "orthogonalisation iterations", 1),
    K("MUON_NS", "polar", ("ns5", "polar"), "Newton-Schulz 5 or Polar Express coefficients"),
    K("MUON_ROW_NORMALIZE", 1, bool, "normalise update rows before orthogonalising (MuonEq-R)"),
    K("MUON_WD", 0.095, float, "Muon decoupled weight decay", 0.0),
    K("EMBED_WD", 0.085, float, "AdamW weight decay of the TIED_EMBED_LR group (every embedding table)", 0.0),
    K("ADAM_WD", 0.02, float, "AdamW weight decay of scalars and gates", 0.0),
    K("BETA1", 0.9, float, "Adam beta1", 0.0),
    K("BETA2", 0.99, float, "Adam beta2", 0.0),
    K("ADAM_EPS", 1e-8, float, "Adam epsilon", 0.0),
    K("GRAD_CLIP_NORM", 0.3, float, "global gradient-norm clip (0: off)", 0.0),
    # weight averaging and QAT
    K("AVERAGING", "ema", ("none", "ema", "swa", "ema+swa"), "weights exported: raw, EMA, SWA, or SWA of EMA"),
    K("EMA_DECAY", 0.9965, float, "EMA decay per update (warmed up as (1+n)/(10+n))", 0.0),
    K("EMA_EVERY", 1, int, "update the EMA every N steps", 1),
    K("SWA_EVERY", 50, int, "take an SWA snapshot every N steps", 1),
    K("SWA_START_FRAC", 0.85, float, "training progress from which SWA snapshots are taken", 0.0),
    K("LATE_QAT_THRESHOLD", 0.0, float, "fake-quantize weights once the LR scale drops below this (0: off)", 0.0),
    # quantization and artifact
    K("QUANT", "gptq", ("rtn", "gptq"), "round-to-nearest or full-Hessian GPTQ"),
    K("ATTN_BITS", 6, int, "bits of attention matrices", 2),
    K("MLP_BITS", 6, int, "bits of MLP matrices", 2),
    K("EMBED_BITS", 7, int, "bits of embedding tables", 2),
    K("OTHER_BITS", 8, int, "bits of other matrices (projections, gates)", 2),
    K("ATTN_CLIP_SIGMAS", 13.0, float, "SDClip k for attention: clip at k*std(row)", 0.0),
    K("MLP_CLIP_SIGMAS", 12.0, float, "SDClip k for MLP matrices", 0.0),
    K("EMBED_CLIP_SIGMAS", 15.0, float, "SDClip k for embeddings", 0.0),
    K("OTHER_CLIP_SIGMAS", 16.0, float, "SDClip k for other matrices", 0.0),
    K("CLIP_SEARCH", 0, bool, "per-row search of the clip multiplier minimising error (else fixed SDClip)"),
    K("KEEP_FLOAT_NUMEL", 65536, int, "tensors with fewer elements are stored as fp16", 0),
    K("GPTQ_DAMP", 0.01, float, "GPTQ damping as a fraction of the mean Hessian diagonal", 0.0),
    K("GPTQ_BLOCK_SIZE", 128, int, "GPTQ column block size", 1),
    K("GPTQ_CALIBRATION", "train", ("train", "selfgen"), "calibration data: training batches or self-generated text"),
    K("GPTQ_CALIBRATION_BATCHES", 16, int, "calibration micro-batches in all, split across ranks (train: of the global batch; selfgen: generated)", 1),
    K("LQER_RANK", 4, int, "rank of the low-rank quantization-error correction (0: off)", 0),
    K("LQER_TOP_K", 3, int, "tensors with the largest error that get LQER", 0),
    K("PACK_BITS", 0, bool, "bit-pack quantized values densely (smaller raw, but generic compressors do worse)"),
    K("COMPRESSOR", "rans", ("zstd", "brotli", "lzma", "rans", "auto"), "artifact compressor (rans: per-block-class ANS coding, brotli for the rest; auto: smallest of all)"),
    K("COMPRESSION_LEVEL", -1, int, "compressor level (-1: brotli 10, zstd 22, lzma 9, rans 8: up to that many block classes)", -1),
    K("COMPRESS_WORKERS", 0, int, "processes compressing artifact chunks in parallel (0: one per usable core)", 0),
    K("ARTIFACT_BUDGET", 16000000, int, "bytes allowed for code + model; export lowers bits to fit", 1),
    K("ARTIFACT_PATH", "", str, "artifact file (default logs/<RUN_ID>.pgart)"),
    K("EVAL_ONLY", "", str, "artifact to evaluate instead of training"),
    # evaluation
    K("EVAL_SEQ_LEN", 0, int, "evaluation window length (0: TRAIN_SEQ_LEN)", 0),
    K("EVAL_STRIDE", 64, int, "stride of final_sliding's windows and of chunk TTT's scoring windows (0: no final_sliding; TTT then scores whole windows)", 0),
    K("EVAL_BATCH_SEQS", 32, int, "windows per evaluation forward per rank (capped by VAL_BATCH_SIZE)", 1),
    K("EVAL_MAX_SECONDS", 600.0, float, "time for everything after training; TTT stops adapting to stay inside", 0.0),
    K("TTT_ENABLED", 1, bool, "score-first test-time training (final_ttt)"),
    K("TTT_CHUNK_TOKENS", 32768, int, "tokens scored, then trained on, per TTT chunk", 2),
    K("TTT_EPOCHS", 1, int, "passes over each chunk after scoring it (and over each segment in phased TTT's global phases)", 1),
    K("TTT_LR", 0.005, float, "chunk TTT's peak learning rate (cosine over chunks); also the SGD rate of phased TTT's global phases", 0.0),
    K("TTT_OPTIMIZER", "sgd", ("sgd", "adamw"), "chunk TTT's optimizer (phased TTT's global phases always use SGD)"),
    K("TTT_MOMENTUM", 0.9, float, "TTT SGD momentum / AdamW beta1; also the momentum of phased TTT's global phases", 0.0),
    K("TTT_GRAD_CLIP", 1.0, float, "TTT gradient-norm clip, chunk TTT and phased TTT's global phases (0: off)", 0.0),
    K("TTT_PARAMS", "all", ("all", "norms", "lora", "last_k"), "what TTT trains"),
    K("TTT_LORA_RANK", 8, int, "rank of TTT LoRA adapters", 1),
    K("TTT_LAST_K", 2, int, "layers trained by TTT_PARAMS=last_k", 1),
    K("TTT_BATCH_SEQS", 16, int, "sequences per TTT step, all ranks (chunk TTT and phased TTT's global phases)", 1),
    K("PHASED_TTT_ENABLED", 0, bool, "document TTT with fresh LoRA adapters per document (final_phased_ttt, then the run's score)"),
    K("PHASED_TTT_CHUNK_TOKENS", 48, int, "targets of a document scored, then trained on, per adapter step (at most EVAL_SEQ_LEN)", 1),
    K("PHASED_TTT_LR", 1e-4, float, "AdamW learning rate of the per-document adapters", 0.0),
    K("PHASED_TTT_BETA1", 0.0, float, "AdamW beta1 of the per-document adapters", 0.0),
    K("PHASED_TTT_BETA2", 0.99, float, "AdamW beta2 of the per-document adapters", 0.0),
    K("PHASED_TTT_EPS", 1e-10, float, "AdamW epsilon of the per-document adapters", 0.0),
    K("PHASED_TTT_WD", 0.5, float, "AdamW weight decay of the per-document adapters", 0.0),
    K("PHASED_TTT_LORA_RANK", 80, int, "rank of the per-document LoRA adapters (q/k/v/o, MLP and lm_head)", 1),
    K("PHASED_TTT_LORA_ALPHA", 80.0, float, "adapter output scale alpha/rank", 0.0),
    K("PHASED_TTT_DOCS_PER_BATCH", 64, int, "documents adapted in parallel, each with its own adapters", 1),
    K("PHASED_TTT_NUM_PHASES", 0, int, "global phases: SGD (TTT_LR) on all weights over each scored 1/N of the prefix (0: off)", 0),
    K("PHASED_TTT_PREFIX_DOCS", 2000, int, "leading documents the global phases are spread over", 0),
]


del K


KNOB_BY_NAME = {k.name: k for k in KNOBS}


# Set by launchers and libraries, never knobs; excluded from the misspelling check.
FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"}


# Knobs that define the model and the context it was trained and scored at; the artifact records
# them and EVAL_ONLY takes them from it.
MODEL_KNOBS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "MLP_ACT",
               "MLP_LEAKY_SLOPE", "TIE_EMBEDDINGS", "ROPE_BASE", "ROPE_DIMS", "LOGIT_SOFTCAP", "XSA_LAST_N",
               "LN_SCALE", "SMEAR_GATE", "SMEAR_GATE_WIDTH", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "VE_DIM",
               "VE_LAYERS", "UNET_SKIPS", "NUM_LOOPS", "LOOP_START", "LOOP_END", "PARALLEL_RESIDUAL_START",
               "ATTN_OUT_GATE", "ATTN_GATE_WIDTH", "DOC_MASK", "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN")


class ConfigError(ValueError):
    pass


def parse_knob(knob: Knob, raw: str):
    what = f"{knob.name}={raw!r}"
    if raw == "auto" == knob.default:
        return raw
    if isinstance(knob.kind, tuple):
        if raw not in knob.kind:
            raise ConfigError(f"{what}: expected one of {', '.join(knob.kind)}")
        return raw
    if knob.kind is bool:  # stored as 0/1 like the defaults, so logs compare equal to them
        if raw.lower() not in ("0", "1", "true", "false"):
            raise ConfigError(f"{what}: expected 0 or 1")
        return int(raw.lower() in ("1", "true"))
    if knob.kind is str:
        return raw
    try:
        value = knob.kind(raw)
    except ValueError:
        raise ConfigError(f"{what}: expected {'an integer' if knob.kind is int else 'a number'}") from None
    if not math.isfinite(value) or (knob.min is not None and value < knob.min):
        raise ConfigError(f"{what}: must be a finite value >= {knob.min}")
    return value


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def misspelt_knobs(environ) -> list[tuple[str, str]]:
    """Env vars that are not knobs but a knob in lower case (num_layers) or within a small edit
    distance of one (NUM_LAYER -> NUM_LAYERS)."""
    found = []
    for name in environ:
        if name in KNOB_BY_NAME or name in FOREIGN_ENV:
            continue
        if not name.isupper():
            if name.upper() in KNOB_BY_NAME:
                found.append((name, name.upper()))
            continue
        limit = 2 if len(name) >= 8 else 1
        best = min(KNOBS, key=lambda k: edit_distance(name, k.name))
        if edit_distance(name, best.name) <= limit:
            found.append((name, best.name))
    return found


class Hyperparameters:
    """Resolved knobs as lowercase attributes, plus where each came from."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.sources = {}
        for knob in KNOBS:
            raw = environ.get(knob.name)
            value = knob.default if raw is None else parse_knob(knob, raw)
            setattr(self, knob.name.lower(), value)
            self.sources[knob.name] = "default" if raw is None else "env"
        self.misspelt = misspelt_knobs(environ)
        if self.misspelt and self.strict_env:
            raise ConfigError("; ".join(f"unknown env var {n} (did you mean {k}?)" for n, k in self.misspelt))
        # EVAL_ONLY logs under its own name so it never collides with the training run's log
        stem = os.path.splitext(os.path.basename(self.eval_only))[0]
        self.run_id = self.run_id or (f"{stem}_eval_{uuid.uuid4().hex[:8]}" if self.eval_only else str(uuid.uuid4()))
        self.eval_seq_len = self.eval_seq_len or self.train_seq_len
        self.tokenizer_sha256 = ""  # set by check_inputs once the file has been read
        self.artifact_tokenizer_sha256 = ""  # EVAL_ONLY: the artifact's, set by adopt_artifact_config
        self.adjusted = self.follow_shape()
        self.resolve()

    def follow_shape(self) -> dict[str, str]:
        """Defaults that do not fit the shape follow it (layer indices scale with NUM_LAYERS, widths
        clamp); explicit values never change. Returns {knob: why} for the log."""
        L, ref = self.num_layers, KNOB_BY_NAME["NUM_LAYERS"].default
        head_dim = self.model_dim // self.num_heads
        scaled = lambda name: max(0, min(L - 1, round(KNOB_BY_NAME[name].default * L / ref)))
        loop_end = scaled("LOOP_END") if self.sources["LOOP_END"] == "default" else self.loop_end
        fits = dict(
            XSA_LAST_N=(self.xsa_last_n <= L, L, f"NUM_LAYERS={L}"),
            LOOP_START=(self.loop_start <= self.loop_end < L, min(scaled("LOOP_START"), loop_end), f"NUM_LAYERS={L}"),
            LOOP_END=(self.loop_start <= self.loop_end < L, loop_end, f"NUM_LAYERS={L}"),
            PARALLEL_RESIDUAL_START=(self.parallel_residual_start < L, scaled("PARALLEL_RESIDUAL_START"), f"NUM_LAYERS={L}"),
            VE_LAYERS=(not self.ve_dim or all(0 <= int(i) < L for i in self.ve_layers.split(",")),
                       ",".join(map(str, range(max(0, L - 2), L))), f"NUM_LAYERS={L}"),
            ROPE_DIMS=(self.rope_dims <= head_dim, head_dim - head_dim % 2, f"head_dim={head_dim}"),
            SMEAR_GATE_WIDTH=(self.smear_gate_width <= self.model_dim, self.model_dim, f"MODEL_DIM={self.model_dim}"),
            ATTN_GATE_WIDTH=(self.attn_gate_width <= self.model_dim, self.model_dim, f"MODEL_DIM={self.model_dim}"),
        )
        adjusted = {}
        for name, (ok, value, why) in fits.items():
            if not ok and self.sources[name] == "default":
                setattr(self, name.lower(), value)
                self.sources[name] = "shape"
                adjusted[name] = f"default:{KNOB_BY_NAME[name].default} follows:{why}"
        return adjusted

    def resolve(self):
        """Derived values, then the consistency checks."""
        self.ve_layer_ids = self.parse_layer_list("VE_LAYERS", self.ve_layers) if self.ve_dim else []
        self.byte_accounting = "luts"  # run() resolves it against the tokenizer and DATA_PATH
        self.check()

    def artifact_file(self) -> str:
        """The artifact EVAL_ONLY reads, else the one training writes (default logs/<RUN_ID>.pgart)."""
        return self.eval_only or self.artifact_path or f"logs/{self.run_id}.pgart"

    def parse_layer_list(self, name: str, raw: str) -> list[int]:
        try:
            ids = [int(s) for s in raw.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected comma-separated layer indices") from None
        if any(not 0 <= i < self.num_layers for i in ids):
            raise ConfigError(f"{name}={raw!r}: layer indices must be in [0, NUM_LAYERS)")
        return ids

    def check(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} is not divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0, f"MODEL_DIM/NUM_HEADS={head_dim} must be even for RoPE")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim, f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        need(self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n} exceeds NUM_LAYERS={self.num_layers}")
        need(self.smear_gate_width <= self.model_dim, f"SMEAR_GATE_WIDTH={self.smear_gate_width} exceeds MODEL_DIM")
        need(self.attn_gate_width <= self.model_dim, f"ATTN_GATE_WIDTH={self.attn_gate_width} exceeds MODEL_DIM")
        if self.num_loops > 1:
            need(self.loop_start <= self.loop_end < self.num_layers,
                 f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie within the {self.num_layers} layers")
        need(self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE=1: need at least 2 buckets (one is reserved)")
        for name in ("ATTN_BITS", "MLP_BITS", "EMBED_BITS", "OTHER_BITS"):
            need(2 <= getattr(self, name.lower()) <= 8, f"{name}={getattr(self, name.lower())}: must be 2..8")
        need(self.warmdown_frac <= 1 and self.min_lr <= 1, "WARMDOWN_FRAC and MIN_LR must be <= 1")
        need(self.eval_only or self.train_batch_tokens % self.train_seq_len == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")

    def model_config(self) -> dict:
        """What the artifact records: the model knobs and the tokenizer's identity."""
        return dict({name: getattr(self, name.lower()) for name in MODEL_KNOBS}, TOKENIZER_SHA256=self.tokenizer_sha256)

    def log_lines(self) -> list[str]:
        return [f"config {k.name}:{getattr(self, k.name.lower())} source:{self.sources[k.name]}" for k in KNOBS]

    def adjusted_lines(self) -> list[str]:
        return [f"config_adjusted {n}:{getattr(self, n.lower())} {why}" for n, why in self.adjusted.items()
                if self.sources[n] == "shape"]


# -----------------------------------------------------------------------------
# RUNTIME: DISTRIBUTED, DEVICE, LOG, TIME BUDGETS
# -----------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast: bool
    compile: bool
    log_path: str | None
    log_fd: int | None = None  # held open (and locked, see open_run_log) for the whole run
    log_failed: bool = False
    host_group: object = None  # gloo group for host-side flags under NCCL (None: the default group)
    muted: bool = False  # logs nothing (the warm-up's dummy evaluations)

    def __post_init__(self):
        if self.log_path and self.log_fd is None:
            self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, msg: str, console: bool = True):
        if not self.master or self.muted:
            return
        if console:
            print(msg, flush=True)
        if self.log_fd is None:
            return
        try:
            os.write(self.log_fd, (msg + "\n").encode("utf-8", errors="replace"))
        except OSError as e:  # a full disk must not cost the run: stdout still has every line
            if not self.log_failed:
                print(f"warning: cannot write {self.log_path} ({e.strerror}); the run goes on, stdout has the log",
                      file=sys.stderr, flush=True)
            self.log_failed = True

    def autocast_ctx(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """Whether flag is set on any rank, agreed through a host-side all-reduce: no device sync."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def setup_runtime(args: Hyperparameters) -> Runtime:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    host_group = None
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    on_cuda = device.type == "cuda"
    use_autocast = on_cuda if args.autocast == "auto" else args.autocast == "bf16"
    use_compile = on_cuda if args.compile == "auto" else args.compile == "1"
    log_path = f"logs/{args.run_id}.txt" if rank == 0 else None
    log_fd = open_run_log(log_path, args.log_overwrite) if log_path else None
    return Runtime(rank, world_size, local_rank, device, use_autocast, use_compile, log_path, log_fd, host_group=host_group)


def open_run_log(path: str, overwrite: bool) -> int:
    """Create the run's log, locked until the process ends, so that one log is one run: an earlier
    run's log is replaced only with overwrite, a live run's never. It is locked under a temporary
    name before it appears, so no other run sees it unlocked."""
    d = os.path.dirname(path) or "."
    fd, tmp = None, None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".log-")
        os.fchmod(fd, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if overwrite and os.path.exists(path):
            held = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(held)
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except OSError as e:
        if fd is not None:
            os.close(fd)
        if isinstance(e, FileExistsError):
            raise ConfigError(f"{path} exists: an earlier run used RUN_ID={os.path.basename(path)[:-4]}; "
                              "choose another RUN_ID or set LOG_OVERWRITE=1 to replace that log") from None
        if isinstance(e, BlockingIOError):
            raise ConfigError(f"{path} is being written by a running process with the same RUN_ID") from None
        raise ConfigError(f"cannot create the log {path}: {e.strerror}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return fd


@dataclass
class Code:
    path: str
    text: bytes

    @property
    def nbytes(self) -> int:
        return len(self.text)


def read_code() -> Code:
    """The file that runs (read once: the log's copy, its hash and bytes_code all come from it)."""
    path = os.path.abspath(__file__)
    with open(path, "rb") as f:
        return Code(path, f.read())


def log_run_header(rt: Runtime, args: Hyperparameters, code: Code):
    path = code.path
    rt.log(f"code path:{path} bytes_code:{code.nbytes} code_sha256:{hashlib.sha256(code.text).hexdigest()}")
    rt.log("code_begin", console=False)
    rt.log(code.text.decode("utf-8", errors="replace").rstrip("\n"), console=False)
    rt.log("code_end", console=False)
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    rt.log(f"launch world_size:{rt.world_size} nproc_per_node:{nproc} script:{os.path.basename(path)}")
    cuda = torch.version.cuda or "none"
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    count = torch.cuda.device_count() if rt.device.type == "cuda" else 1
    rt.log(f"env python:{platform.python_version()} torch:{torch.__version__} cuda:{cuda} device:{rt.device.type} "
           f"device_name:{name.replace(' ', '_')} device_count:{count} compile:{int(rt.compile)} autocast:{int(rt.autocast)}")
    for line in args.log_lines() + args.adjusted_lines():
        rt.log(line)
    for name_, knob in args.misspelt:
        rt.log(f"warning: unknown env var {name_} looks like the knob {knob} (ignored; STRICT_ENV=1 makes this an error)")


class TimeBudget:
    """A wallclock budget, the one training and every evaluation use: its start and limit, time left
    out while paused (periodic validation), rates (seconds per unit of work) per kind measured from
    timed calls, leaving out each (kind, shape)'s first call because it may compile, an answer all
    ranks agree on without a device sync, and one stop line, stop_line(at, elapsed_s)."""

    def __init__(self, rt: Runtime, start: float, limit_s: float, stop_line):
        self.rt, self.start, self.limit_s, self.stop_line = rt, start, limit_s, stop_line
        self.measured: dict[str, list[float]] = {}  # kind -> [seconds, units]
        self.first_calls: set = set()
        self.stopped, self.paused_s, self.queued = False, 0.0, None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused_s

    @contextlib.contextmanager
    def paused(self):
        self.rt.sync()
        started = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - started

    @contextlib.contextmanager
    def timed(self, kind: str, shape, units: float):
        started = time.perf_counter()
        yield
        self.rt.sync()
        if (kind, shape) in self.first_calls:
            spent = self.measured.setdefault(kind, [0.0, 0.0])
            spent[0] += time.perf_counter() - started
            spent[1] += units
        self.first_calls.add((kind, shape))

    def seconds(self, kind: str, units: float) -> float:
        spent, done = self.measured.get(kind, (0.0, 0.0))
        return spent / done * units if done else 0.0

    def pace(self):
        """Call once a training step is queued: wait only for the step before it, so the host runs
        at most one step ahead of the device and its clock lags by at most one step."""
        if self.rt.device.type == "cuda":
            done, self.queued = self.queued, torch.cuda.Event()
            self.queued.record()
            if done is not None:
                done.synchronize()

    def allows(self, need_s: float, at: str | None, all_ranks: bool = True) -> bool:
        """Whether need_s more seconds fit. With all_ranks every rank calls it at the same point and
        all get the same answer; once refused (here or on any rank), always refused. The first
        refusal logs the stop line at `at` (None: the caller logs it)."""
        elapsed = self.elapsed()
        over = self.stopped or elapsed + need_s > self.limit_s
        if all_ranks:
            over = self.rt.any_rank(over)
        if over and not self.stopped:
            self.stopped = True
            if at is not None:
                self.rt.log(self.stop_line(at, elapsed))
        return not over


# -----------------------------------------------------------------------------
# DATA: SHARDS, LOADER, TOKENIZER, BYTE ACCOUNTING
# -----------------------------------------------------------------------------


def shard_token_count(path: str, magics: tuple[int, ...] = (SHARD_MAGIC,)) -> int:
    """Validate an official shard's header and length; return its token count."""
    size = os.path.getsize(path)
    if size < SHARD_HEADER_INTS * 4:
        raise ValueError(f"{path}: truncated shard ({size} bytes, smaller than the {SHARD_HEADER_INTS * 4}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] not in magics:
        raise ValueError(f"{path}: bad shard header magic {header[0]} (expected {' or '.join(map(str, magics))})")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * count
    if size != expected:
        raise ValueError(f"{path}: file is {size} bytes but its header promises {count} tokens ({expected} bytes); truncated or corrupt")
    return count


def load_shard(path: str, vocab_size: int) -> np.ndarray:
    count = shard_token_count(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(count,))
    if count and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens


def shard_files(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")  # not the fineweb_val_bytes_* sidecar
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {split} shards match {pattern} (set DATA_PATH)")
    return files


def load_validation_tokens(data_path: str, vocab_size: int) -> Tensor:
    tokens = np.concatenate([load_shard(f, vocab_size) for f in shard_files(data_path, "val")])
    if tokens.size < 2:
        raise ValueError(f"validation shards under {data_path} hold {tokens.size} tokens; need at least 2")
    return torch.from_numpy(tokens.astype(np.int64))


class TokenStream:
    """Endless walk over the train shards. Every rank walks the same stream; take() returns only
    this rank's slice of each global chunk, so ranks read disjoint spans and the global batch does
    not depend on the world size."""

    def __init__(self, data_path: str, vocab_size: int):
        self.files = shard_files(data_path, "train")
        self.vocab_size = vocab_size
        self.file_idx = -1
        self.pos = 0
        self.tokens = np.zeros(0, dtype=np.uint16)
        self.next_file()

    def next_file(self):
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = load_shard(self.files[self.file_idx], self.vocab_size)
        self.pos = 0

    def read(self, n: int, keep: bool) -> list[np.ndarray]:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.next_file()
                continue
            k = min(n, len(self.tokens) - self.pos)
            if keep:
                parts.append(np.asarray(self.tokens[self.pos:self.pos + k]))
            self.pos += k
            n -= k
        return parts

    def take(self, global_tokens: int, rank: int, world_size: int) -> np.ndarray:
        """Next global chunk of global_tokens + 1 tokens (inputs and shifted targets); this rank's
        overlapping slice of local + 1 tokens."""
        local = global_tokens // world_size
        self.read(rank * local, keep=False)
        mine = np.concatenate(self.read(local + 1, keep=True))
        self.pos -= 1  # the extra target token is only peeked: it starts the next slice
        self.read(global_tokens - (rank + 1) * local, keep=False)
        return mine


class TrainLoader:
    def __init__(self, args: Hyperparameters, rt: Runtime, grad_accum: int):
        self.stream = TokenStream(args.data_path, args.vocab_size)
        self.args, self.rt, self.grad_accum = args, rt, grad_accum

    def next_batch(self) -> list[tuple[Tensor, Tensor]]:
        """One optimizer step's micro-batches for this rank."""
        a, rt = self.args, self.rt
        chunk = torch.from_numpy(self.stream.take(a.train_batch_tokens, rt.rank, rt.world_size).astype(np.int64))
        x = chunk[:-1].view(-1, a.train_seq_len)
        y = chunk[1:].view(-1, a.train_seq_len)
        seqs = x.size(0) // self.grad_accum
        return [(x[i * seqs:(i + 1) * seqs].to(rt.device, non_blocking=True),
                 y[i * seqs:(i + 1) * seqs].to(rt.device, non_blocking=True)) for i in range(self.grad_accum)]


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path}: no such file")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"tokenizer {path} has vocab size {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_tokenizer_identity(args: Hyperparameters, artifact_sha: str = "") -> str:
    """Set args.tokenizer_sha256 and check it against the shards' record (else the official
    tokenizers) and the artifact's: another tokenizer of the same vocab size silently changes val_bpb."""
    sha = args.tokenizer_sha256 = file_sha256(args.tokenizer_path)
    mine = f"TOKENIZER_PATH={args.tokenizer_path} (sha256 {sha})"
    record = os.path.join(args.data_path, TOKENIZER_RECORD)
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            want = json.load(f)["sha256"]
        if want != sha:
            raise ConfigError(f"{mine} is not the tokenizer the shards were made with ({record}: sha256 {want})")
        checked = "record"
    elif sha in OFFICIAL_TOKENIZERS:
        checked = f"official:{OFFICIAL_TOKENIZERS[sha]}"
    elif os.path.basename(os.path.normpath(args.data_path)).startswith("fineweb10B_"):
        raise ConfigError(f"{mine} is not an official tokenizer, but {args.data_path} holds official shards "
                          f"(no {TOKENIZER_RECORD} names another tokenizer)")
    else:
        checked = "none"
    if artifact_sha and artifact_sha != sha:
        raise ConfigError(f"{mine} is not the tokenizer the EVAL_ONLY artifact was trained with (sha256 {artifact_sha})")
    return checked + (",artifact" if artifact_sha else "")


def check_inputs(args: Hyperparameters) -> str:
    """Everything the run reads or writes, checked before the first step so that a bad input never
    costs a trained model (a train shard's token range is checked when it is first loaded)."""
    if not os.path.isdir(args.data_path):
        raise ConfigError(f"DATA_PATH={args.data_path} does not exist; {DATA_HINT}")
    if not os.path.isfile(args.tokenizer_path):
        raise ConfigError(f"TOKENIZER_PATH={args.tokenizer_path}: no such file; {DATA_HINT}")
    try:
        if sum(load_shard(path, args.vocab_size).size for path in shard_files(args.data_path, "val")) < 2:
            raise ValueError(f"validation shards under {args.data_path} hold fewer than 2 tokens")
        for path in [] if args.eval_only else shard_files(args.data_path, "train"):
            shard_token_count(path)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not args.eval_only:
        art = args.artifact_file()
        d = os.path.dirname(art) or "."
        if os.path.isdir(art) or not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise ConfigError(f"ARTIFACT_PATH={art}: " + ("is a directory" if os.path.isdir(art) else
                              f"directory {d} does not exist or is not writable"))
    return check_tokenizer_identity(args, args.artifact_tokenizer_sha256)


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token UTF-8 byte counts as the official scorer defines them: base bytes of the piece
    without its leading-space marker, whether it has that marker (worth one byte unless the previous
    token is a boundary), and which tokens are boundaries (control/unknown/unused)."""
    base = np.zeros(vocab_size, dtype=np.int64)
    space = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary)


def target_bytes(prev: Tensor, tgt: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    base, space, boundary = luts
    return base[tgt] + (space[tgt] & ~boundary[prev]).to(torch.int64)


def lut_val_bytes(tokens: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """LUT bytes of every target of a token stream, parallel to it (int32; position 0 gets 0)."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), target_bytes(tokens[:-1], tokens[1:], luts)]).int()


def byte_accounting(args: Hyperparameters, sp: spm.SentencePieceProcessor) -> str:
    """'caseops' (target bytes from the validation sidecar) or 'luts'. A CaseOps tokenizer's pieces
    are not the original text, so its LUT bytes would be wrong; a sidecar beside plain shards means
    the shards are not what the tokenizer says. Every mismatch, and a CASEOPS knob that disagrees,
    is an error rather than a silently wrong val_bpb."""
    caseops = all(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS)
    sidecar = bool(glob.glob(os.path.join(args.data_path, "fineweb_val_bytes_*.bin")))
    if args.caseops != "auto" and (args.caseops == "1") != caseops:
        raise ConfigError(f"CASEOPS={args.caseops} but TOKENIZER_PATH={args.tokenizer_path} is "
                          f"{'' if caseops else 'not '}a CaseOps tokenizer")
    if sidecar != caseops:
        raise ConfigError(f"DATA_PATH={args.data_path} {'has' if sidecar else 'lacks'} fineweb_val_bytes_*.bin but "
                          f"TOKENIZER_PATH={args.tokenizer_path} is {'' if caseops else 'not '}a CaseOps tokenizer")
    return "caseops" if caseops else "luts"


def load_validation(args: Hyperparameters, luts) -> tuple[Tensor, Tensor]:
    """Validation tokens and, parallel to them, the bytes of each target (position 0 is never one):
    LUT bytes, or with luts=None the CaseOps sidecar. Every evaluation sums these."""
    tokens = load_validation_tokens(args.data_path, args.vocab_size)
    if luts is not None:
        return tokens, lut_val_bytes(tokens, luts)
    files = sorted(glob.glob(os.path.join(args.data_path, "fineweb_val_bytes_*.bin")))
    counts = [np.fromfile(f, dtype="<u2", count=shard_token_count(f, (VAL_BYTES_MAGIC, SHARD_MAGIC)),
                          offset=SHARD_HEADER_INTS * 4) for f in files]
    nbytes = torch.from_numpy(np.concatenate(counts).astype(np.int32))
    if nbytes.numel() != tokens.numel():
        raise ValueError(f"{len(files)} fineweb_val_bytes_* files hold {nbytes.numel()} entries for {tokens.numel()} validation tokens")
    return tokens, nbytes


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class QuantWeight(nn.Module):
    """A module whose `weight` the export quantizes. Late QAT fake-quantizes it with the export's
    own quantizer; the switch is a tensor, so flipping it never invalidates a compiled graph."""

    def init_qat(self, bits: int, clip_sigmas: float, clip_search: bool):
        self.qat = (bits, clip_sigmas, clip_search)
        self.register_buffer("qat_alpha", torch.zeros((), device=self.weight.device), persistent=False)

    def qweight(self) -> Tensor:
        if getattr(self, "qat", None) is None:
            return self.weight
        return fake_quantize(self.weight, *self.qat, self.qat_alpha)


class CastedLinear(QuantWeight):
    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.zero_init = zero_init
        self.lora: LoRA | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.qweight().to(x.dtype))
        return y if self.lora is None else y + self.lora(x)


class Embedding(QuantWeight):
    def __init__(self, num: int, dim: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim) * std)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight())


class LoRA(nn.Module):
    """Low-rank adapter added to a linear map during test-time training, its output scaled by
    `scale` (alpha/rank). With batch > 0 every row of the input batch has its own adapter: A (batch,
    rank, in), B (batch, out, rank), all rows starting equal, so a row's result does not depend on
    its position in the batch; an input of n < batch rows uses the first n adapters."""

    def __init__(self, in_features: int, out_features: int, rank: int, device, batch: int = 0, scale: float = 1.0):
        super().__init__()
        lead = (batch,) if batch else ()
        a = torch.randn(rank, in_features, device=device) / math.sqrt(in_features)
        self.a = nn.Parameter(a.repeat(*lead, 1, 1))
        self.b = nn.Parameter(torch.zeros(*lead, out_features, rank, device=device))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        a, b = (self.a, self.b) if self.a.dim() == 2 else (self.a[:x.size(0)], self.b[:x.size(0)])
        return x @ a.mT.to(x.dtype) @ (b.mT * self.scale).to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate the first `dims` channels of x (B, T, H, D); the rest pass through."""
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)[None, :, None, :]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        rot, rest = x[..., :self.dims], x[..., self.dims:]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


FLASH_PACKAGES = {"fa4": "flash_attn.cute (pip flash-attn-4, CuTe DSL)", "fa3": "flash_attn_interface (FlashAttention 3)",
                  "fa2": "flash_attn"}


def load_flash_attention(backend: str):
    """The FlashAttention module for fa4/fa3/fa2, or None when it is not installed."""
    try:
        if backend == "fa4":
            import flash_attn.cute as fa
        elif backend == "fa3":
            import flash_attn_interface as fa
        else:
            import flash_attn as fa
        return fa
    except ImportError:
        return None


def select_attention_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """(backend, reason). auto: FA3 on Hopper, else FA4 on Hopper or newer, else FA2 on CUDA, else
    SDPA; an explicit request that cannot be met is an error, never a silent downgrade."""
    if requested == "sdpa":
        return "sdpa", "requested"
    on_cuda = device.type == "cuda"
    if requested in FLASH_PACKAGES:
        if not on_cuda:
            raise RuntimeError(f"ATTN_BACKEND={requested} needs a CUDA device")
        if load_flash_attention(requested) is None:
            raise RuntimeError(f"ATTN_BACKEND={requested} but {FLASH_PACKAGES[requested]} is not installed")
        return requested, "requested"
    if not on_cuda:
        return "sdpa", "no_cuda"
    major = torch.cuda.get_device_capability(device)[0]
    if major == 9 and load_flash_attention("fa3") is not None:
        return "fa3", "auto_hopper"
    if major >= 9 and load_flash_attention("fa4") is not None:
        return "fa4", "auto_fa3_unavailable"
    if load_flash_attention("fa2") is not None:
        return "fa2", "auto_fa3_unavailable"
    return "sdpa", "auto_flash_attn_not_installed"


@torch.compiler.disable
def varlen_segments(doc_ids: Tensor) -> tuple[Tensor, int]:
    """cu_seqlens of the documents in a flattened (B*T) batch; sequences also cut at batch rows."""
    B, T = doc_ids.shape
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = new.flatten().nonzero().flatten().to(torch.int32)
    cu = torch.cat([starts, torch.tensor([B * T], device=doc_ids.device, dtype=torch.int32)])
    return cu, T


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str, doc_ids: Tensor | None) -> Tensor:
    """Causal GQA attention; q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D). With doc_ids, tokens
    attend only within their own document."""
    if backend == "sdpa":
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if doc_ids is None:
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        else:
            T = q.size(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            mask = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
            y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], enable_gqa=True)
        return y.transpose(1, 2)
    fa = load_flash_attention(backend)
    if doc_ids is None:
        out = fa.flash_attn_func(q, k, v, causal=True)
    else:
        B, T, H, D = q.shape
        cu, max_len = varlen_segments(doc_ids)
        flat = lambda t: t.reshape(B * T, t.size(2), D)
        out = fa.flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                        max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True)
        out = (out[0] if isinstance(out, tuple) else out).view(B, T, H, D)
    return out[0] if isinstance(out, tuple) else out


class Attention(nn.Module):
    def __init__(self, args: Hyperparameters, xsa: bool, backend: str):
        super().__init__()
        dim, self.h, self.hkv = args.model_dim, args.num_heads, args.num_kv_heads
        self.d = dim // self.h
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, self.hkv * self.d)
        self.c_v = CastedLinear(dim, self.hkv * self.d)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.h,), args.qk_gain_init))
        self.rotary = Rotary(args.rope_dims or self.d, args.rope_base)
        self.xsa, self.backend = xsa, backend
        self.gate = nn.Parameter(torch.zeros(self.h, args.attn_gate_width)) if args.attn_out_gate else None

    def forward(self, x: Tensor, ve: Tensor | None, doc_ids: Tensor | None) -> Tensor:
        B, T, dim = x.shape
        q = self.c_q(x).view(B, T, self.h, self.d)
        k = self.c_k(x).view(B, T, self.hkv, self.d)
        v = self.c_v(x).view(B, T, self.hkv, self.d)
        if ve is not None:
            v = v + ve.view(B, T, self.hkv, self.d)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(x.dtype)[:, None]
        k = self.rotary(rms_norm(k))
        y = attend(q, k, v, self.backend, doc_ids)
        if self.xsa:
            # Exclusive self-attention: drop the component along the token's own value direction.
            # Query heads are grouped per KV head; broadcasting over the group avoids copying V.
            vhat = F.normalize(v, dim=-1)[:, :, :, None]
            y = y.view(B, T, self.hkv, self.h // self.hkv, self.d)
            y = (y - (y * vhat).sum(-1, keepdim=True) * vhat).view(B, T, self.h, self.d)
        if self.gate is not None:
            g = 2 * torch.sigmoid(F.linear(x[..., :self.gate.size(1)], self.gate.to(x.dtype)))
            y = y * g[..., None]
        return self.proj(y.reshape(B, T, dim))


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        hidden = int(args.mlp_mult * args.model_dim)
        self.fc = CastedLinear(args.model_dim, hidden)
        self.proj = CastedLinear(hidden, args.model_dim, zero_init=True)
        self.slope = args.mlp_leaky_slope if args.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, args: Hyperparameters, layer: int, backend: str):
        super().__init__()
        dim = args.model_dim
        self.attn = Attention(args, layer >= args.num_layers - args.xsa_last_n, backend)
        self.mlp = MLP(args)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))
        self.ln = 1 / math.sqrt(layer + 1) if args.ln_scale else 1.0
        self.parallel = 0 <= args.parallel_residual_start <= layer

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, doc_ids: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.ln
        a = self.attn_scale.to(x.dtype) * self.attn(h, ve, doc_ids)
        if self.parallel:
            return x + a + self.mlp_scale.to(x.dtype) * self.mlp(h)
        x = x + a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln)


class BigramHash(nn.Module):
    """Hashed embedding of (previous token, token). Positions whose token is BOS, and the first
    position of a window, use a reserved bucket, so nothing hashes across a document boundary."""

    def __init__(self, buckets: int, bdim: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.emb = Embedding(buckets, bdim, 0.02)
        self.proj = CastedLinear(bdim, dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, ids: Tensor) -> Tensor:
        prev, cur = ids[:, :-1], ids[:, 1:]
        h = torch.bitwise_xor(prev * 1000003, cur * 92821) % (self.buckets - 1)
        h = torch.where(cur == BOS_ID, self.buckets - 1, h)
        return torch.cat([torch.full_like(ids[:, :1], self.buckets - 1), h], dim=1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale.to(torch.float32) * self.proj(self.emb(self.bucket_ids(ids)))


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(w . x_t[:width]) * x_{t-1}, zeroed where token t is BOS."""

    def __init__(self, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width))
        self.lam = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = self.lam.to(x.dtype) * torch.sigmoid(x[:, 1:, :self.w.numel()] @ self.w.to(x.dtype))
        g = g * (ids[:, 1:] != BOS_ID).to(x.dtype)
        return torch.cat([x[:, :1], x[:, 1:] + g[..., None] * x[:, :-1]], dim=1)


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters, backend: str = "sdpa"):
        super().__init__()
        self.args = args
        dim, L, V = args.model_dim, args.num_layers, args.vocab_size
        self.tok_emb = Embedding(V, dim, args.tied_embed_init_std)
        self.bigram = BigramHash(args.bigram_vocab_size, args.bigram_dim, dim) if args.bigram_vocab_size else None
        self.smear = SmearGate(args.smear_gate_width) if args.smear_gate else None
        kv_dim = args.num_kv_heads * (dim // args.num_heads)
        self.ve_emb = Embedding(V, args.ve_dim, 0.02) if args.ve_dim else None
        self.ve_proj = CastedLinear(args.ve_dim, kv_dim, zero_init=True) if args.ve_dim else None
        self.ve_layers = set(args.ve_layer_ids)
        self.blocks = nn.ModuleList([Block(args, i, backend) for i in range(L)])
        self.n_enc = L // 2 if args.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(self.n_enc, dim)) if self.n_enc else None
        self.skip_gates = nn.Parameter(torch.zeros(self.n_enc, dim)) if self.n_enc else None
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, V, zero_init=True)
        self.head_lora: LoRA | None = None  # phased TTT's per-document output adapter
        self.looping = False
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def layer_order(self) -> list[int]:
        a, L = self.args, self.args.num_layers
        if not self.looping or a.num_loops <= 1:
            return list(range(L))
        loop = list(range(a.loop_start, a.loop_end + 1))
        return list(range(a.loop_start)) + loop * a.num_loops + list(range(a.loop_end + 1, L))

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, ids)
        x0 = x
        doc_ids = torch.cumsum(ids == BOS_ID, dim=1) if self.args.doc_mask else None
        ve = self.ve_proj(self.ve_emb(ids)) if self.ve_emb is not None else None
        skips = {}
        for i in self.layer_order():
            src = 2 * self.n_enc - 1 - i
            if self.n_enc <= i and 0 <= src and src in skips:
                k = i - self.n_enc
                x = x + torch.sigmoid(self.skip_gates[k]).to(x.dtype) * self.skip_weights[k].to(x.dtype) * skips[src]
            x = self.blocks[i](x, x0, ve if i in self.ve_layers else None, doc_ids)
            if i < self.n_enc:
                skips[i] = x
        return rms_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        w = self.tok_emb.qweight() if self.lm_head is None else self.lm_head.qweight()
        logits = F.linear(h, w.to(h.dtype))
        logits = (logits if self.head_lora is None else logits + self.head_lora(h)).float()
        cap = self.args.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_nll(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (B, T) in fp32."""
        logits = self.logits(self.hidden(ids))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)


# -----------------------------------------------------------------------------
# OPTIMIZERS AND SCHEDULE
# -----------------------------------------------------------------------------


NS5_COEFFS = (3.4445, -4.7750, 2.0315)


# Polar Express per-iteration coefficients (arXiv:2505.16932), tuned with a 2% safety margin;
# iterations past the fifth reuse the last tuple.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: Tensor, steps: int, method: str) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of G, or of each matrix of a stack G (..., m, n),
    with an odd matrix polynomial iteration."""
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    out_shape = X.shape
    X = X.reshape(-1, *X.shape[-2:])
    norm = X.norm(dim=(-2, -1), keepdim=True)
    if method == "polar":
        X = X / (norm * 1.02 + 1e-7)
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    else:
        X = X / (norm + 1e-7)
        coeffs = [NS5_COEFFS] * steps
    for a, b, c in coeffs:  # X <- a X + (b A + c A^2) X with A = X X^T, scalings fused into the matmuls
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    X = X.view(out_shape)
    return (X.mT if transposed else X).to(G.dtype)


class MuonBank:
    """Same-shape matrices of one param group, updated as one batch. This rank owns params[lo:hi]:
    their momentum and their orthogonalisation; `gathered` receives every rank's share. All buffers
    are allocated once."""

    def __init__(self, group: dict, params: list[Tensor], rank: int, world_size: int):
        self.group, self.params = group, params
        n, shape = len(params), params[0].shape
        self.chunk = -(-n // world_size)
        self.lo, self.hi = min(n, rank * self.chunk), min(n, (rank + 1) * self.chunk)
        new = lambda k: torch.zeros(k, *shape, device=params[0].device, dtype=params[0].dtype)
        self.grads, self.momentum = new(self.hi - self.lo), new(self.hi - self.lo)
        self.send = new(self.chunk) if world_size > 1 else None
        self.gathered = new(world_size * self.chunk) if world_size > 1 else None
        self.scale = math.sqrt(max(1.0, shape[0] / shape[1]))


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> optional row normalisation (MuonEq-R) -> orthogonalisation, scaled by
    sqrt(max(1, rows/cols)), with decoupled weight decay. Same-shape matrices form banks that are
    orthogonalised as one batch (compiled on CUDA). Across ranks each rank orthogonalises a
    contiguous share of every bank and the shares are all-gathered asynchronously, each gather
    overlapping the next bank's work, so all ranks apply the identical update without repeating it.
    A missing gradient counts as zero."""

    compiled_orthogonalize = None  # one compiled wrapper for every instance: graphs built while priming are reused

    def __init__(self, params, lr: float, momentum: float, steps: int, method: str, row_normalize: bool,
                 weight_decay: float, rank: int = 0, world_size: int = 1, compile: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.steps, self.method, self.row_normalize = steps, method, row_normalize
        self.rank, self.world_size = rank, world_size
        if compile and Muon.compiled_orthogonalize is None:
            Muon.compiled_orthogonalize = torch.compile(orthogonalize, dynamic=False)
        self.compiled = Muon.compiled_orthogonalize if compile else None
        self.banks = []
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            self.banks += [MuonBank(group, ps, rank, world_size) for ps in by_shape.values()]
        for bank in self.banks:
            for p, buf in zip(bank.params[bank.lo:bank.hi], bank.momentum):
                self.state[p]["momentum_buffer"] = buf

    def local_update(self, bank: MuonBank) -> Tensor:
        """The orthogonalised update of this rank's share of the bank."""
        g, buf, m = bank.grads, bank.momentum, bank.group["momentum"]
        torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in bank.params[bank.lo:bank.hi]], out=g)
        buf.mul_(m).add_(g)
        g.add_(buf, alpha=m)
        if self.row_normalize:
            g.div_(g.norm(dim=-1, keepdim=True) + 1e-7)
        return (self.compiled or orthogonalize)(g, self.steps, self.method) * bank.scale

    @staticmethod
    def apply(bank: MuonBank, update: Tensor):
        lr, wd = bank.group["lr"], bank.group["weight_decay"]
        torch._foreach_mul_(bank.params, 1 - lr * wd)
        torch._foreach_add_(bank.params, list(update[:len(bank.params)].unbind(0)), alpha=-lr)

    @torch.no_grad()
    def step(self):
        pending = []
        for bank in self.banks:
            if self.world_size == 1:
                self.apply(bank, self.local_update(bank))
                continue
            if bank.hi > bank.lo:
                bank.send[:bank.hi - bank.lo].copy_(self.local_update(bank))
            pending.append((bank, dist.all_gather_into_tensor(bank.gathered, bank.send, async_op=True)))
        for bank, work in pending:
            work.wait()
            self.apply(bank, bank.gathered)


def build_optimizers(model: GPT, args: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon for hidden matrices, AdamW for embeddings, the untied head and all vectors/scalars."""
    matrix, embed, head = [], [], []
    for m in model.modules():
        if m is model.lm_head:
            head.append(m.weight)
        elif isinstance(m, CastedLinear):
            matrix.append(m.weight)
        elif isinstance(m, Embedding):
            embed.append(m.weight)
    taken = {id(p) for p in matrix + embed + head}
    scalar = [p for p in model.parameters() if id(p) not in taken]
    groups = [dict(params=embed, lr=args.tied_embed_lr, weight_decay=args.embed_wd),
              dict(params=scalar, lr=args.scalar_lr, weight_decay=args.adam_wd)]
    if head:
        groups.append(dict(params=head, lr=args.head_lr, weight_decay=0.0))
    adam = torch.optim.AdamW(groups, betas=(args.beta1, args.beta2), eps=args.adam_eps,
                             fused=rt.device.type == "cuda")
    muon = Muon(matrix, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, args.muon_ns,
                args.muon_row_normalize, args.muon_wd, rt.rank, rt.world_size,
                compile=rt.compile and rt.device.type == "cuda")
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [adam, muon]


def training_seconds(args: Hyperparameters) -> float:
    """The training loop's time: the wallclock cap less the GPTQ/export reserve (inf without a cap)."""
    return max(args.max_wallclock_seconds - args.gptq_reserve_seconds, 1e-3) if args.max_wallclock_seconds > 0 else math.inf


def training_progress(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Fraction of training done: by steps, or by elapsed time when a wallclock cap is set
    (whichever is further), where the cap excludes the time reserved for GPTQ and export."""
    return min(max(step / max(args.iterations, 1), elapsed_ms / (1000 * training_seconds(args))), 1.0)


def warmdown_fraction(args: Hyperparameters, step_ms: float) -> float:
    if args.warmdown_iters <= 0:
        return args.warmdown_frac
    by_steps = args.warmdown_iters / max(args.iterations, 1)
    if args.max_wallclock_seconds <= 0:
        return min(1.0, by_steps)
    # whichever limit ends the run first: ITERATIONS, or the wallclock at the measured step time
    return min(1.0, max(by_steps, args.warmdown_iters * step_ms / (1000 * training_seconds(args))))


def lr_scale(args: Hyperparameters, step: int, progress: float, warmdown: float) -> float:
    """Linear warmup over LR_WARMUP_STEPS, flat, then a linear warmdown to MIN_LR at progress 1."""
    scale = 1.0
    if warmdown > 0 and progress > 1 - warmdown:
        scale = args.min_lr + (1 - args.min_lr) * max(0.0, 1 - progress) / warmdown
    if args.lr_warmup_steps > 0:
        scale *= min(1.0, (step + 1) / args.lr_warmup_steps)
    return scale


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------


def setup_late_qat(model: GPT, args: Hyperparameters):
    """Give every weight the export will quantize its fake-quantizer (off until switched on)."""
    for name, m in quantizable_modules(model):
        spec = quant_spec(name, m.weight.numel(), args)
        if spec:
            m.init_qat(*spec, args.clip_search)


def set_late_qat(model: GPT, on: bool):
    for _, m in quantizable_modules(model):
        if getattr(m, "qat", None) is not None:
            m.qat_alpha.fill_(float(on))


class WeightAverager:
    """fp32 EMA of the weights and/or SWA snapshots (of the raw weights, or of the EMA for ema+swa)."""

    def __init__(self, model: GPT, args: Hyperparameters):
        self.args, self.mode = args, args.averaging
        self.params = [p for p in model.state_dict().values() if p.is_floating_point()]
        self.ema = [p.detach().float().clone() for p in self.params] if "ema" in self.mode else None
        self.swa_sum, self.swa_n, self.ema_n = None, 0, 0

    def ema_decay(self, n: int) -> float:
        """Decay of the n-th EMA update: warmed up as (1+n)/(10+n) so that short runs do not export
        mostly the initial weights, capped at EMA_DECAY."""
        return min(self.args.ema_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, step: int, progress: float):
        a = self.args
        if self.ema is not None and step % a.ema_every == 0:
            self.ema_n += 1
            torch._foreach_lerp_(self.ema, [p.float() for p in self.params], 1 - self.ema_decay(self.ema_n))
        if "swa" in self.mode and progress >= a.swa_start_frac and step % a.swa_every == 0:
            src = self.ema if self.mode == "ema+swa" else [p.float() for p in self.params]
            if self.swa_sum is None:
                self.swa_sum = [t.clone() for t in src]
            else:
                torch._foreach_add_(self.swa_sum, src)
            self.swa_n += 1

    @torch.no_grad()
    def apply(self, model: GPT, rt: Runtime) -> str:
        """Load the averaged weights into the model; returns what was exported, truthfully."""
        if "swa" in self.mode and self.swa_n == 0:
            rt.log(f"warning: AVERAGING={self.mode} but no SWA snapshot was taken (SWA_START_FRAC not reached)")
        if "swa" in self.mode and self.swa_n:
            src, used = [t / self.swa_n for t in self.swa_sum], self.mode
        elif self.ema is not None:
            src, used = self.ema, "ema"
        else:
            src, used = None, "none"
        if src is not None:
            for p, s in zip(self.params, src):
                p.copy_(s)
        rt.log(f"averaging exported:{used} ema_updates:{self.ema_n} swa_snapshots:{self.swa_n}")
        return used


def all_reduce_grads(params: list[Tensor], rt: Runtime):
    if rt.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG if rt.device.type == "cuda" else dist.ReduceOp.SUM)
    if rt.device.type != "cuda":  # gloo has no AVG
        flat /= rt.world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()


def train_step(model_fn, model: GPT, opts, micro_batches, args: Hyperparameters, rt: Runtime) -> Tensor:
    total = torch.zeros((), device=rt.device)
    for x, y in micro_batches:
        with rt.autocast_ctx():
            loss = model_fn(x, y)
        (loss / len(micro_batches)).backward()
        total += loss.detach()
    params = list(model.parameters())
    all_reduce_grads(params, rt)
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm)
    for opt in opts:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total / len(micro_batches)


def grad_accum_steps(args: Hyperparameters, rt: Runtime) -> int:
    accum = args.grad_accum_steps or (8 // rt.world_size if 8 % rt.world_size == 0 else 1)
    if args.train_batch_tokens % (rt.world_size * accum * args.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} is not divisible by world_size {rt.world_size} "
                          f"x GRAD_ACCUM_STEPS {accum} x TRAIN_SEQ_LEN {args.train_seq_len}")
    return accum


def prime_compile(model: GPT, model_fn, args: Hyperparameters, rt: Runtime, loader: TrainLoader):
    """Compile, before the clock starts, every graph the run will use: WARMUP_STEPS real steps
    (plain, then looped), then with COMPILE the evaluation graphs at their real shapes, then restore
    the initial weights; optimizers are rebuilt by the caller."""
    if args.warmup_steps:
        t0 = time.perf_counter()
        initial = copy.deepcopy(model.state_dict())
        opts = build_optimizers(model, args, rt)
        for i in range(args.warmup_steps):
            model.looping = args.num_loops > 1 and i >= args.warmup_steps // 2
            train_step(model_fn, model, opts, loader.next_batch(), args, rt)
        model.load_state_dict(initial)
        model.looping = False
        rt.sync()
        rt.log(f"warmup steps:{args.warmup_steps} ms:{1000 * (time.perf_counter() - t0):.0f} (compile priming, weights restored)")
    if rt.compile:
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):  # eager and compiled runs draw the same
            prime_eval_graphs(model, args, rt)


def prime_eval_graphs(model: GPT, args: Hyperparameters, rt: Runtime):
    """Run each compiled evaluation once on a dummy stream, at the shapes of the real one: the
    training model's evaluation (periodic validation, final_prequant) in each layer order it may
    have, then, on a fresh model built like the artifact's (no fake-quantizers, the final layer
    order), the standard/sliding evaluation and chunk TTT's scoring and training step. Phased TTT
    runs eagerly and compiles nothing. Each line gives a first call's time (compile + one run); the
    dummy evaluations themselves log nothing."""
    quiet = replace(rt, muted=True)
    dummy = torch.arange(max(2 * args.eval_seq_len, args.ttt_chunk_tokens + 2) + 1) % args.vocab_size
    dummy_bytes = torch.ones_like(dummy, dtype=torch.int32)
    final_looping = args.num_loops > 1 and args.enable_looping_at < 1
    artifact_like = GPT(args, model.blocks[0].attn.backend).to(rt.device)
    artifact_like.looping = final_looping
    calls = [(f"eval_training_model looping:{int(looping)}", model, looping, lambda m: evaluate(m, dummy, dummy_bytes, args, quiet, args.eval_seq_len))
             for looping in sorted({final_looping} | ({False, True} if args.val_loss_every and args.num_loops > 1 else set()))]
    calls.append((f"eval_artifact_model looping:{int(final_looping)}", artifact_like, final_looping,
                  lambda m: evaluate(m, dummy, dummy_bytes, args, quiet, args.eval_seq_len)))
    if args.ttt_enabled:
        calls.append(("ttt_score_and_step", artifact_like, final_looping,
                      lambda m: evaluate_ttt(m, dummy[:args.ttt_chunk_tokens + 2], dummy_bytes[:args.ttt_chunk_tokens + 2], args, quiet, time.perf_counter())))
    for name, target, looping, call in calls:
        t0 = time.perf_counter()
        target.looping = looping
        call(target)
        rt.sync()
        rt.log(f"compile_warmup graph:{name} ms:{1000 * (time.perf_counter() - t0):.0f}")
    model.looping = False


@dataclass
class TrainResult:
    steps: int
    train_ms: float  # the training loop's time, periodic validation left out
    loader: TrainLoader  # where calibration continues: data the model has not seen


def train(model: GPT, args: Hyperparameters, rt: Runtime, val_tokens: Tensor | None, val_bytes: Tensor | None) -> TrainResult:
    accum = grad_accum_steps(args, rt)
    model_fn = torch.compile(model) if rt.compile else model
    prime_compile(model, model_fn, args, rt, TrainLoader(args, rt, accum))
    loader = TrainLoader(args, rt, accum)
    opts = build_optimizers(model, args, rt)
    averager = WeightAverager(model, args)
    qat_on = False
    step, step_ms = 0, 0.0
    rt.sync()
    budget = TimeBudget(rt, time.perf_counter(), training_seconds(args),
                        lambda at, elapsed: f"stopping_early: wallclock_cap train_time:{1000 * elapsed:.0f} step:{at}")
    while True:
        last = step == args.iterations
        if val_tokens is not None and args.val_loss_every and step > 0 and (last or step % args.val_loss_every == 0):
            with budget.paused():
                train_ms = 1000 * budget.elapsed()
                r = evaluate(model, val_tokens, val_bytes, args, rt, args.eval_seq_len)
                rt.log(f"step:{step}/{args.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
                       f"train_time:{train_ms:.0f} step_avg:{train_ms / max(step, 1):.2f}")
        if last:
            break
        elapsed = 1000 * budget.elapsed()
        progress = training_progress(args, step, elapsed)
        if args.num_loops > 1 and not model.looping and progress >= args.enable_looping_at:
            model.looping = True
            rt.log(f"looping_enabled step:{step} train_time:{elapsed:.0f} layers:{','.join(map(str, model.layer_order()))}")
        scale = lr_scale(args, step, progress, warmdown_fraction(args, step_ms))
        if args.late_qat_threshold > 0 and not qat_on and step >= args.lr_warmup_steps and scale < args.late_qat_threshold:
            set_late_qat(model, True)
            qat_on = True
            rt.log(f"late_qat_enabled step:{step} lr_scale:{scale:.4f}")
        mom_frac = min(1.0, step / args.muon_momentum_warmup_steps) if args.muon_momentum_warmup_steps else 1.0
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
                if isinstance(opt, Muon):
                    g["momentum"] = (1 - mom_frac) * args.muon_momentum_warmup_start + mom_frac * args.muon_momentum
        loss = train_step(model_fn, model, opts, loader.next_batch(), args, rt)
        step += 1
        averager.update(step, progress)
        budget.pace()
        elapsed = 1000 * budget.elapsed()
        step_ms = elapsed / step
        stop = not budget.allows(0.0, None)
        if stop or step % args.train_log_every == 0 or step == args.iterations:
            loss = rt.all_reduce(loss.detach().clone()) / rt.world_size
            rt.log(f"step:{step}/{args.iterations} train_loss:{loss.item():.4f} train_time:{elapsed:.0f} "
                   f"step_avg:{step_ms:.2f} tok_s:{args.train_batch_tokens / step_ms * 1000:.0f}")
        if stop:
            rt.log(budget.stop_line(f"{step}/{args.iterations}", elapsed / 1000))
            break
    rt.sync()
    train_ms = 1000 * budget.elapsed()
    averager.apply(model, rt)
    return TrainResult(step, train_ms, loader)


# -----------------------------------------------------------------------------
# QUANTIZATION (shared by late QAT and export)
# -----------------------------------------------------------------------------


def quant_class(name: str) -> str:
    if name.endswith("emb"):
        return "embed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "other"


def quant_spec(name: str, numel: int, args: Hyperparameters, bits_override: dict | None = None):
    """(bits, clip_sigmas) for a QuantWeight module's weight, or None to keep it in fp16 (small
    tensors, unless budget fitting put them in bits_override)."""
    bits = (bits_override or {}).get(name)
    if bits is None and numel < args.keep_float_numel:
        return None
    cls = quant_class(name)
    return bits or getattr(args, f"{cls}_bits"), getattr(args, f"{cls}_clip_sigmas")


def quantizable_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, QuantWeight):
            yield name, m


SCALE_STEPS = 32  # row scales on a log2 grid of 32 steps per octave (k moves <= 1.1%): a u8 code each


def snap_scales(s: Tensor) -> Tensor:
    """Row scales rounded to the log grid, at most 255 steps below the tensor's largest."""
    codes = torch.round(SCALE_STEPS * torch.log2(s))
    return torch.exp2(torch.maximum(codes, codes.max() - 255) / SCALE_STEPS)


def row_scales(w: Tensor, bits: int, clip_sigmas: float, clip_search: bool) -> Tensor:
    """Per-row step size (rows, 1), on the stored grid. SDClip: clip at k*std(row); with
    clip_search, each row picks the k in a small grid that minimises its round-to-nearest error."""
    qmax = 2 ** (bits - 1) - 1
    std = w.std(dim=1, keepdim=True, correction=0)
    to_scale = lambda k: snap_scales((k * std / qmax).clamp_min(1e-7))
    if not clip_search:
        return to_scale(clip_sigmas)
    best, best_err = None, None
    for f in (0.4, 0.55, 0.7, 0.85, 1.0, 1.2):
        s = to_scale(clip_sigmas * f)
        err = (w - quantize_rtn(w, s, bits) * s).square().sum(1, keepdim=True)
        best = s if best is None else torch.where(err < best_err, s, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return snap_scales(best)


def quantize_rtn(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


def fake_quantize(w: Tensor, bits: int, clip_sigmas: float, clip_search: bool, alpha: Tensor) -> Tensor:
    """Straight-through fake quantization: forward sees the export's dequantized weight when
    alpha == 1, the gradient passes through unchanged."""
    wd = w.detach().float()
    s = row_scales(wd, bits, clip_sigmas, clip_search)
    dq = quantize_rtn(wd, s, bits) * s
    return w + alpha.to(w.dtype) * (dq.to(w.dtype) - w.detach())


def gptq_quantize(w: Tensor, H: Tensor, scale: Tensor, bits: int, damp: float, block: int) -> Tensor:
    """GPTQ with act-order: quantize columns in order of decreasing Hessian diagonal, pushing each
    column's rounding error onto the not-yet-quantized columns through the Cholesky factor of H^-1."""
    W = w.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.size(0), device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale[:, 0]), -qmax, qmax)
            Q[:, i1 + i] = q
            err = (col - q * scale[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@torch.no_grad()
def collect_hessians(model: GPT, batches, rt: Runtime) -> dict[str, Tensor]:
    """H = X^T X of every quantized matrix's input over the calibration batches (summed across ranks).
    The tied embedding, used as the output head, gets the Hessian of the final-norm output."""
    hess, hooks = {}, []
    for name, m in quantizable_modules(model):
        if isinstance(m, CastedLinear):
            def hook(mod, inp, name=name):
                x = inp[0].detach().reshape(-1, inp[0].size(-1)).float()
                with torch.autocast(x.device.type, enabled=False):  # accumulate in fp32, not bf16
                    hess[name] = hess.get(name, 0) + x.T @ x
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        for x, _ in batches:
            with rt.autocast_ctx():
                h = model.hidden(x)
            if model.lm_head is None:
                h = h.reshape(-1, h.size(-1)).float()
                hess["tok_emb"] = hess.get("tok_emb", 0) + h.T @ h
    finally:
        for hk in hooks:
            hk.remove()
    for name in sorted(hess):
        rt.all_reduce(hess[name])
    return hess


@torch.no_grad()
def self_generated_batches(model: GPT, args: Hyperparameters, rt: Runtime, n_batches: int, seqs: int):
    """Calibration text sampled from the model itself (temperature 1), starting at BOS."""
    g = torch.Generator(device=rt.device).manual_seed(args.seed + 1000 * rt.rank)
    out = []
    for _ in range(n_batches):
        ids = torch.full((seqs, 1), BOS_ID, device=rt.device, dtype=torch.long)
        for _ in range(args.train_seq_len - 1):
            with rt.autocast_ctx():
                logits = model.logits(model.hidden(ids)[:, -1])
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)
            ids = torch.cat([ids, nxt], dim=1)
        out.append((ids, None))
    return out


def calibration_batches(model: GPT, args: Hyperparameters, rt: Runtime, loader: TrainLoader):
    """Training data the model has not yet seen (never validation data), or self-generated text."""
    if args.gptq_calibration == "selfgen":
        seqs = max(1, args.train_batch_tokens // (args.train_seq_len * rt.world_size * loader.grad_accum))
        return self_generated_batches(model, args, rt, -(-args.gptq_calibration_batches // rt.world_size), seqs)
    # Whole global batches, so every world size calibrates on the same tokens.
    batches = []
    while len(batches) * rt.world_size < args.gptq_calibration_batches:
        batches.extend(loader.next_batch())
    return batches


@dataclass
class QTensor:
    q: Tensor            # int8 values in [-qmax, qmax]
    scale: Tensor        # fp32 per-row step on the SCALE_STEPS grid
    bits: int
    lqer: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # int4 A, fp16 per-column A scales, int4 B, fp16 per-row B scales

    def dequantize(self) -> Tensor:
        w = self.q.float() * self.scale.float()
        if self.lqer is not None:
            qa, sa, qb, sb = self.lqer
            w = w + (qa.float() * sa.float()) @ (qb.float() * sb.float())
        return w


LQER_QMAX = 7  # LQER factors in int4: at rank 4 they correct almost as well as int8 at half the bytes


def quantize_lqer_factor(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int4 with one fp16 scale per rank component (reduced over dim)."""
    s = (x.abs().amax(dim=dim, keepdim=True) / LQER_QMAX).clamp_min(1e-7).half()
    return torch.clamp(torch.round(x / s.float()), -LQER_QMAX, LQER_QMAX).to(torch.int8), s


def quantize_tensor(w: Tensor, H: Tensor | None, bits: int, clip: float, args: Hyperparameters) -> tuple[QTensor, float]:
    """GPTQ (or round-to-nearest) of one matrix, with its Hessian-weighted squared error."""
    scale = row_scales(w, bits, clip, args.clip_search)
    if args.quant == "gptq" and H is not None:
        q = gptq_quantize(w, H.to(w.device), scale, bits, args.gptq_damp, args.gptq_block_size)
    else:
        q = quantize_rtn(w, scale, bits)
    E = w - q * scale
    err = float((E @ H.to(w.device) * E).sum()) if H is not None else float(E.square().sum())
    return QTensor(q.to(torch.int8).cpu(), scale.cpu(), bits), err


def lqer_factors(w: Tensor, qt: QTensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(w - qt.dequantize(), full_matrices=False)
    r = min(rank, S.numel())
    return (*quantize_lqer_factor(U[:, :r] * S[:r], 0), *quantize_lqer_factor(Vh[:r], 1))


def quantize_model(model: GPT, args: Hyperparameters, hessians: dict[str, Tensor],
                   bits_override: dict | None = None, cache: dict | None = None) -> tuple[dict, dict]:
    """State dict -> {name: QTensor or fp16 tensor}, plus the Hessian-weighted error of each
    quantized tensor (the proxy used to place LQER and to choose what budget fitting lowers).
    cache maps (tensor, bits) to finished work, so a refit only quantizes what it changed."""
    cache = {} if cache is None else cache
    specs = {}
    for name, m in quantizable_modules(model):
        spec = quant_spec(name, m.weight.numel(), args, bits_override)
        if spec:
            specs[name + ".weight"] = (name, spec)
    out, errors, state = {}, {}, model.state_dict()
    for key, t in state.items():
        if key not in specs:
            out[key] = t.detach().to(torch.float16 if t.is_floating_point() else t.dtype).cpu()
            continue
        name, (bits, clip) = specs[key]
        if (key, bits) not in cache:
            cache[key, bits] = quantize_tensor(t.detach().float(), hessians.get(name), bits, clip, args)
        out[key], errors[key] = cache[key, bits]
    if args.lqer_rank > 0:
        for key in sorted(errors, key=errors.get, reverse=True)[:args.lqer_top_k]:
            bits = out[key].bits
            if (key, bits, "lqer") not in cache:
                cache[key, bits, "lqer"] = lqer_factors(state[key].detach().float().cpu(), out[key], args.lqer_rank)
            out[key] = replace(out[key], lqer=cache[key, bits, "lqer"])
    return out, errors


# Bytes per byte of Gaussian entropy of the rounded values, measured on a record-size payload of
# random weights (bench/RESULTS.md); trained weights code up to ~0.5% smaller. Default: brotli's.
CODER_OVERHEAD = {"zstd": 1.0155, "rans": 0.9994}


LQER_FACTOR_BYTES = 0.4  # an int4 factor value clipped at its column's absmax: ~3.1 bits coded


SCALE_CODE_BYTES = 0.5  # a row scale's u8 grid code: rows of a tensor span a few octaves at most


TENSOR_TABLE_BYTES = 20  # per state-dict entry: compressed JSON table entry + chunk table share


def estimate_quantized_bits(bits: int, clip_sigmas: float) -> float:
    """Entropy (bits/value) of a Gaussian row rounded with step k*std/qmax: log2(qmax/k) + 2.05."""
    return min(float(bits), max(1.0, math.log2((2 ** (bits - 1) - 1) / max(clip_sigmas, 1e-3)) + 2.05))


def estimate_artifact_bytes(model: GPT, args: Hyperparameters, code_bytes: int) -> int:
    """Pre-flight size estimate: code + coded quantized values + row scale codes + LQER factors (placed
    on the largest matrices, since the error ranking is not known yet) + fp16 small tensors + tables."""
    values, scales, quantized, sides = 0.0, 0, set(), []
    for name, m in quantizable_modules(model):
        spec = quant_spec(name, m.weight.numel(), args)
        if spec:
            values += m.weight.numel() * estimate_quantized_bits(*spec) / 8
            scales += SCALE_CODE_BYTES * m.weight.size(0)
            sides.append(sum(m.weight.shape))
            quantized.add(id(m.weight))
    lqer = sum(sorted(sides)[-args.lqer_top_k:]) * args.lqer_rank * LQER_FACTOR_BYTES if args.lqer_rank and sides else 0
    floats = sum(2 * p.numel() for p in model.parameters() if id(p) not in quantized)
    tables = TENSOR_TABLE_BYTES * len(model.state_dict()) + artifact_file_bytes(args.compressor, b"\0" * 4)
    return int(code_bytes + values * CODER_OVERHEAD.get(args.compressor, 1.0105) + scales + lqer + floats + tables)


# -----------------------------------------------------------------------------
# EXPORT: RESERVE AND BUDGET FITTING
# -----------------------------------------------------------------------------


def timed(fn, rt: Runtime) -> float:
    t0 = time.perf_counter()
    fn()
    rt.sync()
    return time.perf_counter() - t0


def predict_export_seconds(model: GPT, args: Hyperparameters, rt: Runtime) -> dict[str, float]:
    """Calibration, quantization and compression seconds, predicted before training from one timed
    sample of each scaled by size (their cost does not depend on the weights' values)."""
    accum = grad_accum_steps(args, rt)
    seqs = max(1, args.train_batch_tokens // (args.train_seq_len * rt.world_size * accum))
    g = torch.Generator(device=rt.device).manual_seed(0)  # leaves the global RNG, and so training, untouched
    x = torch.randint(0, args.vocab_size, (seqs, args.train_seq_len), device=rt.device, generator=g)
    looping, model.looping = model.looping, args.num_loops > 1
    collect_hessians(model, [(x, None)], rt)  # warm-up: first calls pay for library initialisation
    batch_s = timed(lambda: collect_hessians(model, [(x, None)], rt), rt)
    model.looping = looping
    if args.gptq_calibration == "selfgen":
        batch_s *= args.train_seq_len / 2  # one forward per generated token, over half a sequence on average
    per_rank = -(-args.gptq_calibration_batches // (rt.world_size * accum)) * accum
    pred = dict(calibration=batch_s * per_rank if args.quant == "gptq" else 0.0, quantize=0.0, compress=0.0)
    if rt.master:
        shapes, raw_bytes = {}, 0
        for name, m in quantizable_modules(model):
            spec = quant_spec(name, m.weight.numel(), args)
            raw_bytes += m.weight.numel() * (1 if spec else 2)
            if spec:
                shapes[tuple(m.weight.shape), spec] = shapes.get((tuple(m.weight.shape), spec), 0) + 1
        for (shape, (bits, clip)), n in shapes.items():
            w = torch.randn(shape, device=rt.device, generator=g)
            H = torch.eye(shape[1], device=rt.device) if args.quant == "gptq" else None
            pred["quantize"] += n * timed(lambda: quantize_tensor(w, H, bits, clip, args), rt)
        if args.lqer_rank and shapes:
            w = torch.randn(max(shapes, key=lambda k: math.prod(k[0]))[0], device=rt.device, generator=g).cpu()
            qt, _ = quantize_tensor(w, None, 6, 12.0, args)
            pred["quantize"] += args.lqer_top_k * timed(lambda: lqer_factors(w, qt, args.lqer_rank), rt)
        sample = np.clip(np.random.default_rng(0).normal(32, 2.6, min(raw_bytes, CHUNK_BYTES)), 1, 63).astype(np.uint8).tobytes()
        rounds = -(-math.ceil(raw_bytes / CHUNK_BYTES) // (args.compress_workers or usable_cpus()))
        for cand, lvl in compression_candidates(args):
            pred["compress"] += rounds * timed(lambda: compress_chunk((cand, lvl, sample)), rt)
    for k in sorted(pred):
        pred[k] = rt.all_reduce(torch.tensor(pred[k], device=rt.device), dist.ReduceOp.MAX).item()
    return pred


def resolve_gptq_reserve(model: GPT, args: Hyperparameters, rt: Runtime):
    """GPTQ_RESERVE_SECONDS=auto: the predicted export time with a 25% + 2 s margin (0 without a cap)."""
    if args.gptq_reserve_seconds != "auto":
        return
    if args.max_wallclock_seconds <= 0:
        args.gptq_reserve_seconds = 0.0
        return
    pred = predict_export_seconds(model, args, rt)
    args.gptq_reserve_seconds = round(1.25 * sum(pred.values()) + 2.0, 1)
    rt.log(f"gptq_reserve seconds:{args.gptq_reserve_seconds} source:auto " + " ".join(f"{k}_s:{v:.2f}" for k, v in pred.items()))


def bits_to_lower(model: GPT, args: Hyperparameters, errors: dict, override: dict, excess: int) -> list[tuple[str, int, int]]:
    """Tensors whose precision costs least to lower by one bit (Hessian-weighted error added per
    estimated byte saved), until the estimated saving covers the excess. Matrices kept in fp16 go
    to 8 bits first: near-lossless, and the only way under the budget for models of small matrices."""
    cands = []
    for name, m in quantizable_modules(model):
        spec = quant_spec(name, m.weight.numel(), args, override)
        if spec is None:
            _, clip = quant_spec(name, m.weight.numel(), args, {name: 8})
            saved = m.weight.numel() * (2 - estimate_quantized_bits(8, clip) / 8) - SCALE_CODE_BYTES * m.weight.size(0)
            if saved > 0:
                cands.append((0.0, name, 16, 8, saved))
        elif spec[0] > 2:
            bits, clip = spec
            saved = m.weight.numel() * (estimate_quantized_bits(bits, clip) - estimate_quantized_bits(bits - 1, clip)) / 8
            # rounding error variance grows ~4x per bit removed
            cands.append((3 * errors[name + ".weight"] / max(saved, 1.0), name, bits, bits - 1, saved))
    chosen, total = [], 0.0
    for _, name, bits, new, saved in sorted(cands):
        if total >= 1.1 * excess:
            break
        chosen.append((name, bits, new))
        total += saved
    return chosen


def export_artifact(model: GPT, args: Hyperparameters, rt: Runtime, hessians: dict, code_bytes: int, path: str) -> str:
    """Quantize, pack, compress and write the artifact (rank 0), lowering bits where it costs least
    until code + model fit ARTIFACT_BUDGET (or, when nothing is left to lower, logging the smallest
    size reachable). Quantized tensors and compressed chunks are cached, so a refit redoes only the
    tensors it lowers. Returns the compressor used."""
    override, qcache, ccache = {}, {}, {}
    meta = dict(config=args.model_config(), looping=model.looping, byte_accounting=args.byte_accounting)
    while True:
        t0, done = time.perf_counter(), sum(len(k) == 2 for k in qcache)
        qstate, errors = quantize_model(model, args, hessians, override, qcache)
        rt.log(f"quantize method:{args.quant} tensors:{len(errors)} new:{sum(len(k) == 2 for k in qcache) - done} "
               f"lqer:{min(args.lqer_top_k, len(errors)) if args.lqer_rank else 0} seconds:{time.perf_counter() - t0:.2f}")
        bits = {k: v.bits for k, v in qstate.items() if isinstance(v, QTensor)}
        chunks = serialize_chunks(qstate, dict(meta, bits=bits), args.pack_bits)
        comp, data = compress_payload(chunks, args, rt, ccache)
        total = code_bytes + artifact_file_bytes(comp, data)
        if total <= args.artifact_budget:
            break
        lower = bits_to_lower(model, args, errors, override, total - args.artifact_budget)
        if not lower:  # every matrix at 2 bits: write it; the run then fails as over budget
            rt.log(f"error: artifact_budget_unreachable limit:{args.artifact_budget} smallest_reachable:{total}")
            break
        for name, old, new in lower:
            override[name] = new
            rt.log(f"budget_fit tensor:{name} bits:{old}->{new} over_by:{total - args.artifact_budget}")
    write_artifact(path, comp, data)
    return comp


# -----------------------------------------------------------------------------
# ARTIFACT FORMAT AND COMPRESSION
# -----------------------------------------------------------------------------
# File: MAGIC | u16 version | u8 n + compressor name | u64 payload length | sha256(payload) | payload.
# Payload: u32 chunk count | u32 compressed length per chunk | chunks, each compressed on its own.
# The decompressed chunks joined: u32 n + JSON header (config, tensor table) | blob of packed tensors.


COMPRESSOR_PACKAGES = {"zstd": "zstandard", "brotli": "brotli", "lzma": "lzma", "rans": "constriction"}


MAX_LEVELS = {"zstd": 22, "brotli": 11, "lzma": 9, "rans": 64}


# COMPRESSION_LEVEL=-1: brotli quality 10 with a 256 KiB window matched single-stream quality 11 on a
# record-size int6 payload (-0.007% bytes) in a third of its time (bench/RESULTS.md).
DEFAULT_LEVELS = {"zstd": 22, "brotli": 10, "lzma": 9, "rans": 8}


CHUNK_BYTES = 1 << 20  # compression unit: chunks compress in parallel and are reused across budget refits


SMALL_TENSOR_BYTES = 1 << 16  # tensors below this share one chunk group instead of getting their own


def compressor(name: str):
    """(compress(data, level), decompress(data)) for a real library; a missing one is an error."""
    try:
        if name == "zstd":
            import zstandard
            return (lambda b, lvl: zstandard.ZstdCompressor(level=lvl).compress(b),
                    lambda b: zstandard.ZstdDecompressor().decompress(b))
        if name == "brotli":
            import brotli
            return lambda b, lvl: brotli.compress(b, quality=lvl, lgwin=18), brotli.decompress
        if name == "lzma":
            import lzma
            return lambda b, lvl: lzma.compress(b, preset=lvl | lzma.PRESET_EXTREME), lzma.decompress
        if name == "rans":
            import brotli, constriction
            return rans_compress, rans_decompress
    except ImportError:
        raise RuntimeError(f"compressor {name} needs the Python package '{COMPRESSOR_PACKAGES[name]}' "
                           f"(pip install {COMPRESSOR_PACKAGES[name]})") from None
    raise ValueError(f"unknown compressor {name!r}")


# rANS chunk: u8 tag (0: brotli-10 bytes follow, where that is shorter: JSON, fp16) | u32
# length of the brotli-coded side info | side info | ANS words. Side info: u32 n, u8 lowest byte, u8
# alphabet - 1, u8 classes K | the class of each RANS_BLOCK-byte block | K tables of u16 frequencies.
# Bytes are coded with their block's table; blocks fall into classes by what codes them shortest,
# which follows the spread of a tensor's rows. Only integers are stored: decoding is exact anywhere.
RANS_BLOCK = 512


RANS_FREQ_TOTAL = 1 << 15


def rans_tables(hist: np.ndarray, cls: np.ndarray, k: int) -> np.ndarray:
    """Per-class integer frequencies summing to about RANS_FREQ_TOTAL, nonzero exactly where the class has counts."""
    counts = np.stack([hist[cls == c].sum(0) for c in range(k)]).astype(np.float64)
    freq = np.round(counts * RANS_FREQ_TOTAL / np.maximum(counts.sum(1, keepdims=True), 1))
    freq = np.where(counts > 0, np.maximum(freq, 1), 0)
    freq[freq.sum(1) == 0] = 1  # a class no block chose still needs a valid (unused) table
    return freq.astype(np.uint16)


def rans_models(freq: np.ndarray):
    import constriction
    return [constriction.stream.model.Categorical(f / f.sum(), perfect=False) for f in freq.astype(np.float64)]


def rans_compress(data: bytes, level: int) -> bytes:
    """The shortest of brotli-10 (tried on small chunks and text) and block-class ANS with 1, 2, 4, ..., level classes."""
    import brotli
    plain = b"\0" + brotli.compress(data, quality=10, lgwin=18) if len(data) <= 1 << 18 else None
    if len(data) < RANS_BLOCK:
        return plain
    coded = min((rans_code(data, 1 << i) for i in range(level.bit_length())), key=len)
    if plain is None and len(brotli.compress(data, quality=1)) < len(coded):  # q1: a fast probe for text
        plain = b"\0" + brotli.compress(data, quality=10, lgwin=18)
    return min(coded, plain or coded, key=len)


def rans_code(data: bytes, k: int) -> bytes:
    import brotli, constriction
    x = np.frombuffer(data, dtype=np.uint8)
    lo = int(x.min())
    sym, alpha = x.astype(np.int32) - lo, max(int(x.max()) - lo + 1, 2)  # the ANS models need two symbols
    blocks = np.arange(x.size) // RANS_BLOCK
    hist = np.bincount(blocks * alpha + sym, minlength=(blocks[-1] + 1) * alpha).reshape(-1, alpha).astype(np.float64)
    spread = hist @ np.abs(np.arange(alpha) - hist.sum(0).argmax()) / hist.sum(1)
    k = min(k, len(hist))
    cls = np.minimum(np.argsort(np.argsort(spread, kind="stable"), kind="stable") * k // len(hist), k - 1)
    for _ in range(4):  # refit the tables, then move each block to the class that codes it shortest
        counts = np.stack([hist[cls == c].sum(0) for c in range(k)]) + 0.5
        cls = (hist @ -np.log2(counts / counts.sum(1, keepdims=True)).T).argmin(1)
    freq = rans_tables(hist, cls, k)
    coder, per_sym = constriction.stream.stack.AnsCoder(), cls[blocks]
    for c, model in reversed(list(enumerate(rans_models(freq)))):
        coder.encode_reverse(sym[per_sym == c], model)
    side = struct.pack("<IBBB", x.size, lo, alpha - 1, k) + cls.astype(np.uint8).tobytes() + freq.tobytes()
    side = brotli.compress(side, quality=11)
    return b"\1" + struct.pack("<I", len(side)) + side + coder.get_compressed().tobytes()


def rans_decompress(data: bytes) -> bytes:
    import brotli, constriction
    if data[0] == 0:
        return brotli.decompress(data[1:])
    (m,) = struct.unpack_from("<I", data, 1)
    side = brotli.decompress(data[5:5 + m])
    n, lo, alpha, k = struct.unpack_from("<IBBB", side)
    alpha += 1
    nb = -(-n // RANS_BLOCK)
    cls = np.frombuffer(side, dtype=np.uint8, count=nb, offset=7)
    freq = np.frombuffer(side, dtype=np.uint16, offset=7 + nb).reshape(k, alpha)
    per_sym = np.repeat(cls, RANS_BLOCK)[:n]
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype=np.uint32, offset=5 + m).copy())
    out = np.empty(n, dtype=np.int32)
    for c, model in enumerate(rans_models(freq)):
        out[per_sym == c] = coder.decode(model, int((per_sym == c).sum()))
    return (out + lo).astype(np.uint8).tobytes()


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned values < 2**bits -> a dense little bit-stream (bits per value, not 8)."""
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    planes = np.unpackbits(values.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return np.frombuffer(data, dtype=np.uint8, count=n)
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:n * bits].reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(n)


def shuffle_fp16(t: Tensor) -> bytes:
    """fp16 bytes grouped as all low bytes then all high bytes, which compresses better."""
    b = t.reshape(-1).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
    return b.T.tobytes()


def unshuffle_fp16(data: bytes, shape) -> Tensor:
    b = np.frombuffer(data, dtype=np.uint8).reshape(2, -1).T.copy()
    return torch.from_numpy(b.view(np.int16).reshape(shape)).view(torch.float16)


def tensor_record(name: str, t, pack: bool, base: int) -> tuple[dict, bytes]:
    """One tensor's table entry (spans offset by base) and its bytes, which do not depend on base."""
    parts, size = [], 0

    def put(data: bytes) -> list[int]:
        nonlocal size
        parts.append(data)
        size += len(data)
        return [base + size - len(data), len(data)]

    if isinstance(t, QTensor):
        qmax = 2 ** (t.bits - 1) - 1
        vals = (t.q.numpy().astype(np.int16) + qmax).reshape(-1)
        codes = torch.round(SCALE_STEPS * torch.log2(t.scale.float())).to(torch.int32)
        entry = dict(name=name, kind="q", shape=list(t.q.shape), bits=t.bits, packed=pack,
                     q=put(pack_bits(vals, t.bits) if pack else vals.astype(np.uint8).tobytes()),
                     scale_base=int(codes.min()), scale=put((codes - codes.min()).to(torch.uint8).numpy().tobytes()))
        if t.lqer is not None:
            qa, sa, qb, sb = t.lqer
            entry["lqer"] = dict(rank=qa.size(1), a=put(qa.numpy().tobytes()), sa=put(shuffle_fp16(sa)),
                                 b=put(qb.numpy().tobytes()), sb=put(shuffle_fp16(sb)))
    elif t.dtype == torch.float16:
        entry = dict(name=name, kind="fp16", shape=list(t.shape), data=put(shuffle_fp16(t)))
    else:
        entry = dict(name=name, kind="raw", dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                     data=put(t.numpy().tobytes()))
    return entry, b"".join(parts)


def split_even(data: bytes, limit: int) -> list[bytes]:
    n = -(-len(data) // limit)
    size = -(-len(data) // max(n, 1))
    return [data[i:i + size] for i in range(0, len(data), size)]


def serialize_chunks(qstate: dict, meta: dict, pack: bool) -> list[bytes]:
    """The payload as independent chunks: header, the small tensors together, then each large tensor
    in pieces of at most CHUNK_BYTES, so a chunk's bytes change only when its own tensors do.
    Joined, the chunks are the payload deserialize_state reads."""
    nbytes = lambda t: t.q.numel() if isinstance(t, QTensor) else t.numel() * t.element_size()
    names = sorted(qstate, key=lambda n: nbytes(qstate[n]) >= SMALL_TENSOR_BYTES)  # stable: small ones first
    table, groups, base = [], [[]], 0
    for name in names:
        entry, data = tensor_record(name, qstate[name], pack, base)
        table.append(entry)
        base += len(data)
        if len(data) >= SMALL_TENSOR_BYTES:
            groups.append([])
        groups[-1].append(data)
    header = json.dumps(dict(meta, tensors=table), separators=(",", ":")).encode()
    chunks = [struct.pack("<I", len(header)) + header]
    for group in groups:
        chunks += split_even(b"".join(group), CHUNK_BYTES)
    return chunks


def deserialize_state(payload: bytes) -> tuple[dict, dict]:
    (n,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + n])
    blob = memoryview(payload)[4 + n:]
    get = lambda span: bytes(blob[span[0]:span[0] + span[1]])
    state = {}
    for e in meta.pop("tensors"):
        shape = e["shape"]
        if e["kind"] == "q":
            numel, qmax = math.prod(shape), 2 ** (e["bits"] - 1) - 1
            raw = get(e["q"])
            vals = unpack_bits(raw, e["bits"], numel) if e["packed"] else np.frombuffer(raw, dtype=np.uint8)
            q = torch.from_numpy(vals.astype(np.int16) - qmax).to(torch.int8).view(shape)
            codes = torch.frombuffer(bytearray(get(e["scale"])), dtype=torch.uint8).float() + e["scale_base"]
            t = QTensor(q, torch.exp2(codes / SCALE_STEPS).view(shape[0], 1), e["bits"])
            if "lqer" in e:
                lq, r = e["lqer"], e["lqer"]["rank"]
                a = torch.frombuffer(bytearray(get(lq["a"])), dtype=torch.int8).view(shape[0], r)
                b = torch.frombuffer(bytearray(get(lq["b"])), dtype=torch.int8).view(r, shape[1])
                t.lqer = (a, unshuffle_fp16(get(lq["sa"]), (1, r)), b, unshuffle_fp16(get(lq["sb"]), (r, 1)))
            state[e["name"]] = t.dequantize()
        elif e["kind"] == "fp16":
            state[e["name"]] = unshuffle_fp16(get(e["data"]), shape).float()
        else:
            state[e["name"]] = torch.frombuffer(bytearray(get(e["data"])), dtype=getattr(torch, e["dtype"])).view(shape)
    return meta, state


def compress_chunk(job: tuple[str, int, bytes]) -> bytes:
    name, level, data = job
    return compressor(name)[0](data, level)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compress_chunks(chunks: list[bytes], name: str, level: int, workers: int, cache: dict) -> tuple[list[bytes], int]:
    """Each chunk compressed on its own, in a pool of forked processes; chunks already in cache (keyed
    by content) are reused. Returns the compressed chunks and how many were compressed now."""
    keys = [(name, level, hashlib.sha256(c).digest()) for c in chunks]
    todo = {k: (name, level, c) for k, c in zip(keys, chunks) if k not in cache}
    workers = min(len(todo), workers or usable_cpus())
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            done = list(pool.map(compress_chunk, todo.values()))
    else:
        done = [compress_chunk(job) for job in todo.values()]
    cache.update(zip(todo, done))
    return [cache[k] for k in keys], len(todo)


def frame_chunks(chunks: list[bytes]) -> bytes:
    """Chunk table (u32 count, u32 length of each) followed by the compressed chunks."""
    return struct.pack(f"<I{len(chunks)}I", len(chunks), *map(len, chunks)) + b"".join(chunks)


def unframe_chunks(data: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("<I", data)
    lengths = struct.unpack_from(f"<{n}I", data, 4)
    pos = 4 + 4 * n
    if pos + sum(lengths) != len(data):
        raise ValueError(f"chunk table promises {pos + sum(lengths)} bytes, payload has {len(data)}")
    return [data[p:p + k] for p, k in zip(itertools.accumulate(lengths, initial=pos), lengths)]


def artifact_file_bytes(comp_name: str, data: bytes) -> int:
    return len(ARTIFACT_MAGIC) + 3 + len(comp_name) + 40 + len(data)


def compression_candidates(args: Hyperparameters) -> list[tuple[str, int]]:
    """(compressor, level) pairs to try: COMPRESSOR, or all of them for auto."""
    names = ("zstd", "brotli", "lzma", "rans") if args.compressor == "auto" else (args.compressor,)
    return [(n, DEFAULT_LEVELS[n] if args.compression_level < 0 else min(args.compression_level, MAX_LEVELS[n])) for n in names]


def compress_payload(chunks: list[bytes], args: Hyperparameters, rt: Runtime, cache: dict) -> tuple[str, bytes]:
    """Compressed, framed chunks with one compressor, or with each (auto) keeping the smallest; logs each candidate."""
    best = None
    for cand, lvl in compression_candidates(args):
        t0 = time.perf_counter()
        out, fresh = compress_chunks(chunks, cand, lvl, args.compress_workers, cache)
        data = frame_chunks(out)
        rt.log(f"compress candidate:{cand} level:{lvl} bytes:{len(data)} chunks:{len(out)} new:{fresh} "
               f"seconds:{time.perf_counter() - t0:.2f}")
        if best is None or len(data) < len(best[1]):
            best = (cand, data)
    return best


def write_artifact(path: str, comp_name: str, data: bytes):
    """Written to a temporary file, synced, then renamed over path: a run killed while writing
    leaves whatever artifact was at path before."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".artifact-")
    try:
        with open(fd, "wb") as f:
            f.write(ARTIFACT_MAGIC + struct.pack("<HB", ARTIFACT_VERSION, len(comp_name)) + comp_name.encode())
            f.write(struct.pack("<Q", len(data)) + hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def read_artifact(path: str) -> tuple[dict, dict]:
    """(meta, float state dict) from an artifact; every kind of damage is a clear error."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:len(ARTIFACT_MAGIC)] != ARTIFACT_MAGIC:
        raise ValueError(f"{path}: not a Parameter Golf artifact (bad magic)")
    pos = len(ARTIFACT_MAGIC)
    if len(buf) < pos + 3:
        raise ValueError(f"{path}: truncated artifact header")
    version, n = struct.unpack_from("<HB", buf, pos)
    if version != ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact format version {version}, this script reads version {ARTIFACT_VERSION}")
    pos += 3
    comp_name = buf[pos:pos + n].decode(errors="replace")
    pos += n
    if len(buf) < pos + 40:
        raise ValueError(f"{path}: truncated artifact header")
    (length,) = struct.unpack_from("<Q", buf, pos)
    digest, data = buf[pos + 8:pos + 40], buf[pos + 40:]
    if len(data) != length:
        raise ValueError(f"{path}: truncated or padded artifact: header promises {length} payload bytes, file has {len(data)}")
    if hashlib.sha256(data).digest() != digest:
        raise ValueError(f"{path}: checksum mismatch, the artifact is corrupt")
    if comp_name not in COMPRESSOR_PACKAGES:
        raise ValueError(f"{path}: unknown compressor {comp_name!r} in artifact header")
    decompress = compressor(comp_name)[1]
    meta, state = deserialize_state(b"".join(decompress(c) for c in unframe_chunks(data)))
    return dict(meta, compressor=comp_name, sha256=hashlib.sha256(buf).hexdigest()), state


def check_artifact_accounting(meta: dict, args: Hyperparameters, path: str) -> None:
    """A CaseOps model scored with LUT bytes, or a plain one with sidecar bytes, is an error
    (artifacts from before the key existed were plain)."""
    trained = meta.get("byte_accounting", "luts")
    if trained != args.byte_accounting:
        raise ConfigError(f"{path} was trained with byte_accounting:{trained}; scoring it with "
                          f"byte_accounting:{args.byte_accounting} (TOKENIZER_PATH, DATA_PATH) would give a wrong val_bpb")


def model_from_artifact(meta: dict, state: dict, args: Hyperparameters, rt: Runtime, backend: str) -> GPT:
    model = GPT(args, backend).to(rt.device)
    model.load_state_dict({k: v.to(rt.device) for k, v in state.items()}, strict=True)
    model.looping = meta["looping"]
    return model


# -----------------------------------------------------------------------------
# EVALUATION (standard, sliding window, score-first TTT, phased TTT)
# -----------------------------------------------------------------------------
# Target j is token j predicted from tokens[:j]; a stream of N tokens has targets 1..N-1. A window
# (s, e, a) feeds tokens[s:e] and scores targets a..e, never more than once across a plan.


def plan_windows(first: int, last: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows scoring every target in [first, last] exactly once. Each window is as long as
    possible (seq_len) and scores only targets no earlier window scored, so every scored token
    sees at least seq_len - stride tokens of context (or all there is). stride == seq_len gives
    the standard non-overlapping evaluation; the tail is scored, not dropped."""
    windows = []
    if first > last:
        return windows
    a, e = first, min(max(first - 1 + stride, seq_len), last)
    while True:
        windows.append((max(0, e - seq_len), e, a))
        if e == last:
            return windows
        a, e = e + 1, min(e + stride, last)


@dataclass
class EvalResult:
    nll: float
    tokens: int
    bytes: int
    ms: float

    @property
    def val_loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def val_bpb(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def line(self, label: str) -> str:
        return (f"{label} val_loss:{self.val_loss:.8f} val_bpb:{self.val_bpb:.8f} tokens:{self.tokens} "
                f"bytes:{self.bytes} eval_ms:{self.ms:.0f}")


class Evaluator:
    """Scores planned windows in batches split across ranks; sums are float64 and all-reduced, so
    the result does not depend on the world size."""

    def __init__(self, model: GPT, tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime):
        self.model, self.tokens, self.args, self.rt = model, tokens, args, rt
        self.val_bytes = val_bytes.to(rt.device)
        self.nll_fn = torch.compile(model.token_nll) if rt.compile else model.token_nll
        self.totals = torch.zeros(3, dtype=torch.float64, device=rt.device)

    def batch(self, windows, seq_len: int):
        """Inputs, targets and score mask (B, seq_len); short windows are right-padded (causality
        makes the padding invisible to real positions)."""
        x = torch.zeros(len(windows), seq_len, dtype=torch.long)
        y = torch.zeros_like(x)
        mask = torch.zeros_like(x, dtype=torch.bool)
        for i, (s, e, a) in enumerate(windows):
            n = e - s
            x[i, :n] = self.tokens[s:e]
            y[i, :n] = self.tokens[s + 1:e + 1]
            mask[i, a - s - 1:n] = True
        d = self.rt.device
        return x.to(d), y.to(d), mask.to(d)

    @torch.no_grad()
    def score(self, windows, batch_seqs: int, label: str = "", token_losses: Tensor | None = None):
        """Add the scores of `windows` to the running totals (this rank's share of the batches)."""
        rt, seq_len = self.rt, self.args.eval_seq_len
        batches = [windows[i:i + batch_seqs] for i in range(0, len(windows), batch_seqs)]
        mine = batches[rt.rank::rt.world_size]
        t0, last_log = time.perf_counter(), time.perf_counter()
        for k, group in enumerate(mine):
            if rt.compile and len(group) < batch_seqs:  # one static shape, one compiled graph
                group = group + [(0, 1, 2)] * (batch_seqs - len(group))
            x, y, mask = self.batch(group, seq_len)
            with rt.autocast_ctx():
                nll = self.nll_fn(x, y).double()
            self.record(group, x, y, mask, nll, token_losses)
            if label and time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log_progress(rt, label, k + 1, len(mine), t0)

    def record(self, windows, x: Tensor, y: Tensor, mask: Tensor, nll: Tensor, token_losses: Tensor | None):
        """Add the masked float64 losses of a batch built by batch(windows) to the totals."""
        starts = torch.tensor([w[0] for w in windows], device=x.device)
        targets = (starts[:, None] + torch.arange(1, y.size(1) + 1, device=x.device)).clamp_max(self.val_bytes.numel() - 1)
        nbytes = self.val_bytes[targets]
        self.totals += torch.stack([nll[mask].sum(), mask.sum().double(), nbytes[mask].sum().double()])
        if token_losses is not None:
            rows, cols = mask.nonzero(as_tuple=True)
            token_losses[(starts[rows] + cols + 1).cpu()] = nll[rows, cols].cpu()

    def result(self, t0: float) -> EvalResult:
        totals = self.rt.all_reduce(self.totals.clone())
        self.totals.zero_()
        return EvalResult(float(totals[0]), int(totals[1]), int(totals[2]), 1000 * (time.perf_counter() - t0))


def log_progress(rt: Runtime, phase: str, done: int, total: int, t0: float):
    elapsed = time.perf_counter() - t0
    eta = elapsed / max(done, 1) * (total - done)
    rt.log(f"progress phase:{phase} done:{done} total:{total} elapsed_s:{elapsed:.1f} eta_s:{eta:.1f}")


def eval_batch_seqs(args: Hyperparameters, rt: Runtime) -> int:
    """Windows per scoring forward per rank: EVAL_BATCH_SEQS, capped by VAL_BATCH_SIZE (the baseline's knob)."""
    return max(1, min(args.eval_batch_seqs, args.val_batch_size // (args.eval_seq_len * rt.world_size)))


def evaluate(model: GPT, val_tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime, stride: int,
             label: str = "") -> EvalResult:
    """Standard (stride == EVAL_SEQ_LEN) or sliding-window evaluation of the whole stream."""
    t0 = time.perf_counter()
    model.eval()
    ev = Evaluator(model, val_tokens, val_bytes, args, rt)
    ev.score(plan_windows(1, val_tokens.numel() - 1, args.eval_seq_len, stride), eval_batch_seqs(args, rt), label)
    model.train()
    return ev.result(t0)


def ttt_parameters(model: GPT, args: Hyperparameters) -> list[nn.Parameter]:
    """What TTT adapts; `lora` first attaches fresh adapters to every block matrix."""
    for p in model.parameters():
        p.requires_grad_(False)
    if args.ttt_params == "lora":
        for m in model.blocks.modules():
            if isinstance(m, CastedLinear):
                m.lora = LoRA(m.weight.size(1), m.weight.size(0), args.ttt_lora_rank, m.weight.device)
        params = [p for m in model.modules() if isinstance(m, LoRA) for p in m.parameters()]
    elif args.ttt_params == "norms":
        params = [p for p in model.parameters() if p.ndim < 2]
    elif args.ttt_params == "last_k":
        params = [p for b in model.blocks[-args.ttt_last_k:] for p in b.parameters()]
    else:
        params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def eval_budget(rt: Runtime, eval_t0: float, args: Hyperparameters, phase: str) -> TimeBudget:
    """EVAL_MAX_SECONDS from eval_t0, for a TTT that stops adapting (and still scores) when it runs out."""
    limit = args.eval_max_seconds
    return TimeBudget(rt, eval_t0, limit, lambda at, elapsed: f"ttt_stopped_adapting phase:{phase} at:{at} "
                                                              f"reason:eval_budget elapsed_s:{elapsed:.1f} limit_s:{limit:.0f}")


def ttt_train_chunk(model: GPT, nll_fn, tokens: Tensor, first: int, last: int, params, opt, args, rt):
    """One pass over targets first..last (all already scored), TTT_BATCH_SEQS sequences per step,
    split across ranks. Every sequence gets its own backward at one shape (1, EVAL_SEQ_LEN), so one
    graph serves all steps; its fp32 gradient is added in float64 and all-reduced in float64, where
    the sum of a few fp32 terms is exact or nearly, so the step does not depend on which rank
    computed what: 1 and N ranks take the same step."""
    seq_len, device = args.eval_seq_len, rt.device
    seqs = [(start, min(start + seq_len, last)) for start in range(first - 1, last, seq_len)]
    grad_sums = [torch.zeros_like(param, dtype=torch.float64) for param in params]
    for group_start in range(0, len(seqs), args.ttt_batch_seqs):
        group = seqs[group_start:group_start + args.ttt_batch_seqs]
        for start, end in group[rt.rank::rt.world_size]:
            inputs, targets = torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, seq_len, dtype=torch.long)
            mask = torch.zeros(1, seq_len)
            inputs[0, :end - start], targets[0, :end - start], mask[0, :end - start] = tokens[start:end], tokens[start + 1:end + 1], 1
            with rt.autocast_ctx():
                (nll_fn(inputs.to(device), targets.to(device)) * mask.to(device)).sum().backward()
            for grad_sum, param in zip(grad_sums, params):
                if param.grad is not None:
                    grad_sum += param.grad
                    param.grad = None
        group_targets = sum(end - start for start, end in group)
        for grad_sum, param in zip(grad_sums, params):
            param.grad = (rt.all_reduce(grad_sum) / group_targets).to(param.dtype)
            grad_sum.zero_()
        if args.ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def evaluate_ttt(model: GPT, val_tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime, eval_t0: float,
                 token_losses: Tensor | None = None) -> EvalResult:
    """Score-first TTT: each chunk is scored with the current weights (its losses are final), then
    trained on; the last chunk is never trained on. When the eval budget would be overrun, adapting
    stops and the remaining chunks are only scored."""
    t0 = last_log = time.perf_counter()
    ev = Evaluator(model, val_tokens, val_bytes, args, rt)
    params = ttt_parameters(model, args)
    if args.ttt_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    else:
        opt = torch.optim.AdamW(params, lr=args.ttt_lr, betas=(args.ttt_momentum, 0.999), weight_decay=0.0)
    budget = eval_budget(rt, eval_t0, args, "ttt")
    final_target = val_tokens.numel() - 1
    stride = args.eval_stride or args.eval_seq_len
    chunks = [(first, min(first + args.ttt_chunk_tokens - 1, final_target))
              for first in range(1, final_target + 1, args.ttt_chunk_tokens)]
    for index, (first, last) in enumerate(chunks):
        model.eval()
        with budget.timed("score", last - first, last - first + 1):
            ev.score(plan_windows(first, last, args.eval_seq_len, stride), eval_batch_seqs(args, rt), token_losses=token_losses)
        trained = (last - first + 1) * args.ttt_epochs
        need = budget.seconds("score", final_target - last) + budget.seconds("train", trained)
        if index == len(chunks) - 1 or not budget.allows(need, f"chunk:{index}/{len(chunks)}"):
            continue
        model.train()
        for group in opt.param_groups:
            group["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * index / (len(chunks) - 1)))
        with budget.timed("train", last - first, trained):
            for _ in range(args.ttt_epochs):
                ttt_train_chunk(model, ev.nll_fn, val_tokens, first, last, params, opt, args, rt)
        if time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            log_progress(rt, "ttt", index + 1, len(chunks), t0)
    model.eval()
    return ev.result(t0)


def document_spans(tokens: Tensor) -> list[tuple[int, int]]:
    """(s, e) per document: inputs tokens[s:e], targets s+1..e. A document starts at a BOS (or at
    position 0) and its last target is the next document's BOS, so each target 1..N-1 belongs to
    exactly one document and is predicted from that document's tokens only."""
    bounds = [0] + ((tokens[1:-1] == BOS_ID).nonzero().flatten() + 1).tolist() + [tokens.numel() - 1]
    return list(zip(bounds[:-1], bounds[1:]))


def document_forward_tokens(doc: tuple[int, int], chunk_tokens: int, seq_len: int, from_chunk: int = 0) -> int:
    """Tokens a document feeds forward when scored chunk by chunk from chunk `from_chunk` on: the
    window of chunk c ends at the chunk's last target and holds at most seq_len tokens. The unit
    of phased TTT's cost."""
    chunks = -(-(doc[1] - doc[0]) // chunk_tokens)
    return sum(min(seq_len, (chunk + 1) * chunk_tokens) for chunk in range(from_chunk, chunks))


def plan_phased_ttt(docs: list[tuple[int, int]], args: Hyperparameters, rt: Runtime) -> list[tuple[list, list]]:
    """Segments (documents, this rank's batches of them): one per global phase, then the rest. In a
    segment, documents of similar length share a batch, longest row first, so rows finish together
    and the unfinished rows of a batch are always a prefix. The batches are the same on every world
    size; each goes to the least loaded rank, costliest first, and a rank alternates its long and
    short batches so that the budget's rates and the ETA see typical batches from the start."""
    seq_len, per_batch = args.eval_seq_len, args.phased_ttt_docs_per_batch
    chunk_tokens, phases = min(args.phased_ttt_chunk_tokens, seq_len), args.phased_ttt_num_phases
    prefix = min(args.phased_ttt_prefix_docs, len(docs)) if phases else 0
    bounds = sorted({0, len(docs)} | {prefix * phase // max(phases, 1) for phase in range(1, phases + 1)})
    plan = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        longest_first = sorted(docs[lo:hi], key=lambda doc: doc[0] - doc[1])
        batches = [longest_first[i:i + per_batch] for i in range(0, len(longest_first), per_batch)]
        cost = [sum(document_forward_tokens(doc, chunk_tokens, seq_len) for doc in batch) for batch in batches]
        load, mine = [0] * rt.world_size, []
        for costliest in sorted(range(len(batches)), key=lambda i: -cost[i]):
            rank = load.index(min(load))
            load[rank] += cost[costliest]
            if rank == rt.rank:
                mine.append(batches[costliest])
        alternating = [mine[i // 2] if i % 2 == 0 else mine[-1 - i // 2] for i in range(len(mine))]
        plan.append((docs[lo:hi], alternating))
    return plan


def attach_document_adapters(model: GPT, args: Hyperparameters) -> list[nn.Parameter]:
    """Fresh per-document LoRA adapters (one per batch row) on q/k/v/o and both MLP matrices of
    every block and on the output head, the same on every rank. Returns their parameters."""
    torch.manual_seed(args.seed)
    rank, rows = args.phased_ttt_lora_rank, args.phased_ttt_docs_per_batch
    scale = args.phased_ttt_lora_alpha / rank
    for module in model.blocks.modules():
        if isinstance(module, CastedLinear):
            module.lora = LoRA(module.weight.size(1), module.weight.size(0), rank, module.weight.device, rows, scale)
    model.head_lora = LoRA(args.model_dim, args.vocab_size, rank, model.tok_emb.weight.device, rows, scale)
    return [param for module in model.modules() if isinstance(module, LoRA) for param in module.parameters()]


def detach_document_adapters(model: GPT):
    for module in model.blocks.modules():
        if isinstance(module, CastedLinear):
            module.lora = None
    model.head_lora = None


def score_then_adapt_chunk(model: GPT, ev: Evaluator, batch: list, chunk: int, adapt: bool, opt, args,
                           budget: TimeBudget, token_losses: Tensor | None):
    """Chunk `chunk` of every document in `batch` that still has one (a prefix of the rows: the
    finished rows are not computed): scored with the adapters as they are and recorded (final),
    then, when adapt, one optimizer step on exactly those targets."""
    seq_len, chunk_tokens = args.eval_seq_len, min(args.phased_ttt_chunk_tokens, args.eval_seq_len)
    chunk_end = (chunk + 1) * chunk_tokens
    windows = [(start + max(0, min(chunk_end, end - start) - seq_len), start + min(chunk_end, end - start),
                start + chunk * chunk_tokens + 1) for start, end in batch if end - start > chunk * chunk_tokens]
    forwarded = len(windows) * min(seq_len, chunk_end)
    with budget.timed("score", None, forwarded):
        inputs, targets, mask = ev.batch(windows, min(seq_len, chunk_end))
        with torch.set_grad_enabled(adapt), ev.rt.autocast_ctx():
            nll = model.token_nll(inputs, targets)
        ev.record(windows, inputs, targets, mask, nll.detach().double(), token_losses)
    if adapt:
        with budget.timed("adapt", None, forwarded):
            (nll[mask].sum() / chunk_tokens).backward()  # only this chunk's targets, all scored above
            opt.step()
            opt.zero_grad(set_to_none=True)


def adapt_document_batch(model: GPT, ev: Evaluator, batch: list, adapters: tuple[list, list], opt,
                         args: Hyperparameters, budget: TimeBudget, later_tokens: int, token_losses: Tensor | None):
    """Score every chunk of a batch's documents, resetting the adapters (params, initial values)
    first and stepping them after each chunk but the last while the budget allows; later_tokens is
    this rank's forward work after this batch."""
    for param, initial in zip(*adapters):
        param.data.copy_(initial)
    opt.state.clear()
    seq_len, chunk_tokens = args.eval_seq_len, min(args.phased_ttt_chunk_tokens, args.eval_seq_len)
    chunks = -(-(batch[0][1] - batch[0][0]) // chunk_tokens)
    for chunk in range(chunks):
        batch_left = sum(document_forward_tokens(doc, chunk_tokens, seq_len, chunk) for doc in batch)
        this_chunk = batch_left - sum(document_forward_tokens(doc, chunk_tokens, seq_len, chunk + 1) for doc in batch)
        need = budget.seconds("score", later_tokens + batch_left) + budget.seconds("adapt", this_chunk)
        adapt = chunk < chunks - 1 and budget.allows(need, f"chunk:{chunk}", all_ranks=False)
        score_then_adapt_chunk(model, ev, batch, chunk, adapt, opt, args, budget, token_losses)


def train_base_on_segment(model: GPT, ev: Evaluator, segment: list, opt, args: Hyperparameters):
    """A global phase: SGD on all base weights over a segment of documents every rank has scored."""
    base = list(model.parameters())
    for param in base:
        param.requires_grad_(True)
    for _ in range(args.ttt_epochs):
        ttt_train_chunk(model, model.token_nll, ev.tokens, segment[0][0] + 1, segment[-1][1], base, opt, args, ev.rt)
    for param in base:
        param.requires_grad_(False)


def evaluate_phased_ttt(model: GPT, val_tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime, eval_t0: float,
                        token_losses: Tensor | None = None) -> EvalResult:
    """Document TTT. Each batch row is one document with its own LoRA adapters, reset for every
    batch; chunk by chunk a document is scored (context: its earlier tokens, at most EVAL_SEQ_LEN),
    then AdamW steps on that chunk's targets. With global phases the first PREFIX_DOCS documents
    form NUM_PHASES segments; once a segment is scored on all ranks, SGD trains the base weights on
    it. Runs eagerly: its (rows, window) shapes vary too much for compiled graphs. When the eval
    budget would be overrun, adapting stops and the rest is only scored."""
    t0 = last_log = time.perf_counter()
    ev = Evaluator(model, val_tokens, val_bytes, args, rt)
    budget = eval_budget(rt, eval_t0, args, "phased_ttt")
    docs = document_spans(val_tokens)
    plan = plan_phased_ttt(docs, args, rt)
    chunk_tokens = min(args.phased_ttt_chunk_tokens, args.eval_seq_len)
    batch_tokens = [[sum(document_forward_tokens(doc, chunk_tokens, args.eval_seq_len) for doc in batch) for batch in batches]
                    for _, batches in plan]
    tokens_after = lambda segment, batch: sum(batch_tokens[segment][batch + 1:]) + sum(map(sum, batch_tokens[segment + 1:]))
    base = list(model.parameters())
    for param in base:
        param.requires_grad_(False)
    base_opt = torch.optim.SGD(base, lr=args.ttt_lr, momentum=args.ttt_momentum)
    done, total, phases_trained = 0, sum(map(len, batch_tokens)), 0
    for phase, (segment, batches) in enumerate(plan):
        adapter_params = attach_document_adapters(model, args)
        adapters = (adapter_params, [param.detach().clone() for param in adapter_params])
        opt = torch.optim.AdamW(adapter_params, lr=args.phased_ttt_lr, betas=(args.phased_ttt_beta1, args.phased_ttt_beta2),
                                eps=args.phased_ttt_eps, weight_decay=args.phased_ttt_wd)
        for index, batch in enumerate(batches):
            adapt_document_batch(model, ev, batch, adapters, opt, args, budget, tokens_after(phase, index), token_losses)
            done += 1
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log_progress(rt, "phased_ttt", done, total, t0)
        detach_document_adapters(model)
        if phase >= args.phased_ttt_num_phases or segment[-1] == docs[-1]:
            continue
        segment_tokens = (segment[-1][1] - segment[0][0]) * args.ttt_epochs
        need = budget.seconds("score", tokens_after(phase, len(batches))) + budget.seconds("base", segment_tokens)
        if budget.allows(need, f"phase:{phase}/{args.phased_ttt_num_phases}"):
            with budget.timed("base", None, segment_tokens):
                train_base_on_segment(model, ev, segment, base_opt, args)
            phases_trained += 1
    rt.log(f"phased_ttt docs:{len(docs)} chunk_tokens:{chunk_tokens} global_phases_trained:{phases_trained}")
    return ev.result(t0)


def final_evaluations(model: GPT, val_tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime, eval_t0: float) -> tuple[str, EvalResult]:
    """final_roundtrip, then final_sliding and final_ttt or final_phased_ttt when enabled; returns the
    last one, the run's score. With phased TTT, chunk TTT is skipped: it would spend the evaluation
    clock that phased TTT needs on a result that is not the score."""
    L = args.eval_seq_len
    label, result = "final_roundtrip", evaluate(model, val_tokens, val_bytes, args, rt, L, "roundtrip")
    rt.log(result.line(label))
    if 0 < args.eval_stride < L:
        label, result = "final_sliding", evaluate(model, val_tokens, val_bytes, args, rt, args.eval_stride, "sliding")
        rt.log(result.line(label))
    if args.phased_ttt_enabled:
        if args.ttt_enabled:
            rt.log("ttt_skipped reason:phased_ttt_enabled")
        label, result = "final_phased_ttt", evaluate_phased_ttt(model, val_tokens, val_bytes, args, rt, eval_t0)
        rt.log(result.line(label))
    elif args.ttt_enabled:
        label, result = "final_ttt", evaluate_ttt(model, val_tokens, val_bytes, args, rt, eval_t0)
        rt.log(result.line(label))
    return label, result


# -----------------------------------------------------------------------------
# MAIN: TRAIN AND EXPORT, THEN EVALUATE THE ARTIFACT
# -----------------------------------------------------------------------------


def adopt_artifact_config(args: Hyperparameters, meta: dict) -> None:
    """EVAL_ONLY: what the artifact records (MODEL_KNOBS, tokenizer sha256) comes from it, logged
    source:artifact; an env var that disagrees is an error."""
    cfg = meta["config"]
    known = [n for n in MODEL_KNOBS if n in cfg]
    clash = [f"{n}={getattr(args, n.lower())} (artifact: {cfg[n]})" for n in known
             if args.sources[n] == "env" and getattr(args, n.lower()) != cfg[n]]
    if clash:
        raise ConfigError("EVAL_ONLY artifact was trained with a different model: " + ", ".join(clash))
    for n in known:
        setattr(args, n.lower(), int(cfg[n]) if isinstance(cfg[n], bool) else cfg[n])
        args.sources[n] = "artifact"
    args.artifact_tokenizer_sha256 = cfg.get("TOKENIZER_SHA256", "")
    args.resolve()


def peak_memory_mib(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_export(args: Hyperparameters, rt: Runtime, backend: str, code_bytes: int,
                     validation: tuple[Tensor, Tensor], path: str) -> tuple[GPT, float]:
    """Train, calibrate and write the artifact at path, all on the training clock. Returns the
    trained model and the training clock's total ms."""
    torch.manual_seed(args.seed)
    model = GPT(args, backend).to(rt.device)
    if args.late_qat_threshold > 0:
        setup_late_qat(model, args)
    for name, _ in compression_candidates(args):
        compressor(name)  # a missing package fails here, not after training
    est = estimate_artifact_bytes(model, args, code_bytes)
    rt.log(f"model_params:{sum(p.numel() for p in model.parameters())} est_artifact_bytes:{est}")
    if est > args.artifact_budget:
        rt.log(f"warning: estimated artifact {est} bytes exceeds ARTIFACT_BUDGET={args.artifact_budget}; export will lower bits")
    resolve_gptq_reserve(model, args, rt)
    trained = train(model, args, rt, *(validation if args.val_loss_every else (None, None)))
    t0 = time.perf_counter()
    set_late_qat(model, False)
    batches = calibration_batches(model, args, rt, trained.loader) if args.quant == "gptq" else []
    hessians = collect_hessians(model, batches, rt) if batches else {}
    calib_s = time.perf_counter() - t0
    rt.log(f"gptq_calibration seconds:{calib_s:.2f} batches:{len(batches) * rt.world_size} "
           f"source:{args.gptq_calibration if hessians else 'none'}")
    if rt.master:
        export_artifact(model, args, rt, hessians, code_bytes, path)
    rt.barrier()
    export_ms = 1000 * (time.perf_counter() - t0)
    total_ms, cap_ms, reserve_ms = trained.train_ms + export_ms, 1000 * args.max_wallclock_seconds, 1000 * args.gptq_reserve_seconds
    rt.log(f"train_total steps:{trained.steps} train_ms:{trained.train_ms:.0f} export_ms:{export_ms:.0f} "
           f"total_ms:{total_ms:.0f} cap_ms:{cap_ms:.0f} reserve_ms:{reserve_ms:.0f}")
    if 0 < cap_ms < total_ms:
        rt.log(f"error: training_clock_over_cap total_ms:{total_ms:.0f} cap_ms:{cap_ms:.0f} "
               f"export_ms:{export_ms:.0f} reserve_ms:{reserve_ms:.0f}")
    return model, total_ms


def evaluate_artifact(args: Hyperparameters, rt: Runtime, backend: str, code_bytes: int,
                      validation: tuple[Tensor, Tensor], path: str, eval_t0: float, train_ms: float) -> int:
    """Load the artifact at path as a fresh model, run the final evaluations on the evaluation clock
    (from eval_t0) and log the run's result. Returns code + artifact bytes."""
    t0 = time.perf_counter()
    meta, state = read_artifact(path)
    check_artifact_accounting(meta, args, path)
    model = model_from_artifact(meta, state, args, rt, backend)
    rt.log(f"artifact_loaded path:{path} load_ms:{1000 * (time.perf_counter() - t0):.0f}")
    bytes_model = os.path.getsize(path)
    total = code_bytes + bytes_model
    rt.log(f"artifact path:{path} bytes_code:{code_bytes} bytes_model:{bytes_model} bytes_total:{total} "
           f"limit:{args.artifact_budget} compressor:{meta['compressor']} sha256:{meta['sha256']}")
    if total > args.artifact_budget:
        rt.log(f"error: artifact_over_budget bytes_total:{total} limit:{args.artifact_budget}")
    label, result = final_evaluations(model, *validation, args, rt, eval_t0)
    eval_ms = 1000 * (time.perf_counter() - eval_t0)
    rt.log(f"eval_time total_ms:{eval_ms:.0f} limit_ms:{1000 * args.eval_max_seconds:.0f}")
    rt.log(f"peak_mem_mib:{peak_memory_mib(rt):.0f}")
    rt.log(f"final_result label:{label} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
           f"bytes_total:{total} train_time_ms:{train_ms:.0f} eval_time_ms:{eval_ms:.0f}")
    return total


def run(args: Hyperparameters, rt: Runtime):
    code = read_code()
    log_run_header(rt, args, code)
    checked = check_inputs(args)
    rt.log(f"tokenizer path:{args.tokenizer_path} sha256:{args.tokenizer_sha256} checked:{checked}")
    if checked.startswith("none"):
        rt.log(f"warning: {args.data_path} has no {TOKENIZER_RECORD}, so nothing shows its shards were made with "
               "TOKENIZER_PATH (rebuild them with data/convert_text.py to record it)")
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    args.byte_accounting = byte_accounting(args, sp)
    luts = build_byte_luts(sp, args.vocab_size) if args.byte_accounting == "luts" else None
    rt.log(f"byte_accounting:{args.byte_accounting} tokenizer:{args.tokenizer_path}")
    backend, reason = select_attention_backend(args.attn_backend, rt.device)
    rt.log(f"attention_backend:{backend} reason:{reason}")
    try:  # before the first step, so that a bad byte sidecar cannot cost a training run
        validation = load_validation(args, luts)  # (tokens, target bytes), loaded once
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    path = args.artifact_file()
    if args.eval_only:
        eval_t0, train_ms = time.perf_counter(), 0.0
    else:
        model, train_ms = train_and_export(args, rt, backend, code.nbytes, validation, path)
        eval_t0 = time.perf_counter()
        rt.log(evaluate(model, *validation, args, rt, args.eval_seq_len, "prequant").line("final_prequant"))
        del model
    total = evaluate_artifact(args, rt, backend, code.nbytes, validation, path, eval_t0, train_ms)
    if dist.is_initialized():
        dist.destroy_process_group()
    if total > args.artifact_budget:
        sys.exit(1)


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised where the program is so that the log gets an error: line."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def exit_with_error(rt: Runtime | None, line: str, code: int):
    print(line, file=sys.stderr, flush=True)
    if rt:
        rt.log(line, console=False)
    sys.exit(code)


def main():
    """Every early end leaves an error: line in the log and a non-zero exit; a bad input or setting
    is one line without a traceback."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, raise_interrupted)
    rt = None
    try:
        args = Hyperparameters()
        if args.eval_only:
            try:
                meta = read_artifact(args.eval_only)[0]
            except (OSError, ValueError, RuntimeError) as e:
                raise ConfigError(f"EVAL_ONLY={args.eval_only}: {e}") from None
            adopt_artifact_config(args, meta)
        rt = setup_runtime(args)
        run(args, rt)
    except ConfigError as e:
        exit_with_error(rt, f"error: {e}", 1)
    except Interrupted as e:
        exit_with_error(rt, f"error: signal name:{e}", 128 + signal.Signals[str(e)].value)
    except Exception as e:
        if rt:
            rt.log(f"error: exception type:{type(e).__name__} message:{' '.join(str(e).split())}", console=False)
        raise


if __name__ == "__main__":
    main()
