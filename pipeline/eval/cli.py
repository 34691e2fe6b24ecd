"""``gan-eval`` / ``python launch/evaluate.py --run RUN_URL``: evaluate a run's committed snapshots,
once or following the run until training is done. Defaults come from the run's saved config
(its ``eval`` section); flags override them."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import io
from ..config import EvalConfig, field_choices

# Launcher variables a sidecar evaluator must not inherit, or it would try to join our group.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "ACCELERATE_", "OMP_NUM_THREADS")


def start_sidecar(run_dir: str, trainer_pid: int) -> subprocess.Popen:
    """One evaluator process beside the main process, in a session of its own; never waited on.
    It follows the run until training is done, or until ``trainer_pid`` is gone (then it
    evaluates what was committed and stops)."""
    root = Path(__file__).resolve().parent.parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    log_path = Path(io.fs_for(run_dir)[1]) / "eval" / "sidecar.log" if io.is_local(run_dir) \
        else Path(tempfile.mkdtemp(prefix="gan-eval-")) / "sidecar.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    io.remove(io.join(run_dir, "eval", "FINISHED.json"))  # a previous evaluator's, not this one's
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.eval.cli", "--run", run_dir,
                                 "--follow-pid", str(trainer_pid)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"evaluation sidecar started (pid {proc.pid}, log {log_path})", flush=True)
    return proc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-eval", description=__doc__)
    p.add_argument("--run", help="the run directory (local path or fsspec URL)")
    p.add_argument("--once", action="store_true", help="evaluate what is committed now, then exit")
    p.add_argument("--step", type=int, help="evaluate this snapshot step only")
    p.add_argument("--policy", choices=("all", "latest", "every_k"))
    p.add_argument("--every-k", type=int)
    p.add_argument("--inception-weights", help="local torch-fidelity InceptionV3 weights file")
    p.add_argument("--lpips-weights", help="local LPIPS weights file (see python -m pipeline.eval.paired)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers per evaluator process")
    p.add_argument("--num-samples", type=int, help="unconditional models: images generated")
    p.add_argument("--max-samples", type=int, help="conditional models: cap on validation samples")
    p.add_argument("--kid-subset-size", type=int)
    p.add_argument("--kid-subsets", type=int)
    p.add_argument("--diversity-pairs", type=int,
                   help="unconditional models: MS-SSIM over this many pairs of generated (and of real) images; 0: off")
    p.add_argument("--reference-cache", help="URL for cached real-image features (default: beside the shards)")
    p.add_argument("--poll-sec", type=float)
    p.add_argument("--best-metric", choices=field_choices(EvalConfig, "best_metric"))
    p.add_argument("--timeout", type=float, dest="timeout_sec",
                   help="when following: stop after this many seconds without the run's DONE marker")
    p.add_argument("--follow-pid", type=int, metavar="PID",
                   help="when following: once process PID (the trainer) is gone, evaluate what is committed and stop")
    p.add_argument("--make-standin-inception", metavar="PATH",
                   help="write a seeded, UNTRAINED InceptionV3 weights file for machines without the real one "
                        "(FIDs from it compare only with each other), then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # Finished: a SIGTERM from now on (SLURM's, as the job ends) must leave the exit code as
        # it is. The evaluator's own handler would not: Python gives back the default action,
        # death, to the signals it handled as the interpreter exits; SIG_IGN survives that.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.make_standin_inception:
        from .standin import write_standin_inception

        write_standin_inception(args.make_standin_inception)
        print(f"wrote an untrained stand-in InceptionV3 to {args.make_standin_inception}")
        return 0
    if not args.run:
        print("gan-eval: error: --run RUN_URL is required", file=sys.stderr)
        return 2
    from ..config import ConfigError, from_dict
    from .watcher import EvalOptions, run_evaluator

    try:
        cfg = from_dict(io.read_json(io.join(args.run, "config.json")))
    except FileNotFoundError:
        print(f"gan-eval: error: {args.run} has no config.json (is it a training run directory?)", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"gan-eval: error: {args.run}/config.json: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("run", "make_standin_inception")}
    overrides["once"] = args.once or None
    opts = EvalOptions.from_config(args.run, cfg, **overrides)
    try:
        code = run_evaluator(opts)
    except FileNotFoundError as exc:
        print(f"gan-eval: error: {exc}", file=sys.stderr)
        return 2
    from .. import dist

    if dist.world_size() > 1:
        dist.exit_now(code)  # as a trainer's rank: no abort in the interpreter's finalization
    return code


if __name__ == "__main__":  # the training sidecar runs `python -m pipeline.eval.cli`
    sys.exit(main())
