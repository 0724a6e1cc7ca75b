"""Frozen image and text feature encoders for the similarity metrics, and the offline check of the
torch-hub weight files that torchvision / torch-fidelity feature networks (LPIPS, FID) load.

- :class:`CLIPEncoder`: transformers ``CLIPModel`` + ``CLIPProcessor``; unit-norm projected image
  embeddings (CLIP-I) and text embeddings (CLIP-T), as OpenAI CLIP's ``encode_image`` /
  ``encode_text`` that MagicBrush's ``evaluation/image_eval.py`` uses (ViT-B/32, its own preprocessing).
- :class:`DINOEncoder`: a transformers DINO ViT (``facebook/dino-vits16``, MagicBrush's DINO ViT-S/16;
  any ``AutoModel`` ViT with a CLS token, DINOv2 included); the unit-norm CLS embedding after the
  final norm, the output of DINO's own ``forward``. Preprocessing is MagicBrush's: shorter side to
  256/224 of the model's input size (bicubic), centre crop, ImageNet mean/std.

- :class:`CLIPImageEmbedder`: IP-Adapter's image encoder, transformers ``CLIPVisionModelWithProjection``
  + ``CLIPImageProcessor``; the unnormalised projected ``image_embeds`` IP-Adapter's ``ImageProjModel``
  consumes (ip-adapter_sd15: OpenCLIP ViT-H/14, 1024-d; ``IPAdapter.get_image_embeds``,
  ``tencent-ailab/IP-Adapter@62e4af9:ip_adapter/ip_adapter.py:140-150``).

- :class:`SigLIPEncoder`: ImgEdit-E1's frozen SigLIP (paper App. A.4: SigLIP v2-SO/16@512, i.e.
  ``google/siglip2-so400m-patch16-512``), transformers ``SiglipVisionModel`` + ``SiglipImageProcessor``;
  the patch tokens ``last_hidden_state`` ``[B, 1024, 1152]`` UniWorld-V1's ``siglip_projector`` reads.

All are built from a published id / local folder (``pretrained``) or a tiny random config
(``tiny``, see :mod:`zoo.blocks.tiny`) through the same constructor, frozen and in eval mode; inputs
are batches of images ``[3, H, W]`` in [0, 1] (sizes may differ), moved to the encoder's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionModelWithProjection,
    SiglipImageProcessor,
    SiglipVisionModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from zoo.blocks.frozen import FrozenModule
from zoo.blocks.pretrained import MissingPretrainedError, build_tiny, require_one_source, resolve_pretrained
from zoo.blocks.tiny import tiny_clip, tiny_clip_image_encoder, tiny_dino, tiny_siglip

# MagicBrush's DINO transform: Resize(256) then CenterCrop(224), i.e. the shorter side at 8/7 of the crop.
_DINO_RESIZE_RATIO = 256 / 224


def torch_hub_file(url: str, what: str) -> Path:
    """The file ``torch.hub.load_state_dict_from_url(url)`` reads, which must already be there.

    The zoo never downloads at run time, so a missing file is one actionable line.

    Raises:
        MissingPretrainedError: naming the URL and the folder to put it in.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        raise MissingPretrainedError(
            f"{what} needs the weights file {url}: download it once into {path.parent}/ "
            f"(the torch hub cache; set TORCH_HOME to move it)"
        )
    return path


