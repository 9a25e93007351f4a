"""Decoding after a long prompt: new tokens/s of the decode steps alone (the prompt's cache is built
once, then every timed run decodes from it again), vanilla through TMT's decoder (fused SDPA over the
cache) against TMT with the exact and with the routed mesh search, equal parameters. Target:
routed TMT >= 3x the vanilla decoder's tokens/s with a 16k prompt at B=1.

    python -m benchmarks.long_decode --threads 2
"""
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from benchmarks.search_scaling import configs
from tmt_pyg import TMTModel
from tmt_pyg.models.generation import TMTCache, extend

NAME = "long_decode"
TARGET_PROMPT, TARGET_RATIO = 16384, 3.0


def decoder(model: TMTModel, cache: TMTCache, new: int):
    """Greedy decoding of ``new`` tokens from the prompt's cache, rolled back to the prompt each call."""
    prompt, logits = cache.lengths, cache.last_logits

    def run():
        cache.lengths, cache.last_logits = prompt, logits
        for _ in range(new):
            extend(model, cache, cache.last_logits.argmax(-1, keepdim=True))
    return run


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[4096, 16384], help="prompt lengths")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new, args.repeats = [96], 4, 1
        size = dict(d_model=64, n_heads=4, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=128, route_block=16)
    else:
        size = dict(d_model=256, n_heads=8, n_layers=4, graph_k=8)
    info = setup(args)
    generator = torch.Generator().manual_seed(args.seed)
    rows, checks = [], []
    for P in args.prompts:
        models = {n: TMTModel(replace(c, max_seq_len=P + args.new)).eval() for n, c in configs(size).items()}
        idx = torch.randint(0, 256, (1, P), generator=generator)
        fns, prefill = {}, {}
        with torch.no_grad():
            for name, model in models.items():
                start = time.perf_counter()
                cache = TMTCache(model, idx, capacity=P + args.new)
                prefill[name] = time.perf_counter() - start
                fns[name] = decoder(model, cache, args.new)
            timing = time_interleaved(fns, args.repeats, warmup=1)
        for name in models:
            rows.append({"prompt": P, "model": name, "params": models[name].num_parameters(), "prefill_s": prefill[name],
                         "tokens_per_s": args.new / timing[name]["median_ms"] * 1e3})
        at = {r["model"]: r["tokens_per_s"] for r in rows if r["prompt"] == P}
        if P == TARGET_PROMPT:
            ratio = at["TMT, routed search"] / at["vanilla"]
            checks.append({"prompt": P, "ratio": ratio, "target": TARGET_RATIO, "holds": ratio >= TARGET_RATIO})
    report = [f"B=1, d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, k={size['graph_k']}; untrained "
              f"models (exits on; untrained gates rarely fire), random prompts; {args.new} greedy new tokens per timed run, "
              f"median of {args.repeats} after one warm-up, the models called alternately. Prefill (the prompt's full "
              "forward and cache) is timed once and not part of tokens/s.",
              markdown_table(["prompt", "model", "params", "prefill s", "new tokens/s", "vs vanilla"],
                             [(r["prompt"], r["model"], f"{r['params']:,}", r["prefill_s"], r["tokens_per_s"],
                               f"{r['tokens_per_s'] / next(v['tokens_per_s'] for v in rows if v['prompt'] == r['prompt'] and v['model'] == 'vanilla'):.2f}x")
                              for r in rows]),
              markdown_table(["prompt", "routed TMT / vanilla", "target", ""],
                             [(c["prompt"], f"{c['ratio']:.2f}x", f">= {c['target']}x", "holds" if c["holds"] else "**missed**")
                              for c in checks])]
    fig, (ax,) = new_figure()
    for name in configs(size):
        mine = [r for r in rows if r["model"] == name]
        ax.plot([r["prompt"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="prompt length", ylabel="new tokens/s (B=1)", title=f"decoding, {args.threads} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    return finish(NAME, args, info, report, {"rows": rows, "checks": checks}, fig, argv=argv)


if __name__ == "__main__":
    main()
