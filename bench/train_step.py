"""Training-step cost per family, and what the training loop adds to a step, measured in one run.

What runs. Demo shards (``launch/shard.py write demo``: 128 train + 16 val samples, 256x128) go to a
temp dir (or ``--shards`` reuses some). Every case runs in a fresh child process (this file with
``--child``), so peak RSS, allocator state and Accelerate's process state are that case's alone;
``train(cfg)`` runs in the plain child (world size 1, no launcher, fp32 on CPU). The cases:

- ``pix2pix loop`` / ``wgangp loop`` / ``dcgan-ns loop``: ``train(cfg)`` with the configs as shipped:
  ``pix2pix_demo`` (unet_128, ngf/ndf 32, 256x128, batch 4), ``wgangp_demo`` (64x64, batch 16,
  n_critic 5, gradient penalty), and the shipped DCGAN ``dcgan_folder64`` (non-saturating, n_critic
  1) moved onto the demo data at wgangp_demo's size, batch and logging cadence. Real stream, the
  shipped 1 DataLoader worker, glibc's default malloc: as a user runs them.
- ``pix2pix bare``: no loop. pix2pix's ``d_step``/``g_step``, ``backward``, the Adam steps and
  ``zero_grad`` called directly on 8 prepared batches held in memory (D frozen during G's backward
  as in the loop, so both compute the same gradients). The denominator of every overhead ratio.
- ``noop loop``: ``train()`` with a no-op family injected by patching
  ``pipeline.train.loop.get_family``: pix2pix's networks, optimizers, batch preparation and loss
  names, but every phase's loss is ``0 * sum(one element of each parameter)``. No network runs, yet
  every parameter gets a (zero) gradient, so the guard's grad norm, Adam and ``zero_grad`` touch
  all 11.2M parameters as in a real step (one scalar parameter would make them free and hide their
  cost). Fed by 8 collated batches held in memory (``make_stream`` and ``DataLoader`` patched in
  the child), or by the real stream with 0 workers (decoding in the process) or 1 (as shipped).

The loop's own work. In the in-memory noop child, right after every loop iteration, the same no-op
phases also run bare (own copies of the networks and optimizers: backward, Adam, zero_grad, no
loop), outside the loop's timed intervals. The median over iterations of (loop iteration - the bare
iteration next to it) is the loop's own per-iteration work: lr setting, the StepContext's
counters, batch bookkeeping and ``family.prepare``, loss scaling, ``requires_grad_`` toggles, the
engines' guard (a grad-norm pass, ``isfinite`` syncs, the any-rank flags), EMA, monitor bookkeeping. Pairing
neighbours cancels the machine's drift, which on a shared 2-core box is larger than the effect.
The same pairing with the real pix2pix step is a noisier cross-check (``--cross-check``). Data
fetching is timed directly: the CPU spent in the loop's batch iterator's ``next()`` (the
DataLoader is wrapped), and ``family.prepare``. Periodic work (scalar logs, image grids: the
monitor's ``_log_scalars`` and ``_log_images``; a checkpoint: last step to ``monitor.close``, the
final save) is timed per event and amortized at the shipped cadence. All are given as a fraction
of the bare pix2pix step; the target for the loop's own steady-state work is < 2 %.

How it is measured. ``torch.set_num_threads(1)`` and ``OMP_NUM_THREADS=1`` in every child. CPU time
is ``time.process_time()`` (all threads of the child), stamped at iteration boundaries by a
``Monitor`` subclass patched into ``pipeline.train.loop`` (when ``monitor.start`` and every
``monitor.step`` return: an interval is one whole iteration, from the checkpoint check through lr,
data, phases, guard and EMA to the monitor); the bare case times each iteration directly. Warm-up
iterations are dropped; iterations that wrote scalars or images are left out of the medians. Kernel
time and minor page faults (``getrusage``) are summed over the measured window. With glibc's
default malloc, freed gradient and activation memory goes back to the OS and is faulted in again
next iteration, by an amount that depends on the process's allocation history rather than on its
work: it moved the paired difference by up to 10 ms from one process to the next. So the
cases that measure the overhead run with ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` set
so that glibc keeps freed memory (``keep`` in the table); the bare pix2pix step also runs with
glibc's defaults to show what that churn costs (``--malloc glibc|keep`` forces one setting for
all). DataLoader workers are other processes: their CPU (psutil, over the measured window) and peak
RSS are reported apart. Cases run in ``--rounds`` rounds (rotated order; the 0/1-worker and glibc
cases, whose figures need no drift control, in the first round only); a case's value is the median
over all its measured iterations, with the spread of its per-round medians. Wall time is shown but
on a shared machine mostly measures the other users. Peak RSS is the child's ``ru_maxrss`` (startup
included).

    .venv/bin/python bench/train_step.py             # default: 2 rounds, ~3 min of CPU, < 6 min
    .venv/bin/python bench/train_step.py --cross-check   # + the paired real pix2pix loop, ~+1 min
    .venv/bin/python bench/train_step.py --quick     # 1 round, fewer iterations, < 2 min
    .venv/bin/python bench/train_step.py --profile noop-loop-mem   # cProfile (CPU): iterations, checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import itertools
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout

import torch  # noqa: E402

TARGET_LOOP_OVERHEAD = 0.02
RESULT_TAG = "RESULT "
IN_MEMORY_BATCHES = 8
# glibc: never give freed memory back to the OS, never mmap a tensor (malloc 'keep').
MALLOC_KEEP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 34), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}
# The shipped DCGAN (non-saturating, batch norm, Adam 2e-4/0.5) on wgangp_demo's data, batch and cadence.
DCGAN_ON_DEMO = ("data.workers=1", "data.load_size=128,64", "data.crop_size=64,64", "train.batch_size=16",
                 "train.precision=fp32", "train.log_every_kimg=0.1", "train.image_every_kimg=0.5",
                 "checkpoint.every_kimg=0.5")


@dataclass(frozen=True)
class CaseSpec:
    key: str
    label: str
    config: str
    kind: str  # "loop": train(cfg); "bare": the phases called directly
    family: str = "real"  # "real" or "noop"
    data: str = "stream"  # "stream" (the loop's own DataLoader) or "memory" (batches held in memory)
    overrides: tuple[str, ...] = ()
    paired: bool = False  # a bare iteration of the same family interleaved after every loop iteration
    malloc: str = "keep"  # "keep": glibc keeps freed memory (see the docstring); "glibc": its defaults
    light: float = 0.0  # a no-op case: this share of --light-iters measured iterations per round
    fewer_warmup: int = 0  # this many fewer warm-up iterations than --warmup (at least 1)
    once: bool = False  # in the first round only, with all its measured iterations there
    runs: str = "always"  # "always", "default" (not with --quick), "cross-check" (only with --cross-check)


CASES = [
    CaseSpec("p2p-bare", "pix2pix bare step (no loop)", "pix2pix_demo", "bare", data="memory"),
    CaseSpec("p2p-bare-glibc", "pix2pix bare step (no loop)", "pix2pix_demo", "bare", data="memory", malloc="glibc",
             runs="default", once=True),
    CaseSpec("noop-loop-mem", "noop loop, in-memory batches", "pix2pix_demo", "loop", "noop", "memory",
             paired=True, light=1.0),
    CaseSpec("noop-loop-w0", "noop loop, stream, 0 workers", "pix2pix_demo", "loop", "noop",
             overrides=("data.workers=0",), light=1.0, once=True),
    CaseSpec("noop-loop-w1", "noop loop, stream, 1 worker", "pix2pix_demo", "loop", "noop", light=1.0, once=True),
    CaseSpec("p2p-loop-mem", "pix2pix loop, in-memory batches", "pix2pix_demo", "loop", data="memory",
             paired=True, runs="cross-check"),
    CaseSpec("p2p-loop", "pix2pix loop (pix2pix_demo)", "pix2pix_demo", "loop", malloc="glibc"),
    CaseSpec("wgangp-loop", "wgangp loop (wgangp_demo)", "wgangp_demo", "loop", malloc="glibc",
             fewer_warmup=1),  # an iteration is 5 D steps and a G step
    CaseSpec("dcgan-loop", "dcgan-ns loop (dcgan_folder64 @64)", "dcgan_folder64", "loop", overrides=DCGAN_ON_DEMO,
             malloc="glibc"),
]
BY_KEY = {c.key: c for c in CASES}


# ============================================================================= the child: one case


def noop_loss(module: torch.nn.Module) -> torch.Tensor:
    """``0 * sum(p.flatten()[0] for every parameter)``: no network runs, every parameter still gets
    a (zero) gradient, so guard, Adam and ``zero_grad`` do their full per-parameter work."""
    return torch.stack([p.reshape(-1)[0] for p in module.parameters()]).sum() * 0.0


def noop_family():
    """pix2pix's networks, optimizers, streams, batch preparation and loss names; phases that
    skip the networks."""
    from pipeline.families import pix2pix

    def d_noop(ctx, b, scratch):
        zero = noop_loss(ctx.nets["D"])
        return {"loss": zero, "D_real": zero, "D_fake": zero}

    def g_noop(ctx, b, scratch):
        zero = noop_loss(ctx.nets["G"])
        return {"loss": zero, "G_GAN": zero, "G_L1": zero}

    base = pix2pix.FAMILY
    # The same phases (optimizers stepped, interval, repeats, batch reuse), with the networks taken out.
    return dataclasses.replace(base, name="noop", phases=lambda cfg: tuple(
        dataclasses.replace(p, fn=d_noop if p.steps == ("D",) else g_noop) for p in base.phases(cfg)))


def training_stream(cfg, family, info):
    """The family's one training stream (the in-memory cases stand in for exactly one)."""
    streams = family.streams(cfg, info, cfg.data.split)
    if len(streams) != 1:
        raise ValueError(f"{family.name}: in-memory batches stand in for one stream, not {len(streams)}")
    return streams[0]


