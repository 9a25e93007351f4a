"""Long-context LM check: character-level WikiText-2 at context 2048, vanilla against TMT (exact and routed mesh).

Rows, at equal parameters and tokens (``steps x 2 x 2048`` characters), width 128, 4 heads, 4 layers, dropout 0:

* ``vanilla``: fused-SDPA transformer, MLP width matched to the TMT's parameter count;
* ``tmt-exact``: TMT defaults (attention-similarity mesh, window 8, anchors, decay), exits off;
* ``tmt-routed``: the same with ``mesh_search="routed"`` (blocks of 64, 4 routed blocks per token).

Gate: every TMT row's validation loss <= vanilla's + 1 %. For the trained ``tmt-routed`` model it also
measures, per layer, the share of the exact kNN slots its routed search finds (``neighbour_recall``)
on validation text, rebuilding each layer's mesh from that layer's own queries and keys, at several
``route_top``. Each finished run is cached as ``<runs>/<row>_seed<s>.json`` (checkpoints every 50
steps in ``<runs>/<row>_seed<s>/``), so an interrupted study resumes.

    python -m benchmarks.long_context_lm --threads 1
"""
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from tmt_pyg import TMTConfig, TMTModel, count_parameters, match_parameters
from tmt_pyg.data import SequenceLoader
from tmt_pyg.data.corpus import load_data
from tmt_pyg.layers.mesh import DynamicMesh
from tmt_pyg.layers.routed_search import neighbour_recall
from tmt_pyg.models.layer import head_units
from tmt_pyg.train import TrainConfig, Trainer, evaluate, load_checkpoint
from tmt_pyg.train.trainer import read_metrics

from .common import DATA_DIR, base_parser, finish, markdown_table, mean_std, new_figure, run_study, seed_groups, setup

NAME = "long_context_lm"
SIZE = dict(d_model=128, n_heads=4, n_layers=4, dropout=0.0, max_seq_len=2048)
ROWS = ("vanilla", "tmt-exact", "tmt-routed")
ROUTE_TOPS = (2, 4, 8)
BATCH = 2
GATE = 0.01  # TMT's loss may exceed vanilla's by at most 1 %


def row_configs(vocab_size: int, size: Dict = SIZE, route_block: int = 64) -> Dict[str, TMTConfig]:
    """Every row's model; vanilla's MLP matched to the TMT's parameter count."""
    tmt = TMTConfig(vocab_size=vocab_size, **size, use_exit=False, route_block=route_block)
    vanilla = match_parameters(TMTConfig.vanilla(vocab_size=vocab_size, **size), count_parameters(tmt))
    return {"vanilla": vanilla, "tmt-exact": tmt, "tmt-routed": replace(tmt, mesh_search="routed")}


def train_config(args, folder: Path, seed: int, seq_len: int) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=BATCH, seq_len=seq_len, lr=args.lr, min_lr=args.lr / 10,
                       warmup=max(1, args.steps // 10), beta2=0.99, weight_decay=0.1, eval_every=0, ckpt_every=50,
                       out_dir=str(folder), seed=seed, device="cpu", progress=not args.quick)


