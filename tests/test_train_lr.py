"""Learning-rate schedules: warm-up, cosine, step (H-T StepLR), constant; set_lr keeps per-group bases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tnlbt.config import OptimConfig
from tnlbt.train.lr import lr_factor, set_lr


def test_warmup_then_cosine_to_floor() -> None:
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(cfg, s, steps_per_epoch=10, total_steps=104) for s in range(104)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(f[4:]))  # monotone decay
    assert lr_factor(cfg, 104, 10, 104) == pytest.approx(0.1)
    mid = 4 + 50
    assert f[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_step_schedule_per_epoch() -> None:
    cfg = OptimConfig(schedule="step", step_epochs=3, step_gamma=0.1)
    assert lr_factor(cfg, 29, steps_per_epoch=10, total_steps=100) == pytest.approx(1.0)
    assert lr_factor(cfg, 30, steps_per_epoch=10, total_steps=100) == pytest.approx(0.1)
    assert lr_factor(cfg, 65, steps_per_epoch=10, total_steps=100) == pytest.approx(0.01)


def test_constant_and_set_lr() -> None:
    cfg = OptimConfig(schedule="constant")
    assert lr_factor(cfg, 1000, 10, 10) == 1.0
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 1e-4}])
    set_lr(opt, 0.5)
    set_lr(opt, 0.5)  # idempotent: always relative to the base lr, never compounding
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])
