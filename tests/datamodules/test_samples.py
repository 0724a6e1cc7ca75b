from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.samples import EditBatch, EditSample, T2ISample, collate, resize_center_crop


def _gradient(width: int, height: int) -> Image.Image:
    x = np.tile(np.arange(width, dtype=np.uint8)[None, :], (height, 1))
    return Image.fromarray(np.stack([x, x, x], axis=2))


def test_edit_batch_contract_and_ranges() -> None:
    src = Image.new("RGB", (16, 16), (255, 0, 0))
    tgt = Image.new("RGB", (16, 16), (0, 0, 255))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 8))
    boxes = [{"box": [0, 0, 499, 499], "color": "red", "label": "square"}]
    samples = [EditSample("a", src, "do x", tgt, "bp", "add", mask, boxes), EditSample("b", src, "do y", tgt, mask=mask)]
    batch = collate(samples, resolution=16, mllm_resolution=8)
    assert batch.key == ["a", "b"] and batch.task == ["edit", "edit"]
    assert batch.instruction == ["do x", "do y"]
    assert batch.blueprint == ["bp", ""] and batch.edit_type == ["add", ""]
    assert batch.boxes == [boxes, []]
    assert batch.source.shape == (2, 3, 16, 16) and batch.target.shape == (2, 3, 16, 16)
    assert torch.equal(batch.source[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(batch.target[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    assert batch.mllm_image.shape == (2, 3, 8, 8)
    assert torch.allclose(batch.mllm_image[0, :, 3, 3], torch.tensor([1.0, 0.0, 0.0]))
    assert batch.mask.shape == (2, 1, 16, 16)
    assert batch.mask[0, 0, :8, :8].eq(1).all() and batch.mask[0, 0].sum() == 64


def test_mixed_batch_gives_t2i_rows_a_black_source_and_no_mllm_image() -> None:
    red, green = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 255, 0))
    mask = Image.new("L", (20, 20), 255)
    samples = [T2ISample("t", green, "a green square", chain="c1"), EditSample("e", red, "make it green", green, edit_type="recolour", mask=mask)]
    batch = collate(samples, resolution=16, mllm_resolution=8)
    edit_alone = collate(samples[1:], resolution=16, mllm_resolution=8)
    t2i_alone = collate(samples[:1], resolution=16, mllm_resolution=8)
    assert batch.task == ["t2i", "edit"] and batch.edits == [False, True]
    assert batch.instruction == ["a green square", "make it green"] and batch.edit_type == ["", "recolour"]
    assert batch.chain == ["c1", ""]
    # GoT's T2I reference is a black image; its MLLM row is a placeholder the modules never show.
    assert torch.equal(batch.source[0], -torch.ones(3, 16, 16)) and torch.equal(batch.mllm_image[0], torch.zeros(3, 8, 8))
    assert torch.equal(batch.source[1], edit_alone.source[0])
    assert torch.equal(batch.mllm_image[1], edit_alone.mllm_image[0])
    assert torch.equal(batch.target, torch.cat([t2i_alone.target, edit_alone.target]))
    assert batch.mask is None, "a T2I sample has no edit mask"
    edit_row = batch.select([1])
    assert edit_row.key == ["e"] and edit_row.edits == [True] and torch.equal(edit_row.source, edit_alone.source)


def _hand_built(task: list[str], **tensors: torch.Tensor) -> EditBatch:
    """An :class:`EditBatch` built field by field, as a test or a script may build one."""
    n = len(task)
    return EditBatch(key=[str(i) for i in range(n)], task=task, instruction=["x"] * n, size=(4, 4), blueprint=[""] * n,
                     chain=[""] * n, edit_type=[""] * n, boxes=[[] for _ in range(n)], turns=[[] for _ in range(n)],
                     optimized_instruction=[""] * n, history=[[] for _ in range(n)],
                     turn_target=[[] for _ in range(n)], turn_mask=[[] for _ in range(n)], **tensors)


def test_edits_of_hand_built_batches() -> None:
    assert _hand_built(["edit", "edit"], source=torch.zeros(2, 3, 4, 4)).edits == [True, True]
    assert _hand_built(["t2i"]).edits == [False]
    with pytest.raises(ValueError, match="'edit' or 't2i'"):
        _hand_built(["inpaint"])


def test_dim_transform_crops_centre_but_mllm_sees_full_image() -> None:
    src = _gradient(64, 32)  # wide: x value == column
    out = resize_center_crop(src, 16)
    assert out.size == (16, 16)
    # Shorter side 32 -> 16 halves the width to 32; the centre crop keeps columns 8..23 (source 16..47).
    row = np.asarray(out)[8, :, 0].astype(int)
    assert abs(row[0] - 17) <= 2 and abs(row[-1] - 47) <= 2
    batch = collate([EditSample("k", src, "x")], resolution=16, mllm_resolution=8)
    full = batch.mllm_image[0, 0, 4] * 255  # squashed: spans the whole 0..63 range
    assert full[0] < 8 and full[-1] > 55
    assert batch.target is None and batch.mask is None


def test_t2i_batch_and_errors() -> None:
    img = Image.new("RGB", (20, 20), (0, 255, 0))
    batch = collate([T2ISample("t", img, "a green square")], resolution=16, mllm_resolution=8)
    assert batch.instruction == ["a green square"] and batch.target.shape == (1, 3, 16, 16)
    assert batch.source is None and batch.mllm_image is None
    assert batch.task == ["t2i"] and batch.edit_type == [""]
    with pytest.raises(ValueError, match="some samples of the batch have a target"):
        collate([EditSample("a", img, "i", img), EditSample("b", img, "i")], 16, 8)
    with pytest.raises(ValueError, match="box 0 must be"):
        EditSample("bad", img, "i", boxes=[{"box": [0, 0, 1000, 5]}])
    batch = collate([EditSample("a", img, "i", mask=Image.new("L", (20, 20))), EditSample("b", img, "i")], 16, 8)
    assert batch.mask is None


def test_with_texts_of_moves_every_text_but_keeps_images_and_types() -> None:
    samples = [
        EditSample(
            key=str(i),
            source=Image.new("RGB", (8, 8), (i * 40, 0, 0)),
            target=Image.new("RGB", (8, 8), (0, i * 40, 0)),
            instruction=f"edit {i}",
            blueprint=f"blueprint {i}",
            chain=f"chain {i}",
            edit_type=f"type {i}",
        )
        for i in range(3)
    ]
    batch = collate(samples, 8, 8)
    wrong = batch.with_texts_of(1)
    assert wrong.instruction == ["edit 1", "edit 2", "edit 0"]
    assert wrong.blueprint == ["blueprint 1", "blueprint 2", "blueprint 0"] and wrong.chain == ["chain 1", "chain 2", "chain 0"]
    assert wrong.key == batch.key and wrong.edit_type == batch.edit_type
    assert torch.equal(wrong.source, batch.source) and torch.equal(wrong.target, batch.target)
    with pytest.raises(ValueError, match="its own again"):
        batch.with_texts_of(3)
    with pytest.raises(ValueError, match="its own again"):
        batch.select([0]).with_texts_of(1)
