"""Self-speculative decoding of a trained run: acceptance rate and new tokens/s of greedy decoding
with the first E layers drafting d tokens per round, against plain greedy decoding of the same model
(called alternately), prompts from the validation text. Targets: >= 1.4x plain greedy tokens/s at B=1
on the demo model (an earlier target was 1.6x), >= 1.3x at B=8.

    python -m benchmarks.speculative --run runs/demo/tmt --threads 2 [--compiled]
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data.corpus import load_data
from tmt_pyg.models.speculative import held_out_prompts, speculative_generate
from tmt_pyg.train import load_run

NAME = "speculative"
TARGETS = {1: 1.4, 8: 1.3}  # tokens/s against plain greedy decoding, per batch size


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--run", help="run folder or checkpoint of a trained causal model (the demo's: runs/demo/tmt)")
    parser.add_argument("--dataset", default="tinyshakespeare", help="corpus of the validation prompts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=48, help="new tokens per row (prompt + new <= the model's max_seq_len + 1)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--draft-layers", type=int, nargs="+", default=None, help="drafting depths E (default: 1 .. L-1)")
    parser.add_argument("--compiled", action="store_true",
                        help="every step of plain and speculative decoding a compiled graph (generate(compiled=True))")
    parser.add_argument("--exit-threshold", type=float, default=None,
                        help="exit threshold tau to decode with (default: the checkpoint's; 1.0: no token exits)")
    args = parser.parse_args(argv)
    if args.quick:  # an untrained model on random prompts: a smoke test of the code path
        args.prompt, args.new, args.repeats, args.batch_sizes, args.draft_tokens = 8, 8, 1, [1, 2], [2]
        model = TMTModel(TMTConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=3, graph_k=4, memory_anchors=4,
                                   ffn_stream_dim=32, max_seq_len=64)).eval()
        stream = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(args.seed))
    elif args.run is None:
        parser.error("--run is required (a trained run folder, e.g. the demo's runs/demo/tmt)")
    else:
        model, tok, _ = load_run(args.run)
        if args.exit_threshold is not None:
            model.config.exit_threshold = args.exit_threshold
        stream = load_data(args.dataset, None, ("validation",), tok=tok)[1]["validation"][0]
    info = setup(args)
    L, rows, checks = model.config.n_layers, [], []
    for B in args.batch_sizes:
        idx = held_out_prompts(stream, B, args.prompt, args.seed + B)
        plain = model.generate(idx, args.new, temperature=0, compiled=args.compiled)
        fns = {"plain greedy": lambda: model.generate(idx, args.new, temperature=0, compiled=args.compiled)}
        stats = {}
        for E in args.draft_layers or range(1, L):
            for d in args.draft_tokens:
                out, stats[(E, d)] = speculative_generate(model, idx, args.new, E, d, temperature=0, compiled=args.compiled)
                assert torch.equal(out, plain), "speculative greedy output differs from plain greedy"
                fns[(E, d)] = lambda E=E, d=d: speculative_generate(model, idx, args.new, E, d, temperature=0,
                                                                    compiled=args.compiled)
        timing = time_interleaved(fns, args.repeats, warmup=0)
        base = B * args.new / timing["plain greedy"]["median_ms"] * 1e3
        rows.append({"B": B, "draft_layers": None, "draft_tokens": None, "acceptance": None, "tokens_per_s": base, "speedup": 1.0})
        for (E, d), s in stats.items():
            tps = B * args.new / timing[(E, d)]["median_ms"] * 1e3
            rows.append({"B": B, "draft_layers": E, "draft_tokens": d, "acceptance": s.acceptance, "tokens_per_s": tps,
                         "speedup": tps / base})
        best = max((r for r in rows if r["B"] == B and r["draft_layers"]), key=lambda r: r["speedup"])
        if B in TARGETS:
            checks.append({"B": B, "best": best["speedup"], "E": best["draft_layers"], "d": best["draft_tokens"],
                           "target": TARGETS[B], "holds": best["speedup"] >= TARGETS[B]})
    fmt = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
    report = [f"Model: {args.run or 'untrained (quick)'}, {L} layers, d={model.config.d_model}, exit threshold "
              f"{model.config.exit_threshold:g}{'' if model.config.use_exit else ' (no exit gates)'}; prompts of {args.prompt} "
              f"validation tokens, {args.new} new tokens per row, greedy (every speculative output checked equal to "
              f"plain greedy). Median of {args.repeats} whole generations, all variants called alternately"
              + (", every step (plain, draft, verification) a compiled graph (compiled in an untimed first call)."
                 if args.compiled else "."),
              markdown_table(["B", "draft layers E", "draft tokens d", "acceptance", "new tokens/s", "vs plain"],
                             [(r["B"], fmt(r["draft_layers"], "{}") or "plain", fmt(r["draft_tokens"], "{}"),
                               fmt(r["acceptance"], "{:.2f}"), r["tokens_per_s"], f"{r['speedup']:.2f}x") for r in rows]),
              markdown_table(["B", "best E, d", "speed-up", "target", ""],
                             [(c["B"], f"{c['E']}, {c['d']}", f"{c['best']:.2f}x",
                               f">= {c['target']}x", "holds" if c["holds"] else "**missed**") for c in checks])]
    fig, axes = new_figure(ncols=2, width=5.5)
    for B in args.batch_sizes:
        mine = [r for r in rows if r["B"] == B and r["draft_layers"]]
        for E in range(1, L):
            pts = [r for r in mine if r["draft_layers"] == E]
            axes[0].plot([r["draft_tokens"] for r in pts], [r["acceptance"] for r in pts], "o-", label=f"B={B}, E={E}")
            axes[1].plot([r["draft_tokens"] for r in pts], [r["speedup"] for r in pts], "o-", label=f"B={B}, E={E}")
    axes[0].set(xlabel="draft tokens d", ylabel="acceptance rate", title="drafts kept")
    axes[1].set(xlabel="draft tokens d", ylabel="tokens/s vs plain greedy", title=f"speed-up, {args.threads} threads")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return finish(NAME, args, info, report, {"rows": rows, "checks": checks}, fig, argv=argv)


if __name__ == "__main__":
    main()
