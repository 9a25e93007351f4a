"""Multi-query associative recall (MQAR, the "Zoology" task of Arora et al. 2023): can the mesh find
what attention finds? Vanilla, the seed's pure kNN mesh and mesh variants (a local window of previous
tokens as extra slots) at equal parameters, data and steps; accuracy on the answers.

A sequence holds ``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the lower half of
the vocabulary, values from the upper half), then a query region of length ``S - 2 * pairs`` where
every key appears once more at a random even offset, followed by its value; the rest is token 0. The
loss and the accuracy count only the positions of the query keys, where the next token is the value.
Every finished run is cached as JSON under ``--runs``, so an interrupted sweep continues.

    python -m benchmarks.recall --threads 2

``--variants`` instead trains the shipped default model and its ablation arms (issue 23: the whole
default model must recall, not only its mesh) over ``--seeds`` at one point and learning rate, logs
the attention mass that goes to the memory anchors and the learned decay rates during training, and
writes ``recall_default.md``/``.json``: mean and spread over seeds of every arm cached in ``--runs``
at that budget (``--label`` names the code version a run measured, e.g. before and after a fix).

    python -m benchmarks.recall --threads 1 --variants vanilla mesh default --seeds 0 1 2 --points 64:16 \
        --steps 3000 --lrs 3e-3 --runs runs/recall_default --label after
"""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import base_parser, finish, markdown_table, mean_std, new_figure, setup
from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters

NAME = "recall"


def mqar_batch(batch_size: int, seq_len: int, pairs: int, vocab: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """MQAR sequences (B, S) and the answer mask (B, S): True where the next token is a recalled value."""
    if 4 * pairs > seq_len:
        raise ValueError(f"{pairs} pairs need seq_len >= {4 * pairs}, got {seq_len}")
    half = vocab // 2
    keys = torch.rand(batch_size, half - 1, generator=gen).argsort(1)[:, :pairs] + 1  # distinct, never 0
    values = torch.randint(half, vocab, (batch_size, pairs), generator=gen)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2] = keys, values
    slots = (seq_len - 2 * pairs) // 2  # even offsets of the query region
    offset = 2 * pairs + 2 * torch.rand(batch_size, slots, generator=gen).argsort(1)[:, :pairs]  # (B, pairs)
    order = torch.rand(batch_size, pairs, generator=gen).argsort(1)  # keys asked in random order
    rows = torch.arange(batch_size).unsqueeze(1)
    ids[rows, offset] = keys.gather(1, order)
    ids[rows, offset + 1] = values.gather(1, order)
    answer = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    answer[rows, offset] = True
    return ids, answer


