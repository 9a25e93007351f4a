"""Feed-forward blocks: a plain GELU MLP and the dual-stream FFN that fuses two of them."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeedForward(nn.Module):
    """``channels -> hidden_channels -> channels`` with GELU. Shapes: (N, D) -> (N, D)."""

    def __init__(self, channels: int, hidden_channels: int, bias: bool = True):
        super().__init__()
        self.lin_in = nn.Linear(channels, hidden_channels, bias=bias)
        self.lin_out = nn.Linear(hidden_channels, channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin_out(F.gelu(self.lin_in(x)))


PackedStreams = Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]


def dual_stream(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor]) -> Tensor:
    """The dual-stream FFN over packed weights: one product for the gate and both streams' inputs,
    one batched product for both streams' outputs, one ``lerp`` for the gated sum.

    ``x`` (N, D); ``w_in`` (D + 2F, D) the gate's, syntax's and semantic's input rows, ``w_out``
    (2, F, D) the syntax and semantic output maps (transposed), biases to match. Returns (N, D)."""
    D, Fw = w_out.size(2), w_out.size(1)
    a = F.linear(x, w_in, b_in)  # (N, D + 2F)
    hidden = F.gelu(a[:, D:]).view(-1, 2, Fw).transpose(0, 1)  # (2, N, F)
    streams = torch.bmm(hidden, w_out) if b_out is None else torch.baddbmm(b_out.unsqueeze(1), hidden, w_out)
    return torch.lerp(streams[1], streams[0], torch.sigmoid(a[:, :D]))  # g * syntax + (1 - g) * semantic


class DualStreamFFN(nn.Module):
    r"""Two feed-forward streams fused by a learned per-channel sigmoid gate:
    :math:`g = \sigma(W_g x)`, ``out = g * syntax(x) + (1 - g) * semantic(x)``.

    Decoding packs the weights once (:meth:`packed`) and runs :func:`dual_stream`: three products
    instead of five (160 against 260 us per token at d=256 on the 2-core dev machine). Training keeps
    the five: the packed form's weight copies and strided backward made a step slower (170 against
    128 ms for 4096 rows at d=128).

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

    def packed(self) -> PackedStreams:
        """The weights as :func:`dual_stream` reads them: ``(w_in, b_in, w_out, b_out)``."""
        streams = (self.syntax, self.semantic)
        w_in = torch.cat([self.lin_gate.weight] + [s.lin_in.weight for s in streams])
        w_out = torch.stack([s.lin_out.weight.t() for s in streams])
        if self.lin_gate.bias is None:
            return w_in, None, w_out, None
        return (w_in, torch.cat([self.lin_gate.bias] + [s.lin_in.bias for s in streams]), w_out,
                torch.stack([s.lin_out.bias for s in streams]))

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.lin_gate(x))
        return gate * self.syntax(x) + (1 - gate) * self.semantic(x)
