"""Similarity of edits to reference edits: the metrics of MIND-Edit's Table 1 (CLIP-I, LPIPS, PSNR,
SSIM) and of GoT's Emu-Edit columns (Table 2: CLIP-I, CLIP-T), with MagicBrush's DINO and L1.

Per sample, the edit against its reference (the data's target image), following MagicBrush's
``evaluation/image_eval.py``, the usual implementation of these metrics for instruction editing
(MIND-Edit and GoT name neither the CLIP nor the DINO variant):

- CLIP-I: cosine of the CLIP image embeddings (ViT-B/32, ``openai/clip-vit-base-patch32``);
- CLIP-T: cosine of the edit's CLIP image embedding and the text embedding of the *output caption*
  (the description of the target image, Emu Edit's ``output_caption``). Never the instruction: a
  sample without an output caption gets ``clip_t: null`` and is counted in the "no caption" column;
- DINO: cosine of the DINO ViT-S/16 CLS embeddings (``facebook/dino-vits16``);
- LPIPS: torchmetrics ``LearnedPerceptualImagePatchSimilarity`` (AlexNet, the LPIPS authors'
  metric setting), images in [0, 1] at their own resolution;
- PSNR (dB; ``inf`` for identical images) and SSIM: torchmetrics, data range 1;
- L1: mean absolute difference of the [0, 1] images.

Edits are compared at the reference's size: one of another size is resized to it (bicubic), as
MagicBrush does. A sample without a reference is recorded as a failure, not skipped silently.

Output captions come from ``captions`` (a JSONL file of ``{"id": ..., "output_caption": ...}``
rows) or from the benchmark's case info (``output_caption``), the file first.

Offline weights: CLIP and DINO are hub ids or local folders (:mod:`zoo.blocks.vision`); LPIPS's
linear heads ship inside torchmetrics, its backbone is torchvision's ImageNet checkpoint, read from
the torch hub cache (``$TORCH_HOME/hub/checkpoints/``; :func:`lpips_metric` names the file). The
metric models are built at ``setup``, before anything is generated, so a missing file stops the run
at once; they are frozen and live on the run's device.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

from callbacks.results import BenchmarkEvaluator, ResultsFolder
from zoo.blocks.chat import to_tensor
from zoo.blocks.vision import CLIPEncoder, DINOEncoder, torch_hub_file

log = logging.getLogger(__name__)

LPIPSNet = Literal["alex", "vgg", "squeeze"]

COLUMNS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "lpips": "LPIPS", "psnr": "PSNR", "ssim": "SSIM", "l1": "L1"}
"""Metric keys of the records, in table order, with their column names."""

# The torchvision checkpoints torchmetrics' LPIPS backbones load (``<Net>_Weights.DEFAULT``).
_LPIPS_BACKBONES = {
    "alex": torchvision.models.AlexNet_Weights,
    "vgg": torchvision.models.VGG16_Weights,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights,
}

EncoderT = TypeVar("EncoderT", CLIPEncoder, DINOEncoder)


def pair_metrics(edited: Tensor, target: Tensor) -> dict[str, float]:
    """PSNR (dB; ``inf`` for identical images), SSIM and mean absolute error of two [3,H,W] images in [0, 1]."""
    if edited.shape != target.shape:
        raise ValueError(f"edited {tuple(edited.shape)} and target {tuple(target.shape)} differ in shape")
    x, y = edited[None].double(), target[None].double()
    return {
        "psnr": float(peak_signal_noise_ratio(x, y, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(x, y, data_range=1.0)),
        "l1": float((x - y).abs().mean()),
    }


def lpips_metric(net: LPIPSNet = "alex") -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics LPIPS (per-sample scores, inputs in [0, 1]) over a torchvision ImageNet backbone.

    torchmetrics ships LPIPS's linear heads (``lpips_models/<net>.pth``) but builds the backbone
    with torchvision's ``<Net>_Weights.DEFAULT``, which torchvision downloads on first use; that
    file is looked up here first, so a machine without it gets one line naming URL and folder.

    Raises:
        MissingPretrainedError: the backbone checkpoint is not in the torch hub cache.
    """
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    torch_hub_file(_LPIPS_BACKBONES[net].DEFAULT.url, f"LPIPS ({net})")
    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)


