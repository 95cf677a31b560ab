"""Run train_gpt.py (path in argv[1]) as __main__ with every torch.compile call using the dynamo
backend named by PG_TEST_COMPILE_BACKEND (default inductor). "eager" keeps dynamo's tracing, guards
and recompilations exactly as they are but skips code generation, so recompilation checks run fast.
"count" is "eager" that also prints `dynamo_graph_compiled` to stdout (flushed, so it lands in order
with the script's log lines) each time dynamo hands it a graph: one line per compilation."""

import functools
import os
import runpy
import sys

import torch


def count(gm, example_inputs):
    print(f"dynamo_graph_compiled nodes:{len(gm.graph.nodes)}", flush=True)
    return gm.forward


backend = os.environ.get("PG_TEST_COMPILE_BACKEND", "inductor")
torch.compile = functools.partial(torch.compile, backend=count if backend == "count" else backend)
script = sys.argv[1]
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
