"""TMTModel: the TemporalMesh Transformer language model on PyG batches."""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn.dense.linear import Linear as PygLinear

from ..data.batching import TokenInput, check_token_batch, pack_tokens
from ..layers.anchors import MemoryAnchors
from ..layers.attention import MeshAttentionConv
from ..layers.dense_attention import dense_attention
from ..layers.exit_gate import ExitGate, consistency_loss, decisiveness_loss
from ..layers.ffn import DualStreamFFN, FeedForward
from ..layers.mesh import DynamicMesh
from .config import TMTConfig


@dataclass
class TMTOutput:
    logits: Tensor  # (N, V) for a Batch, (B, S, V) for a (B, S) tensor input
    loss: Optional[Tensor] = None  # lm_loss + gate_loss_weight * gate_loss (compute_loss=True)
    lm_loss: Optional[Tensor] = None  # mean next-token cross-entropy inside sequences
    gate_loss: Optional[Tensor] = None  # exit-gate objective (0 when exits are off)
    exit_masks: Optional[Tensor] = None  # (L, N) bool: token was frozen and skipped at layer l
    confidences: Optional[Tensor] = None  # (L-1, N) gate confidence after layer l (NaN: not computed)
    graph_edges: Optional[Tuple[Tensor, Tensor]] = None  # last layer's mesh: edge_index (2, E), cosine (E,)
    memory_state: Optional[Tensor] = None  # (M, D) anchor state
    decay_scalars: Optional[Tensor] = None  # (L, H) learned decay rate per layer and head
    attentions: Optional[List[Tuple[Tensor, Tensor]]] = None  # per layer (edge_index, alpha (E, H))
    rows_processed: Optional[Tensor] = None  # (L,) token rows each layer actually computed
    work_fraction: Optional[Tensor] = None  # processed layer-token rows / (L * N)
    exit_rate: Optional[Tensor] = None  # fraction of tokens exited before the last layer
    avg_exit_layer: Optional[Tensor] = None  # mean number of layers a token ran through
    flops: float = 0.0  # counted multiply-adds * 2 of the forward pass (rows and edges really processed)
    hidden_states: Optional[List[Tensor]] = None  # input of each layer (N + B*M, D), tokens then anchors


