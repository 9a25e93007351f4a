"""Persistent memory anchors: virtual nodes appended to every graph, state kept by EMA."""
import torch
import torch.distributed as dist
from torch import Tensor, nn


class MemoryAnchors(nn.Module):
    r"""``num_anchors`` persistent vectors appended as virtual nodes to every graph of a batch.

    Edges go anchor -> token for every token (tokens read the memory); with ``causal=False`` also
    token -> anchor (anchors read their graph, like PyG's ``VirtualNode``); in causal mode anchors
    are read-only so nothing leaks from later tokens. Every anchor also has its self edge. In the
    attention softmax the M anchors a token reads together carry the prior weight of one neighbour
    (their logits lowered by ``log M`` in :class:`MeshAttentionConv`), so that the memory is one
    more voice, not half of every read.

    The state ``anchor_state`` (M, D) is a buffer (in ``state_dict``), not a parameter: in training
    mode :meth:`update` moves each anchor by EMA towards the attention-weighted mean of the token
    states that attend to *it* (``state <- momentum * state + (1 - momentum) * target``), averaged
    across ranks under ``torch.distributed``; in eval mode it never changes.
    """

    def __init__(self, num_anchors: int, channels: int, momentum: float = 0.99, init_std: float = 1.0):
        super().__init__()
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
        self.num_anchors, self.channels, self.momentum, self.init_std = num_anchors, channels, momentum, init_std
        self.register_buffer("anchor_state", torch.empty(num_anchors, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.anchor_state, std=self.init_std)

    def expand(self, num_graphs: int) -> Tensor:
        """States of the virtual nodes of ``num_graphs`` graphs, graph-major: (B * M, D)."""
        return self.anchor_state.repeat(num_graphs, 1)

    def edges(self, token_index: Tensor, token_batch: Tensor, anchor_offset: int, causal: bool) -> Tensor:
        """Edges between the given tokens and the anchors of their graphs.

        ``token_index`` (T,) node ids of the tokens, ``token_batch`` (T,) their graphs; anchor ``m``
        of graph ``b`` is node ``anchor_offset + b * M + m``. Returns (2, T * M) anchor -> token
        edges, followed by token -> anchor edges when not causal.
        """
        M = self.num_anchors
        slot = torch.arange(M, device=token_index.device)
        anchor = (anchor_offset + token_batch.unsqueeze(1) * M + slot).view(-1)
        token = token_index.repeat_interleave(M)
        edge_index = torch.stack([anchor, token])
        return edge_index if causal else torch.cat([edge_index, edge_index.flip(0)], dim=1)

    @torch.no_grad()
    def update(self, token_state: Tensor, weight: Tensor) -> Tensor:
        """One EMA step from token -> anchor read weights.

        Args:
            token_state: (N, D) states of the tokens that read the anchors.
            weight: (N, M) how much token ``n`` attends to anchor ``m`` (e.g. softmax over anchors).
        Returns: the per-anchor target (M, D) (zeros where no token attended).
        """
        num = weight.t() @ token_state  # (M, D): one GEMM, no (N * M, D) gather
        den = weight.sum(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            dist.all_reduce(den)
        seen = den > 0
        target = torch.where(seen.unsqueeze(-1), num / den.clamp(min=1e-12).unsqueeze(-1), torch.zeros_like(num))
        blended = self.momentum * self.anchor_state + (1 - self.momentum) * target.to(self.anchor_state.dtype)
        self.anchor_state.copy_(torch.where(seen.unsqueeze(-1), blended, self.anchor_state))
        return target

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.num_anchors}, {self.channels}, momentum={self.momentum})"
