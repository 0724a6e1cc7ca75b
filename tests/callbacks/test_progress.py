"""StepProgressBar counts optimizer steps of max_steps across epochs, without the logger version."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.progress import StepProgressBar


class _Seen(StepProgressBar):
    """Records what the bar shows after every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[tuple[float, float | None, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = self.progress.tasks[self.train_progress_bar_id]
        self.shown.append((task.completed, task.total, task.description))


def test_bar_reads_steps_of_max_steps_across_epochs(tmp_path: Path) -> None:
    bar = _Seen()
    model = BoringModel()  # 64 batches per epoch: 150 steps cross two epoch boundaries
    trainer = Trainer(
        max_steps=150, max_epochs=-1, callbacks=[bar], default_root_dir=tmp_path, limit_val_batches=0, enable_model_summary=False
    )
    trainer.fit(model)
    assert [completed for completed, _, _ in bar.shown] == list(range(1, 151))
    assert {total for _, total, _ in bar.shown} == {150}
    assert all(description.strip() == "Step" for _, _, description in bar.shown)
    assert "v_num" not in bar.get_metrics(trainer, model)


def test_bar_without_max_steps_counts_the_epoch_batches(tmp_path: Path) -> None:
    bar = _Seen()
    trainer = Trainer(
        max_epochs=1, callbacks=[bar], default_root_dir=tmp_path, limit_train_batches=5, limit_val_batches=0, enable_model_summary=False
    )
    trainer.fit(BoringModel())
    assert [(completed, total) for completed, total, _ in bar.shown] == [(i, 5) for i in range(1, 6)]
    assert bar.shown[0][2].startswith("Epoch 0/0")
