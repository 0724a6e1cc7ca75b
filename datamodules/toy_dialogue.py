"""Toy 3-turn editing dialogues of ImgEdit's three multi-turn kinds, exact at every turn.

A dialogue (:class:`Dialogue`) is an original scene and three turns, each an instruction, the
version it edits (0 the original, ``k`` the result of turn ``k``, as :mod:`zoo.blocks.dialogue`
numbers them) and its exact target scene. The kinds (:data:`DIALOGUE_KINDS`, ImgEdit §3.1):

* ``memory``: turn 1 states a constraint, "From now on every object you add is green.", and adds a
  shape that names no colour; turn 3 (and turn 2, or an unrelated edit there) adds another. Without
  the constraint an add that names no colour would be :data:`DEFAULT_COLOUR`, which a constraint
  never is, so the constraint always changes the target.
* ``understanding``: turn 1 adds an object to a scene that already has one or more; turns 2 and 3
  refer to it as "it" or "the one you added" (recolour, move; turn 3 also remove), so only the
  dialogue says which object they mean.
* ``backtracking``: turns 1 and 2 are single edits; turn 3 edits version 0 or 1, written with
  :func:`~zoo.blocks.dialogue.backtrack` so :func:`~zoo.blocks.dialogue.source_version` reads it
  back, and its target is never turn 2's result (which the dialogue discards).

:func:`dialogue_sample` makes the toy ``dialogue`` task: in train and val one
:class:`~datamodules.samples.EditSample` per turn (:func:`dialogue_turn_sample`: key
``<split>_<dialogue>_t<k>``, source the exact version the turn edits, ``history`` the earlier
instructions), in test one multi-turn evaluation case per dialogue (:func:`dialogue_case_sample`:
source the original, turn 1 as instruction, target and mask, turns 2 and 3 in ``turns`` with their
exact ``turn_targets`` and ``turn_masks``). A turn's mask is every pixel where its target differs
from the version it edits; ``edit_type`` is the dialogue's kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from datamodules.samples import EditSample
from datamodules.toy_scenes import (
    OBJECT_COLOURS,
    SHAPES,
    Scene,
    ToyObject,
    add_object,
    change_mask,
    edit_record,
    edit_scene,
    free_cells,
    random_edit,
    random_scene,
    render,
    scene_json,
)
from zoo.blocks.dialogue import backtrack

DIALOGUE_KINDS = ("memory", "understanding", "backtracking")
TURNS = 3
"""Turns per toy dialogue."""
DEFAULT_COLOUR = "red"
"""The colour an add that names none would have without a constraint; no memory constraint is it."""

_CONSTRAINTS = (
    "From now on every object you add is {colour}.",
    "Keep every object you add {colour} from now on.",
    "Whatever you add from now on must be {colour}.",
)
_PLAIN_ADDS = ("Add a {shape2} at the {position2}.", "Put a {shape2} at the {position2}.", "Draw a {shape2} at the {position2}.")
_REFERRING: dict[str, tuple[str, ...]] = {
    "recolour": ("Make it {colour2}.", "Paint the one you added {colour2}.", "Change its colour to {colour2}."),
    "move": ("Move it to the {position2}.", "Shift the one you added to the {position2}.", "Put it at the {position2} instead."),
    "remove": ("Remove it.", "Delete the one you added.", "Take it away again."),
}


@dataclass(frozen=True)
class DialogueTurn:
    instruction: str
    source: int
    """The version this turn edits: 0 the original, ``k`` the result of turn ``k``."""
    target: Scene
    area: str
    """The edit-area sentence of the blueprint."""


@dataclass(frozen=True)
class Dialogue:
    kind: str
    original: Scene
    turns: tuple[DialogueTurn, ...]

    def version(self, number: int) -> Scene:
        """Version ``number``: 0 the original, ``k`` the result of turn ``k``."""
        return self.original if number == 0 else self.turns[number - 1].target


def _same(a: Scene, b: Scene) -> bool:
    """Whether two scenes render alike (objects in any order)."""
    return a.background == b.background and set(a.objects) == set(b.objects)


def _plain_add(rng: random.Random, scene: Scene, colour: str) -> tuple[Scene, str, str]:
    """Add a shape of ``colour`` whose instruction names no colour: (target, instruction, area)."""
    shape = rng.choice([s for s in SHAPES if (s, colour) not in {(o.shape, o.colour) for o in scene.objects}])
    target, area, words = add_object(scene, ToyObject(shape, colour, rng.choice(free_cells(scene))))
    return target, rng.choice(_PLAIN_ADDS).format(**words), area


def _memory(rng: random.Random) -> tuple[Scene, list[DialogueTurn]]:
    original = random_scene(rng, rng.randint(1, 2))
    colour = rng.choice([c for c in OBJECT_COLOURS if c != DEFAULT_COLOUR and c not in {o.colour for o in original.objects}])
    first, instruction, area = _plain_add(rng, original, colour)
    turns = [DialogueTurn(f"{rng.choice(_CONSTRAINTS).format(colour=colour)} {instruction}", 0, first, area)]
    if rng.random() < 0.5:
        second, instruction, area = _plain_add(rng, first, colour)
    else:
        second, instruction, area = random_edit(rng, first, ("remove", "recolour", "move"))
    turns.append(DialogueTurn(instruction, 1, second, area))
    third, instruction, area = _plain_add(rng, second, colour)
    return original, [*turns, DialogueTurn(instruction, 2, third, area)]


def _refer(rng: random.Random, scene: Scene, referent: ToyObject, edit_types: tuple[str, ...], source: int) -> DialogueTurn:
    """A turn editing ``referent`` of version ``source`` (``scene``), naming it only as "it" or "the one you added"."""
    edit_type = rng.choice(edit_types)
    target, area, words = edit_scene(rng, edit_type, scene, referent)
    return DialogueTurn(rng.choice(_REFERRING[edit_type]).format(**words), source, target, area)


def _understanding(rng: random.Random) -> tuple[Scene, list[DialogueTurn]]:
    original = random_scene(rng, rng.randint(1, 2))
    first, instruction, area = random_edit(rng, original, ("add",))
    (added,) = set(first.objects) - set(original.objects)
    second = _refer(rng, first, added, ("recolour", "move"), 1)
    (changed,) = set(second.target.objects) - set(first.objects)
    return original, [DialogueTurn(instruction, 0, first, area), second, _refer(rng, second.target, changed, ("recolour", "move", "remove"), 2)]


def _backtracking(rng: random.Random) -> tuple[Scene, list[DialogueTurn]]:
    original = random_scene(rng, rng.randint(2, 3))
    turns: list[DialogueTurn] = []
    for source in (0, 1):
        target, instruction, area = random_edit(rng, turns[-1].target if turns else original)
        turns.append(DialogueTurn(instruction, source, target, area))
    versions = (original, turns[0].target, turns[1].target)
    version = rng.choice((0, 1))
    target, instruction, area = random_edit(rng, versions[version])
    while _same(target, versions[2]):  # redrawn: discarding turn 2's result must always change the target
        target, instruction, area = random_edit(rng, versions[version])
    return original, [*turns, DialogueTurn(backtrack(version, instruction), version, target, area)]


_MAKERS: dict[str, Callable[[random.Random], tuple[Scene, list[DialogueTurn]]]] = {
    "memory": _memory,
    "understanding": _understanding,
    "backtracking": _backtracking,
}


def dialogue(seed: int, split: str, index: int) -> Dialogue:
    """The ``index``-th dialogue of a split; its kind cycles through :data:`DIALOGUE_KINDS`."""
    kind = DIALOGUE_KINDS[index % len(DIALOGUE_KINDS)]
    original, turns = _MAKERS[kind](random.Random(f"toy/dialogue/{seed}/{split}/{index}"))
    return Dialogue(kind, original, tuple(turns))


def dialogue_turn_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """The ``index``-th training sample: turn ``index % 3 + 1`` of dialogue ``index // 3``, from the
    exact version it edits, with the earlier instructions as ``history``."""
    number, turn = divmod(index, TURNS)
    talk = dialogue(seed, split, number)
    step = talk.turns[turn]
    source = talk.version(step.source)
    sample = edit_record(f"{split}_{number:06d}_t{turn + 1}", source, step.target, step.instruction, step.area, talk.kind, resolution)
    extra = {"source_scene": scene_json(source), "target_scene": scene_json(step.target), "turn": turn + 1, "source_version": step.source}
    return replace(sample, history=[t.instruction for t in talk.turns[:turn]]), extra


def dialogue_case_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """Dialogue ``index`` as one multi-turn evaluation case: turn 1 from the original, turns 2 and 3
    as ``turns`` with their exact targets and masks."""
    talk = dialogue(seed, split, index)
    first, later = talk.turns[0], talk.turns[1:]
    sample = edit_record(f"{split}_{index:06d}", talk.original, first.target, first.instruction, first.area, talk.kind, resolution)
    sources = [render(talk.version(t.source), resolution) for t in later]
    targets = [render(t.target, resolution) for t in later]
    sample = replace(
        sample,
        turns=[t.instruction for t in later],
        turn_targets=[Image.fromarray(target) for target in targets],
        turn_masks=[change_mask(source, target) for source, target in zip(sources, targets)],
    )
    extra = {
        "source_scene": scene_json(talk.original),
        "target_scene": scene_json(first.target),
        "turn_scenes": [scene_json(t.target) for t in later],
        "source_versions": [t.source for t in talk.turns],
    }
    return sample, extra


def dialogue_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """The toy ``dialogue`` task: a turn sample (:func:`dialogue_turn_sample`) in train and val, a
    whole evaluation case (:func:`dialogue_case_sample`) in test."""
    make = dialogue_case_sample if split == "test" else dialogue_turn_sample
    return make(seed, split, index, resolution)
