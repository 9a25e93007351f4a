"""Node classification on Planetoid Cora (public split): MeshAttentionConv over the graph's own edges
united with a kNN mesh, next to GCNConv, GATConv and two graph transformers (PyG's GPSConv with
dense multi-head attention, and MeshGPSConv with mesh attention).

The mesh (``DynamicMesh(causal=False)``) links every node to the ``k`` nodes whose learned class
scores (a linear map of the hidden state, 7 dimensions on Cora instead of the raw 1,433) are most
similar to its own, so it can connect nodes of the same class that the citation graph does not.
Two more mesh nets keep the mesh a channel of its own that can only add to the graph net, times a learned
scalar gate that starts at 0 (closed: the net is exactly the graph net): ``mesh_gate`` (a GAT-shaped
net of MeshAttentionConvs + the gated mesh on its class scores) and ``gat_mesh`` (PyG's GAT + the gated
mesh).
Baselines run at their papers' settings (GCN: 2 layers, 16 hidden, dropout 0.5, lr 0.01; GAT: 8
heads x 8, dropout 0.6, lr 0.005; weight decay 5e-4); every model trains 200 epochs and reports the
test accuracy at its best validation accuracy, mean ± std over seeds.

Cora is downloaded by PyG, or read from a local copy at ``--data-dir``/planetoid (default
``$TMT_DATA_DIR``) on machines without network, copied to ``~/.cache/tmt_pyg`` once (or ``--cache-dir``). ``--dataset sbm`` runs the
generated stochastic block model instead.

    python examples/node_classification.py                     # Cora, 10 seeds: mesh nets, GCN, GAT
    python examples/node_classification.py --models gps mesh_gps --seeds 1 --epochs 100   # graph transformers
    python examples/node_classification.py --dataset sbm       # generated SBM graph
    python examples/node_classification.py --quick             # tiny slice (tests)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import GATConv, GCNConv, GPSConv
from torch_geometric.utils import add_self_loops, coalesce, stochastic_blockmodel_graph, subgraph

from tmt_pyg import DynamicMesh, MeshAttentionConv, MeshGPSConv
from tmt_pyg.data import dataset_root
from tmt_pyg.report import markdown_table


# ------------------------------------------------------------------------------------------- data

def load_cora(data_dir=None, cache_dir=None) -> Data:
    from torch_geometric.datasets import Planetoid
    return Planetoid(str(dataset_root("planetoid", data_dir, cache_dir)), "Cora")[0]  # public split masks


def make_sbm(classes: int, per_class: int, p_in: float, p_out: float, channels: int, signal: float,
             seed: int) -> Data:
    """SBM graph with features ``signal * mean[y] + N(0, I)`` and random 30/20/50 train/val/test masks."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # stochastic_blockmodel_graph draws from the global RNG
    probs = torch.full((classes, classes), p_out).fill_diagonal_(p_in)
    edge_index = stochastic_blockmodel_graph([per_class] * classes, probs)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = signal * torch.randn(classes, channels, generator=g)[y] + torch.randn(len(y), channels, generator=g)
    split = torch.rand(len(y), generator=g)
    return Data(x=x, y=y, edge_index=edge_index, train_mask=split < 0.3, val_mask=(split >= 0.3) & (split < 0.5),
                test_mask=split >= 0.5)


def every_nth_node(data: Data, n: int) -> Data:
    """The subgraph of nodes ``0, n, 2n, ...`` with their masks (a tiny slice for quick runs)."""
    keep = torch.arange(0, data.num_nodes, n)
    edge_index, _ = subgraph(keep, data.edge_index, num_nodes=data.num_nodes, relabel_nodes=True)
    return Data(x=data.x[keep], y=data.y[keep], edge_index=edge_index, train_mask=data.train_mask[keep],
                val_mask=data.val_mask[keep], test_mask=data.test_mask[keep])


# ----------------------------------------------------------------------------------------- models

