"""Toy edit score: exact-ground-truth evaluation of edits on the procedural toy dataset.

Toy images are drawn with a small palette and no anti-aliasing, so every ground-truth pixel is a
palette colour. An edited pixel *agrees* with the target when its nearest palette colour is the
target's colour — robust to sampling noise, strict about the edit. With the edit-region mask
from the generator:

- ``edit``: agreement inside the edit region (did the requested change happen?);
- ``preserve``: agreement outside it, where the target equals the source (was the rest kept?);
- ``score = (edit + preserve) / 2`` in [0, 1], per sample, averaged per edit type and overall;
- ``kept``: agreement over the *objects* outside the region (target pixels that are not the
  target's background colour), reported beside the score. Background pixels dominate
  ``preserve``: an edit that paints the new object into every cell, or removes every object, still
  preserves most pixels; ``kept`` shows whether the other objects survived.

The copy-the-source baseline scores ``preserve = 1`` and ``edit`` = the fraction of the region that
needs no change, so beating it requires actually performing edits. The evaluator scores the model
and this baseline with the same code in the same run.

Multi-turn cases (the toy dialogues' test split: ``EditBatch.turns`` with ``turn_target`` and
``turn_mask``) are scored turn by turn: turn ``k`` of a case against its exact target and mask, and
its copy baseline copies the ground-truth version that turn edits
(:func:`~zoo.blocks.dialogue.source_version`: the original, or the exact result of an earlier turn).
Beside the per-kind groups (all turns of a kind) the summary then has ``<kind>/turn<k>`` and
``<kind>/final`` (each case's last turn) groups.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.gather import gather_records, run_folder
from datamodules.samples import EditBatch, EditOutputs
from datamodules.toy_scenes import PALETTE
from zoo.blocks.dialogue import source_version
from zoo.blocks.spatial import parse_boxes


def palette_index(images: Tensor, palette: Tensor) -> Tensor:
    """Nearest palette entry of every pixel: images [B,3,H,W] in [0,1] → indices [B,H,W]."""
    distances = (images.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)).pow(2).sum(dim=2)
    return distances.argmin(dim=1)


def _toy_palette(device: torch.device) -> Tensor:
    return torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device) / 255


def palette_agreement(images: Tensor, target: Tensor) -> Tensor:
    """Per image ``[B]``, the share of pixels whose nearest palette colour is the target's (images in [0, 1])."""
    palette = _toy_palette(images.device)
    return palette_index(images.float(), palette).eq(palette_index(target.float(), palette)).float().mean(dim=(1, 2))


