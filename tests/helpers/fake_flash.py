"""Fake FlashAttention modules for CPU tests. Each enforces its kernel's real contract (read from
Dao-AILab/flash-attention: csrc/flash_attn/flash_api.cpp, hopper/flash_api.cpp and
hopper/flash_attn_interface.py, flash_attn/cute/interface.py) and computes with SDPA, so that a
model still trains through it.

  flash_attn                 FA2 >= 2.7: flash_attn_func, flash_attn_varlen_func -> out
  flash_attn_interface       FA3: -> out since the 2025 refactor (hopper/ 7a802796), or with
                             version="2024" -> (out, softmax_lse) as the 2024 releases return
  flash_attn.cute.interface  FA4: flash_attn_func / flash_attn_varlen_func -> (out, lse);
                             _flash_attn_fwd -> (out, lse, p, row_max) (beta releases: (out, lse)),
                             _flash_attn_bwd -> (dq, dk, dv): what train_gpt's custom op calls

The contract (FA2/FA3 TORCH_CHECK, FA4 asserts): q, k, v fp16 or bf16, all one dtype; dense
(B, T, H, D) or varlen (total, H, D); last dimension contiguous; H % Hkv == 0; head dim a multiple
of 8 and at most 256; cu_seqlens int32, 1-D, contiguous, starting at 0, non-decreasing and ending at
the token count; max_seqlen at least the longest segment (the kernels size their grid from it and
silently skip what lies beyond). The CUDA device itself is not checked (these run on CPU).

FA2/FA3 register their kernels as torch.library custom ops (flash_attn::_flash_attn_forward,
flash_attn_3::_flash_attn_forward), so torch.compile keeps them in its graph; the fakes do the same
(fake_flash::attention, with the shape checks also in its fake implementation, so that a compiled
trace is checked too). `calls` counts the kernel calls per (module, function), at run time.
"""

import collections
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)
calls = collections.Counter()


class FlashContractError(RuntimeError):
    """What the real kernel would refuse (or silently get wrong)."""


def need(cond, msg):
    if not cond:
        raise FlashContractError(msg)


def check_layout(q, k, v, cu, max_seqlen):
    """Everything a kernel checks from metadata alone (also true of fake tensors under compile)."""
    need(all(t.dtype in HALF for t in (q, k, v)), f"FlashAttention only supports fp16 and bf16: q {q.dtype} k {k.dtype} v {v.dtype}")
    need(q.dtype == k.dtype == v.dtype, f"query and key/value must have the same dtype: q {q.dtype} k {k.dtype} v {v.dtype}")
    need(all(t.stride(-1) == 1 for t in (q, k, v)), "input tensors must have contiguous last dimension")
    dims = 4 if cu is None else 3
    need(q.dim() == k.dim() == v.dim() == dims, f"{'dense (B, T, H, D)' if cu is None else 'varlen (total, H, D)'} "
                                                f"tensors expected, got {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    need(k.shape == v.shape and q.shape[:-2] == k.shape[:-2] and q.size(-1) == k.size(-1),
         f"q {tuple(q.shape)} and k/v {tuple(k.shape)} {tuple(v.shape)} do not match")
    need(q.size(-2) % k.size(-2) == 0, "number of heads in key/value must divide number of heads in query")
    need(q.size(-1) % 8 == 0 and q.size(-1) <= 256, f"head dim {q.size(-1)}: a multiple of 8, at most 256")
    if cu is not None:
        need(cu.dtype == torch.int32, f"cu_seqlens must have dtype int32, got {cu.dtype}")
        need(cu.dim() == 1 and cu.is_contiguous(), "cu_seqlens must be 1-D and contiguous")
        need(isinstance(max_seqlen, int), f"max_seqlen must be an int, got {type(max_seqlen).__name__}")


def check_values(q, cu, max_seqlen):
    """What a kernel assumes of cu_seqlens' values (checked on real tensors only)."""
    if cu is None:
        return
    lengths = cu.diff()
    need(cu.numel() >= 2 and cu[0] == 0, f"cu_seqlens must start at 0: {cu.tolist()[:8]}")
    need(bool((lengths >= 0).all()), f"cu_seqlens must be non-decreasing: {cu.tolist()[:16]}")
    need(cu[-1] == q.size(0), f"cu_seqlens ends at {int(cu[-1])}, the tensors hold {q.size(0)} tokens")
    need(max_seqlen >= int(lengths.max()), f"max_seqlen {max_seqlen} < longest segment {int(lengths.max())}")


def allowed(q, cu):
    """(B, T, T) causal mask, within each segment when varlen (then B = 1 over the flattened tokens)."""
    n = q.size(1) if cu is None else q.size(0)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if cu is None:
        return causal.expand(q.size(0), n, n)
    segment = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long())
    return (causal & (segment[:, None] == segment[None, :]))[None]


