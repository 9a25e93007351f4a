"""GPS layers on growing graphs: PyG's GPSConv (dense multi-head attention over all node pairs)
against MeshGPSConv (attention over the k-NN mesh of the node states: the fused slot attention, the
exact search up to --exact-max-nodes nodes, the tree search above): time of one training step
(forward + backward), its peak memory and the mesh's neighbour recall against the exact search, each
measurement in a fresh process.

    python -m benchmarks.gps_scaling --threads 2
    python -m benchmarks.gps_scaling --quick

The full run (1k to 64k nodes, dense GPSConv measured up to --dense-max = 16k nodes, estimated beyond)
belongs on a quiet machine: the targets it prints are ratios of two timings.
"""
import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg.layers.mesh import available_memory

NAME = "gps_scaling"
MODELS = ("GPSConv (dense)", "MeshGPSConv")
GiB = 2 ** 30
TARGETS = ((4096, 1.0, "MeshGPSConv step <= 1.0x GPSConv's"), (16384, 1 / 3, "MeshGPSConv >= 3x faster than GPSConv"))


def random_graph(num_nodes: int, degree: int, channels: int, seed: int, community: int = 64):
    """Node features (N, channels) around ``N / community`` random centres (noise 0.5 per channel: groups
    of similar nodes, what a mesh can find) and an undirected random graph with about ``degree`` edges per node."""
    from torch_geometric.utils import coalesce, to_undirected
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_nodes, (2, num_nodes * degree // 2), generator=g)
    edge_index = coalesce(to_undirected(edge_index, num_nodes=num_nodes), num_nodes=num_nodes)
    centres = torch.randn(max(1, num_nodes // community), channels, generator=g)
    x = centres[torch.randint(0, centres.size(0), (num_nodes,), generator=g)]
    return x + 0.5 * torch.randn(num_nodes, channels, generator=g), edge_index


def build(model: str, channels: int, heads: int, k: int, exact_max_nodes: int) -> torch.nn.Module:
    from torch_geometric.nn import GCNConv, GPSConv

    from tmt_pyg import MeshGPSConv
    if model == MODELS[0]:
        return GPSConv(channels, GCNConv(channels, channels), heads=heads, attn_type="multihead")
    return MeshGPSConv(channels, GCNConv(channels, channels), heads=heads, k=k, exact_max_nodes=exact_max_nodes)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_here(model: str, num_nodes: int, args) -> Dict:
    """One model on one graph size, in this process: median step time (ms) and peak memory above
    the memory held before the graph and the layer existed (ru_maxrss is this process's high-water mark)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    before = rss_bytes()
    x, edge_index = random_graph(num_nodes, args.degree, args.channels, args.seed)
    layer = build(model, args.channels, args.heads, args.k, args.exact_max_nodes)
    x.requires_grad_()

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x, edge_index).square().mean().backward()

    timing = time_interleaved({model: step}, args.repeats, args.warmup)[model]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    row = {"model": model, "nodes": num_nodes, "edges": edge_index.size(1), "step_ms": timing["median_ms"],
           "peak_gib": (peak - before) / GiB}
    if model == MODELS[1]:  # None: the exact search (recall 1)
        row["recall"] = layer.mesh.recall(x, args.recall_queries, args.seed) if num_nodes > args.exact_max_nodes else None
    return row


def measure(model: str, num_nodes: int, args) -> Dict:
    """:func:`measure_here` in a fresh process, so that each peak is its own."""
    command = [sys.executable, "-m", "benchmarks.gps_scaling", "--child", model, str(num_nodes),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--seed", str(args.seed), "--channels", str(args.channels), "--heads", str(args.heads),
               "--k", str(args.k), "--degree", str(args.degree), "--exact-max-nodes", str(args.exact_max_nodes),
               "--recall-queries", str(args.recall_queries)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{model} at {num_nodes} nodes failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def power_law_estimate(rows: List[Dict], key: str, num_nodes: int) -> float:
    """``key`` at ``num_nodes`` extrapolated from the two largest measured sizes by a power law
    ``c * N^p`` through both (p fitted per quantity: PyTorch's fused attention kernels keep the
    memory of dense attention far below the N^2 of materialised weights)."""
    prev, last = sorted(rows, key=lambda r: r["nodes"])[-2:]
    exponent = math.log(last[key] / prev[key]) / math.log(last["nodes"] / prev["nodes"])
    return last[key] * (num_nodes / last["nodes"]) ** exponent


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                        help="node counts")
    parser.add_argument("--dense-max", type=int, default=16384,
                        help="largest node count run with dense attention; beyond it time and memory are estimated")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--k", type=int, default=16, help="mesh neighbours per node")
    parser.add_argument("--degree", type=int, default=10, help="mean degree of the generated graph")
    parser.add_argument("--exact-max-nodes", type=int, default=4096,
                        help="largest graph MeshGPSConv searches exactly (the tree search above)")
    parser.add_argument("--recall-queries", type=int, default=2048, help="nodes the neighbour recall is measured on")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "NODES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_here(args.child[0], int(args.child[1]), args)))
        return {}
    if args.quick:
        args.sizes, args.dense_max, args.repeats, args.warmup, args.exact_max_nodes = [256, 512, 1024], 512, 1, 1, 512
    info = setup(args)
    limit_gib = available_memory(torch.device("cpu")) / GiB  # dense rows estimated above it do not fit

    rows = {model: [] for model in MODELS}
    for num_nodes in args.sizes:
        for model in MODELS:
            dense = model == MODELS[0]
            if dense and (num_nodes > args.dense_max or
                          (len(rows[model]) > 1 and power_law_estimate(rows[model], "peak_gib", num_nodes) > limit_gib)):
                continue
            rows[model].append(measure(model, num_nodes, args))
            print(rows[model][-1], flush=True)
    measured = rows[MODELS[0]]
    estimates = [{"nodes": n, "step_ms": power_law_estimate(measured, "step_ms", n),
                  "peak_gib": power_law_estimate(measured, "peak_gib", n)}
                 for n in args.sizes if n not in {r["nodes"] for r in measured} and len(measured) > 1]
    for r in estimates:
        r["fits"] = r["peak_gib"] <= limit_gib

    def cells(r: Optional[Dict], estimated: bool = False):
        if r is None:
            return ["-", "-"]
        if estimated and not r["fits"]:
            return [f"does not fit ({r['peak_gib']:.3g} GiB est. > {limit_gib:.3g} GiB)"] * 2
        mark = " (est.)" if estimated else ""
        return [f"{r['step_ms']:,.0f} ms{mark}", f"{r['peak_gib']:.3f} GiB{mark}"]

    dense = {r["nodes"]: r for r in measured}
    guess = {r["nodes"]: r for r in estimates}
    mesh = {r["nodes"]: r for r in rows[MODELS[1]]}
    table = markdown_table(
        ["nodes", "edges", "GPSConv step", "GPSConv peak", "MeshGPSConv step", "MeshGPSConv peak", "mesh recall", "speed-up"],
        [[f"{n:,}", f"{mesh[n]['edges']:,}"] + cells(dense.get(n) or guess.get(n), n not in dense) + cells(mesh[n])
         + ["exact" if mesh[n]["recall"] is None else f"{mesh[n]['recall']:.3f}", speed_up(dense, guess, mesh[n])]
         for n in args.sizes])
    report = [f"One GPS layer ({args.channels} channels, {args.heads} heads, GCNConv as local conv), one graph of N "
              f"nodes with random edges (mean degree {args.degree}) and node features around N/64 random centres, "
              f"one training step (forward + backward of `out.square().mean()`), median of {args.repeats} after "
              f"{args.warmup} warm-up; MeshGPSConv with k={args.k}: the exact search up to {args.exact_max_nodes:,} "
              "nodes, the tree search (4 trees, leaves of 256) above, its neighbour recall against the exact search "
              f"on {args.recall_queries:,} random nodes. Peak: the process's resident-memory high-water mark above what "
              "it held before the graph and the layer were made, every measurement in a fresh process. "
              f"Dense attention ran up to {args.dense_max:,} nodes; larger rows marked (est.) extrapolate its two "
              "largest measured rows by a power law fitted to each column; \"does not fit\" marks an estimated peak "
              f"above the {limit_gib:.1f} GiB of memory available at the start (MemAvailable).", table,
              "Targets: " + "; ".join(target_lines(dense, guess, mesh)) + "."]

    fig, axes = new_figure(ncols=2, width=5)
    for model, style in zip(MODELS, ("o-", "s-")):
        ns = [r["nodes"] for r in rows[model]]
        axes[0].plot(ns, [r["step_ms"] / 1e3 for r in rows[model]], style, label=model)
        axes[1].plot(ns, [r["peak_gib"] for r in rows[model]], style, label=model)
    if estimates:
        for ax, key, scale in ((axes[0], "step_ms", 1e3), (axes[1], "peak_gib", 1)):
            ax.plot([r["nodes"] for r in estimates], [r[key] / scale for r in estimates], "o:", color="C0",
                    label="GPSConv (estimated)")
    for ax, label in zip(axes, ("training step (s)", "peak memory (GiB)")):
        ax.set(xscale="log", yscale="log", xlabel="nodes", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    return finish(NAME, args, info, report, {"rows": rows, "dense_estimates": estimates, "memory_limit_gib": limit_gib},
                  fig, argv=argv)


def speed_up(dense: Dict, guess: Dict, mesh_row: Dict) -> str:
    """GPSConv's step time over MeshGPSConv's at one size (dense estimated where not measured)."""
    n = mesh_row["nodes"]
    reference = dense.get(n) or guess.get(n)
    if reference is None:
        return "-"
    return f"{reference['step_ms'] / mesh_row['step_ms']:.2f}x" + ("" if n in dense else " (est.)")


def target_lines(dense: Dict, guess: Dict, mesh: Dict) -> List[str]:
    """The targets against this run: the step-time ratios at 4k and 16k nodes, and the growth of
    MeshGPSConv's peak from 4k nodes (or the smallest size) to the largest against the growth of the nodes
    (linear: within 1.25x of it)."""
    lines = []
    for n, bound, text in TARGETS:
        if n in mesh and (n in dense or n in guess):
            ratio = mesh[n]["step_ms"] / (dense.get(n) or guess[n])["step_ms"]
            met = "met" if ratio <= bound else "missed"
            lines.append(f"{text} at {n:,} nodes: {ratio:.2f}x ({met}{'' if n in dense else ', dense estimated'})")
    sizes = sorted(mesh)
    if len(sizes) < 2:
        return lines
    first = next((n for n in sizes if n >= TARGETS[0][0]), sizes[0])  # above the small sizes' fixed overhead
    last = sizes[-1]
    growth = mesh[last]["peak_gib"] / max(mesh[first]["peak_gib"], 1e-9)
    lines.append(f"MeshGPSConv memory linear in the nodes: its peak grows {growth:.1f}x from {first:,} to {last:,} nodes "
                 f"({last / first:.0f}x the nodes; {'met' if growth <= 1.25 * last / first else 'missed'})")
    return lines


if __name__ == "__main__":
    main()
