"""Multi-process DDP jobs on CPU (gloo) from a test, with the ranks launched the way torchrun or srun launch them.

Each rank is a fresh process that builds its own model and runs Lightning's ``ddp`` with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set, as on a cluster (``ddp_spawn``, which pickles the model into
its workers, is covered by the VLMEncoder pickling tests in tests/blocks/test_mllm.py). Callbacks
live in the worker processes, so tests assert on the files rank 0 writes, not on Python objects.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the job's rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, job: Callable[..., None], args: tuple[Any, ...]) -> None:
    """One rank of an externally launched job: the launcher's environment, then ``job(*args)``."""
    # A test run inside a SLURM or torchrun allocation must not see that job's ranks.
    for name in [n for n in os.environ if n.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))]:
        del os.environ[name]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    job(*args)
    # As a training script ends: a process group left to interpreter shutdown can abort the rank
    # ("terminate called without an active exception") while gloo's threads are torn down.
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(job: Callable[..., None], args: tuple[Any, ...], world_size: int, deadlock_after_s: float) -> None:
    """Run ``job(*args)`` as every rank of a ``world_size`` job (``job`` must be a module-level function).

    A rank's exception is raised here; a job still running after ``deadlock_after_s`` seconds (a
    collective entered by only some ranks hangs forever) is killed and fails the test.
    """
    context = mp.start_processes(
        _rank_main, args=(world_size, free_port(), job, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + deadlock_after_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"DDP test job did not finish in {deadlock_after_s} s: deadlock between ranks")
