"""Training loop: AdamW, warmup + cosine LR, grad accumulation, bf16 autocast, eval, exact resume, DDP."""
import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..data.batching import next_token_targets
from .checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import all_reduce, collective, wrap_ddp
from .plots import plot_metrics, read_metrics
from .signals import StopSignals
from .tensorboard import make_tensorboard_logger


@dataclass
class TrainConfig:
    steps: int = 2000          # optimizer steps
    batch_size: int = 16       # sequences per micro-batch (per rank)
    seq_len: int = 128         # tokens per sequence
    grad_accum: int = 1        # micro-batches per optimizer step
    lr: float = 3e-4           # peak learning rate, reached after warmup
    min_lr: float = 3e-5       # learning rate at the end of the cosine decay
    warmup: int = 100          # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay, weight matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0     # max global gradient norm (0: no clipping)
    clip_gates_apart: bool = True  # exit gates clipped to their own norm, so their gradients never shrink the trunk's step
    # (metrics: grad_norm is the trunk's norm, gate_grad_norm the gates', both before clipping)
    eval_every: int = 200      # steps between evaluations (0: only at the end)
    eval_batches: int = 0      # validation batches per evaluation (0: the whole loader)
    ckpt_every: int = 0        # steps between checkpoints (0: at every evaluation)
    keep_last: int = 3         # checkpoints kept on disk
    out_dir: str = "runs/tmt"  # metrics.jsonl, metrics.png, checkpoints/
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    bf16: bool = False         # bfloat16 autocast (CPU and CUDA)
    compile: bool = False      # torch.compile the training forward (equal-length batches compile without breaks)
    tensorboard_dir: Optional[str] = None  # also log every metric record to TensorBoard event files here
    progress: bool = True      # tqdm progress bar
    on_nonfinite: str = "stop"  # NaN/Inf loss, gradient or buffer: "stop" (raise) | "skip" (drop the update)
    rank: int = 0              # process rank; only rank 0 logs and writes checkpoints
    world_size: int = 1        # processes in the torch.distributed group (> 1: DistributedDataParallel)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.grad_accum < 1 or self.keep_last < 1:
            raise ValueError(f"TrainConfig: steps, batch_size, grad_accum, keep_last must be >= 1 and seq_len >= 2: {self}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"TrainConfig: on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"TrainConfig: rank {self.rank} out of range for world_size {self.world_size}")


