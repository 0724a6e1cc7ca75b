"""MINDEditModule: the two heads' losses, what trains, what checkpoints hold, masked and mask-free edits,
the optimized instruction's parsing, and the ablations by config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from datamodules.samples import EditBatch, collate
from datamodules.toy import edit_sample
from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.config import ConfigError
from zoo.blocks.connectors import cosine_embedding_loss
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig
from zoo.blocks.optimized_instruction import parse
from zoo.blocks.sd15_ip_adapter import IPAdapterSD15Config
from zoo.modules.mind_edit import MINDEdit, MINDEditModule

TINY_LLAVA = VLMConfig(
    tiny=TinyVLMConfig(family="llava_onevision", seed=0, hidden_size=32, num_layers=3),
    hidden_layer=2,
    max_condition_length=160,
    image_size=32,
    freeze=False,
)


def make(**overrides: Any) -> MINDEditModule:
    kwargs = {
        "mllm": TINY_LLAVA,
        "diffusion": IPAdapterSD15Config(tiny={}),
        "autoencoder": CodecConfig("identity"),
        "num_inference_steps": 3,
        "max_new_tokens": 8,
        "guidance_scale": 1.0,
    }
    return MINDEditModule(**(kwargs | overrides))


def toy_batch(size: int = 3) -> EditBatch:
    return collate([edit_sample(0, "train", i, 32)[0] for i in range(size)], 32, 32)


@pytest.fixture(scope="module")
def model() -> MINDEditModule:
    return make()


def test_loss_is_ce_plus_lambda_one_minus_cos_and_only_the_mllm_and_head_learn(model: MINDEditModule) -> None:
    batch = toy_batch()
    model.zero_grad()
    terms = model.training_loss(batch)
    assert set(terms) == {"loss", "text_ce", "embed_cos"}
    torch.testing.assert_close(terms["loss"].detach(), terms["text_ce"] + 2.0 * terms["embed_cos"])
    # The cosine term is 1 - cos against IP-Adapter's image encoder on the targets.
    states, mask = model.mllm.condition(batch.mllm_images, model.requests(batch))
    with torch.no_grad():
        insight = model.vision_head(states, mask)
    target = model.image_encoder.image_embeds(list((batch.target + 1) / 2))
    torch.testing.assert_close(terms["embed_cos"], cosine_embedding_loss(insight, target), rtol=1e-5, atol=1e-5)
    terms["loss"].backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"mllm", "vision_head"}
    for frozen in (model.denoiser, model.text_encoder, model.image_encoder):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())


def test_checkpoints_hold_the_mllm_and_head_not_the_frozen_diffusion_side(model: MINDEditModule) -> None:
    keys = model.trainable_state_keys()
    assert keys and {key.split(".")[0] for key in keys} == {"mllm", "vision_head"}
    assert not any(name.startswith(("denoiser", "text_encoder", "image_encoder")) for name in model.state_dict())
    assert "image_embeds" not in "".join(keys) and model.vision_head.mlp.net[-1].out_features == model.denoiser.image_embed_dim


def test_independent_heads_by_weights() -> None:
    vision_only = make(text_weight=0.0)
    batch = toy_batch().replace(optimized_instruction=[""] * 3)  # a vision head alone needs no annotations
    assert set(vision_only.training_loss(batch)) == {"loss", "embed_cos"}
    with pytest.raises(ValueError, match="optimized instruction"):
        make().training_loss(batch)
    with pytest.raises(ConfigError, match="both 0"):
        make(text_weight=0.0, embed_weight=0.0)


def test_masked_edit_keeps_the_source_outside_the_mask_exactly(model: MINDEditModule) -> None:
    batch = toy_batch()
    prepared = model.prepare_batch(batch)
    assert all(isinstance(text, str) for text in prepared.optimized_instruction)
    edited = model.synthesize(prepared, torch.Generator().manual_seed(0))
    outside = (1 - batch.mask).bool().expand_as(edited)
    torch.testing.assert_close(edited[outside], batch.source[outside], rtol=0, atol=1e-6)
    assert not torch.allclose(edited, batch.source)


def test_mask_free_edit_and_the_insight_reach_the_unet() -> None:
    model = make(use_masks=False, teacher_instructions=True, strength=1.0)
    batch = toy_batch(2)
    with_insight = model.synthesize(model.prepare_batch(batch), torch.Generator().manual_seed(0))
    model.use_insight = False
    without = model.synthesize(model.prepare_batch(batch), torch.Generator().manual_seed(0))
    assert with_insight.shape == batch.source.shape
    assert (with_insight - without).abs().mean() > 1e-3, "the image embedding must change the edit"


def test_unparsable_instructions_are_counted_and_fall_back_to_the_raw_instruction() -> None:
    model = make(teacher_instructions=True)
    batch = toy_batch(2).replace(optimized_instruction=["not the format", 'optimized_prompt: "a" negative_prompt: "b"'])
    prepared = model.prepare_batch(batch)
    assert model.unparsed_instructions == 1
    prompts = model.prompts(prepared)
    assert prompts[0].optimized_prompt == batch.instruction[0] and prompts[0].negative_prompt == ""
    assert (prompts[1].optimized_prompt, prompts[1].negative_prompt) == ("a", "b")
    model.prompts(prepared)
    assert model.unparsed_instructions == 1, "reading the prompts again counts nothing"


def test_text_only_and_insight_only_ablations_condition_as_stated() -> None:
    batch = toy_batch(2)
    insight_only = make(use_optimized_instruction=False)
    assert [p.optimized_prompt for p in insight_only.prompts(insight_only.prepare_batch(batch))] == batch.instruction
    text_only = make(use_insight=False, teacher_instructions=True)
    condition = text_only.encode_condition(text_only.prepare_batch(batch))
    assert torch.count_nonzero(condition.added["image_embeds"]) == 0
    assert text_only.condition_text(batch) == batch.optimized_instruction
    parse(batch.optimized_instruction[0])  # the toy data's rewrite is in the format


def test_edit_returns_the_optimized_instruction_the_insight_and_an_image(model: MINDEditModule) -> None:
    sample = edit_sample(0, "test", 0, 32)[0]
    result = model.edit(sample.source, sample.instruction, mask=sample.mask)
    assert isinstance(result, MINDEdit) and result.image.size == (32, 32)
    assert result.insight is not None and result.insight.shape == (model.denoiser.image_embed_dim,)
    free = model.edit(sample.source, sample.instruction)
    assert free.image.size == (32, 32)
    with pytest.raises(ValueError, match="mask must have its source image's size"):
        model.edit(sample.source, sample.instruction, mask=Image.new("L", (8, 8)))


def test_t2i_samples_are_refused(model: MINDEditModule) -> None:
    batch = EditBatch.for_inference([None], ["a red circle"], 32, 32)
    with pytest.raises(ValueError, match="text-to-image"):
        model.prepare_batch(batch)


def test_insight_cosine_is_the_held_out_embed_term(model: MINDEditModule) -> None:
    batch = toy_batch(2)
    with torch.no_grad():
        terms = model.training_loss(batch)
    cosines = model.insight_cosine(batch)
    torch.testing.assert_close(cosines["embed_cos"], terms["embed_cos"], rtol=1e-5, atol=1e-5)
    source = model.image_encoder.image_embeds(list((batch.source + 1) / 2))
    target = model.image_encoder.image_embeds(list((batch.target + 1) / 2))
    torch.testing.assert_close(cosines["embed_cos_copy"], cosine_embedding_loss(source, target))


def test_an_inpainting_unet_gets_the_mask_and_masked_source_as_input_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    quick = {"steps": 2, "batch_size": 4, "images": 8, "inpainting": True}
    model = make(diffusion=IPAdapterSD15Config(tiny=quick), teacher_instructions=True, strength=0.7)
    inputs: list[torch.Tensor] = []
    model.denoiser.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    batch = model.prepare_batch(toy_batch(2))
    model.synthesize(batch, torch.Generator().manual_seed(0))
    # Conditional and null branches in one call, both given the mask and masked source (as diffusers' CFG);
    # every step runs: no img2img start with a mask.
    assert len(inputs) == 3 and all(x.shape == (4, 7, 32, 32) for x in inputs)
    for x in inputs:
        torch.testing.assert_close(x[:, 3:4], batch.mask.repeat(2, 1, 1, 1))  # 1 = repaint
        torch.testing.assert_close(x[:, 4:], (batch.source * (1 - batch.mask)).repeat(2, 1, 1, 1))
    inputs.clear()
    model.use_masks = False
    model.synthesize(batch, torch.Generator().manual_seed(0))
    assert len(inputs) == int(3 * 0.7)  # started from the source noised to strength
    assert inputs[0][:, 3].eq(1).all() and inputs[0][:, 4:].eq(0).all()  # diffusers' mask-free: all masked
