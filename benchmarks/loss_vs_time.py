"""Loss per training second: validation perplexity of vanilla and the full TMT against cumulative training
seconds and training FLOPs, the two models trained in one process on the same batches, their optimizer steps
alternated (a step of vanilla, a step of full, ...) so that a change of machine load hits both alike.

Two settings (``--context``), rows ``vanilla`` and ``full`` at equal parameters and tokens:

* ``256``: the WikiText-2 ablation's (``benchmarks/ablation.py``: BPE-4096, batch 16, its lr, recipe and
  2,500 steps), the full row with the cheaper exit recipe (its ``full, drawn-layer exit loss`` row: the
  early-exit loss on 2,048 sampled tokens of one early layer drawn per step); PPL per word (the ablation's
  ``word_ppl``: the mean subword loss times the split's subwords per word);
* ``2048``: ``benchmarks/long_context_lm.py``'s (character-level WikiText-2, batch 2, 250 steps), full being
  its ``tmt-exact`` row (exits off); PPL per character.

Only the training steps are timed (``time.perf_counter`` around each ``Trainer.train_step``); a training step
counts 3x its forward's FLOPs (``TMTOutput.flops``: the layers' projections, FFN, attention edges and mesh
search) plus every call of the tied LM head (``2 * d_model * vocab_size`` a row: the final logits, the
early-exit loss's and the gate objective's heads; 3x where the call builds a graph, 1x under ``no_grad``);
embeddings are not counted. Every ``--eval-every`` steps both
models are validated on the first ``--val-batches`` validation batches, and both checkpoints and the curve
so far (``curve.json``) are written under ``--runs/<context>``: rerun the same command to continue from the
last validation point (a larger ``--steps`` extends the run, its cosine schedule stretched from there). The
table states which model is better at equal training seconds (each curve interpolated linearly in loss at
fractions of the shorter run's seconds, never extrapolated).
Seconds are only comparable on an otherwise quiet machine: run it alone (the load average is recorded at
every validation point).

    nice -n 19 python -m benchmarks.loss_vs_time --context 256 --threads 1
    nice -n 19 python -m benchmarks.loss_vs_time --context 2048 --threads 1
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from tmt_pyg import TMTModel
from tmt_pyg.data import SequenceLoader
from tmt_pyg.data.corpus import load_data
from tmt_pyg.train import Trainer, seed_everything

from . import ablation, long_context_lm
from .common import DATA_DIR, base_parser, finish, markdown_table, new_figure, setup

NAME = "loss_vs_time"
ROWS = ("vanilla", "full")
LONG_LR = 3e-3  # long_context_lm's --lr default
FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the shorter run's training seconds: the equal-time table's points


def bpe_setting(args) -> Dict:
    """The ablation's vanilla and full rows (full: its drawn-layer exit loss), data and recipe."""
    size, vocab, batch, seq_len = ((ablation.QUICK_SIZE, 300, 4, 32) if args.quick else (ablation.SIZE, 4096, 16, 256))
    data = ablation.load_corpus(args.data_dir, vocab, args.runs, args.quick)
    rows = ablation.row_configs(size, data["vocab_size"], seq_len)
    recipe = argparse.Namespace(steps=args.steps, batch_size=batch, seq_len=seq_len, quick=args.quick)
    return {"configs": {"vanilla": rows["vanilla"], "full": rows["full, drawn-layer exit loss"]},
            "train": {row: ablation.train_config(recipe, ablation.SWEPT_LR[row], args.seed, args.runs / row) for row in ROWS},
            "ids": {split: data[split]["ids"] for split in ("train", "validation")}, "ppl_unit": "word",
            "note": "`benchmarks/ablation.py`'s setting, the full row with the early-exit loss on 2,048 tokens of one early layer drawn per step",
            "ppl": lambda loss: ablation.word_ppl(loss, data["validation"])}


