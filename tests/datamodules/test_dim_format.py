from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.formats.dim import BLUEPRINT_SECTIONS, TosJsonl, predict_kind, read_blueprints, read_jsonl, resolve_image, row_kind
from datamodules.samples import DataConfigError, EditSample, T2ISample


def test_demo_edits_load_with_cot_blueprints(dim_data: Path) -> None:
    reader = TosJsonl(str(dim_data / "tos_dataset_edit_demo.jsonl"), cot_jsonl=str(dim_data / "tos_dataset_edit_cot_demo.jsonl"))
    samples = list(reader)
    assert reader.skipped == 0
    assert [s.key for s in samples] == ["0", "1", "2", "3"]
    assert samples[0].instruction == "Remove the lemons on the table."
    assert samples[3].instruction == "Put a black sunglasses on the dog."
    for sample in samples:
        assert isinstance(sample, EditSample) and sample.source.size == (1024, 1024) and sample.source.mode == "RGB"
        titles = re.findall(r"^\s*(\d)\. ([A-Za-z ]+):", sample.blueprint, flags=re.M)
        assert [t for _, t in titles] == list(BLUEPRINT_SECTIONS)
        assert sample.instruction in sample.blueprint
    # Demo images 2 and 3 are JPEG bytes under a .png name: they must decode all the same.
    assert (dim_data / "edit_demo_0002.png").read_bytes()[:2] == b"\xff\xd8"
    assert np.asarray(samples[2].source).std() > 10


def test_t2i_rows_have_no_image(dim_data: Path) -> None:
    samples = list(TosJsonl(str(dim_data / "tos_dataset_demo.jsonl")))
    assert [s.key for s in samples] == ["0000", "0001", "0002", "0003"]
    assert all(isinstance(s, T2ISample) and s.image is None for s in samples)
    assert samples[0].prompt == "A yummy cupcake floating in the air dark background"


def test_imgedit_release_counts_ids_and_missing_images(dim_data: Path) -> None:
    raw, bad = read_jsonl(dim_data / "tos_dataset_edit.jsonl")
    assert bad == 0 and len(raw) == 737 and len({r["id"] for r in raw}) == 737
    assert all(r["image_path"].startswith("./cache/ImgEdit/Benchmark/singleturn/") for r in raw)
    blueprints = read_blueprints(dim_data / "tos_dataset_edit_cot.jsonl")
    assert set(blueprints) == {r["id"] for r in raw}
    basic = dim_data.parent / "imgedit-bench" / "basic_edit.json"
    if basic.is_file():
        assert set(json.loads(basic.read_text())) == {r["id"] for r in raw}
    # The benchmark images are not part of the release: every row is a counted skip, or an error.
    reader = TosJsonl(str(dim_data / "tos_dataset_edit.jsonl"))
    assert reader.rows() == [] and reader.skipped == 737
    with pytest.raises(FileNotFoundError, match="000342021.jpg"):
        TosJsonl(str(dim_data / "tos_dataset_edit.jsonl"), strict=True).rows()
    en, _ = read_jsonl(dim_data / "tos_dataset_edit_en.jsonl")
    assert len(en) == 606 and {"task_type", "key"} <= set(en[0])


def test_bad_lines_and_undecodable_images(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps({"id": "a", "image_path": "./cache/x/ok.png", "prompt": "p", "image_path_target": "ok.png", "extra": 1}),
        "{oops",
        json.dumps({"id": "b", "prompt": "no image_path"}),
        json.dumps({"id": "c", "image_path": "broken.png", "prompt": "p", "image_path_target": "ok.png"}),
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = TosJsonl(str(path))
    pairs = list(reader.pairs())
    assert [s.key for _, s in pairs] == ["a"] and pairs[0][0].extra == {"extra": 1}
    assert reader.skipped == 3
    assert resolve_image(tmp_path, "./cache/x/ok.png") == tmp_path / "ok.png"
    with pytest.raises(ValueError, match=r"t\.jsonl:2"):
        TosJsonl(str(path), strict=True).rows()


def test_a_row_with_an_existing_image_but_no_target_is_t2i_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    rows = [{"id": "a", "image_path": "cat.png", "prompt": "remove the hat"}, {"id": "b", "image_path": "placeholder", "prompt": "a cat"}]
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level("WARNING", logger="datamodules.formats.dim"):
        samples = [sample for _, sample in TosJsonl(str(path)).pairs()]
    assert all(isinstance(sample, T2ISample) and sample.image is None for sample in samples)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"1 rows of {path} have an existing image_path but no image_path_target") and '"kind": "edit"' in warning


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_row_kind_is_its_field_else_whether_it_has_a_target() -> None:
    base = {"id": "a", "image_path": "x.png", "prompt": "p"}
    assert row_kind(base) == "t2i" and row_kind(base | {"image_path_target": "y.png"}) == "edit"
    assert row_kind(base | {"kind": "edit"}) == "edit" and row_kind(base | {"kind": "t2i", "image_path_target": "y.png"}) == "t2i"
    with pytest.raises(ValueError, match="kind must be one of"):
        row_kind(base | {"kind": "inpaint"})


def test_explicit_edit_rows_need_no_target_in_predict_and_say_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "image_path": "cat.png", "prompt": "remove the hat", "kind": "edit"}])
    assert predict_kind(path) == "edit"
    with caplog.at_level("WARNING", logger="datamodules.formats.dim"):
        [sample] = list(TosJsonl(str(path), targets=False))
    assert isinstance(sample, EditSample) and sample.target is None and sample.source.getpixel((0, 0)) == (255, 0, 0)
    assert not caplog.records
    # Read for training, an edit row without a target is a counted skip, not a silent text-to-image sample.
    reader = TosJsonl(str(path))
    assert list(reader) == [] and reader.skipped == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "image_path": "x", "prompt": "p", "image_path_target": "x"}, {"id": "b", "image_path": "x", "prompt": "q"}],
         "mixes 1 edit rows and 1 text-to-image rows (first edit: id='a')"),
        ([{"id": "a", "image_path": "x", "prompt": "p", "kind": "both"}], "kind must be one of ('edit', 't2i'), got 'both'"),
        ([{"id": "a", "prompt": "p"}], "has no row with string fields"),
    ],
)
def test_a_malformed_predict_file_is_refused(rows: list[dict], message: str, tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match=re.escape(message)):
        predict_kind(_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.raises(DataConfigError, match="does not exist"):
        predict_kind(tmp_path / "absent.jsonl")


def test_many_skips_of_one_class_log_a_few_lines_and_count_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"id": str(i), "image_path": f"gone{i}.png", "image_path_target": f"gone{i}.png", "prompt": "p"} for i in range(40)]
    path = _jsonl(tmp_path / "edits.jsonl", [*rows, {"id": "x", "image_path": "a", "prompt": "p", "kind": "?"}])
    reader = TosJsonl(str(path))
    with caplog.at_level("WARNING", logger="datamodules.formats.dim"):
        assert list(reader) == []
    assert reader.skipped == 41
    lines = [r.getMessage() for r in caplog.records]
    # A wrong image folder skips every row: three in full, then one line for the rest of that class.
    assert [line.startswith("skipped row id=") for line in lines[:3]] == [True] * 3 and "gone2.png" in lines[2]
    assert lines[3] == "further skips (missing image) are counted, not logged: see the summary at the end"
    assert len(lines) == 5 and "kind must be one of" in lines[4]
