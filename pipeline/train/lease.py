"""Who may write a run directory: a lease file (``LEASE.json``) that one job's main process holds
and renews, so that a second job on the same run directory waits, then refuses, instead of
training into it beside the first (two writers, checkpoints from both).

The lease names its holder (a random token, host, pid) and when it was last renewed. It is free
when absent, released, older than its time to live, or held by a process of this host that no
longer exists (a job killed with SIGKILL is taken over at once on its own host, after the time to
live elsewhere). Object stores have no compare-and-swap here, so taking a lease is write, settle,
read back; the holder also re-reads it before every checkpoint, and stops without writing when it
finds another token there.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import psutil

from .. import io

log = logging.getLogger(__name__)

LEASE = "LEASE.json"


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory."""


class RunLease:
    """The lease on ``run_dir``; ``ttl_sec`` is how long it stays valid without renewal."""

    def __init__(self, run_dir: str, ttl_sec: float, storage_options: dict | None = None):
        self.url = io.join(run_dir, LEASE)
        self.ttl, self.so = ttl_sec, storage_options
        self.token = uuid.uuid4().hex
        self.lost = False  # set by the heartbeat when another job took the lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        proc = psutil.Process()
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": proc.create_time(), "job": os.environ.get("SLURM_JOB_ID"),
                "renewed": time.time(), "ttl_sec": self.ttl}

    def _read(self) -> dict | None:
        try:
            return io.read_json(self.url, self.so)
        except (FileNotFoundError, ValueError):
            return None  # absent, or a torn write of a store without atomic puts: free

    def holder(self) -> dict | None:
        """The live holder's record, or None when the lease is free."""
        rec = self._read()
        if rec is None or rec.get("token") == self.token:
            return None
        if time.time() - float(rec.get("renewed", 0)) > float(rec.get("ttl_sec", self.ttl)):
            return None
        if rec.get("host") == socket.gethostname() and not _alive(rec.get("pid"), rec.get("pid_started")):
            return None
        return rec

    def acquire(self, wait_sec: float, poll_sec: float = 2.0, interrupted=lambda: False) -> None:
        """Take the lease, waiting up to ``wait_sec`` for a live holder to let go; ``RunDirBusy``
        after that, naming the holder, or as soon as ``interrupted()`` (a preemption notice)."""
        deadline = time.monotonic() + wait_sec
        announced = False
        while True:
            rec = self.holder()
            if rec is None:
                io.atomic_write_json(self.url, self._record(), self.so)
                time.sleep(min(0.5, poll_sec))  # let a racing writer's put land before reading back
                mine = self._read()
                if mine is not None and mine.get("token") == self.token:
                    return
                rec = mine or {}
            if time.monotonic() >= deadline:
                raise RunDirBusy(f"run.dir {self.url.rsplit('/', 1)[0]} is in use by another job "
                                 f"({_describe(rec)}); stop that job or use another run.dir (a lease that is "
                                 f"not renewed expires after {rec.get('ttl_sec', self.ttl):.0f} s)")
            if not announced:
                log.warning("run.dir is in use by %s: waiting up to %.0f s for it", _describe(rec), wait_sec)
                announced = True
            for _ in range(max(1, round(poll_sec / 0.1))):
                if interrupted():
                    raise RunDirBusy(f"interrupted while waiting for run.dir {self.url.rsplit('/', 1)[0]}, in use "
                                     f"by another job ({_describe(rec)}); nothing was written")
                time.sleep(min(poll_sec, 0.1))

    def still_mine(self) -> bool:
        """A fresh read: is the lease still this job's? (Before writing a checkpoint.)"""
        rec = self._read()
        if rec is not None and rec.get("token") != self.token:
            self.lost = True
        return not self.lost

    def start_heartbeat(self) -> None:
        """Renew every quarter of the time to live, in a daemon thread."""
        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    if not self.still_mine():
                        log.error("the run.dir lease was taken over by %s", _describe(self._read() or {}))
                        return
                    io.atomic_write_json(self.url, self._record(), self.so)
                except io.storage_errors() as exc:  # the next beat tries again
                    log.warning("could not renew the run.dir lease: %s", exc)

        self._thread = threading.Thread(target=beat, name="run-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost and (self._read() or {}).get("token") == self.token:
            io.remove(self.url, self.so)


def _alive(pid, started) -> bool:
    try:
        proc = psutil.Process(int(pid))
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except psutil.AccessDenied:
        return True  # another user's process: alive as far as we can tell
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False


def _describe(rec: dict) -> str:
    job = f", SLURM job {rec['job']}" if rec.get("job") else ""
    age = time.time() - float(rec.get("renewed", time.time()))
    return f"host {rec.get('host')}, pid {rec.get('pid')}{job}, renewed {age:.0f} s ago"
