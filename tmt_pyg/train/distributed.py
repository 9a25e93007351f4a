"""torchrun support: the process group from the environment, named collectives that fail instead of
hanging, rank-0-first sections, cross-rank sums."""
import contextlib
import datetime
import inspect
import os
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_S = 600.0  # how long a rank waits for its peers in one collective (tmt-pyg train --dist-timeout)


class CollectiveError(RuntimeError):
    """A collective that did not complete: a peer rank crashed, was killed, or did not join in time."""


class _Waiting:
    """The collective this process's main thread is blocked in (read by the signal watcher)."""
    name: Optional[str] = None
    count = 0  # collectives entered so far: tells one wait from the next


waiting = _Waiting()


BACKEND_FAILURES = ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe")


@contextlib.contextmanager
def collective(name: str, with_compute: bool = False) -> Iterator[None]:
    """Marks the block as a blocking wait on the other ranks, called ``name`` in messages: an error of
    the backend inside it (a timeout, a peer's closed connection) becomes a :class:`CollectiveError`
    naming the collective and this rank. ``with_compute``: the block also computes (a DDP forward and
    backward), so only errors that read as the backend's are converted and the block does not count
    as a wait for the signal watcher. Outside a process group it only runs the block."""
    if not dist.is_initialized():
        yield
        return
    if not with_compute:
        waiting.name, waiting.count = name, waiting.count + 1
    try:
        yield
    except RuntimeError as e:
        if with_compute and not any(marker in str(e) for marker in BACKEND_FAILURES):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(f"rank {rank} of {world}: {name} did not complete: another rank crashed, was killed or did "
                              f"not join within the timeout (--dist-timeout; backend: {reason})") from e
    finally:
        if not with_compute:
            waiting.name = None


@contextlib.contextmanager
def distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Tuple[int, int, torch.device]]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)
    for the block and leave it afterwards; yields ``(rank, world_size, device)``. A block that ends
    normally ends with a barrier (one that raises does not: the exception may be this rank's alone).
    Every collective fails after ``timeout_s`` seconds without its peers instead of waiting forever.

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
    with collective("joining the process group"):
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)  # barriers know the GPU
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        # Every rank is done. The wait also lets gloo's worker threads release the last collective's tensors,
        # which needs the GIL: destroying the group straight after a collective can deadlock (torch 2.13).
        barrier("the final barrier")
    finally:
        dist.destroy_process_group()


def barrier(name: str) -> None:
    with collective(name):
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block (downloads, tokenizer training, caches) before the other ranks do."""
    rank = dist.get_rank() if dist.is_initialized() else -1
    if rank > 0:
        barrier("the barrier after rank 0's data preparation")
    try:
        yield
    finally:
        if rank == 0:
            barrier("the barrier after rank 0's data preparation")


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM, name: str = "an all-reduce") -> Tensor:
    """``t`` reduced in place over all ranks; unchanged outside a process group."""
    if dist.is_initialized():
        with collective(name):
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
