"""Procedural edit (and T2I) data with exact ground truth, written straight into shards.

A scene is 1-3 solid shapes (circle, square, triangle) from :data:`OBJECT_COLOURS` on a plain
background from :data:`BACKGROUND_COLOURS`, each shape filling one cell of a 3x3 grid (no overlap,
no anti-aliasing). Edits (:data:`EDIT_TYPES`) are exact, so the target is a deterministic function
of (source, instruction): a tiny model can learn it on a CPU in minutes. Each sample carries

* a templated instruction naming objects by colour + shape (unique within a scene) and cells by
  position words (:data:`POSITIONS`);
* a DIM-style 5-section blueprint filled from the ground truth;
* the edit mask: exactly the pixels that change (union of old and new object pixels; the
  background pixels for a background change);
* GoT-style boxes of the TARGET objects in [0, 1000) with colour name and shape label;
* a GoT reasoning chain naming each target object with exactly those boxes and colours
  (:func:`chain`); the colour names are PIL colour names, as GoT's mask renderer fills with them;
* MIND-Edit's optimized instruction (:func:`optimized_instruction`): what changes and where, then
  the unchanged context, and as negative prompt what the edit removes plus generic artefacts.

``toy --out DIR --train N --val N --test N --seed S --resolution R --samples-per-shard N [--task edit|t2i|mixed]``
writes DIR/train, DIR/val and DIR/test, each with its ``index.json``. ``mixed`` alternates edit and
T2I samples (GoT pretraining's mix of tasks): its sample ``2j`` is edit sample ``j`` and its sample
``2j + 1`` is T2I sample ``j``, keyed by their position in the split.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
from PIL import Image

from datamodules.formats.got import object_chain
from datamodules.samples import BOX_RANGE, EditSample, T2ISample
from datamodules.shard_format import write_split
from zoo.blocks.optimized_instruction import OptimizedInstruction

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "cyan": (40, 200, 210),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
PALETTE: dict[str, tuple[int, int, int]] = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
"""Every colour name the toy data uses -> RGB; object and background colours never coincide."""

SHAPES = ("circle", "square", "triangle")
EDIT_TYPES = ("add", "remove", "replace", "recolour", "move", "background")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
"""Cell index (row * 3 + column) -> the words instructions use for it."""

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("Add a {colour2} {shape2} at the {position2}.", "Put a {colour2} {shape2} at the {position2}.", "Draw a {colour2} {shape2} at the {position2}."),
    "remove": ("Remove the {colour} {shape}.", "Delete the {colour} {shape}.", "Take away the {colour} {shape}."),
    "replace": (
        "Replace the {colour} {shape} with a {colour2} {shape2}.",
        "Swap the {colour} {shape} for a {colour2} {shape2}.",
        "Turn the {colour} {shape} into a {colour2} {shape2}.",
    ),
    "recolour": ("Make the {colour} {shape} {colour2}.", "Change the colour of the {colour} {shape} to {colour2}.", "Paint the {colour} {shape} {colour2}."),
    "move": ("Move the {colour} {shape} to the {position2}.", "Shift the {colour} {shape} to the {position2}.", "Put the {colour} {shape} at the {position2} instead."),
    "background": ("Change the background to {background2}.", "Make the background {background2}.", "Replace the {background} background with {background2}."),
}


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    cell: int


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ToyObject, ...]


# --- rendering ---------------------------------------------------------------------------------


def _geometry(resolution: int) -> tuple[int, int, int]:
    """(cell size, odd shape size, grid margin); odd sizes give triangles a one-pixel apex."""
    if resolution < 12:
        raise ValueError(f"toy resolution must be >= 12 px, got {resolution}")
    cell = resolution // 3
    size = cell - 2 if (cell - 2) % 2 else cell - 3
    return cell, size, (resolution - 3 * cell) // 2


def object_slot(cell: int, resolution: int) -> tuple[int, int, int]:
    """(x0, y0, size) of the square a shape fills in the given grid cell."""
    cell_size, size, margin = _geometry(resolution)
    row, col = divmod(cell, 3)
    offset = (cell_size - size) // 2
    return margin + col * cell_size + offset, margin + row * cell_size + offset, size


def _shape_mask(shape: str, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - centre) ** 2 + (y - centre) ** 2 <= (centre + 0.5) ** 2
    if shape == "triangle":
        return np.abs(2 * x - (size - 1)) <= y
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def object_mask(obj: ToyObject, resolution: int) -> np.ndarray:
    """Boolean [R, R] mask of the pixels the object covers."""
    x0, y0, size = object_slot(obj.cell, resolution)
    mask = np.zeros((resolution, resolution), dtype=bool)
    mask[y0 : y0 + size, x0 : x0 + size] = _shape_mask(obj.shape, size)
    return mask


def render(scene: Scene, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3] image of the scene."""
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    for obj in scene.objects:
        image[object_mask(obj, resolution)] = PALETTE[obj.colour]
    return image


