"""EditingModule's schedule and warm-start widening, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.modules.base import Optimization, _widen_into, lr_factor


def test_warmup_is_linear_then_constant() -> None:
    optim = Optimization(warmup_steps=4, schedule="constant")
    assert [lr_factor(s, optim, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_floor_at_max_steps() -> None:
    optim = Optimization(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, optim, 110) == pytest.approx(1.0)
    midway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(60, optim, 110) == pytest.approx(midway)
    assert lr_factor(110, optim, 110) == pytest.approx(0.1)
    assert lr_factor(500, optim, 110) == pytest.approx(0.1)


def test_widen_into_copies_leading_channels_and_keeps_new_ones() -> None:
    target = torch.full((8, 6, 1, 1), 7.0)
    value = torch.randn(8, 3, 1, 1)
    out = _widen_into(target.clone(), value, "patch_embed.proj.weight")
    assert torch.equal(out[:, :3], value)
    assert torch.equal(out[:, 3:], torch.full((8, 3, 1, 1), 7.0))


def test_widen_into_rejects_other_mismatches() -> None:
    with pytest.raises(ValueError, match="shape"):
        _widen_into(torch.zeros(8, 6), torch.zeros(4, 3), "w")
