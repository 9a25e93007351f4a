"""LayerSkip's training recipe on TMT: does layer dropout raise self-speculative acceptance without
costing the final loss?

Every row is the demo's TMT (d=128, 4 heads, context 64, mesh k=8 + window 8, 16 anchors) trained by
the demo's recipe (nanoGPT's CPU configuration on Tiny Shakespeare: batch 12, 2000 steps, lr 1e-3
cosine to 1e-4, dropout 0) with the early-exit LM loss (weight 0.5) that teaches the shared head to
read early layers:

* ``4L``, ``8L``: 4 and 8 layers, no layer dropout;
* ``4L-ld``, ``8L-ld``: the same with LayerSkip's layer dropout 0.2 (a sequence skips layer l with
  probability 0.2 * l / (L - 1) in training).

Per run: validation loss over the whole validation split (exits off), and the acceptance rate of
self-speculative greedy decoding (the first E layers draft d tokens, the full model verifies) for every
E in 1..L-1 and d in 2, 4, on prompts taken at even spacing from the validation split, one prompt at a
time (acceptance counts tokens, so machine load does not enter). Every speculative output is checked
equal to plain greedy decoding. Greedy continuations of these character models soon repeat a few
words, which flatters acceptance, so the draft heads are also measured teacher-forced on validation
text: per E, how often the shared head on layer E's output picks the full model's token, and its loss.
Exits are off throughout (the full model is what the drafts must match).
Each finished run is cached as ``<runs>/<row>_seed<s>.json`` beside its run folder (checkpoints there,
for ``benchmarks/speculative.py --run``); an interrupted run continues from its newest checkpoint.

    python -m benchmarks.layerskip --rows 4L 4L-ld --seeds 0 --threads 1
    python -m benchmarks.layerskip --rows 8L 8L-ld --seeds 0 --threads 1
    python -m benchmarks.layerskip --table-only
"""
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import RESULTS_DIR, base_parser, finish, markdown_table, mean_std, new_figure, run_study, seed_groups, setup
from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data.corpus import checkpoint_extra, load_data, make_loader
from tmt_pyg.models.speculative import speculative_generate
from tmt_pyg.train import TrainConfig, Trainer, evaluate_at_threshold, load_run, seed_everything

NAME = "layerskip"
ROWS = ("4L", "4L-ld", "8L", "8L-ld")
LAYER_DROPOUT = 0.2
DRAFT_TOKENS = (2, 4)
SIZE = dict(d_model=128, n_heads=4, max_seq_len=64, dropout=0.0, graph_k=8, mesh_window=8, memory_anchors=16)
MEASURES = ("val", "speculative", "early_heads", "greedy_text")  # what every cached run gets (see measure)
SYNTHETIC_TOKENS = 400_000  # the demo's default; recorded in the checkpoints, unused for Tiny Shakespeare


def row_configs(vocab_size: int, size: Dict = SIZE, depths: Dict[str, int] = None) -> Dict[str, TMTConfig]:
    """The demo's TMT with exits trained at weight 0.5, at every row's depth and layer dropout."""
    depths = depths or {"4L": 4, "8L": 8}
    configs = {}
    for name, layers in depths.items():
        for suffix, rate in (("", 0.0), ("-ld", LAYER_DROPOUT)):
            configs[name + suffix] = TMTConfig(vocab_size=vocab_size, n_layers=layers, **size, exit_loss_weight=0.5,
                                               layer_dropout=rate)
    return configs


