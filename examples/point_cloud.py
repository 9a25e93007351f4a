"""Point-cloud shape classification: DynamicMesh + MeshAttentionConv next to DGCNN (EdgeConv).

Default data: PyG's GeometricShapes (40 classes of 2-D/3-D meshes, one training and one test mesh
each), read from ``../shared/data/geometric_shapes`` (copied to ``~/.cache/tmt_pyg`` once; PyG
downloads it when no local copy exists). As PyG users do, ``SamplePoints`` draws a fresh point cloud
from each mesh surface at every access; training clouds are also randomly rotated (up to 15 degrees
about each axis) and scaled, and every epoch sees ``--repeat`` samples of each training mesh. The
test set is ``--repeat`` samples of each test mesh, drawn with a fixed seed.

Both networks rebuild a kNN graph before every layer from the current point features, train for the
same epochs with the same batches, and are sized to about the same parameter count.

PyG 2.8's ``DynamicEdgeConv`` needs pyg-lib, which PyPI does not carry, so the DGCNN baseline is
PyG's ``EdgeConv`` with the graph rebuilt by ``torch_cluster.knn_graph`` before every layer (what
``DynamicEdgeConv`` does).

    python examples/point_cloud.py                          # GeometricShapes
    python examples/point_cloud.py --dataset generated      # 5 generated shapes (sphere, cube, ...)
    python examples/point_cloud.py --modelnet ~/data/ModelNet10   # local ModelNet10 (PATH/raw/<class>/...)
    python examples/point_cloud.py --quick                  # tiny sizes (tests)
"""
import argparse
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import MLP, EdgeConv, global_max_pool, global_mean_pool

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

class MeshPointNet(nn.Module):
    """Embed points, then per layer: mesh from the current features (cosine kNN) -> pre-norm
    MeshAttentionConv (no decay: points have no time) with a residual; max+mean pool -> MLP."""

    def __init__(self, num_classes: int, hidden: int = 64, heads: int = 4, k: int = 16, layers: int = 3):
        super().__init__()
        self.embed = MLP([3, hidden, hidden], norm=None)
        self.mesh = DynamicMesh(k, causal=False)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.convs = nn.ModuleList(MeshAttentionConv(hidden, hidden // heads, heads=heads, decay=False) for _ in range(layers))
        self.head = MLP([2 * hidden, hidden, num_classes], dropout=0.3, norm=None)

    def forward(self, pos: Tensor, batch: Tensor) -> Tensor:
        h = self.embed(pos)  # (N, hidden)
        for norm, conv in zip(self.norms, self.convs):
            edge_index, _ = self.mesh(h, batch)
            h = h + F.gelu(conv(norm(h), edge_index))
        return self.head(torch.cat([global_max_pool(h, batch), global_mean_pool(h, batch)], dim=-1))


class DGCNN(nn.Module):
    """EdgeConv layers (max over ``MLP([x_i, x_j - x_i])``) on a Euclidean kNN graph rebuilt from the
    current features before every layer; max+mean pool -> MLP."""

    def __init__(self, num_classes: int, hidden: int = 64, k: int = 16, layers: int = 3):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList(EdgeConv(MLP([2 * (3 if i == 0 else hidden), hidden, hidden], norm=None), aggr="max")
                                   for i in range(layers))
        self.head = MLP([2 * hidden, hidden, num_classes], dropout=0.3, norm=None)

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


def train(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, epochs: int, lr: float) -> Dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for data in train_loader:
            opt.zero_grad()
            F.cross_entropy(model(data.pos, data.batch), data.y).backward()
            opt.step()
        sched.step()
    train_time = time.perf_counter() - start
    return dict(params=sum(p.numel() for p in model.parameters()), train_time=train_time,
                train_acc=accuracy(model, train_loader), test_acc=accuracy(model, test_loader))


def main(argv=None) -> Dict[str, Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("geometric_shapes", "generated"), default="geometric_shapes")
    p.add_argument("--modelnet", metavar="PATH", help="use a local ModelNet10 instead")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--data-dir", help="folder holding geometric_shapes/raw (default: $TMT_DATA_DIR or ../shared/data)")
    p.add_argument("--cache-dir", help="writable copy of the dataset (default: $TMT_CACHE_DIR or ~/.cache/tmt_pyg)")
    p.add_argument("--points", type=int, default=256, help="points per cloud")
    p.add_argument("--repeat", type=int, default=8, help="GeometricShapes: samples of each mesh per epoch / in the test set")
    p.add_argument("--num-clouds", type=int, default=500, help="generated clouds (train+test)")
    p.add_argument("--noise", type=float, default=0.03, help="Gaussian noise on the generated points")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--hidden", type=int, default=48, help="width of the TMT network")
    p.add_argument("--dgcnn-hidden", type=int, default=62, help="width of DGCNN (62 vs 48: about the same parameter count)")
    p.add_argument("--k", type=int, default=16, help="neighbours per point")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3, help="initialisations (and samplings) to average over")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num_clouds, args.points, args.repeat, args.epochs, args.seeds = 60, 64, 1, 2, 1
        args.hidden, args.dgcnn_hidden, args.k = 16, 24, 8

    models = [("TMT mesh attention", lambda: MeshPointNet(num_classes, args.hidden, k=args.k)),
              ("DGCNN (EdgeConv + knn_graph)", lambda: DGCNN(num_classes, args.dgcnn_hidden, k=args.k))]
    runs = {name: [] for name, _ in models}
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
        for name, build in models:
            torch.manual_seed(seed)  # same initial RNG state and same batch order for both
            model = build()
            train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
            runs[name].append(train(model, train_loader, DataLoader(test_set, batch_size=64), args.epochs, args.lr))

    results = {}
    for name, rs in runs.items():
        accs = [r["test_acc"] for r in rs]
        results[name] = dict(params=rs[0]["params"], train_acc=statistics.mean(r["train_acc"] for r in rs),
                             test_acc=statistics.mean(accs), test_acc_std=statistics.pstdev(accs),
                             train_time=statistics.mean(r["train_time"] for r in rs))
    print(f"\n{source}, {args.points} points; train {len(train_set)} / test {len(test_set)} clouds, {args.epochs} epochs, "
          f"k={args.k}, {args.seeds} seed(s), {torch.get_num_threads()} thread(s)")
    print(markdown_table(["model", "params", "train acc", "test acc (mean ± std)", "train time / run"],
                         [(name, f"{r['params']:,}", f"{r['train_acc']:.3f}", f"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}",
                           f"{r['train_time']:.1f} s") for name, r in results.items()]))
    return results


if __name__ == "__main__":
    main()
