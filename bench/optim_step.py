"""Time train_gpt.py's Muon step against the per-matrix Muon it replaced, in one process.

1. The optimizer step alone at the record shape (11 layers, d=512, MLP 4x: 66 matrices in 4 banks),
   the two implementations alternating, same gradients; prints the median of each and their ratio.
2. A whole training step (forward, backward, clip, AdamW, Muon) at a reduced shape, with either Muon.

The legacy class below is the update as it was before issue 13 (one orthogonalisation, one lazily
zero-filled momentum buffer per matrix, a zero-filled flat fp32 buffer per step); it exists only
here, as the "before" of the ratio. CPU figures say nothing about a GPU's.

Example: OMP_NUM_THREADS=1 python bench/optim_step.py --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import repo_paths  # noqa: F401  (puts the repository on sys.path for train_gpt)
import train_gpt as tg  # noqa: E402


def legacy_orthogonalize(G: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """The one-matrix orthogonalisation of commit 648d84f."""
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    if method == "polar":
        X = X / (X.norm() * 1.02 + 1e-7)
        coeffs = [tg.POLAR_EXPRESS_COEFFS[min(i, len(tg.POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    else:
        X = X / (X.norm() + 1e-7)
        coeffs = [tg.NS5_COEFFS] * steps
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


class LegacyMuon(torch.optim.Optimizer):
    """The per-matrix Muon step of commit 648d84f (single process)."""

    def __init__(self, params, lr, momentum, steps, method, row_normalize, weight_decay, rank=0, world_size=1,
                 compile=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.steps, self.method, self.row_normalize = steps, method, row_normalize

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
            offsets = np.cumsum([0] + [p.numel() for p in params])
            for i, p in enumerate(params):
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])
                if self.row_normalize:
                    g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
                u = legacy_orthogonalize(g, self.steps, self.method) * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                flat[offsets[i]:offsets[i + 1]] = u.flatten()
            for i, p in enumerate(params):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offsets[i]:offsets[i + 1]].view_as(p), alpha=-group["lr"])


CPU = tg.Runtime(0, 1, 0, torch.device("cpu"), False, False, None)


def hyperparameters(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters({k: str(v) for k, v in env.items()})


def muon_matrices(args: tg.Hyperparameters) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [p for opt in tg.build_optimizers(tg.GPT(args), args, CPU) if isinstance(opt, tg.Muon)
            for g in opt.param_groups for p in g["params"]]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def step_profile(opt: torch.optim.Optimizer) -> dict:
    """Machine-independent counts of one step: top-level aten ops (each a kernel launch or more on a
    GPU in eager mode), zero-filled allocations, and MiB allocated."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return dict(ops=len(top), zero_fills=sum(e.name in ("aten::zeros", "aten::zeros_like") for e in events),
                alloc_mib=sum(max(e.self_cpu_memory_usage, 0) for e in events) / 2**20)


def bench_optimizer(args: tg.Hyperparameters, repeats: int) -> dict:
    """Median ms of one Muon step, legacy and banked, alternating on identical gradients."""
    params = muon_matrices(args)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    kw = dict(lr=0.02, momentum=0.95, steps=args.muon_backend_steps, method=args.muon_ns,
              row_normalize=args.muon_row_normalize, weight_decay=args.muon_wd)
    opts = {"legacy": LegacyMuon(params, **kw), "banked": tg.Muon(params, **kw)}
    times = {name: [] for name in opts}
    for name, opt in opts.items():  # warm-up: first-touch allocations
        opt.step()
    profiles = {name: step_profile(opt) for name, opt in opts.items()}
    for _ in range(repeats):
        for name, opt in opts.items():
            times[name].append(timed(opt.step))
    med = {name: statistics.median(t) for name, t in times.items()}
    shapes = sorted({tuple(p.shape) for p in params})
    return dict(matrices=len(params), banks=len(shapes), legacy_ms=med["legacy"], banked_ms=med["banked"],
                ratio=med["legacy"] / med["banked"], profiles=profiles)


def train_step_runner(args: tg.Hyperparameters, muon_cls):
    """A function running one train_step (one micro-batch) at args' shape with muon_cls as the Muon."""
    torch.manual_seed(0)
    model = tg.GPT(args)
    real, tg.Muon = tg.Muon, muon_cls
    try:
        opts = tg.build_optimizers(model, args, CPU)
    finally:
        tg.Muon = real
    g = torch.Generator().manual_seed(2)
    seqs = args.train_batch_tokens // args.train_seq_len
    ids = torch.randint(4, args.vocab_size, (seqs, args.train_seq_len + 1), generator=g)
    batch = [(ids[:, :-1], ids[:, 1:])]
    return lambda: tg.train_step(model, model, opts, batch, args, CPU)


def bench_train_step(args: tg.Hyperparameters, repeats: int) -> dict:
    """Median ms of a whole step with the legacy and the banked Muon, alternating."""
    runs = {"legacy": train_step_runner(args, LegacyMuon), "banked": train_step_runner(args, tg.Muon)}
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--small-layers", type=int, default=4, help="layers of the reduced whole-step shape")
    p.add_argument("--small-dim", type=int, default=256, help="width of the reduced whole-step shape")
    p.add_argument("--small-tokens", type=int, default=4096, help="tokens per whole step (sequences of 256)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    record = hyperparameters(VOCAB_SIZE=8192)
    r = bench_optimizer(record, a.repeats)
    print(f"optimizer_step shape:11L_d512_mlp4 matrices:{r['matrices']} banks:{r['banks']} "
          f"legacy_ms:{r['legacy_ms']:.0f} banked_ms:{r['banked_ms']:.0f} ratio:{r['ratio']:.3f}")
    for name, prof in r["profiles"].items():
        print(f"optimizer_step_profile muon:{name} aten_ops:{prof['ops']} zero_fills:{prof['zero_fills']} "
              f"alloc_mib:{prof['alloc_mib']:.0f}")
    small = hyperparameters(VOCAB_SIZE=1024, NUM_LAYERS=a.small_layers, MODEL_DIM=a.small_dim, NUM_HEADS=4,
                            NUM_KV_HEADS=2, XSA_LAST_N=a.small_layers, LOOP_START=1, LOOP_END=2,
                            PARALLEL_RESIDUAL_START=a.small_layers - 1, TRAIN_SEQ_LEN=256,
                            TRAIN_BATCH_TOKENS=a.small_tokens)
    t = bench_train_step(small, a.repeats)
    legacy, banked = t["legacy"], t["banked"]
    print(f"train_step shape:{a.small_layers}L_d{a.small_dim}_mlp4 tokens:{a.small_tokens} "
          f"legacy_muon_ms:{legacy:.0f} banked_muon_ms:{banked:.0f} ratio:{legacy / banked:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
