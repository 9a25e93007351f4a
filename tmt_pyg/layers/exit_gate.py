"""Per-token exit gates and their training objectives."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExitGate(nn.Module):
    r"""Confidence :math:`c_i = \sigma(\mathbf{w}^\top \mathbf{h}_i + b)` that token ``i`` is done.

    The caller keeps the exit mask monotone: ``exited |= confidence > threshold``.
    The bias starts negative so that gates open only once they have learned to.
    Shapes: (N, D) -> (N,).
    """

    def __init__(self, channels: int, init_bias: float = -2.0):
        super().__init__()
        self.init_bias = init_bias
        self.lin = nn.Linear(channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.lin.weight, std=0.02)
        nn.init.constant_(self.lin.bias, self.init_bias)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.lin(h)).squeeze(-1)


def decisiveness_loss(confidence: Tensor) -> Tensor:
    """The announcement's objective ``-mean|c - 0.5|``: pushes gates to 0 or 1, with no notion of
    whether exiting is right (it collapses to "always exit" when nothing opposes it)."""
    return -(confidence - 0.5).abs().mean()


def consistency_loss(confidence: Tensor, early_prediction: Tensor, final_prediction: Tensor) -> Tensor:
    """CALM-style objective: binary cross-entropy of ``c`` against the oracle "the state at this
    layer already yields the final prediction" (``early_prediction == final_prediction``)."""
    target = (early_prediction == final_prediction).to(confidence.dtype)
    return F.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), target.float())
