"""The argument groups of the ``tmt-pyg`` subcommands (model, runtime, data, training), the argparse
types they check values with, and ``--config`` files as defaults of a subcommand."""
import argparse
import dataclasses
import json
from pathlib import Path

from .data.corpus import DEFAULT_TOKENIZER
from .train.distributed import DEFAULT_TIMEOUT_S

TENSORBOARD_IN_OUT = "<out>/tensorboard"  # what a bare --tensorboard means, resolved once --out is known
WARMUP_SHARE = 0.1  # the default warmup takes at most this share of a run's steps


def number(kind: type, minimum, inclusive: bool = True):
    """argparse type: a ``kind`` (int / float) ``>= minimum`` (``> minimum`` unless ``inclusive``)."""
    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: ..."
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def threshold(text: str) -> float:
    """argparse type: an exit threshold tau in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def int_or_auto(text: str):
    """argparse type: ``auto`` or an integer."""
    return text if text == "auto" else int(text)


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .layers.mesh import BACKENDS, SEARCHES
    from .models.config import GATE_LOSSES, MESH_SIMILARITIES, TMTConfig

    # the field defaults as declared: TMTConfig() would show what __post_init__ resolves -1 / auto to
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TMTConfig)})
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
    g.add_argument("--mesh-explore", dest="mesh_explore", type=int, default=d.mesh_explore,
                   help="random earlier tokens every token also reads in training (0: none)")
    g.add_argument("--mesh-dense-warmup", dest="mesh_dense_warmup", type=int, default=d.mesh_dense_warmup,
                   help="first training steps in which the mesh layers attend densely (0: none)")
    g.add_argument("--memory-anchors", dest="memory_anchors", type=int, default=d.memory_anchors, help="memory anchor vectors")
    g.add_argument("--ffn-stream-dim", dest="ffn_stream_dim", type=int, default=d.ffn_stream_dim, help="hidden width of each dual-stream FFN stream")
    g.add_argument("--mlp-dim", dest="mlp_dim", type=int, default=d.mlp_dim, help="hidden width of the plain MLP (with --no-dual-stream)")
    g.add_argument("--decay-rate", dest="decay_rate", type=float, default=d.decay_rate, help="initial temporal decay rate per head")
    g.add_argument("--exit-threshold", dest="exit_threshold", type=float, default=d.exit_threshold, help="gate confidence above which a token exits")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout on embeddings and residual branches")
    g.add_argument("--attn-dropout", dest="attn_dropout", type=float, default=d.attn_dropout,
                   help="dropout on attention weights (0 keeps the plain transformer on the fused SDPA kernel)")
    g.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=None, help="longest sequence the model accepts (default: --seq-len)")
    g.add_argument("--mesh-backend", dest="mesh_backend", choices=BACKENDS, default=d.mesh_backend, help="kNN search backend")
    g.add_argument("--mesh-search", dest="mesh_search", choices=SEARCHES, default=d.mesh_search,
                   help="exact: every earlier token is a kNN candidate; routed: the candidates of the best earlier blocks "
                        "(sub-quadratic, for long contexts)")
    g.add_argument("--route-block", dest="route_block", type=int, default=d.route_block, help="positions per routing block")
    g.add_argument("--route-top", dest="route_top", type=int, default=d.route_top, help="earlier blocks each token routes to")
    g.add_argument("--search-heads", dest="search_heads", type=int, default=d.search_heads,
                   help="heads whose queries/keys the mesh search compares (0: all; fewer: a cheaper search)")
    g.add_argument("--gate-loss", dest="gate_loss", choices=GATE_LOSSES, default=d.gate_loss, help="training signal of the exit gates")
    g.add_argument("--gate-loss-weight", dest="gate_loss_weight", type=float, default=d.gate_loss_weight, help="weight of the gate loss")
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--mesh", dest="use_mesh", action=bool_flag, default=d.use_mesh, help="kNN mesh attention (--no-mesh: dense causal attention)")
    g.add_argument("--decay", dest="use_decay", action=bool_flag, default=d.use_decay, help="temporal decay of attention weights")
    g.add_argument("--exit", dest="use_exit", action=bool_flag, default=d.use_exit, help="per-token exit gates")
    g.add_argument("--message-passing", dest="message_passing", action=bool_flag, default=d.message_passing,
                   help="causal mesh attention as PyG message passing over the mesh edges (the general path; the "
                        "default is the fused slot op, the same attention, faster)")
    g.add_argument("--anchors", dest="use_anchors", action=bool_flag, default=d.use_anchors, help="memory anchors")
    g.add_argument("--dual-stream", dest="dual_stream", action=bool_flag, default=d.dual_stream, help="dual-stream FFN (--no-dual-stream: plain MLP)")
    g.add_argument("--exit-loss-weight", dest="exit_loss_weight", type=float, default=d.exit_loss_weight,
                   help="weight of the early-exit LM loss (every earlier layer predicts through the shared head)")
    g.add_argument("--exit-loss-sample", dest="exit_loss_sample", type=int, default=d.exit_loss_sample,
                   help="tokens per batch the early-exit loss scores (unbiased: scaled to the loss over all tokens; 0: all)")
    g.add_argument("--exit-loss-layers", dest="exit_loss_layers", type=int, default=d.exit_loss_layers,
                   help="early layers the early-exit loss scores per step, drawn in proportion to their weight "
                        "(unbiased for the every-layer loss; 0: every early layer)")
    g.add_argument("--layer-dropout", dest="layer_dropout", type=float, default=d.layer_dropout,
                   help="LayerSkip layer dropout: a sequence skips layer l with probability p * l / (L - 1) in training")
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
    """The data options of ``train`` (``defaults``), or of a command that reads a run's data (eval): then every
    option defaults to what the run stored."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DEFAULT_TOKENIZER), default="synthetic" if defaults else None,
                   help="corpus: 'synthetic' is embedded and 'tinyshakespeare' ships with the package (no download); "
                        "'text' reads --data-dir/{train,valid,test}.txt" + ("" if defaults else " (default: the run's)"))
    if not defaults:
        add_data_dir_arg(g)
        return
    g.add_argument("--data-dir", dest="data_dir", type=existing_dir, default=None,
                   help="folder with train.txt / valid.txt / test.txt (offline; the run stores its absolute path); "
                        "without it WikiText comes from the HF hub")
    g.add_argument("--tokenizer", default="auto",
                   help="word (the training words, others read as <unk>) | char (every character of all the split "
                        "files) | bpe (trained on the training split) | path of a local HF tokenizer folder (auto: word "
                        "for wikitext-2 and synthetic, char for tinyshakespeare, bpe otherwise)")
    g.add_argument("--bpe-vocab-size", dest="bpe_vocab_size", type=int, default=8192, help="vocabulary size of a trained BPE")
    g.add_argument("--synthetic-tokens", dest="synthetic_tokens", type=int, default=400_000, help="training tokens of the synthetic corpus")


def add_data_dir_arg(p) -> None:
    """``--data-dir`` of the commands that read a run's held-out data (eval, calibrate, draft)."""
    p.add_argument("--data-dir", dest="data_dir", type=existing_dir, default=None,
                   help="folder of the run's corpus (default: the folder the run stored at training time)")


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
    g.add_argument("--warmup", type=count, default=None,
                   help=f"linear warmup steps (default: {d.warmup}, at most {WARMUP_SHARE * 100:.0f}%% of --steps)")
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
