"""What sampling the early-exit loss does to training, at a short budget: the ablation's full row trained for a
tenth of its budget (250 steps, the lr sweep's budget, lr 8e-3) with the early-exit loss on every token, on
2,048 and on 512 sampled tokens of the 4,096 in a batch, on one early layer drawn per step (every token, and
2,048 tokens), and without it (gates only), validation PPL per word with exits off. Each finished run is cached
under ``--results``; ``--table-only`` tables what is done.

    python -m benchmarks.exit_sample --threads 1 --seeds 0 1
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation import QUICK_SIZE, SIZE, evaluation, load_corpus, row_configs, train, train_config
from benchmarks.common import DATA_DIR, RESULTS_DIR, base_parser, finish, markdown_table, mean_std, new_figure, setup
from tmt_pyg.data import SequenceLoader

NAME = "exit_sample"
VARIANTS = {"every token": dict(exit_loss_sample=0), "2,048 sampled tokens": dict(exit_loss_sample=2048),
            "512 sampled tokens": dict(exit_loss_sample=512), "no early-exit loss (gates only)": dict(exit_loss_weight=0.0),
            "one drawn layer, every token": dict(exit_loss_layers=1),
            "one drawn layer, 2,048 sampled tokens": dict(exit_loss_layers=1, exit_loss_sample=2048)}
QUICK_VARIANTS = {"every token": dict(exit_loss_sample=0), "16 sampled tokens": dict(exit_loss_sample=16),
                  "one drawn layer, 16 sampled tokens": dict(exit_loss_layers=1, exit_loss_sample=16),
                  "no early-exit loss (gates only)": dict(exit_loss_weight=0.0)}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR / "wikitext-2")
    parser.add_argument("--runs", type=Path, default=Path("runs/exit_sample"), help="checkpoints of unfinished runs")
    parser.add_argument("--cache", type=Path, default=Path("runs/ablation_bpe"), help="folder of the cached BPE tokenizer")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "exit_sample_runs", help="finished runs (JSON)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=8e-3)
    parser.add_argument("--table-only", action="store_true", help="table the cached runs, train nothing")
    args = parser.parse_args(argv)
    size, variants, vocab, args.batch_size, args.seq_len = SIZE, VARIANTS, 4096, 16, 256
    if args.quick:
        size, variants, vocab, args.batch_size, args.seq_len, args.steps = QUICK_SIZE, QUICK_VARIANTS, 300, 4, 32, 3
        args.results, args.runs, args.cache, args.seeds = (args.out / "exit_sample_runs", args.out / "exit_sample_ckpt",
                                                           args.out / "exit_sample_ckpt", [0])
    info = setup(args)
    data = load_corpus(args.data_dir, vocab, args.cache, args.quick)
    full = row_configs(size, data["vocab_size"], args.seq_len)["full"]
    val = SequenceLoader(data["validation"]["ids"], args.seq_len, args.batch_size, shuffle=False, drop_last=False)
    budget = argparse.Namespace(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, quick=args.quick)
    args.results.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, change in variants.items():
        for seed in args.seeds:
            slug = f"{'_'.join(f'{k}{v:g}' for k, v in sorted(change.items()))}_steps{args.steps}_lr{args.lr:g}_seed{seed}"
            cache = args.results / f"{slug}.json"
            if not cache.exists() and not args.table_only:
                model = train(replace(full, **change), train_config(budget, args.lr, seed, args.runs / slug), data)
                cache.write_text(json.dumps({"variant": name, "seed": seed, "config_change": change,
                                             "val": evaluation(model, val, data["validation"], None)}) + "\n")
            if cache.exists():
                runs.setdefault(name, []).append(json.loads(cache.read_text()))
    rows = []
    for name, done in runs.items():
        mean, std = mean_std([r["val"]["ppl"] for r in done])
        rows.append({"variant": name, "seeds": [r["seed"] for r in done], "val_ppls": [r["val"]["ppl"] for r in done],
                     "val_ppl": mean, "val_ppl_std": std})
    report = [f"The WikiText-2 ablation's full row (d {size['d_model']}, {size['n_layers']} layers, BPE "
              f"{data['vocab_size']:,}, batch {args.batch_size} x {args.seq_len}), {args.steps} steps at lr {args.lr:g} "
              f"(warmup 100, cosine to lr/10), early-exit loss weight {full.exit_loss_weight}; validation PPL per word "
              f"with exits off; seeds {args.seeds}.",
              markdown_table(["early-exit loss", "seeds", "val PPL per word (each seed)", "mean"],
                             [(r["variant"], len(r["seeds"]), " / ".join(f"{p:.0f}" for p in r["val_ppls"]),
                               f"{r['val_ppl']:.0f}") for r in rows])]
    fig, (ax,) = new_figure(width=6, height=3)
    for i, r in enumerate(rows):
        ax.scatter(r["val_ppls"], [i] * len(r["val_ppls"]), color=f"C{i}")
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set(xlabel=f"validation PPL per word after {args.steps} steps (each seed)")
    ax.grid(alpha=0.3)
    return finish(NAME, args, info, report, {"rows": rows}, fig, argv=argv)


if __name__ == "__main__":
    main()
