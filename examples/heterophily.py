"""Heterophilous node classification (Platonov et al., ICLR 2023): Minesweeper, Tolokers (ROC-AUC) and
Chameleon-filtered (accuracy) on their 10 given splits, mesh nets next to the paper's PyG baselines.

Every model is the paper's architecture: linear encoder -> ``layers`` residual blocks
``x + FFN([LayerNorm(x) || neighbourhood(LayerNorm(x))])`` (the "sep" design: the node's own state
kept apart from what it reads) -> LayerNorm -> linear head. The blocks differ only in how they read
the neighbourhood:

* ``gcn``, ``sage``, ``gat``: PyG's GCNConv, SAGEConv (mean, no root weight), GATConv (no self loops);
* ``gps``: PyG's GPSConv (SAGEConv local + Performer global attention, LayerNorm) in place of the block;
* ``mesh_gps``: the same with MeshGPSConv (its global attention over the kNN mesh of the node states), searched
  exactly or, with ``--mesh-search tree``, by projection trees (then the run records the trees' neighbour recall);
* ``mesh``: MeshAttentionConv over the given edges ∪ a kNN mesh;
* ``mesh_sep``: two MeshAttentionConvs, one over the given edges and one over the kNN mesh alone;
* ``mesh_gate``: ``mesh_sep`` with the mesh channel times a learned scalar gate that starts at 0, so the
  net starts as ``attn`` and opens the mesh only as far as training finds it useful;
* ``attn``: one MeshAttentionConv over the given edges alone (the graph channel of the two above, the
  control that says what the mesh adds);
* ``gat_mesh``, ``gcn_mesh``: ``gat`` / ``gcn`` plus the gated mesh channel (the mesh added to a PyG net, starting as
  that net; under ``--recipe luo`` ``gcn_mesh`` is Luo et al.'s tuned GCN with the gated mesh read added in every
  layer after the first: the mesh as the global branch of the tuned GNN);
* ``sgformer``, ``polynormer``: PyG's own global-attention models (``torch_geometric.nn.models``), whole, run
  on the one graph (Polynormer: local attention alone for ``local_epochs``, then its global attention too).

``--recipe luo`` (default ``platonov``: every model at the flags' values) trains GCN, SAGE and GAT the way
Luo et al. (NeurIPS 2024, "Classic GNNs are strong baselines") tuned them: ``layers`` x [conv(h) + Linear(h)
-> BatchNorm/LayerNorm -> ReLU -> dropout] -> linear head, self loops added, at their per-dataset width,
depth, dropout, lr, weight decay and epochs (``RECIPES``); Polynormer at its authors' published settings,
SGFormer and the other rows at the dataset's tuned width, depth, dropout, lr and epochs. A flag given on
the command line overrides the recipe for every model of that run.

The mesh (``DynamicMesh(causal=False)``) links every node to the ``k`` nodes nearest to it in a
learned ``mesh_dim``-dim projection of its state, rebuilt at every forward; the projection is part of
the block's FFN input, so the task trains it. Low-dimensional, so torch-cluster's KD-tree finds the
mesh fast on CPU (``--mesh-backend dense --mesh-block 16384``: one exact ``matmul + topk`` per search,
the fast choice on a GPU). Training: full batch, Adam, early stopping on the validation metric (test
metric at the best validation epoch; stop after ``patience`` epochs without a new best). Every
finished (dataset, model, split) is saved as JSON under ``--out``, named by a digest of the settings
that shape the result (width, depth, lr, epochs, k, ...), so a rerun continues where one stopped, runs
at other settings sit beside it, and each dataset's table is ``--out/<dataset>/summary-<digest>.json``.

The datasets are read from a local copy at ``--data-dir``/heterophilous (default ``$TMT_DATA_DIR``),
copied to ``~/.cache/tmt_pyg`` once (or ``--cache-dir``); without one PyG downloads Minesweeper and Tolokers.

    python examples/heterophily.py --threads 1                            # all datasets, default models, 10 splits
    python examples/heterophily.py --datasets tolokers --splits 0 1 --epochs 100 --eval-every 5
    python examples/heterophily.py --datasets minesweeper --models sage mesh_gate --k 16
    python examples/heterophily.py --device cuda --hidden 512 --epochs 1000 --mesh-backend dense --mesh-block 16384
    python examples/heterophily.py --recipe luo --datasets minesweeper --models gcn sgformer polynormer --splits 0 1 2
    python examples/heterophily.py --quick                                # tiny slice (tests)
"""
import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import GATConv, GCNConv, GPSConv, SAGEConv
from torch_geometric.nn.attention import PolynormerAttention
from torch_geometric.nn.models import Polynormer, SGFormer
from tqdm.auto import tqdm
from torch_geometric.utils import (add_self_loops, coalesce, remove_self_loops, subgraph, to_torch_csr_tensor,
                                   to_undirected)

