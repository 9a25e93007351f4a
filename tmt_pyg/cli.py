"""``tmt-pyg``: train, evaluate, sample, benchmark and demo the TemporalMesh Transformer."""
import argparse
import dataclasses
import faulthandler
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .data.corpus import DEFAULT_TOKENIZER, checkpoint_extra, load_data, make_loader, tokenizer_from_state
from .layers.slot_attention import set_compile
from .train.distributed import DEFAULT_TIMEOUT_S, CollectiveError

TENSORBOARD_IN_OUT = "<out>/tensorboard"  # what a bare --tensorboard means, resolved once --out is known


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (unless None / off) and keeps the line breaks of descriptions and examples."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False, "") else super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- arguments

def number(kind: type, minimum, inclusive: bool = True):
    """argparse type: a ``kind`` (int / float) ``>= minimum`` (``> minimum`` unless ``inclusive``)."""
    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: ..."
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .layers.mesh import BACKENDS
    from .models.config import GATE_LOSSES, MESH_SIMILARITIES, TMTConfig

    d = TMTConfig()
    g = p.add_argument_group("model (TMTConfig)")
    g.add_argument("--d-model", dest="d_model", type=int, default=d.d_model, help="model width D")
    g.add_argument("--n-heads", dest="n_heads", type=int, default=d.n_heads, help="attention heads (must divide D)")
    g.add_argument("--n-layers", dest="n_layers", type=int, default=d.n_layers, help="TMT layers")
    g.add_argument("--graph-k", dest="graph_k", type=int, default=d.graph_k, help="mesh neighbours per token (kNN over past tokens)")
    g.add_argument("--mesh-window", dest="mesh_window", type=int, default=d.mesh_window,
                   help="previous tokens every token also reads (local window slots; 0: none; -1: 8 for causal models)")
    g.add_argument("--mesh-similarity", dest="mesh_similarity", choices=MESH_SIMILARITIES, default=d.mesh_similarity,
                   help="what the kNN mesh compares: token states (the seed's mesh) or each layer's queries against its keys "
                        "(auto: attention for causal models)")
    g.add_argument("--memory-anchors", dest="memory_anchors", type=int, default=d.memory_anchors, help="memory anchor vectors")
    g.add_argument("--ffn-stream-dim", dest="ffn_stream_dim", type=int, default=d.ffn_stream_dim, help="hidden width of each dual-stream FFN stream")
    g.add_argument("--mlp-dim", dest="mlp_dim", type=int, default=d.mlp_dim, help="hidden width of the plain MLP (with --no-dual-stream)")
    g.add_argument("--decay-rate", dest="decay_rate", type=float, default=d.decay_rate, help="initial temporal decay rate per head")
    g.add_argument("--exit-threshold", dest="exit_threshold", type=float, default=d.exit_threshold, help="gate confidence above which a token exits")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout on embeddings, residual branches, attention")
    g.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=None, help="longest sequence the model accepts (default: --seq-len)")
    g.add_argument("--mesh-backend", dest="mesh_backend", choices=BACKENDS, default=d.mesh_backend, help="kNN search backend")
    g.add_argument("--gate-loss", dest="gate_loss", choices=GATE_LOSSES, default=d.gate_loss, help="training signal of the exit gates")
    g.add_argument("--gate-loss-weight", dest="gate_loss_weight", type=float, default=d.gate_loss_weight, help="weight of the gate loss")
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--mesh", dest="use_mesh", action=bool_flag, default=d.use_mesh, help="kNN mesh attention (--no-mesh: dense causal attention)")
    g.add_argument("--decay", dest="use_decay", action=bool_flag, default=d.use_decay, help="temporal decay of attention weights")
    g.add_argument("--exit", dest="use_exit", action=bool_flag, default=d.use_exit, help="per-token exit gates")
    g.add_argument("--anchors", dest="use_anchors", action=bool_flag, default=d.use_anchors, help="memory anchors")
    g.add_argument("--dual-stream", dest="dual_stream", action=bool_flag, default=d.dual_stream, help="dual-stream FFN (--no-dual-stream: plain MLP)")
    g.add_argument("--exit-loss-weight", dest="exit_loss_weight", type=float, default=d.exit_loss_weight,
                   help="weight of the early-exit LM loss (every earlier layer predicts through the shared head)")
    g.add_argument("--gate-detach", dest="gate_detach", action=bool_flag, default=d.gate_detach,
                   help="gates read detached states, so their loss does not train the trunk")
    g.add_argument("--rope", action=bool_flag, default=d.rope, help="rotary positions (--no-rope: learned absolute positions)")
    g.add_argument("--vanilla", action="store_true", help="plain transformer: same as --no-mesh --no-decay --no-exit --no-anchors --no-dual-stream")


