"""The announcement's ablation table, measured: WikiText-2 word-level test PPL of eight models
(vanilla, mesh, decay, exit, their pairs, full TMT) at equal parameter count and token budget.

Every row is ``TMTModel`` with switches (vanilla = all off); FFN widths are matched to the full
TMT's parameter count with ``match_parameters``. Each finished run is cached as JSON under
``--runs`` so an interrupted benchmark resumes, and rows can be trained in separate processes
(``--rows``/``--seeds``) and tabled together afterwards (``--table-only``).

    python -m benchmarks.ablation --threads 2            # all rows (about 2.5 h on 2 CPU cores)
    python -m benchmarks.ablation --quick                # tiny, seconds
    python -m benchmarks.ablation --gate-detach --runs runs/ablation_detached --out docs/results/ablation_detached
"""
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.data import SequenceLoader
from tmt_pyg.train import TrainConfig, evaluate, evaluate_at_threshold, load_checkpoint

from .common import base_parser, finish, markdown_table, mean_std, new_figure, seed_groups, setup
from .wikitext import DEFAULT_DATA, describe, load_wikitext, train_lm

NAME = "ablation"
OFF = dict(use_mesh=False, use_decay=False, use_exit=False, use_anchors=False, dual_stream=False)
ROWS = {  # row -> switches turned on over a plain causal transformer
    "vanilla": {},
    "mesh": dict(use_mesh=True),
    "decay": dict(use_decay=True),
    "exit": dict(use_exit=True),
    "mesh+decay": dict(use_mesh=True, use_decay=True),
    "mesh+exit": dict(use_mesh=True, use_exit=True),
    "decay+exit": dict(use_decay=True, use_exit=True),
    "full": dict(use_mesh=True, use_decay=True, use_exit=True, use_anchors=True, dual_stream=True),
}
CLAIMED = {"vanilla": 42.1, "full": 29.4}  # the announcement's WikiText-2 PPLs (its other rows are not public here)
MULTI_SEED = ("vanilla", "full")


def row_configs(size: Dict, vocab_size: int, seq_len: int) -> Dict[str, TMTConfig]:
    """Config of every row, FFN width matched to the full TMT's parameter count (within 2 %)."""
    base = dict(vocab_size=vocab_size, max_seq_len=seq_len, **size)
    full = TMTConfig(**base, **ROWS["full"])
    target = count_parameters(full)
    return {row: match_parameters(TMTConfig(**{**base, **OFF, **switches}), target) for row, switches in ROWS.items()}


def run_dir(runs_dir: Path, row: str, seed: int) -> Path:
    """Folder of one run (checkpoints, metrics); its result is cached next to it as ``<folder>.json``."""
    return runs_dir / f"{row}_seed{seed}"


def run_once(row: str, cfg: TMTConfig, seed: int, data: Dict, args, runs_dir: Path, test: SequenceLoader) -> Dict:
    """Train one row with one seed (or read its cached result); test metrics at the config's threshold."""
    folder = run_dir(runs_dir, row, seed)
    cache = folder.with_suffix(".json")
    if cache.exists():
        return json.loads(cache.read_text())
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        warmup=max(1, args.steps // 20), eval_every=0, out_dir=str(folder),
                        seed=seed, device="cpu", progress=not args.quick)
    run = train_lm(cfg, data, train, args.val_tokens)
    result = {"row": row, "seed": seed, "params": run["model"].num_parameters(), **describe(cfg, train),
              "train_seconds": run["train_seconds"], "train_tokens": run["tokens"], "val": run["val"],
              "test": evaluate(run["model"], test)}
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def add_exits_off(result: Dict, cfg: TMTConfig, runs_dir: Path, test: SequenceLoader) -> Dict:
    """Test metrics of an exit row's trained model with its exits switched off (what the skipping
    costs), from the run's last checkpoint; stored in the cached result."""
    folder = run_dir(runs_dir, result["row"], result["seed"])
    model = TMTModel(cfg)
    model.load_state_dict(load_checkpoint(folder)["model"])
    result["test_exits_off"] = evaluate_at_threshold(model, test, None)
    folder.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarise(results: List[Dict]) -> Dict[str, Dict]:
    """Per row: mean/std of test PPL over seeds, work fraction, exit rate, params, train time."""
    rows = {}
    for row, mine in seed_groups(results, ROWS):
        ppl = [r["test"]["ppl"] for r in mine]
        mean, std = mean_std(ppl)
        rows[row] = {"seeds": [r["seed"] for r in mine], "params": mine[0]["params"], "test_ppl": mean,
                     "test_ppl_std": std, "test_ppls": ppl,
                     "val_ppl": statistics.mean(r["val"]["ppl"] for r in mine),
                     "test_ppl_exits_off": (statistics.mean(r["test_exits_off"]["ppl"] for r in mine)
                                            if all("test_exits_off" in r for r in mine) else None),
                     "work_fraction": statistics.mean(r["test"]["work_fraction"] for r in mine),
                     "exit_rate": statistics.mean(r["test"]["exit_rate"] for r in mine),
                     "train_seconds": statistics.mean(r["train_seconds"] for r in mine)}
    return rows


