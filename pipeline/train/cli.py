"""``gan-train``: parse ``--config NAME [key=value ...]``, check it strictly, then train (or, with
``--dry-run``, print the resolved config, the run directory and every network's size)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
import traceback

from .. import io
from ..config import ConfigError, deepspeed_limits, launcher_precision, load_config, to_dict
from .preemption import Preemption

CONFIG_ERROR_PAUSE_S = 5.0  # how long a rank other than 0 waits for rank 0 to report a config error
EXIT_PEER_FAILED = 7  # a collective failed or timed out because of another rank


def _is_first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def redacted(arg: str) -> str:
    """A command-line argument as run.json records it: storage options (credentials) left out."""
    key, sep, _ = arg.partition("=")
    return f"{key}=<redacted>" if sep and key.strip().endswith("storage_options") else arg


def dry_run(cfg) -> int:
    import torch

    from ..config import resume_changes
    from ..data.manifest import ManifestError, load_manifest
    from ..families import get_family
    from . import checkpoint as ckpt
    from .family import DataInfo, describe

    print(json.dumps(to_dict(cfg), indent=2))
    print(f"run directory: {cfg.run.dir}")
    so = cfg.data.storage_options or None
    try:
        found = ckpt.latest(cfg.run.dir, storage_options=so) if cfg.run.resume != "never" else None
    except ckpt.NoUsableCheckpoint as exc:
        print(f"would stop: {exc}")
        found = None
    if found is None:
        print("would start a new run" + (" (run.resume=must: refused, nothing to resume)"
                                         if cfg.run.resume == "must" else ""))
    else:
        accepted, refused = resume_changes(found.record.get("config", {}), cfg)
        print(f"would resume from {found.url} at kimg {found.record.get('nimg', 0) / 1000:.3f}")
        for change in accepted:
            print(f"  changed, accepted: {change}")
        for change in refused:
            print(f"  changed, REFUSED (run.accept_changes or a new run.dir): {change}")
    try:
        manifest = load_manifest(cfg.data.url, cfg.data.storage_options or None)
        info = DataInfo.of(manifest)
    except ManifestError as exc:
        print(f"(no shards at data.url yet: {exc}; sizes shown for 35 label classes)")
        info = DataInfo("label2image", 35, ("image", "label"))
    torch.manual_seed(cfg.run.seed)
    for name, net in get_family(cfg.model.family).build(cfg, info).items():
        print(f"{name}: {describe(net)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Before anything slow, so that a notice during start-up is kept rather than fatal; and once
    # the outcome is decided, notices are ignored so that the exit code stays the outcome's.
    preemption = Preemption.listen()
    try:
        return _main(argv)
    finally:
        preemption.settle()


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="gan-train", description=__doc__)
    p.add_argument("--config", required=True, help="a shipped config's name, a .yaml path, or a run's config.json")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and network sizes")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.total_kimg=5 run.dir=s3://b/run")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        asked = launcher_precision(cfg.train.precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
        if asked and asked != cfg.train.precision:
            cfg = load_config(args.config, [*args.overrides, f"train.precision={asked}"])
        from ..dist import resolve_backend

        if cfg.distributed.backend == "auto" and resolve_backend("auto") == "deepspeed":
            deepspeed_limits(cfg)  # launched with a DeepSpeed accelerate config: the same checks, as early
        if not args.dry_run:
            cfg.model.check_files()
    except ConfigError as exc:
        if not _is_first_process():
            # Rank 0 says it once, and when it exits the launcher stops this rank (its SIGTERM,
            # recorded as a notice, ends the pause silently). Leaving first would let
            # the launcher stop rank 0 before it has said anything; a rank that is still here
            # after the pause (rank 0 elsewhere, on another node) says it too.
            notices = Preemption.listen()
            deadline = time.monotonic() + CONFIG_ERROR_PAUSE_S
            while notices.signal is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if notices.signal is not None:
                return 2
        print(f"gan-train: config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            return dry_run(cfg)
        except io.MissingStorageBackend as exc:
            print(f"gan-train: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO if _is_first_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..data.manifest import ManifestError
    from .loop import train

    try:
        args_given = argv if argv is not None else sys.argv[1:]
        code = train(cfg, command=shlex.join([sys.argv[0], *map(redacted, args_given)]))
    except (ConfigError, ManifestError, io.MissingStorageBackend) as exc:  # found at start-up: cannot go on
        print(f"gan-train: error: {exc}", file=sys.stderr, flush=True)
        os._exit(2)  # as below: DataLoader workers must not be joined
    except Exception as exc:
        from ..dist import collective_failure

        why = collective_failure(exc, cfg.distributed.timeout_sec)
        if why:
            print(f"gan-train: {why}", file=sys.stderr, flush=True)
            os._exit(EXIT_PEER_FAILED)
        # DataLoader workers ignore SIGTERM (so that SLURM's notice cannot kill them before the
        # rank saves); after an exception, multiprocessing's exit handler would terminate and
        # then join them forever, and this rank, and every rank waiting on it, would hang. Report
        # and leave now: the launcher ends the other ranks, and orphaned workers notice their
        # parent is gone and exit.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    from .. import dist

    if dist.world_size() > 1:
        dist.exit_now(code)  # see there: a finished rank must not abort in the interpreter's finalization
    return code
