"""Tiny Shakespeare (character level) at nanoGPT's CPU configuration: where the trunk is the compute.

nanoGPT's README trains 4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations, lr 1e-3
(cosine to 1e-4, 100 warmup steps, beta2 0.99), dropout 0 on a laptop CPU and reports val loss 1.88.
Rows, at equal tokens (2000 x 12 x 64):

* ``vanilla``: fused-SDPA transformer, MLP width matched to the TMT's parameter count; ``vanilla-{1,2,3}L``:
  the same with fewer layers (the equal-compute baselines exits must beat);
* ``tmt-pure``: TMT with the original state-similarity mesh (kNN over states, no window), no exits;
  ``tmt-mesh``: TMT with the attention-similarity mesh + window 8, no exits; ``tmt-mesh-1h``: the same
  mesh searched on one head's queries and keys (``search_heads=1``: a search 4x narrower);
* ``tmt-exit``: ``tmt-mesh`` plus exit gates trained by the recipe: early-exit LM loss for the trunk
  (weight 0.5), detached gates clipped apart from the trunk. Its threshold is calibrated on the first
  half of the validation split (loss within +2 % of exits off); exit metrics are reported on the
  second half, beside the same model with exits off.
  ``tmt-exit-sampled``: the same with the early-exit loss on 96 random tokens of each 768-token batch
  (``exit_loss_sample``: the cheap recipe);
* ``tmt-mesh-explore`` / ``tmt-mesh-warmup``: ``tmt-mesh`` with the search's training remedies (8 exploration
  slots; dense attention for the first 100 steps).

Each finished run is cached as ``<runs>/<row>_seed<s>.json`` next to its run folder, so the study
resumes; ``--timing`` then measures eval time of every cached model alternately, ``--table-only``
writes the table and plots.

    python -m benchmarks.shakespeare --rows vanilla tmt-mesh --seeds 0 1 2 --threads 1
    python -m benchmarks.shakespeare --timing --threads 2        # quiet machine: eval time per model
"""
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.data import SequenceLoader
from tmt_pyg.data.corpus import load_data
from tmt_pyg.demo import NANOGPT_VAL_LOSS
from tmt_pyg.train import TrainConfig, Trainer, calibrate_threshold, evaluate_at_threshold, load_checkpoint

from .common import base_parser, finish, markdown_table, mean_std, new_figure, run_study, seed_groups, setup

NAME = "shakespeare"
SIZE = dict(d_model=128, n_heads=4, n_layers=4, dropout=0.0, max_seq_len=64)
MESH = dict(mesh_similarity="attention", mesh_window=8)
ROWS = ("vanilla", "vanilla-3L", "vanilla-2L", "vanilla-1L", "tmt-pure", "tmt-mesh", "tmt-mesh-1h", "tmt-exit",
        "tmt-mesh-explore", "tmt-mesh-warmup", "tmt-exit-sampled")


def row_configs(vocab_size: int, size: Dict = SIZE) -> Dict[str, TMTConfig]:
    """Every row's model; vanilla's MLP matched to the TMT's parameter count, shallower vanillas keep its widths."""
    tmt = TMTConfig(vocab_size=vocab_size, **size, **MESH, use_exit=False)
    vanilla = match_parameters(TMTConfig.vanilla(vocab_size=vocab_size, **size), count_parameters(tmt))
    return {"vanilla": vanilla, **{f"vanilla-{n}L": replace(vanilla, n_layers=n) for n in (3, 2, 1)},
            "tmt-pure": replace(tmt, mesh_similarity="state", mesh_window=0), "tmt-mesh": tmt, "tmt-mesh-1h": replace(tmt, search_heads=1),
            "tmt-exit": replace(tmt, use_exit=True, exit_loss_weight=0.5, gate_detach=True),
            # the search's two training remedies: 8 random earlier slots, dense attention for the lr warm-up's 100 steps
            "tmt-mesh-explore": replace(tmt, mesh_explore=8), "tmt-mesh-warmup": replace(tmt, mesh_dense_warmup=100),
            # the exit recipe with its early-exit loss on 96 of the batch's 768 tokens (the cheap recipe)
            "tmt-exit-sampled": replace(tmt, use_exit=True, exit_loss_weight=0.5, gate_detach=True, exit_loss_sample=96)}


def train_config(args, folder: Path, seed: int) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=12, seq_len=64, lr=1e-3, min_lr=1e-4, warmup=min(100, args.steps // 10 + 1),
                       beta2=0.99, weight_decay=0.1, eval_every=0, out_dir=str(folder), seed=seed, device="cpu",
                       progress=not args.quick)


