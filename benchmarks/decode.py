"""Greedy decoding throughput, new tokens/s, of TMT (batched, preallocated per-layer caches, exits on)
against HuggingFace ``GPT2LMHeadModel.generate`` with its KV cache at about the same size, and our
vanilla config through TMT's own decoder. Targets: TMT >= 1.0x GPT-2 and the vanilla config (the decoding
loop without TMT's parts) >= 1.3x GPT-2, at B=1 and B=8.

    python -m benchmarks.decode --threads 2
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg import TMTConfig, TMTModel

NAME = "decode"
TARGET_RATIO = 1.0  # TMT's new tokens/s against GPT-2's
VANILLA_TARGET = 1.3  # the vanilla config's, through TMT's decoder (the decoding issue's target)


def gpt2_like(cfg: TMTConfig, max_len: int) -> GPT2LMHeadModel:
    """GPT-2 with TMT's width, depth, heads and vocabulary (4x MLP, learned positions, tied head)."""
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3, device=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.repeats, args.batch_sizes = 16, 8, 1, [1, 2]
        size = dict(d_model=64, n_heads=4, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=128)
    else:
        size = dict(d_model=256, n_heads=8, n_layers=4, graph_k=8)
    info = setup(args)
    max_len = args.prompt + args.new
    tmt_cfg = TMTConfig(max_seq_len=max_len, **size)
    models = {"TMT": TMTModel(tmt_cfg).eval().to(args.device),
              "vanilla (TMT decoder)": TMTModel(TMTConfig.vanilla(max_seq_len=max_len, **size)).eval().to(args.device)}
    gpt2 = gpt2_like(tmt_cfg, max_len).to(args.device)
    params = {**{name: m.num_parameters() for name, m in models.items()}, "GPT-2 (HF generate)": gpt2.num_parameters()}
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for B in args.batch_sizes:
        idx = torch.randint(0, tmt_cfg.vocab_size, (B, args.prompt), generator=generator).to(args.device)
        fns = {name: (lambda m=m: m.generate(idx, args.new, temperature=0)) for name, m in models.items()}
        fns["GPT-2 (HF generate)"] = lambda: gpt2.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                           max_new_tokens=args.new, min_new_tokens=args.new, use_cache=True)
        with torch.no_grad():
            outputs = {name: fn() for name, fn in fns.items()}
            assert all(o.shape == (B, max_len) for o in outputs.values()), {n: o.shape for n, o in outputs.items()}
            timing = time_interleaved(fns, args.repeats, warmup=0)
        for name, t in timing.items():
            rows.append({"model": name, "B": B, "params": params[name], "median_ms": t["median_ms"],
                         "tokens_per_s": B * args.new / t["median_ms"] * 1e3})
    checks = []
    for B in args.batch_sizes:
        at = {r["model"]: r for r in rows if r["B"] == B}
        ratio, vanilla = (at[name]["tokens_per_s"] / at["GPT-2 (HF generate)"]["tokens_per_s"] for name in ("TMT", "vanilla (TMT decoder)"))
        checks.append({"B": B, "ratio": ratio, "holds": ratio >= TARGET_RATIO,
                       "vanilla_ratio": vanilla, "vanilla_holds": vanilla >= VANILLA_TARGET})
    report = [f"d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, vocab {tmt_cfg.vocab_size}; "
              f"prompt {args.prompt}, {args.new} new tokens per row, greedy, all rows of a batch decoded together. "
              f"TMT at initialisation (exits on; untrained gates rarely fire). Median of {args.repeats} whole "
              "generations, the models called alternately.",
              markdown_table(["B", "model", "params", "ms per generation", "new tokens/s"],
                             [(r["B"], r["model"], f"{r['params']:,}", r["median_ms"], r["tokens_per_s"]) for r in rows]),
              markdown_table(["B", "TMT / GPT-2 tokens/s", f"target >= {TARGET_RATIO}x", "vanilla / GPT-2", f"target >= {VANILLA_TARGET}x"],
                             [(c["B"], f"{c['ratio']:.2f}x", "holds" if c["holds"] else "**missed**",
                               f"{c['vanilla_ratio']:.2f}x", "holds" if c["vanilla_holds"] else "**missed**") for c in checks])]
    fig, axes = new_figure(width=6)
    for name in fns:
        mine = [r for r in rows if r["model"] == name]
        axes[0].plot([r["B"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=name)
    axes[0].set(xscale="log", xlabel="batch size B", ylabel="new tokens/s", title=f"greedy decoding, {args.threads} threads")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    return finish(NAME, args, info, report, {"rows": rows, "checks": checks}, fig, argv=argv)


if __name__ == "__main__":
    main()
