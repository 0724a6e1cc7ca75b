"""A short tiny DIM fit learns edits that only the instruction tells apart.

Four toy edits share ONE source image (remove, recolour, background, add), so no function of the
source alone can produce their four targets: after a short fit the model must score well above
copying the source on these samples, and lower when the instruction is taken away (the null
condition) or swapped for another sample's. The tiny DiT carries position information
(``interpolation_scale``), without which "add at the top left" cannot be placed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.toy_score import toy_edit_scores
from datamodules.samples import EditBatch, EditSample, collate
from datamodules.toy_scenes import Scene, ToyObject, render
from tests.modules.conftest import TINY_MLLM, TINY_SANA
from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.denoisers import SanaConfig
from zoo.blocks.objectives import FlowMatching
from zoo.modules.base import Optimization
from zoo.modules.dim import DIMModule

RESOLUTION = 16
STEPS = 600


def _edit(source: Scene, target: Scene, instruction: str, key: str) -> EditSample:
    before, after = render(source, RESOLUTION), render(target, RESOLUTION)
    mask = (before != after).any(axis=2)
    return EditSample(
        key=key,
        source=Image.fromarray(before),
        target=Image.fromarray(after),
        instruction=instruction,
        mask=Image.fromarray(mask.astype(np.uint8) * 255),
        edit_type=key,
    )


def shared_source_batch() -> EditBatch:
    red, blue = ToyObject("circle", "red", 0), ToyObject("square", "blue", 4)
    source = Scene("black", (red, blue))
    samples = [
        _edit(source, Scene("black", (blue,)), "Remove the red circle.", "remove"),
        _edit(source, Scene("black", (red, ToyObject("square", "yellow", 4))), "Make the blue square yellow.", "recolour"),
        _edit(source, Scene("white", (red, blue)), "Change the background to white.", "background"),
        _edit(source, Scene("black", (red, blue, ToyObject("triangle", "green", 8))), "Add a green triangle at the bottom right.", "add"),
    ]
    return collate(samples, RESOLUTION, RESOLUTION)


def tiny_dim() -> DIMModule:
    torch.manual_seed(0)
    return DIMModule(
        mllm=TINY_MLLM,
        # The tiny SANA of the module tests at patch 1, two layers and with position information.
        denoiser=SanaConfig(config={**TINY_SANA.config, "patch_size": 1, "num_layers": 2, "interpolation_scale": 1.0}, subfolder=None),
        autoencoder=CodecConfig("identity"),
        cfg_dropout=0.25,
        guidance_scale=1.0,
        num_inference_steps=10,
        objective=FlowMatching(shift=3.0),
        optim=Optimization(lr=3e-3),
    )


def score(model: DIMModule, batch: EditBatch) -> float:
    images, _ = model.edit_batch(batch, torch.Generator().manual_seed(0))
    scores = toy_edit_scores((images + 1) / 2, (batch.target + 1) / 2, batch.mask)
    return float(scores["score"].mean())


@pytest.fixture(scope="module")
def fitted() -> tuple[DIMModule, EditBatch]:
    model, batch = tiny_dim(), shared_source_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model.training_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, batch


def test_fit_learns_the_four_edits_of_one_source(fitted: tuple[DIMModule, EditBatch]) -> None:
    model, batch = fitted
    copy = float(toy_edit_scores((batch.source + 1) / 2, (batch.target + 1) / 2, batch.mask)["score"].mean())
    assert copy == pytest.approx(0.5)
    assert score(model, batch) >= 0.8


def test_the_instruction_is_what_tells_the_edits_apart(fitted: tuple[DIMModule, EditBatch]) -> None:
    model, batch = fitted
    trained = score(model, batch)
    assert score(model, batch.with_texts_of(1)) <= trained - 0.15  # another sample's instruction
    model.guidance_scale = 0.0  # the null condition's prediction alone
    try:
        assert score(model, batch) <= trained - 0.15
    finally:
        model.guidance_scale = 1.0


def test_edit_region_share_needs_the_masks_and_changes_the_loss() -> None:
    batch = shared_source_batch()
    plain, weighted = tiny_dim(), tiny_dim()
    weighted.objective = FlowMatching(shift=3.0, edit_region_share=0.5)
    torch.manual_seed(1)
    plain_loss = plain.diffusion_loss(batch, plain.encode_condition(batch))
    torch.manual_seed(1)
    weighted_loss = weighted.diffusion_loss(batch, weighted.encode_condition(batch))
    assert not torch.isclose(plain_loss, weighted_loss)  # same noise, same weights: only the weighting differs
    with pytest.raises(ValueError, match="needs the edit-region mask"):
        weighted.diffusion_loss(batch.replace(mask=None), weighted.encode_condition(batch))
