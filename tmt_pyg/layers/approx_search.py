"""Projection-tree kNN: a sub-quadratic bidirectional search for large graphs (approximate).

Each of ``trees`` random projection trees cuts every graph in halves at the median of a fixed
random direction, level after level, until no part has more than ``leaf_size`` nodes; every node
takes the exact top-k of its own leaf. The leaves' candidates of all trees are then ranked together
by the exact cosine (the exact search's rule), so the result is a subset of each node's true
neighbourhood ranking, with recall below 1 where a true neighbour fell into another leaf in every
tree. Cost per graph of ``N`` nodes: ``trees * (N log N + N * leaf_size * D)`` instead of ``N^2 * D``.

The directions come from a seeded generator, the same on every call; a graph's leaves depend on its
own nodes only (batch-invariant), and on their values, not their order (permutation-equivariant up
to exact ties of projections or similarities).
"""
from typing import Tuple

import torch
from torch import Tensor

from .topk import top_slots

LEAF_ENTRIES = 2 ** 24  # similarity entries per chunk of leaves (64 MiB of float32)


def dense_labels(key: Tensor) -> Tensor:
    """A nondecreasing key (M,) renumbered 0, 1, ... in order."""
    return torch.unique_consecutive(key, return_inverse=True)[1]


def tree_leaves(proj: Tensor, group: Tensor, leaf_size: int) -> Tuple[Tensor, Tensor]:
    """Split every group of rows at the median of ``proj[:, level]`` (M, L), level after level,
    until every part has at most ``leaf_size`` rows. ``group`` (M,) sorted graph labels 0, 1, ...
    Returns the rows in leaf order (M,) and the leaf label of each of them (M,), nondecreasing."""
    order = torch.arange(group.numel(), device=group.device)
    for level in range(proj.size(1)):
        counts = torch.bincount(group)
        if int(counts.max()) <= leaf_size:
            return order, group[order]
        order = order[proj[order, level].argsort(stable=True)]
        order = order[group[order].argsort(stable=True)]  # by group, each group by its projection
        g = group[order]
        rank = torch.arange(g.numel(), device=g.device) - (counts.cumsum(0) - counts)[g]
        upper = (counts[g] > leaf_size) & (rank >= counts[g] // 2)
        group = torch.empty_like(group)
        group[order] = dense_labels(2 * g + upper.long())
    raise ValueError(f"{proj.size(1)} levels do not split {int(torch.bincount(group).max())} rows into leaves "
                     f"of {leaf_size}: raise leaf_size")


def leaf_knn(u: Tensor, order: Tensor, leaf: Tensor, k: int, leaf_size: int) -> Tuple[Tensor, Tensor]:
    """Exact top-k of every row of ``u`` (M, D) among the other rows of its leaf: row ids (M, k),
    -1 = none, and their cosines (M, k), -inf = none."""
    M = u.size(0)
    counts = torch.bincount(leaf)
    place = torch.arange(M, device=u.device) - (counts.cumsum(0) - counts)[leaf]
    table = torch.full((counts.numel(), leaf_size), -1, dtype=torch.long, device=u.device)
    table[leaf, place] = order  # (leaves, leaf_size) row ids, -1 = padding
    found = torch.full((M, k), -1, dtype=torch.long, device=u.device)
    sim = torch.full((M, k), float("-inf"), dtype=torch.float32, device=u.device)
    chunk = max(1, LEAF_ENTRIES // leaf_size ** 2)
    for start in range(0, table.size(0), chunk):
        ids = table[start:start + chunk]
        real = ids >= 0
        rows = u[ids.clamp(min=0)]  # (c, leaf_size, D)
        scores = torch.bmm(rows, rows.transpose(1, 2)).float()  # (c, leaf_size, leaf_size)
        allowed = real.unsqueeze(1) & (ids.unsqueeze(1) != ids.unsqueeze(2))
        i, v = top_slots(scores, allowed, k)  # (c, leaf_size, k)
        found[ids[real]] = torch.where(v, ids.gather(1, i.flatten(1)).view_as(i), -1)[real]
        sim[ids[real]] = torch.where(v, scores.gather(2, i), float("-inf"))[real]
    return found, sim


def tree_knn(u: Tensor, group: Tensor, k: int, trees: int = 4, leaf_size: int = 256, seed: int = 0,
             levels: int = 40) -> Tuple[Tensor, Tensor]:
    """Approximate kNN of every unit row of ``u`` (M, D) within its graph ``group`` (M,), sorted
    labels 0, 1, ...: the exact top-k of the union of its leaves in ``trees`` random projection trees,
    exact ties to the later row. Returns row ids (M, k) and their validity (M, k)."""
    if u.size(0) >= 2 ** 23:
        raise ValueError(f"the tree search ranks rows by id in float32: at most 2**23 rows, got {u.size(0)}")
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(trees, u.size(1), levels, generator=g).to(u.device, u.dtype)
    found, sim = (torch.cat(parts, 1) for parts in zip(*[
        leaf_knn(u, *tree_leaves(u @ d, group, leaf_size), k, leaf_size) for d in directions]))
    found, order = found.sort(dim=1, stable=True)  # (M, trees * k); a row found by several trees: counted once
    sim = sim.gather(1, order)
    allowed = found >= 0
    allowed[:, 1:] &= found[:, 1:] != found[:, :-1]
    i, valid = top_slots(sim, allowed, k, recency=found)
    return found.gather(1, i), valid
