"""The training loop: one readable function from launch to exit, over any family.

Progress is counted in images seen. Every trained network is its own DDP module, stepped by the
engine of its declared optimizer (``dist.DDPEngine``, or ``dist.ZeroEngine`` with
``distributed.backend=deepspeed``: the same interface, so no branch here); precision is ours
(autocast, and a GradScaler per optimizer for fp16); a non-finite step is skipped on every rank;
checkpoints hold what the family declared, are committed last and resume exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable

import torch

from .. import dist, io
from ..config import Config, ConfigError, deepspeed_limits, resume_changes, to_dict
from ..data.manifest import load_manifest
from ..data.stream import make_stream
from ..data.transforms import Augment
from ..eval.cli import start_sidecar
from ..families import get_family
from . import checkpoint as ckpt
from .ema import ema_beta, make_ema, update_ema
from .family import DataInfo, Family, Phase, StepContext, Stream, default_init_from
from .lease import RunDirBusy, RunLease
from .preemption import Preemption, ignore_preemption_signals
from .stats import Monitor, describe_run
from .trackers import TrackerError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 3, 75
EXIT_NO_CHECKPOINT = 4  # committed checkpoints exist and none can be used (or run.resume cannot be met)
EXIT_RUN_DIR_BUSY = 5  # another job holds the run directory's lease, or took it over
EXIT_ORPHANED = 6  # the launcher died: the rank stops rather than train on unsupervised
EXIT_CONFIG = 2  # the config is refused (as the command line's config errors)
# What loading a checkpoint that verified can still raise: a payload torch refuses to unpickle
# (weights_only), a state that does not fit the networks, a file gone since.
LOAD_ERRORS = (ckpt.CheckpointInvalid, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError,
               OSError, EOFError)
PREEMPTED_MARKER = "PREEMPTED.json"
DONE_MARKER = "DONE.json"  # the evaluator's signal that no more snapshots will come


def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 in hardware. Where it does (Ampere and later GPUs; CPUs
    with AVX512-BF16 or AMX, or Arm's BF16 extension) bf16 autocast is the fast path; elsewhere
    torch emulates it and it is much slower than fp32 (docs/performance.md)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        caps = torch.cpu.get_capabilities()
        return any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    return False


def resolve_precision(precision: str, device_type: str) -> tuple[str, str]:
    """``train.precision`` made concrete for this device, and a note saying why (for the start line):
    ``auto`` is bf16 where the hardware computes it natively, else fp32."""
    where = "this GPU" if device_type == "cuda" else f"this {device_type.upper()}"
    native = native_bf16(device_type)
    if precision == "auto":
        return ("bf16", f"auto: {where} computes bf16 natively") if native else \
            ("fp32", f"auto: {where} has no native bf16")
    if precision == "bf16" and not native:
        return "bf16", f"configured; {where} has no native bf16, so it is emulated and slower than fp32"
    return precision, "configured"


def end_of_run(run_dir: str, state: dict, segment: tuple[float, int], bad_samples: int, sidecar: bool) -> str:
    """The line a finished run ends on: where it got, how fast this segment went, what was
    skipped, and where everything is."""
    seconds = time.perf_counter() - segment[0]
    images = state["nimg"] - segment[1]
    h, rem = divmod(round(seconds), 3600)
    rate = f", {images / seconds:.1f} images/s" if images and seconds > 0 else ""
    evaluation = f"; evaluation in {run_dir}/eval" + (" (the sidecar finishes the last snapshots)" if sidecar else "")
    return (f"gan-train: done at kimg {state['nimg'] / 1000:.3f} (step {state['step']}); this segment "
            f"{h}:{rem // 60:02d}:{rem % 60:02d}{rate}; {state['skipped_steps']} steps and {bad_samples} bad "
            f"samples skipped; checkpoints and snapshots in {run_dir}, TensorBoard: --logdir {run_dir}"
            f"{evaluation}")


def adam_kwargs(impl: str) -> dict:
    """``torch.optim.Adam`` keyword arguments for ``optim.adam``."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]


