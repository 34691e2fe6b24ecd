"""Monitoring for the loop: loss sums kept on the device between log points (no per-step host
syncs), TensorBoard scalars and image grids written by the main process, a console progress bar,
and a description of the run (command, git SHA, library versions)."""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .. import __version__, dist, io
from ..config import Config

# TensorBoard's global step is the number of images seen (nimg) everywhere in this project.


def describe_run(command: str, world: int, precision: str, accum: int) -> dict:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except ImportError:
            return None

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"command": command, "git_sha": sha, "world_size": world, "precision": precision,
            "accumulation_steps": accum, "started": time.time(), "host": platform.node(),
            "versions": {"gan-pipeline": __version__, "python": platform.python_version(),
                         **{m: version(m) for m in ("torch", "torchvision", "accelerate", "webdataset",
                                                    "numpy", "fsspec")}},
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def end_nimg(nimg: int, total_nimg: int, batch_size: int) -> int:
    """The images seen when a run at ``nimg`` stops: the first whole batch at or past the total."""
    return nimg + max(0, -(-(total_nimg - nimg) // batch_size)) * batch_size


def tensorboard_url(run_dir: str) -> str:
    """Where a run's TensorBoard events go: ``run_dir/tensorboard/<run name>``, so that TensorBoard
    shows the run under its name (the run directory's, by default the config's) rather than as
    "tensorboard", and several runs under one ``--logdir`` stay apart."""
    return io.join(run_dir, "tensorboard", run_dir.rstrip("/").rsplit("/", 1)[-1])


class RunEvents:
    """A TensorBoard writer for ``tensorboard_url(run_dir)``. Object stores cannot append, so for a
    remote run the events go to a local folder that is uploaded on every flush. With trackers
    attached (``run.trackers``), each flush also sends them the scalars added since the last."""

    def __init__(self, run_dir: str, storage_options: dict | None = None, suffix: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.so = run_dir, storage_options
        self.remote = not io.is_local(run_dir)
        self.url = tensorboard_url(run_dir)
        _, path = io.fs_for(self.url, storage_options)
        self.local = tempfile.mkdtemp(prefix="gan-tb-") if self.remote else path
        self.writer = SummaryWriter(self.local, filename_suffix=suffix)
        self.trackers = None
        self.pending: dict[int, dict[str, float]] = {}

    def attach_trackers(self, spec: str, project: str, config: dict, kind: str) -> None:
        """Start the trackers ``spec`` names (``trackers.TrackerError`` when one cannot start)."""
        from .trackers import Trackers

        self.trackers = Trackers(spec, project, self.run_dir, config, kind, self.so)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)
        if self.trackers is not None:
            self.pending.setdefault(step, {})[tag] = float(value)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.trackers is not None:
            for step in sorted(self.pending):
                self.trackers.log(self.pending[step], step)
            self.pending.clear()
        if self.remote:
            for p in Path(self.local).iterdir():
                io.atomic_upload(p, io.join(self.url, p.name), self.so)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.trackers is not None:
            self.trackers.finish()


@contextlib.contextmanager
def evaluating(modules):
    """Modules in eval mode inside (no dropout, batch norm's running statistics used and left
    alone), in their own modes again afterwards: a grid from networks that are training."""
    modules = list(modules)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class Monitor:
    """Collects what the loop reports and writes it at ``log_every_kimg`` / ``image_every_kimg``."""

    def __init__(self, cfg: Config, run_dir: str, family, info, device: torch.device, enabled: bool):
        self.cfg, self.run_dir, self.family, self.info, self.device = cfg, run_dir, family, info, device
        self.enabled = enabled
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.writer = None
        self.bar = None
        self.val_batch = None

    # -------------------------------------------------------------- setup
    def start(self, nimg: int, total_nimg: int) -> None:
        self.next_log = self._next(nimg, self.cfg.train.log_every_kimg)
        self.next_image = self._next(nimg, self.cfg.train.image_every_kimg)
        self.t_last, self.nimg_last = time.perf_counter(), nimg
        if not self.enabled:
            return
        self.writer = RunEvents(self.run_dir, self.cfg.data.storage_options or None)
        if self.cfg.run.trackers:  # trackers.TrackerError when one cannot start
            from ..config import to_dict

            self.writer.attach_trackers(self.cfg.run.trackers, self.cfg.run.project, to_dict(self.cfg), "train")
        self.val_batch = self._fixed_batch()
        self.write_config()
        if self.cfg.train.progress:
            from tqdm import tqdm

            # Where the run will really end: the last step may pass total_kimg by part of a batch,
            # and a resumed run may already be there.
            end = max(nimg, end_nimg(nimg, total_nimg, self.cfg.train.batch_size))
            self.bar = tqdm(total=round(end / 1000, 3), initial=round(nimg / 1000, 3), unit="kimg",
                            desc="train", mininterval=2.0, bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg "
                            "[{elapsed}<{remaining}]{postfix}")

    def write_config(self) -> None:
        """The resolved config in TensorBoard: as text, and as hyperparameters (flattened keys) so
        that runs can be compared in its HParams tab."""
        from torch.utils.tensorboard.summary import hparams

        from ..config import _flatten, to_dict

        tree = to_dict(self.cfg)  # storage credentials redacted
        self.writer.writer.add_text("config", "```\n" + json.dumps(tree, indent=2) + "\n```", 0)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in _flatten(tree).items()}
        for summary in hparams(flat, {"Progress/kimg": 0.0}):
            self.writer.writer.file_writer.add_summary(summary)

    @staticmethod
    def _next(nimg: int, every_kimg: float) -> int | None:
        if every_kimg <= 0:
            return None
        every = int(every_kimg * 1000)
        return (nimg // every + 1) * every

    def _fixed_batch(self) -> dict | None:
        """The first ``num_images`` samples of each of the family's streams over the validation
        split, prepared once, with fixed randomness."""
        from ..data.stream import make_stream
        from ..data.transforms import Augment

        cfg, batches = self.cfg, {}
        try:
            for s in self.family.streams(cfg, self.info, cfg.data.val_split):
                stream = make_stream(cfg.data.url, s.split, train=False, fields=s.fields,
                                     storage_options=cfg.data.storage_options or None,
                                     augment=Augment(cfg.data.load_size, cfg.data.crop_size, False),
                                     batch_size=cfg.train.num_images)
                batches[s.name] = next(iter(stream))  # the first num_images samples (fewer in a smaller split)
        except (ValueError, KeyError) as exc:
            print(f"no image grids: {exc}")
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed)  # fixed latents; the training RNG is not touched
            return self.family.prepare(batches, self.device, cfg, self.info)

    # -------------------------------------------------------------- per step
    def add(self, phase: str, losses: list[dict], grad_norm: torch.Tensor, skipped: bool) -> None:
        """One optimizer step's losses (averaged over its micro-batches) and gradient norm."""
        step = {f"Grad/{phase}_norm": grad_norm.detach().float()}
        for out in losses:
            for name, value in out.items():
                if name != "loss":  # a name under Progress/ is a tag of its own (ADA's p)
                    tag = name if name.startswith("Progress/") else f"Loss/{name}"
                    step[tag] = step.get(tag, 0) + value.detach().float() / len(losses)
        for key, value in step.items():
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def step(self, state: dict, engines: dict, skipped_samples: int, nets: dict, shown: dict) -> None:
        """After each iteration: ``nets`` are the trained networks (histograms), ``shown`` the
        ones the image grid runs (EMA copies in place of their networks)."""
        nimg = state["nimg"]
        if self.next_log is not None and nimg >= self.next_log:
            # Collective on every rank (same nimg everywhere), before the main-only writing.
            total_skipped = dist.all_sum([skipped_samples], self.device)[0]
            self.next_log = self._next(nimg, self.cfg.train.log_every_kimg)
            if self.enabled:
                self._log_scalars(state, engines, total_skipped, nets)
        if self.next_image is not None and nimg >= self.next_image:
            self.next_image = self._next(nimg, self.cfg.train.image_every_kimg)
            if self.enabled:
                self._log_images(nimg, shown)
        if self.bar is not None:
            self.bar.update(round(nimg / 1000 - self.bar.n, 3))  # tqdm throttles the redraws

    def _log_scalars(self, state: dict, engines: dict, skipped_samples: float, nets: dict) -> None:
        nimg, w = state["nimg"], self.writer
        per_phase = {}
        for key, total in self.sums.items():
            value = float(total) / self.counts[key]
            per_phase[key] = value
            w.add_scalar(key, value, nimg)
        now = time.perf_counter()
        dt, dn = now - self.t_last, max(1, nimg - self.nimg_last)
        self.t_last, self.nimg_last = now, nimg
        w.add_scalar("Progress/kimg", nimg / 1000, nimg)
        w.add_scalar("Timing/sec_per_kimg", dt / dn * 1000, nimg)
        w.add_scalar("Timing/images_per_sec", dn / max(dt, 1e-9), nimg)
        w.add_scalar("Resources/peak_mem_gb", peak_mem_gb(self.device), nimg)
        w.add_scalar("Data/skipped_samples", skipped_samples, nimg)
        w.add_scalar("Train/skipped_steps", state["skipped_steps"], nimg)
        for k, engine in engines.items():
            w.add_scalar(f"LR/{k}", engine.param_groups[0]["lr"], nimg)
        if self.cfg.train.histograms:
            for name, module in nets.items():
                for pname, p in module.named_parameters():
                    w.add_histogram(f"Weights/{name}/{pname}", p.detach().float().cpu(), nimg)
        self.sums.clear()
        self.counts.clear()
        w.flush()
        if self.bar is not None:
            shown = {k[len("Loss/"):]: f"{v:.3g}" for k, v in per_phase.items() if k.startswith("Loss/")}
            self.bar.set_postfix(shown, refresh=False)

    def _log_images(self, nimg: int, nets: dict) -> None:
        if self.val_batch is None:
            return
        import torchvision

        with evaluating(nets.values()):
            columns = self.family.visualize(nets, self.val_batch, self.info)
        rows = torch.stack(columns, 1).flatten(0, 1)  # [N * columns, 3, H, W], row = one sample
        grid = torchvision.utils.make_grid(rows.clamp(-1, 1).cpu(), nrow=len(columns), normalize=True,
                                           value_range=(-1, 1))
        self.writer.add_image("Images/val_input_output_target", grid, nimg)
        self.writer.flush()

    def close(self, state: dict) -> None:
        if self.enabled and self.writer is not None:
            self.writer.close()
            if self.bar is not None:
                self.bar.n = round(state["nimg"] / 1000, 3)
                self.bar.close()
