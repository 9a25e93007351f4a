"""TMTLayer: one TemporalMesh Transformer layer (mesh, attention, FFN, exit gate) on the active rows."""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.anchors import MemoryAnchors
from ..layers.attention import MeshAttentionConv
from ..layers.dense_attention import dense_attention, dense_causal_attention
from ..layers.exit_gate import ExitGate
from ..layers.ffn import DualStreamFFN, FeedForward
from ..layers.mesh import DynamicMesh, MeshSlots
from .config import TMTConfig


@dataclass
class LayerInput:
    """What every layer of one forward needs to know about the nodes."""
    pos: Tensor  # (N,) token positions
    node_pos: Tensor  # (N + R,) positions of tokens and anchor rows (-1: timeless)
    tok_batch: Tensor  # (N,) graph of every token
    anchor_nodes: Tensor  # (R,) node ids of the anchor rows
    num_graphs: int
    seq_len: Optional[int]  # every graph has this many tokens (a (B, S) input), else None

    def node_batch(self) -> Tensor:
        """Graph of every node, anchors of a bidirectional model M per graph: (N + R,)."""
        B = self.num_graphs
        anchor_batch = torch.arange(B, device=self.pos.device).repeat_interleave(self.anchor_nodes.numel() // B)
        return torch.cat([self.tok_batch, anchor_batch])

    def candidate_pairs(self, active_tokens: Tensor, causal: bool) -> int:
        """(query, key) pairs the exact kNN search scores for the active tokens."""
        N = self.pos.numel()
        if self.seq_len is not None and active_tokens.numel() == N:
            S = self.seq_len
            return N * (S - 1) // (2 if causal else 1)
        if causal:
            return int(self.pos[active_tokens].sum())
        lengths = torch.bincount(self.tok_batch, minlength=self.num_graphs)
        return int((lengths[self.tok_batch[active_tokens]] - 1).sum())


class LayerOutput(NamedTuple):
    h: Tensor  # (N + R, D) states after the layer (exited rows unchanged)
    exited: Tensor  # (N,) bool: frozen from the next layer on
    confidence: Optional[Tensor]  # (N,) gate confidence (NaN: not computed), None without a gate
    attention: Optional[Tuple[Tensor, Tensor]]  # (edge_index (2, E), alpha (E, H)) when asked for
    mesh: Optional[MeshSlots]  # this layer's mesh
    flops: float  # counted 2 * multiply-adds
    rows: int  # token rows computed


class Attended(NamedTuple):
    """What one attention path returns."""
    out: Tensor  # (A + R, D) output of the active tokens, then the anchor rows
    attention: Optional[Tuple[Tensor, Tensor]]  # (edge_index (2, E), alpha (E, H)), mesh paths only
    mesh: Optional[MeshSlots]  # this layer's mesh (None: dense)
    pairs: int  # attention (query, key) pairs computed
    search_pairs: int  # kNN candidate pairs scored by the mesh search


def head_units(heads: Tensor, num_heads: int = 0) -> Tensor:
    """Queries or keys (n, H, C) -> (n, h * C), the first ``h = num_heads`` heads (0: all H) each
    L2-normalised: what the attention-similarity mesh compares (the cosine of two rows is the mean
    over those heads of the heads' cosines)."""
    return F.normalize((heads[:, :num_heads] if num_heads else heads).detach(), dim=-1).flatten(1)


def slot_edges(mesh: MeshSlots, alpha: Tensor, anchor_nodes: Tensor, anchors: Optional[MemoryAnchors]) -> Tuple[Tensor, Tensor]:
    """Slot attention ``alpha`` (A, S + M, H) as PyG edges ``(edge_index (2, E), alpha (E, H))``:
    the valid slots, then anchor -> token (every token reads the same M rows), then the anchors'
    self edges (weight 1)."""
    S, M, H = mesh.index.size(1), anchor_nodes.numel(), alpha.size(2)
    edge_index, _ = mesh.edges()
    weights = alpha[:, :S][mesh.valid]  # (E, H)
    if M:
        anchor_edges = anchors.edges(mesh.target, torch.zeros_like(mesh.target), int(anchor_nodes[0]), causal=True)
        edge_index = torch.cat([edge_index, anchor_edges, anchor_nodes.expand(2, -1)], 1)
        weights = torch.cat([weights, alpha[:, S:].reshape(-1, H), alpha.new_ones(M, H)])
    return edge_index, weights


def layer_flops(cfg: TMTConfig, num_sources: int, num_active: int, num_edges: int, mesh_pairs: int) -> float:
    """2 * multiply-adds of one layer: K/V for every source row, Q/out/FFN/gate for active rows,
    4*D per attention edge (or query-key pair), 2 * (search width) per kNN candidate pair scored."""
    D = cfg.d_model
    search_dim = cfg.search_heads * D // cfg.n_heads if cfg.search_heads else D
    ffn = 2 * D * D + 8 * D * cfg.ffn_stream_dim if cfg.dual_stream else 4 * D * cfg.mlp_dim
    gate = 2 * D if cfg.use_exit else 0
    return float(4 * D * D * num_sources + (4 * D * D + ffn + gate) * num_active + 4 * D * num_edges + 2 * search_dim * mesh_pairs)


@torch.no_grad()
def anchor_ema_step(anchors: MemoryAnchors, tokens: Tensor, query: Tensor, anchor_key: Tensor) -> None:
    """EMA step: token ``i`` (state ``tokens[i]``, layer-0 query ``query[i]`` (H, C)) spreads
    weight 1 over the anchors by its attention scores against their layer-0 keys ``anchor_key``
    (M, H, C) (softmax over the anchors, mean over heads); each anchor moves towards the
    weighted mean of the token states (embeddings) that attend to it."""
    scale = math.sqrt(query.size(-1))
    weight = torch.einsum("nhc,mhc->nmh", query, anchor_key).div(scale).softmax(dim=1).mean(-1)  # (N, M)
    anchors.update(tokens.float(), weight.float())


class TMTLayer(nn.Module):
    """One pre-LayerNorm TMT layer: the mesh rebuilt from the states, attention over it (or dense)
    with the anchors, FFN, and the exit gate, all on the rows that have not exited."""

    def __init__(self, cfg: TMTConfig, exit_gate: bool = False):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.config = cfg
        self.ln_attn = nn.LayerNorm(D)
        self.attn = MeshAttentionConv(D, D // H, heads=H, dropout=cfg.attn_dropout, decay=cfg.use_decay,
                                      decay_rate=cfg.decay_rate, max_seq_len=cfg.max_seq_len, rotary=cfg.rope)
        self.ln_ffn = nn.LayerNorm(D)
        self.ffn = DualStreamFFN(D, cfg.ffn_stream_dim) if cfg.dual_stream else FeedForward(D, cfg.mlp_dim)
        self.exit_gate = ExitGate(D) if exit_gate else None
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, h: Tensor, attn: Tensor) -> Tensor:
        """Residual update of the active rows' states ``h`` (A, D) by their attention output (A, D)."""
        out = h + self.drop(attn)
        return out + self.drop(self.ffn(self.ln_ffn(out)))

    def forward(self, h: Tensor, exited: Tensor, ctx: LayerInput, mesh: Optional[DynamicMesh],
                anchors: Optional[MemoryAnchors], freeze: bool, with_weights: bool = False,
                update_anchors: bool = False) -> LayerOutput:
        """The layer on states ``h`` (N + R, D) of tokens, then anchor rows; tokens marked ``exited``
        (N,) are frozen when ``freeze``: no query, FFN or gate for them, their state unchanged."""
        cfg, N = self.config, ctx.pos.numel()
        active_tokens = (~exited).nonzero().view(-1) if freeze else torch.arange(N, device=h.device)
        all_active = active_tokens.numel() == N
        att = self.attend(h, active_tokens, ctx, mesh, anchors, with_weights, update_anchors)
        if all_active:
            h_active = h = self.residual(h, att.out)
        else:
            active = torch.cat([active_tokens, ctx.anchor_nodes])
            h_active = self.residual(h[active], att.out)
            h = h.index_copy(0, active, h_active)  # exited rows keep their frozen state bit for bit
        flops = layer_flops(cfg, h.size(0), active_tokens.numel() + ctx.anchor_nodes.numel(), att.pairs, att.search_pairs)
        conf_all = None
        if self.exit_gate is not None:
            gate_in = h_active[:active_tokens.numel()]
            conf = self.exit_gate(gate_in.detach() if cfg.gate_detach else gate_in)
            conf_all = conf if all_active else torch.full((N,), float("nan"), device=h.device, dtype=conf.dtype).index_put((active_tokens,), conf)
            if freeze:
                exited = exited.clone()
                exited[active_tokens] |= conf.detach() > cfg.exit_threshold
        return LayerOutput(h, exited, conf_all, att.attention, att.mesh, flops, active_tokens.numel())

    def attend(self, h: Tensor, active_tokens: Tensor, ctx: LayerInput, mesh_search: Optional[DynamicMesh],
               anchors: Optional[MemoryAnchors], with_weights: bool, update_anchors: bool = False) -> Attended:
        """Attention output of the active rows (active tokens, then every anchor row) by one of four
        paths: causal or bidirectional, over the mesh (built from the states ``h`` (N + R, D)) or dense.
        Attention reads the layer-normed states. ``with_weights``: also the attention as PyG edges (mesh
        paths). A mesh path is the fused slot op, or with ``config.message_passing`` PyG message passing
        over the mesh edges (the same attention). ``update_anchors``: the anchors' EMA step from this
        layer's queries (causal layer 0 in training)."""
        x = self.ln_attn(h)
        edges = self.config.message_passing
        if self.config.causal:
            path = self.causal_dense if mesh_search is None else self.causal_edges if edges else self.causal_slots
        else:
            path = (self.bidirectional_dense if mesh_search is None else
                    self.bidirectional_edges if edges else self.bidirectional_slots)
        return path(h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors)

    def causal_projections(self, h: Tensor, x: Tensor, active_tokens: Tensor, ctx: LayerInput,
                           anchors: Optional[MemoryAnchors], update_anchors: bool):
        """Keys and values of every row (N + M, H, C), queries of the active tokens (A, H, C) and their
        positions; the anchors' EMA step when asked (layer 0 sees every token: its queries are the EMA's)."""
        N, R = ctx.pos.numel(), ctx.anchor_nodes.numel()
        all_active = active_tokens.numel() == N
        pos_q = ctx.pos if all_active else ctx.pos[active_tokens]
        key, value = self.attn.project_key_value(x, ctx.node_pos)
        query = self.attn.project_query(x[:N] if all_active else x[active_tokens], pos_q)
        if update_anchors and R:
            anchor_ema_step(anchors, h[:N], query, key[N:])
        return query, key, value, pos_q

    def with_anchor_rows(self, out: Tensor, value: Tensor, N: int) -> Tensor:
        """Append the causal anchor rows' output (each reads only itself: its value, weight 1) to ``out`` (A, D)."""
        if value.size(0) == N:
            return out
        conv = self.attn
        weight = F.dropout(value.new_ones(value.size(0) - N, conv.heads, 1), p=conv.dropout, training=conv.training)
        return torch.cat([out, conv.combine_heads(value[N:] * weight)])

    def search_pairs(self, mesh_search: DynamicMesh, active_tokens: Tensor, ctx: LayerInput) -> int:
        """kNN candidate pairs the mesh search scores for the active tokens."""
        if mesh_search.search == "routed":
            return mesh_search.routed_pairs(active_tokens.numel(), ctx.seq_len or int(ctx.pos.max()) + 1)
        return ctx.candidate_pairs(active_tokens, self.config.causal)

    def causal_mesh(self, h: Tensor, query: Tensor, key: Tensor, active_tokens: Tensor, ctx: LayerInput,
                    mesh_search: DynamicMesh) -> MeshSlots:
        """The causal mesh of the active tokens: the kNN of their states, or of their queries among the
        keys (attention similarity); the search reads query rows by node id."""
        cfg, N, A = self.config, ctx.pos.numel(), active_tokens.numel()
        target = None if A == N else active_tokens
        if cfg.mesh_similarity == "state":
            return mesh_search.slots(h[:N], ctx.tok_batch, target, ctx.seq_len)
        query_x = head_units(query, cfg.search_heads)
        if A != N:
            query_x = query_x.new_zeros(N, query_x.size(1)).index_copy(0, active_tokens, query_x)
        return mesh_search.slots(head_units(key[:N], cfg.search_heads), ctx.tok_batch, target, ctx.seq_len, query_x=query_x)

    def causal_slots(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """The fast path: every active token attends to its fixed-degree mesh slots (k neighbours, the
        window, itself) and the M anchor rows in one softmax (the fused slot op)."""
        N, A, R = ctx.pos.numel(), active_tokens.numel(), ctx.anchor_nodes.numel()
        search_pairs = self.search_pairs(mesh_search, active_tokens, ctx)
        query, key, value, pos_q = self.causal_projections(h, x, active_tokens, ctx, anchors, update_anchors)
        mesh = self.causal_mesh(h, query, key, active_tokens, ctx, mesh_search)
        memory = (key[N:], value[N:]) if R else None
        out, alpha = self.attn.attend_slots(query, key[:N], value[:N], mesh.index, mesh.valid, (ctx.pos, pos_q), memory)
        attention = slot_edges(mesh, alpha, ctx.anchor_nodes, anchors) if with_weights else None
        return Attended(self.with_anchor_rows(out, value, N), attention, mesh, A * (mesh.index.size(1) + R) + R, search_pairs)

    def causal_edges(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """The PyG path (``config.message_passing``): the same mesh as edges (``knn``/``knn_graph`` with the
        cluster backend) plus the anchor edges, and ``MeshAttentionConv.propagate`` over them; equal to
        :meth:`causal_slots` (tests/test_message_passing_path.py)."""
        N = ctx.pos.numel()
        search_pairs = self.search_pairs(mesh_search, active_tokens, ctx)
        query, key, value, _ = self.causal_projections(h, x, active_tokens, ctx, anchors, update_anchors)
        mesh = self.causal_mesh(h, query, key, active_tokens, ctx, mesh_search)
        active = torch.cat([active_tokens, ctx.anchor_nodes])
        edge_global, edge_index = self.layer_edges(mesh.edges()[0], h.size(0), ctx, active_tokens, active, anchors)
        anchor_query = self.attn.project_query(x[N:], ctx.node_pos[N:])  # an anchor's one (self) edge: weight 1
        out, alpha = self.attn.attend(torch.cat([query, anchor_query]), key, value, edge_index, (ctx.node_pos, ctx.node_pos[active]))
        return Attended(out, (edge_global, alpha) if with_weights else None, mesh, edge_index.size(1), search_pairs)

    def causal_dense(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """No mesh: every active token attends to all earlier tokens of its sequence and the anchor rows."""
        N, A, R = ctx.pos.numel(), active_tokens.numel(), ctx.anchor_nodes.numel()
        query, key, value, _ = self.causal_projections(h, x, active_tokens, ctx, anchors, update_anchors)
        memory = (key[N:], value[N:]) if R else None
        out = dense_causal_attention(self.attn, query, key[:N], value[:N], ctx.pos, ctx.tok_batch, ctx.num_graphs,
                                     active_tokens, ctx.seq_len, memory)
        pairs = ctx.candidate_pairs(active_tokens, True) + A * (1 + R) + R
        return Attended(self.with_anchor_rows(out, value, N), None, None, pairs, 0)

    def bidirectional_slots(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """The fast path, bidirectional: every active token attends to its mesh slots (k neighbours, itself)
        and the M anchors of its graph in one softmax (the fused slot op); every anchor row reads the active
        tokens of its graph and itself by message passing (its in-degree is the size of its graph)."""
        conv, N, A, R = self.attn, ctx.pos.numel(), active_tokens.numel(), ctx.anchor_nodes.numel()
        search_pairs = self.search_pairs(mesh_search, active_tokens, ctx)
        mesh = mesh_search.slots(h[:N], ctx.tok_batch, None if A == N else active_tokens, ctx.seq_len)
        key, value = conv.project_key_value(x, ctx.node_pos)
        pos_q, S, M = ctx.node_pos[mesh.target], mesh.index.size(1), R // ctx.num_graphs
        index, valid = mesh.index, mesh.valid
        if R:  # the anchors of the token's graph, after its mesh slots
            graph_anchors = N + ctx.tok_batch[mesh.target].unsqueeze(1) * M + torch.arange(M, device=h.device)
            index, valid = torch.cat([index, graph_anchors], 1), F.pad(valid, (0, M), value=True)
        out, alpha = conv.attend_slots(conv.project_query(x[mesh.target], pos_q), key, value, index, valid,
                                       (ctx.node_pos, pos_q), memory_slots=M)
        pairs, attention = A * index.size(1), None
        if R:  # anchor rows: the token -> anchor edges of the active tokens and the anchors' self edges
            reads = torch.cat([anchors.edges(active_tokens, ctx.tok_batch[active_tokens], N, causal=False)[:, A * M:],
                               ctx.anchor_nodes.expand(2, -1)], 1)
            anchor_out, anchor_alpha = conv.attend(conv.project_query(x[N:], ctx.node_pos[N:]), key, value,
                                                   torch.stack([reads[0], reads[1] - N]), (ctx.node_pos, ctx.node_pos[N:]))
            out, pairs = torch.cat([out, anchor_out]), pairs + reads.size(1)
        if with_weights:  # PyG edges in the order of the PyG path: mesh, anchor -> token, token -> anchor, self
            edges, weights = [mesh.edges()[0]], [alpha[:, :S][mesh.valid]]
            if R:
                edges += [torch.stack([graph_anchors.reshape(-1), mesh.target.repeat_interleave(M)]), reads]
                weights += [alpha[:, S:].reshape(A * M, -1), anchor_alpha]
            attention = torch.cat(edges, 1), torch.cat(weights)
        return Attended(out, attention, mesh, pairs, search_pairs)

    def bidirectional_edges(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """The PyG path, bidirectional: ``MeshAttentionConv`` message passing over the kNN edges plus the
        anchor edges; equal to :meth:`bidirectional_slots`."""
        N, A = ctx.pos.numel(), active_tokens.numel()
        search_pairs = self.search_pairs(mesh_search, active_tokens, ctx)
        active = torch.cat([active_tokens, ctx.anchor_nodes])
        mesh = mesh_search.slots(h[:N], ctx.tok_batch, None if A == N else active_tokens, ctx.seq_len)
        edge_global, edge_index = self.layer_edges(mesh.edges()[0], h.size(0), ctx, active_tokens, active, anchors)
        out, (_, alpha) = self.attn((x, x[active]), edge_index, (ctx.node_pos, ctx.node_pos[active]), return_attention_weights=True)
        return Attended(out, (edge_global, alpha) if with_weights else None, mesh, edge_index.size(1), search_pairs)

    def bidirectional_dense(self, h, x, active_tokens, ctx, mesh_search, anchors, with_weights, update_anchors) -> Attended:
        """No mesh, bidirectional: every active row attends to every row of its graph (anchors included)."""
        conv, A, R = self.attn, active_tokens.numel(), ctx.anchor_nodes.numel()
        active = torch.cat([active_tokens, ctx.anchor_nodes])
        key, value = conv.project_key_value(x, ctx.node_pos)
        node_batch = ctx.node_batch()
        out = dense_attention(conv, conv.project_query(x[active], ctx.node_pos[active]), key, value,
                              (ctx.node_pos, ctx.node_pos[active]), (node_batch, node_batch[active]), ctx.num_graphs, False)
        return Attended(out, None, None, (A + R) * (ctx.pos.numel() + R), 0)

    def layer_edges(self, mesh_edges: Tensor, num_nodes: int, ctx: LayerInput, active_tokens: Tensor, active: Tensor,
                    anchors: Optional[MemoryAnchors]) -> Tuple[Tensor, Tensor]:
        """Mesh edges plus anchor edges (anchor -> token, and token -> anchor when bidirectional; anchor
        self edges). Returns them in node ids (2, E) and with targets renumbered in ``active`` order."""
        edge_global = mesh_edges
        if anchors is not None:
            anchor_nodes = ctx.anchor_nodes
            graph = torch.zeros_like(active_tokens) if self.config.causal else ctx.tok_batch[active_tokens]  # causal: M shared rows
            anchor_edges = anchors.edges(active_tokens, graph, num_nodes - anchor_nodes.numel(), self.config.causal)
            edge_global = torch.cat([mesh_edges, anchor_edges, anchor_nodes.expand(2, -1)], dim=1)
        local = torch.full((num_nodes,), -1, dtype=torch.long, device=mesh_edges.device)
        local[active] = torch.arange(active.numel(), device=mesh_edges.device)
        return edge_global, torch.stack([edge_global[0], local[edge_global[1]]])
