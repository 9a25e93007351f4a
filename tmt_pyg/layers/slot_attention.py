"""Slot attention as one fused op: every target attends over a fixed-degree table of source rows
(and a dense block of memory rows), compiled by ``torch.compile`` into one loop per direction.

Written as elementwise products and sums rather than einsum, so that inductor fuses the gathers,
scores, softmax, decay and weighted sum into one C++/OpenMP loop on CPU (Triton on GPU) instead of
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


def slot_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor, valid: Tensor,
                   memory_key: Optional[Tensor] = None, memory_value: Optional[Tensor] = None,
                   decay_rate: Optional[Tensor] = None, pos_dst: Optional[Tensor] = None, pos_src: Optional[Tensor] = None,
                   max_seq_len: int = 1, dropout: float = 0.0, training: bool = False) -> Tuple[Tensor, Tensor]:
    """Softmax attention of targets over their slots, decay after the softmax, then dropout.

    ``query`` (A, H, C); ``key``/``value`` (N, H, C); ``index``/``valid`` (A, S) source rows of the
    slots (invalid ones point anywhere in range); ``memory_key``/``memory_value`` (M, H, C) rows every
    target also reads, in the same softmax, timeless (decay 1); ``decay_rate`` (H,) with ``pos_dst``
    (A,) and ``pos_src`` (N,): :func:`decay_factor` on every slot. Returns the output (A, H, C) and
    the weights actually used before dropout, alpha (A, S + M, H).
    """
    A, S = index.shape
    H, C = query.shape[1:]
    scale = 1.0 / math.sqrt(C)
    flat = index.reshape(-1)  # index_select of (N, H*C) rows: its backward is an index_add, not a sorting index_put
    key_slots = key.reshape(-1, H * C).index_select(0, flat).view(A, S, H, C)
    score = (key_slots * query.unsqueeze(1)).sum(-1).masked_fill(~valid.unsqueeze(-1), float("-inf"))  # (A, S, H)
    if memory_key is not None:
        score = torch.cat([score, torch.einsum("ahc,mhc->amh", query, memory_key)], dim=1)  # (A, S + M, H)
    alpha = (score * scale).softmax(dim=1)
    if decay_rate is not None:
        gamma = decay_factor(decay_rate, pos_dst.unsqueeze(1), pos_src[index], max_seq_len)  # (A, S, H)
        alpha = torch.cat([alpha[:, :S] * gamma, alpha[:, S:]], dim=1) if memory_key is not None else alpha * gamma
    weights = F.dropout(alpha, p=dropout, training=training)
    value_slots = value.reshape(-1, H * C).index_select(0, flat).view(A, S, H, C)
    out = (weights[:, :S].unsqueeze(-1) * value_slots).sum(1)  # (A, H, C)
    if memory_key is not None:
        out = out + torch.einsum("amh,mhc->ahc", weights[:, S:], memory_value)
    return out, alpha


class _Fused:
    """The compiled :func:`slot_attention` and whether to use it (decided on first use)."""
    fn = None
    enabled: Optional[bool] = None
    reason = ""


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


def fused_slot_attention(*args, **kwargs) -> Tuple[Tensor, Tensor]:
    """:func:`slot_attention`, compiled where :func:`compile_enabled` (same arguments, same results to
    float tolerance). Inside a graph that is already being compiled it is traced as it is."""
    if torch.compiler.is_compiling() or not compile_enabled():
        return slot_attention(*args, **kwargs)
    if _Fused.fn is None:
        _Fused.fn = torch.compile(slot_attention, fullgraph=True)
    try:
        return _Fused.fn(*args, **kwargs)
    except torch._dynamo.exc.TorchDynamoException as e:  # a missing toolchain or a compiler bug: say so once, stay eager
        _Fused.enabled, _Fused.reason = False, f"compiling failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"tmt_pyg: slot attention runs eagerly ({_Fused.reason})", file=sys.stderr)
        return slot_attention(*args, **kwargs)
