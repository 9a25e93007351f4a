"""Token sequences <-> PyG ``Batch`` objects (one node per token, no padding)."""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch_geometric.data import Batch

TokenInput = Union[Tensor, Sequence[Tensor]]


def _bad_ids(ids: Tensor, vocab_size: Optional[int]) -> Tensor:
    """0-dim bool tensor: some id is negative or ``>= vocab_size`` (no host sync)."""
    bad = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    return bad.any()


def _id_error(ids: Tensor, vocab_size: Optional[int]) -> ValueError:
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        return ValueError(f"input_ids contains a negative id ({low})")
    return ValueError(f"input_ids contains id {high}, out of range for vocab_size={vocab_size}")


def check_ids(ids: Tensor, vocab_size: Optional[int] = None) -> None:
    """Token ids must be ``torch.long`` in ``[0, vocab_size)`` (one host sync)."""
    if ids.dtype != torch.long:
        raise TypeError(f"input_ids must be a torch.long tensor, got dtype {ids.dtype}")
    if ids.numel() and bool(_bad_ids(ids, vocab_size)):
        raise _id_error(ids, vocab_size)


def check_token_batch(data: Batch, vocab_size: int, max_seq_len: int, device: torch.device) -> Optional[int]:
    """Check that ``data`` is a token batch a model on ``device`` can trust, with one host sync when
    it is: ``input_ids``, ``pos``, ``batch`` (and ``ptr`` if present) are long vectors on ``device``,
    ids lie in ``[0, vocab_size)``, ``batch`` is sorted and numbers the graphs ``0..B-1`` without gaps,
    ``pos`` counts ``0, 1, ...`` inside each graph and stays below ``max_seq_len``, ``ptr`` matches ``batch``.
    Returns the common length of the sequences when they all have the same, else None."""
    for field in ("input_ids", "pos", "batch"):
        if getattr(data, field, None) is None:
            raise ValueError(f"the Batch has no node field '{field}' (build it with tmt_pyg.tokens_to_batch)")
    ids, pos, batch, ptr = data.input_ids, data.pos, data.batch, getattr(data, "ptr", None)
    for name, field in (("input_ids", ids), ("pos", pos), ("batch", batch)):
        if field.dtype != torch.long:
            raise TypeError(f"{name} must be a torch.long tensor, got dtype {field.dtype}")
        if field.dim() != 1 or field.shape != ids.shape:
            raise ValueError(f"{name} must be a node vector like input_ids, got shape {tuple(field.shape)}")
    for name, field in (("input_ids", ids), ("pos", pos), ("batch", batch), ("ptr", ptr)):
        if field is not None and field.device != device:
            raise ValueError(f"{name} is on {field.device} but the model is on {device}")
    N = ids.numel()
    if N == 0:
        raise ValueError("empty batch: no tokens")
    B = int(data.num_graphs)
    new_graph = torch.ones_like(batch, dtype=torch.bool)
    new_graph[1:] = batch[1:] != batch[:-1]
    step = batch[1:] - batch[:-1]
    prev_pos = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    bad_ptr = batch.new_zeros((), dtype=torch.bool)
    if ptr is not None:
        if ptr.numel() != B + 1:
            raise ValueError(f"ptr has {ptr.numel()} entries for {B} graphs (expected {B + 1})")
        starts = ptr[:-1].clamp(0, N - 1)
        bad_ptr = ((ptr[0] != 0) | (ptr[-1] != N) | ((ptr[:-1] < 0) | (ptr[:-1] >= N)).any()
                   | (batch[starts] != torch.arange(B, device=ptr.device)).any() | (pos[starts] != 0).any())
    flags = torch.stack([
        (batch[0] != 0) | (batch[-1] != B - 1) | ((step < 0) | (step > 1)).any(),
        (pos != torch.where(new_graph, 0, prev_pos + 1)).any(),
        bad_ptr,
        _bad_ids(ids, vocab_size),
        (pos >= max_seq_len).any(),
        (pos.view(B, -1)[:, -1] == N // B - 1).all() if N % B == 0 else batch.new_zeros((), dtype=torch.bool),
    ]).tolist()  # the one host sync
    if flags[0]:
        raise ValueError(f"batch vector must be sorted and number the {B} graphs 0..{B - 1} without gaps "
                         "(nodes of each graph contiguous, as in a PyG Batch)")
    if flags[1]:
        raise ValueError("pos must count 0, 1, 2, ... inside every sequence (position of each token in its own sequence)")
    if flags[2]:
        raise ValueError("ptr does not match the batch vector (ptr[b] must be the first node of graph b, ptr[-1] = N)")
    if flags[3]:
        raise _id_error(ids, vocab_size)
    if flags[4]:
        raise ValueError(f"sequence of length {int(pos.max()) + 1} exceeds max_seq_len={max_seq_len}")
    return N // B if flags[5] else None


def pack_tokens(sequences: TokenInput) -> Batch:
    """:func:`tokens_to_batch` without the id check (callers check ids themselves)."""
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
            if s.device != sequences[0].device:
                raise ValueError(f"sequence {i} is on {s.device} but sequence 0 on {sequences[0].device}")
        ids = torch.cat(sequences)
        lengths = torch.tensor([s.numel() for s in sequences], dtype=torch.long, device=ids.device)
    B = lengths.numel()
    ptr = torch.zeros(B + 1, dtype=torch.long, device=ids.device)
    ptr[1:] = lengths.cumsum(0)
    batch = torch.repeat_interleave(torch.arange(B, device=ids.device), lengths, output_size=ids.numel())
    pos = torch.arange(ids.numel(), device=ids.device) - ptr[batch]
    out = Batch(input_ids=ids, pos=pos, batch=batch, ptr=ptr)
    out._num_graphs = B
    return out


def tokens_to_batch(sequences: TokenInput, vocab_size: Optional[int] = None) -> Batch:
    """Pack token sequences into a ``Batch`` with node fields ``input_ids``, ``pos``, ``batch``, ``ptr``.

    Args:
        sequences: a ``(B, S)`` LongTensor, or a list of 1-D LongTensors of any (non-zero) lengths.
        vocab_size: if given, ids are checked to lie in ``[0, vocab_size)``.
    Returns:
        ``Batch`` with ``input_ids`` (N,), ``pos`` (N,) position inside its own sequence,
        ``batch`` (N,) and ``ptr`` (B+1,), where N is the total number of tokens.
    """
    out = pack_tokens(sequences)
    check_ids(out.input_ids, vocab_size)
    return out


def batch_to_padded(values: Tensor, batch: Tensor, ptr: Tensor, fill: float = 0.0) -> Tensor:
    """Scatter node-level ``values`` (N, ...) into a padded ``(B, S_max, ...)`` tensor."""
    lengths = ptr[1:] - ptr[:-1]
    B, S = lengths.numel(), int(lengths.max())
    out = values.new_full((B, S) + tuple(values.shape[1:]), fill)
    out[batch, torch.arange(values.size(0), device=values.device) - ptr[batch]] = values
    return out


def next_token_targets(ids: Tensor, batch: Tensor) -> Tensor:
    """What every row predicts: token ``i + 1`` of the same sequence, -100 (ignored) at each
    sequence's last row. ``ids``, ``batch``: (N,) -> (N,)."""
    has_next = torch.cat([batch[1:] == batch[:-1], batch.new_zeros(1, dtype=torch.bool)])
    return torch.where(has_next, ids.roll(-1), -100)
