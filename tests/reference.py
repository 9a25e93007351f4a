"""Brute-force references shared by the layer tests (test_mesh, test_attention, test_properties)."""
import math

import torch
import torch.nn.functional as F

from tmt_pyg.layers.rotary import apply_rotary


def brute_force_mesh(x, lengths, k, causal):
    """Reference: per sequence and target, sort candidates by cosine similarity in plain Python."""
    u = F.normalize(x, dim=-1)
    edges, start = set(), 0
    for n in lengths:
        for i in range(start, start + n):
            cand = range(start, i) if causal else [j for j in range(start, start + n) if j != i]
            best = sorted(cand, key=lambda j: -float(u[i] @ u[j]))[:k]
            edges |= {(j, i) for j in best} | {(i, i)}
        start += n
    return edges


def as_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


def random_batch(lengths, dim=16, seed=0, dtype=torch.float64):
    """Random node states (sum(lengths), dim) and the sorted batch vector of those sequence lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), dim, generator=g, dtype=torch.float64).to(dtype)
    batch = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return x, batch


def dense_reference(conv, x, edge_index, pos):
    """Masked dense attention with the conv's own weights: softmax over in-edges, times decay."""
    N, H, C = x.size(0), conv.heads, conv.out_channels
    q = conv.lin_query(x).view(N, H, C)
    k = conv.lin_key(x).view(N, H, C)
    v = conv.lin_value(x).view(N, H, C)
    if conv.rotary:
        q, k = apply_rotary(q, pos), apply_rotary(k, pos)
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[edge_index[1], edge_index[0]] = True  # [target, source]
    score = torch.einsum("ihc,jhc->hij", q, k) / math.sqrt(C)
    timeless = mask & (pos[None, :] < 0)  # the M_i anchors of target i together: one neighbour's prior
    score = score - torch.where(timeless, timeless.sum(1, keepdim=True).clamp(min=1).to(x.dtype).log(), 0.0)
    alpha = score.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    if conv.decay is not None:
        dist = (pos[:, None] - pos[None, :]).abs().to(x.dtype) / conv.decay.max_seq_len
        gamma = 2 * torch.sigmoid(-conv.decay.decay_scalars[:, None, None] * dist)
        gamma = torch.where(pos[None, None, :] < 0, torch.ones_like(gamma), gamma)
        alpha = alpha * gamma
    out = torch.einsum("hij,jhc->ihc", alpha, v).reshape(N, H * C)
    return conv.lin_out(out)
