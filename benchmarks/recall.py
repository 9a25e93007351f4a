"""Multi-query associative recall (MQAR, the "Zoology" task of Arora et al. 2023): can the mesh find
what attention finds? Vanilla, the original pure kNN mesh (state similarity) and mesh variants (a local window of previous
tokens as extra slots) at equal parameters, data and steps; accuracy on the answers.

A sequence holds ``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the lower half of
the vocabulary, values from the upper half), then a query region of length ``S - 2 * pairs`` where
every key appears once more at a random even offset, followed by its value; the rest is token 0. The
loss and the accuracy count only the positions of the query keys, where the next token is the value.
Every finished run is cached as JSON under ``--runs``, so an interrupted sweep continues.

    python -m benchmarks.recall --threads 2

``--variants`` instead trains the shipped default model and its ablation arms (the whole
default model must recall, not only its mesh) over ``--seeds`` at one point and learning rate, logs
the attention mass that goes to the memory anchors and the learned decay rates during training, and
writes ``recall_default.md``/``.json``: mean and spread over seeds of every arm cached in ``--runs``
at that budget (``--label`` names the code version a run measured, e.g. before and after a fix).

    python -m benchmarks.recall --threads 1 --variants vanilla mesh default --seeds 0 1 2 --points 64:16 \
        --steps 3000 --lrs 3e-3 --runs runs/recall_default --label after

``--zoology`` runs Zoology's protocol instead (:func:`zoology_main`): Zoology's data (:func:`zoology_batch`,
vocabulary 8192), 2 layers at d_model 64 and one head, fresh batches of 128 sequences, learning rates swept
per row and point (constant after a warm-up), held-out accuracy at the query positions every ``--eval-every``
sequences (a curve), early stop at 0.99; rows vanilla, mesh (the mesh alone), default (every TMT part but the
exits) and, at points of S >= 512, routed (the mesh alone with the routed search). The short points run
first (vanilla, then mesh, then default), then the long one; vanilla decides the other rows' budgets
(``--budget-factor``) and skips them where it stays below 0.95. Every finished run is one JSON under
``--runs`` (default ``docs/results/recall_zoology/runs``); a run in progress, or one cut by its budget, is
checkpointed under ``runs/recall_zoology_partial`` (git-ignored), so a killed sweep resumes where it stopped
and a larger budget continues a run. ``--table-only`` rewrites
``docs/results/recall_zoology/recall_zoology.md``/``.json``/``.png`` from the cache; ``--cost N`` times N steps
per row and point.

    nice -n 19 python -m benchmarks.recall --zoology --threads 1
    python -m benchmarks.recall --zoology --table-only
"""
import json
import math
import subprocess
import time
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import RESULTS_DIR, base_parser, finish, markdown_table, mean_std, new_figure, setup
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
    """Vanilla, the original pure mesh (state similarity) and the mesh variants: a window of previous
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
    return finish(VARIANTS_NAME, args, info, report, {"rows": rows, "runs": runs, "size": size}, fig, argv, module=NAME)


VARIANTS_NAME = "recall_default"


# --- Zoology's protocol (--zoology) -----------------------------------------------------------------

ZOOLOGY_NAME = "recall_zoology"
ZOOLOGY_DIR = RESULTS_DIR / ZOOLOGY_NAME
PARTIAL_DIR = Path(__file__).resolve().parents[1] / "runs" / "recall_zoology_partial"  # git-ignored checkpoints
ZOOLOGY_ROWS = ("vanilla", "mesh", "default", "routed", "window", "explore", "warmup")
EXPLORE_SLOTS = 8  # random earlier slots per token of the explore row
# Zoology's figure 2: 2 layers, d_model 64, one head, vocabulary 8192. Its blocks have no MLP; ours keep a narrow
# one (2 x d_model) that every row shares, the other rows' FFN widths matched to vanilla's parameter count.
ZOOLOGY_SIZE = dict(vocab_size=8192, d_model=64, n_heads=1, n_layers=2, dropout=0.0, rope=True, mlp_dim=128)
# S:pairs:batch:max_sequences: two short points and a long one (docs/results/recall_zoology/cost.md: the choice)
ZOOLOGY_POINTS = ("64:4:128:1.5M", "128:8:128:2M", "512:32:128:2M")
ZOOLOGY_LRS = (2.2e-3, 4.6e-4, 1e-2)  # three of Zoology's four (np.logspace(-4, -2, 4)), the likeliest best first
STOP_AT, REACH = 0.99, 0.95  # early stop, and the accuracy whose sequences are recorded


def zoology_batch(batch_size: int, seq_len: int, pairs: int, vocab: int, gen: torch.Generator, power_a: float = 0.01,
                  random_non_queries: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """MQAR as Zoology generates it (``multiquery_ar``): ``pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct
    keys from ``[1, vocab / 2)``, distinct values from ``[vocab / 2, vocab)``), then a query region where every key
    appears once more, at ``2 * pairs + 2 * gap`` with the gaps drawn without replacement from the power law
    ``p(gap) ~ (gap + 1) ** (power_a - 1)`` (``power_a`` 0.01: mostly early queries); the value is *not* repeated
    after its query, every other position is 0 (``random_non_queries``: a random token instead).

    Returns ``ids`` (B, S) and ``labels`` (B, S): at a query position the value its key was paired with (the
    next-token target there), -100 everywhere else."""
    context, half = 2 * pairs, vocab // 2
    if seq_len % 2 or 2 * context > seq_len:
        raise ValueError(f"{pairs} pairs need an even seq_len >= {2 * context}, got {seq_len}")
    if pairs > half - 1:
        raise ValueError(f"{pairs} distinct keys need vocab >= {2 * pairs + 2}, got {vocab}")
    B = batch_size
    keys = torch.rand(B, half - 1, generator=gen).topk(pairs, 1).indices + 1  # a random subset in random order
    values = torch.rand(B, vocab - half, generator=gen).topk(pairs, 1).indices + half
    space = (seq_len - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(B, space), pairs, replacement=False, generator=gen)
    ids = torch.zeros(B, seq_len, dtype=torch.long)
    ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
    rows, where = torch.arange(B).unsqueeze(1), context + 2 * gaps
    ids[rows, where] = keys
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    labels[rows, where] = values
    if random_non_queries:
        filler = torch.randint(vocab, ids.shape, generator=gen)
        ids = torch.where(ids == 0, filler, ids)
    return ids, labels


def parse_point(spec: str) -> Dict:
    """``S:pairs[:batch[:max_sequences]]`` (max_sequences may end in k or M) -> a point dict."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"point {spec!r}: expected S:pairs[:batch[:max_sequences]]")
    scale = {"k": 1_000, "M": 1_000_000}
    count = lambda v: int(float(v[:-1]) * scale[v[-1]]) if v[-1] in scale else int(v)
    S, pairs = int(parts[0]), int(parts[1])
    batch = int(parts[2]) if len(parts) > 2 else 128
    return {"S": S, "pairs": pairs, "batch": batch, "max_sequences": count(parts[3]) if len(parts) > 3 else 1_000_000}