from tmt_pyg import DynamicMesh, MeshAttentionConv, MeshGPSConv
from tmt_pyg.data import dataset_root
from tmt_pyg.report import markdown_table

DATASETS = {"minesweeper": "roc_auc", "tolokers": "roc_auc", "chameleon_filtered": "acc"}
MODELS = ("gcn", "sage", "gat", "gps", "mesh_gps", "sgformer", "polynormer", "attn", "mesh", "mesh_sep", "mesh_gate", "gat_mesh",
          "gcn_mesh")
DEFAULT_MODELS = ("gcn", "sage", "gat", "gps", "sgformer", "polynormer", "mesh_sep", "mesh_gate")  # mesh: below mesh_sep everywhere
CLASSIC = ("gcn", "sage", "gat")
TUNED_WITH_MESH = {"gcn_mesh": "gcn"}  # Luo et al.'s net with the gated mesh branch -> the net whose recipe it takes
# the flags every model reads, at their defaults; a recipe sets them (and model-specific keys) per dataset and model
BASE = dict(hidden=64, layers=2, heads=4, dropout=0.2, lr=1e-3, epochs=200, patience=100, eval_every=1)
_MINESWEEPER = dict(hidden=64, dropout=0.2, lr=0.01, epochs=2000, patience=200)
_TOLOKERS = dict(hidden=64, dropout=0.2, lr=0.01, epochs=1000, patience=200)
# RECIPES[recipe][dataset or "*"][model or "*"]: later, more specific entries win
RECIPES = {
    "platonov": {"*": {"polynormer": dict(local_epochs=100)}},
    "luo": {
        # Luo et al.'s tuned GCN/SAGE/GAT (their medium_graph/run_gnn.sh and README table); Polynormer: its
        # authors' run.sh (their beta is learned per channel, PyG's is a constant: its starting value 0.5 here)
        "minesweeper": {
            "*": _MINESWEEPER, "gcn": dict(layers=12, norm="batch", residual=True),
            "gcn_mesh": dict(layers=12, norm="batch", residual=True),
            "sage": dict(layers=15, norm="batch", residual=True), "gat": dict(layers=15, heads=1, norm="batch", residual=True),
            "sgformer": dict(layers=3, graph_weight=0.5),
            "polynormer": dict(lr=1e-3, heads=8, layers=10, global_layers=3, dropout=0.3, in_dropout=0.2, global_dropout=0.3,
                               beta=0.5, local_epochs=100, epochs=2100)},
        # not in Luo et al.'s study: their Minesweeper recipe at depth 5 and 1000 epochs (our choice, not tuned)
        "tolokers": {
            "*": _TOLOKERS, "gcn": dict(layers=5, norm="batch", residual=True), "sage": dict(layers=5, norm="batch", residual=True),
            "gcn_mesh": dict(layers=5, norm="batch", residual=True),
            "gat": dict(layers=5, heads=1, norm="batch", residual=True), "sgformer": dict(layers=3, graph_weight=0.5),
            "polynormer": dict(lr=1e-3, hidden=60, heads=16, layers=7, global_layers=4, dropout=0.5, in_dropout=0.2,
                               global_dropout=0.5, beta=0.1, local_epochs=100, epochs=900)},
        "chameleon_filtered": {
            "*": dict(hidden=256, layers=2, dropout=0.7, lr=0.01, weight_decay=1e-3, epochs=200),
            "gcn": dict(hidden=512, layers=5, dropout=0.2, lr=0.005, norm="none", residual=False),
            "gcn_mesh": dict(hidden=512, layers=5, dropout=0.2, lr=0.005, norm="none", residual=False),
            "sage": dict(layers=4, norm="batch", residual=True), "gat": dict(heads=1, norm="batch", residual=True),
            "polynormer": dict(local_epochs=100)},
    },
}