def recall_loss(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of the next-token prediction at the answer positions."""
    target = ids.roll(-1, dims=1)[answer]
    scored = logits[answer]
    return F.cross_entropy(scored, target), (scored.argmax(-1) == target).float().mean()


def model_configs(size: Dict, window: int) -> Dict[str, TMTConfig]:
    """Vanilla, the seed's pure mesh (state similarity) and the mesh variants: a window of previous
    tokens, the attention similarity (queries search keys), both. All without exits, anchors or
    decay (the recall mechanism under test is the attention graph); every mesh variant has the
    pure mesh's parameters, vanilla's MLP width is matched to them."""
    mesh = dict(size, use_mesh=True)
    configs = {"vanilla": TMTConfig.vanilla(**size), "mesh (pure kNN)": TMTConfig.vanilla(**mesh),
               f"mesh + window {window}": TMTConfig.vanilla(**mesh, mesh_window=window),
               "attention mesh": TMTConfig.vanilla(**mesh, mesh_similarity="attention"),
               f"attention mesh + window {window}": TMTConfig.vanilla(**mesh, mesh_similarity="attention", mesh_window=window)}
    target = count_parameters(configs["mesh (pure kNN)"])
    return {name: match_parameters(cfg, target) for name, cfg in configs.items()}


MODELS = ("vanilla", "state", "state-window", "attention", "attention-window")  # --models keys, in model_configs order

# --variants: the shipped default (every part on, the causal mesh's defaults) and its ablation arms, at the
# shipped widths (no parameter matching: the default is what is measured)
VARIANTS = {
    "vanilla": dict(),
    "mesh": dict(use_mesh=True),
    "mesh+anchors": dict(use_mesh=True, use_anchors=True),
    "mesh+decay": dict(use_mesh=True, use_decay=True),
    "mesh+dual": dict(use_mesh=True, dual_stream=True),
    "mesh+decay+anchors": dict(use_mesh=True, use_decay=True, use_anchors=True),
    "default-no-anchors": dict(use_mesh=True, use_decay=True, dual_stream=True, use_exit=True),
    "default-no-decay": dict(use_mesh=True, use_anchors=True, dual_stream=True, use_exit=True),
    "default-no-exit": dict(use_mesh=True, use_decay=True, use_anchors=True, dual_stream=True),
    "default": dict(use_mesh=True, use_decay=True, use_anchors=True, dual_stream=True, use_exit=True),
}


def variant_config(size: Dict, variant: str) -> TMTConfig:
    """``TMTConfig.vanilla`` with the switches of ``variant`` turned back on (``default``: every one)."""
    return TMTConfig.vanilla(**size, **VARIANTS[variant])


@torch.no_grad()
def attention_probe(model: TMTModel, ids: torch.Tensor, answer: torch.Tensor) -> Dict:
    """Where the attention of every layer goes, on a fixed batch, in training mode without changing
    the anchors: the summed weight (after the decay) on the memory anchors and on the token slots,
    averaged over heads and over all tokens or the answer positions only, and the decay rates."""
    seen, originals = [], []
    for block in model.blocks:
        conv = block.attn
        original = conv.attend_slots

        def capture(*args, original=original, **kwargs):
            out, alpha = original(*args, **kwargs)
            seen.append(alpha)
            return out, alpha
        conv.attend_slots = capture
        originals.append((conv, original))
    anchors = None if model.anchors is None else model.anchors.anchor_state.clone()
    try:
        out = model(ids)
    finally:
        for conv, original in originals:
            del conv.attend_slots
        if anchors is not None:
            model.anchors.anchor_state.copy_(anchors)
    M = 0 if model.anchors is None else model.anchors.num_anchors
    probe = {"anchor_mass": [], "token_mass": [], "anchor_mass_answer": [], "token_mass_answer": []}
    rows = answer.reshape(-1)
    for alpha in seen:  # (N, S + M, H), every token active in training mode
        S = alpha.size(1) - M
        anchor, token = alpha[:, S:].sum(1), alpha[:, :S].sum(1)  # (N, H)
        probe["anchor_mass"].append(float(anchor.mean()))
        probe["token_mass"].append(float(token.mean()))
        probe["anchor_mass_answer"].append(float(anchor[rows].mean()))
        probe["token_mass_answer"].append(float(token[rows].mean()))
    if out.decay_scalars is not None:
        probe["decay_rates"] = out.decay_scalars.tolist()
    return probe


def train_run(cfg: TMTConfig, seq_len: int, pairs: int, steps: int, lr: float, batch_size: int, seed: int,
              progress: bool, probes: int = 0) -> Dict:
    """AdamW with a one-cycle schedule on fresh MQAR batches; accuracy on 512 held-out sequences.
    ``probes`` > 0: :func:`attention_probe` on 16 fixed sequences that many times during training
    (mesh models only) and at the end, under ``"probes"``."""
    torch.manual_seed(seed)
    model = TMTModel(cfg)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    probe_ids, probe_answer = mqar_batch(16, seq_len, pairs, cfg.vocab_size, torch.Generator().manual_seed(20_000 + seed))
    probe_at = set() if not (probes and cfg.use_mesh) else {steps * i // probes for i in range(probes)} | {steps}
    history = []
    for step in tqdm(range(steps + 1), disable=not progress, leave=False, desc=f"S={seq_len} pairs={pairs}"):
        if step in probe_at:
            history.append({"step": step, **attention_probe(model, probe_ids, probe_answer)})
        if step == steps:
            break
        ids, answer = mqar_batch(batch_size, seq_len, pairs, cfg.vocab_size, gen)
        loss, _ = recall_loss(model(ids).logits, ids, answer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    model.eval()
    test = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        ids, answer = mqar_batch(512, seq_len, pairs, cfg.vocab_size, test)
        loss, acc = recall_loss(model(ids).logits, ids, answer)
    return {"accuracy": float(acc), "loss": float(loss), "params": model.num_parameters(),
            **({"probes": history} if history else {})}


def code_version() -> str:
    """The commit the code ran at, ``+dirty`` when the work tree had changes (for cached runs)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def variants_main(args, size: Dict, info: Dict, argv: Optional[Sequence[str]]) -> Dict:
    """Train every ``--variants`` arm for every ``--seeds`` seed (cached under ``--runs`` with ``--label``),
    then tabulate every cached run at the same point, steps, learning rate and batch size."""
    (S, pairs), = [tuple(int(v) for v in p.split(":")) for p in args.points]
    lr, = args.lrs
    size = {**size, "max_seq_len": S}
    budget = f"S{S}_p{pairs}_lr{lr:g}_steps{args.steps}_b{args.batch_size}"
    label = f"{args.label}_" if args.label else ""
    for variant in args.variants:
        cfg = variant_config(size, variant)
        for seed in args.seeds:
            path = args.runs / f"{budget}_{label}{variant}_seed{seed}.json"
            if path.exists():
                continue
            run = train_run(cfg, S, pairs, args.steps, lr, args.batch_size, seed, not args.quick, probes=args.probes)
            run.update(variant=variant, label=args.label, seed=seed, code=code_version(), config=asdict(cfg))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run, indent=1))
    runs = [json.loads(p.read_text()) for p in sorted(args.runs.glob(f"{budget}_*.json"))]
    arms = list(dict.fromkeys((r["label"], r["variant"]) for r in runs))
    rows = []
    for arm_label, variant in arms:
        mine = sorted((r for r in runs if (r["label"], r["variant"]) == (arm_label, variant)), key=lambda r: r["seed"])
        mean, std = mean_std([r["accuracy"] for r in mine])
        first, last = [r["probes"][0] for r in mine if r.get("probes")], [r["probes"][-1] for r in mine if r.get("probes")]
        avg = lambda key, layer, at=last: sum(p[key][layer] for p in at) / len(at) if at else None
        rows.append({"label": arm_label, "variant": variant, "seeds": [r["seed"] for r in mine],
                     "accuracy": [r["accuracy"] for r in mine], "mean": mean, "std": std,
                     "loss": mean_std([r["loss"] for r in mine])[0], "params": mine[0]["params"],
                     "code": sorted({r["code"] for r in mine}),
                     "anchor_mass_start": [avg("anchor_mass", l, first) for l in range(size["n_layers"])] if last else None,
                     "anchor_mass_end": [avg("anchor_mass", l) for l in range(size["n_layers"])] if last else None,
                     "anchor_mass_answer": [avg("anchor_mass_answer", l) for l in range(size["n_layers"])] if last else None,
                     "token_mass_answer": [avg("token_mass_answer", l) for l in range(size["n_layers"])] if last else None,
                     "decay_rate_mean": (sum(sum(map(sum, p["decay_rates"])) for p in last) /
                                         sum(len(p["decay_rates"]) * len(p["decay_rates"][0]) for p in last)
                                         if last and "decay_rates" in last[0] else None)})
    fmt = lambda v: "" if v is None else "/".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}"
    report = [f"MQAR with {pairs} pairs, S={S}, 2 layers, d={size['d_model']}, {size['n_heads']} heads, k={size['graph_k']}, "
              f"vocab {size['vocab_size']}, no dropout; {args.steps} AdamW steps (one-cycle, lr {lr:g}, clip 1.0) of "
              f"{args.batch_size} fresh sequences, accuracy on 512 held-out sequences (chance {2 / size['vocab_size']:.3f}). "
              "Arms are `TMTConfig.vanilla` with the named parts switched back on; `default` is every part on "
              "(mesh, decay, anchors, dual-stream FFN, exits). Anchor mass: summed attention weight (after the decay) "
              "on the 16 anchors, per layer (layer 0/layer 1), mean over seeds: over all tokens at step 0 and at the "
              "end of training, and at the answer positions at the end; token mass: the same on the token slots at "
              "the answer positions at the end; decay rate: mean learned softplus(omega) at the end.",
              markdown_table(["label", "arm", "seeds", "accuracy mean ± std", "per seed", "answer loss",
                              "anchor mass, step 0", "anchor mass, end", "anchor mass, answers", "token mass, answers",
                              "decay rate", "params", "code"],
                             [(r["label"] or "-", r["variant"], len(r["seeds"]),
                               f"{r['mean']:.3f} ± {r['std'] or 0:.3f}", " ".join(f"{a:.3f}" for a in r["accuracy"]),
                               f"{r['loss']:.2f}", fmt(r["anchor_mass_start"]), fmt(r["anchor_mass_end"]),
                               fmt(r["anchor_mass_answer"]), fmt(r["token_mass_answer"]),
                               fmt(r["decay_rate_mean"]), f"{r['params']:,}", " ".join(r["code"])) for r in rows])]
    fig, axes = new_figure(width=7)
    for i, r in enumerate(rows):
        axes[0].errorbar([r["mean"]], [i], xerr=[r["std"] or 0], fmt="o")
    axes[0].set_yticks(range(len(rows)), [f"{r['label']} {r['variant']}".strip() for r in rows])
    axes[0].set(xlabel="MQAR accuracy (mean ± std over seeds)", title=f"MQAR {pairs} pairs, S={S}, {args.steps} steps")
    axes[0].grid(alpha=0.3)
    result = finish(VARIANTS_NAME, args, info, report, {"rows": rows, "runs": runs, "size": size}, fig, argv=argv)
    # finish names the command after the result file; the script is benchmarks.recall
    result["command"] = result["command"].replace(f"benchmarks.{VARIANTS_NAME}", f"benchmarks.{NAME}")
    for suffix in ("json", "md"):
        path = args.out / f"{VARIANTS_NAME}.{suffix}"
        path.write_text(path.read_text().replace(f"benchmarks.{VARIANTS_NAME}", f"benchmarks.{NAME}"))
    return result