def zoology_configs(size: Dict, S: int, long_from: int = 512, dense_steps: int = 200) -> Dict[str, TMTConfig]:
    """The rows at length ``S``: vanilla (dense fused SDPA), mesh (``TMTConfig.vanilla`` with the mesh on, its
    window and similarity at TMTConfig's defaults), default (the shipped default with the exits off) and, from
    ``S >= long_from``, routed (the mesh alone with ``mesh_search="routed"``), and the window-only control (the
    mesh's slots as a window of the previous tokens, no content search: it can only recall keys that lie near);
    two remedies for a search that learns only from the keys it picked: explore (the mesh with
    ``EXPLORE_SLOTS`` random earlier slots per token in training) and warmup (the mesh attending densely for the
    first ``dense_steps`` training steps: the protocol's lr warm-up); FFN widths matched to vanilla's
    parameter count."""
    size = {**size, "max_seq_len": S}
    vanilla = TMTConfig.vanilla(**size)
    configs = {"vanilla": vanilla, "mesh": TMTConfig.vanilla(**size, use_mesh=True),
               "default": TMTConfig(**size, use_exit=False)}
    if S >= long_from:
        configs["routed"] = TMTConfig.vanilla(**size, use_mesh=True, mesh_search="routed")
    mesh = configs["mesh"]
    configs["window"] = TMTConfig.vanilla(**size, use_mesh=True, graph_k=0, mesh_window=mesh.graph_k + mesh.mesh_window)
    configs["explore"] = TMTConfig.vanilla(**size, use_mesh=True, mesh_explore=EXPLORE_SLOTS)
    configs["warmup"] = TMTConfig.vanilla(**size, use_mesh=True, mesh_dense_warmup=dense_steps)
    target = count_parameters(vanilla)
    return {row: cfg if row == "vanilla" else match_parameters(cfg, target) for row, cfg in configs.items()}