class MeshNet(nn.Module):
    """Dropout -> linear projection to ``hidden`` -> ELU -> MeshAttentionConv (``heads`` x ``hidden / heads``)
    over the graph's edges with self loops -> ELU; then class scores twice: ``skip``, a linear map of
    the node states, and a one-head MeshAttentionConv over the graph's edges ∪ the kNN mesh of those
    scores; the output is their sum.

    The mesh is built on the learned ``classes``-dim projection (low-dimensional, so torch-cluster's
    KD-tree finds it fast), rebuilt at every forward: it links nodes the network currently scores
    alike, whether or not the citation graph does. ``mesh_time`` accumulates the seconds spent
    building it in training mode (kNN search and union with the graph)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 8, k: int = 8,
                 dropout: float = 0.6):
        super().__init__()
        self.lin = nn.Linear(in_channels, hidden)
        self.conv1 = MeshAttentionConv(hidden, hidden // heads, heads=heads, dropout=dropout, decay=False)
        self.skip = nn.Linear(hidden, out_channels)
        self.mesh = DynamicMesh(k, causal=False)
        self.conv2 = MeshAttentionConv(hidden, out_channels, heads=1, dropout=dropout, decay=False)
        self.dropout, self.mesh_time = dropout, 0.0

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.elu(self.lin(F.dropout(x, self.dropout, self.training)))  # (N, hidden)
        h = F.elu(self.conv1(F.dropout(h, self.dropout, self.training), add_self_loops(edge_index, num_nodes=h.size(0))[0]))
        h = F.dropout(h, self.dropout, self.training)
        scores = self.skip(h)  # (N, classes)
        start = time.perf_counter()
        mesh_edges, _ = self.mesh(scores)
        edges = coalesce(torch.cat([edge_index, mesh_edges], dim=1), num_nodes=h.size(0))  # with self edges
        if self.training:
            self.mesh_time += time.perf_counter() - start
        return self.conv2(h, edges) + scores


class GatedMesh(nn.Module):
    """The mesh as a channel that can only add to a graph net: ``scores + gate * read``, where ``read`` is
    a one-head MeshAttentionConv from the node states ``h`` (N, hidden) over the ``k``-NN mesh of the
    graph net's class scores ``scores`` (N, classes), and ``gate`` a learned scalar that starts at 0.
    Closed, the net is exactly the graph net; training opens it as far as the loss asks. ``mesh_time``:
    seconds spent building meshes in training mode."""

    def __init__(self, hidden: int, classes: int, k: int, dropout: float):
        super().__init__()
        self.mesh = DynamicMesh(k, causal=False)
        self.conv = MeshAttentionConv(hidden, classes, heads=1, dropout=dropout, decay=False)
        self.gate, self.mesh_time = nn.Parameter(torch.zeros(())), 0.0

    def forward(self, h: Tensor, scores: Tensor) -> Tensor:
        start = time.perf_counter()
        slots = self.mesh.slots(scores)  # (N, k + 1): the k nodes scored most alike, and the node itself
        if self.training:
            self.mesh_time += time.perf_counter() - start
        key, value = self.conv.project_key_value(h, None)
        read, _ = self.conv.attend_slots(self.conv.project_query(h, None), key, value, slots.index, slots.valid, (None, None))
        return scores + self.gate * read


class GatedMeshNet(nn.Module):
    """Dropout -> linear projection to ``hidden`` -> ELU -> MeshAttentionConv (``heads`` x ``hidden / heads``)
    -> ELU -> dropout -> one-head MeshAttentionConv to class scores, both over the graph's edges with self
    loops (a GAT-shaped net of our attention), plus :class:`GatedMesh` on its scores."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 8, k: int = 8,
                 dropout: float = 0.6):
        super().__init__()
        self.lin = nn.Linear(in_channels, hidden)
        self.conv1 = MeshAttentionConv(hidden, hidden // heads, heads=heads, dropout=dropout, decay=False)
        self.conv2 = MeshAttentionConv(hidden, out_channels, heads=1, dropout=dropout, decay=False)
        self.mesh, self.dropout = GatedMesh(hidden, out_channels, k, dropout), dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        edge_index = add_self_loops(edge_index, num_nodes=x.size(0))[0]
        h = F.elu(self.lin(F.dropout(x, self.dropout, self.training)))  # (N, hidden)
        h = F.elu(self.conv1(F.dropout(h, self.dropout, self.training), edge_index))
        h = F.dropout(h, self.dropout, self.training)
        return self.mesh(h, self.conv2(h, edge_index))


class GCN(nn.Module):
    """Kipf & Welling (2017): GCNConv -> ReLU -> GCNConv, dropout before each."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, dropout: float = 0.5):
        super().__init__()
        self.conv1, self.conv2, self.dropout = GCNConv(in_channels, hidden), GCNConv(hidden, out_channels), dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.relu(self.conv1(F.dropout(x, self.dropout, self.training), edge_index))
        return self.conv2(F.dropout(h, self.dropout, self.training), edge_index)


class GAT(nn.Module):
    """Veličković et al. (2018): GATConv (``heads`` x ``hidden / heads``) -> ELU -> GATConv (one head)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 8, dropout: float = 0.6):
        super().__init__()
        self.conv1 = GATConv(in_channels, hidden // heads, heads=heads, dropout=dropout)
        self.conv2 = GATConv(hidden, out_channels, heads=1, concat=False, dropout=dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.elu(self.conv1(F.dropout(x, self.dropout, self.training), edge_index))
        return self.conv2(F.dropout(h, self.dropout, self.training), edge_index)


class GATMesh(GAT):
    """:class:`GAT` plus :class:`GatedMesh` on its class scores: the mesh added to a PyG net, starting as
    that net (built first, so a seed gives the GAT part the plain GAT's initial weights)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 8, k: int = 8,
                 dropout: float = 0.6):
        super().__init__(in_channels, hidden, out_channels, heads, dropout)
        self.mesh = GatedMesh(hidden, out_channels, k, dropout)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = F.elu(self.conv1(F.dropout(x, self.dropout, self.training), edge_index))
        h = F.dropout(h, self.dropout, self.training)
        return self.mesh(h, self.conv2(h, edge_index))


class GraphTransformer(nn.Module):
    """Dropout -> linear projection -> ``layers`` GPS layers (GCNConv local + global attention + MLP)
    -> linear classifier. ``mesh_k=None``: PyG's GPSConv (dense multi-head attention over all node
    pairs); else MeshGPSConv (attention over the ``mesh_k``-NN mesh of the current states)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 4, layers: int = 2,
                 dropout: float = 0.6, mesh_k=None):
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(in_channels, hidden), nn.Linear(hidden, out_channels)
        if mesh_k is None:
            make = lambda: GPSConv(hidden, GCNConv(hidden, hidden), heads=heads, dropout=dropout, attn_type="multihead",
                                   attn_kwargs=dict(dropout=dropout))
        else:
            make = lambda: MeshGPSConv(hidden, GCNConv(hidden, hidden), heads=heads, k=mesh_k, dropout=dropout,
                                       attn_dropout=dropout)
        self.layers = nn.ModuleList(make() for _ in range(layers))
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.lin_in(F.dropout(x, self.dropout, self.training))
        for layer in self.layers:
            h = layer(h, edge_index)
        return self.lin_out(F.dropout(h, self.dropout, self.training))


