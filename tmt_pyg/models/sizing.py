"""Parameter counts and width sizing, so that compared configs have equal parameter counts."""
from dataclasses import replace

import torch

from .config import TMTConfig
from .tmt import TMTModel


def count_parameters(cfg: TMTConfig) -> int:
    """Number of trainable parameters of ``TMTModel(cfg)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return TMTModel(cfg).num_parameters()


def match_parameters(cfg: TMTConfig, target: int, tolerance: float = 0.02) -> TMTConfig:
    """Return ``cfg`` with its FFN width (``ffn_stream_dim`` for the dual stream, ``mlp_dim`` for
    the plain MLP) chosen so that its parameter count is as close as possible to ``target``.
    Raises ``ValueError`` if the best width still misses by more than ``tolerance``."""
    field = "ffn_stream_dim" if cfg.dual_stream else "mlp_dim"
    base = count_parameters(replace(cfg, **{field: 1}))
    per_unit = count_parameters(replace(cfg, **{field: 2})) - base  # the count is affine in the width
    width = max(1, round((target - base) / per_unit) + 1)
    out = replace(cfg, **{field: width})
    miss = abs(count_parameters(out) - target) / target
    if miss > tolerance:
        raise ValueError(f"cannot match {target:,} parameters within {tolerance:.0%} by {field} alone "
                         f"(best {count_parameters(out):,} at {field}={width})")
    return out
