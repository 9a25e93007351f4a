"""Exit-threshold calibration: the lowest tau (most exits) whose held-out loss stays within a tolerance."""
from typing import Dict, List, Optional

import torch

from .trainer import evaluate


def evaluate_at_threshold(model, loader, threshold: Optional[float], max_batches: int = 0) -> Dict:
    """:func:`evaluate` with the exits at ``threshold`` (None: exits off); the model's config is restored."""
    cfg = model.config
    saved = cfg.exit_threshold, cfg.use_exit
    cfg.use_exit = threshold is not None and saved[1]
    cfg.exit_threshold = saved[0] if threshold is None else threshold
    try:
        return evaluate(model, loader, next(model.parameters()).device, max_batches=max_batches)
    finally:
        cfg.exit_threshold, cfg.use_exit = saved


@torch.no_grad()
def gate_quantiles(model, loader, levels: int = 24, max_batches: int = 0) -> List[float]:
    """Candidate thresholds: quantiles of the gate confidences with exits off, highest first."""
    confidences, device = [], next(model.parameters()).device
    model.eval()
    saved, model.config.use_exit = model.config.use_exit, False
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            # exits off: every gate still runs and reports its confidence
            confidences.append(model(batch.to(device)).confidences.flatten().float())
    finally:
        model.config.use_exit = saved
    conf = torch.cat(confidences)
    q = torch.quantile(conf[torch.randperm(conf.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.linspace(0.02, 0.98, levels))
    return sorted({round(float(v), 6) for v in q}, reverse=True)


def calibrate_threshold(model, loader, tolerance: float = 0.02, max_batches: int = 0, levels: int = 24) -> Dict:
    """Pick the exit threshold tau on held-out data: the lowest candidate (the most exits) whose
    loss is at most ``(1 + tolerance)`` times the loss with exits off. Candidates are quantiles of
    the gates' confidences; the loss is taken to rise as tau falls, so a bisection evaluates about
    ``log2(levels)`` of them. Returns tau (None: no candidate keeps the loss, exits stay off in
    effect with tau = 1), the baseline, the chosen point and every evaluated point."""
    if not model.config.use_exit:
        raise ValueError("the model has no exit gates to calibrate (config.use_exit=False)")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    base = evaluate_at_threshold(model, loader, None, max_batches)
    limit = base["loss"] * (1 + tolerance)
    candidates = gate_quantiles(model, loader, levels, max_batches)
    points, lo, hi, best = {}, 0, len(candidates) - 1, None  # candidates[:lo] pass, candidates[hi + 1:] fail
    while lo <= hi:
        mid = (lo + hi) // 2
        tau = candidates[mid]
        points[tau] = evaluate_at_threshold(model, loader, tau, max_batches)
        if points[tau]["loss"] <= limit:
            best, lo = tau, mid + 1
        else:
            hi = mid - 1
    return {"threshold": best, "tolerance": tolerance, "exits_off": base, "loss_limit": limit,
            "chosen": points.get(best), "points": [{"threshold": t, **points[t]} for t in sorted(points)]}


def calibration_record(result: Dict, split: str) -> Dict:
    """What a checkpoint keeps of :func:`calibrate_threshold`'s ``result`` (``calibration``): tau (1.0 when no
    candidate kept the loss: no token exits), the tolerance, the evaluated points and the ``split`` used."""
    return {**result, "threshold": 1.0 if result["threshold"] is None else result["threshold"], "split": split}
