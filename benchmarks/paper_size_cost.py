"""Paper-size cost accounting on the meta device: what trains, what it costs to store, where a step's FLOPs go.

The modules are built as ``tests/modules/test_paper_size.py`` builds them (its published configs, no
weights; the VLMs with the toy vocabulary, see there). Per module:

* parameters trainable / frozen (frozen parts outside the module tree included);
* bytes: AdamW state = 8 B per trainable parameter (fp32 ``exp_avg`` + ``exp_avg_sq``); the zoo's
  checkpoint = trainable weights (fp32, 4 B) + AdamW state; a checkpoint of every weight would add
  2 B (bf16) per frozen parameter;
* forward FLOPs per sample of every part. Denoisers and autoencoders: ``torch.utils.flop_counter``
  over their real forward on meta tensors (matmuls, convolutions, attention; 2 FLOPs per
  multiply-add). VLM towers (their forward needs real token ids): ``2 * P_linear * T`` plus
  attention ``4 * T * T_attended * d`` per layer (Qwen2.5-VL's vision tower attends within
  8 x 8-patch windows except in its 4 full-attention layers), P_linear counted on the built module;
* a step's cost: a frozen part's forward once; a trained part's forward + backward = 3x forward; a
  frozen part that gradients pass through (ImgEdit-E1's FLUX, GoT's LoRA-wrapped VLM) 2x forward
  (input gradients only), plus 1x forward times the share of its parameters that train;
* the expected speed-up of a frozen-feature cache (``zoo data cache-features``) = step FLOPs /
  (step FLOPs - cacheable FLOPs), assuming time proportional to FLOPs (same MFU for every part;
  loading cached features free), and the bytes it stores per sample: each cacheable part's output
  in bf16 (VLM states over the condition's real tokens, not its padding; ImgEdit-E1 adds the int64
  token ids), as ``zoo data cache-features --dtype bfloat16`` writes them before compression
  (zlib saves little on such floats; benchmarks/feature_cache.py measures it at tiny size).

Sequence lengths (stated, per sample): DIM's VLM reads the source squashed to 1036² (74² patches ->
1,369 tokens) + 64 text tokens; DiT 32² latent tokens at 1024² (DC-AE f32). GoT: 448² (256 image
tokens) + 300 tokens of instruction and chain + its [IMG] tokens; SDXL UNet at 128² latents; the VAE
encodes the reference, the target and each box canvas of the chain (:data:`GOT_BOXES` per chain).
ImgEdit-E1: 448² + 40 text tokens; FLUX 64² image tokens at 1024²; stage 2 adds SigLIP-so400m at
512² (1,024 tokens) to the context. MIND-Edit: formulas only (its frozen tiny side is pretrained at build time,
the published one needs its weights): LLaVA-OneVision-7B fine-tuned on 5 x 729 image + 200 text
tokens, the frozen CLIP ViT-H/14 embedding of the target (the frozen SD1.5 side is not in its
training step). ``python -m benchmarks.paper_size_cost``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import table, write
from tests.modules.test_paper_size import FLUX_DEV, FLUX_VAE, QWEN_3B, QWEN_7B, SANA_1600M, SDXL_UNET, SDXL_VAE, SIGLIP_SO400M_512
from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.denoisers import SanaConfig, UNetConfig
from zoo.blocks.flux import FluxConfig
from zoo.blocks.got_chain import GoTVLMConfig
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig
from zoo.modules.dim import DIMModule
from zoo.modules.got import GoTModule
from zoo.modules.imgedit_e1 import ImgEditE1Module

VOCAB = 151_936
"""Qwen2.5's published vocabulary (the LM head GoT's chain loss runs through; the toy one is smaller)."""
BF16, IDS = 2, 8
"""Bytes of a cached bf16 float and of a cached int64 token id."""
GOT_BOXES = 3.78
"""Boxes per GoT reasoning chain: LAHR-GoT's mean (3.78 per image, HF ``LucasFang/GoT-6B`` README). The
SSGM (GoT §5.2) VAE-encodes one canvas per box, as the official ``GenCot.generate`` does."""


@dataclass
class Part:
    """One component's forward FLOPs per sample and how a training step uses it."""

    name: str
    params: int
    forward_flops: float
    passes: float
    """Forward-equivalents per step: 1 frozen, 3 trained, 2 frozen with gradients through it."""
    cacheable: bool
    """Frozen, with no gradient through it and a per-sample deterministic output: a feature cache removes it."""
    cached_bytes: int = 0
    """Bytes a feature cache stores per sample for this part's output (bf16 floats, int64 token ids)."""

    @property
    def step_flops(self) -> float:
        return self.forward_flops * self.passes


