"""Typed sample records and the batch contract every zoo module consumes.

A reader (shards, DIM jsonl, toy generator) yields :class:`EditSample` or :class:`T2ISample`;
:func:`collate` turns a list of them into an :class:`EditBatch`, the typed batch every module
consumes; :meth:`EditBatch.for_inference` builds one from PIL images and texts through the same
preprocessing. This file is the only thing ``datamodules`` shares
with ``zoo``: data flows one way, so ``datamodules`` never imports ``zoo``.

Image transforms follow DIM (``data/tos_dataset.py``): the generation branch sees the image
resized so its shorter side is R (bicubic) and centre-cropped to R x R, in [-1, 1]; the MLLM
branch sees the *full* source squashed to M x M (aspect not kept), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.features import collate_features, expand_features


class DataConfigError(ValueError):
    """A data module's argument is out of range or inconsistent with another: the CLI prints it as
    one ``zoo: error:`` line (as it does :class:`zoo.blocks.config.ConfigError`), before any model is built."""


ORIGINAL_BYTES = "zoo_original_bytes"
"""``PIL.Image.info`` key under which a reader keeps the file bytes an image was decoded from, so a
shard writer stores them as they are (a JPEG stays a JPEG) instead of re-encoding the pixels."""


BOX_RANGE = 1000
"""Box coordinates are integers in [0, BOX_RANGE), relative to the full image (GoT convention)."""


def check_boxes(boxes: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Validate GoT-style boxes ``{"box": [x1, y1, x2, y2], "color": str, "label": str}``.

    Raises ValueError naming the sample key, so a bad annotation never reaches a model silently.
    """
    checked = []
    for i, entry in enumerate(boxes):
        box = entry.get("box") if isinstance(entry, dict) else None
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, int) and 0 <= v < BOX_RANGE for v in box)
            or box[0] > box[2]
            or box[1] > box[3]
        ):
            raise ValueError(
                f"sample {key!r}: box {i} must be [x1, y1, x2, y2] ints in [0, {BOX_RANGE}) with x1<=x2, y1<=y2,"
                f" got {entry!r}"
            )
        checked.append({"box": [int(v) for v in box], "color": str(entry.get("color", "")), "label": str(entry.get("label", ""))})
    return checked


@dataclass
class EditSample:
    """One instruction-guided edit: ``source`` + ``instruction`` -> ``target``.

    ``target`` is None for predict sets; ``blueprint`` is DIM's 5-section chain-of-thought;
    ``mask`` is a PIL "L" image, 255 inside the edit region; ``boxes`` describe the target image;
    ``chain`` is GoT's reasoning chain (text with ``<|box_start|>(x1,y1),(x2,y2)<|box_end|> (colour)``);
    ``turns`` are the instructions of a multi-turn case's later turns (ImgEdit-Bench multi-turn);
    ``history`` are the instructions of the dialogue's earlier turns, oldest first, when this sample
    is a later turn of a multi-turn dialogue (ImgEdit's multi-turn training data; ``source`` is then
    the version that turn edits, which a backtracking turn names);
    ``optimized_instruction`` is MIND-Edit's rewrite of the instruction, the MLLM's reply target in
    the appendix-C format (:mod:`zoo.blocks.optimized_instruction`);
    ``turn_targets`` and ``turn_masks`` are the exact targets and "L" edit masks of the later
    ``turns``, one per turn or none (the toy dialogues' evaluation cases); a later turn's mask covers
    the pixels where its target differs from the version that turn edits.
    """

    key: str
    source: Image.Image
    instruction: str
    target: Image.Image | None = None
    blueprint: str | None = None
    edit_type: str | None = None
    mask: Image.Image | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    chain: str | None = None
    turns: list[str] = field(default_factory=list)
    optimized_instruction: str | None = None
    history: list[str] = field(default_factory=list)
    turn_targets: list[Image.Image] = field(default_factory=list)
    turn_masks: list[Image.Image] = field(default_factory=list)
    features: dict[str, Tensor] | None = None
    """The frozen encoders' outputs stored by a feature cache (:mod:`datamodules.features`), or None."""

    def __post_init__(self) -> None:
        if not all(isinstance(text, str) for text in self.history):
            raise ValueError(f"sample {self.key}: history must be a list of instruction strings, got {self.history!r}")
        for name in ("turn_targets", "turn_masks"):
            if len(getattr(self, name)) not in (0, len(self.turns)):
                raise ValueError(f"sample {self.key}: {len(getattr(self, name))} {name} for {len(self.turns)} later turns; give one per turn or none")
        self.turn_targets = [image.convert("RGB") for image in self.turn_targets]
        self.turn_masks = [mask.convert("L") for mask in self.turn_masks]
        if self.source.mode != "RGB":
            self.source = self.source.convert("RGB")
        if self.target is not None and self.target.mode != "RGB":
            self.target = self.target.convert("RGB")
        if self.mask is not None and self.mask.mode != "L":
            self.mask = self.mask.convert("L")
        self.boxes = check_boxes(self.boxes, self.key)