def run_once(row: str, cfg: TMTConfig, seed: int, data: Dict, args) -> Dict:
    """Train one row with one seed (resuming its checkpoint) or read the cached result."""
    folder = args.runs / f"{row}_seed{seed}"
    cache = folder.with_suffix(".json")
    if cache.exists():
        return json.loads(cache.read_text())
    seq_len = cfg.max_seq_len
    train = train_config(args, folder, seed, seq_len)
    torch.manual_seed(seed)
    model = TMTModel(cfg)
    trainer = Trainer(model, SequenceLoader(data["train"], seq_len, BATCH, seed=seed), cfg=train)
    resumed = trainer.step if trainer.resume() else 0
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    val = SequenceLoader(data["validation"], seq_len, BATCH, shuffle=False, drop_last=False)
    curve = [r["lm_loss"] for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train"]
    result = {"row": row, "seed": seed, "params": model.num_parameters(), "model": asdict(cfg), "train": asdict(train),
              "train_seconds": seconds, "resumed_at_step": resumed, "train_tokens": train.steps * BATCH * seq_len,
              "val_tokens": data["validation"].numel(), "val": evaluate(model, val), "train_curve": curve}
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


@torch.no_grad()
def mesh_recall(model: TMTModel, ids: torch.Tensor, route_tops: Sequence[int]) -> Dict[str, List[float]]:
    """Per ``route_top``, per layer: the share of the exact kNN slots (the first ``graph_k`` columns)
    that the routed search finds, both searches on the layer's own head-normalised queries and keys
    of the trained model's forward over ``ids`` (B, S)."""
    cfg, (B, S) = model.config, ids.shape
    N = B * S
    out = model.eval()(ids, output_hidden_states=True)
    pos, batch = torch.arange(S).repeat(B), torch.arange(B).repeat_interleave(S)
    node_pos = torch.cat([pos, pos.new_full((out.hidden_states[0].size(0) - N,), -1)])  # anchor rows: timeless

    def mesh(search: str, top: int = 1) -> DynamicMesh:
        return DynamicMesh(cfg.graph_k, causal=True, window=cfg.mesh_window, search=search, route_block=cfg.route_block,
                           route_top=top)

    recall = {str(top): [] for top in route_tops}
    for layer, (block, h) in enumerate(zip(model.blocks, out.hidden_states)):
        x = block.ln_attn(h)
        keys = head_units(block.attn.project_key_value(x, node_pos)[0][:N])
        queries = head_units(block.attn.project_query(x[:N], pos))
        exact = mesh("exact").slots(keys, batch, None, S, query_x=queries)
        for top in route_tops:
            found = mesh("routed", top).slots(keys, batch, None, S, query_x=queries)
            if layer == cfg.n_layers - 1 and top == cfg.route_top:  # the same inputs as the model's own search
                assert torch.equal(found.index, out.mesh.index), "rebuilt mesh differs from the model's"
            k = cfg.graph_k
            recall[str(top)].append(neighbour_recall(found.index[:, :k], found.valid[:, :k],
                                                     exact.index[:, :k], exact.valid[:, :k]))
    return recall


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-tokens", type=int, default=128 * 2048, help="validation characters evaluated (from the start)")
    parser.add_argument("--recall-seqs", type=int, default=4, help="validation sequences of the recall measurement")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--runs", type=Path, default=Path("runs/long_context_lm"), help="cache of finished runs")
    parser.add_argument("--table-only", action="store_true", help="table and plots of the cached runs; train nothing")
    args = parser.parse_args(argv)
    size, route_block = SIZE, 64
    if args.quick:
        size, route_block = dict(SIZE, d_model=32, n_layers=2, max_seq_len=256), 32
        args.seeds, args.steps, args.val_tokens, args.recall_seqs, args.runs = [0], 3, 4 * 256, 2, args.out / "runs"
    info = setup(args)
    tok, splits = load_data("wikitext-2", str(args.data_dir), ("train", "validation"), tokenizer="char")
    data = {split: stream for split, (stream, _) in splits.items()}
    data["validation"] = data["validation"][:args.val_tokens]
    if args.quick:
        data["train"] = data["train"][:50_000]
    configs = row_configs(len(tok), size, route_block)
    results = run_study(args, configs, data, run_once, ROWS)

    rows = {}
    for row, mine in seed_groups(results, ROWS):
        loss = [r["val"]["loss"] for r in mine]
        mean, std = mean_std(loss)
        rows[row] = {"seeds": [r["seed"] for r in mine], "params": mine[0]["params"], "steps": mine[0]["train"]["steps"],
                     "train_tokens": mine[0]["train_tokens"], "val_loss": mean, "val_loss_std": std, "val_losses": loss,
                     "val_bits_per_char": mean / math.log(2), "train_seconds": sum(r["train_seconds"] for r in mine) / len(mine)}
    gate = {row: rows[row]["val_loss"] <= rows["vanilla"]["val_loss"] * (1 + GATE)
            for row in ("tmt-exact", "tmt-routed") if row in rows and "vanilla" in rows}

    recall, recall_path = None, args.runs / "recall.json"
    routed = [r for r in results if r["row"] == "tmt-routed"]
    if routed and (args.quick or not args.table_only or not recall_path.exists()):
        r = min(routed, key=lambda r: r["seed"])
        model = TMTModel(TMTConfig(**r["model"]))
        model.load_state_dict(load_checkpoint(args.runs / f"tmt-routed_seed{r['seed']}")["model"])
        S = model.config.max_seq_len
        ids = data["validation"][:args.recall_seqs * S].view(args.recall_seqs, S)
        every = S // model.config.route_block - 1  # routed to every earlier block: the exact search
        tops = [t for t in ROUTE_TOPS if t < every] + [every]
        recall = {"seed": r["seed"], "sequences": args.recall_seqs, "seq_len": S, "route_block": model.config.route_block,
                  "graph_k": model.config.graph_k, "per_route_top": mesh_recall(model, ids, tops)}
        recall_path.write_text(json.dumps(recall, indent=1) + "\n")
    elif recall_path.exists():
        recall = json.loads(recall_path.read_text())

    def loss_cell(s):
        return f"{s['val_loss']:.4f}" + (f" ± {s['val_loss_std']:.4f}" if s["val_loss_std"] is not None else "")

    table = markdown_table(
        ["row", "params", "steps", "train chars", "val loss (nats/char)", "bits/char", "vs vanilla", "train time (s)"],
        [(row, f"{s['params']:,}", s["steps"], f"{s['train_tokens']:,}", loss_cell(s), f"{s['val_bits_per_char']:.4f}",
          f"{100 * (s['val_loss'] / rows['vanilla']['val_loss'] - 1):+.2f} %" if "vanilla" in rows else "-",
          f"{s['train_seconds']:.0f}") for row, s in rows.items()])
    note = ("Train times are wall-clock on a shared machine whose load changed between runs: not a speed comparison "
            "(benchmarks/search_scaling.py measures speed).")
    val_chars = results[0]["val_tokens"] if results else 0
    report = [f"Character-level WikiText-2 (the word-level `tokens` files read as characters, {len(tok)} symbols, "
              f"a newline after every line), context {size['max_seq_len']}, batch {BATCH}, width {size['d_model']}, "
              f"{size['n_heads']} heads, {size['n_layers']} layers, dropout 0; AdamW lr {args.lr:g} (cosine to a tenth, "
              f"10 % linear warmup), beta2 0.99, weight decay 0.1. Validation loss over the first {val_chars:,} "
              f"characters of the validation split; seeds {sorted({r['seed'] for r in results})}.", table, note]
    if gate:
        report.append("Gate (TMT's loss <= vanilla's + 1 %): " + ", ".join(
            f"{row} {'passes' if ok else 'fails'}" for row, ok in gate.items()) + ".")
    if recall:
        per = recall["per_route_top"]
        report.append(f"Neighbour recall of the trained `tmt-routed` model's routed search against the exact search "
                      f"(share of the exact {recall['graph_k']} kNN slots found; {recall['sequences']} validation sequences "
                      f"of {recall['seq_len']}, blocks of {recall['route_block']}; the last column routes to every "
                      f"earlier block, where the two searches agree; every position is a query, so the tokens of "
                      f"the first route_top + 1 blocks, whose routing covers all their earlier blocks, count as found):")
        layers = range(len(next(iter(per.values()))))
        report.append(markdown_table(["layer"] + [f"route_top {t}" for t in per],
                                     [(layer, *(f"{per[t][layer]:.3f}" for t in per)) for layer in layers]
                                     + [("mean", *(f"{sum(v) / len(v):.3f}" for v in per.values()))]))

    fig, (ax_loss, ax_recall) = new_figure(2)
    y_top = 0.0
    for row in rows:
        first = next(r for r in results if r["row"] == row and r["seed"] == rows[row]["seeds"][0])
        curve = torch.tensor(first["train_curve"]) / math.log(2)
        w = min(10, len(curve))
        smooth = curve.unfold(0, w, 1).mean(1)
        y_top = max(y_top, float(smooth[len(smooth) // 5]))  # the axis shows the last four fifths
        ax_loss.plot(range(w, len(curve) + 1), smooth, label=f"{row} (train, seed {first['seed']}, mean of {w} steps)")
        ax_loss.axhline(rows[row]["val_bits_per_char"], ls=":", color=ax_loss.lines[-1].get_color(), label=f"{row} val (mean of seeds)")
    ax_loss.set(xlabel="step", ylabel="bits per character", title=f"char WikiText-2, context {size['max_seq_len']}",
                ylim=(None, y_top * 1.05))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    if recall:
        for top, values in recall["per_route_top"].items():
            ax_recall.plot(range(len(values)), values, "o-", label=f"route_top {top}")
        ax_recall.set(xlabel="layer", xticks=range(len(values)), ylabel="neighbour recall",
                      title="routed vs exact mesh search (tmt-routed)")
        ax_recall.grid(alpha=0.3)
        ax_recall.legend(fontsize=7)
    return finish(NAME, args, info, report, {"rows": rows, "gate": gate, "recall": recall, "runs": results}, fig, argv=argv)


if __name__ == "__main__":
    main()
