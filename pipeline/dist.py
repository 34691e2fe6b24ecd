"""The seam over process state: rank and world size, main-process printing, agreement between
ranks, buffer averaging, per-rank seeds. Only this module, the training loop and the eval watcher
touch ``accelerate`` or ``torch.distributed``."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


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


def seed_for(seed: int, rank_: int, nimg: int = 0) -> int:
    """A per-rank seed derived from ``(seed, rank, images seen)``."""
    return (seed * 1_000_003 + rank_ * 7919 + nimg) % (2**63 - 1)


def make_accelerator(precision: str, accumulation: int = 1):
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
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False),
                InitProcessGroupKwargs(timeout=timedelta(minutes=10))]  # accelerate picks gloo or nccl
    return Accelerator(cpu=cpu, mixed_precision="no", gradient_accumulation_steps=accumulation,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP (or compiled) wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
