"""Preemption of a real ``python -m zoo fit`` process: SIGTERM / SIGUSR1 save at the next step, exit 0,
resume exactly; under SLURM, SIGUSR1 requeues through ``scontrol`` (a recording stand-in on PATH)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from callbacks.preemption import requeue, slurm_job_id
from tests.helpers.recipes import ROOT, configs, lr_steps, run_zoo, tiny_run_overlay, toy_edits

EVERY = 3
"""Periodic checkpoint interval of the preempted runs."""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_edits(tmp_path_factory.mktemp("toy"), train=48)


def fit_args(data: Path, run_dir: Path, max_steps: int) -> list[str]:
    overlay = tiny_run_overlay(
        run_dir, data, max_steps=max_steps, data_args={"batch_size": 4}, model_args={"num_inference_steps": 2},
        checkpoint_args={"every_n_train_steps": EVERY, "save_last": False},
    )
    return [*configs(["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]), *overlay, "--trainer.enable_progress_bar=false"]


def preempt(args: list[str], run_dir: Path, signum: signal.Signals, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start ``zoo fit``, send ``signum`` once its first periodic checkpoint exists; (exit status, output).

    The process computes with as many threads as this one, which resumes and reruns it: CPU kernels
    sum in a thread-count-dependent order (measured: a 1-thread run resumed with 2 threads differs
    by 5.7e-7 two steps later, while 1 + 1 or 2 + 2 threads are bit-identical).
    """
    log = run_dir / "fit.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "zoo", "fit", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})},
        )
        deadline = time.monotonic() + 240
        while not list((run_dir / "train" / "checkpoints").glob(f"*step={EVERY}.ckpt")):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no periodic checkpoint within 240 s"
            time.sleep(0.05)
        process.send_signal(signum)
        status = process.wait(timeout=240)
    return status, log.read_text()


def fit_in_fresh_process(args: list[str], run_dir: Path) -> str:
    """Run ``zoo fit`` to completion in a new process with this one's thread count; its output."""
    done = run_zoo("fit", *args, timeout=600, same_threads=True)
    output = done.stdout + done.stderr
    (run_dir / "fit_fresh.log").write_text(output)
    assert done.returncode == 0, output[-3000:]
    return output


def steps_on_disk(run_dir: Path) -> tuple[int, list[int]]:
    """(global step of last.ckpt, global steps of the periodic checkpoints)."""
    folder = run_dir / "train" / "checkpoints"
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)["global_step"]  # noqa: E731
    return load(folder / "last.ckpt"), sorted(load(path) for path in folder.glob("epoch=*.ckpt"))


def test_sigterm_saves_at_the_next_step_exits_0_and_resumes_exactly(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "preempted"
    status, output = preempt(fit_args(toy_data, run, max_steps=1000), run, signal.SIGTERM)
    assert status == 0, output[-3000:]
    last = run / "train" / "checkpoints" / "last.ckpt"
    step, periodic = steps_on_disk(run)
    assert step > EVERY and step >= max(periodic), (step, periodic)
    assert f"zoo: preempted by SIGTERM at step {step}: saved {last}; resume with --ckpt_path={last}" in output
    assert "Traceback" not in output and "SIGTERMException" not in output
    assert not list(last.parent.glob(".*")), "no temp files left"

    # Resume to the next periodic step and compare with a run that was never stopped. Both run in
    # fresh processes, as the preempted one did: this process has run other tests, and a CPU kernel's
    # choices can depend on what a process did before (CI measured 1e-6 drift against an in-process run).
    target = EVERY * math.ceil((step + 1) / EVERY)
    resumed_log = fit_in_fresh_process([*fit_args(toy_data, run, target), "--trainer.log_every_n_steps=1", f"--ckpt_path={last}"], run)
    assert f"Restoring states from the checkpoint path at {last}" in resumed_log, resumed_log[-3000:]
    newest = max((run / "train").glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime)
    assert lr_steps(newest) == list(range(step, target)), "continues at the saved step"
    full = tmp_path / "uninterrupted"
    full.mkdir()
    fit_in_fresh_process(fit_args(toy_data, full, target), full)
    [a] = (run / "train" / "checkpoints").glob(f"*step={target}.ckpt")
    [b] = (full / "train" / "checkpoints").glob(f"*step={target}.ckpt")
    resumed, uninterrupted = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    differ = [key for key, value in uninterrupted.items() if not torch.equal(value, resumed[key])]
    assert not differ, f"{len(differ)} trainable tensors differ after resuming the step-{step} preemption save"


def test_sigusr1_under_slurm_saves_and_requeues_once(toy_data: Path, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    # Enough of SLURM's environment for Lightning to pick SLURMEnvironment and arm its own
    # auto-requeue handler, which the zoo's must replace (one save, one requeue).
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "zoo-test",
        "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = tmp_path / "run"
    status, output = preempt(fit_args(toy_data, run, max_steps=1000), run, signal.SIGUSR1, env=slurm)
    assert status == 0, output[-3000:]
    step, _ = steps_on_disk(run)
    assert f"zoo: preempted by SIGUSR1 at step {step}: saved {run / 'train' / 'checkpoints' / 'last.ckpt'}; requeued SLURM job 4242" in output
    assert "SLURM auto-requeueing enabled" in output  # Lightning armed its handler
    assert calls.read_text() == "requeue 4242\n"
    assert not list(run.rglob("hpc_ckpt_*")), "Lightning's in-handler save must not run"


def test_job_id_of_array_jobs_and_a_missing_scontrol(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert slurm_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "70_3"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert requeue("70_3") is False
    assert "could not requeue SLURM job 70_3" in caplog.text
