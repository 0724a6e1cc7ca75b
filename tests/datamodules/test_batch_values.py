"""The ShardDataModule's batches hold exactly the values recorded before the data path was optimised.

Golden fixtures and the demos depend on exact numbers, so every speed-up of decoding, transforms or
collation (uint8 across the worker boundary, fewer copies) must leave each float of every batch
unchanged. The hashes below were recorded from commit dc20b1b's data path on this project's pinned
Pillow/torch; the shards mix JPEG and PNG members, non-square sizes, "L" and RGBA inputs, masks,
later-turn targets and masks, and a text-to-image sample in an edit batch.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from PIL import Image

from datamodules.samples import ORIGINAL_BYTES, EditBatch, EditSample, T2ISample
from datamodules.shard_format import write_split
from datamodules.shards import ShardDataModule

RESOLUTION, MLLM_RESOLUTION = 24, 20
TRAIN_HASH = "5e0fd419df93d6001109ff88eceab493b5d9bef8a3f36a3646ded3da41c234f4"
# Memory layout too (convolutions may round differently on another one): batches contiguous, the
# later turns' per-image tensors with the HWC strides of a permuted numpy array.
TRAIN_LAYOUT = [
    [(1728, 576, 24, 1), (1728, 576, 24, 1), (1200, 400, 20, 1), None, []],
    [(1728, 576, 24, 1), (1728, 576, 24, 1), (1200, 400, 20, 1), (576, 576, 24, 1), [(1, 72, 3), (1, 72, 3), (1, 24, 1), (1, 24, 1)]],
]
VAL_HASH = "c2cebf8ddf5397f8d4f8327f6428ddc1df5986d0669ba051834b1d4b15036725"


def _pixels(rng: np.random.Generator, size: tuple[int, int], channels: int) -> np.ndarray:
    """Smooth gradients plus noise: resampling filters see real structure, not only flat colour."""
    width, height = size
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    noise = rng.integers(0, 64, (height, width, channels))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray) -> Image.Image:
    """A JPEG-decoded image that a shard writer stores as its original JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.info[ORIGINAL_BYTES] = buffer.getvalue()
    return image


def _samples() -> list[EditSample | T2ISample]:
    rng = np.random.default_rng(0)
    samples: list[EditSample | T2ISample] = []
    for i in range(6):
        size = [(56, 40), (40, 64), (33, 33), (24, 24), (80, 30), (45, 70)][i]
        source = _jpeg(_pixels(rng, size, 3)) if i % 2 else Image.fromarray(_pixels(rng, size, 4), "RGBA")
        target = _jpeg(_pixels(rng, size, 1)) if i % 3 == 0 else Image.fromarray(_pixels(rng, size, 3))
        mask = Image.fromarray(((_pixels(rng, size, 1)[..., 0] > 128) * 255).astype(np.uint8), "L")
        turns = ["then this", "and that"] if i == 2 else []
        later = [Image.fromarray(_pixels(rng, size, 3)) for _ in turns]
        later_masks = [Image.fromarray(_pixels(rng, size, 1)[..., 0], "L") for _ in turns]
        samples.append(
            EditSample(
                key=f"s{i}", source=source, instruction=f"edit {i}", target=target, mask=mask,
                turns=turns, turn_targets=later, turn_masks=later_masks,
            )
        )
    samples.insert(3, T2ISample(key="t0", image=Image.fromarray(_pixels(rng, (50, 36), 3)), prompt="a picture"))
    return samples


def _digest(batches: list[EditBatch]) -> str:
    """sha256 over every tensor of the batches (dtype, shape and bytes), in field order."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(" ".join(batch.key).encode())
        for tensor in [batch.source, batch.target, batch.mllm_image, batch.mask] + [t for row in batch.turn_target + batch.turn_mask for t in row]:
            if tensor is None:  # no mask in a batch holding the text-to-image sample
                digest.update(b"none")
                continue
            assert tensor.dtype == torch.float32
            digest.update(f"{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _layout(batches: list[EditBatch]) -> list[list]:
    return [
        [None if t is None else t.stride() for t in (b.source, b.target, b.mllm_image, b.mask)]
        + [[t.stride() for row in b.turn_target + b.turn_mask for t in row]]
        for b in batches
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("values")
    write_split(root / "train", _samples(), samples_per_shard=3)
    return root / "train"


def _module(split: Path, workers: int) -> ShardDataModule:
    dm = ShardDataModule(
        train_shards=str(split), val_shards=str(split), batch_size=4, val_batch_size=4, num_workers=workers,
        resolution=RESOLUTION, mllm_resolution=MLLM_RESOLUTION, seed=1, shuffle_buffer=3,
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers", [0, 1])
def test_train_and_val_batches_hold_the_recorded_values(shards: Path, workers: int) -> None:
    dm = _module(shards, workers)
    batches = list(dm.train_dataloader())
    assert _digest(batches) == TRAIN_HASH and _layout(batches) == TRAIN_LAYOUT
    assert _digest(list(dm.val_dataloader())) == VAL_HASH


def test_batches_through_the_trainer_hook_hold_the_recorded_values(shards: Path) -> None:
    """Under a running trainer the loader ships uint8 levels; ``on_after_batch_transfer`` (after the
    move to the device) makes them the recorded floats."""
    dm = _module(shards, 1)
    dm.trainer = SimpleNamespace(testing=False, current_epoch=0, state=SimpleNamespace(status=TrainerStatus.RUNNING))
    shipped = list(dm.train_dataloader())
    assert all(b.source.dtype == b.target.dtype == b.mllm_image.dtype == torch.uint8 for b in shipped)
    batches = [dm.on_after_batch_transfer(batch.to("cpu"), 0) for batch in shipped]
    assert _digest(batches) == TRAIN_HASH and _layout(batches) == TRAIN_LAYOUT