# ------------------------------------------------------------------------------------------- data

def load(name: str, data_dir=None, cache_dir=None) -> Data:
    """One dataset with ``train_mask``/``val_mask``/``test_mask`` (N, 10), undirected edges."""
    root = dataset_root("heterophilous", data_dir, cache_dir)
    if name != "chameleon_filtered":  # PyG has no class for it; read it the way the class reads the others
        from torch_geometric.datasets import HeterophilousGraphDataset
        return HeterophilousGraphDataset(str(root), name.capitalize())[0]
    raw = np.load(root / name / "raw" / f"{name}.npz")
    x, y = torch.from_numpy(raw["node_features"]), torch.from_numpy(raw["node_labels"])
    edge_index = to_undirected(torch.from_numpy(raw["edges"]).t().contiguous(), num_nodes=x.size(0))
    masks = {f"{part}_mask": torch.from_numpy(raw[f"{part}_masks"]).t().contiguous() for part in ("train", "val", "test")}
    return Data(x=x, y=y, edge_index=edge_index, **masks)


def first_nodes(data: Data, n: int) -> Data:
    """The subgraph of the first ``n`` nodes (a tiny slice for quick runs)."""
    keep = torch.arange(min(n, data.num_nodes))
    edge_index, _ = subgraph(keep, data.edge_index, num_nodes=data.num_nodes)
    return Data(x=data.x[keep], y=data.y[keep], edge_index=edge_index, train_mask=data.train_mask[keep],
                val_mask=data.val_mask[keep], test_mask=data.test_mask[keep])


def roc_auc(score: Tensor, y: Tensor) -> float:
    """Area under the ROC curve of ``score`` (N,) for binary labels ``y`` (N,), ties at average rank."""
    sorted_score, order = score.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_score, return_inverse=True, return_counts=True)
    rank = torch.empty_like(score, dtype=torch.double).scatter_(0, order, (counts.cumsum(0) - (counts - 1) / 2)[inverse].double())
    pos, neg = int(y.sum()), int((1 - y).sum())
    return ((rank[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)).item()


# ----------------------------------------------------------------------------------------- models

class MeshRead(nn.Module):
    """MeshAttentionConv (``heads`` x ``hidden / heads``) over a kNN mesh of a learned ``mesh_dim``-dim
    projection ``p`` of the states, united with the given edges (``with_graph``) or alone. Returns
    ``[attention output || p]`` (N, hidden + mesh_dim): ``p`` joins the FFN input, which is what trains
    it (the mesh search itself has no gradient). ``mesh_time``: seconds spent building meshes in
    training mode (projection, kNN search, union with the graph)."""

    def __init__(self, hidden: int, heads: int, k: int, mesh_dim: int, dropout: float, with_graph: bool,
                 backend: str = "auto", block_size: int = 256):
        super().__init__()
        self.proj = nn.Linear(hidden, mesh_dim)
        self.mesh = DynamicMesh(k, causal=False, backend=backend, block_size=block_size)
        self.conv = MeshAttentionConv(hidden, hidden // heads, heads=heads, dropout=dropout, decay=False)
        self.with_graph, self.mesh_time = with_graph, 0.0

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        start = time.perf_counter()
        p = self.proj(h)  # (N, mesh_dim)
        if self.with_graph:  # variable degree: PyG's propagate over the union
            mesh_edges, _ = self.mesh(p)  # (2, N * (k + 1)) with self edges
            edges = coalesce(torch.cat([edge_index, mesh_edges], dim=1), num_nodes=h.size(0))
        else:  # fixed degree: the neighbour-table fast path
            slots = self.mesh.slots(p)  # (N, k + 1)
        if self.training:
            self.mesh_time += time.perf_counter() - start
        if self.with_graph:
            return torch.cat([self.conv(h, edges), p], dim=-1)
        key, value = self.conv.project_key_value(h, None)
        out, _ = self.conv.attend_slots(self.conv.project_query(h, None), key, value, slots.index, slots.valid, (None, None))
        return torch.cat([out, p], dim=-1)


class Gated(nn.Module):
    """``gate * read(h, edge_index)`` with a learned scalar ``gate`` that starts at 0: the block starts as
    if the read were absent (its FFN columns see zeros) and the first gradient step opens it as far as
    the loss asks. Used on the mesh channel, so a mesh net starts as the plain graph net."""

    def __init__(self, read: nn.Module):
        super().__init__()
        self.read, self.gate = read, nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        return self.gate * self.read(h, edge_index)


class SepBlock(nn.Module):
    """``x + FFN([LayerNorm(x) || read(LayerNorm(x)) for read in reads])``, FFN = Linear -> dropout ->
    GELU -> Linear -> dropout (Platonov et al.'s residual block with ego/neighbour separation).
    ``read_width``: the summed output widths of ``reads``. (N, hidden) -> (N, hidden)."""

    def __init__(self, hidden: int, reads: List[nn.Module], read_width: int, dropout: float):
        super().__init__()
        self.norm, self.reads = nn.LayerNorm(hidden), nn.ModuleList(reads)
        self.ffn = nn.Sequential(nn.Linear(hidden + read_width, hidden), nn.Dropout(dropout), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.Dropout(dropout))

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.ffn(torch.cat([h] + [read(h, edge_index) for read in self.reads], dim=-1))


class Net(nn.Module):
    """Linear -> dropout -> GELU -> blocks -> LayerNorm -> linear class scores. (N, F) -> (N, classes)."""

    def __init__(self, in_channels: int, hidden: int, classes: int, blocks: List[nn.Module], dropout: float):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden), nn.Dropout(dropout), nn.GELU())
        self.blocks, self.norm, self.head = nn.ModuleList(blocks), nn.LayerNorm(hidden), nn.Linear(hidden, classes)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h, edge_index)
        return self.head(self.norm(h))


