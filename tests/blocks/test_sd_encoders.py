"""SD1.5's text encoder as a condition and IP-Adapter's image encoder: shapes, frozen, save_pretrained round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.vision import CLIPImageEmbedder


def test_text_condition_is_padded_unmasked_and_reloads(tmp_path: Path) -> None:
    encoder = SDTextEncoder(tiny={"seed": 0})
    condition = encoder.encode(["a red circle at the top left", ""])
    assert condition.context.shape == (2, 77, 32) and condition.mask.dtype == torch.bool and condition.mask.all()
    assert (condition.context[0] - condition.context[1]).abs().amax() > 1e-3
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    encoder.save_pretrained(str(tmp_path))
    again = SDTextEncoder(pretrained=str(tmp_path)).encode(["a red circle at the top left", ""])
    torch.testing.assert_close(again.context, condition.context, rtol=0, atol=0)


def test_pooled_text_is_clips_pooler_output_at_the_end_of_text_token() -> None:
    encoder = SDTextEncoder(tiny={"seed": 0})
    texts = ["a red circle at the top left", "remove it"]
    pooled = encoder.pooled(texts)
    tokens = encoder.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(tokens.input_ids).last_hidden_state  # after the final layer norm
    eos = tokens.input_ids.eq(encoder.tokenizer.eos_token_id).int().argmax(-1)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, states[torch.arange(2), eos], rtol=1e-5, atol=1e-5)
    assert (pooled[0] - pooled[1]).abs().amax() > 1e-3


def test_image_embeds_are_unnormalised_and_reload(tmp_path: Path) -> None:
    encoder = CLIPImageEmbedder(tiny={"seed": 0, "projection_dim": 24})
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = encoder.image_embeds(list(images))
    assert embeds.shape == (3, 24) and encoder.embed_dim == 24
    assert not torch.allclose(embeds.norm(dim=1), torch.ones(3), atol=0.05)
    torch.testing.assert_close(encoder.image_embeds(list(images[:1])), embeds[:1], atol=1e-5, rtol=1e-5)
    encoder.save_pretrained(str(tmp_path / "models" / "image_encoder"))
    again = CLIPImageEmbedder(pretrained=str(tmp_path), subfolder="models/image_encoder")
    torch.testing.assert_close(again.image_embeds(list(images)), embeds, rtol=0, atol=0)


def test_a_folder_without_preprocessor_config_gets_the_official_default(tmp_path: Path) -> None:
    CLIPImageEmbedder(tiny={"seed": 0}).model.save_pretrained(tmp_path)
    encoder = CLIPImageEmbedder(pretrained=str(tmp_path))
    assert encoder.processor.crop_size == {"height": 224, "width": 224}  # CLIPImageProcessor(), as IPAdapter builds it
    assert json.loads((tmp_path / "config.json").read_text())["projection_dim"] == 32


def test_missing_folders_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(MissingPretrainedError, match="no subfolder 'text_encoder'"):
        SDTextEncoder(pretrained=str(tmp_path))
    with pytest.raises(MissingPretrainedError, match="no subfolder 'models/image_encoder'"):
        CLIPImageEmbedder(pretrained=str(tmp_path), subfolder="models/image_encoder")
    with pytest.raises(ValueError, match="exactly one of"):
        SDTextEncoder()
