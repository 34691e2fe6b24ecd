"""Asynchronous evaluation: evaluator throughput with 1 and 2 processes, and what a running evaluator
does to the training loop's step time on the same machine.

What runs. Demo shards (``launch/shard.py write demo``: 64 train + 64 val samples, 256x128, 16 per
shard; the val split holds exactly ``--samples``, see (a)) and an untrained stand-in InceptionV3
(``pipeline.eval.standin``) go to a temp dir. A tiny ``pix2pix_demo`` run (``train.total_kimg=0.008``:
2 steps of batch 4, one committed snapshot) gives the snapshot to evaluate. Every program runs as a
user runs it, in a child process with ``OMP_NUM_THREADS=1`` (one compute thread per process):

(a) Throughput. ``launch/evaluate.py --run RUN --once --step N --max-samples 64 --reference-cache C``
    with 1 process, and with 2 through ``accelerate launch --config_file
    launch/accelerate/cpu_2proc.yaml``. Generation + Inception features of the generated images +
    paired metrics (PSNR, SSIM) + FID/KID, for 64 validation samples. *cold*: ``C`` is a fresh
    empty directory, so the 64 real images' Inception features are computed too (128 Inception
    passes); *warm*: ``C`` already holds them (64 passes). The run's ``eval/`` is removed before
    each measurement (the evaluator evaluates a snapshot once). Reported: the process's wall time
    (start-up included: imports, loading Inception, joining the process group), the evaluator's
    own ``seconds`` from its result JSON (from the snapshot's generator built to the numbers: the
    evaluation work itself), images/s on both clocks, the CPU seconds of the whole process tree
    (``wait4`` rusage), and the 2-vs-1 speed-up. Cross-checks: ``seconds`` < wall; a cold run stores
    the reference in its cache and a warm run adds nothing; every measurement yields the same FID.
    Why the val split holds exactly the samples evaluated: the split is partitioned among evaluator
    processes in contiguous ranges of sample index, and ``--max-samples N`` keeps the first N in
    that global order, so with N at most half the split the first process gets every sample and
    the second one nothing (it still reads and decodes its range, then drops it).
(b) Interference. ``pix2pix_demo`` at ngf/ndf 16, batch 4, 1 process, ``data.workers=0`` (the
    whole training is one busy thread), ``train.log_every_kimg=0.004`` (a ``Timing/sec_per_kimg``
    point per iteration), no image grids or periodic checkpoints, for ``--iters`` iterations: once
    alone, once while an evaluator (1 process, warm reference) evaluates a *copy* of the tiny run
    in a loop (``--once``, relaunched as soon as it finishes, so it is busy the whole time).
    Rounds alternate alone/beside (ABBA with 2 rounds). Step times come from the run's TensorBoard
    with TensorBoard's ``EventAccumulator``; the first ``--warmup`` points are dropped. To tell
    *waiting* from *CPU contention*, a sampler thread reads the training process's
    ``/proc/PID/task/*/schedstat`` (time on a CPU, time runnable but waiting for one) every 0.1 s;
    over the measured iterations, wall = on-CPU + runqueue wait + the rest (blocked or sleeping:
    I/O, locks, anything it would wait on). The voluntary / involuntary context switches of the
    training process (rusage) are shown too, and how many cores the evaluator kept busy over the
    same iterations (its schedstat, sampled the same way).

Quiet machine. These are wall-time measurements of multi-process work on a 2-core machine that
other sessions share, so before each measurement the benchmark waits (up to ``--max-wait`` seconds
in all, polling) for the 1-minute load average to be below 1.0. Right after this benchmark's own
work the load average still carries it, so our share is taken off first, computed the way the
kernel computes the average (an exponential average, time constant 60 s, of runnable tasks; ours
are the cores each measurement kept busy, for as long as it ran); and the cores busy over a 3 s
window in which nothing of ours runs (others' work only) must be below 0.5, which catches a load
that has just started. Each measurement prints the three figures; when the wait gives up,
measurements go ahead and are marked as taken under load (*). The column ``cores`` (CPU seconds /
wall seconds of the process tree) tells the same story after the fact: a lone 1-process evaluator
on a quiet machine keeps 1.00 core busy, a 2-process one less than 2 (start-up, the launcher, and
the main process's gather and FID/KID are not split). The wait is not part of the run-time budget
(default < 10 min on a quiet machine, --quick < 3).

    .venv/bin/python bench/eval_throughput.py            # 2 rounds of (a), 2 rounds x 60 iterations of (b)
    .venv/bin/python bench/eval_throughput.py --quick    # 1 round, 32 samples, 40 iterations
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout

import numpy as np  # noqa: E402
import psutil  # noqa: E402

TRAIN = str(REPO / "launch" / "train.py")
EVALUATE = str(REPO / "launch" / "evaluate.py")
SHARD = str(REPO / "launch" / "shard.py")
ACCEL_CPU2 = str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")
QUIET_LOAD = 1.0  # 1-minute load average, less what our own previous work still adds to it
QUIET_OTHERS = 0.5  # busy cores while nothing of ours runs
LOADAVG_TAU = 60.0  # the kernel's 1-minute load average decays as exp(-t / 60 s)
BATCH = 4
CHILD_TIMEOUT = 900.0


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- child processes


class Child:
    """A program in its own session; ``wait4`` gives its wall time and the rusage of its whole
    tree (the children it waited for are included)."""

    def __init__(self, cmd: list[str], log: Path):
        self.cmd, self.log = cmd, log
        self._out = open(log, "wb")
        self.start = time.time()
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(), cwd=REPO, start_new_session=True)
        self.pid = self.proc.pid
        self.rusage = None
        self.rc: int | None = None
        self.killed = False

    def poll(self) -> bool:
        if self.rusage is not None:
            return True
        pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.wall = time.perf_counter() - self._t0
        self.end = time.time()
        self.rc = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rusage = rusage
        self._out.close()
        return True

    def wait(self, timeout: float = CHILD_TIMEOUT) -> Child:
        deadline = time.monotonic() + timeout
        try:
            while not self.poll():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(self.cmd)}\n{self.tail()}")
                time.sleep(0.05)
        except BaseException:  # a timeout, Ctrl-C: leave nothing of ours running
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL to this child, its process group, and its descendants by pid (torch's elastic
        launcher starts its workers in sessions of their own)."""
        if self.rusage is None:
            self.killed = True
            try:
                descendants = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for proc in descendants:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            while not self.poll():
                time.sleep(0.02)

    @property
    def cpu(self) -> float:
        return self.rusage.ru_utime + self.rusage.ru_stime

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check(self) -> Child:
        if self.rc != 0:
            raise RuntimeError(f"exit {self.rc}: {' '.join(self.cmd)}\n--- {self.log}\n{self.tail()}")
        return self


