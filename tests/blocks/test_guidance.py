"""Null condition, conditioning dropout and CFG combinations (parity checks 5, 7)."""

from __future__ import annotations

import math

import pytest
import torch

from torch import Tensor

from zoo.blocks.condition import Condition
from zoo.blocks.guidance import NullCondition, got_cfg, got_cfg_batch, text_cfg


def drop(null: NullCondition, context: Tensor, p: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DIM's dropout of ``context`` to the null table (Condition.drop_to with the table's first rows)."""
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    empty = Condition(null.null(context.shape[0], context.shape[1]), mask)
    dropped_condition, dropped = Condition(context, mask).drop_to(empty, p, generator)
    return dropped_condition.context, dropped


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
    kept, dropped = drop(null, context, 0.0)
    assert torch.equal(kept, context) and not dropped.any()
    replaced, dropped = drop(null, context, 1.0)
    assert dropped.all() and torch.equal(replaced, null.null(5).detach())


def test_drop_replaces_whole_samples_reproducibly() -> None:
    null = NullCondition(6, 4)
    context = torch.randn(400, 6, 4)
    out, dropped = drop(null, context, 0.3, generator=torch.Generator().manual_seed(0))
    assert dropped.dtype == torch.bool and dropped.shape == (400,)
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.06)
    assert torch.equal(out[dropped], null.table.expand(int(dropped.sum()), -1, -1).detach())
    assert torch.equal(out[~dropped], context[~dropped])
    again, dropped_again = drop(null, context, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, dropped_again) and torch.equal(out, again)


def test_drop_on_a_shorter_context_uses_the_first_rows() -> None:
    null = NullCondition(8, 4)
    out, _ = drop(null, torch.randn(2, 5, 4), 1.0)
    assert torch.equal(out[0], null.table[:5].detach())


def test_null_table_learns_only_from_dropped_samples() -> None:
    null = NullCondition(4, 3)
    context = torch.randn(2, 4, 3)
    out, dropped = drop(null, context, 1.0)
    out.sum().backward()
    torch.testing.assert_close(null.table.grad, torch.full((4, 3), 2.0))
    null.table.grad = None
    out, _ = drop(null, context, 0.0)
    (out.sum() + 0 * null.table.sum()).backward()
    assert torch.count_nonzero(null.table.grad) == 0


def test_drop_rejects_bad_arguments() -> None:
    null = NullCondition(6, 4)
    with pytest.raises(ValueError, match=r"drop probability must be in \[0, 1\]"):
        drop(null, torch.randn(2, 6, 4), 1.5)
    with pytest.raises(ValueError, match=r"length must be in \[1, 6\]"):
        drop(null, torch.randn(2, 7, 4), 0.1)
    with pytest.raises(ValueError, match="must match the context"):
        Condition(torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)).drop_to(
            Condition(torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool)), 0.1
        )
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


def got_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 4, 6, 5, generator=g),
        "context_gen": torch.randn(batch, 3, 8, generator=g),
        "context_null": torch.randn(1, 3, 8, generator=g),
        "reference": torch.randn(batch, 4, 6, 5, generator=g),
        "mask": torch.randn(batch, 4, 6, 5, generator=g),
        "pooled_gen": torch.randn(batch, 7, generator=g),
    }


def test_got_cfg_batch_matches_the_official_assembly() -> None:
    """Parity check 7: latents x4; context (gen, gen, null, null); reference (img, img, img, 0);
    mask (mask, 0, 0, 0); pooled shared by all branches; condition = [reference | mask] channels."""
    x = got_inputs()
    out = got_cfg_batch(**x)
    lat, gen, ref, mask, pooled = x["latents"], x["context_gen"], x["reference"], x["mask"], x["pooled_gen"]
    null = x["context_null"].expand(2, -1, -1)
    zero = torch.zeros_like(ref)
    torch.testing.assert_close(out.latents, torch.cat([lat, lat, lat, lat]), rtol=0, atol=0)
    torch.testing.assert_close(out.context, torch.cat([gen, gen, null, null]), rtol=0, atol=0)
    references = torch.cat([ref, ref, ref, zero])
    masks = torch.cat([mask, zero, zero, zero])
    torch.testing.assert_close(out.condition, torch.cat([references, masks], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(out.pooled, torch.cat([pooled] * 4), rtol=0, atol=0)
    # chunk(4) of the batch gives got_cfg's argument order; branch k of sample b sits at k * B + b.
    cond, text, image, uncond = out.condition.chunk(4)
    assert torch.equal(cond[1, 4:], mask[1]) and not text[:, 4:].any() and not uncond.any()
    assert torch.equal(image[0, :4], ref[0])


def test_got_cfg_batch_pooled_null_and_shared_conditions() -> None:
    x = got_inputs()
    pooled_null = torch.full((1, 7), -1.0)
    out = got_cfg_batch(**x, pooled_null=pooled_null)
    expected = torch.cat([x["pooled_gen"], x["pooled_gen"], pooled_null.expand(2, -1), pooled_null.expand(2, -1)])
    torch.testing.assert_close(out.pooled, expected, rtol=0, atol=0)
    shared = got_cfg_batch(**{**x, "reference": x["reference"][:1], "mask": x["mask"][:1]})
    assert torch.equal(shared.condition[1, :4], x["reference"][0])
    assert torch.equal(shared.condition[1, 4:], x["mask"][0])


def test_got_cfg_batch_without_latents_builds_the_same_conditions_once() -> None:
    x = got_inputs()
    full, conditions = got_cfg_batch(**x), got_cfg_batch(**{**x, "latents": None})
    assert conditions.latents is None
    for field in ("context", "condition", "pooled"):
        torch.testing.assert_close(getattr(conditions, field), getattr(full, field), rtol=0, atol=0)
    shared = got_cfg_batch(**{**x, "latents": None, "reference": x["reference"][:1], "mask": x["mask"][:1]})
    assert shared.condition.shape[0] == 4 * x["latents"].shape[0], "the batch comes from the per-sample conditions"


def test_got_cfg_batch_then_got_cfg_on_a_linear_model() -> None:
    """With a denoiser linear in its inputs, the guided output is the formula applied per branch."""
    x = got_inputs(batch=1)
    weights = torch.randn(3, generator=torch.Generator().manual_seed(3))

    def model(latents: torch.Tensor, context: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        per_sample_context = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return weights[0] * latents + weights[1] * condition[:, :4] + weights[2] * condition[:, 4:] + per_sample_context

    out = got_cfg_batch(**x)
    guided = got_cfg(*model(out.latents, out.context, out.condition).chunk(4), 7.5, 4.0, 1.0)
    lat, ref, mask = x["latents"], x["reference"], x["mask"]
    eps = {
        "cond": model(lat, x["context_gen"], torch.cat([ref, mask], 1)),
        "text": model(lat, x["context_gen"], torch.cat([ref, 0 * mask], 1)),
        "image": model(lat, x["context_null"], torch.cat([ref, 0 * mask], 1)),
        "uncond": model(lat, x["context_null"], torch.cat([0 * ref, 0 * mask], 1)),
    }
    expected = got_cfg(eps["cond"], eps["text"], eps["image"], eps["uncond"], 7.5, 4.0, 1.0)
    torch.testing.assert_close(guided, expected)


def test_got_cfg_batch_rejects_mismatched_inputs() -> None:
    x = got_inputs()
    with pytest.raises(ValueError, match="context_gen must have 3 dims and batch 2 or 1"):
        got_cfg_batch(**{**x, "context_gen": torch.zeros(3, 3, 8)})
    with pytest.raises(ValueError, match="context_gen .* and context_null .* differ"):
        got_cfg_batch(**{**x, "context_null": torch.zeros(1, 4, 8)})
    with pytest.raises(ValueError, match="spatial size"):
        got_cfg_batch(**{**x, "mask": torch.zeros(2, 4, 3, 5)})
    with pytest.raises(ValueError, match="pooled_gen must have 2 dims"):
        got_cfg_batch(**{**x, "pooled_gen": torch.zeros(2, 1, 7)})
