"""torchrun support: the process group from the environment, rank-0-first sections, cross-rank sums."""
import contextlib
import inspect
import os
from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Tuple[int, int, torch.device]]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)
    for the block and leave it afterwards; yields ``(rank, world_size, device)``. A block that ends
    normally ends with a barrier (one that raises does not: the exception may be this rank's alone).

    gloo on CPU, nccl on CUDA with each rank on ``cuda:LOCAL_RANK``. Outside torchrun (or with one
    process) yields ``(0, 1, device)`` and starts nothing.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        yield 0, 1, device
        return
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)  # barriers know the GPU
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        # Every rank is done. The wait also lets gloo's worker threads release the last collective's tensors,
        # which needs the GIL: destroying the group straight after a collective can deadlock (torch 2.13).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block (downloads, tokenizer training, caches) before the other ranks do."""
    rank = dist.get_rank() if dist.is_initialized() else -1
    if rank > 0:
        dist.barrier()
    try:
        yield
    finally:
        if rank == 0:
            dist.barrier()


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced in place over all ranks; unchanged outside a process group."""
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


def wrap_ddp(model: torch.nn.Module) -> DistributedDataParallel:
    """``model`` (already on this rank's device) in DistributedDataParallel, with the two choices TMT needs.

    Buffers are not re-broadcast from rank 0 before each forward: the only one that changes, the
    anchor EMA state, is all-reduced inside the forward, so the ranks already agree. Unused parameters
    are searched for only when some can miss a gradient: exit gates without a gate loss, or tokens
    frozen in training (a layer whose sampled tokens have all exited gives its gate no loss).
    """
    cfg = model.config
    unused = cfg.use_exit and (cfg.gate_loss == "none" or cfg.exit_in_training)
    no_broadcast = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")  # renamed in torch 2.13
    return DistributedDataParallel(model, find_unused_parameters=unused, **{no_broadcast: False})
