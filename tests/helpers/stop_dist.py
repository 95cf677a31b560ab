"""The training TimeBudget on several ranks (gloo): rank r's clock passes the limit from step 2 + r
on, so the ranks disagree; each rank saves its agreed "stop" verdicts to <out>/rank<r>.pt. Run
under torch.distributed.run."""

import os
import sys

import torch
import torch.distributed as dist

import train_gpt as tg  # the test puts the repository on PYTHONPATH

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    budget = tg.TimeBudget(tg.Runtime(rank, world, 0, torch.device("cpu"), False, False, None), 0.0, 0.5, None)
    verdicts = []
    for step in range(6):
        budget.elapsed = lambda: float(step >= 2 + rank)  # this rank's clock: over the 0.5 s limit or not
        budget.pace()
        verdicts.append(not budget.allows(0.0, None))
    torch.save(verdicts, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
