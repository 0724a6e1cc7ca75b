"""Readers of GoT's datasets (GoT paper §3; HF ``LucasFang/GoT-6B`` model card) and the GoT chain format.

Three kinds of rows, in a ``.jsonl`` file (one object per line) or a ``.json`` file (a list):

* ``t2i``: caption + reasoning chain + image (Laion-Aesthetics-High-Resolution-GoT, JourneyDB-GoT);
* ``edit``: instruction + chain + source + target image (OmniEdit-GoT);
* ``multi_turn``: N instructions, N chains and N + 1 images (source, then each turn's result);
  turn t becomes one :class:`EditSample` ``images[t] -> images[t + 1]`` keyed ``<id>_turn<t>``
  with the session's earlier instructions as ``history``, so the one-turn model trains on every
  turn and predicts a session by feeding results back.

Kind ``mixed`` reads the three in one file, telling them apart per row (:meth:`GoTReader.row_kind`).
GoT trains on such mixes (pretraining: LAHR-GoT + JourneyDB-GoT + OmniEdit-GoT; finetuning:
FLUX-GoT + OmniEdit-GoT + SEED-Edit-MultiTurn-GoT): concatenate and shuffle the datasets' rows
(image paths relative to one ``image_root``) and convert them into one split, whose batches then
mix T2I and edit samples (:func:`datamodules.samples.collate`).

The published JSON field names could not be confirmed (no dataset card or loader was readable),
so every name is configurable through :class:`GoTFields`; its defaults are our naming, not
GoT's. A row missing a field, or whose image is missing or undecodable, is skipped, counted in
``skipped`` and logged (``strict=True`` raises instead). Image paths resolve against
``image_root`` like DIM's (:func:`datamodules.formats.dim.resolve_image`).

The chain is kept as written; its boxes are parsed model-side (``zoo/blocks/spatial.py``), so
records from this reader carry ``chain`` and no ``boxes``. :func:`object_chain` writes the
object part of a chain from boxes, in GoT's format (``got/models/utils.py`` regex):
``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> (colour)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from datamodules.formats.dim import resolve_image
from datamodules.samples import EditSample, T2ISample
from datamodules.skip_log import SkipLog

log = logging.getLogger(__name__)

KINDS = ("t2i", "edit", "multi_turn", "mixed")


@dataclass(frozen=True)
class GoTFields:
    """JSON field names of GoT rows (defaults are the zoo's guesses; override per dataset).

    Attributes:
        key: unique sample id (string or number).
        prompt: t2i caption.
        instruction: edit instruction.
        chain: the GoT reasoning chain text (t2i and edit).
        image: t2i image path.
        source: edit source image path.
        target: edit target image path.
        instructions: multi-turn list of N instructions.
        chains: multi-turn list of N chains.
        images: multi-turn list of N + 1 image paths (source first).
    """

    key: str = "id"
    prompt: str = "prompt"
    instruction: str = "instruction"
    chain: str = "got"
    image: str = "image"
    source: str = "source_image"
    target: str = "target_image"
    instructions: str = "instructions"
    chains: str = "chains"
    images: str = "images"

    @classmethod
    def from_dict(cls, names: dict[str, str] | None) -> GoTFields:
        """Defaults overridden by ``names``; an unknown attribute is an error naming the known ones."""
        names = dict(names or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown GoT field attribute(s) {unknown}; known: {sorted(known)}")
        return cls(**names)


def object_chain(boxes: Sequence[dict[str, Any]]) -> str:
    """GoT's grounded-object text for checked boxes (``{"box", "color", "label"}``), joined by "; "."""
    parts = []
    for entry in boxes:
        x1, y1, x2, y2 = entry["box"]
        parts.append(
            f"<|object_ref_start|>{entry['label']}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|> ({entry['color']})"
        )
    return "; ".join(parts)


def read_rows(path: str | Path) -> list[Any]:
    """Rows of a ``.json`` list or a ``.jsonl`` file; a bad jsonl line becomes ``None`` (counted later)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json GoT file must hold a list of rows, got {type(rows).__name__}")
        return rows
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    rows.append(None)
    return rows


class GoTReader:
    """GoT rows of one kind as typed samples; ``skipped`` counts rows or turns that were dropped.

    Args:
        path: ``.jsonl`` or ``.json`` file.
        kind: ``t2i``, ``edit``, ``multi_turn`` or ``mixed`` (each row's kind from its fields, see
            :meth:`row_kind`).
        image_root: folder image paths are relative to (default: the file's folder).
        fields: :class:`GoTFields` overrides, e.g. ``{"chain": "got_text", "image": "path"}``.
        strict: raise on the first bad row instead of skipping and counting it.
    """

    def __init__(
        self,
        path: str,
        kind: str,
        image_root: str | None = None,
        fields: dict[str, str] | None = None,
        strict: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"GoT kind must be one of {KINDS}, got {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.fields = GoTFields.from_dict(fields)
        self.strict = strict
        self.skipped = 0
        self._skips = SkipLog(log)

    def _skip(self, kind: str, where: str, why: str) -> None:
        message = f"{self.path} {where}: {why}"
        if self.strict:
            raise ValueError(message)
        self.skipped += 1
        self._skips.skipped(kind, message)

    def _image(self, relative: Any) -> Image.Image:
        if not isinstance(relative, str):
            raise ValueError(f"image path must be a string, got {relative!r}")
        path = resolve_image(self.image_root, relative)
        if path is None:
            raise ValueError(f"image {relative!r} not found under {self.image_root}")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"cannot decode image {path}: {error}") from error

    def _strings(self, row: dict[str, Any], names: Sequence[str]) -> list[str]:
        missing = [n for n in names if not isinstance(row.get(n), str)]
        if missing:
            raise ValueError(f"missing or non-string field(s) {missing}")
        return [row[n] for n in names]

    def _lists(self, row: dict[str, Any]) -> tuple[list[str], list[str], list[Any]]:
        f = self.fields
        values = [row.get(n) for n in (f.instructions, f.chains, f.images)]
        if not all(isinstance(v, list) for v in values):
            raise ValueError(f"fields {[f.instructions, f.chains, f.images]} must all be lists")
        instructions, chains, images = values
        if not instructions or len(chains) != len(instructions) or len(images) != len(instructions) + 1:
            raise ValueError(
                f"multi-turn rows need N >= 1 instructions, N chains and N + 1 images; got "
                f"{len(instructions)}, {len(chains)}, {len(images)}"
            )
        if not all(isinstance(v, str) for v in instructions + chains):
            raise ValueError("instructions and chains must be strings")
        return instructions, chains, images

    def row_kind(self, row: dict[str, Any]) -> str:
        """The row's kind: the reader's, or for ``mixed`` multi-turn when the row holds the
        ``instructions`` field, edit when it holds ``source``, else t2i."""
        if self.kind != "mixed":
            return self.kind
        if self.fields.instructions in row:
            return "multi_turn"
        return "edit" if self.fields.source in row else "t2i"

    def _samples(self, row: dict[str, Any], key: str) -> list[tuple[EditSample | T2ISample, dict[str, Any]]]:
        f = self.fields
        kind = self.row_kind(row)
        if kind == "t2i":
            prompt, chain, image = self._strings(row, (f.prompt, f.chain, f.image))
            return [(T2ISample(key=key, image=self._image(image), prompt=prompt, chain=chain), {})]
        if kind == "edit":
            instruction, chain, source, target = self._strings(row, (f.instruction, f.chain, f.source, f.target))
            sample = EditSample(key=key, source=self._image(source), target=self._image(target), instruction=instruction, chain=chain)
            return [(sample, {})]
        instructions, chains, paths = self._lists(row)
        images = [self._image(p) for p in paths]
        return [
            (
                EditSample(
                    key=f"{key}_turn{t}", source=images[t], target=images[t + 1], instruction=text, chain=chain,
                    history=list(instructions[:t]),
                ),
                {"session": key, "turn": t, "session_turns": len(instructions)},
            )
            for t, (text, chain) in enumerate(zip(instructions, chains))
        ]

    def pairs(self) -> Iterator[tuple[EditSample | T2ISample, dict[str, Any]]]:
        """``(sample, extra)`` per usable row (multi-turn: per turn); ``extra`` holds the turn index."""
        for number, row in enumerate(read_rows(self.path), start=1):
            where = f"row {number}"
            if not isinstance(row, dict):
                self._skip("not an object", where, "not a JSON object")
                continue
            key = row.get(self.fields.key)
            if not isinstance(key, (str, int)) or isinstance(key, bool) or str(key) == "":
                self._skip("no id", where, f"missing id field {self.fields.key!r}")
                continue
            try:
                samples = self._samples(row, str(key))
            except ValueError as error:
                self._skip("bad row", f"{where} (id {key!r})", str(error))
                continue
            yield from samples

    def __iter__(self) -> Iterator[EditSample | T2ISample]:
        for sample, _ in self.pairs():
            yield sample
