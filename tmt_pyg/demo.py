"""``tmt-pyg demo``: a TMT and a plain transformer of equal size trained for the same tokens, compared
in a table, a sample from each and one plot of both loss curves."""
import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch

from .data.corpus import checkpoint_extra, load_data, make_loader
from .models import TMTConfig, TMTModel, count_parameters, match_parameters
from .models.generation import sample_next
from .models.speculative import choose_drafting, held_out_prompts
from .train import (Trainer, TrainConfig, calibrate_threshold, calibration_record, evaluate_at_threshold, find_checkpoint,
                    load_checkpoint, read_metrics, seed_everything, write_atomic)

NANOGPT_VAL_LOSS = 1.88  # nanoGPT's README: its CPU configuration on Tiny Shakespeare
# `demo --quick`: smaller models for fewer steps, about a minute on 2 CPU cores (flags given with it still win)
QUICK = dict(steps=250, d_model=64, n_layers=2, lr=3e-3, eval_every=125, eval_batches=4, final_eval_batches=20,
             sample_tokens=100, draft=False, out_dir="runs/demo-quick")


def run_demo(args: argparse.Namespace) -> Path:
    """Train, evaluate, calibrate (TMT) and sample both models with the ``demo`` flags; print the table and
    the samples and write results.md, results.json and loss_curves.png into ``args.out_dir``."""
    out = Path(args.out_dir)
    tok, data = load_data(args.dataset, None, ("train", "validation"), synthetic_tokens=args.synthetic_tokens)
    common = dict(vocab_size=len(tok), d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                  max_seq_len=args.seq_len, dropout=0.0)
    tmt = TMTConfig(**common, graph_k=args.graph_k, mesh_window=args.mesh_window, memory_anchors=args.memory_anchors,
                    exit_loss_weight=args.exit_loss_weight, layer_dropout=args.layer_dropout)
    vanilla = match_parameters(TMTConfig.vanilla(**common), count_parameters(tmt))
    print(f"demo: TMT vs a plain transformer (fused SDPA) on {args.dataset} ({data['train'][0].numel():,} train tokens, "
          f"vocab {len(tok)}), {torch.get_num_threads()} CPU threads")
    rows, samples = {}, {}
    for name, mcfg in (("TMT", tmt), ("vanilla", vanilla)):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                          warmup=min(100, max(1, args.steps // 10)), beta2=0.99, eval_every=args.eval_every,
                          eval_batches=args.eval_batches, out_dir=str(out / name.lower()), seed=args.seed, device=args.device,
                          bf16=args.bf16, progress=args.progress)
        seed_everything(cfg.seed)
        model = TMTModel(mcfg)
        val = make_loader(*data["validation"], cfg, False)
        trainer = Trainer(model, make_loader(*data["train"], cfg, True), val, cfg,
                          checkpoint_extra(tok, args.dataset, None, args.synthetic_tokens))
        print(f"[{name}] {model.num_parameters():,} parameters: training {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens")
        t0 = time.perf_counter()
        trainer.fit()
        row = {"parameters": model.num_parameters(), "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
               "train_time_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        row.update(evaluate_at_threshold(model, val, None, args.final_eval_batches), eval_time_s=time.perf_counter() - t0)
        if mcfg.use_exit:  # tau for at most +tolerance loss, picked on the validation split, then timed there
            calib = calibration_record(calibrate_threshold(model, val, args.tolerance, max_batches=args.eval_batches),
                                       "validation")
            row["tau"] = tau = calib["threshold"]
            t0 = time.perf_counter()
            at_tau = evaluate_at_threshold(model, val, tau, args.final_eval_batches)
            row.update(eval_time_tau_s=time.perf_counter() - t0, loss_tau=at_tau["loss"], exit_rate=at_tau["exit_rate"],
                       work_fraction=at_tau["work_fraction"])
            model.config.exit_threshold = tau
            if args.draft and mcfg.n_layers > 1:
                row["drafting"] = choose_drafting(model, held_out_prompts(data["validation"][0], 1, args.seq_len // 4, args.seed),
                                                  args.seq_len - args.seq_len // 4)
            store_in_checkpoint(out / name.lower(), calib, row.get("drafting"))
        rows[name] = row
        text = args.prompt if args.prompt is not None else "ROMEO:" if args.dataset == "tinyshakespeare" else ""
        prompt = torch.tensor([tok.encode([text]).tolist()[:-1] or tok.encode([""]).tolist()])
        samples[name] = tok.decode(sample_cropped(model, prompt, args.sample_tokens, torch.Generator().manual_seed(args.seed)))
    table = demo_table(rows, args.dataset == "tinyshakespeare", args.final_eval_batches)
    if "drafting" in rows.get("TMT", {}):
        table += "\n\n" + drafting_line(rows["TMT"]["drafting"])
    text = table + "\n\n" + "\n\n".join(f"**{name}** sample:\n\n```\n{sample}\n```" for name, sample in samples.items())
    print("\n" + text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "samples": samples}, indent=2))
    (out / "results.md").write_text(text + "\n")
    plot_demo_curves({name: out / name.lower() / "metrics.jsonl" for name in rows}, out / "loss_curves.png")
    print(f"\nwritten: {out}/results.md, {out}/results.json, {out}/loss_curves.png")
    return out


def store_in_checkpoint(run: Path, calibration: dict, speculative: Optional[dict]) -> None:
    """Keep the calibration (its tau) and the chosen drafting (if any) in the run's newest checkpoint, as
    ``tmt-pyg calibrate`` and ``draft`` do (eval, generate use them)."""
    file = find_checkpoint(run)
    state = load_checkpoint(file)
    state["model_config"]["exit_threshold"] = calibration["threshold"]
    state["calibration"] = calibration
    if speculative is not None:
        state["speculative"] = speculative
    write_atomic(state, file)


def drafting_line(drafting: dict) -> str:
    """One sentence on the self-speculative decoding chosen for the demo model."""
    plain, tried = drafting["tokens_per_s"], drafting["variants"]
    best = max(tried, key=lambda key: tried[key]["tokens_per_s"])
    E, d = best.split(",")
    return (f"Self-speculative greedy decoding (the first E layers draft d tokens, the full model verifies: the same "
            f"text), {drafting['new_tokens']} new tokens: plain {plain:.0f} tokens/s; best drafting E={E}, d={d}: "
            f"{tried[best]['tokens_per_s']:.0f} tokens/s ({tried[best]['tokens_per_s'] / plain:.2f}x), acceptance "
            f"{tried[best]['acceptance']:.2f}; `generate --draft-layers auto` uses "
            + ("plain decoding." if drafting["draft_layers"] is None else f"E={E}, d={d}."))


@torch.no_grad()
def sample_cropped(model: TMTModel, prompt, new_tokens: int, generator: torch.Generator) -> list:
    """Sample ``new_tokens`` after ``prompt`` (1, P), each from a full forward over the last
    ``max_seq_len`` tokens (so a sample may be longer than the context), temperature 0.8, top-k 40."""
    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids[:, -model.config.max_seq_len:]).logits[:, -1]
        ids = torch.cat([ids, sample_next(logits, 0.8, 40, generator=generator)], 1)
    return ids[0].tolist()


def demo_table(rows: dict, shakespeare: bool, val_batches: int = 0) -> str:
    """Markdown table, one column per model; ``val_batches``: the validation batches scored (0: all)."""
    fmt = {"parameters": "{:,}", "train_tokens": "{:,}", "loss": "{:.4f}", "train_time_s": "{:.0f} s",
           "eval_time_s": "{:.1f} s", "tau": "{:.3f}", "loss_tau": "{:.4f}", "eval_time_tau_s": "{:.1f} s",
           "exit_rate": "{:.3f}", "work_fraction": "{:.3f}"}
    label = {"parameters": "parameters", "train_tokens": "training tokens",
             "loss": "val loss" + (f", {val_batches} batches" if val_batches else "")
                     + (f" (nanoGPT: {NANOGPT_VAL_LOSS})" if shakespeare else ""),
             "train_time_s": "train time", "eval_time_s": "eval time (exits off)", "tau": "calibrated exit threshold tau",
             "loss_tau": "val loss at tau", "eval_time_tau_s": "eval time at tau", "exit_rate": "exit rate at tau",
             "work_fraction": "work fraction at tau"}
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label[k]} | " + " | ".join(fmt[k].format(rows[n][k]) if k in rows[n] else "—" for n in names) + " |"
              for k in fmt]
    return "\n".join(lines)


def plot_demo_curves(metrics: dict, out_path: Path) -> Path:
    """Training (smoothed) and validation loss of every model against the step, one figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (name, path) in enumerate(metrics.items()):
        records = read_metrics(path)
        train = [(r["step"], r["lm_loss"]) for r in records if r["split"] == "train"]
        width = max(1, len(train) // 50)  # running mean over 2 % of the run
        smooth = [sum(v for _, v in train[j:j + width]) / width for j in range(len(train) - width + 1)]
        ax.plot([s for s, _ in train[width - 1:]], smooth, lw=1, color=f"C{i}", label=f"{name} train")
        val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", label=f"{name} val")
    ax.set(xlabel="step", ylabel="next-token loss (nats)", title="TMT vs plain transformer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path
