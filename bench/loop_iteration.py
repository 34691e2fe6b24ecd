"""What the side-by-side iteration benchmarks against official code share (``spade_step.py``,
``pix2pix_step.py``): our training loop's iteration for any family, section stamping, the child
processes and the report.

Every variant runs in a fresh child process (the benchmark's own file with ``--child``), 1
thread, so peak RSS is the variant's own and an official child imports nothing of ``pipeline``.
Times are ``time.process_time()`` per iteration; medians pool the rounds; ratios are taken against
the official code measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "RESULT "
REST = "rest (inputs, cat, losses)"


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "ours" or "official"
    precision: str = "fp32"
    overrides: tuple[str, ...] = ()  # config overrides of ours on top of the benchmark's


class Stamper:
    """Process-CPU time per named section of an iteration; ``phase`` names the current phase."""

    def __init__(self):
        self.sections: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}
        self.phase, self.last = "", time.process_time()

    def start(self) -> None:
        self.current, self.last = {}, time.process_time()

    def __call__(self, name: str) -> None:
        now = time.process_time()
        self.current[name] = self.current.get(name, 0.0) + now - self.last
        self.last = now

    def keep(self) -> None:
        for k, v in self.current.items():
            self.sections.setdefault(k, []).append(v)


def stamp_forwards(stamper: Stamper, nets: dict[str, nn.Module]) -> None:
    """Forward hooks: what precedes a net's forward is its phase's rest, the forward its own."""
    for name, net in nets.items():
        net.register_forward_pre_hook(lambda m, a: stamper(f"{stamper.phase} phase: {REST}"))
        net.register_forward_hook(lambda m, a, o, name=name: stamper(f"{stamper.phase} phase: {name} forward"))


def stamp_optimizers(stamper: Stamper, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Step hooks on an official code's optimizers: before the step ends its phase's backward."""
    for name, opt in optimizers.items():
        opt.register_step_pre_hook(lambda o, a, k, name=name: stamper(f"{name} phase: backward"))
        opt.register_step_post_hook(lambda o, a, k, name=name: stamper(f"{name} phase: step"))


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class StampedEngine:
    """A ``dist.DDPEngine`` as the loop drives it, stamping after its backward and its step; in a
    numerics child it keeps the gradients each step is about to apply (``capture``)."""

    def __init__(self, engine, owner: LoopIteration):
        self.engine, self.owner, self.capture = engine, owner, None

    def __getattr__(self, name: str):  # name, modules, param_groups, sync_context, check
        return getattr(self.engine, name)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.owner.stamper(f"{self.engine.name} phase: backward")

    def step(self, skip: bool) -> torch.Tensor:
        if skip:
            raise RuntimeError(f"non-finite {self.engine.name} step in the benchmark")
        if self.capture is not None:
            self.capture[self.engine.name] = [p.grad.detach().clone() for m in self.engine.modules.values()
                                              for p in m.parameters()]
        norm = self.engine.step(skip)
        self.owner.stamper(f"{self.engine.name} phase: step")
        return norm


def loop_engines(family, cfg, nets: dict[str, nn.Module], wrap) -> dict:
    """The family's ``optimizers(cfg)`` as ``dist.DDPEngine`` engines, made as ``loop.train``
    (through ``dist.make_engine``) makes them at world size 1, each passed through ``wrap``."""
    from pipeline import dist
    from pipeline.train.loop import adam_kwargs

    engines = {}
    for spec in family.optimizers(cfg):
        modules = {name: nets[name] for name in spec.nets}
        optimizer = torch.optim.Adam(spec.param_groups(modules), lr=spec.lr, betas=spec.betas,
                                     **adam_kwargs(cfg.optim.adam))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        engines[spec.name] = wrap(dist.DDPEngine(spec.name, modules, optimizer, None, cfg.optim.grad_clip))
    return engines


def loop_context(family, cfg, info, nets: dict[str, nn.Module], precision: str):
    """What ``run_iteration`` takes besides phases and engines, as the loop makes it on CPU:
    the step context (bf16 autocast for ``precision`` bf16), a ``stats.Monitor`` that writes
    nothing, and the any-rank agreement."""
    from pipeline import dist
    from pipeline.train.family import StepContext
    from pipeline.train.stats import Monitor

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=info, mean_over_ranks=dist.mean_over_ranks,
                      reuse_fake=True, autocast=autocast)
    monitor = Monitor(cfg, cfg.run.dir, family, info, torch.device("cpu"), enabled=False)
    return ctx, monitor, lambda ok: not dist.any_rank([not ok, False, False], "cpu")[0]


