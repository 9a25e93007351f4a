"""Training loop: AdamW, warmup + cosine LR, grad accumulation, bf16 autocast, eval, exact resume."""
import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .plots import plot_metrics, read_metrics


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
    eval_every: int = 200      # steps between evaluations (0: only at the end)
    eval_batches: int = 0      # validation batches per evaluation (0: the whole loader)
    ckpt_every: int = 0        # steps between checkpoints (0: at every evaluation)
    keep_last: int = 3         # checkpoints kept on disk
    out_dir: str = "runs/tmt"  # metrics.jsonl, metrics.png, checkpoints/
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    bf16: bool = False         # bfloat16 autocast (CPU and CUDA)
    progress: bool = True      # tqdm progress bar
    rank: int = 0              # process rank; only rank 0 logs and writes checkpoints
    world_size: int = 1


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
def evaluate(model, loader, device: Union[str, torch.device] = "cpu", bf16: bool = False, max_batches: int = 0) -> dict:
    """Token-weighted mean next-token loss and PPL over ``loader``, plus exit rate and work fraction.

    When batches carry a boolean node field ``answer_mask``, ``recall_acc`` is the fraction of
    answer tokens that the previous row's argmax predicts; otherwise it is None.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)  # same batches at every evaluation
    loss_sum, n_targets, hits, n_answers, exit_sum, work_sum, n_batches = 0.0, 0, 0, 0, 0.0, 0.0, 0
    for batch in loader:
        if max_batches and n_batches >= max_batches:
            break
        batch = batch.to(device)
        with autocast(device, bf16):
            out = model(batch, compute_loss=True)
        same = batch.batch[1:] == batch.batch[:-1]  # row i predicts row i + 1
        n = int(same.sum())
        loss_sum += float(out.lm_loss) * n
        n_targets += n
        if "answer_mask" in batch:
            answer = batch.answer_mask[1:].bool() & same
            correct = out.logits[:-1].argmax(-1) == batch.input_ids[1:]
            hits += int((correct & answer).sum())
            n_answers += int(answer.sum())
        exit_sum += float(out.exit_rate)
        work_sum += float(out.work_fraction)
        n_batches += 1
    model.train(was_training)
    if n_targets == 0:
        raise ValueError("evaluation loader produced no next-token targets (empty or too-short sequences)")
    loss = loss_sum / n_targets
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "recall_acc": hits / n_answers if n_answers else None,
            "exit_rate": exit_sum / n_batches, "work_fraction": work_sum / n_batches, "targets": n_targets}


class Trainer:
    """Trains a TMT-style model (``model(batch).loss``, ``model.configure_optimizers``, ``model.config``).

    ``train_loader`` must offer ``state_dict``/``load_state_dict`` (exact mid-epoch resume); ``extra``
    is stored in every checkpoint (e.g. the data and tokenizer spec). Only rank 0 writes
    ``out_dir/metrics.jsonl``, ``out_dir/metrics.png`` and ``out_dir/checkpoints/``.
    """

    def __init__(self, model, train_loader, val_loader=None, cfg: Optional[TrainConfig] = None, extra: Optional[dict] = None):
        self.cfg = cfg = cfg or TrainConfig()
        assert cfg.lr > 0 and cfg.grad_accum >= 1 and cfg.steps >= 1, f"bad TrainConfig: {cfg}"
        if len(train_loader) == 0:
            raise ValueError("train loader is empty: the corpus is shorter than one batch (lower --batch-size or --seq-len)")
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.train_loader, self.val_loader, self.extra = train_loader, val_loader, extra or {}
        self.optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
        self.step = 0
        self.is_main = cfg.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.last_eval: Optional[dict] = None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "loader": self.train_loader.state_dict(), "rng": rng_state(),
                "model_config": dataclasses.asdict(self.model.config), "train_config": dataclasses.asdict(self.cfg),
                "extra": self.extra}

    def save(self) -> Optional[Path]:
        if not self.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.out_dir / "checkpoints", self.step, self.cfg.keep_last)

    def resume(self, path: Union[str, Path, bool] = True) -> bool:
        """Restore everything from a checkpoint (True: the newest in ``out_dir``); False if there is none."""
        file = find_checkpoint(self.out_dir if path is True else path)
        if file is None:
            if path is True:
                return False
            raise FileNotFoundError(f"no checkpoint found at {path}")
        state = load_checkpoint(file, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step = state["step"]
        set_rng_state(state["rng"])
        if self.is_main and self.metrics_path.exists():  # drop records written after this checkpoint
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return True

    def log(self, record: dict) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _batches(self) -> Iterator:
        while True:  # the loader advances (and reshuffles) its own epoch after each pass
            yield from self.train_loader

    def train_step(self, batches: Iterator) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean metrics."""
        cfg, model = self.cfg, self.model
        model.train()
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        sums, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = next(batches).to(self.device)
            with autocast(self.device, cfg.bf16):
                out = model(batch, compute_loss=True)
            (out.loss / cfg.grad_accum).backward()
            sums = sums + torch.stack([out.loss, out.lm_loss, out.exit_rate, out.work_fraction]).detach().float()
            tokens += batch.num_nodes
        loss, lm_loss, exit_rate, work = (sums / cfg.grad_accum).tolist()  # one device sync per step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"split": "train", "step": self.step, "loss": loss, "lm_loss": lm_loss, "lr": lr,
                "grad_norm": float(grad_norm), "exit_rate": exit_rate, "work_fraction": work,
                "tokens": tokens * cfg.world_size, "tok_per_s": tokens * cfg.world_size / dt}

    def evaluate(self) -> dict:
        result = evaluate(self.model, self.val_loader, self.device, self.cfg.bf16, self.cfg.eval_batches)
        self.last_eval = result
        self.log({"split": "val", "step": self.step, **result})
        return result

    def fit(self, stop_at: Optional[int] = None) -> Optional[dict]:
        """Train until ``cfg.steps`` (or ``stop_at``, checkpointing there); returns the last evaluation."""
        cfg = self.cfg
        stop_at = min(stop_at or cfg.steps, cfg.steps)
        batches = self._batches()
        eval_every = cfg.eval_every or cfg.steps
        ckpt_every = cfg.ckpt_every or eval_every
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True, desc="train")
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
            if self.step % ckpt_every == 0 or self.step in (stop_at, cfg.steps):
                self.save()
        bar.close()
        if self.last_eval is None and self.val_loader is not None:
            self.evaluate()
        if self.is_main and self.metrics_path.exists():
            plot_metrics(self.metrics_path)
        return self.last_eval