def final_states(h: torch.Tensor) -> torch.Tensor:
    return h


def answer_logits(model: TMTModel, ids: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits (Q, V) and targets (Q,) at the query positions only. ``model.lm_head`` is set to
    :func:`final_states`, so its forward returns the final states and the (tied) head runs on the Q rows that
    the loss and the accuracy count, instead of all B * S (the same numbers, without a B x S x 8192 product)."""
    mask = labels >= 0
    h = model(ids).logits
    if model.lm_head is final_states:
        return TMTModel.lm_head(model, h[mask]), labels[mask]
    return h[mask], labels[mask]


@torch.no_grad()
def evaluate(model: TMTModel, test: Tuple[torch.Tensor, torch.Tensor], chunk: int = 256) -> Tuple[float, float]:
    """Accuracy and cross-entropy at the query positions of the held-out ``test`` (ids, labels)."""
    model.eval()
    correct = total = 0
    loss = 0.0
    device = model.wte.weight.device
    try:
        for start in range(0, test[0].size(0), chunk):
            logits, target = answer_logits(model, test[0][start:start + chunk].to(device), test[1][start:start + chunk].to(device))
            correct += int((logits.argmax(-1) == target).sum())
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            total += target.numel()
    finally:
        model.train()
    return correct / total, loss / total


def held_out_set(point: Dict, vocab: int, queries: int, seed: int, power_a: float, random_non_queries: bool):
    """The held-out sequences of a point (the same for every row and learning rate): about ``queries`` queries,
    256 to 3000 sequences, from a generator no training batch uses."""
    n = min(3000, max(256, -(-queries // point["pairs"])))
    gen = torch.Generator().manual_seed(1_000_003 + 7919 * seed + point["S"] * 131 + point["pairs"])
    return zoology_batch(n, point["S"], point["pairs"], vocab, gen, power_a, random_non_queries)


def protocol_of(args, size: Dict, point: Dict) -> Dict:
    """Everything besides row, lr, seed and budget that a run depends on (its hash is part of the cache key).
    The learning rate is constant after the warm-up, so a run's curve does not depend on its budget: a longer
    budget continues a cached run from its kept checkpoint, a shorter one is the same curve cut off."""
    return {"size": size, "S": point["S"], "pairs": point["pairs"], "batch": point["batch"],
            "eval_every": args.eval_every, "test_queries": args.test_queries, "power_a": args.power_a,
            "random_non_queries": args.random_non_queries, "warmup_sequences": args.warmup_sequences, "weight_decay": 0.1,
            "betas": [0.9, 0.98], "clip": 1.0, "stop_at": STOP_AT}


def run_key(point: Dict, row: str, lr: float, seed: int, protocol: Dict) -> str:
    import hashlib
    digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:6]
    return f"S{point['S']}_p{point['pairs']}_b{point['batch']}_{row}_lr{lr:g}_seed{seed}_{digest}"


def zoology_run(cfg: TMTConfig, point: Dict, lr: float, seed: int, test, protocol: Dict, partial: Optional[Path],
                progress: bool = True, desc: str = "", budget: Optional[int] = None, device: str = "cpu") -> Dict:
    """Train ``TMTModel(cfg)`` on fresh batches (the same stream for every row and lr of a seed) with AdamW
    (weight decay 0.1, betas 0.9/0.98, clip 1.0; linear warm-up over ``warmup_sequences``, then the constant
    ``lr``) for ``budget`` sequences (default the point's ``max_sequences``), evaluating on ``test`` every
    ``eval_every`` sequences (and at 0) and stopping once the held-out accuracy reaches 0.99, or on a non-finite
    loss. ``partial``: a checkpoint written at every evaluation below 0.99 (also at the end of the budget, so a
    longer budget can continue the run) and read back when it exists (a killed run continues there). ``device``:
    where the model trains (the data is drawn on the CPU either way)."""
    S, pairs, batch = point["S"], point["pairs"], point["batch"]
    total = -(-(budget or point["max_sequences"]) // batch)
    every = max(1, protocol["eval_every"] // batch)
    warm = max(1, protocol["warmup_sequences"] // batch)
    torch.manual_seed(seed)
    model = TMTModel(cfg).to(device)
    model.lm_head = final_states  # the head runs on the query rows only (answer_logits)
    opt = model.configure_optimizers(weight_decay=protocol["weight_decay"], learning_rate=lr, betas=tuple(protocol["betas"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    gen = torch.Generator().manual_seed(seed)
    step, curve, seconds, stopped, train_losses = 0, [], 0.0, "budget", []
    if partial is not None and partial.exists():
        state = torch.load(partial, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, curve, seconds = state["step"], state["curve"], state["seconds"]
        print(f"{desc}: resumed from {partial} at {step * batch:,} sequences", flush=True)
    if not curve:
        acc, loss = evaluate(model, test)
        curve.append({"sequences": 0, "accuracy": acc, "loss": loss, "train_loss": None, "seconds": 0.0})
    bar = tqdm(total=total, initial=step, disable=not progress, desc=desc, mininterval=30, leave=False)
    start = time.perf_counter() - seconds
    while step < total and curve[-1]["accuracy"] < protocol["stop_at"]:
        model.dense_warmup = step < cfg.mesh_dense_warmup  # the first steps attend densely (the warmup row)
        ids, labels = zoology_batch(batch, S, pairs, cfg.vocab_size, gen, protocol["power_a"], protocol["random_non_queries"])
        ids, labels = ids.to(device), labels.to(device)
        logits, target = answer_logits(model, ids, labels)
        loss = F.cross_entropy(logits, target)
        if not torch.isfinite(loss):
            stopped = "diverged"
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), protocol["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        bar.update()
        train_losses.append(loss.item())
        if step % every == 0 or step == total:
            try:
                acc, test_loss = evaluate(model, test)
            except ValueError:  # non-finite states
                stopped = "diverged"
                break
            seconds = time.perf_counter() - start
            curve.append({"sequences": step * batch, "accuracy": acc, "loss": test_loss,
                          "train_loss": sum(train_losses) / len(train_losses), "seconds": seconds})
            train_losses = []
            bar.set_postfix(acc=f"{acc:.3f}")
            print(f"{desc}: {step * batch:,} sequences, held-out accuracy {acc:.4f}, loss {test_loss:.3f}, "
                  f"{seconds / 60:.1f} min", flush=True)
            if partial is not None and acc < protocol["stop_at"]:
                partial.parent.mkdir(parents=True, exist_ok=True)
                tmp = partial.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "gen": gen.get_state(), "step": step, "curve": curve, "seconds": seconds}, tmp)
                tmp.replace(partial)
    bar.close()
    if curve[-1]["accuracy"] >= protocol["stop_at"]:
        stopped = "reached 0.99"
    reach = lambda level: next((c["sequences"] for c in curve if c["accuracy"] >= level), None)
    return {"accuracy": curve[-1]["accuracy"], "best_accuracy": max(c["accuracy"] for c in curve),
            "loss": curve[-1]["loss"], "sequences_to_95": reach(REACH), "sequences_to_99": reach(STOP_AT),
            "sequences": step * batch, "steps": step, "stopped": stopped, "seconds": time.perf_counter() - start,
            "params": model.num_parameters(), "curve": curve}


def zoology_parser():
    parser = base_parser("MQAR under Zoology's protocol: vanilla, the mesh alone, the default model (and routed "
                         "search at long points), lr swept, held-out accuracy curves", repeats=1)
    parser.set_defaults(out=ZOOLOGY_DIR)
    parser.add_argument("--points", nargs="+",
                        help="S:pairs[:batch[:max_sequences]] (batch default 128, max_sequences default 1M; "
                             f"default {' '.join(ZOOLOGY_POINTS)})")
    parser.add_argument("--rows", nargs="+", choices=ZOOLOGY_ROWS, default=list(ZOOLOGY_ROWS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(ZOOLOGY_LRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--long-from", type=int, default=512, help="points this long or longer get the routed row")
    parser.add_argument("--eval-every", type=int, default=12_800, help="training sequences between evaluations")
    parser.add_argument("--warmup-sequences", type=int, default=25_600, help="training sequences of the linear lr warm-up")
    parser.add_argument("--lr-factor", type=float, default=2.0,
                        help="a row's later lrs train at most this many times the sequences its fastest cached lr "
                             "needed to reach 0.99 at the point (0: off); lrs run in the --lrs order")
    parser.add_argument("--budget-factor", type=float, default=3.0,
                        help="rows other than vanilla train at most this many times the sequences the best vanilla run "
                             "needed to reach 0.99 at the point (within the point's max_sequences)")
    parser.add_argument("--test-queries", type=int, default=8192, help="held-out queries per point (256-3000 sequences)")
    parser.add_argument("--power-a", type=float, default=0.01, help="Zoology's power law of the query gaps")
    parser.add_argument("--random-non-queries", action="store_true", help="random tokens instead of 0 between queries")
    parser.add_argument("--vocab", type=int, default=ZOOLOGY_SIZE["vocab_size"])
    parser.add_argument("--runs", type=Path, help="cache of finished runs (default <out>/runs)")
    parser.add_argument("--partial", type=Path, help="checkpoints of unfinished runs (default runs/recall_zoology_partial)")
    parser.add_argument("--device", default="cpu", help="where the models train: cpu, cuda, cuda:N")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table and plot from the cache")
    parser.add_argument("--no-gate", action="store_true",
                        help="train the other rows even at points where vanilla stayed below 0.95 at every lr")
    parser.add_argument("--cost", type=int, default=0, metavar="STEPS",
                        help="only time STEPS training steps per row and point and estimate the sweep's CPU hours")
    return parser


def zoology_cost(args, size: Dict, points, steps: int) -> Dict:
    """Seconds per training step of every row at every point (after 2 untimed steps), and the sweep's worst
    case (every run to its budget, every lr) in CPU hours at this thread count."""
    rows, worst = [], 0.0
    for point in points:
        protocol = protocol_of(args, size, point)
        for row, cfg in zoology_configs(size, point["S"], args.long_from).items():
            if row not in args.rows:
                continue
            torch.manual_seed(0)
            model = TMTModel(cfg)
            model.lm_head = final_states
            opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
            gen = torch.Generator().manual_seed(0)
            times = []
            for i in range(steps + 2):
                ids, labels = zoology_batch(point["batch"], point["S"], point["pairs"], cfg.vocab_size, gen,
                                            protocol["power_a"], protocol["random_non_queries"])
                t = time.perf_counter()
                logits, target = answer_logits(model, ids, labels)
                F.cross_entropy(logits, target).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times.append(time.perf_counter() - t)
            step_s = sorted(times)[len(times) // 2]
            run_h = step_s * point["max_sequences"] / point["batch"] / 3600
            worst += run_h * len(args.lrs) * len(args.seeds)
            rows.append({**point, "row": row, "step_seconds": step_s, "params": model.num_parameters(),
                         "hours_per_run_at_budget": run_h})
            print(f"S={point['S']} pairs={point['pairs']} batch={point['batch']} {row}: {step_s:.3f} s/step, "
                  f"{run_h:.2f} h per run of {point['max_sequences']:,} sequences", flush=True)
    print(f"worst case (every run to its budget): {worst:.1f} h", flush=True)
    return {"rows": rows, "worst_case_hours": worst, "threads": torch.get_num_threads()}


def zoology_main(argv: Optional[Sequence[str]] = None) -> Dict:
    """The sweep (rows outer, so vanilla finishes at every point first; then points; then lrs), cached run by
    run, then the table and plot from every cached run of the current protocol."""
    args = zoology_parser().parse_args(argv)
    size = {**ZOOLOGY_SIZE, "vocab_size": args.vocab}
    if args.quick:
        size.update(vocab_size=64, d_model=16, mlp_dim=32)
        args.points, args.lrs, args.long_from = args.points or ["32:4:8:48"], [3e-3, 1e-2], 32
        args.eval_every, args.test_queries, args.warmup_sequences = 16, 64, 16
    args.points = args.points or list(ZOOLOGY_POINTS)
    args.runs = args.runs or args.out / "runs"
    args.partial = args.partial or (args.out / "partial" if args.quick else PARTIAL_DIR)
    points = [parse_point(p) for p in args.points]
    info = setup(args)
    if args.cost:
        result = zoology_cost(args, size, points, args.cost)
        (args.out / "cost.json").write_text(json.dumps({**result, "machine": info}, indent=1) + "\n")
        return result
    if not args.table_only:
        configs = {p["S"]: zoology_configs(size, p["S"], args.long_from, max(1, args.warmup_sequences // p["batch"]))
                   for p in points}
        # short points first (every row, vanilla first), then the long points (vanilla first): a long point costs
        # ten times a short one per sequence
        todo = [(row, point, lr, seed) for long in (False, True) for row in args.rows for point in points
                if (point["S"] >= args.long_from) == long for lr in args.lrs for seed in args.seeds
                if row in configs[point["S"]]]
        tests = {}
        for row, point, lr, seed in tqdm(todo, desc="recall_zoology sweep", disable=args.quick, mininterval=60):
            protocol = protocol_of(args, size, point)
            path = args.runs / f"{run_key(point, row, lr, seed, protocol)}.json"
            partial = args.partial / f"{path.stem}.pt"
            budget = point["max_sequences"]
            if row != "vanilla":
                vanilla = [load_run(args.runs / f"{run_key(point, 'vanilla', v, seed, protocol)}.json") for v in args.lrs]
                if all(v is not None for v in vanilla):
                    if not args.no_gate and max(v["best_accuracy"] for v in vanilla) < REACH:
                        print(f"skip {row} at S={point['S']} pairs={point['pairs']}: vanilla stayed below {REACH}", flush=True)
                        continue
                    needed = [v["sequences_to_99"] for v in vanilla if v["sequences_to_99"]]
                    if needed and args.budget_factor:
                        budget = min(budget, math.ceil(args.budget_factor * min(needed) / args.eval_every) * args.eval_every)
            others = [load_run(args.runs / f"{run_key(point, row, v, seed, protocol)}.json") for v in args.lrs if v != lr]
            solved = [r["sequences_to_99"] for r in others if r is not None and r["sequences_to_99"]]
            if solved and args.lr_factor:  # an lr this much slower than one already run cannot be the best
                budget = min(budget, math.ceil(args.lr_factor * min(solved) / args.eval_every) * args.eval_every)
            cached = load_run(path)
            if cached is not None and not (cached["stopped"] == "budget" and cached["sequences"] < budget and partial.exists()):
                continue
            cfg = configs[point["S"]][row]
            key = (point["S"], point["pairs"], seed)
            if key not in tests:
                tests[key] = held_out_set(point, size["vocab_size"], args.test_queries, seed, args.power_a, args.random_non_queries)
            run = zoology_run(cfg, point, lr, seed, tests[key], protocol, partial, progress=not args.quick,
                              desc=f"{row} S={point['S']} pairs={point['pairs']} lr={lr:g} seed={seed}", budget=budget,
                              device=args.device)
            run.update(row=row, lr=lr, seed=seed, point=point, budget=budget, protocol=protocol, code=code_version(),
                       config=asdict(cfg), threads=torch.get_num_threads(), device=args.device)
            args.runs.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=1) + "\n")
            tmp.replace(path)
            if run["stopped"] != "budget":  # a run cut by its budget keeps its checkpoint: a longer budget continues it
                partial.unlink(missing_ok=True)
            print(f"cached {path.name}: accuracy {run['accuracy']:.4f}, to 0.95 {run['sequences_to_95']}, "
                  f"{run['stopped']}, {run['seconds'] / 60:.1f} min", flush=True)
    return zoology_report(args, size, points, info, argv)


def load_run(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text()) if path.exists() else None


def zoology_report(args, size: Dict, points, info: Dict, argv) -> Dict:
    """Table (best lr per row and point against vanilla) and plot (held-out accuracy and loss against training
    sequences, one column per point) of the cached runs of the current protocol; runs still in progress (a
    checkpoint, no result yet) are drawn dashed and listed, never taken as a row's best."""
    runs, running = [], []
    for point in points:
        protocol = protocol_of(args, size, point)
        for row in ZOOLOGY_ROWS:
            for lr in args.lrs:
                for seed in args.seeds:
                    key = run_key(point, row, lr, seed, protocol)
                    run = load_run(args.runs / f"{key}.json")
                    if run is not None:
                        runs.append(run)
                    elif (args.partial / f"{key}.pt").exists():
                        curve = torch.load(args.partial / f"{key}.pt", weights_only=False, map_location="cpu")["curve"]
                        running.append({"row": row, "lr": lr, "seed": seed, "point": point, "curve": curve})
    # the best lr: the fewest sequences to 0.95 among the runs that got there (early stopping makes their final
    # accuracies equal), else the highest accuracy
    order = lambda r: (1, -r["sequences_to_95"]) if r["sequences_to_95"] else (0, r["best_accuracy"])
    best = {}
    for r in runs:  # best lr per row, point (and seed)
        k = (r["point"]["S"], r["point"]["pairs"], r["row"], r["seed"])
        if k not in best or order(r) > order(best[k]):
            best[k] = r
    fmt_n = lambda n: "-" if n is None else f"{n / 1e3:,.0f}k"
    table = []
    for point in points:
        for seed in args.seeds:
            van = best.get((point["S"], point["pairs"], "vanilla", seed))
            for row in ZOOLOGY_ROWS:
                r = best.get((point["S"], point["pairs"], row, seed))
                if r is None:
                    continue
                done = sum(1 for x in runs if (x["point"]["S"], x["point"]["pairs"], x["row"], x["seed"]) ==
                           (point["S"], point["pairs"], row, seed))
                ratio = (f"{r['sequences_to_95'] / van['sequences_to_95']:.2f}x"
                         if van and r["sequences_to_95"] and van["sequences_to_95"] else "-")
                table.append((point["S"], point["pairs"], row, f"{r['lr']:g}", f"{r['best_accuracy']:.3f}",
                              f"{r['accuracy']:.3f}", fmt_n(r["sequences_to_95"]),
                              "-" if van is None else f"{r['best_accuracy'] - van['best_accuracy']:+.3f}", ratio,
                              f"{done}/{len(args.lrs)}", f"{r['params']:,}"))
    maxima = ", ".join(f"S={p['S']}: {p['max_sequences']:,}" for p in points)
    lines = [f"MQAR under Zoology's protocol (Arora et al. 2023, `multiquery_ar`): keys from the lower half of a "
             f"{size['vocab_size']}-token vocabulary, values from the upper half, queries at power-law gaps "
             f"(a={args.power_a}), {'random' if args.random_non_queries else 'zero'} tokens between queries. "
             f"{size['n_layers']} layers, d_model {size['d_model']}, {size['n_heads']} head, rotary positions, no dropout; "
             f"vanilla has a {size['mlp_dim']}-wide GELU MLP, every other row's FFN width is matched to its parameter "
             f"count. Rows: `vanilla` (dense fused SDPA), `mesh` (TMTConfig.vanilla(use_mesh=True): k={TMTConfig.graph_k} "
             f"similar earlier tokens by attention similarity plus a window of 8), `default` (every TMT part on but the "
             f"exits), `routed` (the mesh alone with mesh_search='routed', points of S >= {args.long_from}), `window` (the "
             f"control: the mesh's {TMTConfig.graph_k + 8} slots as a window of the previous tokens, no content search), "
             f"`explore` (the mesh with {EXPLORE_SLOTS} random earlier slots per token in training), `warmup` (the mesh "
             f"attending densely during the lr warm-up, then searching). Fresh "
             f"training batches of {', '.join(sorted({str(p['batch']) for p in points}))} sequences, AdamW (wd 0.1, betas "
             f"0.9/0.98, clip 1.0, linear warm-up over {args.warmup_sequences:,} sequences, then constant), lr swept over "
             f"{', '.join(f'{lr:g}' for lr in args.lrs)}; held-out accuracy at the query positions every "
             f"{args.eval_every:,} sequences, early stop at {STOP_AT}. Budgets: vanilla up to the point's maximum "
             f"({maxima} sequences); the other rows up to "
             f"{args.budget_factor:g}x the sequences vanilla's best run needed to reach {STOP_AT} (within the maximum); the lrs "
             f"run in the order listed, each later one at most {args.lr_factor:g}x the sequences the row's fastest earlier "
             f"one needed to reach {STOP_AT} (a slower lr cannot be the best).",
             "Best lr per row and point (fewest sequences to 0.95, else highest held-out accuracy); `vs vanilla`: "
             "accuracy difference and the ratio of sequences to 0.95; `lrs done`: cached runs of the swept lrs.",
             markdown_table(["S", "pairs", "row", "best lr", "best accuracy", "final accuracy", "sequences to 0.95",
                             "vs vanilla", "to 0.95 vs vanilla", "lrs done", "params"], table),
             "Every cached run:",
             markdown_table(["S", "pairs", "batch", "budget", "row", "lr", "seed", "final accuracy", "best accuracy",
                             "to 0.95", "to 0.99", "trained", "stopped", "minutes"],
                            [(r["point"]["S"], r["point"]["pairs"], r["point"]["batch"], fmt_n(r["budget"]),
                              r["row"], f"{r['lr']:g}", r["seed"], f"{r['accuracy']:.3f}", f"{r['best_accuracy']:.3f}",
                              fmt_n(r["sequences_to_95"]), fmt_n(r["sequences_to_99"]), fmt_n(r["sequences"]),
                              r["stopped"], f"{r['seconds'] / 60:.0f}") for r in runs])]
    if running:
        lines += ["Runs in progress (their last evaluation; rerun the command to continue them):",
                  markdown_table(["S", "pairs", "row", "lr", "seed", "trained", "accuracy", "loss"],
                                 [(r["point"]["S"], r["point"]["pairs"], r["row"], f"{r['lr']:g}", r["seed"],
                                   fmt_n(r["curve"][-1]["sequences"]), f"{r['curve'][-1]['accuracy']:.3f}",
                                   f"{r['curve'][-1]['loss']:.3f}") for r in running])]
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(points), 7.5))
    axes = fig.subplots(2, len(points), squeeze=False)
    colors = dict(zip(ZOOLOGY_ROWS, (f"C{i}" for i in range(len(ZOOLOGY_ROWS)))))
    for column, point in enumerate(points):
        at_point = lambda r: (r["point"]["S"], r["point"]["pairs"]) == (point["S"], point["pairs"])
        top, bottom = axes[0][column], axes[1][column]
        for r in [r for r in runs + running if at_point(r)]:
            done = "stopped" in r
            is_best = done and best.get((point["S"], point["pairs"], r["row"], r["seed"])) is r
            style = "-" if is_best else ":" if done else "--"
            label = (f"{r['row']} (lr {r['lr']:g})" if is_best else None) if done else f"{r['row']} (lr {r['lr']:g}, running)"
            xs = [c["sequences"] for c in r["curve"]]
            for ax, key in ((top, "accuracy"), (bottom, "loss")):
                ax.plot(xs, [c[key] for c in r["curve"]], style, color=colors[r["row"]],
                        alpha=0.35 if done and not is_best else 1.0, label=label)
        if not any(at_point(r) for r in runs + running):
            top.text(0.5, 0.5, "no run cached yet", transform=top.transAxes, ha="center", color="grey")
        top.axhline(REACH, color="grey", lw=0.5)
        top.set(ylabel="held-out accuracy", ylim=(0, 1.02), title=f"S={point['S']}, {point['pairs']} pairs")
        bottom.set(ylabel="held-out loss (log)", yscale="log")
        for ax in (top, bottom):
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k")
            ax.set(xlabel="training sequences")
            ax.grid(alpha=0.3)
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=7)
    fig.tight_layout()
    slim = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    return finish(ZOOLOGY_NAME, args, info, lines, {"runs": slim, "size": size, "points": points}, fig, argv,
                  module=f"{NAME} --zoology")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    given = list(sys.argv[1:] if argv is None else argv)
    if "--zoology" in given:
        return zoology_main([a for a in given if a != "--zoology"])
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