def model_input(batch):
    """A batch of equal-length sequences as a ``(B, S)`` id tensor, the model's static-shape input
    (no host sync inside the forward, so it compiles as one graph); other batches as they are."""
    B, N = batch.num_graphs, batch.num_nodes
    if N % B == 0 and bool((batch.ptr.diff() == N // B).all()):
        return batch.input_ids.view(B, N // B)
    return batch


class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.fit` after SIGINT / SIGTERM, once the current step is done and checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, checkpoint "
                         f"{checkpoint or 'written by rank 0'}; continue with --resume")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available (use --device cpu)")
    return device


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on ``device`` when ``bf16`` is set, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from ``lr / warmup`` to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, loader, device: Union[str, torch.device] = "cpu", bf16: bool = False, max_batches: int = 0,
             distributed: bool = False) -> dict:
    """Token-weighted mean next-token loss and PPL over ``loader``, plus exit rate, work fraction and
    the forward's counted FLOPs per token (``flops_per_token``: the layers' own count, see
    :attr:`TMTOutput.flops`, plus the tied LM head's ``2 * d_model * vocab_size``; None for a model
    that counts none).
    Only the LM loss is computed (from the logits), so that its time is the model's forward.

    When batches carry a boolean node field ``answer_mask``, ``recall_acc`` is the fraction of
    answer tokens that the previous row's argmax predicts; otherwise it is None. With
    ``distributed``, every rank passes its own shard and the counts are summed over the ranks.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)  # same batches at every evaluation
    loss_sum, n_targets, hits, n_answers, exit_sum, work_sum, n_batches = 0.0, 0, 0, 0, 0.0, 0.0, 0
    flop_sum, n_rows, config = 0.0, 0, getattr(model, "config", None)
    head_flops = 2.0 * config.d_model * config.vocab_size if config is not None else 0.0
    for batch in loader:
        if max_batches and n_batches >= max_batches:
            break
        batch = batch.to(device)
        target = next_token_targets(batch.input_ids, batch.batch)
        with autocast(device, bf16):  # no compute_loss: the training-only losses (early exits, gates) cost heads
            out = model(batch)
        loss_sum += float(F.cross_entropy(out.logits.float(), target, ignore_index=-100, reduction="sum"))
        same = target[:-1] >= 0  # row i predicts row i + 1
        n_targets += int(same.sum())
        if "answer_mask" in batch:
            answer = batch.answer_mask[1:].bool() & same
            correct = out.logits[:-1].argmax(-1) == batch.input_ids[1:]
            hits += int((correct & answer).sum())
            n_answers += int(answer.sum())
        exit_sum += float(out.exit_rate)
        work_sum += float(out.work_fraction)
        flop_sum += float(getattr(out, "flops", math.nan)) + head_flops * out.logits.size(0)
        n_rows += out.logits.size(0)
        n_batches += 1
    model.train(was_training)
    if distributed:
        totals = torch.tensor([loss_sum, n_targets, hits, n_answers, exit_sum, work_sum, n_batches, flop_sum, n_rows],
                              dtype=torch.float64, device=device)
        totals = all_reduce(totals, name="the all-reduce of the validation sums")
        loss_sum, n_targets, hits, n_answers, exit_sum, work_sum, n_batches, flop_sum, n_rows = totals.tolist()
        n_targets, hits, n_answers = int(n_targets), int(hits), int(n_answers)
    if n_targets == 0:
        raise ValueError("evaluation loader produced no next-token targets (empty or too-short sequences)")
    loss = loss_sum / n_targets
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "recall_acc": hits / n_answers if n_answers else None,
            "exit_rate": exit_sum / n_batches, "work_fraction": work_sum / n_batches, "targets": n_targets,
            "flops_per_token": flop_sum / n_rows if math.isfinite(flop_sum) else None}


class Trainer:
    """Trains a TMT-style model (``model(batch).loss``, ``model.configure_optimizers``, ``model.config``).

    ``train_loader`` must offer ``state_dict``/``load_state_dict`` (exact mid-epoch resume); ``extra``
    is stored in every checkpoint (e.g. the data and tokenizer spec). Only rank 0 writes
    ``out_dir/metrics.jsonl``, ``out_dir/metrics.png`` and ``out_dir/checkpoints/``.
    With ``cfg.world_size > 1`` (an initialised process group, each rank's loaders its own shard) the
    steps run through DistributedDataParallel (``self.ddp``); ``self.model`` stays the raw module.
    """

    def __init__(self, model, train_loader, val_loader=None, cfg: Optional[TrainConfig] = None, extra: Optional[dict] = None):
        self.cfg = cfg = cfg or TrainConfig()
        if len(train_loader) == 0:
            raise ValueError("train loader is empty: the corpus is shorter than one batch (lower --batch-size or --seq-len)")
        if getattr(train_loader, "world_size", cfg.world_size) != cfg.world_size:
            raise ValueError(f"the train loader is sharded for {train_loader.world_size} rank(s) but world_size={cfg.world_size}")
        self.device = resolve_device(cfg.device)
        self.model = self.ddp = model.to(self.device)
        if cfg.world_size > 1:
            if not dist.is_initialized() or dist.get_world_size() != cfg.world_size:
                raise RuntimeError(f"world_size={cfg.world_size} needs a torch.distributed process group of that size "
                                   "(run under torchrun)")
            self.ddp = wrap_ddp(self.model)  # also broadcasts rank 0's weights and buffers
            seed_everything(cfg.seed + cfg.rank)  # dropout and sampling differ between ranks
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.train_loader, self.val_loader, self.extra = train_loader, val_loader, extra or {}
        self.optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.gate_params = [p for name, p in params if "exit_gate." in name]
        self.trunk_params = [p for name, p in params if "exit_gate." not in name]
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
        self.step = self.skipped = 0
        self.stop = StopSignals()  # SIGINT / SIGTERM: stop after the current step
        self.is_main = cfg.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.tensorboard = make_tensorboard_logger(cfg.tensorboard_dir) if cfg.tensorboard_dir and self.is_main else None
        self.last_eval: Optional[dict] = None

    def close(self) -> None:
        """Drop the DistributedDataParallel wrapper. Its reducer holds the process group: released here,
        the group's last owner is the process-group registry, and ``destroy_process_group`` frees it at a
        known point (with the GIL released) rather than whenever the trainer happens to be collected."""
        self.ddp = self.forward = self.model

    def state_dict(self) -> dict:
        """Everything an exact resume needs; under DDP every rank calls it (it gathers each rank's RNG state)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "skipped": self.skipped,
                 "loader": self.train_loader.state_dict(), "rng": rng_state(),
                 "model_config": dataclasses.asdict(self.model.config), "train_config": dataclasses.asdict(self.cfg),
                 "extra": self.extra}
        if self.cfg.world_size > 1:
            state["rng_per_rank"] = [None] * self.cfg.world_size
            with collective("the gather of the ranks' RNG states for the checkpoint"):
                dist.all_gather_object(state["rng_per_rank"], state["rng"])
        return state

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (under DDP every rank calls it, rank 0 writes); refuses non-finite
        weights or buffers."""
        bad = [name for name, t in self.model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise FloatingPointError(f"no checkpoint written at step {self.step}: non-finite values in {', '.join(bad[:4])}")
        state = self.state_dict()
        return save_checkpoint(state, self.out_dir / "checkpoints", self.step, self.cfg.keep_last) if self.is_main else None

    def resume(self, path: Union[str, Path, bool] = True) -> bool:
        """Restore everything from a checkpoint (True: the newest in ``out_dir``); False if there is none.

        Under DDP every rank loads the same file; each takes back its own RNG state when the world size
        is unchanged (the loader position is the same on every rank).
        """
        file = find_checkpoint(self.out_dir if path is True else path)
        if file is None:
            if path is True:
                return False
            raise FileNotFoundError(f"no checkpoint found at {path}")
        state = load_checkpoint(file, map_location=self.device)
        missing = {"model", "optimizer", "scheduler", "step", "loader", "rng", "model_config"} - set(state)
        if missing:
            raise ValueError(f"{file} is not a training checkpoint (no {', '.join(sorted(missing))})")
        saved, mine = state["model_config"], dataclasses.asdict(self.model.config)
        diff = [f"{k}={saved[k]!r} there, {mine.get(k)!r} here" for k in sorted(saved) if saved[k] != mine.get(k)]
        if diff:
            raise ValueError(f"checkpoint {file} is from another model config: {'; '.join(diff)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        per_rank = state.get("rng_per_rank", [])
        set_rng_state(per_rank[self.cfg.rank] if len(per_rank) == self.cfg.world_size else state["rng"])
        if self.is_main and self.metrics_path.exists():  # drop records written after this checkpoint
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return True

    def log(self, record: dict) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.log(record["step"], record)

    def _batches(self) -> Iterator:
        while True:  # the loader advances (and reshuffles) its own epoch after each pass
            yield from self.train_loader

    def train_step(self, batches: Iterator) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches per rank; returns the step's metrics,
        averaged over micro-batches and ranks. A non-finite loss, gradient or buffer stops training
        or skips the update (``cfg.on_nonfinite``)."""
        cfg, model = self.cfg, self.model
        model.train()
        model.dense_warmup = self.step < getattr(model.config, "mesh_dense_warmup", 0)  # the mesh's dense warm-up
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        buffers = [b.clone() for b in model.buffers()]  # the anchor EMA runs in forward: put back if the step is skipped
        sums, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(self.device)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last or self.ddp is model else self.ddp.no_sync():  # one all-reduce per step
                with collective("the training step's anchor EMA and gradient all-reduces", with_compute=True):
                    with autocast(self.device, cfg.bf16):
                        out = self.forward(model_input(batch), compute_loss=True)
                    (out.loss / cfg.grad_accum).backward()
            sums = sums + torch.stack([out.loss, out.lm_loss, out.exit_rate, out.work_fraction]).detach().float()
            tokens += batch.num_nodes
        grad_norm, gate_norm = self.clip_gradients()
        means = all_reduce(sums / cfg.grad_accum, name="the all-reduce of the step's metrics") / cfg.world_size  # a NaN on any rank reaches every rank
        checks = [grad_norm.float(), gate_norm.float()] + [b.isfinite().all().float() for b in model.buffers() if b.is_floating_point()]
        loss, lm_loss, exit_rate, work, grad_norm, gate_norm, *buffers_finite = torch.cat([means, torch.stack(checks)]).tolist()
        if math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(gate_norm) and all(buffers_finite):
            self.optimizer.step()
        elif cfg.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradients at step {self.step + 1} (loss {loss}, grad norm {grad_norm}, buffers "
                f"{'finite' if all(buffers_finite) else 'non-finite'}): stopped before the update; the checkpoints in "
                f"{self.out_dir / 'checkpoints'} hold finite weights (lower the lr, or skip such steps: on_nonfinite='skip', "
                "--on-nonfinite skip)")
        else:
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"split": "train", "step": self.step, "loss": loss, "lm_loss": lm_loss, "lr": lr, "grad_norm": grad_norm, "gate_grad_norm": gate_norm,
                "exit_rate": exit_rate, "work_fraction": work, "skipped": self.skipped,
                "tokens": tokens * cfg.world_size, "tok_per_s": tokens * cfg.world_size / dt}

    def clip_gradients(self) -> Tuple[Tensor, Tensor]:
        """Clip to ``grad_clip``: the trunk and the exit gates each to their own norm (``clip_gates_apart``)
        or all together. Returns the trunk's and the gates' gradient norms before clipping."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        groups = [[p for p in params if p.grad is not None] for params in (self.trunk_params, self.gate_params)]
        norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) if g else torch.zeros((), device=self.device) for g in groups]
        if self.cfg.clip_gates_apart:
            for g, norm in zip(groups, norms):
                torch.nn.utils.clip_grads_with_norm_(g, max_norm, norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(groups[0] + groups[1], max_norm, torch.hypot(*norms))
        return norms[0], norms[1]

    def evaluate(self) -> dict:
        result = evaluate(self.model, self.val_loader, self.device, self.cfg.bf16, self.cfg.eval_batches, self.cfg.world_size > 1)
        self.last_eval = result
        self.log({"split": "val", "step": self.step, **result})
        return result

    def _stop_signal(self) -> int:
        """The signal that asks to stop (0: none); under DDP the ranks agree on it."""
        if self.cfg.world_size == 1:
            return self.stop.signum
        return int(all_reduce(torch.tensor([self.stop.signum], device=self.device), dist.ReduceOp.MAX,
                              name="the all-reduce that agrees on stopping"))

    def fit(self, stop_at: Optional[int] = None) -> Optional[dict]:
        """Train until ``cfg.steps`` (or ``stop_at``, checkpointing there); returns the last evaluation.

        SIGINT or SIGTERM ends the current step, checkpoints it and raises :class:`TrainingInterrupted`.
        """
        cfg = self.cfg
        stop_at = min(stop_at or cfg.steps, cfg.steps)
        batches = self._batches()
        eval_every = cfg.eval_every or cfg.steps
        ckpt_every = cfg.ckpt_every or eval_every
        with self.stop, tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                                           dynamic_ncols=True, desc="train") as bar:
            while self.step < stop_at:
                rec = self.train_step(batches)
                self.log(rec)
                postfix = {"loss": f"{rec['loss']:.3f}", "ppl": f"{math.exp(min(rec['lm_loss'], 50)):.1f}",
                           "exit": f"{rec['exit_rate']:.2f}", "tok/s": f"{rec['tok_per_s']:.0f}"}
                if self.val_loader is not None and (self.step % eval_every == 0 or self.step == cfg.steps):
                    self.evaluate()
                    if self.is_main:
                        plot_metrics(self.metrics_path)
                if self.last_eval is not None:  # exits act in eval mode: the val exit rate is the one to watch
                    postfix.update(val_ppl=f"{self.last_eval['ppl']:.1f}", val_exit=f"{self.last_eval['exit_rate']:.2f}")
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                signum = self._stop_signal()
                if signum or self.step % ckpt_every == 0 or self.step in (stop_at, cfg.steps):
                    path = self.save()
                if signum:
                    raise TrainingInterrupted(signum, self.step, path)
        if self.last_eval is None and self.val_loader is not None:
            self.evaluate()
        if self.is_main and self.metrics_path.exists():
            plot_metrics(self.metrics_path)
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()
        return self.last_eval