def builders(args, in_channels: int, classes: int) -> Dict[str, tuple]:
    """name -> (label, model factory, lr) for every model the example can run."""
    cora = args.dataset == "cora"
    return {
        "mesh": (f"MeshAttentionConv (graph ∪ {args.k}-NN mesh of class scores)",
                 lambda: MeshNet(in_channels, args.hidden, classes, k=args.k), args.lr),
        "mesh_gate": (f"MeshAttentionConv graph net + gated {args.k}-NN mesh channel",
                      lambda: GatedMeshNet(in_channels, args.hidden, classes, k=args.k), args.lr),
        "gcn": ("GCNConv", lambda: GCN(in_channels, 16 if cora else args.hidden, classes), 0.01),
        "gat": ("GATConv", lambda: GAT(in_channels, 64 if cora else args.hidden, classes), 0.005),
        "gat_mesh": (f"GATConv + gated {args.k}-NN mesh channel",
                     lambda: GATMesh(in_channels, 64 if cora else args.hidden, classes, k=args.k), 0.005),
        "gps": ("GPSConv (multihead, dense)", lambda: GraphTransformer(in_channels, args.hidden, classes), args.lr),
        "mesh_gps": (f"MeshGPSConv ({args.k}-NN mesh)",
                     lambda: GraphTransformer(in_channels, args.hidden, classes, mesh_k=args.k), args.lr),
    }


# -------------------------------------------------------------------------------------- training

