"""DynamicMesh: the per-layer kNN graph over L2-normalised token states, as fixed-degree slots or edges."""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .approx_search import dense_labels, tree_knn
from .routed_search import as_blocks, neighbour_recall, routed_knn
from .topk import top_slots

BACKENDS = ("auto", "dense", "cluster")
SEARCHES = ("exact", "routed", "tree")
GiB = 2 ** 30
# bytes per (query, candidate) score of a dense search block: the float32 scores, the mask, the masked
# copy and the rank of top_slots, with headroom for the allocator
SCORE_BYTES = 24
MISSING_CLUSTER = ("torch-cluster is not installed: run `make setup` (it compiles torch-scatter and torch-cluster "
                   "against your torch), or use backend='dense'")


def import_torch_cluster(required: bool = True):
    """torch-cluster, imported where a search needs it, so that the layers import without it. Missing:
    ``None`` unless ``required``, then an ImportError that says how to install it."""
    try:
        import torch_cluster
    except ImportError as e:
        if required:
            raise ImportError(MISSING_CLUSTER) from e
        return None
    return torch_cluster


class MeshSlots(NamedTuple):
    """A mesh of fixed in-degree: row ``r`` (target ``target[r]``) reads the nodes ``index[r]``.

    Slot groups lie side by side along the slot axis: ``k`` nearest neighbours, the local window
    (if any), then the self slot. Unused slots (a token with fewer than ``k`` candidates) have ``valid = False`` and point at the
    target itself, so a gather through them is always in range.
    """
    index: Tensor  # (Q, k + w + 1) source node ids (+ r exploration slots in training)
    valid: Tensor  # (Q, k + w + 1) bool
    target: Tensor  # (Q,) target node ids
    unit: Tensor  # (N, D) the L2-normalised node vectors the mesh was built from (the source side)
    query_unit: Optional[Tensor] = None  # (N, D) the targets' side when it differs (attention similarity)

    def edges(self) -> Tuple[Tensor, Tensor]:
        """The valid slots as PyG edges ``[source, target]`` (2, E) and their cosine (E,)."""
        src, dst = self.index[self.valid], self.target.unsqueeze(1).expand_as(self.index)[self.valid]
        query_unit = self.unit if self.query_unit is None else self.query_unit
        return torch.stack([src, dst]), (self.unit[src] * query_unit[dst]).sum(-1)


def batch_to_ptr(batch: Tensor, num_graphs: Optional[int] = None) -> Tensor:
    """Sorted batch vector (N,) -> CSR pointer (B+1,)."""
    counts = torch.bincount(batch, minlength=num_graphs or 0)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors: ``MemAvailable`` of ``/proc/meminfo`` on CPU, the free device
    memory plus the allocator's unused cache on CUDA; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    """A MemoryError that states the estimate, the limit and ``advice`` where ``needed`` bytes
    exceed :func:`available_memory` (before allocating them, instead of a crash or swapping)."""
    limit = available_memory(device)
    if limit is not None and needed > limit:
        raise MemoryError(f"{what} needs about {needed / GiB:.3g} GiB, more than the {limit / GiB:.3g} GiB available "
                          f"on {device}: {advice}")


def equal_length_causal_knn(u: Tensor, k: int, block_size: int = 256, window: int = 0,
                            uq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact causal kNN of ``B`` sequences of equal length, ``u`` (B, S, D) unit rows: for every
    position ``i`` the ``k`` most similar positions ``j < i - window`` of its sequence (the
    ``window`` tokens just before ``i`` have slots of their own); ``uq`` (B, S, D): the queries'
    own unit rows if they differ from ``u``. Static shapes, no host sync.
    Returns positions (B, S, k) and validity (B, S, k)."""
    uq = u if uq is None else uq
    S = u.size(1)
    index, valid = [], []
    for start in range(0, S, block_size):
        end = min(start + block_size, S)
        past = torch.arange(end, device=u.device) < torch.arange(start, end, device=u.device).unsqueeze(1) - window
        future = torch.zeros(past.shape, dtype=u.dtype, device=u.device).masked_fill(~past, float("-inf"))
        sim = torch.baddbmm(future.expand(u.size(0), -1, -1), uq[:, start:end], u[:, :end].transpose(1, 2))  # (B, b, end), masked
        i, v = top_slots(sim, None, k)
        index.append(i)
        valid.append(v)
    return torch.cat(index, 1), torch.cat(valid, 1)


