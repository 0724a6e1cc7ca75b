"""Procedural edit (and T2I) data with exact ground truth, written straight into shards.

The scenes, edits and texts are :mod:`datamodules.toy_scenes`; the multi-turn dialogues are
:mod:`datamodules.toy_dialogue`. Each task (:data:`TASKS`) makes its ``index``-th sample of a split
from (seed, split, index) alone, so any subset can be regenerated in any order.

``toy --out DIR --train N --val N --test N --seed S --resolution R --samples-per-shard N [--task edit|t2i|mixed|imgedit|dialogue]``
writes DIR/train, DIR/val and DIR/test, each with its ``index.json``. ``edit`` cycles through
:data:`~datamodules.toy_scenes.EDIT_TYPES`, ``imgedit`` through ImgEdit's
:data:`~datamodules.toy_scenes.IMGEDIT_EDIT_TYPES` (adds extract and hybrid). ``mixed`` alternates
edit and T2I samples (GoT pretraining's mix of tasks): its sample ``2j`` is edit sample ``j`` and its
sample ``2j + 1`` is T2I sample ``j``, keyed by their position in the split. ``dialogue`` writes
3-turn dialogues (:func:`~datamodules.toy_dialogue.dialogue_sample`): one sample per turn in train
and val, one multi-turn evaluation case per dialogue in test.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from typing import Any, Iterator

from PIL import Image

from datamodules.samples import EditSample, T2ISample
from datamodules.shard_format import write_split
from datamodules.toy_dialogue import dialogue_sample
from datamodules.toy_scenes import (
    EDIT_TYPES,
    IMGEDIT_EDIT_TYPES,
    boxes,
    chain,
    describe,
    edit_record,
    make_edit,
    make_hybrid,
    random_scene,
    render,
    scene_json,
)


def edit_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """The ``index``-th edit sample of a split (independent of the others: any order, any subset)."""
    rng = random.Random(f"toy/edit/{seed}/{split}/{index}")
    edit_type = EDIT_TYPES[index % len(EDIT_TYPES)]
    source, target, instruction, area = make_edit(rng, edit_type, resolution)
    sample = edit_record(f"{split}_{index:06d}", source, target, instruction, area, edit_type, resolution)
    return sample, {"source_scene": scene_json(source), "target_scene": scene_json(target)}


def imgedit_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample, dict[str, Any]]:
    """The ``index``-th sample of ImgEdit's edit types (cycling through :data:`IMGEDIT_EDIT_TYPES`);
    a hybrid's json also holds the scene after its first edit (``middle_scene``)."""
    rng = random.Random(f"toy/imgedit/{seed}/{split}/{index}")
    edit_type = IMGEDIT_EDIT_TYPES[index % len(IMGEDIT_EDIT_TYPES)]
    extra: dict[str, Any] = {}
    if edit_type == "hybrid":
        source, middle, target, instruction, area = make_hybrid(rng)
        extra["middle_scene"] = scene_json(middle)
    else:
        source, target, instruction, area = make_edit(rng, edit_type, resolution)
    sample = edit_record(f"{split}_{index:06d}", source, target, instruction, area, edit_type, resolution)
    return sample, {"source_scene": scene_json(source), "target_scene": scene_json(target)} | extra


def t2i_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[T2ISample, dict[str, Any]]:
    """The ``index``-th text-to-image sample: a scene and the prompt describing it."""
    rng = random.Random(f"toy/t2i/{seed}/{split}/{index}")
    scene = random_scene(rng, rng.randint(1, 3))
    prompt = describe(scene)
    sample = T2ISample(
        key=f"{split}_{index:06d}",
        image=Image.fromarray(render(scene, resolution)),
        prompt=prompt[0].upper() + prompt[1:] + ".",
        boxes=boxes(scene, resolution),
        chain=chain(scene, resolution),
    )
    return sample, {"scene": scene_json(scene)}


def mixed_sample(seed: int, split: str, index: int, resolution: int = 32) -> tuple[EditSample | T2ISample, dict[str, Any]]:
    """The ``index``-th sample of a mixed split: edit sample ``index // 2`` when even, else T2I sample ``index // 2``."""
    make = t2i_sample if index % 2 else edit_sample
    sample, extra = make(seed, split, index // 2, resolution)
    return replace(sample, key=f"{split}_{index:06d}"), extra


TASKS = {"edit": edit_sample, "t2i": t2i_sample, "mixed": mixed_sample, "imgedit": imgedit_sample, "dialogue": dialogue_sample}
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
    parser.add_argument("--task", choices=sorted(TASKS), default="edit", help="mixed: edit and T2I samples alternate; imgedit: adds extract and hybrid; dialogue: 3-turn dialogues")
    args = parser.parse_args(argv)
    for split in ("train", "val", "test"):
        count = getattr(args, split)
        samples = generate(args.task, args.seed, split, count, args.resolution)
        index = write_split(f"{args.out}/{split}", samples, args.samples_per_shard, progress=f"toy {split}", total=count)
        print(f"{split}: {index['total']} samples in {len(index['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
