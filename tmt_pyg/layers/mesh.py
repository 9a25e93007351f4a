"""DynamicMesh: the per-layer kNN graph over L2-normalised token states."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import torch_cluster

BACKENDS = ("auto", "dense", "cluster")


def batch_to_ptr(batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
    """Sorted batch vector (N,) -> CSR pointer (B+1,)."""
    counts = torch.bincount(batch, minlength=num_graphs or 0)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def topk_per_target(src: Tensor, dst: Tensor, sim: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Keep, for every target in ``dst``, its ``k`` candidate edges of largest ``sim``."""
    order = sim.argsort(descending=True)
    order = order[dst[order].argsort(stable=True)]
    src, dst, sim = src[order], dst[order], sim[order]
    start = torch.ones_like(dst, dtype=torch.bool)
    start[1:] = dst[1:] != dst[:-1]
    group_start = torch.cummax(torch.where(start, torch.arange(dst.numel(), device=dst.device), 0), 0).values
    keep = torch.arange(dst.numel(), device=dst.device) - group_start < k
    return src[keep], dst[keep], sim[keep]


def dense_knn(u: Tensor, batch: Tensor, ptr: Tensor, k: int, causal: bool, query: Tensor,
              block_size: int = 256) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact kNN by blockwise ``matmul + topk`` on the flat node array (no padding).

    For a block of (sorted) queries the candidate keys are the contiguous span from the start of
    the first query's graph to the last query (causal) or to the end of the last query's graph,
    so memory is O(block_size * span). Returns ``(src, dst, sim)`` without self edges.
    """
    srcs, dsts, sims = [], [], []
    for s in range(0, query.numel(), block_size):
        q = query[s:s + block_size]
        lo = int(ptr[batch[q[0]]])
        hi = int(q[-1]) if causal else int(ptr[batch[q[-1]] + 1])
        if hi <= lo:
            continue
        keys = torch.arange(lo, hi, device=u.device)
        sim = u[q] @ u[lo:hi].t()  # (b, span)
        valid = batch[keys].unsqueeze(0) == batch[q].unsqueeze(1)
        valid &= (keys.unsqueeze(0) < q.unsqueeze(1)) if causal else (keys.unsqueeze(0) != q.unsqueeze(1))
        sim = sim.masked_fill(~valid, float("-inf"))
        kth = sim.topk(min(k, hi - lo), dim=1).values[:, -1:]
        # exact ties (e.g. repeated tokens at layer 0) go to the most recent candidates, so the
        # choice depends on the sequence alone, not on the batch or the block layout
        greater, equal = sim > kth, (sim == kth) & valid
        need = (kth > float("-inf")).long() * (min(k, hi - lo) - greater.sum(1, keepdim=True))
        rank_from_right = equal.flip(1).cumsum(1).flip(1)
        row, col = (greater | (equal & (rank_from_right <= need))).nonzero().t()
        srcs.append(col + lo)
        dsts.append(q[row])
        sims.append(sim[row, col])
    if not srcs:
        empty = query.new_empty(0)
        return empty, empty, u.new_empty(0)
    return torch.cat(srcs), torch.cat(dsts), torch.cat(sims)


def cluster_knn(u: Tensor, batch: Tensor, ptr: Tensor, pos: Tensor, k: int, causal: bool, query: Tensor,
                chunk_size: int = 128) -> Tuple[Tensor, Tensor, Tensor]:
    """kNN through torch-cluster. Causal: per chunk of positions, ``torch_cluster.knn`` against the
    strictly-past prefix plus a masked dense top-k inside the chunk, merged exactly per target."""
    is_query = torch.zeros(u.size(0), dtype=torch.bool, device=u.device)
    is_query[query] = True
    if not causal:
        src, dst = torch_cluster.knn_graph(u, k, batch=batch, loop=False, flow="source_to_target")
        keep = is_query[dst]
        src, dst = src[keep], dst[keep]
        return src, dst, (u[src] * u[dst]).sum(-1)
    srcs, dsts = [], []
    for c0 in range(0, int(pos.max()) + 1, chunk_size):
        in_chunk = (pos >= c0) & (pos < c0 + chunk_size)
        chunk_q = (in_chunk & is_query).nonzero().view(-1)
        if chunk_q.numel() == 0:
            continue
        if c0 > 0:  # candidates from the strictly-past prefix of each sequence
            past = (pos < c0).nonzero().view(-1)
            qi, pj = torch_cluster.knn(u[past], u[chunk_q], k, batch[past], batch[chunk_q])
            srcs.append(past[pj])
            dsts.append(chunk_q[qi])
        chunk = in_chunk.nonzero().view(-1)  # candidates inside the chunk, before the query
        local_q = torch.searchsorted(chunk, chunk_q)
        cb = batch[chunk]
        s, d, _ = dense_knn(u[chunk], cb, batch_to_ptr(cb, int(batch.max()) + 1), k, True, local_q)
        srcs.append(chunk[s])
        dsts.append(chunk[d])
    src, dst = torch.cat(srcs), torch.cat(dsts)
    src, dst, sim = topk_per_target(src, dst, (u[src] * u[dst]).sum(-1), k)
    return src, dst, sim


class DynamicMesh(torch.nn.Module):
    r"""Rebuilds the kNN "mesh" from the current node states.

    Nodes are L2-normalised (on unit vectors Euclidean kNN is cosine kNN) and every target
    ``i`` gets edges ``j -> i`` from its ``k`` most similar nodes ``j`` of the same graph, plus its
    self edge; a node with fewer than ``k`` candidates gets all of them.

    * ``causal=True``: candidates are the nodes **before** ``i`` in its graph (node order = token
      order), exactly: the neighbour set of ``i`` depends on nodes ``<= i`` only.
    * ``causal=False``: any other node of the graph (``torch_cluster.knn_graph``).

    Args:
        k (int): number of neighbours per node (without the self edge).
        causal (bool): causal (language model) or bidirectional mesh.
        backend (str): ``"cluster"`` (torch-cluster: KD-tree on CPU, brute force on CUDA),
            ``"dense"`` (exact blockwise ``matmul + topk``) or ``"auto"`` (torch-cluster for
            low-dimensional points, dense otherwise; see the README for the measurement).
        block_size (int): query rows per block of the dense backend.

    Shapes:
        input: ``x`` (N, D), ``batch`` (N,) sorted, optional ``query_index`` (Q,) sorted node ids
        that need neighbours (default: all). output: ``edge_index`` (2, E) as ``[source, target]``
        in node ids, ``edge_sim`` (E,) cosine similarity of each edge.
    """

    def __init__(self, k: int, causal: bool = True, backend: str = "auto", block_size: int = 256,
                 low_dim_threshold: int = 8):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (graph_k) must be an integer >= 1, got {k!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown mesh backend {backend!r}; choose one of {BACKENDS}")
        self.k, self.causal, self.backend = k, causal, backend
        self.block_size, self.low_dim_threshold = block_size, low_dim_threshold

    def resolve_backend(self, dim: int) -> str:
        if self.backend != "auto":
            return self.backend
        return "cluster" if dim <= self.low_dim_threshold and not self.causal else "dense"

    def forward(self, x: Tensor, batch: Optional[Tensor] = None,
                query_index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if x.dim() != 2 or not x.is_floating_point():
            raise TypeError(f"x must be a floating (N, D) tensor, got {x.dtype} {tuple(x.shape)}")
        N = x.size(0)
        if N == 0:
            raise ValueError("empty input: x has no nodes")
        batch = x.new_zeros(N, dtype=torch.long) if batch is None else batch
        query = torch.arange(N, device=x.device) if query_index is None else query_index
        for name, index in (("batch", batch), ("query_index", query)):
            if index.dtype != torch.long or index.dim() != 1:
                raise TypeError(f"{name} must be a 1-D torch.long tensor, got {index.dtype} {tuple(index.shape)}")
            if index.device != x.device:
                raise ValueError(f"{name} is on {index.device} but x is on {x.device}")
        if batch.numel() != N:
            raise ValueError(f"batch has {batch.numel()} entries for {N} nodes")
        non_finite, unsorted, bad_query = torch.stack([  # one host sync for all value checks
            ~torch.isfinite(x).all(),
            (batch[0] < 0) | (batch[1:] < batch[:-1]).any(),
            (query[1:] <= query[:-1]).any() | ((query < 0) | (query >= N)).any(),
        ]).tolist()
        if non_finite:
            raise ValueError("non-finite node states (NaN or Inf) given to DynamicMesh")
        if unsorted:
            raise ValueError("batch vector must be sorted and non-negative (nodes of each graph contiguous, as in a PyG Batch)")
        if bad_query:
            raise ValueError(f"query_index must hold strictly increasing node ids in [0, {N})")
        u = F.normalize(x.detach(), dim=-1)
        ptr = batch_to_ptr(batch)
        if self.resolve_backend(x.size(1)) == "dense":
            src, dst, sim = dense_knn(u, batch, ptr, self.k, self.causal, query, self.block_size)
        else:
            pos = torch.arange(N, device=x.device) - ptr[batch]
            src, dst, sim = cluster_knn(u, batch, ptr, pos, self.k, self.causal, query)
        edge_index = torch.stack([torch.cat([src, query]), torch.cat([dst, query])])
        edge_sim = torch.cat([sim, (u[query] * u[query]).sum(-1)])
        return edge_index, edge_sim

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k}, causal={self.causal}, backend={self.backend!r})"
