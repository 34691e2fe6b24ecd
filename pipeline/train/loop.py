"""The training loop: one readable function from launch to exit, over any family.

Progress is counted in images seen. G and D are separate DDP modules (or, with
``distributed.backend=deepspeed``, separate DeepSpeed ZeRO engines); precision is ours
(autocast + one GradScaler per network for fp16); a non-finite step is skipped on every rank;
checkpoints are committed last and resume exactly, data position included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import dist, io
from ..config import Config, deepspeed_limits, to_dict
from ..data.manifest import load_manifest
from ..data.stream import make_stream
from ..data.transforms import Augment
from . import checkpoint as ckpt
from .ema import ema_beta, make_ema, update_ema
from .family import DataInfo, StepContext, get_family
from .stats import Monitor, describe_run

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 3, 75
PREEMPTED_MARKER = "PREEMPTED.json"
DONE_MARKER = "DONE.json"  # the evaluator's signal that no more snapshots will come
# Launcher variables a sidecar evaluator must not inherit, or it would try to join our group.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "ACCELERATE_", "OMP_NUM_THREADS")


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's notice) only set a flag; the loop acts at a step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker init: SLURM signals every process of a job step, workers included; a
    worker killed by SIGTERM would crash its rank before the rank could save. The rank's main
    process decides, and ends its workers itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def start_sidecar(run_dir: str) -> subprocess.Popen:
    """One evaluator process beside the main process, in a session of its own; never waited on."""
    root = Path(__file__).resolve().parent.parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    log_path = Path(io.fs_for(run_dir)[1]) / "eval" / "sidecar.log" if io.is_local(run_dir) \
        else Path(tempfile.mkdtemp(prefix="gan-eval-")) / "sidecar.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    io.remove(io.join(run_dir, "eval", "FINISHED.json"))  # a previous evaluator's, not this one's
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.eval.cli", "--run", run_dir], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    dist.main_print(f"evaluation sidecar started (pid {proc.pid}, log {log_path})")
    return proc


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def make_scalers(precision: str, device: torch.device) -> dict | None:
    """fp16: one GradScaler per network; sharing one would let D's overflow shrink G's scale.
    bf16 and fp32 need none."""
    if precision != "fp16":
        return None
    return {k: torch.amp.GradScaler(device.type) for k in ("G", "D")}


def adam_kwargs(impl: str) -> dict:
    """``torch.optim.Adam`` keyword arguments for ``optim.adam``."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]


def lr_factor(cfg: Config, nimg: int) -> float:
    """Constant, or constant until ``decay_start_kimg`` then linear to 0 at ``total_kimg``."""
    if cfg.optim.schedule == "constant":
        return 1.0
    start, end = cfg.optim.decay_start_kimg * 1000, cfg.train.total_kimg * 1000
    if nimg <= start or end <= start:
        return 1.0
    return max(0.0, 1.0 - (nimg - start) / (end - start))


