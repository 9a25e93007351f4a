"""Exact top-k of masked similarity rows with a fixed tie rule, shared by every mesh search."""
from typing import Optional, Tuple

import torch
from torch import Tensor


def top_slots(sim: Tensor, allowed: Optional[Tensor], k: int, recency: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Columns of the ``k`` largest allowed entries of every row of ``sim`` (..., R, C), exactly.

    Exact ties go to the later column (the most recent token), or to the larger ``recency``
    (..., R, C) (distinct integers below 2**23, e.g. positions) where the columns are not in order,
    so the choice depends on the row's own candidates only, not on how rows were blocked or batched. ``allowed=None``: the entries
    not allowed are already ``-inf``. Returns column ids (..., R, k) and their validity
    (..., R, k); a row with fewer than ``k`` allowed columns gets them all, the rest invalid.
    """
    if k == 0:  # a window-only mesh: no content slots
        shape = sim.shape[:-1] + (0,)
        return torch.zeros(shape, dtype=torch.long, device=sim.device), torch.zeros(shape, dtype=torch.bool, device=sim.device)
    C = sim.size(-1)
    kk = min(k, C)
    sim = sim.float() if allowed is None else sim.float().masked_fill(~allowed, float("-inf"))
    # one more than k: where the (k+1)-th value is below the k-th, topk cut no tie at the k-th value
    values, index = sim.topk(min(k + 1, C), dim=-1)
    cut = values[..., kk:kk + 1]
    values, index = values[..., :kk], index[..., :kk]
    kth = values[..., -1:]  # the k-th largest value of each row
    # rank by (above the k-th value, column): every entry above it, then the latest of those equal
    # to it (none when the row has fewer than k candidates); integers below 2**24 are exact in float32
    col = torch.arange(C, device=sim.device, dtype=torch.float32) if recency is None else recency.float()
    above = C if recency is None else 2 ** 23
    finite = kth > float("-inf")
    at_kth = values == kth
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or bool(((cut == kth) & finite).any()):
        # the training forward (no host sync) or a tie at the k-th value that topk cut: rank every column
        rank = torch.where(sim > kth, col + above, torch.where((sim == kth) & finite, col, -1.0))
        top, index = rank.topk(kk, dim=-1)
    else:  # every tie was taken: the same set; order it by the same rank
        taken = col.expand_as(sim).gather(-1, index)
        rank = torch.where(values > kth, taken + above, torch.where(at_kth & finite, taken, -1.0))
        top, order = rank.topk(kk, dim=-1)
        index = index.gather(-1, order)
    valid = top >= 0
    if kk < k:  # fewer columns than k: pad with invalid slots
        pad = sim.shape[:-1] + (k - kk,)
        return torch.cat([index, index.new_zeros(pad)], -1), torch.cat([valid, valid.new_zeros(pad)], -1)
    return index, valid