@dataclass
class T2ISample:
    """One text-to-image pair; ``image`` is None for predict sets (prompts only); ``chain`` as in EditSample."""

    key: str
    image: Image.Image | None
    prompt: str
    blueprint: str | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    chain: str | None = None
    features: dict[str, Tensor] | None = None
    """As in EditSample."""

    def __post_init__(self) -> None:
        if self.image is not None and self.image.mode != "RGB":
            self.image = self.image.convert("RGB")
        self.boxes = check_boxes(self.boxes, self.key)


def resize_center_crop(image: Image.Image, resolution: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``resolution`` then centre-crop a square (torchvision rounding)."""
    width, height = image.size
    if width == resolution and height == resolution:
        return image
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = int(round((new_w - resolution) / 2.0)), int(round((new_h - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def _hwc(image: Image.Image) -> np.ndarray:
    """HWC uint8 pixel levels ("L": one channel)."""
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _levels(array: np.ndarray) -> Tensor:
    """One image's ``[C, H, W]`` uint8 levels: a view with HWC strides, the layout its float keeps."""
    return torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)


def _stacked(arrays: Sequence[np.ndarray]) -> Tensor:
    """A batch's ``[B, C, H, W]`` uint8 levels: one copy into NHWC memory, viewed as NCHW."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _float(levels: Tensor) -> Tensor:
    """uint8 levels as float (exact on every device): a batch tensor (4-d) contiguous, as collate
    always made it; one image's tensor keeps its layout."""
    layout = torch.contiguous_format if levels.dim() == 4 else torch.preserve_format
    return levels.to(torch.float32, memory_format=layout)


_UNIT = torch.arange(256, dtype=torch.float32).div_(255.0)
"""The [0, 1] float of each uint8 level, computed on the CPU as collate always computed it. Converting
by lookup gives these floats on every device: a GPU divides by a scalar as a multiplication by its
reciprocal, which differs from the division in the last bit for 126 of the 256 levels."""
_SIGNED = _UNIT.mul(2.0).sub_(1.0)
"""The [-1, 1] float of each uint8 level, likewise."""


def _lookup(table: Tensor, levels: Tensor) -> Tensor:
    """The float of every uint8 level from ``table``, laid out as :func:`_float` lays it out."""
    index = levels.to(torch.int32, memory_format=torch.contiguous_format)
    values = torch.index_select(table.to(levels.device), 0, index.view(-1)).view(index.shape)
    return values if levels.dim() == 4 else torch.empty_like(levels, dtype=torch.float32).copy_(values)


