"""Images out of a trained model: load a run's snapshot (latest, best or a given step; any fsspec
URL) and generate from seeds (unconditional families) or translate a split of shards or a
folder of inputs (conditional families), as PNG files or one grid; ``--dump-eval`` writes exactly the images the
evaluator scores, so anyone can recompute our FID with ``fidelity``. ``gan-generate`` is the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import io
from .config import Config, from_dict
from .eval.watcher import seeded
from .train.family import DataInfo, Evaluation, Family


@dataclass
class Snapshot:
    """What a snapshot holds, loaded: its networks (EMA copies in place, eval mode), the run's
    resolved config, family and data description, and where it came from."""

    nets: dict[str, nn.Module]
    cfg: Config
    family: Family
    info: DataInfo
    url: str
    step: int

    def evaluations(self, split: str | None = None) -> tuple[Evaluation, ...]:
        return self.family.evaluations(self.cfg, self.info, split or self.cfg.data.val_split)


def resolve_snapshot(url: str, step: int | None = None, best: bool = False,
                     storage_options: dict | None = None) -> str:
    """The snapshot directory ``url`` names: itself, or in a run directory the newest committed
    snapshot, the one of ``step``, or the evaluator's best."""
    from .train import checkpoint as ckpt

    so = storage_options
    if io.exists(io.join(url, ckpt.COMMIT), so):
        return url
    if best:
        record = io.join(url, ckpt.EVAL_DIR, "best.json")
        if not io.exists(record, so):
            raise FileNotFoundError(f"{url} has no {ckpt.EVAL_DIR}/best.json: no snapshot was evaluated yet; "
                                    f"run launch/evaluate.py --run {url}, or leave out --best")
        return io.read_json(record, so)["snapshot"]
    if step is not None:
        return ckpt.step_url(url, ckpt.SNAPSHOTS, step)
    found = ckpt.latest(url, ckpt.SNAPSHOTS, so)
    if found is None:
        raise FileNotFoundError(f"{url} holds no committed snapshot (snapshots/step-*/ with a commit record): "
                                f"is it a run directory (run.dir) of a run that reached checkpoint.every_kimg?")
    return found.url


def load_snapshot(url: str, step: int | None = None, best: bool = False, storage_options: dict | None = None,
                  device: str | torch.device = "cpu") -> Snapshot:
    """A run's (or a snapshot directory's) snapshot, verified and loaded; see ``resolve_snapshot``.
    A ``.safetensors`` file written by ``gan-generate --export`` is a snapshot of its one network."""
    if str(url).endswith(".safetensors"):
        if step is not None or best:
            raise ValueError(f"{url} holds one exported network: --step and --best choose among a run's snapshots")
        from .export import load_exported

        return load_exported(url, device, storage_options)[1]
    from .data.manifest import load_manifest
    from .families import get_family
    from .train import checkpoint as ckpt

    so = storage_options
    url = resolve_snapshot(url, step, best, so)
    record = ckpt.verify(url, so)
    cfg = from_dict(record["config"])
    family = get_family(cfg.model.family)
    manifest = load_manifest(cfg.data.url, cfg.data.storage_options or so)
    info = DataInfo.of(manifest)
    built = family.build(cfg, info)
    nets = {}
    for name, file in ckpt.snapshot_networks(record).items():
        built[name].load_state_dict(ckpt.load_tensors(ckpt.member(url, record, file), so))
        nets[name] = built[name].eval().requires_grad_(False).to(device)
    return Snapshot(nets, cfg, family, info, url, record["step"])


def load_generator(url: str, step: int | None = None, network: str | None = None,
                   **kwargs) -> tuple[nn.Module, Snapshot]:
    """``(G, snapshot)``: the snapshot's generator (``network``, default the family's first:
    ``G``; CycleGAN has ``G_A`` and ``G_B``) in eval mode, and everything else the snapshot holds.
    ``url`` may also be a ``.safetensors`` file written by ``gan-generate --export``."""
    snap = load_snapshot(url, step, **kwargs)
    name = network or next(iter(snap.nets))  # the family's first snapshot network
    if name not in snap.nets:
        raise KeyError(f"the snapshot has no network {name!r}; it has {', '.join(snap.nets)}")
    return snap.nets[name], snap