def lr_factor(cfg: Config, nimg: int) -> float:
    """Constant; or constant until ``decay_start_kimg``, then linear to 0 at ``total_kimg``
    (``linear``) or ``step_factor`` times the lr (``step``)."""
    if cfg.optim.schedule == "constant":
        return 1.0
    start, end = cfg.optim.decay_start_kimg * 1000, cfg.train.total_kimg * 1000
    if cfg.optim.schedule == "step":
        return 1.0 if nimg < start else cfg.optim.step_factor
    if nimg <= start or end <= start:
        return 1.0
    return max(0.0, 1.0 - (nimg - start) / (end - start))


def check_declarations(family: Family, nets: dict, cfg: Config, precision: str, backend: str) -> None:
    """What the loop needs of a family's declarations, said before anything runs."""
    declared = [n.name for n in family.networks]
    if not set(nets) <= set(declared):  # a declared network may be off for a config (BicycleGAN's shared D)
        raise ValueError(f"family {family.name}: build() made {sorted(nets)}, its networks are {sorted(declared)}")
    owners = [name for spec in family.optimizers(cfg) for name in spec.nets]
    if sorted(owners) != sorted(nets):
        raise ValueError(f"family {family.name}: every network needs exactly one optimizer ({owners} for "
                         f"{sorted(nets)})")
    for phase in family.phases(cfg):
        if len(phase.steps) > 1 and (precision == "fp16" or backend == "deepspeed"):
            # One loss, one backward: it cannot be scaled for two loss scalers, nor run by two engines.
            raise ConfigError(f"phase {phase.name} steps {', '.join(phase.steps)} together: that needs "
                              f"train.precision bf16 or fp32 and distributed.backend=ddp")


def run_iteration(phases: tuple[Phase, ...], ctx: StepContext, engines: dict, fetch: Callable[[], dict], accum: int,
                  agree: Callable[[bool], bool], monitor: Monitor, poison: bool = False) -> bool:
    """One iteration: each phase due at ``ctx.step``, in order, ``repeats`` times: draw
    micro-batches (or reuse the previous phase's), freeze every network the phase does not step,
    run the step function on each micro-batch and backpropagate (gradients all-reduced on the
    last micro-batch only), then step, or skip on every rank when ``agree(bad here)`` says a rank
    saw a non-finite loss or gradient. Returns whether every step of the iteration was taken.
    ``poison``: the first phase's loss is NaN (the divergence guard's test aid)."""
    every_ok, micro = True, None
    for phase in phases:
        if ctx.step % phase.every:
            continue
        stepping = [engines[name] for name in phase.steps]
        trainable = {net for e in stepping for net in e.modules} | set(phase.trainable)
        for _ in range(phase.repeats):
            if phase.fetch or micro is None:
                micro = [(fetch(), {}) for _ in range(accum)]
            for name, module in ctx.plain.items():
                module.requires_grad_(name in trainable)  # no gradient reaches what this phase does not step
            losses = []
            for i, (batch, scratch) in enumerate(micro):
                with contextlib.ExitStack() as sync:
                    for e in stepping:
                        sync.enter_context(e.sync_context(i == accum - 1))
                    out = phase.fn(ctx, batch, scratch)
                    scale = float("nan") if poison else 1.0
                    stepping[0].backward(out["loss"] * scale / accum)  # check_declarations: one engine may
                losses.append(out)  # run a backward for several only when that is a plain backward
            checks = [e.check(ctx.nimg) for e in stepping]  # every engine's: each unscales and measures
            local_ok = all(checks) and all(torch.isfinite(out["loss"]).item() for out in losses) and not poison
            ok = agree(local_ok)
            norms = [e.step(skip=not ok) for e in stepping]
            for module in ctx.plain.values():
                module.requires_grad_(True)
            if ok and phase.after_step:
                phase.after_step(ctx.plain, ctx.cfg)
            every_ok = every_ok and ok
            poison = False
            monitor.add(phase.name, losses, torch.stack([n.float() for n in norms]).norm(), skipped=not ok)
    return every_ok


