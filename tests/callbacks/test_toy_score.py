"""Toy edit score on hand-built images with known answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.toy_score import ToyEditEvaluator, chain_record, report, summarize, toy_edit_scores
from datamodules.samples import EditBatch, EditOutputs, TurnOutputs, collate
from datamodules.toy_dialogue import dialogue_case_sample
from datamodules.toy_scenes import PALETTE, Scene, ToyObject, render
from zoo.blocks.dialogue import source_version


def _solid(name: str, size: int = 8) -> torch.Tensor:
    rgb = torch.tensor(PALETTE[name], dtype=torch.float32) / 255
    return rgb.view(3, 1, 1).expand(3, size, size).clone()


def _recolour_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4x4 square recoloured: source has colour A there, target colour B; 16 of 64 pixels."""
    names = list(PALETTE)
    background, before, after = names[0], names[1], names[2]
    source, target = _solid(background), _solid(background)
    source[:, 2:6, 2:6] = _solid(before)[:, :4, :4]
    target[:, 2:6, 2:6] = _solid(after)[:, :4, :4]
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    return source[None], target[None], mask[None]


def test_perfect_edit_scores_one_and_copy_scores_half() -> None:
    source, target, mask = _recolour_case()
    perfect = toy_edit_scores(target, target, mask)
    copy = toy_edit_scores(source, target, mask)
    assert perfect["score"].item() == 1.0
    assert copy["edit"].item() == 0.0 and copy["preserve"].item() == 1.0
    assert copy["score"].item() == 0.5


def test_small_noise_keeps_agreement_and_wrong_colour_does_not() -> None:
    source, target, mask = _recolour_case()
    noisy = target + 0.03 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    assert toy_edit_scores(noisy, target, mask)["score"].item() == 1.0
    half_done = target.clone()
    half_done[:, :, 2:4, 2:6] = source[:, :, 2:4, 2:6]
    scores = toy_edit_scores(half_done, target, mask)
    assert scores["edit"].item() == pytest.approx(0.5)
    assert scores["score"].item() == pytest.approx(0.75)


def test_empty_edit_region_is_an_error() -> None:
    source, target, _ = _recolour_case()
    with pytest.raises(ValueError, match="empty edit region"):
        toy_edit_scores(source, target, torch.zeros(1, 1, 8, 8))


def test_summary_groups_by_type() -> None:
    records = [
        {"edit_type": "add", "score": 1.0, "edit": 1.0, "preserve": 1.0},
        {"edit_type": "add", "score": 0.5, "edit": 0.0, "preserve": 1.0},
        {"edit_type": "move", "score": 0.0, "edit": 0.0, "preserve": 0.0},
    ]
    summary = summarize(records)
    assert summary["add"]["score"] == 0.75 and summary["add"]["count"] == 2
    assert summary["overall"]["score"] == pytest.approx(0.5)


def test_report_says_whether_the_trained_model_beats_the_rest(tmp_path) -> None:
    def write(name: str, label: str, model: float, copy: float) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({label: {"overall": {"score": model}}, "copy_source": {"overall": {"score": copy}}}))
        return str(path)

    out = tmp_path / "metrics.json"
    assert report([write("u.json", "untrained", 0.2, 0.5), write("t.json", "trained", 0.6, 0.5)], str(out))
    assert json.loads(out.read_text())["learned"] is True
    assert not report([write("u.json", "untrained", 0.2, 0.5), write("t.json", "trained", 0.45, 0.5)], str(out))


def test_report_checks_the_bar_every_edit_type_and_the_ablations(tmp_path) -> None:
    def write(name: str, label: str, add: float, move: float) -> str:
        groups = {"add": {"score": add}, "move": {"score": move}, "overall": {"score": (add + move) / 2}}
        path = tmp_path / name
        copy = {g: {"score": 0.5} for g in groups}
        path.write_text(json.dumps({label: groups, "copy_source": copy}))
        return str(path)

    out = str(tmp_path / "metrics.json")
    untrained, trained = write("u.json", "untrained", 0.1, 0.1), write("t.json", "trained", 0.9, 0.7)
    wrong = write("w.json", "wrong_instruction", 0.6, 0.6)
    assert report([untrained, wrong, trained], out, bar=0.75, ablations=("wrong_instruction",))
    merged = json.loads(Path(out).read_text())
    assert merged["learned"] and all(merged["checks"].values())
    assert not report([untrained, wrong, trained], out, bar=0.85, ablations=("wrong_instruction",))  # misses the bar
    close = write("c.json", "wrong_instruction", 0.85, 0.7)
    assert not report([untrained, close, trained], out, ablations=("wrong_instruction",))  # instruction barely matters
    one_type_below = write("t2.json", "trained", 1.0, 0.45)
    assert not report([untrained, one_type_below], out)  # overall 0.725 > 0.5, but "move" is below copying
    with pytest.raises(ValueError, match="no ablation labelled"):
        report([untrained, trained], out, ablations=("wrong_instruction",))


def test_chain_record_tells_parsing_from_exact_boxes() -> None:
    truth = [{"box": [100, 100, 300, 300], "color": "red", "label": "circle"}]
    exact = "a <|box_start|>(100,100),(300,300)<|box_end|> (red) circle"
    assert chain_record(exact, truth) == {"chain_parses": 1.0, "chain_exact": 1.0}
    assert chain_record(exact.replace("(red)", "(blue)"), truth) == {"chain_parses": 1.0, "chain_exact": 0.0}
    assert chain_record("no boxes at all", truth) == {"chain_parses": 0.0, "chain_exact": 0.0}
    broken = exact + " and <|box_start|>(5,5),(1,1)<|box_end|> (red)"
    assert chain_record(broken, truth)["chain_parses"] == 0.0  # one undrawable box spoils the chain


