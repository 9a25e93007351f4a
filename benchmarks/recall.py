"""Multi-query associative recall (MQAR, the "Zoology" task of Arora et al. 2023): can the mesh find
what attention finds? Vanilla, the seed's pure kNN mesh and mesh variants (a local window of previous
tokens as extra slots) at equal parameters, data and steps; accuracy on the answers.

A sequence holds ``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the lower half of
the vocabulary, values from the upper half), then a query region of length ``S - 2 * pairs`` where
every key appears once more at a random even offset, followed by its value; the rest is token 0. The
loss and the accuracy count only the positions of the query keys, where the next token is the value.
Every finished run is cached as JSON under ``--runs``, so an interrupted sweep continues.

    python -m benchmarks.recall --threads 2
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup
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


def train_run(cfg: TMTConfig, seq_len: int, pairs: int, steps: int, lr: float, batch_size: int, seed: int,
              progress: bool) -> Dict:
    """AdamW with a one-cycle schedule on fresh MQAR batches; accuracy on 512 held-out sequences."""
    torch.manual_seed(seed)
    model = TMTModel(cfg)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), disable=not progress, leave=False, desc=f"S={seq_len} pairs={pairs}"):
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
    return {"accuracy": float(acc), "loss": float(loss), "params": model.num_parameters()}


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
    args = parser.parse_args(argv)
    size = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, graph_k=8, dropout=0.0, rope=True)
    if args.quick:
        args.points, args.steps, args.lrs, args.batch_size = ["32:4"], 3, [3e-3], 4
        size.update(d_model=32, n_heads=2)
        args.runs = args.out / "runs"
    info = setup(args)
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
