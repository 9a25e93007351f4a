"""Quality/compute curve of the exit gates on WikiText-2: one small TMT per gate objective, trained
on a fixed token budget, then evaluated at exit thresholds 0.5 ... 0.95 (and with exits off).

    python -m benchmarks.exit_curve            # full run (about 40 min on a busy 2-core machine)
    python -m benchmarks.exit_curve --quick    # tiny, seconds
"""
from pathlib import Path

from tmt_pyg import TMTConfig
from tmt_pyg.train import TrainConfig, evaluate_at_threshold

from .common import base_parser, finish, markdown_table, new_figure, setup
from .wikitext import DEFAULT_DATA, describe, load_wikitext, train_lm

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
OBJECTIVES = ("consistency", "decisiveness")


def main(argv=None):
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-tokens", type=int, default=65_536)
    args = parser.parse_args(argv)
    info = setup(args)
    data = load_wikitext(args.data_dir)
    size = dict(d_model=32, n_heads=2, n_layers=3, ffn_stream_dim=32, memory_anchors=4) if args.quick else \
        dict(d_model=128, n_heads=4, n_layers=4, ffn_stream_dim=256, memory_anchors=16)
    seq_len = 32 if args.quick else 128
    steps = 3 if args.quick else args.steps
    val_tokens = 2048 if args.quick else args.val_tokens
    rows, runs = [], {}
    fig, (ax,) = new_figure()
    for objective in OBJECTIVES:
        cfg = TMTConfig(vocab_size=len(data["vocab"]), max_seq_len=seq_len, graph_k=8, gate_loss=objective, **size)
        train = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=seq_len, lr=2e-3, warmup=max(1, steps // 10),
                            eval_every=0, out_dir=str((args.out if args.quick else Path("runs")) / f"exit_curve_{objective}"), seed=args.seed,
                            device="cpu", progress=not args.quick)
        run = train_lm(cfg, data, train, val_tokens)
        points = [(t, evaluate_at_threshold(run["model"], run["val_loader"], t)) for t in (None,) + THRESHOLDS]
        runs[objective] = {**describe(cfg, train), "train_seconds": run["train_seconds"], "train_tokens": run["tokens"],
                           "points": [{"threshold": t, **m} for t, m in points]}
        base_ppl = points[0][1]["ppl"]
        for t, m in points:
            layers = m["work_fraction"] * cfg.n_layers
            rows.append([objective, "off" if t is None else t, m["ppl"], m["ppl"] / base_ppl, m["work_fraction"],
                         layers, m["exit_rate"]])
        ax.plot([m["work_fraction"] for _, m in points], [m["ppl"] for _, m in points], "o-", label=objective)
        for t, m in points[1:]:
            ax.annotate(f"{t}", (m["work_fraction"], m["ppl"]), fontsize=7)
    ax.set_xlabel("work fraction (layer-token rows processed / all)")
    ax.set_ylabel("validation PPL (word level)")
    ax.set_title("WikiText-2: exit threshold sweep")
    ax.legend()
    report = [
        f"Model: d={size['d_model']}, {size['n_layers']} layers, k=8, S={seq_len}, {steps} steps x {args.batch_size} x {seq_len} tokens "
        f"per objective; validation = first {val_tokens:,} tokens of valid.txt.",
        markdown_table(["gate objective", "threshold", "val PPL", "PPL / no-exit", "work fraction", "avg layers run",
                        "exit rate"], rows),
    ]
    return finish("exit_curve", args, info, report, {"runs": runs}, fig)


if __name__ == "__main__":
    main()