def toy_edit_scores(edited: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-sample ``edit``, ``preserve``, ``score`` and ``kept`` for images in [0,1] and a {0,1} mask [B,1,H,W]."""
    if mask.sum(dim=(1, 2, 3)).eq(0).any():
        raise ValueError("a toy sample has an empty edit region: the toy edit score is undefined for it")
    palette = _toy_palette(edited.device)
    truth = palette_index(target.float(), palette)
    agree = palette_index(edited.float(), palette).eq(truth).float()
    region = mask[:, 0].float()
    outside = 1 - region
    edit = (agree * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2))
    preserve = (agree * outside).sum(dim=(1, 2)) / outside.sum(dim=(1, 2)).clamp_min(1)
    preserve = torch.where(outside.sum(dim=(1, 2)) > 0, preserve, torch.ones_like(preserve))
    background = torch.stack([colours.flatten().bincount(minlength=len(palette)).argmax() for colours in truth])
    objects = outside * truth.ne(background.view(-1, 1, 1)).float()
    kept = (agree * objects).sum(dim=(1, 2)) / objects.sum(dim=(1, 2)).clamp_min(1)
    kept = torch.where(objects.sum(dim=(1, 2)) > 0, kept, torch.ones_like(kept))
    return {"edit": edit, "preserve": preserve, "score": (edit + preserve) / 2, "kept": kept}


def chain_record(chain: str, boxes: list[dict[str, Any]]) -> dict[str, float]:
    """``chain_parses`` (1: at least one drawable box, none invalid) and ``chain_exact`` (1: its
    boxes and colours are the ground truth's, in any order) of one generated chain."""
    parsed = parse_boxes(chain)
    given = sorted((tuple(b.box), b.colour.lower()) for b in parsed.boxes)
    truth = sorted((tuple(b["box"]), b["color"].lower()) for b in boxes)
    parses = bool(parsed.boxes) and not parsed.invalid
    return {"chain_parses": float(parses), "chain_exact": float(parses and given == truth)}


def _unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return (images.float() + 1) / 2


def _records(keys: list[str], edit_types: list[str], model: dict[str, Tensor], copy: dict[str, Tensor]) -> list[dict[str, Any]]:
    """One record per edit: its key, edit type, the model's scores and the copy baseline's (``copy_<name>``)."""
    return [
        {"key": key, "edit_type": edit_type}
        | {name: float(value[i]) for name, value in model.items()}
        | {f"copy_{name}": float(value[i]) for name, value in copy.items()}
        for i, (key, edit_type) in enumerate(zip(keys, edit_types))
    ]


def _version(source: Tensor, target: Tensor, later: list[Tensor], version: int) -> Tensor:
    """The ground truth of version ``version`` of a multi-turn case: 0 the source, ``k`` turn ``k``'s target."""
    return source if version == 0 else target if version == 1 else later[version - 2]


def _turn_records(outputs: EditOutputs, batch: EditBatch, source: Tensor, target: Tensor) -> list[dict[str, Any]]:
    """Records (as turn 1's, plus ``turn`` and ``final``) of the later turns of the batch's multi-turn
    cases, each scored against its exact target and mask, the copy baseline copying the ground-truth
    version the turn edits (``source`` and ``target`` are the batch's, of turn 1)."""
    records = []
    for number, turn in enumerate(outputs.turns, start=2):
        missing = [batch.key[r] for r in turn.rows if not len(batch.turn_target[r]) == len(batch.turn_mask[r]) == len(batch.turns[r])]
        if missing:
            raise ValueError(
                f"multi-turn cases {missing[:3]} lack the exact targets and masks of their later turns (EditBatch.turn_target, turn_mask)"
            )
        later = torch.stack([batch.turn_target[r][number - 2] for r in turn.rows])
        mask = torch.stack([batch.turn_mask[r][number - 2] for r in turn.rows])
        versions = [source_version(batch.turns[r][number - 2], number) for r in turn.rows]
        copied = torch.stack([_version(source[r], target[r], batch.turn_target[r], v) for r, v in zip(turn.rows, versions)])
        model = toy_edit_scores(_unit(turn.edited), _unit(later), mask)
        copy = toy_edit_scores(_unit(copied), _unit(later), mask)
        rows = _records([batch.key[r] for r in turn.rows], [batch.edit_type[r] for r in turn.rows], model, copy)
        records += [record | {"turn": number, "final": number == len(batch.turns[r]) + 1} for record, r in zip(rows, turn.rows)]
    return records


def _groups(record: dict[str, Any]) -> list[str]:
    """The summary groups a record counts in: its edit type and ``overall``, and for a turn of a
    multi-turn case ``<type>/turn<k>`` and, for its last turn, ``<type>/final``."""
    kind = record["edit_type"] or "unknown"
    groups = [kind, "overall"]
    if "turn" in record:
        groups.append(f"{kind}/turn{record['turn']}")
        if record["final"]:
            groups.append(f"{kind}/final")
    return groups


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of each score (and of the chain shares, when recorded) per edit type and over all samples
    (``"overall"``), and per turn of multi-turn cases (:func:`_groups`)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        for group in _groups(record):
            groups[group].append(record)
    names = [n for n in ("score", "edit", "preserve", "kept", "chain_parses", "chain_exact") if records and n in records[0]]
    return {
        group: {name: sum(r[name] for r in rows) / len(rows) for name in names} | {"count": float(len(rows))}
        for group, rows in sorted(groups.items())
    }


class ToyEditEvaluator(L.Callback):
    """Scores test-time edits (and the copy-the-source baseline) on toy data; writes ``metrics.json``.

    Runs on every rank; per-sample records are gathered to rank 0, which writes
    ``<output_dir>/metrics.json`` and logs ``toy/<type>/score`` scalars.

    Args:
        output_dir: folder for ``metrics.json``; defaults to the trainer's ``log_dir``.
        label: name of this model in the file (e.g. ``"trained"`` or ``"untrained"``).
        chains: the outputs' texts are GoT reasoning chains: also report the share that parse
            into drawable boxes (``chain_parses``: at least one box, none invalid) and the share
            whose boxes and colours are exactly the target's (``chain_exact``).
    """

    def __init__(self, output_dir: str | None = None, label: str = "model", chains: bool = False) -> None:
        self.output_dir = output_dir
        self.label = label
        self.chains = chains
        self.records: list[dict[str, Any]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: EditOutputs,
        batch: EditBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch.mask is None or batch.target is None or batch.source is None:
            raise ValueError("ToyEditEvaluator needs toy shards of edits with targets and edit-region masks (EditBatch.mask)")
        target = _unit(batch.target)
        model = toy_edit_scores(_unit(outputs.edited), target, batch.mask)
        copy = toy_edit_scores(_unit(batch.source), target, batch.mask)
        for i, record in enumerate(_records(batch.key, batch.edit_type, model, copy)):
            if batch.turns[i]:
                record |= {"turn": 1, "final": False}
            if self.chains:
                record |= chain_record(outputs.text[i], batch.boxes[i])
            self.records.append(record)
        self.records += _turn_records(outputs, batch, batch.source, batch.target)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = gather_records(trainer, self.records)
        folder = Path(self.output_dir) if self.output_dir else run_folder(trainer)
        if not trainer.is_global_zero:
            return
        baseline = [
            {n: r[n] for n in ("key", "edit_type", "turn", "final") if n in r} | {n: r[f"copy_{n}"] for n in ("score", "edit", "preserve", "kept")}
            for r in records
        ]
        metrics = {self.label: summarize(records), "copy_source": summarize(baseline)}
        if trainer.logger is not None:
            scores = {f"toy/{group}/score": values["score"] for group, values in metrics[self.label].items()}
            trainer.logger.log_metrics(scores, step=trainer.global_step)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        overall = metrics[self.label]["overall"]
        rank_zero_info(
            "\n".join(score_rows(metrics, [self.label, "copy_source"]))
            + f"\ntoy edit score ({self.label}): {overall['score']:.4f} "
            f"(copy-the-source {metrics['copy_source']['overall']['score']:.4f}) on {int(overall['count'])} edits "
            f"-> {folder / 'metrics.json'}"
        )


def score_rows(metrics: dict[str, dict[str, dict[str, float]]], labels: list[str], name: str = "score") -> list[str]:
    """A text table of ``name`` (the score, or ``kept``) per edit type (rows) of each label (columns)."""
    groups = sorted({g for label in labels for g in metrics[label]} - {"overall"}) + ["overall"]
    width = max(12, *(len(g) + 2 for g in groups))
    rows = [f"{'edit type':<{width}}" + "".join(f"{label:>19}" for label in labels)]
    for group in groups:
        cells = "".join(f"{metrics[label].get(group, {}).get(name, float('nan')):>19.4f}" for label in labels)
        rows.append(f"{group:<{width}}{cells}")
    return rows


def report(
    metrics_files: list[str],
    out: str,
    trained: str = "trained",
    bar: float | None = None,
    ablations: tuple[str, ...] = (),
    margin: float = 0.05,
    every_type: bool = True,
    beside: tuple[str, ...] = (),
    above_copy: tuple[str, ...] = (),
) -> bool:
    """Merge evaluator outputs into one ``metrics.json``, print a per-type table, and say if the model learned.

    Each input holds one model label (``trained``, ``untrained``, ablations...) and the
    copy-the-source baseline. The model ``trained`` has learned when its overall score beats every
    model that is not an ablation and the baseline, every edit type beats the baseline (when
    ``every_type``), it reaches ``bar`` (when given), and each of ``ablations`` (e.g. the trained
    model given other samples' instructions) scores at least ``margin`` below it; models in
    ``beside`` are only reported (GoT with the chains it writes itself), except that each of
    ``above_copy`` must beat the baseline overall (MIND-Edit without masks). Every check is printed
    and stored under ``"checks"``; returns whether all hold.
    """
    merged: dict[str, dict[str, dict[str, float]]] = {}
    for path in metrics_files:
        merged |= json.loads(Path(path).read_text())
    if trained not in merged:
        raise ValueError(f"no model labelled {trained!r} in {metrics_files} (labels: {sorted(merged)})")
    labels = [label for label in merged if label != "copy_source"] + ["copy_source"]
    groups = sorted({g for label in labels for g in merged[label]} - {"overall"}) + ["overall"]
    rows = score_rows(merged, labels)
    score = {label: merged[label]["overall"]["score"] for label in labels}
    mine, copy = merged[trained], merged["copy_source"]
    checks: dict[str, bool] = {}
    for other in labels:
        if other not in (trained, *ablations, *beside):
            checks[f"{trained} {score[trained]:.4f} > {other} {score[other]:.4f}"] = score[trained] > score[other]
    below = [g for g in groups if g != "overall" and mine.get(g, {}).get("score", 0.0) <= copy.get(g, {}).get("score", 0.0)]
    if every_type:
        checks[f"every edit type above copy_source (not: {', '.join(below) or 'none'})"] = not below
    elif below:
        print(f"  (not checked) edit types at or below copy_source: {', '.join(below)}")
    if bar is not None:
        checks[f"{trained} {score[trained]:.4f} >= bar {bar:.2f}"] = score[trained] >= bar
    for label in above_copy:
        if label not in merged:
            raise ValueError(f"no model labelled {label!r} in {metrics_files} (labels: {sorted(merged)})")
        checks[f"{label} {score[label]:.4f} > copy_source {score['copy_source']:.4f}"] = score[label] > score["copy_source"]
    for ablation in ablations:
        if ablation not in merged:
            raise ValueError(f"no ablation labelled {ablation!r} in {metrics_files} (labels: {sorted(merged)})")
        checks[f"{ablation} {score[ablation]:.4f} <= {trained} - {margin:.2f}"] = score[ablation] <= score[trained] - margin
    learned = all(checks.values())
    merged["checks"] = checks  # type: ignore[assignment]
    merged["learned"] = learned  # type: ignore[assignment]
    Path(out).write_text(json.dumps(merged, indent=2) + "\n")
    print("toy edit score (higher is better; edit-region agreement and preservation, averaged)")
    print("\n".join(rows))
    if all("kept" in merged[label]["overall"] for label in labels):
        print("objects kept outside the edit region (kept: agreement over the target's non-background pixels there)")
        print("\n".join(score_rows(merged, labels, "kept")))
    for label in labels:
        overall = merged[label]["overall"]
        if "chain_parses" in overall:
            print(
                f"  {label}: {overall['chain_parses']:.1%} of its chains parse into drawable boxes, "
                f"{overall['chain_exact']:.1%} give exactly the target's boxes and colours"
            )
    for check, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {check}")
    print(f"'{trained}' {'learned' if learned else 'did NOT learn'} its toy edits -> {out}")
    return learned


def main(argv: list[str] | None = None) -> int:
    """``zoo toy-report METRICS.json... --out FILE [--bar X] [--ablation LABEL]``: exit 1 when the model did not learn."""
    import argparse

    parser = argparse.ArgumentParser(prog="zoo toy-report", allow_abbrev=False, description=report.__doc__)
    parser.add_argument("metrics", nargs="+", help="metrics.json files of the evaluations to merge")
    parser.add_argument("--out", required=True, help="merged metrics.json to write")
    parser.add_argument("--trained", default="trained", help="label of the model under test")
    parser.add_argument("--bar", type=float, default=None, help="overall score the trained model must reach")
    parser.add_argument("--ablation", action="append", default=[], help="label of an ablation that must score lower")
    parser.add_argument("--margin", type=float, default=0.05, help="how far below the trained model an ablation must score")
    parser.add_argument("--any-type", action="store_true", help="do not require every edit type above copy_source")
    parser.add_argument("--beside", action="append", default=[], help="label of a model only reported, not checked")
    args = parser.parse_args(argv)
    ablations, beside = tuple(args.ablation), tuple(args.beside)
    ok = report(args.metrics, args.out, args.trained, args.bar, ablations, args.margin, not args.any_type, beside)
    return 0 if ok else 1
