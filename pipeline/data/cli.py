"""The sharding CLI (``gan-shard`` / ``python launch/shard.py``): write, index (shards made
elsewhere), verify and inspect WebDataset shards on any fsspec URL. Every failure is one line on
stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A usage error: the command line itself is wrong (exit 2)."""


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not m or 0 in (int(m[1]), int(m[2])):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x128, got {text!r}")
    return int(m[1]), int(m[2])


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 500000000 or 512MB, got {text!r}")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2] or " "))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N such as 3/8, got {text!r}")
    return int(m[1]), int(m[2])


def _counts(text: str) -> tuple[str, int]:
    split, _, n = text.partition("=")
    if not split or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected SPLIT=N such as val=128, got {text!r}")
    return split, int(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="convert a dataset layout into shards + manifest.json")
    w.add_argument("source", help="cityscapes | ade20k | aligned | paired | unpaired | folder | demo | "
                                  "demo_unpaired | demo_objects")
    w.add_argument("--root", help="the dataset's folder (not needed for demo)")
    w.add_argument("--out", required=True, help="output URL: a path, file://..., s3://bucket/prefix")
    w.add_argument("--splits", help="comma-separated splits (default: the source's usual ones)")
    w.add_argument("--samples-per-shard", type=_positive, default=1000)
    w.add_argument("--max-shard-bytes", type=_bytes, default=1 << 30, help="e.g. 512MB (default 1 GiB)")
    w.add_argument("--resize", type=_size, help="store every sample at WxH (images bicubic, maps nearest)")
    w.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1))
    w.add_argument("--seed", type=int, default=0, help="seed of the sample order inside a split")
    w.add_argument("--no-shuffle", action="store_true", help="keep samples in key order")
    w.add_argument("--strict", action="store_true", help="any skipped sample is a failure")
    w.add_argument("--direction", default="AtoB", help="aligned/paired: AtoB or BtoA")
    w.add_argument("--classes", action="store_true",
                   help="folder: each sub-folder of a split is a class (stored as a class field)")
    w.add_argument("--dataset", help="dataset name recorded in the manifest (default: the source)")
    w.add_argument("--demo-size", type=_size, help="demo sources: sample size WxH (demo: 256x128, demo_objects: 32x32)")
    w.add_argument("--demo-count", type=_counts, action="append", default=[],
                   help="demo: samples in a split, e.g. --demo-count train=384 --demo-count val=128")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    parallel = w.add_mutually_exclusive_group()
    parallel.add_argument("--part", type=_part, metavar="I/N",
                          help="encode and validate only part I of N of every split into OUT/_parts/ (one "
                               "machine each, same options); then --finalize N writes shards and manifest")
    parallel.add_argument("--finalize", type=_positive, metavar="N",
                          help="write the shards and the manifest from the N staged parts (byte-identical "
                               "to a write without parts), then remove OUT/_parts/")

    x = sub.add_parser("index", help="write a manifest for WebDataset shards made elsewhere, without rewriting them")
    x.add_argument("shards", nargs="+", metavar="[SPLIT=]PATTERN",
                   help="shard URLs or brace patterns (s3://b/x-{00000..00099}.tar), of --split unless prefixed")
    x.add_argument("--out", required=True, help="the manifest's URL (a .json, or a directory for manifest.json)")
    x.add_argument("--split", default="train", help="split of the patterns given without SPLIT= (default train)")
    x.add_argument("--field", action="append", default=[], metavar="NAME=KIND:SUFFIX[,SUFFIX]",
                   help="a field and the member suffixes that hold it, e.g. image=image:jpg,png label=label:seg.png "
                        "(default: found in the first sample)")
    x.add_argument("--num-classes", type=_positive, help="classes of label maps or class ids (needed with either)")
    x.add_argument("--dataset", help="dataset name recorded in the manifest")
    x.add_argument("--no-offsets", action="store_true",
                   help="leave out per-sample byte offsets (smaller manifest; readers then walk tar headers)")

    v = sub.add_parser("verify", help="re-check every checksum and decode every sample")
    v.add_argument("url", help="the shard directory or its manifest.json")
    v.add_argument("--splits", help="only these splits")

    i = sub.add_parser("inspect", help="print the manifest summary and write a contact sheet")
    i.add_argument("url")
    i.add_argument("--split", help="split to show (default: the first)")
    i.add_argument("--samples", type=_positive, default=8)
    i.add_argument("--sheet", help="PNG path (default: ./<dataset>-<split>-sheet.png)")
    return p


def _source_options(args) -> dict:
    if args.source in ("aligned", "paired"):
        return {"direction": args.direction}
    if args.source == "folder" and args.classes:
        return {"classes": True}
    if args.source in ("demo", "demo_unpaired", "demo_objects"):
        options = {"seed": args.seed, **({"size": args.demo_size} if args.demo_size else {})}
        if args.demo_count:
            options["counts"] = dict(args.demo_count)
        return options
    return {}