def char_setting(args) -> Dict:
    """long_context_lm's vanilla and tmt-exact (as full) rows on character-level WikiText-2, and its recipe."""
    size, route_block = long_context_lm.SIZE, 64
    if args.quick:  # long_context_lm's quick sizes
        size, route_block = dict(size, d_model=32, n_layers=2, max_seq_len=256), 32
    tok, splits = load_data("wikitext-2", str(args.data_dir), ("train", "validation"), tokenizer="char")
    ids = {split: stream for split, (stream, _) in splits.items()}
    if args.quick:
        ids["train"] = ids["train"][:50_000]
    rows = long_context_lm.row_configs(len(tok), size, route_block)
    recipe = argparse.Namespace(steps=args.steps, lr=LONG_LR, quick=args.quick)
    return {"configs": {"vanilla": rows["vanilla"], "full": rows["tmt-exact"]},
            "train": {row: long_context_lm.train_config(recipe, args.runs / row, args.seed, size["max_seq_len"]) for row in ROWS},
            "ids": ids, "ppl_unit": "character", "ppl": lambda loss: math.exp(min(loss, 50.0)),
            "note": "`benchmarks/long_context_lm.py`'s setting, full being its `tmt-exact` row (exits off)"}


SETTINGS = {256: (bpe_setting, 2500, 250), 2048: (char_setting, 250, 25)}  # context -> (setting, steps, eval every)


def identity(setting: Dict) -> Dict:
    """What a resumed curve must share with this invocation (the steps may grow)."""
    return {row: {"model": asdict(setting["configs"][row]), "lr": t.lr, "batch_size": t.batch_size, "seq_len": t.seq_len,
                  "val_batches": t.eval_batches, "seed": t.seed} for row, t in setting["train"].items()}


def trainers(setting: Dict) -> Dict[str, Trainer]:
    """A trainer per row, every row reading the same batches (loaders seeded alike)."""
    out = {}
    for row, tcfg in setting["train"].items():
        seed_everything(tcfg.seed)
        ids = setting["ids"]
        loaders = (SequenceLoader(ids["train"], tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed),
                   SequenceLoader(ids["validation"], tcfg.seq_len, tcfg.batch_size, shuffle=False, drop_last=False))
        out[row] = Trainer(TMTModel(setting["configs"][row]), *loaders, cfg=tcfg)
    return out


def resume(runs: Path, setting: Dict, rows: Dict[str, Trainer]) -> Dict:
    """The curve so far under ``runs`` (every trainer back at its last point), or a new one."""
    path = runs / "curve.json"
    if not path.exists():
        return {"identity": identity(setting), "points": {row: [] for row in ROWS}}
    curve = json.loads(path.read_text())
    if curve["identity"] != json.loads(json.dumps(identity(setting))):
        raise SystemExit(f"{path} holds another setup: delete {runs} or pass another --runs")
    step = curve["points"]["vanilla"][-1]["step"]
    for row, trainer in rows.items():  # the same RNG state in both checkpoints: either one restores it
        trainer.resume(runs / row / "checkpoints" / f"step_{step:08d}.pt")
    print(f"[{NAME}] resuming {runs} at step {step}, after {curve['points']['full'][-1]['seconds']:.1f} s "
          f"(full) and {curve['points']['vanilla'][-1]['seconds']:.1f} s (vanilla) of training", flush=True)
    return curve


def warm_up(rows: Dict[str, Trainer], ids: torch.Tensor) -> None:
    """One untimed forward and backward of a copy of every row's model on ``ids`` (B, S), the RNG put back
    after it: what compiles on first use (the fused slot attention) compiles before the clock runs."""
    with torch.random.fork_rng(devices=[]):
        for trainer in rows.values():
            copy.deepcopy(trainer.model).train()(ids, compute_loss=True).loss.backward()


def count_head_flops(model: TMTModel, tally: List[float]) -> None:
    """Append the FLOPs of every later call of ``model.lm_head`` to ``tally`` (a hook on its final norm,
    used by nothing else): ``2 * d_model * vocab_size`` a row, 3x (forward and backward) when the call
    builds a graph."""
    cfg = model.config

    def count(module, inputs, out: torch.Tensor) -> None:
        rows = out.numel() // cfg.d_model
        tally.append(2.0 * cfg.d_model * cfg.vocab_size * rows * (3 if torch.is_grad_enabled() else 1))
    model.ln_f.register_forward_hook(count)