class _FrozenEncoder(FrozenModule):
    """A frozen feature network (no gradients, always in eval) with the device of its weights."""

    model: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class CLIPEncoder(_FrozenEncoder):
    """CLIP image and text embeddings for CLIP-I / CLIP-T.

    Args:
        pretrained: local folder or cached hub id of a CLIP checkpoint (model + processor), e.g.
            ``openai/clip-vit-base-patch32`` (MagicBrush's ViT-B/32). Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_clip`, e.g. ``{"seed": 0, "image_size": 32}``.
    """

    def __init__(self, pretrained: str | None = None, tiny: dict | None = None) -> None:
        super().__init__()
        require_one_source(type(self).__name__, pretrained, tiny)
        if pretrained is not None:
            folder = resolve_pretrained(pretrained)
            self.model = CLIPModel.from_pretrained(folder)
            self.processor = CLIPProcessor.from_pretrained(folder)
        else:
            self.model, self.processor = build_tiny(tiny_clip, type(self).__name__, tiny)
        self.freeze()

    @torch.no_grad()
    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """Unit-norm projected embeddings ``[B, D]`` of images ``[3, H, W]`` in [0, 1]."""
        pixels = self.processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm projected embeddings ``[B, D]`` of texts, truncated to CLIP's context (77 tokens)."""
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(**tokens.to(self.device)).pooler_output
        return F.normalize(features.float(), dim=-1)

    def save_pretrained(self, path: str) -> None:
        """Write model and processor so that ``CLIPEncoder(pretrained=path)`` reloads them."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class DINOEncoder(_FrozenEncoder):
    """DINO CLS embeddings for the DINO similarity.

    Args:
        pretrained: local folder or cached hub id of a DINO ViT, e.g. ``facebook/dino-vits16``
            (MagicBrush's ViT-S/16). Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_dino`, e.g. ``{"seed": 0, "image_size": 32}``.
    """

    def __init__(self, pretrained: str | None = None, tiny: dict | None = None) -> None:
        super().__init__()
        require_one_source(type(self).__name__, pretrained, tiny)
        if pretrained is not None:
            self.model = AutoModel.from_pretrained(resolve_pretrained(pretrained))
        else:
            self.model = build_tiny(tiny_dino, type(self).__name__, tiny)
        self.freeze()

    def preprocess(self, image: Tensor) -> Tensor:
        """MagicBrush's DINO transform of one image ``[3, H, W]`` in [0, 1], at the model's input size."""
        crop = self.model.config.image_size
        image = TF.resize(image, round(crop * _DINO_RESIZE_RATIO), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [crop, crop])
        return TF.normalize(image, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))

    @torch.no_grad()
    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """Unit-norm CLS embeddings ``[B, D]`` of images ``[3, H, W]`` in [0, 1]."""
        pixels = torch.stack([self.preprocess(image.float().cpu()) for image in images]).to(self.device)
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)

    def save_pretrained(self, path: str) -> None:
        """Write the model so that ``DINOEncoder(pretrained=path)`` reloads it."""
        self.model.save_pretrained(path)


class CLIPImageEmbedder(_FrozenEncoder):
    """IP-Adapter's frozen image encoder: images -> unnormalised ``image_embeds`` ``[B, projection_dim]``.

    Args:
        pretrained: local folder or cached hub id of a ``CLIPVisionModelWithProjection``, e.g.
            ``h94/IP-Adapter`` with ``subfolder="models/image_encoder"`` (ViT-H/14). A folder without
            ``preprocessor_config.json`` (h94's has none) gets ``CLIPImageProcessor()``'s defaults,
            which is what the official ``IPAdapter`` builds (224 px, CLIP mean/std). Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_clip_image_encoder`, e.g. ``{"seed": 0}``.
        subfolder: folder of the encoder inside ``pretrained``.
    """

    def __init__(self, pretrained: str | None = None, tiny: dict | None = None, subfolder: str | None = None) -> None:
        super().__init__()
        require_one_source(type(self).__name__, pretrained, tiny)
        if pretrained is not None:
            folder = Path(resolve_pretrained(pretrained, subfolder)) / (subfolder or "")
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder)
            has_processor = (folder / "preprocessor_config.json").is_file()
            self.processor = CLIPImageProcessor.from_pretrained(folder) if has_processor else CLIPImageProcessor()
        else:
            self.model, self.processor = build_tiny(tiny_clip_image_encoder, type(self).__name__, tiny)
        self.freeze()

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Tensor]) -> Tensor:
        """``image_embeds [B, D]`` (float32, not normalised) of images ``[3, H, W]`` in [0, 1]: the
        processor's resize, crop and CLIP normalisation, without its 1/255 rescale."""
        pixels = self.processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.device)).image_embeds.float()

    def save_pretrained(self, path: str) -> None:
        """Write model and processor so that ``CLIPImageEmbedder(pretrained=path)`` reloads them."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


class SigLIPEncoder(_FrozenEncoder):
    """ImgEdit-E1's frozen SigLIP: images -> patch features ``[B, N, D]`` for the SigLIP projector.

    SigLIP2's fixed-resolution checkpoints (the paper's ``google/siglip2-so400m-patch16-512``: 1024
    tokens of 1152-d at 512²) are SigLIP v1 architecture (``model_type: siglip``), so one class
    serves SigLIP and SigLIP2-FixRes; a full image-text checkpoint loads its vision tower only.
    transformers' ``Siglip2VisionModel`` is SigLIP2's NaFlex variant (a variable number of
    patches per image, with a padding mask); ImgEdit-E1 and UniWorld use FixRes, so NaFlex
    checkpoints are refused in one line.

    Args:
        pretrained: local folder or cached hub id of a SigLIP / SigLIP2-FixRes checkpoint (full or
            vision-only) with its ``preprocessor_config.json``. Exclusive with ``tiny``.
        tiny: options of :func:`zoo.blocks.tiny.tiny_siglip`, e.g. ``{"seed": 0, "image_size": 32}``.
    """

    def __init__(self, pretrained: str | None = None, tiny: dict | None = None) -> None:
        super().__init__()
        require_one_source(type(self).__name__, pretrained, tiny)
        if pretrained is not None:
            folder = resolve_pretrained(pretrained)
            model_type = AutoConfig.from_pretrained(folder).model_type
            if model_type not in ("siglip", "siglip_vision_model"):
                raise ValueError(
                    f"SigLIPEncoder needs a SigLIP or SigLIP2 fixed-resolution checkpoint (model_type 'siglip'), "
                    f"got model_type '{model_type}' in {pretrained} (SigLIP2 NaFlex is not supported)"
                )
            self.model = SiglipVisionModel.from_pretrained(folder)
            self.processor = SiglipImageProcessor.from_pretrained(folder)
        else:
            self.model, self.processor = build_tiny(tiny_siglip, type(self).__name__, tiny)
        self.freeze()

    @property
    def feature_dim(self) -> int:
        """Width of the patch features (so400m: 1152)."""
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """Patch tokens per image (``(image_size / patch_size)^2``: 1024 at 512² with patch 16)."""
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    @torch.no_grad()
    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """``last_hidden_state [B, num_tokens, feature_dim]`` (float32) of images ``[3, H, W]`` in [0, 1]:
        the processor's resize to its square size and mean/std 0.5 normalisation, without its 1/255 rescale."""
        pixels = self.processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        return self.model(pixel_values=pixels).last_hidden_state.float()

    def save_pretrained(self, path: str) -> None:
        """Write model and processor so that ``SigLIPEncoder(pretrained=path)`` reloads them."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
