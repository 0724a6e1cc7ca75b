"""Pixel similarity of edits to reference edits: PSNR, SSIM (torchmetrics) and L1 — part of MIND-Edit's
Table 1 and GoT's Emu-Edit table. Feature metrics (CLIP-I/T, DINO, LPIPS) are not implemented yet.

Images are compared in [0, 1] at the resolution the model produced; a sample without a reference
(no ``target`` in the batch) is recorded as a failure, not skipped silently.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from callbacks.results import BenchmarkEvaluator, ResultsFolder
from zoo.blocks.chat import to_tensor

METRICS = ("psnr", "ssim", "l1")


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


class SimilarityEvaluator(BenchmarkEvaluator):
    """Scores every edit against its reference and writes per-type/overall tables of PSNR, SSIM, L1.

    Args:
        label: the model's name in the tables.
        output_dir: results folder (default ``<log_dir>/similarity``).
        on_validation: also evaluate during fit's validation runs.
    """

    name = "similarity"

    def __init__(self, label: str = "model", output_dir: str | None = None, on_validation: bool = False) -> None:
        super().__init__(output_dir, on_validation)
        self.label = label

    def score(self, entries: list[dict[str, Any]], folder: ResultsFolder) -> list[dict[str, Any]]:
        records = []
        for entry in entries:
            record: dict[str, Any] = {"id": entry["id"], "edit_type": entry["edit_type"], "error": None}
            target = folder.load_image(folder.companion(entry["id"], "TARGET"))
            edited = folder.load_image(folder.edited(entry["id"]))
            if target is None or edited is None:
                record["error"] = "no reference edit (the data has no target for this sample)"
            else:
                record |= pair_metrics(to_tensor(edited), to_tensor(target))
            records.append(record)
        return records

    def summarize(self, records: list[dict[str, Any]], folder: ResultsFolder) -> dict[str, float]:
        groups: dict[str, list[dict[str, Any]]] = {"overall": records}
        for record in records:
            groups.setdefault(record["edit_type"] or "unknown", []).append(record)
        rows, scalars = [], {}
        for group in sorted(groups, key=lambda g: (g == "overall", g)):
            scored = [r for r in groups[group] if r["error"] is None]
            means = {m: (sum(r[m] for r in scored) / len(scored) if scored else math.nan) for m in METRICS}
            rows.append([group, *(means[m] for m in METRICS), len(scored), len(groups[group]) - len(scored)])
            scalars |= {f"{group}/{m}": means[m] for m in METRICS if math.isfinite(means[m])}
        folder.write_table("similarity", (["edit type", "PSNR", "SSIM", "L1", "samples", "failed"], rows), title=f"Similarity to the reference ({self.label})")
        return scalars