def add_runtime_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    g.add_argument("--no-compile", dest="no_compile", action="store_true",
                   help="run the slot attention eagerly instead of as a compiled fused op (as TMT_PYG_COMPILE=0 does)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="random seed")


def add_data_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DEFAULT_TOKENIZER), default="synthetic" if defaults else None,
                   help="corpus: 'synthetic' is embedded and 'tinyshakespeare' ships with the package (no download); "
                        "'text' reads --data-dir/{train,valid,test}.txt")
    g.add_argument("--data-dir", dest="data_dir", type=existing_dir, default=None,
                   help="folder with train.txt / valid.txt / test.txt (offline); without it WikiText comes from the HF hub")
    if defaults:
        g.add_argument("--tokenizer", default="auto",
                       help="word | char | bpe | path of a local HF tokenizer folder (auto: word for wikitext-2 and "
                            "synthetic, char for tinyshakespeare, bpe otherwise)")
        g.add_argument("--bpe-vocab-size", dest="bpe_vocab_size", type=int, default=8192, help="vocabulary size of a trained BPE")
        g.add_argument("--synthetic-tokens", dest="synthetic_tokens", type=int, default=400_000, help="training tokens of the synthetic corpus")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training (TrainConfig)")
    count, size = number(int, 0), number(int, 1)
    g.add_argument("--steps", type=size, default=d.steps, help="optimizer steps")
    g.add_argument("--batch-size", dest="batch_size", type=size, default=d.batch_size, help="sequences per micro-batch (per rank)")
    g.add_argument("--seq-len", dest="seq_len", type=number(int, 2), default=d.seq_len, help="tokens per sequence")
    g.add_argument("--grad-accum", dest="grad_accum", type=size, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=number(float, 0, inclusive=False), default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", dest="min_lr", type=number(float, 0), default=d.min_lr, help="final learning rate of the cosine decay")
    g.add_argument("--warmup", type=count, default=d.warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", dest="weight_decay", type=number(float, 0), default=d.weight_decay, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad-clip", dest="grad_clip", type=number(float, 0), default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--clip-gates-apart", dest="clip_gates_apart", action=argparse.BooleanOptionalAction, default=d.clip_gates_apart,
                   help="clip the exit gates' gradients to their own norm, apart from the trunk's")
    g.add_argument("--eval-every", dest="eval_every", type=count, default=d.eval_every, help="steps between evaluations")
    g.add_argument("--eval-batches", dest="eval_batches", type=count, default=d.eval_batches, help="validation batches per evaluation (0: all)")
    g.add_argument("--ckpt-every", dest="ckpt_every", type=count, default=d.ckpt_every, help="steps between checkpoints (0: at each evaluation)")
    g.add_argument("--keep-last", dest="keep_last", type=size, default=d.keep_last, help="checkpoints kept")
    g.add_argument("--on-nonfinite", dest="on_nonfinite", choices=("stop", "skip"), default=d.on_nonfinite,
                   help="a NaN/Inf loss or gradient: stop with an error (checkpoints stay finite) or skip the update")
    g.add_argument("--out", dest="out_dir", default=d.out_dir, help="run folder: metrics.jsonl, metrics.png, checkpoints/")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from a checkpoint file or run folder (bare --resume: the newest in --out, if any)")
    g.add_argument("--dist-timeout", dest="dist_timeout", type=number(float, 0, inclusive=False), default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others in one collective before it stops with an error")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward (one graph for equal-length batches)")
    g.add_argument("--tensorboard", dest="tensorboard_dir", nargs="?", const=TENSORBOARD_IN_OUT, default=None, metavar="DIR",
                   help="also log the metrics to TensorBoard event files in DIR (bare --tensorboard: <--out>/tensorboard); "
                        "needs pip install 'tmt_pyg[tensorboard]'")


def load_config_file(path: str) -> dict:
    """Flat option values from YAML or JSON; sections ``model:`` / ``train:`` / ``data:`` are flattened."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        values = json.loads(text)  # a JSONDecodeError is a ValueError
    else:
        import yaml
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"invalid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    flat = {}
    for key, value in values.items():
        items = value.items() if key in ("model", "train", "data") and isinstance(value, dict) else [(key, value)]
        flat.update((k.replace("-", "_"), v) for k, v in items)
    return flat


def apply_config_file(parser: argparse.ArgumentParser, argv: list, args: argparse.Namespace) -> argparse.Namespace:
    """Use ``--config`` values as defaults of the subcommand, so that flags on the command line win."""
    sub = args.subparser
    try:
        values = load_config_file(args.config)
    except (OSError, ValueError) as e:
        sub.error(f"cannot read --config {args.config}: {e}")
    actions = {a.dest: a for a in sub._actions}
    unknown = sorted(set(values) - set(actions) - {"config"})
    if unknown:
        sub.error(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
    for key, value in values.items():
        action = actions[key]
        if action.choices is not None and value not in action.choices:
            sub.error(f"{key}={value!r} in {args.config}: choose from {list(action.choices)}")
        try:  # the checks the flag's own type makes (argparse applies it to string defaults only)
            if action.type is not None and value is not None:
                action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            sub.error(f"{key}={value!r} in {args.config}: {e}")
    sub.set_defaults(**values)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- helpers

def summary(result: dict) -> str:
    recall = "n/a" if result["recall_acc"] is None else f"{result['recall_acc']:.3f}"
    return (f"PPL {result['ppl']:.2f} | recall accuracy {recall} | exit rate {result['exit_rate']:.3f} "
            f"| work fraction {result['work_fraction']:.3f}")


def model_config(args: argparse.Namespace, vocab_size: int, seq_len: int):
    """TMTConfig from the parsed flags; an invalid combination is reported as a usage error."""
    from .models import TMTConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TMTConfig) if hasattr(args, f.name)}
    values.update(vocab_size=vocab_size, max_seq_len=args.max_seq_len or seq_len)
    if args.vanilla:
        values.update(use_mesh=False, use_decay=False, use_exit=False, use_anchors=False, dual_stream=False)
    try:
        return TMTConfig(**values)
    except (TypeError, ValueError) as e:
        args.subparser.error(str(e))


def set_threads(n: Optional[int]) -> None:
    if n is not None:
        torch.set_num_threads(n)


def load_model(path: str, device: str):
    """Model (eval mode), tokenizer and the raw checkpoint from a checkpoint file or run folder."""
    from .models import TMTConfig, TMTModel
    from .train import load_checkpoint, resolve_device

    state = load_checkpoint(path)
    model = TMTModel(TMTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), tokenizer_from_state(state["extra"]["tokenizer"]), state


# ---------------------------------------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    """Under torchrun every rank trains on its own shard of the data; rank 0 prints, logs and checkpoints."""
    from .models import TMTConfig, TMTModel
    from .train import (Trainer, TrainConfig, TrainingInterrupted, distributed, find_checkpoint, load_checkpoint,
                        main_process_first, resolve_device, seed_everything)

    set_threads(args.threads)
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:  # kill -USR1 <pid>: every thread's stack, e.g. of a stuck rank
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    with distributed(resolve_device(args.device), args.dist_timeout) as (rank, world_size, device):
        say = print if rank == 0 else (lambda *_: None)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        cfg = TrainConfig(**{**values, "rank": rank, "world_size": world_size, "device": str(device)})
        seed_everything(cfg.seed)
        ckpt = None
        if args.resume:
            ckpt = find_checkpoint(cfg.out_dir if args.resume == "latest" else args.resume)
            if ckpt is None and args.resume != "latest":
                raise FileNotFoundError(f"--resume {args.resume}: no checkpoint there")
        state = load_checkpoint(ckpt) if ckpt else None
        with main_process_first():  # one download / tokenizer training; the other ranks then read the caches
            tok, data = load_data(args.dataset, args.data_dir, ("train", "validation"),
                                  tokenizer_from_state(state["extra"]["tokenizer"]) if state else None,
                                  args.tokenizer, args.bpe_vocab_size, args.synthetic_tokens, cache_dir=cfg.out_dir)
        mcfg = model_config(args, len(tok), cfg.seq_len)
        if state:  # the saved architecture, except options set away from their defaults: resume() reports a mismatch
            given = {k: v for k, v in dataclasses.asdict(mcfg).items()
                     if v != getattr(TMTConfig, k) and (k != "max_seq_len" or args.max_seq_len)}
            mcfg = TMTConfig(**{**state["model_config"], **given})
        model = TMTModel(mcfg)
        extra = checkpoint_extra(tok, args.dataset, args.data_dir, args.synthetic_tokens)
        trainer = Trainer(model, make_loader(*data["train"], cfg, True), make_loader(*data["validation"], cfg, False), cfg, extra)
        if ckpt:
            trainer.resume(ckpt)
            say(f"resumed from {ckpt} at step {trainer.step}")
        say(f"model: {model.num_parameters():,} parameters | vocab {len(tok):,} | train {data['train'][0].numel():,} tokens "
            f"| device {trainer.device} x {world_size} rank(s) | {torch.get_num_threads()} CPU threads")
        try:
            result = trainer.fit()
        except TrainingInterrupted as e:  # checkpointed: exit as the signal would have (128 + signum)
            print(f"tmt-pyg train: {e}", file=sys.stderr)
            return 128 + e.signum
        finally:
            trainer.close()
        say(f"final validation {summary(result)}")
        say(f"run folder: {cfg.out_dir} (metrics.jsonl, metrics.png, checkpoints/)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import TrainConfig, evaluate

    set_threads(args.threads)
    model, tok, state = load_model(args.checkpoint, args.device)
    data_spec = state["extra"]["data"]
    trained = state["train_config"]
    cfg = TrainConfig(seq_len=args.seq_len or trained["seq_len"], batch_size=args.batch_size or trained["batch_size"])
    _, data = load_data(args.dataset or data_spec["dataset"], args.data_dir or data_spec["data_dir"], (args.split,), tok,
                        synthetic_tokens=data_spec["synthetic_tokens"])
    result = evaluate(model, make_loader(*data[args.split], cfg, False), next(model.parameters()).device,
                      args.bf16, args.max_batches)
    result.update(checkpoint_step=state["step"], split=args.split)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint step {state['step']} | {args.split}: {result['targets']:,} target tokens\n"
              f"loss {result['loss']:.4f} | {summary(result)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .train import TrainConfig, calibrate_threshold, find_checkpoint

    set_threads(args.threads)
    model, tok, state = load_model(args.checkpoint, args.device)
    data_spec, trained = state["extra"]["data"], state["train_config"]
    cfg = TrainConfig(seq_len=trained["seq_len"], batch_size=trained["batch_size"])
    _, data = load_data(data_spec["dataset"], data_spec["data_dir"], (args.split,), tok, synthetic_tokens=data_spec["synthetic_tokens"])
    try:
        result = calibrate_threshold(model, make_loader(*data[args.split], cfg, False), args.tolerance, args.max_batches)
    except ValueError as e:
        args.subparser.error(str(e))
    base, tau = result["exits_off"], result["threshold"]
    for p in result["points"]:
        print(f"tau {p['threshold']:.4f}: loss {p['loss']:.4f} ({p['loss'] / base['loss'] - 1:+.2%}) | "
              f"exit rate {p['exit_rate']:.3f} | work fraction {p['work_fraction']:.3f}")
    print(f"exits off: loss {base['loss']:.4f}; limit {result['loss_limit']:.4f} (+{args.tolerance:.1%})")
    if tau is None:
        print("no threshold keeps the loss within the tolerance: tau set to 1.0 (no token exits)")
    tau = 1.0 if tau is None else tau
    state["model_config"]["exit_threshold"] = tau
    state["calibration"] = {k: v for k, v in result.items() if k != "threshold"} | {"threshold": tau, "split": args.split}
    file = find_checkpoint(args.checkpoint)
    tmp = file.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(file)  # atomic: eval and generate now run with this tau
    print(f"tau = {tau:.4f} stored in {file}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, _ = load_model(args.checkpoint, args.device)
    room = model.config.max_seq_len - args.max_new_tokens + 1  # prompt tokens that fit before the new ones
    if room < 1:
        args.subparser.error(f"--max-new-tokens {args.max_new_tokens} exceeds the model's max_seq_len={model.config.max_seq_len}")
    ids = tok.encode([args.prompt]).tolist()
    tail = tok.encode([""]).tolist()  # what encode appends after a line (eos / newline)
    if args.prompt and ids[-len(tail):] == tail:
        ids = ids[:-len(tail)]
    idx = torch.tensor([(ids or tail)[-room:]], device=next(model.parameters()).device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .data import tokens_to_batch
    from .models import TMTModel
    from .train import autocast, resolve_device, seed_everything

    set_threads(args.threads)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    model = TMTModel(model_config(args, args.vocab_size, args.seq_len)).to(device)
    batch = tokens_to_batch(torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=device))
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95))
    n_tokens = args.batch_size * args.seq_len

    def timed(fn) -> float:
        for _ in range(args.warmup_iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n_tokens * args.iters / (time.perf_counter() - t0)

    @torch.no_grad()
    def forward():
        model.eval()
        with autocast(device, args.bf16):
            return model(batch)

    def train_step():
        model.train()
        with autocast(device, args.bf16):
            loss = model(batch, compute_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fwd, train = timed(forward), timed(train_step)
    out = forward()
    threads = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {device} ({threads}) | {model.num_parameters():,} parameters | batch {args.batch_size} x {args.seq_len} "
          f"| bf16 {args.bf16}\nforward (eval): {fwd:,.0f} tok/s | train step (fwd+bwd+AdamW): {train:,.0f} tok/s | "
          f"eval work fraction {float(out.work_fraction):.3f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .models import TMTConfig, TMTModel, count_parameters, match_parameters
    from .train import Trainer, TrainConfig, calibrate_threshold, evaluate_at_threshold, seed_everything

    set_threads(args.threads)
    out = Path(args.out_dir)
    tok, data = load_data(args.dataset, None, ("train", "validation"), synthetic_tokens=args.synthetic_tokens)
    common = dict(vocab_size=len(tok), d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                  max_seq_len=args.seq_len, dropout=0.0)
    tmt = TMTConfig(**common, graph_k=args.graph_k, mesh_window=args.mesh_window, memory_anchors=args.memory_anchors,
                    exit_loss_weight=args.exit_loss_weight)
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
        row.update(evaluate_at_threshold(model, val, None), eval_time_s=time.perf_counter() - t0)
        if mcfg.use_exit:  # tau for at most +tolerance loss, picked on the validation split, then timed there
            calib = calibrate_threshold(model, val, args.tolerance, max_batches=args.eval_batches)
            row["tau"] = tau = calib["threshold"] or 1.0
            t0 = time.perf_counter()
            at_tau = evaluate_at_threshold(model, val, tau)
            row.update(eval_time_tau_s=time.perf_counter() - t0, loss_tau=at_tau["loss"], exit_rate=at_tau["exit_rate"],
                       work_fraction=at_tau["work_fraction"])
            model.config.exit_threshold = tau
        rows[name] = row
        text = args.prompt if args.prompt is not None else "ROMEO:" if args.dataset == "tinyshakespeare" else ""
        prompt = torch.tensor([tok.encode([text]).tolist()[:-1] or tok.encode([""]).tolist()])
        samples[name] = tok.decode(sample_cropped(model, prompt, args.sample_tokens, torch.Generator().manual_seed(args.seed)))
    table = demo_table(rows, args.dataset == "tinyshakespeare")
    text = table + "\n\n" + "\n\n".join(f"**{name}** sample:\n\n```\n{sample}\n```" for name, sample in samples.items())
    print("\n" + text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "samples": samples}, indent=2))
    (out / "results.md").write_text(text + "\n")
    plot_demo_curves({name: out / name.lower() / "metrics.jsonl" for name in rows}, out / "loss_curves.png")
    print(f"\nwritten: {out}/results.md, {out}/results.json, {out}/loss_curves.png")
    return 0


@torch.no_grad()
def sample_cropped(model, prompt, new_tokens: int, generator: torch.Generator) -> list:
    """Sample ``new_tokens`` after ``prompt`` (1, P), each from a full forward over the last
    ``max_seq_len`` tokens (so a sample may be longer than the context), temperature 0.8, top-k 40."""
    from .models.generation import sample_next

    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids[:, -model.config.max_seq_len:]).logits[:, -1]
        ids = torch.cat([ids, sample_next(logits, 0.8, 40, generator=generator)], 1)
    return ids[0].tolist()


NANOGPT_VAL_LOSS = 1.88  # nanoGPT's README: its CPU configuration on Tiny Shakespeare


def demo_table(rows: dict, shakespeare: bool) -> str:
    """Markdown table, one column per model."""
    fmt = {"parameters": "{:,}", "train_tokens": "{:,}", "loss": "{:.4f}", "train_time_s": "{:.0f} s",
           "eval_time_s": "{:.1f} s", "tau": "{:.3f}", "loss_tau": "{:.4f}", "eval_time_tau_s": "{:.1f} s",
           "exit_rate": "{:.3f}", "work_fraction": "{:.3f}"}
    label = {"parameters": "parameters", "train_tokens": "training tokens",
             "loss": "val loss" + (f" (nanoGPT: {NANOGPT_VAL_LOSS})" if shakespeare else ""),
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

    from .train import read_metrics

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (name, path) in enumerate(metrics.items()):
        records = read_metrics(path)
        train = [(r["step"], r["lm_loss"]) for r in records if r["split"] == "train"]
        width = max(1, len(train) // 50)  # running mean over 2 % of the run
        smooth = [sum(v for _, v in train[j:j + width]) / width for j in range(len(train) - width + 1)]
        ax.plot([s for s, _ in train[width - 1:]], smooth, lw=1, color=f"C{i}", label=f"{name} train")
        val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
        ax.plot(*zip(*val), "o--", color=f"C{i}", label=f"{name} val") if val else None
    ax.set(xlabel="step", ylabel="next-token loss (nats)", title="TMT vs plain transformer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmt-pyg", formatter_class=HelpFormatter,
        description="TemporalMesh Transformer (causal kNN mesh attention, temporal decay, adaptive exits) "
                    "on PyTorch Geometric.\nRun 'tmt-pyg <command> --help' for the options of a command.",
        epilog="examples:\n"
               "  tmt-pyg demo                                   # TMT vs plain transformer, a few minutes on CPU\n"
               "  tmt-pyg train --steps 500 --out runs/syn       # train on the embedded synthetic corpus\n"
               "  tmt-pyg eval runs/syn                          # PPL of the newest checkpoint\n"
               "  tmt-pyg generate runs/syn --prompt 'k3 v9 <q> k3'\n"
               "  tmt-pyg bench --d-model 256 --seq-len 512")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(name: str, help: str, description: str, examples: str, usage: str = "%(prog)s [options]") -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=description, epilog="examples:\n" + examples,
                            usage=usage, formatter_class=HelpFormatter)
        p.set_defaults(subparser=p)
        return p

    p = sub("train", "train a model; prints the final validation perplexity",
            "Train a TMT language model. Writes metrics.jsonl, metrics.png and checkpoints/ (atomic,\n"
            "keep-last-N, exact resume) into --out. Values from --config (YAML or JSON, keys = option\n"
            "names, optionally under model:/train:/data:) are defaults that command-line flags override.\n"
            "SIGINT / SIGTERM finish the current step, write a checkpoint and exit with 130 / 143.",
            "  tmt-pyg train --steps 300 --d-model 128 --n-layers 2 --out runs/syn\n"
            "  tmt-pyg train --dataset wikitext-2 --data-dir data/ --seq-len 256 --bf16\n"
            "  tmt-pyg train --dataset text --data-dir my_corpus/ --tokenizer bpe --bpe-vocab-size 4096\n"
            "  tmt-pyg train --vanilla --out runs/vanilla          # the same model, every TMT part off\n"
            "  tmt-pyg train --config run.yaml --lr 1e-3           # file values, one overridden\n"
            "  tmt-pyg train --out runs/syn --resume               # continue the newest checkpoint\n"
            "  torchrun --nproc_per_node 4 -m tmt_pyg.cli train --out runs/ddp   # DDP, one process per GPU (docs/distributed.md)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON file of option values")
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    add_runtime_args(p)
    p.set_defaults(run=cmd_train)

    p = sub("eval", "perplexity, recall accuracy, exit rate and work fraction of a checkpoint",
            "Evaluate a checkpoint on a split of its dataset (or another one with the same tokenizer).",
            "  tmt-pyg eval runs/syn                                   # newest checkpoint of a run\n"
            "  tmt-pyg eval runs/syn/checkpoints/step_00000300.pt --split test --json",
            usage="%(prog)s CHECKPOINT [options]")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="split to evaluate")
    add_data_args(p, defaults=False)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="default: the training batch size")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="default: the training sequence length")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=0, help="stop after this many batches (0: all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_runtime_args(p, seed=False)
    p.set_defaults(run=cmd_eval)

    p = sub("calibrate", "pick the exit threshold tau of a checkpoint on held-out data",
            "Choose the lowest exit threshold (the most exits) whose loss on the split stays within --tolerance of the\n"
            "loss with exits off, and store it in the checkpoint: eval and generate then use it.",
            "  tmt-pyg calibrate runs/shakespeare --tolerance 0.02",
            usage="%(prog)s CHECKPOINT [options]")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--tolerance", type=number(float, 0), default=0.02, help="allowed relative loss rise (0.02: 2%%)")
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="held-out split to calibrate on")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=0, help="batches per evaluation (0: all)")
    add_runtime_args(p, seed=False)
    p.set_defaults(run=cmd_calibrate)

    p = sub("generate", "sample text from a checkpoint",
            "Continue a prompt with a trained model (temperature / top-k / nucleus sampling).",
            "  tmt-pyg generate runs/syn --prompt 'k3 v9 k7 v2 w5 <q> k7' --max-new-tokens 5\n"
            "  tmt-pyg generate runs/wt2 --prompt 'The meaning of' --temperature 0.8 --top-p 0.9",
            usage="%(prog)s CHECKPOINT [options]")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from an end-of-line token)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (lower: more conservative)")
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    add_runtime_args(p)
    p.set_defaults(run=cmd_generate)

    p = sub("bench", "tokens/s of a configuration (forward and training step) on random tokens",
            "Measure forward (eval mode) and training-step throughput of a model configuration on random\n"
            "token ids. States the device and the number of CPU threads used.",
            "  tmt-pyg bench                                         # default TMT config\n"
            "  tmt-pyg bench --vanilla                               # the plain transformer\n"
            "  tmt-pyg bench --threads 2 --seq-len 1024 --batch-size 1")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON file of model option values")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup-iters", dest="warmup_iters", type=int, default=2, help="untimed iterations first")
    add_model_args(p)
    add_runtime_args(p)
    p.set_defaults(run=cmd_bench)

    p = sub("demo", "TMT vs a plain transformer on Tiny Shakespeare at nanoGPT's CPU configuration (minutes on CPU)",
            "Train a TMT (the default configuration) and a plain transformer (the same TMTModel with mesh, decay,\n"
            "exits, anchors and dual stream switched off: fused SDPA attention, MLP widened to the same parameter\n"
            "count) for the same tokens at nanoGPT's CPU configuration (4 layers, 4 heads, width 128, context 64,\n"
            "batch 12, 2000 steps, lr 1e-3, dropout 0) on the Tiny Shakespeare corpus shipped with the package;\n"
            "calibrate TMT's exit threshold, print a table, a sample from each and plot both loss curves.\n"
            "No download needed; --dataset synthetic runs the embedded associative-recall corpus instead.",
            "  tmt-pyg demo\n"
            "  tmt-pyg demo --steps 500 --out runs/demo_short\n"
            "  tmt-pyg demo --dataset synthetic --seq-len 128 --batch-size 16 --lr 3e-3")
    p.add_argument("--dataset", choices=("tinyshakespeare", "synthetic"), default="tinyshakespeare", help="corpus")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per model")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=12, help="sequences per step")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--d-model", dest="d_model", type=int, default=128, help="width of both models")
    p.add_argument("--n-layers", dest="n_layers", type=int, default=4, help="layers of both models")
    p.add_argument("--n-heads", dest="n_heads", type=int, default=4, help="attention heads of both models")
    p.add_argument("--graph-k", dest="graph_k", type=int, default=8, help="TMT mesh neighbours per token")
    p.add_argument("--mesh-window", dest="mesh_window", type=int, default=8, help="TMT local window slots")
    p.add_argument("--memory-anchors", dest="memory_anchors", type=int, default=16, help="TMT memory anchors")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both models (cosine to lr/10)")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=250, help="steps between evaluations")
    p.add_argument("--eval-batches", dest="eval_batches", type=int, default=40,
                   help="validation batches of the evaluations during training and of calibration (the final one uses all)")
    p.add_argument("--exit-loss-weight", dest="exit_loss_weight", type=float, default=0.5,
                   help="TMT's early-exit LM loss weight (the study's recipe)")
    p.add_argument("--tolerance", type=float, default=0.02, help="loss rise allowed by the exit calibration")
    p.add_argument("--prompt", default=None, help="prompt of the samples (default: 'ROMEO:' for Tiny Shakespeare, else none)")
    p.add_argument("--sample-tokens", dest="sample_tokens", type=int, default=200, help="tokens sampled from each model")
    p.add_argument("--synthetic-tokens", dest="synthetic_tokens", type=int, default=400_000, help="size of the synthetic corpus")
    p.add_argument("--out", dest="out_dir", default="runs/demo", help="output folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    add_runtime_args(p)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args = apply_config_file(parser, argv, args)
    if getattr(args, "no_compile", False):
        if getattr(args, "compile", False):
            parser.error("--compile and --no-compile exclude each other")
        set_compile(False)
    if getattr(args, "tensorboard_dir", None) == TENSORBOARD_IN_OUT:
        args.tensorboard_dir = str(Path(args.out_dir) / "tensorboard")
    try:
        return args.run(args)
    except (OSError, ValueError, FloatingPointError, ImportError, CollectiveError) as e:  # missing files or extras, no network,
        # bad data, divergence, a lost peer rank
        print(f"tmt-pyg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