def run(cmd: list[str], log: Path) -> Child:
    return Child(cmd, log).wait().check()


# ----------------------------------------------------------------------------- the quiet-machine gate


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot, all cores (/proc/stat; idle, iowait
    and steal do not count)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq


def busy_cores(window: float = 2.0) -> float:
    """Cores busy over the next ``window`` seconds."""
    b0, t0 = machine_busy(), time.perf_counter()
    time.sleep(window)
    return (machine_busy() - b0) / (time.perf_counter() - t0)


class MachineSampler(threading.Thread):
    """The machine's busy CPU seconds every 0.2 s for the whole benchmark: after a measurement,
    what others ran during it = the machine's busy cores then, less our processes' own."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), machine_busy()))
            self.stop.wait(0.2)

    def others(self, t0: float, t1: float, ours_cpu: float) -> float:
        """Cores others kept busy during [t0, t1] (wall-clock times), given our CPU seconds in it."""
        ts, busy = [x[0] for x in self.samples], [x[1] for x in self.samples]
        total = float(np.interp(t1, ts, busy) - np.interp(t0, ts, busy))
        return max(0.0, total - ours_cpu) / (t1 - t0)


MACHINE = MachineSampler()
DISTURBED = 0.25  # others' cores during a measurement above which it is flagged


@dataclass
class Gate:
    """Quiet = the 1-minute load average, less our own share of it, below ``QUIET_LOAD``, and the
    cores others keep busy over 3 s in which nothing of ours runs below ``QUIET_OTHERS``.

    Our share follows the kernel's own model: the load average is an exponential average (time
    constant 60 s) of the number of runnable tasks, so ``cores`` busy for ``duration`` seconds move
    our share towards ``cores`` by ``1 - exp(-duration / 60)``, and it decays as ``exp(-t / 60)``
    while we are idle."""

    max_wait: float
    deadline: float = 0.0
    own_value: float = 0.0
    own_time: float = 0.0
    gave_up: bool = False

    def __post_init__(self):
        self.deadline = time.monotonic() + self.max_wait
        self.own_time = time.monotonic()

    def busy_until_now(self, cores: float, duration: float) -> None:
        """Our own work that just ended: ``cores`` busy for ``duration`` seconds."""
        now = time.monotonic()
        k = math.exp(-duration / LOADAVG_TAU)
        self.own_value = self.own_tail(now - duration) * k + cores * (1 - k)
        self.own_time = now

    def own_tail(self, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        return self.own_value * math.exp(-max(0.0, at - self.own_time) / LOADAVG_TAU)

    def wait(self, what: str) -> dict:
        """Poll until quiet or past the deadline; the loads this measurement is taken under."""
        last_note = 0.0
        while True:
            others = busy_cores(3.0)
            load, ours = os.getloadavg(), self.own_tail()
            quiet = load[0] - ours < QUIET_LOAD and others < QUIET_OTHERS
            if quiet or time.monotonic() > self.deadline:
                if not quiet and not self.gave_up:
                    self.gave_up = True
                    print(f"  [gate] no quiet machine within --max-wait {self.max_wait:.0f} s: measuring under "
                          f"load from here on (marked *)", flush=True)
                return {"load": load, "ours": ours, "others": others, "quiet": quiet}
            if time.monotonic() - last_note > 30:
                print(f"  [gate] waiting before {what}: load average {load[0]:.2f} (ours ~{ours:.2f}), others' "
                      f"busy cores {others:.2f} ({max(0, self.deadline - time.monotonic()):.0f} s of waiting left)",
                      flush=True)
                last_note = time.monotonic()
            time.sleep(5)


def load_label(g: dict) -> str:
    return f"{g['load'][0]:5.2f} {g['ours']:4.2f} {g['others']:5.2f}{'' if g['quiet'] else ' *'}"


def during_label(others: float) -> str:
    return f"{others:4.2f}{' !' if others > DISTURBED else ''}"


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    root: Path
    shards: Path
    inception: Path
    run: Path
    step: int


def prepare(root: Path, gate: Gate, val_count: int) -> Setup:
    t0 = time.perf_counter()
    shards, run_dir, inception = root / "shards", root / "run-a", root / "inception-standin.pth"
    run([sys.executable, SHARD, "write", "demo", "--out", str(shards), "--demo-count", "train=64",
         "--demo-count", f"val={val_count}", "--samples-per-shard", "16", "--quiet"], root / "shard.log")
    from pipeline.eval.standin import write_standin_inception

    write_standin_inception(inception)
    run([sys.executable, TRAIN, "--config", "pix2pix_demo", f"data.url={shards}", f"run.dir={run_dir}",
         "train.total_kimg=0.008", "checkpoint.every_kimg=0.008", "data.workers=0", "train.progress=false"],
        root / "train-a.log")
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "snapshots").glob("step-*"))
    if not steps:
        raise RuntimeError(f"the tiny run left no snapshot in {run_dir}")
    gate.busy_until_now(1.0, time.perf_counter() - t0)
    print(f"setup (shards, stand-in Inception, tiny pix2pix_demo run -> snapshot step {steps[-1]}): "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return Setup(root, shards, inception, run_dir, steps[-1])


# ----------------------------------------------------------------------------- (a) throughput


def eval_cmd(procs: int, run_dir: Path, step: int, inception: Path, samples: int, cache: Path) -> list[str]:
    args = [EVALUATE, "--run", str(run_dir), "--once", "--step", str(step), "--inception-weights", str(inception),
            "--max-samples", str(samples), "--reference-cache", str(cache)]
    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCEL_CPU2, "--num_processes",
            str(procs), "--main_process_port", str(free_port()), *args]


@dataclass
class EvalRun:
    procs: int
    cache: str
    round: int
    wall: float
    seconds: float
    cpu: float
    samples: int
    fid: float
    metrics: list[str]
    gate: dict
    others_during: float = 0.0


def cache_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def measure_eval(s: Setup, gate: Gate, procs: int, cache_kind: str, rnd: int, samples: int, warm: Path) -> EvalRun:
    shutil.rmtree(s.run / "eval", ignore_errors=True)
    cache = warm if cache_kind == "warm" else Path(tempfile.mkdtemp(prefix="refcache-cold-", dir=s.root))
    before = cache_files(cache)
    g = gate.wait(f"{procs}-process {cache_kind} evaluation")
    child = run(eval_cmd(procs, s.run, s.step, s.inception, samples, cache),
                s.root / f"eval-{procs}p-{cache_kind}-{rnd}.log")
    gate.busy_until_now(child.cpu / child.wall, child.wall)
    added = cache_files(cache) - before
    if bool(added) != (cache_kind == "cold"):  # a cold run stores the reference, a warm one only reads it
        raise RuntimeError(f"{cache_kind} evaluation added {sorted(added)} to the reference cache {cache}")
    if cache_kind == "cold" and not cache_files(warm):
        shutil.copytree(cache, warm, dirs_exist_ok=True)  # the warm cache: what the first cold run computed
    result = json.loads((s.run / "eval" / f"step-{s.step:08d}.json").read_text())
    if result["evaluators"] != procs or result["protocol"]["num_gen"] != samples:
        raise RuntimeError(f"unexpected result: {result['evaluators']} evaluators, "
                           f"{result['protocol']['num_gen']} samples")
    r = EvalRun(procs, cache_kind, rnd, child.wall, float(result["seconds"]), child.cpu, samples,
                result["metrics"]["fid"], sorted(k for k, v in result["metrics"].items() if v is not None), g,
                MACHINE.others(child.start, child.end, child.cpu))
    print(f"  {procs} proc {cache_kind:<4} round {rnd}: wall {r.wall:6.1f} s, result seconds {r.seconds:6.1f} s, "
          f"CPU {r.cpu:6.1f} s, {samples / r.seconds:5.2f} img/s   load/ours/others before {load_label(g)}, "
          f"others during {during_label(r.others_during)}", flush=True)
    return r


def part_a(s: Setup, gate: Gate, rounds: int, samples: int) -> list[EvalRun]:
    print(f"\n(a) evaluator throughput: {rounds} round(s) of 1/2 processes x cold/warm reference, "
          f"{samples} samples", flush=True)
    warm = s.root / "refcache-warm"
    order = [(1, "cold"), (1, "warm"), (2, "cold"), (2, "warm")]
    runs = []
    for rnd in range(rounds):
        k = rnd % len(order) if rnd else 0  # round 0 starts cold, so the warm cache exists before it is used
        for procs, kind in order[k:] + order[:k]:
            runs.append(measure_eval(s, gate, procs, kind, rnd, samples, warm))
    return runs


def report_a(runs: list[EvalRun], samples: int) -> None:
    print(f"\n(a) evaluator throughput, pix2pix_demo snapshot, {samples} validation samples (256x128), "
          f"OMP_NUM_THREADS=1 per process")
    print(f"{'procs':>5} {'reference':<9} {'n':>2} {'wall s':>7} {'result s':>9} {'start+':>7} {'img/s':>7} "
          f"{'img/s':>7} {'CPU s':>7} {'CPU s':>7} {'cores':>5}   before: load1 ours others | during: others")
    print(f"{'':>5} {'':<9} {'':>2} {'(proc)':>7} {'(JSON)':>9} {'write s':>7} {'(JSON)':>7} {'(wall)':>7} "
          f"{'(tree)':>7} {'/img':>7} {'':>5}   (each measurement; * under load, ! disturbed)")
    med: dict[tuple[int, str], dict[str, float]] = {}
    for procs in (1, 2):
        for kind in ("cold", "warm"):
            rs = [r for r in runs if (r.procs, r.cache) == (procs, kind)]
            wall, sec, cpu = (statistics.median(getattr(r, a) for r in rs) for a in ("wall", "seconds", "cpu"))
            med[procs, kind] = {"wall": wall, "seconds": sec, "cpu": cpu}
            loads = ";  ".join(f"{load_label(r.gate)} | {during_label(r.others_during)}" for r in rs)
            print(f"{procs:>5} {kind:<9} {len(rs):>2} {wall:>7.1f} {sec:>9.1f} {wall - sec:>7.1f} "
                  f"{samples / sec:>7.2f} {samples / wall:>7.2f} {cpu:>7.1f} {cpu / samples:>7.2f} "
                  f"{cpu / wall:>5.2f}   {loads}")
    print("  medians over rounds; cold = the real images' features computed too (2x the Inception passes), "
          "warm = cached.\n  'start+write' = process wall - result seconds: interpreter, imports, Inception "
          "load, process group, writing.")
    print("\nspeed-ups (same run):")
    for kind in ("cold", "warm"):
        a, b = med[1, kind], med[2, kind]
        print(f"  2 vs 1 process, {kind}: {a['seconds'] / b['seconds']:5.2f}x (result seconds)   "
              f"{a['wall'] / b['wall']:5.2f}x (process wall)   CPU s 2p/1p {b['cpu'] / a['cpu']:5.2f}")
    for procs in (1, 2):
        a, b = med[procs, "cold"], med[procs, "warm"]
        print(f"  warm vs cold reference, {procs} process(es): {a['seconds'] / b['seconds']:5.2f}x (result seconds)")
    bad = [r for r in runs if r.seconds > r.wall]
    print(f"cross-check: result 'seconds' < process wall in {len(runs) - len(bad)}/{len(runs)} measurements"
          + (f"  (VIOLATED: {[(r.procs, r.cache, r.round) for r in bad]})" if bad else ""))
    fids = [r.fid for r in runs]
    spread = (max(fids) - min(fids)) / max(1.0, abs(fids[0]))
    print(f"cross-check: FID {fids[0]:.6g} in every measurement (relative spread {spread:.1e}, 1 and 2 processes, "
          f"cold and warm); metrics computed: {', '.join(runs[0].metrics)}")


# ----------------------------------------------------------------------------- (b) interference


def read_schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one), summed over the process's live threads."""
    cpu = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                a, b, _ = f.read().split()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        cpu, wait = cpu + int(a), wait + int(b)
    return cpu, wait


class SchedSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = read_schedstat(self.pid)
            if s is None:
                break
            self.samples.append((time.time(), *s))
            self.stop.wait(self.period)

    def at(self, t: float) -> tuple[float, float]:
        """(cpu s, wait s) at time ``t``, interpolated between samples."""
        ts = [s[0] for s in self.samples]
        cpu = np.interp(t, ts, [s[1] for s in self.samples]) / 1e9
        wait = np.interp(t, ts, [s[2] for s in self.samples]) / 1e9
        return float(cpu), float(wait)


class EvaluatorLoop(threading.Thread):
    """Keeps one evaluator process busy on ``run_dir``: relaunched as soon as it finishes."""

    def __init__(self, cmd: list[str], run_dir: Path, logs: Path, tag: str):
        super().__init__(daemon=True)
        self.cmd, self.run_dir, self.logs, self.tag = cmd, run_dir, logs, tag
        self.children: list[Child] = []
        self.stop = threading.Event()
        self.error: str | None = None
        self.cpu_samples: list[tuple[float, float]] = []  # (time, evaluator CPU s so far, all launches)

    def run(self) -> None:
        i, done_cpu = 0, 0.0
        while not self.stop.is_set():
            shutil.rmtree(self.run_dir / "eval", ignore_errors=True)
            child = Child(self.cmd, self.logs / f"evalloop-{self.tag}-{i}.log")
            last = 0.0
            while not child.poll():
                sample = read_schedstat(child.pid)
                if sample is not None:
                    last = sample[0] / 1e9
                    self.cpu_samples.append((time.time(), done_cpu + last))
                if self.stop.wait(0.1):
                    child.kill()
            done_cpu += last
            self.children.append(child)
            i += 1
            if child.rc != 0 and not child.killed:
                self.error = f"evaluator exit {child.rc}\n{child.tail()}"
                return

    def coverage(self, t0: float, t1: float) -> float:
        """Fraction of [t0, t1] during which an evaluator process was alive."""
        covered = sum(max(0.0, min(c.end, t1) - max(c.start, t0)) for c in self.children)
        return covered / (t1 - t0)

    def cores(self, t0: float, t1: float) -> float:
        """Cores the evaluator kept busy during [t0, t1] (its schedstat, sampled every 0.1 s)."""
        ts, cpu = [s[0] for s in self.cpu_samples], [s[1] for s in self.cpu_samples]
        return float(np.interp(t1, ts, cpu) - np.interp(t0, ts, cpu)) / (t1 - t0)


