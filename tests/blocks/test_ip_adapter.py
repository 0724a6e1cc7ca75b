"""IP-Adapter on a tiny diffusers UNet through diffusers' loader: parity with the official formulas (parity
check 12), the published file layouts, UNetDenoiser's image_embeds path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from tests.blocks.test_denoisers import unet_inputs
from zoo.blocks.denoisers import UNetConfig, UNetDenoiser
from zoo.blocks.ip_adapter import (
    IPAdapterWeightsError,
    cross_attention_names,
    init_ip_adapter_weights,
    install_ip_adapter,
    ip_adapter_weights,
    load_ip_adapter_weights,
    save_ip_adapter_weights,
)
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import TINY_SD15_UNET

EMBED_DIM = 12
# Cross-attention at one level and in the mid block: 4 attn2 (down 1, up 2 = layers_per_block + 1, mid 1).
UNET = {**TINY_SD15_UNET, "sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [16, 32]}


def random_weights(unet: UNet2DConditionModel, seed: int = 0) -> dict:
    """Weights in the published layout with every tensor random (so no term can hide behind an init)."""
    weights = init_ip_adapter_weights(unet, EMBED_DIM, seed)
    g = torch.Generator().manual_seed(seed)
    return {part: {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in values.items()} for part, values in weights.items()}


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def make_denoiser(scale: float = 1.0, seed: int = 0) -> tuple[UNetDenoiser, dict]:
    torch.manual_seed(seed)
    denoiser = UNetDenoiser(UNetConfig(config=UNET)).eval()
    weights = random_weights(denoiser.model, seed)
    install_ip_adapter(denoiser.model, weights, scale)
    return denoiser, weights


def inputs() -> dict:
    return {k: v for k, v in unet_inputs().items() if k not in ("condition", "added_conditions")}


# --- the official formulas, by hand (tencent-ailab/IP-Adapter ip_adapter.py ImageProjModel, IPAttnProcessor2_0) ---


def official_image_proj(embeds: torch.Tensor, w: dict, cross: int) -> torch.Tensor:
    tokens = F.linear(embeds, w["proj.weight"], w["proj.bias"]).reshape(-1, 4, cross)
    return F.layer_norm(tokens, (cross,), w["norm.weight"], w["norm.bias"])


def official_ip_attention(attn, hidden: torch.Tensor, context: torch.Tensor, k_ip, v_ip, scale: float) -> torch.Tensor:
    end_pos = context.shape[1] - 4  # the last 4 context tokens are the image tokens
    text, ip = context[:, :end_pos], context[:, end_pos:]

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

    q = heads(attn.to_q(hidden))
    out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    out = out + scale * F.scaled_dot_product_attention(q, heads(F.linear(ip, k_ip)), heads(F.linear(ip, v_ip)))
    out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_installed_attention_equals_the_official_formulas(scale: float) -> None:
    unet = make_unet()
    weights = random_weights(unet)
    install_ip_adapter(unet, weights, scale)
    g = torch.Generator().manual_seed(3)
    embeds, text = torch.randn(2, EMBED_DIM, generator=g), torch.randn(2, 6, 32, generator=g)
    ours_tokens = unet.encoder_hid_proj([embeds[:, None]])[0]
    official_tokens = official_image_proj(embeds, weights["image_proj"], 32)
    torch.testing.assert_close(ours_tokens[:, 0], official_tokens)
    for i, name in enumerate(cross_attention_names(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = torch.randn(2, 5, attn.to_q.in_features, generator=g)
        ours = attn(hidden, encoder_hidden_states=(text, [ours_tokens]))
        key = 2 * i + 1
        k_ip, v_ip = weights["ip_adapter"][f"{key}.to_k_ip.weight"], weights["ip_adapter"][f"{key}.to_v_ip.weight"]
        official = official_ip_attention(attn, hidden, torch.cat([text, official_tokens], dim=1), k_ip, v_ip, scale)
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)


def test_processors_on_every_cross_attention_and_self_attention_untouched() -> None:
    unet = make_unet()
    install_ip_adapter(unet, random_weights(unet))
    procs = unet.attn_processors
    cross = [n for n in procs if n.endswith("attn2.processor")]
    assert len(cross) == 4 and cross == cross_attention_names(unet)
    assert all(type(procs[n]) is IPAdapterAttnProcessor2_0 for n in cross)
    assert all(type(procs[n]) is AttnProcessor2_0 for n in procs if n.endswith("attn1.processor"))
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"


def test_init_copies_to_k_to_v_as_tutorial_train() -> None:
    unet = make_unet()
    weights = init_ip_adapter_weights(unet, EMBED_DIM)
    attn = unet.get_submodule(cross_attention_names(unet)[2].removesuffix(".processor"))
    torch.testing.assert_close(weights["ip_adapter"]["5.to_k_ip.weight"], attn.to_k.weight, rtol=0, atol=0)
    torch.testing.assert_close(weights["ip_adapter"]["5.to_v_ip.weight"], attn.to_v.weight, rtol=0, atol=0)
    assert weights["image_proj"]["proj.weight"].shape == (4 * 32, EMBED_DIM)


def test_denoiser_uses_the_image_embedding_and_scale_zero_is_the_plain_unet() -> None:
    denoiser, _ = make_denoiser()
    x = inputs()
    embeds = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(5))
    out = denoiser(**x, added_conditions={"image_embeds": embeds})
    other = denoiser(**x, added_conditions={"image_embeds": embeds.flip(0)})
    assert (out - other).abs().amax() > 1e-3
    shared = denoiser(**x, added_conditions={"image_embeds": embeds[:1]})
    torch.testing.assert_close(shared[0], out[0])
    muted, _ = make_denoiser(scale=0.0)
    plain = make_unet()(x["latents"], x["timestep"], x["context"]).sample
    torch.testing.assert_close(muted(**x, added_conditions={"image_embeds": embeds}), plain, atol=1e-6, rtol=1e-5)
    assert denoiser.has_ip_adapter and denoiser.image_embed_dim == EMBED_DIM


def test_denoiser_image_embeds_errors() -> None:
    denoiser, _ = make_denoiser()
    with pytest.raises(ValueError, match="exactly 'image_embeds'"):
        denoiser(**inputs())
    with pytest.raises(ValueError, match=r"image_embeds must be \[2 or 1, 12\]"):
        denoiser(**inputs(), added_conditions={"image_embeds": torch.zeros(2, 7)})


@pytest.mark.parametrize("name", ["ip-adapter_sd15.bin", "ip-adapter_sd15.safetensors"])
def test_weight_files_round_trip_and_the_installed_weights_read_back(name: str, tmp_path: Path) -> None:
    unet = make_unet()
    weights = random_weights(unet)
    save_ip_adapter_weights(weights, tmp_path / name)
    loaded = load_ip_adapter_weights(tmp_path / name)
    install_ip_adapter(unet, loaded)
    back = ip_adapter_weights(unet)
    for part in weights:
        assert back[part].keys() == weights[part].keys()
        for key in weights[part]:
            torch.testing.assert_close(back[part][key], weights[part][key], rtol=0, atol=0)


def test_missing_and_malformed_files_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(MissingPretrainedError, match="ip-adapter_sd15.bin"):
        load_ip_adapter_weights(tmp_path / "ip-adapter_sd15.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(IPAdapterWeightsError, match="not a readable torch weight file"):
        load_ip_adapter_weights(tmp_path / "junk.bin")
    torch.save({"image_proj": {"latents": torch.zeros(1)}, "ip_adapter": {}}, tmp_path / "plus.bin")
    with pytest.raises(IPAdapterWeightsError, match="Plus/FaceID variants are not supported"):
        load_ip_adapter_weights(tmp_path / "plus.bin")
    unet = make_unet()
    wrong_width = random_weights(unet)
    wrong_width["image_proj"]["proj.weight"] = torch.zeros(4 * 16, EMBED_DIM)
    with pytest.raises(IPAdapterWeightsError, match="cross_attention_dim 32"):
        install_ip_adapter(unet, wrong_width)
    fewer = random_weights(unet)
    fewer["ip_adapter"] = {k: v for k, v in fewer["ip_adapter"].items() if not k.startswith("7.")}
    with pytest.raises(IPAdapterWeightsError, match="adapt 3 cross-attentions, the UNet has 4"):
        install_ip_adapter(unet, fewer)
