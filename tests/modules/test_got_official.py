"""Loading the official GoT-6B checkpoint layout: a tiny module built the way the official ``GenCot``
builds itself (peft model, ``output_projector(.projector)``, 12-channel UNet, VAE), with random
weights, saved as the official code saves it; our GoTModule must then compute what it computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.modules.test_got import make
from zoo.blocks.got_tokens import add_got_tokens, cover_vocabulary
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import TINY_KL, TINY_SDXL_UNET, tiny_qwen2_5_vl
from zoo.modules.got import GoTModule
from zoo.modules.got_official import load_official_got, official_key


class _Projector(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.projector = nn.Linear(width, out)


class OfficialLayout(nn.Module):
    """The attribute layout of the official ``GenCot`` (its config: LoRA r=32 → r=4 here, same modules)."""

    def __init__(self, ours: GoTModule) -> None:
        super().__init__()
        qwen, processor = tiny_qwen2_5_vl(seed=0, hidden_size=32, num_layers=1, intermediate_size=64, vision_depth=1)
        add_got_tokens(processor, 64)
        cover_vocabulary(qwen, processor.tokenizer)
        lora = LoraConfig(
            r=4,
            lora_alpha=4,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
            modules_to_save=["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm"],
            task_type="CAUSAL_LM",
        )
        self.mllm = get_peft_model(qwen, lora)
        width = ours.mllm.hidden_size
        self.output_projector = _Projector(width, ours.context_projector.out_features)
        self.output_projector_add = _Projector(width, ours.pooled_projector.out_features)
        self.unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        old = self.unet.conv_in
        self.unet.conv_in = nn.Conv2d(12, old.out_channels, old.kernel_size, old.stride, old.padding)
        self.vae = AutoencoderKL(**TINY_KL)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in self.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)


def _legacy(key: str) -> str:
    """The pre-5 transformers layout of a Qwen2.5-VL key under the peft prefix."""
    inner = "mllm.base_model.model."
    if key.startswith(inner + "model.visual."):
        return inner + key[len(inner + "model.") :]
    if key.startswith(inner + "model.language_model."):
        return inner + "model." + key[len(inner + "model.language_model.") :]
    return key


@pytest.fixture(scope="module")
def official_and_ours() -> tuple[OfficialLayout, GoTModule]:
    ours = make()  # tiny GoT with LoRA r=4 on GoT's target modules
    return OfficialLayout(ours).eval(), ours.eval()


def _save_sharded(state: dict[str, torch.Tensor], folder: Path) -> Path:
    folder.mkdir()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def _assert_same_computation(official: OfficialLayout, ours: GoTModule) -> None:
    ids = torch.tensor([[5, 17, 9, 23, 2]])
    torch.testing.assert_close(ours.mllm.model(input_ids=ids).logits, official.mllm(input_ids=ids).logits)
    states = torch.randn(2, 64, ours.mllm.hidden_size)
    torch.testing.assert_close(ours.context_projector(states), official.output_projector.projector(states))
    torch.testing.assert_close(ours.pooled_projector(states), official.output_projector_add.projector(states))
    x = torch.randn(1, 12, 8, 8)
    context = torch.randn(1, 64, ours.denoiser.context_dim)
    added = {"text_embeds": torch.randn(1, ours.pooled_projector.out_features), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    expected = official.unet(x, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    torch.testing.assert_close(ours.denoiser.model(x, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample, expected)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours.codec.model.encode(image).latent_dist.mode(), official.vae.encode(image).latent_dist.mode())


def test_sharded_official_checkpoint_gives_the_official_computation(official_and_ours, tmp_path: Path) -> None:
    official, ours = official_and_ours
    state = official.state_dict()
    loaded = load_official_got(ours, _save_sharded(state, tmp_path / "GoT-6B"))
    assert loaded == len(state)
    _assert_same_computation(official, ours)


def test_constructor_loads_the_official_weights(official_and_ours, tmp_path: Path) -> None:
    official, _ = official_and_ours
    torch.save(official.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same_computation(official, make(official_weights=str(tmp_path)).eval())
    with pytest.raises(ValueError, match="not both"):
        make(official_weights=str(tmp_path), init_from=str(tmp_path / "last.ckpt"))


def test_legacy_qwen_layout_single_file_loads_the_same(official_and_ours, tmp_path: Path) -> None:
    official, ours = official_and_ours
    legacy = {_legacy(k): v for k, v in official.state_dict().items()}
    assert any(k.startswith("mllm.base_model.model.visual.") for k in legacy)
    assert any(k.startswith("mllm.base_model.model.model.layers.") for k in legacy)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    load_official_got(ours, tmp_path / "pytorch_model.bin")
    _assert_same_computation(official, ours)


def test_key_mapping() -> None:
    assert official_key("output_projector.projector.weight") == "context_projector.weight"
    assert official_key("output_projector_add.projector.bias") == "pooled_projector.bias"
    assert official_key("unet.conv_in.weight") == "denoiser.model.conv_in.weight"
    assert official_key("vae.decoder.conv_out.bias") == "codec.model.decoder.conv_out.bias"
    assert official_key("mllm.base_model.model.lm_head.weight") == "mllm.model.base_model.model.lm_head.weight"
    assert official_key("mllm.base_model.model.visual.merger.mlp.0.weight") == "mllm.model.base_model.model.model.visual.merger.mlp.0.weight"
    assert (
        official_key("mllm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        == "mllm.model.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    )
    assert official_key("mllm.base_model.model.model.language_model.norm.weight") == "mllm.model.base_model.model.model.language_model.norm.weight"
    assert official_key("scheduler.betas") is None


def test_mismatched_checkpoints_fail_naming_the_tensor(official_and_ours, tmp_path: Path) -> None:
    official, ours = official_and_ours
    state = official.state_dict()
    with pytest.raises(MissingPretrainedError, match="hf download LucasFang/GoT-6B"):
        load_official_got(ours, tmp_path / "absent")
    torch.save(state | {"extra_head.weight": torch.zeros(2)}, tmp_path / "extra.bin")
    with pytest.raises(KeyError, match="extra_head.weight"):
        load_official_got(ours, tmp_path / "extra.bin")
    lora_key = next(k for k in state if "lora_A" in k)
    torch.save({k: v for k, v in state.items() if k != lora_key}, tmp_path / "partial.bin")
    with pytest.raises(KeyError, match="does not set 1 trainable"):
        load_official_got(ours, tmp_path / "partial.bin")
    torch.save(state | {"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "narrow.bin")
    with pytest.raises(ValueError, match="conv_in.weight"):
        load_official_got(ours, tmp_path / "narrow.bin")