def test_kept_counts_the_objects_outside_the_region_that_preservation_hides() -> None:
    # "Remove the red circle" done by removing every object: preservation is still high (the
    # background dominates), but none of the other objects was kept.
    red, blue = ToyObject("circle", "red", 0), ToyObject("square", "blue", 4)
    source, target = render(Scene("black", (red, blue)), 32), render(Scene("black", (blue,)), 32)
    empty = render(Scene("black", ()), 32)
    mask = torch.from_numpy((source != target).any(axis=2)).float()[None, None]
    as_tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    everything_removed = toy_edit_scores(as_tensor(empty), as_tensor(target), mask)
    assert float(everything_removed["edit"]) == 1.0 and float(everything_removed["preserve"]) > 0.9
    assert float(everything_removed["kept"]) == 0.0
    done = toy_edit_scores(as_tensor(target), as_tensor(target), mask)
    assert float(done["kept"]) == 1.0 and float(done["score"]) == 1.0
    # A background change: the objects are what lies outside the region, the new colour is the background.
    white = render(Scene("white", (red, blue)), 32)
    region = torch.from_numpy((source != white).any(axis=2)).float()[None, None]
    assert float(toy_edit_scores(as_tensor(render(Scene("white", ()), 32)), as_tensor(white), region)["kept"]) == 0.0
    assert float(toy_edit_scores(as_tensor(white), as_tensor(white), region)["kept"]) == 1.0


def _dialogue_batch() -> EditBatch:
    """Six toy dialogues (two of each kind) as multi-turn evaluation cases."""
    return collate([dialogue_case_sample(0, "test", i)[0] for i in range(6)], 32, 16)


def _evaluate(tmp_path: Path, batch: EditBatch, pick: Callable[[int, int], torch.Tensor]) -> dict:
    """metrics.json of the evaluator on ``batch``, each turn ``k`` of row ``r`` edited into ``pick(r, k)``."""
    turns = []
    for number in (2, 3):
        rows = [r for r, later in enumerate(batch.turns) if len(later) >= number - 1]
        turns.append(TurnOutputs(rows=rows, edited=torch.stack([pick(r, number) for r in rows]), text=[""] * len(rows)))
    outputs = EditOutputs(key=batch.key, edited=torch.stack([pick(r, 1) for r in range(len(batch))]), text=[""] * len(batch), turns=turns)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    evaluator = ToyEditEvaluator(output_dir=str(tmp_path), label="model")
    evaluator.on_test_epoch_start(trainer, None)
    evaluator.on_test_batch_end(trainer, None, outputs, batch, 0)
    evaluator.on_test_epoch_end(trainer, None)
    return json.loads((tmp_path / "metrics.json").read_text())


def _truth(batch: EditBatch, row: int, number: int) -> torch.Tensor:
    return batch.target[row] if number == 1 else batch.turn_target[row][number - 2]


def _version(batch: EditBatch, row: int, version: int) -> torch.Tensor:
    return batch.source[row] if version == 0 else _truth(batch, row, version)


def test_multi_turn_scores_per_kind_and_turn(tmp_path: Path) -> None:
    batch = _dialogue_batch()
    kinds = ("memory", "understanding", "backtracking")
    groups = [f"{kind}/{part}" for kind in kinds for part in ("turn1", "turn2", "turn3", "final")]
    perfect = _evaluate(tmp_path, batch, lambda r, k: _truth(batch, r, k))
    assert all(perfect["model"][group]["score"] == 1.0 and perfect["model"][group]["count"] == 2 for group in groups)
    assert perfect["model"]["overall"]["count"] == 18 and perfect["copy_source"]["backtracking/final"]["score"] < 1.0

    def copied(row: int, number: int) -> torch.Tensor:  # each turn copies the exact version it edits
        instruction = batch.instruction[row] if number == 1 else batch.turns[row][number - 2]
        return _version(batch, row, source_version(instruction, number))

    copying = _evaluate(tmp_path, batch, copied)
    for group in groups + ["overall"]:
        assert copying["model"][group]["score"] == pytest.approx(copying["copy_source"][group]["score"])
        assert copying["copy_source"][group] == perfect["copy_source"][group]
        assert copying["model"][group]["score"] < 1.0


def test_editing_the_wrong_version_on_a_backtracking_turn_scores_below_perfect(tmp_path: Path) -> None:
    batch = _dialogue_batch()
    backtracking = {r for r, kind in enumerate(batch.edit_type) if kind == "backtracking"}

    def latest(row: int, number: int) -> torch.Tensor:  # turn 3 left as turn 2's result: the backtrack ignored
        return _truth(batch, row, 2) if number == 3 and row in backtracking else _truth(batch, row, number)

    metrics = _evaluate(tmp_path, batch, latest)["model"]
    assert metrics["backtracking/turn3"]["score"] < 1.0 and metrics["backtracking/final"]["score"] < 1.0
    assert metrics["backtracking/turn2"]["score"] == 1.0 and metrics["memory/final"]["score"] == 1.0