def halves(stream: torch.Tensor, seq_len: int, batch_size: int) -> Dict[str, SequenceLoader]:
    """Loaders over the whole validation stream and its two halves (calibration, report)."""
    mid = stream.numel() // 2
    parts = {"all": stream, "calibrate": stream[:mid], "report": stream[mid:]}
    return {name: SequenceLoader(part, seq_len, batch_size, shuffle=False, drop_last=False) for name, part in parts.items()}


def run_once(row: str, cfg: TMTConfig, seed: int, data: Dict, args) -> Dict:
    """Train one row with one seed (or read the cached result)."""
    folder = args.runs / f"{row}_seed{seed}"
    cache = folder.with_suffix(".json")
    if cache.exists():
        return json.loads(cache.read_text())
    train = train_config(args, folder, seed)
    torch.manual_seed(seed)
    model = TMTModel(cfg)
    start = time.perf_counter()
    Trainer(model, SequenceLoader(data["train"], 64, 12, seed=seed), cfg=train).fit()
    seconds = time.perf_counter() - start
    val = halves(data["validation"], 64, 12)
    result = {"row": row, "seed": seed, "params": model.num_parameters(), "model": asdict(cfg), "train": asdict(train),
              "train_seconds": seconds, "train_tokens": train.steps * 12 * 64,
              "val": evaluate_at_threshold(model, val["all"], None)}
    if cfg.use_exit:
        calib = calibrate_threshold(model, val["calibrate"], tolerance=0.02, max_batches=args.calib_batches)
        tau = calib["threshold"] or 1.0
        result.update(tau=tau, calibration=calib, report_exits_off=evaluate_at_threshold(model, val["report"], None),
                      report_exits=evaluate_at_threshold(model, val["report"], tau))
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def load_trained(result: Dict, runs: Path, tau: Optional[float]) -> TMTModel:
    """The trained model of a cached run (eval mode), exits at ``tau`` (None: exits off)."""
    model = TMTModel(TMTConfig(**result["model"])).eval()
    model.load_state_dict(load_checkpoint(runs / f"{result['row']}_seed{result['seed']}")["model"])
    model.config.use_exit, model.config.exit_threshold = tau is not None, tau or 1.0
    return model


def variants(results: List[Dict], runs: Path) -> Dict[str, TMTModel]:
    """The first seed's trained model of every row, and of exit rows also at their calibrated tau ("<row> @tau")."""
    models = {}
    for r in results:
        if r["seed"] == min(x["seed"] for x in results if x["row"] == r["row"]):
            models[r["row"]] = load_trained(r, runs, None)
            if "tau" in r:
                models[r["row"] + " @tau"] = load_trained(r, runs, r["tau"])
    return models


