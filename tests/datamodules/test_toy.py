from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageColor

from datamodules.samples import collate
from datamodules.shard_format import decode_sample, read_tar
from datamodules.toy import edit_sample, generate, t2i_sample
from datamodules.toy import main as toy_main
from datamodules.toy_scenes import EDIT_TYPES, PALETTE, POSITIONS
from zoo.blocks.optimized_instruction import OptimizedInstruction, parse


@pytest.mark.parametrize("resolution", [32, 64])
def test_every_edit_type_changes_exactly_the_mask(resolution: int) -> None:
    seen = set()
    for index in range(24):
        sample, extra = edit_sample(seed=1, split="train", index=index, resolution=resolution)
        seen.add(sample.edit_type)
        src, tgt = np.asarray(sample.source), np.asarray(sample.target)
        mask = np.asarray(sample.mask) == 255
        assert src.shape == (resolution, resolution, 3)
        assert set(np.unique(np.asarray(sample.mask))) <= {0, 255}
        changed = (src != tgt).any(axis=2)
        assert mask.any(), sample.instruction
        assert np.array_equal(changed, mask), f"{sample.edit_type}: {sample.instruction}"
        if sample.edit_type == "background":
            background = PALETTE[extra["source_scene"]["background"]]
            assert (src[mask] == background).all()
    assert seen == set(EDIT_TYPES)


def test_boxes_match_rendered_target_objects() -> None:
    for index in range(12):
        sample, extra = edit_sample(seed=2, split="val", index=index)
        tgt = np.asarray(sample.target)
        objects = extra["target_scene"]["objects"]
        covered = np.zeros(tgt.shape[:2], dtype=bool)
        assert len(sample.boxes) == len(objects) and 1 <= len(objects) <= 3
        for box in sample.boxes:
            colour = np.all(tgt == PALETTE[box["color"]], axis=2)
            x1, y1, x2, y2 = (round(v * 32 / 1000) for v in box["box"])
            inside = colour[y1:y2, x1:x2]
            # The box is the tight bounding box of that object's pixels (objects of one colour
            # are distinct shapes in distinct cells, so restrict to the box region).
            rows, cols = np.nonzero(inside)
            assert rows.min() == 0 and cols.min() == 0 and rows.max() == y2 - y1 - 1 and cols.max() == x2 - x1 - 1
            assert box["label"] in ("circle", "square", "triangle")
            covered[y1:y2, x1:x2] = True
        background = PALETTE[extra["target_scene"]["background"]]
        assert (tgt[~covered] == background).all()


def test_deterministic_by_seed_and_instruction_names_the_edit() -> None:
    a = [s for s, _ in generate("edit", 5, "train", 6)]
    b = [s for s, _ in generate("edit", 5, "train", 6)]
    c = [s for s, _ in generate("edit", 6, "train", 6)]
    assert [s.instruction for s in a] == [s.instruction for s in b]
    assert all(np.array_equal(np.asarray(x.target), np.asarray(y.target)) for x, y in zip(a, b))
    assert [s.instruction for s in a] != [s.instruction for s in c]
    for sample in a:
        sections = re.findall(r"^(\d)\. ([A-Za-z ]+):", sample.blueprint, flags=re.M)
        assert [n for n, _ in sections] == ["1", "2", "3", "4", "5"]
        assert [t for _, t in sections] == [
            "Edit Instruction", "Global Layout Perception", "Local Object Perception",
            "Edit Area Localization", "Edited Image Imagination",
        ]
        assert sample.blueprint.startswith(f"1. Edit Instruction: {sample.instruction}\n")
    move = next(s for s in a if s.edit_type == "move")
    assert any(p in move.instruction for p in POSITIONS)


def test_t2i_prompt_and_boxes_describe_the_image() -> None:
    sample, extra = t2i_sample(seed=0, split="test", index=3)
    image = np.asarray(sample.image)
    objects = extra["scene"]["objects"]
    assert len(sample.boxes) == len(objects)
    for obj in objects:
        assert f"{obj['colour']} {obj['shape']} at the {POSITIONS[obj['cell']]}" in sample.prompt
        assert np.all(image == PALETTE[obj["colour"]], axis=2).any()
    assert f"on a {extra['scene']['background']} background" in sample.prompt


# GoT's box parser (got/models/utils.py): object, box in [0, 1000), one space, "(colour)".
_GOT_OBJECT = re.compile(
    r"<\|object_ref_start\|>(\w+)<\|object_ref_end\|><\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|> \((\w+)\)"
)


def _chain_boxes(chain: str) -> list[dict]:
    return [{"box": [int(v) for v in m[1:5]], "color": m[5], "label": m[0]} for m in _GOT_OBJECT.findall(chain)]


def test_got_chains_hold_exactly_the_target_boxes() -> None:
    for index in range(12):
        edit, extra = edit_sample(seed=4, split="train", index=index)
        assert _chain_boxes(edit.chain) == edit.boxes and len(edit.boxes) == len(extra["target_scene"]["objects"])
        assert edit.chain.startswith(edit.instruction)
        assert f"a {extra['target_scene']['background']} background" in edit.chain
        t2i, extra = t2i_sample(seed=4, split="train", index=index)
        assert _chain_boxes(t2i.chain) == t2i.boxes and len(t2i.boxes) == len(extra["scene"]["objects"])


