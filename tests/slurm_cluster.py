"""A throwaway single-node Slurm cluster on localhost for the tests (Debian, run as root, no systemd).

`SlurmCluster(folder).start()` installs munge, slurmctld, slurmd and slurm-client with apt-get
when they are missing, starts munged (unless one runs), slurmctld and slurmd on free ports with
fake GPUs declared as gres, and waits for the node to be idle; `stop()` ends exactly the daemons
it started. Clients need `SLURM_CONF` from `env`. No accounting: finished jobs are known to the
controller for MinJobAge seconds, which the tests stay well within.
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

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
MUNGE_KEY = Path("/etc/munge/munge.key")


class Unavailable(Exception):
    """This machine cannot run the cluster (not root, no apt-get, packages not installable)."""


class SlurmCluster:
    def __init__(self, folder: Path, gpus: int = 2):
        self.dir, self.gpus = Path(folder), gpus
        self.conf = self.dir / "etc" / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.started: list[tuple[str, Path]] = []  # (daemon, pid file) in start order

    def start(self) -> SlurmCluster:
        install()
        for sub in ("etc", "state", "spool", "log", "run", "dev"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_config()
        self._daemon("slurmctld", ["/usr/sbin/slurmctld", "-f", str(self.conf)])
        self._daemon("slurmd", ["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"])
        wait_for(30, lambda: self.run("sinfo", "-h", "-n", "localhost", "-o", "%T").stdout.strip() == "idle",
                 f"the node to become idle (see {self.dir / 'log'})")
        return self

    def stop(self) -> None:
        """Cancel every job still here (their processes would outlive slurmd), then end our daemons."""
        if any(name == "slurmctld" for name, _ in self.started):
            self.run("scancel", "--full", *self.run("squeue", "-h", "-o", "%A").stdout.split())
            try:
                wait_for(30, lambda: not self.run("squeue", "-h").stdout.strip(), "cancelled jobs to end")
            except TimeoutError:
                pass
        for _name, pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(40):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.25)
        self.started.clear()

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60,
                              env={**os.environ, **self.env})

    def _start_munge(self) -> None:
        if not MUNGE_KEY.is_file() or MUNGE_KEY.stat().st_size == 0:
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already running; share it
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--pid-file=/run/munge/munged.pid"],
                       check=True)
        self.started.append(("munged", Path("/run/munge/munged.pid")))
        wait_for(10, lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                 "munged")

    def _write_config(self) -> None:
        d = self.dir
        # gres/gpu drops entries whose File is not a character device: fake ones like /dev/null
        for i in range(self.gpus):
            dev = d / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        gres = "AutoDetect=off\n"
        if self.gpus:
            gres += f"NodeName=localhost Name=gpu File={d}/dev/nvidia[0-{self.gpus - 1}]\n"
        (d / "etc" / "gres.conf").write_text(gres)
        # RealMemory above what slurmd detects makes the node INVAL
        probe = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        memory = re.search(r"RealMemory=(\d+)", probe).group(1)
        ctld_port, slurmd_port = free_port(), free_port()  # never clash with another cluster on this host
        node_gres = f"Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(f"""\
ClusterName=bottleneck-tests
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
MailProg=/bin/true
MinJobAge=600
KillWait=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} {node_gres} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **self.env})
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start: {result.stderr or result.stdout}")
        pid_file = self.dir / "run" / f"{name}.pid"
        wait_for(10, pid_file.is_file, f"{name}'s pid file")
        self.started.append((name, pid_file))


def install() -> None:
    """apt-get the Slurm and munge packages that are missing; Unavailable when that cannot be done."""
    if os.geteuid() != 0:
        raise Unavailable("a localhost Slurm cluster needs root")
    if all(shutil.which(b) for b in ("sbatch", "munged")) and Path("/usr/sbin/slurmctld").exists() \
            and Path("/usr/sbin/slurmd").exists():
        return
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise Unavailable(f"apt-get could not install {' '.join(PACKAGES)}: {result.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(seconds: float, ready, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")
