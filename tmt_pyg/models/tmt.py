"""TMTModel: the TemporalMesh Transformer language model on PyG batches."""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn.dense.linear import Linear as PygLinear

from ..data.batching import TokenInput, check_ids, check_token_batch, next_token_targets, pack_tokens
from ..layers.anchors import MemoryAnchors
from ..layers.exit_gate import consistency_loss, decisiveness_loss, masked_mean
from ..layers.mesh import DynamicMesh, MeshSlots
from .config import TMTConfig
from .generation import generate
from .layer import LayerInput, TMTLayer, anchor_ema_step
from .speculative import speculative_generate


@dataclass
class TMTOutput:
    logits: Tensor  # (N, V) for a Batch, (B, S, V) for a (B, S) tensor input
    loss: Optional[Tensor] = None  # lm_loss + exit_loss_weight * exit_loss + gate_loss_weight * gate_loss
    lm_loss: Optional[Tensor] = None  # mean next-token cross-entropy inside sequences
    gate_loss: Optional[Tensor] = None  # exit-gate objective (0 when exits are off)
    exit_loss: Optional[Tensor] = None  # early-exit LM loss: depth-weighted mean of the earlier layers' losses
    exit_masks: Optional[Tensor] = None  # (L, N) bool: token was frozen and skipped at layer l
    confidences: Optional[Tensor] = None  # (L-1, N) gate confidence after layer l (NaN: not computed)
    mesh: Optional[MeshSlots] = None  # last layer's mesh as fixed-degree slots
    memory_state: Optional[Tensor] = None  # (M, D) anchor state
    decay_scalars: Optional[Tensor] = None  # (L, H) learned decay rate per layer and head
    attentions: Optional[List[Tuple[Tensor, Tensor]]] = None  # per layer (edge_index, alpha (E, H))
    rows_processed: Optional[Tensor] = None  # (L,) token rows each layer actually computed
    work_fraction: Optional[Tensor] = None  # processed layer-token rows / (L * N)
    exit_rate: Optional[Tensor] = None  # fraction of tokens exited before the last layer
    avg_exit_layer: Optional[Tensor] = None  # mean number of layers a token ran through
    flops: float = 0.0  # counted multiply-adds * 2 of the forward pass (rows and edges really processed)
    hidden_states: Optional[List[Tensor]] = None  # input of each layer (N + R, D): tokens, then R anchor rows
    # (M shared rows when causal, M per graph when bidirectional)

    @property
    def graph_edges(self) -> Optional[Tuple[Tensor, Tensor]]:
        """Last layer's mesh as PyG edges: edge_index (2, E), cosine (E,)."""
        return None if self.mesh is None else self.mesh.edges()


