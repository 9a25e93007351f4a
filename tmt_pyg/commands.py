"""What each ``tmt-pyg`` subcommand does with its parsed flags (``tmt_pyg.cli`` parses and dispatches)."""
import argparse
import dataclasses
import faulthandler
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import torch

from .bench import throughput
from .cli_args import WARMUP_SHARE
from .data.corpus import checkpoint_extra, encode_checked, load_data, make_loader, tokenizer_from_state
from .demo import run_demo
from .models import TMTConfig, TMTModel
from .models.speculative import choose_drafting, held_out_prompts
from .train import (Trainer, TrainConfig, TrainingInterrupted, calibrate_threshold, calibration_record, distributed,
                    evaluate, find_checkpoint, load_checkpoint, load_run, main_process_first, resolve_device,
                    seed_everything, write_atomic)

DEFAULT_NEW_TOKENS = 50  # generate's --max-new-tokens when the model's context allows it


def summary(result: dict) -> str:
    recall = "n/a" if result["recall_acc"] is None else f"{result['recall_acc']:.3f}"
    return (f"PPL {result['ppl']:.2f} | recall accuracy {recall} | exit rate {result['exit_rate']:.3f} "
            f"| work fraction {result['work_fraction']:.3f}")


def model_config(args: argparse.Namespace, vocab_size: int, seq_len: int) -> TMTConfig:
    """TMTConfig from the parsed flags; an invalid combination is reported as a usage error."""
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


def notice(args: argparse.Namespace, message: str) -> None:
    """One line on stderr about a choice the command made for the user."""
    print(f"tmt-pyg {args.command}: note: {message}", file=sys.stderr)


def held_out_split(args: argparse.Namespace, tok, state: dict) -> tuple:
    """``(stream, node_fields)`` of ``args.split`` of the run's corpus; ``--data-dir`` (and eval's ``--dataset``)
    replace what the run stored."""
    spec = state["extra"]["data"]
    data_dir = args.data_dir or spec["data_dir"]
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"the run's data folder {data_dir} does not exist (here); pass --data-dir")
    _, data = load_data(getattr(args, "dataset", None) or spec["dataset"], data_dir, (args.split,), tok,
                        synthetic_tokens=spec["synthetic_tokens"])
    return data[args.split]


def held_out(args: argparse.Namespace, seq_len: Optional[int] = None, batch_size: Optional[int] = None) -> tuple:
    """``(model, state, loader)``: the run of ``args.checkpoint`` and a loader over ``args.split`` of its corpus
    (the training sequence shape unless given)."""
    model, tok, state = load_run(args.checkpoint, resolve_device(args.device))
    trained = state["train_config"]
    cfg = TrainConfig(seq_len=seq_len or trained["seq_len"], batch_size=batch_size or trained["batch_size"])
    return model, state, make_loader(*held_out_split(args, tok, state), cfg, False)


def cmd_train(args: argparse.Namespace) -> int:
    """Under torchrun every rank trains on its own shard of the data; rank 0 prints, logs and checkpoints."""
    set_threads(args.threads)
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:  # kill -USR1 <pid>: every thread's stack, e.g. of a stuck rank
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    with distributed(resolve_device(args.device), args.dist_timeout) as (rank, world_size, device):
        say = print if rank == 0 else (lambda *_: None)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        if args.warmup is None:  # the default warmup, cut to a share of short runs
            values["warmup"] = min(TrainConfig.warmup, int(args.steps * WARMUP_SHARE))
            if values["warmup"] < TrainConfig.warmup and rank == 0:
                notice(args, f"warmup {values['warmup']} steps ({WARMUP_SHARE:.0%} of --steps {args.steps}) instead of "
                             f"the default {TrainConfig.warmup}; --warmup N sets it")
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


def exit_threshold_in_use(args: argparse.Namespace, model: TMTModel, state: dict) -> tuple:
    """``(tau, source)``: the exit threshold eval runs with (set on ``model``) and where it comes from: ``flag``
    (eval's --exit-threshold), ``calibrate`` (stored by ``tmt-pyg calibrate`` or the demo) or ``train`` (the
    training config); ``(None, "no exit gates")`` for a model without exits."""
    cfg = model.config
    if not cfg.use_exit:
        return None, "no exit gates"
    if args.exit_threshold is not None:
        cfg.exit_threshold = args.exit_threshold
        return cfg.exit_threshold, "flag"
    calibrated = state.get("calibration", {}).get("threshold") == cfg.exit_threshold
    return cfg.exit_threshold, "calibrate" if calibrated else "train"


