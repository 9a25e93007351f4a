"""Training (forward + backward + AdamW step) and inference throughput, tokens/s, of the full TMT,
TMT without anchors, TMT with 8 exploration slots in training, a mesh-only model and the vanilla transformer with equal parameter counts, against S.
Vanilla is the strongest plain configuration: fused ``scaled_dot_product_attention(is_causal=True)``
(no attention dropout, no mask). TMT's slot attention runs as the compiled fused op unless
``TMT_PYG_COMPILE=0``. Targets: TMT / vanilla throughput, training >= 0.85x / 1.1x
and inference >= 1.0x / 1.2x at S = 1024 / 4096; anchors on cost <= 1.1x anchors off.

    python -m benchmarks.speed --threads 2
    python -m benchmarks.speed --threads 2 --compile   # every model through torch.compile
"""
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import record_function

from benchmarks.common import (base_parser, breakdown_markdown, finish, markdown_table, model_labels, new_figure,
                               profile_breakdown, setup, time_interleaved)
from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.layers import slot_attention as slots

NAME = "speed"
TARGETS = {"train_ratio": {1024: 0.85, 4096: 1.1}, "infer_ratio": {1024: 1.0, 4096: 1.2}}
ANCHOR_COST_TARGET = 1.1


def configs(size: Dict) -> Dict[str, TMTConfig]:
    """The compared models, widths matched to the full TMT's parameter count."""
    full = TMTConfig(**size)
    variants = {"TMT": full,
                "TMT, anchors off": replace(full, use_anchors=False),  # anchors are buffers: same parameters
                "TMT, 8 exploration slots": replace(full, mesh_explore=8),  # a training-only remedy of the search
                "mesh only": TMTConfig.vanilla(use_mesh=True, **size),
                "mesh only, pure kNN": TMTConfig.vanilla(use_mesh=True, mesh_window=0, mesh_similarity="state", **size),
                "vanilla": TMTConfig.vanilla(**size)}
    target = count_parameters(full)
    return {name: match_parameters(cfg, target) for name, cfg in variants.items()}


