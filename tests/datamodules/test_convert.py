from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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
