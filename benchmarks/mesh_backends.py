"""DynamicMesh speed: the exact dense backend (blockwise matmul + top-k) against torch-cluster
(KD-tree on CPU), causal and bidirectional, on high-dimensional token states and on 3-D points;
also checks that both backends return the same edge set.

    python -m benchmarks.mesh_backends --threads 2
"""
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg.layers.mesh import DynamicMesh

NAME = "mesh_backends"
TIE = 1.10  # a backend "wins" only when more than 10 % faster; closer timings are within the noise


def cases(quick: bool) -> List[Dict]:
    """(kind, B, S, dim, k, causal) of every measured input."""
    if quick:
        tokens, points = [(2, 64), (1, 128)], [(2, 128, 3, 8)]
        d, k = 32, 4
    else:
        tokens, points = [(8, 256), (1, 1024), (1, 4096)], [(8, 1024, 3, 20), (8, 1024, 8, 20), (8, 1024, 16, 20)]
        d, k = 256, 8
    out = [dict(kind="token states", B=B, S=S, dim=d, k=k, causal=causal)
           for causal in (False, True) for B, S in tokens]
    out += [dict(kind="points", B=B, S=S, dim=dim, k=pk, causal=False) for B, S, dim, pk in points]
    B, S, dim, pk = points[0]
    out.append(dict(kind="points", B=B, S=S, dim=dim, k=pk, causal=True))
    return out


def edge_keys(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    return (edge_index[1] * num_nodes + edge_index[0]).sort().values


def measure(case: Dict, repeats: int, warmup: int, generator: torch.Generator) -> Dict:
    B, S, dim, k, causal = case["B"], case["S"], case["dim"], case["k"], case["causal"]
    x = torch.randn(B * S, dim, generator=generator)  # continuous random states: no exact ties
    batch = torch.arange(B).repeat_interleave(S)
    row = dict(case)
    meshes = {backend: DynamicMesh(k, causal=causal, backend=backend) for backend in ("dense", "cluster")}
    with torch.no_grad():
        edges = {backend: edge_keys(mesh(x, batch)[0], x.size(0)) for backend, mesh in meshes.items()}
        timing = time_interleaved({backend: (lambda mesh=mesh: mesh(x, batch)) for backend, mesh in meshes.items()},
                                  repeats, warmup)
    for backend, t in timing.items():
        row[f"{backend}_ms"], row[f"{backend}_min_ms"] = t["median_ms"], t["min_ms"]
    dense, cluster = edges["dense"], edges["cluster"]
    row["edges"] = int(dense.numel())
    row["edge_mismatches"] = int((~torch.isin(dense, cluster)).sum()) + int((~torch.isin(cluster, dense)).sum())
    row["same_edges"] = row["edge_mismatches"] == 0 and dense.numel() == cluster.numel()
    row["cluster_over_dense"] = row["cluster_ms"] / row["dense_ms"]
    ratio = row["cluster_over_dense"]
    row["faster"] = "dense" if ratio > TIE else "cluster" if ratio < 1 / TIE else "tie"
    row["auto"] = DynamicMesh(k, causal=causal, backend="auto").resolve_backend(dim)
    row["auto_is_faster"] = row["faster"] in (row["auto"], "tie")
    return row


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    info = setup(args)
    generator = torch.Generator().manual_seed(args.seed)
    rows = [measure(case, args.repeats, args.warmup, generator) for case in cases(args.quick)]

    table = markdown_table(
        ["input", "B × S", "dim", "k", "mesh", "dense ms", "cluster ms", "cluster / dense", "same edges", "faster", "auto picks", "auto ok"],
        [(r["kind"], f"{r['B']} × {r['S']}", r["dim"], r["k"], "causal" if r["causal"] else "bidirectional",
          r["dense_ms"], r["cluster_ms"], f"{r['cluster_over_dense']:.2f}x",
          "yes" if r["same_edges"] else f"NO ({r['edge_mismatches']} differ)", r["faster"], r["auto"],
          "yes" if r["auto_is_faster"] else "**no**") for r in rows])
    all_same = all(r["same_edges"] for r in rows)
    rule_holds = all(r["auto_is_faster"] for r in rows)
    misses = [f"{r['kind']} {r['B']}×{r['S']} dim {r['dim']} {'causal' if r['causal'] else 'bidirectional'} "
              f"(auto: {r['auto']}, faster: {r['faster']}, {max(r['cluster_over_dense'], 1 / r['cluster_over_dense']):.2f}x)"
              for r in rows if not r["auto_is_faster"]]
    verdict = [f"Edge sets of the two backends identical on every input: **{'yes' if all_same else 'no'}**.",
               "The `auto` rule (torch-cluster for bidirectional inputs with dim <= 8, dense otherwise) picks the "
               "faster backend (or one within 10 %) on every input: " + ("**yes**." if rule_holds else "**no**: " + "; ".join(misses) + ".")]
    report = [              f"DynamicMesh forward (normalise + kNN + self edges), median of {args.repeats} runs (the two "
              f"backends called alternately) after {args.warmup} warm-up, inputs `torch.randn` (token states d={rows[0]['dim']}), no grad.",
              table] + verdict

    fig, (ax,) = new_figure(width=9, height=0.45 * len(rows) + 1.5)
    labels = [f"{r['kind'][:6]} {r['B']}×{r['S']} d{r['dim']} {'causal' if r['causal'] else 'bidir'}" for r in rows]
    ys = torch.arange(len(rows)).float()
    ax.barh(ys - 0.2, [r["dense_ms"] for r in rows], height=0.4, label="dense (matmul + top-k)")
    ax.barh(ys + 0.2, [r["cluster_ms"] for r in rows], height=0.4, label="torch-cluster")
    ax.set_yticks(ys.tolist(), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set(xlabel="DynamicMesh forward (ms, median)", title=f"mesh backends, {args.threads} threads")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return finish(NAME, args, info, report, {"rows": rows, "all_same_edges": all_same, "auto_rule_holds": rule_holds},
                  fig, argv=argv)


if __name__ == "__main__":
    main()
