"""Forward time and counted FLOPs against the fraction of tokens that exit after layer 1.

The exit fraction is forced honestly: a forward hook replaces the first block's exit-gate output by
a fixed confidence vector (a random subset of tokens at 1.0, the rest at 0.0) and the later gates'
by 0, so exactly that subset is frozen and skipped in layers 2..L (eval mode, exits on).
Target: at 50 % exited, forward time <= 0.66x the no-exit time (floor 0.625x).

    python -m benchmarks.exit_speed --threads 2
"""
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (base_parser, breakdown_markdown, finish, markdown_table, model_labels, new_figure,
                               profile_breakdown, setup, time_interleaved)
from tmt_pyg import TMTConfig, TMTModel

NAME = "exit_speed"
FRACTIONS = (0.0, 0.25, 0.5, 0.75)
TARGET_FRACTION, TARGET_RATIO = 0.5, 0.66


@contextmanager
def forced_exits(model: TMTModel, exit_index: torch.Tensor, num_tokens: int):
    """Hooks that make exactly ``exit_index`` exit after the first block, and nothing else later."""
    fixed = torch.zeros(num_tokens)
    fixed[exit_index] = 1.0
    gates = [b.exit_gate for b in model.blocks if b.exit_gate is not None]

    def first(module, inputs, output):
        assert output.shape == fixed.shape, "the first gate must see every token"
        return fixed.to(output)  # its dtype and device

    def later(module, inputs, output):
        return torch.zeros_like(output)

    handles = [gates[0].register_forward_hook(first)] + [g.register_forward_hook(later) for g in gates[1:]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure(models: Dict[str, TMTModel], ids: torch.Tensor, args, generator: torch.Generator) -> Dict[str, List[Dict]]:
    """Per model, one row per exit fraction; every (model, fraction) pair is timed alternately with all the others."""
    N, L = ids.numel(), next(iter(models.values())).config.n_layers
    subsets = {f: torch.randperm(N, generator=generator)[:round(f * N)] for f in FRACTIONS}

    def forward(name, fraction):
        with forced_exits(models[name], subsets[fraction], N):
            return models[name](ids)

    def checked_row(name, f):
        """One forward's counted work, checked against the forced exits."""
        out, exited = forward(name, f), subsets[f].numel()
        expected = [N] + [N - exited] * (L - 1)
        assert out.rows_processed.tolist() == expected, f"rows {out.rows_processed.tolist()} != {expected}"
        assert int(out.exit_masks[1].sum()) == exited
        sources = out.graph_edges[0][0]
        return {"exit_fraction": f, "exited_tokens": exited, "flops": out.flops, "rows_processed": expected,
                "ideal_row_ratio": (1 + (L - 1) * (1 - f)) / L,
                "last_layer_key_rows_used": int(sources[sources < N].unique().numel())}

    with torch.no_grad():
        results = {name: [checked_row(name, f) for f in FRACTIONS] for name in models}
        timing = time_interleaved({(name, f): (lambda name=name, f=f: forward(name, f)) for name in models for f in FRACTIONS},
                                  args.repeats, args.warmup)
    for name, rows in results.items():
        for row in rows:
            t, t0 = timing[name, row["exit_fraction"]], timing[name, 0.0]
            row.update(median_ms=t["median_ms"], min_ms=t["min_ms"], runs_ms=t["runs_ms"])
            row["time_ratio"] = row["median_ms"] / t0["median_ms"]
            row["min_time_ratio"] = row["min_ms"] / t0["min_ms"]
            row["flop_ratio"] = row["flops"] / rows[0]["flops"]
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=10, device=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.repeats = 128, min(args.repeats, 2)
        size = dict(d_model=64, n_heads=4, ffn_stream_dim=128, memory_anchors=4, graph_k=4)
    else:
        size = dict(d_model=256, n_heads=8)
    info = setup(args)
    S = args.seq_len
    base = TMTConfig(n_layers=4, max_seq_len=S, **size)
    variants = {"default (mesh, anchors, dual stream)": base,
                "anchors off": replace(base, use_anchors=False)}
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.vocab_size, (1, S), generator=generator).to(args.device)
    report, profiles = [], {}
    models = {name: TMTModel(cfg).eval().to(args.device) for name, cfg in variants.items()}
    results = measure(models, ids, args, generator)
    model = next(iter(models.values()))  # where does the time go, without and with exits
    labels = model_labels(model)
    for f in (0.0, TARGET_FRACTION):
        exit_index = torch.randperm(S, generator=generator)[:round(f * S)]
        with forced_exits(model, exit_index, S), torch.no_grad():
            profiles[f"{f:.0%} exited"] = profile_breakdown(lambda: model(ids), labels, runs=1 if args.quick else 3)

    cfg_text = (f"B=1, S={S}, d={base.d_model}, {base.n_layers} layers, {base.n_heads} heads, k={base.graph_k}, "
                f"{base.memory_anchors} anchors, ffn_stream_dim={base.ffn_stream_dim}, mesh backend "
                f"`{base.mesh_backend}`, eval mode, no grad")
    report.append(f"{cfg_text}; median of {args.repeats} forwards (every variant and exit fraction called alternately) after "
                  f"{args.warmup} warm-up. `ideal (rows)` = fraction of layer-token rows still processed, the ratio a "
                  f"cost exactly proportional to the active rows would give.")
    for name, rows in results.items():
        report.append(f"**{name}**\n\n" + markdown_table(
            ["exited after layer 1", "forward ms", "time ratio", "ratio of min times", "ideal (rows)", "counted GFLOP",
             "FLOP ratio", "rows per layer", "key rows used (last layer)"],
            [(f"{r['exit_fraction']:.0%}", r["median_ms"], f"{r['time_ratio']:.3f}", f"{r['min_time_ratio']:.3f}",
              f"{r['ideal_row_ratio']:.3f}", r["flops"] / 1e9, f"{r['flop_ratio']:.3f}",
              "/".join(map(str, r["rows_processed"])), f"{r['last_layer_key_rows_used']} / {S}") for r in rows]))
    target = {name: next(r["time_ratio"] for r in rows if r["exit_fraction"] == TARGET_FRACTION)
              for name, rows in results.items()}
    ideal = (1 + (base.n_layers - 1) * (1 - TARGET_FRACTION)) / base.n_layers
    report.append(f"Target: forward time at {TARGET_FRACTION:.0%} exited <= {TARGET_RATIO}x the no-exit time: "
                  + "; ".join(f"{name}: {ratio:.3f}x ({'holds' if ratio <= TARGET_RATIO else 'missed'})"
                              for name, ratio in target.items())
                  + f". With exits after layer 1 of {base.n_layers}, a cost exactly proportional to the processed "
                    f"rows gives {ideal:.3f}x (the floor).")
    for title, prof in profiles.items():
        report.append(breakdown_markdown(prof, f"Profile, default config, {title}"))
    before, after = ({r["label"]: r["exclusive_ms"] for r in profiles[k]["breakdown"]} for k in profiles)
    report.append(f"**Per part, 0 % vs {TARGET_FRACTION:.0%} exited** (profiled ms per forward)\n\n" + markdown_table(
        ["part", "0 % ms", f"{TARGET_FRACTION:.0%} ms", "ratio"],
        [(label, ms, after.get(label, 0.0), f"{after.get(label, 0.0) / ms:.2f}" if ms > 0 else "-")
         for label, ms in before.items()]))

    fig, axes = new_figure(ncols=2, width=5.5)
    for name, rows in results.items():
        xs = [100 * r["exit_fraction"] for r in rows]
        axes[0].plot(xs, [r["time_ratio"] for r in rows], "o-", label=f"time, {name}")
        axes[0].plot(xs, [r["flop_ratio"] for r in rows], "s--", label=f"FLOPs, {name}")
        axes[1].plot(xs, [r["median_ms"] for r in rows], "o-", label=name)
    axes[0].plot(xs, [r["ideal_row_ratio"] for r in rows], ":", color="gray", label="ideal (rows)")
    axes[0].axhline(TARGET_RATIO, color="red", lw=0.8, label=f"target at {TARGET_FRACTION:.0%}")
    axes[0].set(xlabel="tokens exited after layer 1 (%)", ylabel="relative to no exits", title="time and FLOPs vs exits")
    axes[1].set(xlabel="tokens exited after layer 1 (%)", ylabel="forward ms (median)", title=f"S={S}, {args.threads} threads")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return finish(NAME, args, info, report, {"config": asdict(base), "results": results, "target_ratio_at_50": target,
                                             "ideal_ratio_at_50": ideal, "profiles": profiles}, fig, argv=argv)


if __name__ == "__main__":
    main()
