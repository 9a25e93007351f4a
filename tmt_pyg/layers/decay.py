"""Learned per-head temporal decay applied multiplicatively to post-softmax attention weights."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter


def decay_factor(rate: Tensor, t_i: Tensor, t_j: Tensor, max_seq_len: int) -> Tensor:
    """``2 sigmoid(-rate * |t_i - t_j| / max_seq_len)`` per head, 1 where ``t_j < 0`` (timeless nodes).
    ``rate`` (H,), ``t_i``/``t_j`` (...) broadcastable positions -> (..., H)."""
    delta = (t_i - t_j).abs().to(rate.dtype).unsqueeze(-1) / max_seq_len
    gamma = 2 * torch.sigmoid(-rate * delta)
    return torch.where((t_j < 0).unsqueeze(-1), torch.ones_like(gamma), gamma)


class TemporalDecay(torch.nn.Module):
    r"""Per-head decay factor of an edge ``j -> i``:

    .. math::
        \gamma_{ij} = 2\,\sigma\!\left(-\mathrm{softplus}(\omega_h)\,\Delta_{ij}\right),\qquad
        \Delta_{ij} = |t_i - t_j| / \mathrm{max\_seq\_len}

    so ``gamma = 1`` at distance 0 and falls with distance at the learned rate ``softplus(omega_h)``
    (initialised to ``decay_rate``). Nodes with a negative time (memory anchors) are timeless:
    edges from them carry ``gamma = 1``.

    (The announcement writes ``sigmoid(w * Delta)``, which halves every weight at ``Delta = 0``;
    we use the form above, which leaves same-time edges untouched.)

    Shapes: ``t_i``, ``t_j`` (E,) -> (E, heads).
    """

    def __init__(self, heads: int, decay_rate: float = 2.0, max_seq_len: int = 1024):
        super().__init__()
        if decay_rate <= 0:
            raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
        self.heads, self.decay_rate, self.max_seq_len = heads, decay_rate, max_seq_len
        self.omega = Parameter(torch.empty(heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():  # softplus(omega) == decay_rate
            self.omega.fill_(math.log(math.expm1(self.decay_rate)))

    @property
    def decay_scalars(self) -> Tensor:
        """The learned decay rate of each head, ``softplus(omega)`` (heads,)."""
        return F.softplus(self.omega)

    def forward(self, t_i: Tensor, t_j: Tensor) -> Tensor:
        return decay_factor(self.decay_scalars, t_i, t_j, self.max_seq_len)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(heads={self.heads}, decay_rate={self.decay_rate}, max_seq_len={self.max_seq_len})"
