"""SanaDenoiser / UNetDenoiser over tiny real diffusers models, and input-conv widening (parity checks 4, 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SanaTransformer2DModel, UNet2DConditionModel
from torch import nn

from zoo.blocks.denoisers import SanaConfig, SanaDenoiser, UNetConfig, UNetDenoiser, sdxl_time_ids, widen_input_conv, widen_model_input
from zoo.blocks.pretrained import MissingPretrainedError, load_diffusers_model
from zoo.blocks.tiny import TINY_SDXL_UNET

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


def make_denoiser(seed: int = 0, condition_channels: int = 0, **kwargs: object) -> SanaDenoiser:
    torch.manual_seed(seed)
    return SanaDenoiser(SanaConfig(config=TINY_SANA, **kwargs), condition_channels=condition_channels).eval()  # type: ignore[arg-type]


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
    loaded = SanaDenoiser(SanaConfig(pretrained=str(tmp_path)), condition_channels=4).eval()
    assert loaded.model.patch_embed.proj.in_channels == 8, "a widened folder must not be widened again"
    x = make_inputs()
    torch.testing.assert_close(loaded(**x), denoiser(**x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set condition_channels=4"):
        SanaDenoiser(SanaConfig(pretrained=str(tmp_path)), condition_channels=0)


def test_loading_a_plain_model_with_a_condition_widens_it(tmp_path: Path) -> None:
    plain = make_denoiser()
    plain.model.save_pretrained(tmp_path / "transformer")
    widened = SanaDenoiser(SanaConfig(pretrained=str(tmp_path), zero_init_condition=True), condition_channels=4).eval()
    assert widened.model.config.in_channels == 8
    x = make_inputs()
    torch.testing.assert_close(widened(**x), plain(x["latents"], x["timestep"], x["context"], x["context_mask"]))


def test_missing_pretrained_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingPretrainedError, match="not available offline"):
        SanaDenoiser(SanaConfig(pretrained="no-such-org/no-such-sana"))
    with pytest.raises(MissingPretrainedError, match="no subfolder 'transformer'"):
        SanaDenoiser(SanaConfig(pretrained=str(tmp_path)))


def test_exactly_one_source_and_a_valid_config_are_required() -> None:
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SanaDenoiser(SanaConfig())
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        SanaDenoiser(SanaConfig(pretrained="x", config=TINY_SANA))
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


def test_sana_rejects_added_conditions() -> None:
    x = make_inputs()
    with pytest.raises(ValueError, match="SanaDenoiser takes no added_conditions"):
        make_denoiser()(x["latents"], x["timestep"], x["context"], x["context_mask"], None, {"a": x["latents"]})


# --- UNetDenoiser (SDXL-style, GoT's SSGM UNet) -------------------------------------------------

TINY_SD15_UNET = {k: v for k, v in TINY_SDXL_UNET.items() if "addition" not in k and "projection_class" not in k}


def unet_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([999, 250][:batch]),
        "context": torch.randn(batch, 6, 32, generator=g),
        "context_mask": torch.ones(batch, 6, dtype=torch.bool),
        "condition": torch.randn(batch, 8, 8, 8, generator=g),
        "added_conditions": {"text_embeds": torch.randn(batch, 16, generator=g), "time_ids": sdxl_time_ids(64, 64)},
    }


def make_unet(seed: int = 0, condition_channels: int = 0, **kwargs: object) -> UNetDenoiser:
    torch.manual_seed(seed)
    return UNetDenoiser(UNetConfig(config=TINY_SDXL_UNET, **kwargs), condition_channels=condition_channels).eval()  # type: ignore[arg-type]


def test_sdxl_time_ids() -> None:
    assert sdxl_time_ids(1024, 768).tolist() == [[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]]
    assert sdxl_time_ids(512, 512, crop=(3, 4), target=(256, 128)).tolist() == [[512.0, 512.0, 3.0, 4.0, 256.0, 128.0]]
    with pytest.raises(ValueError, match="positive sizes"):
        sdxl_time_ids(0, 64)


def test_got_widening_of_a_pretrained_unet(tmp_path: Path) -> None:
    """Parity check 8: 12-channel conv_in, pretrained weights in the first 4, zeros after, bias not copied."""
    torch.manual_seed(0)
    pretrained = UNet2DConditionModel(**TINY_SDXL_UNET)
    pretrained.save_pretrained(tmp_path / "unet")
    old = pretrained.conv_in
    denoiser = UNetDenoiser(UNetConfig(pretrained=str(tmp_path)), condition_channels=8)
    conv = denoiser.model.conv_in
    assert (conv.in_channels, denoiser.model.config.in_channels, denoiser.in_channels) == (12, 12, 4)
    torch.testing.assert_close(conv.weight[:, :4], old.weight, rtol=0, atol=0)
    assert torch.count_nonzero(conv.weight[:, 4:]) == 0
    assert not torch.allclose(conv.bias, old.bias)
    copied = UNetDenoiser(UNetConfig(pretrained=str(tmp_path), copy_bias=True), condition_channels=8)
    torch.testing.assert_close(copied.model.conv_in.bias, old.bias, rtol=0, atol=0)
    # Every other pretrained weight is untouched.
    state = pretrained.state_dict()
    for key, value in denoiser.model.state_dict().items():
        if not key.startswith("conv_in."):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_unet_forward_matches_the_diffusers_call() -> None:
    denoiser = make_unet(condition_channels=8)
    x = unet_inputs()
    out = denoiser(**x)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert (denoiser.context_dim, denoiser.sample_size, denoiser.needs_added_conditions) == (32, 8, True)
    direct = denoiser.model(
        torch.cat([x["latents"], x["condition"]], 1),
        x["timestep"],
        encoder_hidden_states=x["context"],
        added_cond_kwargs={
            "text_embeds": x["added_conditions"]["text_embeds"],
            "time_ids": sdxl_time_ids(64, 64).expand(2, 6),
        },
    ).sample
    torch.testing.assert_close(out, direct)


def test_zero_condition_with_copied_bias_reproduces_the_plain_unet() -> None:
    plain = make_unet(seed=3)
    x = unet_inputs()
    expected = plain(x["latents"], x["timestep"], x["context"], x["context_mask"], None, x["added_conditions"])
    widened = make_unet(seed=3, condition_channels=8, copy_bias=True)
    torch.testing.assert_close(widened(**x), expected)
    torch.testing.assert_close(widened(**{**x, "condition": 3 * x["condition"]}), expected)
    # The official (fresh-bias) widening changes the output until the bias is trained/loaded.
    official = make_unet(seed=3, condition_channels=8)
    assert (official(**x) - expected).abs().max() > 1e-4


def test_zero_initialised_condition_channels_still_learn() -> None:
    denoiser = make_unet(condition_channels=8).train()
    denoiser(**unet_inputs()).square().mean().backward()
    grad = denoiser.model.conv_in.weight.grad
    assert grad is not None and grad[:, 4:].abs().sum() > 0


def test_added_conditions_are_used_and_a_batch_of_one_is_shared() -> None:
    denoiser = make_unet(condition_channels=8)
    x = unet_inputs()
    pooled = x["added_conditions"]["text_embeds"][:1]
    shared = denoiser(**{**x, "added_conditions": {"text_embeds": pooled, "time_ids": sdxl_time_ids(64, 64)}})
    repeated_conditions = {"text_embeds": pooled.expand(2, -1), "time_ids": sdxl_time_ids(64, 64).repeat(2, 1)}
    repeated = denoiser(**{**x, "added_conditions": repeated_conditions})
    torch.testing.assert_close(shared, repeated)
    other_size = denoiser(**{**x, "added_conditions": {"text_embeds": pooled, "time_ids": sdxl_time_ids(128, 64)}})
    assert (other_size - shared).abs().max() > 1e-4


def test_unet_added_condition_errors() -> None:
    denoiser = make_unet(condition_channels=8)
    x = unet_inputs()
    with pytest.raises(ValueError, match="needs added_conditions with exactly 'text_embeds'"):
        denoiser(**{**x, "added_conditions": None})
    with pytest.raises(ValueError, match=r"text_embeds must be \[2 or 1, 16\]"):
        denoiser(**{**x, "added_conditions": {"text_embeds": torch.zeros(2, 15), "time_ids": sdxl_time_ids(8, 8)}})
    with pytest.raises(ValueError, match=r"time_ids must be \[2 or 1, 6\]"):
        denoiser(**{**x, "added_conditions": {"text_embeds": torch.zeros(2, 16), "time_ids": torch.zeros(3, 6)}})
    with pytest.raises(ValueError, match=r"condition must be \(2, 8, 8, 8\)"):
        denoiser(**{**x, "condition": None})
    torch.manual_seed(0)
    sd15 = UNetDenoiser(UNetConfig(config=TINY_SD15_UNET))
    assert not sd15.needs_added_conditions
    out = sd15(x["latents"], x["timestep"], x["context"], x["context_mask"])
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="takes no added_conditions"):
        sd15(x["latents"], x["timestep"], x["context"], x["context_mask"], added_conditions=x["added_conditions"])


def test_widened_unet_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    denoiser = make_unet(condition_channels=8)
    with torch.no_grad():
        denoiser.model.conv_in.weight[:, 4:].normal_()  # as after training
    denoiser.model.save_pretrained(tmp_path / "unet")
    loaded = UNetDenoiser(UNetConfig(pretrained=str(tmp_path)), condition_channels=8).eval()
    assert loaded.model.conv_in.in_channels == 12
    x = unet_inputs()
    torch.testing.assert_close(loaded(**x), denoiser(**x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set condition_channels=8"):
        UNetDenoiser(UNetConfig(pretrained=str(tmp_path)), condition_channels=4)
    with pytest.raises(MissingPretrainedError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        UNetDenoiser(UNetConfig(pretrained="stabilityai/stable-diffusion-xl-base-1.0"))
