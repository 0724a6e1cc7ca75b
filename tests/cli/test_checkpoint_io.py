"""AtomicCheckpointIO: a write killed (``kill -9``) or failing midway leaves the previous checkpoint
loadable, and the next successful save leaves no temp file; ``zoo fit`` uses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from callbacks.preemption import Preemption
from callbacks.rng_state import RNGState
from tests.helpers.faults import FaultTable
from tests.helpers.recipes import ROOT, configs
from zoo.checkpoint_io import AtomicCheckpointIO
from zoo.trainer_cli import ZooCLI

STALLED_WRITE = """
import sys, time, torch
from zoo.checkpoint_io import AtomicCheckpointIO

class Stall:
    def __reduce__(self):  # runs while torch.save is writing the temp file
        open(sys.argv[2], "w").close()
        time.sleep(600)

AtomicCheckpointIO().save_checkpoint({"weights": torch.full((1000,), 2.0), "stall": Stall()}, sys.argv[1])
"""


@pytest.mark.faults
def test_kill_9_during_a_write_keeps_the_previous_checkpoint(tmp_path: Path, fault: FaultTable) -> None:
    fault.injected("checkpoint: kill -9 during a write")
    target, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000)}, target)
    writer = subprocess.Popen([sys.executable, "-c", STALLED_WRITE, str(target), str(marker)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    [stray] = list(tmp_path.glob(".last.ckpt.tmp-*"))  # what a killed write leaves: beside the target, not in /tmp
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(1000))
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1000)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.zeros(1000))
    assert not stray.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "writing"]
    fault.survived("checkpoint: kill -9 during a write")


def test_a_write_failing_midway_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(1000)}, target)

    def half_then_full_disk(obj: object, file: object) -> None:
        file.write(b"PK\x03\x04" + bytes(4096))  # a partial zip, as a full disk leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"weights": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_zoo_fit_checkpoints_atomically_with_rng_and_preemption() -> None:
    cli = ZooCLI(args=configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert sum(isinstance(c, RNGState) for c in cli.trainer.callbacks) == 1
    assert sum(isinstance(c, Preemption) for c in cli.trainer.callbacks) == 1


def test_weights_only_load_takes_the_zoos_typed_configs_and_nothing_else(tmp_path: Path) -> None:
    """A module built in Python keeps dataclass configs in its hyperparameters: they load weights-only
    (checkpoint_io.config_globals); an object of any other class is still refused."""
    from zoo.blocks.mllm import VLMConfig
    from zoo.checkpoint_io import config_globals

    assert VLMConfig in config_globals() and all(cls.__module__.split(".")[0] in ("zoo", "datamodules", "callbacks") for cls in config_globals())
    config = VLMConfig(pretrained="Qwen/Qwen2.5-VL-3B-Instruct", max_condition_length=77)
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"mllm": config}}, tmp_path / "typed.ckpt")
    loaded = AtomicCheckpointIO().load_checkpoint(tmp_path / "typed.ckpt")
    assert loaded["hyper_parameters"]["mllm"] == config and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    torch.save({"state_dict": {}, "hyper_parameters": {"path": Path("/x")}}, tmp_path / "other.ckpt")
    with pytest.raises(Exception, match="Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "other.ckpt")
