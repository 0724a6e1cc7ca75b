from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.convert import main as convert_main
from datamodules.formats.dim import TosJsonl
from datamodules.samples import collate
from datamodules.shards import ShardDataModule
from datamodules.shard_format import decode_sample, read_tar


def test_convert_demo_round_trip(dim_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = convert_main(
        [
            "--jsonl", str(dim_data / "tos_dataset_edit_demo.jsonl"),
            "--image-root", str(dim_data),
            "--cot-jsonl", str(dim_data / "tos_dataset_edit_cot_demo.jsonl"),
            "--out", str(out),
            "--samples-per-shard", "3",
        ]
    )
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert index == {"shards": [{"url": "shard-000000.tar", "samples": 3}, {"url": "shard-000001.tar", "samples": 1}], "total": 4}

    originals = {s.key: s for s in TosJsonl(str(dim_data / "tos_dataset_edit_demo.jsonl"), cot_jsonl=str(dim_data / "tos_dataset_edit_cot_demo.jsonl"))}
    decoded = [decode_sample(raw) for raw in read_tar(str(out / "shard-000001.tar"))]
    assert [s.key for s in decoded] == ["3"]
    assert np.array_equal(np.asarray(decoded[0].source), np.asarray(originals["3"].source))  # JPEG-in-.png source

    dm = ShardDataModule(predict_shards=str(out), val_batch_size=4, resolution=32, mllm_resolution=16)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    expected = collate([originals[k] for k in batch.key], resolution=32, mllm_resolution=16)
    assert batch.key == ["0", "1", "2", "3"]
    assert batch.instruction == expected.instruction and batch.blueprint == expected.blueprint
    for name in ("source", "target", "mllm_image"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name

    jsonl = ShardDataModule(predict_jsonl=str(dim_data / "tos_dataset_edit_demo.jsonl"), val_batch_size=2, resolution=32, mllm_resolution=16)
    jsonl.setup("predict")
    batches = list(jsonl.predict_dataloader())
    assert [k for b in batches for k in b.key] == ["0", "1", "2", "3"]
    assert torch.equal(torch.cat([b.source for b in batches]), expected.source)
    assert jsonl.skipped == {"predict": 0}


def test_convert_fails_cleanly_when_nothing_converts(dim_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "none"
    assert convert_main(["--jsonl", str(dim_data / "tos_dataset_edit.jsonl"), "--out", str(out), "--samples-per-shard", "8"]) == 1
    assert json.loads((out / "index.json").read_text()) == {"shards": [], "total": 0}
    assert list(out.glob("*.tar")) == []


def test_convert_keeps_the_original_bytes_and_stores_a_repeated_image_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", quality=80)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "edited.png")
    rows = [
        {"id": "a", "image_path": "photo.jpg", "image_path_target": "edited.png", "prompt": "edit it"},
        {"id": "b", "image_path": "photo.jpg", "image_path_target": "photo.jpg", "prompt": "predict only"},  # DIM's repeat
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert convert_main(["--jsonl", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out")]) == 0
    raw = {r["__key__"]: r for r in read_tar(str(tmp_path / "out" / "shard-000000.tar"))}
    jpeg = (tmp_path / "photo.jpg").read_bytes()
    assert raw["a"]["source.png"] == jpeg and raw["b"]["source.png"] == jpeg, "a JPEG in is the same JPEG in the shard"
    assert raw["a"]["target.png"] == (tmp_path / "edited.png").read_bytes()
    assert "target.png" not in raw["b"] and json.loads(raw["b"]["json"])["target_is_source"] is True
    repeated = decode_sample(raw["b"])
    assert np.array_equal(np.asarray(repeated.target), np.asarray(repeated.source))
    assert repeated.target is not repeated.source, "decoded as its own image, so an edit of one cannot change the other"
