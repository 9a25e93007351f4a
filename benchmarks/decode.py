"""Greedy decoding throughput, new tokens/s, of TMT (batched, preallocated per-layer caches, exits on)
against HuggingFace ``GPT2LMHeadModel.generate`` with its KV cache at about the same size, and our
vanilla config through TMT's own decoder, each eager and with every decoding step compiled into one graph
(GPT-2: HF's static cache under a compiled forward). Targets: TMT >= 1.0x GPT-2 and the vanilla config (the
decoding loop without TMT's parts) >= 1.3x GPT-2, at B=1 and B=8, the fastest row of each against HF's faster.

    python -m benchmarks.decode --threads 2
"""
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.layers.slot_attention import compile_enabled

NAME = "decode"
TARGET_RATIO = 1.0  # TMT's new tokens/s against GPT-2's
VANILLA_TARGET = 1.3  # the vanilla config's, through TMT's decoder (the target it is measured against)


def gpt2_like(cfg: TMTConfig, max_len: int) -> GPT2LMHeadModel:
    """GPT-2 with TMT's width, depth, heads and vocabulary (4x MLP, learned positions, tied head)."""
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


GPT2 = "GPT-2 (HF generate)"
GPT2_STATIC = "GPT-2 (HF generate, static cache, compiled forward)"  # without compiling (TMT_PYG_COMPILE=0): eager


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3, device=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the compiled rows (they compile for minutes)")
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
    params = {**{name: m.num_parameters() for name, m in models.items()}, GPT2: gpt2.num_parameters()}
    compiled = {} if args.no_compiled else {f"{name} (compiled step)": name for name in models}
    params.update({name: params[base] for name, base in compiled.items()})
    if compiled:  # the same weights, its forward compiled over HF's static cache (the fastest HF decoding we know)
        gpt2_static = gpt2_like(tmt_cfg, max_len).to(args.device)
        gpt2_static.load_state_dict(gpt2.state_dict())
        if compile_enabled():
            gpt2_static.forward = torch.compile(gpt2_static.forward, dynamic=False)
        params[GPT2_STATIC] = params[GPT2]
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for B in args.batch_sizes:
        idx = torch.randint(0, tmt_cfg.vocab_size, (B, args.prompt), generator=generator).to(args.device)
        fns = {name: (lambda m=m: m.generate(idx, args.new, temperature=0)) for name, m in models.items()}
        fns.update({name: (lambda m=models[base]: m.generate(idx, args.new, temperature=0, compiled=True))
                    for name, base in compiled.items()})
        hf = dict(attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                  use_cache=True)
        fns[GPT2] = lambda: gpt2.generate(idx, **hf)
        if compiled:
            fns[GPT2_STATIC] = lambda: gpt2_static.generate(idx, cache_implementation="static", **hf)
        first = {}
        with torch.no_grad():
            outputs = {}
            for name, fn in fns.items():  # the first call compiles the compiled rows
                start = time.perf_counter()
                outputs[name] = fn()
                first[name] = (time.perf_counter() - start) * 1e3
            assert all(o.shape == (B, max_len) for o in outputs.values()), {n: o.shape for n, o in outputs.items()}
            for name, base in list(compiled.items()) + [(GPT2_STATIC, GPT2)] * bool(compiled):
                assert torch.equal(outputs[name], outputs[base]), f"{name} decodes other tokens than {base}"
            timing = time_interleaved(fns, args.repeats, warmup=0)
        for name, t in timing.items():
            rows.append({"model": name, "B": B, "params": params[name], "median_ms": t["median_ms"],
                         "tokens_per_s": B * args.new / t["median_ms"] * 1e3, "first_call_ms": first[name]})
    checks = []
    for B in args.batch_sizes:
        at = {r["model"]: r for r in rows if r["B"] == B}
        best = lambda *names: max((at[n] for n in names if n in at), key=lambda r: r["tokens_per_s"])
        hf = best(GPT2, GPT2_STATIC)  # the stronger of HF's two
        tmt, vanilla = best("TMT", "TMT (compiled step)"), best("vanilla (TMT decoder)", "vanilla (TMT decoder) (compiled step)")
        ratio, vanilla_ratio = tmt["tokens_per_s"] / hf["tokens_per_s"], vanilla["tokens_per_s"] / hf["tokens_per_s"]
        checks.append({"B": B, "tmt": tmt["model"], "baseline": hf["model"], "vanilla": vanilla["model"],
                       "ratio": ratio, "holds": ratio >= TARGET_RATIO, "vanilla_ratio": vanilla_ratio,
                       "vanilla_holds": vanilla_ratio >= VANILLA_TARGET,
                       "eager_ratio": at["TMT"]["tokens_per_s"] / at[GPT2]["tokens_per_s"]})
    report = [f"d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, vocab {tmt_cfg.vocab_size}; "
              f"prompt {args.prompt}, {args.new} new tokens per row, greedy, all rows of a batch decoded together. "
              f"TMT at initialisation (exits on; untrained gates rarely fire). Median of {args.repeats} whole "
              "generations (prefill included), the models called alternately, after a first call of each that "
              "compiles the compiled rows (`first call`; the compiled rows decode the same tokens as their eager "
              "rows, checked). The compiled step is `generate(compiled=True)`: every decoding step one compiled "
              "graph over the whole cache capacity.",
              markdown_table(["B", "model", "params", "ms per generation", "new tokens/s", "first call ms"],
                             [(r["B"], r["model"], f"{r['params']:,}", r["median_ms"], r["tokens_per_s"], r["first_call_ms"])
                              for r in rows]),
              "Targets against the faster of HF's two rows; the fastest of each of our models' rows:",
              markdown_table(["B", "TMT / GPT-2 tokens/s", f"target >= {TARGET_RATIO}x", "vanilla / GPT-2",
                              f"target >= {VANILLA_TARGET}x", "eager TMT / HF generate"],
                             [(c["B"], f"{c['ratio']:.2f}x ({c['tmt']} / {c['baseline']})", "holds" if c["holds"] else "**missed**",
                               f"{c['vanilla_ratio']:.2f}x ({c['vanilla']})", "holds" if c["vanilla_holds"] else "**missed**",
                               f"{c['eager_ratio']:.2f}x") for c in checks])]
    fig, axes = new_figure(width=6)
    for name in fns:
        mine = [r for r in rows if r["model"] == name]
        axes[0].plot([r["B"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=name)
    axes[0].set(xscale="log", xlabel="batch size B", ylabel="new tokens/s", title=f"greedy decoding, {args.threads} threads")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return finish(NAME, args, info, report, {"rows": rows, "checks": checks}, fig, argv=argv)


if __name__ == "__main__":
    main()
