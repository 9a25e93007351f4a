"""Node classification on a stochastic block model: MeshAttentionConv over the graph's own edges
united with a feature-kNN mesh, next to GCNConv and GATConv.

The graph is generated here: ``classes`` blocks with weak homophily (an edge inside a block is only a
few times likelier than across) and noisy class-dependent features (a class mean plus Gaussian
noise). Neither the edges nor the features alone separate the classes well; the mesh
(``DynamicMesh(causal=False)``, rebuilt from the current states before each layer) links nodes with
similar states that the graph does not connect.

    python examples/node_classification.py           # default run
    python examples/node_classification.py --quick   # tiny sizes (tests)
"""
import argparse
import statistics
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import GATConv, GCNConv
from torch_geometric.utils import coalesce, stochastic_blockmodel_graph

from tmt_pyg import DynamicMesh, MeshAttentionConv
from tmt_pyg.report import markdown_table


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


class MeshGraphNet(nn.Module):
    """Two MeshAttentionConv layers over ``graph edges ∪ kNN mesh of the current states``."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 4, k: int = 8, dropout: float = 0.5):
        super().__init__()
        self.mesh = DynamicMesh(k, causal=False)
        self.conv1 = MeshAttentionConv(in_channels, hidden // heads, heads=heads, decay=False, dropout=dropout)
        self.conv2 = MeshAttentionConv(hidden, out_channels, heads=1, decay=False, dropout=dropout)
        self.dropout = dropout

    def edges(self, h: Tensor, edge_index: Tensor) -> Tensor:
        """(2, E) graph edges ∪ mesh edges of ``h`` (with self edges), duplicates removed."""
        mesh_edges, _ = self.mesh(h)
        return coalesce(torch.cat([edge_index, mesh_edges], dim=1), num_nodes=h.size(0))

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        edges = self.edges(x, edge_index)  # meshes come from the states before dropout
        h = F.elu(self.conv1(F.dropout(x, self.dropout, self.training), edges))
        edges = self.edges(h, edge_index)
        return self.conv2(F.dropout(h, self.dropout, self.training), edges)


class GCN(nn.Module):
    def __init__(self, in_channels: int, hidden: int, out_channels: int, dropout: float = 0.5):
        super().__init__()
        self.conv1, self.conv2, self.dropout = GCNConv(in_channels, hidden), GCNConv(hidden, out_channels), dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        h = F.dropout(F.relu(self.conv1(x, edge_index)), self.dropout, self.training)
        return self.conv2(h, edge_index)


class GAT(nn.Module):
    def __init__(self, in_channels: int, hidden: int, out_channels: int, heads: int = 4, dropout: float = 0.5):
        super().__init__()
        self.conv1 = GATConv(in_channels, hidden // heads, heads=heads, dropout=dropout)
        self.conv2 = GATConv(hidden, out_channels, heads=1, dropout=dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        h = F.dropout(F.elu(self.conv1(x, edge_index)), self.dropout, self.training)
        return self.conv2(h, edge_index)


def fit(model: nn.Module, data: Data, epochs: int, lr: float = 0.01, eval_every: int = 5) -> Dict[str, float]:
    """Full-batch training; returns the test accuracy at the evaluation of best validation accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    best_val, test_at_best = -1.0, 0.0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        if (epoch + 1) % eval_every:
            continue
        model.eval()
        with torch.no_grad():
            correct = model(data.x, data.edge_index).argmax(-1) == data.y
        val, test = correct[data.val_mask].float().mean().item(), correct[data.test_mask].float().mean().item()
        if val > best_val:
            best_val, test_at_best = val, test
    return dict(test_acc=test_at_best, time=time.perf_counter() - start)


def main(argv=None) -> Dict[str, Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--per-class", type=int, default=400, help="nodes per class")
    p.add_argument("--p-in", type=float, default=0.01, help="edge probability inside a block")
    p.add_argument("--p-out", type=float, default=0.004, help="edge probability across blocks")
    p.add_argument("--channels", type=int, default=32, help="feature dimension")
    p.add_argument("--signal", type=float, default=0.35, help="scale of the class means against unit noise")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--k", type=int, default=8, help="mesh neighbours per node")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3, help="graphs and initialisations to average over")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.per_class, args.epochs, args.seeds, args.p_in, args.p_out = 60, 20, 1, 0.05, 0.02

    builders = {
        "MeshAttentionConv (graph ∪ kNN mesh)": lambda d: MeshGraphNet(d, args.hidden, args.classes, k=args.k),
        "GCNConv": lambda d: GCN(d, args.hidden, args.classes),
        "GATConv": lambda d: GAT(d, args.hidden, args.classes),
    }
    runs = {name: [] for name in builders}
    for seed in range(args.seeds):
        data = make_sbm(args.classes, args.per_class, args.p_in, args.p_out, args.channels, args.signal, seed)
        for name, build in builders.items():
            torch.manual_seed(seed)
            runs[name].append(fit(build(args.channels), data, args.epochs))

    results = {}
    for name, rs in runs.items():
        accs = [r["test_acc"] for r in rs]
        results[name] = dict(test_acc=statistics.mean(accs), test_acc_std=statistics.pstdev(accs),
                             time=statistics.mean(r["time"] for r in rs))
    degree = data.num_edges / data.num_nodes
    print(f"\nSBM: {args.classes} classes x {args.per_class} nodes, mean degree {degree:.1f}, "
          f"p_in/p_out = {args.p_in}/{args.p_out}, {args.channels}-d features (signal {args.signal}); "
          f"hidden {args.hidden}, {args.epochs} epochs, {args.seeds} seed(s), {torch.get_num_threads()} threads")
    print(markdown_table(["model", "test acc (mean ± std)", "time / run"],
                         [(name, f"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}", f"{r['time']:.1f}s") for name, r in results.items()]))
    return results


if __name__ == "__main__":
    main()