def train_config(args, folder: Path, seed: int) -> TrainConfig:
    """The demo's TrainConfig (``tmt-pyg demo`` defaults)."""
    return TrainConfig(steps=args.steps, batch_size=12, seq_len=64, lr=1e-3, min_lr=1e-4, warmup=min(100, max(1, args.steps // 10)),
                       beta2=0.99, eval_every=args.eval_every, eval_batches=40, out_dir=str(folder), seed=seed, device="cpu",
                       progress=not args.quick)


def prompts_from(stream: torch.Tensor, count: int, length: int) -> List[torch.Tensor]:
    """``count`` prompts of ``length`` tokens at even spacing through ``stream`` (the same for every run)."""
    starts = torch.linspace(0, stream.numel() - length - 1, count).long().tolist()
    return [stream[s:s + length] for s in starts]


@torch.no_grad()
def acceptance(model: TMTModel, prompts: List[torch.Tensor], new_tokens: int) -> Dict:
    """Self-speculative greedy decoding of every prompt (B=1) for every draft depth E and draft length
    d: acceptance and rounds, summed over prompts; raises if an output differs from plain greedy."""
    model.eval()
    L, out, checks = model.config.n_layers, {}, 0
    plain = [model.generate(p.unsqueeze(0), new_tokens, temperature=0) for p in prompts]
    for d in DRAFT_TOKENS:
        for E in range(1, L):
            drafted = accepted = rounds = 0
            for p, reference in zip(prompts, plain):
                tokens, stats = speculative_generate(model, p.unsqueeze(0), new_tokens, E, d, temperature=0)
                if not torch.equal(tokens, reference):
                    raise RuntimeError(f"speculative greedy output (E={E}, d={d}) differs from plain greedy decoding "
                                       f"after prompt {p.tolist()}:\n{tokens[0].tolist()}\n{reference[0].tolist()}")
                checks += 1
                drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
            out[f"E{E}_d{d}"] = {"E": E, "d": d, "acceptance": accepted / max(drafted, 1), "drafted": drafted,
                                 "accepted": accepted, "rounds": rounds,
                                 "tokens_per_round": len(prompts) * new_tokens / rounds}
    return {"prompts": len(prompts), "prompt_tokens": prompts[0].numel(), "new_tokens": new_tokens, "greedy_checks": checks,
            "draft": out}


@torch.no_grad()
def early_heads(model: TMTModel, stream: torch.Tensor, batches: int) -> Dict:
    """Teacher-forced, on ``batches`` x 12 x 64 tokens of ``stream``: per depth E, the next-token loss of
    the shared head on layer E's output (E = 1..L, L: the full model on the same tokens) and, for E < L,
    how often its argmax agrees with the full model's (a draft token's chance of acceptance on real
    text rather than on the model's own greedy text)."""
    model.eval()
    L, agree, losses = model.config.n_layers, {}, {}
    ids = stream[:batches * 12 * 64].view(batches, 12, 64)
    for x in ids:
        states = model(x, output_hidden_states=True).hidden_states  # L + 1 inputs/outputs, (N + R, D), tokens first
        logits = [model.lm_head(h[:x.numel()]).view(12, 64, -1) for h in states[1:]]  # after layer 1 .. L
        final = logits[-1].argmax(-1)
        for E, lg in enumerate(logits, start=1):
            agree.setdefault(E, []).append((lg.argmax(-1) == final).float().mean().item())
            losses.setdefault(E, []).append(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item())
    return {"tokens": ids.numel(), "agreement": {str(E): statistics.mean(v) for E, v in agree.items() if E < L},
            "loss": {str(E): statistics.mean(v) for E, v in losses.items()}}


@torch.no_grad()
def greedy_text(model: TMTModel, prompts: List[torch.Tensor], new_tokens: int, n: int = 8) -> Dict:
    """Plain greedy continuations of ``prompts`` and how repetitive they are: the share of distinct
    ``n``-grams among each continuation's n-grams, averaged (1: no n-gram repeats; the drafts of a
    model that loops are easy to accept)."""
    model.eval()
    texts = [model.generate(p.unsqueeze(0), new_tokens, temperature=0)[0, p.numel():].tolist() for p in prompts]
    grams = [[tuple(t[i:i + n]) for i in range(len(t) - n + 1)] for t in texts]
    return {"continuations": texts, f"distinct_{n}grams": statistics.mean(len(set(g)) / len(g) for g in grams)}


def measure(result: Dict, model: TMTModel, val, data: Dict, args) -> bool:
    """Fill in the measurements ``result`` lacks (all of them after training; those added to the study
    later for a cached run), ``val`` the validation loader; whether any was missing."""
    model.config.use_exit = False  # the full model: what plain greedy decoding produces and the drafts must match
    missing = [key for key in MEASURES if key not in result]
    if "val" in missing:
        result["val"] = evaluate_at_threshold(model, val, None)
    prompts = prompts_from(data["validation"][0], args.prompts, args.prompt_tokens)
    if "speculative" in missing:
        result["speculative"] = acceptance(model, prompts, args.new)
    if "greedy_text" in missing:
        result["greedy_text"] = greedy_text(model, prompts, args.new)
    if "early_heads" in missing:
        result["early_heads"] = early_heads(model, data["validation"][0], args.head_batches)
    return bool(missing)


def run_once(row: str, cfg: TMTConfig, seed: int, data: Dict, args) -> Dict:
    """Train one row with one seed (or read the cached result); measure loss, acceptance and the early heads."""
    folder = args.runs / f"{row}_seed{seed}"
    cache = folder.with_suffix(".json")
    train = train_config(args, folder, seed)
    val = make_loader(*data["validation"], train, False)
    if cache.exists():
        result = json.loads(cache.read_text())
        if any(key not in result for key in MEASURES) and measure(result, load_run(folder)[0], val, data, args):
            print(f"[{row} seed {seed}] cached run: measured what it lacked", flush=True)
            cache.write_text(json.dumps(result, indent=1) + "\n")
        return result
    seed_everything(seed)
    model = TMTModel(cfg)
    # quick: no evaluations (and their loss plots) during training, the final one in measure() is enough
    trainer = Trainer(model, make_loader(*data["train"], train, True), None if args.quick else val, train, data["extra"])
    resumed_from = trainer.step if trainer.resume() else 0
    print(f"[{row} seed {seed}] {model.num_parameters():,} parameters, {train.steps} steps"
          + (f", continuing from step {resumed_from}" if resumed_from else ""), flush=True)
    start = time.perf_counter()
    trainer.fit()
    trainer.close()
    result = {"row": row, "seed": seed, "params": model.num_parameters(), "model": asdict(cfg), "train": asdict(train),
              "train_seconds": time.perf_counter() - start, "resumed_from_step": resumed_from,
              "train_tokens": train.steps * 12 * 64}
    measure(result, model, val, data, args)
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarise(results: List[Dict]) -> Dict[str, Dict]:
    """Per row: seeds, loss mean and spread, and acceptance per ``E<e>_d<d>`` pooled over seeds."""
    rows = {}
    for row, mine in seed_groups(results, ROWS):
        loss = [r["val"]["loss"] for r in mine]
        mean, std = mean_std(loss)
        draft = {}
        for key in mine[0]["speculative"]["draft"]:
            parts = [r["speculative"]["draft"][key] for r in mine]
            pooled = sum(p["accepted"] for p in parts) / sum(p["drafted"] for p in parts)
            draft[key] = {"E": parts[0]["E"], "d": parts[0]["d"], "acceptance": pooled, "acceptance_per_seed": [p["acceptance"] for p in parts],
                          "tokens_per_round": statistics.mean(p["tokens_per_round"] for p in parts)}
        rows[row] = {"seeds": [r["seed"] for r in mine], "n_layers": mine[0]["model"]["n_layers"],
                     "layer_dropout": mine[0]["model"]["layer_dropout"], "params": mine[0]["params"], "val_loss": mean,
                     "val_loss_std": std, "val_losses": loss, "train_seconds": statistics.mean(r["train_seconds"] for r in mine),
                     "greedy_checks": sum(r["speculative"]["greedy_checks"] for r in mine), "draft": draft,
                     "distinct_8grams": statistics.mean(r["greedy_text"]["distinct_8grams"] for r in mine),
                     **{f"head_{m}": {E: statistics.mean(r["early_heads"][m][E] for r in mine) for E in mine[0]["early_heads"][m]}
                        for m in ("agreement", "loss")}}
    return rows


def spread(mean: float, std: Optional[float]) -> str:
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def notes(rows: Dict[str, Dict], vanilla: Optional[Dict]) -> List[str]:
    """One line per depth with both rows: what layer dropout changed in acceptance (greedy decoding,
    per d and E), in teacher-forced agreement (per E) and in the final loss, the last set against
    vanilla's seed spread from the shakespeare study."""
    lines = []
    for base in sorted({name.removesuffix("-ld") for name in rows}, key=ROWS.index):
        plain, dropped = rows.get(base), rows.get(base + "-ld")
        if plain is None or dropped is None:
            continue
        Es = range(1, plain["n_layers"])
        gains = {(E, d): dropped["draft"][f"E{E}_d{d}"]["acceptance"] - plain["draft"][f"E{E}_d{d}"]["acceptance"]
                 for d in DRAFT_TOKENS for E in Es}
        by_d = "; ".join(f"d={d}: " + " ".join(f"{gains[E, d]:+.3f}" for E in Es) for d in DRAFT_TOKENS)
        agree = " ".join(f"{dropped['head_agreement'][str(E)] - plain['head_agreement'][str(E)]:+.3f}" for E in Es)
        cost = dropped["val_loss"] - plain["val_loss"]
        yardstick = ""
        if vanilla and vanilla.get("val_loss_std"):
            std, lo, hi = vanilla["val_loss_std"], min(vanilla["val_losses"]), max(vanilla["val_losses"])
            yardstick = (f"; vanilla's {len(vanilla['seeds'])} seeds span {lo:.4f}-{hi:.4f} (std {std:.4f}): the change is "
                         f"{abs(cost) / std:.1f} stds, {'within' if abs(cost) <= std else 'outside'} that seed spread")
        lines.append(f"- **{base}** vs **{base}-ld** (seeds {plain['seeds']} vs {dropped['seeds']}): greedy acceptance up at "
                     f"{sum(g > 0 for g in gains.values())} of {len(gains)} (E, d) settings (E = 1..{plain['n_layers'] - 1}; {by_d}); "
                     f"teacher-forced agreement per E {agree}; final val loss {spread(plain['val_loss'], plain['val_loss_std'])} -> "
                     f"{spread(dropped['val_loss'], dropped['val_loss_std'])} ({cost:+.4f}){yardstick}.")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations and checkpoints (the demo's)")
    parser.add_argument("--prompts", type=int, default=8, help="validation prompts per run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new", type=int, default=48, help="new tokens per prompt (prompt + new <= 64 + 1)")
    parser.add_argument("--head-batches", type=int, default=40, help="validation batches (12 x 64) of the teacher-forced head measures")
    parser.add_argument("--runs", type=Path, default=Path("runs/layerskip"), help="cache of finished runs")
    parser.add_argument("--table-only", action="store_true", help="table and plot of the cached runs; train nothing")
    args = parser.parse_args(argv)
    size, depths = SIZE, None
    if args.quick:
        size, depths = dict(SIZE, d_model=32), {"4L": 3, "8L": 4}
        args.rows, args.seeds, args.steps, args.eval_every = ["4L", "4L-ld"], [0], 3, 3
        args.prompts, args.prompt_tokens, args.new, args.head_batches, args.runs = 2, 8, 8, 2, args.out / "runs"
    info = setup(args)
    args.runs.mkdir(parents=True, exist_ok=True)
    tok, splits = load_data("tinyshakespeare", None, ("train", "validation"))
    if args.quick:
        splits = {name: (stream[:20_000 if name == "train" else 4_096], fields) for name, (stream, fields) in splits.items()}
    data = dict(splits, extra=checkpoint_extra(tok, "tinyshakespeare", None, SYNTHETIC_TOKENS))
    configs = row_configs(len(tok), size, depths)
    results = run_study(args, configs, data, run_once, ROWS)
    if not args.table_only:  # every cached run, of any row and seed, gets the measures added to the study after it
        results = [run_once(r["row"], configs[r["row"]], r["seed"], data, args) for r in results]
    rows = summarise(results)
    shakespeare = RESULTS_DIR / "shakespeare.json"
    vanilla = json.loads(shakespeare.read_text())["rows"].get("vanilla") if shakespeare.exists() else None
    deepest = max((s["n_layers"] for s in rows.values()), default=1)
    loss_table = markdown_table(
        ["row", "layers", "layer dropout", "seeds", "params", "val loss (exits off)", "distinct 8-grams of greedy text", "train s/run"],
        [(name, s["n_layers"], s["layer_dropout"], len(s["seeds"]), f"{s['params']:,}", spread(s["val_loss"], s["val_loss_std"]),
          f"{s['distinct_8grams']:.2f}", f"{s['train_seconds']:.0f}") for name, s in rows.items()])
    acc_table = markdown_table(
        ["row", "d"] + [f"E={E}" for E in range(1, deepest)],
        [(name, d, *[f"{s['draft'][f'E{E}_d{d}']['acceptance']:.3f}" if E < s["n_layers"] else "" for E in range(1, deepest)])
         for name, s in rows.items() for d in DRAFT_TOKENS])
    head_table = markdown_table(
        ["row", "measure"] + [f"E={E}" for E in range(1, deepest)] + ["full model"],
        [(name, label, *[f"{s[key][str(E)]:.3f}" if E < s["n_layers"] else "" for E in range(1, deepest)],
          f"{s['head_loss'][str(s['n_layers'])]:.3f}" if key == "head_loss" else "")
         for name, s in rows.items() for key, label in (("head_agreement", "argmax agrees with the full model's"),
                                                          ("head_loss", "next-token loss"))])
    first = results[0]["speculative"] if results else {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new}
    report = [f"The demo's TMT and recipe (d={size['d_model']}, {size['n_heads']} heads, context 64, batch 12, {args.steps} steps, "
              "lr 1e-3 cosine to 1e-4, dropout 0, early-exit LM loss weight 0.5) on the shipped Tiny Shakespeare, character "
              f"level; `-ld` rows add LayerSkip's layer dropout {LAYER_DROPOUT} (layer l skipped per sequence with probability "
              f"{LAYER_DROPOUT} l / (L - 1) in training). Validation loss over the whole validation split, exits off"
              + (f"; vanilla (shakespeare study) {spread(vanilla['val_loss'], vanilla['val_loss_std'])} over seeds {vanilla['seeds']}."
                 if vanilla else ".")
              + " Distinct 8-grams: the share of distinct character 8-grams in each plain greedy continuation of the prompts "
              "below, averaged (1: nothing repeats; lower: the model loops, and loops make drafts easy to accept).",
              loss_table,
              f"Acceptance of self-speculative greedy decoding (draft: the first E layers and the shared head, d tokens per round; "
              f"the fraction of drafted tokens the full model keeps), {first['prompts']} validation prompts of "
              f"{first['prompt_tokens']} tokens at even spacing, {first['new_tokens']} new tokens each, B=1, exits off, pooled over "
              f"prompts and seeds. Every speculative output was checked equal to plain greedy decoding "
              f"({sum(s['greedy_checks'] for s in rows.values())} checks, all equal).",
              acc_table,
              f"The shared head on layer E's output, teacher-forced on the first {args.head_batches} x 12 x 64 validation tokens "
              "(exits off): how often its argmax is the full model's (a draft token's chance of acceptance on real text, not on "
              "the model's own greedy text, which for these character models soon repeats a few words), and its next-token loss "
              "(last column: the full model on the same tokens).",
              head_table,
              f"Trained runs (checkpoints, for `python -m benchmarks.speculative --run <folder>`): `{args.runs}/<row>_seed<s>/`, "
              "each trained by `python -m benchmarks.layerskip --rows <row> --seeds <s> --threads 1`, one at a time."]
    found = notes(rows, vanilla)
    if found:
        report += ["Notes:", "\n".join(found)]
    fig, axes = new_figure(ncols=max(len(rows), 1), width=4.0)
    for ax, (name, s) in zip(axes, rows.items()):
        for d in DRAFT_TOKENS:
            Es = range(1, s["n_layers"])
            ax.plot(list(Es), [s["draft"][f"E{E}_d{d}"]["acceptance"] for E in Es], "o-", label=f"acceptance, d={d}")
        ax.plot(list(Es), [s["head_agreement"][str(E)] for E in Es], "k--", label="teacher-forced agreement")
        ax.set(xlabel="draft layers E", ylabel="acceptance rate", title=f"{name} (val loss {s['val_loss']:.3f})", ylim=(0, 1),
               xticks=list(Es))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return finish(NAME, args, info, report, {"rows": rows, "vanilla": vanilla, "runs": results}, fig, argv=argv)


if __name__ == "__main__":
    main()
