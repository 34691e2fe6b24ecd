"""The asynchronous evaluator: watches a run directory for committed snapshots and evaluates each
once (FID/KID with torch-fidelity, paired metrics for translation models), writing results
atomically beside the run and into its TensorBoard at the snapshot's step. Training never waits.

Results: ``eval/step-NNNNNNNN.json`` (one per snapshot, the protocol beside every number),
``eval/metrics.jsonl`` (all of them), ``eval/step-NNNNNNNN.png`` (a sample grid), ``eval/best.json``.
Several evaluator processes (``accelerate launch``/torchrun) split generation and feature
extraction; features are gathered and ordered by sample, so numbers do not depend on their count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, replace

import torch

from .. import dist, io
from ..config import Config, from_dict, to_dict
from ..data.manifest import load_manifest
from ..data.stream import make_stream, slot_range
from ..data.transforms import Augment
from ..families import get_family
from ..train import checkpoint as ckpt
from ..train.family import DataInfo, Evaluation
from ..train.trackers import TrackerError
from . import metrics, paired

log = logging.getLogger(__name__)

EVAL_DIR = ckpt.EVAL_DIR
DONE_MARKER = "DONE.json"  # written by training when it completes
FINISHED = "FINISHED.json"  # written here when a following evaluator has seen everything
LOWER_IS_BETTER = {"fid": True, "intra_fid": True, "kid": True, "lpips": True, "psnr": False, "ssim": False,
                   "psnr_y": False, "ssim_y": False}


@dataclass(frozen=True)
class EvalOptions:
    run: str
    inception_weights: str | None = None
    lpips_weights: str | None = None
    policy: str = "all"
    every_k: int = 1
    once: bool = False
    step: int | None = None
    max_samples: int | None = None
    num_samples: int = 1000
    batch_size: int = 16
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    diversity_pairs: int = 500
    seed: int = 0
    reference_cache: str | None = None
    poll_sec: float = 10.0
    best_metric: str = "fid"
    workers: int = 0
    timeout_sec: float | None = None  # following: give up after this long without the DONE marker
    follow_pid: int | None = None  # following: once this process (the trainer) is gone, finish what is committed
    storage_options: dict | None = None

    @classmethod
    def from_config(cls, run: str, cfg: Config, **overrides) -> EvalOptions:
        e = cfg.eval
        base = cls(run=run, inception_weights=e.inception_weights, lpips_weights=e.lpips_weights,
                   policy=e.policy, every_k=e.every_k, max_samples=e.max_samples, num_samples=e.num_samples,
                   batch_size=e.batch_size, kid_subset_size=e.kid_subset_size, diversity_pairs=e.diversity_pairs,
                   seed=e.seed,
                   reference_cache=e.reference_cache, poll_sec=e.poll_sec, best_metric=e.best_metric,
                   storage_options=cfg.data.storage_options or None)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


result_url = ckpt.eval_result_url


def pending_steps(opts: EvalOptions) -> list[int]:
    """Committed snapshots not evaluated yet, filtered by the policy (fresh listings each call)."""
    so = opts.storage_options
    steps = ckpt.list_steps(opts.run, ckpt.SNAPSHOTS, so)
    if opts.step is not None:
        steps = [s for s in steps if s == opts.step]
    committed = [s for s in steps if io.exists(io.join(ckpt.step_url(opts.run, ckpt.SNAPSHOTS, s), ckpt.COMMIT), so)]
    if opts.policy == "every_k":
        committed = committed[opts.every_k - 1::opts.every_k]
    todo = [s for s in committed if not io.exists(result_url(opts.run, s), so)]
    if opts.policy == "latest":
        todo = todo[-1:]
    return todo


class Evaluator:
    """Holds what every evaluation reuses: the feature extractor, LPIPS, the TensorBoard writer."""

    def __init__(self, opts: EvalOptions):
        self.opts = opts
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        if not opts.inception_weights:
            raise FileNotFoundError(metrics.missing_weights_message("(not set: eval.inception_weights / "
                                                                    "--inception-weights)"))
        self.inception = metrics.InceptionFeatures(opts.inception_weights, self.device,
                                                   storage_options=opts.storage_options)
        self.lpips = paired.load_lpips(opts.lpips_weights, self.device) if opts.lpips_weights else None
        self.events = None
        self.trackers_tried = False
        if dist.is_main():
            from ..train.stats import RunEvents

            self.events = RunEvents(opts.run, opts.storage_options, suffix=".eval")

    # ------------------------------------------------------------ one snapshot
    def evaluate(self, step: int) -> dict | None:
        so = self.opts.storage_options
        url = ckpt.step_url(self.opts.run, ckpt.SNAPSHOTS, step)
        try:
            record = ckpt.verify(url, so)
            files = ckpt.snapshot_networks(record)
            states = {name: ckpt.load_tensors(ckpt.member(url, record, file), so) for name, file in files.items()}
            cfg = from_dict(record["config"])
        except FileNotFoundError as exc:
            log.warning("snapshot %s is gone or incomplete (%s): skipped", url, exc)
            return None
        except ckpt.CheckpointInvalid as exc:
            return self._invalid(step, url, exc)
        family = get_family(cfg.model.family)
        manifest = load_manifest(cfg.data.url, so)
        info = DataInfo.of(manifest)
        built = family.build(cfg, info)
        try:
            for name, state in states.items():
                built[name].load_state_dict(state)
        except (RuntimeError, KeyError) as exc:  # weights of other shapes or names than the run's networks
            return self._invalid(step, url, exc)
        nets = {name: built[name].eval().requires_grad_(False).to(self.device) for name in states}
        t0 = time.perf_counter()
        per_eval, protocols, grid = {}, {}, []
        for ev in evaluations_for(family, cfg, info, manifest):
            gen, real, sums, columns, labels = self._run(cfg, family, info, nets, ev)
            scores, protocols[ev.name] = self._scores(cfg, ev, gen, real, labels, manifest)
            summed = _summed(dist.gather_objects(sums))
            for name, (total, count) in summed.items():
                scores[name] = total / count if count else None
            if "diversity_msssim" in summed and dist.is_main():
                protocols[ev.name]["diversity"] = {
                    "metric": "mean MS-SSIM over image pairs (lower: more diverse)",
                    "weights": list(paired.ms_ssim_weights(*protocols[ev.name]["image_resolution"])),
                    "pairs": summed["diversity_msssim"][1],
                    "pairs_real": summed.get("diversity_msssim_real", (0, 0))[1],
                    "generated": "the fixed latents' images 2k and 2k + 1",
                    "real": f"random pairs (seed {self.opts.seed}) within each evaluator's share of the reference"}
            per_eval[ev.name] = scores
            grid = grid + columns
        if not dist.is_main():
            return None
        values = _named(per_eval)
        result = {"step": step, "nimg": record["nimg"], "kimg": record["kimg"], "snapshot": url, "metrics": values,
                  "standin": self.inception.standin,
                  "seconds": round(time.perf_counter() - t0, 2), "evaluators": dist.world_size(),
                  "protocol": protocols[""] if list(protocols) == [""] else protocols}
        # Everything else first, the step's result file last: it is what marks the snapshot as
        # evaluated, so an evaluator stopped before it evaluates the snapshot again (each write
        # below replaces or repeats its own, never duplicates a line).
        self._append_jsonl(result)
        self._write_events(result, grid, cfg)
        self._update_best(result)
        io.atomic_write_json(result_url(self.opts.run, step), result, so)
        log.info("step %d (kimg %.3f): %s", step, record["kimg"],
                 ", ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None))
        return result

    def _invalid(self, step: int, url: str, exc: Exception) -> None:
        """A damaged or unloadable snapshot: recorded as such (so it is not retried at every poll)
        and passed over; the snapshots after it are evaluated as usual. One that is simply gone
        (rotated away while being read) is only logged."""
        so = self.opts.storage_options
        if not io.exists(io.join(url, ckpt.COMMIT), so):
            log.warning("snapshot %s is gone or incomplete (%s): skipped", url, exc)
            return None
        log.error("snapshot %s cannot be evaluated: %s", url, exc)
        if dist.is_main():
            io.atomic_write_json(result_url(self.opts.run, step), {"step": step, "snapshot": url, "invalid": str(exc)},
                                 so)
        return None

    def _batches(self, cfg: Config, split: str, fields: tuple[str, ...]):
        """This rank's share of ``split``: (global sample index, batch as the loader collates it:
        uint8 images, integer maps, on the CPU), exactly once, at most ``max_samples`` of them.
        Callers ``family.prepare`` it where a network needs it; the uint8 images go to the
        Inception features as they are."""
        stream = make_stream(cfg.data.url, split, train=False, rank=dist.rank(), world_size=dist.world_size(),
                             num_workers=self.opts.workers, fields=fields,
                             augment=Augment(cfg.data.load_size, cfg.data.crop_size, False),
                             storage_options=self.opts.storage_options, batch_size=self.opts.batch_size)
        total = stream.spec.manifest.num_samples(split)
        slots = stream.slots()[1]
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.opts.workers)
        for batch in loader:
            first = torch.tensor([slot_range(total, int(s), slots, False)[0] for s in batch["__slot__"]])
            index = first + batch["__index__"]
            keep = index < self.opts.max_samples if self.opts.max_samples else torch.ones_like(index, dtype=torch.bool)
            if not keep.any():
                continue
            batch = {k: (v[keep] if torch.is_tensor(v) else [x for x, m in zip(v, keep) if m])
                     for k, v in batch.items()}
            yield index[keep], batch

    @torch.no_grad()
    def _run(self, cfg, family, info, nets, ev: Evaluation):
        """Generate for one evaluation: (generated features by sample, reference uint8 images by
        sample, paired-metric sums, grid columns, reference class ids by sample). Translations
        follow the input stream's samples; unconditional outputs come from ``num_samples`` fixed
        latents, split over the ranks (latent i of class i mod ``ev.classes`` when conditional)."""
        gen, real, sums, grid, labels = [], [], {}, [], []
        if ev.inputs is not None:
            for index, batch in self._batches(cfg, ev.inputs.split, ev.inputs.fields):
                b = family.prepare({ev.inputs.name: batch}, self.device, cfg, info)
                with seeded(self.opts.seed, int(index[0]), self.device):
                    fake = ev.generate(nets, b).float().clamp(-1, 1)
                gen.append((index, self.inception(metrics.to_uint8(fake))))
                per_image = {}
                if ev.paired:
                    # The loader's uint8 photo: what to_uint8 of the prepared [-1, 1] image gives
                    # back, bit for bit, without the round trip.
                    real.append((index, batch["image"]))
                    per_image = self._paired(fake, b["image"].float())
                if ev.per_image is not None:
                    with seeded(self.opts.seed + 1, int(index[0]), self.device):
                        per_image.update(ev.per_image(nets, b, fake, self.lpips))
                for name, values in per_image.items():
                    total, n = sums.get(name, (0.0, 0))
                    sums[name] = (total + float(values.double().sum()), n + len(values))
                if not grid:
                    grid = family.visualize(nets, b, info) if ev.paired else [fake]
        else:
            n, rank, world = self.opts.num_samples, dist.rank(), dist.world_size()
            # The same latents whatever the number of evaluators: drawn once, sliced per rank at
            # even indices, so the diversity pairs (2k, 2k + 1) never straddle two ranks.
            z = torch.randn(n, cfg.model.z_dim, generator=torch.Generator().manual_seed(self.opts.seed))
            lo, hi = 2 * (rank * (n // 2) // world), 2 * ((rank + 1) * (n // 2) // world) if rank < world - 1 else n
            pairs = Diversity(self.opts.diversity_pairs)
            for start in range(lo, hi, self.opts.batch_size):
                zb = z[start:min(hi, start + self.opts.batch_size)].to(self.device)
                batch = {"z": zb}
                if ev.classes:
                    batch["y"] = torch.arange(start, start + len(zb), device=self.device) % ev.classes
                with seeded(self.opts.seed, start, self.device):
                    fake = ev.generate(nets, batch).float().clamp(-1, 1)
                gen.append((torch.arange(start, start + len(zb)), self.inception(metrics.to_uint8(fake))))
                pairs.add(start, fake)
                grid = grid or [fake]
            sums.update(pairs.sums("diversity_msssim"))
        if not ev.paired:
            fields = ("image", "class") if ev.classes else ("image",)
            for index, batch in self._batches(cfg, ev.reference, fields):
                real.append((index, batch["image"]))
                if ev.classes:
                    labels.append((index, batch["class"]))
            if ev.inputs is None and self.opts.diversity_pairs:
                sums.update(real_diversity(real, self.opts.diversity_pairs, self.opts.seed))
        return gen, real, sums, grid, labels

    def _paired(self, fake: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"psnr": paired.psnr(fake, target), "ssim": paired.ssim(fake, target)}
        try:
            out["ms_ssim"] = paired.ms_ssim(fake, target)
        except ValueError as exc:  # images smaller than MS-SSIM's five scales need
            log.debug("MS-SSIM left out: %s", exc)
        if self.lpips is not None:
            out["lpips"] = paired.lpips(self.lpips, fake, target)
        return out

    # ------------------------------------------------------------ gather, reference, score
    def _scores(self, cfg: Config, ev: Evaluation, gen, real, labels, manifest) -> tuple[dict, dict]:
        """FID and KID of one evaluation (on the main process; the gathers run on every rank),
        with the protocol recorded beside them; the intra-FID too for a class-conditional one."""
        so = self.opts.storage_options
        gen_all = _ordered(dist.gather_objects(gen))
        ref_classes = _ordered(dist.gather_objects(labels)) if ev.classes else None
        shapes = [s for s in dist.gather_objects(tuple(real[0][1].shape[-2:]) if real else None) if s]
        resolution = shapes[0]
        num_ref = int(sum(dist.gather_objects(sum(len(index) for index, _ in real))))
        resize = f"load{cfg.data.load_size}-crop{cfg.data.crop_size}+{self.inception.resize}"
        key = metrics.reference_key(cfg.data.url, ev.reference, self.inception, resolution=resolution,
                                    num_samples=num_ref, resize=resize, storage_options=so)
        cache = self.opts.reference_cache or metrics.default_cache_url(self.opts.run)
        # The main process decides hit or miss for everyone: a gather inside compute must run on all ranks.
        hit = dist.broadcast_object(metrics.lookup(cache, key, so) is not None if dist.is_main() else None)
        if hit:
            ref = metrics.lookup(cache, key, so).features if dist.is_main() else None
        else:
            feats = [(i, self.inception(images)) for i, images in real]
            ref = _ordered(dist.gather_objects(feats))
            if dist.is_main():
                ref = metrics.store(cache, key, ref, protocol=self.inception.protocol(), storage_options=so).features
        if not dist.is_main():
            return {}, {}
        scores = metrics.fid_kid(gen_all, ref, kid_subsets=self.opts.kid_subsets,
                                 kid_subset_size=self.opts.kid_subset_size, seed=self.opts.seed)
        protocol = metrics.provenance(self.inception, num_gen=scores["num_gen"], num_ref=scores["num_ref"],
                                      reference_split=ev.reference, seed=self.opts.seed,
                                      kid_subsets=scores["kid_subsets"], kid_subset_size=scores["kid_subset_size"],
                                      image_resolution=resolution, manifest_sha256=key.manifest_sha256, resize=resize,
                                      lpips_weights=self.opts.lpips_weights, reference_cache=cache,
                                      conditional=ev.inputs is not None, paired=ev.paired)
        out = {"fid": scores["fid"], "kid": scores["kid_mean"], "kid_std": scores["kid_std"]}
        if ev.classes:
            per = metrics.intra_fid(gen_all, torch.arange(len(gen_all)) % ev.classes, ref, ref_classes, ev.classes)
            out["intra_fid"] = per.pop("intra_fid")
            names = manifest.data.get("class_names") or [str(c) for c in range(ev.classes)]
            protocol["intra_fid"] = {"metric": "mean over classes of the FID of the class's generated images "
                                               "against the reference images of that class",
                                     "generated": "fixed latent i has class i mod classes",
                                     **{k: dict(zip(names, v)) for k, v in per.items()}}
        return out, protocol

    def _append_jsonl(self, result: dict) -> None:
        # Object stores cannot append: rewrite the whole file atomically (it is small).
        url = io.join(self.opts.run, EVAL_DIR, "metrics.jsonl")
        so = self.opts.storage_options
        old = io.read_bytes(url, so).decode() if io.exists(url, so) else ""
        lines = [line for line in old.splitlines() if line.strip() and json.loads(line)["step"] != result["step"]]
        lines.append(json.dumps({k: result[k] for k in ("step", "nimg", "kimg", "metrics", "standin")}))
        io.atomic_write_bytes(url, ("\n".join(lines) + "\n").encode(), so)

    def _write_events(self, result: dict, grid, cfg) -> None:
        if cfg.run.trackers and self.events.trackers is None and not self.trackers_tried:
            self.trackers_tried = True  # once: a tracker that cannot start is reported, not retried per snapshot
            try:
                self.events.attach_trackers(cfg.run.trackers, cfg.run.project, to_dict(cfg), "eval")
            except TrackerError as exc:
                log.error("%s; the metrics are in TensorBoard and eval/metrics.jsonl", exc)
        nimg = result["nimg"]
        for name, value in result["metrics"].items():
            if value is not None:
                self.events.add_scalar(f"{metric_group(name, result['standin'])}/{name}", value, nimg)
        if grid is not None:
            import torchvision

            n = min(len(c) for c in grid)  # evaluations' columns may come in batches of other sizes
            rows = torch.stack([c[:n].float().cpu() for c in grid], 1).flatten(0, 1)[: 8 * len(grid)]
            image = torchvision.utils.make_grid(rows.clamp(-1, 1), nrow=len(grid), normalize=True, value_range=(-1, 1))
            self.events.add_image("Eval/samples", image, nimg)
            buf = __import__("io").BytesIO()
            torchvision.utils.save_image(image, buf, format="png")
            io.atomic_write_bytes(result_url(self.opts.run, result["step"], "png"), buf.getvalue(),
                                  self.opts.storage_options)
        self.events.flush()

    def _update_best(self, result: dict) -> None:
        name = self.opts.best_metric
        value = result["metrics"].get(name)
        if value is None:
            return
        url = io.join(self.opts.run, EVAL_DIR, "best.json")
        so = self.opts.storage_options
        best = io.read_json(url, so) if io.exists(url, so) else None
        better = best is None or (value < best["value"] if LOWER_IS_BETTER[name] else value > best["value"])
        if better:
            io.atomic_write_json(url, {"metric": name, "value": value, "step": result["step"], "kimg": result["kimg"],
                                       "snapshot": result["snapshot"], "standin": result["standin"]}, so)


def metric_group(name: str, standin: bool) -> str:
    """The TensorBoard group of a metric: a stand-in Inception's FID and KID get one of their own,
    so they never share a curve (or a dashboard query) with real ones."""
    return "Metrics_standin" if standin and {"fid", "kid"} & set(name.split("_")) else "Metrics"


@contextlib.contextmanager
def seeded(seed: int, first: int, device: torch.device):
    """The torch RNG seeded by ``(eval.seed, index of the batch's first sample)`` for one batch's
    generation and restored after: a generator that draws randomness (StyleGAN2's per-pixel
    noise, SPADE's VAE style) gives the same images at every evaluation of the same snapshot,
    and ``gan-generate --dump-eval`` the same images as a single evaluator process."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + first)
        yield


class Diversity:
    """MS-SSIM between the generated images of the pairs (2k, 2k + 1) of fixed latents, for
    ``2k + 1 < 2 * max_pairs`` (independent latents: random pairs, as ACGAN's and PGGAN's
    diversity measure): a high mean is a model that repeats itself. Images arrive in order of
    their global index; an image whose partner is in the next batch waits for it."""

    def __init__(self, max_pairs: int) -> None:
        self.max_index, self.waiting, self.values = 2 * max_pairs, None, []

    def add(self, start: int, images: torch.Tensor) -> None:
        """``images`` [N, 3, H, W] in [-1, 1]: those of global indices start .. start + N - 1."""
        a, b = [], []
        for offset, image in enumerate(images[: max(0, self.max_index - start)]):
            index = start + offset
            if index % 2 == 0:
                self.waiting = (index, image)
            elif self.waiting is not None and self.waiting[0] == index - 1:
                a.append(self.waiting[1])
                b.append(image)
                self.waiting = None
        if a:
            self.values.append(_ms_ssim(torch.stack(a), torch.stack(b)))

    def sums(self, name: str) -> dict[str, tuple[float, int]]:
        if not self.values:
            return {}
        values = torch.cat(self.values)
        return {name: (float(values.double().sum()), len(values))}


def _ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return paired.ms_ssim(a, b, weights=paired.ms_ssim_weights(*a.shape[-2:]))


def real_diversity(real: list[tuple[torch.Tensor, torch.Tensor]], max_pairs: int, seed: int) -> dict:
    """The same MS-SSIM over random pairs of this rank's real images (uint8), for reference: what
    the data's own diversity gives. The pairs depend on how the reference split is shared out.
    Only the paired images are copied, 32 pairs at a time (the reference may be 50k images)."""
    batches = [batch for _, batch in real]
    ends = torch.tensor([len(b) for b in batches]).cumsum(0)
    total = int(ends[-1]) if len(ends) else 0
    if total < 2:
        return {}
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(total // 2, max_pairs) * 2]
    where = torch.searchsorted(ends, order, right=True)  # the batch of each chosen image, and its row there
    rows = order - torch.cat([ends.new_zeros(1), ends])[where]

    def images(picks: slice) -> torch.Tensor:
        chosen = [batches[w][r] for w, r in zip(where[picks].tolist(), rows[picks].tolist())]
        return torch.stack(chosen).float() / 127.5 - 1

    values = torch.cat([_ms_ssim(images(slice(i, i + 64, 2)), images(slice(i + 1, i + 64, 2)))
                        for i in range(0, len(order), 64)])
    return {"diversity_msssim_real": (float(values.double().sum()), len(values))}


def evaluations_for(family, cfg: Config, info: DataInfo, manifest) -> tuple[Evaluation, ...]:
    """The family's evaluations over ``data.val_split``, or over ``data.split`` when the shards
    have no such split (a dataset without a validation split)."""
    for split in (cfg.data.val_split, cfg.data.split):
        evs = family.evaluations(cfg, info, split)
        needed = {ev.reference for ev in evs} | {ev.inputs.split for ev in evs if ev.inputs is not None}
        if needed <= set(manifest.splits):
            return evs
    raise ValueError(f"{cfg.data.url} has none of the splits the evaluation reads ({', '.join(sorted(needed))}); it "
                     f"has {', '.join(manifest.splits)}: set data.val_split")


def _named(per_eval: dict[str, dict]) -> dict:
    """One evaluation's metrics as they are. Several: each suffixed with its name (``fid_AtoB``),
    except the one named "" (the family's main evaluation: AAE's prior samples), and, when none
    is named "", each metric they all have averaged under its plain name (``fid``: what
    ``eval.best_metric`` compares)."""
    if list(per_eval) == [""]:
        return per_eval[""]
    out = {(f"{k}_{name}" if name else k): v for name, scores in per_eval.items() for k, v in scores.items()}
    if "" not in per_eval:
        for metric in set.intersection(*(set(scores) for scores in per_eval.values())):
            parts = [scores[metric] for scores in per_eval.values()]
            out[metric] = sum(parts) / len(parts) if None not in parts else None
    return out


def _summed(per_rank: list[dict]) -> dict[str, tuple[float, int]]:
    """Per-rank ``{metric: (sum, count)}`` added up."""
    out: dict[str, tuple[float, int]] = {}
    for part in per_rank:
        for name, (total, count) in part.items():
            t, n = out.get(name, (0.0, 0))
            out[name] = (t + total, n + count)
    return out


def _ordered(per_rank: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Concatenate (sample index, rows) pieces from every rank, sorted by sample index, so the
    result is the same whatever the number of evaluators."""
    pieces = [(i, row) for part in per_rank for index, rows in part for i, row in zip(index.tolist(), rows)]
    pieces.sort(key=lambda p: p[0])
    return torch.stack([row for _, row in pieces]) if pieces else torch.empty(0, metrics.FEATURE_DIMS)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Stop:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True


def run_evaluator(opts: EvalOptions) -> int:
    """Evaluate what is there (``once``/``step``) or follow the run until training is done."""
    if dist.world_size() > 1 and not dist.is_initialized():
        dist.make_accelerator("fp32")  # joins the process group of an `accelerate launch`
    evaluator = Evaluator(opts)
    stop = _Stop()
    started = time.time()
    so = opts.storage_options
    evaluated = 0
    while not stop.requested:
        # Whether the trainer is gone is read before the listing, so that a snapshot it committed
        # just before it went is in the listing.
        gone = opts.follow_pid is not None and not _running(opts.follow_pid)
        todo, gone = dist.broadcast_object((pending_steps(opts), gone) if dist.is_main() else None)
        for step in todo:
            if stop.requested:
                break
            evaluated += evaluator.evaluate(step) is not None
        if opts.once or opts.step is not None:
            break
        done = dist.broadcast_object(io.exists(io.join(opts.run, DONE_MARKER), so) if dist.is_main() else None)
        if gone and not done and not todo:
            log.warning("the training process (pid %d) is gone without finishing the run; every committed "
                        "snapshot is evaluated: stopping", opts.follow_pid)
            break
        if done and not todo:
            if dist.is_main():
                io.atomic_write_json(io.join(opts.run, EVAL_DIR, FINISHED), {"evaluated": evaluated,
                                                                            "time": time.time()}, so)
            break
        if opts.timeout_sec is not None and time.time() - started > opts.timeout_sec:
            log.warning("no DONE marker after %.0f s: stopping", opts.timeout_sec)
            break
        if not todo:
            time.sleep(opts.poll_sec)
    if evaluator.events is not None:
        evaluator.events.close()
    dist.shutdown()
    return 0
