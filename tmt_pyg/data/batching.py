"""Token sequences <-> PyG ``Batch`` objects (one node per token, no padding)."""
from typing import Sequence, Union

import torch
from torch import Tensor
from torch_geometric.data import Batch

TokenInput = Union[Tensor, Sequence[Tensor]]


def _check_ids(ids: Tensor, vocab_size: Union[int, None]) -> None:
    if ids.dtype != torch.long:
        raise TypeError(f"input_ids must be a torch.long tensor, got dtype {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"input_ids contains a negative id ({int(ids.min())})")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"input_ids contains id {int(ids.max())}, out of range for vocab_size={vocab_size}")


def tokens_to_batch(sequences: TokenInput, vocab_size: Union[int, None] = None) -> Batch:
    """Pack token sequences into a ``Batch`` with node fields ``input_ids``, ``pos``, ``batch``, ``ptr``.

    Args:
        sequences: a ``(B, S)`` LongTensor, or a list of 1-D LongTensors of any (non-zero) lengths.
        vocab_size: if given, ids are checked to lie in ``[0, vocab_size)``.
    Returns:
        ``Batch`` with ``input_ids`` (N,), ``pos`` (N,) position inside its own sequence,
        ``batch`` (N,) and ``ptr`` (B+1,), where N is the total number of tokens.
    """
    if isinstance(sequences, Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"expected a (B, S) tensor of token ids, got shape {tuple(sequences.shape)}")
        if sequences.numel() == 0:
            raise ValueError(f"empty batch: got shape {tuple(sequences.shape)}")
        B, S = sequences.shape
        ids = sequences.reshape(-1)
        lengths = torch.full((B,), S, dtype=torch.long, device=ids.device)
    else:
        sequences = list(sequences)
        if len(sequences) == 0:
            raise ValueError("empty batch: got an empty list of sequences")
        for i, s in enumerate(sequences):
            if not isinstance(s, Tensor) or s.dim() != 1:
                raise TypeError(f"sequence {i} must be a 1-D tensor of token ids")
            if s.numel() == 0:
                raise ValueError(f"sequence {i} is empty")
        ids = torch.cat(sequences)
        lengths = torch.tensor([s.numel() for s in sequences], dtype=torch.long, device=ids.device)
    _check_ids(ids, vocab_size)
    B = lengths.numel()
    ptr = torch.zeros(B + 1, dtype=torch.long, device=ids.device)
    ptr[1:] = lengths.cumsum(0)
    batch = torch.repeat_interleave(torch.arange(B, device=ids.device), lengths, output_size=ids.numel())
    pos = torch.arange(ids.numel(), device=ids.device) - ptr[batch]
    out = Batch(input_ids=ids, pos=pos, batch=batch, ptr=ptr)
    out._num_graphs = B
    return out


def batch_to_padded(values: Tensor, batch: Tensor, ptr: Tensor, fill: float = 0.0) -> Tensor:
    """Scatter node-level ``values`` (N, ...) into a padded ``(B, S_max, ...)`` tensor."""
    lengths = ptr[1:] - ptr[:-1]
    B, S = lengths.numel(), int(lengths.max())
    out = values.new_full((B, S) + tuple(values.shape[1:]), fill)
    out[batch, torch.arange(values.size(0), device=values.device) - ptr[batch]] = values
    return out
