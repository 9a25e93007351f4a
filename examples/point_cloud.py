"""Point-cloud shape classification: DynamicMesh + MeshAttentionConv next to DGCNN (EdgeConv).

Four nets (``--models``): the mesh net; the same with every edge encoding its relative position
``pos_j - pos_i`` (``positions``) or its relative feature ``u_j - u_i`` of the unit states the mesh was
searched on (``features``, DGCNN's ``x_j - x_i``), through ``MeshAttentionConv(coord_channels=...)``,
each narrower so that the parameters stay about equal; and DGCNN.

Default data: PyG's GeometricShapes (40 classes of 2-D/3-D meshes, one training and one test mesh
each), downloaded by PyG or read from a local copy at ``--data-dir``/geometric_shapes (default
``$TMT_DATA_DIR``; copied to ``~/.cache/tmt_pyg`` once). As PyG users do, ``SamplePoints`` draws a fresh point cloud
from each mesh surface at every access; training clouds are also randomly rotated (up to 15 degrees
about each axis) and scaled, and every epoch sees ``--repeat`` samples of each training mesh. The
test set is ``--repeat`` samples of each test mesh, drawn with a fixed seed.

All networks rebuild a kNN graph before every layer from the current point features, train for the
same epochs with the same batches (Adam, cosine learning rate, dropout 0.5 in the head, as DGCNN's
paper; batches of 8 rather than its 32, see ``--batch-size``), and are sized to about the same
parameter count. Every epoch logs the training loss, every ``--eval-every`` epochs the test accuracy;
each finished (model, seed) run is cached as ``--out/<settings digest>/<model>-seed<s>.json``, so an
interrupted study resumes where it stopped, and ``summary.json`` plus ``curves.png`` (test accuracy
and training loss per epoch, every seed) are written beside the runs.

PyG 2.8's ``DynamicEdgeConv`` needs pyg-lib, which PyPI does not carry, so the DGCNN baseline is
PyG's ``EdgeConv`` with the graph rebuilt by ``torch_cluster.knn_graph`` before every layer (what
``DynamicEdgeConv`` does).

    python examples/point_cloud.py                          # GeometricShapes
    python examples/point_cloud.py --dataset generated      # 5 generated shapes (sphere, cube, ...)
    python examples/point_cloud.py --modelnet ~/data/ModelNet10   # local ModelNet10 (PATH/raw/<class>/...)
    python examples/point_cloud.py --quick                  # tiny sizes (tests)
"""
import argparse
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import MLP, EdgeConv, global_max_pool, global_mean_pool
from tqdm.auto import tqdm

from tmt_pyg import DynamicMesh, MeshAttentionConv
from tmt_pyg.data import dataset_root
from tmt_pyg.report import markdown_table

with warnings.catch_warnings():  # PyG 2.8 deprecates its torch-cluster route; we call torch-cluster directly
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch_cluster


# ------------------------------------------------------------------------------------------- data

def sphere(n: int, g: torch.Generator) -> Tensor:
    return F.normalize(torch.randn(n, 3, generator=g), dim=-1)


def cube(n: int, g: torch.Generator) -> Tensor:
    p = torch.rand(n, 3, generator=g) * 2 - 1
    axis = torch.randint(0, 3, (n,), generator=g)
    p[torch.arange(n), axis] = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1  # push onto a face
    return p


def cylinder(n: int, g: torch.Generator) -> Tensor:
    angle = torch.rand(n, generator=g) * 2 * math.pi
    z = torch.rand(n, generator=g) * 2 - 1
    radius = torch.ones(n)
    cap = torch.rand(n, generator=g) < 1 / 3  # caps hold 2*pi of the 6*pi surface
    radius[cap] = torch.rand(int(cap.sum()), generator=g).sqrt()
    z[cap] = z[cap].sign()
    return torch.stack([radius * angle.cos(), radius * angle.sin(), z], dim=-1)


def cone(n: int, g: torch.Generator) -> Tensor:
    angle = torch.rand(n, generator=g) * 2 * math.pi
    t = torch.rand(n, generator=g).sqrt()  # distance from the apex, area-uniform
    z = 1 - 2 * t
    base = torch.rand(n, generator=g) < 1 / (1 + math.sqrt(5))  # base disc vs lateral area
    t[base] = torch.rand(int(base.sum()), generator=g).sqrt()
    z[base] = -1.0
    return torch.stack([t * angle.cos(), t * angle.sin(), z], dim=-1)


