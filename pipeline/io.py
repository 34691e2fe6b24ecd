"""The storage seam over fsspec: open, list fresh, atomic writes and checksums.

Local paths, ``file://`` and object stores (``s3://``, ``gs://``, ...) behave the same. S3
endpoint and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options``; neither is ever logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

CHUNK = 1 << 20
# fsspec protocols whose "directories" are key prefixes inside a bucket (or container).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


class MissingStorageBackend(ImportError):
    """A URL whose storage needs a package that is not installed (s3:// without s3fs)."""


def fs_for(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the in-filesystem path for ``url``."""
    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ImportError as exc:  # s3:// without s3fs, gs:// without gcsfs, ...
        hint = "pip install 'gan-pipeline[s3]'" if str(url).startswith(("s3://", "s3a://")) else "install it"
        raise MissingStorageBackend(f"{url}: {exc}: {hint}") from None


def is_local(url: str) -> bool:
    fs, _ = fs_for(url)
    return isinstance(fs, LocalFileSystem)


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the store failed", for ``except io.storage_errors():``.

    fsspec backends raise ``OSError`` subclasses for what a server answers (missing, denied), but
    s3fs re-raises botocore's and aiohttp's transport errors (endpoint unreachable, connection
    closed mid-body) unchanged once its retries are spent, and those are not ``OSError``. A module
    that was never imported cannot have raised, so nothing is imported here.
    """
    errors: list[type[BaseException]] = [OSError, EOFError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return not OBJECT_STORE_PROTOCOLS.isdisjoint(protocols)


def join(url: str, *parts: str) -> str:
    """``url`` and relative parts joined with ``/`` (object-store URLs have no ``os.sep``)."""
    out = str(url).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, **kwargs: Any) -> IO:
    fs, path = fs_for(url, storage_options)
    return fs.open(path, mode, **kwargs)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = fs_for(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = fs_for(url, storage_options)
    return fs.cat_file(path)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options).decode("utf-8"))


def list_fresh(url: str, storage_options: dict | None = None) -> list[str]:
    """Names directly under ``url``, never served from a listing cache (object stores cache
    listings; a poller must see files that appeared since the last look)."""
    fs, path = fs_for(url, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True))


def list_files_fresh(url: str, storage_options: dict | None = None) -> list[str]:
    """Every file below ``url`` (recursively), as paths relative to it, from a fresh listing."""
    fs, path = fs_for(url, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    root = path.rstrip("/") + "/"
    found = fs.find(path, withdirs=False, detail=False)
    return sorted(p[len(root):] for p in found if p.startswith(root))


def upload_tree(local_dir: str | Path, url: str, storage_options: dict | None = None) -> None:
    """Each file under ``local_dir`` to the same relative path under ``url`` (each atomically)."""
    base = Path(local_dir)
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        atomic_upload(f, join(url, f.relative_to(base).as_posix()), storage_options)


def download_tree(url: str, local_dir: str | Path, storage_options: dict | None = None) -> None:
    """Every file below ``url`` into ``local_dir``, at the same relative paths."""
    fs, path = fs_for(url, storage_options)
    for rel in list_files_fresh(url, storage_options):
        target = Path(local_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{path.rstrip('/')}/{rel}", str(target))


def makedirs(url: str, storage_options: dict | None = None) -> None:
    """Create the directory ``url`` and its parents; nothing to do on an object store."""
    fs, path = fs_for(url, storage_options)
    if _is_object_store(fs):
        # Prefixes need no creating, and fsspec's makedirs there creates a missing *bucket*: a
        # typo in a bucket name would silently become a new bucket instead of an error.
        return
    fs.makedirs(path, exist_ok=True)


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = fs_for(url, storage_options)
    if fs.exists(path):
        fs.rm(path)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so that readers see either the old object or the complete new one.

    Locally: a temporary file in the same directory, fsync, then ``os.replace``. On an object
    store a single PUT is already all-or-nothing.
    """
    fs, path = fs_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _synced_temp(Path(path), data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        fs.pipe_file(path, data)


def _synced_temp(target: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``target``, flushed to disk. Mode 0666 less the
    umask, as any other file the user writes (mkstemp's 0600 would keep a teammate, or an
    evaluator under another user id, from reading a run or a manifest)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Write ``data`` at ``url`` only if nothing is there, atomically: False when another writer
    was first. Locally a hard link of a finished temporary file (``link`` fails on an existing
    target); on S3 a conditional PUT (``If-None-Match: *``). Other stores have no such primitive:
    there it is an existence check, then a write."""
    fs, path = fs_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _synced_temp(Path(path), data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    if hasattr(fs, "call_s3"):
        bucket, key = path.split("/", 1)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # botocore's ClientError, as s3fs passes it on or translates it
            if "PreconditionFailed" in repr(exc) or "412" in str(exc) or isinstance(exc, FileExistsError):
                return False
            raise
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def atomic_write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(url, text.encode("utf-8"), storage_options)


def atomic_upload(local_file: str | Path, url: str, storage_options: dict | None = None) -> None:
    """Move a finished local file to ``url`` so that it appears complete or not at all."""
    fs, path = fs_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(local_file, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    else:
        # A multipart upload becomes visible only when it completes. One of this key left
        # unfinished by a killed writer (invisible, but stored and billed) is aborted first: the
        # key is being written again, so that upload can never be completed.
        abort_unfinished_uploads(fs, path)
        fs.put_file(str(local_file), path)


def abort_unfinished_uploads(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Abort the unfinished multipart uploads of exactly the object ``path`` (``bucket/key``) on
    an S3 file system; returns how many. Other file systems have none."""
    if not hasattr(fs, "call_s3"):
        return 0
    bucket, key = path.split("/", 1)
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    mine = [u for u in uploads if u["Key"] == key]
    for upload in mine:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    return len(mine)


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """SHA-256 hex digest and byte count of everything left in ``f``."""
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_url(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    with open_url(url, "rb", storage_options) as f:
        return sha256_stream(f)
