"""Dense attention with the weights of a MeshAttentionConv: the "no mesh" ablation and vanilla."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import MeshAttentionConv


def rank_in_graph(batch: Tensor, num_graphs: int) -> Tensor:
    """Index of every row among the rows of its graph, in row order (rows need not be sorted)."""
    order = batch.argsort(stable=True)
    counts = torch.bincount(batch, minlength=num_graphs)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    rank = torch.empty_like(batch)
    rank[order] = torch.arange(batch.numel(), device=batch.device) - start[batch[order]]
    return rank


def to_padded(values: Tensor, batch: Tensor, rank: Tensor, num_graphs: int, fill=0) -> Tensor:
    """Rows (R, ...) -> (B, R_max, ...) with ``fill`` where a graph has fewer rows."""
    width = int(rank.max()) + 1 if rank.numel() else 0
    out = values.new_full((num_graphs, width) + tuple(values.shape[1:]), fill)
    out[batch, rank] = values
    return out


def dense_attention(conv: MeshAttentionConv, query: Tensor, key: Tensor, value: Tensor, pos: Tuple[Tensor, Tensor],
                    batch: Tuple[Tensor, Tensor], num_graphs: int, causal: bool) -> Tensor:
    """Every target attends to all sources of its graph (causal: at positions <= its own; sources
    with negative position, memory anchors, always), with the conv's decay and dropout.

    Shapes: ``query`` (T, H, C), ``key``/``value`` (S, H, C) projected (and rotated) by ``conv``,
    ``pos = (pos_src (S,), pos_dst (T,))``, ``batch`` likewise; returns (T, width) like ``conv``.
    """
    (pos_src, pos_dst), (b_src, b_dst) = pos, batch
    r_src, r_dst = rank_in_graph(b_src, num_graphs), rank_in_graph(b_dst, num_graphs)
    q = to_padded(query, b_dst, r_dst, num_graphs).transpose(1, 2)  # (B, H, Tq, C)
    k = to_padded(key, b_src, r_src, num_graphs).transpose(1, 2)  # (B, H, Tk, C)
    v = to_padded(value, b_src, r_src, num_graphs).transpose(1, 2)
    t_q = to_padded(pos_dst, b_dst, r_dst, num_graphs, fill=-2)  # -2 marks padding
    t_k = to_padded(pos_src, b_src, r_src, num_graphs, fill=-2)
    allowed = (t_k > -2).unsqueeze(1) & (t_q > -2).unsqueeze(2)  # (B, Tq, Tk)
    if causal:
        allowed &= (t_k.unsqueeze(1) <= t_q.unsqueeze(2)) | (t_k == -1).unsqueeze(1)
    allowed |= (t_q == -2).unsqueeze(2) & (torch.arange(k.size(2), device=k.device) == 0)  # padded rows: dummy key
    p = conv.dropout if conv.training else 0.0
    # logit bias (B, 1, Tq, Tk): -inf where not allowed; -log M on the M anchors of a graph (timeless, pos -1),
    # which together have the prior weight of one neighbour
    timeless = t_k == -1
    prior = torch.where(timeless, timeless.sum(1, keepdim=True).clamp(min=1).to(q.dtype).log(), 0.0)  # (B, Tk)
    bias = (-prior[:, None, None, :]).masked_fill(~allowed.unsqueeze(1), float("-inf"))
    if conv.decay is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    else:
        score = (q @ k.transpose(-1, -2)) / math.sqrt(conv.out_channels)  # (B, H, Tq, Tk)
        alpha = (score + bias).softmax(dim=-1)
        gamma = conv.decay(t_q.unsqueeze(2), t_k.unsqueeze(1)).permute(0, 3, 1, 2)  # (B, H, Tq, Tk)
        out = F.dropout(alpha * gamma, p=p, training=conv.training) @ v
    return conv.combine_heads(out.transpose(1, 2)[b_dst, r_dst])  # (T, H, C) -> (T, width)


def dense_causal_attention(conv: MeshAttentionConv, query: Tensor, key: Tensor, value: Tensor, pos: Tensor,
                           batch: Tensor, num_graphs: int, target: Tensor, seq_len: Optional[int] = None,
                           memory: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Causal dense attention of the tokens ``target`` (T,) over all tokens (N rows of ``key``,
    ``value``, ``pos``, ``batch``) and the ``memory`` rows (M, H, C) every token reads (anchors).

    With ``B`` sequences of equal length ``seq_len``, every token a target and no decay or memory
    (the vanilla transformer), this is one fused ``scaled_dot_product_attention(is_causal=True)``
    on ``(B, H, S, C)`` views: no padding, no mask, no host sync. Returns (T, width).
    """
    N, H, C = key.shape
    if seq_len is not None and target.numel() == N and conv.decay is None and memory is None:
        B = N // seq_len
        q, k, v = (t.view(B, seq_len, H, C).transpose(1, 2) for t in (query, key, value))
        p = conv.dropout if conv.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # fused kernel
        return conv.combine_heads(out.transpose(1, 2).reshape(N, H, C))
    if memory is not None:  # the anchor rows as timeless nodes of every graph
        M = memory[0].size(0)
        key = torch.cat([key, memory[0].repeat(num_graphs, 1, 1)])
        value = torch.cat([value, memory[1].repeat(num_graphs, 1, 1)])
        pos = torch.cat([pos, pos.new_full((num_graphs * M,), -1)])
        batch = torch.cat([batch, torch.arange(num_graphs, device=batch.device).repeat_interleave(M)])
    return dense_attention(conv, query, key, value, (pos, pos[target]), (batch, batch[target]), num_graphs, True)