def train_step(model: TMTModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    def step():
        with record_function("forward"):
            out = model(ids, compute_loss=True)
        with record_function("backward"):
            out.loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def measure(cfgs: Dict[str, TMTConfig], B: int, S: int, args, generator: torch.Generator) -> List[Dict]:
    """Rows for every model at one (B, S); the models are timed alternately."""
    models = {name: TMTModel(replace(cfg, max_seq_len=S)).to(args.device) for name, cfg in cfgs.items()}
    run = {name: torch.compile(model) if args.compile else model for name, model in models.items()}
    ids = torch.randint(0, next(iter(cfgs.values())).vocab_size, (B, S), generator=generator).to(args.device)
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = train_step(run[name], model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4), ids)
    train = time_interleaved(steps, args.repeats, args.warmup)
    rows = []
    with torch.no_grad():
        for model in models.values():
            model.eval()
        infer = time_interleaved({name: (lambda m=run[name]: m(ids)) for name in models}, args.repeats, args.warmup)
        for name, model in models.items():
            out, tokens = model(ids), B * S
            rows.append({"model": name, "S": S, "B": B, "params": model.num_parameters(),
                         "train_ms": train[name]["median_ms"], "train_min_ms": train[name]["min_ms"],
                         "train_tokens_per_s": tokens / train[name]["median_ms"] * 1e3,
                         "infer_ms": infer[name]["median_ms"], "infer_min_ms": infer[name]["min_ms"],
                         "infer_tokens_per_s": tokens / infer[name]["median_ms"] * 1e3,
                         "infer_exit_rate": float(out.exit_rate), "forward_gflops_per_token": out.flops / tokens / 1e9})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], device=True)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch: B = max(1, tokens // S)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of a training step")
    parser.add_argument("--compile", action="store_true", help="run every model through torch.compile (inductor)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.tokens, args.repeats = [64, 128], 256, min(args.repeats, 2)
        size = dict(d_model=64, n_heads=4, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=128)
    else:
        size = dict(d_model=256, n_heads=8, n_layers=4, graph_k=8)
    info = setup(args)
    cfgs = configs(size)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for S in args.seq_lens:
        B = max(1, args.tokens // S)
        rows += measure(cfgs, B, S, args, generator)
    ratios = []
    for S in args.seq_lens:
        at = {r["model"]: r for r in rows if r["S"] == S}
        for name in cfgs:
            if name == "vanilla":
                continue
            ratios.append({"S": S, "model": name,
                           "train_ratio": at[name]["train_tokens_per_s"] / at["vanilla"]["train_tokens_per_s"],
                           "infer_ratio": at[name]["infer_tokens_per_s"] / at["vanilla"]["infer_tokens_per_s"]})
    checks = []
    for r in ratios:
        for key, by_seq in TARGETS.items():
            if r["model"] == "TMT" and r["S"] in by_seq:
                checks.append({"S": r["S"], "what": key.split("_")[0], "ratio": r[key], "target": by_seq[r["S"]]})
    for S in args.seq_lens:
        at = {r["model"]: r for r in rows if r["S"] == S}
        for what in ("train", "infer"):
            cost = at["TMT, anchors off"][f"{what}_tokens_per_s"] / at["TMT"][f"{what}_tokens_per_s"]
            checks.append({"S": S, "what": f"{what}: anchors on / off time", "ratio": cost, "target": ANCHOR_COST_TARGET})
    for c in checks:
        c["holds"] = c["ratio"] <= c["target"] if "anchors" in c["what"] else c["ratio"] >= c["target"]
    mode = ("every model through torch.compile (inductor)" if args.compile else
            "eager models, TMT's slot attention " + ("the compiled fused op" if slots.compile_enabled() else "eager"))

    report = [f"d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, k={size['graph_k']}; widths "
              f"matched to the full TMT's parameter count (`match_parameters`): "
              + ", ".join(f"{n}: {'ffn_stream_dim' if c.dual_stream else 'mlp_dim'}="
                          f"{c.ffn_stream_dim if c.dual_stream else c.mlp_dim}" for n, c in cfgs.items())
              + f". Vanilla: fused SDPA (`is_causal=True`, attention dropout {cfgs['vanilla'].attn_dropout}). "
                f"B = max(1, {args.tokens} // S), {mode}. Training = forward + backward + AdamW step (train mode, "
                f"residual dropout {cfgs['TMT'].dropout}, exits not applied in training); inference = eval forward under "
                f"no_grad (exits on; at initialisation no gate fires). Median of {args.repeats} after {args.warmup} "
                f"warm-up, the models called alternately.",
              markdown_table(["S", "B", "model", "params", "train ms/step", "train tokens/s", "infer ms", "infer tokens/s",
                              "fwd GFLOP/token"],
                             [(r["S"], r["B"], r["model"], f"{r['params']:,}", r["train_ms"], r["train_tokens_per_s"],
                               r["infer_ms"], r["infer_tokens_per_s"], r["forward_gflops_per_token"]) for r in rows]),
              markdown_table(["S", "model", "training throughput / vanilla", "inference throughput / vanilla"],
                             [(r["S"], r["model"], f"{r['train_ratio']:.2f}x", f"{r['infer_ratio']:.2f}x") for r in ratios]),
              markdown_table(["S", "target", "measured", "goal", ""],
                             [(c["S"], c["what"], f"{c['ratio']:.2f}x", f"{'<=' if 'anchors' in c['what'] else '>='} {c['target']}x",
                               "holds" if c["holds"] else "**missed**") for c in checks])]
    target_seq = 1024 if 1024 in args.seq_lens else args.seq_lens[-1]
    profiles = {}
    if not args.no_profile:
        B = max(1, args.tokens // target_seq)
        ids = torch.randint(0, cfgs["TMT"].vocab_size, (B, target_seq), generator=generator).to(args.device)
        for name in ("TMT", "vanilla"):
            model = TMTModel(replace(cfgs[name], max_seq_len=target_seq)).to(args.device).train()
            profiles[name] = profile_breakdown(train_step(model, model.configure_optimizers(0.1, 1e-4), ids),
                                               model_labels(model), ranges=("forward", "backward", "optimizer"),
                                               runs=1 if args.quick else 2)
            report.append(breakdown_markdown(profiles[name], f"Profile of one training step, {name}, B={B}, S={target_seq}"))

    fig, axes = new_figure(ncols=2, width=5.5)
    for name in cfgs:
        mine = [r for r in rows if r["model"] == name]
        axes[0].plot([r["S"] for r in mine], [r["train_tokens_per_s"] for r in mine], "o-", label=name)
        axes[1].plot([r["S"] for r in mine], [r["infer_tokens_per_s"] for r in mine], "o-", label=name)
    for ax, title in zip(axes, ("training", "inference")):
        ax.set(xscale="log", xlabel="sequence length S", ylabel="tokens/s", title=f"{title}, {args.threads} threads")
        ax.grid(alpha=0.3)
        ax.legend()
    return finish(NAME, args, info, report, {"configs": {n: asdict(c) for n, c in cfgs.items()}, "rows": rows,
                                             "ratios": ratios, "checks": checks, "compile": args.compile, "profiles": profiles}, fig, argv=argv)


if __name__ == "__main__":
    main()