class LayerTrace:
    """What one forward records layer by layer: the exit masks and inputs before each layer; after it the
    rows and FLOPs it computed, its attention, the gate confidences, the sampled states the gate
    objective scores (``sample``: token ids), with ``early`` the states the early-exit loss reads (of the
    tokens ``early_rows`` when given, else all) and with ``attention`` the layers' attention weights."""

    def __init__(self, num_tokens: int, sample: Optional[Tensor], early: bool, attention: bool,
                 early_rows: Optional[Tensor] = None):
        self.N, self.sample, self.keep_early, self.keep_attention = num_tokens, sample, early, attention
        self.early_rows = early_rows
        self.exit_masks, self.hidden, self.rows, self.attentions = [], [], [], []
        self.confidences, self.gate_states, self.early = [], [], []
        self.flops = 0.0

    def before(self, h: Tensor, exited: Tensor) -> None:
        self.exit_masks.append(exited)
        self.hidden.append(h)

    def after(self, step, h: Tensor, last: bool) -> None:
        """Record layer output ``step`` (a ``LayerOutput``) and the states ``h`` (N + R, D) after it."""
        self.rows.append(step.rows)
        self.flops += step.flops
        if self.keep_attention:
            self.attentions.append(step.attention)
        if self.keep_early and not last:
            self.early.append(h[:self.N] if self.early_rows is None else h.index_select(0, self.early_rows))
        if step.confidence is not None:
            self.confidences.append(step.confidence)
            if self.sample is not None:
                self.gate_states.append(h.detach().index_select(0, self.sample))


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
        self.mesh = (DynamicMesh(cfg.graph_k, causal=cfg.causal, backend=cfg.mesh_backend, window=cfg.mesh_window,
                                 search=cfg.mesh_search, route_block=cfg.route_block, route_top=cfg.route_top,
                                 explore=cfg.mesh_explore)
                     if cfg.use_mesh else None)
        # True: training forwards attend densely with the same weights (the mesh's dense warm-up, switched by the
        # trainer for the first config.mesh_dense_warmup steps); evaluation and generation read the mesh
        self.dense_warmup = False
        self.anchors = (MemoryAnchors(cfg.memory_anchors, cfg.d_model, cfg.anchor_momentum, init_std=0.02 * self.embed_scale)
                        if cfg.use_anchors else None)
        # no gate after the last layer: there is no later layer to skip
        self.blocks = nn.ModuleList(TMTLayer(cfg, exit_gate=cfg.use_exit and i < cfg.n_layers - 1)
                                    for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight. The exit gates draw from a generator of their own, so a model with
        gates starts from the same trunk as the same seed's model without them."""
        gates = [block.exit_gate for block in self.blocks if block.exit_gate is not None]
        in_gates = {id(m) for gate in gates for m in gate.modules()}
        for module in self.modules():
            if id(module) not in in_gates:
                self._init_weights(module)
        for name, p in self.named_parameters():  # scaled init of the projections into the residual stream
            if name.endswith(("attn.lin_out.weight", "ffn.lin_out.weight", "syntax.lin_out.weight", "semantic.lin_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
        gate_rng = torch.Generator().manual_seed(torch.initial_seed() + 1)
        for gate in gates:
            gate.reset_parameters(gate_rng)
        for block in self.blocks:
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

    def _inputs(self, tokens: Union[Batch, TokenInput]) -> Tuple[Tensor, Tensor, Tensor, int, Optional[int]]:
        """Checked node fields: ids (N,), pos (N,), batch (N,), the number of graphs, and the common
        length S when all sequences have the same (else None). One host sync for the checks; none
        for a ``(B, S)`` tensor under ``torch.compile``, which trusts its input."""
        if not (isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.numel()):
            data = tokens if isinstance(tokens, Batch) else pack_tokens(tokens)
            seq_len = check_token_batch(data, self.config.vocab_size, self.config.max_seq_len, self.wte.weight.device)
            return data.input_ids, data.pos, data.batch, int(data.num_graphs), seq_len
        B, S = tokens.shape
        device = self.wte.weight.device
        if tokens.device != device:
            raise ValueError(f"input_ids is on {tokens.device} but the model is on {device}")
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence of length {S} exceeds max_seq_len={self.config.max_seq_len}")
        ids = tokens.reshape(-1)
        if not torch.compiler.is_compiling():
            check_ids(ids, self.config.vocab_size)
        pos = torch.arange(S, device=device).repeat(B)
        return ids, pos, torch.arange(B, device=device).repeat_interleave(S), B, S

    def forward(self, tokens: Union[Batch, TokenInput], compute_loss: bool = False,
                return_attention_weights: bool = False, output_hidden_states: bool = False) -> TMTOutput:
        cfg = self.config
        ids, pos, tok_batch, B, seq_len = self._inputs(tokens)  # seq_len: equal lengths, static shapes
        N, dev = ids.numel(), ids.device
        h = self.wte(ids) * self.embed_scale
        if self.wpe is not None:
            h = h + self.wpe(pos)
        h, anchor_nodes, node_pos = self._with_anchor_rows(self.drop(h), pos, B)
        ctx = LayerInput(pos, node_pos, tok_batch, anchor_nodes, B, seq_len)
        freeze = cfg.use_exit and (not self.training or cfg.exit_in_training)
        exited = torch.zeros(N, dtype=torch.bool, device=dev)
        mesh = None if self.dense_warmup and self.training else self.mesh
        # a random subset of tokens scored by the consistency objective (randperm()[:k] trips an inductor pattern)
        sample = torch.rand(N, device=dev).topk(min(N, cfg.gate_sample)).indices if compute_loss and cfg.gate_loss == "consistency" else None
        early = compute_loss and cfg.exit_loss_weight > 0
        early_rows = torch.rand(N, device=dev).topk(cfg.exit_loss_sample).indices if early and 0 < cfg.exit_loss_sample < N else None
        trace = LayerTrace(N, sample, early, return_attention_weights, early_rows)
        for layer, block in enumerate(self.blocks):
            trace.before(h, exited)
            step = block(h, exited, ctx, mesh, self.anchors, freeze, return_attention_weights,
                         update_anchors=layer == 0 and self.training)
            h, exited = self._layer_dropout(h, step.h, layer, tok_batch, B), step.exited
            trace.after(step, h, last=layer == cfg.n_layers - 1)
        # NaN weights or an overflow: an error, not NaN logits (training leaves this to the loss
        # checks of the trainer, so that the training forward makes no host sync)
        if not self.training and not bool(torch.isfinite(h[:N]).all()):
            raise ValueError("non-finite hidden states (NaN or Inf) after the last layer")
        logits = self.lm_head(h[:N])
        exit_masks, L = torch.stack(trace.exit_masks), cfg.n_layers
        out = TMTOutput(
            logits=logits,
            exit_masks=exit_masks,
            confidences=torch.stack(trace.confidences) if trace.confidences else None,
            mesh=step.mesh,
            memory_state=self.anchors.anchor_state if self.anchors is not None else None,
            decay_scalars=torch.stack([b.attn.decay.decay_scalars for b in self.blocks]) if cfg.use_decay else None,
            attentions=trace.attentions if return_attention_weights else None,
            rows_processed=torch.tensor(trace.rows),
            work_fraction=torch.tensor(sum(trace.rows) / (L * N)),
            exit_rate=exited.float().mean(),
            avg_exit_layer=(L - exit_masks.sum(0).float()).mean(),
            flops=trace.flops,
            hidden_states=trace.hidden + [h] if output_hidden_states else None,
        )
        if compute_loss:
            self._add_losses(out, ids, tok_batch, seq_len, trace)
        if isinstance(tokens, Tensor):
            out.logits = logits.view(tokens.size(0), tokens.size(1), -1)
        return out

    def _with_anchor_rows(self, h: Tensor, pos: Tensor, num_graphs: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Token states (N, D) followed by the anchor rows: M rows every token reads (causal, read-only), or
        M per graph (bidirectional, where anchors also read the tokens of their graph). Returns the states
        (N + R, D), the anchor rows' node ids (R,) and every row's position (N + R,) (-1: timeless). A
        bidirectional model takes the anchors' EMA step here in training (a causal one in layer 0)."""
        N, copies = h.size(0), 1 if self.config.causal else num_graphs
        R = 0 if self.anchors is None else copies * self.anchors.num_anchors
        anchor_nodes = torch.arange(N, N + R, device=h.device)
        node_pos = torch.cat([pos, pos.new_full((R,), -1)])
        if self.anchors is not None:
            h = torch.cat([h, self.anchors.expand(copies).to(h.dtype)])
            if self.training and not self.config.causal:
                conv, x0, M = self.blocks[0].attn, self.blocks[0].ln_attn(h), self.anchors.num_anchors
                anchor_ema_step(self.anchors, h[:N], conv.project_query(x0[:N], pos),
                                conv.project_key_value(x0[N:N + M], node_pos[N:N + M])[0])
        return h, anchor_nodes, node_pos

    def _add_losses(self, out: TMTOutput, ids: Tensor, tok_batch: Tensor, seq_len: Optional[int], trace: "LayerTrace") -> None:
        """Set the LM, gate and early-exit losses of ``out`` and their weighted sum. Row i predicts token
        i + 1 of the same sequence; the (N, V) logits are not sliced (the backward of a slice would
        materialise another (N, V) tensor)."""
        cfg, logits = self.config, out.logits
        target = next_token_targets(ids, tok_batch)
        if (seq_len is not None and seq_len < 2) or (seq_len is None and not bool((target >= 0).any())):
            raise ValueError("no next-token targets: every sequence has length 1")
        out.lm_loss = F.cross_entropy(logits, target, ignore_index=-100)
        out.gate_loss = self._gate_loss(trace.confidences, trace.gate_states, trace.sample, logits)
        out.exit_loss = self._exit_loss(trace.early, target, trace.early_rows) if trace.early else logits.new_zeros(())
        out.loss = out.lm_loss + cfg.exit_loss_weight * out.exit_loss + cfg.gate_loss_weight * out.gate_loss

    def _layer_dropout(self, h_in: Tensor, h_out: Tensor, layer: int, tok_batch: Tensor, num_graphs: int) -> Tensor:
        """LayerSkip's layer dropout on the token rows of ``h_out`` (N + R, D), the layer's output for
        ``h_in``: in training every sequence skips the layer with probability p = layer_dropout * l / (L - 1)
        and keeps its update scaled by 1 / (1 - p) otherwise; anchor rows always keep theirs."""
        L, N = self.config.n_layers, tok_batch.numel()
        p = self.config.layer_dropout * layer / max(L - 1, 1)
        if not self.training or p == 0:
            return h_out
        keep = (torch.rand(num_graphs, device=h_in.device) >= p).to(h_out.dtype).div(1 - p)[tok_batch].unsqueeze(1)
        return torch.cat([h_in[:N] + (h_out[:N] - h_in[:N]) * keep, h_out[N:]])

    def _gate_loss(self, confidences: List[Tensor], states: List[Tensor], sample: Optional[Tensor], logits: Tensor) -> Tensor:
        """Gate objective over the tokens whose gates ran (NaN confidence: exited before), masked
        rather than selected, so that it makes no host sync."""
        if not confidences or self.config.gate_loss == "none":
            return logits.new_zeros(())
        conf = torch.stack(confidences)  # (L-1, N)
        if self.config.gate_loss == "decisiveness":
            return decisiveness_loss(conf.nan_to_num(0.5), ~conf.isnan())
        final = logits.detach().index_select(0, sample).argmax(-1)
        losses, has = [], []
        for conf_all, state in zip(confidences, states):
            c = conf_all.index_select(0, sample)
            seen = ~c.isnan()
            with torch.no_grad():
                early = self.lm_head(state).argmax(-1)
            losses.append(consistency_loss(c.nan_to_num(0.5), early, final, seen))
            has.append(seen.any())
        return masked_mean(torch.stack(losses), torch.stack(has))  # mean over the layers that scored tokens

    def _exit_loss(self, states: List[Tensor], target: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """Early-exit LM loss: the next-token losses (targets (N,), -100: none) of the states after
        layers 1 .. L-1 (each (N, D)) through the shared head, layer l weighted by l, averaged. With
        ``rows`` (n,) the states are those tokens' (each (n, D)): their summed losses are scaled by N / n over
        the N tokens' target count, whose expectation over uniform draws of ``rows`` is the loss over all tokens.
        With ``exit_loss_layers`` k, the head scores k layers drawn with replacement with probability
        proportional to l, averaged: again the weighted loss in expectation (drawn on the device, no sync)."""
        k = self.config.exit_loss_layers
        picked = target if rows is None else target.index_select(0, rows)
        scale = target.numel() / picked.numel() / (target >= 0).sum().clamp(min=1)
        if k:
            weights = torch.arange(1, len(states) + 1, dtype=torch.float, device=target.device)
            layers = torch.multinomial(weights, k, replacement=True)
            drawn = torch.stack(states).index_select(0, layers).flatten(0, 1)  # (k * n, D)
            return F.cross_entropy(self.lm_head(drawn), picked.repeat(k), ignore_index=-100, reduction="sum") * scale / k
        losses = [w * F.cross_entropy(self.lm_head(state), picked, ignore_index=-100, reduction="sum")
                  for w, state in enumerate(states, 1)]
        return sum(losses) * scale / sum(range(1, len(states) + 1))

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW with weight decay on weight matrices (dim >= 2) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def generate(self, idx: TokenInput, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 draft_layers: Optional[int] = None, draft_tokens: int = 4, compiled: bool = False) -> Union[Tensor, List[Tensor]]:
        """Sample ``max_new_tokens`` after each row of ``idx`` ((B, S), or a list of 1-D prompts) with
        per-layer caches. ``draft_layers=E``: self-speculative decoding, ``draft_tokens`` drafted per
        round by the first E layers and verified by the full model (greedy: the same tokens).
        ``compiled``: each decoding step (draft, verification) one compiled graph (the same tokens; the
        first call per batch size, length and step shape compiles)."""
        if draft_layers is None:
            return generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator, compiled)
        return speculative_generate(self, idx, max_new_tokens, draft_layers, draft_tokens, temperature, top_k, top_p,
                                    generator, compiled)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
