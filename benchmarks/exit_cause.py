"""Why exit-trained models are worse *with their exits off*: the seed's exit training, one factor
changed at a time, on a plain transformer with exit gates (Tiny Shakespeare, nanoGPT's CPU shape).

Factors: gate gradients into the trunk (joint vs detached gates), the gates inside one global
gradient-clipping norm (vs clipped apart), the gate target (consistency vs the announcement's
decisiveness), and the seed spread. Every row is evaluated with its exits off, so only what the
gate training did to the trunk is measured; the training metrics give the gates' share of the
gradient norm and how much the global clipping shrank the trunk's step.

    python -m benchmarks.exit_cause --threads 1 --seeds 0 1
    python -m benchmarks.exit_cause --corpus wikitext-2 --steps 40 --seeds 0   # gradient shares where the ablation ran
"""
import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data import SequenceLoader
from tmt_pyg.data.corpus import load_data
from tmt_pyg.train import Trainer, evaluate_at_threshold, read_metrics

from .common import base_parser, finish, markdown_table, new_figure, setup
from .shakespeare import SIZE, train_config
from .wikitext import load_wikitext

WIKITEXT = dict(seq_len=128, batch_size=16, lr=2e-3, min_lr=2e-4, beta2=0.95)  # the ablation table's recipe (dropout 0.1)

NAME = "exit_cause"
ROWS = {  # row -> (model switches over vanilla, clip the gates apart)
    "vanilla (no gates)": ({}, True),
    "seed recipe: joint gates, one clip norm": (dict(use_exit=True), False),
    "joint gates, clipped apart": (dict(use_exit=True), True),
    "detached gates, one clip norm": (dict(use_exit=True, gate_detach=True), False),
    "detached gates, clipped apart": (dict(use_exit=True, gate_detach=True), True),
    "decisiveness target, joint, one clip norm": (dict(use_exit=True, gate_loss="decisiveness"), False),
}


def gradient_stats(metrics_path: Path, clip: float, apart: bool) -> Dict[str, float]:
    """From the per-step training records: the gates' gradient norm relative to the trunk's, the
    fraction of steps whose trunk step the clipping shrank, and the mean factor it shrank it by."""
    steps = [r for r in read_metrics(metrics_path) if r.get("split") == "train"]
    trunk = [r["grad_norm"] for r in steps]
    gate = [r.get("gate_grad_norm", 0.0) for r in steps]
    total = trunk if apart else [math.hypot(t, g) for t, g in zip(trunk, gate)]
    scale = [min(1.0, clip / n) if n > 0 else 1.0 for n in total]
    return {"gate_to_trunk_norm": statistics.mean(g / t for g, t in zip(gate, trunk)),
            "clipped_fraction": statistics.mean(s < 1 for s in scale), "trunk_step_scale": statistics.mean(scale)}


def run_once(row: str, seed: int, data: Dict, vocab_size: int, args) -> Dict:
    folder = args.runs / f"{args.corpus}_{row.replace(' ', '_').replace(':', '').replace(',', '')}_seed{seed}"
    cache = folder.with_suffix(".json")
    if cache.exists():
        return json.loads(cache.read_text())
    switches, apart = ROWS[row]
    cfg = TMTConfig(**{**asdict(TMTConfig.vanilla(vocab_size=vocab_size, mlp_dim=4 * args.size["d_model"], **args.size)), **switches})
    train = replace(train_config(args, folder, seed), clip_gates_apart=apart, **(WIKITEXT if args.corpus == "wikitext-2" else {}))
    torch.manual_seed(seed)
    model = TMTModel(cfg)
    start = time.perf_counter()
    Trainer(model, SequenceLoader(data["train"], train.seq_len, train.batch_size, seed=seed), cfg=train).fit()
    val = SequenceLoader(data["validation"], train.seq_len, train.batch_size, shuffle=False, drop_last=False)
    result = {"row": row, "seed": seed, "train_seconds": time.perf_counter() - start, "model": asdict(cfg),
              "val_exits_off": evaluate_at_threshold(model, val, None)["loss"],
              **gradient_stats(folder / "metrics.jsonl", train.grad_clip, apart)}
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=Path, default=Path("runs/exit_cause"), help="cache of finished runs")
    parser.add_argument("--corpus", choices=("tinyshakespeare", "wikitext-2"), default="tinyshakespeare",
                        help="wikitext-2: the ablation table's corpus and recipe (S=128, batch 16, lr 2e-3, dropout 0.1)")
    parser.add_argument("--val-tokens", type=int, default=0, help="validation tokens evaluated (0: all)")
    args = parser.parse_args(argv)
    args.size = SIZE if args.corpus == "tinyshakespeare" else dict(SIZE, max_seq_len=128, dropout=0.1)
    if args.quick:
        args.size, args.seeds, args.steps, args.runs = dict(args.size, d_model=32, n_layers=2), [0], 3, args.out / "runs"
    info = setup(args)
    if args.corpus == "wikitext-2":
        data = load_wikitext()
        vocab_size = len(data["vocab"])
    else:
        tok, splits = load_data("tinyshakespeare", None, ("train", "validation"))
        data, vocab_size = {split: stream for split, (stream, _) in splits.items()}, len(tok)
    limit = 20_000 if args.quick else args.val_tokens
    data = {split: data[split][:limit] if split == "validation" and limit else data[split] for split in ("train", "validation")}
    results = [run_once(row, seed, data, vocab_size, args) for seed in args.seeds for row in ROWS]
    table = []
    for row in ROWS:
        mine = [r for r in results if r["row"] == row]
        loss = [r["val_exits_off"] for r in mine]
        table.append({"row": row, "val_loss": statistics.mean(loss), "val_losses": loss,
                      **{k: statistics.mean(r[k] for r in mine) for k in ("gate_to_trunk_norm", "clipped_fraction", "trunk_step_scale")}})
    base = table[0]["val_loss"]
    recipe = ("nanoGPT's CPU recipe on Tiny Shakespeare (character level)" if args.corpus == "tinyshakespeare" else
              "the ablation table's recipe on WikiText-2 (word level, S=128, batch 16, lr 2e-3, dropout 0.1)")
    report = [f"Plain transformer (d={args.size['d_model']}, {args.size['n_layers']} layers, MLP 4d) with exit gates after every "
              f"layer but the last, {args.steps} steps of {recipe}, seeds {args.seeds}; validation loss with the exits switched "
              "off. Gradient columns: mean over the training steps.",
              markdown_table(["training", "val loss, exits off", "per seed", "vs vanilla", "gate / trunk grad norm",
                              "steps the clip shrank the trunk's step", "mean trunk step factor"],
                             [(t["row"], f"{t['val_loss']:.4f}", " / ".join(f"{v:.4f}" for v in t["val_losses"]),
                               f"{t['val_loss'] / base - 1:+.2%}", f"{t['gate_to_trunk_norm']:.3f}", f"{t['clipped_fraction']:.0%}",
                               f"{t['trunk_step_scale']:.3f}") for t in table])]
    fig, axes = new_figure(width=8)
    ax = axes[0]
    for i, t in enumerate(table):
        ax.plot([i] * len(t["val_losses"]), t["val_losses"], "o", color="C0")
        ax.plot(i, t["val_loss"], "_", ms=20, color="C3")
    ax.set_xticks(range(len(table)), [t["row"].replace(", ", "\n") for t in table], fontsize=6)
    ax.set(ylabel="validation loss, exits off", title="what exit training does to the trunk")
    ax.grid(alpha=0.3)
    return finish(NAME, args, info, report, {"rows": table, "runs": results}, fig, argv=argv)


if __name__ == "__main__":
    main()
