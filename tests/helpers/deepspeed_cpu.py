"""The real DeepSpeed engine on CPU: ``python -m tests.helpers.deepspeed_cpu OUT NAME:OVERLAY:STEPS[:RESUME] ...``.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA and passes the device index to
``deepspeed.initialize`` (None on CPU). DeepSpeed itself runs ZeRO on CPU with its CPU accelerator
(``DS_ACCELERATOR=cpu``, torch.distributed over gloo, a shared-memory op it JIT-compiles once with
the C++ compiler). :class:`CPUDeepSpeedStrategy` lifts only those two Lightning checks; the engine,
its ZeRO optimiser, partitioning and checkpoint folders are DeepSpeed's own. Run in a subprocess:
the engine initialises torch.distributed, which must not leak into the test process.

Each run fits a tiny DIM (frozen MLLM and codec outside the module tree, SANA DiT and connector
trained) for STEPS steps with the overlay's strategy arguments (resuming from the ZeRO folder
``OUT/RESUME`` if given), saves ZeRO folders ``OUT/NAME/checkpoints/step=K.ckpt`` every 2 steps (as
``ModelCheckpoint`` does in a fit) and ``OUT/NAME/zero`` at the end, and writes ``OUT/NAME/report.json``: which
parameters DeepSpeed tagged as ZeRO-3 partitioned (``ds_id`` / ``ds_status``), in the module tree
and in the frozen parts, and the ZeRO config the engine ran with. The runs share one process (and
its one process group), in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Read when deepspeed is first imported (by the Lightning imports below).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.utils.data import DataLoader

from callbacks.rng_state import RNGState
from tests.modules.conftest import tiny_dim_kwargs, toy_batch
from zoo.modules.dim import DIMModule


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy without its CUDA-only checks (see the module docstring)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA GPUs only" refusal

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy's, without validating CUDA device indices (CPU devices have none).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        # deepspeed.initialize reads the index as this rank's device; "cpu" alone has none.
        return torch.device("cpu", self.local_rank)


def partitioned(module: torch.nn.Module) -> list[str]:
    """Names of the parameters DeepSpeed ZeRO-3 took over (it sets ``ds_id`` and ``ds_status``)."""
    return [name for name, p in module.named_parameters() if hasattr(p, "ds_id") or hasattr(p, "ds_status")]


def fit(overlay: str, out: Path, steps: int, resume: Path | None = None) -> None:
    """One run (see the module docstring)."""
    arguments = yaml.safe_load(Path(overlay).read_text())["trainer"]["strategy"]["init_args"]
    L.seed_everything(0)
    module = DIMModule(**tiny_dim_kwargs())
    strategy = CPUDeepSpeedStrategy(**arguments, logging_batch_size_per_gpu=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, max_epochs=-1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RNGState(), ModelCheckpoint(out / "checkpoints", "{step}", every_n_train_steps=2, save_top_k=-1)],
    )
    # The same batch at every step, so the data position cannot differ; the loader's own generator
    # keeps its iterator's seed draw off the global stream RNGState restores.
    data = DataLoader([toy_batch(2)] * 8, batch_size=None, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, data, ckpt_path=resume, weights_only=False)
    trainer.save_checkpoint(out / "zero")
    report = {
        "global_step": trainer.global_step,
        "zero": trainer.strategy.config["zero_optimization"],
        "partitioned_in_tree": partitioned(module),
        "trainable_in_tree": [n for n, p in module.named_parameters() if p.requires_grad],
        "partitioned_frozen": {name: partitioned(part) for name, part in module.frozen_parts.items()},
        "frozen_parameters": {name: sum(1 for _ in part.parameters()) for name, part in module.frozen_parts.items()},
        "world_size": torch.distributed.get_world_size(),
        "backend": torch.distributed.get_backend(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))


def main(out: str, runs: list[str]) -> None:
    for run in runs:
        name, overlay, steps, *resume = run.split(":")
        fit(overlay, Path(out) / name, int(steps), Path(out) / resume[0] if resume else None)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
