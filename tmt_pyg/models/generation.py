"""Batched incremental decoding with preallocated per-layer caches: each new token meets the cached
states of its layer, exactly as in a full forward over the whole sequence."""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.batching import TokenInput, pack_tokens
from ..layers.mesh import top_slots, window_slots
from .tmt import TMTModel, head_units


@dataclass
class LayerCache:
    state: Tensor  # (B, capacity, D) input states of this layer (exited tokens frozen)
    unit: Tensor  # (B, capacity, D) what the mesh search compares, L2-normalised: the states or the keys (mesh_unit)
    key: Tensor  # (B, capacity, H, C) their keys
    value: Tensor  # (B, capacity, H, C) their values
    memory: Optional[Tuple[Tensor, Tensor]]  # keys and values (M, H, C) of the memory anchors at this layer


class TMTCache:
    """Per-layer caches of a batch of causal sequences, filled by one full forward over the prompts.

    ``prompts``: a ``(B, S)`` tensor or a list of 1-D tensors of different lengths. Room for
    ``capacity`` tokens per row is allocated once (default: ``max_seq_len``); decoding writes into it.
    """

    def __init__(self, model: TMTModel, prompts: TokenInput, capacity: Optional[int] = None):
        cfg = model.config
        if not cfg.causal:
            raise ValueError("incremental decoding needs a causal model (config.causal=True)")
        if isinstance(prompts, Tensor) and prompts.dim() == 1:
            raise ValueError(f"prompts must be a (B, S) tensor or a list of 1-D tensors, got shape {tuple(prompts.shape)}")
        data = pack_tokens(prompts)
        out = model(data, output_hidden_states=True)
        N, B = data.num_nodes, int(data.num_graphs)
        self.capacity = capacity or cfg.max_seq_len
        self.lengths = torch.bincount(data.batch, minlength=B)  # (B,) tokens cached per row
        if int(self.lengths.max()) > self.capacity:
            raise ValueError(f"prompt of length {int(self.lengths.max())} exceeds the cache capacity {self.capacity}")
        node_pos = torch.cat([data.pos, data.pos.new_full((out.hidden_states[0].size(0) - N,), -1)])
        self.layers: List[LayerCache] = []
        for block, h in zip(model.blocks, out.hidden_states):
            key, value = block.attn.project_key_value(block.ln_attn(h), node_pos)
            layer = LayerCache(h.new_zeros(B, self.capacity, h.size(1)), h.new_zeros(B, self.capacity, h.size(1)),
                               key.new_zeros((B, self.capacity) + key.shape[1:]), value.new_zeros((B, self.capacity) + value.shape[1:]),
                               (key[N:], value[N:]) if h.size(0) > N else None)
            for cached, rows in ((layer.state, h), (layer.unit, mesh_unit(model, h, key)), (layer.key, key), (layer.value, value)):
                cached[data.batch, data.pos] = rows[:N]
            self.layers.append(layer)
        last = data.ptr[1:] - 1
        self.last_logits = out.logits[last]  # (B, V)
        self.source_pos = torch.arange(self.capacity, device=h.device).repeat(B)  # position of every cache row


def mesh_unit(model: TMTModel, state: Tensor, heads: Tensor) -> Tensor:
    """Unit rows the mesh compares, as :meth:`DynamicMesh.slots` normalises them: the states (n, D),
    or the queries/keys ``heads`` (n, H, C) for the attention-similarity mesh."""
    return F.normalize(state if model.config.mesh_similarity == "state" else head_units(heads), dim=-1)