VARIANTS_NAME = "recall_default"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--points", nargs="+", default=["64:4", "64:8", "64:16", "128:16", "256:32"],
                        help="S:pairs points of the sweep")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="learning rates swept for every model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--window", type=int, default=8, help="window of the mesh variants")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="vanilla, the pure (state) mesh, state mesh + window, attention mesh, attention mesh + window")
    parser.add_argument("--runs", type=Path, default=Path("runs/recall"), help="cache of finished runs")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="train these arms of the default model instead (one point, one lr; writes recall_default)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every --variants arm (default: --seed)")
    parser.add_argument("--label", default="", help="code version the --variants runs measure (part of the cache key)")
    parser.add_argument("--probes", type=int, default=6, help="attention probes during each --variants run")
    args = parser.parse_args(argv)
    size = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, graph_k=8, dropout=0.0, rope=True)
    if args.quick:
        args.points, args.steps, args.lrs, args.batch_size = ["32:4"], 3, [3e-3], 4
        size.update(d_model=32, n_heads=2)
        args.runs = args.out / "runs"
    info = setup(args)
    if args.variants:
        if len(args.points) != 1 or len(args.lrs) != 1:
            parser.error("--variants takes one --points entry and one --lrs value")
        args.seeds = args.seeds or [args.seed]
        return variants_main(args, size, info, argv)
    points = [tuple(int(v) for v in p.split(":")) for p in args.points]
    rows = []
    for S, pairs in points:
        cfgs = model_configs({**size, "max_seq_len": S}, args.window)
        for key, (name, cfg) in zip(MODELS, cfgs.items()):
            if key not in args.models:
                continue
            best = None
            for lr in args.lrs:
                key = f"S{S}_p{pairs}_{name.replace(' ', '_')}_lr{lr:g}_steps{args.steps}_b{args.batch_size}_seed{args.seed}"
                path = args.runs / f"{key}.json"
                if path.exists():
                    run = json.loads(path.read_text())
                else:
                    run = {**train_run(cfg, S, pairs, args.steps, lr, args.batch_size, args.seed, not args.quick),
                           "config": asdict(cfg)}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(run, indent=1))
                rows.append({"S": S, "pairs": pairs, "model": name, "lr": lr, "accuracy": run["accuracy"],
                             "loss": run["loss"], "params": run["params"]})
                if best is None or run["accuracy"] > best["accuracy"]:
                    best = rows[-1]
            best["best_lr"] = True
    best_rows = [r for r in rows if r.get("best_lr")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    report = [f"2 layers, d={size['d_model']}, {size['n_heads']} heads, k={size['graph_k']}, vocab {size['vocab_size']}, "
              f"rotary positions, no exits, anchors or decay; widths matched to the pure mesh's parameter count. "
              f"{args.steps} AdamW steps (one-cycle, clip 1.0) of {args.batch_size} fresh sequences; accuracy on 512 "
              f"held-out sequences at the best of the learning rates {args.lrs} per model and point.",
              markdown_table(["S", "pairs"] + models + ["chance"],
                             [(S, p, *[f"{next(r['accuracy'] for r in best_rows if (r['S'], r['pairs'], r['model']) == (S, p, m)):.3f}"
                                       for m in models], f"{2 / size['vocab_size']:.3f}") for S, p in points]),
              "All runs (every learning rate):",
              markdown_table(["S", "pairs", "model", "lr", "accuracy", "answer loss", "params"],
                             [(r["S"], r["pairs"], r["model"], r["lr"], f"{r['accuracy']:.3f}", r["loss"], f"{r['params']:,}")
                              for r in rows])]
    fig, axes = new_figure(width=7)
    labels = [f"{S}:{p}" for S, p in points]
    for m in models:
        axes[0].plot(labels, [next(r["accuracy"] for r in best_rows if (r["S"], r["pairs"], r["model"]) == (S, p, m))
                              for S, p in points], "o-", label=m)
    axes[0].set(xlabel="S:pairs", ylabel="MQAR accuracy", ylim=(0, 1.02), title="multi-query associative recall")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    return finish(NAME, args, info, report, {"rows": rows, "size": size}, fig, argv=argv)


if __name__ == "__main__":
    main()
