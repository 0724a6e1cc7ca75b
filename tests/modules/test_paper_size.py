"""Paper-size DIM and GoT built on the meta device: what trains, what is frozen outside the module tree.

No weights are read: the denoisers and codecs use their published configs, the VLM Qwen2.5-VL-3B's
widths and depths through the tiny factory (toy vocabulary: the published 151,936-row embedding and
LM head are ~0.62B more parameters; the vision MLP is 2x rather than 2.67x wide). The counts are
printed (``pytest -s``) for the closing notes and checked against the official numbers we have.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule

from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.denoisers import SanaConfig, UNetConfig
from zoo.blocks.got_chain import GoTVLMConfig
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig
from zoo.modules.dim import DIMModule
from zoo.modules.got import GoTModule

QWEN_3B = TinyVLMConfig(
    hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
    vision_hidden_size=1280, vision_depth=32, vision_heads=16, patch_size=14, min_pixels=784 * 4, max_pixels=784 * 64,
)
SANA_1600M = {  # SANA1.5_1.6B_1024px_diffusers transformer/config.json
    "attention_head_dim": 32, "caption_channels": 2304, "cross_attention_dim": 2240, "cross_attention_head_dim": 112,
    "in_channels": 32, "out_channels": 32, "mlp_ratio": 2.5, "num_attention_heads": 70, "num_cross_attention_heads": 20,
    "num_layers": 20, "patch_size": 1, "sample_size": 32, "norm_elementwise_affine": False, "norm_eps": 1e-6,
}
SDXL_UNET = {  # stable-diffusion-xl-base-1.0 unet/config.json
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2, "sample_size": 1024,
    "scaling_factor": 0.13025,
}


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _report(name: str, model: LightningModule) -> tuple[int, int]:
    trainable = _count(model, True)
    frozen = _count(model, False) + model.frozen_parts.num_parameters()
    parts = ", ".join(f"{part} {_count(module) / 1e6:,.1f}M" for part, module in model.frozen_parts.items())
    print(f"\n{name}: trainable {trainable:,} ({trainable / 1e9:.2f}B), frozen {frozen:,} ({frozen / 1e9:.2f}B; outside the tree: {parts})")
    return trainable, frozen


def _only_trainable_in_the_tree(model: LightningModule, frozen_names: set[str]) -> None:
    assert set(model.frozen_parts) == frozen_names
    in_tree = {id(p) for p in model.parameters()}
    assert not in_tree & {id(p) for _, part in model.frozen_parts.items() for p in part.parameters()}
    assert not any(key.split(".")[0] in frozen_names for key in model.state_dict())
    assert all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def dim() -> DIMModule:
    with torch.device("meta"):
        return DIMModule(
            mllm=VLMConfig(tiny=QWEN_3B, image_size=1024),
            denoiser=SanaConfig(config=SANA_1600M),
            autoencoder=CodecConfig("dc", config={}),  # AutoencoderDC's defaults are dc-ae-f32c32
            connector_hidden=2304,
        )


def test_paper_size_dim_trains_connector_dit_and_null_caption_only(dim: DIMModule) -> None:
    trainable, frozen = _report("DIM-4.6B-Edit", dim)
    _only_trainable_in_the_tree(dim, {"mllm", "codec"})
    assert _count(dim.connector) == 10_031_616  # official mlp2x_gelu 2048 -> 2304 -> 2304
    assert 1.55e9 < _count(dim.denoiser) < 1.65e9
    assert trainable == _count(dim.connector) + _count(dim.denoiser) + dim.null_caption.table.numel()
    assert 3.3e9 < frozen < 3.8e9


def test_paper_size_got_trains_lora_projectors_and_unet() -> None:
    with torch.device("meta"):
        got = GoTModule(
            mllm=GoTVLMConfig(tiny=QWEN_3B, image_size=448),
            denoiser=UNetConfig(config=SDXL_UNET),
            autoencoder=CodecConfig("kl", config=SDXL_VAE),
        )
    trainable, frozen = _report("GoT-6B", got)
    _only_trainable_in_the_tree(got, {"codec"})
    assert (_count(got.context_projector), _count(got.pooled_projector)) == (4_196_352, 2_622_720)  # official projectors
    assert 2.5e9 < _count(got.denoiser) < 2.6e9
    lora = _count(got.mllm, True)
    assert trainable == lora + _count(got.denoiser) + _count(got.context_projector) + _count(got.pooled_projector)
    assert 0 < lora < 0.05 * _count(got.mllm), "LoRA trains adapters, norms and (toy) embeddings, not the base"
    assert frozen == _count(got.mllm, False) + _count(got.codec)


QWEN_7B = TinyVLMConfig(  # Qwen2.5-VL-7B-Instruct config.json (toy vocabulary, as QWEN_3B)
    hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
    vision_hidden_size=1280, vision_depth=32, vision_heads=16, patch_size=14, min_pixels=784 * 4, max_pixels=784 * 64,
)
FLUX_DEV = {  # FLUX.1-dev transformer/config.json
    "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 16, "layers_per_block": 2, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}
# SigLIP2-so400m-patch16-512 widths and depth; the tiny factory makes the MLP 4 x 1152 wide (published 4304).
SIGLIP_SO400M_512 = {"image_size": 512, "patch_size": 16, "hidden_size": 1152, "num_layers": 27, "num_heads": 16}


@pytest.mark.parametrize("stage", [1, 2])
def test_paper_size_imgedit_e1_trains_the_projectors_then_the_image_branch(stage: int) -> None:
    from zoo.blocks.flux import FluxConfig, select_parameters
    from zoo.modules.imgedit_e1 import ImgEditE1Module

    with torch.device("meta"):
        model = ImgEditE1Module(
            mllm=VLMConfig(tiny=QWEN_7B, image_size=448),
            denoiser=FluxConfig(config=FLUX_DEV, seed=0),
            autoencoder=CodecConfig("kl", config=FLUX_VAE),
            stage=stage,
            siglip={"tiny": SIGLIP_SO400M_512} if stage == 2 else None,
        )
    trainable, frozen = _report(f"ImgEdit-E1 stage {stage}", model)
    assert _count(model.vlm_projector) == 94_388_224  # UniWorld's denoise_projector 3584 -> 12288 -> 4096
    if stage == 1:
        _only_trainable_in_the_tree(model, {"mllm", "codec", "denoiser"})
        assert trainable == _count(model.vlm_projector)
        assert 11.8e9 < _count(model.denoiser) < 12.0e9  # FLUX.1-dev's 12B transformer, frozen outside the tree
        return
    _only_trainable_in_the_tree(model, {"mllm", "codec", "siglip"})
    assert _count(model.siglip_projector) == 64_503_808  # FLUX-Redux's redux_up / redux_down: 1152 -> 12288 -> 4096
    assert model.siglip.num_tokens == 1024 and model.siglip.feature_dim == 1152
    image_branch = sum(p.numel() for name, p in model.denoiser.named_parameters() if name in set(select_parameters(model.denoiser, "double_image")))
    assert trainable == _count(model.vlm_projector) + _count(model.siglip_projector) + image_branch
    assert 3.0e9 < image_branch < 4.0e9, "the image stream of the 19 double-stream blocks"
