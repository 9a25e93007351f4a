"""Token streams -> PyG batches: fixed windows (sharded, shuffled, resumable) or ragged sequences."""
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch_geometric.data import Batch

from .batching import tokens_to_batch


def check_stream(stream: Tensor) -> None:
    if not isinstance(stream, Tensor) or stream.dim() != 1 or stream.dtype != torch.long:
        raise TypeError("stream must be a 1-D torch.long tensor of token ids")
    if stream.numel() == 0:
        raise ValueError("empty stream: no tokens")


class SequenceLoader:
    """Iterate non-overlapping windows ``stream[i*seq_len:(i+1)*seq_len]`` as ``Batch`` objects.

    Rank ``r`` reads windows ``i % world_size == r``; the stream is cut to a whole number of windows per
    rank so that all ranks run the same number of steps. Each batch has node fields ``input_ids``, ``pos``,
    ``batch``, ``ptr`` and one field per ``node_fields`` entry (a (T, ...) tensor aligned with the stream),
    all of ``batch_size * seq_len`` rows. Iteration continues from the recorded ``(epoch, position)``;
    after a full pass the epoch advances and the next pass reshuffles (order seeded by ``seed + epoch``).
    """

    def __init__(self, stream: Tensor, seq_len: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 node_fields: Optional[dict[str, Tensor]] = None):
        check_stream(stream)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
        n = stream.numel() // seq_len // world_size * world_size  # windows used, equal count per rank
        if n == 0:
            raise ValueError(f"stream of {stream.numel()} tokens is too short for {world_size} window(s) of {seq_len}")
        node_fields = node_fields or {}
        for name, field in node_fields.items():
            if field.size(0) != stream.numel():
                raise ValueError(f"node field {name!r} has {field.size(0)} rows, the stream {stream.numel()} tokens")
        self.seq_len, self.batch_size, self.shuffle, self.seed, self.drop_last = seq_len, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size

        def shard(x: Tensor) -> Tensor:  # (T, ...) -> (n / world_size, seq_len, ...)
            return x[:n * seq_len].view(n, seq_len, *x.shape[1:])[rank::world_size]

        self.windows = shard(stream)
        self.node_fields = {name: shard(field) for name, field in node_fields.items()}
        self.epoch, self.position = 0, 0  # position = batches already yielded in this epoch

    def __len__(self) -> int:
        n, b = self.windows.size(0), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self) -> Tensor:
        """Window order for the current epoch."""
        if not self.shuffle:
            return torch.arange(self.windows.size(0))
        return torch.randperm(self.windows.size(0), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[Batch]:
        order, b = self.order(), self.batch_size
        while self.position < len(self):
            idx = order[self.position * b:(self.position + 1) * b]
            self.position += 1
            batch = tokens_to_batch(self.windows[idx])
            for name, field in self.node_fields.items():
                batch[name] = field[idx].flatten(0, 1)
            yield batch
        self.epoch, self.position = self.epoch + 1, 0


def variable_length_batches(stream: Tensor, eos_id: int, batch_size: int,
                            max_len: Optional[int] = None) -> Iterator[Batch]:
    """Yield ragged batches of ``batch_size`` consecutive sequences, each ending at an ``eos_id`` token
    (the tail of the stream ends wherever it ends); sequences longer than ``max_len`` are cut into pieces."""
    check_stream(stream)
    if batch_size < 1 or (max_len is not None and max_len < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive")
    ends = (stream == eos_id).nonzero().squeeze(1) + 1
    bounds = torch.cat([ends.new_zeros(1), ends, ends.new_full((1,), stream.numel())]).unique_consecutive()
    seqs = list(stream.split(bounds.diff().tolist()))
    if max_len is not None:
        seqs = [piece for s in seqs for piece in s.split(max_len)]
    for i in range(0, len(seqs), batch_size):
        yield tokens_to_batch(seqs[i:i + batch_size])
