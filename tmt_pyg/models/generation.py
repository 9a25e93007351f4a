"""Batched incremental decoding with preallocated per-layer caches: each new token meets the cached
states of its layer, exactly as in a full forward over the whole sequence."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Protocol, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import TokenInput, check_ids, pack_tokens
from ..layers.attention import MeshAttentionConv
from ..layers.ffn import PackedStreams, dual_stream
from ..layers.mesh import DynamicMesh, top_slots, window_slots
from ..layers.rotary import apply_rotary
from ..layers.slot_attention import CPU_OPTIONS, RECOMPILE_LIMIT, compile_enabled
from ..layers.routed_search import as_blocks, block_summaries, routed_knn
from .config import TMTConfig
from .layer import head_units


class Decoder(Protocol):
    """What decoding reads of a :class:`~tmt_pyg.models.TMTModel` (a structural type: the model's
    module imports this one, so this one does not import it)."""
    config: TMTConfig
    mesh: Optional[DynamicMesh]
    blocks: nn.ModuleList
    wte: nn.Embedding
    wpe: Optional[nn.Embedding]
    embed_scale: float
    training: bool

    def __call__(self, tokens, output_hidden_states: bool = False): ...

    def lm_head(self, h: Tensor) -> Tensor: ...

    def eval(self): ...

    def train(self, mode: bool = True): ...


class Step(NamedTuple):
    """What every layer of one decoding step knows about its T = B * n new tokens."""
    pos: Tensor  # (T,) positions
    flat: Tensor  # (T,) rows in the (B * capacity) flattened caches
    start: Tensor  # (T,) flattened cache row of position 0 of every token's row
    rotation: Optional[Tuple[Tensor, Tensor]]  # rotary tables at pos (T, 1, C)
    slots: Optional[Tuple[Optional[Tensor], Tensor, Tensor]]  # mesh: where the kNN may look (T, end), then the
    # window and self slots as cache rows and their validity (T, w + 1); dense: None, every row up to end, validity
    mask: Optional[Tensor]  # (B, 1, n, end) what the fused dense attention reads (None: all up to end)
    source_pos: Tensor  # (B * capacity,) position of every cache row
    end: int  # longest row after the step


@dataclass
class LayerCache:
    state: Tensor  # (B, capacity, D) input states of this layer (exited tokens frozen)
    unit: Optional[Tensor]  # (B, capacity, D') what the mesh search compares (mesh_unit of the states or keys); None without a mesh
    key: Tensor  # (B, capacity, H, C) their keys
    value: Tensor  # (B, capacity, H, C) their values
    memory: Optional[Tuple[Tensor, Tensor]]  # keys and values (M, H, C) of the memory anchors at this layer
    qkv: Tuple[Tensor, Optional[Tensor]]  # the layer's query, key and value projections as one weight (3 H C, D) and bias
    ffn: Optional[PackedStreams]  # the dual-stream FFN's weights packed for :func:`dual_stream` (None: a plain MLP)
    summary: Optional[Tensor] = None  # (B, capacity / route_block, D') mean unit row of every block (routed search)


class TMTCache:
    """Per-layer caches of a batch of causal sequences, filled by one full forward over the prompts.

    ``prompts``: a ``(B, S)`` tensor or a list of 1-D tensors of different lengths. Room for
    ``capacity`` tokens per row is allocated once (default: ``max_seq_len``); decoding writes into it.
    The projection weights are packed once here: do not change the model while decoding with a cache.
    """

    def __init__(self, model: Decoder, prompts: TokenInput, capacity: Optional[int] = None):
        cfg = model.config
        if not cfg.causal:
            raise ValueError("incremental decoding needs a causal model (config.causal=True)")
        if isinstance(prompts, Tensor) and prompts.dim() == 1:
            raise ValueError(f"prompts must be a (B, S) tensor or a list of 1-D tensors, got shape {tuple(prompts.shape)}")
        data = pack_tokens(prompts)
        out = model(data, output_hidden_states=True)
        N, B = data.num_nodes, int(data.num_graphs)
        self.capacity = capacity or cfg.max_seq_len
        routed = model.mesh is not None and model.mesh.search == "routed"
        if routed:  # whole blocks, so that the routed search views the caches as blocks without a copy
            self.capacity = -(-self.capacity // model.mesh.route_block) * model.mesh.route_block
        self.lengths = torch.bincount(data.batch, minlength=B)  # (B,) tokens cached per row
        if max(self.host_lengths) > self.capacity:
            raise ValueError(f"prompt of length {max(self.host_lengths)} exceeds the cache capacity {self.capacity}")
        node_pos = torch.cat([data.pos, data.pos.new_full((out.hidden_states[0].size(0) - N,), -1)])
        self.layers: List[LayerCache] = []
        for block, h in zip(model.blocks, out.hidden_states):
            key, value = block.attn.project_key_value(block.ln_attn(h), node_pos)
            lins = (block.attn.lin_query, block.attn.lin_key, block.attn.lin_value)
            qkv = (torch.cat([lin.weight for lin in lins]), None if lins[0].bias is None else torch.cat([lin.bias for lin in lins]))
            new = lambda rows: None if rows is None else rows.new_zeros((B, self.capacity) + rows.shape[1:])
            unit = None if model.mesh is None else mesh_unit(model, h, key)
            ffn = block.ffn.packed() if cfg.dual_stream else None
            layer = LayerCache(new(h), new(unit), new(key), new(value), (key[N:], value[N:]) if h.size(0) > N else None, qkv, ffn)
            for cached, rows in ((layer.state, h), (layer.unit, unit), (layer.key, key), (layer.value, value)):
                if cached is not None:
                    cached[data.batch, data.pos] = rows[:N]
            if routed:
                layer.summary = block_summaries(layer.unit, model.mesh.route_block)
            self.layers.append(layer)
        last = data.ptr[1:] - 1
        self.last_logits = out.logits[last]  # (B, V)
        self.positions = torch.arange(self.capacity, device=h.device)
        self.source_pos = self.positions.repeat(B)  # position of every cache row
        self.rotation = rotation_table(block.attn, self.positions) if cfg.rope else None

    def step(self, model: Decoder, n: int, static: bool = False) -> Step:
        """The :class:`Step` of ``n`` new tokens per row, built once for all layers. ``static``: over the
        whole capacity, with positions from the device lengths only (shapes that do not change from one
        step to the next, for the compiled step)."""
        B, cap = self.lengths.numel(), self.capacity
        end = cap if static else max(self.host_lengths) + n
        known = self.positions[:end]
        equal = not static and min(self.host_lengths) == end - n  # rows of one length: positions without index arithmetic
        pos = known[end - n:].repeat(B) if equal else (self.lengths.unsqueeze(1) + self.positions[:n]).view(-1)  # (B * n,)
        flat = (torch.arange(0, B * cap, cap, device=pos.device).unsqueeze(1) + pos.view(B, n)).view(-1)
        rotation = None if self.rotation is None else tuple(t.index_select(0, pos) for t in self.rotation)
        start = flat - pos
        slots = mask = None
        fused = fused_attention(model, self.layers[0])
        if model.mesh is not None:  # the kNN looks before the window; window and self slots as cache rows
            window, in_window = window_slots(flat, pos, model.mesh.window)
            slots = (known < (pos - model.mesh.window).unsqueeze(1), torch.cat([window.clamp(min=0), flat.unsqueeze(1)], 1),
                     torch.cat([in_window, in_window.new_ones(B * n, 1)], 1))
        elif not fused or model.config.use_exit:  # dense slots (once a token exits, for the rows still running)
            slots = (None, start.unsqueeze(1) + known, known <= pos.unsqueeze(1))
        if fused and not (equal and n == 1):  # one new token per row of equal rows reads everything up to end
            mask = (known <= pos.unsqueeze(1)).view(B, 1, n, end)
        return Step(pos, flat, start, rotation, slots, mask, self.source_pos, end)

    @property
    def lengths(self) -> Tensor:
        """(B,) tokens cached per row; also kept on the host (``host_lengths``), refreshed when set."""
        return self._lengths

    @lengths.setter
    def lengths(self, value: Tensor) -> None:
        self._lengths, self.host_lengths = value, value.tolist()


def rotation_table(conv: MeshAttentionConv, positions: Tensor) -> Tuple[Tensor, Tensor]:
    """``(cos, sin)`` (P, 1, C) such that ``x * cos + x.roll(C / 2, -1) * sin`` is :func:`apply_rotary`
    at ``positions`` (P,), bit for bit: rotating ``[1, .., 1, 0, .., 0]`` reads its cosines and sines."""
    C = conv.out_channels
    basis = torch.cat([torch.ones(C // 2), torch.zeros(C // 2)]).to(positions.device).expand(positions.numel(), 1, C)
    cos, sin = apply_rotary(basis, positions).chunk(2, -1)
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def mesh_unit(model: Decoder, state: Tensor, heads: Tensor) -> Tensor:
    """Rows the mesh compares, ranked as :meth:`DynamicMesh.slots` ranks them: the unit states (n, D),
    or for the attention-similarity mesh the queries/keys ``heads`` (n, H, C) with every head a unit
    vector, the first ``search_heads`` heads (their products are that many times the cosines the full
    forward ranks by: the same order)."""
    cfg = model.config
    return F.normalize(state, dim=-1) if cfg.mesh_similarity == "state" else head_units(heads, cfg.search_heads)


def cached_neighbours(model: Decoder, unit: Tensor, query_unit: Tensor, row: Optional[Tensor], pos: Tensor,
                      allowed: Tensor, summary: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The mesh search of new tokens against their rows' caches: the ``k`` most similar allowed
    positions of each query's row (the routed search: among its routed blocks). ``unit``
    (B, capacity, D) the layer's cached unit rows, ``query_unit`` (A, D), ``row`` (A,) the row of
    every query (None: every new token of every row is a query, rows in order), ``pos`` (A,) their
    positions, ``allowed`` (A, end) the candidate positions, ``summary`` the cached block means (routed
    search). Returns positions and validity (A, k)."""
    mesh = model.mesh
    if mesh.search == "routed":  # summaries kept by the cache: per token O(S / block + routed keys), not O(S)
        row = torch.arange(unit.size(0), device=pos.device).repeat_interleave(pos.numel() // unit.size(0)) if row is None else row
        return routed_knn(as_blocks(unit, mesh.route_block), query_unit, row, pos, mesh.k, mesh.route_top, mesh.window,
                          summaries=summary)
    cached = unit[:, :allowed.size(1)]  # (B, end, D)
    if row is None:
        sim = torch.bmm(query_unit.view(unit.size(0), -1, unit.size(2)), cached.transpose(1, 2)).flatten(0, 1)
    else:
        sim = torch.einsum("ad,ald->al", query_unit, cached[row])
    return top_slots(sim, allowed, model.mesh.k)


def fused_attention(model: Decoder, layer: LayerCache) -> bool:
    """Whether the layer's attention is plain softmax attention over the cache (no mesh, decay or
    anchors), which fused ``scaled_dot_product_attention`` computes while no token has exited."""
    return model.mesh is None and model.blocks[0].attn.decay is None and layer.memory is None


def decode_layer(model: Decoder, block: nn.Module, layer: LayerCache, h: Tensor, step: Step,
                 active: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """One layer of a decoding step: cache the new tokens' states, keys and values; the ``active``
    ones (None: all) search, attend and run the block. Returns the states (T, D) and which active
    tokens exit here (None: no gate)."""
    conv = block.attn
    H, C = conv.heads, conv.out_channels
    qkv = F.linear(block.ln_attn(h), *layer.qkv).view(-1, 3 * H, C)
    qk = qkv[:, :2 * H] if step.rotation is None else qkv[:, :2 * H] * step.rotation[0] + qkv[:, :2 * H].roll(C // 2, -1) * step.rotation[1]
    query, key, value = qk[:, :H], qk[:, H:], qkv[:, 2 * H:]
    writes = [(layer.state, h), (layer.key, key), (layer.value, value)]
    if layer.unit is not None:
        writes.append((layer.unit, mesh_unit(model, h, key)))
    for cached, rows in writes:
        cached.flatten(0, 1).index_copy_(0, step.flat, rows)
    if layer.summary is not None:  # the blocks the new tokens fall in get their means again (complete ones are read)
        size, D = model.mesh.route_block, layer.unit.size(2)
        blocks = torch.div(step.flat, size, rounding_mode="floor")  # capacity is whole blocks: row * blocks + block
        layer.summary.view(-1, D).index_copy_(0, blocks, as_blocks(layer.unit, size).flatten(0, 1).index_select(0, blocks).mean(1))
    if active is not None and active.numel() == 0:  # every token exited: its frozen state only feeds the caches
        return h, None
    if active is None and fused_attention(model, layer):
        B = layer.key.size(0)
        q = query.reshape(B, -1, H, C).transpose(1, 2)
        k, v = layer.key[:, :step.end].transpose(1, 2), layer.value[:, :step.end].transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, dropout_p=conv.dropout if conv.training else 0.0)
        attn = conv.combine_heads(attn.transpose(1, 2).reshape(-1, H, C))
    else:
        select = (lambda t: t) if active is None else (lambda t: None if t is None else t[active])
        rows, pos, query, start = select(h), select(step.pos), select(query), select(step.start)
        allowed, index, valid = (select(s) for s in step.slots)
        if model.mesh is not None:
            row = None if active is None else torch.div(start, layer.key.size(1), rounding_mode="floor")
            near, near_valid = cached_neighbours(model, layer.unit, mesh_unit(model, rows, query), row, pos, allowed, layer.summary)
            index = torch.cat([near + start.unsqueeze(1), index], 1)
            valid = torch.cat([near_valid, valid], 1)
        attn, _ = conv.attend_slots(query, layer.key.flatten(0, 1), layer.value.flatten(0, 1), index, valid,
                                    (step.source_pos, pos), layer.memory)
    out = residual(block, layer, h if active is None else h[active], attn)
    fired = None if block.exit_gate is None or not model.config.use_exit else block.exit_gate(out) > model.config.exit_threshold
    return (out if active is None else h.index_copy(0, active, out)), fired


def residual(block: nn.Module, layer: LayerCache, h: Tensor, attn: Tensor) -> Tensor:
    """:meth:`TMTLayer.residual` in eval mode, the dual-stream FFN over the weights the cache packed."""
    if block.training or layer.ffn is None:
        return block.residual(h, attn)
    out = h + attn
    return out + dual_stream(block.ln_ffn(out), *layer.ffn)


def static_extend(model: Decoder, cache: TMTCache, ids: Tensor, num_layers: Optional[int] = None) -> Tensor:
    """:func:`extend` with shapes that stay the same from step to step, so that it compiles into one
    graph: the new tokens ``ids`` (B, n) read the whole cache capacity under masks, and exited tokens
    are frozen by keeping their state rather than by selecting the running rows (the same states,
    caches and logits). ``num_layers``: the first layers only (a draft). Returns logits (B, n, V); the
    caller advances the lengths."""
    B, n = ids.shape
    step = cache.step(model, n, static=True)
    h = model.wte(ids.reshape(-1)) * model.embed_scale
    if model.wpe is not None:
        h = h + model.wpe(step.pos)
    frozen = None
    for block, layer in zip(model.blocks[:num_layers], cache.layers[:num_layers]):
        out, fired = decode_layer(model, block, layer, h, step, None)
        h = out if frozen is None else torch.where(frozen.unsqueeze(1), h, out)
        if fired is not None:
            frozen = fired if frozen is None else frozen | fired
    return model.lm_head(h).view(B, n, -1)


_compiled_extend = []  # torch.compile(static_extend), made on first use


def compiled_extend(model: Decoder, cache: TMTCache, ids: Tensor, num_layers: Optional[int] = None) -> Tensor:
    """:func:`static_extend`, compiled (one graph per model, batch, new tokens per step, capacity and
    ``num_layers``; the first step of each pays the compile) where compiling is on, else eager."""
    if not compile_enabled():
        return static_extend(model, cache, ids, num_layers)
    if not _compiled_extend:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compiled_extend.append(torch.compile(static_extend, dynamic=False,
                                              options=CPU_OPTIONS if ids.device.type == "cpu" else None))
    return _compiled_extend[0](model, cache, ids, num_layers)


@torch.no_grad()
def extend(model: Decoder, cache: TMTCache, ids: Tensor, num_layers: Optional[int] = None, compiled: bool = False) -> Tensor:
    """Run ``ids`` (B, n), the next ``n`` tokens of every cached row; update ``cache``; return logits (B, n, V).
    ``num_layers``: only the first layers, their output through the final norm and head (a draft;
    the later layers' caches are left behind for the full model to rewrite).

    At every layer the active new tokens find their mesh neighbours among their row's cached states
    of that layer plus the new tokens before them, attend over the cached keys/values and the
    anchors, and may exit, exactly as in a full forward over the whole sequence (eval mode). Until a
    token exits, every layer runs on all new tokens without selecting rows, and the vanilla model
    attends with fused ``scaled_dot_product_attention`` over the cache. ``compiled``: the step as one
    compiled graph (:func:`compiled_extend`).
    """
    cfg = model.config
    B, n = ids.shape
    if B != len(cache.host_lengths):
        raise ValueError(f"ids has {B} rows but the cache holds {len(cache.host_lengths)}")
    end = max(cache.host_lengths) + n
    if end > min(cache.capacity, cfg.max_seq_len):
        raise ValueError(f"sequence of length {end} exceeds max_seq_len={cfg.max_seq_len} or the cache capacity {cache.capacity}")
    check_ids(ids, cfg.vocab_size)  # same id checks as forward
    if compiled:
        logits = compiled_extend(model, cache, ids, num_layers)
        cache.lengths = cache.lengths + n
        cache.last_logits = logits[:, -1]
        return logits
    step = cache.step(model, n)
    h = model.wte(ids.reshape(-1)) * model.embed_scale
    if model.wpe is not None:
        h = h + model.wpe(step.pos)
    active = None  # the tokens still running (None: all of them)
    for block, layer in zip(model.blocks[:num_layers], cache.layers[:num_layers]):
        h, fired = decode_layer(model, block, layer, h, step, active)
        if fired is not None and (active is not None or bool(fired.any())):  # from the first exit on, select the rows still running
            active = (~fired).nonzero().view(-1) if active is None else active[~fired]
    cache.lengths = cache.lengths + n
    logits = model.lm_head(h).view(B, n, -1)
    cache.last_logits = logits[:, -1]
    return logits


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """The sampling distribution (..., V) of logits (..., V): temperature, then top-k, then nucleus
    (top-p) filtering."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample one id per row from logits (..., V) by :func:`filtered_probs`; ``temperature == 0``
    picks the argmax. Returns (..., 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs.view(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1] + (1,))


def check_generate_args(model: Decoder, idx: TokenInput, max_new_tokens: int) -> Tuple[TokenInput, bool, int]:
    """The prompts of ``idx`` (a (B, S) tensor or a list of 1-D prompts), whether they are a list,
    and the longest prompt's length; raises on a bad shape or a too long generation."""
    ragged = not isinstance(idx, Tensor)
    if not ragged and idx.dim() != 2:
        raise ValueError(f"idx must be a (B, S) tensor of token ids, got shape {tuple(idx.shape)}")
    prompts = list(idx) if ragged else idx
    longest = max(p.numel() for p in prompts) if ragged else idx.size(1)
    if longest + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"prompt length {longest} + {max_new_tokens} new tokens exceeds max_seq_len={model.config.max_seq_len}")
    return prompts, ragged, longest


@torch.no_grad()
def generate(model: Decoder, idx: TokenInput, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             compiled: bool = False) -> Union[Tensor, List[Tensor]]:
    """Continue every prompt by ``max_new_tokens`` sampled tokens, all rows decoded together.

    ``idx``: a (B, S) tensor -> (B, S + new); or a list of 1-D prompts of any lengths -> a list.
    ``compiled``: every step one compiled graph (:func:`compiled_extend`): the same tokens, less
    per-step overhead once compiled (the first call per batch size and length compiles, about a minute).
    """
    prompts, ragged, longest = check_generate_args(model, idx, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        cache = TMTCache(model, prompts, capacity=longest + max_new_tokens - 1)
        new = []
        for step in range(max_new_tokens):
            token = sample_next(cache.last_logits, temperature, top_k, top_p, generator)  # (B, 1)
            new.append(token)
            if step + 1 < max_new_tokens:
                extend(model, cache, token, compiled=compiled)
        new = torch.cat(new, 1) if new else idx.new_zeros(len(prompts), 0) if not ragged else prompts[0].new_zeros(len(prompts), 0)
        if ragged:
            return [torch.cat([p, t]) for p, t in zip(prompts, new)]
        return torch.cat([idx, new], 1)
    finally:
        model.train(was_training)
