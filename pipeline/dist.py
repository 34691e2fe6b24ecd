"""The seam over process state: rank and world size, main-process printing, agreement between
ranks, buffer averaging, per-rank seeds, and the DeepSpeed ZeRO engines. Only this module, the
training loop and the eval watcher touch ``accelerate``, ``deepspeed`` or ``torch.distributed``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def shutdown() -> None:
    """Leave the process group at a normal end (what ``Accelerator.end_training`` does for the
    trainer): a group left to the interpreter's finalizers can abort the process at exit."""
    if is_initialized():
        torch_dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """End a rank of a multi-process job after its work: flush, then leave without the
    interpreter's finalization, during which a rank of a finished gloo job sometimes aborted
    ("terminate called without an active exception": a C++ thread still joinable when its object
    was destroyed), turning a finished job into a failed one. Every file is written and closed
    before this is called."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def main_print(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def any_rank(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """For each flag: is it set on any rank? One small all-reduce for all of them."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if is_initialized() and world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks (counters such as skipped samples)."""
    t = torch.tensor([float(v) for v in values], device=device)
    if is_initialized() and world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def averaged_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with floating-point buffers (BatchNorm running stats) averaged
    over ranks, as copies: the live rank-local buffers are left untouched.

    DDP does not broadcast buffers every forward here (``broadcast_buffers=False``), so ranks'
    running statistics drift apart; what is saved for evaluation is their average.
    """
    state = dict(module.state_dict())
    if not (is_initialized() and world_size() > 1):
        return state
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            avg = buf.detach().clone()
            torch_dist.all_reduce(avg, op=torch_dist.ReduceOp.SUM)
            state[name] = avg.div_(world_size())
    return state


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (small metadata only: a checkpoint choice)."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (evaluation features: small enough)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


def sync_context(module: torch.nn.Module, sync: bool):
    """``module.no_sync()`` on accumulation micro-steps that must not all-reduce gradients."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def exit_with_launcher(code: int, poll_sec: float = 1.0) -> bool:
    """Under torchrun (``accelerate launch``), end this rank when its launcher is gone.

    torchrun starts every rank in a session of its own, so a launcher killed by the OOM killer,
    a node agent or ``kill -9`` of the job's process group leaves its ranks training with nobody
    to stop them, and a relaunch would train beside them. A daemon thread watches the parent pid
    and exits with ``code`` within about ``poll_sec`` of the parent's death (DataLoader workers
    notice their own parent's exit). Without a launcher (a plain ``python`` run, perhaps under
    ``nohup``) nothing is watched. Returns whether the watch started."""
    import threading
    import time

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_sec)
        stderr(f"rank {rank()}: the launcher (pid {parent}) is gone; this rank stops now (exit code {code})")
        os._exit(code)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True


def seed_for(seed: int, rank_: int, nimg: int = 0) -> int:
    """A per-rank seed derived from ``(seed, rank, images seen)``."""
    return (seed * 1_000_003 + rank_ * 7919 + nimg) % (2**63 - 1)


def make_accelerator(precision: str, accumulation: int = 1, timeout_sec: float = 600.0):
    """An Accelerator on CUDA if present, else CPU with gloo; mixed precision is ours, not its.

    Accelerate would keep one GradScaler for all optimizers (wrong for G and D) and silently
    ignores fp16 on CPU, so autocast and loss scaling are done by the loop.
    """
    import warnings
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # We do want DDP's broadcast_buffers=False (no buffer broadcast every forward); accelerate
    # passes it through and torch warns that the name is deprecated.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    cpu = not torch.cuda.is_available()
    # A DeepSpeed launch config makes Accelerate build a DeepSpeed plugin of its own (one engine
    # for everything); our engines are made by make_zero_engine, so Accelerate only sets up the
    # process group here (resolve_backend has read the variable before).
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False),
                InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_sec))]  # accelerate picks gloo or nccl
    return Accelerator(cpu=cpu, mixed_precision="no", gradient_accumulation_steps=accumulation,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


def collective_failure(exc: BaseException, timeout_sec: float) -> str | None:
    """One line for a collective that failed because of another rank (stopped, swapped out, on a
    dead node, or gone), or None for any other error."""
    text = str(exc)
    if not (isinstance(exc, torch_dist.DistError) or any(w in text for w in ("gloo", "NCCL", "c10d"))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:200]
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"rank {rank()}: a collective did not complete within distributed.timeout_sec={timeout_sec:g}: another "
                f"rank stopped answering (stopped, swapped out, a dead node, a stalled data read); the job stops, "
                f"and running it again resumes from the last checkpoint ({first})")
    return (f"rank {rank()}: a collective failed because another rank is gone; the job stops, and running it "
            f"again resumes from the last checkpoint ({first})")


