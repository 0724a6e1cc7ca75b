"""Shared fixtures: small toy shard splits written once per session (real webdataset tars)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.toy import main as toy_main

DIM_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dim"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    assert toy_main(["--out", str(root), "--train", "22", "--val", "10", "--test", "7", "--samples-per-shard", "4", "--seed", "3"]) == 0
    return root


@pytest.fixture
def dim_data() -> Path:
    if not (DIM_DATA / "tos_dataset_edit_demo.jsonl").is_file():
        pytest.skip(f"DIM reference data not found at {DIM_DATA} (workspace-only fixture, see shared/data/README.md)")
    return DIM_DATA