class LoopIteration:
    """A family driven by the loop's own ``run_iteration`` (world size 1, so no DDP wrapper): its
    ``phases(cfg)``, its engines (``loop_engines``), ``prepare`` as the fetch, the loop's lr line
    and ``loop_context``. Not included: EMA, ``monitor.step``, checkpoints, data loading."""

    def __init__(self, family: str, overrides: list[str], info, precision: str, seed: int):
        from pipeline.config import load_config
        from pipeline.families import get_family

        self.cfg = cfg = load_config(None, [f"model.family={family}", *overrides])
        self.info = info
        self.family = get_family(family)
        torch.manual_seed(seed)
        self.nets = nets = self.family.build(cfg, info)
        self.stamper, self.outs = Stamper(), {}
        self.engines = loop_engines(self.family, cfg, nets, lambda engine: StampedEngine(engine, self))
        self.phases = tuple(dataclasses.replace(p, fn=self.stamped(p)) for p in self.family.phases(cfg))
        self.stream = self.family.streams(cfg, info, cfg.data.split)[0].name
        self.ctx, self.monitor, self.agree = loop_context(self.family, cfg, info, nets, precision)

    def stamped(self, phase):
        def fn(ctx, b, scratch):
            self.stamper("loop: requires_grad_, monitor.add")
            self.stamper.phase = phase.name
            out = phase.fn(ctx, b, scratch)
            self.stamper(f"{phase.name} phase: {REST}")
            self.outs[phase.name] = {k: v.detach() for k, v in out.items()}
            return out

        return fn

    def hook(self, stamper: Stamper) -> None:
        self.stamper = stamper
        stamp_forwards(stamper, self.nets)

    def iteration(self, raw: dict, stamper: Stamper) -> None:
        from pipeline.train.loop import lr_factor, run_iteration

        for engine in self.engines.values():  # the loop's lr line
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(self.cfg, self.ctx.nimg)

        def fetch() -> dict:
            b = self.family.prepare({self.stream: raw}, torch.device("cpu"), self.cfg, self.info)
            stamper("prepare / loader handover")
            return b

        run_iteration(self.phases, self.ctx, self.engines, fetch, 1, self.agree, self.monitor)
        stamper("loop: requires_grad_, monitor.add")
        self.ctx.step += 1
        self.ctx.nimg += self.cfg.train.batch_size

    def losses(self) -> dict[str, float]:
        return {k: float(v) for out in self.outs.values() for k, v in out.items() if k != "loss"}


def child_measure(runner, batch: dict, warmup: int, measure: int) -> dict:
    """``warmup`` then ``measure`` iterations of ``runner`` on ``batch``: per-iteration CPU and
    wall time, the sections, the last losses, parameter counts and peak RSS."""
    built_rss, stamper = rss_gb(), Stamper()
    runner.hook(stamper)
    cpu, wall, sys_cpu, faults = [], [], [], []
    for i in range(warmup + measure):
        stamper.start()
        u0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        runner.iteration(batch, stamper)
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_cpu.append(u1.ru_stime - u0.ru_stime)
            faults.append(u1.ru_minflt - u0.ru_minflt)
            stamper.keep()
    return {"cpu": cpu, "wall": wall, "sys": sys_cpu, "faults": faults, "sections": stamper.sections,
            "losses": runner.losses(),
            "params": {n: count(net) for n, net in runner.nets.items()}, "built_rss_gb": built_rss,
            "peak_rss_gb": rss_gb(), "threads": torch.get_num_threads()}