@torch.no_grad()
def from_latents(snap: Snapshot, z: torch.Tensor, truncation_psi: float = 1.0,
                 classes: torch.Tensor | None = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] from latents ``[N, z_dim]``, as the evaluator makes them
    (ψ = 1) or truncated toward the mean w (families with ``model.truncation_psi``); a
    class-conditional model needs ``classes`` [N] (class ids)."""
    ev = _unconditional(snap)
    batch = {"z": z.to(_device(snap))}
    if ev.classes:
        if classes is None:
            raise ValueError("a class-conditional model needs the class of each latent")
        batch["y"] = check_classes(classes, ev.classes).to(_device(snap))
    if truncation_psi != 1.0:
        if not hasattr(snap.cfg.model, "truncation_psi"):
            raise ValueError(f"--truncation: the {snap.family.name} family has no truncation (StyleGAN2 has)")
        batch["truncation_psi"] = truncation_psi
    return ev.generate(snap.nets, batch).float().clamp(-1, 1)


def check_classes(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    classes = torch.as_tensor(classes, dtype=torch.long)
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if len(bad):
        raise ValueError(f"class id {int(bad[0])} is outside 0..{num_classes - 1}")
    return classes


def from_seeds(snap: Snapshot, seeds: list[int], truncation_psi: float = 1.0,
               classes: list[int] | None = None) -> torch.Tensor:
    """One image per seed: its latent and every other draw of the generator (StyleGAN2's noise)
    from the torch RNG seeded with it, so the same seed gives the same image, alone or in a list.
    A class-conditional model draws seed ``i`` of the list as class ``classes[i % len(classes)]``
    (default: every class in turn)."""
    ev = _unconditional(snap)
    classes = classes or list(range(ev.classes))
    out = []
    for i, seed in enumerate(seeds):
        with torch.random.fork_rng(devices=[_device(snap)] if _device(snap).type == "cuda" else []):
            torch.manual_seed(seed)
            y = torch.tensor([classes[i % len(classes)]]) if ev.classes else None
            out.append(from_latents(snap, torch.randn(1, snap.cfg.model.z_dim), truncation_psi, y))
    return torch.cat(out)


def class_ids(snap: Snapshot, text: str) -> list[int]:
    """``--class`` values (ids or the manifest's class names, comma-separated) as ids."""
    from .data.manifest import load_manifest

    names = load_manifest(snap.cfg.data.url, snap.cfg.data.storage_options or None).data.get("class_names") or []
    out = []
    for part in text.split(","):
        if part.strip().isdigit():
            out.append(int(part))
        elif part.strip() in names:
            out.append(names.index(part.strip()))
        else:
            raise ValueError(f"--class {part!r} is neither a class id nor a class name ({', '.join(names)})")
    return check_classes(torch.tensor(out), _unconditional(snap).classes or 1).tolist()


def _device(snap: Snapshot) -> torch.device:
    return next(next(iter(snap.nets.values())).parameters()).device


def _unconditional(snap: Snapshot) -> Evaluation:
    evs = [ev for ev in snap.evaluations(snap.cfg.data.split) if ev.inputs is None]
    if not evs:
        raise ValueError(f"the {snap.family.name} family translates inputs: give --split (a split of its shards) "
                         f"or --inputs (a folder), not --seeds/--count")
    return evs[0]


@torch.no_grad()
def translate(snap: Snapshot, split: str, max_samples: int | None = None, batch_size: int = 8,
              samples_per_input: int = 1, seed: int | None = None) -> Iterator[tuple[str, int, int, torch.Tensor]]:
    """``(evaluation name, sample index, draw, image [3, H, W])`` for each input of ``split`` (the
    shards the run trained on; resized and centre-cropped as the evaluator does), each evaluation
    of the family (CycleGAN: AtoB and BtoA), ``samples_per_input`` draws each (multimodal
    families draw their style anew per call). ``seed``: each batch's draws as the evaluator
    seeds them (``eval.seed``, one draw per input)."""
    device = _device(snap)
    evs = [ev for ev in snap.evaluations(split) if ev.inputs is not None]
    if not evs:
        raise ValueError(f"the {snap.family.name} family generates from latents: give --seeds or --count, not --split")
    for ev in evs:
        index = 0
        for batch, b in prepared_batches(snap, ev, batch_size):
            if max_samples is not None and index >= max_samples:
                break
            for draw in range(samples_per_input):
                with seeded(seed, index, device) if seed is not None else contextlib.nullcontext():
                    fakes = ev.generate(snap.nets, b).float().clamp(-1, 1)
                for i, fake in enumerate(fakes):
                    if max_samples is None or index + i < max_samples:
                        yield ev.name, index + i, draw, fake.cpu()
            index += len(next(v for v in batch.values() if torch.is_tensor(v)))


def prepared_batches(snap: Snapshot, ev: Evaluation, batch_size: int) -> Iterator[tuple[dict, dict]]:
    """``(collated batch, the family's prepared batch)`` of ``ev``'s input split, resized and
    centre-cropped as the evaluator does."""
    from .data.stream import make_stream
    from .data.transforms import Augment

    cfg = snap.cfg
    stream = make_stream(cfg.data.url, ev.inputs.split, train=False, fields=ev.inputs.fields,
                         augment=Augment(cfg.data.load_size, cfg.data.crop_size, False),
                         storage_options=cfg.data.storage_options or None, batch_size=batch_size)
    for batch in stream:
        yield batch, snap.family.prepare({ev.inputs.name: batch}, _device(snap), cfg, snap.info)


def export(snap: Snapshot, out: str, network: str | None = None, onnx: bool = False) -> list[str]:
    """``network`` (default the family's first) as ``NAME.safetensors`` in ``out`` and, for a
    conditional family, as the ``torch.export`` program ``NAME.pt2`` traced on one batch of the
    validation split, and with ``onnx`` as that program's ONNX model ``NAME.onnx`` (see
    ``pipeline.export``). The URLs written."""
    from .export import captured_inputs, export_onnx, export_program, export_safetensors, onnx_missing

    if onnx and (why := onnx_missing()):
        raise ValueError(why)

    name = network or next(iter(snap.nets))
    if name not in snap.nets:
        raise ValueError(f"--network {name}: the snapshot has no such network; it has {', '.join(snap.nets)}")
    written = [io.join(out, f"{name}.safetensors")]
    export_safetensors(snap, name, written[0])
    for ev in snap.evaluations():
        if ev.inputs is None:
            continue
        _, b = next(prepared_batches(snap, ev, snap.cfg.eval.batch_size))
        try:
            args, kwargs = captured_inputs(snap.nets[name], ev.generate, snap.nets, b)
        except ValueError:  # this evaluation runs another network (CycleGAN's other direction)
            continue
        written.append(io.join(out, f"{name}.pt2"))
        program = export_program(snap.nets[name], args, kwargs, written[-1])
        if onnx:
            written.append(io.join(out, f"{name}.onnx"))
            export_onnx(program, written[-1])
        break
    else:
        if onnx:
            raise ValueError(f"--onnx: the {snap.family.name} family's generator takes no inputs to trace (ONNX export "
                             f"is for the conditional families); its weights are in {written[0]}")
    return written


def folder_inputs(snap: Snapshot, folder: str | Path, ev: Evaluation) -> list[tuple[str, dict[str, bytes]]]:
    """The inputs in ``folder`` for ``ev``, as ``(stem, {field: encoded bytes})`` in name order.

    The fields needed are the evaluation's input fields but a paired evaluation's ground truth
    (``image``). With one such field every image file is an input; with several each input is a
    set ``STEM.FIELD.EXT`` (WebDataset's naming: ``x.label.png`` and ``x.instance.png``)."""
    from .data.index import IMAGE_EXTS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--inputs {folder}: no such folder")
    needed = [f for f in ev.inputs.fields if not (ev.paired and f == "image")]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    groups: dict[str, dict[str, bytes]] = {}
    for path in files:
        stem, _, field = path.stem.rpartition(".")
        if len(needed) == 1 and (not stem or field not in needed):
            stem, field = path.stem, needed[0]
        if stem and field in needed:
            groups.setdefault(stem, {})[field] = path.read_bytes()
    if not groups:
        wanted = f"image files ({', '.join(IMAGE_EXTS)})" if len(needed) == 1 else \
            " and ".join(f"NAME.{f}.png" for f in needed)
        raise FileNotFoundError(f"--inputs {folder}: no inputs there; the {snap.family.name} family takes {wanted}")
    for stem, fields in groups.items():
        missing = [f for f in needed if f not in fields]
        if missing:
            raise FileNotFoundError(f"--inputs {folder}: {stem} has no {', '.join(missing)} "
                                    f"(expected {' and '.join(f'{stem}.{f}.png' for f in needed)})")
    return sorted(groups.items())


@torch.no_grad()
def translate_folder(snap: Snapshot, folder: str | Path, batch_size: int = 8, samples_per_input: int = 1
                     ) -> Iterator[tuple[str, str, int, torch.Tensor]]:
    """``(evaluation name, input stem, draw, image [3, H, W])`` for each input in ``folder``
    (``folder_inputs``), decoded, resized and centre-cropped exactly as the shards are for the
    evaluator. A paired evaluation's ground truth, which a folder does not have, is zeros."""
    from .data.manifest import load_manifest
    from .data.transforms import Augment, DecodeError, augment, decode_field, field_dtypes

    cfg, device = snap.cfg, _device(snap)
    evs = [ev for ev in snap.evaluations() if ev.inputs is not None]
    if not evs:
        raise ValueError(f"the {snap.family.name} family generates from latents: give --seeds or --count, "
                         f"not --inputs")
    specs = load_manifest(cfg.data.url, cfg.data.storage_options or None).fields
    aug = Augment(cfg.data.load_size, cfg.data.crop_size, False)
    for ev in evs:
        kinds = {f: specs[f]["kind"] for f in ev.inputs.fields}
        dtypes = field_dtypes({f: specs[f] for f in ev.inputs.fields}, snap.info.num_classes)
        inputs = folder_inputs(snap, folder, ev)
        for start in range(0, len(inputs), batch_size):
            samples = []
            for stem, raw in inputs[start:start + batch_size]:
                try:
                    decoded = augment({f: decode_field(kinds[f], data) for f, data in raw.items()},
                                      kinds, dtypes, aug, None, False)
                except (DecodeError, ValueError) as exc:  # not an image of its kind; a crop larger than it
                    raise ValueError(f"--inputs {folder}: {stem}: {exc}") from None
                for f in ev.inputs.fields:
                    if f not in decoded:  # the ground truth of a paired evaluation
                        shape = next(iter(decoded.values())).shape[-2:]
                        decoded[f] = torch.zeros((3, *shape) if kinds[f] == "image" else shape, dtype=torch.uint8)
                samples.append(decoded)
            batch = torch.utils.data.default_collate(samples)
            b = snap.family.prepare({ev.inputs.name: batch}, device, cfg, snap.info)
            stems = [stem for stem, _ in inputs[start:start + batch_size]]
            for draw in range(samples_per_input):
                for stem, fake in zip(stems, ev.generate(snap.nets, b).float().clamp(-1, 1)):
                    yield ev.name, stem, draw, fake.cpu()


def save_png(image: torch.Tensor, path: Path) -> None:
    """One [3, H, W] image in [-1, 1], quantised as the evaluator's features see it."""
    from PIL import Image

    from .eval.metrics import to_uint8

    Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).save(path)


def _seeds(text: str) -> list[int]:
    """``0-7,12`` -> [0, 1, ..., 7, 12]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gan-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory, snapshot directory (any fsspec URL) or a "
                                                "NAME.safetensors file written by --export")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the snapshot of this step (default: the newest)")
    which.add_argument("--best", action="store_true", help="the evaluator's best snapshot (eval/best.json)")
    p.add_argument("--out", required=True, help="output directory for the PNGs")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--seeds", type=_seeds, help="unconditional: one image per seed, e.g. 0-15")
    what.add_argument("--count", type=int, help="unconditional: images from seeds 0..count-1")
    what.add_argument("--split", help="conditional: translate this split of the run's shards")
    what.add_argument("--inputs", help="conditional: translate the images in this folder (NAME.png, or "
                                       "NAME.FIELD.png for several fields)")
    what.add_argument("--dump-eval", action="store_true",
                      help="exactly the images the evaluator scores (its latents or its split and sample cap)")
    what.add_argument("--export", action="store_true",
                      help="write the generator as NAME.safetensors (with its config) and, for conditional "
                           "families, as the torch.export program NAME.pt2")
    p.add_argument("--onnx", action="store_true", help="with --export, conditional families: also the ONNX model "
                                                       "NAME.onnx (needs the onnx extra)")
    p.add_argument("--network", help="with --export: which network (default the family's first, e.g. G; "
                                     "CycleGAN: G_A or G_B)")
    p.add_argument("--max-samples", type=int, help="conditional: at most this many inputs")
    p.add_argument("--samples-per-input", type=int, default=1, help="multimodal families: draws per input")
    p.add_argument("--truncation", type=float, default=1.0, help="StyleGAN2: truncation psi (metrics use 1)")
    p.add_argument("--class", dest="classes", metavar="CLASSES",
                   help="class-conditional: class ids or names, e.g. car,tree (default: every class in turn)")
    p.add_argument("--grid", action="store_true", help="one grid.png instead of one PNG per image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        return _generate(a)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"gan-generate: {exc}", file=sys.stderr)
        return 2


def _generate(a: argparse.Namespace) -> int:
    import torchvision

    if a.onnx and not a.export:
        raise ValueError("--onnx goes with --export")
    snap = load_snapshot(a.run, a.step, a.best, device=a.device)
    if a.export:
        for url in export(snap, a.out, a.network, onnx=a.onnx):
            print(f"wrote {url}")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, torch.Tensor]] = []
    unconditional = any(ev.inputs is None for ev in snap.evaluations(snap.cfg.data.split))
    if a.dump_eval and unconditional:  # the evaluator's fixed latents, eval.seed, eval.num_samples
        n, e = snap.cfg.eval.num_samples, snap.cfg.eval
        z = torch.randn(n, snap.cfg.model.z_dim, generator=torch.Generator().manual_seed(e.seed))
        for start in range(0, n, e.batch_size):
            zb = z[start:start + e.batch_size]
            y = torch.arange(start, start + len(zb)) % max(1, _unconditional(snap).classes)  # as the evaluator
            with seeded(e.seed, start, _device(snap)):
                batch = from_latents(snap, zb, classes=y).cpu()
            images += [(f"{start + i:06d}", img) for i, img in enumerate(batch)]
    elif a.dump_eval or a.split:
        split = a.split or snap.cfg.data.val_split
        cap = a.max_samples if a.split else snap.cfg.eval.max_samples
        for name, index, draw, img in translate(snap, split, cap, snap.cfg.eval.batch_size, a.samples_per_input,
                                                seed=snap.cfg.eval.seed if a.dump_eval else None):
            images.append((f"{name + '_' if name else ''}{index:06d}{f'_{draw}' if a.samples_per_input > 1 else ''}",
                           img))
    elif a.inputs:
        for name, stem, draw, img in translate_folder(snap, a.inputs, snap.cfg.eval.batch_size, a.samples_per_input):
            images.append((f"{name + '_' if name else ''}{stem}{f'_{draw}' if a.samples_per_input > 1 else ''}", img))
    else:
        seeds = a.seeds if a.seeds is not None else list(range(a.count or 8))
        classes = class_ids(snap, a.classes) if a.classes else None
        for seed, img in zip(seeds, from_seeds(snap, seeds, a.truncation, classes).cpu()):
            images.append((f"seed{seed:04d}", img))
    if a.grid:
        grid = torchvision.utils.make_grid(torch.stack([img for _, img in images]), nrow=8, value_range=(-1, 1),
                                           normalize=True)
        save_png(grid * 2 - 1, out / "grid.png")
    else:
        for name, img in images:
            save_png(img, out / f"{name}.png")
    print(f"{len(images)} images from {snap.url} (step {snap.step}) in {out}")
    return 0
