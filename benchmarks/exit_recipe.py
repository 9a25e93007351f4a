"""What the exit recipe costs to train: one training step (forward, backward, AdamW) of the WikiText-2 ablation's
configuration (d 128, 4 layers, BPE vocabulary 4096, context 256, batch 16) for vanilla (fused SDPA), the full
TMT without exits, the full TMT with exits and no early-exit loss, with the early-exit loss over every token, and
with each cheaper recipe of ``--recipes`` (``TOKENS:LAYERS``: the loss on TOKENS sampled tokens, ``exit_loss_sample``,
of LAYERS early layers drawn per step, ``exit_loss_layers``; 0: all), models called alternately, median ms.
Target: a cheaper recipe at most 1.15x vanilla's step.

    python -m benchmarks.exit_recipe --threads 1 --repeats 10 --recipes 512:0 0:1 2048:1
"""
import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.ablation import QUICK_SIZE, SIZE, row_configs
from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from benchmarks.speed import train_step
from tmt_pyg import TMTConfig, TMTModel

NAME = "exit_recipe"
TARGET = 1.15


def parse_recipe(spec: str) -> Tuple[int, int]:
    """``"TOKENS:LAYERS"`` -> (exit_loss_sample, exit_loss_layers), not both 0 (that is the every-token row)."""
    try:
        sample, layers = (int(part) for part in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a recipe is TOKENS:LAYERS (two integers, 0: all), got {spec!r}") from None
    if sample < 0 or layers < 0 or sample == layers == 0:
        raise argparse.ArgumentTypeError(f"a recipe samples tokens or layers (not both 0, none negative), got {spec!r}")
    return sample, layers


def recipe_configs(size: Dict, vocab_size: int, seq_len: int, recipes: Sequence[Tuple[int, int]]) -> Dict[str, TMTConfig]:
    """The ablation's vanilla and full rows (equal parameters) and the full row's exit recipes, then one row per
    cheaper recipe (tokens sampled, early layers drawn; 0: all)."""
    rows = row_configs(size, vocab_size, seq_len)
    full = rows["full"]
    def name(n: int, k: int) -> str:
        tokens = f"{n:,} tokens" if n else "every token"
        return f"full, early-exit loss on {tokens}" + (f" of {k} drawn layer{'s' if k > 1 else ''}" if k else "")
    cheaper = {name(n, k): replace(full, exit_loss_sample=n, exit_loss_layers=k) for n, k in recipes}
    return {"vanilla": rows["vanilla"], "full, exits off": replace(full, use_exit=False, exit_loss_weight=0.0),
            "full, gates only": replace(full, exit_loss_weight=0.0), "full, early-exit loss on every token": full, **cheaper}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--recipes", type=parse_recipe, nargs="+", default=[(512, 0)],
                        help="cheaper early-exit losses as TOKENS:LAYERS: tokens sampled and early layers drawn per batch (0: all)")
    args = parser.parse_args(argv)
    size = SIZE
    if args.quick:
        size, args.batch_size, args.seq_len, args.vocab_size, args.recipes, args.repeats = QUICK_SIZE, 2, 32, 300, [(16, 0), (0, 1)], 2
    info = setup(args)
    cfgs = recipe_configs(size, args.vocab_size, args.seq_len, args.recipes)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    steps = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(args.seed)
        model = TMTModel(cfg).train()
        steps[name] = train_step(model, model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4), ids)
    timing = time_interleaved(steps, args.repeats, args.warmup)
    base = timing["vanilla"]["median_ms"]
    rows = [{"model": name, "step_ms": t["median_ms"], "min_ms": t["min_ms"], "vs_vanilla": t["median_ms"] / base}
            for name, t in timing.items()]
    cheaper = rows[-len(args.recipes):]
    report = [f"One training step (forward, backward, AdamW) at batch {args.batch_size} x context {args.seq_len}, "
              f"vocabulary {args.vocab_size}, d_model {size['d_model']}, {size['n_layers']} layers (the WikiText-2 "
              f"ablation's rows, equal parameters), models called alternately, median of {args.repeats} after "
              f"{args.warmup} untimed; {args.threads} thread(s).",
              markdown_table(["model", "ms / step", "min ms", "vs vanilla"],
                             [(r["model"], f"{r['step_ms']:,.0f}", f"{r['min_ms']:,.0f}", f"{r['vs_vanilla']:.2f}x") for r in rows]),
              f"Target: a cheaper recipe at most {TARGET}x vanilla's step: "
              + "; ".join(f"{r['model']}: {r['vs_vanilla']:.2f}x ({'met' if r['vs_vanilla'] <= TARGET else 'missed'})"
                          for r in cheaper) + "."]
    fig, (ax,) = new_figure(width=7, height=3)
    ax.barh([r["model"] for r in rows][::-1], [r["vs_vanilla"] for r in rows][::-1], color="C0")
    ax.axvline(TARGET, color="C3", ls="--", label=f"target {TARGET}x")
    ax.set(xlabel="training step time / vanilla's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish(NAME, args, info, report, {"configs": {n: asdict(c) for n, c in cfgs.items()}, "rows": rows}, fig)


if __name__ == "__main__":
    main()