def test_mixed_split_alternates_the_edit_and_t2i_samples(tmp_path: Path) -> None:
    mixed = [s for s, _ in generate("mixed", 5, "train", 5)]
    assert [type(s).__name__ for s in mixed] == ["EditSample", "T2ISample"] * 2 + ["EditSample"]
    assert [s.key for s in mixed] == [f"train_{i:06d}" for i in range(5)]
    edits, t2i = [s for s, _ in generate("edit", 5, "train", 3)], [s for s, _ in generate("t2i", 5, "train", 2)]
    assert [s.instruction for s in mixed[::2]] == [s.instruction for s in edits]
    assert [s.prompt for s in mixed[1::2]] == [s.prompt for s in t2i] and all(s.chain for s in mixed)
    assert toy_main(["--out", str(tmp_path), "--train", "6", "--val", "2", "--test", "2", "--task", "mixed", "--resolution", "16"]) == 0
    decoded = [decode_sample(raw) for raw in read_tar(str(tmp_path / "train" / "shard-000000.tar"))]
    assert collate(decoded, 16, 16).task == ["edit", "t2i"] * 3


def test_chain_colours_are_pil_colour_names() -> None:
    # GoT fills each box on its mask canvas with PIL's colour of that name.
    for name in PALETTE:
        assert ImageColor.getrgb(name)


def test_toy_shards_carry_the_chain(toy_root: Path) -> None:
    raw = next(read_tar(str(toy_root / "val" / "shard-000000.tar")))
    decoded = decode_sample(raw)
    index = int(decoded.key.rsplit("_", 1)[1])
    assert decoded.chain == edit_sample(seed=3, split="val", index=index)[0].chain
    assert collate([decoded], resolution=16, mllm_resolution=16).chain == [decoded.chain]


def test_writing_shows_progress_with_counts_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert toy_main(["--out", str(tmp_path), "--train", "7", "--val", "2", "--test", "3", "--resolution", "16"]) == 0
    printed = capsys.readouterr().out
    for split, count in (("train", 7), ("val", 2), ("test", 3)):
        assert re.search(rf"toy {split} .* {count}/{count} +\d+(\.\d)?/s", printed), printed
        assert f"{split}: {count} samples in 1 shard(s)" in printed
        assert re.search(rf"^toy {split}: {count} samples in \d+\.\d s \(\d+\.\d/s\)$", printed, re.M), printed


def test_optimized_instruction_names_the_change_the_context_and_what_goes() -> None:
    seen = set()
    for index in range(24):
        sample, extra = edit_sample(seed=7, split="train", index=index)
        reply = parse(sample.optimized_instruction)
        assert OptimizedInstruction(reply.optimized_prompt, reply.negative_prompt).render() == sample.optimized_instruction
        source, target = (
            {(o["colour"], o["shape"], o["cell"]) for o in extra[f"{side}_scene"]["objects"]} for side in ("source", "target")
        )
        named = lambda o: f"{o[0]} {o[1]} at the {POSITIONS[o[2]]}"  # noqa: E731
        phrases = reply.optimized_prompt.split(", ")
        assert [p for p in phrases if p.startswith("keep the ")] == [f"keep the {named(o)}" for o in sorted(source & target, key=lambda o: o[2])]
        assert {named(o) for o in target - source} <= set(phrases)
        negative = reply.negative_prompt.split(", ")
        assert negative[-3:] == ["blurred edges", "extra objects", "colour bleeding"]
        assert len(negative) - 3 == len(source - target) + (sample.edit_type == "background")
        backgrounds = extra["source_scene"]["background"], extra["target_scene"]["background"]
        assert f"{backgrounds[1]} background" in phrases
        if sample.edit_type == "background":
            assert negative[0] == f"{backgrounds[0]} background"
        if sample.edit_type == "remove":
            [gone] = source - target
            assert f"empty cell at the {POSITIONS[gone[2]]}" in phrases and negative[0] == f"{gone[0]} {gone[1]}"
        if sample.edit_type == "move":
            [old] = source - target
            assert negative[0] == named(old), "the moved object is unwanted only where it was"
        seen.add(sample.edit_type)
    assert seen == set(EDIT_TYPES)


