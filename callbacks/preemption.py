"""Preemption: SIGTERM / SIGUSR1 save a checkpoint at the next safe point, then the fit ends cleanly.

The signal handler only sets a flag (a save inside a handler can interrupt backward or a collective
and fails intermittently: Lightning #21406). After each optimiser step (``on_train_batch_end``, where
``ModelCheckpoint`` saves too, so data position, loops and RNG resume exactly) the ranks agree on the
flag (any rank's signal stops all), every rank takes part in ``trainer.save_checkpoint`` into
``last.ckpt`` of the run's checkpoint folder (atomic: :mod:`zoo.checkpoint_io`), and the fit stops
with :class:`Preempted`, which ``zoo fit`` reports in one line with exit status 0. Stopping by
exception, not ``trainer.should_stop``: Lightning runs a validation pass when asked to stop early,
which would spend the time before the scheduler's kill.

Under SLURM (``SLURM_JOB_ID`` set), SIGUSR1 — the warning ``sbatch --signal=USR1@90`` sends before
the time limit — then requeues the job with ``scontrol requeue <job id>`` from rank 0; the restarted
job resumes from ``last.ckpt``. SIGTERM saves but does not requeue: SLURM sends it for ``scancel``
(which must stay cancelled) and for preemption, where a ``PreemptMode=REQUEUE`` cluster requeues the
job itself.

Lightning's own handlers are replaced for the fit (in ``on_train_start``; Lightning installs them
just before and restores the previous ones at teardown): its SIGTERM handler raises
``SIGTERMException`` after the batch without saving, and with ``SLURMEnvironment(auto_requeue=True)``
(its default when it detects SLURM) its SIGUSR1 handler saves ``hpc_ckpt_*.ckpt`` inside the signal
handler and requeues — done here once, at the safe point. A signal before the first training step
ends the run as Lightning does (there is nothing to save yet).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop a fit with a checkpoint."""
REQUEUE_SIGNALS = (signal.SIGUSR1,)
"""Signals after which a SLURM job requeues itself (see the module docstring)."""


class Preempted(Exception):
    """The fit stopped at a safe point after a preemption signal; the checkpoint is saved."""


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if job is not None and not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def requeue(job: str) -> bool:
    """``scontrol requeue <job>``; True when it succeeded (failures are logged, never raised)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("zoo: could not requeue SLURM job %s (%s); resubmit it to resume from last.ckpt", job, error)
        return False
    if result.returncode != 0:
        log.error("zoo: scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    return True


class Preemption(Callback):
    """Saves ``last.ckpt`` and stops the fit at the next optimiser step after SIGTERM or SIGUSR1."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._step_before = 0

    def _flag(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for signum in SIGNALS:
            signal.signal(signum, self._flag)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_before:
            return  # accumulating gradients: not a step boundary
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # Any rank's signal stops all; a rank that saw none reports it as SIGTERM.
        received = self.received or signal.SIGTERM
        path = checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("preemption-save")
        message = f"preempted by {received.name} at step {trainer.global_step}: saved {path}"
        job = slurm_job_id()
        if job is not None and received in REQUEUE_SIGNALS and trainer.is_global_zero:
            message += f"; requeued SLURM job {job}" if requeue(job) else f"; SLURM job {job} NOT requeued (see above)"
        message += f"; resume with --ckpt_path={path}"
        rank_zero_info(f"zoo: {message}")
        raise Preempted(message)


def checkpoint_path(trainer: L.Trainer) -> str:
    """``last.ckpt`` in the run's checkpoint folder (the first ``ModelCheckpoint``'s, else ``<root>/checkpoints``)."""
    callback = trainer.checkpoint_callback
    folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
    folder = folder or str(Path(trainer.default_root_dir) / "checkpoints")
    return str(Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}")
