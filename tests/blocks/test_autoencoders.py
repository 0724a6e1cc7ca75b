"""DCAutoencoder / KLAutoencoder over tiny real AutoencoderDC / AutoencoderKL, and the identity codec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from zoo.blocks.autoencoders import CodecConfig, DCAutoencoder, IdentityCodec, KLAutoencoder, build_codec
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import TINY_KL

# Tiny DC-AE: factor 2 (two stages), 4 latent channels, one ResBlock + one EfficientViT (linear
# attention) stage, the SANA-1.1 decoder's interpolate upsampling and batch/rms norms.
TINY_DCAE = {
    "in_channels": 3,
    "latent_channels": 4,
    "attention_head_dim": 4,
    "encoder_block_types": ["ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16],
    "decoder_block_out_channels": [8, 16],
    "encoder_layers_per_block": [1, 1],
    "decoder_layers_per_block": [1, 1],
    "encoder_qkv_multiscales": [[], [5]],
    "decoder_qkv_multiscales": [[], [5]],
    "upsample_block_type": "interpolate",
    "decoder_norm_types": ["batch_norm", "rms_norm"],
    "decoder_act_fns": ["relu", "silu"],
}


def make_codec(scaling_factor: float = 0.41407) -> DCAutoencoder:
    torch.manual_seed(0)
    return DCAutoencoder(CodecConfig("dc", config=TINY_DCAE, scaling_factor=scaling_factor))


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_shapes_and_properties() -> None:
    codec = make_codec()
    assert (codec.latent_channels, codec.downsample_factor) == (4, 2)
    z = codec.encode(images(size=16))
    assert z.shape == (2, 4, 8, 8)
    assert codec.decode(z).shape == (2, 3, 16, 16)


def test_encode_scales_and_decode_unscales() -> None:
    codec = make_codec(scaling_factor=0.5)
    x = images()
    raw = codec.model.encode(x).latent
    torch.testing.assert_close(codec.encode(x), raw * 0.5)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(codec.decode(z), codec.model.decode(z / 0.5).sample)
    # Scaling is exactly linear: another factor scales the latent, and decode undoes it.
    other = make_codec(scaling_factor=2.0)
    torch.testing.assert_close(other.encode(x), codec.encode(x) * 4.0)
    torch.testing.assert_close(other.decode(z * 4.0), codec.decode(z))


def test_codec_is_frozen_and_stays_in_eval() -> None:
    codec = make_codec()
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not any(m.training for m in codec.modules())
    # Batch-norm statistics must not move while a module around it trains.
    stats = {k: v.clone() for k, v in codec.state_dict().items() if "running" in k}
    assert stats, "the tiny decoder should contain batch norms"
    codec.decode(torch.randn(2, 4, 8, 8))
    for key, value in stats.items():
        assert torch.equal(codec.state_dict()[key], value)


def test_round_trip_through_save_pretrained(tmp_path: Path) -> None:
    codec = make_codec()
    codec.model.save_pretrained(tmp_path / "vae")
    loaded = DCAutoencoder(CodecConfig("dc", pretrained=str(tmp_path)))
    x = images()
    torch.testing.assert_close(loaded.encode(x), codec.encode(x), rtol=0, atol=0)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded.decode(z), codec.decode(z), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_pretrained_is_one_clear_error() -> None:
    with pytest.raises(MissingPretrainedError, match="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"):
        DCAutoencoder(CodecConfig("dc", pretrained="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", subfolder=None))


def test_bad_inputs_are_explained() -> None:
    codec = make_codec()
    with pytest.raises(ValueError, match="multiples of 2"):
        codec.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        DCAutoencoder(CodecConfig("dc", config=TINY_DCAE, scaling_factor=0.0))
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        DCAutoencoder(CodecConfig("dc"))


def test_identity_codec_is_pixel_space() -> None:
    codec = IdentityCodec()
    x = images()
    assert (codec.latent_channels, codec.downsample_factor) == (3, 1)
    assert codec.encode(x) is x and codec.decode(x) is x
    with pytest.raises(ValueError, match=r"latents must be \[B, 3, h, w\]"):
        codec.encode(torch.zeros(1, 4, 8, 8))


# --- KLAutoencoder ----------------------------------------------------------------------------



def make_kl(**kwargs: object) -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder(CodecConfig("kl", config=TINY_KL, **kwargs))  # type: ignore[arg-type]


def test_kl_shapes_and_scaling_factor_from_the_config() -> None:
    codec = make_kl()
    assert (codec.latent_channels, codec.downsample_factor) == (4, 2)
    assert (codec.scaling_factor, codec.shift_factor) == (0.13025, 0.0)
    x = images(size=16)
    mode = codec.model.encode(x).latent_dist.mode()
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, mode * 0.13025, rtol=0, atol=0)
    # GoT's conditioning latents: the same posterior mode, not scaled (InstructPix2Pix convention).
    torch.testing.assert_close(codec.encode_unscaled(x), mode, rtol=0, atol=0)
    assert (codec.encode_unscaled(x) - z).abs().max() > 0.1
    latents = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(codec.decode(latents), codec.model.decode(latents / 0.13025).sample)
    assert codec.decode(latents).shape == (2, 3, 16, 16)


def test_kl_explicit_scale_and_shift() -> None:
    codec = make_kl(scaling_factor=0.5, shift_factor=0.1159)
    x = images()
    mode = codec.model.encode(x).latent_dist.mode()
    torch.testing.assert_close(codec.encode(x), (mode - 0.1159) * 0.5)
    torch.testing.assert_close(codec.decode(codec.encode(x)), codec.model.decode(mode).sample, rtol=1e-5, atol=1e-5)
    flux_like = KLAutoencoder(CodecConfig("kl", config={**TINY_KL, "shift_factor": 0.1159, "scaling_factor": 0.3611}))
    assert (flux_like.scaling_factor, flux_like.shift_factor) == (0.3611, 0.1159)


def test_kl_sample_draws_from_the_posterior() -> None:
    codec = make_kl(sample=True)
    x = images()
    posterior = codec.model.encode(x).latent_dist
    torch.manual_seed(7)
    z = codec.encode(x)
    torch.manual_seed(7)
    expected = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape)) * 0.13025
    torch.testing.assert_close(z, expected)
    assert not torch.allclose(codec.encode(x), z)
    # encode_unscaled stays deterministic: conditions are the mode whatever `sample` says.
    torch.testing.assert_close(codec.encode_unscaled(x), posterior.mode(), rtol=0, atol=0)


def test_kl_is_frozen_and_built_by_kind(tmp_path: Path) -> None:
    codec = build_codec(CodecConfig("kl", config=TINY_KL))
    assert isinstance(codec, KLAutoencoder) and not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training
    with pytest.raises(ValueError, match="'dc', 'identity', 'kl'"):
        build_codec(CodecConfig("vq"))  # type: ignore[arg-type]


def test_kl_round_trip_through_save_pretrained(tmp_path: Path) -> None:
    codec = make_kl()
    codec.model.save_pretrained(tmp_path / "vae")
    loaded = KLAutoencoder(CodecConfig("kl", pretrained=str(tmp_path)))
    assert loaded.scaling_factor == 0.13025
    x = images()
    torch.testing.assert_close(loaded.encode(x), codec.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_unscaled(x), codec.encode_unscaled(x), rtol=0, atol=0)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded.decode(z), codec.decode(z), rtol=0, atol=0)


def test_kl_bad_inputs_are_explained() -> None:
    codec = make_kl()
    with pytest.raises(ValueError, match="multiples of 2"):
        codec.encode_unscaled(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        KLAutoencoder(CodecConfig("kl", config=TINY_KL, scaling_factor=-1.0))
    with pytest.raises(MissingPretrainedError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        KLAutoencoder(CodecConfig("kl", pretrained="stabilityai/stable-diffusion-xl-base-1.0"))


def test_flux_vae_shift_and_scale_come_from_its_folder(tmp_path: Path) -> None:
    # FLUX.1's VAE: 16 latent channels, scaling_factor 0.3611, shift_factor 0.1159 in its config.
    torch.manual_seed(0)
    flux_vae = {**TINY_KL, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    AutoencoderKL(**flux_vae).save_pretrained(tmp_path / "vae")
    codec = build_codec(CodecConfig("kl", pretrained=str(tmp_path)))
    assert (codec.latent_channels, codec.scaling_factor, codec.shift_factor) == (16, 0.3611, 0.1159)
    x = images()
    posterior = codec.model.encode(x).latent_dist
    z = codec.encode(x)
    torch.testing.assert_close(z, (posterior.mean - 0.1159) * 0.3611, rtol=0, atol=0)
    latents = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(codec.decode(latents), codec.model.decode(latents / 0.3611 + 0.1159).sample)
    # decode inverts the normalisation: decoding z is decoding the raw posterior mean.
    torch.testing.assert_close(codec.decode(z), codec.model.decode(posterior.mean).sample, rtol=1e-5, atol=1e-5)
