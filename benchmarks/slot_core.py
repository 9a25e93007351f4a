"""One layer's attention core alone: fused causal SDPA (dense attention over all earlier tokens)
against the slot attention over the default mesh table (k = 8 content slots, a window of 8, the
self slot, 8 memory anchors), eager and as the compiled fused op. Forward without gradients, and
forward + backward. Targets (2 threads, S = 1024): fused slots' forward <= 0.5x
SDPA's time, forward + backward <= 1.0x.

    python -m benchmarks.slot_core --threads 2
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg.layers import DynamicMesh
from tmt_pyg.layers import slot_attention as slots

NAME = "slot_core"
TARGETS = {"forward": 0.5, "forward + backward": 1.0}
FUSED = "slots, fused op"  # compiled unless TMT_PYG_COMPILE=0 (then the same eager code: the tests)


def inputs(B: int, S: int, H: int, C: int, k: int, window: int, M: int, generator: torch.Generator) -> Dict:
    """Queries, keys, values (B*S, H, C) and the slot table the default mesh builds on them."""
    q, key, value = (torch.randn(B * S, H, C, generator=generator).requires_grad_() for _ in range(3))
    units = F.normalize(key.detach(), dim=-1).flatten(1)
    table = DynamicMesh(k, causal=True, window=window).slots(units, seq_len=S, query_x=F.normalize(q.detach(), dim=-1).flatten(1))
    pos = torch.arange(S).repeat(B)
    memory = [torch.randn(M, H, C, generator=generator).requires_grad_() for _ in range(2)]
    rate = torch.full((H,), 2.0).requires_grad_()
    return {"args": (q, key, value, table.index, table.valid, *memory, rate, pos, pos, S), "B": B, "S": S}


def candidates(x: Dict) -> Dict[str, callable]:
    """The three attention cores, as functions of ``backward`` (bool)."""
    q, key, value = x["args"][:3]
    B, S = x["B"], x["S"]
    heads = lambda t: t.view(B, S, *t.shape[1:]).transpose(1, 2)  # (B, H, S, C)

    def sdpa(backward: bool):
        out = F.scaled_dot_product_attention(heads(q), heads(key), heads(value), is_causal=True)
        return out.sum().backward() if backward else out

    def with_slots(fn):
        def run(backward: bool):
            out, _ = fn(*x["args"])
            return out.sum().backward() if backward else out
        return run

    return {"fused causal SDPA": sdpa, "slots, eager": with_slots(slots.slot_attention), FUSED: with_slots(slots.fused_slot_attention)}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens // S")
    args = parser.parse_args(argv)
    H, C, k, window, M = 8, 32, 8, 8, 8
    if args.quick:
        args.seq_lens, args.tokens, args.repeats, H, C = [64], 128, 1, 2, 8
    info = setup(args)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for S in args.seq_lens:
        fns = candidates(inputs(max(1, args.tokens // S), S, H, C, k, window, M, generator))
        with torch.no_grad():
            forward = time_interleaved({n: (lambda f=f: f(False)) for n, f in fns.items()}, args.repeats, args.warmup)
        both = time_interleaved({n: (lambda f=f: f(True)) for n, f in fns.items()}, args.repeats, args.warmup)
        for name in fns:
            rows.append({"S": S, "B": max(1, args.tokens // S), "core": name, "forward_ms": forward[name]["median_ms"],
                         "forward_backward_ms": both[name]["median_ms"]})
    graphs = counters["stats"]["unique_graphs"]  # forward, backward, inference: a few per length, not one per call
    checks = []
    for S in args.seq_lens:
        at = {r["core"]: r for r in rows if r["S"] == S}
        for what, key in (("forward", "forward_ms"), ("forward + backward", "forward_backward_ms")):
            ratio = at[FUSED][key] / at["fused causal SDPA"][key]
            checks.append({"S": S, "what": what, "ratio": ratio, "target": TARGETS[what], "holds": ratio <= TARGETS[what]})
    report = [f"{args.tokens} tokens per batch, {H} heads of {C}; slots: k={k} content + window {window} + self "
              f"(the default mesh's table, built by `DynamicMesh` on random queries and keys), {M} memory anchors, "
              f"decay on. The fused op {'compiled' if slots.compile_enabled() else 'NOT compiled (TMT_PYG_COMPILE=0)'} "
              f"({graphs} graphs compiled in the whole run). "
              f"Median of {args.repeats} after {args.warmup} warm-up, candidates called alternately.",
              markdown_table(["S", "B", "attention core", "forward ms", "forward + backward ms"],
                             [(r["S"], r["B"], r["core"], r["forward_ms"], r["forward_backward_ms"]) for r in rows]),
              markdown_table(["S", "fused slots / SDPA time", "measured", "goal", ""],
                             [(c["S"], c["what"], f"{c['ratio']:.2f}x", f"<= {c['target']}x",
                               "holds" if c["holds"] else "**missed**") for c in checks])]
    fig, axes = new_figure(ncols=2, width=5.0)
    names = list(dict.fromkeys(r["core"] for r in rows))
    for ax, key, title in zip(axes, ("forward_ms", "forward_backward_ms"), ("forward", "forward + backward")):
        for i, name in enumerate(names):
            mine = [r for r in rows if r["core"] == name]
            ax.bar([j + 0.27 * (i - 1) for j in range(len(mine))], [r[key] for r in mine], width=0.27, label=name)
        ax.set(xticks=range(len(args.seq_lens)), xticklabels=[f"S={S}" for S in args.seq_lens], ylabel="ms",
               title=f"{title}, {args.threads} threads")
        ax.legend(fontsize=8)
    return finish(NAME, args, info, report, {"rows": rows, "checks": checks, "compiled": slots.compile_enabled(),
                                                      "graphs_compiled": graphs}, fig, argv=argv)


if __name__ == "__main__":
    main()
