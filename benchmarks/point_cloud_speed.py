"""Training-step time of the point-cloud example's nets, called alternately: the mesh net, the mesh net with
relative positions or features (``MeshAttentionConv(coord_channels=...)``) and DGCNN, each at the example's default
size (about 37-38k parameters), on batches of ``--batch-size`` clouds of ``--points`` points (GeometricShapes'
training epoch: 160 clouds, so 20 steps of 8). One step: forward, cross-entropy, backward, Adam. Point
positions are random (the cost depends on the sizes only). Median ms per step, and per epoch.

    python -m benchmarks.point_cloud_speed --threads 1 --repeats 20
"""
import importlib.util
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved

NAME = "point_cloud_speed"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "point_cloud.py"


def example():
    """``examples/point_cloud.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("point_cloud", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nets(pc, defaults: Dict, classes: int) -> Dict[str, torch.nn.Module]:
    """The example's (module ``pc``) nets at its default widths and k (``defaults``: its parsed arguments)."""
    d = defaults
    return {"mesh": pc.MeshPointNet(classes, d.hidden, k=d.k, dropout=d.dropout),
            "mesh + relative positions": pc.MeshPointNet(classes, d.relative_hidden, k=d.k, dropout=d.dropout,
                                                         relative="positions"),
            "mesh + relative features": pc.MeshPointNet(classes, d.features_hidden, k=d.k, dropout=d.dropout,
                                                        relative="features"),
            "DGCNN": pc.DGCNN(classes, d.dgcnn_hidden, k=d.k, dropout=d.dropout)}


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, pos: torch.Tensor, batch: torch.Tensor,
                  y: torch.Tensor):
    def step():
        opt.zero_grad()
        F.cross_entropy(model(pos, batch), y).backward()
        opt.step()
    return step


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=20)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=20, help="GeometricShapes: 4 x 40 clouds / 8")
    args = parser.parse_args(argv)
    info = setup(args)
    pc = example()
    defaults = pc.argument_parser().parse_args([])
    if args.quick:
        defaults.hidden, defaults.relative_hidden, defaults.features_hidden, defaults.dgcnn_hidden, defaults.k = 16, 16, 16, 24, 8
        args.points, args.batch_size, args.repeats = 32, 2, 2
    torch.manual_seed(args.seed)
    classes = 40
    pos = torch.rand(args.batch_size * args.points, 3) * 2 - 1
    batch = torch.arange(args.batch_size).repeat_interleave(args.points)
    y = torch.randint(0, classes, (args.batch_size,))
    models = nets(pc, defaults, classes)
    steps = {name: training_step(m.train(), torch.optim.Adam(m.parameters(), lr=1e-3), pos, batch, y)
             for name, m in models.items()}
    times = time_interleaved(steps, args.repeats, args.warmup)
    base = times["DGCNN"]["median_ms"]
    rows = {name: {"params": sum(p.numel() for p in models[name].parameters()), "step_ms": t["median_ms"],
                   "epoch_s": t["median_ms"] * args.steps_per_epoch / 1e3, "vs_dgcnn": t["median_ms"] / base}
            for name, t in times.items()}
    report = [f"{args.batch_size} clouds x {args.points} points per step, k={defaults.k}, median of {args.repeats} "
              f"alternating steps, {info['torch_threads']} thread(s); an epoch = {args.steps_per_epoch} steps.",
              markdown_table(["net", "params", "ms / training step", "s / epoch", "vs DGCNN"],
                             [(name, f"{r['params']:,}", f"{r['step_ms']:.0f}", f"{r['epoch_s']:.2f}", f"{r['vs_dgcnn']:.2f}x")
                              for name, r in rows.items()])]
    fig, (ax,) = new_figure(width=6.0, height=2.5)
    ax.barh(list(rows), [r["epoch_s"] for r in rows.values()], color=[f"C{i}" for i in range(len(rows))])
    ax.invert_yaxis()
    ax.set(xlabel=f"seconds per training epoch ({args.steps_per_epoch} steps, median)", title="point-cloud nets")
    return finish(NAME, args, info, report, {"rows": rows, "times": times}, fig, argv=argv)


if __name__ == "__main__":
    main()
