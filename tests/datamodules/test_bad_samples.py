"""Bad samples in real shards: each is a counted skip naming shard and key (strict mode: an error
with that name), the epoch keeps its batch count, and odd but valid images decode correctly."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, PngImagePlugin

from datamodules.samples import DataConfigError
from datamodules.shard_format import INDEX_NAME, decode_sample, encode_sample
from datamodules.shards import ShardDataModule
from datamodules.toy import edit_sample
from tests.helpers.faults import FaultTable

pytestmark = pytest.mark.faults

BAD = "b_000005"
"""The key of the damaged sample (in the second of two 4-sample shards)."""


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _json(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["json"] = json.dumps({**json.loads(raw["json"]), **changes}).encode()

    return change


def _drop(member: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.pop(member)


def _member(member: str, data: bytes) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.update({member: data})


SKIPPED = {
    "missing target": _drop("target.png"),
    "missing source": _drop("source.png"),
    "missing json": _drop("json"),
    "empty chain": _json(chain="  "),
    "non-string chain": _json(chain=["step 1"]),
    "non-string blueprint": _json(blueprint={"1": "layout"}),
    "non-string edit_type": _json(edit_type=3),
    "non-string instruction": _json(instruction=None),
    "wrong task": _json(task="video"),
    "history not a list": _json(history="add a red circle"),
    "box out of range": _json(boxes=[{"box": [0, 0, 1000, 5], "color": "red", "label": "x"}]),
    "json not an object": _member("json", b"[1, 2]"),
    "bad json": _member("json", b"{not json"),
    "zero-byte image": _member("source.png", b""),
    "non-image bytes": _member("target.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
    "over the pixel cap": _member("source.png", png(Image.new("RGB", (40, 40)))),
}
"""Damage done to sample :data:`BAD`, each to be skipped and counted."""


def write(split: Path, damage: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """8 toy edit samples in two shards with an index; ``damage`` changes sample :data:`BAD`'s members."""
    split.mkdir(parents=True)
    shards = []
    for shard in range(2):
        url = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(split / url)) as tar:
            for i in range(4 * shard, 4 * shard + 4):
                raw = encode_sample(edit_sample(0, "b", i)[0])
                if raw["__key__"] == BAD and damage is not None:
                    damage(raw)
                tar.write(raw)
        shards.append({"url": url, "samples": 4})
    (split / INDEX_NAME).write_text(json.dumps({"shards": shards, "total": 8}))
    return split


@pytest.mark.parametrize("kind", sorted(SKIPPED))
def test_bad_sample_is_skipped_counted_and_named(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: FaultTable) -> None:
    fault.injected(f"data: {kind}")
    split = write(tmp_path / "train", SKIPPED[kind])
    dm = ShardDataModule(train_shards=str(split), batch_size=4, shuffle_buffer=1, max_pixels=32 * 32)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.num_batches_per_epoch == 2
    assert sorted(k for b in batches for k in b.key) == [f"b_{i:06d}" for i in range(8) if i != 5]
    assert dm.skipped["train"] == 1
    [warning] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert f"shard {split / 'shard-000001.tar'}, key '{BAD}'" in warning
    strict = ShardDataModule(train_shards=str(split), batch_size=4, shuffle_buffer=1, max_pixels=32 * 32, strict=True)
    strict.setup("fit")
    with pytest.raises(RuntimeError, match=rf"shard {split / 'shard-000001.tar'}, key '{BAD}'"):
        list(strict.train_dataloader())
    fault.survived(f"data: {kind}")


def test_pixel_cap_is_read_from_the_header_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = encode_sample(edit_sample(0, "b", 0)[0])
    decoded: list[tuple[int, int]] = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    with pytest.raises(ValueError, match=r"32x32 image \(0\.0 MP\) is over the 0\.0001 MP cap"):
        decode_sample(raw, max_pixels=100)
    assert decoded == []
    decode_sample(raw, max_pixels=32 * 32)
    assert decoded, "the same image under the cap is decoded"


def _sixteen_bit(levels: np.ndarray) -> bytes:
    return png(Image.fromarray(levels.astype(np.uint16)))


@pytest.mark.parametrize(
    "kind, image, expected",
    [
        ("16-bit grey (I;16)", _sixteen_bit(np.array([[0, 257 * 100], [257 * 200, 65535]])), [[0, 100], [200, 255]]),
        ("palette", png(Image.new("P", (2, 2), 0).convert("RGB").quantize(2)), [[0, 0], [0, 0]]),
        ("CMYK", None, None),
        ("RGBA", png(Image.new("RGBA", (2, 2), (50, 60, 70, 0))), [[57, 57], [57, 57]]),
    ],
)
def test_odd_image_modes_decode_to_the_right_rgb(kind: str, image: bytes | None, expected: list[list[int]] | None, fault: FaultTable) -> None:
    fault.injected(f"data: {kind} image")
    raw = encode_sample(edit_sample(0, "b", 0)[0])
    if image is None:  # CMYK: JPEG is the format that holds it
        buffer = io.BytesIO()
        Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=100)
        raw["source.png"] = buffer.getvalue()
        source = np.asarray(decode_sample(raw).source)
        assert source[..., 0].min() > 230 and source[..., 1:].max() < 25  # red
    else:
        raw["source.png"] = image
        grey = np.asarray(decode_sample(raw).source.convert("L"))
        assert np.abs(grey.astype(int) - np.array(expected)).max() <= 1, grey
    fault.survived(f"data: {kind} image")