@torch.no_grad()
def extend(model: TMTModel, cache: TMTCache, ids: Tensor) -> Tensor:
    """Run ``ids`` (B, n), the next ``n`` tokens of every cached row; update ``cache``; return logits (B, n, V).

    At every layer the active new tokens find their mesh neighbours among their row's cached states
    of that layer plus the new tokens before them, attend over the cached keys/values and the
    anchors, and may exit, exactly as in a full forward over the whole sequence (eval mode).
    """
    cfg = model.config
    B, n = ids.shape
    if B != cache.lengths.numel():
        raise ValueError(f"ids has {B} rows but the cache holds {cache.lengths.numel()}")
    end = int(cache.lengths.max()) + n
    if end > min(cache.capacity, cfg.max_seq_len):
        raise ValueError(f"sequence of length {end} exceeds max_seq_len={cfg.max_seq_len} or the cache capacity {cache.capacity}")
    model._inputs(ids)  # same id checks as forward
    pos = (cache.lengths.unsqueeze(1) + torch.arange(n, device=ids.device)).view(-1)  # (B * n,)
    row = torch.arange(B, device=ids.device).repeat_interleave(n)
    h = model.wte(ids.reshape(-1)) * model.embed_scale
    if model.wpe is not None:
        h = h + model.wpe(pos)
    exited = torch.zeros(B * n, dtype=torch.bool, device=ids.device)
    for block, layer in zip(model.blocks, cache.layers):
        active = (~exited).nonzero().view(-1) if cfg.use_exit else torch.arange(B * n, device=ids.device)
        x = block.ln_attn(h)
        key, value = block.attn.project_key_value(x, pos)
        layer.state[row, pos], layer.key[row, pos], layer.value[row, pos] = h, key, value
        layer.unit[row, pos] = mesh_unit(model, h, key)
        q_row, q_pos = row[active], pos[active]
        query = block.attn.project_query(x[active], q_pos)
        if model.mesh is not None:  # k most similar earlier states (or keys) of the row, window, self slot
            u = layer.unit[:, :end]  # (B, L, D)
            sim = torch.einsum("ad,ald->al", mesh_unit(model, h[active], query), u[q_row])  # (A, L)
            w = model.mesh.window
            index, valid = top_slots(sim, torch.arange(end, device=ids.device) < q_pos.unsqueeze(1) - w, model.mesh.k)
            window, in_window = window_slots(q_pos, q_pos, w)  # positions before the query, kNN slots, self
            index = torch.cat([index, window, q_pos.unsqueeze(1)], 1)
            valid = torch.cat([valid, in_window, valid.new_ones(valid.size(0), 1)], 1)
            index = torch.where(valid, index, q_pos.unsqueeze(1))
        else:  # dense: every earlier position of the row
            index = torch.arange(end, device=ids.device).expand(active.numel(), -1)
            valid = index <= q_pos.unsqueeze(1)
        attn, _ = block.attn.attend_slots(query, layer.key.flatten(0, 1), layer.value.flatten(0, 1), q_row.unsqueeze(1) * cache.capacity + index,
                                          valid, (cache.source_pos, q_pos), layer.memory)
        out = block(h[active], attn)
        h = h.index_copy(0, active, out)
        if block.exit_gate is not None and cfg.use_exit:
            exited[active] |= block.exit_gate(out) > cfg.exit_threshold
    cache.lengths += n
    logits = model.lm_head(h).view(B, n, -1)
    cache.last_logits = logits[:, -1]
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample one id per row from logits (..., V): temperature, then top-k, then nucleus (top-p)
    filtering. ``temperature == 0`` picks the argmax. Returns (..., 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.view(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1] + (1,))


@torch.no_grad()
def generate(model: TMTModel, idx: TokenInput, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Union[Tensor, List[Tensor]]:
    """Continue every prompt by ``max_new_tokens`` sampled tokens, all rows decoded together.

    ``idx``: a (B, S) tensor -> (B, S + new); or a list of 1-D prompts of any lengths -> a list.
    """
    ragged = not isinstance(idx, Tensor)
    if not ragged and idx.dim() != 2:
        raise ValueError(f"idx must be a (B, S) tensor of token ids, got shape {tuple(idx.shape)}")
    prompts = list(idx) if ragged else idx
    longest = max(p.numel() for p in prompts) if ragged else idx.size(1)
    if longest + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"prompt length {longest} + {max_new_tokens} new tokens exceeds max_seq_len={model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        cache = TMTCache(model, prompts, capacity=longest + max_new_tokens - 1)
        new = []
        for step in range(max_new_tokens):
            token = sample_next(cache.last_logits, temperature, top_k, top_p, generator)  # (B, 1)
            new.append(token)
            if step + 1 < max_new_tokens:
                extend(model, cache, token)
        new = torch.cat(new, 1) if new else idx.new_zeros(len(prompts), 0) if not ragged else prompts[0].new_zeros(len(prompts), 0)
        if ragged:
            return [torch.cat([p, t]) for p, t in zip(prompts, new)]
        return torch.cat([idx, new], 1)
    finally:
        model.train(was_training)
