"""A throwaway SLURM cluster on loopback for tests: munged with a generated key, slurmctld and two
slurmd daemons (nodes ``n1``, ``n2``, both ``NodeAddr=127.0.0.1`` on ports of their own), every
file under one temporary directory, no cgroups, accounting or systemd. Daemons run in the
foreground (``-D``) as children of the test and are stopped by PID.

Clients (``sbatch``, ``squeue``, ``scontrol``, ``scancel``) find the cluster through
``SLURM_CONF``: use :meth:`SlurmCluster.env` for their environment; jobs inherit it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + ("sbatch", "squeue", "scontrol", "scancel", "srun")
            if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


# Knobs that matter here: cred_expire=15 (a requeued job waits cred_expire + 1 s before it may
# start again; default 120), sched_interval=2 (the scheduler's periodic pass, default 60),
# MinJobAge=600 (finished jobs stay visible to `scontrol show job`: there is no accounting),
# SlurmdParameters=config_overrides (two nodes on one machine declare what they like).
SLURM_CONF = """\
ClusterName=gantest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=15
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
LaunchType=launch/slurm
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PlugStackConfig={root}/plugstack.conf
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmdTimeout=120
SlurmctldTimeout=60
MessageTimeout=30
InactiveLimit=0
Waittime=0
TreeWidth=1
SlurmdParameters=config_overrides
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={n1_port} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={n2_port} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    """``with SlurmCluster(tmp) as c: c.sbatch(...)``; every daemon is stopped on exit."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf), **extra}

    def start(self, timeout: float = 120) -> None:
        for d in ("munge", "state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # clients need +x to reach the socket
        self._start_munged()
        ctld_port, n1_port, n2_port = distinct_free_ports(3)
        (self.root / "plugstack.conf").write_text("")
        # Both slurmd run on this host (NodeHostname); `-N` tells each which node it is.
        self.conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=self.root, ctld_port=ctld_port,
                                               n1_port=n1_port, n2_port=n2_port, cpus=self.cpus,
                                               munge_socket=self.munge_socket))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self.wait_for_nodes_idle(timeout)

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--num-threads=2"])
        deadline = time.time() + 30
        while not self.munge_socket.exists():
            self._check_alive("munged")
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.console", "ab")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env(), start_new_session=True)
        finally:
            out.close()

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def wait_for_nodes_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            for name in self.procs:
                self._check_alive(name)
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = r.stdout.strip()
            found = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if all(found.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states!r}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, SIGTERM every daemon (slurmd first, munged last), SIGKILL what is
        left, then kill any process still carrying this cluster's SLURM_CONF: job steps
        (slurmstepd and the jobs' processes) outlive slurmd by design."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        order = [n for n in self.procs if n.startswith("slurmd")] + \
            [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.kill_leftovers()

    def cancel_all(self, timeout: float = 90) -> None:
        try:
            self.run(["scancel", "--full", "--partition=test"], check=False)
            deadline = time.time() + timeout
            while time.time() < deadline:
                r = self.run(["squeue", "-h", "-o", "%i %T"], check=False)
                if r.returncode == 0 and not r.stdout.strip():
                    return
                time.sleep(1)
        except (OSError, subprocess.SubprocessError):
            pass

    def kill_leftovers(self) -> list[int]:
        """SIGKILL the processes this cluster started that are still alive (found by SLURM_CONF
        in their environment, which every daemon, step and job process inherits from us)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if mine in environ.split(b"\0"):
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                    killed.append(int(pid_dir.name))
                except OSError:
                    pass
        return killed

    # ------------------------------------------------------------------ clients
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env(**env))
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def sbatch(self, args: list[str], cwd: Path | str, env: dict[str, str] | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                           env=self.env(**(env or {})))
        if r.returncode:
            raise RuntimeError(f"sbatch {args} failed ({r.returncode}): {r.stdout}{r.stderr}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job is purged)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_for_state(self, job_id: int, states: set[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            for name in self.procs:
                self._check_alive(name)
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info.get('JobState')}")

    def logs(self, tail: int = 6000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(parts)
