"""Muon on several ranks (gloo): run under torch.distributed.run; each rank saves its parameters
after MUON_TEST_STEPS steps to <out>/rank<r>.pt. Also imported by the test for the one-process run."""

import os
import sys

import torch

import train_gpt as tg  # the test puts the repository on PYTHONPATH

# Banks of 3, 2 and three of 1 matrix, interleaved: balanced by cost (muon_shares), on 2 ranks the
# (24, 8) bank splits 1 + 2, the (16, 16) bank 1 + 1 and each single matrix goes to one rank; on 8
# ranks every rank owns at most one matrix and rank 0 owns nothing of the (24, 8) bank.
SHAPES = [(24, 8), (8, 24), (24, 8), (16, 16), (32, 12), (24, 8), (12, 20), (16, 16)]


def make_params():
    g = torch.Generator().manual_seed(123)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def run(rank: int, world_size: int, steps: int = 2) -> list[torch.Tensor]:
    params = make_params()
    opt = tg.Muon(params, lr=0.05, momentum=0.9, steps=5, method="polar", row_normalize=True,
                  weight_decay=0.1, rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:  # every rank sees the same (already all-reduced) gradient
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = run(rank, world)
    torch.save(out, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