def collect_batches(cfg, family, info, n: int) -> list[dict]:
    """``n`` collated training batches, read once from the real stream (in this process)."""
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment

    s = training_stream(cfg, family, info)
    stream = make_stream(cfg.data.url, s.split, train=True, seed=cfg.run.seed, fields=s.fields,
                         augment=Augment(cfg.data.load_size, cfg.data.crop_size, cfg.data.flip),
                         shuffle_buffer=cfg.data.shuffle_buffer, shuffle_buffer_mb=cfg.data.shuffle_buffer_mb,
                         batch_size=cfg.train.batch_size)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
    return list(itertools.islice(loader, n))


class InMemoryBatches:
    """Stands in for the loop's ``DataLoader(make_stream(...))``: cycles over collated batches."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return itertools.cycle(self.batches)


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size of this process (``ru_maxrss``) or of a live one (VmHWM), in MB."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Record:
    """What one child reports; lists have one entry per measured iteration."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    periodic: list[bool] = field(default_factory=list)  # scalars or images were written in it
    fetch: list[float] = field(default_factory=list)  # CPU in the DataLoader iterator's next()
    prepare: list[float] = field(default_factory=list)  # CPU in family.prepare
    paired: list[float] = field(default_factory=list)  # CPU of the interleaved bare iteration
    log_cpu: list[float] = field(default_factory=list)
    image_cpu: list[float] = field(default_factory=list)
    sys_per_iter: float = 0.0  # kernel part of the CPU time over the window (mostly page faults)
    faults_per_iter: float = 0.0  # minor page faults
    ckpt_cpu: float | None = None
    startup_cpu: float | None = None
    worker_cpu_per_iter: float | None = None
    worker_peak_rss_mb: float | None = None
    peak_rss_mb: float = 0.0
    threads: int = 0

    def open_window(self) -> None:
        self._usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def close_window(self, n: int) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.sys_per_iter = (usage.ru_stime - self._usage0.ru_stime) / n
        self.faults_per_iter = (usage.ru_minflt - self._usage0.ru_minflt) / n
        self.threads = torch.get_num_threads()