def interaction(rows: Dict[str, Dict]) -> Optional[Dict]:
    """Gains are PPL drops from vanilla; the interaction is the full model's gain minus the sum of
    the single-component gains (> 0: superadditive, as the announcement claims)."""
    if not {"vanilla", "mesh", "decay", "exit", "full"} <= set(rows):
        return None
    gain = {row: rows["vanilla"]["test_ppl"] - rows[row]["test_ppl"] for row in rows}
    singles = gain["mesh"] + gain["decay"] + gain["exit"]
    return {"gains": gain, "sum_of_single_gains": singles, "full_gain": gain["full"],
            "interaction": gain["full"] - singles}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"), help="cache of finished runs")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1337, 2024],
                        help=f"seeds of the {'/'.join(MULTI_SEED)} rows; the other rows use the first")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-tokens", type=int, default=16_384, help="validation tokens evaluated after training")
    parser.add_argument("--test-tokens", type=int, default=0, help="test tokens evaluated (0: the whole test split)")
    parser.add_argument("--gate-detach", action="store_true",
                        help="exit rows with gate_detach=True (their gate objective does not train the trunk)")
    parser.add_argument("--table-only", action="store_true", help="table the cached runs, train nothing")
    args = parser.parse_args(argv)
    info = setup(args)
    size = dict(d_model=128, n_heads=4, n_layers=4, graph_k=8, memory_anchors=16, ffn_stream_dim=256)
    if args.quick:
        size = dict(d_model=32, n_heads=2, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=32)
        args.steps, args.batch_size, args.seq_len, args.val_tokens, args.test_tokens = 3, 4, 32, 1024, 1024
        args.seeds, args.runs = args.seeds[:2], args.out / "ablation_runs"
    args.runs.mkdir(parents=True, exist_ok=True)
    data = load_wikitext(args.data_dir)
    cfgs = row_configs(size, len(data["vocab"]), args.seq_len)
    if args.gate_detach:  # rows without exits have no gate: unchanged
        cfgs = {row: replace(cfg, gate_detach=cfg.use_exit) for row, cfg in cfgs.items()}
    test = SequenceLoader(data["test"][:args.test_tokens or None], args.seq_len, args.batch_size, shuffle=False, drop_last=False)
    if not args.table_only:
        for seed in args.seeds:  # every row's first seed before the repeats
            for row in args.rows:
                if seed == args.seeds[0] or row in MULTI_SEED:
                    run_once(row, cfgs[row], seed, data, args, args.runs, test)
    results = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*_seed*.json"))]
    budget = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
    results = [r for r in results if r["model"] == json.loads(json.dumps(asdict(cfgs[r["row"]])))
               and all(r["train"][k] == v for k, v in budget.items())]  # runs of another setup are ignored
    results = [r if "test_exits_off" in r or not cfgs[r["row"]].use_exit else add_exits_off(r, cfgs[r["row"]], args.runs, test)
               for r in results]
    rows = summarise(results)
    effect = interaction(rows)

    def ppl(row):
        r = rows[row]
        return f"{r['test_ppl']:.1f} ± {r['test_ppl_std']:.1f}" if r["test_ppl_std"] is not None else f"{r['test_ppl']:.1f}"
    table = [(row, CLAIMED.get(row, "—"), ppl(row), r["test_ppl_exits_off"] or "—", r["val_ppl"], f"{r['params']:,}",
              len(r["seeds"]), r["work_fraction"], r["exit_rate"], r["train_seconds"] / 60) for row, r in rows.items()]
    tokens = args.steps * args.batch_size * args.seq_len
    report = [f"Model: d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, k={size['graph_k']}, "
              f"S={args.seq_len}, vocab {len(data['vocab']):,} (word level, tied LM head); every row trained on "
              f"{tokens:,} tokens ({args.steps} steps x {args.batch_size} x {args.seq_len}), AdamW lr {args.lr}, "
              f"dropout 0.1. Test PPL over {'the whole test split' if not args.test_tokens else f'{args.test_tokens:,} test tokens'} "
              f"(non-overlapping {args.seq_len}-token windows), exits at tau = {cfgs['full'].exit_threshold}. "
              f"Seeds {args.seeds} for {' and '.join(MULTI_SEED)} (mean ± std), {args.seeds[0]} for the rest.",
              markdown_table(["row", "claimed PPL", "test PPL", "test PPL, exits off", "val PPL", "params", "seeds", "work fraction",
                              "exit rate", "train min/run"], table)]
    if effect:
        report.append(f"Interaction (full gain − sum of single gains, gains = vanilla PPL − row PPL): "
                      f"{effect['full_gain']:.1f} − {effect['sum_of_single_gains']:.1f} = **{effect['interaction']:+.1f}** PPL "
                      f"({'superadditive' if effect['interaction'] > 0 else 'not superadditive'}).")
    fig, (ax,) = new_figure(width=7.0)
    names = list(rows)
    ax.bar(names, [rows[n]["test_ppl"] for n in names], yerr=[rows[n]["test_ppl_std"] or 0 for n in names],
           color="tab:blue", label="measured here")
    claimed = [(i, CLAIMED[n]) for i, n in enumerate(names) if n in CLAIMED]
    ax.plot([i for i, _ in claimed], [v for _, v in claimed], "r*", markersize=12, label="claimed (announcement)")
    ax.set(ylabel="WikiText-2 test PPL (word level)", title=f"ablation at equal params and {tokens:,} training tokens")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    return finish(NAME, args, info, report, {"size": size, "rows": rows, "interaction": effect, "runs": results},
                  fig, argv=argv)


if __name__ == "__main__":
    main()
