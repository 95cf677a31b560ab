"""Run train_gpt.py (path in argv[1]) as __main__ with every torch.compile call using the dynamo
backend named by PG_TEST_COMPILE_BACKEND (default inductor). "eager" keeps dynamo's tracing, guards
and recompilations exactly as they are but skips code generation, so recompilation checks run fast."""

import functools
import os
import runpy
import sys

import torch

backend = os.environ.get("PG_TEST_COMPILE_BACKEND", "inductor")
torch.compile = functools.partial(torch.compile, backend=backend)
script = sys.argv[1]
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
