"""``tmt-pyg bench``: forward and training-step tokens/s of a model on random token ids."""
import time

import torch

from .data import tokens_to_batch
from .models import TMTModel
from .train import autocast


def throughput(model: TMTModel, device: torch.device, batch_size: int, seq_len: int, iters: int = 5,
               warmup_iters: int = 2, bf16: bool = False) -> str:
    """Time ``iters`` forwards (eval mode) and AdamW training steps, after ``warmup_iters`` untimed ones,
    on a (batch_size, seq_len) batch of random ids on ``device`` (where ``model`` is); the report names
    the device and the CPU threads."""
    batch = tokens_to_batch(torch.randint(model.config.vocab_size, (batch_size, seq_len), device=device))
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95))

    def timed(fn) -> float:  # tokens/s
        for _ in range(warmup_iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch_size * seq_len * iters / (time.perf_counter() - t0)

    @torch.no_grad()
    def forward():
        model.eval()
        with autocast(device, bf16):
            return model(batch)

    def train_step():
        model.train()
        with autocast(device, bf16):
            loss = model(batch, compute_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fwd, train = timed(forward), timed(train_step)
    out = forward()
    threads = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return (f"device {device} ({threads}) | {model.num_parameters():,} parameters | batch {batch_size} x {seq_len} "
            f"| bf16 {bf16}\nforward (eval): {fwd:,.0f} tok/s | train step (fwd+bwd+AdamW): {train:,.0f} tok/s | "
            f"eval work fraction {float(out.work_fraction):.3f}")
