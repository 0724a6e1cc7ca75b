"""Image encoders: one constructor for tiny and published CLIP / DINO / SigLIP, frozen, offline errors in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Siglip2VisionConfig, SiglipConfig, SiglipModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.tiny import tiny_clip, tiny_dino, tiny_siglip
from zoo.blocks.vision import CLIPEncoder, DINOEncoder, SigLIPEncoder, torch_hub_file

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
    for factory in (lambda seed: tiny_clip(seed=seed)[0], lambda seed: tiny_dino(seed=seed), lambda seed: tiny_siglip(seed=seed)[0]):
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


# --- SigLIP (ImgEdit-E1's image tokens) -------------------------------------------------------


def test_siglip_features_are_patch_tokens_of_the_normalised_image(tmp_path: Path) -> None:
    encoder = SigLIPEncoder(tiny={"seed": 0, "image_size": 32, "patch_size": 8})
    assert (encoder.num_tokens, encoder.feature_dim) == (16, 32)
    features = encoder.image_features(IMAGES)
    assert features.shape == (3, 16, 32) and features.dtype == torch.float32
    # Images already at the processor's size: only SigLIP's mean/std 0.5 normalisation, no 1/255 rescale.
    expected = encoder.model(pixel_values=torch.stack(IMAGES) * 2 - 1).last_hidden_state
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
    assert encoder.image_features([torch.rand(3, 20, 44)]).shape == (1, 16, 32)
    encoder.train()
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    encoder.save_pretrained(str(tmp_path))
    torch.testing.assert_close(SigLIPEncoder(pretrained=str(tmp_path)).image_features(IMAGES), features)


def test_siglip_loads_the_vision_tower_of_a_full_checkpoint(tmp_path: Path) -> None:
    # google/siglip2-so400m-patch16-512 is a full image-text SiglipModel (model_type "siglip").
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(text_config={**tower, "vocab_size": 40}, vision_config={**tower, "image_size": 32, "patch_size": 8}))
    full.save_pretrained(tmp_path)
    tiny_siglip(image_size=32)[1].save_pretrained(tmp_path)
    encoder = SigLIPEncoder(pretrained=str(tmp_path))
    expected = full.eval().vision_model(pixel_values=torch.stack(IMAGES) * 2 - 1).last_hidden_state
    torch.testing.assert_close(encoder.image_features(IMAGES), expected, atol=1e-5, rtol=1e-4)


def test_siglip_refuses_naflex_and_missing_checkpoints(tmp_path: Path) -> None:
    Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaFlex is not supported"):
        SigLIPEncoder(pretrained=str(tmp_path))
    with pytest.raises(MissingPretrainedError, match="not available offline"):
        SigLIPEncoder(pretrained=str(tmp_path / "google-siglip2"))
