"""The announcement's ablation table, answered by today's model: WikiText-2 test PPL (per word) of
vanilla, each TMT part alone, the pairs the announcement names and the full model, at equal
parameters and tokens, on a subword vocabulary small enough that the LM head is not the model.

Every row is the shipped ``TMTConfig`` default with the other parts switched off (vanilla: all
off, fused SDPA), FFN width matched to the full model's parameter count. Exit rows train with the
shipped exit recipe (the early-exit loss) and are evaluated at the threshold calibrated on the
validation split (+2 % loss), with their exits off, along a threshold curve (counted work and
measured evaluation time), and timed against exits off. BPE perplexities are converted to word
level: ``exp(total NLL / words)``, words counted as WikiText's tokens (one ``<eos>`` per line).

Each finished run's result is kept under ``--results`` (tracked in git, so a fresh clone resumes the
study) and an unfinished run resumes from its newest checkpoint under ``--runs``; ``--table-only``
tables what is finished.

    python -m benchmarks.ablation --sweep --threads 1      # lr sweep of vanilla and full on a short budget
    python -m benchmarks.ablation --threads 1              # the study (about 12 h at one thread; resumes)
    python -m benchmarks.ablation --table-only             # the table, the plots, the interaction
    python -m benchmarks.ablation --retime --threads 1     # time stale exit runs again (quiet machine)
    python -m benchmarks.ablation --time-rows --threads 1  # every row's evaluation side by side (quiet machine)
    python -m benchmarks.ablation --quick                  # tiny, seconds (the test)
    python -m benchmarks.ablation --threads 1 --layers 8 --rows vanilla "full, drawn-layer exit loss" --seeds 0 \
        --out docs/results/ablation_8_layers               # the 8-layer pair (exit savings against depth)
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.data import SequenceLoader, load_or_train_bpe, load_text_splits
from tmt_pyg.train import (Trainer, TrainConfig, calibrate_threshold, evaluate_at_threshold, load_checkpoint,
                           read_metrics, seed_everything)

from .common import DATA_DIR, base_parser, finish, markdown_table, mean_std, new_figure, setup, time_interleaved

NAME = "ablation"
PARTS = ("use_mesh", "use_decay", "use_exit", "use_anchors", "dual_stream")
ROWS = {  # row -> parts switched on over a plain causal transformer (the announcement's rows)
    "vanilla": (),
    "mesh": ("use_mesh",),
    "decay": ("use_decay",),
    "exit": ("use_exit",),
    "anchors": ("use_anchors",),
    "dual stream": ("dual_stream",),
    "mesh+decay": ("use_mesh", "use_decay"),
    "mesh+exit": ("use_mesh", "use_exit"),
    "decay+exit": ("use_decay", "use_exit"),
    "full": PARTS,
}
# rows for the compute question, beside the equal-parameter table: vanillas of the same width and fewer layers
# (fewer parameters: the dense model of about the full model's FLOPs at tau) and the full model trained with
# cheaper early-exit losses: on 512 sampled tokens, and on 2,048 sampled tokens of one early layer drawn per step
COMPUTE_ROWS = {"vanilla, 2 layers": dict(n_layers=2), "vanilla, 3 layers": dict(n_layers=3),
                "full, sampled exit loss": dict(exit_loss_sample=512),
                "full, drawn-layer exit loss": dict(exit_loss_layers=1, exit_loss_sample=2048)}
ALL_ROWS = (*ROWS, *COMPUTE_ROWS)
SINGLES = ("mesh", "decay", "exit", "anchors", "dual stream")
MULTI_SEED = ("vanilla", "full")
CLAIMED = {"vanilla": 42.1, "full": 29.4}  # the announcement's WikiText-2 PPLs (its other rows are not public)
# Published small-model level at a similar token budget: PyTorch's word_language_model example (its README),
# a 2-layer, 200-unit tied LSTM trained 6 epochs (12.5 M words) on WikiText-2: test PPL 110.44 (untied 117.61).
REFERENCE = ("PyTorch's word_language_model, 2-layer 200-unit tied LSTM, 6 epochs (12.5 M words), word-level "
             "test PPL 110.44")
EXIT_RECIPE = dict(exit_loss_weight=0.5)  # the shipped exit recipe's early-exit loss (tau calibrated after training)
SIZE = dict(d_model=128, n_heads=4, n_layers=4, dropout=0.1)  # the other fields: TMTConfig's defaults
QUICK_SIZE = dict(d_model=32, n_heads=2, n_layers=2, graph_k=4, memory_anchors=4, dropout=0.1)
RECIPE = dict(warmup=100, beta2=0.99, weight_decay=0.1)  # min_lr = lr / 10
SWEEP_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
# The sweep's choice (2026-12-03, RESULTS.md: vanilla 893, full 705 val PPL at 8e-3, the best of both), used
# when its runs are not in --results (they were made before results were tracked, on a machine since gone).
SWEPT_LR = {"vanilla": 8e-3, "full": 8e-3}
# Commit 8419df3 (2026-12-04): evaluation stopped computing the training-only losses; exit runs timed
# before it are timed again by --retime.
RETIMED_AFTER = 1796390614
RETIMED_AFTER_NOTE = "commit 8419df3"


def row_configs(size: Dict, vocab_size: int, seq_len: int) -> Dict[str, TMTConfig]:
    """Config of every row: the shipped defaults with the row's parts on, the exit recipe where it has
    exits, FFN width matched to the full model's parameter count (within 2 %); ``COMPUTE_ROWS``: vanilla
    or full with the row's fields changed after the match (shallower vanillas keep the FFN width)."""
    def config(parts):
        on = {p: p in parts for p in PARTS}
        return TMTConfig(vocab_size=vocab_size, max_seq_len=seq_len, **size, **on,
                         **(EXIT_RECIPE if "use_exit" in parts else {}))
    target = count_parameters(config(PARTS))
    cfgs = {row: match_parameters(config(parts), target) for row, parts in ROWS.items()}
    changed = {row: replace(cfgs["vanilla" if row.startswith("vanilla") else "full"], **changes)
               for row, changes in COMPUTE_ROWS.items()}
    return {**cfgs, **{row: cfg for row, cfg in changed.items() if cfg.n_layers <= size["n_layers"]}}  # --quick: 2 layers


