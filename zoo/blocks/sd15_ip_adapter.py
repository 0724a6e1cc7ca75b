"""MIND-Edit's frozen diffusion side: SD1.5's UNet with IP-Adapter, its CLIP text encoder, IP-Adapter's image encoder.

MIND-Edit (paper §3) feeds the CLIP image embedding its vision head predicts ("v_insight") to a
frozen IP-Adapter on a frozen SD1.5. :class:`IPAdapterSD15` builds the three frozen parts from the
published folders (:class:`IPAdapterSD15Config`'s defaults) or from the tiny pretrained side of
:mod:`zoo.blocks.tiny_ip_adapter`, which is written in the same layout and loaded by the same code.
Guidance (7.5) and steps (30) belong to the module, not here.

Either UNet kind loads: a plain one (SD1.5: 4 input channels) or an SD-inpainting one
(``stable-diffusion-v1-5/stable-diffusion-inpainting``: 9 = 4 latent + 1 mask + 4 masked-image
latent, :mod:`zoo.blocks.inpainting`), told apart by ``unet/config.json``'s ``in_channels`` as
diffusers' inpainting pipeline tells them apart. The SD1.5 IP-Adapter fits both (same
cross-attention width, 768).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor

from zoo.blocks.condition import Condition
from zoo.blocks.config import ConfigError, check_range
from zoo.blocks.denoisers import UNetConfig, UNetDenoiser
from zoo.blocks.inpainting import inpainting_condition_channels
from zoo.blocks.ip_adapter import install_ip_adapter, load_ip_adapter_weights
from zoo.blocks.pretrained import resolve_pretrained
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.tiny_ip_adapter import (
    IMAGE_ENCODER,
    IP_ADAPTER_FOLDER,
    IP_ADAPTER_WEIGHTS,
    SD15_FOLDER,
    options_from_dict,
    tiny_ip_adapter_sd15,
)
from zoo.blocks.vision import CLIPImageEmbedder


@dataclass
class IPAdapterSD15Config:
    """Where SD1.5, the IP-Adapter weights and its image encoder come from, and the adapter's scale."""

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local folder of the SD1.5 pipeline (``unet/``, ``text_encoder/``, ``tokenizer/``);
    an SD1.5 inpainting pipeline (``stable-diffusion-v1-5/stable-diffusion-inpainting``) works too."""
    ip_adapter: str = "h94/IP-Adapter"
    """Hub id or local folder holding the IP-Adapter weight file and image encoder."""
    ip_adapter_weights: str = "models/ip-adapter_sd15.bin"
    """The weight file inside ``ip_adapter`` (``.bin`` or ``.safetensors``)."""
    image_encoder: str = "models/image_encoder"
    """The ``CLIPVisionModelWithProjection`` folder inside ``ip_adapter`` (ViT-H/14, 1024-d embeddings)."""
    scale: float = 1.0
    """Weight of the image branch of every decoupled cross-attention (official default 1.0)."""
    tiny: dict[str, Any] | None = None
    """Options of the tiny pretrained side (:class:`zoo.blocks.tiny_ip_adapter.TinyIPAdapterOptions`,
    ``{}`` for its defaults); when set it replaces ``pretrained`` and ``ip_adapter``."""

    def __post_init__(self) -> None:
        check_range("scale", self.scale, 0.0)
        if self.tiny is not None:
            options_from_dict(self.tiny)


class IPAdapterSD15:
    """The frozen parts, built from an :class:`IPAdapterSD15Config`.

    Attributes:
        denoiser: :class:`UNetDenoiser` over SD1.5's UNet with IP-Adapter installed, frozen; it takes
            ``added_conditions={"image_embeds": [B, D_img]}``, and an inpainting UNet's mask and
            masked-image latent as its ``condition`` channels.
        inpainting: whether the UNet is an inpainting one (``denoiser.condition_channels > 0``).
        text_encoder: :class:`SDTextEncoder` (captions -> ``[B, 77, 768]`` condition).
        image_encoder: :class:`CLIPImageEmbedder` (images in [0, 1] -> ``[B, D_img]``), the targets of
            MIND-Edit's vision head.
        scheduler: the pipeline's noise schedule as a ``DDPMScheduler`` (``tutorial_train.py`` loads it
            the same way); sample with it, or with any scheduler built from its config.
    """

    def __init__(self, cfg: IPAdapterSD15Config) -> None:
        if cfg.tiny is not None:
            root = tiny_ip_adapter_sd15(options_from_dict(cfg.tiny))
            sd15, ip_root = str(root / SD15_FOLDER), str(root / IP_ADAPTER_FOLDER)
            weights, encoder = IP_ADAPTER_WEIGHTS, IMAGE_ENCODER
        else:
            sd15, ip_root = cfg.pretrained, cfg.ip_adapter
            weights, encoder = cfg.ip_adapter_weights, cfg.image_encoder
        self.denoiser = UNetDenoiser(UNetConfig(pretrained=sd15), condition_channels=self._condition_channels(sd15))
        self.inpainting = self.denoiser.condition_channels > 0
        install_ip_adapter(self.denoiser.model, load_ip_adapter_weights(Path(resolve_pretrained(ip_root)) / weights), cfg.scale)
        self.denoiser.requires_grad_(False).eval()
        self.text_encoder = SDTextEncoder(pretrained=sd15)
        self.image_encoder = CLIPImageEmbedder(pretrained=ip_root, subfolder=encoder)
        self.scheduler = DDPMScheduler.from_pretrained(resolve_pretrained(sd15, "scheduler"), subfolder="scheduler")

    @staticmethod
    def _condition_channels(sd15: str) -> int:
        """0 for a plain UNet, 1 + latent channels for an inpainting one (read from ``unet/config.json``);
        any other count is a :class:`ConfigError` before the weights are loaded."""
        config = UNet2DConditionModel.load_config(resolve_pretrained(sd15, "unet"), subfolder="unet")
        latent = config["out_channels"]
        extra = config["in_channels"] - latent
        if extra not in (0, inpainting_condition_channels(latent)):
            raise ConfigError(
                f"the UNet of '{sd15}' takes {config['in_channels']} input channels for {latent} latent channels: "
                f"neither a plain ({latent}) nor an inpainting ({latent + inpainting_condition_channels(latent)}) UNet"
            )
        return extra

    def condition(self, captions: Sequence[str], image_embeds: Tensor) -> Condition:
        """The denoiser's condition: the captions' text tokens and ``image_embeds [B, D_img]`` (zeros: none)."""
        condition = self.text_encoder.encode(captions)
        return condition.replace(added={"image_embeds": image_embeds.to(condition.context.device)})
