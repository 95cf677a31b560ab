"""Issue 23: FlashAttention's kernel contract, which SDPA never enforces. Fake flash_attn (FA2),
flash_attn_interface (FA3) and flash_attn.cute (FA4) modules (tests/helpers/fake_flash.py) refuse
what the real kernels refuse; the whole model runs through them under bf16 autocast with CUDA's
cast policy for rms_norm emulated, in every path that attends: GPTQ calibration (the first forward
of a run), a training step, evaluation, chunk TTT and phased TTT (LoRA adapters), for every
ATTN_BACKEND name, with and without DOC_MASK (FlashAttention varlen)."""

import copy
import sys
import time

import pytest
import torch

import train_gpt as tg
from conftest import make_args
from test_export_eval import val_bytes
from test_phased_ttt import stream

from tests.helpers import fake_flash

CUDA = torch.device("cuda")
AUTOCAST_RT = tg.Runtime(0, 1, 0, torch.device("cpu"), True, False, None)  # bf16 autocast, as on CUDA
FLASH_CALLS = {"fa2": ("flash_attn", "flash_attn_func", "flash_attn_varlen_func"),
               "fa3": ("flash_attn_interface", "flash_attn_func", "flash_attn_varlen_func"),
               "fa4": ("flash_attn.cute.interface", "_flash_attn_fwd", "_flash_attn_fwd")}
KNOBS = dict(EVAL_SEQ_LEN=48, EVAL_STRIDE=16, EVAL_BATCH_SEQS=4, TTT_CHUNK_TOKENS=96, TTT_BATCH_SEQS=2,
             PHASED_TTT_CHUNK_TOKENS=16, PHASED_TTT_DOCS_PER_BATCH=3, PHASED_TTT_LORA_RANK=4, QUANT="gptq")


