"""FLOPs per training iteration of each family's benchmark config, what this CPU achieves against
its peak, and what one H100 would need: an estimate on paper, since no GPU is at hand.

What runs. The ``ours fp32`` iteration of each side-by-side benchmark, imported from it so that
the config and the code path are the benchmark's own: ``bench/pix2pixhd_step.py`` (its ``Ours``,
256x128, batch 1), ``bench/spade_step.py`` (its ``Ours``, 256x128, batch 1) and
``bench/stylegan2_step.py`` (its ``Ours``, 64x64, batch 8: Gmain, Greg, Dmain, Dreg, amortised
by their intervals 1, 4, 1, 16 as its report does). Each family runs in a fresh child process
with one thread. After warm-up, one iteration runs under ``torch.utils.flop_counter.
FlopCounterMode`` (FLOPs per network), and one under a dispatch mode that counts aten operator
calls, a proxy for GPU kernel launches, and their FLOPs by the same formulas (the two totals must
agree). StyleGAN2's phases are counted by the dispatch mode only, because the module hooks of
``FlopCounterMode`` do not support R1's ``autograd.grad``. Matmuls and convolutions are counted,
forward and backward; elementwise ops, norms and Adam are not. Then ``--measure`` iterations are
timed in process CPU time.

The estimate. This CPU's fp32 peak per core is FMA lanes x 2 x clock: 32 FLOP/cycle with AVX2
and two FMA units, 64 with AVX-512, at the clock /proc/cpuinfo reports. The H100's is NVIDIA's
datasheet figure for H100 SXM bf16 dense, 989.4 TFLOP/s. The iteration time at 35% of it is
FLOPs / (0.35 x peak), and at 8%, where published V100 runs of these models land (6-10%), the
same. The launch floor is operator calls x 5 us, roughly what launching one CUDA kernel costs on
the host. Where it approaches the 35% time, the step is latency-bound at that batch per GPU.

    .venv/bin/python bench/gpu_estimate.py             # ~4 min
    .venv/bin/python bench/gpu_estimate.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # runnable from a checkout; the benchmarks import as modules

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, flop_registry  # noqa: E402

RESULT = "RESULT "
H100_BF16_DENSE = 989.4e12  # NVIDIA H100 SXM datasheet, bf16 tensor core, dense
LAUNCH_SEC = 5e-6
FAMILIES = ("pix2pixhd", "spade", "stylegan2")


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls (each would be at least one kernel launch on a GPU) and their
    FLOPs by torch's own formulas (``flop_counter.flop_registry``). Unlike ``FlopCounterMode`` it
    tracks no modules, whose hooks do not support ``autograd.grad`` on leaf inputs (R1)."""

    def __init__(self):
        super().__init__()
        self.calls, self.flops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls += 1
        count = flop_registry.get(func.overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def family_runner(name: str):
    """(one iteration, batch size, networks, the runner) for the family's ``ours fp32``."""
    if name == "pix2pixhd":
        import pix2pixhd_step as b

        cfg, info = b.make_config()
        G, D = b.build_nets(cfg, info)
        runner, raw = b.Ours(cfg, info, G, D, "fp32"), b.make_batch()
        return (lambda: runner.iteration(raw, lambda section: None)), 1, {"G": G, "D": D}, runner
    if name == "spade":
        import spade_step as b

        runner, raw, stamper = b.make_runner("ours", ""), b.make_batch(), b.Stamper()
        return (lambda: runner.iteration(raw, stamper)), 1, runner.nets, runner
    import stylegan2_step as b

    runner, raw, stamper = b.make_runner("ours", ""), b.make_raw(), b.Stamper()
    return (lambda: runner.iteration(raw, stamper)), b.BATCH, runner.nets, runner


def phase_weights(name: str) -> dict[str, float] | None:
    """StyleGAN2's bench runs every phase each iteration; the loop runs phase p every k_p."""
    if name != "stylegan2":
        return None
    import stylegan2_step as b

    return {p: 1 / b.INTERVALS[p] for p in b.PHASES}


def child(name: str, warmup: int, measure: int) -> dict:
    torch.set_num_threads(1)
    step, batch, nets, runner = family_runner(name)
    weights = phase_weights(name)
    for _ in range(warmup):
        step()
    out: dict = {"family": name, "batch": batch}
    if weights:  # count and time per phase, then amortise
        import stylegan2_step as b

        raw, stamper = b.make_raw(), b.Stamper()
        flops, ops, cpu = {}, {}, {p: [] for p in weights}
        for p in weights:
            counter = OpCounter()
            with counter:
                runner.run_phase(p, raw, stamper)
            flops[p], ops[p] = counter.flops, counter.calls
        for _ in range(measure):
            for p in weights:
                t = time.process_time()
                runner.run_phase(p, raw, stamper)
                cpu[p].append(time.process_time() - t)
        out["flops"] = sum(flops[p] * w for p, w in weights.items())
        out["ops"] = sum(ops[p] * w for p, w in weights.items())
        out["cpu"] = sum(statistics.median(cpu[p]) * w for p, w in weights.items())
        out["per_phase"] = {p: {"gflops": flops[p] / 1e9, "ops": ops[p], "cpu": statistics.median(cpu[p]),
                                "every": round(1 / weights[p])} for p in weights}
    else:
        with FlopCounterMode(display=False) as fc:
            step()
        counts = fc.get_flop_counts()
        out["flops"] = fc.get_total_flops()
        out["per_network"] = {n: sum(counts.get(m, {}).values()) / 1e9 for n in nets
                              for m in counts if m.split(".")[-1] == type(nets[n]).__name__}
        counter = OpCounter()
        with counter:
            step()
        out["ops"] = counter.calls
        if counter.flops != out["flops"]:
            raise RuntimeError(f"FLOPs: FlopCounterMode {out['flops']} vs the dispatch count {counter.flops}")
        times = []
        for _ in range(measure):
            t = time.process_time()
            step()
            times.append(time.process_time() - t)
        out["cpu"] = statistics.median(times)
    return out


def cpu_peak() -> tuple[float, str]:
    caps = torch.cpu.get_capabilities()
    per_cycle = 64 if caps.get("avx512_f") else 32 if caps.get("avx2") and caps.get("fma3") else 8
    mhz = 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    return per_cycle * mhz * 1e6, (f"{caps.get('cpu_name', '?')}, {per_cycle} fp32 FLOP/cycle "
                                   f"(2 FMA units assumed) x {mhz:.0f} MHz per core")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--measure", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 1 measured")
    p.add_argument("--child", choices=FAMILIES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.warmup, args.measure = 1, 1
    if args.child:
        print(RESULT + json.dumps(child(args.child, args.warmup, args.measure)), flush=True)
        return 0
    peak, how = cpu_peak()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; CPU peak {peak / 1e9:.1f} "
          f"GFLOP/s per core ({how})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for name in args.families.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", name, "--warmup", str(args.warmup),
                            "--measure", str(args.measure)], capture_output=True, text=True, env=env, timeout=3600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
        if r.returncode or not lines:
            sys.stderr.write(f"--- {name} failed (exit {r.returncode})\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n")
            return 1
        rows.append(json.loads(lines[-1][len(RESULT):]))
    print(f"\n{'family':<10} {'batch':>5} {'GFLOP/iter':>10} {'CPU s/iter':>10} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'aten ops':>8} {'H100 35% ms':>11} {'H100 8% ms':>10} {'launch floor ms':>15} {'floor/35%':>9}")
    for r in rows:
        at35, at8 = r["flops"] / (0.35 * H100_BF16_DENSE), r["flops"] / (0.08 * H100_BF16_DENSE)
        floor = r["ops"] * LAUNCH_SEC
        print(f"{r['family']:<10} {r['batch']:>5} {r['flops'] / 1e9:>10.1f} {r['cpu']:>10.3f} "
              f"{r['flops'] / r['cpu'] / 1e9:>8.2f} {r['flops'] / r['cpu'] / peak:>7.1%} {r['ops']:>8.0f} "
              f"{at35 * 1e3:>11.3f} {at8 * 1e3:>10.3f} {floor * 1e3:>15.2f} {floor / at35:>9.1f}x")
    for r in rows:
        detail = r.get("per_network") or r.get("per_phase")
        print(f"  {r['family']}: {json.dumps(detail)}")
    print(f"(FLOPs: matmuls and convolutions, forward and backward, as FlopCounterMode counts them; StyleGAN2 "
          f"amortised over its phase intervals. H100: {H100_BF16_DENSE / 1e12:.1f} TFLOP/s bf16 dense; launch floor "
          f"= aten ops x {LAUNCH_SEC * 1e6:.0f} us)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