def cpu_profiler() -> cProfile.Profile:
    return cProfile.Profile(time.process_time)  # CPU time, as everything here: wall is other users' load


@dataclass
class Profilers:
    iterations: cProfile.Profile = field(default_factory=cpu_profiler)
    checkpoint: cProfile.Profile = field(default_factory=cpu_profiler)


@dataclass
class Meter:
    """CPU spent inside the timed seams since the last iteration boundary."""

    fetch: float = 0.0
    prepare: float = 0.0


class TimedIterator:
    """The loop's batch iterator, with the CPU of every ``next()`` added to ``meter.fetch``."""

    def __init__(self, iterable, meter: Meter):
        self.it, self.meter = iter(iterable), meter  # eager, like iter(DataLoader): workers start now

    def __iter__(self):
        return self

    def __next__(self):
        c0 = time.process_time()
        try:
            return next(self.it)
        finally:
            self.meter.fetch += time.process_time() - c0


def timed_prepare(family, meter: Meter):
    """The family with its ``prepare`` timed into ``meter.prepare``."""

    def prepare(*args):
        c0 = time.process_time()
        try:
            return family.prepare(*args)
        finally:
            meter.prepare += time.process_time() - c0

    return dataclasses.replace(family, prepare=prepare)


class BareRunner:
    """The family's phases, ``backward``, the Adam steps and ``zero_grad`` called directly, on
    prepared batches held in memory; no loop. Networks and optimizers (the loop's Adam) of its own."""

    def __init__(self, cfg, family, info):
        from pipeline.train.family import StepContext
        from pipeline.train.loop import adam_kwargs

        cpu = torch.device("cpu")
        name = training_stream(cfg, family, info).name
        self.batches = [family.prepare({name: b}, cpu, cfg, info)
                        for b in collect_batches(cfg, family, info, IN_MEMORY_BATCHES)]
        torch.manual_seed(cfg.run.seed)
        self.nets = family.build(cfg, info)
        self.opt, self.owned = {}, {}
        for spec in family.optimizers(cfg):
            self.opt[spec.name] = torch.optim.Adam(spec.param_groups(self.nets), lr=spec.lr, betas=spec.betas,
                                                   **adam_kwargs(cfg.optim.adam))
            self.owned[spec.name] = spec.nets
        self.ctx = StepContext(nets=self.nets, plain=self.nets, cfg=cfg, info=info, reuse_fake=True)
        self.phases, self.source = family.phases(cfg), itertools.cycle(self.batches)

    def iteration(self) -> None:
        b = None
        for phase in self.phases:
            trainable = {n for step in phase.steps for n in self.owned[step]} | set(phase.trainable)
            for _ in range(phase.repeats):
                if phase.fetch or b is None:
                    b, scratch = next(self.source), {}
                for name, net in self.nets.items():  # as in the loop: no gradient reaches what the phase does not step
                    net.requires_grad_(name in trainable)
                phase.fn(self.ctx, b, scratch)["loss"].backward()
                for net in self.nets.values():
                    net.requires_grad_(True)
                for step in phase.steps:
                    self.opt[step].step()
                    self.opt[step].zero_grad(set_to_none=True)