def train_alternately(rows: Dict[str, Trainer], curve: Dict, runs: Path, args, ppl: Callable[[float], float]) -> None:
    """Alternate one optimizer step per row up to ``args.steps``, timing only the steps; validate both rows,
    checkpoint them and write the curve every ``args.eval_every`` steps and at the end."""
    forward_flops = {row: [] for row in rows}  # TMTOutput.flops of the row's forwards inside the current step
    head_flops = {row: [] for row in rows}  # its LM head calls' training FLOPs
    for row, trainer in rows.items():
        trainer.model.register_forward_hook(lambda module, inputs, out, row=row: forward_flops[row].append(out.flops))
        count_head_flops(trainer.model, head_flops[row])
    last = {row: points[-1] if points else {"seconds": 0.0, "flops": 0.0} for row, points in curve["points"].items()}
    seconds, flops = {row: last[row]["seconds"] for row in rows}, {row: last[row]["flops"] for row in rows}
    batches = {row: trainer._batches() for row, trainer in rows.items()}
    step = rows["vanilla"].step
    while step < args.steps:
        for row, trainer in rows.items():
            forward_flops[row].clear()
            head_flops[row].clear()
            start = time.perf_counter()
            trainer.train_step(batches[row])
            seconds[row] += time.perf_counter() - start
            flops[row] += 3 * sum(forward_flops[row]) + sum(head_flops[row])  # layers: 3x the forward
        step += 1
        if step % args.eval_every and step != args.steps:
            continue
        load = list(os.getloadavg())
        for row, trainer in rows.items():
            loss = trainer.evaluate()["loss"]
            curve["points"][row].append({"step": step, "seconds": seconds[row], "flops": flops[row], "loss": loss,
                                         "ppl": ppl(loss), "subword_ppl": math.exp(min(loss, 50.0)), "load": load})
        for trainer in rows.values():  # both checkpoints after the evaluations: the same RNG state in each
            trainer.save()
        tmp = runs / "curve.json.tmp"
        tmp.write_text(json.dumps(curve, indent=1) + "\n")
        tmp.replace(runs / "curve.json")
        print(f"[{NAME}] step {step}/{args.steps}: " + ", ".join(
            f"{row} val PPL {p[-1]['ppl']:.1f} after {p[-1]['seconds']:.1f} s" for row, p in curve["points"].items())
            + f"; load {load[0]:.2f}", flush=True)


def equal_time(points: Dict[str, List[Dict]]) -> List[Dict]:
    """Both rows' val PPL at shared training seconds: ``FRACTIONS`` of the shorter run's seconds (its end
    included, read off the other curve) that lie inside both curves, each interpolated linearly in log PPL
    (that is, in loss); never extrapolated."""
    end = min(p[-1]["seconds"] for p in points.values())
    start = max(p[0]["seconds"] for p in points.values())
    out = []
    for t in (f * end for f in FRACTIONS if f * end >= start):
        ppl = {row: math.exp(np.interp(t, [q["seconds"] for q in p], [math.log(q["ppl"]) for q in p]))
               for row, p in points.items()}
        out.append({"seconds": t, **{f"{row}_ppl": v for row, v in ppl.items()}, "better": min(ppl, key=ppl.get)})
    return out


