"""``tmt-pyg``: the command line of the TemporalMesh Transformer (train, evaluate, calibrate, draft, sample, export,
benchmark, demo): its subcommands (their flags: ``tmt_pyg.cli_args``) and the dispatch to ``tmt_pyg.commands``."""
import argparse
import sys
from pathlib import Path
from typing import Optional

from . import commands
from .cli_args import (TENSORBOARD_IN_OUT, add_data_args, add_data_dir_arg, add_model_args, add_runtime_args,
                       add_train_args, apply_config_file, int_or_auto, number, threshold)
from .demo import QUICK
from .layers.slot_attention import set_compile
from .train.distributed import CollectiveError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (unless None / off) and keeps the line breaks of descriptions and examples."""

    def _get_help_string(self, action):
        hidden = action.default is None or action.default is False or action.default == ""  # 0 is shown
        return action.help if hidden else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmt-pyg", formatter_class=HelpFormatter,
        description="TemporalMesh Transformer (causal kNN mesh attention, temporal decay, adaptive exits) "
                    "on PyTorch Geometric.\nRun 'tmt-pyg <command> --help' for the options of a command.",
        epilog="examples:\n"
               "  tmt-pyg demo --quick                           # TMT vs plain transformer, about a minute on CPU\n"
               "  tmt-pyg demo                                   # the same at nanoGPT's CPU size, about 13 min on 2 cores\n"
               "  tmt-pyg train --steps 500 --out runs/syn       # train on the embedded synthetic corpus\n"
               "  tmt-pyg eval runs/syn                          # PPL of the newest checkpoint\n"
               "  tmt-pyg generate runs/syn --prompt 'k3 v9 <q> k3'\n"
               "  tmt-pyg export runs/syn hf/syn                 # a transformers folder (from_pretrained)\n"
               "  tmt-pyg bench --d-model 256 --seq-len 512")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(name: str, help: str, description: str, examples: str, checkpoint: bool = False) -> argparse.ArgumentParser:
        """A subcommand that runs ``commands.cmd_<name>``; ``checkpoint``: it reads a trained run."""
        p = subs.add_parser(name, help=help, description=description, epilog="examples:\n" + examples,
                            usage=f"%(prog)s {'CHECKPOINT ' if checkpoint else ''}[options]", formatter_class=HelpFormatter)
        p.set_defaults(subparser=p, run=getattr(commands, f"cmd_{name}"))
        if checkpoint:
            p.add_argument("checkpoint", help="checkpoint file, or a run folder (its newest checkpoint)")
        return p

    p = sub("train", "train a model; prints the final validation perplexity",
            "Train a TMT language model. Writes metrics.jsonl, metrics.png and checkpoints/ (atomic,\n"
            "keep-last-N, exact resume) into --out. Values from --config (YAML or JSON, keys = option\n"
            "names, optionally under model:/train:/data:) are defaults that command-line flags override.\n"
            "SIGINT / SIGTERM finish the current step, write a checkpoint and exit with 130 / 143.",
            "  tmt-pyg train --steps 300 --d-model 128 --n-layers 2 --out runs/syn\n"
            "  tmt-pyg train --dataset wikitext-2 --data-dir data/ --seq-len 256 --bf16\n"
            "  tmt-pyg train --dataset text --data-dir my_corpus/ --tokenizer char --out runs/mine\n"
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

    p = sub("eval", "perplexity, recall accuracy, exit rate and work fraction of a checkpoint",
            "Evaluate a checkpoint on a split of its dataset (or another one with the same tokenizer). Prints the\n"
            "exit threshold tau it ran with and where tau came from: --exit-threshold, `tmt-pyg calibrate` (stored\n"
            "in the checkpoint) or the training config.",
            "  tmt-pyg eval runs/syn                                   # newest checkpoint of a run\n"
            "  tmt-pyg eval runs/syn/checkpoints/step_00000300.pt --split test --json\n"
            "  tmt-pyg eval runs/mine --data-dir ~/my_corpus --exit-threshold 1.0   # moved corpus, no token exits",
            checkpoint=True)
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="split to evaluate")
    p.add_argument("--exit-threshold", dest="exit_threshold", type=threshold, default=None,
                   help="exit threshold tau in (0, 1] for this evaluation (default: the checkpoint's; 1.0: no token exits)")
    add_data_args(p, defaults=False)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="default: the training batch size")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="default: the training sequence length")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=0, help="stop after this many batches (0: all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_runtime_args(p, seed=False)

    p = sub("calibrate", "pick the exit threshold tau of a checkpoint on held-out data",
            "Choose the lowest exit threshold (the most exits) whose loss on the split stays within --tolerance of the\n"
            "loss with exits off, and store it in the checkpoint: eval and generate then use it.",
            "  tmt-pyg calibrate runs/shakespeare --tolerance 0.02",
            checkpoint=True)
    p.add_argument("--tolerance", type=number(float, 0), default=0.02, help="allowed relative loss rise (0.02: 2%%)")
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="held-out split to calibrate on")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=0, help="batches per evaluation (0: all)")
    add_data_dir_arg(p)
    add_runtime_args(p, seed=False)

    p = sub("generate", "sample text from a checkpoint",
            "Continue a prompt with a trained model (temperature / top-k / nucleus sampling). The model reads at most\n"
            "max_seq_len tokens (the training --seq-len unless --max-seq-len was given): when the prompt and the\n"
            "new tokens do not fit, the start of the prompt is dropped and a note on stderr says so.",
            "  tmt-pyg generate runs/syn --prompt 'k3 v9 k7 v2 w5 <q> k7' --max-new-tokens 5\n"
            "  tmt-pyg generate runs/wt2 --prompt 'The meaning of' --temperature 0.8 --top-p 0.9",
            checkpoint=True)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from an end-of-line token)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=number(int, 1), default=None,
                   help="tokens to generate, at most max_seq_len (default: 50, or fewer when the prompt leaves less "
                        "room in the model's context, but at least half of max_seq_len)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (lower: more conservative)")
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--draft-layers", dest="draft_layers", type=int_or_auto, default=None,
                   help="self-speculative decoding: the first E layers draft, the full model verifies (same greedy output); "
                        "auto: the drafting `tmt-pyg draft` stored in the checkpoint")
    p.add_argument("--draft-tokens", dest="draft_tokens", type=int, default=4, help="tokens drafted per round (with --draft-layers)")
    add_runtime_args(p)

    p = sub("draft", "choose the self-speculative drafting of a checkpoint on held-out prompts",
            "Time greedy decoding of held-out prompts plainly and with every number of draft layers E (and each\n"
            "--draft-tokens d), all variants in turn, and store the fastest in the checkpoint: `generate\n"
            "--draft-layers auto` then uses it (plain decoding if no drafting was faster on this machine).",
            "  tmt-pyg draft runs/demo/tmt\n"
            "  tmt-pyg generate runs/demo/tmt --prompt 'ROMEO:' --temperature 0 --draft-layers auto",
            checkpoint=True)
    p.add_argument("--split", default="validation", choices=("validation", "test"), help="held-out split of the prompts")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="prompts decoded together")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=number(int, 1), default=16, help="tokens per prompt")
    p.add_argument("--new-tokens", dest="new_tokens", type=number(int, 1), default=48,
                   help="new tokens per prompt (at most max_seq_len - prompt tokens)")
    p.add_argument("--draft-tokens", dest="draft_tokens", type=number(int, 1), nargs="+", default=[2, 4], help="d values to try")
    p.add_argument("--repeats", type=number(int, 1), default=3, help="timed calls of every variant (median)")
    add_data_dir_arg(p)
    add_runtime_args(p)

    p = sub("export", "write a run as a HuggingFace transformers folder (model and tokenizer)",
            "Save the newest checkpoint of a run (or a checkpoint file) with save_pretrained into OUT_DIR: config.json\n"
            "and the weights of tmt_pyg.hf.TMTForCausalLM (calibrated tau included) and the run's tokenizer, so that\n"
            "TMTForCausalLM.from_pretrained(OUT_DIR) and transformers' AutoTokenizer.from_pretrained(OUT_DIR) load them.",
            "  tmt-pyg export runs/demo/tmt hf/tmt-shakespeare",
            checkpoint=True)
    p.usage = "%(prog)s CHECKPOINT OUT_DIR"
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")

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

    quick_flags = [{"draft": "--no-draft", "out_dir": f"--out {QUICK['out_dir']}"}.get(k, f"--{k.replace('_', '-')} {v}")
                   for k, v in QUICK.items()]
    p = sub("demo", "TMT vs a plain transformer on Tiny Shakespeare at nanoGPT's CPU configuration (minutes on CPU)",
            "Train a TMT (the default configuration) and a plain transformer (the same TMTModel with mesh, decay,\n"
            "exits, anchors and dual stream switched off: fused SDPA attention, MLP widened to the same parameter\n"
            "count) for the same tokens at nanoGPT's CPU configuration (4 layers, 4 heads, width 128, context 64,\n"
            "batch 12, 2000 steps, lr 1e-3, dropout 0) on the Tiny Shakespeare corpus shipped with the package;\n"
            "calibrate TMT's exit threshold, print a table, a sample from each and plot both loss curves.\n"
            "No download needed; --dataset synthetic runs the embedded associative-recall corpus instead.",
            "  tmt-pyg demo --quick                 # smaller models, fewer steps: about a minute on 2 cores\n"
            "  tmt-pyg demo\n"
            "  tmt-pyg demo --steps 500 --out runs/demo_short\n"
            "  tmt-pyg demo --dataset synthetic --seq-len 128 --batch-size 16 --lr 3e-3")
    p.add_argument("--quick", action="store_true",
                   help="about a minute on 2 CPU cores: " + ", ".join(quick_flags) + " (flags given with it win)")
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
                   help="validation batches of the evaluations during training and of calibration")
    p.add_argument("--final-eval-batches", dest="final_eval_batches", type=number(int, 0), default=0,
                   help="validation batches of the final evaluations, the table's (0: all)")
    p.add_argument("--exit-loss-weight", dest="exit_loss_weight", type=float, default=0.5,
                   help="TMT's early-exit LM loss weight (the study's recipe)")
    p.add_argument("--layer-dropout", dest="layer_dropout", type=float, default=0.0,
                   help="TMT's LayerSkip layer dropout (the rate of the last layer)")
    p.add_argument("--tolerance", type=float, default=0.02, help="loss rise allowed by the exit calibration")
    p.add_argument("--draft", action=argparse.BooleanOptionalAction, default=True,
                   help="choose TMT's self-speculative drafting, as tmt-pyg draft does")
    p.add_argument("--prompt", default=None, help="prompt of the samples (default: 'ROMEO:' for Tiny Shakespeare, else none)")
    p.add_argument("--sample-tokens", dest="sample_tokens", type=int, default=200, help="tokens sampled from each model")
    p.add_argument("--synthetic-tokens", dest="synthetic_tokens", type=int, default=400_000, help="size of the synthetic corpus")
    p.add_argument("--out", dest="out_dir", default="runs/demo", help="output folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    add_runtime_args(p)
    return parser


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):  # the quick demo's values as defaults, so that flags given with it win
        args.subparser.set_defaults(**QUICK)
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
