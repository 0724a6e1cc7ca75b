"""The inpainting UNet's input as diffusers' own StableDiffusionInpaintPipeline builds it: order, mask convention,
masked source, mask resize."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.blocks.condition import Condition
from zoo.blocks.inpainting import inpainting_channels, inpainting_condition_channels, masked_source, source_inputs
from zoo.blocks.tiny import TINY_KL, TINY_SD15_UNET

LATENT = TINY_KL["latent_channels"]


def deterministic_vae() -> AutoencoderKL:
    """A tiny KL VAE whose posterior has std ~3e-7, so the pipeline's posterior sample equals our codec's mode."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_KL)
    with torch.no_grad():
        vae.quant_conv.weight[LATENT:] = 0
        vae.quant_conv.bias[LATENT:] = -60.0  # log-variance, clamped to -30 by diffusers
    return vae.eval()


def test_condition_channels_are_the_pipelines_mask_and_masked_image_latents() -> None:
    vae = deterministic_vae()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        **{**TINY_SD15_UNET, "in_channels": LATENT + inpainting_condition_channels(LATENT), "out_channels": LATENT, "sample_size": 16}
    ).eval()
    assert unet.config.in_channels == 2 * LATENT + 1  # SD1.5-inpainting's 9 for 4 latent channels
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask_pixels = np.zeros((32, 32), np.uint8)
    mask_pixels[3:14, 5:22] = 255  # not on the 2-pixel latent grid: nearest resize, not "a touched cell counts"
    mask_pixels[20, 20] = 100  # below 0.5: binarized to keep
    seen: list[torch.Tensor] = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    embeds = torch.randn(1, 4, TINY_SD15_UNET["cross_attention_dim"])
    pipe(
        image=Image.fromarray(pixels), mask_image=Image.fromarray(mask_pixels), prompt_embeds=embeds,
        height=32, width=32, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
    )

    source = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.from_numpy(mask_pixels)[None, None].float() / 255
    codec = build_codec(CodecConfig("kl", config=TINY_KL))
    codec.model = vae
    ours = inpainting_channels(mask, codec.encode(masked_source(source, mask)))
    theirs = seen[0][:, LATENT:]
    assert ours.shape == theirs.shape == (1, LATENT + 1, 16, 16)
    torch.testing.assert_close(ours[:, :1], theirs[:, :1], rtol=0, atol=0)  # the mask channel, 1 = repaint
    assert ours[0, 0, 2, 3].item() == 1 and ours[0, 0, 10, 10].item() == 0 and ours[:, 0].sum() == 5 * 8
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], rtol=1e-4, atol=1e-4)


def test_masked_source_blanks_exactly_the_region_to_repaint() -> None:
    source = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    mask[1] = 0.49  # below diffusers' threshold: kept
    out = masked_source(source, mask)
    assert out[0, :, :4].abs().sum() == 0 and torch.equal(out[0, :, 4:], source[0, :, 4:]) and torch.equal(out[1], source[1])


def halve(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in encoder with a real factor-2 downsampling, so latent-size handling is exercised."""
    return F.avg_pool2d(pixels, 2)


def test_source_inputs_blend_a_plain_unet_and_feed_an_inpainting_unet() -> None:
    condition = Condition(context=torch.randn(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.bool))
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 1, 1] = 1  # one pixel: its whole latent cell is generated
    mask[1, :, 4:8, 0:4] = 1

    plain, keep = source_inputs(condition, pixels, mask, halve, (4, 4), inpainting=False)
    assert plain is condition and keep is not None and keep.shape == (2, 1, 4, 4)
    assert keep[0, 0, 0, 0] == 0 and keep[0].sum() == 15
    assert keep[1, 0, 2:, :2].eq(0).all() and keep[1].sum() == 12
    assert source_inputs(condition, pixels, None, halve, (4, 4), inpainting=False) == (condition, None)

    fed, keep = source_inputs(condition, pixels, mask, halve, (4, 4), inpainting=True)
    assert keep is None and fed.channels is not None
    torch.testing.assert_close(fed.channels, inpainting_channels(mask, halve(masked_source(pixels, mask))))
    free, _ = source_inputs(condition, pixels, None, halve, (4, 4), inpainting=True)
    assert free.channels is not None and free.channels[:, 0].eq(1).all() and free.channels[:, 1:].eq(0).all()
