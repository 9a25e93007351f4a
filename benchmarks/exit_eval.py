"""Evaluation of a trained model at its calibrated exit threshold against exits off: loss, work
fraction and seconds, the two called alternately. Target: evaluation at
tau takes <= (work fraction + 0.05) x the exits-off time.

    python -m benchmarks.exit_eval --run runs/demo/tmt --threads 2
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup, time_interleaved
from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data.corpus import load_data, make_loader
from tmt_pyg.train import TrainConfig, evaluate_at_threshold, load_run

NAME = "exit_eval"
SLACK = 0.05  # the target's allowance over the work fraction


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=5)
    parser.add_argument("--run", help="run folder or checkpoint of a trained model with exit gates (the demo's: runs/demo/tmt)")
    parser.add_argument("--dataset", default="tinyshakespeare", help="corpus whose validation split is evaluated")
    parser.add_argument("--batch-size", type=int, default=12, help="sequences per evaluation batch (the demo's)")
    parser.add_argument("--max-batches", type=int, default=0, help="validation batches per evaluation (0: all)")
    parser.add_argument("--exit-threshold", type=float, default=None, help="tau (default: the checkpoint's calibrated one)")
    args = parser.parse_args(argv)
    if args.quick:  # an untrained model on random tokens: a smoke test of the code path
        args.repeats, args.max_batches = 1, 2
        model = TMTModel(TMTConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=3, graph_k=4, memory_anchors=4,
                                   ffn_stream_dim=32, max_seq_len=32)).eval()
        stream, fields, tau = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(args.seed)), None, 0.5
    elif args.run is None:
        parser.error("--run is required (a trained run folder, e.g. the demo's runs/demo/tmt)")
    else:
        model, tok, _ = load_run(args.run)
        stream, fields = load_data(args.dataset, None, ("validation",), tok=tok)[1]["validation"]
        tau = model.config.exit_threshold
    tau = args.exit_threshold if args.exit_threshold is not None else tau
    if not model.config.use_exit:
        parser.error(f"{args.run} has no exit gates (config.use_exit=False)")
    info = setup(args)
    loader = make_loader(stream, fields, TrainConfig(batch_size=args.batch_size, seq_len=model.config.max_seq_len), False)
    thresholds = {"exits off": None, f"tau = {tau:g}": tau}
    evaluations = {name: (lambda t=t: evaluate_at_threshold(model, loader, t, args.max_batches)) for name, t in thresholds.items()}
    points = {name: fn() for name, fn in evaluations.items()}  # also the warm-up
    timing = time_interleaved(evaluations, args.repeats, warmup=0)
    off, at_tau = (timing[name]["median_ms"] for name in thresholds)
    work = points[f"tau = {tau:g}"]["work_fraction"]
    check = {"tau": tau, "work_fraction": work, "time_ratio": at_tau / off, "target": work + SLACK,
             "holds": at_tau / off <= work + SLACK}
    report = [f"Model: {args.run or 'untrained (quick)'}, {model.config.n_layers} layers, d={model.config.d_model}; "
              f"{args.dataset} validation split, batches of {args.batch_size} x {model.config.max_seq_len}"
              f"{f', the first {args.max_batches}' if args.max_batches else ''}; median of {args.repeats} evaluations, "
              "exits off and at tau called alternately.",
              markdown_table(["exits", "loss", "work fraction", "exit rate", "evaluation ms", "time ratio"],
                             [(name, f"{points[name]['loss']:.4f}", f"{points[name]['work_fraction']:.3f}",
                               f"{points[name]['exit_rate']:.3f}", timing[name]["median_ms"],
                               f"{timing[name]['median_ms'] / off:.3f}") for name in thresholds]),
              f"Target: time at tau <= work fraction + {SLACK} = {check['target']:.3f}x the exits-off time: "
              f"{check['time_ratio']:.3f}x ({'holds' if check['holds'] else '**missed**'})."]
    fig, axes = new_figure(width=5)
    for name in thresholds:
        axes[0].plot(points[name]["work_fraction"], timing[name]["median_ms"] / off, "o", label=name)
    axes[0].plot([0, 1], [SLACK, 1 + SLACK], "r:", lw=0.8, label=f"target: work fraction + {SLACK}")
    axes[0].plot([0, 1], [0, 1], ":", color="gray", lw=0.8, label="time follows work")
    axes[0].set(xlim=(0, 1.05), ylim=(0, 1.2), xlabel="work fraction (layer-token rows run)",
                ylabel="evaluation time / exits off", title="exits: work and seconds")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return finish(NAME, args, info, report, {"points": points, "timing": timing, "check": check}, fig, argv=argv)


if __name__ == "__main__":
    main()