def active_causal_knn(u: Tensor, k: int, target: Tensor, block_size: int = 256, window: int = 0,
                      uq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`equal_length_causal_knn` of the active rows only: ``target`` (Q,) sorted flat ids into
    ``u`` (B, S, D). Every sequence's active queries are packed to the front of a (B, W, D) table
    (W: the most active rows of a sequence), which is searched in blocks of ``block_size`` packed
    rows against the keys before the block's last query, so the work follows the active rows (no
    block spans two sequences). Returns node ids (Q, k) and validity (Q, k)."""
    uq = u if uq is None else uq
    B, S, _ = u.shape
    seq, pos = target // S, target % S
    counts = torch.bincount(seq, minlength=B)
    rank = torch.arange(target.numel(), device=u.device) - (counts.cumsum(0) - counts)[seq]
    packed = pos.new_full((B, int(counts.max())), -1)  # position of every packed query (-1: none)
    packed[seq, rank] = pos
    rows = torch.arange(B, device=u.device).unsqueeze(1)
    queries = uq[rows, packed.clamp(min=0)]  # (B, W, D)
    index, valid = [], []
    for start in range(0, packed.size(1), block_size):
        block = packed[:, start:start + block_size]
        end = max(int(block.max()) - window, 1)  # keys j < pos - window of the block's queries
        past = torch.arange(end, device=u.device) < (block - window).unsqueeze(-1)  # (B, b, end)
        sim = torch.baddbmm(torch.zeros(past.shape, dtype=u.dtype, device=u.device).masked_fill(~past, float("-inf")),
                            queries[:, start:start + block_size], u[:, :end].transpose(1, 2))
        i, v = top_slots(sim, None, k)
        index.append(i)
        valid.append(v)
    index, valid = torch.cat(index, 1)[seq, rank], torch.cat(valid, 1)[seq, rank]
    return index + (seq * S).unsqueeze(1), valid


def flat_knn(u: Tensor, batch: Tensor, ptr: Tensor, k: int, causal: bool, query: Tensor,
             block_size: int = 256, window: int = 0, uq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact kNN on the flat node array (graphs of any lengths, no padding) by blockwise
    ``matmul + topk``: for a block of sorted queries the candidates are the contiguous span from
    the start of the first query's graph to the last query (causal: nodes ``j < i - window``) or to
    the end of the last query's graph, so memory is O(block_size * span). Returns node ids (Q, k)
    and validity (Q, k). ``uq`` (N, D): the queries' unit rows where they differ from ``u``."""
    uq = u if uq is None else uq
    index, valid = [], []
    for s in range(0, query.numel(), block_size):
        q = query[s:s + block_size]
        lo = int(ptr[batch[q[0]]])
        hi = max(int(q[-1]) if causal else int(ptr[batch[q[-1]] + 1]), lo + 1)
        keys = torch.arange(lo, hi, device=u.device)
        allowed = batch[keys].unsqueeze(0) == batch[q].unsqueeze(1)
        allowed &= (keys.unsqueeze(0) < q.unsqueeze(1) - window) if causal else (keys.unsqueeze(0) != q.unsqueeze(1))
        i, v = top_slots(uq[q] @ u[lo:hi].t(), allowed, k)
        index.append(i + lo)
        valid.append(v)
    return torch.cat(index), torch.cat(valid)


