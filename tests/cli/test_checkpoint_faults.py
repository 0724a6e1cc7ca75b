"""Checkpoint faults of a real fit: ``kill -9`` while training, a full disk during a save, and
checkpoints that would run code or are torn, each given to ``zoo fit``; loading is weights-only everywhere."""

from __future__ import annotations

import ast
import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers.faults import FaultTable
from tests.helpers.recipes import (
    ROOT,
    configs,
    error_lines,
    tiny_run_overlay,
    toy_edits,
)
from zoo.checkpoint_io import TEMP_MARK, AtomicCheckpointIO, CheckpointWriteError
from zoo.cli import main

pytestmark = pytest.mark.faults

PACKAGES = ("zoo", "datamodules", "callbacks", "benchmarks")
"""The project's code (tests excluded): every ``torch.load`` there must be weights-only."""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_edits(tmp_path_factory.mktemp("toy"), train=16)


def fit_args(data: Path, run_dir: Path, max_steps: int) -> list[str]:
    overlay = tiny_run_overlay(run_dir, data, max_steps=max_steps, data_args={"batch_size": 4}, model_args={"num_inference_steps": 1})
    return [*configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), *overlay, "--trainer.enable_progress_bar=false"]


def test_kill_9_during_training_leaves_loadable_checkpoints_and_the_fit_resumes(
    toy_data: Path, tmp_path: Path, fault: FaultTable
) -> None:
    fault.injected("checkpoint: kill -9 during training")
    args = fit_args(toy_data, tmp_path, max_steps=400)
    folder = tmp_path / "train" / "checkpoints"
    run = subprocess.Popen([sys.executable, "-m", "zoo", "fit", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(folder.glob("*step=4.ckpt")):  # two checkpoints written, training goes on
        assert run.poll() is None, run.stderr.read().decode()[-2000:] if run.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    saved = {path.name: torch.load(path, map_location="cpu", weights_only=True) for path in folder.glob("*.ckpt")}
    assert {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"} <= set(saved)
    assert all(torch.isfinite(t).all() for state in saved.values() for t in state["state_dict"].values())
    killed_at = saved["last.ckpt"]["global_step"]  # 2 when the kill came before last.ckpt was replaced
    assert killed_at >= 2
    resumed = fit_args(toy_data, tmp_path, max_steps=killed_at + 2)
    assert main(["fit", *resumed, f"--ckpt_path={folder / 'last.ckpt'}"]) == 0
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == killed_at + 2
    assert not [p.name for p in folder.iterdir() if TEMP_MARK in p.name], "a killed write's temp file outlived the next save"
    fault.survived("checkpoint: kill -9 during training")


@contextmanager
def disk_of(folder: Path, size: int) -> Iterator[str]:
    """Writes into ``folder`` fail past ``size`` bytes: a tmpfs of that size where this process may
    mount one (root), else ``RLIMIT_FSIZE`` on this process (per file; the write fails with EFBIG)."""
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if shutil.which("mount") and subprocess.run(command, capture_output=True, check=False).returncode == 0:
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield "RLIMIT_FSIZE"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_frees_the_space(tmp_path: Path, fault: FaultTable) -> None:
    fault.injected("checkpoint: disk full during a save")
    folder = tmp_path / "small"
    io = AtomicCheckpointIO()
    with disk_of(folder, 4 << 20) as how:
        target = folder / "last.ckpt"
        io.save_checkpoint({"weights": torch.ones(256, 1024)}, target)  # 1 MiB: fits
        with pytest.raises(CheckpointWriteError, match=f"writing checkpoint {target} failed .*; the previous one is kept") as info:
            io.save_checkpoint({"weights": torch.zeros(1024, 1024)}, target)  # 4 MiB beside the 1 MiB one: does not
        assert info.value.errno == (errno.ENOSPC if how == "tmpfs" else errno.EFBIG), how
        assert torch.equal(io.load_checkpoint(target)["weights"], torch.ones(256, 1024))
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"], "the partial temp file must be removed"
        io.save_checkpoint({"weights": torch.full((256, 1024), 2.0)}, target)  # the space is usable again
        assert torch.equal(io.load_checkpoint(target)["weights"], torch.full((256, 1024), 2.0))
    fault.survived("checkpoint: disk full during a save")


PAYLOAD = """
import os, sys, torch

class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))

torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "zoo.modules.dim.DIMModule"}, "extra": RunsCode()}, sys.argv[1])
"""


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(
    toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fault: FaultTable
) -> None:
    fault.injected("checkpoint: pickle that runs code")
    evil, ran = tmp_path / "evil.ckpt", tmp_path / "payload_ran"
    subprocess.run([sys.executable, "-c", PAYLOAD, str(evil), str(ran)], cwd=ROOT, check=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load without weights_only would now unpickle anything
    assert main(["fit", *fit_args(toy_data, tmp_path / "run", max_steps=2), f"--ckpt_path={evil}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"zoo: error: --ckpt_path {evil} holds objects other than tensors and plain values: refused")
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)  # Lightning's resume path, whatever it asks
    assert not ran.exists() and not (tmp_path / "run" / "train").exists()
    fault.survived("checkpoint: pickle that runs code")


def test_a_torn_checkpoint_is_one_line(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: FaultTable) -> None:
    fault.injected("checkpoint: torn file given to --ckpt_path")
    torn = tmp_path / "torn.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000)}, torn)
    torn.write_bytes(torn.read_bytes()[:2000])  # what a non-atomic copy killed midway leaves
    assert main(["fit", *fit_args(toy_data, tmp_path / "run", max_steps=2), f"--ckpt_path={torn}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"zoo: error: --ckpt_path {torn} is not a readable checkpoint: PytorchStreamReader failed"), line
    fault.survived("checkpoint: torn file given to --ckpt_path")


def _torch_loads(path: Path) -> list[tuple[int, bool]]:
    """``(line, passes weights_only=True)`` of every ``torch.load(...)`` call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            calls.append((node.lineno, isinstance(flag, ast.Constant) and flag.value is True))
    return calls


def test_every_torch_load_of_the_project_is_weights_only(fault: FaultTable) -> None:
    fault.injected("checkpoint: torch.load without weights_only")
    calls = {f"{path.relative_to(ROOT)}:{line}": safe for package in PACKAGES for path in (ROOT / package).rglob("*.py") for line, safe in _torch_loads(path)}
    assert len(calls) >= 3, calls  # the CLI's class-path check, GoT's official weights, IP-Adapter .bin files
    assert [where for where, safe in calls.items() if not safe] == []
    fault.survived("checkpoint: torch.load without weights_only")
