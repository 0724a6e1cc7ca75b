"""A one-node SLURM cluster on localhost for tests: Debian's ``slurm-wlm`` and ``munge``, installed when
missing (as root, through apt-get), with every file of the cluster in a temporary folder.

``munged`` runs on its own key and socket, ``slurmctld`` and ``slurmd`` on free ports with a
generated ``slurm.conf`` that works in a container: no cgroups (``proctrack/linuxproc``,
``task/none``, no accounting), and eight GPUs on the node (device files linked to ``/dev/null``) so the project's sbatch
templates submit unchanged (``--gpus-per-node=8``) while the jobs train on the CPU. Clients find the
cluster through ``SLURM_CONF`` in :attr:`LocalCluster.env`. On exit every job is cancelled and the
three daemons are stopped by process id.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel")
PACKAGES = ("slurm-wlm", "munge")
GPUS = 8
"""GPUs the node declares: as many as the sbatch templates request per node."""


def _missing() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def install() -> str | None:
    """Install SLURM and munge if missing; None when they are there, else why they cannot be."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and apt-get as root is not available here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        if subprocess.run(install_cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            result = subprocess.run(install_cmd, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(PACKAGES)} took over 10 minutes"
    return f"still missing after apt-get install: {', '.join(_missing())}" if _missing() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalCluster:
    """Context manager: munged + slurmctld + slurmd in ``root``, partition ``debug`` on node ``localhost``."""

    def __init__(self, root: Path, cpus: int) -> None:
        self.root, self.cpus = root, cpus
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, parents=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = munge / "munge.socket"
        self._spawn([_sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            self._check_alive(deadline, "munged did not open its socket within 30 s")
            time.sleep(0.1)
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        # gres/gpu drops GPUs without a device file; links to /dev/null (a character device) serve.
        devices = self.root / "dev"
        devices.mkdir()
        for index in range(GPUS):
            (devices / f"gpu{index}").symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={devices}/gpu[0-{GPUS - 1}]\n")
        self.conf.write_text(
            "\n".join([
                "ClusterName=zootest",
                "SlurmctldHost=localhost(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={socket_path}",
                f"StateSaveLocation={self.root / 'state'}",
                f"SlurmdSpoolDir={self.root / 'spool'}",
                f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                # Containers have no usable cgroup hierarchy: track processes by parent id, bind nothing.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "GresTypes=gpu",
                "ReturnToService=2",
                "SlurmdParameters=config_overrides",
                "JobRequeue=1",
                "MinJobAge=600",  # finished jobs stay visible to scontrol show job (no accounting database)
                "KillWait=10",
                f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} Gres=gpu:{GPUS} State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )
        self._spawn([_sbin("slurmctld"), "-D", "-i"])
        self._spawn([_sbin("slurmd"), "-D", "-N", "localhost"])
        deadline = time.monotonic() + 60
        while self.node_state() not in ("idle", "mixed", "allocated"):
            self._check_alive(deadline, f"the node did not become idle within 60 s (state {self.node_state()!r})")
            time.sleep(0.5)

    def _spawn(self, command: list[str]) -> None:
        """Start a daemon in the foreground, its output in ``log/<name>.out``."""
        (self.root / "log").mkdir(exist_ok=True)
        with open(self.root / "log" / f"{Path(command[0]).name}.out", "wb") as log:
            self._daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _check_alive(self, deadline: float, timeout_message: str) -> None:
        for daemon in self._daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{daemon.args[0]} exited ({daemon.returncode}): {self.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{timeout_message}: {self.logs()}")

    def node_state(self) -> str:
        result = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False)
        return result.stdout.strip().rstrip("*~#")

    def run(
        self, *command: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster (``env`` adds to :attr:`env`; sbatch passes it to the job)."""
        return subprocess.run(
            list(command), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60, check=check
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as ``{field: value}`` (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        """The tails of the daemons' logs, for failure messages."""
        tails = []
        for path in sorted([*(self.root / "log").glob("*"), *(self.root / "munge").glob("*.log")]):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)

    def __exit__(self, *exc: object) -> None:
        if self.conf.exists() and len(self._daemons) == 3:
            # Jobs end before slurmd does, or their processes would outlive the cluster.
            self.run("scancel", "--full", f"--user={os.geteuid()}", check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
