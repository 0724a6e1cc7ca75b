"""peft LoRA on VLMEncoder: typed options, which weights train, adapter save/load (both families)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from torch import nn

from zoo.blocks.config import ConfigError
from zoo.blocks.mllm import LoRAConfig, TinyVLMConfig, VLMConfig, VLMEncoder

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
TEXTS = ["Remove the red circle.", "Add a blue square at the top left, keep the rest."]
LLM_ATTENTION = LoRAConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q|v)_proj", modules_to_save=["lm_head"])


def _lora_encoder(family: str, lora: LoRAConfig = LLM_ATTENTION) -> VLMEncoder:
    tiny = TinyVLMConfig(family=family, hidden_size=32, intermediate_size=64, vision_depth=1)
    return VLMEncoder(VLMConfig(tiny=tiny, image_size=32, max_condition_length=128, lora=lora))


def _images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 40, generator=torch.Generator().manual_seed(3))


def test_defaults_are_pefts_and_build_a_causal_lm_config() -> None:
    peft_defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
    ours = dataclasses.asdict(LoRAConfig())
    assert ours == {name: peft_defaults[name] for name in ours}
    config = LLM_ATTENTION.peft_config()
    assert isinstance(config, LoraConfig) and config.task_type == "CAUSAL_LM"
    assert (config.r, config.lora_alpha, config.target_modules, config.modules_to_save) == (
        4, 8, LLM_ATTENTION.target_modules, ["lm_head"]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_and_saved_modules_train_and_follow_the_parent(family: str) -> None:
    encoder = _lora_encoder(family)
    parent = nn.ModuleDict({"mllm": encoder})
    parent.train()
    assert encoder.model.training
    parent.eval()
    assert not encoder.model.training
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert {n.split(".")[-4] for n in trainable if ".lora_A." in n} == {"q_proj", "v_proj"}
    assert not any("vision" in n or "visual" in n for n in trainable)
    assert [n for n in trainable if "modules_to_save" in n] == ["model.base_model.model.lm_head.modules_to_save.default.weight"]
    states, mask = encoder.condition(_images(2), TEXTS)
    states[mask].square().mean().backward()
    graded = {n for n, p in encoder.named_parameters() if p.grad is not None}
    assert graded and graded <= trainable and all(".lora_" in n for n in graded)  # the LM head is off the path
    assert all(p.grad.abs().sum() > 0 for n, p in encoder.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_save_load_round_trip(family: str, tmp_path: Path) -> None:
    trained = _lora_encoder(family)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    trained.eval()
    expected = trained.condition(_images(2), TEXTS)[0]
    trained.save_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="save_adapter"):
        trained.save_pretrained(str(tmp_path / "full"))
    fresh = _lora_encoder(family).eval()
    assert not torch.allclose(fresh.condition(_images(2), TEXTS)[0], expected)
    fresh.load_adapter(str(tmp_path))
    torch.testing.assert_close(fresh.condition(_images(2), TEXTS)[0], expected, rtol=0, atol=1e-6)
    other = _lora_encoder(family, dataclasses.replace(LLM_ATTENTION, target_modules=r".*language_model.*\.k_proj"))
    with pytest.raises(ValueError, match="does not fit"):
        other.load_adapter(str(tmp_path))


def test_bad_lora_options_and_uses_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lora.r"):
        LoRAConfig(r=0)
    with pytest.raises(ConfigError, match="lora.lora_alpha"):
        LoRAConfig(lora_alpha=0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        LoRAConfig(lora_dropout=1.0)
    with pytest.raises(TypeError, match="rank"):
        LoRAConfig(rank=4)
    with pytest.raises(ConfigError, match="freeze: false"):
        VLMConfig(tiny=TinyVLMConfig(), freeze=False, lora=LoRAConfig())
    plain = VLMEncoder(VLMConfig(tiny=TinyVLMConfig(hidden_size=32)))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        plain.save_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="no LoRA adapters to load into"):
        plain.load_adapter(str(tmp_path))
