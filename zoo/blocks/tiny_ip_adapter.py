"""A tiny SD1.5 + IP-Adapter that means something at toy size: built from a seed, pretrained on toy images, cached.

MIND-Edit drives a frozen IP-Adapter on a frozen SD1.5 with a predicted CLIP image embedding. A
random tiny UNet would make that embedding meaningless, so :func:`tiny_ip_adapter_sd15` builds the
tiny real components (:mod:`zoo.blocks.tiny`: SD1.5-shaped UNet in pixel space, CLIP text encoder,
``CLIPVisionModelWithProjection``, IP-Adapter weights in the published layout) and trains the UNet
and the adapter (``image_proj``, ``to_k_ip``/``to_v_ip``) briefly on toy scenes as IP-Adapter's
``tutorial_train.py`` trains (ε-prediction MSE; image embedding, caption, or both dropped with
probability 0.05 each; ``tencent-ailab/IP-Adapter@62e4af9:tutorial_train.py:61-70, 360-385``), with
caption = the scene's toy description and image embedding = the frozen CLIP embedding of the same
image. Unlike the tutorial the UNet trains too (there is no pretrained SD1.5 at toy size), under
DDPM's pixel-space β schedule (linear 1e-4 -> 0.02, :data:`TINY_SCHEDULE`) instead of SD1.5's latent
one, whose last step keeps 7% of the signal: in pixel space that leaks the mean colour, and a UNet
trained on it paints every image grey. It predicts v rather than ε: an ε target hardly depends on
the image at high noise, so in a few hundred steps an ε model learns to ignore its condition. The
schedule is saved as the pipeline's ``scheduler/`` (as
SD1.5's is), where :class:`~zoo.blocks.sd15_ip_adapter.IPAdapterSD15` reads it.

With ``inpainting: true`` the UNet is an SD-inpainting UNet instead (:mod:`zoo.blocks.inpainting`:
3 pixel + 1 mask + 3 masked-image input channels), trained as the model card of
``runwayml/stable-diffusion-inpainting`` describes that model's inpainting stage: the UNet gets the
mask and the masked image as extra input channels, the masks are synthetic, and a quarter of the
samples have everything masked (then it learns plain text/image-to-image generation). The card's
UNet started from a non-inpainting SD checkpoint with the extra channels zero-initialised; there is
none at toy size, so ours trains from its seed like the plain one. Our masks are the toy edit masks
of the edit targets (the pixels an edit changes) or random boxes, half each, and random boxes on
the T2I scenes; the loss, drops and schedule are the plain side's.

The result is written once, atomically, as the published folders are laid out, and reused:
``<cache>/sd15/{unet,text_encoder,tokenizer,scheduler}``, ``<cache>/ip_adapter/models/ip-adapter_sd15.safetensors``
and ``<cache>/ip_adapter/models/image_encoder``, under ``$ZOO_CACHE/tiny`` (default
``~/.cache/zoo/tiny``) in a folder named by a hash of the options. The same options give an
identical ``state_dict`` (one thread, fixed seeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel

from zoo.blocks.condition import Condition
from zoo.blocks.config import check_positive, check_range
from zoo.blocks.denoisers import Denoiser
from zoo.blocks.inpainting import inpainting_channels, inpainting_condition_channels, masked_source, source_inputs
from zoo.blocks.ip_adapter import init_ip_adapter_weights, install_ip_adapter, ip_adapter_weights, save_ip_adapter_weights
from zoo.blocks.objectives import EpsilonDiffusion, mean_squared_error
from zoo.blocks.sampling import sample
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.tiny import TINY_SD15_UNET
from zoo.blocks.tiny_clip_contrastive import pretrain_contrastively
from zoo.blocks.tiny_cache import build_once, cache_root, options_of, toy_edit_masks, toy_images
from zoo.blocks.vision import CLIPImageEmbedder

FACTORY_VERSION = 3
"""Part of the cache key (with the options, :data:`TINY_SD15_UNET` and :data:`TINY_SCHEDULE`): bump when
the code below changes what a given set of options builds."""

SD15_FOLDER = "sd15"
IP_ADAPTER_FOLDER = "ip_adapter"
IP_ADAPTER_WEIGHTS = "models/ip-adapter_sd15.safetensors"
IMAGE_ENCODER = "models/image_encoder"
TINY_SCHEDULE: dict[str, object] = {
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
}
"""The tiny side's schedule (DDPM's β for pixel space, v-prediction), keyword arguments of :class:`EpsilonDiffusion`."""


@dataclass(frozen=True)
class TinyIPAdapterOptions:
    """How the tiny SD1.5 + IP-Adapter is built and pretrained (all of it is in the cache key)."""

    seed: int = 0
    """Seeds the weights, the batches, the drops and the noise."""
    steps: int = 800
    """Optimiser steps of the pretraining."""
    batch_size: int = 16
    """Toy images per step."""
    learning_rate: float = 2e-3
    """AdamW learning rate (weight decay 0.01, as ``tutorial_train.py``), cosine-decayed to 0."""
    images: int = 1024
    """Distinct toy training images (half T2I scenes, half edit targets)."""
    drop_rate: float = 0.05
    """Probability of each of: image embedding zeroed, caption emptied, both."""
    max_length: int = 64
    """Caption tokens (SD1.5: 77 BPE tokens)."""
    whole_words: bool = True
    """Tokenize captions word by word, as CLIP's BPE keeps common words whole (else one token per
    character, which a tiny text encoder and UNet cannot read in a few hundred steps)."""
    resolution: int = 32
    """Toy image side; the UNet works in pixel space."""
    inpainting: bool = False
    """Pretrain an SD-inpainting UNet (input: noisy image, mask, masked image; 7 channels) instead of
    a plain one, on random and toy edit masks (see the module docstring)."""
    full_mask_rate: float = 0.25
    """Inpainting only: share of samples with everything masked (the SD-inpainting model card: 25%)."""
    contrastive_steps: int = 0
    """Steps of CLIP's contrastive pretraining of the image encoder on the sources and targets of
    ``images`` toy edits with layout captions, before the UNet trains
    (:mod:`zoo.blocks.tiny_clip_contrastive`; 0: the encoder stays random)."""
    object_loss_weight: float = 1.0
    """Weight of the loss on object pixels (those that differ from the image's background colour,
    :func:`object_pixels`) relative to background pixels (1: plain MSE); each sample's loss is the
    weighted mean. A toy object is ~50 of 1024 pixels, so under plain MSE the UNet's best guess at
    high noise is the background everywhere: it learns backgrounds from its condition and objects
    only from ``x_t`` (held out at t >= 600 its x0 error on object pixels is the same, 0.93, with the
    true or a shuffled condition), and inpaints an added or recoloured object in the background
    colour whatever the embedding. Weighted (with the contrastive encoder, 1600 steps) it draws them:
    ``benchmarks/toy_learning.md``, MIND-Edit (session 10)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "learning_rate", "images", "max_length"):
            check_positive(f"tiny.{name}", getattr(self, name))
        check_range("tiny.drop_rate", self.drop_rate, 0.0, 1 / 3)
        check_range("tiny.resolution", self.resolution, 12)
        check_range("tiny.full_mask_rate", self.full_mask_rate, 0.0, 1.0)
        check_range("tiny.contrastive_steps", self.contrastive_steps, 0)
        check_positive("tiny.object_loss_weight", self.object_loss_weight)

    def key(self) -> dict[str, object]:
        """The options as the cache key holds them: a plain UNet's key leaves out the inpainting
        options, a random encoder's the contrastive one and plain MSE the object loss weight, so caches
        built before they existed stay valid."""
        options = dataclasses.asdict(self)
        if not self.inpainting:
            del options["inpainting"], options["full_mask_rate"]
        if not self.contrastive_steps:
            del options["contrastive_steps"]
        if self.object_loss_weight == 1.0:
            del options["object_loss_weight"]
        return options


