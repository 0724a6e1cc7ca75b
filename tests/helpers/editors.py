"""The evaluator tests' oracle editor (:class:`OracleEditor`), the synthetic edit batches it reads, and a CPU trainer to run it."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.samples import EditBatch, EditSample, collate
from zoo.modules.base import EditingModule

EDIT_TYPES = ("add", "remove")


def _sample_number(key: str) -> int:
    """The number a sample key ends with: ``s03`` -> 3, ``test_000004`` -> 4."""
    match = re.search(r"\d+$", key)
    if match is None:
        raise ValueError(f"sample key {key!r} does not end with a number")
    return int(match.group())


def _target_even_source_odd(batch: EditBatch) -> Tensor:
    even = torch.tensor([_sample_number(key) % 2 == 0 for key in batch.key], device=batch.source.device)
    return torch.where(even.view(-1, 1, 1, 1), batch.target, batch.source)


EDITS: dict[str, Callable[[EditBatch], Tensor]] = {
    "target": lambda batch: batch.target,
    "source": lambda batch: batch.source,
    "half_size_target": lambda batch: F.interpolate(batch.target, scale_factor=0.5, mode="bilinear"),
    "target_even_source_odd": _target_even_source_odd,
}


class OracleEditor(EditingModule):
    """An editor whose outputs are known exactly, so evaluator metrics can be asserted to exact values.

    The reference edit scores perfectly (PSNR inf, L1 0, LPIPS 0, FID 0), the unchanged source
    strictly worse. It stands in for no zoo code path: it is the controlled input of the evaluator
    under test, and it runs the real test/predict flow of :class:`EditingModule` (``edit_outputs``)
    through its ``edit_batch`` hook, the text of each edit being the base's ``condition_text``. A
    sampler's noise depends on the batch a sample lands in (which differs between 1 and 2 ranks);
    these edits do not, so multi-rank results must equal single-process ones.

    Args:
        mode: the edit, one of :data:`EDITS`: ``"target"`` (the reference edit), ``"source"`` (no edit),
            ``"half_size_target"`` (the reference at half the resolution), ``"target_even_source_odd"``
            (by the number the sample key ends with). A name, so the editor is built alike in spawned ranks.
        brighten: added to every edited pixel, in [0, 1] image units, then clamped to the image range.
    """

    def __init__(self, mode: str, brighten: float = 0.0) -> None:
        super().__init__()
        if mode not in EDITS:
            raise ValueError(f"unknown oracle edit {mode!r}; choose one of {sorted(EDITS)}")
        self.mode = mode
        self.brighten = brighten

    def edit_batch(
        self, batch: EditBatch, generator: torch.Generator | None = None, keep_given: bool = False
    ) -> tuple[Tensor, list[str]]:
        return (EDITS[self.mode](batch) + 2 * self.brighten).clamp(-1, 1), self.condition_text(batch)

    def training_loss(self, batch: EditBatch) -> dict[str, Tensor]:
        """A constant: the oracle learns nothing, but the base's validation step (where evaluators edit) needs a loss."""
        return {"loss": torch.zeros(())}


def _random_image(size: int, generator: torch.Generator) -> Image.Image:
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy())


def edit_batches(num: int, size: int = 32, with_target: bool = True, seed: int = 0) -> DataLoader:
    """:class:`EditBatch` batches (:func:`collate`) of random source and target images, keys ``s00``, ``s01``...

    Edit types alternate over :data:`EDIT_TYPES` (even keys ``add``, odd keys ``remove``).
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        source = _random_image(size, generator)
        target = _random_image(size, generator) if with_target else None
        samples.append(
            EditSample(key=f"s{i:02d}", source=source, instruction=f"edit number {i}", target=target, edit_type=EDIT_TYPES[i % len(EDIT_TYPES)])
        )
    return DataLoader(samples, batch_size=4, collate_fn=partial(collate, resolution=size, mllm_resolution=size))


def cpu_trainer(callbacks: list[L.Callback], log_dir: Path, devices: int = 1) -> L.Trainer:
    """A CPU Trainer with ``callbacks`` and TensorBoard logs in ``log_dir``.

    With ``devices`` > 1 this is one rank of a ``ddp`` job (launched by :func:`tests.helpers.ddp.launch`).
    """
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=TensorBoardLogger(str(log_dir), name=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def run_test(evaluator: L.Callback, editor: EditingModule, loader: DataLoader, log_dir: Path, devices: int = 1) -> None:
    """``Trainer.test`` of ``editor`` over ``loader`` with ``evaluator`` (see :func:`cpu_trainer`)."""
    cpu_trainer([evaluator], log_dir, devices).test(editor, dataloaders=loader)