@pytest.mark.parametrize(
    "kind, make, message",
    [
        ("empty folder", lambda root: root.mkdir(), "has no index.json"),
        ("missing folder", lambda root: None, "no such folder or file(s)"),
        ("index lists a missing shard", lambda root: (write(root), (root / "shard-000001.tar").unlink()), "lists 1 missing shard(s)"),
        ("index lists no sample", lambda root: (root.mkdir(), (root / INDEX_NAME).write_text('{"shards": [], "total": 0}')), "holds no samples"),
    ],
)
def test_unusable_split_is_a_config_error_at_setup(
    kind: str, make: Callable[[Path], Any], message: str, tmp_path: Path, fault: FaultTable
) -> None:
    fault.injected(f"data: {kind}")
    make(tmp_path / "train")
    with pytest.raises(DataConfigError, match=f"{tmp_path / 'train'}.*{message}".replace("(", r"\(").replace(")", r"\)")):
        ShardDataModule(train_shards=str(tmp_path / "train")).setup("fit")
    fault.survived(f"data: {kind}")


@pytest.mark.parametrize(
    "kind, claimed, held, message",
    [
        ("index under-claims a shard", 2, 4, "the tar holds 4 samples, index.json says 2: 2 never read"),
        ("index over-claims a shard", 6, 4, "the tar holds 4 samples, index.json says 6: 2 lost"),
    ],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_index_that_miscounts_a_shard_is_a_counted_skip_naming_shard_and_counts(
    kind: str, claimed: int, held: int, message: str, workers: int, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: FaultTable
) -> None:
    fault.injected(f"data: {kind}")
    split = write(tmp_path / "train")
    index = json.loads((split / INDEX_NAME).read_text())
    index["shards"][1]["samples"], index["total"] = claimed, 4 + claimed
    (split / INDEX_NAME).write_text(json.dumps(index))
    dm = ShardDataModule(train_shards=str(split), batch_size=2, shuffle_buffer=1, num_workers=workers)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.num_batches_per_epoch == (4 + claimed) // 2  # the epoch plan follows the index
    keys = sorted(k for b in batches for k in b.key)
    assert set(keys) >= {f"b_{i:06d}" for i in range(4 + min(claimed, held))}
    assert dm.skipped["train"] == abs(claimed - held)
    shard = split / "shard-000001.tar"
    if workers == 0:  # a worker process logs where caplog does not see it
        assert any(f"shard {shard}" in r.getMessage() and message in r.getMessage() for r in caplog.records)
    strict = ShardDataModule(train_shards=str(split), batch_size=2, shuffle_buffer=1, num_workers=workers, strict=True)
    strict.setup("fit")
    with pytest.raises(RuntimeError, match=f"(?s)shard {shard}.*{message}"):
        list(strict.train_dataloader())
    fault.survived(f"data: {kind}", lost=0)


def test_an_exif_rotated_photo_decodes_upright(fault: FaultTable) -> None:
    fault.injected("data: EXIF-rotated image")
    stored = Image.new("RGB", (16, 8), (255, 0, 0))
    stored.paste((0, 0, 255), (8, 0, 16, 8))  # left half red, right half blue, as the file stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns it 90 degrees clockwise
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    raw = encode_sample(edit_sample(0, "b", 0)[0])
    raw["source.png"] = buffer.getvalue()
    upright = np.asarray(decode_sample(raw).source).astype(int)
    assert upright.shape == (16, 8, 3)  # portrait, as shown
    top, bottom = upright[:6].mean(axis=(0, 1)), upright[10:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the stored left half is now on top
    fault.survived("data: EXIF-rotated image")


def test_a_10k_character_unicode_instruction_survives_shards_and_batches(tmp_path: Path, fault: FaultTable) -> None:
    fault.injected("data: 10k-character unicode instruction")
    text = ("把杯子换成红色 🍋 إزالة الليمون ñ\u200d\u0301 " * 400)[:10_000]
    sample = edit_sample(0, "u", 0)[0]
    sample.instruction = text
    split = tmp_path / "val"
    split.mkdir()
    with wds.TarWriter(str(split / "shard-000000.tar")) as tar:
        tar.write(encode_sample(sample))
    (split / INDEX_NAME).write_text(json.dumps({"shards": [{"url": "shard-000000.tar", "samples": 1}], "total": 1}))
    dm = ShardDataModule(val_shards=str(split), val_batch_size=1)
    dm.setup("validate")
    [batch] = list(dm.val_dataloader())
    assert batch.instruction == [text] and len(text) == 10_000 and dm.skipped["val"] == 0
    fault.survived("data: 10k-character unicode instruction")
