"""Feed-forward blocks: a plain GELU MLP and the dual-stream FFN that fuses two of them."""
import torch
from torch import Tensor, nn


class FeedForward(nn.Module):
    """``channels -> hidden_channels -> channels`` with GELU. Shapes: (N, D) -> (N, D)."""

    def __init__(self, channels: int, hidden_channels: int, bias: bool = True):
        super().__init__()
        self.lin_in = nn.Linear(channels, hidden_channels, bias=bias)
        self.lin_out = nn.Linear(hidden_channels, channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin_out(torch.nn.functional.gelu(self.lin_in(x)))


class DualStreamFFN(nn.Module):
    r"""Two feed-forward streams fused by a learned per-channel sigmoid gate:
    :math:`g = \sigma(W_g x)`, ``out = g * syntax(x) + (1 - g) * semantic(x)``.

    Args:
        channels (int): model width D.
        stream_channels (int): hidden width of each stream (``ffn_stream_dim``).
    Shapes: (N, D) -> (N, D).
    """

    def __init__(self, channels: int, stream_channels: int, bias: bool = True):
        super().__init__()
        self.lin_gate = nn.Linear(channels, channels, bias=bias)
        self.syntax = FeedForward(channels, stream_channels, bias)
        self.semantic = FeedForward(channels, stream_channels, bias)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.lin_gate(x))
        return gate * self.syntax(x) + (1 - gate) * self.semantic(x)