def plot(points: Dict[str, List[Dict]], unit: str, context: int):
    fig, (secs, work) = new_figure(ncols=2)
    for row, p in points.items():
        for ax, key, scale in ((secs, "seconds", 1.0), (work, "flops", 1e-12)):
            ax.plot([q[key] * scale for q in p], [q["ppl"] for q in p], "o-", label=row)
    secs.set(xlabel="cumulative training seconds (steps only)", title=f"context {context}, steps alternated")
    work.set(xlabel="cumulative training TFLOPs (counted: layers and LM heads)", title=f"context {context}")
    for ax in (secs, work):
        ax.set(ylabel=f"validation PPL per {unit}", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--context", type=int, choices=sorted(SETTINGS), default=256)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default: the setting's)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between validation points (default: a tenth of the setting's steps)")
    parser.add_argument("--val-batches", type=int, default=16,
                        help="validation batches per point (from the split's start)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--runs", type=Path, default=Path("runs") / NAME, help="checkpoints and curves (<runs>/<context>)")
    args = parser.parse_args(argv)
    make_setting, steps, every = SETTINGS[args.context]
    if args.quick:
        steps, every, args.val_batches = 6, 2, 2
    args.steps, args.eval_every = args.steps or steps, args.eval_every or every
    args.runs = args.runs / f"{args.context}{'-quick' if args.quick else ''}"
    args.runs.mkdir(parents=True, exist_ok=True)
    info = setup(args)
    setting = make_setting(args)
    setting["train"] = {row: replace(t, eval_batches=args.val_batches, keep_last=2) for row, t in setting["train"].items()}
    rows = trainers(setting)
    curve = resume(args.runs, setting, rows)
    tcfg = setting["train"]["vanilla"]
    warm_up(rows, setting["ids"]["train"][:tcfg.batch_size * tcfg.seq_len].view(tcfg.batch_size, tcfg.seq_len))
    train_alternately(rows, curve, args.runs, args, setting["ppl"])

    points, unit = curve["points"], setting["ppl_unit"]
    summary = {row: {"params": rows[row].model.num_parameters(), "lr": setting["train"][row].lr,
                     "steps": p[-1]["step"], "val_ppl": p[-1]["ppl"], "train_seconds": p[-1]["seconds"],
                     "seconds_per_step": p[-1]["seconds"] / p[-1]["step"], "train_flops": p[-1]["flops"], "points": p}
               for row, p in points.items()}
    compared = equal_time(points)
    final = compared[-1] if compared else None
    loads = [q["load"][0] for p in points.values() for q in p]
    report = [
        f"Context {args.context}, batch {tcfg.batch_size}, {points['vanilla'][-1]['step']} steps of each row on the same "
        f"batches, optimizer steps alternated in one process ({args.threads} thread(s)); {setting['note']}. "
        f"Validation PPL per {unit} on the first {args.val_batches} validation batches every {args.eval_every} steps; "
        f"seconds: the training steps alone; FLOPs: 3x the counted forward of the layers (TMTOutput.flops) and "
        f"every LM head call (final logits, early-exit and gate objectives; 1x under no_grad), no embeddings. 1-min load average at the validation points "
        f"{min(loads):.2f}–{max(loads):.2f}.",
        markdown_table(["row", "params", "lr", "steps", f"final val PPL ({unit})", "train s", "s / step", "train TFLOPs"],
                       [(row, f"{s['params']:,}", f"{s['lr']:g}", s["steps"], f"{s['val_ppl']:.2f}",
                         f"{s['train_seconds']:.1f}", f"{s['seconds_per_step']:.3f}", f"{s['train_flops'] / 1e12:.3f}")
                        for row, s in summary.items()]),
        "At equal training seconds (fractions of the shorter run's time, each curve interpolated linearly in log PPL):",
        markdown_table(["train s", "vanilla PPL", "full PPL", "better"],
                       [(f"{c['seconds']:.1f}", f"{c['vanilla_ppl']:.2f}", f"{c['full_ppl']:.2f}", c["better"])
                        for c in compared])]
    if final:
        report.append(f"At {final['seconds']:.1f} s of training (the shorter run's end) **{final['better']}** is better: "
                      f"vanilla {final['vanilla_ppl']:.2f}, full {final['full_ppl']:.2f} PPL per {unit}.")
    name = f"{NAME}_{args.context}"
    payload = {"context": args.context, "ppl_unit": unit, "rows": summary, "equal_time": compared,
               "configs": {row: asdict(c) for row, c in setting["configs"].items()}}
    return finish(name, args, info, report, payload, plot(points, unit, args.context), argv=argv, module=NAME)


if __name__ == "__main__":
    main()
