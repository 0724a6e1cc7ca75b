"""zoo predict's writer: its folder is checked before the first edit; a rerun into it says what it keeps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from callbacks.edit_writer import EditWriter
from zoo.blocks.config import ConfigError


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))


def test_an_unwritable_predictions_folder_is_refused_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "predictions.txt"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"zoo predict: cannot write the output folder {blocker / 'out'} \\({blocker} is not a folder\\)"):
        EditWriter(str(blocker / "out")).setup(_trainer(tmp_path), L.LightningModule(), "predict")


def test_a_rerun_into_a_folder_with_predictions_warns_with_their_count(tmp_path: Path) -> None:
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "predictions.rank0.jsonl").write_text('{"key": "a"}\n{"key": "b"}\n')
    with pytest.warns(UserWarning, match="already lists 2 predictions of an earlier run: new rows are appended"):
        EditWriter(str(folder)).setup(_trainer(tmp_path), L.LightningModule(), "predict")
    fresh = EditWriter(str(tmp_path / "fresh"))
    fresh.setup(_trainer(tmp_path), L.LightningModule(), "predict")
    assert fresh.written == 0 and not (tmp_path / "fresh").exists()