def resolve_backend(backend: str) -> str:
    """``ddp`` or ``deepspeed``: ``auto`` follows the launcher (a DeepSpeed accelerate config sets
    ``ACCELERATE_USE_DEEPSPEED=true``)."""
    if backend != "auto":
        return backend
    return "deepspeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else "ddp"


def resolve_zero_stage(stage: int | None) -> int:
    """The configured ZeRO stage, else the launcher's (``deepspeed_config: zero_stage``), else 2."""
    if stage is not None:
        return stage
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launcher is None:
        return 2
    if launcher not in ("1", "2"):
        raise ValueError(f"the accelerate config asks for DeepSpeed ZeRO stage {launcher}; G and D engines support "
                         f"stage 1 or 2 (set zero_stage in the accelerate config, or distributed.zero_stage)")
    return int(launcher)


class DDPEngine:
    """One optimizer over one or more networks, each its own DDP module (never one wrapper around
    the whole GAN). The loop drives every engine the same way: ``backward`` per micro-batch (under
    ``sync_context``: gradients all-reduced on the last micro-batch only), ``check`` (the local
    verdict on the gradients), then ``step(skip)`` once the ranks have agreed.

    fp16: a GradScaler of its own (sharing one would let D's overflow shrink G's scale); its
    overflows are its business, so ``check`` then passes and the scaler skips the step itself.
    Parameter groups with ``fixed_until_nimg`` lose their gradients before the step while that
    lasts, so Adam leaves them and their state untouched (freezing by ``requires_grad`` would
    break DDP's reducer)."""

    local_dir = False  # whether ``save_local``/``load_local`` write DeepSpeed files
    kind = "DDP"

    def __init__(self, name: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, grad_clip: float):
        self.name, self.modules, self.optimizer, self.scaler = name, modules, optimizer, scaler
        self.grad_clip = grad_clip
        if not any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in modules.values()):
            self.kind = "one process"
        self.norm = torch.zeros(())

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def sync_context(self, sync: bool):
        stack = contextlib.ExitStack()
        for module in self.modules.values():
            stack.enter_context(sync_context(module, sync))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def check(self, nimg: int) -> bool:
        """Drop fixed groups' gradients, unscale, measure and clip; whether the norm is finite."""
        for group in self.optimizer.param_groups:
            if group.get("fixed_until_nimg", 0) > nimg:
                for p in group["params"]:
                    p.grad = None  # Adam skips a parameter without a gradient, state and all
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(
            (), device=self.optimizer.param_groups[0]["params"][0].device)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, self.norm)
        return self.scaler is not None or bool(torch.isfinite(self.norm).item())

    def reset_state(self) -> None:
        """Forget the optimizer's state (Adam's moments and step counts): the next step starts as
        the first did. The learning rates and other hyperparameters stay."""
        self.optimizer.state.clear()

    def step(self, skip: bool) -> torch.Tensor:
        """Step, or (``skip``: a rank saw a bad loss or gradient) drop the gradients; the norm."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return self.norm
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.norm

    def state_dicts(self) -> dict[str, dict]:
        """What rank 0 saves of this engine: ``opt`` (and ``scaler`` for fp16)."""
        out = {"opt": self.optimizer.state_dict()}
        if self.scaler:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dicts(self, read) -> None:
        """``read(key)``: the saved state dict of ``state_dicts``' key."""
        self.optimizer.load_state_dict(read("opt"))
        if self.scaler:
            self.scaler.load_state_dict(read("scaler"))

    def save_local(self, local_dir: str) -> None:
        pass

    def load_local(self, local_dir: str) -> None:
        pass