# Recorded from the toy generator before the ImgEdit edit types and dialogues were added: the DIM,
# GoT and MIND-Edit golden fixtures and the demos depend on these samples staying bit-identical.
_GOLDEN = {
    "edit": ["aed254a17172808c", "98ea0faef5f92ebd", "9ff721f6965714e6", "f9f96de9bbd84634", "42096c0b73d81258", "de17f91244542494",
             "637ebb471cfe4733", "34fb3b72ab074674", "4d71284806138128", "3daf311276089c60", "373869d5a12502c6", "24895946a9926ad6"],
    "t2i": ["086020e35a738388", "eee65f9432405844", "87026ad4ef9345fb", "9d79250c344b3bd4", "498b66e80b5ad65b", "18fa6654c4bc0101",
            "55f200e0fa8b8239", "ab8f575b88f327c5", "11920c5eb1c5e7d9", "1f256d5220053320", "06b9f39a35cc9ebe", "106d1ecabfec5b86"],
    "mixed": ["aed254a17172808c", "35dcfecd2417f571", "c44bcd67e86eda13", "f83fcf566f6f2447", "300d05b4c894df3f", "34cb410715837539",
              "cf9d6378bd57a3e7", "f4ce0d11d6d05386", "6fa0770fb9dbac76", "fe3ca3207f7d339d", "79a57ce58f2279e6", "3f39dfe4735d4767"],
}


def _digest(task: str, index: int) -> str:
    """sha256 (16 hex digits) of a sample's pixels, texts, boxes and scene description."""
    import hashlib
    import json

    from datamodules.toy import TASKS

    sample, extra = TASKS[task](0, "train", index)
    digest = hashlib.sha256()
    for name in ("source", "target", "image", "mask"):
        image = getattr(sample, name, None)
        if image is not None:
            digest.update(np.asarray(image).tobytes())
    names = ("key", "instruction", "prompt", "blueprint", "chain", "optimized_instruction", "edit_type", "boxes")
    digest.update(json.dumps([{n: getattr(sample, n, None) for n in names}, extra], sort_keys=True).encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("task", sorted(_GOLDEN))
def test_existing_tasks_stay_bit_identical(task: str) -> None:
    assert [_digest(task, i) for i in range(12)] == _GOLDEN[task]


def _named(instruction: str, scene: dict) -> list[dict]:
    """The objects of a scene (json) an instruction names as "the <colour> <shape>", in the order named."""
    named = {f"the {o['colour']} {o['shape']}": o for o in scene["objects"]}
    found = sorted((instruction.lower().find(name), name) for name in named if name in instruction.lower())
    return [named[name] for _, name in found]


def _rendered(scene: dict) -> np.ndarray:
    from datamodules.toy_scenes import Scene, ToyObject, render

    return render(Scene(scene["background"], tuple(ToyObject(**o) for o in scene["objects"])), 32)


def test_imgedit_task_cycles_through_extract_and_hybrid_with_exact_masks() -> None:
    from datamodules.toy import imgedit_sample
    from datamodules.toy_scenes import IMGEDIT_EDIT_TYPES

    seen = []
    for index in range(16):
        sample, extra = imgedit_sample(seed=4, split="train", index=index)
        seen.append(sample.edit_type)
        changed = (np.asarray(sample.source) != np.asarray(sample.target)).any(axis=2)
        assert changed.any() and np.array_equal(changed, np.asarray(sample.mask) == 255), sample.instruction
        assert np.array_equal(np.asarray(sample.target), _rendered(extra["target_scene"]))
        assert sample.blueprint.startswith(f"1. Edit Instruction: {sample.instruction}\n")
        assert len(sample.boxes) == len(extra["target_scene"]["objects"]) and parse(sample.optimized_instruction).optimized_prompt
    assert seen == list(IMGEDIT_EDIT_TYPES) * 2


def test_extract_leaves_only_the_named_object_on_white() -> None:
    from datamodules.toy import imgedit_sample

    for index in (6, 14, 22, 30):
        sample, extra = imgedit_sample(seed=0, split="val", index=index)
        assert sample.edit_type == "extract" and len(extra["source_scene"]["objects"]) >= 2
        (named,) = _named(sample.instruction, extra["source_scene"])
        assert extra["target_scene"] == {"background": "white", "objects": [named]}
        target = np.asarray(sample.target)
        inside = np.all(target == PALETTE[named["colour"]], axis=2)
        assert (target[~inside] == PALETTE["white"]).all() and inside.any()


def test_hybrid_is_its_two_edits_one_after_the_other() -> None:
    from datamodules.toy import imgedit_sample

    for index in (7, 15, 23, 31, 39):
        sample, extra = imgedit_sample(seed=0, split="train", index=index)
        source, middle, target = (extra[f"{name}_scene"] for name in ("source", "middle", "target"))
        first, second = sample.instruction[:-1].split(" and ")
        (one,), (two,) = _named(first, source), _named(second, middle)
        assert one != two and two in source["objects"]
        # Each edit changes exactly the object its clause names; the second acts on the first's result.
        assert [o for o in source["objects"] if o not in middle["objects"]] == [one]
        assert [o for o in middle["objects"] if o not in target["objects"]] == [two]
        steps = [(_rendered(a) != _rendered(b)).any(axis=2) for a, b in ((source, middle), (middle, target))]
        assert not (steps[0] & steps[1]).any()  # disjoint regions: the mask is their union
        assert np.array_equal(steps[0] | steps[1], np.asarray(sample.mask) == 255)
        assert np.array_equal(np.asarray(sample.target), _rendered(target))
