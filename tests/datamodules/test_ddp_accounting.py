"""The epoch's sample accounting with bad samples in 2-process DDP (gloo) x 2 dataloader workers:
ranks run equal batch counts (no hang), cover every good sample once per epoch, and the skip totals
(:class:`~callbacks.data_skips.DataSkips`, summed over ranks) equal the damage."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from callbacks.data_skips import DataSkips
from datamodules.samples import EditBatch
from datamodules.shard_format import INDEX_NAME, encode_sample
from datamodules.shards import ShardDataModule
from datamodules.toy import edit_sample
from tests.helpers.ddp import launch
from tests.helpers.faults import FaultTable

pytestmark = pytest.mark.faults

WORLD_SIZE, WORKERS, EPOCHS, BATCH = 2, 2, 2, 2
SHARDS = (8, 8, 4)
BAD = {"a_000000": "target.png", "a_000008": "json", "a_000016": "source.png"}
"""Damaged samples (the member removed): each the first of its shard, so no batch loses both samples."""


class KeyLog(L.LightningModule):
    """Test-only: a Linear trained on the batches' mean colour; records each batch's keys per rank."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.out = out
        self.batches: list[dict[str, object]] = []

    def training_step(self, batch: EditBatch, batch_idx: int) -> torch.Tensor:
        self.batches.append({"epoch": self.current_epoch, "keys": list(batch.key)})
        return self.layer(batch.source.mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_job(data: Path, out: Path) -> None:
    L.seed_everything(0)
    module, skips = KeyLog(out), DataSkips()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_epochs=EPOCHS, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[skips],
    )
    dm = ShardDataModule(train_shards=str(data), batch_size=BATCH, num_workers=WORKERS, shuffle_buffer=1, resolution=16, mllm_resolution=16)
    trainer.fit(module, datamodule=dm)
    report = {"batches": module.batches, "own": dm.skipped["train"], "totals": skips.totals}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _write(split: Path) -> list[str]:
    """The shards of :data:`SHARDS` with :data:`BAD` damaged; returns every key."""
    split.mkdir(parents=True)
    keys, entries, start = [], [], 0
    for number, count in enumerate(SHARDS):
        url = f"shard-{number:06d}.tar"
        with wds.TarWriter(str(split / url)) as tar:
            for i in range(start, start + count):
                raw = encode_sample(edit_sample(0, "a", i, resolution=16)[0])
                raw.pop(BAD.get(raw["__key__"], ""), None)
                tar.write(raw)
                keys.append(raw["__key__"])
        entries.append({"url": url, "samples": count})
        start += count
    (split / INDEX_NAME).write_text(json.dumps({"shards": entries, "total": start}))
    return keys


@pytest.mark.timeout(400)
def test_two_ranks_with_two_workers_account_for_every_sample_each_epoch(tmp_path: Path, fault: FaultTable) -> None:
    fault.injected("data: bad samples under 2 ranks x 2 workers", len(BAD) * EPOCHS)
    keys = _write(tmp_path / "train")
    out = tmp_path / "out"
    out.mkdir()
    launch(_fit_job, (tmp_path / "train", out), WORLD_SIZE, deadlock_after_s=300)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    per_rank = len(keys) // WORLD_SIZE // BATCH
    assert [len(r["batches"]) for r in ranks] == [per_rank * EPOCHS] * WORLD_SIZE  # equal, as the index plans
    good = sorted(set(keys) - set(BAD))
    for epoch in range(EPOCHS):
        seen = [k for r in ranks for b in r["batches"] if b["epoch"] == epoch for k in b["keys"]]
        assert sorted(seen) == good, f"epoch {epoch}: every good sample once, on one rank"
    assert sum(r["own"] for r in ranks) == len(BAD) * EPOCHS  # counted across both ranks' workers
    assert ranks[0]["totals"] == ranks[1]["totals"] == {"train": len(BAD) * EPOCHS}
    lost = len(good) * EPOCHS - sum(len(b["keys"]) for r in ranks for b in r["batches"])
    fault.survived("data: bad samples under 2 ranks x 2 workers", len(BAD) * EPOCHS, lost=lost)
