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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .topk import top_slots

TILE = 64  # queries per tile of the grouped block products


def as_blocks(unit: Tensor, block_size: int) -> Tensor:
    """Rows (B, S, D) as blocks of positions (B, ceil(S / block_size), block_size, D): a view when S
    is whole blocks, else the last block padded with zero rows (it is never routed to)."""
    B, S, D = unit.shape
    blocks = -(-S // block_size)
    return (unit if S == blocks * block_size else F.pad(unit, (0, 0, 0, blocks * block_size - S))).view(B, blocks, block_size, D)


def block_summaries(unit: Tensor, block_size: int) -> Tensor:
    """Mean unit row of every block of positions: (B, S, D) -> (B, ceil(S / block_size), D)."""
    return as_blocks(unit, block_size).mean(2)


def grouped_block_scores(query: Tensor, keys: Tensor, row: Tensor, blocks: Tensor) -> Tensor:
    """Dot products of every query with every key of its blocks: ``query`` (Q, D), ``keys``
    (B, nb, b, D), ``row`` (Q,), ``blocks`` (Q, R) -> (Q, R, b).

    The (query, block) pairs are grouped by block into tiles of :data:`TILE` queries, and each tile
    is one (TILE, D) x (D, b) product against its block's keys: matrix products instead of a gather
    of every query's keys. Every query meets the same product shape however the batch is made up,
    so its scores do not depend on the other queries. Static shapes (a bound on the tile count).
    """
    Q, R = blocks.shape
    B, nb, b, D = keys.shape
    P = Q * R
    group = (row.unsqueeze(1) * nb + blocks).flatten()  # (P,) key block of every pair
    order = group.argsort(stable=True)
    sorted_group = group[order]
    counts = torch.bincount(group, minlength=B * nb)
    tiles = (counts + TILE - 1) // TILE
    rank = torch.arange(P, device=query.device) - (counts.cumsum(0) - counts)[sorted_group]  # place in the group
    tile = (tiles.cumsum(0) - tiles)[sorted_group] + rank // TILE
    place = tile * TILE + rank % TILE  # row of the pair in the stacked tiles
    num_tiles = min(P, P // TILE + B * nb)  # sum of ceil(count / TILE) never exceeds either
    source = torch.full((num_tiles * TILE,), Q, device=query.device).index_copy_(0, place, order // R)  # Q: a zero row
    query_tiles = torch.cat([query, query.new_zeros(1, D)]).index_select(0, source)
    tile_block = sorted_group.new_zeros(num_tiles).index_put_((tile,), sorted_group)
    block_keys = keys.view(B * nb, b, D).index_select(0, tile_block)  # (tiles, b, D)
    scores = torch.bmm(query_tiles.view(num_tiles, TILE, D), block_keys.transpose(1, 2))  # (tiles, TILE, b)
    return scores.new_empty(P, b).index_copy_(0, order, scores.view(-1, b).index_select(0, place)).view(Q, R, b)


def route_scores(query: Tensor, summaries: Tensor, row: Tensor) -> Tensor:
    """Score of every query (Q, D) against every block summary (B, nb, D) of its row (Q,): (Q, nb)."""
    return torch.bmm(summaries.index_select(0, row), query.unsqueeze(-1)).squeeze(-1)


def routed_knn(keys: Tensor, query: Tensor, row: Tensor, pos: Tensor, k: int, top_blocks: int, window: int = 0,
               route: Optional[Tensor] = None, summaries: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Routed causal kNN of the unit rows ``query`` (Q, D) at positions ``pos`` (Q,) of sequences ``row`` (Q,).

    ``keys`` (B, nb, block_size, D): every sequence's unit key rows as blocks (:func:`as_blocks`;
    rows past a sequence's end are never read). ``route`` (Q, nb): the queries' block scores where
    the caller has them from one product (default: :func:`route_scores` against ``summaries``
    (B, nb, D), by default the block means). Returns positions (Q, k) and their validity (Q, k), as
    the exact search returns them.
    """
    blocks, block_size = keys.size(1), keys.size(2)
    if route is None:
        route = route_scores(query, keys.mean(2) if summaries is None else summaries, row)
    own = pos // block_size
    block_ids = torch.arange(blocks, device=keys.device)
    chosen, routed = top_slots(route, block_ids < own.unsqueeze(1), top_blocks)  # ties to the later block
    chosen = torch.cat([torch.where(routed, chosen, own.unsqueeze(1)), own.unsqueeze(1)], 1)  # (Q, top + 1), own last
    cand = (chosen.unsqueeze(-1) * block_size + torch.arange(block_size, device=keys.device)).flatten(1)  # (Q, C)
    usable = cand < (pos - window).unsqueeze(1)  # unrouted slots repeat the own block: count it once
    usable[:, :-block_size] &= routed.repeat_interleave(block_size, 1)
    sim = grouped_block_scores(query, keys, row, chosen).flatten(1)
    index, valid = top_slots(sim, usable, k, recency=cand)  # ties to the most recent position
    return cand.gather(1, index), valid


def neighbour_recall(found: Tensor, found_valid: Tensor, exact: Tensor, exact_valid: Tensor) -> float:
    """Share of the exact kNN slots (Q, k) that the routed search also found (same target rows)."""
    hit = (found.unsqueeze(2) == exact.unsqueeze(1)) & found_valid.unsqueeze(2) & exact_valid.unsqueeze(1)
    return float(hit.any(1).sum() / exact_valid.sum().clamp(min=1))