def load_corpus(data_dir: Path, vocab_size: int, cache: Path, quick: bool) -> Dict:
    """BPE (trained on the train split, cached) ids of every split and its word count."""
    lines = load_text_splits("wikitext-2", str(data_dir))
    if quick:  # 200 lines of the training split, 25 of the others
        lines = {split: text[:200 if split == "train" else 25] for split, text in lines.items()}
    tok = load_or_train_bpe(lines["train"], vocab_size, cache / "tokenizers")
    splits = {split: {"ids": tok.encode(text), "words": sum(len(line.split()) + 1 for line in text)}
              for split, text in lines.items()}
    return {"vocab_size": len(tok), **splits}


def word_ppl(loss: float, split: Dict) -> float:
    """Word-level PPL of a mean per-subword loss: total NLL over the split's words."""
    return math.exp(min(50.0, loss * split["ids"].numel() / split["words"]))


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def identity(cfg: TMTConfig) -> Dict:
    """The fields of ``cfg`` that differ from ``TMTConfig``'s defaults: what names a cached run, so that
    a field added later (at a default that keeps the model) does not orphan the runs already made."""
    defaults = {f.name: f.default for f in fields(TMTConfig)}
    return {k: v for k, v in asdict(cfg).items() if v != defaults[k]}


def train_config(args, lr: float, seed: int, folder: Path) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, min_lr=lr / 10,
                       **RECIPE, eval_every=0 if args.quick else max(1, args.steps // 5), eval_batches=16, ckpt_every=max(1, args.steps // 10),
                       keep_last=1, out_dir=str(folder), seed=seed, device="cpu", progress=not args.quick)


def train(cfg: TMTConfig, tcfg: TrainConfig, data: Dict) -> TMTModel:
    """Train (continuing from the run's newest checkpoint, if any) and return the model."""
    seed_everything(tcfg.seed)
    model = TMTModel(cfg)
    loaders = (SequenceLoader(data["train"]["ids"], tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed),
               SequenceLoader(data["validation"]["ids"], tcfg.seq_len, tcfg.batch_size, shuffle=False, drop_last=False))
    trainer = Trainer(model, *loaders, cfg=tcfg)
    trainer.resume()
    trainer.fit()
    return model.eval()


