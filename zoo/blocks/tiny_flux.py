"""A tiny FLUX.1 that can already draw toy scenes: built from a seed, pretrained as text-to-image, cached.

ImgEdit-E1 starts from a pretrained FLUX.1-dev: stage 1 trains only the MLP from Qwen2.5-VL into
FLUX's text branch, stage 2 fine-tunes FLUX's image branch. A random tiny FLUX would leave stage 1
nothing to align to and stage 2 a frozen random half, so :func:`tiny_flux` pretrains a tiny
``FluxTransformer2DModel`` (:data:`TINY_FLUX`, pixel space: 3 channels packed 2x2) on toy scenes
as FLUX is trained — flow matching (target ``noise − x0``, logit-normal timesteps), the constant
distilled guidance value, captions through a frozen CLIP-L-shaped tiny text encoder as its
``encoder_hidden_states`` (FLUX.1 reads T5 there; a tiny CLIP with whole-word tokens stands in),
pooled projection zero (the toy recipes give FLUX none). The folder is laid out as FLUX.1-dev's:
``transformer/``, ``text_encoder/``, ``tokenizer/``, written once under ``$ZOO_CACHE/tiny``
(:mod:`zoo.blocks.tiny_cache`), named by a hash of the options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.blocks.config import check_positive
from zoo.blocks.objectives import FlowMatching
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.tiny_cache import build_once, cache_root, options_of, toy_images

FACTORY_VERSION = 2
"""Part of the cache key (with the options and :data:`TINY_FLUX`): bump when the code below changes
what a given set of options builds."""

TINY_FLUX: dict[str, object] = {
    "in_channels": 12,
    "num_layers": 2,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
"""The tiny transformer: 2 double- and 1 single-stream blocks, width 64, guidance-distilled; its
text width is the tiny text encoder's (32)."""


@dataclass(frozen=True)
class TinyFluxOptions:
    """How the tiny FLUX is built and pretrained (all of it is in the cache key)."""

    seed: int = 0
    """Seeds the weights, the batches and the noise."""
    steps: int = 800
    """Optimiser steps of the pretraining."""
    batch_size: int = 16
    """Toy images per step."""
    learning_rate: float = 1e-3
    """AdamW learning rate, cosine-decayed to 0."""
    images: int = 1024
    """Distinct toy training images (half T2I scenes, half edit targets)."""
    max_length: int = 64
    """Caption tokens."""
    guidance: float = 3.5
    """The distilled guidance value fed in pretraining (FLUX.1-dev's default)."""
    resolution: int = 32
    """Toy image side; FLUX works in pixel space here."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "learning_rate", "images", "max_length", "resolution"):
            check_positive(f"tiny.{name}", getattr(self, name))


def options_from_dict(options: dict) -> TinyFluxOptions:
    """:class:`TinyFluxOptions` from a recipe's dict; unknown keys are a :class:`ConfigError`."""
    return options_of(TinyFluxOptions, options, "FLUX")


def cache_folder(options: TinyFluxOptions) -> Path:
    """Where the tiny FLUX built from ``options`` lives (a hash of everything that decides its weights)."""
    key = json.dumps({"version": FACTORY_VERSION, "transformer": TINY_FLUX, **dataclasses.asdict(options)}, sort_keys=True)
    return cache_root() / f"flux-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build(options: TinyFluxOptions, folder: Path) -> None:
    from zoo.blocks.flux import FluxConfig, FluxDenoiser  # flux.py imports this module

    text_encoder = SDTextEncoder(tiny={"seed": options.seed, "max_length": options.max_length, "whole_words": True})
    denoiser = FluxDenoiser(FluxConfig(config=TINY_FLUX, seed=options.seed + 1, subfolder=None))
    images, captions = toy_images("train", options.images, options.resolution)
    context = text_encoder.encode(captions).context
    objective = FlowMatching(shift=1.0)
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=options.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    guidance = {"guidance": torch.full((options.batch_size,), options.guidance)}
    mask = torch.ones(options.batch_size, context.shape[1], dtype=torch.bool)
    x0_all = images * 2 - 1
    denoiser.train()
    for _ in range(options.steps):
        index = torch.randint(0, len(images), (options.batch_size,), generator=generator)
        x0 = x0_all[index]
        noise = objective.sample_noise(x0, generator)
        t = objective.sample_timesteps(options.batch_size, generator)
        x_t, _, model_t = objective.add_noise(x0, noise, t)
        pred = denoiser(x_t, model_t, context[index], mask, added_conditions=guidance)
        loss = objective.loss(pred, objective.target(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    denoiser.model.save_pretrained(folder / "transformer")
    text_encoder.save_pretrained(str(folder))


def tiny_flux(options: TinyFluxOptions | None = None) -> Path:
    """The cached FLUX pipeline folder of the tiny pretrained FLUX (``transformer/``, ``text_encoder/``,
    ``tokenizer/``), built if absent."""
    options = options or TinyFluxOptions()
    folder = cache_folder(options)
    what = f"the tiny pretrained FLUX ({options.steps} text-to-image steps)"
    with torch.random.fork_rng(devices=[]):
        return build_once(folder, lambda scratch: _build(options, scratch), dataclasses.asdict(options), what)