def timed_monitor(base, rec: Record, meter: Meter, warmup: int, measure: int, prof: Profilers | None,
                  pair: BareRunner | None):
    """A ``Monitor`` that stamps CPU and wall time at every iteration boundary (see the docstring),
    and runs one interleaved bare iteration there when ``pair`` is given (outside the loop's intervals)."""
    import psutil

    def children_cpu() -> tuple[float, list]:
        kids = psutil.Process().children(recursive=True)
        return sum(sum(k.cpu_times()[:2]) for k in kids), kids

    class TimedMonitor(base):
        def start(self, nimg, total_nimg):
            super().start(nimg, total_nimg)
            self.iteration, self.events = 0, 0
            meter.fetch = meter.prepare = 0.0
            self.last = (time.process_time(), time.perf_counter())
            rec.startup_cpu = self.last[0]  # made relative to train()'s entry by run_loop

        def _log_scalars(self, *args):
            self.events += 1
            c0 = time.process_time()
            super()._log_scalars(*args)
            if self.iteration >= warmup:
                rec.log_cpu.append(time.process_time() - c0)

        def _log_images(self, *args):
            self.events += 1
            c0 = time.process_time()
            super()._log_images(*args)
            if self.iteration >= warmup:
                rec.image_cpu.append(time.process_time() - c0)

        def step(self, *args):
            super().step(*args)
            now = (time.process_time(), time.perf_counter())
            self.iteration += 1
            measured = self.iteration > warmup
            if measured:
                rec.cpu.append(now[0] - self.last[0])
                rec.wall.append(now[1] - self.last[1])
                rec.periodic.append(self.events > 0)
                rec.fetch.append(meter.fetch)
                rec.prepare.append(meter.prepare)
            self.events, meter.fetch, meter.prepare = 0, 0.0, 0.0
            if self.iteration == warmup:
                self.worker0 = children_cpu()[0]
                rec.open_window()
                if prof:
                    prof.iterations.enable()
            if self.iteration == warmup + measure:
                if prof:
                    prof.iterations.disable()
                rec.close_window(measure)
                worker1, kids = children_cpu()
                if kids:
                    rec.worker_cpu_per_iter = (worker1 - self.worker0) / measure
                    rec.worker_peak_rss_mb = max(peak_rss_mb(k.pid) for k in kids)
                if prof:
                    prof.checkpoint.enable()
            if pair is not None:
                c0 = time.process_time()
                pair.iteration()
                if measured:
                    rec.paired.append(time.process_time() - c0)
            self.last = (time.process_time(), time.perf_counter())  # stamping and pair are not timed

        def close(self, state):
            rec.ckpt_cpu = time.process_time() - self.last[0]  # the final checkpoint save
            if prof:
                prof.checkpoint.disable()
            super().close(state)

    return TimedMonitor


