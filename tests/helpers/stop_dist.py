"""WallclockStop on several ranks (gloo): rank r's clock says "over budget" from step 2 + r on, so
the ranks disagree; each rank saves its agreed verdicts to <out>/rank<r>.pt. Run under
torch.distributed.run."""

import os
import sys

import torch
import torch.distributed as dist

import train_gpt as tg  # the test puts the repository on PYTHONPATH

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stopper = tg.WallclockStop(tg.Runtime(rank, world, 0, torch.device("cpu"), False, False, None))
    verdicts = []
    for step in range(6):
        stopper.pace()
        verdicts.append(stopper.agreed(step >= 2 + rank))
    torch.save(verdicts, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
