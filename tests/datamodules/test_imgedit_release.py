"""ImgEdit's training release in its published schema (pyarrow parquet, PNGs in tars and split tars,
pre-processing JSON with COCO RLE masks): samples, dialogue versions, masks, the mismatch report, conversion."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from datamodules.convert import main as convert_main
from datamodules.formats.images import ImageIndex
from datamodules.formats.imgedit_release import ImgEditRelease
from datamodules.formats.imgedit_segmentation import edit_region, parse_entry, rle_mask
from datamodules.samples import DataConfigError
from datamodules.shards import ShardDataModule
from tests.helpers.recipes import error_lines, run_zoo

TURN = pa.struct([("input_images", pa.list_(pa.string())), ("output_images", pa.list_(pa.string())), ("prompt", pa.string())])
SINGLE = pa.schema([(name, TURN.field(name).type) for name in ("input_images", "output_images", "prompt")])
MULTI = pa.schema([("data", pa.list_(TURN))])
SIZE = (16, 12)  # width, height


def png(seed: int, size: tuple[int, int] = SIZE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_tar(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def split_tar(path: Path, members: dict[str, bytes], parts: int) -> list[Path]:
    """The tar cut into ``parts`` pieces named as upstream's ``<archive>.tar.split.NNN`` (the tar itself removed)."""
    data = write_tar(path, members)
    step = -(-len(data) // parts)
    # An odd offset puts a part boundary inside a tar header block.
    cuts = [0, *(min(len(data), i * step + 7) for i in range(1, parts)), len(data)]
    files = []
    for number, (start, end) in enumerate(itertools.pairwise(cuts)):
        files.append(path.with_name(f"{path.name}.split.{number:03d}"))
        files[-1].write_bytes(data[start:end])
    path.unlink()
    return files


def single_row(folder: str, prompt: str) -> dict[str, Any]:
    return {"input_images": [f"{folder}/original.png"], "output_images": [f"{folder}/result.png"], "prompt": prompt}


def rle(mask: np.ndarray) -> str:
    """A mask as upstream's 4_yolo_seg_aes_clip.py stores it: the counts string of a compressed RLE."""
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("utf-8")


def segmentation_json(path: str, items: list[tuple[str, str, list[float], np.ndarray]], height: int = SIZE[1], width: int = SIZE[0]) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": path, "cap": ["a scene"], "resolution": {"height": height, "width": width}, "aes": 6.0, "border": [0]}
    entry["segmentation"] = {"background": [], "object": [], "box_format": "xyxy"}
    for group, name, bbox, mask in items:
        entry["segmentation"][group].append({"class_name": name, "bbox": bbox, "mask": rle(mask), "score": 0.9, "clip_score": 0.9, "aes_score": 5.0})
    return entry


def region(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


@pytest.fixture
def release(tmp_path: Path) -> dict[str, Any]:
    """A remove file (split tar), a compose file (plain tar with an extra top folder) and a version-backtracking file."""
    root = tmp_path / "ImgEdit"
    (root / "Parquet").mkdir(parents=True)
    (root / "Singleturn").mkdir()
    (root / "Multiturn").mkdir()
    remove = {f"results_remove_laion_part5/00094_00030_00030474{i}/{name}.png": png(10 * i + j) for i in range(3) for j, name in enumerate(("original", "result"))}
    remove["results_remove_laion_part5/stray/original.png"] = png(99)
    rows = [single_row(f"results_remove_laion_part5/00094_00030_00030474{i}", f"Remove the dog {i}") for i in range(3)]
    rows.append(single_row("results_remove_laion_part5/00094_00030_000304749", "Remove the cat"))  # its images are in no tar
    pq.write_table(pa.Table.from_pylist(rows, schema=SINGLE), root / "Parquet" / "remove_part5.parquet")
    parts = split_tar(root / "Singleturn" / "remove_part5.tar", remove, parts=2)
    compose = {"Singleturn/results_compose_part0/c1/original.png": png(50), "Singleturn/results_compose_part0/c1/result.png": png(51)}
    write_tar(root / "Singleturn" / "compose_part0.tar", compose)
    pq.write_table(pa.Table.from_pylist([single_row("results_compose_part0/c1", "Add a hat and make it night")], schema=SINGLE), root / "Parquet" / "compose_part0.parquet")

    folder = "results_version_backtracking_part0/00031_00020_000209651"
    original, first, second = png(70), png(71), png(72)
    dialogue = {f"{folder}/origin_0.png": original, f"{folder}/result_0.png": first, f"{folder}/origin_1.png": first, f"{folder}/result_1.png": second}
    dialogue[f"{folder}/origin_2.png"], dialogue[f"{folder}/result_2.png"] = original, png(73)  # turn 3 goes back to the original
    prompts = ["add a green vest", "replace the green vest with a brown jacket", "withdraw the previous modifications, make the vest brighter"]
    turns = [{"input_images": [f"{folder}/origin_{k}.png"], "output_images": [f"{folder}/result_{k}.png"], "prompt": prompt} for k, prompt in enumerate(prompts)]
    pq.write_table(pa.Table.from_pylist([{"data": turns}], schema=MULTI), root / "Parquet" / "version_backtracking_part0.parquet")
    write_tar(root / "Multiturn" / "results_version_backtracking_part0.tar", dialogue)
    return {"root": root, "parts": parts, "remove": remove, "compose": compose, "dialogue": dialogue, "prompts": prompts, "folder": folder}


def test_single_turn_rows_become_samples_with_the_file_names_edit_type(release: dict[str, Any]) -> None:
    root = release["root"]
    reader = ImgEditRelease([root / "Parquet" / "remove_part5.parquet", root / "Parquet" / "compose_part0.parquet"], [root / "Singleturn"])
    samples = {sample.key: (sample, extra) for sample, extra in reader.pairs()}
    assert list(samples) == [*(f"results_remove_laion_part5/00094_00030_00030474{i}" for i in range(3)), "results_compose_part0/c1"]
    sample, extra = samples["results_remove_laion_part5/00094_00030_000304741"]
    assert sample.instruction == "Remove the dog 1" and sample.edit_type == "remove" and extra == {} and sample.history == []
    assert np.array_equal(np.asarray(sample.source), pixels(release["remove"]["results_remove_laion_part5/00094_00030_000304741/original.png"]))
    assert np.array_equal(np.asarray(sample.target), pixels(release["remove"]["results_remove_laion_part5/00094_00030_000304741/result.png"]))
    compose, _ = samples["results_compose_part0/c1"]
    assert compose.edit_type == "hybrid", "the compose parquet was renamed hybrid upstream"
    assert np.array_equal(np.asarray(compose.target), pixels(release["compose"]["Singleturn/results_compose_part0/c1/result.png"])), "a leading top folder of the tar is stripped"
    assert reader.skipped == {"missing image": 1}


def test_a_dialogue_becomes_one_sample_per_turn_with_history_and_the_version_it_edits(release: dict[str, Any]) -> None:
    root, folder, prompts = release["root"], release["folder"], release["prompts"]
    reader = ImgEditRelease([root / "Parquet" / "version_backtracking_part0.parquet"], [root / "Multiturn"])
    pairs = list(reader.pairs())
    assert [sample.key for sample, _ in pairs] == [f"{folder}_t{k}" for k in (1, 2, 3)]
    assert [sample.history for sample, _ in pairs] == [[], prompts[:1], prompts[:2]]
    assert [sample.instruction for sample, _ in pairs] == prompts and {s.edit_type for s, _ in pairs} == {"version_backtracking"}
    assert [extra for _, extra in pairs] == [{"dialogue": folder, "turn": k, "source_version": v} for k, v in ((1, 0), (2, 1), (3, 0))]
    third, _ = pairs[2]
    assert np.array_equal(np.asarray(third.source), pixels(release["dialogue"][f"{folder}/origin_0.png"]))
    assert np.array_equal(np.asarray(third.target), pixels(release["dialogue"][f"{folder}/result_2.png"]))


def test_a_turn_input_equal_to_no_earlier_version_is_counted(release: dict[str, Any]) -> None:
    root, folder = release["root"], release["folder"]
    dialogue = {**release["dialogue"], f"{folder}/origin_2.png": png(80)}
    write_tar(root / "Multiturn" / "results_version_backtracking_part0.tar", dialogue)
    pairs = list((reader := ImgEditRelease([root / "Parquet"], [root / "Multiturn"])).pairs())
    assert [extra["source_version"] for _, extra in pairs if "dialogue" in extra] == [0, 1, None]
    assert reader.counts["turn inputs equal to no earlier version"] == 1


def test_rle_masks_decode_exactly_with_the_object_white(tmp_path: Path) -> None:
    mask = region(2, 3, 7, 11)
    mask[4, 5] = 0  # a hole, so the run lengths are not trivial
    decoded = np.asarray(rle_mask(rle(mask), SIZE[1], SIZE[0]))
    assert decoded.dtype == np.uint8 and set(np.unique(decoded)) == {0, 255}
    assert np.array_equal(decoded, mask * 255), "255 inside the object"
    upstream = (1 - mask_util.decode({"counts": rle(mask).encode(), "size": [SIZE[1], SIZE[0]]})) * 255  # rle_to_mask's inverted image
    assert np.array_equal(decoded, 255 - upstream)


def test_boxes_and_the_edit_region_of_a_pre_processing_object() -> None:
    items = [
        ("object", "dog", [3.0, 2.0, 11.0, 7.0], region(2, 3, 7, 11)),
        ("object", "hot dog", [0.0, 0.0, 4.0, 4.0], region(0, 0, 4, 4)),
        ("background", "sky", [0.0, 0.0, 16.0, 3.0], region(0, 0, 3, 16)),
    ]
    image = parse_entry(segmentation_json("00094/00030/000304740.jpg", items), "part0.json")
    assert image.boxes() == [
        {"box": [187, 166, 687, 583], "color": "", "label": "dog"},
        {"box": [0, 0, 250, 333], "color": "", "label": "hot dog"},
        {"box": [0, 0, 999, 250], "color": "", "label": "sky"},
    ]
    name, mask = edit_region(image, "remove", "Remove the dog 0")  # type: ignore[misc]
    assert name == "dog" and np.array_equal(np.asarray(mask), region(2, 3, 7, 11) * 255)
    assert edit_region(image, "background", "Darken the sky")[0] == "sky"  # type: ignore[index]
    assert edit_region(image, "remove", "Remove the hot dog") is None, "two items named in the prompt: ambiguous"
    assert edit_region(image, "add", "Add a dog") is None, "an added object is not in the source"
    assert edit_region(image, "remove", "Remove the doghouse") is None, "whole words only"


def test_the_json_gives_matching_rows_boxes_and_masks_and_the_report_names_every_mismatch(
    release: dict[str, Any], tmp_path: Path
) -> None:
    root = release["root"]
    objects = [("object", "dog", [3.0, 2.0, 11.0, 7.0], region(2, 3, 7, 11))]
    twice = [("object", "dog", [6.0, 4.0, 22.0, 14.0], np.kron(region(2, 3, 7, 11), np.ones((2, 2), dtype=np.uint8)))]
    documents = [segmentation_json("00094/00030/000304740.jpg", twice, height=24, width=32)]  # the LAION image at twice the size
    documents.append(segmentation_json("00094/00030/000304742.jpg", objects * 2))
    documents.append(segmentation_json("c1.jpg", objects, height=30, width=10))  # another aspect ratio than the row's image
    documents.append(segmentation_json("00011/00022/000333444.jpg", objects))  # no row has this image
    json_file = tmp_path / "part0.json"
    json_file.write_text(json.dumps(documents))
    parquet = [root / "Parquet" / "remove_part5.parquet", root / "Parquet" / "compose_part0.parquet"]
    reader = ImgEditRelease(parquet, [*release["parts"], root / "Singleturn" / "compose_part0.tar"], [json_file])
    samples = {sample.key: (sample, extra) for sample, extra in reader.pairs()}
    first, extra = samples["results_remove_laion_part5/00094_00030_000304740"]
    dog = {"box": [187, 166, 687, 583], "color": "", "label": "dog"}
    assert extra == {"boxes_of": "00094/00030/000304740.jpg", "source_boxes": [dog], "mask_class": "dog"}
    assert first.boxes == [], "boxes describe the target; the JSON's describe the source"
    assert np.array_equal(np.asarray(first.mask), region(2, 3, 7, 11) * 255)
    ambiguous, extra = samples["results_remove_laion_part5/00094_00030_000304742"]
    assert ambiguous.mask is None and len(extra["source_boxes"]) == 2 and extra["boxes_of"] == "00094/00030/000304742.jpg"
    assert samples["results_remove_laion_part5/00094_00030_000304741"][1] == {}, "no JSON object for this image"
    assert samples["results_compose_part0/c1"][0].boxes == [] and samples["results_compose_part0/c1"][1] == {}

    report = "\n".join(reader.report(limit=5))
    assert "skipped 1 row(s); missing image: 1" in report
    assert "2 image path(s) named by parquet rows are in no --images source" in report
    assert "  results_remove_laion_part5/00094_00030_000304749/original.png  (named by remove_part5.parquet row 4)" in report
    assert "  results_remove_laion_part5/00094_00030_000304749/result.png  (named by remove_part5.parquet row 4)" in report
    assert "1 image(s) in --images are named by no parquet row" in report
    assert f"  results_remove_laion_part5/stray/original.png  (in {root / 'Singleturn' / 'remove_part5.tar'}.split.*)" in report
    assert "1 --json object(s) describe an image no single-turn row uses" in report and f"  00011/00022/000333444.jpg  (in {json_file})" in report
    assert "edit-region masks: 1" in report and "rows without a --json object: 1" in report
    assert "rows whose --json resolution has another aspect ratio (no boxes): 1" in report


def test_split_parts_read_as_one_tar_and_a_missing_part_is_an_error(release: dict[str, Any]) -> None:
    parts = release["parts"]
    index = ImageIndex(parts)
    assert sorted(index.members) == sorted(release["remove"])
    name = "results_remove_laion_part5/stray/original.png"
    assert index.read(index.resolve(name) or "") == release["remove"][name]
    with pytest.raises(DataConfigError, match=r"parts \[1\] given; parts 0..1 must all be there"):
        ImageIndex(parts[1:])


def test_convert_writes_a_split_that_round_trips_through_the_shard_datamodule(release: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = release["root"], tmp_path / "shards"
    code = convert_main(["--format", "imgedit", "--parquet", str(root / "Parquet"), "--images", str(root), "--out", str(out), "--samples-per-shard", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 7 samples in 2 shard(s)" in printed and "skipped 1 row(s); missing image: 1" in printed
    expected = {sample.key.replace("/", "_"): sample for sample, _ in ImgEditRelease([root / "Parquet"], [root]).pairs()}
    dm = ShardDataModule(val_shards=str(out), val_batch_size=8, resolution=16, mllm_resolution=8)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert sorted(batch.key) == sorted(expected)
    folder = release["folder"].replace("/", "_")
    rows = {key: i for i, key in enumerate(batch.key)}
    assert batch.history[rows[f"{folder}_t3"]] == release["prompts"][:2] and batch.history[rows["results_compose_part0_c1"]] == []
    assert batch.edit_type[rows["results_compose_part0_c1"]] == "hybrid"
    assert [batch.instruction[rows[key]] for key in expected] == [sample.instruction for sample in expected.values()]


def test_a_parquet_of_another_schema_is_one_error_line_and_exit_2(release: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad_part0.parquet"
    pq.write_table(pa.table({"image": ["a.png"], "instruction": ["x"]}), bad)
    result = run_zoo("data", "convert", "--format", "imgedit", "--parquet", str(bad), "--images", str(release["root"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "is not an ImgEdit parquet: it has columns ['image', 'instruction']" in line and "Traceback" not in result.stderr
    assert convert_main(["--format", "imgedit", "--parquet", str(tmp_path / "none.parquet"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
