"""The scenes of the procedural toy data: palette, grid, rendering, texts and exact edits.

A scene is 1-3 solid shapes (circle, square, triangle) from :data:`OBJECT_COLOURS` on a plain
background from :data:`BACKGROUND_COLOURS`, each shape filling one cell of a 3x3 grid (no overlap,
no anti-aliasing). Edits are exact, so the target is a deterministic function of (source,
instruction): a tiny model can learn it on a CPU in minutes. Instructions name objects by colour +
shape (unique within a scene) and cells by position words (:data:`POSITIONS`).

The edit types are :data:`EDIT_TYPES` and ImgEdit's two more (:data:`IMGEDIT_EDIT_TYPES`):

* ``extract``: the named object alone, in its cell, on a plain :data:`EXTRACT_BACKGROUND`
  background (object colours never are background colours, so the object stays visible; the
  source keeps at least one other object, so something always changes);
* ``hybrid``: two of :data:`HYBRID_OPERATIONS` on two different objects in one instruction ("Make
  the red circle blue and remove the green square."), the second applied to the result of the first.

:func:`edit_record` turns a (source, target) pair into an :class:`~datamodules.samples.EditSample`
with everything derived from the ground truth: the edit mask (exactly the pixels that change), a
DIM-style 5-section blueprint, GoT-style boxes of the target objects in [0, 1000) with colour name
and shape label, a GoT reasoning chain naming each target object with exactly those boxes and
colours (:func:`chain`; PIL colour names, as GoT's mask renderer fills with them) and MIND-Edit's
optimized instruction (:func:`optimized_instruction`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from datamodules.formats.got import object_chain
from datamodules.samples import BOX_RANGE, EditSample
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
IMGEDIT_EDIT_TYPES = (*EDIT_TYPES, "extract", "hybrid")
"""The toy ``imgedit`` task's edit types: :data:`EDIT_TYPES` and ImgEdit's extract and hybrid."""
HYBRID_OPERATIONS = ("move", "recolour", "remove", "replace")
"""The edits a hybrid combines. A move always comes first, so the second edit never fills a cell the
first emptied: the two edits change disjoint pixels and the mask is the union of their regions."""
EXTRACT_BACKGROUND = "white"
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
    "extract": ("Extract the {colour} {shape}.", "Cut out the {colour} {shape}.", "Isolate the {colour} {shape} on a white background."),
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


def object_name(obj: ToyObject) -> str:
    return f"{obj.colour} {obj.shape}"


def describe(scene: Scene) -> str:
    """'a red circle at the top left and a blue square at the centre on a white background'."""
    parts = [f"a {object_name(o)} at the {POSITIONS[o.cell]}" for o in sorted(scene.objects, key=lambda o: o.cell)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene.background} background"


def blueprint(instruction: str, source: Scene, target: Scene, area: str, resolution: int) -> str:
    """DIM's 5-section blueprint, every section derived from the ground truth."""
    _, size, _ = _geometry(resolution)
    count = len(source.objects)
    local = "\n".join(
        f"   - {object_name(o).capitalize()}: a solid {o.colour} {o.shape} at the {POSITIONS[o.cell]}, {size} pixels wide."
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
    changes = [f"{object_name(o)} at the {POSITIONS[o.cell]}" for o in added]
    changes += [f"empty cell at the {POSITIONS[o.cell]}" for o in removed if o.cell not in refilled]
    context = [f"keep the {object_name(o)} at the {POSITIONS[o.cell]}" for o in kept]
    moved = {(o.shape, o.colour) for o in added}
    negative = [f"{object_name(o)} at the {POSITIONS[o.cell]}" if (o.shape, o.colour) in moved else object_name(o) for o in removed]
    if target.background != source.background:
        changes.append(f"{target.background} background")
        negative.append(f"{source.background} background")
    else:
        context.append(f"{target.background} background")
    return OptimizedInstruction(", ".join(changes + context), ", ".join(negative + list(ARTEFACTS))).render()


# --- sampling ----------------------------------------------------------------------------------


def random_scene(rng: random.Random, count: int) -> Scene:
    pairs = rng.sample([(s, c) for s in SHAPES for c in OBJECT_COLOURS], count)
    cells = rng.sample(range(9), count)
    return Scene(rng.choice(sorted(BACKGROUND_COLOURS)), tuple(ToyObject(s, c, cell) for (s, c), cell in zip(pairs, cells)))


def fresh_pair(rng: random.Random, scene: Scene, avoid_shape: str | None = None, avoid_colour: str | None = None) -> tuple[str, str]:
    used = {(o.shape, o.colour) for o in scene.objects}
    options = [
        (s, c) for s in SHAPES for c in OBJECT_COLOURS if (s, c) not in used and s != avoid_shape and c != avoid_colour
    ]
    return rng.choice(options)


def free_cells(scene: Scene) -> list[int]:
    """The grid cells no object of ``scene`` fills, in order."""
    return sorted(set(range(9)) - {o.cell for o in scene.objects})


def add_object(scene: Scene, new: ToyObject) -> tuple[Scene, str, dict[str, str]]:
    """``scene`` with ``new`` added: (target, edit-area sentence, template words)."""
    area = f"The empty area at the {POSITIONS[new.cell]} will receive a new {object_name(new)}."
    return replace(scene, objects=(*scene.objects, new)), area, {"colour2": new.colour, "shape2": new.shape, "position2": POSITIONS[new.cell]}


def edit_scene(rng: random.Random, edit_type: str, source: Scene, victim: ToyObject) -> tuple[Scene, str, dict[str, str]]:
    """One edit of ``source`` acting on ``victim`` (add and background ignore it): (target,
    edit-area sentence, the words an instruction template of ``edit_type`` is filled with)."""
    objects = list(source.objects)
    words = {"colour": victim.colour, "shape": victim.shape, "background": source.background}
    where = POSITIONS[victim.cell]
    if edit_type == "add":
        shape, colour = fresh_pair(rng, source)
        target, area, added = add_object(source, ToyObject(shape, colour, rng.choice(free_cells(source))))
        return target, area, words | added
    if edit_type == "remove":
        objects.remove(victim)
        area = f"The {object_name(victim)} at the {where} will be removed and replaced by background."
    elif edit_type in ("replace", "recolour"):
        # A new colour always, so every pixel of the old/new union changes (exact mask).
        if edit_type == "replace":
            shape, colour = fresh_pair(rng, source, avoid_shape=victim.shape, avoid_colour=victim.colour)
        else:
            shape = victim.shape
            colour = rng.choice([c for c in OBJECT_COLOURS if c != victim.colour and (shape, c) not in {(o.shape, o.colour) for o in objects}])
        objects[objects.index(victim)] = replace(victim, shape=shape, colour=colour)
        verb = f"replaced by a {colour} {shape}" if edit_type == "replace" else f"recoloured {colour}"
        area = f"The {object_name(victim)} at the {where} will be {verb}."
        words.update(colour2=colour, shape2=shape)
    elif edit_type == "move":
        cell = rng.choice(free_cells(source))
        objects[objects.index(victim)] = replace(victim, cell=cell)
        area = f"The {object_name(victim)} at the {where} and the empty area at the {POSITIONS[cell]}."
        words.update(position2=POSITIONS[cell])
    elif edit_type == "background":
        new_background = rng.choice([b for b in sorted(BACKGROUND_COLOURS) if b != source.background])
        area = f"All of the {source.background} background around the objects."
        words.update(background2=new_background)
        return Scene(new_background, source.objects), area, words
    elif edit_type == "extract":
        area = f"Everything but the {object_name(victim)} at the {where}: the other objects and the {source.background} background."
        return Scene(EXTRACT_BACKGROUND, (victim,)), area, words
    else:
        raise ValueError(f"unknown edit type {edit_type!r}; known: {(*EDIT_TYPES, 'extract')}")
    return Scene(source.background, tuple(objects)), area, words


def instruction_for(rng: random.Random, edit_type: str, words: dict[str, str]) -> str:
    """One of the edit type's instruction templates, filled with ``words`` (from :func:`edit_scene`)."""
    return rng.choice(_TEMPLATES[edit_type]).format(**words)


def random_edit(rng: random.Random, scene: Scene, edit_types: tuple[str, ...] = EDIT_TYPES) -> tuple[Scene, str, str]:
    """A random edit of ``scene`` (which has an object) among the ``edit_types`` it allows: (target,
    instruction, edit-area sentence). A remove needs two objects, so one stays for later edits to act
    on; an add or a move needs a free cell."""
    usable = [t for t in edit_types if (t != "remove" or len(scene.objects) > 1) and (t not in ("add", "move") or free_cells(scene))]
    edit_type = rng.choice(usable)
    target, area, words = edit_scene(rng, edit_type, scene, rng.choice(scene.objects))
    return target, instruction_for(rng, edit_type, words), area


_COUNT_AS = {"extract": "remove"}
"""Edit types whose source draws as many objects as another's: an extract keeps 2-3 objects, as a
remove does, so that something besides the named object is taken away."""


def make_edit(rng: random.Random, edit_type: str, resolution: int) -> tuple[Scene, Scene, str, str]:
    """(source scene, target scene, instruction, edit-area sentence) for one edit type
    (:data:`EDIT_TYPES` or extract; a hybrid is :func:`make_hybrid`)."""
    count = {"add": rng.randint(1, 2), "remove": rng.randint(2, 3)}.get(_COUNT_AS.get(edit_type, edit_type), rng.randint(1, 3))
    source = random_scene(rng, count)
    victim = rng.choice(source.objects)
    target, area, words = edit_scene(rng, edit_type, source, victim)
    return source, target, instruction_for(rng, edit_type, words), area


def make_hybrid(rng: random.Random) -> tuple[Scene, Scene, Scene, str, str]:
    """(source, the scene after the first edit, target, instruction, edit-area sentence) of a hybrid:
    two of :data:`HYBRID_OPERATIONS` on two different objects, joined into one instruction."""
    source = random_scene(rng, rng.randint(2, 3))
    kinds = sorted(rng.sample(HYBRID_OPERATIONS, 2), key=HYBRID_OPERATIONS.index)
    victims = rng.sample(source.objects, 2)
    middle, first_area, first_words = edit_scene(rng, kinds[0], source, victims[0])
    target, second_area, second_words = edit_scene(rng, kinds[1], middle, victims[1])
    first, second = instruction_for(rng, kinds[0], first_words), instruction_for(rng, kinds[1], second_words)
    return source, middle, target, f"{first[:-1]} and {second[0].lower()}{second[1:]}", f"{first_area} {second_area}"


def scene_json(scene: Scene) -> dict[str, Any]:
    return {"background": scene.background, "objects": [{"shape": o.shape, "colour": o.colour, "cell": o.cell} for o in scene.objects]}


def change_mask(source: np.ndarray, target: np.ndarray) -> Image.Image:
    """The "L" edit mask of two rendered scenes: 255 exactly where their pixels differ."""
    return Image.fromarray((source != target).any(axis=2).astype(np.uint8) * 255)


def edit_record(key: str, source: Scene, target: Scene, instruction: str, area: str, edit_type: str, resolution: int) -> EditSample:
    """The :class:`EditSample` of the edit ``source -> target``, every field derived from the ground truth."""
    source_pixels, target_pixels = render(source, resolution), render(target, resolution)
    return EditSample(
        key=key,
        source=Image.fromarray(source_pixels),
        target=Image.fromarray(target_pixels),
        instruction=instruction,
        blueprint=blueprint(instruction, source, target, area, resolution),
        edit_type=edit_type,
        mask=change_mask(source_pixels, target_pixels),
        boxes=boxes(target, resolution),
        chain=chain(target, resolution, instruction),
        optimized_instruction=optimized_instruction(source, target),
    )
