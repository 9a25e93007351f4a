"""MeshAttentionConv: multi-head attention over mesh edges with multiplicative temporal decay."""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MLP, MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj, OptTensor, PairTensor
from torch_geometric.utils import softmax

from .decay import TemporalDecay
from .rotary import apply_rotary
from .slot_attention import fused_slot_attention


def timeless_prior(t_j: Tensor, index: Tensor, size_i: Optional[int], dtype: torch.dtype) -> Tensor:
    """Logit offset of every edge ``j -> i`` (E,): ``log M_i`` on the edges from the ``M_i`` timeless
    sources (negative time: memory anchors) of target ``i``, 0 on the others, so that a target's
    anchors together start with the prior weight of one neighbour, not ``M_i`` neighbours'."""
    timeless = t_j < 0
    count = torch.zeros(size_i if size_i is not None else int(index.max()) + 1, dtype=dtype, device=index.device).index_add_(
        0, index, timeless.to(dtype))
    return torch.where(timeless, count[index].clamp(min=1).log(), 0.0)


class MeshAttentionConv(MessagePassing):
    r"""Multi-head dot-product attention over the edges of a (mesh) graph,

    .. math::
        \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}\big(\mathbf{q}_i^\top \mathbf{k}_j / \sqrt{d}\big),
        \qquad \mathbf{m}_i = \sum_{j \in \mathcal{N}(i)} \gamma_{ij}\,\alpha_{ij}\,\mathbf{v}_j

    with the temporal decay :math:`\gamma_{ij}` of :class:`TemporalDecay` applied *after* the
    softmax (order: softmax -> decay -> dropout), heads concatenated (or averaged) and an output
    projection. Nodes with a negative position are timeless (memory anchors): decay 1 on their
    edges, no rotary rotation, and the logits of the :math:`M_i` timeless sources of target
    :math:`i` are lowered by :math:`\log M_i`, so that its anchors together start with the prior
    weight of one neighbour. (Without it 16 anchors took half of every read at initialisation and,
    with the decay shrinking only the tokens' weights, the majority: multi-query associative recall
    of the default model fell to chance, see ``docs/results/recall_default.md``.)

    With ``coord_channels > 0`` every edge also encodes where its source lies relative to its
    target, as in Point Transformer (Zhao et al. 2021): :math:`\mathbf{r}_{ij} =
    \mathrm{MLP}(\mathbf{c}_j - \mathbf{c}_i)` of the node coordinates :math:`\mathbf{c}` (such as
    PyG's ``data.pos``) is added to every head's key and value, so the logit is
    :math:`\mathbf{q}_i^\top(\mathbf{k}_j + \mathbf{r}_{ij}) / \sqrt{d}` and the message
    :math:`\mathbf{v}_j + \mathbf{r}_{ij}`. The MLP's last layer starts at zero, so the layer starts as
    the one without coordinates and training adds the encoding as far as it helps (initialised at random,
    the point-cloud example's net with relative positions ended at training loss 1.18 against 1.05).

    Args:
        in_channels (int or tuple): size of each input sample, or ``(source, target)`` sizes.
        out_channels (int): size of each head's output.
        heads (int): number of attention heads.
        concat (bool): concatenate the heads (else average them).
        dropout (float): dropout on the attention weights.
        decay (bool): multiply the weights by the learned temporal decay (needs token positions
            ``pos``; off by default, as graphs have no token order).
        decay_rate (float): initial decay rate of every head.
        max_seq_len (int): normaliser of the temporal distance.
        rotary (bool): rotate queries and keys by their positions (RoPE, needs ``pos``).
        coord_channels (int): size of the node coordinates ``coord`` whose differences are encoded on
            every edge (e.g. 3 for PyG's ``data.pos`` of a point cloud; 0: off).
        bias (bool): learn additive biases in the projections.
        **kwargs: passed on to :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        input: ``x`` (N, F) or ``((N_src, F_src), (N_dst, F_dst))``, ``edge_index`` (2, E),
        ``pos`` (N,) token positions (integers; negative: timeless memory anchors) or a pair,
        read only by the decay and rotary; ``coord`` (N, coord_channels) node coordinates or a pair
        (point coordinates such as PyG's ``data.pos`` (N, 3) go here, or into ``x``).
        output: (N_dst, heads * out_channels) or (N_dst, out_channels); with ``return_attention_weights=True`` also
        ``(edge_index, alpha)``, ``alpha`` (E, heads) the weights actually used (``gamma * alpha``).
    """

    def __init__(self, in_channels: Union[int, Tuple[int, int]], out_channels: int, heads: int = 1,
                 concat: bool = True, dropout: float = 0.0, decay: bool = False, decay_rate: float = 2.0,
                 max_seq_len: int = 1024, rotary: bool = False, coord_channels: int = 0, bias: bool = True, **kwargs):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        if rotary and out_channels % 2:
            raise ValueError(f"rotary needs an even out_channels per head, got {out_channels}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.dropout, self.rotary, self.coord_channels = concat, dropout, rotary, coord_channels
        if isinstance(in_channels, int):
            in_channels = (in_channels, in_channels)
        self.lin_query = Linear(in_channels[1], heads * out_channels, bias=bias)
        self.lin_key = Linear(in_channels[0], heads * out_channels, bias=bias)
        self.lin_value = Linear(in_channels[0], heads * out_channels, bias=bias)
        width = heads * out_channels if concat else out_channels
        self.lin_out = Linear(width, width, bias=bias)
        # Point Transformer's position encoding: two layers, as wide as the heads together
        self.coord_nn = MLP([coord_channels, heads * out_channels, heads * out_channels], norm=None,
                            plain_last=True) if coord_channels else None
        self.decay = TemporalDecay(heads, decay_rate, max_seq_len) if decay else None
        self._alpha: OptTensor = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.lin_query, self.lin_key, self.lin_value, self.lin_out):
            lin.reset_parameters()
        if self.coord_nn is not None:  # the encoding starts at zero: the layer starts as the layer without coordinates
            self.coord_nn.reset_parameters()
            torch.nn.init.zeros_(self.coord_nn.lins[-1].weight)
            torch.nn.init.zeros_(self.coord_nn.lins[-1].bias)
        if self.decay is not None:
            self.decay.reset_parameters()

    def project_query(self, x: Tensor, pos: OptTensor) -> Tensor:
        """(N, F) -> rotated queries (N, H, C)."""
        query = self.lin_query(x).view(-1, self.heads, self.out_channels)
        return apply_rotary(query, pos) if self.rotary else query

    def project_key_value(self, x: Tensor, pos: OptTensor) -> Tuple[Tensor, Tensor]:
        """(N, F) -> rotated keys and values, each (N, H, C)."""
        key = self.lin_key(x).view(-1, self.heads, self.out_channels)
        value = self.lin_value(x).view(-1, self.heads, self.out_channels)
        return (apply_rotary(key, pos) if self.rotary else key), value

    def encode_relative(self, coord_src: Tensor, coord_dst: Tensor) -> Tensor:
        """Source coordinates (..., D) and their targets' (..., D) -> the term added to keys and values (..., H, C)."""
        return self.coord_nn(coord_src - coord_dst).unflatten(-1, (self.heads, self.out_channels))

    def combine_heads(self, out: Tensor) -> Tensor:
        """(N, H, C) messages summed per target -> (N, width) output."""
        out = out.reshape(out.size(0), self.heads * self.out_channels) if self.concat else out.mean(dim=1)
        return self.lin_out(out)

    def forward(self, x: Union[Tensor, PairTensor], edge_index: Adj,
                pos: Union[OptTensor, Tuple[OptTensor, OptTensor]] = None,
                coord: Union[OptTensor, Tuple[OptTensor, OptTensor]] = None,
                return_attention_weights: Optional[bool] = None):
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        pos_src, pos_dst = pos if isinstance(pos, (tuple, list)) else (pos, pos)
        coord = coord if isinstance(coord, (tuple, list)) else (coord, coord)
        self.check_input(x_src, x_dst, edge_index, pos_src, pos_dst, coord)
        key, value = self.project_key_value(x_src, pos_src)
        out, alpha = self.attend(self.project_query(x_dst, pos_dst), key, value, edge_index, (pos_src, pos_dst), coord)
        if return_attention_weights:
            return out, (edge_index, alpha)
        return out

    def check_input(self, x_src: Tensor, x_dst: Tensor, edge_index: Adj, pos_src: OptTensor, pos_dst: OptTensor,
                    coord: Tuple[OptTensor, OptTensor] = (None, None)) -> None:
        """One clear ValueError, naming the argument, for inputs that would fail deep inside or
        silently spread NaN (value checks are skipped under ``torch.compile``)."""
        if (self.rotary or self.decay is not None) and (pos_src is None or pos_dst is None):
            raise ValueError("MeshAttentionConv with decay or rotary needs node positions `pos`")
        self.check_coord(coord, (x_src.size(0), x_dst.size(0)))
        for name, t in (("edge_index", edge_index), ("pos", pos_src), ("pos", pos_dst), *(("coord", c) for c in coord)):
            if isinstance(t, Tensor) and t.device != x_dst.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x_dst.device}")
        for p, nodes in ((pos_src, x_src.size(0)), (pos_dst, x_dst.size(0))):
            if p is not None and (p.dim() != 1 or p.numel() != nodes):
                raise ValueError(f"pos must hold one token position per node, shape ({nodes},), got {tuple(p.shape)}: "
                                 "it is read as positions in a sequence by the decay and rotary; point coordinates "
                                 "(PyG's data.pos) go to `coord` (with coord_channels) or into x")
        if not torch.compiler.is_compiling():
            named = [("x", t) for t in ((x_src,) if x_src is x_dst else (x_src, x_dst))]
            for name, t in named:
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} holds NaN or Inf values ({int((~torch.isfinite(t)).any(-1).sum())} rows): "
                                     "attention would spread them to every neighbour")

    def check_coord(self, coord: Tuple[OptTensor, OptTensor], nodes: Tuple[int, int], layer: str = "MeshAttentionConv") -> None:
        """A ValueError for (source, target) coordinates that do not match ``coord_channels`` and the
        ``nodes`` (source, target) counts, or that hold NaN or Inf; the message names ``layer`` (the one called)."""
        if not self.coord_channels:
            if any(c is not None for c in coord):
                raise ValueError("`coord` given, but the layer encodes no coordinates: build it with coord_channels=D")
            return
        for c, n in zip(coord, nodes):
            if c is None or c.shape != (n, self.coord_channels):
                raise ValueError(f"{layer}(coord_channels={self.coord_channels}) needs node coordinates "
                                 f"`coord` of shape ({n}, {self.coord_channels}), got {None if c is None else tuple(c.shape)}")
        if not torch.compiler.is_compiling():
            for c in dict.fromkeys(coord):
                if not bool(torch.isfinite(c).all()):
                    raise ValueError(f"coord holds NaN or Inf values ({int((~torch.isfinite(c)).any(-1).sum())} rows): "
                                     "attention would spread them to every neighbour")

    def attend(self, query: Tensor, key: Tensor, value: Tensor, edge_index: Adj,
               pos: Tuple[OptTensor, OptTensor], coord: Tuple[OptTensor, OptTensor] = (None, None)) -> Tuple[Tensor, Tensor]:
        """Attention from projected ``query`` (N_dst, H, C) over ``key``/``value`` (N_src, H, C),
        e.g. cached ones during generation; ``coord`` (source, target) node coordinates where the layer
        encodes them. Returns the output (N_dst, width) and alpha (E, H)."""
        width = self.heads * self.out_channels  # 2-D rows: gathering (N, H*C) is ~3x faster than (N, H, C) on CPU
        out = self.propagate(edge_index, query=query.reshape(-1, width), key=key.reshape(-1, width),
                             value=value.reshape(-1, width), t=pos, coord=tuple(coord), size=(key.size(0), query.size(0)))
        alpha, self._alpha = self._alpha, None
        return self.combine_heads(out.view(-1, self.heads, self.out_channels)), alpha

    def attend_slots(self, query: Tensor, key: Tensor, value: Tensor, slot_index: Tensor, slot_valid: Tensor,
                     pos: Tuple[OptTensor, OptTensor], memory: Optional[Tuple[Tensor, Tensor]] = None,
                     memory_slots: int = 0, coord: Tuple[OptTensor, OptTensor] = (None, None)) -> Tuple[Tensor, Tensor]:
        """Fast path over a fixed-degree neighbour table (e.g. :meth:`DynamicMesh.slots`): the same
        attention as :meth:`attend` over the edges ``slot_index[r, s] -> r`` of the valid slots.

        ``query`` (A, H, C) of the targets, ``key``/``value`` (N_src, H, C), ``slot_index`` and
        ``slot_valid`` (A, S), ``pos = (pos_src (N_src,), pos_dst (A,))``. ``memory``: keys and
        values (M, H, C) every target also reads (memory anchors: timeless, decay 1), joined to the
        slots in one softmax. ``memory_slots = m``: the last ``m`` slots of every row point at memory
        rows of its own (the anchors of its graph, timeless in ``pos_src``), which together, as the
        anchor edges of :meth:`attend`, have one neighbour's prior. Returns the output (A, width) and
        alpha (A, S + M, H). ``coord = (coord_src (N_src, D), coord_dst (A, D))`` where the layer encodes
        coordinates (the memory rows have none).
        """
        pos_src, pos_dst = pos
        decay = self.decay
        relative = None
        if self.coord_nn is not None:
            relative = self.encode_relative(coord[0][slot_index], coord[1].unsqueeze(1))  # (A, S, H, C)
        out, alpha = fused_slot_attention(query, key, value, slot_index, slot_valid, *(memory or (None, None)),
                                          None if decay is None else decay.decay_scalars, pos_dst, pos_src,
                                          1 if decay is None else decay.max_seq_len, memory_slots, self.dropout,
                                          self.training, relative)
        return self.combine_heads(out), alpha

    def message(self, query_i: Tensor, key_j: Tensor, value_j: Tensor, t_i: OptTensor, t_j: OptTensor,
                coord_i: OptTensor, coord_j: OptTensor, index: Tensor, ptr: OptTensor, size_i: Optional[int]) -> Tensor:
        query_i, key_j, value_j = (t.view(-1, self.heads, self.out_channels) for t in (query_i, key_j, value_j))
        if self.coord_nn is not None:
            relative = self.encode_relative(coord_j, coord_i)  # (E, H, C)
            key_j, value_j = key_j + relative, value_j + relative
        alpha = (query_i * key_j).sum(dim=-1) / math.sqrt(self.out_channels)  # (E, H)
        if t_j is not None:  # a target's timeless sources (anchors) together: one neighbour's prior
            alpha = alpha - timeless_prior(t_j, index, size_i, alpha.dtype).unsqueeze(-1)
        alpha = softmax(alpha, index, ptr, size_i)
        if self.decay is not None:
            alpha = alpha * self.decay(t_i, t_j)
        self._alpha = alpha
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        return (value_j * alpha.unsqueeze(-1)).view(-1, self.heads * self.out_channels)  # (E, H*C)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads}, "
                f"decay={self.decay is not None}, rotary={self.rotary}"
                + (f", coord_channels={self.coord_channels})" if self.coord_channels else ")"))
