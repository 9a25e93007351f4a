"""Routed causal kNN: the exact top-k among the keys of a few routed blocks (sub-quadratic search).

Positions are cut into fixed blocks of ``block_size``. Every complete block is summarised by the
mean of its unit rows; a query at position ``i`` (own block ``c = i // block_size``) scores the
summaries of its strictly earlier blocks, keeps the ``top_blocks`` best (MoBA's block routing),
and takes the exact top-k among their keys plus the keys of its own block before ``i - window``.
A query's candidates depend on positions before its own block and on its own row only, so the
mesh is causal, batch-invariant and the same in incremental decoding, exactly; with
``top_blocks`` at least the number of earlier blocks it is the exact search. Cost per query:
``S / block_size`` summaries plus ``(top_blocks + 1) * block_size`` keys instead of ``S``.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .topk import top_slots

GATHER_BYTES = 64 * 2 ** 20  # candidate keys gathered at once


def block_summaries(unit: Tensor, block_size: int) -> Tensor:
    """Mean unit row of every block of positions: (B, S, D) -> (B, ceil(S / block_size), D).
    The last block may be partial (zero rows on top); it is never routed to."""
    B, S, D = unit.shape
    blocks = -(-S // block_size)
    return F.pad(unit, (0, 0, 0, blocks * block_size - S)).view(B, blocks, block_size, D).mean(2)


def routed_knn(unit: Tensor, query_unit: Tensor, row: Tensor, pos: Tensor, k: int, block_size: int, top_blocks: int,
               window: int = 0) -> Tuple[Tensor, Tensor]:
    """Routed causal kNN of queries at positions ``pos`` (Q,) of sequences ``row`` (Q,).

    ``unit`` (B, S, D): every sequence's unit key rows (rows past a sequence's end are never read);
    ``query_unit`` (B, S, D): the queries' unit rows at the same places (may be ``unit``).
    Returns positions (Q, k) and their validity (Q, k), as the exact search returns them.
    """
    B, S, D = unit.shape
    blocks = -(-S // block_size)
    keys = F.pad(unit, (0, 0, 0, blocks * block_size - S)).view(B, blocks, block_size, D)
    route = torch.bmm(query_unit, keys.mean(2).transpose(1, 2))[row, pos]  # (Q, blocks), bmm: a row's scores alone
    own = pos // block_size
    block_ids = torch.arange(blocks, device=unit.device)
    chosen, routed = top_slots(route, block_ids < own.unsqueeze(1), top_blocks)  # ties to the later block
    chosen = torch.where(routed, chosen, -1).sort(1).values  # position order; unrouted (-1) first
    routed = chosen >= 0
    chosen = torch.cat([chosen.clamp(min=0), own.unsqueeze(1)], 1)  # (Q, top + 1) blocks, own block last
    offsets = torch.arange(block_size, device=unit.device)
    cand = (chosen.unsqueeze(-1) * block_size + offsets).flatten(1)  # (Q, C) positions, ascending
    usable = torch.cat([routed, routed.new_ones(routed.size(0), 1)], 1).repeat_interleave(block_size, 1)
    usable &= cand < (pos - window).unsqueeze(1)
    q = query_unit[row, pos]  # (Q, D)
    per_query = max(1, GATHER_BYTES // (cand.size(1) * D * unit.element_size()))
    sim = torch.cat([torch.bmm(keys[row[s:s + per_query].unsqueeze(1), chosen[s:s + per_query]].flatten(1, 2),
                               q[s:s + per_query].unsqueeze(-1)).squeeze(-1)
                     for s in range(0, pos.numel(), per_query)]) if pos.numel() else cand.new_zeros(0, cand.size(1), dtype=unit.dtype)
    index, valid = top_slots(sim, usable, k)
    return cand.gather(1, index), valid


def neighbour_recall(found: Tensor, found_valid: Tensor, exact: Tensor, exact_valid: Tensor) -> float:
    """Share of the exact kNN slots (Q, k) that the routed search also found (same target rows)."""
    hit = (found.unsqueeze(2) == exact.unsqueeze(1)) & found_valid.unsqueeze(2) & exact_valid.unsqueeze(1)
    return float(hit.any(1).sum() / exact_valid.sum().clamp(min=1))
