"""SanaDenoiser over a tiny real SanaTransformer2DModel, and input-conv widening (parity checks 4, 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from zoo.blocks.denoisers import SanaDenoiser, widen_input_conv, widen_model_input
from zoo.blocks.pretrained import load_diffusers_model
from zoo.blocks.pretrained import MissingPretrainedError

# Tiny SANA: 4 latent channels, inner width 16 (= cross_attention_dim), one block, qk-norm as SANA-1.5.
TINY_SANA = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 1,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 8,
    "cross_attention_dim": 16,
    "caption_channels": 16,
    "sample_size": 8,
    "patch_size": 1,
    "qk_norm": "rms_norm_across_heads",
}


def make_inputs(batch: int = 2, length: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, 3:] = False
    return {
        "latents": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([700.0, 250.0][:batch]),
        "context": torch.randn(batch, length, 16, generator=g),
        "context_mask": mask,
        "condition": torch.randn(batch, 4, 8, 8, generator=g),
    }


def make_denoiser(seed: int = 0, **kwargs: object) -> SanaDenoiser:
    torch.manual_seed(seed)
    return SanaDenoiser(config=TINY_SANA, **kwargs).eval()  # type: ignore[arg-type]


# --- widen_input_conv -------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("copy_bias", [True, False])
def test_widening_keeps_old_weights_and_honours_flags(zero_init: bool, copy_bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 8, kernel_size=1)
    wide = widen_input_conv(conv, 32, zero_init=zero_init, copy_bias=copy_bias)
    assert (wide.in_channels, wide.out_channels, wide.kernel_size) == (64, 8, (1, 1))
    torch.testing.assert_close(wide.weight[:, :32], conv.weight, rtol=0, atol=0)
    new = wide.weight[:, 32:]
    if zero_init:
        assert torch.count_nonzero(new) == 0
    else:
        # Default PyTorch init of the 64-input conv: kaiming-uniform bound 1/sqrt(fan_in).
        assert new.abs().max() <= 1 / 64**0.5 and new.std() > 0.25 / 64**0.5
    assert torch.equal(wide.bias, conv.bias) is copy_bias


def test_widened_conv_on_zero_condition_equals_old_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=2, stride=2, padding=1)
    wide = widen_input_conv(conv, 3, zero_init=False)
    assert (wide.stride, wide.padding) == (conv.stride, conv.padding)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(wide(torch.cat([x, torch.zeros(2, 3, 8, 8)], 1)), conv(x))


def test_zero_initialised_widening_ignores_the_condition() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1)
    wide = widen_input_conv(conv, 4, zero_init=True)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(wide(torch.cat([x, torch.randn(2, 4, 8, 8)], 1)), conv(x))


def test_widening_rejects_non_positive_extra_channels() -> None:
    with pytest.raises(ValueError, match="extra_channels must be positive"):
        widen_input_conv(nn.Conv2d(4, 4, 1), 0, zero_init=True)


def test_widen_model_input_registers_config_and_is_idempotent() -> None:
    model = SanaTransformer2DModel(**TINY_SANA)
    widen_model_input(model, "patch_embed.proj", 4, zero_init=True, copy_bias=False)
    proj = model.patch_embed.proj
    assert proj.in_channels == 8 and (model.config.in_channels, model.config.out_channels) == (8, 4)
    widen_model_input(model, "patch_embed.proj", 4, zero_init=True)
    assert model.patch_embed.proj is proj
    with pytest.raises(ValueError, match="set condition_channels=4"):
        widen_model_input(model, "patch_embed.proj", 2, zero_init=True)


# --- SanaDenoiser -----------------------------------------------------------------------------


def test_plain_denoiser_shapes_and_properties() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    out = denoiser(x["latents"], x["timestep"], x["context"], x["context_mask"])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert (denoiser.in_channels, denoiser.context_dim) == (4, 16)
    assert denoiser.model.patch_embed.proj.in_channels == 4


def test_output_matches_the_diffusers_call() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    direct = denoiser.model(
        x["latents"],
        encoder_hidden_states=x["context"],
        timestep=x["timestep"],
        encoder_attention_mask=x["context_mask"].float(),
    ).sample
    torch.testing.assert_close(denoiser(x["latents"], x["timestep"], x["context"], x["context_mask"]), direct)


def test_widened_denoiser_uses_the_condition() -> None:
    denoiser = make_denoiser(condition_channels=4)
    x = make_inputs()
    assert denoiser.model.config.in_channels == 8 and denoiser.model.patch_embed.proj.in_channels == 8
    out = denoiser(**x)
    assert out.shape == (2, 4, 8, 8)
    other = denoiser(**{**x, "condition": x["condition"] + 1})
    assert (out - other).abs().max() > 1e-3


def test_zero_initialised_condition_reproduces_the_plain_model() -> None:
    plain = make_denoiser(seed=3)
    widened = make_denoiser(seed=3, condition_channels=4, zero_init_condition=True)
    x = make_inputs()
    expected = plain(x["latents"], x["timestep"], x["context"], x["context_mask"])
    torch.testing.assert_close(widened(**x), expected)
    torch.testing.assert_close(widened(**{**x, "condition": 5 * x["condition"]}), expected)


def test_masked_context_tokens_are_ignored_and_real_ones_are_not() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    out = denoiser(x["latents"], x["timestep"], x["context"], x["context_mask"])
    padded = x["context"].clone()
    padded[1, 3:] += 10.0  # sample 1's padding
    torch.testing.assert_close(denoiser(x["latents"], x["timestep"], padded, x["context_mask"]), out)
    real = x["context"].clone()
    real[1, 0] += 1.0
    changed = denoiser(x["latents"], x["timestep"], real, x["context_mask"])
    assert (changed[1] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(changed[0], out[0])


def test_scalar_timestep_is_broadcast() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    per_sample = denoiser(x["latents"], torch.tensor([400.0, 400.0]), x["context"], x["context_mask"])
    torch.testing.assert_close(denoiser(x["latents"], torch.tensor(400.0), x["context"], x["context_mask"]), per_sample)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = make_inputs()
    grads = []
    for checkpointing in (False, True):
        denoiser = make_denoiser(condition_channels=4, gradient_checkpointing=checkpointing).train()
        assert denoiser.model.gradient_checkpointing is checkpointing
        denoiser(**x).square().mean().backward()
        grads.append(denoiser.model.patch_embed.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_round_trip_through_save_pretrained(tmp_path: Path) -> None:
    denoiser = make_denoiser(condition_channels=4)
    denoiser.model.save_pretrained(tmp_path / "transformer")
    loaded = SanaDenoiser(pretrained=str(tmp_path), condition_channels=4).eval()
    assert loaded.model.patch_embed.proj.in_channels == 8, "a widened folder must not be widened again"
    x = make_inputs()
    torch.testing.assert_close(loaded(**x), denoiser(**x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set condition_channels=4"):
        SanaDenoiser(pretrained=str(tmp_path), condition_channels=0)


def test_loading_a_plain_model_with_a_condition_widens_it(tmp_path: Path) -> None:
    plain = make_denoiser()
    plain.model.save_pretrained(tmp_path / "transformer")
    widened = SanaDenoiser(pretrained=str(tmp_path), condition_channels=4, zero_init_condition=True).eval()
    assert widened.model.config.in_channels == 8
    x = make_inputs()
    torch.testing.assert_close(widened(**x), plain(x["latents"], x["timestep"], x["context"], x["context_mask"]))


def test_missing_pretrained_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingPretrainedError, match="not available offline"):
        SanaDenoiser(pretrained="no-such-org/no-such-sana")
    with pytest.raises(MissingPretrainedError, match="no subfolder 'transformer'"):
        SanaDenoiser(pretrained=str(tmp_path))


def test_exactly_one_source_and_a_valid_config_are_required() -> None:
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SanaDenoiser()
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SanaDenoiser(pretrained="x", config=TINY_SANA)
    with pytest.raises(TypeError, match="config is not valid for SanaTransformer2DModel"):
        load_diffusers_model(SanaTransformer2DModel, None, {**TINY_SANA, "num_blocks": 3}, None)


def test_bad_inputs_are_explained() -> None:
    widened = make_denoiser(condition_channels=4)
    x = make_inputs()
    with pytest.raises(ValueError, match=r"condition must be \(2, 4, 8, 8\)"):
        widened(x["latents"], x["timestep"], x["context"], x["context_mask"])
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, H, W\]"):
        widened(**{**x, "latents": torch.randn(2, 8, 8, 8)})
    with pytest.raises(ValueError, match=r"context must be \[2, L, 16\]"):
        widened(**{**x, "context": torch.randn(2, 5, 12)})
    with pytest.raises(ValueError, match="context_mask must be"):
        widened(**{**x, "context_mask": x["context_mask"][:, :4]})
    with pytest.raises(ValueError, match="condition_channels=0"):
        make_denoiser()(**x)