# glibc malloc's tunables that keep freed memory in the process: no mmap for large blocks, no trim
# of the heap's top (see docs/performance.md, "Page faults")
NO_HEAP_TRIM = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def run_child(script: str, args_list: list[str], timeout: float, no_heap_trim: bool = False) -> dict:
    """``script --child ...`` in a fresh process with 1 thread; its ``RESULT`` line, parsed.
    ``no_heap_trim``: glibc's heap keeps what it frees (``NO_HEAP_TRIM``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           **(NO_HEAP_TRIM if no_heap_trim else {})}
    r = subprocess.run([sys.executable, script, *args_list], capture_output=True, text=True, env=env,
                       timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if r.returncode != 0 or not lines:
        sys.stderr.write(f"--- child {args_list} failed (exit {r.returncode})\n{r.stdout[-4000:]}\n"
                         f"{r.stderr[-6000:]}\n")
        raise SystemExit(1)
    return json.loads(lines[-1][len(RESULT_TAG):])


def run_rounds(script: str, variants: dict[str, Variant], keys: list[str], rounds: int, warmup: int, measure: int,
               common: list[str], bf16: tuple[int, int] | None = None, no_heap_trim: bool = False
               ) -> dict[str, list[dict]]:
    """Every variant once per round in a child, the order rotated each round; ``bf16``
    (warm-up, measured) runs bf16 variants in the first round only, where they are slow."""
    results: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(rounds):
        k = r % len(keys)
        for key in keys[k:] + keys[:k]:
            is_bf16 = bf16 is not None and variants[key].precision == "bf16"
            if is_bf16 and r > 0:
                continue
            w, m = bf16 if is_bf16 else (warmup, measure)
            t0 = time.perf_counter()
            results[key].append(run_child(script, ["--child", key, "--warmup", str(w), "--measure", str(m),
                                                   *common], 3600, no_heap_trim))
            print(f"  round {r + 1}: {variants[key].label:<20} {time.perf_counter() - t0:6.1f} s wall", flush=True)
    return results


def pooled(rounds: list[dict], name: str) -> list[float]:
    return [v for r in rounds for v in r[name]]


def report(results: dict[str, list[dict]], variants: dict[str, Variant], targets: dict[str, float],
           order: list[str]) -> dict[str, float]:
    """The table of medians and ratios against ``official``, the sections (sorted by ``order``,
    prefixes), and each target's verdict. Returns the medians."""
    med = {k: statistics.median(pooled(r, "cpu")) for k, r in results.items()}
    rss = {k: max(x["peak_rss_gb"] for x in r) for k, r in results.items()}
    base = med.get("official")
    print(f"\n{'variant':<20} {'iters':>5} {'CPU s/iter':>10} {'min-max':>13} {'rounds':>6} {'wall s/it':>9} "
          f"{'/official':>9} {'sys s/it':>8} {'faults/it':>9} {'RSS built':>9} {'peak RSS GB':>11}   params G / D")
    for key, rounds in results.items():
        cpu, meds = pooled(rounds, "cpu"), [statistics.median(r["cpu"]) for r in rounds]
        params = rounds[0]["params"]
        spread, wall = (max(meds) - min(meds)) / statistics.median(meds), statistics.median(pooled(rounds, "wall"))
        print(f"{variants[key].label:<20} {len(cpu):>5} {med[key]:>10.3f} {min(cpu):>6.3f}-{max(cpu):<6.3f} "
              f"{spread:>6.1%} {wall:>9.3f} {f'{med[key] / base:.3f}x' if base else '-':>9} "
              f"{statistics.median(pooled(rounds, 'sys')):>8.3f} {statistics.median(pooled(rounds, 'faults')):>9.0f} "
              f"{max(r['built_rss_gb'] for r in rounds):>9.3f} "
              f"{rss[key]:>11.3f}   {params['G']:,} / {params['D']:,}")
    print("(rounds: spread of per-round medians; sys: the kernel's share of the CPU time, mostly minor page faults "
          "(faults/it) on memory the allocator gave back to the system; RSS built: peak after building networks and "
          "optimizers; "
          f"threads in the children: {sorted({r['threads'] for rounds in results.values() for r in rounds})})")

    sections: dict[str, dict[str, float]] = {}
    for key, rounds in results.items():
        for name in {n for r in rounds for n in r["sections"]}:
            values = [v for r in rounds for v in r["sections"].get(name, [])]
            sections.setdefault(name, {})[key] = statistics.median(values)
    print("\nwhere the time goes (median process CPU s per section; 'step' is Adam, for ours with the engine's grad "
          "norm, checks, agreement and zero_grad):")
    print(f"  {'section':<36}" + "".join(f"{variants[k].label:>20}" for k in results))
    for name in sorted(sections, key=lambda n: next(i for i, o in enumerate(order + [""]) if n.startswith(o))):
        print(f"  {name:<36}" + "".join(f"{sections[name][k]:>20.4f}" if k in sections[name] else f"{'-':>20}"
                                        for k in results))

    print("\nratios (same run):")
    for key, target in targets.items():
        if key in med and base:
            ratio, mem = med[key] / base, rss[key] / rss["official"]
            print(f"  {variants[key].label} / {variants['official'].label}: CPU time {ratio:.3f}x (target <= "
                  f"{target}: {'MET' if ratio <= target else 'NOT MET'}), peak RSS {mem:.3f}x (target <= 1: "
                  f"{'MET' if mem <= 1 else 'NOT MET'}; {rss[key]:.3f} vs {rss['official']:.3f} GB)")
    return med


