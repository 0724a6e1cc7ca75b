"""``recipes/cluster/train.sbatch`` on a real one-node SLURM cluster on localhost (:mod:`tests.helpers.slurm`):
preempted by SIGUSR1 as ``--signal=SIGUSR1@90`` sends it, the job saves, requeues itself, resumes from
its save into the same TensorBoard run, and ends with the weights of a run never stopped."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from datamodules import toy
from tests.helpers.recipes import ROOT, configs, lr_steps, run_zoo, tiny_run_overlay
from tests.helpers.slurm import LocalCluster, install

EVERY, STEPS, JOB = 3, 12, "zoo-requeue"
"""Periodic checkpoint interval, length of the fit, job name (and run folder)."""
RECIPES = ["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    reason = install()
    if reason is not None:
        pytest.skip(reason)
    try:
        with LocalCluster(tmp_path_factory.mktemp("slurm"), cpus=os.cpu_count() or 1) as running:
            yield running
    except RuntimeError as error:
        pytest.skip(f"a local SLURM cluster could not start here: {error}")


def overlay(data: Path, run_dir: Path) -> tuple[str, list[str]]:
    """(overlay YAML, overrides): tiny DIM on toy shards, checkpoints every EVERY steps, the learning
    rate logged at every step."""
    _, path = tiny_run_overlay(
        run_dir, data, max_steps=STEPS, data_args={"batch_size": 4}, model_args={"num_inference_steps": 2},
        checkpoint_args={"every_n_train_steps": EVERY},
    )
    return path, ["--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster: LocalCluster, tmp_path: Path) -> None:
    data = tmp_path / "toy"
    args = ["--out", str(data), "--train", "48", "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "8", "--task", "edit"]) == 0
    runs, log = tmp_path / "runs", tmp_path / f"{JOB}.out"
    # The job computes with this process's thread count, as the reference run below (CPU sums are
    # ordered by thread), and finds its python and run folder through the template's variables.
    env = {"ZOO_RUNS": str(runs), "ZOO_PYTHON": sys.executable, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    tiny, overrides = overlay(data, tmp_path / "overlay")
    submitted = cluster.run(
        "sbatch", "--parsable", f"--job-name={JOB}", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}",
        "recipes/cluster/train.sbatch", *RECIPES, tiny, *overrides, cwd=ROOT, env=env,
    )
    job = submitted.stdout.strip().split(";")[0]
    folder = runs / JOB / "train" / "checkpoints"

    deadline = time.monotonic() + 300
    while not list(folder.glob(f"*step={EVERY}.ckpt")):
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no step-{EVERY} checkpoint within 300 s: {cluster.logs()}"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=SIGUSR1@90 sends 90 s before the limit
    released = False
    while (state := cluster.job(job)).get("JobState") != "COMPLETED":
        assert state.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), (state, log.read_text()[-3000:])
        if not released and state.get("Restarts") == "1" and state.get("Reason") == "BeginTime":
            # slurmctld makes a requeued job wait 2 minutes (measured here) before it is eligible again.
            released = cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
        assert time.monotonic() < deadline + 300, f"job {job} not done within 600 s: {log.read_text()[-3000:]}"
        time.sleep(1)

    output = log.read_text()
    assert (state["Restarts"], state["ExitCode"]) == ("1", "0:0"), state
    last = folder / "last.ckpt"
    saved = [line for line in output.splitlines() if line.startswith("zoo: preempted by SIGUSR1")]
    assert len(saved) == 1, output[-3000:]
    step = int(saved[0].split(" at step ")[1].split(":")[0])
    assert EVERY < step < STEPS, saved
    assert saved[0] == f"zoo: preempted by SIGUSR1 at step {step}: saved {last}; requeued SLURM job {job}; resume with --ckpt_path={last}"
    assert f"zoo: job {job} (restart 1): resuming from {last}" in output

    # One TensorBoard run: the first start logged steps 0..step-1, the restart step..STEPS-1.
    train = runs / JOB / "train"
    assert [p.name for p in (runs / JOB).iterdir()] == ["train"]
    first, restart = sorted(train.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert lr_steps(first) == list(range(step)) and lr_steps(restart) == list(range(step, STEPS))

    reference = tmp_path / "uninterrupted"
    tiny, overrides = overlay(data, reference)
    # A fresh process, as the job's were: this one has run other tests, and a CPU kernel's choices can
    # depend on what a process did before (CI measured 1e-6 drift against an in-process reference).
    done = run_zoo("fit", *configs([*RECIPES, tiny]), *overrides, timeout=600, same_threads=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [a] = folder.glob(f"*step={STEPS}.ckpt")
    [b] = (reference / "train" / "checkpoints").glob(f"*step={STEPS}.ckpt")
    resumed, uninterrupted = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    differ = [key for key, value in uninterrupted.items() if not torch.equal(value, resumed[key])]
    assert not differ, f"{len(differ)} trainable tensors differ from the uninterrupted run's"
