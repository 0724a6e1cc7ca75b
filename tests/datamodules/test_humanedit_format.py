"""HumanEdit's parquet release (published schema, written here with pyarrow): samples, masks, the split, bad rows, conversion."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.convert import main as convert_main
from datamodules.formats.humanedit import COLUMNS, HumanEditParquet, held_out_ids
from datamodules.shard_format import decode_sample, read_tar

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [(name, pa.int32() if name in ("CORE", "MASK") else IMAGE if name.endswith("_IMG") else pa.string()) for name in COLUMNS]
)


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def row(image_id: str, seed: int, size: tuple[int, int] = (12, 16), **changes: Any) -> dict[str, Any]:
    """A row as the release holds it: JPEG photos, and a mask black (0) inside the region."""
    rng = np.random.default_rng(seed)
    height, width = size
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[2:5, 3:9] = 0
    values = {
        "IMAGE_ID": image_id,
        "EDITING_TYPE": "Remove",
        "CORE": 1,
        "MASK": 0,
        "EDITING_INSTRUCTION": f" remove the thing {seed} ",
        "OUTPUT_DESCRIPTION": f"a scene without thing {seed}",
        "INPUT_CAPTION_BY_LLAMA": "a scene",
        "OUTPUT_CAPTION_BY_LLAMA": "an emptier scene",
        "INPUT_IMG": {"bytes": encoded(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "JPEG"), "path": f"{image_id}.jpg"},
        "MASK_IMG": {"bytes": encoded(np.stack([mask] * 3, axis=2), "PNG"), "path": f"{image_id}_mask.png"},
        "OUTPUT_IMG": {"bytes": encoded(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "JPEG"), "path": f"{image_id}_out.jpg"},
    }
    values.update(changes)
    return values


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=3)
    return path


def test_rows_become_edit_samples_with_the_mask_white_inside(tmp_path: Path) -> None:
    first = row("img 1.a", seed=1)
    file = write_parquet(tmp_path / "train-00000-of-00001.parquet", [first])
    [(sample, extra)] = list(HumanEditParquet([tmp_path], test_size=0).pairs())
    assert sample.key == "img 1.a" and sample.instruction == "remove the thing 1" and sample.edit_type == "Remove"
    assert sample.source.info["zoo_original_bytes"] == first["INPUT_IMG"]["bytes"], "a JPEG stays the same JPEG"
    assert np.array_equal(np.asarray(sample.target), np.asarray(Image.open(io.BytesIO(first["OUTPUT_IMG"]["bytes"])).convert("RGB")))
    mask = np.asarray(sample.mask)
    expected = np.zeros((12, 16), dtype=np.uint8)
    expected[2:5, 3:9] = 255
    assert sample.mask.mode == "L" and np.array_equal(mask, expected)
    assert extra == {"CORE": 1, "MASK": 0, "OUTPUT_DESCRIPTION": "a scene without thing 1", "INPUT_CAPTION_BY_LLAMA": "a scene", "OUTPUT_CAPTION_BY_LLAMA": "an emptier scene"}
    assert HumanEditParquet([file], test_size=0).skipped == 0


def test_the_test_split_is_the_first_ids_by_sha256_whatever_the_file_order() -> None:
    ids = [f"{i:05d}" for i in range(40)]
    by_hash = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    assert held_out_ids(ids, 7) == set(by_hash[:7])
    assert held_out_ids(list(reversed(ids)) + ids[:5], 7) == set(by_hash[:7]), "order and repeats do not matter"
    assert held_out_ids(ids, 8) > held_out_ids(ids, 7), "a larger test set only adds ids"
    with pytest.raises(ValueError, match=r"test_size must be in \[0, 40\]"):
        held_out_ids(ids, 41)


def test_splits_are_disjoint_and_complete_and_bad_rows_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [row(f"id{i}", seed=i) for i in range(6)]
    rows[1]["EDITING_INSTRUCTION"] = None
    rows[2]["OUTPUT_IMG"] = {"bytes": b"not an image", "path": "x.jpg"}
    rows.append(row("id9", seed=9, MASK_IMG=row("m", 0, size=(8, 8))["MASK_IMG"]))
    rows.append(row("id0", seed=10))  # a repeated id
    write_parquet(tmp_path / "a.parquet", rows[:4])
    write_parquet(tmp_path / "b.parquet", rows[4:])
    reader = HumanEditParquet([tmp_path], test_size=2)
    held_out = held_out_ids([f"id{i}" for i in (0, 1, 2, 3, 4, 5, 9)], 2)
    assert reader.split_size("test") + reader.split_size("train") == reader.split_size("all") == 8
    test = [s.key for s, _ in reader.pairs("test")]
    train = [s.key for s, _ in reader.pairs("train")]
    good = {"id0", "id3", "id4", "id5"}
    assert set(test) == held_out & good and set(train) == good - held_out
    every = HumanEditParquet([tmp_path], test_size=2)
    assert sorted(s.key for s in every) == sorted(good) and every.skipped == 4
    assert "EDITING_INSTRUCTION is missing or empty" in caplog.text and "OUTPUT_IMG does not decode" in caplog.text
    assert "MASK_IMG is 8x8, INPUT_IMG 16x12" in caplog.text and "IMAGE_ID repeats" in caplog.text
    with pytest.raises(ValueError, match=r"row 2 \(IMAGE_ID='id1'\) of .*a.parquet: EDITING_INSTRUCTION"):
        list(HumanEditParquet([tmp_path], test_size=0, strict=True))


def test_a_file_without_the_schema_is_an_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"IMAGE_ID": ["a"], "EDITING_INSTRUCTION": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['EDITING_TYPE', 'CORE'"):
        HumanEditParquet([tmp_path / "other.parquet"])


def test_convert_writes_train_and_test_with_masks_and_joined_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = ["a.1", "b", "c", "d", "e"]
    write_parquet(tmp_path / "humanedit.parquet", [row(i, seed=n) for n, i in enumerate(ids)])
    annotations = tmp_path / "annotations.jsonl"
    lines = [{"key": "a_1", "optimized_instruction": 'optimized_prompt: "x" negative_prompt: "y"'}, {"key": "c", "optimized_instruction": "z"}]
    annotations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "shards"
    args = ["--format", "humanedit", "--parquet", str(tmp_path / "humanedit.parquet"), "--out", str(out), "--test-size", "2"]
    assert convert_main([*args, "--annotations", str(annotations)]) == 0
    assert "3 edit sample(s) without an annotation" in capsys.readouterr().out
    decoded = {}
    for split in ("train", "test"):
        index = json.loads((out / split / "index.json").read_text())
        for shard in index["shards"]:
            for raw in read_tar(str(out / split / shard["url"])):
                decoded[raw["__key__"]] = (split, decode_sample(raw), json.loads(raw["json"]))
    held_out = {i.replace(".", "_") for i in held_out_ids(ids, 2)}
    assert {k for k, (split, _, _) in decoded.items() if split == "test"} == held_out
    assert set(decoded) == {"a_1", "b", "c", "d", "e"}
    _, sample, meta = decoded["a_1"]
    assert meta["id"] == "a.1" and meta["CORE"] == 1 and sample.edit_type == "Remove"
    assert sample.optimized_instruction == lines[0]["optimized_instruction"] and decoded["c"][1].optimized_instruction == "z"
    assert decoded["b"][1].optimized_instruction is None
    assert int(np.asarray(sample.mask).sum()) == 18 * 255

    annotations.write_text('{"key": "a_1", "optimized_instruction": "x"}\n{"key": "b", "optim')
    with pytest.raises(SystemExit):
        convert_main([*args, "--annotations", str(annotations)])
    assert "annotations.jsonl:2: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main(["--format", "humanedit", "--jsonl", "x.jsonl", "--out", str(out)])
