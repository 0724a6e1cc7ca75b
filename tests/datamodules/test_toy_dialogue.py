"""Toy 3-turn dialogues: exact ground truth at every turn, and their shard samples."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.samples import collate
from datamodules.shard_format import decode_sample, encode_sample, read_tar, write_split
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from datamodules.toy_dialogue import DEFAULT_COLOUR, DIALOGUE_KINDS, Dialogue, dialogue, dialogue_case_sample, dialogue_turn_sample
from datamodules.toy_scenes import OBJECT_COLOURS, SHAPES, ToyObject, add_object, render
from zoo.blocks.dialogue import backtrack, source_version

DIALOGUES = [dialogue(0, "train", index) for index in range(45)]


def _of(kind: str) -> list[Dialogue]:
    return [talk for talk in DIALOGUES if talk.kind == kind]


def _changed(talk: Dialogue, number: int) -> np.ndarray:
    turn = talk.turns[number - 1]
    return (render(talk.version(turn.source), 32) != render(turn.target, 32)).any(axis=2)


def test_kinds_cycle_and_every_turn_names_the_version_it_edits() -> None:
    assert [talk.kind for talk in DIALOGUES[:6]] == [*DIALOGUE_KINDS, *DIALOGUE_KINDS]
    for talk in DIALOGUES:
        assert len(talk.turns) == 3
        for number, turn in enumerate(talk.turns, start=1):
            assert source_version(turn.instruction, number) == turn.source
            assert _changed(talk, number).any(), turn.instruction
            if talk.kind != "backtracking" or number < 3:
                assert turn.source == number - 1


def test_backtracking_turn_three_edits_the_named_version_and_discards_turn_two() -> None:
    versions = set()
    for talk in _of("backtracking"):
        third = talk.turns[2]
        versions.add(third.source)
        assert third.source in (0, 1)
        phrase = "Go back to the original image and " if third.source == 0 else "Go back to the result of turn 1 and "
        assert third.instruction.startswith(phrase)
        assert backtrack(third.source, third.instruction[len(phrase):]) == third.instruction
        assert not np.array_equal(render(third.target, 32), render(talk.version(2), 32))
    assert versions == {0, 1}


def test_memory_constraint_changes_the_later_adds() -> None:
    for talk in _of("memory"):
        (first,) = set(talk.turns[0].target.objects) - set(talk.original.objects)
        assert f" {first.colour}" in talk.turns[0].instruction.split(".")[0]  # stated by the constraint sentence
        third = talk.turns[2]
        assert not any(c in third.instruction for c in OBJECT_COLOURS)  # the turn alone names no colour
        (added,) = set(third.target.objects) - set(talk.version(2).objects)
        assert added.colour == first.colour != DEFAULT_COLOUR
        default, _, _ = add_object(talk.version(2), ToyObject(added.shape, DEFAULT_COLOUR, added.cell))
        assert not np.array_equal(render(third.target, 32), render(default, 32))


def test_understanding_refers_to_the_added_object_among_several() -> None:
    for talk in _of("understanding"):
        (referent,) = set(talk.turns[0].target.objects) - set(talk.original.objects)
        for turn in talk.turns[1:]:
            scene = talk.version(turn.source)
            assert len(scene.objects) >= 2  # "it" alone could mean any of them
            assert not any(shape in turn.instruction for shape in SHAPES)
            assert referent in scene.objects and referent not in turn.target.objects
            others = set(scene.objects) - {referent}
            assert others <= set(turn.target.objects)  # only the referent changed
            referent = next(iter(set(turn.target.objects) - others), referent)


def test_turn_samples_edit_their_exact_version_with_the_history() -> None:
    talk = dialogue(2, "val", 5)  # backtracking: index 5 % 3 == 2
    for number in (1, 2, 3):
        sample, extra = dialogue_turn_sample(2, "val", 5 * 3 + number - 1)
        turn = talk.turns[number - 1]
        assert sample.key == f"val_000005_t{number}" and sample.edit_type == "backtracking"
        assert sample.instruction == turn.instruction and sample.history == [t.instruction for t in talk.turns[: number - 1]]
        assert np.array_equal(np.asarray(sample.source), render(talk.version(turn.source), 32))
        assert np.array_equal(np.asarray(sample.target), render(turn.target, 32))
        assert np.array_equal(np.asarray(sample.mask) == 255, _changed(talk, number))
        assert extra["source_version"] == turn.source


def test_case_sample_holds_the_later_turns_exact_targets_and_masks() -> None:
    for index in range(3):
        talk = dialogue(1, "test", index)
        sample, _ = dialogue_case_sample(1, "test", index)
        assert sample.key == f"test_{index:06d}" and sample.edit_type == talk.kind
        assert np.array_equal(np.asarray(sample.source), render(talk.original, 32))
        assert np.array_equal(np.asarray(sample.target), render(talk.turns[0].target, 32))
        assert sample.instruction == talk.turns[0].instruction and sample.turns == [t.instruction for t in talk.turns[1:]]
        for number, (target, mask) in enumerate(zip(sample.turn_targets, sample.turn_masks), start=2):
            assert np.array_equal(np.asarray(target), render(talk.turns[number - 1].target, 32))
            assert np.array_equal(np.asarray(mask) == 255, _changed(talk, number))


def test_turn_targets_and_masks_round_trip_through_shards(tmp_path: Path) -> None:
    samples = [dialogue_case_sample(0, "test", i)[0] for i in range(3)] + [dialogue_turn_sample(0, "train", 1)[0]]
    write_split(tmp_path / "test", samples, samples_per_shard=2)
    dm = ShardDataModule(val_shards=str(tmp_path / "test"), val_batch_size=4, resolution=32, mllm_resolution=16)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    expected = collate(samples, 32, 16)
    order = [expected.key.index(key) for key in batch.key]
    assert batch.turns == [expected.turns[i] for i in order] and [len(t) for t in batch.turn_target] == [len(expected.turn_target[i]) for i in order]
    for got, want in zip(batch.turn_target + batch.turn_mask, [expected.turn_target[i] for i in order] + [expected.turn_mask[i] for i in order]):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert expected.turn_mask[0][0].shape == (1, 32, 32) and set(expected.turn_mask[0][0].unique().tolist()) == {0.0, 1.0}
    picked = batch.select([1, 0])
    assert picked.turn_target == [batch.turn_target[1], batch.turn_target[0]]
    assert batch.with_texts_of(1).turn_target is batch.turn_target  # images stay with their sample
    assert batch.to("cpu").turn_mask[0][0].device.type == "cpu"


def test_turn_targets_must_match_the_turns_and_turns_must_be_texts() -> None:
    sample, _ = dialogue_case_sample(0, "test", 0)
    with pytest.raises(ValueError, match="turn_targets for 2 later turns"):
        replace(sample, turn_targets=sample.turn_targets[:1])
    raw = encode_sample(sample)
    raw["json"] = json.dumps({**json.loads(raw["json"]), "turns": "make it blue"}).encode()
    with pytest.raises(ValueError, match="'turns'"):
        decode_sample(raw)


def test_cli_writes_dialogue_turns_for_training_and_cases_for_test(tmp_path: Path) -> None:
    assert toy_main(["--out", str(tmp_path), "--task", "dialogue", "--train", "6", "--val", "3", "--test", "2"]) == 0
    train = [raw for shard in sorted((tmp_path / "train").glob("*.tar")) for raw in read_tar(str(shard))]
    assert [raw["__key__"] for raw in train] == [f"train_00000{d}_t{k}" for d in (0, 1) for k in (1, 2, 3)]
    test = [raw for shard in sorted((tmp_path / "test").glob("*.tar")) for raw in read_tar(str(shard))]
    assert [raw["__key__"] for raw in test] == ["test_000000", "test_000001"]
    assert all({"turn2_target.png", "turn2_mask.png", "turn3_target.png", "turn3_mask.png"} <= set(raw) for raw in test)
    assert not any(name.startswith("turn") for raw in train for name in raw)
