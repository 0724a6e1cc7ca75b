"""Kill-and-resume equality with a real Lightning Trainer on CPU (DataModule state in checkpoints)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.samples import EditBatch
from datamodules.shards import ShardDataModule


class KeyRecorder(L.LightningModule):
    """Test-only: a Linear over the mean source colour; records the keys of every trained batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.keys: list[str] = []

    def training_step(self, batch: EditBatch, batch_idx: int) -> torch.Tensor:
        self.keys.extend(batch.key)
        return self.layer(batch.source.mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(
    root: Path, workers: int, max_steps: int, ckpt_dir: Path, every: int | None = None, ckpt_path: str | None = None, at_epoch_end: bool = False
) -> list[str]:
    dm = ShardDataModule(train_shards=str(root / "train"), batch_size=4, num_workers=workers, seed=11, shuffle_buffer=5)
    model = KeyRecorder()
    when = {"every_n_epochs": 1} if at_epoch_end else {"every_n_train_steps": every}
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{step}", **when)] if every else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert dm.num_batches_per_epoch == 6  # 22 samples, batch 4: five full batches and one of 2
    return model.keys


@pytest.mark.parametrize(
    "workers,stop,at_epoch_end",
    [(0, 9, False), (2, 9, False), (2, 6, False), (2, 6, True)],
    ids=["mid-epoch", "mid-epoch-2-workers", "last-batch", "epoch-end-callback"],
)
def test_resume_continues_with_exactly_the_uninterrupted_samples(
    tmp_path: Path, toy_root: Path, workers: int, stop: int, at_epoch_end: bool
) -> None:
    full = _fit(toy_root, workers, 15, tmp_path / "unused")
    assert len(full) == 22 + 22 + 3 * 4  # two epochs of 22, then three batches of the third epoch
    assert full[:22] != full[22:44] and sorted(full[:22]) == sorted(full[22:44])

    # An epoch-end checkpoint is written by on_train_epoch_end; run on past it and keep its prefix.
    first = _fit(toy_root, workers, stop + 6 * at_epoch_end, tmp_path / "ckpt", every=stop, at_epoch_end=at_epoch_end)
    first = first[: sum(4 if step % 6 < 5 else 2 for step in range(stop))]  # epoch = 5 batches of 4 + one of 2
    ckpt = tmp_path / "ckpt" / f"step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=True)["ShardDataModule"]
    epoch = (stop - 1) // 6  # a checkpoint after an epoch's last batch still belongs to that epoch
    assert state["epoch"] == epoch and state["batches_consumed"] == stop - 6 * epoch
    assert sum(state["ranks"]["0"]["worker_batches_consumed"]) == stop - 6 * epoch
    rest = _fit(toy_root, workers, 15, tmp_path / "ckpt2", ckpt_path=str(ckpt))
    assert first + rest == full
