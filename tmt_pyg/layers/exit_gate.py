"""Per-token exit gates and their training objectives."""
from typing import Optional

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
        self.lin = torch.nn.utils.skip_init(nn.Linear, channels, 1)  # leaves the global RNG alone
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Random weights from ``generator`` (default: one seeded from the global seed), never from
        the global RNG, so that adding gates to a model does not change how its trunk is initialised."""
        generator = generator or torch.Generator().manual_seed(torch.initial_seed() + 1)
        nn.init.normal_(self.lin.weight, std=0.02, generator=generator)
        nn.init.constant_(self.lin.bias, self.init_bias)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.lin(h)).squeeze(-1)


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` where ``mask`` (all of them if None); 0 when nothing is masked in."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1)


def decisiveness_loss(confidence: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The announcement's objective ``-mean|c - 0.5|``: pushes gates to 0 or 1, with no notion of
    whether exiting is right (it collapses to "always exit" when nothing opposes it).
    ``mask``: which confidences count (e.g. tokens whose gate ran)."""
    return -masked_mean((confidence - 0.5).abs(), mask)


def consistency_loss(confidence: Tensor, early_prediction: Tensor, final_prediction: Tensor,
                     mask: Optional[Tensor] = None) -> Tensor:
    """CALM-style objective: binary cross-entropy of ``c`` against the oracle "the state at this
    layer already yields the final prediction" (``early_prediction == final_prediction``)."""
    target = (early_prediction == final_prediction).float()
    bce = F.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), target, reduction="none")
    return masked_mean(bce, mask)