def train_seconds(folder: Path) -> float:
    """Training wall time summed over the run's steps (across resumed sessions)."""
    return sum(r["tokens"] / r["tok_per_s"] for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train")


def evaluation(model: TMTModel, loader: SequenceLoader, split: Dict, threshold: Optional[float]) -> Dict:
    out = evaluate_at_threshold(model, loader, threshold)
    return {"loss": out["loss"], "ppl": word_ppl(out["loss"], split), "subword_ppl": out["ppl"],
            "work_fraction": out["work_fraction"], "exit_rate": out["exit_rate"], "flops_per_token": out["flops_per_token"]}


def timing_loader(data: Dict, loaders: Dict, batches: int) -> SequenceLoader:
    """The first ``batches`` test batches: what every timed evaluation runs on."""
    test = loaders["test"]
    return SequenceLoader(data["test"]["ids"][:batches * test.batch_size * test.seq_len], test.seq_len,
                          test.batch_size, shuffle=False, drop_last=False)


def time_thresholds(model: TMTModel, data: Dict, loaders: Dict, taus: List[float], timing_batches: int,
                    repeats: int) -> Dict:
    """Evaluation time at each threshold over exits off, called alternately on the first
    ``timing_batches`` test batches: ``{"ratios": {tau: ratio}, "eval_ms_off": ms, "tokens": n}``."""
    timed = timing_loader(data, loaders, timing_batches)
    fns = {"off": lambda: evaluate_at_threshold(model, timed, None)}
    fns.update({t: (lambda t=t: evaluate_at_threshold(model, timed, t)) for t in taus})
    times = time_interleaved(fns, repeats)
    return {"ratios": {t: times[t]["median_ms"] / times["off"]["median_ms"] for t in taus},
            "eval_ms_off": times["off"]["median_ms"], "tokens": timed.windows.numel()}


def time_rows(cfgs: Dict, rows: Sequence[str], data: Dict, loaders: Dict, batches: int, repeats: int) -> Dict:
    """Evaluation time (exits off) of every row's model, freshly initialised (a forward without exits costs the
    same whatever the weights), the rows called alternately on the first ``batches`` test batches. Per row:
    ``{"identity", "ms", "tokens", "flops_per_token", "timed_at", "load_at_timing"}`` (the counted forward
    FLOPs of those batches, exits off: the same for any weights); an exit row's time at tau is its
    ``time_vs_off`` times its ``ms``."""
    timed = timing_loader(data, loaders, batches)
    models = {row: TMTModel(cfgs[row]).eval() for row in rows}
    times = time_interleaved({row: (lambda m=m: evaluate_at_threshold(m, timed, None)) for row, m in models.items()}, repeats)
    flops = {row: evaluate_at_threshold(m, timed, None)["flops_per_token"] for row, m in models.items()}  # untimed
    return {row: {"identity": identity(cfgs[row]), "ms": times[row]["median_ms"], "tokens": timed.windows.numel(),
                  "flops_per_token": flops[row], "timed_at": time.time(), "load_at_timing": os.getloadavg()}
            for row in rows}


def timing_record(timing: Dict) -> Dict:
    """What an exit run keeps of a :func:`time_thresholds` call besides the ratios: when, and under what load."""
    return {"eval_ms_off": timing["eval_ms_off"], "timed_at": time.time(), "load_at_timing": os.getloadavg()}


def exit_measures(model: TMTModel, loaders: Dict, data: Dict, timing_batches: int, repeats: int) -> Dict:
    """An exit row's calibrated tau (validation, +2 %), test metrics along the calibration's
    thresholds, and the evaluation time at each against exits off."""
    calib = calibrate_threshold(model, loaders["validation"], 0.02)
    tau = calib["threshold"] or 1.0
    taus = sorted({p["threshold"] for p in calib["points"]} | {tau}, reverse=True)
    timing = time_thresholds(model, data, loaders, taus, timing_batches, repeats)
    curve = [{"tau": t, **evaluation(model, loaders["test"], data["test"], t), "time_vs_off": timing["ratios"][t]}
             for t in taus]
    return {"tau": tau, "at_tau": next(p for p in curve if p["tau"] == tau), "curve": curve,
            "timing_tokens": timing["tokens"], **timing_record(timing)}


def stale(result: Dict) -> bool:
    """An exit run timed before ``RETIMED_AFTER``: its evaluation also ran the training-only losses."""
    return "exits" in result and result["exits"].get("timed_at", 0) < RETIMED_AFTER


def retime(args, cfgs: Dict, data: Dict, loaders: Dict, results: List[Dict]) -> List[str]:
    """Time again, with the current code, the exit runs timed before ``RETIMED_AFTER`` (whose evaluation
    also ran the training-only losses, and whose timing shared the machine with the other study lane),
    from their final checkpoints; the new ratios replace the old in the result files. Returns the names."""
    done = []
    for result in results:
        if not stale(result):
            continue
        name = run_name(result["row"], cfgs[result["row"]], result["lr"], result["seed"], args, data)
        ckpt = args.runs / name / "checkpoints" / f"step_{args.steps:08d}.pt"
        if not ckpt.exists():
            print(f"[ablation] {name}: no final checkpoint at {ckpt}, its old timing stays", flush=True)
            continue
        model = TMTModel(cfgs[result["row"]])
        model.load_state_dict(load_checkpoint(ckpt)["model"])
        exits = result["exits"]
        timing = time_thresholds(model.eval(), data, loaders, [p["tau"] for p in exits["curve"]], args.timing_batches,
                                 args.repeats)
        for point in exits["curve"]:
            point["time_vs_off"] = timing["ratios"][point["tau"]]
        exits["at_tau"] = next(p for p in exits["curve"] if p["tau"] == exits["tau"])
        exits.update(timing_record(timing))
        (args.results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"[ablation] {name}: eval time at tau {exits['at_tau']['time_vs_off']:.3f}x exits off", flush=True)
        done.append(name)
    return done


def run_name(row: str, cfg: TMTConfig, lr: float, seed: int, args, data: Dict) -> str:
    tag = digest(identity(cfg), lr, args.steps, args.batch_size, args.seq_len, data["vocab_size"])
    return f"{row.replace(' ', '_')}_seed{seed}_{tag}"


def run_once(row: str, cfg: TMTConfig, lr: float, seed: int, data: Dict, args, loaders: Dict,
             final: bool = True, cached_only: bool = False) -> Optional[Dict]:
    """Train one row with one seed, or read its cached result (``cached_only``: None when there is
    none); evaluate it on the validation split and, for a ``final`` run, on the test split."""
    name = run_name(row, cfg, lr, seed, args, data)
    folder, cache = args.runs / name, args.results / f"{name}.json"
    if cache.exists() or cached_only or not claim(folder):
        return json.loads(cache.read_text()) if cache.exists() else None
    model = train(cfg, train_config(args, lr, seed, folder), data)
    result = {"row": row, "seed": seed, "lr": lr, "params": model.num_parameters(), "model": asdict(cfg),
              "identity": identity(cfg),
              "train_tokens": args.steps * args.batch_size * args.seq_len, "train_seconds": train_seconds(folder),
              "val": evaluation(model, loaders["validation"], data["validation"], None)}
    if final:
        result["test"] = evaluation(model, loaders["test"], data["test"], None)
    if final and cfg.use_exit:
        result["exits"] = exit_measures(model, loaders, data, args.timing_batches, args.repeats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1) + "\n")
    folder.with_suffix(".lock").unlink()
    return result