class TMTBlock(nn.Module):
    """One pre-LayerNorm TMT layer: mesh (or dense) attention + FFN on the active rows."""

    def __init__(self, cfg: TMTConfig, exit_gate: bool = False):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.ln_attn = nn.LayerNorm(D)
        self.attn = MeshAttentionConv(D, D // H, heads=H, dropout=cfg.dropout, decay=cfg.use_decay,
                                      decay_rate=cfg.decay_rate, max_seq_len=cfg.max_seq_len, rotary=cfg.rope)
        self.ln_ffn = nn.LayerNorm(D)
        self.ffn = DualStreamFFN(D, cfg.ffn_stream_dim) if cfg.dual_stream else FeedForward(D, cfg.mlp_dim)
        self.exit_gate = ExitGate(D) if exit_gate else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, active: Tensor, edge_index: Optional[Tensor], pos: Tensor, batch: Tensor,
                num_graphs: int, causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``h`` (N, D) all node states (every node is a key/value source), ``active`` (A,) rows to
        update, ``edge_index`` (2, E) sources in node ids and targets in ``active`` order (None:
        dense attention). Returns the new states of the active rows (A, D) and alpha (E, H)."""
        x = self.ln_attn(h)
        x_pair, pos_pair = (x, x[active]), (pos, pos[active])
        if edge_index is None:
            attn, alpha = dense_attention(self.attn, x_pair, pos_pair, (batch, batch[active]), num_graphs, causal), None
        else:
            attn, (_, alpha) = self.attn(x_pair, edge_index, pos_pair, return_attention_weights=True)
        out = h[active] + self.drop(attn)
        return out + self.drop(self.ffn(self.ln_ffn(out))), alpha


def layer_flops(cfg: TMTConfig, num_sources: int, num_active: int, num_edges: int, mesh_pairs: int) -> float:
    """2 * multiply-adds of one layer: K/V for every source row, Q/out/FFN/gate for active rows,
    4*D per attention edge (or query-key pair), 2*D per kNN candidate pair scored."""
    D = cfg.d_model
    ffn = 2 * D * D + 8 * D * cfg.ffn_stream_dim if cfg.dual_stream else 4 * D * cfg.mlp_dim
    gate = 2 * D if cfg.use_exit else 0
    return float(4 * D * D * num_sources + (4 * D * D + ffn + gate) * num_active + 4 * D * num_edges + 2 * D * mesh_pairs)


class TMTModel(nn.Module):
    """TemporalMesh Transformer: embeddings, ``n_layers`` TMT blocks with the mesh rebuilt from
    the current states before each, final LayerNorm, LM head tied to the embedding.

    ``forward`` takes a PyG ``Batch`` (node fields ``input_ids``, ``pos``, ``batch``) or a ``(B, S)``
    LongTensor and returns a :class:`TMTOutput`.
    """

    def __init__(self, config: TMTConfig):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = None if cfg.rope else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.mesh = DynamicMesh(cfg.graph_k, causal=cfg.causal, backend=cfg.mesh_backend) if cfg.use_mesh else None
        self.anchors = (MemoryAnchors(cfg.memory_anchors, cfg.d_model, cfg.anchor_momentum, init_std=0.02 * self.embed_scale)
                        if cfg.use_anchors else None)
        # no gate after the last layer: there is no later layer to skip
        self.blocks = nn.ModuleList(TMTBlock(cfg, exit_gate=cfg.use_exit and i < cfg.n_layers - 1)
                                    for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the projections into the residual stream
            if name.endswith(("attn.lin_out.weight", "ffn.lin_out.weight", "syntax.lin_out.weight", "semantic.lin_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
        for block in self.blocks:
            if block.exit_gate is not None:
                block.exit_gate.reset_parameters()
            if block.attn.decay is not None:
                block.attn.decay.reset_parameters()
        if self.anchors is not None:
            self.anchors.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, PygLinear)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def lm_head(self, h: Tensor) -> Tensor:
        """Final norm + tied projection: (N, D) -> (N, V)."""
        return self.ln_f(h) @ self.wte.weight.t()

    def _as_batch(self, tokens: Union[Batch, TokenInput]) -> Batch:
        data = tokens if isinstance(tokens, Batch) else pack_tokens(tokens)
        check_token_batch(data, self.config.vocab_size, self.config.max_seq_len, self.wte.weight.device)
        return data

    def forward(self, tokens: Union[Batch, TokenInput], compute_loss: bool = False,
                return_attention_weights: bool = False, output_hidden_states: bool = False) -> TMTOutput:
        cfg = self.config
        data = self._as_batch(tokens)
        ids, pos, tok_batch = data.input_ids, data.pos, data.batch
        N, B, dev = ids.numel(), int(data.num_graphs), ids.device
        h = self.wte(ids) * self.embed_scale
        if self.wpe is not None:
            h = h + self.wpe(pos)
        h = self.drop(h)
        node_pos, node_batch, anchor_nodes = pos, tok_batch, ids.new_empty(0)
        if self.anchors is not None:  # virtual nodes after the tokens, graph-major
            M = self.anchors.num_anchors
            anchor_nodes = torch.arange(N, N + B * M, device=dev)
            h = torch.cat([h, self.anchors.expand(B).to(h.dtype)])
            node_pos = torch.cat([pos, pos.new_full((B * M,), -1)])
            node_batch = torch.cat([tok_batch, torch.arange(B, device=dev).repeat_interleave(M)])
            if self.training:
                self._update_anchors(h, N, node_pos, tok_batch)
        freeze = cfg.use_exit and (not self.training or cfg.exit_in_training)
        exited = torch.zeros(N, dtype=torch.bool, device=dev)
        all_tokens = torch.arange(N, device=dev)
        lengths = torch.bincount(tok_batch, minlength=B)
        exit_masks, confidences, attentions, rows, states, hidden = [], [], [], [], [], []
        graph_edges, flops = None, 0.0
        sample = torch.randperm(N, device=dev)[:cfg.gate_sample] if compute_loss and cfg.gate_loss == "consistency" else None
        for layer, block in enumerate(self.blocks):
            active_tokens = (~exited).nonzero().view(-1) if freeze else all_tokens
            active = torch.cat([active_tokens, anchor_nodes])
            context = pos[active_tokens] + 1 if cfg.causal else lengths[tok_batch[active_tokens]]  # keys a query may see
            mesh_pairs = int(context.sum()) - active_tokens.numel()
            edge_global = edge_index = None
            if self.mesh is not None:
                graph_edges = self.mesh(h[:N], tok_batch, query_index=active_tokens)
                edge_global, edge_index = self._layer_edges(graph_edges[0], h.size(0), tok_batch, active_tokens, active, anchor_nodes)
            exit_masks.append(exited)
            hidden.append(h)
            h_active, alpha = block(h, active, edge_index, node_pos, node_batch, B, cfg.causal)
            h = h.index_copy(0, active, h_active)  # exited rows keep their frozen state bit for bit
            rows.append(active_tokens.numel())
            if edge_index is not None:
                flops += layer_flops(cfg, h.size(0), active.numel(), edge_index.size(1), mesh_pairs)
            else:  # dense: every allowed query-key pair is an edge, no kNN search
                anchor_pairs = active.numel() * anchor_nodes.numel() // B
                flops += layer_flops(cfg, h.size(0), active.numel(), mesh_pairs + active.numel() + anchor_pairs, 0)
            if return_attention_weights and edge_index is not None:
                attentions.append((edge_global, alpha))
            if block.exit_gate is not None:
                gate_in = h_active[:active_tokens.numel()]
                conf = block.exit_gate(gate_in.detach() if cfg.gate_detach else gate_in)
                conf_all = torch.full((N,), float("nan"), device=dev, dtype=conf.dtype).index_put((active_tokens,), conf)
                confidences.append(conf_all)
                if freeze:
                    exited = exited.clone()
                    exited[active_tokens] |= conf.detach() > cfg.exit_threshold
                if sample is not None:
                    states.append(h[sample].detach())
        if not bool(torch.isfinite(h[:N]).all()):  # NaN weights or an overflow: an error, not NaN logits
            raise ValueError("non-finite hidden states (NaN or Inf) after the last layer")
        logits = self.lm_head(h[:N])
        L = cfg.n_layers
        exit_mask_t = torch.stack(exit_masks)
        out = TMTOutput(
            logits=logits,
            exit_masks=exit_mask_t,
            confidences=torch.stack(confidences) if confidences else None,
            graph_edges=graph_edges,
            memory_state=self.anchors.anchor_state if self.anchors is not None else None,
            decay_scalars=torch.stack([b.attn.decay.decay_scalars for b in self.blocks]) if cfg.use_decay else None,
            attentions=attentions if return_attention_weights else None,
            rows_processed=torch.tensor(rows),
            work_fraction=torch.tensor(sum(rows) / (L * N)),
            exit_rate=exited.float().mean(),
            avg_exit_layer=(L - exit_mask_t.sum(0).float()).mean(),
            flops=flops,
            hidden_states=hidden + [h] if output_hidden_states else None,
        )
        if compute_loss:
            # row i predicts token i + 1 of the same sequence; no slicing of the (N, V) logits, whose
            # backward would materialise another (N, V) tensor
            has_next = torch.cat([tok_batch[1:] == tok_batch[:-1], tok_batch.new_zeros(1, dtype=torch.bool)])
            if not bool(has_next.any()):
                raise ValueError("no next-token targets: every sequence has length 1")
            out.lm_loss = F.cross_entropy(logits, torch.where(has_next, ids.roll(-1), -100), ignore_index=-100)
            out.gate_loss = self._gate_loss(confidences, states, sample, logits)
            out.loss = out.lm_loss + cfg.gate_loss_weight * out.gate_loss
        if isinstance(tokens, Tensor):
            out.logits = logits.view(tokens.size(0), tokens.size(1), -1)
        return out

    def _layer_edges(self, mesh_edges: Tensor, num_nodes: int, tok_batch: Tensor, active_tokens: Tensor,
                     active: Tensor, anchor_nodes: Tensor) -> Tuple[Tensor, Tensor]:
        """Mesh edges plus anchor edges (anchor -> token, token -> anchor if bidirectional, anchor
        self edges). Returns them in node ids (2, E) and with targets renumbered in ``active`` order."""
        edge_global = mesh_edges
        if self.anchors is not None:
            anchor_edges = self.anchors.edges(active_tokens, tok_batch[active_tokens], num_nodes - anchor_nodes.numel(), self.config.causal)
            edge_global = torch.cat([mesh_edges, anchor_edges, anchor_nodes.expand(2, -1)], dim=1)
        local = torch.full((num_nodes,), -1, dtype=torch.long, device=mesh_edges.device)
        local[active] = torch.arange(active.numel(), device=mesh_edges.device)
        return edge_global, torch.stack([edge_global[0], local[edge_global[1]]])

    def _gate_loss(self, confidences: List[Tensor], states: List[Tensor], sample: Optional[Tensor], logits: Tensor) -> Tensor:
        if not confidences or self.config.gate_loss == "none":
            return logits.new_zeros(())
        if self.config.gate_loss == "decisiveness":
            conf = torch.cat(confidences)
            return decisiveness_loss(conf[~conf.isnan()])
        final = logits[sample].detach().argmax(-1)
        losses = []
        for conf_all, state in zip(confidences, states):
            conf = conf_all[sample]
            seen = ~conf.isnan()
            with torch.no_grad():
                early = self.lm_head(state).argmax(-1)
            if bool(seen.any()):
                losses.append(consistency_loss(conf[seen], early[seen], final[seen]))
        return torch.stack(losses).mean() if losses else logits.new_zeros(())

    @torch.no_grad()
    def _update_anchors(self, h: Tensor, num_tokens: int, node_pos: Tensor, tok_batch: Tensor) -> None:
        """EMA step: token ``i`` spreads weight 1 over the anchors by its layer-0 attention scores
        (softmax over the anchors, mean over heads); each anchor moves towards the weighted mean of
        the token states (embeddings) that attend to it."""
        conv, ln = self.blocks[0].attn, self.blocks[0].ln_attn
        M = self.anchors.num_anchors
        query = conv.project_query(ln(h[:num_tokens]), node_pos[:num_tokens])  # (N, H, C)
        key, _ = conv.project_key_value(ln(self.anchors.anchor_state.to(h.dtype)), node_pos.new_full((M,), -1))  # (M, H, C)
        weight = torch.einsum("nhc,mhc->nmh", query, key).div(math.sqrt(conv.out_channels)).softmax(dim=1).mean(-1)  # (N, M)
        token = torch.arange(num_tokens, device=h.device).repeat_interleave(M)
        slot = torch.arange(M, device=h.device).repeat(num_tokens)
        self.anchors.update(h[:num_tokens].float(), slot, token, weight.reshape(-1).float())

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on weight matrices (dim >= 2) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample ``max_new_tokens`` after each row of ``idx`` (B, S) with per-layer caches."""
        from .generation import generate
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
