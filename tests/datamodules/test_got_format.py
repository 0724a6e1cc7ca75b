"""GoT dataset reader (configurable field names, counted skips), chain format, converter to shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.convert import main as convert_main
from datamodules.formats.got import GoTFields, GoTReader, object_chain
from datamodules.samples import EditSample, T2ISample, collate
from datamodules.shard_format import decode_sample, read_tar

# GoT's parser (sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/utils.py:38): the format chains must follow.
GOT_BOX = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|> \((\w+)\)")
CHAIN = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|> (red)"


def _png(folder: Path, name: str, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (12, 8), colour).save(folder / name)
    return f"images/{name}"


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "images"
    folder.mkdir()
    return {name: _png(folder, f"{name}.png", colour) for name, colour in [("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))]}


def _pixels(image: Image.Image) -> tuple[int, int, int]:
    return tuple(np.asarray(image)[0, 0].tolist())


def test_t2i_reader_with_renamed_fields_counts_every_skip(tmp_path: Path, images: dict[str, str]) -> None:
    rows = [
        {"uid": 7, "caption": "a cat", "got_text": CHAIN, "path": images["a"]},
        {"uid": "no-chain", "caption": "a dog", "path": images["b"]},
        {"uid": "no-file", "caption": "x", "got_text": "y", "path": "images/missing.png"},
        ["not", "an", "object"],
        {"caption": "no id", "got_text": "y", "path": images["a"]},
        {"uid": "ok2", "caption": "a bird", "got_text": "plain", "path": images["c"]},
    ]
    (tmp_path / "t2i.json").write_text(json.dumps(rows))
    fields = {"key": "uid", "prompt": "caption", "chain": "got_text", "image": "path"}
    reader = GoTReader(str(tmp_path / "t2i.json"), "t2i", fields=fields)
    samples = list(reader)
    assert reader.skipped == 4
    assert [type(s) for s in samples] == [T2ISample, T2ISample]
    assert [(s.key, s.prompt, s.chain) for s in samples] == [("7", "a cat", CHAIN), ("ok2", "a bird", "plain")]
    assert [_pixels(s.image) for s in samples] == [(255, 0, 0), (0, 0, 255)]
    # The defaults do not name these fields: every row is a counted skip, never a silent guess.
    defaults = GoTReader(str(tmp_path / "t2i.json"), "t2i")
    assert list(defaults) == [] and defaults.skipped == 6
    with pytest.raises(ValueError, match=r"row 2 \(id 'no-chain'\).*\['got_text'\]"):
        list(GoTReader(str(tmp_path / "t2i.json"), "t2i", fields=fields, strict=True))


def test_edit_reader_default_fields_jsonl(tmp_path: Path, images: dict[str, str]) -> None:
    lines = [
        json.dumps({"id": "e1", "instruction": "make it green", "got": CHAIN, "source_image": images["a"], "target_image": images["b"]}),
        "{broken json",
        json.dumps({"id": "e2", "instruction": "x", "got": "y", "source_image": images["a"]}),
    ]
    (tmp_path / "edit.jsonl").write_text("\n".join(lines) + "\n")
    reader = GoTReader(str(tmp_path / "edit.jsonl"), "edit")
    (sample,) = list(reader)
    assert reader.skipped == 2
    assert isinstance(sample, EditSample) and (sample.key, sample.instruction, sample.chain) == ("e1", "make it green", CHAIN)
    assert (_pixels(sample.source), _pixels(sample.target)) == ((255, 0, 0), (0, 255, 0))


def test_multi_turn_rows_become_chained_edits(tmp_path: Path, images: dict[str, str]) -> None:
    rows = [
        {"id": "s", "instructions": ["one", "two"], "chains": ["c1", "c2"], "images": [images["a"], images["b"], images["c"]]},
        {"id": "bad", "instructions": ["one", "two"], "chains": ["c1"], "images": [images["a"], images["b"], images["c"]]},
    ]
    (tmp_path / "multi.json").write_text(json.dumps(rows))
    reader = GoTReader(str(tmp_path / "multi.json"), "multi_turn")
    pairs = list(reader.pairs())
    assert reader.skipped == 1
    assert [(s.key, s.instruction, s.chain, e["turn"]) for s, e in pairs] == [("s_turn0", "one", "c1", 0), ("s_turn1", "two", "c2", 1)]
    assert [s.history for s, _ in pairs] == [[], ["one"]], "a later turn carries the session's earlier instructions"
    assert [(_pixels(s.source), _pixels(s.target)) for s, _ in pairs] == [
        ((255, 0, 0), (0, 255, 0)),
        ((0, 255, 0), (0, 0, 255)),
    ]


def test_mixed_file_converts_to_one_split_whose_batches_mix_tasks(tmp_path: Path, images: dict[str, str]) -> None:
    rows = [
        {"id": "t1", "prompt": "a red image", "got": CHAIN, "image": images["a"]},
        {"id": "e1", "instruction": "make it green", "got": "c", "source_image": images["a"], "target_image": images["b"]},
        {"id": "e2", "instruction": "no target", "got": "c", "source_image": images["a"]},
        {"id": "m", "instructions": ["one", "two"], "chains": ["c1", "c2"], "images": [images["a"], images["b"], images["c"]]},
    ]
    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "shards"
    argv = ["--format", "got", "--got-kind", "mixed", "--jsonl", str(tmp_path / "pretrain.jsonl"), "--out", str(out)]
    assert convert_main(argv) == 0
    decoded = [decode_sample(raw) for raw in read_tar(str(out / "shard-000000.tar"))]
    kinds = [(T2ISample, "t1"), (EditSample, "e1"), (EditSample, "m_turn0"), (EditSample, "m_turn1")]
    assert [(type(s), s.key) for s in decoded] == kinds, "an edit row without target is skipped"
    batch = collate(decoded, resolution=8, mllm_resolution=8)
    assert batch.task == ["t2i", "edit", "edit", "edit"] and batch.chain == [CHAIN, "c", "c1", "c2"]
    assert torch.equal(batch.source[0], -torch.ones(3, 8, 8))


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GoT field attribute"):
        GoTFields.from_dict({"caption": "x"})
    with pytest.raises(ValueError, match="kind must be one of"):
        GoTReader(str(tmp_path / "x.json"), "video")


def test_object_chain_follows_gots_box_format() -> None:
    boxes = [{"box": [100, 200, 500, 900], "color": "red", "label": "cat"}, {"box": [0, 0, 999, 999], "color": "gray", "label": "sky"}]
    text = object_chain(boxes)
    assert text.split("; ")[0] == CHAIN
    parsed = [([int(v) for v in m[:4]], m[4]) for m in GOT_BOX.findall(text)]
    assert parsed == [(b["box"], b["color"]) for b in boxes]


def test_convert_got_edit_to_shards_keeps_the_chain(tmp_path: Path, images: dict[str, str]) -> None:
    rows = [
        {"uid": f"e.{i}", "text": f"edit {i}", "cot": f"{CHAIN} {i}", "src": images["a"], "tgt": images["c"]} for i in range(3)
    ]
    (tmp_path / "edit.json").write_text(json.dumps(rows))
    fields = json.dumps({"key": "uid", "instruction": "text", "chain": "cot", "source": "src", "target": "tgt"})
    out = tmp_path / "shards"
    argv = ["--format", "got", "--got-kind", "edit", "--jsonl", str(tmp_path / "edit.json"), "--fields", fields, "--out", str(out)]
    assert convert_main([*argv, "--samples-per-shard", "2"]) == 0
    decoded = [decode_sample(raw) for shard in sorted(out.glob("*.tar")) for raw in read_tar(str(shard))]
    assert [(s.key, s.chain) for s in decoded] == [(f"e_{i}", f"{CHAIN} {i}") for i in range(3)]
    batch = collate(decoded, resolution=8, mllm_resolution=8)
    assert batch.chain == [f"{CHAIN} {i}" for i in range(3)]
    with pytest.raises(SystemExit):
        convert_main(["--format", "got", "--jsonl", str(tmp_path / "edit.json"), "--out", str(out)])
