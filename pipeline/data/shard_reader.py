"""Reading WebDataset tar shards: samples grouped by webdataset's own reader, from any sample on,
and the per-sample byte offsets that let a reader start there without reading what comes before.

A sample is what ``webdataset.tariterators.group_by_keys`` makes of ``tar_file_iterator``'s
members: consecutive regular files with the same key (the path up to the first dot of the
basename), ``__...__`` members and names without a key left out. ``tar_members`` walks the
headers by the same rule, so that offsets and counts agree with what the reader yields.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's default ``skip_meta``
GZIP_MAGIC = b"\x1f\x8b"


class CompressedShardError(ValueError):
    """A compressed tar: it cannot be entered at a sample's offset."""


def tar_members(f: BinaryIO, stream: bool = False) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str, str]]:
    """``(tar, member, sample key, suffix)`` of every member that belongs to a sample, in order,
    from ``f``'s current position. By default only headers are read (``tarfile`` seeks over the
    data); ``stream=True`` reads ``f`` front to back (a hashing reader sees every byte), and the
    caller may ``tar.extractfile(member)`` before asking for the next one. Offsets
    (``member.offset``, the first header of the member) count from where ``f`` was."""
    tar = tarfile.open(fileobj=f, mode="r|" if stream else "r:")
    for info in iter(tar.next, None):
        tar.members = []  # as tar_file_iterator does: a long shard must not pile up its headers
        if not info.isreg() or META.match(info.name):
            continue
        key, suffix = base_plus_ext(info.name)
        if key is not None:
            yield tar, info, key, suffix.lower()


def sample_offsets(f: BinaryIO, limit: int | None = None) -> list[int]:
    """The byte offset of every sample (of the first ``limit + 1`` with ``limit``) in the plain
    tar ``f``, read from its headers alone."""
    offsets, last = [], None
    for _, info, key, _ in tar_members(f):
        if key != last:
            offsets.append(info.offset)
            last = key
            if limit is not None and len(offsets) > limit:
                break
    return offsets


def read_samples(f: BinaryIO, url: str, start: int = 0, offset: int | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", "<suffix>": bytes, ...}`` of the tar ``f`` from sample
    ``start`` on, grouped by webdataset's reader. ``offset`` is sample ``start``'s byte offset (the
    manifest's); without it the headers before are walked (``sample_offsets``) and their data not
    read. A tar shorter than ``start`` samples yields nothing."""
    if start and offset is None:
        head = f.read(2)
        if head == GZIP_MAGIC:
            raise CompressedShardError(f"{url} is compressed: it cannot be entered at sample {start}; "
                                       f"store shards as plain .tar (images are compressed already)")
        f.seek(0)
        offsets = sample_offsets(f, limit=start)
        if len(offsets) <= start:
            return
        offset = offsets[start]
    if offset:
        f.seek(offset)
    yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(f))


def reason(exc: BaseException) -> str:
    """An exception as one deterministic line: webdataset appends ``@ <the stream object>`` (an
    address) to what it re-raises."""
    return re.sub(r" @ <[^>]*>", "", str(exc.args[0] if exc.args else exc))