def train(cfg: Config, command: str = "") -> int:
    # First of all (if the entry point has not already): a preemption notice that arrives during
    # start-up must not kill the rank, and a rank must not outlive its launcher.
    preemption = Preemption.listen()
    dist.exit_with_launcher(EXIT_ORPHANED)
    # ------------------------------------------------------------ processes, devices, precision
    precision, why = resolve_precision(cfg.train.precision, "cuda" if torch.cuda.is_available() else "cpu")
    backend = dist.resolve_backend(cfg.distributed.backend)  # before make_accelerator: it reads the launcher's
    accelerator = dist.make_accelerator(precision, timeout_sec=cfg.distributed.timeout_sec)
    device, rank, world = accelerator.device, dist.rank(), dist.world_size()
    bpd = cfg.train.batch_per_device or cfg.train.batch_size // world
    if bpd < 1 or cfg.train.batch_size % (bpd * world):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not a multiple of "
                          f"batch_per_device={bpd} x {world} processes")
    accum = cfg.train.batch_size // (bpd * world)
    if backend == "deepspeed":
        deepspeed_limits(cfg)
        if accum != 1:
            # The divergence guard skips a step on every rank before any gradient exists; with
            # accumulation inside an engine, earlier micro-batches' gradients could not be dropped.
            raise ConfigError(f"distributed.backend=deepspeed needs no gradient accumulation: train.batch_size="
                              f"{cfg.train.batch_size} must equal batch_per_device={bpd} x {world} processes")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    so = cfg.data.storage_options or None
    run_dir = cfg.run.dir

    # ------------------------------------------------------------ the family and its networks
    manifest = load_manifest(cfg.data.url, so)
    family = get_family(cfg.model.family)
    info = DataInfo.of(manifest)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    nets = family.build(cfg, info)
    check_declarations(family, nets, cfg, precision, backend)
    if cfg.train.channels_last:
        nets = {k: m.to(memory_format=torch.channels_last) for k, m in nets.items()}
    if device.type == "cuda" and world > 1:  # gloo has no SyncBatchNorm: on CPU each rank normalises its own
        nets.update({n.name: torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets[n.name])
                     for n in family.networks if n.sync_batchnorm})

    # ------------------------------------------------------------ the run directory: lease, resume point
    # One job writes a run directory: rank 0 takes its lease (waiting for, then refusing, a live
    # holder) before anything in it is read or written.
    lease = RunLease(run_dir, cfg.run.lease_sec, so) if dist.is_main() else None
    busy = None
    if lease is not None:
        try:
            io.makedirs(run_dir, so)
            lease.acquire(cfg.run.lease_wait_sec, interrupted=lambda: preemption.signal is not None)
        except RunDirBusy as exc:
            busy = str(exc)
    busy = dist.broadcast_object(busy)  # orders: no rank reads the run directory before the lease is taken
    if busy:
        dist.main_print(f"gan-train: {busy}", file=sys.stderr)
        return EXIT_RUN_DIR_BUSY
    # The checkpoints to resume from, newest first, chosen once by rank 0 for everyone.
    candidates, problem = dist.broadcast_object(
        ckpt.resume_candidates(run_dir, cfg.run.resume, so) if dist.is_main() else None)
    if problem:
        dist.main_print(f"gan-train: {problem}", file=sys.stderr)
        if lease:
            lease.release()
        return EXIT_NO_CHECKPOINT
    if candidates:  # the same verdict on every rank: all hold the same candidates and config
        accepted, refused = resume_changes(candidates[0].record.get("config", {}), cfg)
        if refused:
            keys = ",".join(c.split(" ")[0] for c in refused)
            dist.main_print(f"gan-train: {run_dir} was trained with other settings: {'; '.join(refused)}. "
                            f"Resume with the saved values, choose a new run.dir, or accept the change with "
                            f"run.accept_changes={keys}", file=sys.stderr)
            if lease:
                lease.release()
            return EXIT_CONFIG
        if accepted:
            dist.main_print(f"resuming with changed settings: {'; '.join(accepted)}")
    if not candidates and cfg.model.init_from:
        # Before the engines exist: DeepSpeed copies the weights into its fp32 master partitions.
        load = family.init_source(cfg.model.init_from, so) if family.init_source else None
        source = f"read by the {family.name} family"
        if load is None:
            source = ckpt.resolve_init(cfg.model.init_from, so)
            record = ckpt.verify(source, so)
            load = lambda name: (ckpt.load_tensors(ckpt.member(source, record, f"{name}.pt"), so)
                                 if f"{name}.pt" in record["files"] else None)
        (family.init_from or default_init_from)(nets, load)
        dist.main_print(f"initialised from {cfg.model.init_from} ({source})")

    # ------------------------------------------------------------ engines (one per optimizer), EMA copies
    engines, wrapped, plain = {}, {}, {}
    for spec in family.optimizers(cfg):
        engine, modules = dist.make_engine(
            spec.name, {n: nets[n] for n in spec.nets}, spec.param_groups, backend=backend, accelerator=accelerator,
            lr=spec.lr, betas=spec.betas, adam=adam_kwargs(cfg.optim.adam), precision=precision,
            grad_clip=cfg.optim.grad_clip, micro_batch=bpd, zero_stage=cfg.distributed.zero_stage,
            bucket_mb=cfg.distributed.reduce_bucket_mb)
        for group in engine.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule's base; saved with the optimizer
        engines[spec.name] = engine
        plain.update(modules)
        wrapped.update(engine.modules)
    dist.main_print(f"{next(iter(engines.values())).kind}: " + "; ".join(
        f"{name} steps {', '.join(e.modules)}" for name, e in engines.items()) + f" ({precision}: {why})")
    if cfg.train.compile:
        wrapped = {k: torch.compile(m) for k, m in wrapped.items()}
    ema = {n.name: make_ema(plain[n.name]) for n in family.networks
           if n.ema and n.name in plain and cfg.model.ema_kimg > 0}
    ctx = StepContext(nets=wrapped, plain=plain, cfg=cfg, info=info, mean_over_ranks=dist.mean_over_ranks,
                      reuse_fake=accum == 1, autocast=autocast)
    workers = cfg.data.workers
    ts = ckpt.TrainState(nets=plain, ema=ema, engines=engines, counters={
        "step": 0, "nimg": 0, "skipped_steps": 0, "consecutive_bad": 0, "rollbacks": 0}, positions={},
        family_state=ctx.state, snapshot=family.snapshotted(), backend=backend, world_size=world, rank=rank,
        workers=workers, device=device, writer=dist.broadcast_object(lease.token if lease else None))
    state = ts.counters

    def restore_newest(candidates: list[ckpt.Found]) -> ckpt.Found | None:
        """Restore the newest candidate that every rank can load; the others are reported."""
        for found in candidates:
            try:
                if not ckpt.restore(found, ts, so):
                    torch.manual_seed(dist.seed_for(cfg.run.seed, rank, state["nimg"]))
                why = None
            except ckpt.StateMismatch as exc:
                raise ConfigError(str(exc)) from None
            except LOAD_ERRORS as exc:
                why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                log.error("checkpoint %s verified but cannot be loaded (%s); falling back to an older one",
                          found.url, why)
            if not dist.any_rank([why is not None], device)[0]:
                return found
            fallbacks.append(f"step-{found.step:08d}: cannot be loaded" + (f" ({why})" if why else " on another rank"))
        return None

    fallbacks: list[str] = []
    if candidates:
        found = restore_newest(candidates)
        if found is None:
            dist.main_print(f"gan-train: {ckpt.no_usable_message(run_dir, fallbacks)}", file=sys.stderr)
            if lease:
                lease.release()
            return EXIT_NO_CHECKPOINT
        skipped = f" ({len(fallbacks)} newer checkpoint(s) could not be loaded)" if fallbacks else ""
        dist.main_print(f"resumed from {found.url} at kimg {state['nimg'] / 1000:.3f}{skipped}")
        ckpt.ensure_snapshot(run_dir, ts, found, so)
    else:
        torch.manual_seed(dist.seed_for(cfg.run.seed, rank))
    if dist.is_main():
        lease.start_heartbeat()
        io.remove(io.join(run_dir, PREEMPTED_MARKER), so)
        io.remove(io.join(run_dir, DONE_MARKER), so)
        # config.json is this segment's config; each segment's is kept by the step it started at.
        io.atomic_write_json(io.join(run_dir, "config.json"), to_dict(cfg), so)
        io.atomic_write_json(io.join(run_dir, "configs", f"step-{state['step']:08d}.json"), to_dict(cfg), so)
        io.atomic_write_json(io.join(run_dir, "run.json"),
                             {**describe_run(command, world, precision, accum), "backend": backend}, so)

    # ------------------------------------------------------------ the data streams
    streams = family.streams(cfg, info, cfg.data.split)

    def make_loader(stream: Stream):
        positions = ts.positions.setdefault(stream.name, {})
        data = make_stream(cfg.data.url, stream.split, train=True, rank=rank, world_size=world, num_workers=workers,
                           seed=cfg.run.seed, fields=stream.fields,
                           augment=Augment(cfg.data.load_size, cfg.data.crop_size, cfg.data.flip),
                           shuffle_buffer=cfg.data.shuffle_buffer, shuffle_buffer_mb=cfg.data.shuffle_buffer_mb,
                           max_bad_samples=cfg.data.max_bad_samples, storage_options=so, start=positions,
                           batch_size=bpd, handover=ts.handovers.get(stream.name))
        # Batched in the stream (default_collate, see data/stream.py). Its own generator:
        # creating the loader must not move the training RNG.
        return iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                                pin_memory=device.type == "cuda",
                                                worker_init_fn=ignore_preemption_signals,
                                                generator=torch.Generator().manual_seed(cfg.run.seed)))

    loaders = {s.name: make_loader(s) for s in streams}
    consumed = {"batches": 0, "bad": {}}

    def fetch() -> dict:
        batches = {name: next(loader) for name, loader in loaders.items()}
        for name, batch in batches.items():
            positions = ts.positions[name]
            for slot, epoch, index, bad in zip(batch["__slot__"].tolist(), batch["__epoch__"].tolist(),
                                               batch["__index__"].tolist(), batch["__bad__"].tolist()):
                positions[slot] = max(positions.get(slot, (0, 0)), (epoch, index + 1))
                consumed["bad"][(name, slot)] = max(consumed["bad"].get((name, slot), 0), bad)
        consumed["batches"] += 1
        return family.prepare(batches, device, cfg, info)

    monitor = Monitor(cfg, run_dir, family, info, device, enabled=dist.is_main())
    if cfg.eval.sidecar and dist.is_main():
        start_sidecar(run_dir, os.getpid())  # the loop itself does no evaluation work and never waits for it

    # ------------------------------------------------------------ the loop
    flags = {"stop": False, "lost": False}  # a preemption signal / a lost lease, seen by any rank

    def agree(ok_here: bool) -> bool:
        """Whether every rank may step; also learns whether any rank was preempted or lost the lease."""
        bad, flags["stop"], flags["lost"] = dist.any_rank(
            [not ok_here, preemption.signal is not None, lease is not None and lease.lost], device)
        return not bad

    def save_checkpoint() -> bool:
        """Commit a checkpoint and its snapshot; False, with nothing written, when another job has
        taken the run directory over."""
        if dist.any_rank([lease is not None and not lease.still_mine()], device)[0]:
            flags["lost"] = True
            return False
        meta = {"step": state["step"], "nimg": state["nimg"], "kimg": state["nimg"] / 1000, "world_size": world,
                "config": to_dict(cfg)}
        raced = False
        try:
            ckpt.save(run_dir, ts, meta, cfg.checkpoint.keep_last, cfg.checkpoint.keep_snapshots, so,
                      holder=lease and (lambda: (lease.holder() or {}).get("token")))
        except ckpt.CommitRaced as exc:  # another writer committed this step first
            log.error("%s", exc)
            raced = True
        if dist.any_rank([raced], device)[0]:
            flags["lost"] = True
            return False
        return True

    phases = family.phases(cfg)
    total_nimg = int(cfg.train.total_kimg * 1000)
    ckpt_every = max(1, int(cfg.checkpoint.every_kimg * 1000))
    next_ckpt = (state["nimg"] // ckpt_every + 1) * ckpt_every
    exit_code = EXIT_OK
    first_nan = cfg.train.debug_nan_step if cfg.train.debug_nan_step is not None else -1
    try:
        monitor.start(state["nimg"], total_nimg)
        why = None
    except TrackerError as exc:  # the main rank's: every rank stops before the first step
        why = str(exc)
    if dist.any_rank([why is not None], device)[0]:
        dist.main_print(f"gan-train: error: {why}", file=sys.stderr)
        if lease:
            lease.release()
        return EXIT_CONFIG
    segment = (time.perf_counter(), state["nimg"])
    # The previous iteration's optimizer epoch, also after a resume: a reset falls on the same
    # iteration as in a run that was never stopped.
    epoch_of = family.optimizer_epoch
    opt_epoch = epoch_of(cfg, max(0, state["nimg"] - cfg.train.batch_size)) if epoch_of else None
    while state["nimg"] < total_nimg:
        if epoch_of is not None and epoch_of(cfg, state["nimg"]) != opt_epoch:
            opt_epoch = epoch_of(cfg, state["nimg"])
            for engine in engines.values():
                engine.reset_state()
        for engine in engines.values():
            for group in engine.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(cfg, state["nimg"])
        ctx.nimg, ctx.step = state["nimg"], state["step"]
        poison = rank == cfg.train.debug_nan_rank and first_nan <= state["step"] < first_nan + cfg.train.debug_nan_count
        stepped = run_iteration(phases, ctx, engines, fetch, accum, agree, monitor, poison)
        state["step"] += 1
        state["nimg"] += cfg.train.batch_size
        if stepped:
            state["consecutive_bad"] = 0
            beta = ema_beta(cfg.train.batch_size, state["nimg"], cfg.model.ema_kimg, cfg.model.ema_rampup)
            for name, copy in ema.items():
                update_ema(copy, plain[name], beta)
        else:
            state["skipped_steps"] += 1
            state["consecutive_bad"] += 1
            log.warning("step %d skipped on every rank: non-finite loss or gradient", state["step"])
        monitor.step(state, engines, sum(consumed["bad"].values()), plain, {**plain, **ema})
        if flags["lost"]:
            break

        if state["consecutive_bad"] > cfg.train.max_bad_steps:
            found = None
            if state["rollbacks"] < cfg.train.max_rollbacks:
                rollbacks = state["rollbacks"]
                listed = ckpt.verified_list(run_dir, so) if dist.is_main() else None
                found = restore_newest(dist.broadcast_object(listed))
                state["rollbacks"] = rollbacks  # restore() brought back the checkpoint's count
            if found is None:
                dist.main_print(f"diverged: {state['consecutive_bad']} consecutive non-finite steps and "
                                f"{state['rollbacks']} rollbacks; stopping (exit code {EXIT_DIVERGED})")
                exit_code = EXIT_DIVERGED
                break
            state["rollbacks"], state["consecutive_bad"] = state["rollbacks"] + 1, 0
            # A retry from the same state with the same randomness would diverge the same way.
            torch.manual_seed(dist.seed_for(cfg.run.seed, rank, state["nimg"] + state["rollbacks"] * 1_000_003))
            loaders.update({s.name: make_loader(s) for s in streams})
            consumed["batches"] = 0
            dist.main_print(f"rolled back to {found.url} (rollback {state['rollbacks']} of {cfg.train.max_rollbacks})")
            continue

        # Checkpoints fall where every DataLoader worker has delivered the same number of
        # batches, so a resumed loader's round-robin restarts exactly in step.
        aligned = consumed["batches"] % max(1, workers) == 0
        due = state["nimg"] >= next_ckpt or state["nimg"] >= total_nimg
        if aligned and (due or flags["stop"]):
            if not save_checkpoint():
                break
            next_ckpt = (state["nimg"] // ckpt_every + 1) * ckpt_every
            if flags["stop"] and state["nimg"] < total_nimg:
                if dist.is_main():
                    io.atomic_write_json(io.join(run_dir, PREEMPTED_MARKER),
                                         {"step": state["step"], "nimg": state["nimg"], "time": time.time()}, so)
                dist.main_print(f"preempted: saved at kimg {state['nimg'] / 1000:.3f}; "
                                f"exit code {EXIT_PREEMPTED} (requeue to resume)")
                exit_code = EXIT_PREEMPTED
                break
    else:
        if consumed["batches"] % max(1, workers):
            save_checkpoint()  # the run is complete; exact data alignment no longer matters
    if flags["lost"]:
        dist.main_print(f"gan-train: another job took over {run_dir} (its lease); this job stops without writing "
                        f"(exit code {EXIT_RUN_DIR_BUSY})", file=sys.stderr)
        exit_code = EXIT_RUN_DIR_BUSY
    monitor.close(state)
    if exit_code == EXIT_OK:
        bad = int(dist.all_sum([sum(consumed["bad"].values())], device)[0])  # every rank gets here
        if dist.is_main():
            io.atomic_write_json(io.join(run_dir, DONE_MARKER), {"step": state["step"], "nimg": state["nimg"],
                                                                 "time": time.time()}, so)
        dist.main_print(end_of_run(run_dir, state, segment, bad, cfg.eval.sidecar))
    if lease is not None:
        lease.release()
    accelerator.end_training()
    return exit_code

