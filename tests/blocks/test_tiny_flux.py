"""The tiny pretrained FLUX: deterministic, cached, laid out as FLUX.1-dev, loaded through FluxConfig.tiny,
and it draws the toy scene its caption describes better than another caption's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from callbacks.toy_score import palette_agreement
from zoo.blocks.config import ConfigError
from zoo.blocks.flux import FluxConfig, FluxDenoiser
from zoo.blocks.objectives import FlowMatching
from zoo.blocks.sampling import sample
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.tiny_cache import toy_images
from zoo.blocks.tiny_flux import TINY_FLUX, TinyFluxOptions, cache_folder, tiny_flux

QUICK = TinyFluxOptions(steps=2, batch_size=4, images=8)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_same_options_build_identical_weights_once_in_flux_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "a"))
    first = tiny_flux(QUICK)
    assert first == cache_folder(QUICK) and first.parent == tmp_path / "a" / "tiny"
    assert {p.name for p in first.iterdir()} == {"transformer", "text_encoder", "tokenizer", "options.json"}
    stamp = (first / "options.json").stat().st_mtime_ns
    assert tiny_flux(QUICK) == first and (first / "options.json").stat().st_mtime_ns == stamp
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "b"))
    a, b = _weights(first), _weights(tiny_flux(QUICK))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = FluxDenoiser(FluxConfig(tiny={"steps": 2, "batch_size": 4, "images": 8}))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in a.items())
    assert loaded.context_dim == TINY_FLUX["joint_attention_dim"]
    assert cache_folder(TinyFluxOptions(steps=3, batch_size=4, images=8)) != cache_folder(QUICK)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="set pretrained and config to null"):
        FluxConfig(pretrained="black-forest-labs/FLUX.1-dev", tiny={})
    with pytest.raises(ConfigError, match=r"unknown tiny FLUX option\(s\) \['stepz'\]"):
        FluxConfig(tiny={"stepz": 3})


@torch.no_grad()
def test_the_default_tiny_flux_draws_what_its_caption_says() -> None:
    folder = tiny_flux()
    denoiser = FluxDenoiser(FluxConfig(pretrained=str(folder))).eval()
    text = SDTextEncoder(pretrained=str(folder))
    images, captions = toy_images("test", 16)
    objective = FlowMatching(shift=1.0, sampler="flow_euler")

    def draw(texts: list[str]) -> torch.Tensor:
        condition = text.encode(texts)
        noise = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
        x = sample(lambda x_t, t: denoiser.predict(x_t, t, condition), noise, objective.sampling_scheduler(), 20)
        return (x.clamp(-1, 1) + 1) / 2

    own = palette_agreement(draw(captions), images).mean()
    shuffled = palette_agreement(draw(captions[1:] + captions[:1]), images).mean()
    print(f"\ntiny FLUX palette agreement: own caption {own:.3f}, another image's caption {shuffled:.3f}")
    assert own > shuffled + 0.1, (own, shuffled)
