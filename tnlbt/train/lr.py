"""Learning-rate schedules: linear warm-up, then constant, cosine or step decay.

The schedule is a pure function of the global step (and the number of steps per epoch), not a stateful
``torch.optim.lr_scheduler``: resuming from a checkpoint only needs the step counter, and a restarted Ray
worker
lands on exactly the same learning rate as an uninterrupted run.
"""

from __future__ import annotations

import math

import torch

from tnlbt.config import OptimConfig


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at global optimiser ``step`` (0-based).

    Warm-up ramps linearly from 1/warmup to 1 over ``cfg.warmup_steps``. After warm-up: ``constant`` keeps 1,
    ``cosine`` decays to ``cfg.min_lr_ratio`` over the remaining steps, ``step`` multiplies by
    ``cfg.step_gamma``
    every ``cfg.step_epochs`` epochs (H-T's StepLR, applied per epoch).
    """
    step = max(0, int(step))
    steps_per_epoch = max(1, int(steps_per_epoch))
    total_steps = max(1, int(total_steps))
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.step_gamma ** (epoch // cfg.step_epochs)
    # cosine from the end of warm-up to the last step
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every param group's lr to its ``base_lr`` (recorded at the first call) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