@torch.no_grad()
def eval_times(models: Dict[str, TMTModel], stream: torch.Tensor, batches: int, repeats: int) -> Dict[str, float]:
    """Median seconds of ``batches`` eval forwards (12 x 64) per model, the models called alternately."""
    ids = stream[:batches * 12 * 64].view(batches, 12, 64)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            model(ids[0])  # warm-up
            start = time.perf_counter()
            for b in ids:
                model(b)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def summarise(results: List[Dict]) -> Dict[str, Dict]:
    rows = {}
    for row, mine in seed_groups(results, ROWS):
        loss = [r["val"]["loss"] for r in mine]
        mean, std = mean_std(loss)
        s = {"seeds": [r["seed"] for r in mine], "params": mine[0]["params"], "val_loss": mean, "val_loss_std": std,
             "val_losses": loss, "train_seconds": statistics.mean(r["train_seconds"] for r in mine)}
        if "tau" in mine[0]:
            for key in ("report_exits_off", "report_exits"):
                s[key] = {m: statistics.mean(r[key][m] for r in mine) for m in ("loss", "exit_rate", "work_fraction")}
            s["tau"] = [r["tau"] for r in mine]
        rows[row] = s
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--calib-batches", type=int, default=0, help="validation batches per calibration evaluation (0: the half)")
    parser.add_argument("--runs", type=Path, default=Path("runs/shakespeare"), help="cache of finished runs")
    parser.add_argument("--timing", action="store_true", help="measure eval time of the cached models (alternately)")
    parser.add_argument("--timing-batches", type=int, default=40)
    parser.add_argument("--table-only", action="store_true", help="table and plots of the cached runs; train nothing")
    args = parser.parse_args(argv)
    size = SIZE
    if args.quick:
        size = dict(SIZE, d_model=32, n_layers=2)
        args.rows, args.seeds, args.steps, args.calib_batches, args.timing_batches = ["vanilla", "tmt-exit"], [0], 3, 2, 2
        args.runs, args.timing = args.out / "runs", True
    info = setup(args)
    tok, splits = load_data("tinyshakespeare", None, ("train", "validation"))
    data = {split: stream for split, (stream, _) in splits.items()}
    if args.quick:
        data = {split: s[:20_000] for split, s in data.items()}
    configs = row_configs(len(tok), size)
    results = run_study(args, configs, data, run_once, ROWS)
    timing_path = args.runs / "eval_times.json"
    models = variants(results, args.runs)
    if args.timing:
        timing_path.write_text(json.dumps(eval_times(models, data["validation"], args.timing_batches, args.repeats), indent=1))
    times = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    rows = summarise(results)
    sample = data["validation"][:8 * 64].view(8, 64)
    with torch.no_grad():
        flops = {name: model(sample).flops / sample.numel() for name, model in models.items()}

    def spread(s):
        return f"{s['val_loss']:.4f}" + (f" ± {s['val_loss_std']:.4f}" if s["val_loss_std"] is not None else "")

    table = markdown_table(
        ["row", "val loss (exits off)", "seeds", "params", "MFLOPs/token", f"eval s / {args.timing_batches} batches", "train s/run"],
        [(name, spread(s), len(s["seeds"]), f"{s['params']:,}", f"{flops[name] / 1e6:.2f}",
          f"{times[name]:.2f}" if name in times else "—", f"{s['train_seconds']:.0f}") for name, s in rows.items()])
    exit_rows = [(name, f"{statistics.median(s['tau']):.3f}", f"{s['report_exits_off']['loss']:.4f}", f"{s['report_exits']['loss']:.4f}",
                  f"{s['report_exits']['loss'] / s['report_exits_off']['loss'] - 1:+.2%}", f"{s['report_exits']['exit_rate']:.3f}",
                  f"{s['report_exits']['work_fraction']:.3f}", f"{flops[name + ' @tau'] / 1e6:.2f}",
                  f"{times[name + ' @tau'] / times[name]:.2f}x" if name + " @tau" in times else "—")
                 for name, s in rows.items() if "tau" in s]
    report = [f"nanoGPT's CPU configuration (d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, context 64, "
              f"batch 12, {args.steps} steps, lr 1e-3 cosine to 1e-4, dropout 0) on the shipped Tiny Shakespeare, character level "
              f"(vocab {len(tok)}). Validation loss over the whole validation split (nanoGPT reports {NANOGPT_VAL_LOSS} there). "
              "FLOPs are the model's own count of a forward over 8 x 64 validation tokens; eval time is "
              f"{args.timing_batches} forwards of 12 x 64 tokens, models called alternately, median of {args.repeats}.",
              table]
    if exit_rows:
        report += ["Exits at the calibrated threshold (tau picked on the first half of the validation split for at most "
                   "+2 % loss; measured on the second half):",
                   markdown_table(["row", "tau (median)", "loss exits off", "loss at tau", "rise", "exit rate", "work fraction",
                                   "MFLOPs/token at tau (seed 0)", "eval time vs exits off"], exit_rows)]
    fig, axes = new_figure(2, width=11)
    for ax, (xs, label) in zip(axes, ((flops, "forward MFLOPs per token"), (times, f"eval seconds ({args.timing_batches} batches)"))):
        depth = [n for n in ("vanilla-1L", "vanilla-2L", "vanilla-3L", "vanilla") if n in rows and n in xs]
        ax.plot([xs[n] / (1e6 if xs is flops else 1) for n in depth], [rows[n]["val_loss"] for n in depth], "o-", label="vanilla, 1-4 layers")
        for name, s in rows.items():
            if name.startswith("tmt") and name in xs:
                ax.plot(xs[name] / (1e6 if xs is flops else 1), s["val_loss"], "s", label=f"{name} (exits off)")
            if name + " @tau" in xs:
                x = xs[name + " @tau"] / (1e6 if xs is flops else 1)
                ax.plot(x, s["val_loss"] * s["report_exits"]["loss"] / s["report_exits_off"]["loss"], "*", ms=12,
                        label=f"{name} at calibrated tau")
        ax.set(xlabel=label, ylabel="validation loss", title="Tiny Shakespeare: loss against compute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return finish(NAME, args, info, report, {"rows": rows, "flops_per_token": flops, "eval_seconds": times, "runs": results},
                  fig, argv=argv)


if __name__ == "__main__":
    main()