def claim(folder: Path) -> bool:
    """Take the run's lock file, so that two study processes never train the same run; False while
    another live process holds it (a dead holder's lock is taken over)."""
    lock = folder.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(lock, "x") as f:
            f.write(str(os.getpid()))
        return True
    except FileExistsError:
        holder = int(lock.read_text() or 0)
        try:
            os.kill(holder, 0)
            return holder == os.getpid()
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(folder)


def cached_results(args, cfgs: Dict, lrs: Dict) -> List[Dict]:
    """The finished runs of this setup under ``--results`` (other setups' files are ignored)."""
    return [r for r in (json.loads(p.read_text()) for p in sorted(args.results.glob("*_seed*.json")))
            if r["row"] in cfgs and r["identity"] == identity(cfgs[r["row"]]) and r["train_tokens"] ==
            args.steps * args.batch_size * args.seq_len and r["lr"] == lrs[r["row"]]]


def plan(args, cfgs: Dict) -> List[tuple]:
    """(row, seed) in study order: the first seed of vanilla and full, every other row, then the repeats."""
    first = [(row, args.seeds[0]) for row in MULTI_SEED] + [(row, args.seeds[0]) for row in ALL_ROWS if row not in MULTI_SEED]
    repeats = [(row, seed) for seed in args.seeds[1:] for row in MULTI_SEED]
    return [(row, seed) for row, seed in first + repeats if row in args.rows and row in cfgs]


def study(args, cfgs: Dict, lrs: Dict, data: Dict, loaders: Dict) -> List[Dict]:
    """Every planned run (cached ones read back), printing the study's progress and ETA before each."""
    results, todo = [], plan(args, cfgs)
    for i, (row, seed) in enumerate(todo):
        per_token = statistics.mean(r["train_seconds"] / r["train_tokens"] for r in results) if results else None
        left = len(todo) - i
        eta = f", ETA {per_token * left * args.steps * args.batch_size * args.seq_len / 3600:.1f} h" if per_token else ""
        if not args.quick:
            print(f"[ablation] run {i + 1}/{len(todo)}: {row}, seed {seed}, lr {lrs[row]:g}{eta}", flush=True)
        result = run_once(row, cfgs[row], lrs[row], seed, data, args, loaders)
        if result is not None:  # None: another study process is training it
            results.append(result)
    return results


