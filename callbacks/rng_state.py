"""RNGState: every random-number generator of every rank in the checkpoint, restored on resume.

Lightning checkpoints weights, optimiser, schedulers, loops and DataModule state, but no RNG: a
resumed run draws different noise, timesteps and CFG-dropout masks from the first step after the
checkpoint and drifts away from the uninterrupted run. This callback stores Python's ``random``,
NumPy's global generator, torch's CPU generator and, when CUDA is initialised, every CUDA device's
generator — for each rank, gathered onto rank 0 (which alone writes the checkpoint) and keyed by
global rank, so rank 1 does not inherit rank 0's streams.

Why a callback with its own ``state_dict`` rather than the module's checkpoint hooks: it holds
trainer state, not model state, so it serves every LightningModule (the paper modules and any user
subclass) without a ``super()`` call to forget, and Lightning keeps callback state in DeepSpeed's
client state too. The state is applied in ``on_train_start``, the last hook before the first resumed
batch, so nothing Lightning does while setting up (sanity check, loader creation) can consume it.

A fresh fit (nothing to restore) on more than one rank moves rank r > 0 to the seed ``s + r``
(``s``: ``seed_everything``'s, ``PL_GLOBAL_SEED``), as DiT's ``train.py`` seeds ``global_seed *
world_size + rank``: Lightning seeds every rank alike, so every GPU would draw the same noise,
timesteps and dropout masks for its different samples. Rank 0 (and a one-process run) keeps ``s``.

Each rank's intra-op thread count is stored beside its streams: CPU kernels sum in an order that
depends on it, so a CPU run resumed with another count drifts from the run it continues (measured:
5.7e-7 two steps after a 1-thread run resumed with 2 threads), and the restore says so.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def collect() -> dict[str, Any]:
    """This process's RNG states as tensors, ints and strings (loadable with ``weights_only=True``,
    which Lightning's own ``_collect_rng_states`` is not: it stores NumPy arrays)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (from :func:`collect`)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int) -> None:
    """Seed this process's Python, NumPy and torch (CPU and every CUDA device) generators with ``seed``;
    unlike ``seed_everything`` it leaves ``PL_GLOBAL_SEED``, which loader workers derive their seeds from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(Callback):
    """Checkpoints and restores the RNG streams of every rank (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """``{"ranks": {"<global rank>": states}}``; a collective call, made on every rank."""
        mine = collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            return {"ranks": {str(rank): state for rank, state in enumerate(gathered)}}
        return {"ranks": {"0": mine}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            if trainer.global_rank > 0 and seed is not None:
                reseed(int(seed) + trainer.global_rank)
            return
        ranks, self._pending = self._pending["ranks"], None
        mine = ranks.get(str(trainer.global_rank))
        if mine is None:
            log.warning(
                "the checkpoint holds RNG states of ranks %s, not of rank %d (the world size changed): "
                "this rank keeps its seeded streams and the resume is not bit-exact",
                sorted(ranks, key=int), trainer.global_rank,
            )
            return
        restore(mine)
        threads = mine.get("threads", torch.get_num_threads())
        if pl_module.device.type == "cpu" and threads != torch.get_num_threads():
            log.warning(
                "rank %d computed with %d threads before the checkpoint and %d now: CPU sums are "
                "ordered by thread, so the resume is not bit-exact (set OMP_NUM_THREADS=%d to make it so)",
                trainer.global_rank, threads, torch.get_num_threads(), threads,
            )
