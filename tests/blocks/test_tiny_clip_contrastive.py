"""The contrastively pretrained tiny CLIP image encoder: deterministic, cached under its own key in the
published image_encoder layout, and it tells held-out edits from their sources where a random one cannot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from datamodules.toy import edit_sample
from datamodules.toy_scenes import Scene, ToyObject
from zoo.blocks.tiny_cache import TOY_SEED
from zoo.blocks.tiny_clip_contrastive import edit_pairs, layout_caption, pretrain_contrastively
from zoo.blocks.tiny_ip_adapter import IMAGE_ENCODER, IP_ADAPTER_FOLDER, TinyIPAdapterOptions, cache_folder, tiny_ip_adapter_sd15
from zoo.blocks.vision import CLIPImageEmbedder

QUICK = TinyIPAdapterOptions(steps=2, batch_size=4, images=8, contrastive_steps=3)
OBJECT_EDITS = ("add", "recolour", "replace")


def test_layout_caption_names_every_cell_in_order() -> None:
    scene = Scene("gray", (ToyObject("circle", "red", 8), ToyObject("square", "blue", 0)))
    assert layout_caption(scene) == (
        "top left blue square, top empty, top right empty, left empty, centre empty, right empty, "
        "bottom left empty, bottom empty, bottom right red circle, gray background"
    )


def encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    return CLIPImageEmbedder(pretrained=str(folder / IP_ADAPTER_FOLDER / IMAGE_ENCODER)).model.state_dict()


def test_contrastive_option_builds_the_same_encoder_twice_under_its_own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "a"))
    first = encoder_state(tiny_ip_adapter_sd15(QUICK))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "b"))
    second = encoder_state(tiny_ip_adapter_sd15(QUICK))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    random = CLIPImageEmbedder(tiny={"seed": QUICK.seed + 1, "image_size": QUICK.resolution}).model.state_dict()
    assert not torch.equal(first["visual_projection.weight"], random["visual_projection.weight"])
    plain = dataclasses.replace(QUICK, contrastive_steps=0)
    assert cache_folder(QUICK) != cache_folder(plain) and "contrastive_steps" not in plain.key()


def object_edit_cosine(encoder: CLIPImageEmbedder, count: int = 60) -> float:
    """Mean cos(embedding(source), embedding(target)) over the held-out add/recolour/replace edits of the first ``count``."""
    images, _ = edit_pairs("test", count, 32)
    embeds = encoder.image_embeds(list(images))
    cos = torch.nn.functional.cosine_similarity(embeds[0::2], embeds[1::2], dim=-1)
    rows = torch.tensor([edit_sample(TOY_SEED, "test", i)[0].edit_type in OBJECT_EDITS for i in range(count)])
    return cos[rows].mean().item()


def test_pretrained_encoder_tells_held_out_object_edits_from_their_sources() -> None:
    torch.set_num_threads(1)
    encoder = CLIPImageEmbedder(tiny={"seed": 1, "image_size": 32})
    random = object_edit_cosine(encoder)
    losses = pretrain_contrastively(encoder, steps=300, pairs=256, seed=4)
    trained = object_edit_cosine(encoder)
    assert random > 0.99  # the random encoder hardly sees a changed object
    assert trained < 0.95 and trained < random - 0.05, (random, trained)
    assert losses[-1] < 0.6 * losses[0]
