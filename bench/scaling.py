"""pix2pixHD data-parallel scaling on this machine: 1 process against 2 (gloo) at the same global batch.

What runs. The workload of ``bench/pix2pixhd_step.py`` (its ``OVERRIDES`` config: 256x128, ngf/ndf
32, global G, num_D 2, fp32; its ``build_nets`` and ``make_batch``) as its ``Ours`` runner drives
it: the loop's own ``run_iteration`` over the family's phases (G, then D), except that the engines
are made as ``loop.train`` makes them, by ``dist.make_engine`` with ``dist.make_accelerator``, so
with 2 processes every network is DDP-wrapped (``broadcast_buffers=False``) and joins a gloo group.
A fixed in-memory batch, no data loading. Global batch 2 in both runs:

- ``1 process``: batch per device 2 (samples ``make_batch(0)`` and ``make_batch(1)``);
- ``2 processes``: ``accelerate launch`` with ``launch/accelerate/cpu_2proc.yaml`` (torchrun,
  gloo), batch per device 1 (rank r trains on ``make_batch(r)``).

Every process: ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``, ``--warmup`` warm-up then
``--measure`` measured iterations, each timed with ``time.process_time()`` (the whole process's
CPU time, gloo's threads included) and wall time. Medians pool iterations and ranks.

The all-reduce share. In the 2-process run the iterations alternate (A B B A ...) between the
normal step and the same step with the engines' ``sync_context(False)`` (DDP ``no_sync()``: no
gradient all-reduce; ``run_iteration`` asks for sync on every micro-batch when there is no
accumulation, so the wrapped engines override the flag). Everything else, the ranks' two small
``agree`` all-reduces per iteration included, stays; the difference of the medians is the cost of
gradient all-reduce, as CPU and as wall time. The ranks' weights drift apart without sync, which
does not change the work. Gradient bytes = numel x 4 of the parameters each phase's engines step
(G in G's phase, D in D's); the implied bandwidth divides them by the wall-time difference, and
a plain ``all_reduce`` of one flat tensor of that size is timed after the loop for comparison.

Images per CPU-second = global batch / (CPU s per iteration summed over processes). The runs
alternate over ``--rounds`` so drifting load hits both alike. ``--timeout`` bounds each run (the
launcher and its ranks are killed) and each collective (the process group's timeout); a failed
run prints every rank's output (torchrun's ``--tee``, lines prefixed by rank).

    .venv/bin/python bench/scaling.py            # 2 rounds x (1 process, 2 processes), ~2.5 min
    .venv/bin/python bench/scaling.py --quick    # 1 round, 2 warm-up + 4 measured
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # runnable from a checkout; pix2pixhd_step as a module

import pix2pixhd_step as step  # noqa: E402
import torch  # noqa: E402

GLOBAL_BATCH = 2
RESULT_TAG = "SCALING-RESULT "
ACCEL_CPU2 = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"


class Switched(step.StampedEngine):
    """The engine as the loop drives it, with gradient synchronisation switchable from outside."""

    sync = True

    def sync_context(self, sync: bool):
        return self.engine.sync_context(sync and Switched.sync)


def child(args) -> dict:
    """One process (of 1 or 2): build, warm up, measure; returns its per-iteration times."""
    from pipeline import dist
    from pipeline.train.loop import adam_kwargs

    torch.set_num_threads(1)
    dist.exit_with_launcher(1)  # a rank must not outlive a launcher killed by our timeout
    accelerator = dist.make_accelerator("fp32", timeout_sec=args.timeout)
    rank, world = dist.rank(), dist.world_size()
    bpd = GLOBAL_BATCH // world
    cfg, info = step.make_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=GLOBAL_BATCH, batch_per_device=bpd))
    G, D = step.build_nets(cfg, info)  # the same seed on every rank, as loop.train
    runner = step.Ours(cfg, info, G, D, "fp32")
    nets, engines, wrapped, plain = {"G": G, "D": D}, {}, {}, {}
    for spec in runner.family.optimizers(cfg):  # as loop.train: its engine factory, backend ddp
        engine, modules = dist.make_engine(
            spec.name, {n: nets[n] for n in spec.nets}, spec.param_groups, backend="ddp", accelerator=accelerator,
            lr=spec.lr, betas=spec.betas, adam=adam_kwargs(cfg.optim.adam), precision="fp32",
            grad_clip=cfg.optim.grad_clip, micro_batch=bpd, zero_stage=None, bucket_mb=cfg.distributed.reduce_bucket_mb)
        for group in engine.param_groups:
            group.setdefault("initial_lr", group["lr"])
        engines[spec.name] = Switched(engine, runner)
        plain.update(modules)
        wrapped.update(engine.modules)
    runner.engines = engines
    runner.ctx = dataclasses.replace(runner.ctx, nets=wrapped, plain=plain)
    grad_bytes = sum(p.numel() * p.element_size() for name in ("G", "D") for p in plain[name].parameters()
                     if p.requires_grad)  # pix2pixhd: G's phase steps G, D's phase steps D
    parts = [step.make_batch(rank * bpd + k) for k in range(bpd)]
    raw = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    times: dict[str, list[float]] = {"sync_cpu": [], "sync_wall": [], "nosync_cpu": [], "nosync_wall": []}
    for i in range(args.warmup + args.measure):
        Switched.sync = world == 1 or (i - args.warmup) % 4 in (0, 3)  # A B B A: drift hits both alike
        c0, w0 = time.process_time(), time.perf_counter()
        runner.iteration(raw, lambda name: None)
        c1, w1 = time.process_time(), time.perf_counter()
        if i >= args.warmup:
            kind = "sync" if Switched.sync else "nosync"
            times[f"{kind}_cpu"].append(c1 - c0)
            times[f"{kind}_wall"].append(w1 - w0)
    result = {"rank": rank, "world": world, "kind": next(iter(engines.values())).engine.kind,
              "grad_bytes": grad_bytes, "threads": torch.get_num_threads(), **times}
    if world > 1:  # the same bytes as one flat all_reduce, for comparison with the implied bandwidth
        flat, plain_ar = torch.ones(grad_bytes // 4), []
        for _ in range(4):
            dist.barrier()
            c0, w0 = time.process_time(), time.perf_counter()
            torch.distributed.all_reduce(flat)
            plain_ar.append((time.process_time() - c0, time.perf_counter() - w0))
        result["flat_allreduce"] = plain_ar[1:]
    dist.barrier()
    accelerator.end_training()  # as loop.train: the process group goes before the interpreter does
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, args) -> list[dict]:
    """Run the children (1 plain process, or 2 under ``accelerate launch``); every rank's result."""
    me = [__file__, "--child", "--warmup", str(args.warmup), "--measure", str(args.measure),
          "--timeout", str(args.timeout)]
    cmd = [sys.executable, *me] if procs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL_CPU2),
        "--main_process_port", str(free_port()), "--tee", "3", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for p in psutil.Process(proc.pid).children(recursive=True):  # the ranks: sessions of their own
            p.kill()
        proc.kill()
        out, err = proc.communicate()
        err += f"\n--- timed out after {args.timeout:g} s"
    results = [json.loads(line.split(RESULT_TAG, 1)[1]) for line in out.splitlines() if RESULT_TAG in line]
    if proc.returncode != 0 or len(results) != procs:
        sys.stderr.write(f"--- {procs}-process run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"--- stdout (every rank)\n{out}\n--- stderr (every rank)\n{err}\n")
        raise SystemExit(1)
    return sorted(results, key=lambda r: r["rank"])


def med(runs: list[list[dict]], key: str) -> float:
    """Median over all iterations of all ranks of all rounds."""
    return statistics.median(v for ranks in runs for r in ranks for v in r[key])


def report(one: list[list[dict]], two: list[list[dict]]) -> None:
    rows = [("1 process, batch 2", one, "sync", 1), ("2 processes x batch 1 (DDP, gloo)", two, "sync", 2),
            ("2 processes, no gradient sync", two, "nosync", 2)]
    print("\n| run | CPU s/iter per process | CPU s/iter, all processes | wall s/iter | busy (CPU / wall) | "
          "images per CPU-s | images/s (wall) |\n|---|---:|---:|---:|---:|---:|---:|")
    ipc, ips = {}, {}
    for label, runs, kind, n in rows:
        cpu, wall = med(runs, f"{kind}_cpu"), med(runs, f"{kind}_wall")
        ipc[label], ips[label] = GLOBAL_BATCH / (n * cpu), GLOBAL_BATCH / wall
        print(f"| {label} | {cpu:.3f} | {n * cpu:.3f} | {wall:.3f} | {cpu / wall:.0%} | {ipc[label]:.3f} | "
              f"{ips[label]:.3f} |")
    a, b = rows[0][0], rows[1][0]
    print(f"\n2 / 1 processes: images per CPU-second {ipc[b] / ipc[a]:.3f}x, wall-clock images/s "
          f"{ips[b] / ips[a]:.3f}x (ideal 1.0x and 2.0x)")
    sync_cpu, sync_wall = med(two, "sync_cpu"), med(two, "sync_wall")
    d_cpu, d_wall = sync_cpu - med(two, "nosync_cpu"), sync_wall - med(two, "nosync_wall")
    grad_bytes = two[0][0]["grad_bytes"]
    print(f"gradient all-reduce (synced minus no-sync step, 2 processes): CPU {d_cpu:+.3f} s/iter per process "
          f"({d_cpu / sync_cpu:.1%} of the synced step), wall {d_wall:+.3f} s/iter ({d_wall / sync_wall:.1%})")
    flat = [x for ranks in two for r in ranks for x in r["flat_allreduce"]]
    flat_cpu, flat_wall = statistics.median(x[0] for x in flat), statistics.median(x[1] for x in flat)
    implied = f"{grad_bytes / d_wall / 1e6:.0f} MB/s" if d_wall > 0 else "n/a (no wall-time difference)"
    print(f"gradient bytes all-reduced per step: {grad_bytes / 1e6:.1f} MB (G + D, fp32); implied gloo bandwidth "
          f"{implied}; one flat all_reduce of the same bytes: {flat_wall:.3f} s wall, {flat_cpu:.3f} s CPU "
          f"({grad_bytes / flat_wall / 1e6:.0f} MB/s)")
    per_rank = "; ".join(f"rank {k} {med([[x for x in ranks if x['rank'] == k] for ranks in two], 'sync_cpu'):.3f}"
                         for k in range(len(two[0])))
    print(f"synced CPU s/iter per rank: {per_rank}; engines: {two[0][0]['kind']} (2 processes), "
          f"{one[0][0]['kind']} (1); torch threads per process: {one[0][0]['threads']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="1-process and 2-process runs per round, order alternated")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per process")
    p.add_argument("--measure", type=int, default=12, help="measured iterations per process (2 processes: half "
                   "with gradient sync, half without)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for each run and each collective")
    p.add_argument("--quick", action="store_true", help="1 round, 2 warm-up + 4 measured")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.measure = 1, 2, 4
    if args.measure < 2:
        p.error("--measure: at least 2 (with 2 processes, one synced and one unsynced iteration)")
    if args.child:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return 0
    start_load, start = os.getloadavg(), time.perf_counter()
    print(f"pix2pixHD scaling (bench/scaling.py): 256x128, ngf/ndf 32, fp32, global batch {GLOBAL_BATCH}; torch "
          f"{torch.__version__}; cpus {os.cpu_count()}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in start_load)}")
    print(f"{args.rounds} round(s); per process {args.warmup} warm-up + {args.measure} measured iterations, "
          f"OMP_NUM_THREADS=1, torch.set_num_threads(1)")
    one, two = [], []
    for r in range(args.rounds):
        for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
            t0 = time.perf_counter()
            (one if procs == 1 else two).append(launch(procs, args))
            print(f"  round {r + 1}: {procs} process(es) {time.perf_counter() - t0:5.1f} s wall", flush=True)
    report(one, two)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
