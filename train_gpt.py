"""Parameter Golf training script: train a small GPT in 10 minutes on 8xH100, export it under
16,000,000 bytes (code + compressed weights) and score it in bits per byte on FineWeb validation.

Every knob is an environment variable (see KNOBS). Runs as `python train_gpt.py` or under
`torchrun --standalone --nproc_per_node=N train_gpt.py`; on CPU it uses gloo, fp32 and no compile.
"""

from __future__ import annotations

import atexit
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
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional: only the fused training kernels (FUSED_KERNELS) need it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BOS_ID = 1
# Rows of logits computed at once by GPT.token_nll: 8192 x vocab 8192 x 4 B = 268 MB of fp32 logits
# (a few copies with softcap and softmax), whatever the batch.
LOSS_CHUNK_TOKENS = 8192
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
    K("LOG_OVERWRITE", 0, bool, "1: replace an earlier run's logs/<RUN_ID>.txt and artifact (0: reusing a RUN_ID or an artifact path is an error)"),
    K("COMPILE", "auto", ("auto", "0", "1"), "torch.compile (auto: on for CUDA)"),
    K("AUTOCAST", "auto", ("auto", "bf16", "off"), "bf16 autocast (auto: on for CUDA)"),
    K("ATTN_BACKEND", "auto", ("auto", "fa4", "fa3", "fa2", "sdpa"), "attention kernel; an unavailable explicit choice is an error"),
    K("FUSED_KERNELS", "auto", ("auto", "0", "1"), "Triton kernels for training's softcapped cross-entropy and LeakyReLU^2 MLP (auto: with CUDA and triton, once they match eager there)"),
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
    K("QK_GAIN_INIT", 5.25, float, "init of the learned per-head query gain", 0.0),
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
    K("PARALLEL_RESIDUAL_START", 8, int, "attention and MLP read the same input from this layer (-1: off)", -1),
    K("PARALLEL_RESIDUAL_LANES", 2, int, "1: one residual (GPT-J form); 2: from the first decoder position at such a layer on, attention reads lane 0, the MLP lane 1, lanes mixed by learned scalars, output their mean", 1),
    K("ATTN_OUT_GATE", 1, bool, "per-head sigmoid gate on the attention output"),
    K("ATTN_GATE_WIDTH", 12, int, "residual dims feeding the attention output gate", 1),
    K("DOC_MASK", 0, bool, "attend only within the current BOS-delimited document"),
    # training
    K("TRAIN_SEQ_LEN", 2048, int, "training sequence length (the longest, with TRAIN_SEQ_SCHEDULE)", 2),
    K("TRAIN_SEQ_SCHEDULE", "", str, "progressive context, e.g. 1024@0.1,2048@0.7,3072@1: length@until-progress, ending at TRAIN_SEQ_LEN (empty: off)"),
    K("TRAIN_BATCH_TOKENS", 786432, int, "global tokens per optimizer step", 2),
    K("GRAD_ACCUM_STEPS", 0, int, "micro-batches per rank per step (0: 8 // world_size)", 0),
    K("ITERATIONS", 20000, int, "maximum optimizer steps", 0),
    K("MAX_WALLCLOCK_SECONDS", 600.0, float, "training time cap in seconds (0: none)", 0.0),
    K("GPTQ_RESERVE_SECONDS", "auto", float, "seconds of the cap kept for GPTQ calibration (+ export if EXPORT_ON_TRAIN_CLOCK; auto: predicted)", 0.0),
    K("EXPORT_ON_TRAIN_CLOCK", 0, bool, "1: quantize and compress on the training clock too (stricter; 0: after it)"),
    K("WARMUP_STEPS", 20, int, "compile-priming steps, undone before training", 0),
    K("LR_WARMUP_STEPS", 0, int, "linear LR warmup steps", 0),
    K("WARMDOWN_ITERS", 0, int, "LR warmdown length in steps (0: use WARMDOWN_FRAC)", 0),
    K("WARMDOWN_FRAC", 0.85, float, "LR warmdown as a fraction of training progress", 0.0),
    K("MIN_LR", 0.1, float, "LR floor at the end of warmdown, as a fraction of peak", 0.0),
    K("VAL_LOSS_EVERY", 0, int, "validate every N steps (0: only at the end)", 0),
    K("VAL_BATCH_SIZE", 524288, int, "baseline name; here it only caps EVAL_BATCH_SEQS at VAL_BATCH_SIZE // (EVAL_SEQ_LEN * world_size)", 1),
    K("TRAIN_LOG_EVERY", 100, int, "log a step line every N steps", 1),
    # optimizers
    K("MATRIX_LR", 0.028, float, "Muon learning rate for 2-D weights", 0.0),
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
    K("GPTQ_CALIBRATION_BATCHES", 32, int, "calibration micro-batches in all, split across ranks (train: of the global batch; selfgen: generated)", 1),
    K("LQER_RANK", 4, int, "rank of the low-rank quantization-error correction (0: off)", 0),
    K("LQER_TOP_K", 3, int, "tensors with the largest error that get LQER", 0),
    K("LQER_ASYM_GROUP", 32, int, "asymmetric LQER: A int2, B int4 with a scale per N values (0: both int4, a scale per rank)", 0),
    K("AWQ_LITE_GROUPS", 1, int, "AWQ-lite: N column groups kept at 8 bits in GPTQ, most salient (input RMS x mean |w|) first, one per matrix", 0),
    K("AWQ_LITE_GROUP_SIZE", 64, int, "columns per AWQ-lite group", 1),
    K("PACK_BITS", 0, bool, "bit-pack quantized values densely (smaller raw, but generic compressors do worse)"),
    K("COMPRESSOR", "rans", ("zstd", "brotli", "lzma", "rans", "auto"), "artifact compressor (rans: per-block-class ANS coding, brotli for the rest; auto: smallest of all)"),
    K("COMPRESSION_LEVEL", -1, int, "compressor level (-1: brotli 10, zstd 22, lzma 9, rans 8: up to that many block classes)", -1),
    K("COMPRESS_WORKERS", 0, int, "threads compressing artifact chunks in parallel (0: one per usable core)", 0),
    K("ARTIFACT_BUDGET", 16000000, int, "bytes allowed for code + model; export lowers bits to fit", 1),
    K("ARTIFACT_PATH", "", str, "artifact file (default logs/<RUN_ID>.pgart)"),
    K("EVAL_ONLY", "", str, "artifact to evaluate instead of training"),
    # evaluation
    K("EVAL_SEQ_LEN", 0, int, "evaluation window length (0: TRAIN_SEQ_LEN)", 0),
    K("EVAL_STRIDE", 64, int, "stride of final_sliding's windows and of chunk TTT's scoring windows, at most EVAL_SEQ_LEN (0: no final_sliding; TTT then scores whole windows)", 0),
    K("EVAL_BATCH_SEQS", 32, int, "windows per evaluation forward per rank (capped by VAL_BATCH_SIZE)", 1),
    K("EVAL_TOKEN_LOSSES", 0, bool, "write each evaluation's loss per target (float32) to logs/<RUN_ID>.<label>.f32"),
    K("EVAL_MAX_SECONDS", 600.0, float, "time for everything after training; TTT stops adapting to stay inside", 0.0),
    K("TTT_ENABLED", 1, bool, "score-first test-time training (final_ttt)"),
    K("TTT_CHUNK_TOKENS", 32768, int, "tokens scored, then trained on, per TTT chunk", 2),
    K("TTT_EPOCHS", 1, int, "passes over each chunk after scoring it (and over each segment in phased TTT's global phases)", 1),
    K("TTT_LR", 0.005, float, "chunk TTT's peak learning rate (cosine over chunks)", 0.0),
    K("TTT_OPTIMIZER", "sgd", ("sgd", "adamw"), "chunk TTT's optimizer (phased TTT's global phases always use SGD)"),
    K("TTT_MOMENTUM", 0.9, float, "TTT SGD momentum / AdamW beta1; also the momentum of phased TTT's global phases", 0.0),
    K("TTT_GRAD_CLIP", 1.0, float, "TTT gradient-norm clip, chunk TTT and phased TTT's global phases (0: off)", 0.0),
    K("TTT_PARAMS", "all", ("all", "norms", "lora", "last_k"), "what TTT trains"),
    K("TTT_LORA_RANK", 8, int, "rank of TTT LoRA adapters", 1),
    K("TTT_LAST_K", 2, int, "layers trained by TTT_PARAMS=last_k", 1),
    K("TTT_BATCH_SEQS", 16, int, "sequences per TTT step, all ranks (chunk TTT and phased TTT's global phases)", 1),
    K("PHASED_TTT_ENABLED", 1, bool, "document TTT with fresh LoRA adapters per document (final_phased_ttt, then the run's score)"),
    K("PHASED_TTT_CHUNK_TOKENS", 48, int, "targets of a document scored, then trained on, per adapter step (at most EVAL_SEQ_LEN)", 1),
    K("PHASED_TTT_SHORT_CHUNKS", "", str, "LIMIT:TOKENS,...: chunk of batches whose longest document has <= LIMIT targets (#2014: 256:8,2000:24)"),
    K("PHASED_TTT_LR", 8e-5, float, "AdamW learning rate of the per-document adapters", 0.0),
    K("PHASED_TTT_LOCAL_LR_MULT", 1.0, float, "factor on PHASED_TTT_LR (#1953: 0.75)", 0.0),
    K("PHASED_TTT_BETA1", 0.0, float, "AdamW beta1 of the per-document adapters", 0.0),
    K("PHASED_TTT_BETA2", 0.99, float, "AdamW beta2 of the per-document adapters", 0.0),
    K("PHASED_TTT_EPS", 1e-10, float, "AdamW epsilon of the per-document adapters", 0.0),
    K("PHASED_TTT_WD", 2.0, float, "AdamW weight decay of the per-document adapters", 0.0),
    K("PHASED_TTT_LORA_RANK", 80, int, "rank of the per-document LoRA adapters", 1),
    K("PHASED_TTT_LORA_TARGETS", "q,v,o,mlp,head", str, "adapted matrices, of q,k,v,o,mlp,head (#2135: no k)"),
    K("PHASED_TTT_LORA_ALPHA", 144.0, float, "adapter output scale alpha/rank", 0.0),
    K("PHASED_TTT_DOCS_PER_BATCH", 64, int, "documents adapted in parallel, each with its own adapters", 1),
    K("PHASED_TTT_FORWARD_ROWS", 0, int, "documents per adapting forward (0: all on CPU, from free memory on CUDA)", 0),
    K("PHASED_TTT_NUM_PHASES", 1, int, "global phases: SGD on all weights over each scored 1/N of the prefix (0: off)", 0),
    K("PHASED_TTT_PREFIX_DOCS", 2500, int, "leading documents the global phases are spread over", 0),
    K("PHASED_TTT_GLOBAL_LR", 0.001, float, "global phases' SGD peak rate, cosine over their chunks", 0.0),
    K("PHASED_TTT_GLOBAL_CHUNK_TOKENS", 32768, int, "targets per learning rate of the global phases", 1),
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
               "PARALLEL_RESIDUAL_LANES", "ATTN_OUT_GATE", "ATTN_GATE_WIDTH", "DOC_MASK", "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN")


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
        self.seq_schedule = self.parse_seq_schedule(self.train_seq_schedule)
        self.byte_accounting = "luts"  # run() resolves it against the tokenizer and DATA_PATH
        try:
            self.short_chunks = sorted(tuple(map(int, pair.split(":"))) for pair in self.phased_ttt_short_chunks.split(",") if pair)
        except ValueError:
            raise ConfigError(f"PHASED_TTT_SHORT_CHUNKS={self.phased_ttt_short_chunks!r}: expected LIMIT:TOKENS,...") from None
        self.fused_on, self.fused_reason = fused_kernels_choice(self.fused_kernels)
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

    def parse_seq_schedule(self, raw: str) -> list[tuple[int, float]]:
        """TRAIN_SEQ_SCHEDULE as [(length, until progress)], ending at TRAIN_SEQ_LEN and progress 1."""
        if not raw:
            return [(self.train_seq_len, 1.0)]
        try:
            sched = [(int(L), float(p)) for L, p in (part.split("@") for part in raw.split(","))]
        except ValueError:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={raw!r}: expected length@progress,...") from None
        ends = [p for _, p in sched]
        if ends != sorted(set(ends)) or ends[-1] != 1.0 or sched[-1][0] != self.train_seq_len or min(L for L, _ in sched) < 2:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={raw!r}: progress must rise to 1 and the last length be TRAIN_SEQ_LEN={self.train_seq_len}")
        return sched

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
        need(self.parallel_residual_lanes <= 2, f"PARALLEL_RESIDUAL_LANES={self.parallel_residual_lanes}: must be 1 or 2")
        need(self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE=1: need at least 2 buckets (one is reserved)")
        for name in ("ATTN_BITS", "MLP_BITS", "EMBED_BITS", "OTHER_BITS"):
            need(2 <= getattr(self, name.lower()) <= 8, f"{name}={getattr(self, name.lower())}: must be 2..8")
        need(self.warmdown_frac <= 1 and self.min_lr <= 1, "WARMDOWN_FRAC and MIN_LR must be <= 1")
        # a stride past the window would leave the targets between windows unscored
        need(self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride} exceeds EVAL_SEQ_LEN={self.eval_seq_len}")
        targets = self.phased_ttt_lora_targets.split(",")
        need(set(targets) <= set(ADAPTER_TARGETS) | {"head"} and len(set(targets)) == len(targets),
             f"PHASED_TTT_LORA_TARGETS={self.phased_ttt_lora_targets!r}: expected distinct names of q,k,v,o,mlp,head")
        need(all(len(p) == 2 and min(p) > 0 for p in self.short_chunks), "PHASED_TTT_SHORT_CHUNKS: expected positive LIMIT:TOKENS pairs")
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

    def host_max(self, values: list[float]) -> list[float]:
        """Each value's largest over the ranks, agreed through one host-side all-reduce: no device sync."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.tolist()

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


def lock_artifact_path(path: str, overwrite: bool):
    """Hold path + '.lock' locked for the run's life, so that two live runs never share an
    artifact, and refuse a path that holds anything but an earlier artifact (another run's log,
    code) or, without overwrite, an earlier artifact (its log could no longer be verified)."""
    lock = path + ".lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"ARTIFACT_PATH={path} is being written by another running process") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a run that ended removed the lock file between our open and flock: retry

    def release():  # removed while still locked, so no other run can hold the removed file
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)

    if os.path.exists(path):
        with open(path, "rb") as f:
            refuse = ("exists and is not an artifact; it is never overwritten" if f.read(len(ARTIFACT_MAGIC)) != ARTIFACT_MAGIC
                      else None if overwrite else "holds an earlier run's artifact; choose another ARTIFACT_PATH "
                      "or set LOG_OVERWRITE=1 to replace it")
        if refuse:
            release()
            raise ConfigError(f"ARTIFACT_PATH={path} {refuse}")
    atexit.register(release)


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
        self.stopped, self.paused_s, self.queued, self.agreed_s = False, 0.0, None, 0.0

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
        all get the same answer and the same elapsed time, the largest (agreed_s: what schedules
        use); once refused (here or on any rank), always refused. The first refusal logs the stop
        line at `at` (None: the caller logs it)."""
        elapsed = self.elapsed()
        over = self.stopped or elapsed + need_s > self.limit_s
        if all_ranks:
            elapsed, over = self.rt.host_max([elapsed, over])
        self.agreed_s = elapsed
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


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy to the device without blocking the host: on CUDA from pinned memory (a non_blocking
    copy from pageable memory waits for the device)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class TrainLoader:
    def __init__(self, args: Hyperparameters, rt: Runtime, grad_accum: int):
        self.stream = TokenStream(args.data_path, args.vocab_size)
        self.args, self.rt, self.grad_accum = args, rt, grad_accum

    def next_batch(self, seq_len: int = 0) -> list[tuple[Tensor, Tensor]]:
        """One optimizer step's micro-batches for this rank, in sequences of seq_len (default
        TRAIN_SEQ_LEN): the same tokens whatever the length, so a switch skips and repeats nothing."""
        a, rt = self.args, self.rt
        chunk = torch.from_numpy(self.stream.take(a.train_batch_tokens, rt.rank, rt.world_size).astype(np.int64))
        x, y = to_device(torch.stack([chunk[:-1], chunk[1:]]), rt.device).view(2, -1, seq_len or a.train_seq_len)  # one copy, aligned rows
        seqs = x.size(0) // self.grad_accum
        return [(x[i * seqs:(i + 1) * seqs], y[i * seqs:(i + 1) * seqs]) for i in range(self.grad_accum)]


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path}: no such file")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({e})") from None
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
        try:
            with open(record, encoding="utf-8") as f:
                want = json.load(f)["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{record} is malformed ({type(e).__name__}: {e}); rebuild the shards with "
                              "data/convert_text.py") from None
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
    costs a trained model."""
    if not os.path.isdir(args.data_path):
        raise ConfigError(f"DATA_PATH={args.data_path} does not exist; {DATA_HINT}")
    if not os.path.isfile(args.tokenizer_path):
        raise ConfigError(f"TOKENIZER_PATH={args.tokenizer_path}: no such file; {DATA_HINT}")
    try:
        if sum(load_shard(path, args.vocab_size).size for path in shard_files(args.data_path, "val")) < 2:
            raise ValueError(f"validation shards under {args.data_path} hold fewer than 2 tokens")
        train = 0 if args.eval_only else sum(load_shard(path, args.vocab_size).size for path in shard_files(args.data_path, "train"))
        if not args.eval_only and train <= args.train_batch_tokens:  # the loader would wait forever for a step
            raise ValueError(f"train shards under {args.data_path} hold {train} tokens; one step needs "
                             f"TRAIN_BATCH_TOKENS + 1 = {args.train_batch_tokens + 1}")
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
# FUSED TRITON KERNELS
# -----------------------------------------------------------------------------
# FUSED_KERNELS: the softcapped cross-entropy reads the bf16 logits and writes their gradient in
# bf16 (no fp32 logits or softmax are kept: 3.2 GB each at 98,304 tokens x 8,192 vocab), and the
# MLP's up-projection applies LeakyReLU^2 (forward) or its derivative (backward) in the matmul's
# epilogue. Each launch is a custom op, so torch.compile keeps one graph around it.


def fused_kernels_choice(requested: str) -> tuple[bool, str]:
    """(on, reason). auto: on with triton and CUDA; 1 also runs on CPU under TRITON_INTERPRET=1."""
    if requested == "0":
        return False, "FUSED_KERNELS=0"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (torch.cuda.is_available() or interpret and requested == "1"):
        why = "no_triton" if triton is None else "no_cuda"
        if requested == "1":
            raise ConfigError(f"FUSED_KERNELS=1: {why} (needs triton and CUDA, or TRITON_INTERPRET=1)")
        return False, why
    return True, f"triton_{triton.__version__}" + ("_interpreter" if interpret else "")


if triton is not None:
    @triton.jit
    def _softcap(x, cap, CAP: tl.constexpr):
        """cap*tanh(x/cap) + cap (a shift the cross-entropy cancels) and its derivative; x and 1 if not CAP."""
        if CAP:
            s = tl.sigmoid(x * (2 / cap))
            z, dz = 2 * cap * s, 4 * s * (1 - s)
        else:
            z, dz = x, x * 0 + 1
        return z, dz

    @triton.jit
    def _softcap_ce_kernel(x, t, lse, out, g, cap, V: tl.constexpr, B: tl.constexpr, CAP: tl.constexpr,
                           FWD: tl.constexpr):
        """One row of logits x per program. FWD: lse and loss = lse - z[target] (out); else the loss
        gradient g times (softmax - onehot) * dz/dx (out, x's shape and dtype)."""
        r = tl.program_id(0).to(tl.int64)
        x += r * V
        m, s, tr = -float("inf"), 0.0, tl.load(t + r)
        for i in range(0, V, B):  # V and B constexpr: the interpreter cannot loop to a runtime bound
            c = i + tl.arange(0, B)
            z, dz = _softcap(tl.load(x + c, mask=c < V, other=0).to(tl.float32), cap, CAP)
            if FWD:
                z = tl.where(c < V, z, -float("inf"))
                mx = tl.maximum(m, tl.max(z, 0))
                s = s * tl.exp(m - mx) + tl.sum(tl.exp(z - mx), 0)
                m = mx
            else:
                d = tl.load(g + r) * (tl.exp(z - tl.load(lse + r)) - (c == tr).to(tl.float32)) * dz
                tl.store(out + r * V + c, d.to(out.dtype.element_ty), mask=c < V)
        if FWD:
            zt, _ = _softcap(tl.load(x + tr).to(tl.float32), cap, CAP)
            tl.store(lse + r, m + tl.log(s))
            tl.store(out + r, m + tl.log(s) - zt)

    @triton.jit
    def _linear_act_kernel(a, b, c, aux, M, N, sam, sak, sbn, sbk, slope, K: tl.constexpr, FWD: tl.constexpr,
                           F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """a @ b.T (M, N) with an epilogue. FWD: c = pre, aux = leaky_relu(pre, slope)^2; else aux holds
        pre and c = a @ b.T * d(leaky_relu(pre)^2)/d(pre). F32: fp32 tiles (the interpreter's bf16
        dot multiplies raw bits; bf16 products are exact in fp32, so the sums are the same)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
        rn = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            rk = k + tl.arange(0, BK)
            x = tl.load(a + rm * sam + rk[None, :] * sak, mask=(rm < M) & (rk[None, :] < K), other=0)
            y = tl.load(b + rn * sbn + rk[:, None] * sbk, mask=(rn < N) & (rk[:, None] < K), other=0)
            if F32:
                x, y = x.to(tl.float32), y.to(tl.float32)
            acc = tl.dot(x, y, acc)
        o, m = rm * N + rn, (rm < M) & (rn < N)
        if FWD:
            h = tl.where(acc > 0, acc, slope * acc)
            tl.store(c + o, acc.to(c.dtype.element_ty), mask=m)
            tl.store(aux + o, (h * h).to(aux.dtype.element_ty), mask=m)
        else:
            p = tl.load(aux + o, mask=m, other=0).to(tl.float32)
            tl.store(c + o, (2 * acc * tl.where(p > 0, p, slope * slope * p)).to(c.dtype.element_ty), mask=m)

    def _softcap_ce_launch(x, t, lse, g, cap, fwd):
        n, v = x.shape
        out = torch.empty(n, device=x.device) if fwd else torch.empty_like(x)
        lse = torch.empty(n, device=x.device) if fwd else lse
        _softcap_ce_kernel[(n,)](x, t, lse, out, g, cap, V=v, B=min(1024, triton.next_power_of_2(v)),
                                 CAP=cap > 0, FWD=fwd)
        return out, lse

    def _linear_act_launch(a, b, aux, slope):
        (M, K), N = a.shape, b.shape[0]
        c, fwd = a.new_empty(M, N), aux is None
        aux = a.new_empty(M, N) if fwd else aux
        _linear_act_kernel[(triton.cdiv(M, 128), triton.cdiv(N, 128))](
            a, b, c, aux, M, N, *a.stride(), *b.stride(), slope, K=K, FWD=fwd, BM=128, BN=128, BK=64,
            F32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=8, num_stages=3)
        return c, aux

    @torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
    def _softcap_ce_op(x: Tensor, t: Tensor, cap: float) -> tuple[Tensor, Tensor]:
        return _softcap_ce_launch(x.contiguous(), t.contiguous(), None, None, cap, True)

    @torch.library.custom_op("pgolf::softcap_ce_grad", mutates_args=())
    def _softcap_ce_grad_op(x: Tensor, t: Tensor, lse: Tensor, g: Tensor, cap: float) -> Tensor:
        return _softcap_ce_launch(x.contiguous(), t.contiguous(), lse, g.float().contiguous(), cap, False)[0]

    @torch.library.custom_op("pgolf::linear_act", mutates_args=())
    def _linear_act_op(x: Tensor, w: Tensor, slope: float) -> tuple[Tensor, Tensor]:
        return _linear_act_launch(x, w, None, slope)

    @torch.library.custom_op("pgolf::linear_act_grad", mutates_args=())
    def _linear_act_grad_op(g: Tensor, w: Tensor, pre: Tensor, slope: float) -> Tensor:
        return _linear_act_launch(g, w.t(), pre.contiguous(), slope)[0]

    _softcap_ce_op.register_fake(lambda x, t, cap: (x.new_empty(len(x), dtype=torch.float32),
                                                     x.new_empty(len(x), dtype=torch.float32)))
    _softcap_ce_grad_op.register_fake(lambda x, t, lse, g, cap: torch.empty_like(x))
    _linear_act_op.register_fake(lambda x, w, slope: (x.new_empty(len(x), len(w)), x.new_empty(len(x), len(w))))
    _linear_act_grad_op.register_fake(lambda g, w, pre, slope: torch.empty_like(pre))


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of cap*tanh(x/cap) (x itself when cap is 0) for (N, V) logits x; the
    gradient comes back in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, targets: Tensor, cap: float) -> Tensor:
        loss, lse = torch.ops.pgolf.softcap_ce(x, targets, cap)
        ctx.save_for_backward(x, targets, lse)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        return torch.ops.pgolf.softcap_ce_grad(*ctx.saved_tensors, g, ctx.cap), None, None


class LeakyReLU2MLP(torch.autograd.Function):
    """leaky_relu(x @ w1.T, slope)^2 @ w2.T for 2-D x, the activation fused into the first matmul."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, slope: float) -> Tensor:
        pre, post = torch.ops.pgolf.linear_act(x, w1, slope)
        ctx.save_for_backward(x, w1, w2, pre, post)
        ctx.slope = slope
        return F.linear(post, w2)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, w2, pre, post = ctx.saved_tensors
        dpre = torch.ops.pgolf.linear_act_grad(g, w2, pre, ctx.slope)
        return dpre @ w1, dpre.t() @ x, g.t() @ post, None


def fused_kernels_fault(device: torch.device) -> str:
    """'' when both kernels match eager on small bf16 inputs (odd sizes: partial blocks), forward and
    backward, on this device; else what failed. FUSED_KERNELS=auto runs this before trusting them."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    x, w1, w2, logits = rnd(131, 96), rnd(200, 96), rnd(96, 200), rnd(37, 1000)
    targets = torch.randint(0, 1000, (37,), device=device, generator=g)
    try:
        fused = [LeakyReLU2MLP.apply(x, w1, w2, 0.5).float(), SoftcapCrossEntropy.apply(logits, targets, 30.0)]
        eager = [F.linear(F.leaky_relu(F.linear(x, w1), 0.5).square(), w2).float(),
                 F.cross_entropy(30 * torch.tanh(logits.float() / 30), targets, reduction="none")]
        for a, b in zip(fused, eager):
            grads = [torch.autograd.grad(t.sum(), (x, w1, w2, logits), allow_unused=True) for t in (a, b)]
            for u, v in zip((a,) + grads[0], (b,) + grads[1]):
                if u is not None and not torch.allclose(u.detach().float(), v.detach().float(), rtol=0.05, atol=0.05 * float(v.detach().abs().max())):
                    return "mismatch_vs_eager"
    except Exception as e:  # a kernel that does not compile or launch here
        return type(e).__name__
    return ""


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    """In x's own dtype (the kernel accumulates in fp32): CUDA autocast (torch >= 2.12) would return
    fp32 for the bf16 q/k, which FlashAttention refuses, and cast around every norm (pytorch#188955)."""
    with torch.autocast(x.device.type, enabled=False):
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
    its position in the batch; an input of n < batch rows uses adapters first..first+n-1."""

    def __init__(self, in_features: int, out_features: int, rank: int, device, batch: int = 0, scale: float = 1.0):
        super().__init__()
        lead = (batch,) if batch else ()
        a = torch.randn(rank, in_features, device=device) / math.sqrt(in_features)
        self.a = nn.Parameter(a.repeat(*lead, 1, 1))
        self.b = nn.Parameter(torch.zeros(*lead, out_features, rank, device=device))
        self.scale, self.first = scale, 0

    def forward(self, x: Tensor) -> Tensor:
        rows = slice(self.first, self.first + x.size(0))
        a, b = (self.a, self.b) if self.a.dim() == 2 else (self.a[rows], self.b[rows])
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


FLASH_PACKAGES = {"fa4": "flash_attn.cute.interface (pip flash-attn-4, CuTe DSL)", "fa3": "flash_attn_interface (FlashAttention 3)",
                  "fa2": "flash_attn"}  # the module first


def flash_module_name(backend: str) -> str:
    return FLASH_PACKAGES[backend].split()[0]


def load_flash_attention(backend: str):
    """The FlashAttention module for fa4/fa3/fa2, or None when it is not installed; one that is
    installed but fails to import (a broken CUDA-side install raises anything) is a ConfigError."""
    name = flash_module_name(backend)
    try:
        return __import__(name, fromlist=["_"])
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and f"{name}.".startswith(f"{e.name}."):  # not installed
            return None
        raise ConfigError(f"{FLASH_PACKAGES[backend]} is installed but fails to import: {type(e).__name__}: "
                          f"{' '.join(str(e).split())}") from None


def select_attention_backend(requested: str, device: torch.device, autocast: bool = True, doc_mask: bool = False,
                             log=print) -> tuple[str, str]:
    """(backend, reason). auto: FA3 on Hopper, else FA4 on Hopper or newer, else FA2 on CUDA, else
    SDPA, a broken install logged and skipped; an explicit request that cannot be met is an error,
    never a silent downgrade. FlashAttention takes only bf16 (AUTOCAST); DOC_MASK on CUDA needs its
    varlen kernel, since SDPA with a mask would take the O(T^2) fp32 math kernel."""
    on_cuda = device.type == "cuda"
    if requested in FLASH_PACKAGES:
        if not on_cuda or not autocast:
            raise ConfigError(f"ATTN_BACKEND={requested} needs a CUDA device and AUTOCAST bf16")
        if load_flash_attention(requested) is None:
            raise ConfigError(f"ATTN_BACKEND={requested} but {FLASH_PACKAGES[requested]} is not installed")
        return requested, "requested"

    def usable(backend: str) -> bool:
        try:
            return load_flash_attention(backend) is not None
        except ConfigError as e:
            log(f"warning: ATTN_BACKEND=auto skips {backend}: {e}")
            return False

    major = torch.cuda.get_device_capability(device)[0] if on_cuda else 0
    if requested == "sdpa":
        chosen = "sdpa", "requested"
    elif not on_cuda:
        chosen = "sdpa", "no_cuda"
    elif not autocast:
        chosen = "sdpa", "autocast_off"
    elif major == 9 and usable("fa3"):
        chosen = "fa3", "auto_hopper"
    elif major >= 9 and usable("fa4"):
        chosen = "fa4", "auto_fa3_unavailable"
    elif usable("fa2"):
        chosen = "fa2", "auto_fa3_unavailable"
    else:
        chosen = "sdpa", "auto_flash_attn_not_installed"
    if doc_mask and on_cuda and chosen[0] == "sdpa":
        raise ConfigError(f"DOC_MASK=1 on CUDA needs FlashAttention varlen, not SDPA ({chosen[1]}): "
                          "SDPA with a document mask runs the O(T^2) fp32 math kernel")
    return chosen


@torch.library.custom_op("pg::fa4", mutates_args=())
def fa4_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor | None, max_len: int) -> tuple[Tensor, Tensor]:
    """(out, lse) of FlashAttention 4, an op of its own: flash_attn.cute's autograd.Function is
    opaque to torch.compile, which would break the graph at every call."""
    fa = sys.modules[flash_module_name("fa4")]
    return tuple(fa._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                    max_seqlen_k=max_len, causal=True, return_lse=True)[:2])


@fa4_attention.register_fake
def _(q, k, v, cu, max_len):
    lse_shape = (q.size(1), q.size(0)) if cu is not None else (q.size(0), q.size(2), q.size(1))
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("pg::fa4_backward", mutates_args=())
def fa4_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, cu: Tensor | None,
                 max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    fa = sys.modules[flash_module_name("fa4")]
    return tuple(fa._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, cu_seqlens_q=cu,
                                    cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)[:3])


@fa4_backward.register_fake
def _(q, k, v, out, lse, dout, cu, max_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fa4_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], *output)
    ctx.max_len = inputs[4]


def fa4_grad(ctx, dout, dlse):
    q, k, v, cu, out, lse = ctx.saved_tensors
    return *fa4_backward(q, k, v, out, lse, dout, cu, ctx.max_len), None, None


fa4_attention.register_autograd(fa4_grad, setup_context=fa4_save)


@torch.library.custom_op("pg::document_starts", mutates_args=())
def document_starts(ids: Tensor) -> Tensor:
    """Flat (B*T) positions where a document or a batch row starts; its own op, so that torch.compile
    keeps one graph around its data-dependent length (one host sync per forward on CUDA)."""
    start = ids == BOS_ID
    start[:, 0] = True
    return start.flatten().nonzero().flatten().int()


@document_starts.register_fake
def _(ids):
    return ids.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int32)


def document_segments(ids: Tensor, backend: str) -> Tensor:
    """What attention needs to keep every token inside its BOS-delimited document, computed once per
    forward: SDPA's boolean mask (B, 1, T, T) (CPU only, see select_attention_backend), or the int32
    cu_seqlens of FlashAttention varlen over the flattened batch."""
    if backend != "sdpa":
        return F.pad(document_starts(ids), (0, 1), value=ids.numel())
    doc = torch.cumsum(ids == BOS_ID, dim=1)
    return (doc[:, :, None] == doc[:, None, :]).tril()[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str, docs: Tensor | None) -> Tensor:
    """Causal GQA attention; q (B,T,H,D), k/v (B,T,Hkv,D), all one dtype -> (B,T,H,D). With docs
    (document_segments), tokens attend only within their own document."""
    if backend == "sdpa":
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=docs, is_causal=docs is None, enable_gqa=True).transpose(1, 2)
    B, T, H, D = q.shape
    if docs is not None:
        q, k, v = (t.reshape(B * T, t.size(2), D) for t in (q, k, v))
    if backend == "fa4":
        return fa4_attention(q, k, v, docs, T)[0].view(B, T, H, D)
    fa = sys.modules[flash_module_name(backend)]  # imported by select_attention_backend
    if docs is None:
        out = fa.flash_attn_func(q, k, v, causal=True)
    else:
        out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=docs, cu_seqlens_k=docs, max_seqlen_q=T, max_seqlen_k=T, causal=True)
    return (out[0] if isinstance(out, tuple) else out).view(B, T, H, D)  # FA3 before 2025 returns (out, lse)


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

    def forward(self, x: Tensor, ve: Tensor | None, docs: Tensor | None) -> Tensor:
        B, T, dim = x.shape
        q = self.c_q(x).view(B, T, self.h, self.d)
        k = self.c_k(x).view(B, T, self.hkv, self.d)
        v = self.c_v(x).view(B, T, self.hkv, self.d)
        if ve is not None:
            v = v + ve.view(B, T, self.hkv, self.d)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[:, None]  # q, k, v: one dtype, as FlashAttention needs
        k = self.rotary(rms_norm(k))
        y = attend(q, k, v, self.backend, docs)
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
        self.fused = args.fused_on

    def forward(self, x: Tensor) -> Tensor:
        # training only: without grad (GPTQ calibration's hooks on fc and proj, evaluation) it stays eager
        if self.fused and torch.is_grad_enabled() and self.fc.lora is None and self.proj.lora is None:
            dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            w1, w2 = self.fc.qweight().to(dt), self.proj.qweight().to(dt)
            return LeakyReLU2MLP.apply(x.reshape(-1, x.size(-1)).to(dt), w1, w2, self.slope).view(x.shape)
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
        self.parallel = args.parallel_residual_lanes == 1 and 0 <= args.parallel_residual_start <= layer

    def attention(self, x: Tensor, x0: Tensor, ve: Tensor | None, docs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(attention input, its normed form, scaled attention output)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.ln
        return x, h, self.attn_scale.to(x.dtype) * self.attn(h, ve, docs)

    def lanes(self, x: Tensor, lane1: Tensor, x0: Tensor, ve: Tensor | None, docs: Tensor | None,
              resid: Tensor, post: Tensor) -> tuple[Tensor, Tensor]:
        """Two-lane parallel residual (1.0611 record): attention reads lane 0 (x, mixed with x0), the
        MLP reads lane 1; lane j becomes resid[j] * lane j + post[0, j] * attn + post[1, j] * mlp."""
        a = self.attention(x, x0, ve, docs)[2]
        m = self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(lane1) * self.ln)
        r, p = resid.to(x.dtype), post.to(x.dtype)
        return r[0] * x + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, docs: Tensor | None) -> Tensor:
        x, h, a = self.attention(x, x0, ve, docs)
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
        self.args, self.backend = args, backend
        dim, L, V = args.model_dim, args.num_layers, args.vocab_size
        self.tok_emb = Embedding(V, dim, args.tied_embed_init_std)
        self.bigram = BigramHash(args.bigram_vocab_size, args.bigram_dim, dim) if args.bigram_vocab_size else None
        self.smear = SmearGate(args.smear_gate_width) if args.smear_gate else None
        kv_dim = args.num_kv_heads * (dim // args.num_heads)
        self.ve_emb = Embedding(V, args.ve_dim, 0.02) if args.ve_dim else None
        self.ve_proj = CastedLinear(args.ve_dim, kv_dim, zero_init=True) if args.ve_dim else None
        self.ve_layers = set(args.ve_layer_ids)
        self.blocks = nn.ModuleList([Block(args, i, backend) for i in range(L)])
        # One skip per encoder position of the longest layer order (the looped one): the plain
        # order uses the first L // 2, so both orders train the same parameters from step 0.
        n_skips = len(self.layer_order(looping=True)) // 2 if args.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(n_skips, dim)) if n_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, dim)) if n_skips else None
        # two-lane residual: per layer, each lane's own weight (init 1.1) and [attn, mlp] -> lane weights
        two_lane = args.parallel_residual_lanes == 2 and args.parallel_residual_start >= 0
        self.lane_resid = nn.Parameter(torch.full((L, 2), 1.1)) if two_lane else None
        self.lane_post = nn.Parameter(torch.ones(L, 2, 2)) if two_lane else None
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, V, zero_init=True)
        self.head_lora: LoRA | None = None  # phased TTT's per-document output adapter
        self.looping = False
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def layer_order(self, looping: bool | None = None) -> list[int]:
        a, L = self.args, self.args.num_layers
        if not (self.looping if looping is None else looping) or a.num_loops <= 1:
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
        docs = document_segments(ids, self.backend) if self.args.doc_mask else None
        ve = self.ve_proj(self.ve_emb(ids)) if self.ve_emb is not None else None
        # U-Net over the layer order as run (looped or not): the first half are encoder positions,
        # each pushing its output; decoder position k pops the latest and blends it in with its own
        # weight and gate, so a looped layer gets a different skip on every visit.
        # Two lanes start at the first decoder position whose layer is >= PARALLEL_RESIDUAL_START
        # (both equal to x there; skips then go into lane 0) and run to the end.
        order = self.layer_order()
        half = len(order) // 2
        n_enc = half if self.skip_weights is not None else 0
        skips, lane1 = [], None
        for pos, i in enumerate(order):
            if lane1 is None and self.lane_post is not None and pos >= half and i >= self.args.parallel_residual_start:
                lane1 = x
            if pos >= n_enc and skips:
                k = pos - n_enc
                x = torch.lerp(self.skip_weights[k].to(x.dtype) * skips.pop(), x, torch.sigmoid(self.skip_gates[k]).to(x.dtype))
            ve_i = ve if i in self.ve_layers else None
            if lane1 is None:
                x = self.blocks[i](x, x0, ve_i, docs)
            else:
                x, lane1 = self.blocks[i].lanes(x, lane1, x0, ve_i, docs, self.lane_resid[i], self.lane_post[i])
            if pos < n_enc:
                skips.append(x)
        return rms_norm(x if lane1 is None else (x + lane1) / 2)

    def head(self, h: Tensor) -> Tensor:
        """Logits before the softcap, in the matmul's dtype."""
        w = self.tok_emb.qweight() if self.lm_head is None else self.lm_head.qweight()
        logits = F.linear(h, w.to(h.dtype))
        return logits if self.head_lora is None else logits + self.head_lora(h)

    def logits(self, h: Tensor) -> Tensor:
        logits = self.head(h).float()
        cap = self.args.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        h = self.hidden(ids)
        if self.args.fused_on:
            return SoftcapCrossEntropy.apply(self.head(h).flatten(0, 1), targets.flatten(), self.args.logit_softcap).mean()
        return F.cross_entropy(self.logits(h).flatten(0, 1), targets.flatten())

    def chunk_nll(self, h: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(h).flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def token_nll(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood (B, T) in fp32, its logits computed for a slice of
        positions of all rows at a time, about LOSS_CHUNK_TOKENS rows of logits: no (B, T, vocab)
        fp32 tensor exists (rows stay whole for per-row head adapters). With grad each slice is
        checkpointed, so backward keeps the hidden states and recomputes one slice's logits at a time."""
        h, step = self.hidden(ids), max(1, LOSS_CHUNK_TOKENS // ids.size(0))
        chunks = [(h[:, i:i + step], targets[:, i:i + step]) for i in range(0, ids.size(1), step)]
        if torch.is_grad_enabled():
            nll = [torch.utils.checkpoint.checkpoint(self.chunk_nll, hc, yc, use_reentrant=False) for hc, yc in chunks]
        else:
            nll = [self.chunk_nll(hc, yc) for hc, yc in chunks]
        return torch.cat(nll, dim=1)


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


def muon_shares(banks: list[tuple[int, int]], world_size: int) -> list[list[int]]:
    """Matrices per rank of each bank, given (matrices, cost of one): costliest banks first, each
    matrix to the least-loaded rank holding fewer than ceil(matrices / world_size) of its bank, so
    the ranks' orthogonalisation work is balanced over all banks and no gather grows."""
    load, shares = [0] * world_size, [[]] * len(banks)
    for b in sorted(range(len(banks)), key=lambda b: -banks[b][1]):
        n, cost = banks[b]
        counts = [0] * world_size
        for _ in range(n):
            r = min((r for r in range(world_size) if counts[r] < -(-n // world_size)), key=lambda r: load[r])
            counts[r] += 1
            load[r] += cost
        shares[b] = counts
    return shares


class MuonBank:
    """Same-shape matrices of one param group, updated as one batch. Rank r owns counts[r]
    consecutive matrices; this rank's are params[lo:hi]: their momentum and their
    orthogonalisation. `gathered` receives every rank's share, each padded to the largest, and
    `rows` are the params' places in it. All buffers are allocated once."""

    def __init__(self, group: dict, params: list[Tensor], rank: int, world_size: int, counts: list[int]):
        self.group, self.params = group, params
        shape = params[0].shape
        self.chunk = max(counts)
        self.lo = sum(counts[:rank])
        self.hi = self.lo + counts[rank]
        self.rows = [r * self.chunk + j for r in range(world_size) for j in range(counts[r])]
        new = lambda k: torch.zeros(k, *shape, device=params[0].device, dtype=params[0].dtype)
        self.grads, self.momentum = new(self.hi - self.lo), new(self.hi - self.lo)
        self.send = new(self.chunk) if world_size > 1 else None
        self.gathered = new(world_size * self.chunk) if world_size > 1 else None
        self.scale = math.sqrt(max(1.0, shape[0] / shape[1]))


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> optional row normalisation (MuonEq-R) -> orthogonalisation, scaled by
    sqrt(max(1, rows/cols)), with decoupled weight decay. Same-shape matrices form banks that are
    orthogonalised as one batch (compiled on CUDA). Across ranks each rank orthogonalises a
    contiguous share of every bank, sized by muon_shares, and the shares are all-gathered asynchronously, each gather
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
        banks = []
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            banks += [(group, ps) for ps in by_shape.values()]
        shares = muon_shares([(len(ps), ps[0].numel() * min(ps[0].shape)) for _, ps in banks], world_size)
        self.banks = [MuonBank(group, ps, rank, world_size, counts) for (group, ps), counts in zip(banks, shares)]
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
        rows = update.unbind(0)
        torch._foreach_add_(bank.params, [rows[i] for i in bank.rows], alpha=-lr)

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
    """The training loop's time: the wallclock cap less the GPTQ reserve (inf without a cap)."""
    return max(args.max_wallclock_seconds - args.gptq_reserve_seconds, 1e-3) if args.max_wallclock_seconds > 0 else math.inf


def training_progress(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Fraction of training done: by steps, or by elapsed time when a wallclock cap is set
    (whichever is further), where the cap excludes the time reserved for GPTQ calibration."""
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
    for seq_len, _ in args.seq_schedule:
        if args.train_batch_tokens % (rt.world_size * accum * seq_len):
            raise ConfigError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} is not divisible by world_size {rt.world_size} "
                              f"x GRAD_ACCUM_STEPS {accum} x sequence length {seq_len} (TRAIN_SEQ_LEN, TRAIN_SEQ_SCHEDULE)")
    return accum


def train_seq_len_at(args: Hyperparameters, progress: float) -> int:
    return next((L for L, until in args.seq_schedule if progress < until), args.train_seq_len)


def prime_compile(model: GPT, model_fn, args: Hyperparameters, rt: Runtime, loader: TrainLoader):
    """Compile, before the clock starts, every graph the run will use: WARMUP_STEPS real steps (at
    least one per graph) spread over each layer order (plain, then looped) and each TRAIN_SEQ_SCHEDULE length, then with
    COMPILE the evaluation graphs at their real shapes, then restore the initial weights; optimizers
    are rebuilt by the caller."""
    if args.warmup_steps:
        t0 = time.perf_counter()
        initial = copy.deepcopy(model.state_dict())
        opts = build_optimizers(model, args, rt)
        graphs = [(looping, L) for looping in sorted({False, args.num_loops > 1}) for L, _ in args.seq_schedule]
        steps = max(args.warmup_steps, len(graphs))  # at least one step per graph
        for i in range(steps):
            model.looping, seq_len = graphs[i * len(graphs) // steps]
            train_step(model_fn, model, opts, loader.next_batch(seq_len), args, rt)
        model.load_state_dict(initial)
        model.looping = False
        rt.sync()
        rt.log(f"warmup steps:{steps} ms:{1000 * (time.perf_counter() - t0):.0f} (compile priming, weights restored)")
    if rt.compile:
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):  # eager and compiled runs draw the same
            prime_eval_graphs(model, args, rt)


def prime_eval_graphs(model: GPT, args: Hyperparameters, rt: Runtime):
    """Run each compiled evaluation once on every rank on a dummy stream (one full batch per rank:
    a rank that primes nothing compiles on the evaluation clock), at the shapes of the real one: the
    training model's evaluation (periodic validation, final_prequant) in each layer order it may
    have, then, on a fresh model built like the artifact's (no fake-quantizers, the final layer
    order), the standard/sliding evaluation and chunk TTT's scoring and training step. Phased TTT
    runs eagerly and compiles nothing. Each line gives a first call's time (compile + one run); the
    dummy evaluations themselves log nothing."""
    quiet = replace(rt, muted=True)
    windows = max(2, rt.world_size * eval_batch_seqs(args, rt))
    dummy = torch.arange(max(windows * args.eval_seq_len, args.ttt_chunk_tokens + 2) + 1) % args.vocab_size
    dummy_bytes = torch.ones_like(dummy, dtype=torch.int32)
    final_looping = args.num_loops > 1 and args.enable_looping_at < 1
    artifact_like = GPT(args, model.backend).to(rt.device)
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
    step, step_ms, elapsed = 0, 0.0, 0.0  # elapsed: ms agreed by all ranks after the last step, so they switch together
    seq_len = 0 if len(args.seq_schedule) > 1 else args.train_seq_len  # a schedule logs its first length too
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
        progress = training_progress(args, step, elapsed)
        if args.num_loops > 1 and not model.looping and progress >= args.enable_looping_at:
            model.looping = True
            rt.log(f"looping_enabled step:{step} train_time:{elapsed:.0f} layers:{','.join(map(str, model.layer_order()))}")
        if (now := train_seq_len_at(args, progress)) != seq_len:
            seq_len = now
            rt.log(f"train_seq_len step:{step} train_time:{elapsed:.0f} seq_len:{seq_len}")
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
        loss = train_step(model_fn, model, opts, loader.next_batch(seq_len), args, rt)
        step += 1
        averager.update(step, progress)
        budget.pace()
        stop = not budget.allows(0.0, None)
        elapsed = 1000 * budget.agreed_s
        step_ms = elapsed / step
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


def gptq_quantize(w: Tensor, H: Tensor, scale: Tensor, bits: int, damp: float, block: int, awq=None) -> Tensor:
    """GPTQ with act-order: quantize columns in order of decreasing Hessian diagonal, pushing each
    column's rounding error onto the not-yet-quantized columns through the Cholesky factor of H^-1.
    awq = (start, end, scale): those columns take 8-bit values on their own row scales."""
    W = w.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    S = scale.expand_as(W).clone()  # each column's row steps and value limit
    qmax = torch.full((W.size(1),), 2 ** (bits - 1) - 1, device=W.device)
    if awq:
        S[:, awq[0]:awq[1]], qmax[awq[0]:awq[1]] = awq[2], 127
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H, S, qmax = W[:, perm], H[perm][:, perm], S[:, perm], qmax[perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.size(0), device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, s, m = W1[:, i], S[:, i1 + i], qmax[i1 + i]
            q = torch.minimum(torch.maximum(torch.round(col / s), -m), m)
            Q[:, i1 + i] = q
            err = (col - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@contextlib.contextmanager
def no_tf32():
    """Full fp32 matmuls inside (setup_runtime turns TF32 on for training; GPTQ's Hessians, Cholesky
    inputs and error updates need fp32), the previous flags after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@torch.no_grad()
@no_tf32()
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
    lqer: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # A, fp16 A scales (1, r or 1), B, fp16 B scales (one per row or group of B)
    awq: tuple[int, int, Tensor] | None = None  # AWQ-lite columns [start, end): int8 values in q, their own row scales

    def dequantize(self) -> Tensor:
        w = self.q.float() * self.scale.float()
        if self.awq is not None:
            a, b, s = self.awq
            w[:, a:b] = self.q[:, a:b].float() * s.float()
        if self.lqer is not None:
            qa, sa, qb, sb = self.lqer
            w = w + (qa.float() * sa.float()) @ (qb.float().reshape(sb.size(0), -1) * sb.float()).view(qb.shape)
        return w


def quantize_lqer_factor(x: Tensor, absmax: Tensor, div: float, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Values in [lo, hi] on fp16 steps absmax / div."""
    s = (absmax / div).clamp_min(1e-7).half()
    return torch.clamp(torch.round(x / s.float()), lo, hi).to(torch.int8), s


@no_tf32()
def quantize_tensor(w: Tensor, H: Tensor | None, bits: int, clip: float, args: Hyperparameters,
                    awq_start: int | None = None) -> tuple[QTensor, float]:
    """GPTQ (or round-to-nearest) of one matrix, with its Hessian-weighted squared error; the
    AWQ-lite group from awq_start, if any, at 8 bits (same SDClip k, its own row scales)."""
    scale = row_scales(w, bits, clip, args.clip_search)
    awq = None if awq_start is None else (awq_start, awq_start + args.awq_lite_group_size,
                                           row_scales(w, 8, clip, False))
    if args.quant == "gptq" and H is not None:
        q = gptq_quantize(w, H.to(w.device), scale, bits, args.gptq_damp, args.gptq_block_size, awq)
    else:
        q = quantize_rtn(w, scale, bits)
        if awq:
            q[:, awq[0]:awq[1]] = quantize_rtn(w[:, awq[0]:awq[1]], awq[2], 8)
    qt = QTensor(q.to(torch.int8).cpu(), scale.cpu(), bits, awq=awq and (awq[0], awq[1], awq[2].cpu()))
    E = w - qt.dequantize().to(w.device)
    err = float((E @ H.to(w.device) * E).sum()) if H is not None else float(E.square().sum())
    return qt, err


def awq_lite_groups(state: dict, specs: dict, hessians: dict, args: Hyperparameters) -> dict[str, int]:
    """{state key: first column} of the AWQ_LITE_GROUPS most salient column groups, at most one per
    matrix below 8 bits. A column's salience is its input RMS (from the Hessian diagonal, summed over
    a looped layer's passes as its error is) times its mean |w|; a group's is the sum of its columns'."""
    g, cands = args.awq_lite_group_size, []
    for key, (name, (bits, _)) in specs.items():
        w, H = state[key], hessians.get(name)
        if H is None or bits >= 8 or w.size(1) < g:
            continue
        sal = torch.diag(H).float().clamp_min(0).sqrt().cpu() * w.detach().float().abs().mean(0).cpu()
        score, i = sal[:w.size(1) // g * g].view(-1, g).sum(1).max(0)
        cands.append((float(score), key, int(i) * g))
    return {key: start for _, key, start in sorted(cands, reverse=True)[:args.awq_lite_groups]}


def lqer_factors(w: Tensor, qt: QTensor, rank: int, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank-r factors A @ B of the quantization error. Symmetric (group 0): both int4, one scale per
    rank component. Asymmetric (the records'): A int2 in [-2, 1] on one scale, B int4 in [-8, 7] with
    one scale per group of its flattened values (at rank 4 B carries the precision A does not need)."""
    U, S, Vh = torch.linalg.svd(w - qt.dequantize(), full_matrices=False)
    r = min(rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    if group and B.numel() % group == 0:
        Bg = B.reshape(-1, group)
        qb, sb = quantize_lqer_factor(Bg, Bg.abs().amax(1, keepdim=True), 7.5, -8, 7)
        return (*quantize_lqer_factor(A, A.abs().amax().view(1, 1), 1.5, -2, 1), qb.view(B.shape), sb)
    return (*quantize_lqer_factor(A, A.abs().amax(0, keepdim=True), 7, -7, 7),
            *quantize_lqer_factor(B, B.abs().amax(1, keepdim=True), 7, -7, 7))


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
    groups = awq_lite_groups(state, specs, hessians, args)
    for key, t in state.items():
        if key not in specs:
            out[key] = t.detach().to(torch.float16 if t.is_floating_point() else t.dtype).cpu()
            continue
        name, (bits, clip) = specs[key]
        work = (key, bits, groups.get(key))
        if work not in cache:
            cache[work] = quantize_tensor(t.detach().float(), hessians.get(name), bits, clip, args, groups.get(key))
        out[key], errors[key] = cache[work]
    if args.lqer_rank > 0:
        for key in sorted(errors, key=errors.get, reverse=True)[:args.lqer_top_k]:
            work = (key, out[key].bits, groups.get(key), "lqer")
            if work not in cache:
                cache[work] = lqer_factors(state[key].detach().float().cpu(), out[key], args.lqer_rank, args.lqer_asym_group)
            out[key] = replace(out[key], lqer=cache[work])
    return out, errors


# Bytes per byte of Gaussian entropy of the rounded values, measured on a record-size payload of
# random weights (bench/RESULTS.md); trained weights code up to ~0.5% smaller. Default: brotli's.
CODER_OVERHEAD = {"zstd": 1.0155, "rans": 0.9994}


LQER_FACTOR_BYTES = 0.4  # an int4 factor value clipped at its column's absmax: ~3.1 bits coded


LQER_ASYM_BYTES = (0.2, 0.42)  # asymmetric LQER: an int2 A value, an int4 B value on its group's absmax


SCALE_CODE_BYTES = 0.5  # a row scale's u8 grid code: rows of a tensor span a few octaves at most


TENSOR_TABLE_BYTES = 20  # per state-dict entry: compressed JSON table entry + chunk table share


def estimate_quantized_bits(bits: int, clip_sigmas: float) -> float:
    """Entropy (bits/value) of a Gaussian row rounded with step k*std/qmax: log2(qmax/k) + 2.05."""
    return min(float(bits), max(1.0, math.log2((2 ** (bits - 1) - 1) / max(clip_sigmas, 1e-3)) + 2.05))


def estimate_artifact_bytes(model: GPT, args: Hyperparameters, code_bytes: int) -> int:
    """Pre-flight size estimate: code + coded quantized values + row scale codes + LQER factors (placed
    on the largest matrices, since the error ranking is not known yet) + fp16 small tensors + tables."""
    values, scales, quantized, sides, awq = 0.0, 0, set(), [], []
    for name, m in quantizable_modules(model):
        spec = quant_spec(name, m.weight.numel(), args)
        if spec:
            values += m.weight.numel() * estimate_quantized_bits(*spec) / 8
            scales += SCALE_CODE_BYTES * m.weight.size(0)
            sides.append(tuple(m.weight.shape))
            quantized.add(id(m.weight))
            if spec[0] < 8 and m.weight.size(1) >= args.awq_lite_group_size:  # its group's extra bytes
                extra_bits = args.awq_lite_group_size * (estimate_quantized_bits(8, spec[1]) - estimate_quantized_bits(*spec))
                awq.append(m.weight.size(0) * (extra_bits / 8 + SCALE_CODE_BYTES))
    # AWQ-lite groups go where salience puts them, not known before training: the mean matrix's each
    values += sum(awq) / len(awq) * min(args.awq_lite_groups, len(awq)) if awq and args.quant == "gptq" else 0
    g = args.lqer_asym_group
    a_bytes, b_bytes = (LQER_ASYM_BYTES[0], LQER_ASYM_BYTES[1] + 2 / g) if g else (LQER_FACTOR_BYTES, LQER_FACTOR_BYTES)
    lqer = sum(sorted(a_bytes * r + b_bytes * c for r, c in sides)[-args.lqer_top_k:]) * args.lqer_rank if args.lqer_rank and sides else 0
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
            pred["quantize"] += args.lqer_top_k * timed(lambda: lqer_factors(w, qt, args.lqer_rank, args.lqer_asym_group), rt)
        sample = np.clip(np.random.default_rng(0).normal(32, 2.6, min(raw_bytes, CHUNK_BYTES)), 1, 63).astype(np.uint8).tobytes()
        rounds = -(-math.ceil(raw_bytes / CHUNK_BYTES) // (args.compress_workers or usable_cpus()))
        for cand, lvl in compression_candidates(args):
            pred["compress"] += rounds * timed(lambda: compress_chunk((cand, lvl, sample)), rt)
    return dict(zip(pred, rt.host_max(list(pred.values()))))  # every rank reserves the slowest rank's time


def resolve_gptq_reserve(model: GPT, args: Hyperparameters, rt: Runtime):
    """GPTQ_RESERVE_SECONDS=auto: the predicted time of what runs on the training clock after the last
    step, with a 25% margin + 1 s (2 s with the export): GPTQ calibration, which
    reads training data, and with EXPORT_ON_TRAIN_CLOCK=1 quantization and compression (0 without a cap)."""
    if args.gptq_reserve_seconds != "auto":
        return
    if args.max_wallclock_seconds <= 0:
        args.gptq_reserve_seconds = 0.0
        return
    pred = predict_export_seconds(model, args, rt)
    covered = list(pred) if args.export_on_train_clock else ["calibration"]
    args.gptq_reserve_seconds = round(1.25 * sum(pred[k] for k in covered) + (2.0 if args.export_on_train_clock else 1.0), 1)
    rt.log(f"gptq_reserve seconds:{args.gptq_reserve_seconds} source:auto covers:{'+'.join(covered)} "
           + " ".join(f"{k}_s:{v:.2f}" for k, v in pred.items()))


def bits_to_lower(model: GPT, args: Hyperparameters, qstate: dict, errors: dict, override: dict, excess: int) -> list[tuple[str, int, int]]:
    """Tensors whose precision costs least to lower by one bit (Hessian-weighted error added per
    estimated byte saved, an AWQ-lite group staying at 8 bits), until the estimated saving covers the
    excess. Matrices kept in fp16 go to 8 bits first: near-lossless, and the only way under the
    budget for models of small matrices."""
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
            awq = qstate[name + ".weight"].awq
            lowered = m.weight.numel() - (awq[1] - awq[0]) * m.weight.size(0) if awq else m.weight.numel()
            saved = lowered * (estimate_quantized_bits(bits, clip) - estimate_quantized_bits(bits - 1, clip)) / 8
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
        t0, done = time.perf_counter(), sum(len(k) == 3 for k in qcache)
        qstate, errors = quantize_model(model, args, hessians, override, qcache)
        rt.log(f"quantize method:{args.quant} tensors:{len(errors)} new:{sum(len(k) == 3 for k in qcache) - done} "
               f"lqer:{min(args.lqer_top_k, len(errors)) if args.lqer_rank else 0} "
               f"awq_lite:{sum(isinstance(v, QTensor) and v.awq is not None for v in qstate.values())} seconds:{time.perf_counter() - t0:.2f}")
        bits = {k: v.bits for k, v in qstate.items() if isinstance(v, QTensor)}
        chunks = serialize_chunks(qstate, dict(meta, bits=bits), args.pack_bits)
        comp, data = compress_payload(chunks, args, rt, ccache)
        total = code_bytes + artifact_file_bytes(comp, data)
        if total <= args.artifact_budget:
            break
        lower = bits_to_lower(model, args, qstate, errors, override, total - args.artifact_budget)
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

    def put_scales(s: Tensor) -> tuple[int, list[int]]:
        codes = torch.round(SCALE_STEPS * torch.log2(s.float())).to(torch.int32)
        return int(codes.min()), put((codes - codes.min()).to(torch.uint8).numpy().tobytes())

    if isinstance(t, QTensor):
        qmax = 2 ** (t.bits - 1) - 1
        a, b = t.awq[:2] if t.awq else (0, 0)
        vals = (torch.cat([t.q[:, :a], t.q[:, b:]], 1).numpy().astype(np.int16) + qmax).reshape(-1)
        entry = dict(name=name, kind="q", shape=list(t.q.shape), bits=t.bits, packed=pack,
                     q=put(pack_bits(vals, t.bits) if pack else vals.astype(np.uint8).tobytes()))
        entry["scale_base"], entry["scale"] = put_scales(t.scale)
        if t.awq is not None:  # the group's columns: u8 values offset by 127, their own scale codes
            entry["awq"] = dict(start=a, end=b, q=put((t.q[:, a:b].numpy().astype(np.int16) + 127).astype(np.uint8).tobytes()))
            entry["awq"]["scale_base"], entry["awq"]["scale"] = put_scales(t.awq[2])
        if t.lqer is not None:
            qa, sa, qb, sb = t.lqer
            entry["lqer"] = dict(rank=qa.size(1), sa_n=sa.numel(), sb_n=sb.size(0), a=put(qa.numpy().tobytes()), sa=put(shuffle_fp16(sa)),
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
            scales = lambda d: torch.exp2((torch.frombuffer(bytearray(get(d["scale"])), dtype=torch.uint8).float()
                                           + d["scale_base"]) / SCALE_STEPS).view(shape[0], 1)
            aw = e.get("awq", dict(start=0, end=0))
            a, b, qmax = aw["start"], aw["end"], 2 ** (e["bits"] - 1) - 1
            numel, raw = shape[0] * (shape[1] - b + a), get(e["q"])
            vals = unpack_bits(raw, e["bits"], numel) if e["packed"] else np.frombuffer(raw, dtype=np.uint8)
            q = torch.from_numpy(vals.astype(np.int16) - qmax).to(torch.int8).view(shape[0], -1)
            t = QTensor(q, scales(e), e["bits"])
            if "awq" in e:
                hi = torch.from_numpy(np.frombuffer(get(aw["q"]), dtype=np.uint8).astype(np.int16) - 127).to(torch.int8)
                t.q, t.awq = torch.cat([q[:, :a], hi.view(shape[0], b - a), q[:, a:]], 1), (a, b, scales(aw))
            if "lqer" in e:
                lq, r = e["lqer"], e["lqer"]["rank"]
                a = torch.frombuffer(bytearray(get(lq["a"])), dtype=torch.int8).view(shape[0], r)
                b = torch.frombuffer(bytearray(get(lq["b"])), dtype=torch.int8).view(r, shape[1])
                t.lqer = (a, unshuffle_fp16(get(lq["sa"]), (1, lq["sa_n"])), b, unshuffle_fp16(get(lq["sb"]), (lq["sb_n"], 1)))
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
    """Each chunk compressed on its own, in a pool of threads (brotli, zstandard and lzma release the
    GIL while they compress; processes would be forked from a parent running CUDA and NCCL threads,
    and could outlive it holding the log's lock); chunks already in cache (keyed by content) are
    reused. Returns the compressed chunks and how many were compressed now."""
    keys = [(name, level, hashlib.sha256(c).digest()) for c in chunks]
    todo = {k: (name, level, c) for k, c in zip(keys, chunks) if k not in cache}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, min(len(todo), workers or usable_cpus()))) as pool:
        done = list(pool.map(compress_chunk, todo.values()))
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
        """Inputs, targets and score mask (B, seq_len) and window starts (B,), built on the host and
        copied without a host sync; short windows are right-padded (causality makes the padding
        invisible to real positions)."""
        x = torch.zeros(len(windows), seq_len, dtype=torch.long)
        y = torch.zeros_like(x)
        mask = torch.zeros_like(x, dtype=torch.bool)
        for i, (s, e, a) in enumerate(windows):
            n = e - s
            x[i, :n] = self.tokens[s:e]
            y[i, :n] = self.tokens[s + 1:e + 1]
            mask[i, a - s - 1:n] = True
        return [to_device(t, self.rt.device) for t in (x, y, mask, torch.tensor([w[0] for w in windows]))]

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
            x, y, mask, starts = self.batch(group, seq_len)
            with rt.autocast_ctx():
                nll = self.nll_fn(x, y).double()
            self.record(starts, y, mask, nll, token_losses)
            if label and time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log_progress(rt, label, k + 1, len(mine), t0)

    def record(self, starts: Tensor, y: Tensor, mask: Tensor, nll: Tensor, token_losses: Tensor | None):
        """Add the masked float64 losses of a batch built by batch() to the totals (masks multiply:
        boolean indexing would wait for the device)."""
        targets = (starts[:, None] + torch.arange(1, y.size(1) + 1, device=y.device)).clamp_max(self.val_bytes.numel() - 1)
        nbytes = self.val_bytes[targets]
        self.totals += torch.stack([(nll * mask).sum(), mask.sum().double(), (nbytes * mask).sum().double()])
        if token_losses is not None:
            rows, cols = mask.nonzero(as_tuple=True)
            token_losses[(starts[rows] + cols + 1).cpu()] = nll[rows, cols].cpu().to(token_losses.dtype)

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
             label: str = "", token_losses: Tensor | None = None) -> EvalResult:
    """Standard (stride == EVAL_SEQ_LEN) or sliding-window evaluation of the whole stream."""
    t0 = time.perf_counter()
    model.eval()
    ev = Evaluator(model, val_tokens, val_bytes, args, rt)
    ev.score(plan_windows(1, val_tokens.numel() - 1, args.eval_seq_len, stride), eval_batch_seqs(args, rt), label, token_losses)
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
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)  # one all-reduce per step
    grad_sums = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params)]
    for group_start in range(0, len(seqs), args.ttt_batch_seqs):
        group = seqs[group_start:group_start + args.ttt_batch_seqs]
        for start, end in group[rt.rank::rt.world_size]:
            inputs, targets = torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, seq_len, dtype=torch.long)
            mask = torch.zeros(1, seq_len)
            inputs[0, :end - start], targets[0, :end - start], mask[0, :end - start] = tokens[start:end], tokens[start + 1:end + 1], 1
            with rt.autocast_ctx():
                (nll_fn(to_device(inputs, device), to_device(targets, device)) * to_device(mask, device)).sum().backward()
            for grad_sum, param in zip(grad_sums, params):
                if param.grad is not None:
                    grad_sum += param.grad
                    param.grad = None
        group_targets = sum(end - start for start, end in group)
        rt.all_reduce(flat)
        for grad_sum, param in zip(grad_sums, params):
            param.grad = (grad_sum / group_targets).to(param.dtype)
        flat.zero_()
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


def batch_chunk_tokens(batch: list[tuple[int, int]], args: Hyperparameters) -> int:
    """Targets per adapter step for a batch: by its longest document, the TOKENS of the first
    PHASED_TTT_SHORT_CHUNKS limit that holds it (#2014: short documents step more often), else
    PHASED_TTT_CHUNK_TOKENS; at most EVAL_SEQ_LEN."""
    longest = max(e - s for s, e in batch)
    tokens = next((tokens for limit, tokens in args.short_chunks if longest <= limit), args.phased_ttt_chunk_tokens)
    return min(tokens, args.eval_seq_len)


def batch_forward_tokens(batch: list[tuple[int, int]], args: Hyperparameters, from_chunk: int = 0) -> int:
    """document_forward_tokens summed over a batch at its batch_chunk_tokens."""
    chunk_tokens = batch_chunk_tokens(batch, args)
    return sum(document_forward_tokens(doc, chunk_tokens, args.eval_seq_len, from_chunk) for doc in batch)


def plan_phased_ttt(docs: list[tuple[int, int]], args: Hyperparameters, rt: Runtime) -> list[tuple[list, list]]:
    """Segments (documents, this rank's batches of them): one per global phase, then the rest. In a
    segment, documents of similar length share a batch, longest row first, so rows finish together
    and the unfinished rows of a batch are always a prefix. The batches are the same on every world
    size; each goes to the least loaded rank, costliest first, and a rank alternates its long and
    short batches so that the budget's rates and the ETA see typical batches from the start."""
    per_batch, phases = args.phased_ttt_docs_per_batch, args.phased_ttt_num_phases
    prefix = min(args.phased_ttt_prefix_docs, len(docs)) if phases else 0
    bounds = sorted({0, len(docs)} | {prefix * phase // max(phases, 1) for phase in range(1, phases + 1)})
    plan = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        longest_first = sorted(docs[lo:hi], key=lambda doc: doc[0] - doc[1])
        batches = [longest_first[i:i + per_batch] for i in range(0, len(longest_first), per_batch)]
        cost = [batch_forward_tokens(batch, args) for batch in batches]
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
    """Fresh per-document LoRA adapters (one per batch row) on the PHASED_TTT_LORA_TARGETS matrices
    of every block and on the output head, the same on every rank. Returns their parameters."""
    torch.manual_seed(args.seed)
    rank, rows = args.phased_ttt_lora_rank, args.phased_ttt_docs_per_batch
    scale, targets = args.phased_ttt_lora_alpha / rank, args.phased_ttt_lora_targets.split(",")
    for block in model.blocks:
        for module in (m for name in targets if name != "head" for m in ADAPTER_TARGETS[name](block)):
            module.lora = LoRA(module.weight.size(1), module.weight.size(0), rank, module.weight.device, rows, scale)
    if "head" in targets:
        model.head_lora = LoRA(args.model_dim, args.vocab_size, rank, model.tok_emb.weight.device, rows, scale)
    return [param for module in model.modules() if isinstance(module, LoRA) for param in module.parameters()]


# Block matrices that PHASED_TTT_LORA_TARGETS names; "head" is the output head. #2135's o and mlp
# adapters bypass the whole attention and MLP (block input to sublayer output); ours adapt the
# matrices themselves.
ADAPTER_TARGETS = {"q": lambda b: [b.attn.c_q], "k": lambda b: [b.attn.c_k], "v": lambda b: [b.attn.c_v],
                   "o": lambda b: [b.attn.proj], "mlp": lambda b: [b.mlp.fc, b.mlp.proj]}


def detach_document_adapters(model: GPT):
    for module in model.blocks.modules():
        if isinstance(module, CastedLinear):
            module.lora = None
    model.head_lora = None


# Saved activations per token and layer pass per model dim of a forward with grad and adapters on
# every matrix: issue 23 measured 573 KB per token at 17 passes x 512 (66 B), fp32 on CPU (bf16 on
# CUDA keeps less). At 2560-token windows of the record shape a row keeps ~1.5 GB: an 80 GB H100
# with ~75 GB free runs 0.8 * 75 / 1.5 = 40 rows per forward, so 64 documents take two forwards,
# and the logits add at most a few LOSS_CHUNK_TOKENS chunks (~1 GB) on top.
ACTIVATION_BYTES = 66


def forward_rows(model: GPT, args: Hyperparameters, rt: Runtime, window: int) -> int:
    """Documents per forward with grad: PHASED_TTT_FORWARD_ROWS, else all of a batch on CPU, else
    as many as 80% of the CUDA memory that is free (to the device or in torch's cache) holds."""
    if args.phased_ttt_forward_rows or rt.device.type != "cuda":
        return args.phased_ttt_forward_rows or args.phased_ttt_docs_per_batch
    free = torch.cuda.mem_get_info(rt.device)[0] + torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
    return max(1, int(0.8 * free) // (window * len(model.layer_order()) * args.model_dim * ACTIVATION_BYTES))


def score_then_adapt_chunk(model: GPT, ev: Evaluator, batch: list, chunk: int, chunk_tokens: int, adapt: bool, opt, args,
                           budget: TimeBudget, token_losses: Tensor | None):
    """Chunk `chunk` of every document in `batch` that still has one (a prefix of the rows: the
    finished rows are not computed): scored with the adapters as they are and recorded (final),
    then, when adapt, one optimizer step on exactly those targets. The rows run forward_rows at a
    time, each group's backward right after its forward, so at most one group's activations live;
    a row's gradient reaches only its own adapters, so the step is the one of a single forward."""
    seq_len, chunk_end = args.eval_seq_len, (chunk + 1) * chunk_tokens
    windows = [(start + max(0, min(chunk_end, end - start) - seq_len), start + min(chunk_end, end - start),
                start + chunk * chunk_tokens + 1) for start, end in batch if end - start > chunk * chunk_tokens]
    window = min(seq_len, chunk_end)
    group = forward_rows(model, args, ev.rt, window) if adapt else len(windows)
    for first in range(0, len(windows), group):
        for module in model.modules():
            if isinstance(module, LoRA):
                module.first = first
        rows = windows[first:first + group]
        with budget.timed("score", None, len(rows) * window):
            inputs, targets, mask, starts = ev.batch(rows, window)
            with torch.set_grad_enabled(adapt), ev.rt.autocast_ctx():
                nll = model.token_nll(inputs, targets)
            ev.record(starts, targets, mask, nll.detach().double(), token_losses)
        if adapt:
            with budget.timed("adapt", None, len(rows) * window):
                ((nll * mask).sum() / chunk_tokens).backward()  # only this chunk's targets, all scored above (a mask product: no host sync)
    if adapt:
        with budget.timed("adapt", None, 0):
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
    chunk_tokens = batch_chunk_tokens(batch, args)
    chunks = -(-(batch[0][1] - batch[0][0]) // chunk_tokens)
    for chunk in range(chunks):
        batch_left = batch_forward_tokens(batch, args, chunk)
        this_chunk = batch_left - batch_forward_tokens(batch, args, chunk + 1)
        need = budget.seconds("score", later_tokens + batch_left) + budget.seconds("adapt", this_chunk)
        adapt = chunk < chunks - 1 and budget.allows(need, f"chunk:{chunk}", all_ranks=False)
        score_then_adapt_chunk(model, ev, batch, chunk, chunk_tokens, adapt, opt, args, budget, token_losses)


def train_base_on_segment(model: GPT, ev: Evaluator, segment: list, opt, args: Hyperparameters):
    """A global phase: SGD on all base weights over a segment of documents every rank has scored,
    chunk by chunk of PHASED_TTT_GLOBAL_CHUNK_TOKENS targets, the rate a cosine from PHASED_TTT_GLOBAL_LR to 0
    over the chunks as #2135 runs it (so its last chunk, at rate 0, is skipped; one chunk alone
    gets the peak rate)."""
    base = list(model.parameters())
    for param in base:
        param.requires_grad_(True)
    first, last, size = segment[0][0] + 1, segment[-1][1], args.phased_ttt_global_chunk_tokens
    chunks = [(lo, min(lo + size - 1, last)) for lo in range(first, last + 1, size)]
    for index, (lo, hi) in enumerate(chunks[:-1] or chunks):
        for group in opt.param_groups:
            group["lr"] = args.phased_ttt_global_lr * 0.5 * (1 + math.cos(math.pi * index / max(len(chunks) - 1, 1)))
        for _ in range(args.ttt_epochs):
            ttt_train_chunk(model, model.token_nll, ev.tokens, lo, hi, base, opt, args, ev.rt)
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
    plan, rows = plan_phased_ttt(docs, args, rt), forward_rows(model, args, rt, args.eval_seq_len)
    chunk_tokens = min(args.phased_ttt_chunk_tokens, args.eval_seq_len)
    batch_tokens = [[batch_forward_tokens(batch, args) for batch in batches] for _, batches in plan]
    tokens_after = lambda segment, batch: sum(batch_tokens[segment][batch + 1:]) + sum(map(sum, batch_tokens[segment + 1:]))
    base = list(model.parameters())
    for param in base:
        param.requires_grad_(False)
    base_opt = torch.optim.SGD(base, lr=args.phased_ttt_global_lr, momentum=args.ttt_momentum)
    done, total, phases_trained = 0, sum(map(len, batch_tokens)), 0
    for phase, (segment, batches) in enumerate(plan):
        adapter_params = attach_document_adapters(model, args)
        adapters = (adapter_params, [param.detach().clone() for param in adapter_params])
        opt = torch.optim.AdamW(adapter_params, lr=args.phased_ttt_lr * args.phased_ttt_local_lr_mult, betas=(args.phased_ttt_beta1, args.phased_ttt_beta2),
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
    rt.log(f"phased_ttt docs:{len(docs)} chunk_tokens:{chunk_tokens} global_phases_trained:{phases_trained} "
           f"forward_rows:{rows} peak_mem_mib:{peak_memory_mib(rt):.0f}")
    return ev.result(t0)


def logged_evaluation(label: str, evaluation, val_tokens: Tensor, args: Hyperparameters, rt: Runtime) -> EvalResult:
    """evaluation(token_losses) logged under label; with EVAL_TOKEN_LOSSES its loss per target is
    gathered from all ranks (each target is scored on exactly one, the others hold 0) and written
    beside the log as float32, target 1 first."""
    losses = torch.zeros(val_tokens.numel()) if args.eval_token_losses else None
    result = evaluation(losses)
    rt.log(result.line(label))
    if losses is not None:
        losses = rt.all_reduce(losses.to(rt.device)).cpu()
        if rt.log_path:
            losses[1:].numpy().tofile(f"{os.path.splitext(rt.log_path)[0]}.{label}.f32")
    return result


def final_evaluations(model: GPT, val_tokens: Tensor, val_bytes: Tensor, args: Hyperparameters, rt: Runtime, eval_t0: float) -> tuple[str, EvalResult]:
    """final_roundtrip, then final_sliding and final_ttt or final_phased_ttt when enabled; returns the
    last one, the run's score. With phased TTT, chunk TTT is skipped: it would spend the evaluation
    clock that phased TTT needs on a result that is not the score."""
    L, scored = args.eval_seq_len, lambda label, evaluation: (label, logged_evaluation(label, evaluation, val_tokens, args, rt))
    label, result = scored("final_roundtrip", lambda out: evaluate(model, val_tokens, val_bytes, args, rt, L, "roundtrip", out))
    if 0 < args.eval_stride < L:
        label, result = scored("final_sliding", lambda out: evaluate(model, val_tokens, val_bytes, args, rt, args.eval_stride, "sliding", out))
    if args.phased_ttt_enabled:
        if args.ttt_enabled:
            rt.log("ttt_skipped reason:phased_ttt_enabled")
        label, result = scored("final_phased_ttt", lambda out: evaluate_phased_ttt(model, val_tokens, val_bytes, args, rt, eval_t0, out))
    elif args.ttt_enabled:
        label, result = scored("final_ttt", lambda out: evaluate_ttt(model, val_tokens, val_bytes, args, rt, eval_t0, out))
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
    """Train and calibrate on the training clock, then write the artifact at path (on the training
    clock too with EXPORT_ON_TRAIN_CLOCK=1). Returns the trained model and the training clock's total ms."""
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
    t1 = time.perf_counter()
    calib_ms = 1000 * (t1 - t0)
    rt.log(f"gptq_calibration seconds:{calib_ms / 1000:.2f} batches:{len(batches) * rt.world_size} "
           f"source:{args.gptq_calibration if hessians else 'none'}")
    if rt.master:
        export_artifact(model, args, rt, hessians, code_bytes, path)
    rt.barrier()
    export_ms = 1000 * (time.perf_counter() - t1)
    total_ms = trained.train_ms + calib_ms + export_ms * args.export_on_train_clock
    cap_ms, reserve_ms = 1000 * args.max_wallclock_seconds, 1000 * args.gptq_reserve_seconds
    rt.log(f"train_total steps:{trained.steps} train_ms:{trained.train_ms:.0f} calibration_ms:{calib_ms:.0f} "
           f"export_ms:{export_ms:.0f} export_on_clock:{int(args.export_on_train_clock)} total_ms:{total_ms:.0f} "
           f"cap_ms:{cap_ms:.0f} reserve_ms:{reserve_ms:.0f}")
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
    backend, reason = select_attention_backend(args.attn_backend, rt.device, rt.autocast, args.doc_mask, rt.log)
    rt.log(f"attention_backend:{backend} reason:{reason}")
    fault = fused_kernels_fault(rt.device) if args.fused_on and args.fused_kernels == "auto" else ""
    if args.fused_on and args.fused_kernels == "auto" and rt.host_max([float(bool(fault))])[0]:
        # untrusted kernels are a logged downgrade under auto, on every rank if on any (1 would use them)
        args.fused_on, args.fused_reason = False, f"self_check_failed:{fault or 'on_another_rank'}"
    rt.log(f"fused_kernels:{int(args.fused_on)} reason:{args.fused_reason}")
    try:  # before the first step, so that a bad byte sidecar cannot cost a training run
        validation = load_validation(args, luts)  # (tokens, target bytes), loaded once
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    path = args.artifact_file()
    if rt.master and not args.eval_only:
        lock_artifact_path(path, args.log_overwrite)
    if args.eval_only:
        eval_t0, train_ms = time.perf_counter(), 0.0
    else:
        model, train_ms = train_and_export(args, rt, backend, code.nbytes, validation, path)
        eval_t0 = time.perf_counter()
        logged_evaluation("final_prequant", lambda out: evaluate(model, *validation, args, rt, args.eval_seq_len, "prequant", out),
                          validation[0], args, rt)
        del model
    total = evaluate_artifact(args, rt, backend, code.nbytes, validation, path, eval_t0, train_ms)
    if dist.is_initialized():
        rt.barrier()  # no rank tears gloo down while a peer still uses it (8 CPU ranks: a peer aborted)
        dist.destroy_process_group()
    # A run over a limit is still scored, for diagnosis; its error lines then end the log and the exit fails.
    cap_ms = 1000 * args.max_wallclock_seconds
    failures = ([f"error: training_clock_over_cap total_ms:{train_ms:.0f} cap_ms:{cap_ms:.0f}"] if 0 < cap_ms < train_ms else []) + \
        ([f"error: artifact_over_budget bytes_total:{total} limit:{args.artifact_budget}"] if total > args.artifact_budget else [])
    for line in failures:
        rt.log(line)
    if failures:
        sys.exit(1)


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised where the program is so that the log gets an error: line."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def exit_with_error(rt: Runtime | None, line: str, code: int, exit=sys.exit):
    print(line, file=sys.stderr, flush=True)
    if rt:
        rt.log(line, console=False)
    exit(code)


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
        if dist.is_initialized() and (isinstance(e, dist.DistError) or "by peer" in str(e)):
            # another rank died inside a collective; a normal exit would abort in gloo's teardown
            exit_with_error(rt, f"error: peer_lost rank:{os.environ.get('RANK', 0)} world_size:{os.environ.get('WORLD_SIZE', 1)} "
                            f"message:{' '.join(str(e).split())} (the rank that died says why in its own output)", 1, os._exit)
        if rt:
            rt.log(f"error: exception type:{type(e).__name__} message:{' '.join(str(e).split())}", console=False)
        raise


if __name__ == "__main__":
    main()
