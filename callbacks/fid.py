"""Fréchet Inception Distance of the edits to a set of real images (torchmetrics ``FrechetInceptionDistance``).

- Real images: every image under ``reference`` (a folder, searched recursively), or without one
  the references of the evaluated samples (the ``_TARGET`` images the flow saves from the test split).
- Fake images: every edit in the results folder, of this run and of earlier ones, so a resumed
  run reports the FID of the whole set (FID is a statistic of the set, not a mean of samples).

Each rank reads its share of both file lists and accumulates Inception statistics; torchmetrics
sums the states across ranks when computing, so every rank takes part and gets the same value.
Rank 0 writes ``fid.md`` / ``fid.csv``, ``summary.json`` and the ``fid/fid`` TensorBoard scalar.
The results folder must be on a file system every rank sees (as for resume). Images go to the
network as saved (uint8); torchmetrics resizes them to Inception's 299 px.

Inception: torch-fidelity's FID Inception v3 (the TF-ported weights every published FID uses,
2048-d pool features). It is the file ``weights-inception-2015-12-05-6726825d.pth``, read from the
torch hub cache or from ``inception_weights``; a missing file is one line naming URL and folder.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import FrechetInceptionDistance

from callbacks.gather import gather_objects
from callbacks.results import BenchmarkEvaluator, ResultsFolder
from zoo.blocks.config import ConfigError
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.vision import torch_hub_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in a fixed order."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"FID reference folder {root} does not exist: set reference to a folder of real images, or null for the test targets")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_uint8(path: Path) -> Tensor | None:
    """``[3, H, W]`` uint8 RGB, or ``None`` (logged) for a missing or undecodable file."""
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        log.warning("FID skips %s: %s", path, err)
        return None


class FIDEvaluator(BenchmarkEvaluator):
    """FID of all edits in the results folder against a reference set (see the module docstring).

    Args:
        label: the model's name in the table.
        reference: folder of real images; ``None`` = the references (targets) of the evaluated samples.
        feature: Inception feature width (64, 192, 768 or 2048; published FIDs use 2048), or any
            ``nn.Module`` mapping uint8 images ``[B, 3, H, W]`` to features ``[B, D]``.
        inception_weights: path of torch-fidelity's Inception weights; ``None`` = the torch hub cache.
        batch_size: images per forward of the feature extractor.
        output_dir: results folder (default ``<log_dir>/fid``).
        on_validation: also evaluate during fit's validation runs.
    """

    name = "fid"

    def __init__(
        self,
        label: str = "model",
        reference: str | None = None,
        feature: int | nn.Module = 2048,
        inception_weights: str | None = None,
        batch_size: int = 32,
        output_dir: str | None = None,
        on_validation: bool = False,
    ) -> None:
        super().__init__(output_dir, on_validation)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.label = label
        self.reference = reference
        self.feature = feature
        self.inception_weights = inception_weights
        self.batch_size = batch_size
        self.metric: FrechetInceptionDistance | None = None
        self._result: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Built before anything is generated, so a missing weights file or reference folder stops the run at once.
        if self.reference is not None:
            image_files(self.reference)
        if self.metric is None:
            self.metric = self._build_metric().to(trainer.strategy.root_device)

    def _build_metric(self) -> FrechetInceptionDistance:
        if isinstance(self.feature, nn.Module):
            return FrechetInceptionDistance(feature=self.feature)
        weights = self.inception_weights or str(torch_hub_file(URL_INCEPTION_V3, "FID's Inception v3"))
        if not Path(weights).is_file():
            raise MissingPretrainedError(f"FID Inception weights {weights} do not exist: download {URL_INCEPTION_V3} there")
        return FrechetInceptionDistance(feature=self.feature, feature_extractor_weights_path=weights)

    # -- features --

    def _real_files(self, folder: ResultsFolder, ids: list[str]) -> list[Path]:
        if self.reference is not None:
            return image_files(self.reference)
        return [p for p in (folder.companion(i, "TARGET") for i in ids) if p.is_file()]

    def _update(self, metric: FrechetInceptionDistance, files: list[Path], real: bool) -> int:
        """Add the features of ``files`` (same-size images batched together); return how many were read."""
        read = 0
        for start in range(0, len(files), self.batch_size):
            by_size: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
            for path in files[start : start + self.batch_size]:
                image = load_uint8(path)
                if image is not None:
                    by_size[tuple(image.shape)].append(image)
            for images in by_size.values():
                metric.update(torch.stack(images).to(metric.device), real=real)
                read += len(images)
        return read

    def _measure(self, trainer: L.Trainer) -> dict[str, Any]:
        """FID over every edit in the folder; a collective: every rank must call it."""
        assert self.folder is not None and self.metric is not None
        ids = sorted(self.folder.generated())
        fake = [self.folder.edited(i) for i in ids]
        real = self._real_files(self.folder, ids)
        rank, world = trainer.global_rank, trainer.world_size
        metric = self.metric
        metric.reset()
        counts = (self._update(metric, real[rank::world], real=True), self._update(metric, fake[rank::world], real=False))
        n_real, n_fake = map(sum, zip(*gather_objects(trainer, counts)))
        # Covariances need two samples per side; every rank sees the same totals, so all skip together.
        fid = float(metric.compute()) if min(n_real, n_fake) >= 2 else math.nan
        return {"fid": fid, "edits": n_fake, "references": n_real, "reference": self.reference or "targets of the evaluated samples"}

    # -- flow --

    def _finish(self, trainer: L.Trainer, stage: str) -> None:
        trainer.strategy.barrier()  # every rank's generated entries are on disk before any rank lists them
        self._result = self._measure(trainer)
        super()._finish(trainer, stage)

    def score(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        """One record per edit, for the resume bookkeeping; FID itself is measured over every edit in the folder."""
        return [{"id": e["id"], "edit_type": e["edit_type"]} for e in entries]

    def summarize(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        result = self._result
        if math.isnan(result["fid"]):
            log.warning("FID needs at least 2 edits and 2 references, got %d and %d", result["edits"], result["references"])
        row = [self.label, result["fid"], result["edits"], result["references"]]
        title = f"FID against {result['reference']} (lower is better)"
        folder.write_table("fid", (["model", "FID", "edits", "references"], [row]), title=title)
        folder.write_json("summary", {"label": self.label, **result})
        return {"fid": result["fid"]}