def torus(n: int, g: torch.Generator) -> Tensor:
    u, v = torch.rand(2, n, generator=g) * 2 * math.pi
    ring = 1 + 0.35 * v.cos()
    return torch.stack([ring * u.cos(), ring * u.sin(), 0.35 * v.sin()], dim=-1)


SHAPES: Dict[str, Callable[[int, torch.Generator], Tensor]] = dict(
    sphere=sphere, cube=cube, cylinder=cylinder, cone=cone, torus=torus)


def random_rotation(g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * r.diagonal().sign()
    return q if torch.det(q) > 0 else -q


def make_shapes(num_clouds: int, num_points: int, noise: float, seed: int) -> List[Data]:
    """``num_clouds`` clouds (classes in turn), each (num_points, 3): scaled, rotated, noisy, centred, in the unit ball."""
    g = torch.Generator().manual_seed(seed)
    clouds = []
    for i in range(num_clouds):
        label = i % len(SHAPES)
        pos = list(SHAPES.values())[label](num_points, g) * (0.7 + 0.6 * torch.rand(3, generator=g))
        pos = pos @ random_rotation(g).t() + noise * torch.randn(num_points, 3, generator=g)
        pos = pos - pos.mean(0)
        clouds.append(Data(pos=pos / pos.norm(dim=-1).max(), y=torch.tensor([label])))
    return clouds


def load_geometric_shapes(num_points: int, repeat: int, seed: int, data_dir=None, cache_dir=None):
    """Training set: ``repeat`` augmented samples of every training mesh per epoch (drawn anew at each
    access); test set: ``repeat`` fixed samples of every test mesh."""
    from torch_geometric import transforms as T
    from torch_geometric.datasets import GeometricShapes
    root = str(dataset_root("geometric_shapes", data_dir, cache_dir))
    augment = T.Compose([T.SamplePoints(num_points), T.NormalizeScale(), T.RandomRotate(15, axis=0),
                         T.RandomRotate(15, axis=1), T.RandomRotate(15, axis=2), T.RandomScale((0.8, 1.2))])
    train = GeometricShapes(root, train=True, transform=augment)
    test = GeometricShapes(root, train=False, transform=T.Compose([T.SamplePoints(num_points), T.NormalizeScale()]))
    torch.manual_seed(seed)
    return ConcatDataset([train] * repeat), [test[i] for _ in range(repeat) for i in range(len(test))], train.num_classes


def load_modelnet(path: str, num_points: int):
    from torch_geometric.datasets import ModelNet
    from torch_geometric.transforms import NormalizeScale, SamplePoints
    if not (Path(path) / "raw" / "chair").is_dir():
        raise FileNotFoundError(f"--modelnet expects the extracted ModelNet10 at {path}/raw/<class>/{{train,test}}/*.off; "
                                "this example never downloads it")
    kw = dict(transform=SamplePoints(num_points), pre_transform=NormalizeScale())
    return ModelNet(path, "10", train=True, **kw), ModelNet(path, "10", train=False, **kw)


# ----------------------------------------------------------------------------------------- models

MODELS = ("mesh", "positions", "features", "block", "dgcnn")  # --models: the mesh net, with relative positions /
# features, as transformer blocks (attention + FFN), DGCNN


class MeshPointNet(nn.Module):
    """Embed points, then per layer: mesh from the current features (cosine kNN) -> pre-norm
    MeshAttentionConv (no decay: points have no time) with a residual; max+mean pool -> MLP. ``ffn``: each
    layer a transformer block instead (attention, then a pre-norm two-layer MLP of width 2 x hidden, each with
    its residual), so that every point also passes through a nonlinear map per layer. ``relative``: every edge's keys and values also encode where the source lies relative to the target (the
    conv's ``coord_channels``): ``"positions"`` ``pos_j - pos_i``, ``"features"`` the difference of the unit
    states the mesh was searched on (DGCNN's ``x_j - x_i``)."""

    def __init__(self, num_classes: int, hidden: int = 64, heads: int = 4, k: int = 16, layers: int = 3,
                 dropout: float = 0.5, relative: Optional[str] = None, ffn: bool = False):
        super().__init__()
        self.embed = MLP([3, hidden, hidden], norm=None)
        self.mesh = DynamicMesh(k, causal=False)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        if relative not in (None, "positions", "features"):
            raise ValueError(f"relative must be None, 'positions' or 'features', got {relative!r}")
        self.relative = relative
        coord_channels = {None: 0, "positions": 3, "features": hidden}[relative]
        self.convs = nn.ModuleList(MeshAttentionConv(hidden, hidden // heads, heads=heads, decay=False,
                                                     coord_channels=coord_channels) for _ in range(layers))
        self.ffns = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), MLP([hidden, 2 * hidden, hidden], act="gelu", norm=None))
                                  for _ in range(layers)) if ffn else None
        self.head = MLP([2 * hidden, hidden, num_classes], dropout=dropout, norm=None)

    def forward(self, pos: Tensor, batch: Tensor) -> Tensor:
        h = self.embed(pos)  # (N, hidden)
        for layer, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            edge_index, _ = self.mesh(h, batch)
            coord = F.normalize(h, dim=-1) if self.relative == "features" else pos if self.relative else None
            if self.ffns is None:
                h = h + F.gelu(conv(norm(h), edge_index, coord=coord))
            else:
                h = h + conv(norm(h), edge_index, coord=coord)
                h = h + self.ffns[layer](h)
        return self.head(torch.cat([global_max_pool(h, batch), global_mean_pool(h, batch)], dim=-1))