def _count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _linear_params(module: nn.Module, within: str) -> int:
    """Weights of the ``nn.Linear`` layers whose qualified name contains ``within``."""
    return sum(m.weight.numel() for name, m in module.named_modules() if isinstance(m, nn.Linear) and within in name)


def counted(run: Callable[[], Any]) -> float:
    """FLOPs of ``run()`` on meta tensors by ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def vlm_flops(vlm: nn.Module, config: TinyVLMConfig, image_side: int, text_tokens: int) -> tuple[float, float, int]:
    """(vision tower, LLM) forward FLOPs of a Qwen2.5-VL reading one image and ``text_tokens``; LLM tokens."""
    patches = (image_side // config.patch_size) ** 2
    window = (112 // config.patch_size) ** 2  # Qwen2.5-VL: 112-px windows; full attention in 4 of the layers
    full_layers = 4
    vision = 2 * _linear_params(vlm, "visual") * patches
    vision += 4 * patches * config.vision_hidden_size * (full_layers * patches + (config.vision_depth - full_layers) * window)
    tokens = patches // config.merge_size**2 + text_tokens
    llm = 2 * _linear_params(vlm, "language_model") * tokens + 4 * config.num_layers * tokens * tokens * config.hidden_size
    return float(vision), float(llm), tokens


def _denoiser(model: nn.Module) -> nn.Module:
    """The diffusers model inside a zoo denoiser wrapper."""
    return next(m for m in model.denoiser.modules() if type(m).__module__.startswith("diffusers.models"))


def _codec(model: nn.Module) -> nn.Module:
    return next(m for m in model.codec.modules() if type(m).__module__.startswith("diffusers.models"))


def dim_parts(side: int = 1024) -> tuple[nn.Module, list[Part]]:
    with torch.device("meta"):
        model = DIMModule(
            mllm=VLMConfig(tiny=QWEN_3B, image_size=side), denoiser=SanaConfig(config=SANA_1600M),
            autoencoder=CodecConfig("dc", config={}), connector_hidden=2304,
        )
        vision, llm, tokens = vlm_flops(model.mllm, QWEN_3B, 1036, 64)
        latent = side // 32
        dit, codec = _denoiser(model), _codec(model)
        in_channels = dit.config.in_channels
        sana = counted(lambda: dit(torch.randn(1, in_channels, latent, latent), encoder_hidden_states=torch.randn(1, tokens, 2304), timestep=torch.ones(1)))
        encode = counted(lambda: codec.encode(torch.randn(1, 3, side, side)))
    parts = [
        Part("VLM vision tower (Qwen2.5-VL-3B, frozen)", _count(model.mllm.model.model.visual), vision, 1, True),
        Part(f"VLM LLM, {tokens} tokens (frozen)", _count(model.mllm) - _count(model.mllm.model.model.visual), llm, 1, True,
             BF16 * tokens * QWEN_3B.hidden_size),
        Part("DC-AE encode x2 (source, target; frozen)", _count(model.codec), 2 * encode, 1, True, BF16 * 2 * 32 * latent * latent),
        Part("connector (trained)", _count(model.connector), 2 * _count(model.connector) * tokens, 3, False),
        Part("SANA-1.6B DiT (trained)", _count(model.denoiser), sana, 3, False),
    ]
    return model, parts


def got_parts(side: int = 1024) -> tuple[nn.Module, list[Part]]:
    mllm = GoTVLMConfig(tiny=QWEN_3B, image_size=448)
    with torch.device("meta"):
        model = GoTModule(mllm=mllm, denoiser=UNetConfig(config=SDXL_UNET), autoencoder=CodecConfig("kl", config=SDXL_VAE))
        vision, llm, tokens = vlm_flops(model.mllm, QWEN_3B, 448, 300 + mllm.image_tokens)
        llm += 2 * VOCAB * QWEN_3B.hidden_size * tokens  # the chain's LM head
        unet, codec = _denoiser(model), _codec(model)
        latent = side // 8
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        forward = counted(lambda: unet(torch.randn(1, unet.config.in_channels, latent, latent), torch.ones(1), encoder_hidden_states=torch.randn(1, mllm.image_tokens, 2048), added_cond_kwargs=added))
        encode = counted(lambda: codec.encode(torch.randn(1, 3, side, side)))
    vlm = _count(model.mllm)
    lora_share = _count(model.mllm, True) / vlm
    parts = [
        Part("VLM vision tower + LLM with LoRA (base frozen, gradients through)", vlm, vision + llm, 2 + lora_share, False),
        # Cached: the reference, the target and the mean of the box-canvas latents (one latent each).
        Part(f"SDXL VAE encode x{2 + GOT_BOXES:g} (reference, target, {GOT_BOXES:g} box canvases; frozen)", _count(model.codec),
             (2 + GOT_BOXES) * encode, 1, True, BF16 * 3 * 4 * latent * latent),
        Part("projectors (trained)", _count(model.context_projector) + _count(model.pooled_projector),
             2 * (_count(model.context_projector) * mllm.image_tokens + _count(model.pooled_projector)), 3, False),
        Part("SDXL UNet (trained)", _count(model.denoiser), forward, 3, False),
    ]
    return model, parts


def imgedit_parts(stage: int, side: int = 1024) -> tuple[nn.Module, list[Part]]:
    from zoo.blocks.flux import select_parameters

    with torch.device("meta"):
        model = ImgEditE1Module(
            mllm=VLMConfig(tiny=QWEN_7B, image_size=448), denoiser=FluxConfig(config=FLUX_DEV, seed=0),
            autoencoder=CodecConfig("kl", config=FLUX_VAE), stage=stage, siglip={"tiny": SIGLIP_SO400M_512} if stage == 2 else None,
        )
        vision, llm, tokens = vlm_flops(model.mllm, QWEN_7B, 448, 40)
        context = tokens + (1024 if stage == 2 else 0)
        flux, codec = _denoiser(model), _codec(model)
        image_tokens = (side // 16) ** 2
        forward = counted(lambda: flux(
            torch.randn(1, image_tokens, 64), encoder_hidden_states=torch.randn(1, context, 4096), pooled_projections=torch.randn(1, 768),
            timestep=torch.ones(1), img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(context, 3), guidance=torch.ones(1),
        ))
        encode = counted(lambda: codec.encode(torch.randn(1, 3, side, side)))
        trained_share = 0.0
        if stage == 2:
            names = set(select_parameters(model.denoiser, "double_image"))
            trained_share = sum(p.numel() for n, p in model.denoiser.named_parameters() if n in names) / _count(model.denoiser)
    projector = _count(model.vlm_projector)
    parts = [
        Part("VLM vision tower (Qwen2.5-VL-7B, frozen)", _count(model.mllm.model.model.visual), vision, 1, True),
        Part(f"VLM LLM, {tokens} tokens (frozen)", _count(model.mllm) - _count(model.mllm.model.model.visual), llm, 1, True,
             (BF16 * QWEN_7B.hidden_size + IDS) * tokens),
        Part("FLUX VAE encode (target; frozen)", _count(model.codec), encode, 1, True, BF16 * 16 * (side // 8) ** 2),
        Part("VLM projector (trained)", projector, 2 * projector * tokens, 3, False),
    ]
    if stage == 2:
        siglip = model.siglip
        patches = siglip.num_tokens
        width, depth = SIGLIP_SO400M_512["hidden_size"], SIGLIP_SO400M_512["num_layers"]
        flops = 2 * _linear_params(siglip, "") * patches + 4 * depth * patches * patches * width
        parts.append(Part("SigLIP-so400m at 512² (frozen)", _count(siglip), float(flops), 1, True, BF16 * patches * width))
        parts.append(Part("SigLIP projector (trained)", _count(model.siglip_projector), 2 * _count(model.siglip_projector) * patches, 3, False))
    flux_role = "image branch trained, gradients through" if stage == 2 else "frozen, gradients through"
    parts.append(Part(f"FLUX.1-dev, {image_tokens} + {context} tokens ({flux_role})", _count(model.denoiser), forward, 2 + trained_share, False))
    return model, parts


def mind_edit_parts() -> tuple[None, list[Part]]:
    """Formulas from the published configs: Qwen2-7B (28 x 3584, MLP 18944, 4 KV heads), SigLIP-so400m-384
    (27 x 1152, MLP 4304) with anyres-9 tiles of 729 tokens; CLIP ViT-H/14 at 224² (32 x 1280, MLP 5120)."""
    d, layers, mlp, kv = 3584, 28, 18944, 512
    llm_params = layers * (d * d * 2 + d * kv * 2 + 3 * d * mlp)
    tokens = 729 * 5 + 200  # base view + 4 anyres tiles, instruction + reply
    siglip_params = 27 * (4 * 1152**2 + 2 * 1152 * 4304)
    clip_params = 32 * (4 * 1280**2 + 2 * 1280 * 5120)
    parts = [
        Part("SigLIP-so400m, 5 x 729 patches (trained with the VLM)", siglip_params, 2 * siglip_params * 3645 + 4 * 27 * 729 * 729 * 1152 * 5, 3, False),
        Part(f"Qwen2-7B LLM, {tokens} tokens (trained)", llm_params, 2 * llm_params * tokens + 4 * layers * tokens * tokens * d, 3, False),
        Part("CLIP ViT-H/14 on the target (frozen)", clip_params, 2 * clip_params * 257 + 4 * 32 * 257 * 257 * 1280, 1, True, BF16 * 1024),
    ]
    return None, parts


def summary(model: nn.Module | None, parts: list[Part]) -> dict[str, Any]:
    """Parameter, byte and FLOP totals of one module, and the feature cache's expected speed-up."""
    if model is not None:
        trainable = _count(model, True)
        frozen = _count(model, False) + model.frozen_parts.num_parameters()
    else:
        trainable = sum(p.params for p in parts if p.passes >= 3)
        frozen = sum(p.params for p in parts if p.passes < 3)
    step = sum(p.step_flops for p in parts)
    cached = sum(p.step_flops for p in parts if p.cacheable)
    return {
        "trainable_params": trainable, "frozen_params": frozen,
        "optimizer_state_bytes": 8 * trainable, "checkpoint_bytes": 12 * trainable, "full_checkpoint_bytes": 12 * trainable + 2 * frozen,
        "step_flops_per_sample": step, "cacheable_flops_per_sample": cached, "cacheable_share": cached / step,
        "cache_speedup": step / (step - cached), "cache_bytes_per_sample": sum(p.cached_bytes for p in parts), "parts": [asdict(p) | {"step_flops": p.step_flops} for p in parts],
    }


