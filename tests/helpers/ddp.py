"""Multi-process DDP jobs on CPU (gloo) from a test, with the ranks launched the way torchrun or srun launch them.

Each rank is a fresh process that builds its own model and runs Lightning's ``ddp`` with the
variables torchrun (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``) or srun (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NODEID``, ...) sets, as on a cluster, over one or several simulated nodes
of 127.0.0.1 (``ddp_spawn``, which pickles the model into its workers, is covered by the VLMEncoder
pickling tests in tests/blocks/test_mllm.py). Callbacks
live in the worker processes, so tests assert on the files rank 0 writes, not on Python objects.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

Launcher = Literal["torchrun", "slurm"]
"""Whose environment the ranks get: torchrun's (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ...) or srun's (``SLURM_*``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the job's rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world_size: int, nodes: int, port: int, launcher: Launcher) -> dict[str, str]:
    """The variables ``torchrun`` or ``srun`` give rank ``rank`` of ``world_size`` over ``nodes`` nodes
    (ranks fill node 0 first), all on 127.0.0.1; Lightning derives node and local rank from them."""
    per_node = world_size // nodes
    node, local = divmod(rank, per_node)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        return common | {"WORLD_SIZE": str(world_size), "NODE_RANK": str(node), "GROUP_RANK": str(node),
                         "RANK": str(rank), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(per_node)}
    return common | {
        "SLURM_JOB_ID": str(port), "SLURM_JOB_NAME": "zoo-ddp", "SLURM_NODELIST": "localhost", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(world_size), "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
    }


def _rank_main(
    rank: int, world_size: int, nodes: int, port: int, launcher: Launcher, job: Callable[..., None], args: tuple[Any, ...]
) -> None:
    """One rank of an externally launched job: the launcher's environment, then ``job(*args)``."""
    # A test run inside a SLURM or torchrun allocation must not see that job's ranks.
    for name in [n for n in os.environ if n.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))]:
        del os.environ[name]
    os.environ.update(launcher_env(rank, world_size, nodes, port, launcher))
    job(*args)
    # As a training script ends: a process group left to interpreter shutdown can abort the rank
    # ("terminate called without an active exception") while gloo's threads are torn down.
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(
    job: Callable[..., None],
    args: tuple[Any, ...],
    world_size: int,
    deadlock_after_s: float,
    nodes: int = 1,
    launcher: Launcher = "torchrun",
) -> None:
    """Run ``job(*args)`` as every rank of a ``world_size`` job over ``nodes`` simulated nodes of
    127.0.0.1, launched as ``launcher`` launches it (``job`` must be a module-level function).

    A rank's exception is raised here; a job still running after ``deadlock_after_s`` seconds (a
    collective entered by only some ranks hangs forever) is killed and fails the test.
    """
    context = mp.start_processes(
        _rank_main, args=(world_size, nodes, free_port(), launcher, job, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + deadlock_after_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"DDP test job did not finish in {deadlock_after_s} s: deadlock between ranks")