def read_captions(path: str | Path) -> dict[str, str]:
    """Output captions by sample id from JSONL rows ``{"id": ..., "output_caption": ...}``."""
    captions = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("output_caption"), str):
            raise ValueError(f"{path}:{number}: expected {{\"id\": str, \"output_caption\": str}}, got {line[:200]!r}")
        captions[row["id"]] = row["output_caption"]
    return captions


def _encoder(cls: type[EncoderT], source: str | dict) -> EncoderT:
    """An id or folder is a published checkpoint, a dict the options of a tiny random one."""
    return cls(pretrained=source) if isinstance(source, str) else cls(tiny=source)


def _cosine(a: Tensor, b: Tensor) -> list[float]:
    """Row-wise cosine of unit-norm embeddings, clamped to [-1, 1] against rounding."""
    return (a * b).sum(dim=-1).clamp(-1, 1).tolist()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SimilarityEvaluator(BenchmarkEvaluator):
    """Scores every edit against its reference; per-type and overall tables of every metric.

    Args:
        label: the model's name in the tables.
        clip: CLIP for CLIP-I and CLIP-T: a hub id or local folder (default MagicBrush's ViT-B/32),
            or options of :func:`zoo.blocks.tiny.tiny_clip` for a random toy model; ``None`` = neither metric.
        dino: DINO ViT for the DINO similarity: id/folder (default ``facebook/dino-vits16``) or
            options of :func:`zoo.blocks.tiny.tiny_dino`; ``None`` = no DINO.
        lpips: LPIPS backbone, ``alex`` (default), ``vgg`` or ``squeeze``; ``None`` = no LPIPS.
        captions: JSONL file of ``{"id", "output_caption"}`` rows for CLIP-T.
        batch_size: images per forward of the metric models.
        output_dir: results folder (default ``<log_dir>/similarity``).
        on_validation: also evaluate during fit's validation runs.
    """

    name = "similarity"

    def __init__(
        self,
        label: str = "model",
        clip: str | dict | None = "openai/clip-vit-base-patch32",
        dino: str | dict | None = "facebook/dino-vits16",
        lpips: LPIPSNet | None = "alex",
        captions: str | None = None,
        batch_size: int = 16,
        output_dir: str | None = None,
        on_validation: bool = False,
    ) -> None:
        super().__init__(output_dir, on_validation)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.label = label
        self.clip_source, self.dino_source, self.lpips_net = clip, dino, lpips
        self.captions = read_captions(captions) if captions else {}
        self.batch_size = batch_size
        self.clip: CLIPEncoder | None = None
        self.dino: DINOEncoder | None = None
        self.lpips: LearnedPerceptualImagePatchSimilarity | None = None

    @property
    def metrics(self) -> list[str]:
        """The record keys this evaluator fills, in table order."""
        models = {"clip_i": self.clip_source, "clip_t": self.clip_source, "dino": self.dino_source, "lpips": self.lpips_net}
        return [m for m in COLUMNS if m not in models or models[m] is not None]

    # -- metric models --

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if self.clip is None and self.clip_source is not None:
            self.clip = _encoder(CLIPEncoder, self.clip_source).to(device)
        if self.dino is None and self.dino_source is not None:
            self.dino = _encoder(DINOEncoder, self.dino_source).to(device)
        if self.lpips is None and self.lpips_net is not None:
            self.lpips = lpips_metric(self.lpips_net).to(device)

    # -- scoring --

    def _caption(self, entry: dict[str, Any]) -> str | None:
        return self.captions.get(entry["id"]) or (entry.get("case") or {}).get("output_caption")

    def _pair(self, entry: dict[str, Any], folder: ResultsFolder) -> tuple[Tensor, Tensor] | str:
        """(edit, reference) as [3,H,W] in [0, 1] at the reference's size, or why there is no pair."""
        target = folder.load_image(folder.companion(entry["id"], "TARGET"))
        edited = folder.load_image(folder.edited(entry["id"]))
        if target is None:
            return "no reference edit (the data has no target for this sample)"
        if edited is None:
            return f"the edit image {folder.edited(entry['id'])} is missing"
        if edited.size != target.size:
            edited = edited.resize(target.size, Image.BICUBIC)
        return to_tensor(edited), to_tensor(target)

    def _lpips_scores(self, pairs: list[tuple[Tensor, Tensor]]) -> list[float]:
        """LPIPS of each (edit, reference) pair; pairs of one size share a forward."""
        assert self.lpips is not None
        by_size: dict[torch.Size, list[int]] = defaultdict(list)
        for i, (edited, _) in enumerate(pairs):
            by_size[edited.shape].append(i)
        scores = [math.nan] * len(pairs)
        for indices in by_size.values():
            edits, targets = (torch.stack([pairs[i][k] for i in indices]).to(self.lpips.device) for k in (0, 1))
            for i, value in zip(indices, self.lpips(edits, targets).reshape(-1).tolist()):
                scores[i] = value
            self.lpips.reset()  # per-sample scores only: keep no state between batches
        return scores

    def _model_metrics(self, pairs: list[tuple[Tensor, Tensor]], captions: list[str | None]) -> list[dict[str, float | None]]:
        """CLIP-I, CLIP-T, DINO and LPIPS of a batch of (edit, reference) pairs, one forward per model."""
        edits, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        values: list[dict[str, float | None]] = [{} for _ in pairs]
        if self.clip is not None:
            features = self.clip.image_features(edits + targets)
            clip_i = _cosine(features[: len(pairs)], features[len(pairs) :])
            captioned = [i for i, caption in enumerate(captions) if caption is not None]
            clip_t: dict[int, float] = {}
            if captioned:
                texts = self.clip.text_features([captions[i] for i in captioned])
                clip_t = dict(zip(captioned, _cosine(features[captioned], texts)))
            for i, row in enumerate(values):
                row |= {"clip_i": clip_i[i], "clip_t": clip_t.get(i)}
        if self.dino is not None:
            features = self.dino.image_features(edits + targets)
            for row, value in zip(values, _cosine(features[: len(pairs)], features[len(pairs) :])):
                row["dino"] = value
        if self.lpips is not None:
            for row, value in zip(values, self._lpips_scores(pairs)):
                row["lpips"] = value
        return values

    def _score_batch(self, entries: Sequence[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        records, scored, pairs, captions = [], [], [], []
        for entry in entries:
            record = {"id": entry["id"], "edit_type": entry["edit_type"], "error": None}
            pair = self._pair(entry, folder)
            if isinstance(pair, str):
                record["error"] = pair
            else:
                scored.append(record)
                pairs.append(pair)
                captions.append(self._caption(entry))
            records.append(record)
        if pairs:
            for record, (edited, target), values in zip(scored, pairs, self._model_metrics(pairs, captions)):
                record |= values | pair_metrics(edited, target)
        return records

    def score(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        records = [r for batch in _chunks(entries, self.batch_size) for r in self._score_batch(batch, folder)]
        uncaptioned = sum(r["error"] is None and r["clip_t"] is None for r in records) if self.clip is not None else 0
        if uncaptioned:
            log.warning("%d of %d edits have no output caption: no CLIP-T for them (give captions=...)", uncaptioned, len(records))
        return records

    # -- tables --

    def _group_summary(self, records: list[dict[str, Any]]) -> dict[str, float]:
        scored = [r for r in records if r["error"] is None]
        summary = {}
        for metric in self.metrics:
            values = [r[metric] for r in scored if r.get(metric) is not None]
            summary[metric] = sum(values) / len(values) if values else math.nan
        summary |= {"samples": len(scored), "failed": len(records) - len(scored)}
        if self.clip_source is not None:
            summary["no_caption"] = sum(r.get("clip_t") is None for r in scored)
        return summary

    def summarize(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        groups: dict[str, list[dict[str, Any]]] = {"overall": records}
        for record in records:
            groups.setdefault(record["edit_type"] or "unknown", []).append(record)
        summary = {g: self._group_summary(groups[g]) for g in sorted(groups, key=lambda g: (g == "overall", g))}
        counts = ["samples", "failed", *(["no_caption"] if self.clip_source is not None else [])]
        header = ["edit type", *(COLUMNS[m] for m in self.metrics), *(c.replace("_", " ") for c in counts)]
        rows = [[group, *(values[k] for k in self.metrics + counts)] for group, values in summary.items()]
        title = f"Similarity to the reference ({self.label}; lower is better for LPIPS and L1)"
        folder.write_table("similarity", (header, rows), title=title)
        folder.write_json("summary", {"label": self.label, "groups": summary})
        return {f"{g}/{m}": v[m] for g, v in summary.items() for m in self.metrics if math.isfinite(v[m])}