def as_batch(t, cu):
    """(B, H, T, D) fp32 of a dense (B, T, H, D) or varlen (total, H, D) tensor."""
    return (t if cu is None else t[None]).float().transpose(1, 2)


def from_batch(t, like, cu):
    t = t.transpose(1, 2)
    return (t if cu is None else t[0]).to(like.dtype).contiguous()


def probabilities(q, k, cu):
    qb, kb = as_batch(q, cu), as_batch(k, cu).repeat_interleave(q.size(-2) // k.size(-2), dim=1)
    scores = qb @ kb.mT / q.size(-1) ** 0.5
    return scores.masked_fill(~allowed(q, cu)[:, None], float("-inf")).softmax(-1), qb, kb


def reference(q, k, v, cu):
    """Causal GQA attention (within segments when varlen), explicit math in fp32, in q's dtype."""
    p, _, _ = probabilities(q, k, cu)
    vb = as_batch(v, cu).repeat_interleave(q.size(-2) // k.size(-2), dim=1)
    return from_batch(p @ vb, q, cu)


def reference_grads(q, k, v, dout, cu):
    """(dq, dk, dv) of reference, by hand: a custom op's kernel runs below autograd."""
    group = q.size(-2) // k.size(-2)
    p, qb, kb = probabilities(q, k, cu)
    vb, dob = as_batch(v, cu).repeat_interleave(group, dim=1), as_batch(dout, cu)
    dp = dob @ vb.mT
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / q.size(-1) ** 0.5
    fold = lambda t: t.unflatten(1, (-1, group)).sum(2)  # query heads back onto their KV head
    return from_batch(ds @ kb, q, cu), from_batch(fold(ds.mT @ qb), k, cu), from_batch(fold(p.mT @ dob), v, cu)


def lse_shape(q, cu):
    return (q.size(1), q.size(0)) if cu is not None else (q.size(0), q.size(2), q.size(1))


@torch.library.custom_op("fake_flash::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor | None, max_seqlen: int | None, caller: str) -> tuple[Tensor, Tensor]:
    """caller "module:function" is counted here, at run time: a counter bumped in traced code would
    be a guard that changes on every call (a recompile each time)."""
    calls[tuple(caller.split(":"))] += 1
    check_layout(q, k, v, cu, max_seqlen)
    check_values(q, cu, max_seqlen)
    return reference(q, k, v, cu), q.new_zeros(lse_shape(q, cu), dtype=torch.float32)


@attention.register_fake
def _(q, k, v, cu, max_seqlen, caller):
    check_layout(q, k, v, cu, max_seqlen)
    return torch.empty_like(q), q.new_empty(lse_shape(q, cu), dtype=torch.float32)


@torch.library.custom_op("fake_flash::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, cu: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return reference_grads(q, k, v, dout, cu)


@attention_backward.register_fake
def _(q, k, v, dout, cu):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def grad(ctx, dout, dlse):
    q, k, v, cu = ctx.saved_tensors
    return *attention_backward(q, k, v, dout, cu), None, None, None


attention.register_autograd(grad, setup_context=save)


def counted(module, name, fn):
    """fn, counting its calls: only for what runs eagerly (FA4's kernels, called from a custom op)."""
    def wrapper(*args, **kwargs):
        calls[(module, name)] += 1
        return fn(*args, **kwargs)
    return wrapper


# --- FA2: flash_attn ------------------------------------------------------------------------------


def fa2_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    need(causal and dropout_p == 0.0 and softmax_scale is None, "the fake supports causal, no dropout, default scale")
    out, lse = attention(q, k, v, None, None, "flash_attn:flash_attn_func")
    return (out, lse, None) if return_attn_probs else out


def fa2_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, block_table=None):
    need(causal and dropout_p == 0.0 and softmax_scale is None, "the fake supports causal, no dropout, default scale")
    need(cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k, "the fake supports self-attention segments only")
    out, lse = attention(q, k, v, cu_seqlens_q, max_seqlen_q, "flash_attn:flash_attn_varlen_func")
    return (out, lse, None) if return_attn_probs else out


# --- FA3: flash_attn_interface --------------------------------------------------------------------


def fa3_module(version):
    def func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
             window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
             sm_margin=0, return_attn_probs=False):
        need(causal and softmax_scale is None and qv is None, "the fake supports causal attention, default scale")
        out, lse = attention(q, k, v, None, None, "flash_attn_interface:flash_attn_func")
        return (out, lse) if return_attn_probs or version == "2024" else out

    def varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
                    softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, sm_margin=0, return_attn_probs=False):
        need(causal and softmax_scale is None and seqused_q is None, "the fake supports causal attention, default scale")
        need(cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k, "the fake supports self-attention segments only")
        out, lse = attention(q, k, v, cu_seqlens_q, max_seqlen_q, "flash_attn_interface:flash_attn_varlen_func")
        return (out, lse) if return_attn_probs or version == "2024" else out

    return module("flash_attn_interface", flash_attn_func=func, flash_attn_varlen_func=varlen_func)


# --- FA4: flash_attn.cute -------------------------------------------------------------------------


def fa4_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
            max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None, causal=False, return_lse=False,
            **unused):
    """flash_attn.cute.interface._flash_attn_fwd: plain Python around CuTe kernels, eager only (FA4's
    own autograd.Function calls it; train_gpt wraps it as a custom op)."""
    need(not torch.compiler.is_compiling(), "FA4's CuTe kernels cannot be traced: call them from a custom op")
    need(causal and qv is None and softmax_scale is None and seqused_q is None, "the fake supports causal, default scale")
    need(cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k, "the fake supports self-attention segments only")
    check_layout(q, k, v, cu_seqlens_q, max_seqlen_q)
    check_values(q, cu_seqlens_q, max_seqlen_q)
    lse = q.new_zeros(lse_shape(q, cu_seqlens_q), dtype=torch.float32) if return_lse else None
    return reference(q, k, v, cu_seqlens_q), lse, None, None


def fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
            window_size_right=None, *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, deterministic=False, **unused):
    need(not torch.compiler.is_compiling(), "FA4's CuTe kernels cannot be traced: call them from a custom op")
    need(causal and softmax_scale is None, "the fake supports causal attention, default scale")
    check_layout(q, k, v, cu_seqlens_q, max_seqlen_q)
    check_values(q, cu_seqlens_q, max_seqlen_q)
    need(q.dtype == out.dtype == dout.dtype, f"q, out and dout must have one dtype: {q.dtype} {out.dtype} {dout.dtype}")
    need(out.shape == dout.shape == q.shape, "out and dout must have q's shape")
    need(lse is not None and tuple(lse.shape) == lse_shape(q, cu_seqlens_q), f"lse must have shape {lse_shape(q, cu_seqlens_q)}")
    return reference_grads(q, k, v, dout, cu_seqlens_q)


class FA4Function(torch.autograd.Function):
    """FA4's public functions are a plain autograd.Function around the CuTe kernels, as here: under
    torch.compile dynamo tries to trace into them (the real ones break the graph, these raise)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen):
        seg = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        out, lse, _, _ = interface_module()._flash_attn_fwd(q, k, v, causal=True, return_lse=True, **seg)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.seg = seg
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        return *interface_module()._flash_attn_bwd(q, k, v, out, dout, lse, causal=True, **ctx.seg), None, None


def interface_module():
    return sys.modules["flash_attn.cute.interface"]


def fa4_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False, **unused):
    need(causal and qv is None and softmax_scale is None, "the fake supports causal attention, default scale")
    return FA4Function.apply(q, k, v, None, None)


def fa4_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    causal=False, **unused):
    need(causal and qv is None, "the fake supports causal attention")
    need(cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k, "the fake supports self-attention segments only")
    return FA4Function.apply(q, k, v, cu_seqlens_q, max_seqlen_q)


def module(name, **functions):
    mod = types.ModuleType(name)
    for fname, fn in functions.items():
        setattr(mod, fname, fn)
    return mod


def install(monkeypatch, fa3_version="2025"):
    """Put fake flash_attn (FA2), flash_attn.cute(.interface) (FA4) and flash_attn_interface (FA3) into
    sys.modules for the test; returns the call counter (cleared)."""
    fa2 = module("flash_attn", flash_attn_func=fa2_func, flash_attn_varlen_func=fa2_varlen_func)
    interface = module("flash_attn.cute.interface", _flash_attn_fwd=counted("flash_attn.cute.interface", "_flash_attn_fwd", fa4_fwd),
                       _flash_attn_bwd=counted("flash_attn.cute.interface", "_flash_attn_bwd", fa4_bwd),
                       flash_attn_func=fa4_func, flash_attn_varlen_func=fa4_varlen_func)
    cute = module("flash_attn.cute", flash_attn_func=interface.flash_attn_func,
                  flash_attn_varlen_func=interface.flash_attn_varlen_func)
    cute.interface, fa2.cute = interface, cute
    for mod in (fa2, cute, interface, fa3_module(fa3_version)):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    calls.clear()
    return calls


def emulate_cuda_autocast_policy(monkeypatch):
    """CUDA autocast (torch >= 2.12, AT_FORALL_FP32 in ATen/autocast_mode.h) runs rms_norm in fp32 and
    returns fp32; CPU autocast keeps a bf16 input in bf16. Make CPU behave like CUDA here."""
    real = F.rms_norm

    def rms_norm(x, *args, **kwargs):
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", rms_norm)