def boxes(scene: Scene, resolution: int) -> list[dict[str, Any]]:
    """GoT-style boxes in [0, 1000): pixel edges scaled by 1000 / R (x2, y2 are exclusive edges)."""
    out = []
    for obj in sorted(scene.objects, key=lambda o: o.cell):
        x0, y0, size = object_slot(obj.cell, resolution)
        scale = [x0, y0, x0 + size, y0 + size]
        out.append(
            {"box": [min(BOX_RANGE - 1, v * BOX_RANGE // resolution) for v in scale], "color": obj.colour, "label": obj.shape}
        )
    return out


# --- text --------------------------------------------------------------------------------------


def _name(obj: ToyObject) -> str:
    return f"{obj.colour} {obj.shape}"


def describe(scene: Scene) -> str:
    """'a red circle at the top left and a blue square at the centre on a white background'."""
    parts = [f"a {_name(o)} at the {POSITIONS[o.cell]}" for o in sorted(scene.objects, key=lambda o: o.cell)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene.background} background"


def blueprint(instruction: str, source: Scene, target: Scene, area: str, resolution: int) -> str:
    """DIM's 5-section blueprint, every section derived from the ground truth."""
    _, size, _ = _geometry(resolution)
    count = len(source.objects)
    local = "\n".join(
        f"   - {_name(o).capitalize()}: a solid {o.colour} {o.shape} at the {POSITIONS[o.cell]}, {size} pixels wide."
        for o in sorted(source.objects, key=lambda o: o.cell)
    )
    return (
        f"1. Edit Instruction: {instruction}\n"
        f"2. Global Layout Perception: The image shows {count} object{'s' if count > 1 else ''} on a plain "
        f"{source.background} background: {describe(source).rsplit(' on a ', 1)[0]}.\n"
        f"3. Local Object Perception:\n{local}\n   - Background: plain {source.background}.\n"
        f"4. Edit Area Localization: {area}\n"
        f"5. Edited Image Imagination: The edited image shows {describe(target)}; everything else stays unchanged."
    )


def chain(scene: Scene, resolution: int, instruction: str | None = None) -> str:
    """GoT-style chain describing ``scene`` (an edit's target) with one grounded entry per object."""
    lead = f"{instruction} The edited image shows" if instruction else "The image shows"
    objects = object_chain(boxes(scene, resolution))
    if not objects:
        return f"{lead} a plain {scene.background} background."
    return f"{lead} a {scene.background} background with {objects}."


ARTEFACTS = ("blurred edges", "extra objects", "colour bleeding")
"""The generic artefacts every toy negative prompt ends with."""


def optimized_instruction(source: Scene, target: Scene) -> str:
    """MIND-Edit's optimized instruction of the edit ``source -> target`` (appendix-C reply format).

    The prompt names each new object (or emptied cell, or new background) with its position, then
    keeps every untouched object and the background; the negative prompt names what the edit takes
    away (with its position when the same object stays elsewhere: a move) and :data:`ARTEFACTS`.
    Derived from the scenes alone, so the generator's random draws are untouched.
    """
    added = sorted(set(target.objects) - set(source.objects), key=lambda o: o.cell)
    removed = sorted(set(source.objects) - set(target.objects), key=lambda o: o.cell)
    kept = sorted(set(source.objects) & set(target.objects), key=lambda o: o.cell)
    refilled = {o.cell for o in added}
    changes = [f"{_name(o)} at the {POSITIONS[o.cell]}" for o in added]
    changes += [f"empty cell at the {POSITIONS[o.cell]}" for o in removed if o.cell not in refilled]
    context = [f"keep the {_name(o)} at the {POSITIONS[o.cell]}" for o in kept]
    moved = {(o.shape, o.colour) for o in added}
    negative = [f"{_name(o)} at the {POSITIONS[o.cell]}" if (o.shape, o.colour) in moved else _name(o) for o in removed]
    if target.background != source.background:
        changes.append(f"{target.background} background")
        negative.append(f"{source.background} background")
    else:
        context.append(f"{target.background} background")
    return OptimizedInstruction(", ".join(changes + context), ", ".join(negative + list(ARTEFACTS))).render()


# --- sampling ----------------------------------------------------------------------------------


def _random_scene(rng: random.Random, count: int) -> Scene:
    pairs = rng.sample([(s, c) for s in SHAPES for c in OBJECT_COLOURS], count)
    cells = rng.sample(range(9), count)
    return Scene(rng.choice(sorted(BACKGROUND_COLOURS)), tuple(ToyObject(s, c, cell) for (s, c), cell in zip(pairs, cells)))


def _fresh_pair(rng: random.Random, scene: Scene, avoid_shape: str | None = None, avoid_colour: str | None = None) -> tuple[str, str]:
    used = {(o.shape, o.colour) for o in scene.objects}
    options = [
        (s, c) for s in SHAPES for c in OBJECT_COLOURS if (s, c) not in used and s != avoid_shape and c != avoid_colour
    ]
    return rng.choice(options)


def make_edit(rng: random.Random, edit_type: str, resolution: int) -> tuple[Scene, Scene, str, str]:
    """(source scene, target scene, instruction, edit-area sentence) for one edit type."""
    count = {"add": rng.randint(1, 2), "remove": rng.randint(2, 3)}.get(edit_type, rng.randint(1, 3))
    source = _random_scene(rng, count)
    objects = list(source.objects)
    free = sorted(set(range(9)) - {o.cell for o in objects})
    victim = rng.choice(objects)
    words = {"colour": victim.colour, "shape": victim.shape, "background": source.background}
    where = POSITIONS[victim.cell]
    if edit_type == "add":
        shape, colour = _fresh_pair(rng, source)
        new = ToyObject(shape, colour, rng.choice(free))
        objects.append(new)
        area = f"The empty area at the {POSITIONS[new.cell]} will receive a new {_name(new)}."
        words.update(colour2=colour, shape2=shape, position2=POSITIONS[new.cell])
    elif edit_type == "remove":
        objects.remove(victim)
        area = f"The {_name(victim)} at the {where} will be removed and replaced by background."
    elif edit_type in ("replace", "recolour"):
        # A new colour always, so every pixel of the old/new union changes (exact mask).
        if edit_type == "replace":
            shape, colour = _fresh_pair(rng, source, avoid_shape=victim.shape, avoid_colour=victim.colour)
        else:
            shape = victim.shape
            colour = rng.choice([c for c in OBJECT_COLOURS if c != victim.colour and (shape, c) not in {(o.shape, o.colour) for o in objects}])
        objects[objects.index(victim)] = replace(victim, shape=shape, colour=colour)
        verb = f"replaced by a {colour} {shape}" if edit_type == "replace" else f"recoloured {colour}"
        area = f"The {_name(victim)} at the {where} will be {verb}."
        words.update(colour2=colour, shape2=shape)
    elif edit_type == "move":
        cell = rng.choice(free)
        objects[objects.index(victim)] = replace(victim, cell=cell)
        area = f"The {_name(victim)} at the {where} and the empty area at the {POSITIONS[cell]}."
        words.update(position2=POSITIONS[cell])
    elif edit_type == "background":
        new_background = rng.choice([b for b in sorted(BACKGROUND_COLOURS) if b != source.background])
        area = f"All of the {source.background} background around the objects."
        words.update(background2=new_background)
        target = Scene(new_background, source.objects)
        return source, target, rng.choice(_TEMPLATES[edit_type]).format(**words), area
    else:
        raise ValueError(f"unknown edit type {edit_type!r}; known: {EDIT_TYPES}")
    target = Scene(source.background, tuple(objects))
    return source, target, rng.choice(_TEMPLATES[edit_type]).format(**words), area


def _scene_json(scene: Scene) -> dict[str, Any]:
    return {"background": scene.background, "objects": [{"shape": o.shape, "colour": o.colour, "cell": o.cell} for o in scene.objects]}


def edit_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """The ``index``-th edit sample of a split (independent of the others: any order, any subset)."""
    rng = random.Random(f"toy/edit/{seed}/{split}/{index}")
    edit_type = EDIT_TYPES[index % len(EDIT_TYPES)]
    source, target, instruction, area = make_edit(rng, edit_type, resolution)
    source_pixels, target_pixels = render(source, resolution), render(target, resolution)
    mask = (source_pixels != target_pixels).any(axis=2)
    sample = EditSample(
        key=f"{split}_{index:06d}",
        source=Image.fromarray(source_pixels),
        target=Image.fromarray(target_pixels),
        instruction=instruction,
        blueprint=blueprint(instruction, source, target, area, resolution),
        edit_type=edit_type,
        mask=Image.fromarray(mask.astype(np.uint8) * 255),
        boxes=boxes(target, resolution),
        chain=chain(target, resolution, instruction),
        optimized_instruction=optimized_instruction(source, target),
    )
    return sample, {"source_scene": _scene_json(source), "target_scene": _scene_json(target)}


def t2i_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[T2ISample, dict[str, Any]]:
    """The ``index``-th text-to-image sample: a scene and the prompt describing it."""
    rng = random.Random(f"toy/t2i/{seed}/{split}/{index}")
    scene = _random_scene(rng, rng.randint(1, 3))
    prompt = describe(scene)
    sample = T2ISample(
        key=f"{split}_{index:06d}",
        image=Image.fromarray(render(scene, resolution)),
        prompt=prompt[0].upper() + prompt[1:] + ".",
        boxes=boxes(scene, resolution),
        chain=chain(scene, resolution),
    )
    return sample, {"scene": _scene_json(scene)}


def mixed_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample | T2ISample, dict[str, Any]]:
    """The ``index``-th sample of a mixed split: edit sample ``index // 2`` when even, else T2I sample ``index // 2``."""
    make = t2i_sample if index % 2 else edit_sample
    sample, extra = make(seed, split, index // 2, resolution)
    return replace(sample, key=f"{split}_{index:06d}"), extra


TASKS = {"edit": edit_sample, "t2i": t2i_sample, "mixed": mixed_sample}
"""Toy task name -> the function making its ``index``-th sample."""


def generate(task: str, seed: int, split: str, count: int, resolution: int = 32) -> Iterator[tuple[EditSample | T2ISample, dict[str, Any]]]:
    """``count`` samples of one split, deterministic in (task, seed, split, index)."""
    make = TASKS.get(task)
    if make is None:
        raise ValueError(f"unknown toy task {task!r}; use one of {sorted(TASKS)}")
    for index in range(count):
        yield make(seed, split, index, resolution)


def main(argv: list[str] | None = None) -> int:
    """Write DIR/train, DIR/val and DIR/test shards (+ index.json); returns an exit code."""
    description = "Write the procedural toy edit/T2I dataset as shards."
    parser = argparse.ArgumentParser(prog="zoo data toy", allow_abbrev=False, description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--task", choices=sorted(TASKS), default="edit", help="mixed: edit and T2I samples alternate")
    args = parser.parse_args(argv)
    for split in ("train", "val", "test"):
        count = getattr(args, split)
        samples = generate(args.task, args.seed, split, count, args.resolution)
        index = write_split(f"{args.out}/{split}", samples, args.samples_per_shard, progress=f"toy {split}", total=count)
        print(f"{split}: {index['total']} samples in {len(index['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