def options_from_dict(options: dict) -> TinyIPAdapterOptions:
    """:class:`TinyIPAdapterOptions` from a recipe's dict; unknown keys are a :class:`ConfigError`."""
    return options_of(TinyIPAdapterOptions, options, "IP-Adapter")


def cache_folder(options: TinyIPAdapterOptions) -> Path:
    """Where the side built from ``options`` lives (a hash of everything that decides its weights)."""
    recipe = {"version": FACTORY_VERSION, "unet": TINY_SD15_UNET, "schedule": TINY_SCHEDULE}
    key = json.dumps({**recipe, **options.key()}, sort_keys=True)
    return cache_root() / f"ip_adapter_sd15-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _random_box(rng: random.Random, size: int) -> torch.Tensor:
    """``[1, size, size]``: 1 inside a random box with sides in [size / 8, size / 2]."""
    mask = torch.zeros(1, size, size)
    h, w = (rng.randint(max(1, size // 8), size // 2) for _ in range(2))
    top, left = rng.randint(0, size - h), rng.randint(0, size - w)
    mask[:, top : top + h, left : left + w] = 1
    return mask


def _training_mask(rng: random.Random, edit_mask: torch.Tensor, options: TinyIPAdapterOptions) -> torch.Tensor:
    """One inpainting training mask ``[1, R, R]`` (1 = generate): everything, the toy edit mask, or a box."""
    if rng.random() < options.full_mask_rate:
        return torch.ones_like(edit_mask)
    if edit_mask.any() and rng.random() < 0.5:
        return edit_mask
    return _random_box(rng, options.resolution)


def object_pixels(x0: torch.Tensor, tolerance: float = 0.1) -> torch.Tensor:
    """``[B, 1, H, W]`` in {0, 1}: the pixels of ``x0`` (``[B, 3, H, W]``, flat toy backgrounds) whose colour differs
    from the image's background colour (its per-channel median, as the background covers most pixels)."""
    background = x0.flatten(2).median(dim=2).values[:, :, None, None]
    return (x0 - background).abs().amax(dim=1, keepdim=True).gt(tolerance).float()


def _pretrain(
    unet: UNet2DConditionModel, images: torch.Tensor, context: torch.Tensor, null_context: torch.Tensor,
    embeds: torch.Tensor, edit_masks: torch.Tensor | None, options: TinyIPAdapterOptions,
) -> None:
    """IP-Adapter's training step over the whole UNet (see the module docstring); an inpainting UNet
    also gets each sample's mask and masked image (``edit_masks``: the toy edit masks, inpainting only)."""
    objective = EpsilonDiffusion(**TINY_SCHEDULE)
    generator = torch.Generator().manual_seed(options.seed)
    rng = random.Random(options.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=options.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    x0_all = images * 2 - 1
    # Per-pixel loss weights of every training image, found once (None: plain MSE).
    weights = None if options.object_loss_weight == 1.0 else 1 + (options.object_loss_weight - 1) * object_pixels(x0_all)
    unet.train()
    for _ in range(options.steps):
        index = torch.randint(0, len(images), (options.batch_size,), generator=generator)
        x0, ctx, emb = x0_all[index], context[index].clone(), embeds[index].clone()
        for row in range(options.batch_size):
            draw = rng.random()
            if draw < options.drop_rate or 2 * options.drop_rate <= draw < 3 * options.drop_rate:
                emb[row] = 0
            if options.drop_rate <= draw < 3 * options.drop_rate:
                ctx[row] = null_context
        noise = objective.sample_noise(x0, generator)
        t = objective.sample_timesteps(options.batch_size, generator)
        x_t, _, model_t = objective.add_noise(x0, noise, t)
        if edit_masks is not None:
            mask = torch.stack([_training_mask(rng, edit_masks[i], options) for i in index.tolist()])
            x_t = torch.cat([x_t, inpainting_channels(mask, masked_source(x0, mask))], dim=1)
        pred = unet(x_t, model_t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [emb[:, None]]}).sample
        loss = mean_squared_error(pred, objective.target(x0, noise, t), None if weights is None else weights[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.eval().requires_grad_(False)


def _build(options: TinyIPAdapterOptions, folder: Path) -> None:
    text_encoder = SDTextEncoder(tiny={"seed": options.seed, "max_length": options.max_length, "whole_words": options.whole_words})
    image_encoder = CLIPImageEmbedder(tiny={"seed": options.seed + 1, "image_size": options.resolution})
    if options.contrastive_steps:
        pretrain_contrastively(image_encoder, options.contrastive_steps, options.images, options.seed + 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed + 2)
        pixels = TINY_SD15_UNET["out_channels"]
        in_channels = pixels + (inpainting_condition_channels(pixels) if options.inpainting else 0)
        unet = UNet2DConditionModel(**{**TINY_SD15_UNET, "sample_size": options.resolution, "in_channels": in_channels})
    plain_config = dict(unet.config)
    install_ip_adapter(unet, init_ip_adapter_weights(unet, image_encoder.embed_dim, options.seed + 3))
    images, captions = toy_images("train", options.images, options.resolution)
    context = text_encoder.encode(captions).context
    null_context = text_encoder.encode([""]).context[0]
    embeds = image_encoder.image_embeds(list(images))
    with torch.random.fork_rng(devices=[]):
        edit_masks = toy_edit_masks("train", options.images, options.resolution) if options.inpainting else None
        _pretrain(unet, images, context, null_context, embeds, edit_masks, options)
    weights = ip_adapter_weights(unet)
    # The SD1.5 folder holds the plain UNet (as the published one): drop the adapter, keep the trained weights.
    plain = UNet2DConditionModel.from_config(plain_config)
    missing, _ = plain.load_state_dict(unet.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the trained UNet lacks {missing[:4]}")
    plain.save_pretrained(folder / SD15_FOLDER / "unet")
    EpsilonDiffusion(**TINY_SCHEDULE).sampling_scheduler().save_pretrained(folder / SD15_FOLDER / "scheduler")
    text_encoder.save_pretrained(str(folder / SD15_FOLDER))
    save_ip_adapter_weights(weights, folder / IP_ADAPTER_FOLDER / IP_ADAPTER_WEIGHTS)
    image_encoder.save_pretrained(str(folder / IP_ADAPTER_FOLDER / IMAGE_ENCODER))


def tiny_ip_adapter_sd15(options: TinyIPAdapterOptions | None = None) -> Path:
    """The cached folder of the tiny pretrained side, built if absent (default options: 800 steps of 16
    images, 190-200 s on one thread of a 2-core machine; see ``benchmarks/tiny_ip_adapter.json``).

    Returns the folder holding ``sd15/`` (an SD1.5 pipeline folder) and ``ip_adapter/`` (an h94/IP-Adapter
    folder: :data:`IP_ADAPTER_WEIGHTS`, :data:`IMAGE_ENCODER`).
    """
    options = options or TinyIPAdapterOptions()
    folder = cache_folder(options)
    kind = ("inpainting " if options.inpainting else "") + ("contrastive-encoder " if options.contrastive_steps else "")
    what = f"the tiny pretrained SD1.5 + IP-Adapter side ({kind}{options.steps} steps)"
    return build_once(folder, lambda scratch: _build(options, scratch), options.key(), what)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    condition: Condition,
    scheduler: SchedulerMixin,
    seed: int = 0,
    steps: int = 30,
    inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images ``[B, 3, R, R]`` in [0, 1] from a pixel-space ``denoiser`` without guidance;
    ``inpaint = (source in [0, 1], mask [B, 1, R, R], 1 = generate)``: the source is kept outside
    the mask after every step (a plain UNet), or the mask and masked source are the input channels
    of an inpainting UNet (:mod:`zoo.blocks.inpainting`). An inpainting UNet without ``inpaint``
    generates with everything masked."""
    size = denoiser.sample_size
    noise = torch.randn(len(condition), denoiser.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    source, mask = inpaint if inpaint is not None else (torch.zeros_like(noise), None)
    pixels = source * 2 - 1
    condition, keep = source_inputs(
        condition, pixels, mask, lambda x: x, (size, size), inpainting=bool(denoiser.condition_channels)
    )
    known = {"source": pixels, "keep": keep} if keep is not None else {}
    x = sample(
        lambda x_t, t: denoiser.predict(x_t, t, condition),
        noise,
        scheduler,
        steps,
        generator=torch.Generator().manual_seed(seed + 1),
        **known,
    )
    return ((x + 1) / 2).clamp(0, 1)