@dataclass
class TrainRun:
    condition: str
    round: int
    step_sec: list[float]  # seconds per iteration, after warm-up
    window: dict[str, float]  # per iteration over the measured points: wall, cpu, wait, rest
    nvcsw: int
    nivcsw: int
    gate: dict
    evals_done: int = 0
    eval_coverage: float = 0.0
    eval_cores: float = 0.0
    others_during: float = 0.0


def train_cmd(shards: Path, run_dir: Path, iters: int) -> list[str]:
    return [sys.executable, TRAIN, "--config", "pix2pix_demo", f"data.url={shards}", f"run.dir={run_dir}",
            f"train.total_kimg={iters * BATCH / 1000:g}", "model.ngf=16", "model.ndf=16",
            f"train.batch_size={BATCH}", "data.workers=0", "train.progress=false", "train.log_every_kimg=0.004",
            "train.image_every_kimg=1000", "checkpoint.every_kimg=1000"]


def step_points(run_dir: Path) -> list[tuple[float, int, float]]:
    """``Timing/sec_per_kimg`` as (wall time, images seen, seconds per iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.train.stats import tensorboard_url

    acc = EventAccumulator(tensorboard_url(str(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.wall_time, e.step, e.value / 1000 * BATCH) for e in acc.Scalars("Timing/sec_per_kimg")]


def measure_train(s: Setup, gate: Gate, condition: str, rnd: int, iters: int, warmup: int,
                  eval_run: Path, samples: int) -> TrainRun:
    run_dir = s.root / f"train-b-{condition}-{rnd}"
    g = gate.wait(f"training {condition}")
    loop = None
    if condition == "beside evaluator":
        loop = EvaluatorLoop(eval_cmd(1, eval_run, s.step, s.inception, samples, s.root / "refcache-warm"),
                             eval_run, s.root, f"{rnd}")
        loop.start()
        time.sleep(1.0)  # the evaluator is already working when training starts
    child = Child(train_cmd(s.shards, run_dir, iters), s.root / f"train-b-{condition.split()[0]}-{rnd}.log")
    sampler = SchedSampler(child.pid)
    sampler.start()
    try:
        child.wait()
    finally:
        sampler.stop.set()
        if loop is not None:
            loop.stop.set()
            loop.join()
    eval_cpu = sum(c.cpu for c in loop.children) if loop is not None else 0.0
    gate.busy_until_now((child.cpu + eval_cpu) / child.wall, child.wall)
    child.check()
    if loop is not None and loop.error:
        raise RuntimeError(loop.error)
    points = step_points(run_dir)
    if len(points) <= warmup + 2:
        raise RuntimeError(f"only {len(points)} Timing/sec_per_kimg points in {run_dir}")
    if any(b[1] - a[1] != BATCH for a, b in zip(points, points[1:])):
        raise RuntimeError("Timing/sec_per_kimg points are not one per iteration")
    measured = points[warmup:]
    t0, t1 = points[warmup - 1][0], points[-1][0]  # from the end of the last warm-up iteration
    (c0, w0), (c1, w1) = sampler.at(t0), sampler.at(t1)
    n = len(measured)
    wall, cpu, wait = (t1 - t0) / n, (c1 - c0) / n, (w1 - w0) / n
    r = TrainRun(condition, rnd, [p[2] for p in measured],
                 {"wall": wall, "cpu": cpu, "wait": wait, "rest": wall - cpu - wait},
                 child.rusage.ru_nvcsw, child.rusage.ru_nivcsw, g)
    if loop is not None:
        r.evals_done = sum(c.rc == 0 for c in loop.children)
        r.eval_coverage = loop.coverage(t0, t1)
        r.eval_cores = loop.cores(t0, t1)
    r.others_during = MACHINE.others(t0, t1, (c1 - c0) + r.eval_cores * (t1 - t0))
    print(f"  {condition:<16} round {rnd}: median {statistics.median(r.step_sec):.3f} s/iter over {n} iterations"
          + (f", evaluator {r.eval_cores:.2f} cores" if loop else "")
          + f"   load/ours/others before {load_label(g)}, others during {during_label(r.others_during)}", flush=True)
    return r


def part_b(s: Setup, gate: Gate, rounds: int, iters: int, warmup: int, samples: int) -> list[TrainRun]:
    print(f"\n(b) training step time alone / beside an evaluator: {rounds} round(s) x {iters} iterations", flush=True)
    eval_run = s.root / "run-b-eval"
    shutil.copytree(s.run, eval_run, ignore=shutil.ignore_patterns("eval"))
    conditions = ["alone", "beside evaluator"]
    runs = []
    for rnd in range(rounds):
        for cond in (conditions if rnd % 2 == 0 else conditions[::-1]):  # ABBA
            runs.append(measure_train(s, gate, cond, rnd, iters, warmup, eval_run, samples))
    return runs


def pooled(runs: list[TrainRun]) -> dict[str, float]:
    v = [x for r in runs for x in r.step_sec]
    win = {k: statistics.mean(r.window[k] for r in runs) for k in ("wall", "cpu", "wait", "rest")}
    return {"median": statistics.median(v), "p90": float(np.percentile(v, 90)), "max": max(v), "n": len(v), **win}


def compare(runs: list[TrainRun], title: str) -> None:
    print(f"\n{title}:")
    p = {cond: pooled([r for r in runs if r.condition == cond]) for cond in ("alone", "beside evaluator")}
    for cond, q in p.items():
        print(f"  {cond:<17} median {q['median']:.3f}  p90 {q['p90']:.3f}  max {q['max']:.3f} s/iter ({q['n']} "
              f"iterations);  per iteration: on-CPU {q['cpu']:.3f}, runqueue wait {q['wait']:.3f}, "
              f"rest {q['rest']:+.3f} s")
    a, b = p["alone"], p["beside evaluator"]
    print(f"  slowdown beside an evaluator: median {b['median'] / a['median']:.2f}x  p90 {b['p90'] / a['p90']:.2f}x  "
          f"max {b['max'] / a['max']:.2f}x")
    print(f"  where the extra {1000 * (b['wall'] - a['wall']):+.1f} ms per iteration went: runqueue wait "
          f"{1000 * (b['wait'] - a['wait']):+.1f} ms, on-CPU {1000 * (b['cpu'] - a['cpu']):+.1f} ms "
          f"({b['cpu'] / a['cpu'] - 1:+.1%} CPU time for the same work), blocked/sleeping "
          f"{1000 * (b['rest'] - a['rest']):+.1f} ms")


def report_b(runs: list[TrainRun], iters: int, warmup: int) -> None:
    print(f"\n(b) pix2pix_demo training step time (ngf/ndf 16, batch {BATCH}, 1 process, data.workers=0, "
          f"OMP_NUM_THREADS=1), {iters} iterations, first {warmup} dropped;")
    print("    s/iteration from TensorBoard Timing/sec_per_kimg; window columns: per iteration over the same "
          "iterations, from /proc schedstat")
    print(f"{'condition':<17} {'rnd':>3} {'n':>3} {'median':>6} {'p90':>6} {'max':>6}  {'wall':>6} {'on-CPU':>6} "
          f"{'runq':>6} {'rest':>6}  {'vol.cs':>6} {'invol.cs':>8}  {'eval':>5} {'eval':>5}   before: load1 ours "
          f"others | during: others")
    print(f"{'':<17} {'':>3} {'':>3} {'s':>6} {'s':>6} {'s':>6}  {'s':>6} {'s':>6} {'wait s':>6} {'s':>6}  "
          f"{'':>6} {'':>8}  {'alive':>5} {'cores':>5}")
    for r in runs:
        v, w = r.step_sec, r.window
        ev = f"{r.eval_coverage:>5.0%} {r.eval_cores:>5.2f}" if r.condition != "alone" else f"{'-':>5} {'-':>5}"
        print(f"{r.condition:<17} {r.round:>3} {len(v):>3} {statistics.median(v):>6.3f} {np.percentile(v, 90):>6.3f} "
              f"{max(v):>6.3f}  {w['wall']:>6.3f} {w['cpu']:>6.3f} {w['wait']:>6.3f} {w['rest']:>+6.3f}  "
              f"{r.nvcsw:>6} {r.nivcsw:>8}  {ev}   {load_label(r.gate)} | {during_label(r.others_during)}")
    print("  wall = on-CPU + runqueue wait (runnable, waiting for a core) + rest (blocked or sleeping); rest is "
          "the difference,\n  so a few ms either side of 0 are sampling error (schedstat read every 0.1 s). "
          "'eval alive' / 'eval cores': share of the\n  iterations' time an evaluator process was running, and "
          "the cores it kept busy then. 'during: others' = the machine's\n  busy cores over the iterations less "
          f"the training's and the evaluator's; ! above {DISTURBED} (another session's work).")
    compare(runs, "pooled over rounds")
    clean = [r for r in runs if r.others_during <= DISTURBED]
    if len(clean) < len(runs) and {r.condition for r in clean} == {"alone", "beside evaluator"}:
        compare(clean, f"pooled over the rounds nobody else disturbed (others during <= {DISTURBED} cores)")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds-a", type=int, default=2, help="rounds of the four throughput measurements")
    p.add_argument("--samples", type=int, default=64, help="validation samples per evaluation (--max-samples)")
    p.add_argument("--rounds-b", type=int, default=2, help="rounds of alone / beside-evaluator training")
    p.add_argument("--iters", type=int, default=60, help="training iterations per run in (b)")
    p.add_argument("--warmup", type=int, default=5, help="Timing points dropped at the start of each run")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds, in all, to wait for a quiet machine")
    p.add_argument("--quick", action="store_true", help="1 round each, 32 samples, 40 iterations, wait <= 60 s")
    p.add_argument("--only", choices=("a", "b"), help="run one part")
    p.add_argument("--keep", type=Path, help="work here and keep everything (default: a temp dir)")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first point includes the start-up)")
    if args.quick:
        args.rounds_a, args.rounds_b, args.samples, args.iters = 1, 1, 32, 40
        args.max_wait = min(args.max_wait, 60.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = os.getloadavg()
    start = time.perf_counter()
    import torch

    print("evaluation throughput benchmark (bench/eval_throughput.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}   "
          f"torch {torch.__version__}   python {platform.python_version()}")
    print(f"every child: OMP_NUM_THREADS=1; quiet = 1-minute load average minus our own decaying share < "
          f"{QUIET_LOAD:g} and others' busy cores < {QUIET_OTHERS:g}; waiting up to {args.max_wait:.0f} s in all")
    print("'load1 ours others' at each measurement: 1-minute load average, our own previous work's estimated share "
          "of it, others' busy cores over 3 s; * = taken under load", flush=True)
    gate = Gate(args.max_wait)
    MACHINE.start()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        s = prepare(root, gate, args.samples)
        runs_a = part_a(s, gate, args.rounds_a, args.samples) if args.only in (None, "a") else []
        if args.only == "b":  # (b)'s evaluator uses the warm reference: compute it once
            measure_eval(s, gate, 1, "cold", 0, args.samples, root / "refcache-warm")
        runs_b = part_b(s, gate, args.rounds_b, args.iters, args.warmup, args.samples) \
            if args.only in (None, "b") else []
        print("\n" + "=" * 100)
        if runs_a:
            report_a(runs_a, args.samples)
        if runs_b:
            print()
            report_b(runs_b, args.iters, args.warmup)
        measured = [r.gate for r in runs_a] + [r.gate for r in runs_b]
        loud = [g for g in measured if not g["quiet"]]
        if loud:
            worst = max(g["load"][0] for g in loud)
            print(f"\nNOTE: {len(loud)} of {len(measured)} measurements started under load (marked *; load "
                  f"average up to {worst:.2f} on {os.cpu_count()} cores): wall times and speed-ups are pessimistic.")
        during = [r.others_during for r in runs_a] + [r.others_during for r in runs_b]
        disturbed = [x for x in during if x > DISTURBED]
        print(f"others' work during the measurements: {len(disturbed)} of {len(during)} above {DISTURBED} cores"
              + (f" (up to {max(disturbed):.2f}; marked !)" if disturbed else "") + ".")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total "
              f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