class DGCNN(nn.Module):
    """EdgeConv layers (max over ``MLP([x_i, x_j - x_i])``, batch norm and LeakyReLU(0.2) as in the
    paper) on a Euclidean kNN graph rebuilt from the current features before every layer; max+mean
    pool -> MLP."""

    def __init__(self, num_classes: int, hidden: int = 64, k: int = 20, layers: int = 3, dropout: float = 0.5):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList(
            EdgeConv(MLP([2 * (3 if i == 0 else hidden), hidden, hidden], act="leaky_relu",
                         act_kwargs=dict(negative_slope=0.2)), aggr="max")
            for i in range(layers))
        self.head = MLP([2 * hidden, hidden, num_classes], dropout=dropout, norm=None)

    def forward(self, pos: Tensor, batch: Tensor) -> Tensor:
        h = pos
        for conv in self.convs:
            edge_index = torch_cluster.knn_graph(h, self.k, batch=batch, loop=False, flow="source_to_target")
            h = conv(h, edge_index)
        return self.head(torch.cat([global_max_pool(h, batch), global_mean_pool(h, batch)], dim=-1))


# -------------------------------------------------------------------------------------- training

@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum(int((model(d.pos, d.batch).argmax(-1) == d.y).sum()) for d in loader)
    return correct / len(loader.dataset)


def train(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, epochs: int, lr: float,
          desc: str = "train", eval_every: int = 1) -> Dict:
    """Adam with a cosine learning rate to 0 over ``epochs``. Per epoch: mean training loss and
    accuracy over that epoch's (augmented, dropout-on) batches; every ``eval_every`` epochs and after
    the last, the test accuracy (a progress bar per run, ``desc`` its label)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    curve, train_time = [], 0.0
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for data in train_loader:
            opt.zero_grad()
            logits = model(data.pos, data.batch)
            loss = F.cross_entropy(logits, data.y)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * data.num_graphs
            correct += int((logits.argmax(-1) == data.y).sum())
            seen += data.num_graphs
        sched.step()
        train_time += time.perf_counter() - start  # training only: the test pass below is not timed
        curve.append(dict(epoch=epoch, train_loss=loss_sum / seen, train_acc=correct / seen))
        if epoch % eval_every == 0 or epoch == epochs:
            curve[-1]["test_acc"] = accuracy(model, test_loader)
            bar.set_postfix(loss=f"{curve[-1]['train_loss']:.3f}", test_acc=f"{curve[-1]['test_acc']:.3f}")
    return dict(params=sum(p.numel() for p in model.parameters()), train_time=train_time,
                epoch_time=train_time / epochs, train_loss=curve[-1]["train_loss"], train_acc=curve[-1]["train_acc"],
                test_acc=curve[-1]["test_acc"], curve=curve)


def summarize(runs: List[Dict]) -> Dict:
    """Mean and sample std over seeds of the final test accuracy; every seed's value kept."""
    accs = [r["test_acc"] for r in runs]
    return dict(params=runs[0]["params"], seeds=len(runs), test_acc=statistics.mean(accs),
                test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, test_accs=accs,
                train_loss=statistics.mean(r["train_loss"] for r in runs),
                train_acc=statistics.mean(r["train_acc"] for r in runs),
                epoch_time=statistics.mean(r["epoch_time"] for r in runs),
                train_time=statistics.mean(r["train_time"] for r in runs))


