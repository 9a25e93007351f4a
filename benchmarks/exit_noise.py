"""How much gradient noise the sampled early-exit loss adds: on one model (a checkpoint of the WikiText-2
ablation, or fresh weights), the gradient of the early-exit loss scored on ``--sample`` random tokens (0: all) and
``--layers`` early layers drawn in proportion to their weight (0: all), over ``--draws`` draws on one batch,
against the same loss on every token (its mean: the bias check; its spread: the
sampling noise), and that noise, times the loss weight squared, against the minibatch noise of the whole
training loss over ``--batches`` training batches. Per block and in total; dropout off.

    python -m benchmarks.exit_noise --threads 1 --run "runs/ablation_bpe/full,_sampled_exit_loss_seed0_07a0a45f"
"""
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

from benchmarks.ablation import QUICK_SIZE, SIZE, load_corpus, row_configs
from benchmarks.common import DATA_DIR, base_parser, finish, markdown_table, new_figure, setup
from tmt_pyg import TMTConfig, TMTModel
from tmt_pyg.data import SequenceLoader
from tmt_pyg.train import load_checkpoint

NAME = "exit_noise"


def gradient(model: TMTModel, batch, part: str) -> Tensor:
    """The flat gradient of the output field ``part`` (``lm_loss``, ``exit_loss`` or ``loss``) on ``batch``."""
    model.zero_grad(set_to_none=False)
    getattr(model(batch, compute_loss=True), part).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def groups(model: TMTModel) -> Dict[str, List[slice]]:
    """Slices of the flat gradient per block ("embedding and head", "block l", "other")."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        key = f"block {name.split('.')[1]}" if name.startswith("blocks.") else "embedding and head" if name.startswith("wte") else "other"
        out.setdefault(key, []).append(slice(start, start + p.numel()))
        start += p.numel()
    return out


def noise_table(every: Tensor, sampled: Tensor, total: Tensor, weight: float, parts: Dict[str, List[slice]]) -> List[Dict]:
    """Per part and in total: squared norms of the exit-loss gradient on every token (P,), of the sampled
    draws' spread around it (draws (K, P)) times ``weight``², and of the training loss's minibatch spread and
    mean (batches (B, P))."""
    def sq(t: Tensor, idx) -> Tensor:
        return torch.cat([t[..., s] for s in idx], -1).pow(2).sum(-1)
    rows = []
    for name, idx in {**parts, "all": [slice(0, every.numel())]}.items():
        sampling = weight ** 2 * sq(sampled - every, idx).mean()
        minibatch = sq(total - total.mean(0), idx).sum() / (total.size(0) - 1)
        rows.append({"part": name, "exit_grad_sq": float(sq(every, idx)), "sampling_noise": float(sampling),
                     "minibatch_noise": float(minibatch), "loss_grad_sq": float(sq(total.mean(0), idx)),
                     "ratio": float(sampling / minibatch) if minibatch > 0 else 0.0})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = base_parser(__doc__.split("\n\n")[0], repeats=1)
    parser.add_argument("--run", type=Path, help="ablation run (folder, checkpoint folder or .pt) whose weights and config "
                                                  "are measured; default: the full row with fresh weights")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR / "wikitext-2")
    parser.add_argument("--cache", type=Path, default=Path("runs/ablation_bpe"), help="folder of the cached BPE tokenizer")
    parser.add_argument("--sample", type=int, default=512, help="tokens the sampled loss scores per batch (0: all)")
    parser.add_argument("--layers", type=int, default=0, help="early layers the sampled loss scores per batch (0: all)")
    parser.add_argument("--draws", type=int, default=16, help="draws of the sampled loss on the first batch")
    parser.add_argument("--batches", type=int, default=6, help="training batches for the minibatch noise")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    if args.quick:
        args.sample, args.draws, args.batches, args.batch_size, args.seq_len = min(args.sample, 32), 24, 3, 2, 32
    info = setup(args)
    if args.quick:
        vocab = 300
        cfg = row_configs({**QUICK_SIZE, "n_layers": 3}, vocab, args.seq_len)["full"]  # two early layers to draw from
        ids = torch.randint(0, vocab, (args.batches * args.batch_size * args.seq_len,))
        state = None
    else:
        data = load_corpus(args.data_dir, 4096, args.cache, quick=False)
        ids = data["train"]["ids"]
        ckpt = load_checkpoint(args.run) if args.run else None
        cfg = TMTConfig(**ckpt["model_config"]) if ckpt else row_configs(SIZE, data["vocab_size"], args.seq_len)["full"]
        state = ckpt["model"] if ckpt else None
    if cfg.exit_loss_weight <= 0:
        raise ValueError("the measured model has no early-exit loss (exit_loss_weight 0): nothing to sample")
    if args.sample == 0 and args.layers == 0:
        raise ValueError("--sample 0 and --layers 0 score every token of every layer: nothing to sample")
    exact, drawn = (TMTModel(replace(cfg, dropout=0.0, exit_loss_sample=n, exit_loss_layers=k)).train()
                    for n, k in ((0, 0), (args.sample, args.layers)))
    for model in (exact, drawn):  # both the checkpoint's weights, or both the first model's fresh ones
        model.load_state_dict(state if state is not None else exact.state_dict())
    loader = iter(SequenceLoader(ids, args.seq_len, args.batch_size, seed=args.seed))
    batches = [next(loader) for _ in range(args.batches)]
    every = gradient(exact, batches[0], "exit_loss")
    sampled = torch.stack([gradient(drawn, batches[0], "exit_loss") for _ in range(args.draws)])
    total = torch.stack([gradient(exact, b, "loss") for b in batches])
    rows = noise_table(every, sampled, total, cfg.exit_loss_weight, groups(exact))
    bias = float((sampled.mean(0) - every).pow(2).sum())
    expected = float((sampled - every).pow(2).sum(-1).mean()) / args.draws
    whole = rows[-1]
    report = [f"Model: {'`' + str(args.run) + '`' if args.run else 'the full row, fresh weights'}; early-exit loss weight "
              f"{cfg.exit_loss_weight}, sampled on {args.sample or 'all'} of {args.batch_size * args.seq_len} tokens "
              f"and {args.layers or 'all'} of {cfg.n_layers - 1} early layers "
              f"({args.draws} draws on one batch); minibatch noise over {args.batches} training batches; dropout off.",
              markdown_table(["part", "‖g_exit‖² (every token)", "sampling noise (x w²)", "minibatch noise of the loss",
                              "‖mean loss gradient‖²", "sampling / minibatch"],
                             [(r["part"], f"{r['exit_grad_sq']:.2e}", f"{r['sampling_noise']:.2e}", f"{r['minibatch_noise']:.2e}",
                               f"{r['loss_grad_sq']:.2e}", f"{r['ratio']:.2f}") for r in rows]),
              f"Bias check: ‖mean of the draws - every-token gradient‖² = {bias:.2e}, against {expected:.2e} expected from "
              f"the draws' spread alone. The sampling adds {whole['ratio']:.0%} to the training gradient's minibatch "
              f"noise (as a batch {1 / (1 + whole['ratio']):.2f}x as large would)."]
    fig, (ax,) = new_figure(width=6, height=3)
    names = [r["part"] for r in rows]
    ax.barh(names[::-1], [r["ratio"] for r in rows][::-1], color="C0")
    ax.set(xlabel="sampling noise / minibatch noise of the training gradient")
    return finish(NAME, args, info, report, {"config": asdict(cfg), "rows": rows, "bias_sq": bias, "bias_sq_expected": expected}, fig)


if __name__ == "__main__":
    main()