def cmd_eval(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    model, state, loader = held_out(args, args.seq_len, args.batch_size)
    tau, source = exit_threshold_in_use(args, model, state)
    result = evaluate(model, loader, next(model.parameters()).device, args.bf16, args.max_batches)
    result.update(checkpoint_step=state["step"], split=args.split, exit_threshold=tau, exit_threshold_source=source)
    if args.json:
        print(json.dumps(result))
        return 0
    if tau is None:
        where = "exits off: the model has no exit gates"
    elif source == "calibrate":
        calib = state["calibration"]
        where = (f"exit threshold tau {tau:.4f} (stored by calibrate: within +{calib['tolerance']:.1%} loss on its "
                 f"{calib['split']} split)")
    else:
        where = f"exit threshold tau {tau:.4f} " + ("(--exit-threshold)" if source == "flag" else
                                                    "(the training config's; tmt-pyg calibrate picks one on held-out data)")
    print(f"checkpoint step {state['step']} | {args.split}: {result['targets']:,} target tokens | {where}\n"
          f"loss {result['loss']:.4f} | {summary(result)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    model, state, loader = held_out(args)
    try:
        result = calibrate_threshold(model, loader, args.tolerance, args.max_batches)
    except ValueError as e:
        args.subparser.error(str(e))
    base, tau = result["exits_off"], result["threshold"]
    for p in result["points"]:
        print(f"tau {p['threshold']:.4f}: loss {p['loss']:.4f} ({p['loss'] / base['loss'] - 1:+.2%}) | "
              f"exit rate {p['exit_rate']:.3f} | work fraction {p['work_fraction']:.3f}")
    print(f"exits off: loss {base['loss']:.4f}; limit {result['loss_limit']:.4f} (+{args.tolerance:.1%})")
    if tau is None:
        print("no threshold keeps the loss within the tolerance: tau set to 1.0 (no token exits)")
    state["calibration"] = calibration_record(result, args.split)
    state["model_config"]["exit_threshold"] = tau = state["calibration"]["threshold"]
    file = write_atomic(state, find_checkpoint(args.checkpoint))  # eval and generate now run with this tau
    print(f"tau = {tau:.4f} stored in {file}")
    return 0


def cmd_draft(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    model, tok, state = load_run(args.checkpoint, resolve_device(args.device))
    new_tokens = min(args.new_tokens, model.config.max_seq_len - args.prompt_tokens)
    if new_tokens < 1 or model.config.n_layers < 2:
        args.subparser.error(f"needs a model of >= 2 layers and --prompt-tokens below max_seq_len={model.config.max_seq_len}")
    prompts = held_out_prompts(held_out_split(args, tok, state)[0], args.batch_size, args.prompt_tokens, args.seed)
    result = choose_drafting(model, prompts.to(next(model.parameters()).device), new_tokens, args.draft_tokens, args.repeats)
    print(f"greedy decoding, {args.batch_size} x {args.prompt_tokens}-token {args.split} prompts, {new_tokens} new tokens, "
          f"median of {args.repeats}: plain {result['tokens_per_s']:.0f} tokens/s")
    for key, row in result["variants"].items():
        E, d = key.split(",")
        print(f"draft layers {E}, draft tokens {d}: acceptance {row['acceptance']:.2f} | {row['tokens_per_s']:.0f} tokens/s "
              f"({row['tokens_per_s'] / result['tokens_per_s']:.2f}x)")
    state["speculative"] = result | {"split": args.split}
    file = write_atomic(state, find_checkpoint(args.checkpoint))
    choice = ("plain decoding (no drafting was faster)" if result["draft_layers"] is None else
              f"draft layers {result['draft_layers']}, draft tokens {result['draft_tokens']} ({result['speedup']:.2f}x)")
    print(f"chosen: {choice}; stored in {file} (tmt-pyg generate --draft-layers auto uses it)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, state = load_run(args.checkpoint, resolve_device(args.device))
    draft_layers, draft_tokens = args.draft_layers, args.draft_tokens
    if draft_layers == "auto":
        if "speculative" not in state:
            args.subparser.error("--draft-layers auto reads the drafting stored by `tmt-pyg draft CHECKPOINT`; run that first")
        draft_layers, draft_tokens = state["speculative"]["draft_layers"], state["speculative"]["draft_tokens"] or draft_tokens
    context = model.config.max_seq_len
    tail = tok.encode([""]).tolist()  # what encode appends after a line (eos / newline)
    ids = encode_checked(tok, [args.prompt], "the prompt").tolist()
    if args.prompt and ids[-len(tail):] == tail:
        ids = ids[:-len(tail)]
    ids = ids or tail
    # the model reads at most max_seq_len tokens: prompt + new tokens - 1 (the last new token is never read)
    new_tokens = args.max_new_tokens or min(DEFAULT_NEW_TOKENS, max(context + 1 - len(ids), context // 2))
    if new_tokens > context:
        args.subparser.error(f"--max-new-tokens {new_tokens} exceeds the model's max_seq_len={context}")
    room = context + 1 - new_tokens  # prompt tokens that fit before the new ones
    if len(ids) > room:
        notice(args, f"the prompt's {len(ids)} tokens and {new_tokens} new ones exceed the model's context "
                     f"(max_seq_len={context}): kept the prompt's last {room} tokens")
        ids = ids[-room:]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(idx, new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         draft_layers=draft_layers, draft_tokens=draft_tokens)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hf import export_run  # transformers: imported by this command only

    files = export_run(args.checkpoint, args.out_dir)
    print(f"written: {args.out_dir} ({', '.join(files)}); load it with "
          f"tmt_pyg.hf.TMTForCausalLM.from_pretrained({str(args.out_dir)!r})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    model = TMTModel(model_config(args, args.vocab_size, args.seq_len)).to(device)
    print(throughput(model, device, args.batch_size, args.seq_len, args.iters, args.warmup_iters, args.bf16))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    run_demo(args)
    return 0