def run_loop(spec: CaseSpec, cfg, family, info, rec: Record, warmup: int, measure: int, prof) -> None:
    import pipeline.train.loop as loop

    meter = Meter()
    pair = BareRunner(cfg, family, info) if spec.paired and not prof else None
    monitor = timed_monitor(loop.Monitor, rec, meter, warmup, measure, prof, pair)
    timed = timed_prepare(family, meter)
    source = InMemoryBatches(collect_batches(cfg, family, info, IN_MEMORY_BATCHES)) if spec.data == "memory" else None
    real_loader = torch.utils.data.DataLoader

    class Loader(real_loader):  # a class: Accelerate checks isinstance(obj, DataLoader)
        def __new__(cls, dataset, **kwargs):
            return TimedIterator(dataset if dataset is source else real_loader(dataset, **kwargs), meter)

    patches = [mock.patch.object(loop, "Monitor", monitor), mock.patch.object(loop, "get_family", lambda name: timed),
               mock.patch.object(torch.utils.data, "DataLoader", Loader)]
    if source is not None:
        patches.append(mock.patch.object(loop, "make_stream", lambda *a, **k: source))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        c0 = time.process_time()
        code = loop.train(cfg)
    rec.startup_cpu -= c0
    if code != 0 or len(rec.cpu) != measure:
        raise SystemExit(f"{spec.key}: train() returned {code} after {len(rec.cpu)} measured iterations "
                         f"(expected {measure})")


def run_bare(cfg, family, info, rec: Record, warmup: int, measure: int, prof) -> None:
    runner = BareRunner(cfg, family, info)
    for i in range(warmup + measure):
        if i == warmup:
            rec.open_window()
            if prof:
                prof.iterations.enable()
        c0, w0 = time.process_time(), time.perf_counter()
        runner.iteration()
        if i >= warmup:
            rec.cpu.append(time.process_time() - c0)
            rec.wall.append(time.perf_counter() - w0)
            rec.periodic.append(False)
    if prof:
        prof.iterations.disable()
    rec.close_window(measure)


def child(args) -> int:
    torch.set_num_threads(1)
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.families import get_family
    from pipeline.train.family import DataInfo

    spec = BY_KEY[args.child]
    batch = load_config(spec.config, list(spec.overrides)).train.batch_size
    total_kimg = (args.warmup + args.measure) * batch / 1000
    cfg = load_config(spec.config, [f"data.url={args.shards}", *spec.overrides, f"run.dir={args.run_dir}",
                                    f"train.total_kimg={total_kimg!r}", "train.progress=false"])
    manifest = load_manifest(cfg.data.url)
    info = DataInfo.of(manifest)
    family = noop_family() if spec.family == "noop" else get_family(cfg.model.family)
    rec = Record()
    prof = Profilers() if args.profile else None
    if spec.kind == "loop":
        run_loop(spec, cfg, family, info, rec, args.warmup, args.measure, prof)
    else:
        run_bare(cfg, family, info, rec, args.warmup, args.measure, prof)
    rec.peak_rss_mb = peak_rss_mb()
    if prof:
        print(f"cProfile of the {args.measure} measured iterations of '{spec.label}'")
        stats = pstats.Stats(prof.iterations).strip_dirs()
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        if spec.kind == "loop":
            print(f"cProfile of the final checkpoint save of '{spec.label}'")
            stats = pstats.Stats(prof.checkpoint).strip_dirs()
            stats.sort_stats("cumulative").print_stats("checkpoint|io.py|loop.py", 20)
            stats.sort_stats("tottime").print_stats(12)
    per = cfg.train.batch_size
    cadence = {"log": cfg.train.log_every_kimg * 1000 / per, "image": cfg.train.image_every_kimg * 1000 / per,
               "ckpt": cfg.checkpoint.every_kimg * 1000 / per}  # iterations between events
    fields = {k: v for k, v in rec.__dict__.items() if not k.startswith("_")}
    print(RESULT_TAG + json.dumps({"key": spec.key, "batch": per, "cadence": cadence, **fields}), flush=True)
    return 0