def signed_to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> an RGB image, rounded to the nearest uint8 as torchvision's
    ``save_image`` rounds: exactly what a saved PNG of it holds."""
    levels = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).mul(255).add(0.5).to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).numpy())


def _crop(image: Image.Image, resolution: int) -> np.ndarray:
    return _hwc(resize_center_crop(image, resolution))


def _mask_crop(mask: Image.Image, resolution: int) -> np.ndarray:
    """``[R, R, 1]`` uint8 in {0, 1}: an "L" mask resized (nearest) and centre-cropped as its image is
    (a level > 127 is exactly a level / 255 > 0.5)."""
    return (_hwc(resize_center_crop(mask, resolution, Image.NEAREST)) > 127).astype(np.uint8)


@dataclass
class EditBatch:
    """A collated batch: what every zoo module consumes in training, evaluation and inference.

    Lists have one entry per sample ("" where a text is absent). Tensors are ``None`` when no sample
    of the batch has them. Built by :func:`collate` from records, or by :meth:`for_inference` from
    PIL images and texts — the same preprocessing either way.
    """

    key: list[str]
    """Sample ids."""
    task: list[str]
    """Per sample ``"edit"`` or ``"t2i"``; a batch may mix them (GoT pretrains on both)."""
    instruction: list[str]
    """Edit instruction, or the T2I prompt."""
    size: tuple[int, int]
    """``(height, width)`` of the images the model produces for this batch."""
    blueprint: list[str]
    """DIM's 5-section chain-of-thought blueprint."""
    chain: list[str]
    """GoT's reasoning chain."""
    edit_type: list[str]
    """Benchmark / toy edit category."""
    boxes: list[list[dict[str, Any]]]
    """GoT-style boxes of the target objects (see :func:`check_boxes`)."""
    turns: list[list[str]]
    """Instructions of the later turns of a multi-turn case (each edits the previous result); [] otherwise."""
    optimized_instruction: list[str]
    """MIND-Edit's optimized instruction (``optimized_prompt: ... negative_prompt: ...``)."""
    history: list[list[str]]
    """Instructions of the dialogue's earlier turns, oldest first, for a later turn of a multi-turn
    dialogue; [] for a first turn or a single edit."""
    turn_target: list[list[Tensor]]
    """Per sample, the exact targets of its later ``turns``, each ``[3, H, W]`` in [-1, 1] resized +
    centre-cropped as ``target``; [] when the sample has none."""
    turn_mask: list[list[Tensor]]
    """Per sample, the edit masks of its later ``turns``, each ``[1, H, W]`` in {0, 1} cropped as
    ``mask``; [] when the sample has none."""
    target: Tensor | None = None
    """``[B, 3, H, W]`` in [-1, 1]; None for prediction sets."""
    source: Tensor | None = None
    """``[B, 3, H, W]`` in [-1, 1], resized + centre-cropped as ``target``; T2I rows of a mixed batch are black."""
    mllm_image: Tensor | None = None
    """``[B, 3, M, M]`` in [0, 1]: the full source squashed for the MLLM; T2I rows are zeros (no image)."""
    mask: Tensor | None = None
    """``[B, 1, H, W]`` in {0, 1}, 1 inside the edit region; only when every sample has one."""
    features: dict[str, Tensor] | None = None
    """The frozen encoders' outputs read from a feature cache, batch-first (names as the module's
    ``frozen_features`` gives them); None when the batch is encoded online. :meth:`to_float` pads
    them to the lengths the module computes (:func:`datamodules.features.expand_features`)."""

    def __post_init__(self) -> None:
        # A batch built by hand with another task would silently count as text-to-image in ``edits``.
        unknown = sorted(set(self.task) - {"edit", "t2i"})
        if unknown:
            raise ValueError(f"EditBatch.task holds {unknown}; each entry must be 'edit' or 't2i'")

    def __len__(self) -> int:
        return len(self.key)

    @property
    def edits(self) -> list[bool]:
        """Which samples are edits (the others are text-to-image)."""
        return [task == "edit" for task in self.task]

    @property
    def mllm_images(self) -> list[Tensor | None] | None:
        """Per sample, the image the MLLM reads (the source of an edit) or None (T2I); None when no
        sample has one. A mixed batch's T2I rows thus get no image, as each would alone."""
        if not any(self.edits):
            return None
        if self.mllm_image is None:
            raise ValueError(f"edit samples {self.key[:3]} need their mllm_image (the source in [0, 1] for the MLLM)")
        return [image if edit else None for image, edit in zip(self.mllm_image, self.edits)]

    def select(self, rows: Sequence[int]) -> EditBatch:
        """The sub-batch of ``rows`` (in that order)."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long)

        def take(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, Tensor):
                return value[index.to(value.device)]
            if isinstance(value, dict):
                return {name: take(tensor) for name, tensor in value.items()}
            return [value[i] for i in rows]

        return EditBatch(**{f.name: self.size if f.name == "size" else take(getattr(self, f.name)) for f in fields(self)})

    def with_texts_of(self, shift: int) -> EditBatch:
        """Ablation: every sample takes the instruction, blueprint, chain, boxes, optimized
        instruction, later turns and dialogue history of the sample ``shift`` places later in the batch (cyclically);
        images, masks (the later turns' targets and masks too) and edit types stay. A model that uses its instruction scores lower on the
        batch this returns."""
        if len(self) < 2 or shift % len(self) == 0:
            raise ValueError(f"shifting the texts of a batch of {len(self)} by {shift} gives every sample its own again")
        order = [(i + shift) % len(self) for i in range(len(self))]
        texts = ("instruction", "blueprint", "chain", "boxes", "turns", "optimized_instruction", "history")
        # Cached features encode each sample's own texts: the shifted batch is encoded online.
        return replace(self, features=None, **{name: [getattr(self, name)[i] for i in order] for name in texts})

    def to_float(self) -> EditBatch:
        """The batch with uint8 pixel levels (``collate(..., levels=True)``, on any device) turned into
        the float ranges above, bit-identical to the floats ``collate`` returns on the CPU; a batch
        without uint8 tensors is returned as it is."""
        images = [self.source, self.target, self.mllm_image, self.mask] + [t for row in self.turn_target + self.turn_mask for t in row]
        features = None if self.features is None else expand_features(self.features)
        if not any(t is not None and t.dtype == torch.uint8 for t in images):
            return self if features is None else replace(self, features=features)

        def signed(levels: Tensor | None) -> Tensor | None:
            return _lookup(_SIGNED, levels) if levels is not None and levels.dtype == torch.uint8 else levels

        def mask(levels: Tensor | None) -> Tensor | None:
            return _float(levels) if levels is not None and levels.dtype == torch.uint8 else levels

        mllm = self.mllm_image
        return replace(
            self,
            source=signed(self.source),
            target=signed(self.target),
            mllm_image=_lookup(_UNIT, mllm) if mllm is not None and mllm.dtype == torch.uint8 else mllm,
            mask=mask(self.mask),
            turn_target=[[signed(t) for t in row] for row in self.turn_target],
            turn_mask=[[mask(t) for t in row] for row in self.turn_mask],
            features=features,
        )

    def replace(self, **changes: Any) -> EditBatch:
        """A copy with some fields replaced (e.g. the designer's blueprints)."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> EditBatch:
        """The batch with its tensors (the later turns' ones too) on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors = {k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)}
        later = {k: [[t.to(device) for t in row] for row in moved[k]] for k in ("turn_target", "turn_mask")}
        features = None if self.features is None else {name: t.to(device) for name, t in self.features.items()}
        return replace(self, **tensors, **later, features=features)

    @classmethod
    def for_inference(
        cls,
        images: Sequence[Image.Image | None],
        texts: Sequence[str],
        resolution: int,
        mllm_resolution: int,
        *,
        blueprints: Sequence[str | None] | None = None,
        chains: Sequence[str | None] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
    ) -> EditBatch:
        """A batch for new inputs: per sample a source image to edit, or None for text-to-image.

        Goes through :func:`collate`, so an image is seen exactly as training sees it (shorter side
        resized to ``resolution`` and centre-cropped; the full image squashed to ``mllm_resolution``
        for the MLLM); a ``masks`` entry (an "L" image of the source's size, white inside the edit
        region) is cropped with its source.
        """
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts; give one image (or None) per text")
        blueprints = blueprints or [None] * len(texts)
        chains = chains or [None] * len(texts)
        masks = masks or [None] * len(texts)
        for image, mask in zip(images, masks):
            if mask is not None and (image is None or mask.size != image.size):
                raise ValueError(
                    f"a mask must have its source image's size; got a {mask.size} mask for "
                    f"{'no image' if image is None else f'a {image.size} image'}"
                )
        samples: list[EditSample | T2ISample] = [
            EditSample(key=str(i), source=image, instruction=text, blueprint=blueprint, chain=chain, mask=mask)
            if image is not None
            else T2ISample(key=str(i), image=None, prompt=text, blueprint=blueprint, chain=chain)
            for i, (image, text, blueprint, chain, mask) in enumerate(zip(images, texts, blueprints, chains, masks))
        ]
        return collate(samples, resolution, mllm_resolution)


@dataclass
class TurnOutputs:
    """One later turn of the multi-turn cases of a batch: each edits its case's previous result."""

    rows: list[int]
    """Which samples of the batch have this turn."""
    edited: Tensor
    """``[len(rows), 3, H, W]`` in [-1, 1]."""
    text: list[str]
    """Per row, the text that produced the edit (instruction, blueprint or reasoning chain)."""


@dataclass
class EditOutputs:
    """What a module returns for a batch in test / predict, and what evaluator callbacks consume."""

    key: list[str]
    edited: Tensor
    """``[B, 3, H, W]`` in [-1, 1]: the (first-turn) edit or generation of every sample."""
    text: list[str]
    """Per sample, the text that produced it (instruction, DIM blueprint, GoT chain)."""
    turns: list[TurnOutputs] = field(default_factory=list)
    """Turns 2, 3, ... of the batch's multi-turn cases, in order."""


def collate(
    samples: Sequence[EditSample | T2ISample], resolution: int, mllm_resolution: int, *, levels: bool = False
) -> EditBatch:
    """Build the :class:`EditBatch` of ``samples`` at ``resolution`` (and ``mllm_resolution`` for the MLLM).

    A batch may mix edit and T2I samples (GoT pretrains on both). Its T2I rows then get a black
    ``source`` (-1 everywhere: GoT encodes a black image as the T2I reference) and an all-zero
    ``mllm_image`` that is no image: modules read :attr:`EditBatch.edits` to keep it from the MLLM.

    ``levels=True`` leaves every image tensor as its uint8 pixel levels (masks as uint8 0/1): what
    a loader worker ships to the main process (a quarter of the bytes); :meth:`EditBatch.to_float`
    then gives exactly the float batch that ``levels=False`` returns.
    """
    if not samples:
        raise ValueError("collate() got an empty list of samples")
    edits = [isinstance(s, EditSample) for s in samples]
    batch = EditBatch(
        key=[s.key for s in samples],
        task=["edit" if edit else "t2i" for edit in edits],
        instruction=[s.instruction if isinstance(s, EditSample) else s.prompt for s in samples],
        size=(resolution, resolution),
        blueprint=[s.blueprint or "" for s in samples],
        chain=[s.chain or "" for s in samples],
        edit_type=[(s.edit_type or "") if isinstance(s, EditSample) else "" for s in samples],
        boxes=[s.boxes for s in samples],
        turns=[list(s.turns) if isinstance(s, EditSample) else [] for s in samples],
        optimized_instruction=[(s.optimized_instruction or "") if isinstance(s, EditSample) else "" for s in samples],
        history=[list(s.history) if isinstance(s, EditSample) else [] for s in samples],
        turn_target=[[_levels(_crop(t, resolution)) for t in s.turn_targets] if isinstance(s, EditSample) else [] for s in samples],
        turn_mask=[[_levels(_mask_crop(m, resolution)) for m in s.turn_masks] if isinstance(s, EditSample) else [] for s in samples],
    )
    if any(edits):
        batch.source, batch.mllm_image, batch.mask = _sources(samples, resolution, mllm_resolution)
    targets = [s.target if isinstance(s, EditSample) else s.image for s in samples]
    present = [t is not None for t in targets]
    if all(present):
        batch.target = _stacked([_crop(t, resolution) for t in targets])
    elif any(present):
        missing = [s.key for s, p in zip(samples, present) if not p]
        raise ValueError(f"some samples of the batch have a target image and some do not (missing: {missing})")
    cached = [s.features is not None for s in samples]
    if all(cached):
        batch.features = collate_features([s.features for s in samples])
    elif any(cached):
        raise ValueError(f"some samples of the batch carry cached features and some do not (without: {[s.key for s, c in zip(samples, cached) if not c][:3]})")
    return batch if levels else batch.to_float()


def _sources(
    samples: Sequence[EditSample | T2ISample], resolution: int, mllm_resolution: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """uint8 ``(source, mllm_image, mask)`` levels of a batch holding edits (T2I rows: level 0, i.e. a
    black source and an all-zero MLLM view; mask or None)."""
    black = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    empty = np.zeros((mllm_resolution, mllm_resolution, 3), dtype=np.uint8)
    sources = [s.source if isinstance(s, EditSample) else None for s in samples]
    source = _stacked([black if s is None else _crop(s, resolution) for s in sources])
    mllm_image = _stacked([empty if s is None else _hwc(s.resize((mllm_resolution, mllm_resolution), Image.BICUBIC)) for s in sources])
    masks = [s.mask if isinstance(s, EditSample) else None for s in samples]
    mask = None
    if all(m is not None for m in masks):
        mask = _stacked([_mask_crop(m, resolution) for m in masks])
    return source, mllm_image, mask