class GraphReader(nn.Module):
    """Base of the nets whose convs read the graph as a sparse CSR matrix (GCNConv, SAGEConv: one sparse
    matmul, 2-3x faster than PyG's scatter over the edge list on CPU), built once per graph."""
    graph = None

    def adjacency(self, edge_index: Tensor, n: int, loops: bool, csr: bool = True) -> Tensor:
        """``edge_index`` (2, E) with one self loop per node if ``loops``, none otherwise (GCNConv adds its own), as
        an (n, n) CSR matrix if ``csr``."""
        if self.graph is None or self.graph[0] is not edge_index:
            edges = remove_self_loops(edge_index)[0]
            edges = add_self_loops(edges, num_nodes=n)[0] if loops else edges
            self.graph = (edge_index, to_torch_csr_tensor(edges, size=(n, n)) if csr else edges)
        return self.graph[1]


class LuoNet(GraphReader):
    """Luo et al.'s classic GNN: ``layers`` x [conv(h) (+ Linear(h) if ``residual``) -> ``norm`` -> ReLU ->
    dropout] -> linear class scores, the first conv (``kind``: gcn, sage, gat) reading the raw features,
    over the edges plus self loops. ``mesh_read``: a builder of one read per layer after the first (returning
    (N, ``mesh_width``), zero while its gate is closed); its output, through a linear map to ``hidden`` (no
    bias), joins the conv's sum: the mesh as a global branch. (N, F) -> (N, classes)."""

    def __init__(self, kind: str, in_channels: int, hidden: int, classes: int, layers: int, dropout: float, norm: str,
                 residual: bool, heads: int = 1, mesh_read=None, mesh_width: int = 0):
        super().__init__()
        widths = [in_channels] + [hidden] * (layers - 1)
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": lambda _: nn.Identity()}
        if norm not in norms:
            raise ValueError(f"norm must be one of {tuple(norms)}, got {norm!r}")
        conv = {"gcn": GCNConv, "sage": SAGEConv,
                "gat": lambda i, o: GATConv(i, o // heads, heads=heads, add_self_loops=False, bias=False)}[kind]
        self.kind = kind
        self.convs = nn.ModuleList(conv(w, hidden) for w in widths)
        self.skips = nn.ModuleList(nn.Linear(w, hidden) for w in widths) if residual else None
        self.norms = nn.ModuleList(norms[norm](hidden) for _ in widths)
        self.drop, self.head = nn.Dropout(dropout), nn.Linear(hidden, classes)
        self.mesh_reads = None if mesh_read is None else nn.ModuleList(
            nn.Sequential(mesh_read(), nn.Linear(mesh_width, hidden, bias=False)) for _ in widths[1:])

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        adj = self.adjacency(edge_index, x.size(0), loops=self.kind != "gcn", csr=self.kind != "gat")
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(x, adj) + (self.skips[i](x) if self.skips is not None else 0)
            if self.mesh_reads is not None and i > 0:
                read, out = self.mesh_reads[i - 1]
                h = h + out(read(x, edge_index))
            x = self.drop(F.relu(norm(h)))
        return self.head(x)


class WholeGraph(GraphReader):
    """A PyG model that takes a batch vector and reads the graph with GCNConv (SGFormer, Polynormer), run on
    the one whole graph: (N, F) -> (N, classes) log-probabilities. ``local_epochs``: Polynormer's training
    epochs before its global attention is switched on (``fit`` switches it)."""

    def __init__(self, model: nn.Module, local_epochs: int = None):
        super().__init__()
        self.model, self.local_epochs = model, local_epochs

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.model(x, self.adjacency(edge_index, x.size(0), loops=False), x.new_zeros(x.size(0), dtype=torch.long))


def build(name: str, args, in_channels: int, classes: int) -> nn.Module:
    """The model ``name`` at the width, depth and dropout of ``args`` (a run's settings); ``gcn``, ``sage``
    and ``gat`` are Luo et al.'s nets where ``args.norm`` is set (the ``luo`` recipe), else blocks of ``Net``."""
    d, heads, drop = args.hidden, args.heads, args.dropout
    mesh = lambda with_graph: MeshRead(d, heads, args.k, args.mesh_dim, drop, with_graph, args.mesh_backend, args.mesh_block)
    if name in CLASSIC and hasattr(args, "norm"):
        return LuoNet(name, in_channels, d, classes, args.layers, drop, args.norm, args.residual, heads)
    if name in TUNED_WITH_MESH and hasattr(args, "norm"):
        return LuoNet(TUNED_WITH_MESH[name], in_channels, d, classes, args.layers, drop, args.norm, args.residual,
                      mesh_read=lambda: Gated(mesh(False)), mesh_width=d + args.mesh_dim)
    if name == "sgformer":  # one global attention layer (SGFormer's design) beside a ``layers``-deep GCN
        return WholeGraph(SGFormer(in_channels, d, classes, trans_num_layers=1, trans_num_heads=1, trans_dropout=drop,
                                   gnn_num_layers=args.layers, gnn_dropout=drop, graph_weight=getattr(args, "graph_weight", 0.5)))
    if name == "polynormer":  # width heads x hidden, as in its authors' code
        poly = Polynormer(in_channels, d, classes, local_layers=args.layers, global_layers=getattr(args, "global_layers", 2),
                          in_dropout=getattr(args, "in_dropout", 0.15), dropout=drop, heads=heads,
                          beta=getattr(args, "beta", 0.9), qk_shared=True)
        # PyG 2.8 sizes the global attention's input for one head: give it the heads x hidden it is fed
        poly.global_attn = nn.ModuleList(PolynormerAttention(heads * d, heads, d, beta=poly.beta, qk_shared=True,
                                                             dropout=getattr(args, "global_dropout", drop))
                                         for _ in poly.global_attn)
        return WholeGraph(poly, args.local_epochs)
    graph = lambda: MeshAttentionConv(d, d // heads, heads=heads, dropout=drop, decay=False)  # the given edges alone
    gat = lambda: GATConv(d, d // heads, heads=heads, add_self_loops=False, dropout=drop)
    block = {
        "gcn": lambda: SepBlock(d, [GCNConv(d, d)], d, drop),
        "sage": lambda: SepBlock(d, [SAGEConv(d, d, root_weight=False)], d, drop),
        "gat": lambda: SepBlock(d, [gat()], d, drop),
        "gps": lambda: GPSConv(d, SAGEConv(d, d), heads=heads, dropout=drop, attn_type="performer",
                               attn_kwargs=dict(head_channels=d // heads), norm="layer_norm", norm_kwargs=dict(mode="node")),
        "mesh_gps": lambda: MeshGPSConv(d, SAGEConv(d, d), heads=heads, k=args.k, dropout=drop, norm="layer_norm",
                                        norm_kwargs=dict(mode="node"), search=args.mesh_search),
        "attn": lambda: SepBlock(d, [graph()], d, drop),
        "mesh": lambda: SepBlock(d, [mesh(True)], d + args.mesh_dim, drop),
        "mesh_sep": lambda: SepBlock(d, [graph(), mesh(False)], 2 * d + args.mesh_dim, drop),
        "mesh_gate": lambda: SepBlock(d, [graph(), Gated(mesh(False))], 2 * d + args.mesh_dim, drop),
        "gat_mesh": lambda: SepBlock(d, [gat(), Gated(mesh(False))], 2 * d + args.mesh_dim, drop),
        "gcn_mesh": lambda: SepBlock(d, [GCNConv(d, d), Gated(mesh(False))], 2 * d + args.mesh_dim, drop),
    }[name]
    return Net(in_channels, d, classes, [block() for _ in range(args.layers)], drop)


# -------------------------------------------------------------------------------------- training

def fit(model: nn.Module, data: Data, split: int, metric: str, args, desc: str = "train") -> Dict[str, float]:
    """Full-batch training on split ``split``, evaluated every ``eval_every`` epochs; returns the test
    metric at the best validation metric (first best), the epochs run, the run time, the mean time of
    a training step after the first (which pays one-off costs such as compiling), the share of the
    training steps' time spent building meshes and the final value of every mesh gate. ``args``: the run's
    settings (lr, weight_decay, epochs, eval_every, patience); ``desc``: the progress bar's label."""
    train, val, test = (getattr(data, f"{part}_mask")[:, split] for part in ("train", "val", "test"))
    score = (lambda out, mask: roc_auc(out[mask, 1] - out[mask, 0], data.y[mask])) if metric == "roc_auc" else \
        (lambda out, mask: (out[mask].argmax(-1) == data.y[mask]).float().mean().item())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=getattr(args, "weight_decay", 0.0))
    best_val, test_at_best, best_epoch, train_time, first_step, epoch = -1.0, 0.0, 0, 0.0, 0.0, 0
    sync = torch.cuda.synchronize if data.x.is_cuda else (lambda: None)  # honest step times on a GPU
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in bar:
        if epoch - 1 == getattr(model, "local_epochs", None):  # Polynormer: local attention first, then global too
            model.model._global = True
        step_start = time.perf_counter()
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(data.x, data.edge_index)[train], data.y[train]).backward()
        opt.step()
        sync()
        train_time += time.perf_counter() - step_start
        if epoch == 1:
            first_step = train_time
        if epoch % args.eval_every and epoch < args.epochs:
            continue
        model.eval()
        with torch.no_grad():
            out = model(data.x, data.edge_index)
        if (v := score(out, val)) > best_val:
            best_val, test_at_best, best_epoch = v, score(out, test), epoch
        bar.set_postfix(best_val=f"{best_val:.4f}", best_epoch=best_epoch)
        if epoch - best_epoch >= args.patience:
            break
    bar.close()
    mesh_time = sum(getattr(m, "mesh_time", 0.0) for m in model.modules())
    gates = [m.gate.item() for m in model.modules() if isinstance(m, Gated)]
    return dict(test=test_at_best, val=best_val, best_epoch=best_epoch, epochs=epoch, time=time.perf_counter() - start,
                epoch_time=(train_time - first_step) / (epoch - 1) if epoch > 1 else train_time,
                mesh_share=mesh_time / train_time, gates=gates, device=str(data.x.device),
                **({"recall": recall} if (recall := tree_recall(model, data)) else {}))


def tree_recall(model: nn.Module, data: Data) -> List[float]:
    """Per MeshGPSConv layer searched by projection trees: the neighbour recall of its search against the
    exact one, on the node states it searches in an evaluation forward with the final weights."""
    states = []
    hooks = [m.register_forward_pre_hook(lambda layer, inputs: states.append((layer.mesh, inputs[0])))
             for m in model.modules() if isinstance(m, MeshGPSConv) and m.mesh.search == "tree"]
    if hooks:
        model.eval()
        with torch.no_grad():
            model(data.x, data.edge_index)
        for hook in hooks:
            hook.remove()
    return [mesh.recall(x) for mesh, x in states]


def summarize(runs: List[Dict[str, float]]) -> Dict[str, float]:
    tests, s = [r["test"] for r in runs], runs[0]["settings"]
    return dict(test=statistics.mean(tests), test_std=statistics.pstdev(tests), splits=len(runs), lr=s["lr"],
                shape=f"{s['hidden'] * (s['heads'] if 'local_epochs' in s else 1)} x {s['layers']}",  # Polynormer: heads x hidden
                time=statistics.mean(r["time"] for r in runs), epochs=statistics.mean(r["epochs"] for r in runs),
                epoch_time=statistics.mean(r["epoch_time"] for r in runs),
                mesh_share=statistics.mean(r["mesh_share"] for r in runs),
                gate=statistics.mean(abs(g) for r in runs for g in r.get("gates", [])) if runs[0].get("gates") else None,
                recall=statistics.mean(v for r in runs for v in r["recall"]) if "recall" in runs[0] else None,
                late_best=sum(r["best_epoch"] > 0.9 * r["settings"]["epochs"] for r in runs))


def settings_for(args, dataset: str, model: str) -> Dict:
    """What shapes the result of ``model`` on ``dataset`` (names its cache file): ``BASE`` < the recipe's
    entries for any dataset/model < for this dataset/model < the flags given < ``--quick``. The device and
    the mesh backend do not shape it (both searches are exact); the tree search of ``mesh_gps`` does."""
    recipe, s = RECIPES[args.recipe], dict(BASE)
    for data_key, model_key in (("*", "*"), ("*", model), (dataset, "*"), (dataset, model)):
        s.update(recipe.get(data_key, {}).get(model_key, {}))
    s.update({key: getattr(args, key) for key in (*BASE, "weight_decay", "local_epochs") if getattr(args, key) is not None})
    if model == "polynormer" and s.get("local_epochs", 0) >= s["epochs"]:
        raise ValueError(f"polynormer: --local-epochs ({s['local_epochs']}) must be below --epochs ({s['epochs']})")
    if args.quick:
        s.update(hidden=16, epochs=5, **({"local_epochs": 2} if "local_epochs" in s else {}))
    s.update(quick=args.quick, k=args.k, mesh_dim=args.mesh_dim, **({"recipe": args.recipe} if args.recipe != "platonov" else {}),
             **({"mesh_search": args.mesh_search} if args.mesh_search != "exact" and model == "mesh_gps" else {}))
    if s["hidden"] % s["heads"] and model not in ("sgformer", "polynormer"):
        raise ValueError(f"{model}: --hidden ({s['hidden']}) must be a multiple of --heads ({s['heads']})")
    return s


def digest(settings: Dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def main(argv=None) -> Dict[str, Dict[str, Dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    p.add_argument("--splits", nargs="+", type=int, default=list(range(10)), help="which of the 10 given splits")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="platonov",
                   help="platonov: every model at the flags below; luo: Luo et al.'s tuned GCN/SAGE/GAT (see RECIPES)")
    p.add_argument("--quick", action="store_true", help="tiny slice, for tests")
    p.add_argument("--data-dir", help="folder holding heterophilous/*/raw (default: $TMT_DATA_DIR; none: PyG downloads)")
    p.add_argument("--cache-dir", help="writable copy of the datasets (default: $TMT_CACHE_DIR or ~/.cache/tmt_pyg)")
    p.add_argument("--out", default="runs/heterophily", help="one JSON per finished (dataset, model, split)")
    p.add_argument("--hidden", type=int, help="width of every model (default 64; the paper: 512)")
    p.add_argument("--layers", type=int, help="residual blocks, or conv layers (default 2)")
    p.add_argument("--heads", type=int, help="attention heads (GAT, GPS, mesh, Polynormer; default 4)")
    p.add_argument("--dropout", type=float, help="default 0.2")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--weight-decay", type=float, help="Adam's weight decay (default 0)")
    p.add_argument("--epochs", type=int, help="most full-batch steps (default 200; the paper: 1000)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better validation metric (default 100)")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations (default 1, as the paper)")
    p.add_argument("--local-epochs", type=int, help="Polynormer's epochs before its global attention (default 100)")
    p.add_argument("--k", type=int, default=8, help="mesh neighbours per node")
    p.add_argument("--mesh-dim", type=int, default=4, help="dimension of the learned projection the mesh is searched on")
    p.add_argument("--mesh-backend", choices=("auto", "dense", "cluster"), default="auto",
                   help="DynamicMesh's search (auto: torch-cluster's KD-tree for the low-dimensional projection)")
    p.add_argument("--mesh-block", type=int, default=256, help="query rows per block of the dense search")
    p.add_argument("--mesh-search", choices=("exact", "tree"), default="exact",
                   help="mesh_gps: MeshGPSConv's search (tree: projection trees above 4,096 nodes, its default as a layer)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.splits = args.splits[:1]
    bad = [s for s in args.splits if not 0 <= s < 10]
    if bad:
        p.error(f"--splits: the datasets have splits 0 to 9, not {bad}")
    run_settings = {(dataset, name): settings_for(args, dataset, name) for dataset in args.datasets for name in args.models}
    command_digest = digest(settings_for(args, "*", "*"))  # names the summaries: the recipe and the flags given

    results: Dict[str, Dict[str, Dict]] = {}
    for dataset in args.datasets:
        data = load(dataset, args.data_dir, args.cache_dir)
        if args.quick:
            data = first_nodes(data, 600)
        data = data.to(args.device)
        classes, metric = int(data.y.max()) + 1, DATASETS[dataset]
        results[dataset] = {}
        for name in args.models:
            settings, runs = run_settings[dataset, name], []
            for split in args.splits:
                path = Path(args.out) / dataset / name / f"split{split}-{digest(settings)}.json"
                if path.exists():
                    cached = json.loads(path.read_text())
                else:
                    torch.manual_seed(split)
                    run_args = argparse.Namespace(**{"mesh_search": args.mesh_search, **settings},
                                                  mesh_backend=args.mesh_backend, mesh_block=args.mesh_block)
                    model = build(name, run_args, data.num_features, classes).to(args.device)
                    cached = dict(settings=settings, mesh_backend=args.mesh_backend,
                                  **fit(model, data, split, metric, run_args, desc=f"{dataset} {name} split {split}"))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(cached, indent=1))
                    print(f"{dataset} {name} split {split}: test {metric} {100 * cached['test']:.2f}, {cached['epochs']} epochs, "
                          f"{cached['time']:.1f} s", flush=True)
                runs.append(cached)
            results[dataset][name] = summarize(runs)
        summary = dict(argv=argv if argv is not None else sys.argv[1:], recipe=args.recipe, splits=args.splits,
                       settings={name: run_settings[dataset, name] for name in args.models}, results=results[dataset])
        (Path(args.out) / dataset / f"summary-{command_digest}.json").write_text(json.dumps(summary, indent=1))
        print(f"\n{dataset}: {data.num_nodes:,} nodes, {data.num_edges:,} directed edges, {data.num_features:,} features, "
              f"{classes} classes; test {metric} at the best validation epoch; recipe {args.recipe}, settings {command_digest}; "
              f"{torch.get_num_threads()} thread(s)")
        print(markdown_table(
            ["model", f"test {metric} (mean ± std, %)", "splits", "width x depth", "lr", "epochs run", "best epoch > 90 % of max",
             "s / run", "s / training epoch", "mesh build / training epoch", "|mesh gate|", "tree search recall"],
            [(name, f"{100 * r['test']:.2f} ± {100 * r['test_std']:.2f}", r["splits"], r["shape"], f"{r['lr']:g}",
              f"{r['epochs']:.0f}", f"{r['late_best']} of {r['splits']}", f"{r['time']:.1f}", f"{r['epoch_time']:.3f}",
              f"{100 * r['mesh_share']:.1f} %" if r["mesh_share"] else "-", "-" if r["gate"] is None else f"{r['gate']:.3f}",
              "-" if r["recall"] is None else f"{r['recall']:.2f}")
             for name, r in results[dataset].items()]))
    return results


if __name__ == "__main__":
    main()
