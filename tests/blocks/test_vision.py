"""Metric encoders: one constructor for tiny and published CLIP / DINO, frozen, offline errors in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import tiny_clip, tiny_dino
from zoo.blocks.vision import CLIPEncoder, DINOEncoder, torch_hub_file

IMAGES = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
TEXTS = ["a red circle", "Remove the blue square on the left!"]


@pytest.mark.parametrize("encoder_cls", [CLIPEncoder, DINOEncoder])
def test_tiny_encoder_reloads_from_a_folder_with_identical_features(encoder_cls: type, tmp_path: Path) -> None:
    tiny = encoder_cls(tiny={"seed": 3})
    tiny.save_pretrained(str(tmp_path))
    loaded = encoder_cls(pretrained=str(tmp_path))
    torch.testing.assert_close(loaded.image_features(IMAGES), tiny.image_features(IMAGES))
    if encoder_cls is CLIPEncoder:
        torch.testing.assert_close(loaded.text_features(TEXTS), tiny.text_features(TEXTS))


@pytest.mark.parametrize("encoder_cls", [CLIPEncoder, DINOEncoder])
def test_features_are_unit_norm_frozen_and_batch_independent(encoder_cls: type) -> None:
    encoder = encoder_cls(tiny={"seed": 0})
    features = encoder.image_features(IMAGES + [IMAGES[0]])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(features[0], features[3])  # identical images: cosine 1
    assert (features[0] @ features[1]).item() < 0.999
    torch.testing.assert_close(encoder.image_features(IMAGES[1:2])[0], features[1], atol=1e-5, rtol=0)
    # Different sizes in one batch: the processors resize each image.
    assert encoder.image_features([torch.rand(3, 20, 28), torch.rand(3, 40, 32)]).shape[0] == 2
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_clip_text_features_depend_on_the_text() -> None:
    texts = CLIPEncoder(tiny={"seed": 0}).text_features(TEXTS)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    assert (texts[0] @ texts[1]).item() < 0.999


def test_tiny_factories_are_deterministic() -> None:
    for factory in (lambda seed: tiny_clip(seed=seed)[0], lambda seed: tiny_dino(seed=seed)):
        a, b, c = factory(0).state_dict(), factory(0).state_dict(), factory(1).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dino_preprocessing_is_magicbrush_resize_and_centre_crop() -> None:
    encoder = DINOEncoder(tiny={"image_size": 32})
    wide = torch.zeros(3, 20, 60)
    wide[:, :, 20:40] = 1.0  # a white centre third: the crop keeps its middle, both sides dark
    pixels = encoder.preprocess(wide)
    assert pixels.shape == (3, 32, 32)
    # Shorter side 20 -> round(32 * 256 / 224) = 37 px, so width 111, centre 32 columns all inside the white band.
    white = (1 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(pixels[:, :, 4:-4], white[:, None, None].expand(3, 32, 24), atol=1e-3, rtol=0)


@pytest.mark.parametrize("encoder_cls", [CLIPEncoder, DINOEncoder])
def test_missing_checkpoint_is_one_clear_line(encoder_cls: type, tmp_path: Path) -> None:
    with pytest.raises(MissingPretrainedError, match="not available offline") as error:
        encoder_cls(pretrained=str(tmp_path / "no-such-model"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="exactly one"):
        encoder_cls()
    with pytest.raises(ValueError, match="bad `tiny` options"):
        encoder_cls(tiny={"no_such_option": 1})


def test_torch_hub_file_names_url_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "https://example.org/models/weights-abc123.pth"
    with pytest.raises(MissingPretrainedError) as error:
        torch_hub_file(url, "A metric")
    message = str(error.value)
    assert url in message and str(tmp_path / "hub" / "checkpoints") in message and "\n" not in message
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "weights-abc123.pth").write_bytes(b"x")
    assert torch_hub_file(url, "A metric") == tmp_path / "hub" / "checkpoints" / "weights-abc123.pth"
