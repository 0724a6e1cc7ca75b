"""Pinned benchmark files (checksum, cache, download from a local mirror) and the benchmark DataModule."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from datamodules.benchmarks import PINNED, BenchmarkDataModule, edited_image_path, fetch
from datamodules.formats.gedit import read_gedit_jsonl
from datamodules.formats.imgedit import read_cases

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
IMGEDIT = SHARED / "imgedit-bench"


@pytest.fixture
def imgedit_files() -> Path:
    if not (IMGEDIT / "basic_edit.json").is_file():
        pytest.skip(f"ImgEdit reference files not found at {IMGEDIT} (workspace-only fixture, see shared/data/README.md)")
    return IMGEDIT


def test_real_basic_suite_counts_and_labels(imgedit_files: Path) -> None:
    cases = read_cases(imgedit_files / "basic_edit.json", "basic")
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.edit_type] = counts.get(case.edit_type, 0) + 1
    assert len(cases) == 737
    assert counts == {"extract": 117, "style": 100, "add": 95, "adjust": 94, "background": 94, "replace": 92,
                      "remove": 86, "action": 36, "compose": 23}
    assert len(read_cases(imgedit_files / "UGE_edit.json", "uge")) == 47


def test_legacy_alter_label_and_multiturn_format(tmp_path: Path) -> None:
    legacy = tmp_path / "basic.json"
    legacy.write_text(json.dumps({"7": {"id": "animal/1.jpg", "prompt": "p", "edit_type": "alter"}}))
    assert read_cases(legacy, "basic")[0].edit_type == "adjust"
    multi = tmp_path / "multi.json"
    multi.write_text(json.dumps({"1": {"id": "000066341.jpg", "turn1": "a", "turn2": "b", "turn3": "c"}}))
    assert read_cases(multi, "multiturn")[0].turns == ["a", "b", "c"]
    multi.write_text(json.dumps({"1": {"id": "x.jpg", "turn1": "a"}}))
    with pytest.raises(ValueError, match="needs 'turn1' and 'turn2'"):
        read_cases(multi, "multiturn")


def test_multiturn_serves_first_turns_until_the_last_turn_exists(tmp_path: Path) -> None:
    definition = tmp_path / "multi.json"
    definition.write_text(json.dumps({
        "1": {"id": "a.jpg", "turn1": "a", "turn2": "b"},
        "2": {"id": "b.jpg", "turn1": "c", "turn2": "d", "turn3": "e"},
        "3": {"id": "c.jpg", "turn1": "f", "turn2": "g"},
    }))
    (tmp_path / "multiturn").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (12, 10)).save(tmp_path / "multiturn" / f"{name}.jpg")
    results = tmp_path / "results"
    for case, turn in (("1", 2), ("2", 2)):  # case 1 finished; case 2 stopped before its third turn
        edited_image_path(results, case, turn).parent.mkdir(parents=True, exist_ok=True)
        edited_image_path(results, case, turn).write_bytes(b"done")
    assert edited_image_path(results, "2", 3) == results / "images" / "2_turn3.png"
    dm = BenchmarkDataModule("imgedit_multiturn", images_dir=str(tmp_path), definition=str(definition),
                             results_dir=str(results), batch_size=4, resolution=8, mllm_resolution=8)
    dm.setup("test")
    [batch] = list(dm.test_dataloader())
    assert batch.key == ["2", "3"] and batch.instruction == ["c", "f"]
    assert batch.turns == [["d", "e"], ["g"]], "the later instructions travel with the batch"
    assert dm.case_info("2")["turns"] == ["c", "d", "e"]


def test_fetch_verifies_local_copies(imgedit_files: Path, tmp_path: Path) -> None:
    assert fetch("imgedit/prompts.json", local_path=str(imgedit_files / "prompts.json")) == imgedit_files / "prompts.json"
    tampered = tmp_path / "prompts.json"
    tampered.write_bytes((imgedit_files / "prompts.json").read_bytes() + b" ")
    with pytest.raises(ValueError, match="sha256"):
        fetch("imgedit/prompts.json", local_path=str(tampered))


def test_fetch_downloads_once_into_the_cache(imgedit_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = PINNED["imgedit/UGE_edit.json"]
    mirror = tmp_path / "mirror" / pinned.repo / pinned.commit / pinned.path
    mirror.parent.mkdir(parents=True)
    shutil.copy(imgedit_files / "UGE_edit.json", mirror)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("ZOO_BENCHMARK_CACHE", str(tmp_path / "cache"))
    try:
        path = fetch("imgedit/UGE_edit.json", mirror=url)
        assert path.is_relative_to(tmp_path / "cache") and path.read_bytes() == mirror.read_bytes()
        mirror.unlink()  # a second fetch must use the cache, not the network
        assert fetch("imgedit/UGE_edit.json", mirror=url) == path
        with pytest.raises(RuntimeError, match="local_path"):
            fetch("imgedit/basic_edit.json", mirror=url)  # 404 on the mirror
    finally:
        server.shutdown()
        server.server_close()


def test_datamodule_serves_cases_skips_finished_and_missing(
    imgedit_files: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = read_cases(imgedit_files / "UGE_edit.json", "uge")[:3]
    (tmp_path / "UGE").mkdir()
    for i, case in enumerate(cases[:2]):  # the third case's image is missing
        Image.new("RGB", (40, 24), (i * 50, 0, 0)).save(tmp_path / "UGE" / case.image_id)
    results = tmp_path / "results"
    edited_image_path(results, cases[0].key).parent.mkdir(parents=True)
    edited_image_path(results, cases[0].key).write_bytes(b"done")
    dm = BenchmarkDataModule("imgedit_uge", images_dir=str(tmp_path), definition=str(imgedit_files / "UGE_edit.json"),
                             results_dir=str(results), limit=3, batch_size=2, resolution=16, mllm_resolution=8)
    with pytest.raises(FileNotFoundError, match="strict=True"):
        dm.setup("test")
        next(iter(dm.test_dataloader()))
    dm.strict = False
    with caplog.at_level(logging.WARNING, logger="datamodules.benchmarks"):
        [batch] = list(dm.test_dataloader())
    assert batch.key == [cases[1].key] and batch.instruction == [cases[1].turns[0]] and batch.turns == [[]]
    assert batch.source.shape == (1, 3, 16, 16) and batch.target is None and dm.skipped == 1
    [skip] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]  # one line per class of skip
    assert f"skipped 1 of 2 imgedit_uge cases whose source image is not under {tmp_path}: {cases[2].key!r}" == skip


def test_gedit_export_from_dims_jsonl(tmp_path: Path) -> None:
    source = SHARED / "dim" / "tos_dataset_edit_en.jsonl"
    if not source.is_file():
        pytest.skip(f"DIM GEdit jsonl not found at {source} (workspace-only fixture)")
    cases = read_gedit_jsonl(source)
    assert len(cases) == 606 and len({c.id for c in cases}) == 606 and len({c.key for c in cases}) == 604
    export = tmp_path / "gedit.jsonl"
    export.write_text("".join(line + "\n" for line in source.read_text().splitlines()[:2]))
    image_dir = tmp_path / "cache" / "GEdit-Bench" / "input_image_raw"
    image_dir.mkdir(parents=True)
    for name in ("40", "41"):
        Image.new("RGB", (20, 30)).save(image_dir / f"{name}.png")
    dm = BenchmarkDataModule("gedit", definition=str(export), batch_size=2, resolution=16, mllm_resolution=8)
    dm.setup("test")
    [batch] = list(dm.test_dataloader())
    assert batch.key[0] == "background_change/4a7d36259ad94d238a6e7e7e0bd6b643"
    assert dm.case_info(batch.key[0])["intersection"] is True
