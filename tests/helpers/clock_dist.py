"""train() on several ranks (gloo) whose clocks disagree: rank r's clock advances (r + 1) ms per
read, so by its own clock rank 1 is twice as far into the wallclock cap as rank 0. Each rank saves,
per step, the Muon learning rate, looping, late QAT and sequence length it trained with to
<out>/rank<r>.pt. The
knobs come from the environment. Run under torch.distributed.run."""

import os
import sys

import torch
import torch.distributed as dist

import train_gpt as tg  # the test puts the repository on PYTHONPATH

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = tg.Hyperparameters()
    now = [0.0]

    def clock():
        now[0] += (rank + 1) * 1e-3
        return now[0]

    tg.time.perf_counter = clock
    trace, real_step = [], tg.train_step

    def traced_step(model_fn, model, opts, micro_batches, args, rt):
        qat = any(float(m.qat_alpha) for _, m in tg.quantizable_modules(model) if getattr(m, "qat", None) is not None)
        trace.append((opts[1].param_groups[0]["lr"], model.looping, qat, micro_batches[0][0].size(1)))
        return real_step(model_fn, model, opts, micro_batches, args, rt)

    tg.train_step = traced_step
    torch.manual_seed(0)
    model = tg.GPT(args)
    tg.setup_late_qat(model, args)
    tg.train(model, args, tg.Runtime(rank, world, 0, torch.device("cpu"), False, False, None), None, None)
    torch.save(trace, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
