"""Incremental decoding with per-layer caches: each new token meets the cached states of its layer."""
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .tmt import TMTModel


@dataclass
class LayerCache:
    state: Tensor  # (T, D) input states of this layer for the tokens so far (exited ones frozen)
    key: Tensor  # (T, H, C) their keys
    value: Tensor  # (T, H, C) their values
    anchor_key: Tensor  # (M, H, C) keys of the memory anchors at this layer (M may be 0)
    anchor_value: Tensor  # (M, H, C)


class TMTCache:
    """Per-layer cache of one causal sequence, filled by a full forward over the prompt."""

    def __init__(self, model: TMTModel, prompt: Tensor):
        cfg = model.config
        if not cfg.causal:
            raise ValueError("incremental decoding needs a causal model (config.causal=True)")
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
        out = model(prompt.unsqueeze(0), output_hidden_states=True)
        T = prompt.numel()
        M = model.anchors.num_anchors if model.anchors is not None else 0
        pos = torch.arange(T + M, device=prompt.device)
        pos[T:] = -1
        self.layers: List[LayerCache] = []
        for block, h in zip(model.blocks, out.hidden_states):
            key, value = block.attn.project_key_value(block.ln_attn(h), pos)
            self.layers.append(LayerCache(h[:T], key[:T], value[:T], key[T:], value[T:]))
        self.length = T
        self.last_logits = out.logits[0, -1]


@torch.no_grad()
def extend(model: TMTModel, cache: TMTCache, ids: Tensor) -> Tensor:
    """Run the tokens ``ids`` (n,) that follow the cached ones; update ``cache``; return logits (n, V).

    At every layer the active new tokens find their mesh neighbours among the cached states of that
    layer plus the new tokens before them, attend over cached keys/values and the anchors, and may
    exit, exactly as in a full forward over the whole sequence (eval mode).
    """
    cfg, dev = model.config, ids.device
    n, T = ids.numel(), cache.length
    if T + n > cfg.max_seq_len:
        raise ValueError(f"sequence of length {T + n} exceeds max_seq_len={cfg.max_seq_len}")
    model._as_batch(ids.unsqueeze(0))  # same id checks as forward
    pos = torch.arange(T, T + n, device=dev)
    h = model.wte(ids) * model.embed_scale
    if model.wpe is not None:
        h = h + model.wpe(pos)
    freeze = cfg.use_exit
    exited = torch.zeros(n, dtype=torch.bool, device=dev)
    for i, (block, layer) in enumerate(zip(model.blocks, cache.layers)):
        active = (~exited).nonzero().view(-1) if freeze else torch.arange(n, device=dev)
        M = layer.anchor_key.size(0)
        x = block.ln_attn(h)
        key, value = block.attn.project_key_value(x, pos)
        keys = torch.cat([layer.key, key, layer.anchor_key])
        values = torch.cat([layer.value, value, layer.anchor_value])
        pos_src = torch.cat([torch.arange(T + n, device=dev), pos.new_full((M,), -1)])
        context = torch.cat([layer.state, h])
        if model.mesh is not None:
            src, dst = model.mesh(context, query_index=T + active)[0]
            dst = torch.searchsorted(T + active, dst)
        else:  # dense: every earlier token
            grid = torch.arange(T + n, device=dev)
            src, dst = (grid.unsqueeze(0) <= (T + active).unsqueeze(1)).nonzero().t().flip(0)
        slot = torch.arange(M, device=dev)
        a_src = (T + n + slot).repeat(active.numel())
        a_dst = torch.arange(active.numel(), device=dev).repeat_interleave(M)
        edge_index = torch.stack([torch.cat([src, a_src]), torch.cat([dst, a_dst])])
        query = block.attn.project_query(x[active], pos[active])
        attn, _ = block.attn.attend(query, keys, values, edge_index, (pos_src, pos[active]))
        out = h[active] + attn
        out = out + block.ffn(block.ln_ffn(out))
        cache.layers[i] = LayerCache(context, keys[:T + n], values[:T + n], layer.anchor_key, layer.anchor_value)
        h = h.index_copy(0, active, out)
        if block.exit_gate is not None and freeze:
            exited[active] |= block.exit_gate(out) > cfg.exit_threshold
    cache.length = T + n
    logits = model.lm_head(h)
    cache.last_logits = logits[-1]
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample one id from logits (V,): temperature, then top-k, then nucleus (top-p) filtering.
    ``temperature == 0`` picks the argmax."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: TMTModel, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Continue every row of ``idx`` (B, S) by ``max_new_tokens`` sampled tokens -> (B, S + new)."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be a (B, S) tensor of token ids, got shape {tuple(idx.shape)}")
    if idx.size(1) + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"prompt length {idx.size(1)} + {max_new_tokens} new tokens exceeds max_seq_len={model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        rows = []
        for prompt in idx:
            cache = TMTCache(model, prompt)
            new = []
            for _ in range(max_new_tokens):
                token = sample_next(cache.last_logits, temperature, top_k, top_p, generator)
                new.append(token)
                if len(new) < max_new_tokens:
                    extend(model, cache, token)
            rows.append(torch.cat([prompt] + new))
        return torch.stack(rows)
    finally:
        model.train(was_training)