def train(cfg: Config, command: str = "") -> int:
    # First of all: a preemption notice that arrives during start-up must not kill the rank.
    preemption = Preemption()
    # ------------------------------------------------------------ processes, devices, precision
    precision = resolve_precision(cfg.train.precision)
    backend = dist.resolve_backend(cfg.distributed.backend)  # before make_accelerator: it reads the launcher's
    accelerator = dist.make_accelerator(precision)
    device, rank, world = accelerator.device, dist.rank(), dist.world_size()
    bpd = cfg.train.batch_per_device or cfg.train.batch_size // world
    if bpd < 1 or cfg.train.batch_size % (bpd * world):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not a multiple of "
                         f"batch_per_device={bpd} x {world} processes")
    accum = cfg.train.batch_size // (bpd * world)
    if backend == "deepspeed":
        deepspeed_limits(cfg)
        if accum != 1:
            # The divergence guard skips a step on every rank before any gradient exists; with
            # accumulation inside an engine, earlier micro-batches' gradients could not be dropped.
            raise ValueError(f"distributed.backend=deepspeed needs no gradient accumulation: train.batch_size="
                             f"{cfg.train.batch_size} must equal batch_per_device={bpd} x {world} processes")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    so = cfg.data.storage_options or None
    run_dir = cfg.run.dir

    # ------------------------------------------------------------ data description and networks
    manifest = load_manifest(cfg.data.url, so)
    family = get_family(cfg.model.family)
    info = DataInfo(manifest.task, manifest.num_classes, tuple(manifest.fields))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    nets = family.build(cfg, info)
    G, D = nets["G"], nets["D"]
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    # The newest committed checkpoint, chosen once by rank 0 for everyone.
    found = dist.broadcast_object(ckpt.latest(run_dir, storage_options=so) if dist.is_main() else None)
    if found is None and cfg.model.init_from:
        # Before the engines exist: DeepSpeed copies the weights into its fp32 master partitions.
        source = ckpt.load_tensors(io.join(ckpt.resolve_init(cfg.model.init_from, so), "G.pt"), so)
        (family.init_from or (lambda g, st: g.load_state_dict(st)))(G, source)
        dist.main_print(f"G initialised from {cfg.model.init_from}")
    G_ema = make_ema(G).to(device)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    impl = adam_kwargs(cfg.optim.adam)
    base_lr = {"G": cfg.optim.lr_G, "D": cfg.optim.lr_D}
    engines = None
    if backend == "deepspeed":
        # One engine per network, never one around the whole GAN: each has its own partitions.
        stage = dist.resolve_zero_stage(cfg.distributed.zero_stage)
        G, D = G.to(device), D.to(device)
        opt, engines = {}, {}
        for k, net in (("G", G), ("D", D)):
            adam = torch.optim.Adam(net.parameters(), lr=base_lr[k], betas=betas, **impl)
            engines[k], opt[k] = dist.make_zero_engine(net, adam, stage=stage, micro_batch=bpd,
                                                       grad_clip=cfg.optim.grad_clip,
                                                       bucket_mb=cfg.distributed.reduce_bucket_mb)
        G_ddp, D_ddp = engines["G"], engines["D"]
        scalers = None  # fp32 engines; bf16 is autocast
        dist.main_print(f"DeepSpeed ZeRO stage {stage}: G and D on separate engines ({precision})")
    else:
        # G and D are prepared separately: two DDP modules, never one wrapper around the whole GAN.
        G_ddp, D_ddp = accelerator.prepare(G), accelerator.prepare(D)
        G, D = dist.unwrap(G_ddp), dist.unwrap(D_ddp)
        opt = {"G": torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_G, betas=betas, **impl),
               "D": torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_D, betas=betas, **impl)}
        scalers = make_scalers(precision, device)
    if cfg.train.compile:
        G_ddp, D_ddp = torch.compile(G_ddp), torch.compile(D_ddp)
    modules = {"G": G_ddp, "D": D_ddp}

    # ------------------------------------------------------------ run directory, resume
    if dist.is_main():
        io.makedirs(run_dir, so)
        io.remove(io.join(run_dir, PREEMPTED_MARKER), so)
        io.remove(io.join(run_dir, DONE_MARKER), so)
        io.atomic_write_json(io.join(run_dir, "config.json"), to_dict(cfg), so)
        io.atomic_write_json(io.join(run_dir, "run.json"),
                             {**describe_run(command, world, precision, accum), "backend": backend}, so)
    state = {"step": 0, "nimg": 0, "skipped_steps": 0, "consecutive_bad": 0, "rollbacks": 0}
    positions: dict[int, tuple[int, int]] = {}
    flags = {"stop": False}  # a preemption signal seen by any rank

    def restore(found: ckpt.Found) -> None:
        saved = ckpt.read_json(io.join(found.url, "state.json"), so)
        saved_backend = saved.get("backend", "ddp")
        if saved_backend != backend:
            raise RuntimeError(f"{found.url} was written with distributed.backend={saved_backend}; resume it with "
                               f"the same backend (this run uses {backend})")
        if engines and saved["world_size"] != world:
            raise RuntimeError(f"{found.url} holds DeepSpeed ZeRO partitions for {saved['world_size']} processes; "
                               f"resume it with {saved['world_size']} processes (this run has {world})")
        G.load_state_dict(ckpt.load_tensors(io.join(found.url, "G.pt"), so))
        D.load_state_dict(ckpt.load_tensors(io.join(found.url, "D.pt"), so))
        G_ema.load_state_dict(ckpt.load_tensors(io.join(found.url, "G_ema.pt"), so))
        if engines:
            with ckpt.local_copy(io.join(found.url, ckpt.ZERO_DIR), so) as local:
                dist.zero_load(engines, local)  # weights, fp32 master partitions, Adam state
        for k in ("G", "D") if not engines else ():
            opt[k].load_state_dict(ckpt.load_tensors(io.join(found.url, f"opt_{k}.pt"), so))
            if scalers:
                scalers[k].load_state_dict(ckpt.load_tensors(io.join(found.url, f"scaler_{k}.pt"), so))
        state.update({k: saved[k] for k in state})
        positions.clear()
        mine = ckpt.load_tensors(io.join(found.url, f"rank-{rank:03d}.pt"), so) \
            if saved["world_size"] == world else None
        if mine is None:
            log.warning("checkpoint %s was written by %d processes, this run has %d: the data stream "
                        "restarts at a fresh epoch position", found.url, saved["world_size"], world)
            return
        for name, module in (("G", G), ("D", D), ("G_ema", G_ema)):
            for key, buf in module.named_buffers():
                buf.copy_(mine["buffers"][name][key])
        torch.set_rng_state(mine["cpu_rng"])
        if device.type == "cuda" and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
        positions.update({int(s): (int(e), int(i)) for s, (e, i) in mine["positions"].items()})

    if found is not None:
        restore(found)
        dist.main_print(f"resumed from {found.url} at kimg {state['nimg'] / 1000:.3f}")
    else:
        torch.manual_seed(dist.seed_for(cfg.run.seed, rank))

    # ------------------------------------------------------------ the data stream
    workers = cfg.data.workers

    def make_loader():
        stream = make_stream(cfg.data.url, cfg.data.split, train=True, rank=rank, world_size=world,
                             num_workers=workers, seed=cfg.run.seed, fields=family.fields(info),
                             augment=Augment(cfg.data.load_size, cfg.data.crop_size, cfg.data.flip),
                             shuffle_buffer=cfg.data.shuffle_buffer, shuffle_buffer_mb=cfg.data.shuffle_buffer_mb,
                             max_bad_samples=cfg.data.max_bad_samples,
                             storage_options=so, start=positions, batch_size=bpd)
        # Batched in the stream (default_collate, see data/stream.py). Its own generator:
        # creating the loader must not move the training RNG.
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                pin_memory=device.type == "cuda",
                                                worker_init_fn=ignore_preemption_signals,
                                                generator=torch.Generator().manual_seed(cfg.run.seed)))

    batches = make_loader()
    consumed = {"batches": 0, "bad": {}}

    def next_batch() -> dict:
        batch = next(batches)
        for slot, epoch, index, bad in zip(batch["__slot__"].tolist(), batch["__epoch__"].tolist(),
                                           batch["__index__"].tolist(), batch["__bad__"].tolist()):
            positions[slot] = max(positions.get(slot, (0, 0)), (epoch, index + 1))
            consumed["bad"][slot] = max(consumed["bad"].get(slot, 0), bad)
        consumed["batches"] += 1
        return family.prepare(batch, device, cfg, info)

    monitor = Monitor(cfg, run_dir, family, info, device, enabled=dist.is_main())
    if cfg.eval.sidecar and dist.is_main():
        start_sidecar(run_dir)  # the loop itself does no evaluation work and never waits for it
    preemption = Preemption()

    # ------------------------------------------------------------ checkpointing
    def save_checkpoint() -> None:
        nets = {"G": G, "D": D, "G_ema": G_ema}
        shared = {name: dist.averaged_state(m) for name, m in nets.items()}
        prints = {name: ckpt.fingerprint(st) for name, st in shared.items()}
        # Every rank must hold the same networks; a mismatch is a bug worth stopping for.
        agree = not dist.any_rank([prints != dist.broadcast_object(prints)], device)[0]
        if not agree:
            raise RuntimeError(f"ranks disagree on the networks at step {state['step']}: {prints}")
        url = ckpt.step_url(run_dir, ckpt.CHECKPOINTS, state["step"])
        # Per rank: RNG, data position, and the rank's own running statistics (the shared files
        # hold their average), so a resumed rank continues bit for bit.
        mine = {"cpu_rng": torch.get_rng_state(), "positions": {str(s): list(p) for s, p in positions.items()},
                "fingerprints": prints,
                "buffers": {name: {k: b.detach().clone() for k, b in m.named_buffers()} for name, m in nets.items()}}
        if device.type == "cuda":
            mine["cuda_rng"] = torch.cuda.get_rng_state(device)
        ckpt.save_tensors(io.join(url, f"rank-{rank:03d}.pt"), mine, so)
        if engines:  # collective: every rank writes its own optimizer partitions, inside this step's directory
            with ckpt.staged_upload(io.join(url, ckpt.ZERO_DIR), so) as local:
                dist.zero_save(engines, local)
        if dist.is_main():
            for name, st in shared.items():
                ckpt.save_tensors(io.join(url, f"{name}.pt"), st, so)
            for k in ("G", "D") if not engines else ():
                ckpt.save_tensors(io.join(url, f"opt_{k}.pt"), opt[k].state_dict(), so)
                if scalers:
                    ckpt.save_tensors(io.join(url, f"scaler_{k}.pt"), scalers[k].state_dict(), so)
            ckpt.write_json(io.join(url, "state.json"), {**state, "world_size": world, "workers": workers,
                                                         "backend": backend}, so)
        dist.barrier()  # orders: every rank's file is written before rank 0 hashes and commits
        if dist.is_main():
            meta = {"step": state["step"], "nimg": state["nimg"], "kimg": state["nimg"] / 1000,
                    "world_size": world, "config": to_dict(cfg)}
            ckpt.commit(url, meta, so)
            ckpt.prune(run_dir, cfg.checkpoint.keep_last, ckpt.CHECKPOINTS, so)
            snap = ckpt.step_url(run_dir, ckpt.SNAPSHOTS, state["step"])
            ckpt.save_tensors(io.join(snap, "G_ema.pt"), shared["G_ema"], so)
            ckpt.save_tensors(io.join(snap, "G.pt"), shared["G"], so)
            ckpt.commit(snap, meta, so)
            ckpt.prune(run_dir, cfg.checkpoint.keep_last, ckpt.SNAPSHOTS, so)

    # ------------------------------------------------------------ one optimizer step of one network
    def optimizer_step(net: str, losses: list[dict], extra_bad: bool) -> tuple[bool, torch.Tensor]:
        """Unscale, measure, agree across ranks, then step or skip. Returns (stepped, grad norm)."""
        if net == "G" and family.fixed_params is not None:
            for p in family.fixed_params(G, cfg, state["nimg"]):
                p.grad = None  # Adam skips a parameter without a gradient, state and all
        params = [p for p in modules[net].parameters() if p.grad is not None]
        if scalers:
            scalers[net].unscale_(opt[net])
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=device)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, norm)
        loss_ok = all(torch.isfinite(out["loss"]).item() for out in losses)
        # fp16 overflow is the scaler's business (it skips and lowers the scale); NaN losses are ours.
        grads_ok = scalers is not None or bool(torch.isfinite(norm).item())
        bad, stop = dist.any_rank([not (loss_ok and grads_ok) or extra_bad, preemption.signal is not None],
                                  device)
        flags["stop"] = stop
        if bad:
            opt[net].zero_grad(set_to_none=True)
            if scalers:
                scalers[net].update()
            return False, norm
        if scalers:
            scalers[net].step(opt[net])
            scalers[net].update()
        else:
            opt[net].step()
        opt[net].zero_grad(set_to_none=True)
        return True, norm

    def zero_step(net: str, loss: torch.Tensor, losses: list[dict]) -> tuple[bool, torch.Tensor]:
        """The DeepSpeed path of ``optimizer_step``: agree on the loss first (a skipped step must
        leave no gradient in the engine), then the engine's backward and step. Returns (stepped,
        grad norm)."""
        loss_ok = bool(torch.isfinite(loss).item()) and all(torch.isfinite(out["loss"]).item() for out in losses)
        bad, stop = dist.any_rank([not loss_ok, preemption.signal is not None], device)
        flags["stop"] = stop
        if bad:
            return False, torch.tensor(float("nan"))
        engines[net].backward(loss)
        engines[net].step()
        norm = dist.zero_grad_norm(engines[net])
        return bool(torch.isfinite(norm).item()), norm

    # ------------------------------------------------------------ the loop
    total_nimg = int(cfg.train.total_kimg * 1000)
    ckpt_every = max(1, int(cfg.checkpoint.every_kimg * 1000))
    next_ckpt = (state["nimg"] // ckpt_every + 1) * ckpt_every
    exit_code = EXIT_OK
    first_nan = cfg.train.debug_nan_step if cfg.train.debug_nan_step is not None else -1
    nan_window = (first_nan, first_nan + cfg.train.debug_nan_count)
    monitor.start(state["nimg"], total_nimg)
    while state["nimg"] < total_nimg:
        for k in ("G", "D"):
            for group in opt[k].param_groups:
                group["lr"] = base_lr[k] * lr_factor(cfg, state["nimg"])
        ctx = StepContext(G=G_ddp, D=D_ddp, G_plain=G, D_plain=D, cfg=cfg, info=info, nimg=state["nimg"],
                          reuse_fake=accum == 1, autocast=autocast)
        stepped = {}
        for phase in family.phases:
            if state["step"] % phase.every:
                continue
            repeats = family.d_repeats(cfg) if phase.net == "D" else 1
            for _ in range(repeats):
                if phase.fetch or not stepped:
                    micro = [(next_batch(), {}) for _ in range(accum)]
                # D is frozen during G's backward: no D weight gradients are computed or leaked.
                D.requires_grad_(phase.net == "D")
                losses = []
                for i, (b, scratch) in enumerate(micro):
                    with dist.sync_context(modules[phase.net], sync=i == accum - 1):
                        out = phase.fn(ctx, b, scratch)
                        inject = phase.net == "G" and rank == cfg.train.debug_nan_rank and \
                            nan_window[0] <= state["step"] < nan_window[1]
                        loss = out["loss"] * (float("nan") if inject else 1.0) / accum
                        if not engines:
                            (scalers[phase.net].scale(loss) if scalers else loss).backward()
                    losses.append(out)
                if engines:
                    ok, norm = zero_step(phase.net, loss, losses)  # backward while D is still frozen
                else:
                    ok, norm = optimizer_step(phase.net, losses, extra_bad=False)
                D.requires_grad_(True)
                if ok and phase.after_step:
                    phase.after_step(D if phase.net == "D" else G, cfg)
                stepped[phase.net] = stepped.get(phase.net, True) and ok
                monitor.add(phase.name, losses, norm, skipped=not ok)

        state["step"] += 1
        state["nimg"] += cfg.train.batch_size
        if all(stepped.values()):
            state["consecutive_bad"] = 0
            update_ema(G_ema, G, ema_beta(cfg.train.batch_size, state["nimg"], cfg.train.ema_halflife_kimg,
                                          cfg.train.ema_rampup))
        else:
            state["skipped_steps"] += 1
            state["consecutive_bad"] += 1
            log.warning("step %d skipped on every rank: non-finite loss or gradient", state["step"])
        monitor.step(state, opt, sum(consumed["bad"].values()), G_ema, G, D)

        if state["consecutive_bad"] > cfg.train.max_bad_steps:
            found = dist.broadcast_object(ckpt.latest(run_dir, storage_options=so) if dist.is_main() else None)
            if found is None or state["rollbacks"] >= cfg.train.max_rollbacks:
                dist.main_print(f"diverged: {state['consecutive_bad']} consecutive non-finite steps and "
                                f"{state['rollbacks']} rollbacks; stopping (exit code {EXIT_DIVERGED})")
                exit_code = EXIT_DIVERGED
                break
            rollbacks = state["rollbacks"] + 1
            restore(found)
            state["rollbacks"], state["consecutive_bad"] = rollbacks, 0
            # A retry from the same state with the same randomness would diverge the same way.
            torch.manual_seed(dist.seed_for(cfg.run.seed, rank, state["nimg"] + rollbacks * 1_000_003))
            batches, consumed["batches"] = make_loader(), 0
            dist.main_print(f"rolled back to {found.url} (rollback {rollbacks} of {cfg.train.max_rollbacks})")
            continue

        # Checkpoints fall where every DataLoader worker has delivered the same number of
        # batches, so a resumed loader's round-robin restarts exactly in step.
        aligned = consumed["batches"] % max(1, workers) == 0
        due = state["nimg"] >= next_ckpt or state["nimg"] >= total_nimg
        if aligned and (due or flags["stop"]):
            save_checkpoint()
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
        if not (consumed["batches"] % max(1, workers) == 0):
            save_checkpoint()  # the run is complete; exact data alignment no longer matters
    monitor.close(state)
    if exit_code == EXIT_OK and dist.is_main():
        io.atomic_write_json(io.join(run_dir, DONE_MARKER), {"step": state["step"], "nimg": state["nimg"],
                                                             "time": time.time()}, so)
    accelerator.end_training()
    return exit_code