BUILDERS: dict[str, Callable[[], tuple[nn.Module | None, list[Part]]]] = {
    "DIM-4.6B-Edit": dim_parts,
    "GoT-6B": got_parts,
    "ImgEdit-E1 stage 1": lambda: imgedit_parts(1),
    "ImgEdit-E1 stage 2": lambda: imgedit_parts(2),
    "MIND-Edit (formulas)": mind_edit_parts,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", nargs="*", default=None, help="module names to account (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    results = {name: summary(*build()) for name, build in BUILDERS.items() if args.only is None or name in args.only}
    rows = [
        [name, f"{r['trainable_params'] / 1e9:.3f}B", f"{r['frozen_params'] / 1e9:.2f}B", f"{r['optimizer_state_bytes'] / 2**30:.1f}",
         f"{r['checkpoint_bytes'] / 2**30:.1f}", f"{r['full_checkpoint_bytes'] / 2**30:.1f}", f"{r['step_flops_per_sample'] / 1e12:.1f}",
         f"{r['cacheable_share']:.1%}", f"{r['cache_speedup']:.2f}x", f"{r['cache_bytes_per_sample'] / 2**20:.2f}"]
        for name, r in results.items()
    ]
    header = ["module", "trainable", "frozen", "AdamW state GiB", "zoo ckpt GiB", "all-weights ckpt GiB", "TFLOPs / sample / step",
              "cacheable share", "feature-cache speed-up", "cache MiB / sample (bf16)"]
    parts = [[name, p["name"], f"{p['params'] / 1e6:,.0f}M", f"{p['forward_flops'] / 1e12:.2f}", p["passes"] if isinstance(p["passes"], int) else round(p["passes"], 3),
              f"{p['step_flops'] / 1e12:.2f}", "yes" if p["cacheable"] else ""] for name, r in results.items() for p in r["parts"]]
    markdown = (table(header, rows) + "\n\nPer part (forward TFLOPs per sample; passes = forward-equivalents per step):\n\n"
                + table(["module", "part", "params", "fwd TFLOPs", "passes", "step TFLOPs", "cacheable"], parts))
    write("paper_size_cost", {"only": args.only}, results, markdown, **({"out": args.out} if args.out else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
