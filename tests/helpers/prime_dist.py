"""Compile priming on several ranks (gloo), with torch.compile on a counting dynamo backend (no code
generation): each rank primes the evaluation graphs, then evaluates a real stream with the training
model and with a fresh model built like the artifact's, and saves [graphs compiled while priming,
graphs compiled while evaluating] to <out>/rank<r>.pt. Knobs come from the environment. Run under
torch.distributed.run."""

import functools
import os
import sys

import torch
import torch.distributed as dist

compiled = []
torch.compile = functools.partial(torch.compile, backend=lambda gm, example_inputs: compiled.append(1) or gm.forward)

import train_gpt as tg  # noqa: E402  (the test puts the repository on PYTHONPATH)

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = tg.Hyperparameters()
    rt = tg.Runtime(rank, world, 0, torch.device("cpu"), False, True, None)
    torch.manual_seed(0)
    model = tg.GPT(args)
    tg.prime_eval_graphs(model, args, rt)
    primed = len(compiled)
    tokens = torch.randint(0, args.vocab_size, (700,), generator=torch.Generator().manual_seed(1))
    for m in (model, tg.GPT(args)):
        m.looping = True  # the final layer order (ENABLE_LOOPING_AT < 1)
        tg.evaluate(m, tokens, torch.ones_like(tokens, dtype=torch.int32), args, rt, args.eval_seq_len)
    torch.save([primed, len(compiled) - primed], os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