def add_arguments(p, variants: dict[str, Variant], official: tuple[str, str, str], default_variants: str | None):
    """The arguments both benchmarks take; ``official``: (environment variable, default path, what)."""
    env, path, what = official
    p.add_argument("--official", default=os.environ.get(env, path),
                   help=f"an export of {what} (default: ${env} or {path})")
    p.add_argument("--rounds", type=int, default=2, help="every variant runs once per round, order rotated")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations per child")
    p.add_argument("--measure", type=int, default=8, help="measured iterations over all rounds")
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up + 2 measured")
    p.add_argument("--variants", default=default_variants, help="comma-separated, from: " + ", ".join(variants))
    p.add_argument("--no-numerics", action="store_true", help="skip the one-iteration numerics check")
    p.add_argument("--no-heap-trim", action="store_true",
                   help="every child with glibc's heap keeping what it frees (MALLOC_MMAP_THRESHOLD_, "
                        "MALLOC_TRIM_THRESHOLD_): no page faults on re-grown memory, for both sides alike")
    p.add_argument("--child", choices=[*variants, "numerics"], help=argparse.SUPPRESS)


def checked(p, args, variants: dict[str, Variant]):
    """``args`` after ``--quick`` and with ``variants`` as a list of known keys."""
    if args.quick:
        args.rounds, args.warmup, args.measure = 1, 1, 2
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in variants]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(variants)}")
    return args


def drive(args, script: str, title: str, config: str, variants: dict[str, Variant], make_runner, make_batch,
          child_numerics, report, report_numerics, bf16: tuple[int, int] | None = None) -> int:
    """A benchmark's main: as a ``--child``, measure one variant (or the numerics) and print the
    result; as the parent, the header, the rounds, the report and the numerics."""
    if args.child:
        torch.set_num_threads(1)
        if args.child == "numerics":
            result = child_numerics(args.official, [v for v in args.variants if variants[v].kind == "ours"])
        else:
            result = child_measure(make_runner(args.child, args.official), make_batch(), args.warmup, args.measure)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    common = ["--official", args.official]
    start_load, start = os.getloadavg(), time.perf_counter()  # load before this benchmark adds its own
    print(f"{title} ({Path(script).relative_to(REPO)})")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}   torch "
          f"{torch.__version__}   python {platform.python_version()}   cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}   official code: {args.official}")
    print(f"config: {config}")
    per = math.ceil(args.measure / args.rounds)
    print(f"a fresh child process per variant and round, 1 thread; {args.rounds} round(s) of {args.warmup} warm-up + "
          f"{per} measured iterations" + (f" (bf16: {bf16[0]} + {bf16[1]}, first round only)" if bf16 else ""))
    if args.no_heap_trim:
        print("glibc malloc: " + " ".join(f"{k}={v}" for k, v in NO_HEAP_TRIM.items()) + " in every child")
    results = run_rounds(script, variants, args.variants, args.rounds, args.warmup, per, common, bf16,
                         args.no_heap_trim)
    report(results)
    if not args.no_numerics and "official" in args.variants:
        numerics = ["--child", "numerics", "--variants", ",".join(args.variants), *common]
        report_numerics(run_child(script, numerics, 1800))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


def put_official_on_path(path: str, marker: str, how: str) -> None:
    """Make an official implementation's export at ``path`` importable; if ``marker`` (a file
    inside it) is missing, stop with ``how`` (how to make the export)."""
    if not (Path(path) / marker).is_file():
        raise SystemExit(f"--official {path}: no {marker} there. {how}")
    if path not in sys.path:
        sys.path.insert(0, path)


def load_official_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """An official state dict into ours, paired by order and shape (the names may differ)."""
    pairs = list(zip(state.items(), net.state_dict().items(), strict=True))
    for (k_off, v_off), (k_ours, v_ours) in pairs:
        if v_off.shape != v_ours.shape:
            raise RuntimeError(f"state dicts do not line up: {k_off} {tuple(v_off.shape)} vs {k_ours}")
    net.load_state_dict({k_ours: v_off for (_, v_off), (k_ours, _) in pairs})


def grad_rel(grads: dict[str, dict[str, list[torch.Tensor]]], keys: list[str]) -> dict[str, float]:
    """``||g - g_official|| / ||g_official||`` over all of G's and of D's gradients, per key."""
    rel = {}
    for key in keys:
        for net in ("G", "D"):
            ref, mine = grads["official"][net], grads[key][net]
            diff = torch.cat([(a - b).flatten() for a, b in zip(ref, mine, strict=True)]).norm()
            rel[f"{key}/{net}"] = float(diff / torch.cat([a.flatten() for a in ref]).norm())
    return rel
