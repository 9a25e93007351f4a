"""Slot attention as one fused op: every target attends over a fixed-degree table of source rows
(and a dense block of memory rows), compiled by ``torch.compile`` into one loop per direction.

Written as elementwise products and sums rather than einsum, so that inductor fuses the gathers,
scores, softmax, decay and weighted sum into one C++ loop on CPU (Triton on GPU) instead of
tiny batched matmuls over gathered copies. :func:`slot_attention` is the eager reference; the model
calls :func:`fused_slot_attention`, which compiles it once per shape family (ragged batches mark the
row counts dynamic after their first change) and falls back to it, with a one-line notice, where
compiling is off (``TMT_PYG_COMPILE=0``, ``tmt-pyg ... --no-compile``) or fails.
"""
import math
import os
import shutil
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .decay import decay_factor


def slot_forward(query: Tensor, key: Tensor, value: Tensor, index: Tensor, valid: Tensor,
                 memory_key: Optional[Tensor] = None, memory_value: Optional[Tensor] = None,
                 decay_rate: Optional[Tensor] = None, pos_dst: Optional[Tensor] = None, pos_src: Optional[Tensor] = None,
                 max_seq_len: int = 1, memory_slots: int = 0, dropout: float = 0.0, training: bool = False,
                 relative: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Softmax attention of targets over their slots, decay after the softmax, then dropout.

    ``query`` (A, H, C); ``key``/``value`` (N, H, C); ``index``/``valid`` (A, S) source rows of the
    slots (invalid ones point anywhere in range); ``memory_key``/``memory_value`` (M, H, C) rows every
    target also reads, in the same softmax, timeless (decay 1), their logits lowered by ``log M`` (the M
    rows together have one slot's prior weight, as :class:`MeshAttentionConv` gives anchor edges);
    ``decay_rate`` (H,) with ``pos_dst`` (A,) and ``pos_src`` (N,): :func:`decay_factor` on every slot.
    ``memory_slots = m``: the last ``m`` slots of every row are its own memory rows (the anchors of its
    graph), their logits lowered by ``log m`` like the shared block's (timeless: give them ``pos_src < 0``).
    ``relative`` (A, S, H, C): a per-slot term added to the slot's key and value (an encoding of the
    relative position of source and target, :class:`MeshAttentionConv`'s ``coord_channels``).
    Returns the output (A, H, C), the weights actually used before dropout, alpha (A, S + M, H), and the
    softmax before the decay (A, S + M, H).
    """
    A, S = index.shape
    H, C = query.shape[1:]
    scale = 1.0 / math.sqrt(C)
    key_slots = slot_rows(key, index, relative)
    score = (key_slots * query.unsqueeze(1)).sum(-1).masked_fill(~valid.unsqueeze(-1), float("-inf")) * scale  # (A, S, H)
    if memory_slots:  # a row's memory slots together have one slot's prior, as the shared block below
        in_memory = torch.arange(S, device=score.device) >= S - memory_slots
        score = score - torch.where(in_memory, math.log(memory_slots), 0.0).unsqueeze(-1)
    if memory_key is not None:  # the M memory rows together have one slot's prior: logits - log M
        memory_score = pair_sum(query, memory_key, "ahc,mhc->amh") * scale - math.log(memory_key.size(0))
        score = torch.cat([score, memory_score], dim=1)  # (A, S + M, H)
    prob = score.softmax(dim=1)
    alpha = prob
    if decay_rate is not None:
        gamma = decay_factor(decay_rate, pos_dst.unsqueeze(1), pos_src[index], max_seq_len)  # (A, S, H)
        alpha = torch.cat([prob[:, :S] * gamma, prob[:, S:]], dim=1) if memory_key is not None else prob * gamma
    weights = F.dropout(alpha, p=dropout, training=training)
    out = (weights[:, :S].unsqueeze(-1) * slot_rows(value, index, relative)).sum(1)  # (A, H, C)
    if memory_key is not None:
        out = out + pair_sum(weights[:, S:], memory_value, "amh,mhc->ahc")
    return out, alpha, prob


def pair_sum(a: Tensor, b: Tensor, equation: str) -> Tensor:
    """``einsum(equation, a, b)`` for the small memory block (M rows): eagerly a batched matmul; under
    the compiler a broadcast product and sum, which fuses into the surrounding loop instead of copying
    its operands into a matmul layout."""
    if not torch.compiler.is_compiling():
        return torch.einsum(equation, a, b)
    inputs, output = equation.split("->")
    left, right = inputs.split(",")
    axes = "".join(dict.fromkeys(left + right))  # every index once, in order of appearance
    expand = lambda t, names: t.permute(*[names.index(c) for c in axes if c in names]).reshape(
        [t.size(names.index(c)) if c in names else 1 for c in axes])
    summed = [i for i, c in enumerate(axes) if c not in output]
    product = (expand(a, left) * expand(b, right)).sum(summed)
    kept = [c for c in axes if c in output]
    return product.permute(*[kept.index(c) for c in output])


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``x[index]`` of ``x`` (N, H, C) for ``index`` (A, S) -> (A, S, H, C), gathered as (N, H*C)
    rows (``index_select``: its backward is an index_add, not a sorting index_put)."""
    return x.reshape(x.size(0), -1).index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def slot_rows(x: Tensor, index: Tensor, relative: Optional[Tensor]) -> Tensor:
    """The slots' rows of ``x`` (N, H, C), plus the per-slot ``relative`` term where there is one: (A, S, H, C)."""
    rows = gather_rows(x, index)
    return rows if relative is None else rows + relative


def slot_attention(*args, **kwargs) -> Tuple[Tensor, Tensor]:
    """The eager reference: :func:`slot_forward`'s output and alpha, differentiated by autograd."""
    out, alpha, _ = slot_forward(*args, **kwargs)
    return out, alpha


def slot_backward(grad_out: Tensor, grad_alpha: Optional[Tensor], query: Tensor, key: Tensor, value: Tensor, index: Tensor,
                  memory_key: Optional[Tensor], memory_value: Optional[Tensor], decay_rate: Optional[Tensor],
                  pos_dst: Optional[Tensor], pos_src: Optional[Tensor], max_seq_len: int, alpha: Tensor, prob: Tensor,
                  relative: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """Gradients of :func:`slot_forward` without dropout, from the saved ``alpha`` and ``prob``: the
    slots' keys and values are gathered again (cheaper than saving (A, S, H, C) copies), and the
    source rows' gradients are summed by one ``index_add`` each. Returns the gradients of query, key,
    value, memory_key, memory_value, decay_rate and relative (None where an input is None)."""
    A, S = index.shape
    scale = 1.0 / math.sqrt(query.size(-1))
    grad_alpha_slots = (grad_out.unsqueeze(1) * slot_rows(value, index, relative)).sum(-1)  # (A, S, H)
    if memory_key is not None:
        grad_alpha_slots = torch.cat([grad_alpha_slots, pair_sum(grad_out, memory_value, "ahc,mhc->amh")], dim=1)
    grad_a = grad_alpha_slots if grad_alpha is None else grad_alpha_slots + grad_alpha  # (A, S + M, H)
    grad_rate = None
    if decay_rate is not None:
        src_pos = pos_src[index]
        gamma = decay_factor(decay_rate, pos_dst.unsqueeze(1), src_pos, max_seq_len)  # (A, S, H)
        grad_gamma = grad_a[:, :S] * prob[:, :S]
        delta = (pos_dst.unsqueeze(1) - src_pos).abs().to(gamma.dtype).unsqueeze(-1) / max_seq_len
        timed = (src_pos >= 0).unsqueeze(-1)  # d gamma / d rate = -delta * gamma * (1 - gamma / 2); timeless: 0
        grad_rate = torch.where(timed, -grad_gamma * delta * gamma * (1 - gamma / 2), 0.0).sum((0, 1))
        grad_p = torch.cat([grad_a[:, :S] * gamma, grad_a[:, S:]], dim=1)
    else:
        grad_p = grad_a
    grad_score = prob * (grad_p - (prob * grad_p).sum(1, keepdim=True)) * scale  # softmax backward, (A, S + M, H)
    grad_query = (grad_score[:, :S].unsqueeze(-1) * slot_rows(key, index, relative)).sum(1)
    flat = index.reshape(-1)
    H, C = query.shape[1:]
    grad_key_slots = grad_score[:, :S].unsqueeze(-1) * query.unsqueeze(1)  # (A, S, H, C)
    grad_value_slots = alpha[:, :S].unsqueeze(-1) * grad_out.unsqueeze(1)
    grad_key = key.new_zeros(key.size(0), H * C).index_add_(0, flat, grad_key_slots.reshape(A * S, H * C)).view_as(key)
    grad_value = value.new_zeros(value.size(0), H * C).index_add_(0, flat, grad_value_slots.reshape(A * S, H * C)).view_as(value)
    grad_relative = None if relative is None else grad_key_slots + grad_value_slots
    grad_mk = grad_mv = None
    if memory_key is not None:
        grad_query = grad_query + pair_sum(grad_score[:, S:], memory_key, "amh,mhc->ahc")
        grad_mk = pair_sum(grad_score[:, S:], query, "amh,ahc->mhc")
        grad_mv = pair_sum(alpha[:, S:], grad_out, "amh,ahc->mhc")
    return grad_query, grad_key, grad_value, grad_mk, grad_mv, grad_rate, grad_relative


class FusedSlotAttention(torch.autograd.Function):
    """:func:`slot_forward` (no dropout) and :func:`slot_backward`, each compiled into fused loops."""

    @staticmethod
    def forward(ctx, query, key, value, index, valid, memory_key, memory_value, decay_rate, pos_dst, pos_src, max_seq_len,
                memory_slots, relative):
        out, alpha, prob = run_compiled("forward", query, key, value, index, valid, memory_key, memory_value, decay_rate,
                                        pos_dst, pos_src, max_seq_len, memory_slots, 0.0, False, relative)
        ctx.save_for_backward(query, key, value, index, memory_key, memory_value, decay_rate, pos_dst, pos_src, alpha, prob,
                              relative)
        ctx.max_seq_len = max_seq_len
        ctx.set_materialize_grads(False)
        return out, alpha

    @staticmethod
    def backward(ctx, grad_out, grad_alpha):
        query, key, value, index, memory_key, memory_value, decay_rate, pos_dst, pos_src, alpha, prob, relative = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(query)
        q, k, v, mk, mv, rate, rel = run_compiled("backward", grad_out, grad_alpha, query, key, value, index, memory_key,
                                                  memory_value, decay_rate, pos_dst, pos_src, ctx.max_seq_len, alpha, prob,
                                                  relative)
        return q, k, v, None, None, mk, mv, rate, None, None, None, None, rel


# inductor's OpenMP loops for these ops lose to one thread (measured on the 2-core dev machine, 16 x 1024 tokens,
# 8 x 32 heads, 17 slots, torch 2.13: forward 97 -> 65 ms, forward + backward 595 -> 203 ms; the backward's
# index_add becomes contended atomic adds): compile them single-threaded (CPU only; Triton on GPU is unaffected)
CPU_OPTIONS = {"cpp.threads": 1}


class _Fused:
    """The compiled pieces and whether to use them (decided on first use)."""
    fns: dict = {}
    enabled: Optional[bool] = None
    reason = ""


EAGER = {"forward": slot_forward, "backward": slot_backward, "inference": slot_attention}
# one graph per (heads, head width, slots, which of memory / decay / alpha-gradient are present, grad mode):
# a process that builds many model configurations (a test suite, a sweep) needs more than dynamo's default 8.
# Raised for the process when the op first compiles (a config.patch around every call cost 42 us of a 180 us
# decoding call on the dev machine)
RECOMPILE_LIMIT = 64


def compiled(name: str):
    """``torch.compile`` of :func:`slot_forward` (``"forward"``, with autograd off inside the op),
    :func:`slot_backward` (``"backward"``), or the forward without the saved softmax (``"inference"``)."""
    if name not in _Fused.fns:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _Fused.fns[name] = torch.compile(EAGER[name], fullgraph=True, options=CPU_OPTIONS)
    return _Fused.fns[name]


def run_compiled(name: str, *args):
    """``compiled(name)(*args)``; where compiling fails (a missing toolchain, a compiler bug, more shapes
    than :data:`RECOMPILE_LIMIT`) the eager function instead, from then on, after a one-line notice."""
    if compile_enabled():
        try:
            return compiled(name)(*args)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            _Fused.enabled, _Fused.reason = False, f"compiling failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"tmt_pyg: slot attention runs eagerly ({_Fused.reason})", file=sys.stderr)
    return EAGER[name](*args)


def compile_enabled() -> bool:
    """Whether :func:`fused_slot_attention` compiles: not when ``TMT_PYG_COMPILE=0``, not where
    torch.compile cannot run (no dynamo support, or no C++ compiler for CPU code), not after a
    failed compile."""
    if _Fused.enabled is None:
        if os.environ.get("TMT_PYG_COMPILE", "1").lower() in ("0", "false", "no", "off"):
            _Fused.enabled, _Fused.reason = False, "TMT_PYG_COMPILE=0"
        elif not torch._dynamo.is_dynamo_supported():
            _Fused.enabled, _Fused.reason = False, f"torch.compile is not supported on Python {sys.version.split()[0]}"
        elif not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            _Fused.enabled, _Fused.reason = False, "no C++ compiler on PATH for torch.compile"
        else:
            _Fused.enabled = True
        if not _Fused.enabled and _Fused.reason != "TMT_PYG_COMPILE=0":
            print(f"tmt_pyg: slot attention runs eagerly ({_Fused.reason})", file=sys.stderr)
    return _Fused.enabled


def set_compile(enabled: bool) -> None:
    """Turn the compiled slot attention on or off for this process (``--no-compile``)."""
    _Fused.enabled, _Fused.reason = enabled, "" if enabled else "TMT_PYG_COMPILE=0"


def fused_slot_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor, valid: Tensor,
                         memory_key: Optional[Tensor] = None, memory_value: Optional[Tensor] = None,
                         decay_rate: Optional[Tensor] = None, pos_dst: Optional[Tensor] = None,
                         pos_src: Optional[Tensor] = None, max_seq_len: int = 1, memory_slots: int = 0,
                         dropout: float = 0.0, training: bool = False, relative: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor]:
    """:func:`slot_attention` (same arguments, same results to float tolerance), compiled where
    :func:`compile_enabled`: in training the hand-written :class:`FusedSlotAttention`, whose forward
    saves alpha and the softmax only; without gradients (or with attention dropout, whose random
    weights autograd follows) the compiled forward. Inside a graph that is already being compiled it
    is traced as it is."""
    inputs = (query, key, value, index, valid, memory_key, memory_value, decay_rate, pos_dst, pos_src, max_seq_len,
              memory_slots)
    if torch.compiler.is_compiling() or not compile_enabled():
        return slot_attention(*inputs, dropout, training, relative)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs[:8] + (relative,))
    if not needs_grad or (dropout > 0 and training):
        return run_compiled("inference", *inputs, dropout, training, relative)
    return FusedSlotAttention.apply(*inputs, relative)
