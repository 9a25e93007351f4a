"""Throughput against the sequence length: fused-SDPA vanilla, TMT with the exact mesh search (over all
heads' queries and keys, and over one head's: ``search_heads=1``) and TMT with the routed search
(``mesh_search="routed"``), at equal parameters, plus one layer's mesh search alone. Targets, TMT / vanilla tokens/s: inference >= 1.0x / 2x / 4x and training
>= 1.0x / 1.5x / 3x at S = 1024 / 4096 / 16384.

    python -m benchmarks.search_scaling --threads 2
"""
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from benchmarks.speed import train_step
from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.layers.mesh import DynamicMesh

NAME = "search_scaling"
TARGETS = {"infer": {1024: 1.0, 4096: 2.0, 16384: 4.0}, "train": {1024: 1.0, 4096: 1.5, 16384: 3.0}}


def configs(size: Dict) -> Dict[str, TMTConfig]:
    exact = TMTConfig(**size)
    vanilla = match_parameters(TMTConfig.vanilla(**size), count_parameters(exact))
    return {"vanilla": vanilla, "TMT, exact search": exact, "TMT, exact search, 1 head": replace(exact, search_heads=1),
            "TMT, routed search": replace(exact, mesh_search="routed")}


def search_times(S: int, tokens: int, cfg: TMTConfig, args, generator: torch.Generator) -> Dict[str, float]:
    """One layer's mesh search (attention similarity, window): exact over all heads, exact over one head's
    D / H dimensions, routed; median ms."""
    B, D, C = max(1, tokens // S), cfg.d_model, cfg.d_model // cfg.n_heads
    keys, queries = (F.normalize(torch.randn(B * S, D, generator=generator), dim=-1) for _ in range(2))
    exact = DynamicMesh(cfg.graph_k, causal=True, window=cfg.mesh_window, backend="dense")
    routed = DynamicMesh(cfg.graph_k, causal=True, window=cfg.mesh_window, search="routed", route_block=cfg.route_block,
                         route_top=cfg.route_top)
    searches = {"exact": lambda: exact.slots(keys, seq_len=S, query_x=queries),
                "exact, 1 head": lambda: exact.slots(keys[:, :C], seq_len=S, query_x=queries[:, :C]),
                "routed": lambda: routed.slots(keys, seq_len=S, query_x=queries)}
    timing = time_interleaved(searches, args.repeats, args.warmup)
    return {name: t["median_ms"] for name, t in timing.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = max(1, tokens // S)")
    parser.add_argument("--train-max", type=int, default=16384, help="longest S timed in training")
    parser.add_argument("--exact-max", type=int, default=16384, help="longest S run with the exact search")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.tokens, args.repeats, args.train_max, args.exact_max = [128, 256], 256, 1, 256, 128
        size = dict(d_model=64, n_heads=4, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=128, route_block=16)
    else:
        size = dict(d_model=256, n_heads=8, n_layers=4, graph_k=8)
    info = setup(args)
    cfgs = configs(size)
    generator = torch.Generator().manual_seed(args.seed)
    rows, search = [], []
    for S in args.seq_lens:
        B = max(1, args.tokens // S)
        names = [n for n in cfgs if S <= args.exact_max or "exact" not in n]
        models = {n: TMTModel(replace(cfgs[n], max_seq_len=S)) for n in names}
        ids = torch.randint(0, size.get("vocab_size", 256), (B, S), generator=generator)
        train = {}
        if S <= args.train_max:
            steps = {n: train_step(m.train(), m.configure_optimizers(0.1, 1e-4), ids) for n, m in models.items()}
            train = time_interleaved(steps, args.repeats, args.warmup)
        with torch.no_grad():
            infer = time_interleaved({n: (lambda m=m.eval(): m(ids)) for n, m in models.items()}, args.repeats, args.warmup)
        for n in names:
            rows.append({"model": n, "S": S, "B": B, "params": models[n].num_parameters(),
                         "infer_tokens_per_s": B * S / infer[n]["median_ms"] * 1e3,
                         "train_tokens_per_s": B * S / train[n]["median_ms"] * 1e3 if train else None})
        if S <= args.exact_max:
            search.append({"S": S, "B": B, **search_times(S, args.tokens, cfgs["TMT, exact search"], args, generator)})
        del models
    ratios, checks = [], []
    for S in args.seq_lens:
        at = {r["model"]: r for r in rows if r["S"] == S}
        for n in at:
            if n == "vanilla":
                continue
            ratio = {w: at[n][f"{w}_tokens_per_s"] / at["vanilla"][f"{w}_tokens_per_s"]
                     for w in ("infer", "train") if at[n][f"{w}_tokens_per_s"] is not None}
            ratios.append({"S": S, "model": n, **ratio})
            for w, value in ratio.items():
                if S in TARGETS[w] and "routed" in n:
                    checks.append({"S": S, "what": w, "ratio": value, "target": TARGETS[w][S], "holds": value >= TARGETS[w][S]})
    routed = cfgs["TMT, routed search"]
    fmt = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    report = [f"d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, k={size['graph_k']}, window "
              f"{routed.mesh_window}, attention-similarity mesh; routed search: blocks of {routed.route_block} positions, "
              f"{routed.route_top} routed blocks + the own block per token. Vanilla: fused SDPA, MLP width matched to the "
              f"TMT's parameters. B = max(1, {args.tokens} // S). Training = forward + backward + AdamW step (up to "
              f"S={args.train_max}); inference = eval forward under no_grad (exits on, untrained gates rarely fire); the "
              f"exact search up to S={args.exact_max}. Median of {args.repeats} after {args.warmup} warm-up, the models "
              "called alternately.",
              markdown_table(["S", "B", "model", "params", "train tokens/s", "infer tokens/s"],
                             [(r["S"], r["B"], r["model"], f"{r['params']:,}", r["train_tokens_per_s"] or "", r["infer_tokens_per_s"])
                              for r in rows]),
              markdown_table(["S", "model", "training / vanilla", "inference / vanilla"],
                             [(r["S"], r["model"], fmt(r.get("train")), fmt(r.get("infer"))) for r in ratios]),
              markdown_table(["S", "routed TMT / vanilla", "measured", "target", ""],
                             [(c["S"], c["what"], f"{c['ratio']:.2f}x", f">= {c['target']}x", "holds" if c["holds"] else "**missed**")
                              for c in checks]),
              "One layer's mesh search alone (random unit keys and queries, the same B and S), median ms:",
              markdown_table(["S", "B", "exact ms", "exact, 1 head ms", "routed ms", "exact / routed"],
                             [(s["S"], s["B"], s["exact"], s["exact, 1 head"], s["routed"], f"{s['exact'] / s['routed']:.2f}x")
                              for s in search])]
    fig, axes = new_figure(ncols=2, width=5.5)
    for n in cfgs:
        mine = [r for r in rows if r["model"] == n]
        axes[0].plot([r["S"] for r in mine if r["train_tokens_per_s"]], [r["train_tokens_per_s"] for r in mine if r["train_tokens_per_s"]], "o-", label=n)
        axes[1].plot([r["S"] for r in mine], [r["infer_tokens_per_s"] for r in mine], "o-", label=n)
    for ax, title in zip(axes, ("training", "inference")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length S", ylabel="tokens/s", title=f"{title}, {args.threads} threads")
        ax.grid(alpha=0.3)
        ax.legend()
    return finish(NAME, args, info, report, {"configs": {n: asdict(c) for n, c in cfgs.items()}, "rows": rows,
                                             "ratios": ratios, "checks": checks, "search": search}, fig, argv=argv)


if __name__ == "__main__":
    main()