# ============================================================================= the parent: rounds and report


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95 % confidence interval of the median (order statistics)."""
    v, n = sorted(values), len(values)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return v[lo], v[hi]


@dataclass
class Result:
    spec: CaseSpec
    rounds: list[dict] = field(default_factory=list)

    def steady(self, name: str, rnd: dict | None = None) -> list[float]:
        """Measured iterations without scalar/image writing, of one round or of all."""
        return [v for r in ([rnd] if rnd else self.rounds) for v, p in zip(r[name], r["periodic"]) if not p]

    def med(self, name: str = "cpu") -> float | None:
        values = self.steady(name)
        return statistics.median(values) if values else None

    def differences(self) -> list[float]:
        """Loop iteration minus the bare iteration interleaved right after it."""
        return [c - b for c, b in zip(self.steady("cpu"), self.steady("paired"))]

    def mean_of(self, name: str) -> float | None:
        values = [r[name] for r in self.rounds if r[name] is not None]
        return statistics.mean(values) if values else None

    def round_spread(self) -> float:
        meds = [statistics.median(self.steady("cpu", r)) for r in self.rounds]
        return (max(meds) - min(meds)) / statistics.median(meds)

    def iqr(self, name: str = "cpu") -> float:
        values = self.steady(name)
        if len(values) < 2:
            return 0.0
        q = statistics.quantiles(values, n=4)
        return (q[2] - q[0]) / statistics.median(values)


def run_child(spec: CaseSpec, args, shards: Path, workdir: Path, tag: str) -> dict:
    warmup, measure = iterations(spec, args)
    cmd = [sys.executable, __file__, "--child", spec.key, "--shards", str(shards), "--warmup", str(warmup),
           "--measure", str(measure), "--run-dir", str(workdir / f"run-{spec.key}-{tag}")]
    if args.profile:
        cmd += ["--profile", spec.key]
    keep = (args.malloc == "per-case" and spec.malloc == "keep") or args.malloc == "keep"
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEEP}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(MALLOC_KEEP if keep else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if r.returncode != 0 or not lines:
        sys.stderr.write(f"--- {spec.key} failed (exit {r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}\n")
        raise SystemExit(1)
    if args.profile:
        print("\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith(RESULT_TAG)))
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "malloc": "keep" if keep else "glibc"}


def write_shards(out: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", "demo", "--out", str(out),
                    "--samples-per-shard", "64", "--demo-count", "train=128", "--demo-count", "val=16", "--quiet"],
                   check=True, capture_output=True, text=True)
    return out


def iterations(spec: CaseSpec, args) -> tuple[int, int]:
    """(warm-up, measured) iterations of one child."""
    if spec.light:
        return 3, max(2, round(spec.light * args.light_iters))
    return max(1, args.warmup - spec.fewer_warmup), args.measure if spec.once else math.ceil(args.measure / args.rounds)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def report(results: dict[str, Result]) -> None:
    print(f"\n{'case':<36} {'malloc':<6} {'iters':>5} {'CPU':>7} {'IQR':>4} {'rounds':>6} {'wall':>7} {'sys':>5} "
          f"{'faults':>6} {'fetch':>5} {'prep':>4} {'worker':>6} {'start':>5} {'peak RSS MB':>11}")
    print(f"{'':<36} {'':<6} {'':>5} {'ms/it':>7} {'CPU':>4} {'spread':>6} {'ms/it':>7} {'ms/it':>5} {'/it':>6} "
          f"{'ms/it':>5} {'ms/it':>4} {'ms/it':>6} {'CPU s':>5} {'main/worker':>11}")
    for res in results.values():
        loop = res.spec.kind == "loop"
        startup, wrss = res.mean_of("startup_cpu"), res.mean_of("worker_peak_rss_mb")
        print(f"{res.spec.label:<36} {res.rounds[0]['malloc']:<6} {len(res.steady('cpu')):>5} {ms(res.med()):>7} "
              f"{res.iqr():>4.0%} "
              f"{res.round_spread():>6.1%} {ms(res.med('wall')):>7} {ms(res.mean_of('sys_per_iter')):>5} "
              f"{res.mean_of('faults_per_iter'):>6.0f} {ms(res.med('fetch')) if loop else '-':>5} "
              f"{ms(res.med('prepare')) if loop else '-':>4} {ms(res.mean_of('worker_cpu_per_iter')):>6} "
              f"{'-' if startup is None else f'{startup:.1f}':>5} {max(r['peak_rss_mb'] for r in res.rounds):>5.0f}/"
              f"{'-' if wrss is None else f'{wrss:.0f}'}")
        if res.spec.paired:
            print(f"{'  interleaved bare, same child':<36} {'':<6} {len(res.steady('paired')):>5} "
                  f"{ms(res.med('paired')):>7} {res.iqr('paired'):>4.0%}")
    threads = sorted({r["threads"] for res in results.values() for r in res.rounds})
    print(f"CPU, wall, fetch, prep: medians over all rounds' measured iterations (scalar/image ones left out); "
          f"sys, faults, worker: means over the window; torch threads in the children: {threads}")

    print("\nper family, shipped configs, real stream, 1 worker (CPU of the training process; the worker's apart):")
    for key in ("p2p-loop", "wgangp-loop", "dcgan-loop"):
        if key in results:
            res = results[key]
            batch = res.rounds[0]["batch"]
            print(f"  {res.spec.label:<36} {res.med():6.3f} s/iter  {1000 * res.med() / batch:6.1f} ms/image "
                  f"(batch {batch:>2})   wall {res.med('wall'):.3f} s/iter   worker "
                  f"+{ms(res.mean_of('worker_cpu_per_iter'))} ms/iter")
    if {"p2p-bare", "noop-loop-mem", "noop-loop-w0", "noop-loop-w1"} <= results.keys():
        overhead(results)


def overhead(results: dict[str, Result]) -> None:
    den = results["p2p-bare"].med()

    def line(label: str, seconds: float | None, note: str = "") -> None:
        if seconds is not None:
            print(f"  {label:<66}{1000 * seconds:7.2f} ms {seconds / den:6.2%}{note}")

    print(f"\nloop overhead, as a fraction of the bare pix2pix step ({ms(den)} ms CPU/iter, malloc "
          f"{results['p2p-bare'].rounds[0]['malloc']}):")
    noop = results["noop-loop-mem"]
    diffs = noop.differences()
    own = statistics.median(diffs)
    lo, hi = median_ci(diffs)
    verdict = "OK" if own < TARGET_LOOP_OVERHEAD * den else "ABOVE"
    line(f"loop's own work: median of {len(diffs)} (noop loop - interleaved noop bare)", own,
         f"  target < {TARGET_LOOP_OVERHEAD:.0%}: {verdict}")
    print(f"  {'':<4}95% CI {ms(lo)} .. {ms(hi)} ms; noop loop {ms(noop.med())} ms, interleaved noop bare "
          f"{ms(noop.med('paired'))} ms; includes family.prepare (one-hot labels) {ms(noop.med('prepare'))} ms")
    print("  data fetch, CPU inside the loader's next() in the training process (timed in the loop):")
    line("  in-memory batches (the noop loop above)", noop.med("fetch"))
    line("  stream, 0 workers: read + decode + augment + collate, all here", results["noop-loop-w0"].med("fetch"))
    w1 = results["noop-loop-w1"]
    shipped = results.get("p2p-loop")
    line("  stream, 1 worker (shipped): receiving the batch", w1.med("fetch"),
         f"   (in the pix2pix loop: {ms(shipped.med('fetch'))} ms)" if shipped else "")
    line("    ... plus the worker process's CPU, on another core", w1.mean_of("worker_cpu_per_iter"))
    loops = [r for r in results.values() if r.spec.config == "pix2pix_demo" and r.spec.kind == "loop"]
    cad = noop.rounds[0]["cadence"]
    periodic = 0.0
    print("  periodic work, timed per event, amortized at pix2pix_demo's cadence:")
    for name, what, every in (("log_cpu", "scalar log", cad["log"]), ("image_cpu", "image grid", cad["image"])):
        events = [v for res in loops for r in res.rounds for v in r[name]]
        if events:
            cost = statistics.median(events)
            periodic += cost / every
            line(f"  {what}: {ms(cost)} ms each (n={len(events)}), every {every:g} iterations", cost / every)
        else:
            print(f"    {what}: no event in the measured windows (every {every:g} iterations)")
    ckpts = [r["ckpt_cpu"] for res in loops for r in res.rounds]
    cost = statistics.median(ckpts)
    periodic += cost / cad["ckpt"]
    line(f"  checkpoint save: {cost:.2f} s each (n={len(ckpts)}), every {cad['ckpt']:g} iterations",
         cost / cad["ckpt"])
    line("total beyond the bare step: own work + 1-worker fetch + periodic", own + w1.med("fetch") + periodic)
    if "p2p-loop-mem" in results:
        res = results["p2p-loop-mem"]
        lo, hi = median_ci(res.differences())
        line(f"cross-check: median of {len(res.differences())} (pix2pix loop - interleaved pix2pix bare)",
             statistics.median(res.differences()), f"   95% CI {ms(lo)} .. {ms(hi)} ms")
    if "p2p-bare-glibc" in results:
        glibc = results["p2p-bare-glibc"]
        print("  not the loop: glibc's default malloc gives freed memory back to the OS and faults it in again:")
        line("  pix2pix bare, kernel time per iteration, glibc defaults - memory kept",
             glibc.mean_of("sys_per_iter") - results["p2p-bare"].mean_of("sys_per_iter"),
             f"   (CPU medians: {ms(glibc.med())} vs {ms(den)} ms)")


def header(args, start_load) -> None:
    import accelerate

    print("training-step benchmark (bench/train_step.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}")
    print(f"torch {torch.__version__}   accelerate {accelerate.__version__}   python {platform.python_version()}   "
          f"{platform.machine()}   glibc {platform.libc_ver()[1]}   --malloc {args.malloc}")
    print(f"each case in a fresh child process, torch.set_num_threads(1), world size 1, fp32 on CPU; "
          f"{args.rounds} round(s) x ({args.warmup} warm-up + {math.ceil(args.measure / args.rounds)} measured "
          f"iterations; wgangp 1 warm-up fewer); no-op cases 3 + {args.light_iters}; 0/1-worker and glibc "
          f"cases in round 1 only, with all their iterations")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, help="reuse these demo shards (default: write them to a temp dir)")
    p.add_argument("--rounds", type=int, default=2, help="every case runs once per round, order rotated")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per round (compute cases)")
    p.add_argument("--measure", type=int, default=10, help="measured iterations over all rounds (compute cases)")
    p.add_argument("--light-iters", type=int, default=60, help="measured iterations per round of no-op cases")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 2 warm-up + 3 measured, fewer no-op iterations, no glibc case (< 2 min)")
    p.add_argument("--cross-check", action="store_true", help="also pair the real pix2pix loop with the bare "
                   "step in one child (a noisy check of the no-op method; +1 min)")
    p.add_argument("--malloc", choices=("per-case", "glibc", "keep"), default="per-case",
                   help="glibc malloc settings of the children: as listed per case (default), or one for all")
    p.add_argument("--profile", choices=list(BY_KEY), help="instead of the table, cProfile one case's measured "
                   "iterations (and its final checkpoint)")
    p.add_argument("--only", type=lambda text: text.split(","), help="comma-separated case keys to run "
                   f"(some of: {', '.join(BY_KEY)}); the overhead section needs p2p-bare and the noop cases")
    p.add_argument("--child", choices=list(BY_KEY), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.measure, args.light_iters = 1, 2, 3, 20
    if args.warmup < 1 or args.measure < 1 or args.rounds < 1:
        p.error("--warmup, --measure and --rounds must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    start_load = os.getloadavg()  # before this benchmark adds its own busy core
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shards = args.shards or write_shards(Path(tmp) / "shards")
        if args.profile:
            run_child(BY_KEY[args.profile], args, shards, Path(tmp), "profile")
            return 0
        header(args, start_load)
        print(f"shards: {shards} (setup {time.perf_counter() - start:.1f} s)")
        wanted = {"always", "cross-check" if args.cross_check else "always", "always" if args.quick else "default"}
        cases = [c for c in CASES if c.key in args.only] if args.only else [c for c in CASES if c.runs in wanted]
        results = {c.key: Result(c) for c in cases}
        for r in range(args.rounds):
            k = r % len(cases)
            for spec in [c for c in cases[k:] + cases[:k] if r == 0 or not c.once]:
                t0 = time.perf_counter()
                results[spec.key].rounds.append(run_child(spec, args, shards, Path(tmp), str(r)))
                print(f"  round {r + 1}: {spec.label:<36} {time.perf_counter() - t0:5.1f} s wall", flush=True)
        report(results)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