def fit(model: nn.Module, data: Data, epochs: int, lr: float, weight_decay: float = 5e-4) -> Dict[str, float]:
    """Full-batch training, evaluated after every epoch; returns the test accuracy at the best
    validation accuracy (first best), the run time and, for a MeshNet, the share of the training
    steps' time spent building meshes."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_val, test_at_best, train_time = -1.0, 0.0, 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        step_start = time.perf_counter()
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(data.x, data.edge_index)[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        train_time += time.perf_counter() - step_start
        model.eval()
        with torch.no_grad():
            correct = model(data.x, data.edge_index).argmax(-1) == data.y
        val, test = correct[data.val_mask].float().mean().item(), correct[data.test_mask].float().mean().item()
        if val > best_val:
            best_val, test_at_best = val, test
    return dict(test_acc=test_at_best, time=time.perf_counter() - start,
                mesh_share=sum(getattr(m, "mesh_time", 0.0) for m in model.modules()) / train_time,
                gate=next((m.gate.item() for m in model.modules() if isinstance(m, GatedMesh)), None))


def summarize(runs: List[Dict[str, float]]) -> Dict[str, float]:
    accs = [r["test_acc"] for r in runs]
    gates = [r["gate"] for r in runs if r["gate"] is not None]
    return dict(test_acc=statistics.mean(accs), test_acc_std=statistics.pstdev(accs), seeds=len(runs),
                time=statistics.mean(r["time"] for r in runs), mesh_share=statistics.mean(r["mesh_share"] for r in runs),
                gate=statistics.mean(gates) if gates else None, test_accs=accs)


def main(argv=None) -> Dict[str, Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("cora", "sbm"), default="cora")
    p.add_argument("--models", nargs="+", choices=("mesh", "mesh_gate", "gcn", "gat", "gat_mesh", "gps", "mesh_gps"),
                   default=["mesh", "mesh_gate", "gcn", "gat", "gat_mesh"],
                   help="gps, mesh_gps: the graph transformers (dense GPSConv takes minutes per run on Cora on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny slice, for tests")
    p.add_argument("--data-dir", help="folder holding planetoid/Cora/raw (default: $TMT_DATA_DIR; none: PyG downloads Cora)")
    p.add_argument("--cache-dir", help="writable copy of the dataset (default: $TMT_CACHE_DIR or ~/.cache/tmt_pyg)")
    p.add_argument("--hidden", type=int, default=64, help="width of the mesh net and the graph transformers")
    p.add_argument("--k", type=int, default=8, help="mesh neighbours per node")
    p.add_argument("--lr", type=float, default=0.005, help="learning rate of the mesh net and the graph transformers")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, default=10, help="initialisations (and SBM graphs) to average over")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results (per-seed accuracies included) to this file")
    sbm = p.add_argument_group("--dataset sbm")
    sbm.add_argument("--classes", type=int, default=5)
    sbm.add_argument("--per-class", type=int, default=400, help="nodes per class")
    sbm.add_argument("--p-in", type=float, default=0.01, help="edge probability inside a block")
    sbm.add_argument("--p-out", type=float, default=0.004, help="edge probability across blocks")
    sbm.add_argument("--channels", type=int, default=32, help="feature dimension")
    sbm.add_argument("--signal", type=float, default=0.35, help="scale of the class means against unit noise")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.seeds, args.per_class, args.p_in, args.p_out = 10, 1, 60, 0.05, 0.02

    if args.dataset == "cora":
        cora = load_cora(args.data_dir, args.cache_dir)
        if args.quick:
            cora = every_nth_node(cora, 8)
        graphs: Callable[[int], Data] = lambda seed: cora
        classes = 7
    else:
        graphs = lambda seed: make_sbm(args.classes, args.per_class, args.p_in, args.p_out, args.channels, args.signal, seed)
        classes = args.classes
    data = graphs(0)
    models = {name: spec for name, spec in builders(args, data.num_features, classes).items() if name in args.models}
    runs = {name: [] for name in models}
    for seed in range(args.seeds):
        data = graphs(seed)
        for name, (_, build, lr) in models.items():
            torch.manual_seed(seed)
            runs[name].append(fit(build(), data, args.epochs, lr))

    results = {models[name][0]: summarize(rs) for name, rs in runs.items()}
    print(f"\n{args.dataset}: {data.num_nodes:,} nodes, {data.num_edges:,} edges, {data.num_features:,} features, "
          f"{classes} classes; train/val/test {int(data.train_mask.sum())}/{int(data.val_mask.sum())}/"
          f"{int(data.test_mask.sum())}; {args.epochs} epochs, {torch.get_num_threads()} thread(s)")
    print(markdown_table(["model", "test acc (mean ± std)", "seeds", "time / run", "mesh build / training epoch",
                          "mesh gate (mean at the end)"],
                         [(name, f"{100 * r['test_acc']:.1f} ± {100 * r['test_acc_std']:.1f} %", r["seeds"],
                           f"{r['time']:.1f} s", f"{100 * r['mesh_share']:.1f} %" if r["mesh_share"] else "-",
                           "-" if r["gate"] is None else f"{r['gate']:.3f}")
                          for name, r in results.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(argv=argv if argv is not None else sys.argv[1:], results=results), indent=1))
    return results


if __name__ == "__main__":
    main()
