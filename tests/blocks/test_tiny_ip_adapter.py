"""The tiny pretrained SD1.5 + IP-Adapter side: deterministic, cached, loaded by the paper-size code, and it learned
to use the image embedding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from callbacks.toy_score import palette_agreement
from zoo.blocks.config import ConfigError
from zoo.blocks.sd15_ip_adapter import IPAdapterSD15, IPAdapterSD15Config
from zoo.blocks.tiny_ip_adapter import (
    IP_ADAPTER_FOLDER,
    IP_ADAPTER_WEIGHTS,
    SD15_FOLDER,
    TinyIPAdapterOptions,
    cache_folder,
    generate,
    object_pixels,
    tiny_ip_adapter_sd15,
)
from zoo.blocks.tiny import TINY_SD15_UNET
from zoo.blocks.tiny_cache import toy_images

QUICK = TinyIPAdapterOptions(steps=2, batch_size=4, images=8)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(folder / SD15_FOLDER / "unet" / "diffusion_pytorch_model.safetensors")),
        **load_file(str(folder / IP_ADAPTER_FOLDER / IP_ADAPTER_WEIGHTS)),
    }


def test_same_options_build_identical_weights_and_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "a"))
    first = tiny_ip_adapter_sd15(QUICK)
    assert first == cache_folder(QUICK) and first.parent == tmp_path / "a" / "tiny"
    stamp = (first / "options.json").stat().st_mtime_ns
    assert tiny_ip_adapter_sd15(QUICK) == first and (first / "options.json").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no scratch folder left behind
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "b"))
    second = tiny_ip_adapter_sd15(QUICK)
    a, b = weights_of(first), weights_of(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cache_folder(TinyIPAdapterOptions(steps=3, batch_size=4, images=8)) != cache_folder(QUICK)


def test_config_checks_and_paper_defaults() -> None:
    cfg = IPAdapterSD15Config()
    assert (cfg.pretrained, cfg.ip_adapter, cfg.ip_adapter_weights, cfg.image_encoder, cfg.scale) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "h94/IP-Adapter", "models/ip-adapter_sd15.bin", "models/image_encoder", 1.0
    )
    with pytest.raises(ConfigError, match="scale must be in"):
        IPAdapterSD15Config(scale=-0.5)
    with pytest.raises(ConfigError, match=r"unknown tiny IP-Adapter option\(s\) \['stepz'\]"):
        IPAdapterSD15Config(tiny={"stepz": 3})
    with pytest.raises(ConfigError, match="tiny.drop_rate"):
        IPAdapterSD15Config(tiny={"drop_rate": 0.5})


def test_pretrained_side_loads_like_the_paper_and_uses_the_image_embedding() -> None:
    side = IPAdapterSD15(IPAdapterSD15Config(tiny={}))
    assert side.denoiser.has_ip_adapter and not any(p.requires_grad for p in side.denoiser.parameters())
    images, captions = toy_images("test", 8)
    embeds = side.image_encoder.image_embeds(list(images))
    own = palette_agreement(generate(side.denoiser, side.condition(captions, embeds), side.scheduler, steps=20), images).mean()
    zero = palette_agreement(generate(side.denoiser, side.condition(captions, torch.zeros_like(embeds)), side.scheduler, steps=20), images).mean()
    assert own > zero + 0.1, (own, zero)


def test_inpainting_option_builds_a_seven_channel_unet_deterministically_under_its_own_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = dataclasses.replace(QUICK, inpainting=True)
    assert "inpainting" not in QUICK.key() and options.key()["inpainting"] is True  # plain keys predate the option
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "a"))
    first = tiny_ip_adapter_sd15(options)
    assert first == cache_folder(options) != cache_folder(QUICK)
    assert json.loads((first / "options.json").read_text())["full_mask_rate"] == 0.25
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "b"))
    a, b = weights_of(first), weights_of(tiny_ip_adapter_sd15(options))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["conv_in.weight"].shape[1] == 3 + 1 + 3  # noisy image, mask, masked image
    side = IPAdapterSD15(IPAdapterSD15Config(tiny=options.key()))
    assert side.inpainting and side.denoiser.condition_channels == 4 and side.denoiser.in_channels == 3
    with pytest.raises(ConfigError, match="tiny.full_mask_rate"):
        TinyIPAdapterOptions(inpainting=True, full_mask_rate=1.5)


def test_a_unet_neither_plain_nor_inpainting_is_a_config_error(tmp_path: Path) -> None:
    UNet2DConditionModel(**{**TINY_SD15_UNET, "in_channels": 5}).save_pretrained(tmp_path / "unet")
    with pytest.raises(ConfigError, match="takes 5 input channels for 3 latent channels: neither a plain \\(3\\) nor an inpainting \\(7\\)"):
        IPAdapterSD15(IPAdapterSD15Config(pretrained=str(tmp_path)))


def test_object_loss_weight_is_a_keyed_option_and_finds_the_toy_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = dataclasses.replace(QUICK, object_loss_weight=16.0)
    assert "object_loss_weight" not in QUICK.key() and options.key()["object_loss_weight"] == 16.0  # default keys predate it
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "a"))
    first = tiny_ip_adapter_sd15(options)
    assert first == cache_folder(options) != cache_folder(QUICK)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "b"))
    a, b = weights_of(first), weights_of(tiny_ip_adapter_sd15(options))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], weights_of(tiny_ip_adapter_sd15(QUICK))["conv_in.weight"])
    scene = torch.full((1, 3, 8, 8), -1.0)
    scene[:, 0, 2:4, 2:5] = 1.0  # a 2x3 red object on black
    assert object_pixels(scene).sum() == 6 and object_pixels(scene)[0, 0, 2:4, 2:5].all()
    images, _ = toy_images("train", 8)
    assert 0 < object_pixels(images * 2 - 1).mean() < 0.2
    with pytest.raises(ConfigError, match="tiny.object_loss_weight"):
        TinyIPAdapterOptions(object_loss_weight=0.0)