def cmd_write(args) -> int:
    from .shards import WriteOptions, check_writable, write_dataset, write_part
    from .sources import SOURCES, SourceError, make_source

    if args.source not in SOURCES:
        raise CliError(f"unknown source {args.source!r}; choose one of: {', '.join(SOURCES)}")
    root = None
    if args.classes and args.source != "folder":
        raise CliError(f"--classes belongs to the folder source, not {args.source!r}")
    if args.source not in ("demo", "demo_unpaired", "demo_objects"):
        if not args.root:
            raise CliError(f"source {args.source!r} needs --root DIR")
        root = Path(args.root)
        if not root.is_dir():
            raise CliError(f"--root {root} is not a directory")
    try:
        source = make_source(args.source, root, **_source_options(args))
        splits = args.splits.split(",") if args.splits else list(source.info.default_splits)
        opts = WriteOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                            resize=args.resize, workers=args.workers, seed=args.seed,
                            shuffle=not args.no_shuffle, strict=args.strict)
        if args.part:
            check_writable(args.out)
            for split in splits:
                index = write_part(source, split, args.out, opts, *args.part)
                bad = sum("problem" in rec for rec in index["items"])
                print(f"staged {split} part {args.part[0]}/{args.part[1]}: samples {index['start']}..{index['end']} "
                      f"({bad} skipped, {index['bytes'] / 1e6:.1f} MB)")
            return EXIT_OK
        # The command recorded in the manifest is that of a plain write: parts leave no trace.
        argv = sys.argv[1:]
        if args.finalize:
            argv = [a for i, a in enumerate(argv) if not (a == "--finalize" or a.startswith("--finalize=")
                                                         or (i and argv[i - 1] == "--finalize"))]
        command = shlex.join(["gan-shard", *argv])
        manifest = write_dataset(source, args.out, splits, opts, dataset=args.dataset, command=command,
                                 extra={"source_options": _source_options(args)}, progress=not args.quiet,
                                 parts=args.finalize)
    except SourceError as exc:
        raise CliError(str(exc)) from exc
    t = manifest["totals"]
    print(f"wrote {t['samples']} samples in {t['shards']} shards ({t['bytes'] / 1e6:.1f} MB) to {args.out}; "
          f"{t['skipped']} skipped")
    return EXIT_OK


def cmd_index(args) -> int:
    from .. import io
    from .index import index_shards, parse_field
    from .manifest import manifest_url

    patterns: dict[str, str] = {}
    for arg in args.shards:
        m = re.fullmatch(r"(\w+)=(.+)", arg)
        split, pattern = (m[1], m[2]) if m else (args.split, arg)
        patterns[split] = f"{patterns[split]}::{pattern}" if split in patterns else pattern
    fields = dict(parse_field(text) for text in args.field) or None
    manifest = index_shards(patterns, fields=fields, num_classes=args.num_classes, dataset=args.dataset,
                            offsets=not args.no_offsets, command=shlex.join(["gan-shard", *sys.argv[1:]]))
    out = manifest_url(args.out)
    io.atomic_write_json(out, manifest)
    for split, entry in manifest["splits"].items():
        lacking = ", ".join(f"{n} lack {name!r}" for name, n in entry["lacking"].items())
        print(f"{split}: {entry['samples']} samples in {len(entry['shards'])} shards "
              f"({entry['bytes'] / 1e6:.1f} MB)" + (f"; {lacking}" if lacking else ""))
    fields = ", ".join(f"{n}[{s['kind']}: {'/'.join(s['members'])}]" for n, s in manifest["fields"].items())
    print(f"fields: {fields}; task {manifest['task']}; manifest {out}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .manifest import load_manifest
    from .verify import verify

    manifest = load_manifest(args.url)
    report = verify(manifest, splits=args.splits.split(",") if args.splits else None)
    for err in report.errors:
        print(f"error: {err}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.errors)} problems)"
    print(f"verify {status}: {report.shards} shards, {report.samples} samples")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_inspect(args) -> int:
    from .manifest import load_manifest
    from .verify import contact_sheet, summary

    manifest = load_manifest(args.url)
    print(summary(manifest))
    split = args.split or manifest.splits[0]
    sheet = contact_sheet(manifest, split, args.samples)
    path = args.sheet or f"{manifest.data['dataset']}-{split}-sheet.png"
    sheet.save(path)
    print(f"contact sheet of {args.samples} {split} samples: {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # The storage clients narrate credential lookups at INFO; keep the console to our messages.
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from .manifest import ManifestError
    from .shards import ShardWriteError

    try:
        commands = {"write": cmd_write, "index": cmd_index, "verify": cmd_verify, "inspect": cmd_inspect}
        return commands[args.command](args)
    except (CliError, ManifestError, ShardWriteError, ValueError) as exc:
        print(f"gan-shard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CliError) else EXIT_FAILED