@pytest.fixture
def fakes(monkeypatch):
    """The fake modules installed, CUDA's rms_norm policy emulated, and a device that looks like Hopper."""
    fake_flash.emulate_cuda_autocast_policy(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return fake_flash.install(monkeypatch)


# --- the fakes refuse what the kernels refuse -------------------------------------------------------


def qkv(B=2, T=12, H=4, Hkv=2, D=16, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, h, D, generator=g).to(dtype) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("fa", ["fa2", "fa3", "fa4"])
def test_fakes_refuse_what_each_kernel_refuses(fakes, fa):
    module = sys.modules[FLASH_CALLS[fa][0]] if fa != "fa4" else sys.modules["flash_attn.cute"]
    dense = lambda q, k, v: module.flash_attn_func(q, k, v, causal=True)
    varlen = lambda q, k, v, cu, n: module.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                  max_seqlen_q=n, max_seqlen_k=n, causal=True)
    q, k, v = qkv()
    bad = {"fp32 q": (q.float(), k, v), "fp16 k with bf16 q/v": (q, k.half(), v), "all fp32": (q.float(), k.float(), v.float()),
           "(B, H, T, D) layout": (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
           "last dim not contiguous": (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
           "3 KV heads for 4 query heads": (q, *qkv(Hkv=3)[1:])}
    for what, args in bad.items():
        with pytest.raises(fake_flash.FlashContractError):
            dense(*args)
    flat = [t.reshape(-1, t.size(2), t.size(3)) for t in (q, k, v)]
    good = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)
    for cu, n in [(good.long(), 8), (torch.tensor([1, 5, 12, 20, 24], dtype=torch.int32), 8),
                  (torch.tensor([0, 12, 5, 20, 24], dtype=torch.int32), 12), (good[:-1], 8), (good, 7)]:
        with pytest.raises(fake_flash.FlashContractError):
            varlen(*flat, cu, n)
    out = dense(q, k, v)
    ref = tg.attend(*(t.float() for t in (q, k, v)), "sdpa", None)
    seg = varlen(*flat, good, 8)
    if fa == "fa4":  # FA4 returns (out, lse); FA2 and FA3 (2025 on) the output alone
        (out, lse), (seg, _) = out, seg
        assert lse.shape == (2, 4, 12)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    torch.testing.assert_close(seg[:5].float(), ref[0, :5], rtol=0, atol=2e-2)  # the first segment is row 0's start


def test_fa3_2024_returns_out_and_lse(monkeypatch):
    fake_flash.install(monkeypatch, fa3_version="2024")
    out, lse = sys.modules["flash_attn_interface"].flash_attn_func(*qkv(), causal=True)
    assert out.shape == (2, 12, 4, 16) and lse.shape == (2, 4, 12)
    assert isinstance(tg.attend(*qkv(), "fa3", None), torch.Tensor)


def test_cuda_policy_emulation_makes_rms_norm_fp32_under_autocast(fakes):
    x = torch.randn(2, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.rms_norm(x, (8,)).dtype == torch.float32  # as CUDA autocast does
        assert tg.rms_norm(x).dtype == torch.bfloat16  # the model's norm keeps its input's dtype


@pytest.mark.parametrize("backend", ["fa2", "fa3", "fa4"])
def test_flash_backends_match_sdpa_with_and_without_documents(fakes, backend):
    q, k, v = qkv(T=10)
    x = torch.randint(2, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    x[0, [0, 3, 7]] = tg.BOS_ID
    x[1, [1, 6]] = tg.BOS_ID  # row 1's first document has no BOS
    weights = torch.randn(2, 10, 4, 16, generator=torch.Generator().manual_seed(4))
    for docs in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
        out = tg.attend(*leaves, backend, tg.document_segments(x, backend) if docs else None)
        ref = tg.attend(*ref_leaves, "sdpa", tg.document_segments(x, "sdpa") if docs else None)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
        grads = torch.autograd.grad((out.float() * weights).sum(), leaves)  # FA4: through train_gpt's custom op
        for g, r in zip(grads, torch.autograd.grad((ref * weights).sum(), ref_leaves)):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), r, rtol=0, atol=5e-2)


# --- the whole model through every backend ------------------------------------------------------------


def flash_calls(calls, backend, doc_mask):
    module, dense, varlen = FLASH_CALLS.get(backend, (None, None, None))
    return calls[(module, varlen if doc_mask else dense)] if module else 0


FAST = {("auto", 0), ("fa4", 1), ("sdpa", 1)}  # the default launch, FA4's custom op with varlen, the refusal


@pytest.mark.parametrize("name, fa3_version, doc_mask", [
    pytest.param(name, version, doc_mask, marks=() if (name, doc_mask) in FAST else pytest.mark.slow)
    for name, version in [("auto", "2025"), ("fa4", ""), ("fa3", "2025"), ("fa3", "2024"), ("fa2", ""), ("sdpa", "")]
    for doc_mask in (0, 1)])
def test_every_path_meets_the_kernel_contract_under_cuda_autocast(fakes, monkeypatch, name, fa3_version, doc_mask):
    calls = fake_flash.install(monkeypatch, fa3_version or "2025")
    if name == "sdpa" and doc_mask:  # SDPA with a mask takes the O(T^2) math kernel on CUDA
        with pytest.raises(tg.ConfigError, match="DOC_MASK=1 on CUDA needs FlashAttention varlen"):
            tg.select_attention_backend(name, CUDA, True, True)
        return
    backend, _ = tg.select_attention_backend(name, CUDA, True, bool(doc_mask))
    assert backend == {"auto": "fa3"}.get(name, name)
    args = make_args(**KNOBS, DOC_MASK=doc_mask, PHASED_TTT_ENABLED=0)
    phased_args = make_args(**KNOBS, DOC_MASK=doc_mask, PHASED_TTT_ENABLED=1)
    torch.manual_seed(0)
    model = tg.GPT(args, backend)
    reference = copy.deepcopy(model)
    reference.backend = "sdpa"
    for block in reference.blocks:
        block.attn.backend = "sdpa"
    tokens = stream([0, 3, 15, 16, 17, 40, 47, 48, 49, 30])
    nbytes = val_bytes(tokens)
    x = tokens[:2 * 64].view(2, 64)
    seen = 0

    def called():  # the FlashAttention entry point really ran in this phase
        nonlocal seen
        now = flash_calls(calls, backend, doc_mask)
        assert backend == "sdpa" or now > seen
        seen = now

    tg.collect_hessians(model, [(x, None)], AUTOCAST_RT)  # GPTQ calibration: the run's first forward
    called()
    opts = tg.build_optimizers(model, args, AUTOCAST_RT)
    tg.train_step(model, model, opts, [(x, tokens[1:2 * 64 + 1].view(2, 64))], args, AUTOCAST_RT)
    called()
    result = tg.evaluate(model, tokens, nbytes, args, AUTOCAST_RT, args.eval_stride)
    called()
    tg.train_step(reference, reference, tg.build_optimizers(reference, args, AUTOCAST_RT),
                  [(x, tokens[1:2 * 64 + 1].view(2, 64))], args, AUTOCAST_RT)
    expected = tg.evaluate(reference, tokens, nbytes, args, AUTOCAST_RT, args.eval_stride)
    assert abs(result.val_loss - expected.val_loss) < 0.02  # the same model, attention through the fake kernel
    tg.evaluate_ttt(copy.deepcopy(model), tokens, nbytes, args, AUTOCAST_RT, time.perf_counter())
    called()
    tg.evaluate_phased_ttt(copy.deepcopy(model), tokens, nbytes, phased_args, AUTOCAST_RT, time.perf_counter())
    called()


# --- backend selection ----------------------------------------------------------------------------


def test_flash_attention_needs_autocast_and_auto_falls_back_truthfully(fakes):
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa3 needs a CUDA device and AUTOCAST bf16"):
        tg.select_attention_backend("fa3", CUDA, False)
    assert tg.select_attention_backend("auto", CUDA, False) == ("sdpa", "autocast_off")
    with pytest.raises(tg.ConfigError, match="DOC_MASK=1 on CUDA"):
        tg.select_attention_backend("auto", CUDA, False, True)
    assert tg.select_attention_backend("sdpa", torch.device("cpu"), True, True) == ("sdpa", "requested")  # CPU: the mask path


def test_a_broken_install_is_one_line_naming_the_package(monkeypatch):
    class Broken:  # what a flash_attn_interface built for another CUDA raises on import
        def find_spec(self, name, path=None, target=None):
            if name == "flash_attn_interface":
                raise OSError("libcudart.so.13: cannot open shared object file:\n No such file or directory")

    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(tg.ConfigError) as e:
        tg.select_attention_backend("fa3", CUDA)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("flash_attn_interface (FlashAttention 3) is installed but fails to import: OSError: libcudart")
    logged = []
    backend, reason = tg.select_attention_backend("auto", CUDA, log=logged.append)
    assert logged == [f"warning: ATTN_BACKEND=auto skips fa3: {msg}"]
    assert reason.startswith("auto_") and backend != "fa3"
