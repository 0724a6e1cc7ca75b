"""Null condition, conditioning dropout and CFG combinations (parity checks 5, 7)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.blocks.guidance import NullCondition, got_cfg, text_cfg


def test_null_table_init_and_shape() -> None:
    torch.manual_seed(0)
    null = NullCondition(256, 64)
    assert null.table.shape == (256, 64) and null.table.requires_grad
    assert null.table.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert null.table.mean().abs().item() < 0.01


def test_null_expands_the_table_and_can_take_first_rows() -> None:
    null = NullCondition(10, 4)
    full = null.null(3)
    assert full.shape == (3, 10, 4) and all(torch.equal(full[b], null.table) for b in range(3))
    assert torch.equal(null.null(2, length=6)[1], null.table[:6])
    with pytest.raises(ValueError, match=r"length must be in \[1, 10\]"):
        null.null(2, length=11)


def test_drop_probability_zero_and_one() -> None:
    null = NullCondition(6, 4)
    context = torch.randn(5, 6, 4)
    kept, dropped = null.drop(context, 0.0)
    assert torch.equal(kept, context) and not dropped.any()
    replaced, dropped = null.drop(context, 1.0)
    assert dropped.all() and torch.equal(replaced, null.null(5).detach())


def test_drop_replaces_whole_samples_reproducibly() -> None:
    null = NullCondition(6, 4)
    context = torch.randn(400, 6, 4)
    out, dropped = null.drop(context, 0.3, generator=torch.Generator().manual_seed(0))
    assert dropped.dtype == torch.bool and dropped.shape == (400,)
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.06)
    assert torch.equal(out[dropped], null.table.expand(int(dropped.sum()), -1, -1).detach())
    assert torch.equal(out[~dropped], context[~dropped])
    again, dropped_again = null.drop(context, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, dropped_again) and torch.equal(out, again)


def test_drop_on_a_shorter_context_uses_the_first_rows() -> None:
    null = NullCondition(8, 4)
    out, _ = null.drop(torch.randn(2, 5, 4), 1.0)
    assert torch.equal(out[0], null.table[:5].detach())


def test_null_table_learns_only_from_dropped_samples() -> None:
    null = NullCondition(4, 3)
    context = torch.randn(2, 4, 3)
    out, dropped = null.drop(context, 1.0)
    out.sum().backward()
    torch.testing.assert_close(null.table.grad, torch.full((4, 3), 2.0))
    null.table.grad = None
    out, _ = null.drop(context, 0.0)
    (out.sum() + 0 * null.table.sum()).backward()
    assert torch.count_nonzero(null.table.grad) == 0


def test_drop_rejects_bad_arguments() -> None:
    null = NullCondition(6, 4)
    with pytest.raises(ValueError, match=r"drop probability must be in \[0, 1\]"):
        null.drop(torch.randn(2, 6, 4), 1.5)
    with pytest.raises(ValueError, match=r"context must be \[B, L <= 6, 4\]"):
        null.drop(torch.randn(2, 7, 4), 0.1)
    with pytest.raises(ValueError, match="length and dim must be positive"):
        NullCondition(0, 4)


def test_text_cfg_formula() -> None:
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(text_cfg(u, c, 7.5), u + 7.5 * (c - u))
    torch.testing.assert_close(text_cfg(u, c, 1.0), c)
    torch.testing.assert_close(text_cfg(u, c, 0.0), u)
    torch.testing.assert_close(text_cfg(u, c, 4.5), -3.5 * u + 4.5 * c)


def test_got_cfg_formula() -> None:
    g = torch.Generator().manual_seed(0)
    cond, text, image, uncond = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    expected = uncond + 7.5 * (text - image) + 4.0 * (cond - text) + 1.0 * (image - uncond)
    torch.testing.assert_close(got_cfg(cond, text, image, uncond, 7.5, 4.0, 1.0), expected)
    # Expanded coefficients: 4 cond + 3.5 text - 6.5 image + 0 uncond.
    torch.testing.assert_close(got_cfg(cond, text, image, uncond, 7.5, 4.0, 1.0), 4 * cond + 3.5 * text - 6.5 * image)
    # With every scale 1 the guided prediction is the fully conditioned branch.
    torch.testing.assert_close(got_cfg(cond, text, image, uncond, 1.0, 1.0, 1.0), cond)