def sweep(args, cfgs: Dict, data: Dict, loaders: Dict, cached_only: bool) -> Optional[Dict[str, Dict[float, float]]]:
    """Validation word PPL of vanilla and full at every ``SWEEP_LRS`` on a tenth of the budget (cached;
    ``cached_only``: None unless every sweep run is cached)."""
    short = argparse.Namespace(**{**vars(args), "steps": max(1, args.steps // 10), "runs": args.runs / "sweep",
                                 "results": args.results / "sweep"})
    runs = {(row, lr): run_once(row, cfgs[row], lr, args.seeds[0], data, short, loaders, final=False,
                                cached_only=cached_only) for row in MULTI_SEED for lr in SWEEP_LRS}
    if any(r is None for r in runs.values()):
        return None
    return {row: {lr: runs[row, lr]["val"]["ppl"] for lr in SWEEP_LRS} for row in MULTI_SEED}


def work_at_ppl_rise(result: Dict, rise: float = 0.02) -> Optional[float]:
    """Work fraction at which the test PPL per word is ``rise`` above exits off, linearly interpolated
    along the run's tau curve read from exits off (work 1) towards more exits; the curve's last point
    when it never rises that far (then an upper bound on what the rise allows). Reads the test curve,
    so it describes the trade-off; tau itself is calibrated on the validation split."""
    limit = result["test"]["ppl"] * (1 + rise)
    points = [(1.0, result["test"]["ppl"])] + sorted(((p["work_fraction"], p["ppl"]) for p in result["exits"]["curve"]), reverse=True)
    for (w0, p0), (w1, p1) in zip(points, points[1:]):
        if p1 > limit:
            return w0 + (w1 - w0) * (limit - p0) / (p1 - p0) if p1 > p0 else w0
    return points[-1][0]


TRAINING_ONLY = ("exit_loss_sample",)  # config fields that change training, not the model a forward runs


def fill_counted_flops(results: List[Dict]) -> None:
    """Give the evaluation points (test, at tau, the tau curve) of exit runs made before FLOPs were counted the
    count of a counted run of the same architecture (identity equal but for ``TRAINING_ONLY``): the count is a
    fixed part plus a part per layer-token row computed, so it is linear in the work fraction; the line is fitted
    on the counted run's points and used only where it fits them within 0.1 %. Filled points are marked
    ``flops_from_work``; the result files are not changed."""
    def points(r: Dict) -> List[Dict]:
        return [r["test"], r["exits"]["at_tau"], *r["exits"]["curve"]]

    def arch(r: Dict) -> Dict:
        return {k: v for k, v in r["identity"].items() if k not in TRAINING_ONLY}
    counted = [r for r in results if "exits" in r and all("flops_per_token" in p for p in points(r))]
    for r in results:
        if "exits" not in r or all("flops_per_token" in p for p in points(r)):
            continue
        ref = next((c for c in counted if arch(c) == arch(r)), None)
        if ref is None:
            continue
        work, flops = zip(*((p["work_fraction"], p["flops_per_token"]) for p in points(ref)))
        slope, intercept = statistics.linear_regression(work, flops)
        if max(abs(intercept + slope * w - f) / f for w, f in zip(work, flops)) > 1e-3:
            continue
        for p in points(r):
            if "flops_per_token" not in p:
                p.update(flops_per_token=intercept + slope * p["work_fraction"], flops_from_work=True)


def summarise(results: List[Dict], row_times: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per row: mean (and spread over seeds) of test PPL, exits off and at tau, work and time (``row_times``:
    :func:`time_rows`' records of the rows timed side by side; ``eval_ms`` None for a row without one)."""
    rows = {}
    for row in ALL_ROWS:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        at = [r["exits"]["at_tau"] if "exits" in r else r["test"] for r in mine]
        ppl, std = mean_std([a["ppl"] for a in at])
        off, off_std = mean_std([r["test"]["ppl"] for r in mine])
        rows[row] = {"seeds": [r["seed"] for r in mine], "params": mine[0]["params"], "lr": mine[0]["lr"],
                     "test_ppl": ppl, "test_ppl_std": std, "test_ppls": [a["ppl"] for a in at],
                     "test_ppl_exits_off": off if "exits" in mine[0] else None, "test_ppl_exits_off_std": off_std,
                     "test_ppls_exits_off": [r["test"]["ppl"] for r in mine],
                     "val_ppl": statistics.mean(r["val"]["ppl"] for r in mine),
                     "tau": statistics.mean(r["exits"]["tau"] for r in mine) if "exits" in mine[0] else None,
                     "work_fraction": statistics.mean(a["work_fraction"] for a in at),
                     "eval_time_vs_off": (statistics.mean(r["exits"]["at_tau"]["time_vs_off"]
                                                          for r in ([r for r in mine if not stale(r)] or mine))
                                          if "exits" in mine[0] else None),
                     "work_at_2pct": statistics.mean(work_at_ppl_rise(r) for r in mine) if "exits" in mine[0] else None,
                     # counted forward FLOPs per token (at tau for exit rows); runs made before they were counted: None
                     "mflops_per_token": (statistics.mean(a["flops_per_token"] for a in at) / 1e6
                                          if all("flops_per_token" in a for a in at) else None),
                     "mflops_from_work": any(a.get("flops_from_work", False) for a in at),
                     "train_minutes": statistics.mean(r["train_seconds"] for r in mine) / 60}
        timed = row_times.get(row)
        rows[row]["eval_ms"] = None if timed is None else timed["ms"] * (rows[row]["eval_time_vs_off"] or 1.0)
        if rows[row]["mflops_per_token"] is None and "exits" not in mine[0] and (timed or {}).get("flops_per_token"):
            rows[row]["mflops_per_token"] = timed["flops_per_token"] / 1e6  # no exits: the count does not depend on the weights
    return rows


def interaction(rows: Dict[str, Dict], key: str = "test_ppls") -> Optional[Dict]:
    """Gains are PPL drops from vanilla; the interaction is the full model's gain minus the sum of the
    single parts' gains (> 0: superadditive, as the announcement claims). Its spread: the standard
    errors of the rows' means added in quadrature (a single-seed row counts with the multi-seed rows'
    largest per-seed spread)."""
    if not set(SINGLES) | {"vanilla", "full"} <= set(rows):
        return None
    mean = {r: statistics.mean(rows[r][key]) for r in rows}
    seed_sd = max(statistics.stdev(rows[r][key]) for r in MULTI_SEED) if all(len(rows[r][key]) > 1 for r in MULTI_SEED) else 0.0
    se = {r: (statistics.stdev(rows[r][key]) if len(rows[r][key]) > 1 else seed_sd) / math.sqrt(len(rows[r][key])) for r in rows}
    gain = {r: mean["vanilla"] - mean[r] for r in rows}
    singles = sum(gain[r] for r in SINGLES)
    # vanilla enters the full gain once and every single gain once: coefficient 1 - len(SINGLES)
    spread = math.sqrt(se["full"] ** 2 + sum(se[r] ** 2 for r in SINGLES) + ((len(SINGLES) - 1) * se["vanilla"]) ** 2)
    return {"gains": gain, "sum_of_single_gains": singles, "full_gain": gain["full"], "interaction": gain["full"] - singles,
            "interaction_se": spread}


def stale_timing(results: List[Dict]) -> str:
    """The report's note on exit runs still timed by the evaluation that ran the training-only losses."""
    old = [f"{r['row']} seed {r['seed']}" for r in results if stale(r)]
    return (f"; timed before {RETIMED_AFTER_NOTE}, its evaluation also running the training-only losses, and left "
            f"out of the row's mean time where the row has seeds timed since: {', '.join(old)}" if old else "")


def report_table(rows: Dict[str, Dict]) -> str:
    def pm(mean, std, fmt="{:.1f}"):
        return fmt.format(mean) + (f" ± {std:.1f}" if std is not None else "")
    table = [(row, CLAIMED.get(row, "—"), pm(r["test_ppl"], r["test_ppl_std"]),
              pm(r["test_ppl_exits_off"], r["test_ppl_exits_off_std"]) if r["test_ppl_exits_off"] else "—",
              f"{r['val_ppl']:.1f}", f"{r['params']:,}", len(r["seeds"]), f"{r['lr']:g}",
              f"{r['tau']:.3f}" if r["tau"] else "—", f"{r['work_fraction']:.3f}",
              f"{r['eval_time_vs_off']:.2f}x" if r["eval_time_vs_off"] else "—",
              f"{r['work_at_2pct']:.3f}" if r["work_at_2pct"] else "—",
              ("≈" if r["mflops_from_work"] else "") + f"{r['mflops_per_token']:.2f}" if r["mflops_per_token"] else "—",
              f"{r['eval_ms']:,.0f}" if r["eval_ms"] else "—", f"{r['train_minutes']:.0f}")
             for row, r in rows.items()]
    return markdown_table(["row", "claimed PPL", "test PPL (at τ)", "test PPL, exits off", "val PPL", "params", "seeds",
                           "lr", "τ", "work fraction", "eval time vs exits off", "work at +2 % PPL", "MFLOPs / token (at τ)",
                           "eval ms, rows side by side (at τ)", "train min/run"], table)


def plot(rows: Dict, results: List[Dict], row_times: Dict[str, Dict]):
    fig, (bars, work, secs, flops, ms) = new_figure(ncols=5, width=4.6)
    names = list(rows)
    off = [rows[n]["test_ppl_exits_off"] or rows[n]["test_ppl"] for n in names]
    bars.bar(names, off, yerr=[(rows[n]["test_ppl_exits_off_std"] if rows[n]["test_ppl_exits_off"] else rows[n]["test_ppl_std"]) or 0
                               for n in names], label="exits off")
    at_tau = [(i, rows[n]["test_ppl"]) for i, n in enumerate(names) if rows[n]["test_ppl_exits_off"]]
    if at_tau:
        bars.scatter(*zip(*at_tau), marker="_", s=300, color="C3", zorder=3, label="at the calibrated τ")
    if "vanilla" in rows:
        v, sd = rows["vanilla"]["test_ppl"], rows["vanilla"]["test_ppl_std"] or 0
        bars.axhspan(v - sd, v + sd, color="0.5", alpha=0.25, lw=0, label="vanilla ± std")
    bars.set(ylabel="WikiText-2 test PPL per word", title="rows at equal parameters and tokens",
             ylim=(0.9 * min(off), 1.05 * max(r["test_ppl"] for r in rows.values())))
    bars.legend(fontsize=7)
    bars.tick_params(axis="x", rotation=45)
    for i, r in enumerate(r for r in results if "exits" in r):
        curve = [{"work_fraction": 1.0, "time_vs_off": 1.0, "ppl": r["test"]["ppl"]}] + r["exits"]["curve"]  # exits off first
        label = f"{r['row']} s{r['seed']}"
        work.plot([p["work_fraction"] for p in curve], [p["ppl"] for p in curve], "o-", color=f"C{i}", label=label)
        secs.plot([p["time_vs_off"] for p in curve], [p["ppl"] for p in curve], "o-", color=f"C{i}", label=label)
        work.axhline(r["test"]["ppl"] * 1.02, color=f"C{i}", lw=0.6, ls=":")
        counted = [p for p in [{**r["test"], "ppl": r["test"]["ppl"]}] + r["exits"]["curve"] if "flops_per_token" in p]
        flops.plot([p["flops_per_token"] / 1e6 for p in counted], [p["ppl"] for p in counted],
                   "o--" if any(p.get("flops_from_work") for p in counted) else "o-", color=f"C{i}", label=label)
        if r["row"] in row_times:
            ms.plot([row_times[r["row"]]["ms"] * p["time_vs_off"] for p in curve], [p["ppl"] for p in curve], "o-",
                    color=f"C{i}", label=label)
    for name, r in rows.items():  # one point per row without exits (its mean over seeds)
        if r["mflops_per_token"] and not r["tau"]:
            flops.scatter(r["mflops_per_token"], r["test_ppl"], marker="s", color="0.3")
            flops.annotate(name, (r["mflops_per_token"], r["test_ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for name, r in rows.items():
        if r["eval_ms"] and not r["tau"]:
            ms.scatter(r["eval_ms"], r["test_ppl"], marker="s", color="0.3")
            ms.annotate(name, (r["eval_ms"], r["test_ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    work.set(xlabel="work fraction (layer-token rows computed)", ylabel="test PPL per word", title="one point per τ")
    secs.set(xlabel="evaluation time / exits off (measured)", ylabel="test PPL per word", title="one point per τ")
    flops.set(xlabel="counted forward MFLOPs per token (LM head included)", ylabel="test PPL per word",
              title="τ curves and rows without exits (squares)")
    ms.set(xlabel="evaluation ms, rows timed side by side", ylabel="test PPL per word",
           title="τ curves (time vs exits off x exits-off ms)")
    for ax in (work, secs, flops, ms):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR / "wikitext-2")
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation_bpe"), help="checkpoints of unfinished runs")
    parser.add_argument("--results", type=Path, default=Path("docs/results/ablation_runs"),
                        help="finished runs' results (tracked, so the study resumes on a fresh clone)")
    parser.add_argument("--rows", nargs="+", choices=list(ALL_ROWS), default=list(ALL_ROWS),
                        help="the equal-parameter rows and COMPUTE_ROWS (shallower vanillas, the cheaper exit recipes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help=f"seeds of the {'/'.join(MULTI_SEED)} rows; the other rows use the first")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the train split")
    parser.add_argument("--layers", type=int, default=SIZE["n_layers"],
                        help="depth of every row (how exit savings grow with depth; give the table its own --out)")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs=2, metavar=("VANILLA", "TMT"), default=None,
                        help="peak lr of vanilla and of every other row (default: the sweep's best, from --results or SWEPT_LR)")
    parser.add_argument("--timing-batches", type=int, default=8, help="test batches of the timed evaluations")
    parser.add_argument("--sweep", action="store_true", help=f"only the lr sweep ({SWEEP_LRS}) of vanilla and full")
    parser.add_argument("--table-only", action="store_true", help="table the cached runs, train nothing")
    parser.add_argument("--time-rows", action="store_true",
                        help="time every row's evaluation (exits off, fresh weights) side by side, for the table's eval ms "
                             "column (a quiet machine; kept in --results/row_eval_times.json)")
    parser.add_argument("--retime", action="store_true",
                        help="time again the finished exit runs timed before RETIMED_AFTER (final checkpoints under --runs)")
    args = parser.parse_args(argv)
    info = setup(args)
    size = {**SIZE, "n_layers": args.layers}
    if args.quick:
        size, args.vocab_size, args.steps, args.batch_size, args.seq_len = QUICK_SIZE, 300, 5, 4, 32
        args.seeds, args.runs, args.timing_batches, args.repeats = args.seeds[:2], args.out / "ablation_runs", 1, 1
        args.results = args.runs / "results"
    args.runs.mkdir(parents=True, exist_ok=True)
    data = load_corpus(args.data_dir, args.vocab_size, args.runs, args.quick)
    cfgs = row_configs(size, data["vocab_size"], args.seq_len)
    loaders = {split: SequenceLoader(data[split]["ids"], args.seq_len, args.batch_size, shuffle=False, drop_last=False)
               for split in ("validation", "test")}
    swept = sweep(args, cfgs, data, loaders, cached_only=not args.sweep)
    best = {row: min(ppls, key=ppls.get) for row, ppls in (swept or {}).items()}
    vanilla_lr, tmt_lr = args.lr or (best.get("vanilla", SWEPT_LR["vanilla"]), best.get("full", SWEPT_LR["full"]))
    lrs = {row: vanilla_lr if row.startswith("vanilla") else tmt_lr for row in cfgs}
    if args.sweep:
        print(json.dumps({"sweep_val_word_ppl": swept, "best": best}, indent=1))
        return {"sweep": swept, "best": best}
    if not (args.table_only or args.retime or args.time_rows):
        study(args, cfgs, lrs, data, loaders)
    results = cached_results(args, cfgs, lrs)
    if args.retime and retime(args, cfgs, data, loaders, results):
        results = cached_results(args, cfgs, lrs)
    times_file = args.results / "row_eval_times.json"
    row_times = json.loads(times_file.read_text()) if times_file.exists() else {}
    if args.time_rows:
        row_times.update(time_rows(cfgs, [row for row in args.rows if row in cfgs], data, loaders, args.timing_batches,
                                   args.repeats))
        times_file.parent.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(row_times, indent=1) + "\n")
    row_times = {row: t for row, t in row_times.items() if row in cfgs and t["identity"] == identity(cfgs[row])}
    fill_counted_flops(results)
    rows = summarise(results, row_times)
    effect, effect_off = interaction(rows), interaction(rows, "test_ppls_exits_off")
    tokens = args.steps * args.batch_size * args.seq_len
    report = [f"Model: d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, every other field the "
              f"shipped TMTConfig default; context {args.seq_len}; byte-level BPE of {data['vocab_size']:,} tokens "
              f"trained on the train split (tied head). Every row trained on {tokens:,} tokens ({args.steps} steps x "
              f"{args.batch_size} x {args.seq_len}, {tokens / data['train']['ids'].numel():.1f} epochs), AdamW, warmup "
              f"{RECIPE['warmup']}, cosine to lr/10, dropout {size['dropout']}; lr per row in the table (sweep of "
              f"{', '.join(f'{lr:g}' for lr in SWEEP_LRS)} on a tenth of the budget: {best or SWEPT_LR}). Exit rows: "
              f"early-exit loss weight {EXIT_RECIPE['exit_loss_weight']}, τ calibrated on the validation split at "
              f"+2 % loss (the shipped recipe; `work at +2 % PPL`: the work fraction where the test τ curve crosses "
              f"+2 % word PPL over exits off, interpolated); eval time at τ over exits off measured alternately on "
              f"{args.timing_batches} test batches "
              f"(median of {args.repeats}, {info['torch_threads']} thread){stale_timing(results)}. PPL per word: exp(total subword NLL / "
              f"{data['test']['words']:,} test words), non-overlapping {args.seq_len}-token windows over the whole "
              f"test split. Seeds {args.seeds} for {' and '.join(MULTI_SEED)} (mean ± std), {args.seeds[0]} for the rest.",
              f"Published level at a similar budget: {REFERENCE}.", report_table(rows)]
    if any(r["mflops_from_work"] for r in rows.values()):
        report.append("≈ (dashed in the FLOPs panel): a run made before FLOPs were counted, given the count of a counted "
                      "run of the same architecture at its work fraction (the count is linear in the work fraction).")
    for name, eff in (("at τ", effect), ("exits off", effect_off)):
        if eff:
            report.append(f"Interaction ({name}; full gain − sum of the five single gains, gain = vanilla PPL − row PPL): "
                          f"{eff['full_gain']:.1f} − {eff['sum_of_single_gains']:.1f} = **{eff['interaction']:+.1f} ± "
                          f"{eff['interaction_se']:.1f}** PPL ({'superadditive' if eff['interaction'] > eff['interaction_se'] else 'not superadditive' if eff['interaction'] < -eff['interaction_se'] else 'additive within its spread'}).")
    return finish(NAME, args, info, report, {"size": size, "vocab_size": data["vocab_size"], "lrs": lrs, "sweep": swept,
                                             "rows": rows, "row_eval_times": row_times,
                                             "interaction": effect, "interaction_exits_off": effect_off,
                                             "runs": results}, plot(rows, results, row_times), argv=argv)


if __name__ == "__main__":
    main()
