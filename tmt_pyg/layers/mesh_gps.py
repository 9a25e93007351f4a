"""MeshGPSConv: a GPS graph-transformer layer whose global attention runs over the kNN mesh."""
import inspect
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Dropout, Linear, Sequential
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.inits import reset
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver
from torch_geometric.typing import Adj, OptTensor

from .attention import MeshAttentionConv
from .mesh import DynamicMesh


class MeshGPSConv(torch.nn.Module):
    r"""The GPS layer of `"Recipe for a General, Powerful, Scalable Graph Transformer"
    <https://arxiv.org/abs/2205.12454>`_ (PyG's :class:`~torch_geometric.nn.conv.GPSConv`) with its
    dense global attention replaced by :class:`MeshAttentionConv` over the bidirectional kNN mesh
    (:class:`DynamicMesh`, ``causal=False``) of the current node states:

    .. math::
        \mathbf{h}^{\mathrm{loc}} = \mathrm{norm}_1(\mathbf{x} + \mathrm{conv}(\mathbf{x}, \mathcal{E})),
        \quad \mathbf{h}^{\mathrm{glob}} = \mathrm{norm}_2(\mathbf{x} + \mathrm{MeshAttn}(\mathbf{x}, \mathrm{mesh}_k(\mathbf{x}))),
        \quad \mathbf{h} = \mathbf{h}^{\mathrm{loc}} + \mathbf{h}^{\mathrm{glob}},
        \quad \mathbf{out} = \mathrm{norm}_3(\mathbf{h} + \mathrm{MLP}(\mathbf{h}))

    Every node attends to its ``k`` most cosine-similar nodes of its own graph (and itself), so the
    attention holds ``N * (k + 1)`` weights instead of ``sum_g N_g^2``: its time and memory are linear
    in the nodes. The mesh is a fixed-degree table (:meth:`DynamicMesh.slots`, ``k`` neighbours and
    the self slot; a graph of fewer than ``k + 1`` nodes leaves slots invalid), read by
    :meth:`MeshAttentionConv.attend_slots`, the fused op of the language model (compiled, with its
    eager reference as fallback); it equals ``self.attn(x, edge_index)`` over the mesh's edges.
    Graphs of up to ``exact_max_nodes`` nodes are searched exactly (the dense backend scores a
    block of nodes against its whole graph: ``O(N_g^2 d)`` time, ``O(block_size * N_g)`` memory,
    checked against the memory available; torch-cluster's KD-tree serves low-dimensional states),
    larger ones by random projection trees (``search="tree"``, :mod:`.approx_search`: ``O(N_g log N_g)``,
    approximate) unless ``search="exact"``.

    Args:
        channels (int): size of each node state (input = output).
        conv (MessagePassing, optional): the local message-passing layer, called as
            ``conv(x, edge_index, **kwargs)`` (None: global attention and MLP only).
        heads (int): attention heads (must divide ``channels``).
        k (int): mesh neighbours per node.
        dropout (float): dropout of the conv, attention and MLP outputs.
        attn_dropout (float): dropout on the attention weights.
        act (str or Callable): activation of the MLP.
        act_kwargs (dict, optional): arguments of ``act``.
        norm (str or Callable, optional): normalisation after each residual (``"batch_norm"``,
            ``"layer_norm"``, ..., or None).
        norm_kwargs (dict, optional): arguments of ``norm``.
        mesh_backend (str): :class:`DynamicMesh` backend (``"auto"``, ``"dense"``, ``"cluster"``).
        search (str): ``"tree"`` (graphs above ``exact_max_nodes`` approximately) or ``"exact"``.
        exact_max_nodes (int): largest graph searched exactly by ``search="tree"``.
        trees (int): projection trees of the tree search (more: higher neighbour recall, proportionally more time).
        coord_channels (int): size of node coordinates ``coord`` (such as ``data.pos``) whose differences
            :class:`MeshAttentionConv` encodes on every mesh edge (0: none).

    Shapes:
        input: ``x`` (N, channels), ``edge_index`` (2, E) or any ``Adj`` the conv takes,
        ``batch`` (N,) sorted (None: one graph), ``coord`` (N, coord_channels) where the layer encodes
        coordinates (the mesh is searched on ``x``, not on them). output: (N, channels); with
        ``return_attention_weights=True`` also the mesh as ``(edge_index (2, E), alpha (E, heads))``.
    """

    def __init__(self, channels: int, conv: Optional[MessagePassing], heads: int = 1, k: int = 16,
                 dropout: float = 0.0, attn_dropout: float = 0.0, act: str = "relu",
                 act_kwargs: Optional[Dict[str, Any]] = None, norm: Optional[str] = "batch_norm",
                 norm_kwargs: Optional[Dict[str, Any]] = None, mesh_backend: str = "auto", search: str = "tree",
                 exact_max_nodes: int = 4096, trees: int = 4, coord_channels: int = 0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads ({heads}) must divide channels ({channels})")
        self.channels, self.conv, self.heads, self.k, self.dropout = channels, conv, heads, k, dropout
        self.mesh = DynamicMesh(k, causal=False, backend=mesh_backend, search=search, exact_max_nodes=exact_max_nodes,
                                trees=trees)
        self.attn = MeshAttentionConv(channels, channels // heads, heads=heads, dropout=attn_dropout, decay=False,
                                      coord_channels=coord_channels)
        self.mlp = Sequential(
            Linear(channels, 2 * channels),
            activation_resolver(act, **(act_kwargs or {})),
            Dropout(dropout),
            Linear(2 * channels, channels),
            Dropout(dropout),
        )
        norm_kwargs = norm_kwargs or {}
        self.norm1 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm2 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm3 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm_with_batch = self.norm1 is not None and "batch" in inspect.signature(self.norm1.forward).parameters
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.conv is not None:
            self.conv.reset_parameters()
        self.attn.reset_parameters()
        reset(self.mlp)
        for norm in (self.norm1, self.norm2, self.norm3):
            if norm is not None:
                norm.reset_parameters()

    def normalize(self, norm: Optional[torch.nn.Module], h: Tensor, batch: OptTensor) -> Tensor:
        if norm is None:
            return h
        return norm(h, batch=batch) if self.norm_with_batch else norm(h)

    def forward(self, x: Tensor, edge_index: Adj, batch: OptTensor = None,
                return_attention_weights: Optional[bool] = None, coord: OptTensor = None, **kwargs):
        attn = self.attn
        attn.check_coord((coord, coord), (x.size(0), x.size(0)), layer=type(self).__name__)
        with torch.no_grad():  # the search is not differentiated; without autograd its top-k ranks fewer columns
            mesh = self.mesh.checked_slots(x, batch)  # the kNN mesh of the current states
        key, value = attn.project_key_value(x, None)
        h, alpha = attn.attend_slots(attn.project_query(x, None), key, value, mesh.index, mesh.valid, (None, None),
                                     coord=(coord, coord))
        h = F.dropout(h, p=self.dropout, training=self.training)
        out = self.normalize(self.norm2, h + x, batch)
        if self.conv is not None:  # local message passing on the input graph
            h = F.dropout(self.conv(x, edge_index, **kwargs), p=self.dropout, training=self.training)
            out = out + self.normalize(self.norm1, h + x, batch)
        out = self.normalize(self.norm3, out + self.mlp(out), batch)
        if return_attention_weights:
            return out, (mesh.edges()[0], alpha[mesh.valid])  # (2, E), (E, heads)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, conv={self.conv}, heads={self.heads}, k={self.k})"
