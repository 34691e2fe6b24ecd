"""Checking and looking at written shards: checksum + full decode (``verify``), and a summary
with a contact sheet of a few samples (``inspect``)."""

from __future__ import annotations

import colorsys
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import io
from .index import HashingReader
from .manifest import Manifest, ShardInfo
from .shard_reader import read_samples, reason, sample_offsets
from .stream import check_member_names
from .transforms import CLASS_KIND, DecodeError, decode_class, decode_field, map_array


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_sample(raw: dict, manifest: Manifest) -> str | None:
    """Why a raw sample is bad (refused member, missing/undecodable field, label id out of range)."""
    reason = check_member_names(raw)
    if reason:
        return reason
    for stem, spec in manifest.fields.items():
        member = next((m for m in manifest.members(stem) if m in raw), None)
        if member is None:
            if spec.get("required", True):
                return f"missing field {stem!r}"
            continue
        try:
            if spec["kind"] == CLASS_KIND:
                decode_class(raw[member], manifest.num_classes)
                continue
            img = decode_field(spec["kind"], raw[member])
        except DecodeError as exc:
            return f"{member}: {exc}"
        if spec["kind"] == "label" and manifest.num_classes:
            top = int(map_array(img).max(initial=0))
            if top >= manifest.num_classes:
                return f"{member}: label id {top} outside 0..{manifest.num_classes - 1}"
    return None


def verify(manifest: Manifest, storage_options: dict | None = None, splits: list[str] | None = None,
           log=print) -> VerifyReport:
    """Re-check every shard's size and SHA-256 and decode every sample, in one read per shard."""
    report = VerifyReport()
    for split in splits or manifest.splits:
        for shard in manifest.shards(split):
            report.shards += 1
            count = 0
            try:
                with io.open_url(shard.url, "rb", storage_options) as f:
                    reader = HashingReader(f)
                    try:
                        for raw in read_samples(reader, shard.url):
                            count += 1
                            problem = check_sample(raw, manifest)
                            if problem:
                                report.errors.append(f"{shard.url}#{raw['__key__']}: {problem}")
                    except (tarfile.TarError, ValueError) as exc:
                        # A damaged tar header: said, and the whole file still hashed below, so
                        # the report also tells damage after writing from a shard written wrong.
                        report.errors.append(f"{shard.url}: unreadable after {count} samples ({reason(exc)})")
                    sha, nbytes = reader.drain()
            except io.storage_errors() as exc:
                report.errors.append(f"{shard.url}: unreadable after {count} samples ({exc})")
                continue
            report.samples += count
            if (sha, nbytes) != (shard.sha256, shard.bytes):
                report.errors.append(f"{shard.url}: checksum mismatch (sha256 {sha[:12]}…, {nbytes} bytes; "
                                     f"manifest {shard.sha256[:12]}…, {shard.bytes} bytes)")
            if count != shard.samples:
                report.errors.append(f"{shard.url}: {count} samples, the manifest says {shard.samples}")
            elif shard.offsets and sha == shard.sha256 and not _offsets_match(shard, storage_options):
                report.errors.append(f"{shard.url}: the manifest's sample offsets are not where the samples start")
        log(f"{split}: {len(manifest.shards(split))} shards checked")
    return report


def _offsets_match(shard: ShardInfo, storage_options: dict | None) -> bool:
    """Whether the manifest's per-sample offsets are the tar's (a reader enters shards there)."""
    with io.open_url(shard.url, "rb", storage_options) as f:
        return tuple(sample_offsets(f)) == shard.offsets


# ---------------------------------------------------------------- inspect

def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, well separated (golden-ratio hues), id 0 black."""
    colours = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(1, n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3) / 2)
        colours[i] = (int(r * 255), int(g * 255), int(b * 255))
    return colours


def colourise(ids: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """``[H, W]`` integer ids -> ``[H, W, 3]`` uint8 colours (instance ids hashed to a colour);
    ``own`` ``[n, 3]``: the dataset's colours of ids below n (a label map's classes)."""
    ids = ids.astype(np.int64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    if uniq.max(initial=0) < 256:
        return with_own_colours(palette(256), own)[ids]
    pal = palette(len(uniq) + 1)[1:]
    return pal[inverse.reshape(ids.shape)]


def with_own_colours(generated: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """``generated`` with its first rows replaced by the dataset's own colours, where it has them."""
    if own is None:
        return generated
    out = generated.copy()
    n = min(len(own), len(out))
    out[:n] = own[:n]
    return out


def contact_sheet(manifest: Manifest, split: str, count: int = 8,
                  storage_options: dict | None = None, tile_height: int = 128) -> Image.Image:
    """The first ``count`` samples of ``split``, one row each, every field side by side."""
    rows = []
    for shard in manifest.shards(split):
        with io.open_url(shard.url, "rb", storage_options) as f:
            for raw in read_samples(f, shard.url):
                tiles = []
                for stem, spec in manifest.fields.items():
                    member = next((m for m in manifest.members(stem) if m in raw), None)
                    if member is None or spec["kind"] == CLASS_KIND:
                        continue
                    img = decode_field(spec["kind"], raw[member])
                    if spec["kind"] != "image":
                        own = manifest.palette if spec["kind"] == "label" else None
                        img = Image.fromarray(colourise(map_array(img), own))
                    w = max(1, round(img.width * tile_height / img.height))
                    tiles.append(img.resize((w, tile_height), Image.Resampling.NEAREST))
                rows.append(tiles)
                if len(rows) >= count:
                    break
        if len(rows) >= count:
            break
    if not rows:
        raise ValueError(f"split {split!r} has no samples to show")
    width = max(sum(t.width for t in row) + 4 * (len(row) - 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (tile_height + 4)), (255, 255, 255))
    for r, row in enumerate(rows):
        x = 0
        for tile in row:
            sheet.paste(tile, (x, r * (tile_height + 4)))
            x += tile.width + 4
    return sheet


def summary(manifest: Manifest) -> str:
    d = manifest.data
    lines = [f"{d['dataset']} ({d['source']}, task {d['task']}) at {manifest.url}",
             "fields: " + ", ".join(f"{k}[{v['kind']}: {'/'.join(v['exts'])}]" for k, v in d["fields"].items())]
    if d.get("num_classes"):
        names = d.get("class_names") or []
        more = ", …" if len(names) > 6 else ""
        lines.append(f"classes: {d['num_classes']}" + (f" ({', '.join(names[:6])}{more})" if names else ""))
    for name, s in d["splits"].items():
        size = s.get("image_size") or {}
        common = size.get("most_common", [{}])[0] if size else {}
        lines.append(f"  {name}: {s['samples']} samples in {len(s['shards'])} shards, "
                     f"{s['bytes'] / 1e6:.1f} MB, {s['skipped_count']} skipped"
                     + (f", mostly {common.get('width')}x{common.get('height')}" if common else ""))
    t = d["totals"]
    lines.append(f"total: {t['samples']} samples, {t['shards']} shards, {t['bytes'] / 1e6:.1f} MB, "
                 f"{t['skipped']} skipped; written by {d['tool']['name']} {d['tool']['version']}")
    return "\n".join(lines)
