"""Rotary position embedding (RoPE) on per-node multi-head vectors."""
import torch
from torch import Tensor


def apply_rotary(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x`` (N, H, C) by the positions ``pos`` (N,); rows with ``pos < 0`` (memory
    anchors, which have no position) are left as they are. ``C`` must be even."""
    half = x.size(-1) // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = pos.clamp(min=0).to(torch.float32).unsqueeze(-1) * inv_freq  # (N, C/2)
    cos, sin = angle.cos().unsqueeze(1).to(x.dtype), angle.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.where((pos < 0).view(-1, 1, 1), x, rotated)
