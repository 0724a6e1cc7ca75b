"""The tiny pretrained FLUX: deterministic, cached, laid out as FLUX.1-dev, loaded through FluxConfig.tiny,
and it has learned the toy images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoo.blocks.config import ConfigError
from zoo.blocks.flux import FluxConfig, FluxDenoiser
from zoo.blocks.objectives import FlowMatching
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
def test_a_pretrained_tiny_flux_has_learned_the_toy_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 pretraining steps bring its held-out flow-matching loss far below its random
    initialisation's; how well the default (800 steps) draws is in benchmarks/toy_learning.md."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    folder = tiny_flux(TinyFluxOptions(steps=200, images=256))
    trained = FluxDenoiser(FluxConfig(pretrained=str(folder))).eval()
    untrained = FluxDenoiser(FluxConfig(config=TINY_FLUX, seed=1, subfolder=None)).eval()
    text = SDTextEncoder(pretrained=str(folder))
    images, captions = toy_images("test", 16)
    condition = text.encode(captions)
    objective = FlowMatching(shift=1.0)
    x0 = images * 2 - 1
    generator = torch.Generator().manual_seed(0)
    noise = objective.sample_noise(x0, generator)
    t = torch.linspace(50, 950, len(x0)).long()
    x_t, _, model_t = objective.add_noise(x0, noise, t)
    target = objective.target(x0, noise, t)

    def loss(denoiser: FluxDenoiser) -> float:
        return float(((denoiser.predict(x_t, model_t, condition) - target) ** 2).mean())

    trained_loss, untrained_loss = loss(trained), loss(untrained)
    print(f"\ntiny FLUX held-out flow loss: pretrained {trained_loss:.3f}, random init {untrained_loss:.3f}")
    assert trained_loss < 0.25 * untrained_loss