class ZeroEngine:
    """The DeepSpeed ZeRO (stage 1 or 2) path behind ``DDPEngine``'s interface: one engine per
    optimizer over its networks (a ``ModuleDict``), our torch Adam as the client optimizer, the
    engine owning gradient reduction, clipping and the step.

    A skipped step must leave no gradient in the engine, so ``backward`` only keeps the loss
    (no accumulation: the config check refuses it) and ``step`` runs the engine's backward and
    step once the ranks agreed the loss is finite. The engines run in fp32 (bf16 is the loop's
    autocast, as with DDP, where DeepSpeed's bf16 mode would cast whole modules, BatchNorm
    included); fp16 is refused by ``config.deepspeed_limits``."""

    local_dir = True

    def __init__(self, name: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, *,
                 stage: int, micro_batch: int, grad_clip: float, bucket_mb: float):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        bucket = int(bucket_mb * 1e6)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size(),
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                  "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True},
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "gradient_clipping": grad_clip,
            "zero_allow_untested_optimizer": True,  # torch's Adam as the client optimizer
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.name, self.kind = name, f"DeepSpeed ZeRO stage {stage}"
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=torch.nn.ModuleDict(modules), optimizer=optimizer, config=config, dist_init_required=False)
        # Forwards call the networks inside the engine: ZeRO 1/2 reduce through gradient hooks.
        self.modules = dict(self.engine.module.items())
        self.pending: torch.Tensor | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def sync_context(self, sync: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.pending = loss

    def check(self, nimg: int) -> bool:
        return self.pending is not None and bool(torch.isfinite(self.pending).item())

    def step(self, skip: bool) -> torch.Tensor:
        loss, self.pending = self.pending, None
        if skip:
            return torch.tensor(float("nan"))
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # measured before clipping
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def state_dicts(self) -> dict[str, dict]:
        return {}  # the optimizer state is partitioned: saved by the engine (save_local)

    def load_state_dicts(self, read) -> None:
        pass

    def save_local(self, local_dir: str) -> None:
        """Every rank writes its partitions (rank 0 also the module states) under
        ``local_dir/<name>/``. Collective. Nothing is marked "latest": which checkpoint counts is
        our commit record's business."""
        self.engine.save_checkpoint(local_dir, tag=self.name, client_state={}, save_latest=False)

    def load_local(self, local_dir: str) -> None:
        """Restore weights, fp32 master weights and optimizer state. Collective. DeepSpeed's files
        are its own (pickled) format: they are read only from checkpoints whose commit record
        verified every file's SHA-256."""
        if not (Path(local_dir) / self.name).is_dir():
            raise FileNotFoundError(f"no DeepSpeed state for {self.name} in {local_dir}")
        path, _ = self.engine.load_checkpoint(local_dir, tag=self.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the {self.name} engine from {local_dir}/{self.name}")


def make_engine(name: str, nets: dict[str, torch.nn.Module], groups, *, backend: str, accelerator, lr: float,
                betas: tuple[float, float], adam: dict, precision: str, grad_clip: float, micro_batch: int,
                zero_stage: int | None, bucket_mb: float):
    """The engine of one optimizer over ``nets`` (plain modules, moved to the device here):
    ``groups(nets)`` gives its parameter groups. Returns ``(engine, plain modules)``."""
    device = accelerator.device
    if backend == "deepspeed":
        nets = {k: m.to(device) for k, m in nets.items()}
        optimizer = torch.optim.Adam(groups(nets), lr=lr, betas=betas, **adam)
        return ZeroEngine(name, nets, optimizer, stage=resolve_zero_stage(zero_stage), micro_batch=micro_batch,
                          grad_clip=grad_clip, bucket_mb=bucket_mb), nets
    wrapped = {k: accelerator.prepare(m) for k, m in nets.items()}
    plain = {k: unwrap(m) for k, m in wrapped.items()}
    optimizer = torch.optim.Adam(groups(plain), lr=lr, betas=betas, **adam)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return DDPEngine(name, wrapped, optimizer, scaler, grad_clip), plain


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a new tensor; every rank must call it)."""
    out = t.detach().clone()
    if is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        out /= world_size()
    return out


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP (or compiled) wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_tracker(tracker: str, project: str, /, **kwargs):
    """accelerate's experiment tracker ``tracker`` (``wandb``, ``mlflow``) for ``project``, not yet
    started. Its methods ask accelerate's process state which process is the main one: an
    evaluator of one process has none yet, so it is made here (with more processes the process
    group already made it, and this is a no-op)."""
    from accelerate.state import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()
    return LOGGER_TYPE_TO_CLASS[tracker](project, **kwargs)