def cluster_knn(u: Tensor, batch: Tensor, ptr: Tensor, k: int, causal: bool, query: Tensor,
                chunk_size: int = 128, window: int = 0, uq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """kNN through torch-cluster; returns node ids (Q, k) and validity (Q, k) like :func:`flat_knn`.

    Causal: per chunk of positions, ``torch_cluster.knn`` proposes ``k + window`` candidates from
    the strictly-past prefix of each sequence (at most ``window`` of them fall in the query's
    window and are dropped) and a masked dense top-k ``k`` more from inside the chunk. The
    candidates of a query are then ranked by the same exact similarity and tie rule as the dense
    backend, so the result depends on the query's own sequence and past only. ``uq``: as in
    :func:`flat_knn` (causal only).
    """
    torch_cluster = import_torch_cluster()
    Q = query.numel()
    if not causal:
        if uq is not None:
            raise ValueError("separate query vectors need a causal mesh")
        # k + 1 per target when the target itself is not among its k + 1 nearest (duplicate states)
        src, dst = torch_cluster.knn_graph(u, k, batch=batch, loop=False, flow="source_to_target")
        order = dst.argsort(stable=True)
        src, dst = src[order], dst[order]
        cand = torch.full((u.size(0), k + 1), -1, dtype=torch.long, device=u.device)
        rank = torch.arange(dst.numel(), device=u.device) - ptr_of_sorted(dst, u.size(0))[dst]
        cand[dst, rank] = src
        return rank_candidates(u, cand[query], query, k)
    pos = torch.arange(u.size(0), device=u.device) - ptr[batch]
    cand = torch.full((Q, 2 * k + window), -1, dtype=torch.long, device=u.device)
    qpos = pos[query]
    for c0 in range(0, int(qpos.max()) + 1, chunk_size):
        rows = ((qpos >= c0) & (qpos < c0 + chunk_size)).nonzero().view(-1)
        if rows.numel() == 0:
            continue
        chunk_q = query[rows]
        if c0 > 0:  # candidates from the strictly-past prefix of each sequence
            past = (pos < c0).nonzero().view(-1)
            qi, pj = torch_cluster.knn(u[past], (u if uq is None else uq)[chunk_q], k + window, batch[past], batch[chunk_q])
            order = qi.argsort(stable=True)
            qi, pj = qi[order], pj[order]
            rank = torch.arange(qi.numel(), device=u.device) - ptr_of_sorted(qi, rows.numel())[qi]
            outside = pos[past[pj]] < pos[chunk_q[qi]] - window
            cand[rows[qi], rank] = torch.where(outside, past[pj], -1)
        chunk = ((pos >= c0) & (pos < c0 + chunk_size)).nonzero().view(-1)  # candidates inside the chunk
        chunk_batch = batch[chunk]
        i, v = flat_knn(u[chunk], chunk_batch, batch_to_ptr(chunk_batch, ptr.numel() - 1), k, True,
                        torch.searchsorted(chunk, chunk_q), window=window,
                        uq=None if uq is None else uq[chunk])
        cand[rows, k + window:] = torch.where(v, chunk[i], -1)
    return rank_candidates(u, cand, query, k, uq)


def window_slots(target: Tensor, target_pos: Tensor, window: int) -> Tuple[Tensor, Tensor]:
    """The ``window`` nodes just before every target (Q,) at position ``target_pos`` (Q,) in its
    sequence: ids (Q, window) from the farthest to the nearest, valid where inside the sequence."""
    back = torch.arange(window, 0, -1, device=target.device)
    return target.unsqueeze(1) - back, target_pos.unsqueeze(1) >= back


def explore_slots(target: Tensor, start: Tensor, groups, count: int) -> Tuple[Tensor, Tensor]:
    """``count`` uniformly random earlier nodes of every target (Q,) whose sequence starts at node
    ``start`` (Q,): ids (Q, count), valid where the target has earlier nodes and the id was neither drawn
    before nor is in the slot ``groups`` [(ids, valid), ...] already (a key read twice would count twice)."""
    before = (target - start).unsqueeze(1)  # earlier nodes in the sequence
    index = start.unsqueeze(1) + (torch.rand(target.numel(), count, device=target.device) * before).long()
    earlier_draw = torch.ones(count, count, dtype=torch.bool, device=target.device).tril(-1)
    valid = (before > 0) & ~((index.unsqueeze(2) == index.unsqueeze(1)) & earlier_draw).any(2)  # each id once
    for ids, ok in groups:
        valid = valid & ~((index.unsqueeze(2) == ids.unsqueeze(1)) & ok.unsqueeze(1)).any(2)
    return index, valid


def ptr_of_sorted(index: Tensor, size: int) -> Tensor:
    """Start of each value's run in a sorted index vector: (size,) (== batch_to_ptr without the end)."""
    return batch_to_ptr(index, size)[:-1]


def rank_candidates(u: Tensor, cand: Tensor, query: Tensor, k: int, uq: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact top-k among candidate node ids ``cand`` (Q, C), -1 = none, by the dense backend's rule
    (cosine of the unit rows ``uq[query]`` and ``u[cand]``, ties to the most recent node)."""
    uq = u if uq is None else uq
    cand = cand.sort(dim=1).values  # node order = recency order along the candidate axis
    allowed = cand >= 0
    safe = cand.clamp(min=0)
    sim = (u[safe] * uq[query].unsqueeze(1)).sum(-1)
    i, v = top_slots(sim, allowed, k)
    return safe.gather(1, i), v


class DynamicMesh(torch.nn.Module):
    r"""Rebuilds the kNN "mesh" from the current node states.

    Nodes are L2-normalised (on unit vectors Euclidean kNN is cosine kNN) and every target
    ``i`` reads its ``k`` most similar nodes ``j`` of the same graph, plus itself; a node with
    fewer than ``k`` candidates reads all of them. Exact ties go to the most recent node.

    * ``causal=False`` (the default, for graphs and point clouds): any other node of the graph.
    * ``causal=True`` (language models): candidates are the nodes **before** ``i`` in its graph
      (node order = token order), exactly: the neighbour set of ``i`` depends on nodes ``<= i`` only.

    * ``window=w`` (causal only): the ``w`` tokens just before ``i`` are neighbours as well, and the
      ``k`` similar ones are searched among the tokens before them (the two groups never overlap).
    * ``explore=r`` (causal only, training mode only): ``r`` more slots at uniformly random earlier
      tokens of the sequence (slots already in the table are dropped), so that attention also scores
      keys the search did not pick and the projections the search compares learn from them.

    The mesh has a fixed in-degree, so :meth:`slots` hands it out as a ``(Q, k + w + 1)`` neighbour
    table (:class:`MeshSlots`: kNN slots, window slots, self slot), the layout the attention's fast
    path reads; :meth:`forward` gives the same mesh as PyG edges.

    Args:
        k (int): number of neighbours per node (without the self slot); 0 with a ``window``: the window
            and the self slot only (a control without content search).
        causal (bool): causal mesh over earlier tokens (language models) or bidirectional mesh over
            the whole graph (default).
        backend (str): ``"cluster"`` (torch-cluster proposes candidates: KD-tree on CPU, brute force
            on CUDA; an ImportError naming ``make setup`` if torch-cluster is missing), ``"dense"``
            (exact blockwise ``matmul + topk``) or ``"auto"`` (torch-cluster for low-dimensional
            bidirectional points, dense otherwise or when torch-cluster is not installed: both are
            exact, so only the speed differs; see the README for the measurement).
        block_size (int): query rows per block of the dense backend.
        window (int): previous tokens every token also reads (a local window; 0: the pure kNN mesh).
        explore (int): random earlier tokens every token also reads in training mode (0: none).
        search (str): ``"exact"`` (every earlier token is a candidate) or ``"routed"`` (causal only:
            the exact top-k among the keys of the ``route_top`` best-scoring earlier blocks of
            ``route_block`` positions plus the token's own block; see :mod:`.routed_search`).
            ``"tree"`` (bidirectional only: graphs of more than ``exact_max_nodes`` nodes are searched
            by ``trees`` random projection trees with leaves of ``leaf_size`` nodes, approximately and
            sub-quadratically, see :mod:`.approx_search`; the others exactly).
        route_block (int): positions per routing block.
        route_top (int): earlier blocks each token routes to.
        exact_max_nodes (int): largest graph the tree search leaves to the exact search.
        trees (int): projection trees of the tree search (more: higher recall, more time).
        leaf_size (int): most nodes per leaf of a tree (larger: higher recall, more time).

    Shapes:
        input: ``x`` (N, D), ``batch`` (N,) sorted, optional ``query_index`` (Q,) sorted node ids
        that need neighbours (default: all). output: ``edge_index`` (2, E) as ``[source, target]``
        in node ids, ``edge_sim`` (E,) cosine similarity of each edge.
    """

    def __init__(self, k: int, causal: bool = False, backend: str = "auto", block_size: int = 256,
                 low_dim_threshold: int = 8, window: int = 0, search: str = "exact", route_block: int = 64,
                 route_top: int = 4, exact_max_nodes: int = 4096, trees: int = 4, leaf_size: int = 256,
                 explore: int = 0):
        super().__init__()
        if search not in SEARCHES:
            raise ValueError(f"unknown mesh search {search!r}; choose one of {SEARCHES}")
        if search == "routed" and not causal:
            raise ValueError("the routed search needs a causal mesh (causal=True)")
        if search == "tree" and causal:
            raise ValueError("the tree search needs a bidirectional mesh (causal=False)")
        for name, value in (("route_block", route_block), ("route_top", route_top), ("exact_max_nodes", exact_max_nodes),
                            ("trees", trees), ("leaf_size", leaf_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if search == "tree" and leaf_size <= k:
            raise ValueError(f"leaf_size ({leaf_size}) must exceed k ({k}): a leaf holds a node's candidates")
        self.search, self.route_block, self.route_top = search, route_block, route_top
        self.exact_max_nodes, self.trees, self.leaf_size = exact_max_nodes, trees, leaf_size
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"window (mesh_window) must be an integer >= 0, got {window!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < (0 if window and search == "exact" else 1):
            raise ValueError(f"k (graph_k) must be an integer >= 1, got {k!r}" +
                             (" (0, a window-only mesh, needs window >= 1 and search='exact')" if k == 0 else ""))
        if window and not causal:
            raise ValueError("a local window of previous tokens needs a causal mesh (causal=True)")
        self.window = window
        if not isinstance(explore, int) or isinstance(explore, bool) or explore < 0:
            raise ValueError(f"explore (mesh_explore) must be an integer >= 0, got {explore!r}")
        if explore and not causal:
            raise ValueError("exploration slots (explore: random earlier tokens) need a causal mesh (causal=True)")
        self.explore = explore
        if backend not in BACKENDS:
            raise ValueError(f"unknown mesh backend {backend!r}; choose one of {BACKENDS}")
        self.k, self.causal, self.backend = k, causal, backend
        self.block_size, self.low_dim_threshold = block_size, low_dim_threshold

    def resolve_backend(self, dim: int) -> str:
        if self.backend != "auto":
            return self.backend
        low_dim = dim <= self.low_dim_threshold and not self.causal
        return "cluster" if low_dim and import_torch_cluster(required=False) is not None else "dense"

    def slots(self, x: Tensor, batch: Optional[Tensor] = None, query_index: Optional[Tensor] = None,
              seq_len: Optional[int] = None, query_x: Optional[Tensor] = None) -> MeshSlots:
        """The mesh as a neighbour table. Inputs are trusted (:meth:`forward` checks them).

        ``query_x`` (N, D): what the targets search with, compared with the sources ``x`` (causal
        only; e.g. attention queries against keys). Rows of tokens that are not targets are unread.

        ``seq_len``: every graph has exactly ``seq_len`` nodes (a ``(B, S)`` batch). With all
        nodes as queries, the causal dense search then runs on ``(B, S, D)`` blocks with static
        shapes and no host sync (the training path, ``torch.compile(fullgraph=True)``-able).
        """
        N = x.size(0)
        u = F.normalize(x.detach(), dim=-1)
        uq = None if query_x is None else F.normalize(query_x.detach(), dim=-1)
        if uq is not None and not self.causal:
            raise ValueError("separate query vectors (query_x) need a causal mesh")
        target = torch.arange(N, device=x.device) if query_index is None else query_index
        backend = self.resolve_backend(x.size(1))
        routed = self.search == "routed"
        # equal lengths: the static search over every row, or of the rows still active (exits)
        regular = seq_len is not None and (routed or (self.causal and backend == "dense"))
        active_only = regular and not routed and target.numel() < N
        explore = self.explore if self.training else 0
        if not regular or self.window or explore:  # the flat search, window and exploration slots need each graph's start
            if batch is None:
                batch = torch.arange(N, device=x.device) // (seq_len or N)
            ptr = batch_to_ptr(batch)
        if target.numel() == 0 or self.k == 0:  # every token exited, or a window-only mesh: no search
            index = target.new_zeros(target.numel(), self.k)
            valid = torch.zeros(target.numel(), self.k, dtype=torch.bool, device=x.device)
        elif routed:
            index, valid = self._routed(u, uq, batch, None if regular else ptr, target, seq_len)
        elif active_only:
            index, valid = active_causal_knn(u.view(-1, seq_len, u.size(1)), self.k, target, self.block_size, self.window,
                                             None if uq is None else uq.view(-1, seq_len, uq.size(1)))
        elif regular:
            pos, valid = equal_length_causal_knn(u.view(-1, seq_len, u.size(1)), self.k, self.block_size, self.window,
                                                 None if uq is None else uq.view(-1, seq_len, uq.size(1)))
            start = torch.arange(0, N, seq_len, device=x.device).view(-1, 1, 1)
            index, valid = (pos + start).view(N, self.k), valid.view(N, self.k)
        elif self.causal:
            index, valid = self._exact(u, uq, batch, ptr, target, backend)
        else:
            index, valid = self._bidirectional(u, batch, ptr, target, backend)
        groups = [(index, valid)]
        start = ptr[batch[target]] if self.window or explore else None  # first node of each target's sequence
        if self.window:
            groups.append(window_slots(target, target - start, self.window))
        groups.append((target.unsqueeze(1), torch.ones(target.numel(), 1, dtype=torch.bool, device=x.device)))
        if explore:
            groups.append(explore_slots(target, start, groups, explore))
        index, valid = torch.cat([g[0] for g in groups], 1), torch.cat([g[1] for g in groups], 1)
        return MeshSlots(torch.where(valid, index, target.unsqueeze(1)), valid, target, u, uq)

    def _exact(self, u: Tensor, uq: Optional[Tensor], batch: Tensor, ptr: Tensor, target: Tensor,
               backend: str) -> Tuple[Tensor, Tensor]:
        """The exact search of the targets on the flat node array: node ids (Q, k), validity."""
        knn = flat_knn if backend == "dense" else cluster_knn
        return knn(u, batch, ptr, self.k, self.causal, target, window=self.window, uq=uq,
                   **({"block_size": self.block_size} if knn is flat_knn else {}))

    def _bidirectional(self, u: Tensor, batch: Tensor, ptr: Tensor, target: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
        """Bidirectional search of the targets: the tree search (``search="tree"``) in the graphs of more
        than ``exact_max_nodes`` nodes, the exact one in the others (whose dense blocks are checked
        against the memory available first). Returns node ids (Q, k), validity."""
        sizes = ptr[1:] - ptr[:-1]
        large = (sizes > self.exact_max_nodes) if self.search == "tree" else torch.zeros_like(sizes, dtype=torch.bool)
        small_sizes = sizes[~large]
        if backend == "dense" and small_sizes.numel():
            check_memory(min(self.block_size, target.numel()) * int(small_sizes.max()) * SCORE_BYTES, u.device,
                         f"the exact mesh search of a {int(small_sizes.max()):,}-node graph in blocks of {self.block_size} queries",
                         "use search='tree' (the approximate search), a smaller block_size, or smaller graphs")
        if not bool(large.any()):
            return self._exact(u, None, batch, ptr, target, backend)
        index = target.new_zeros(target.numel(), self.k)
        valid = torch.zeros(target.numel(), self.k, dtype=torch.bool, device=u.device)
        in_large = large[batch[target]]
        if not bool(in_large.all()):
            index[~in_large], valid[~in_large] = self._exact(u, None, batch, ptr, target[~in_large], backend)
        nodes = large[batch].nonzero().view(-1)  # every node of the large graphs: sources of their targets
        check_memory(nodes.numel() * self.trees * self.k * 32, u.device,
                     f"the tree mesh search of {nodes.numel():,} nodes with {self.trees} trees", "use fewer trees or smaller graphs")
        found, found_valid = tree_knn(u[nodes], dense_labels(batch[nodes]), self.k, self.trees, self.leaf_size)
        rows = torch.searchsorted(nodes, target[in_large])
        index[in_large], valid[in_large] = nodes[found[rows].clamp(min=0)], found_valid[rows]
        return index, valid

    def routed_pairs(self, num_queries: int, seq_len: int) -> int:
        """(query, key) pairs the routed search scores: block summaries and candidate keys."""
        return num_queries * ((self.route_top + 1) * self.route_block + -(-seq_len // self.route_block))

    def _routed(self, u: Tensor, uq: Optional[Tensor], batch: Tensor, ptr: Optional[Tensor], target: Tensor,
                seq_len: Optional[int]) -> Tuple[Tensor, Tensor]:
        """Routed search of the targets on a (B, S, D) layout: a view for equal lengths (``ptr=None``,
        no host sync), else the sequences padded to the longest. Returns node ids (Q, k), validity."""
        D = u.size(1)
        if ptr is None:
            unit, query_unit = u.view(-1, seq_len, D), (u if uq is None else uq).view(-1, seq_len, D)
            row, pos, start = target // seq_len, target % seq_len, target - target % seq_len
        else:
            pos_all = torch.arange(u.size(0), device=u.device) - ptr[batch]
            shape = (ptr.numel() - 1, int((ptr[1:] - ptr[:-1]).max()), D)
            unit = u.new_zeros(shape).index_put_((batch, pos_all), u)
            query_unit = unit if uq is None else uq.new_zeros(shape).index_put_((batch, pos_all), uq)
            row, pos = batch[target], pos_all[target]
            start = ptr[row]
        keys = as_blocks(unit, self.route_block)
        route = torch.bmm(query_unit, keys.mean(2).transpose(1, 2))[row, pos]  # every query's block scores: one product
        found, valid = routed_knn(keys, query_unit[row, pos], row, pos, self.k, self.route_top, self.window, route)
        return found + start.unsqueeze(1), valid

    def checked_slots(self, x: Tensor, batch: Optional[Tensor] = None, query_index: Optional[Tensor] = None) -> MeshSlots:
        """:meth:`slots` after checking the inputs: a clear error for wrong types, shapes, devices, values."""
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
        if query.numel():  # no targets (every token exited): nothing to search, nothing to check
            non_finite, unsorted, bad_query = torch.stack([  # one host sync for all value checks
                ~torch.isfinite(x).all(),
                (batch[0] < 0) | (batch[1:] < batch[:-1]).any(),
                (query[1:] <= query[:-1]).any() | ((query < 0) | (query >= N)).any(),
            ]).tolist()
            if non_finite:
                raise ValueError("x holds non-finite node states (NaN or Inf): the mesh cannot rank them")
            if unsorted:
                raise ValueError("batch vector must be sorted and non-negative (nodes of each graph contiguous, as in a PyG Batch)")
            if bad_query:
                raise ValueError(f"query_index must hold strictly increasing node ids in [0, {N})")
        return self.slots(x, batch, query_index)

    def forward(self, x: Tensor, batch: Optional[Tensor] = None,
                query_index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.checked_slots(x, batch, query_index).edges()

    @torch.no_grad()
    def recall(self, x: Tensor, queries: int = 2048, seed: int = 0) -> float:
        """Neighbour recall of this (bidirectional) mesh on the nodes ``x`` (N, D) of one graph: the share
        of the exact ``k`` nearest neighbours of ``queries`` random nodes that its search finds (1 for
        the exact search; below 1 where ``search="tree"`` approximates, on graphs above ``exact_max_nodes``).
        The exact search of the sample alone stays cheap at any size."""
        if self.causal:
            raise ValueError("recall measures a bidirectional mesh (causal=False)")
        slots = self.slots(x)
        N = x.size(0)
        sample = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:queries].sort().values.to(x.device)
        exact, valid = flat_knn(slots.unit, x.new_zeros(N, dtype=torch.long), torch.tensor([0, N], device=x.device),
                                self.k, False, sample)
        return neighbour_recall(slots.index[sample, :self.k], slots.valid[sample, :self.k], exact, valid)

    def __repr__(self) -> str:
        window = f", window={self.window}" if self.window else ""
        window += f", explore={self.explore}" if self.explore else ""
        search = {"exact": "", "routed": f", search='routed', route_block={self.route_block}, route_top={self.route_top}",
                  "tree": f", search='tree', exact_max_nodes={self.exact_max_nodes}, trees={self.trees}, "
                          f"leaf_size={self.leaf_size}"}[self.search]
        return f"{self.__class__.__name__}(k={self.k}, causal={self.causal}, backend={self.backend!r}{window}{search})"