def plot_curves(runs: Dict[str, List[Dict]], path: Path) -> None:
    """Test accuracy and training loss against epoch, one line per (model, seed), a colour per model."""
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state
    fig = Figure(figsize=(12, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for colour, (name, rs) in enumerate(runs.items()):
        for seed, r in enumerate(rs):
            epochs = [c["epoch"] for c in r["curve"]]
            label = name if seed == 0 else None
            tested = [c for c in r["curve"] if "test_acc" in c]
            ax_acc.plot([c["epoch"] for c in tested], [c["test_acc"] for c in tested], color=f"C{colour}", lw=1, alpha=0.8,
                        label=label)
            ax_loss.plot(epochs, [c["train_loss"] for c in r["curve"]], color=f"C{colour}", lw=1, alpha=0.8, label=label)
    ax_acc.set(title="test accuracy (every seed)", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax_loss.set(title="training loss (augmented batches, dropout on)", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("geometric_shapes", "generated"), default="geometric_shapes")
    p.add_argument("--modelnet", metavar="PATH", help="use a local ModelNet10 instead")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--data-dir", help="folder holding geometric_shapes/raw (default: $TMT_DATA_DIR; none: PyG downloads)")
    p.add_argument("--cache-dir", help="writable copy of the dataset (default: $TMT_CACHE_DIR or ~/.cache/tmt_pyg)")
    p.add_argument("--points", type=int, default=256, help="points per cloud")
    p.add_argument("--repeat", type=int, default=4, help="GeometricShapes: samples of each mesh per epoch / in the test set")
    p.add_argument("--num-clouds", type=int, default=500, help="generated clouds (train+test)")
    p.add_argument("--noise", type=float, default=0.03, help="Gaussian noise on the generated points")
    p.add_argument("--epochs", type=int, default=150, help="training epochs (at batch 8 both models plateau by ~110)")
    p.add_argument("--batch-size", type=int, default=8, help="clouds per optimizer step (DGCNN's paper: 32, with "
                   "which the 160 clouds of an epoch make 5 steps, and 60 epochs leave both models far from converged)")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations (and after the last)")
    p.add_argument("--hidden", type=int, default=48, help="width of the TMT network")
    p.add_argument("--relative-hidden", type=int, default=44, help="width of the TMT network with relative "
                   "positions (44: about the parameters of the others, as its position encoders add 2.5k per layer)")
    p.add_argument("--features-hidden", type=int, default=40, help="width of the TMT network with relative features "
                   "(40: about the parameters of the others, as its encoders of feature differences add 3.3k per layer)")
    p.add_argument("--block-hidden", type=int, default=36, help="width of the TMT network of transformer blocks "
                   "(36: about the plain net's parameter count)")
    p.add_argument("--dgcnn-hidden", type=int, default=61, help="width of DGCNN (61 vs 48: about the same parameter count)")
    p.add_argument("--k", type=int, default=16, help="neighbours per point (DGCNN's paper: 20 of 1,024 points)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate (DGCNN's paper: 1e-3)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout in both classifier heads (DGCNN's paper: 0.5)")
    p.add_argument("--seeds", type=int, default=3, help="initialisations (and samplings) to average over")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which nets to run (default: all)")
    p.add_argument("--out", default="docs/results/point_cloud",
                   help="finished runs (tracked in git, so the study resumes on a fresh clone), summary.json and curves.png")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv=None) -> Dict[str, Dict]:
    args = argument_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_clouds, args.points, args.repeat, args.epochs, args.seeds = 60, 64, 1, 2, 1
        args.hidden, args.relative_hidden, args.features_hidden, args.block_hidden, args.dgcnn_hidden, args.k = 16, 16, 16, 16, 24, 8
    # what shapes a result (threads and paths do not); names the cache folder. The test evaluations count:
    # each draws the test loader's base seed from the global RNG, which the later training batches share
    settings = {key: getattr(args, key) for key in ("dataset", "modelnet", "quick", "points", "repeat", "num_clouds",
                                                    "noise", "epochs", "batch_size", "hidden", "dgcnn_hidden", "k",
                                                    "lr", "dropout", "eval_every")}
    out = Path(args.out) / hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    out.mkdir(parents=True, exist_ok=True)

    models = [("TMT mesh attention", "mesh", lambda: MeshPointNet(num_classes, args.hidden, k=args.k, dropout=args.dropout)),
              ("TMT mesh attention + relative positions", f"mesh-relative-w{args.relative_hidden}",
               lambda: MeshPointNet(num_classes, args.relative_hidden, k=args.k, dropout=args.dropout, relative="positions")),
              ("TMT mesh attention + relative features", f"mesh-features-w{args.features_hidden}",
               lambda: MeshPointNet(num_classes, args.features_hidden, k=args.k, dropout=args.dropout, relative="features")),
              ("TMT mesh attention, transformer blocks", f"mesh-block-w{args.block_hidden}",
               lambda: MeshPointNet(num_classes, args.block_hidden, k=args.k, dropout=args.dropout, ffn=True)),
              ("DGCNN (EdgeConv + knn_graph)", "dgcnn", lambda: DGCNN(num_classes, args.dgcnn_hidden, k=args.k,
                                                                       dropout=args.dropout))]
    models = [model for key, model in zip(MODELS, models) if key in args.models]
    runs = {name: [] for name, _, _ in models}
    for seed in range(args.seeds):
        if args.modelnet:
            train_set, test_set = load_modelnet(args.modelnet, args.points)
            num_classes, source = 10, f"ModelNet10 at {args.modelnet}"
        elif args.dataset == "geometric_shapes":
            train_set, test_set, num_classes = load_geometric_shapes(args.points, args.repeat, seed, args.data_dir, args.cache_dir)
            source = f"GeometricShapes ({num_classes} classes), {args.repeat} samples per mesh"
        else:
            clouds = make_shapes(args.num_clouds, args.points, args.noise, seed)
            split = int(0.7 * len(clouds))
            train_set, test_set, num_classes = clouds[:split], clouds[split:], len(SHAPES)
            source = f"{len(clouds)} generated clouds, {len(SHAPES)} shapes"
        for name, slug, build in models:
            path = out / f"{slug}-seed{seed}.json"
            if path.exists():
                runs[name].append(json.loads(path.read_text()))
                continue
            torch.manual_seed(seed)  # same initial RNG state and same batch order for both
            model = build()
            train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
            run = dict(seed=seed, threads=torch.get_num_threads(),
                       **train(model, train_loader, DataLoader(test_set, batch_size=64), args.epochs, args.lr,
                               desc=f"{slug} seed {seed}", eval_every=args.eval_every))
            staging = path.with_suffix(".tmp")
            staging.write_text(json.dumps(run, indent=1))
            staging.rename(path)  # atomic: an interrupted write never leaves a run that looks finished
            runs[name].append(run)
            print(f"{name}, seed {seed}: test acc {run['test_acc']:.3f}, {run['epoch_time']:.1f} s / epoch", flush=True)

    results = {name: summarize(rs) for name, rs in runs.items()}
    (out / "summary.json").write_text(json.dumps(dict(argv=argv if argv is not None else sys.argv[1:],
                                                      settings=settings, source=source, results=results), indent=1))
    plot_curves(runs, out / "curves.png")
    print(f"\n{source}, {args.points} points; train {len(train_set)} / test {len(test_set)} clouds, {args.epochs} epochs "
          f"of batch {args.batch_size}, k={args.k}, {args.seeds} seed(s), {torch.get_num_threads()} thread(s); "
          f"runs, summary.json and curves.png in {out}")
    print(markdown_table(["model", "params", "final train loss", "test acc (mean ± std)", "test acc per seed", "s / epoch"],
                         [(name, f"{r['params']:,}", f"{r['train_loss']:.3f}", f"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}",
                           " ".join(f"{a:.3f}" for a in r["test_accs"]), f"{r['epoch_time']:.1f}")
                          for name, r in results.items()]))
    return results


if __name__ == "__main__":
    main()
