"""Checkpoints and snapshots in a run directory (any fsspec URL), invisible until committed.

Every file is written first, into a directory of its writer's own inside the step's (``w-<token>``:
two jobs racing for one step never write the same name); ``COMMIT.json`` (step, kimg, world size,
the writer and its directory, each file's size and SHA-256, the config) is created last, only if
absent, so the first writer to commit owns the step. "Latest" is the highest step whose commit verifies; an
uncommitted or damaged checkpoint is passed over loudly. Tensors are stored with ``torch.save``
and read back with ``weights_only=True``; everything else is JSON. Nothing of ours is unpickled;
the one exception is DeepSpeed's own engine state under ``zero/`` (partitioned optimizer state only
the engine can write and read), which is hashed into the commit record like every other file and
so is read only from a checkpoint that verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import pickle
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import failpoints, io

log = logging.getLogger(__name__)

COMMIT = "COMMIT.json"
MAX_COMMIT_BYTES = 16 << 20  # a record lists files and counters: kilobytes, thousands of DeepSpeed shards included
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
ZERO_DIR = "zero"  # DeepSpeed engines' state inside a checkpoint: zero/G/..., zero/D/...
EVAL_DIR = "eval"  # the evaluator's results: eval/step-NNNNNNNN.json marks a snapshot as evaluated
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_WRITER_DIR = re.compile(r"^w-[0-9a-f]{1,32}$")


def step_url(run_dir: str, kind: str, step: int) -> str:
    return io.join(run_dir, kind, f"step-{step:08d}")


def writer_dir(writer: str) -> str:
    """The directory of one writer's files inside a step directory (``writer``: its lease token)."""
    return f"w-{writer[:16]}"


def member(url: str, record: dict, name: str) -> str:
    """The URL of the committed file ``name`` of the checkpoint or snapshot at ``url``: inside its
    writer's directory (``record["dir"]``), or directly in it for records written before writers
    had one."""
    where = record.get("dir")
    return io.join(url, where, name) if where else io.join(url, name)


def eval_result_url(run_dir: str, step: int, suffix: str = "json") -> str:
    """The evaluator's result for snapshot ``step``; the JSON, written last, marks it evaluated."""
    return io.join(run_dir, EVAL_DIR, f"step-{step:08d}.{suffix}")


def snapshots_to_keep(run_dir: str, storage_options: dict | None = None) -> frozenset[int]:
    """Snapshots that retention must leave: those not evaluated yet, and the best one."""
    so = storage_options
    keep = {s for s in list_steps(run_dir, SNAPSHOTS, so) if not io.exists(eval_result_url(run_dir, s), so)}
    best = io.join(run_dir, EVAL_DIR, "best.json")
    if io.exists(best, so):
        try:
            keep.add(int(io.read_json(best, so)["step"]))
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable: no snapshot is pruned this time", best)
            return frozenset(list_steps(run_dir, SNAPSHOTS, so))
    return frozenset(keep)


def save_tensors(url: str, obj: Any, storage_options: dict | None = None) -> dict:
    """A state dict (tensors, numbers, strings, nested dicts/lists) as one atomic file; returns
    its commit entry (``bytes``, ``sha256`` of what was written)."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return _write(url, buf.getvalue(), storage_options)


def _write(url: str, data: bytes, storage_options: dict | None) -> dict:
    io.atomic_write_bytes(url, data, storage_options)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_tensors(url: str, storage_options: dict | None = None) -> Any:
    """What ``save_tensors`` wrote. Anything else pickled in the file (an object, code) is refused
    unread by torch's weights-only loader: ``CheckpointInvalid``, and nothing in it runs."""
    data = io.read_bytes(url, storage_options)
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol is warned about, then refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first paragraph is advice to load without weights_only (never, here); what it
        # refused is said after it.
        said = [p.strip() for p in str(exc).split("\n\n")[1:]]
        detail = " ".join(" ".join(p for p in said if p and not p.startswith("Check the documentation")).split())
        raise CheckpointInvalid(f"{url.rsplit('/', 1)[-1]} holds more than tensors, numbers and strings; refused "
                                f"unread, nothing in it was run ({detail or 'not a weights-only file'})") from None


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (parameters and buffers, bit for bit), for comparing ranks."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def commit(ckpt_url: str, meta: dict, storage_options: dict | None = None, written: dict | None = None,
           writer: str | None = None) -> dict:
    """Write ``COMMIT.json`` last: the checkpoint exists now. It lists ``written`` (file name ->
    entry of the bytes this writer wrote, ``save_tensors``), and the files under a DeepSpeed
    engine directory hashed as they are stored; without ``written``, every file below the
    writer's directory (``writer_dir(writer)``; ``ckpt_url`` itself without a writer). Created
    only if no record is there (``io.create_exclusive``): of two writers racing for one step, one
    commits and the other gets ``CommitRaced``; each wrote into a directory of its own, so the
    winner's files are its own bytes whatever the loser writes afterwards."""
    files = dict(written or {})
    where = {"writer": writer, "dir": writer_dir(writer)} if writer else {}
    for name in io.list_files_fresh(member(ckpt_url, where, ""), storage_options):
        if name == COMMIT or any(part.startswith(".") for part in name.split("/")):
            continue  # the record itself, and temporary files of atomic writes
        if written is None or (name.startswith(f"{ZERO_DIR}/") and name not in files):
            sha, size = io.sha256_url(member(ckpt_url, where, name), storage_options)
            files[name] = {"bytes": size, "sha256": sha}
    record = {**meta, **where, "files": files}
    text = (json.dumps(record, indent=2) + "\n").encode()
    if not io.create_exclusive(io.join(ckpt_url, COMMIT), text, storage_options):
        raise CommitRaced(f"{ckpt_url} was committed by another writer first; this one's files are not committed")
    return record


class CheckpointInvalid(Exception):
    pass


class CommitRaced(Exception):
    """Another writer committed the same step first."""


def read_record(ckpt_url: str, storage_options: dict | None = None) -> dict:
    """The commit record of ``ckpt_url``, unverified; ``CheckpointInvalid`` when there is none or
    it is not one (never read beyond ``MAX_COMMIT_BYTES``)."""
    url = io.join(ckpt_url, COMMIT)
    if not io.exists(url, storage_options):
        raise CheckpointInvalid("not committed (no COMMIT.json)")
    try:
        with io.open_url(url, "rb", storage_options) as f:
            data = f.read(MAX_COMMIT_BYTES + 1)  # never more: a hostile record must not fill memory
        if len(data) > MAX_COMMIT_BYTES:
            raise CheckpointInvalid(f"COMMIT.json is larger than any commit record ({MAX_COMMIT_BYTES >> 20} MiB)")
        record = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointInvalid(f"COMMIT.json unreadable: {exc}") from exc
    if not isinstance(record, dict):
        raise CheckpointInvalid("COMMIT.json lists no files (damaged, or not a commit record)")
    return record


def verify(ckpt_url: str, storage_options: dict | None = None, full: bool = True) -> dict:
    """The commit record of a checkpoint whose files all match it; raises ``CheckpointInvalid``."""
    record = read_record(ckpt_url, storage_options)
    if "dir" in record and not (isinstance(record["dir"], str) and _WRITER_DIR.match(record["dir"])):
        raise CheckpointInvalid(f"COMMIT.json names a writer directory that none writes: {record['dir']!r}")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointInvalid("COMMIT.json lists no files (damaged, or not a commit record)")
    for name, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str) and type(want.get("bytes")) is int):
            raise CheckpointInvalid(f"COMMIT.json's entry for {name!r} is malformed")
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise CheckpointInvalid(f"COMMIT.json names a file outside the checkpoint: {name!r}")
        file_url = member(ckpt_url, record, name)
        if not io.exists(file_url, storage_options):
            raise CheckpointInvalid(f"{name} is missing")
        if full:
            sha, size = io.sha256_url(file_url, storage_options)
            if (sha, size) != (want["sha256"], want["bytes"]):
                raise CheckpointInvalid(f"{name} does not match its checksum ({size} bytes, "
                                        f"committed {want['bytes']})")
    return record


def list_steps(run_dir: str, kind: str = CHECKPOINTS, storage_options: dict | None = None) -> list[int]:
    """Steps that have a directory (committed or not), ascending, from a fresh listing."""
    names = io.list_fresh(io.join(run_dir, kind), storage_options)
    return sorted(int(m[1]) for n in names if (m := _STEP_DIR.match(n)))


@dataclass(frozen=True)
class Found:
    step: int
    url: str
    record: dict

    def file(self, name: str) -> str:
        """The URL of the committed file ``name``."""
        return member(self.url, self.record, name)


class NoUsableCheckpoint(Exception):
    """Committed checkpoints exist, and not one of them can be used."""


def verified(run_dir: str, kind: str = CHECKPOINTS, storage_options: dict | None = None) -> Iterator[Found]:
    """The checkpoints that verify, newest first; each broken one is reported as it is passed over.
    Raises ``NoUsableCheckpoint`` at the end when committed checkpoints existed but none verified:
    starting over then would silently throw their run away."""
    problems, good = [], 0
    for step in reversed(list_steps(run_dir, kind, storage_options)):
        url = step_url(run_dir, kind, step)
        try:
            found = Found(step, url, verify(url, storage_options))
        except CheckpointInvalid as exc:
            log.error("checkpoint %s is unusable: %s; falling back to an older one", url, exc)
            if io.exists(io.join(url, COMMIT), storage_options):
                problems.append(f"step-{step:08d}: {exc}")
            continue
        good += 1
        yield found
    if problems and not good:
        raise NoUsableCheckpoint(no_usable_message(run_dir, problems))


def no_usable_message(run_dir: str, problems: list[str]) -> str:
    return (f"{run_dir} holds {len(problems)} committed checkpoint(s) and none is usable "
            f"({'; '.join(problems)}). To start over, use a new run.dir, or set run.resume=never to start over "
            f"here (each is replaced when the new run reaches its step); to continue, repair or copy back a "
            f"checkpoint")


def latest(run_dir: str, kind: str = CHECKPOINTS, storage_options: dict | None = None) -> Found | None:
    """The newest checkpoint that verifies; newer broken ones are reported and passed over.
    None when there is none (``verified`` says whether committed ones were all broken)."""
    try:
        return next(verified(run_dir, kind, storage_options), None)
    except NoUsableCheckpoint:
        return None


def resume_candidates(run_dir: str, resume: str, storage_options: dict | None = None) -> tuple[list[Found], str | None]:
    """The verified checkpoints to resume from, newest first, as ``run.resume`` asks; or why the
    run cannot start. Damaged ones are reported as they are passed over."""
    try:
        found = list(verified(run_dir, storage_options=storage_options))
    except NoUsableCheckpoint as exc:
        if resume == "never":
            return [], None  # starting over was asked for; the unusable ones are left where they are
        return [], str(exc)
    if resume == "never" and found:
        return [], (f"run.resume=never, but {run_dir} holds checkpoints (the newest: {found[0].url}); use a new "
                    f"run.dir to start over, or run.resume=auto to continue")
    if resume == "must" and not found:
        return [], f"run.resume=must, but {run_dir} holds no checkpoint to resume from"
    return found, None


def verified_list(run_dir: str, storage_options: dict | None = None) -> list[Found]:
    """The verified checkpoints, newest first (none, when every one is broken)."""
    try:
        return list(verified(run_dir, storage_options=storage_options))
    except NoUsableCheckpoint:
        return []


def resolve_init(url: str, storage_options: dict | None = None) -> str:
    """The committed directory that ``model.init_from`` names: a checkpoint or snapshot
    directory itself, or a run directory (its newest committed snapshot, else checkpoint)."""
    if io.exists(io.join(url, COMMIT), storage_options):
        verify(url, storage_options)
        return url
    for kind in (SNAPSHOTS, CHECKPOINTS):
        found = latest(url, kind, storage_options)
        if found is not None:
            return found.url
    raise CheckpointInvalid(f"model.init_from={url} is neither a committed checkpoint/snapshot nor a run "
                            f"directory holding one")


def prune(run_dir: str, keep_last: int, kind: str = CHECKPOINTS, storage_options: dict | None = None,
          keep: frozenset[int] = frozenset()) -> list[int]:
    """Keep the newest ``keep_last`` checkpoints that *verify* (every file re-hashed: one damaged
    after its commit counts for nothing), and the steps in ``keep``; delete the other verified
    ones and everything broken or uncommitted older than the newest verified one (a newer verified
    checkpoint supersedes them). Nothing newer than the newest verified checkpoint is touched, and
    with none verified nothing is deleted. Called right after a commit."""
    steps = list_steps(run_dir, kind, storage_options)
    good = []
    for s in steps:
        try:
            verify(step_url(run_dir, kind, s), storage_options)
            good.append(s)
        except CheckpointInvalid:
            pass
    if not good:
        return []
    kept = set(good[-keep_last:]) | set(keep)
    doomed = [s for s in steps if s not in kept and s < good[-1]]
    for s in doomed:
        url = step_url(run_dir, kind, s)
        if s not in good:
            log.warning("removing %s: %s", url, "broken" if io.exists(io.join(url, COMMIT), storage_options)
                        else "never committed (a write that did not finish)")
        clear(url, storage_options)
    return doomed


def clear(ckpt_url: str, storage_options: dict | None = None) -> None:
    """Delete a checkpoint directory, if there is one: its commit marker first, so that a
    half-deleted checkpoint never looks committed. (Also before a step is written again: files
    of an earlier, unfinished or broken write must not be hashed into the new commit.)"""
    io.remove(io.join(ckpt_url, COMMIT), storage_options)
    fs, path = io.fs_for(ckpt_url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    io.atomic_write_json(url, obj, storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    return json.loads(io.read_bytes(url, storage_options))


@contextlib.contextmanager
def staged_upload(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local directory whose files end up under ``url``: ``url`` itself when it is local,
    else a temporary directory uploaded (file by file, each atomically) on a clean exit. For
    writers that only know local paths (DeepSpeed's engines)."""
    if io.is_local(url):
        _, path = io.fs_for(url, storage_options)
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="gan-ckpt-up-")
    try:
        yield tmp
        io.upload_tree(tmp, url, storage_options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """``url``'s directory as a local path: itself, or a temporary download removed afterwards."""
    if io.is_local(url):
        yield io.fs_for(url, storage_options)[1]
        return
    tmp = tempfile.mkdtemp(prefix="gan-ckpt-down-")
    try:
        io.download_tree(url, tmp, storage_options)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a checkpoint holds, by reference to the live objects: the family's networks
    (plain modules) and their EMA copies, one engine per declared optimizer (its optimizer and
    scaler, or DeepSpeed's partitions), the loop's counters, per stream and reading slot the data
    position consumed, and the family's per-rank state. File names follow the declarations:
    ``<net>.pt``, ``<net>_ema.pt``, ``opt_<name>.pt``, ``scaler_<name>.pt``, ``rank-NNN.pt``."""

    nets: dict[str, torch.nn.Module]
    ema: dict[str, torch.nn.Module]
    engines: dict[str, Any]
    counters: dict[str, int]
    positions: dict[str, dict[int, tuple[int, int]]]
    family_state: dict[str, torch.Tensor]
    snapshot: tuple[str, ...]  # the networks a snapshot holds (their EMA copies too, where kept)
    backend: str
    world_size: int
    rank: int
    workers: int
    device: torch.device
    # Per stream, the epoch a run at another layout of reading slots took over (``stream.handover_plan``).
    handovers: dict[str, dict] = field(default_factory=dict)
    # Who writes: the job's lease token, the same on every rank (``writer_dir``).
    writer: str = field(default_factory=lambda: uuid.uuid4().hex)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Networks and EMA copies by file stem."""
        return {**self.nets, **{f"{k}_ema": m for k, m in self.ema.items()}}


def make_room(url: str, writer: str, holder: Callable[[], str | None] | None = None,
              storage_options: dict | None = None) -> str | None:
    """Before ``writer`` writes the step at ``url``: a record already there is replaced (a rollback,
    ``run.resume=never``, a broken commit) unless its writer is the one ``holder()`` says holds
    the run directory's lease now; then this writer is the stale one of two, and the reason is
    returned with nothing touched. This writer's own unfinished files are removed; another
    writer's uncommitted ones are left to it (pruning removes them with the step)."""
    so = storage_options
    if io.exists(io.join(url, COMMIT), so):
        try:
            owner = read_record(url, so).get("writer")
        except CheckpointInvalid:
            owner = None
        if owner and owner != writer and holder is not None and holder() == owner:
            return (f"{url} was committed by {owner}, the run directory's lease holder now; this job's files are "
                    f"not written")
        clear(url, so)
    else:
        clear(io.join(url, writer_dir(writer)), so)
    return None


def save(run_dir: str, ts: TrainState, meta: dict, keep_last: int, keep_snapshots: int | None,
         storage_options: dict | None = None, holder: Callable[[], str | None] | None = None) -> None:
    """Write, commit and prune one checkpoint and its snapshot at ``meta["step"]``. Collective:
    every rank writes its own rank file (and DeepSpeed partitions); rank 0 the rest, then commits.
    Snapshots are pruned only with ``keep_snapshots`` set, and never one that awaits evaluation or
    is the best. ``holder`` names the lease's holder now (``make_room``); ``CommitRaced`` (on
    every rank before anything is written, or on rank 0 at the commit) when another writer owns
    the step."""
    from .. import dist

    so, step = storage_options, meta["step"]
    shared = {name: dist.averaged_state(m) for name, m in ts.modules().items()}
    prints = {name: fingerprint(st) for name, st in shared.items()}
    # Every rank must hold the same networks; a mismatch is a bug worth stopping for.
    if dist.any_rank([prints != dist.broadcast_object(prints)], ts.device)[0]:
        raise RuntimeError(f"ranks disagree on the networks at step {step}: {prints}")
    # Per stream, every slot's position (rank files hold their own): how a run with another
    # layout of reading slots takes the epoch over; and the newest epoch any slot reads.
    positions: dict[str, dict[str, list[int]]] = {}
    for part in dist.gather_objects(ts.positions):
        for stream, slots in part.items():
            positions.setdefault(stream, {}).update({str(k): list(p) for k, p in slots.items()})
    epochs = {stream: max((e for e, _ in slots.values()), default=0) for stream, slots in positions.items()}
    url = step_url(run_dir, CHECKPOINTS, step)
    mine_dir = io.join(url, writer_dir(ts.writer))
    # Orders: what an earlier write of this step left is gone before any rank writes into it.
    why = dist.broadcast_object(make_room(url, ts.writer, holder, so) if ts.rank == 0 else None)
    if why:
        raise CommitRaced(why)
    # Per rank: RNG, data positions, the family's state, and the rank's own running statistics
    # (the shared files hold their average), so a resumed rank continues bit for bit.
    mine = {"cpu_rng": torch.get_rng_state(), "fingerprints": prints,
            "positions": {s: {str(k): list(p) for k, p in slots.items()} for s, slots in ts.positions.items()},
            "buffers": {name: {k: b.detach().clone() for k, b in m.named_buffers()}
                        for name, m in ts.modules().items()},
            "family_state": {k: v.detach().cpu().clone() for k, v in ts.family_state.items()}}
    if ts.device.type == "cuda":
        mine["cuda_rng"] = torch.cuda.get_rng_state(ts.device)
    rank_file = f"rank-{ts.rank:03d}.pt"
    written = dist.gather_objects({rank_file: save_tensors(io.join(mine_dir, rank_file), mine, so)})
    written = {name: entry for part in written for name, entry in part.items()}
    failpoints.reached("checkpoint.rank_file", step)
    if any(e.local_dir for e in ts.engines.values()):  # collective: every rank writes its own partitions
        with staged_upload(io.join(mine_dir, ZERO_DIR), so) as local:
            for engine in ts.engines.values():
                engine.save_local(local)
    if ts.rank == 0:
        for name, st in shared.items():
            written[f"{name}.pt"] = save_tensors(io.join(mine_dir, f"{name}.pt"), st, so)
        for name, engine in ts.engines.items():
            for key, st in engine.state_dicts().items():
                written[f"{key}_{name}.pt"] = save_tensors(io.join(mine_dir, f"{key}_{name}.pt"), st, so)  # opt_G.pt
        state = {**ts.counters, "world_size": ts.world_size, "workers": ts.workers, "backend": ts.backend,
                 "epochs": epochs, "positions": positions, "handovers": ts.handovers}
        written["state.json"] = _write(io.join(mine_dir, "state.json"), (json.dumps(state, indent=2) + "\n").encode(),
                                       so)
    dist.barrier()  # orders: every rank's file is written before rank 0 commits
    if ts.rank != 0:
        return
    failpoints.reached("checkpoint.files", step)
    commit(url, meta, so, written, ts.writer)
    failpoints.reached("checkpoint.commit", step)
    prune(run_dir, keep_last, CHECKPOINTS, so)
    write_snapshot(run_dir, ts, shared, meta, so, holder)
    if keep_snapshots is not None:
        prune(run_dir, keep_snapshots, SNAPSHOTS, so, keep=snapshots_to_keep(run_dir, so))


def write_snapshot(run_dir: str, ts: TrainState, shared: dict, meta: dict, storage_options: dict | None,
                   holder: Callable[[], str | None] | None = None) -> None:
    """The snapshot of ``meta["step"]`` from ``shared`` (averaged states by file stem), committed
    with the file of each network to evaluate (rank 0; ``CommitRaced`` as for ``save``)."""
    so = storage_options
    snap = step_url(run_dir, SNAPSHOTS, meta["step"])
    why = make_room(snap, ts.writer, holder, so)
    if why:
        raise CommitRaced(why)
    mine_dir = io.join(snap, writer_dir(ts.writer))
    files, written = {}, {}
    for name in ts.snapshot:
        written[f"{name}.pt"] = save_tensors(io.join(mine_dir, f"{name}.pt"), shared[name], so)
        if name in ts.ema:
            written[f"{name}_ema.pt"] = save_tensors(io.join(mine_dir, f"{name}_ema.pt"), shared[f"{name}_ema"], so)
        files[name] = f"{name}_ema.pt" if name in ts.ema else f"{name}.pt"
    failpoints.reached("snapshot.files", meta["step"])
    commit(snap, {**meta, "networks": files}, so, written, ts.writer)


def ensure_snapshot(run_dir: str, ts: TrainState, found: Found, storage_options: dict | None = None) -> bool:
    """After resuming from ``found``: write its snapshot if it has none that verifies (a kill
    between the checkpoint's commit and the snapshot's). Collective. Returns whether it wrote."""
    from .. import dist

    url = step_url(run_dir, SNAPSHOTS, found.step)
    try:
        missing = ts.rank == 0 and not verify(url, storage_options, full=False)
    except CheckpointInvalid:
        missing = True
    if not dist.any_rank([missing], ts.device)[0]:
        return False
    shared = {name: dist.averaged_state(m) for name, m in ts.modules().items()}
    if ts.rank == 0:
        meta = {k: found.record[k] for k in ("step", "nimg", "kimg", "world_size", "config") if k in found.record}
        try:
            write_snapshot(run_dir, ts, shared, meta, storage_options)
            log.warning("checkpoint %s had no snapshot (interrupted before it was written): written now", found.url)
        except CommitRaced as exc:  # another writer committed it meanwhile: there is one
            log.warning("%s", exc)
    return True


def snapshot_networks(record: dict) -> dict[str, str]:
    """A snapshot's networks and the file of each to evaluate (its EMA copy where kept), from its
    commit record; snapshots written before the record named them hold one G."""
    return record.get("networks") or {"G": "G_ema.pt" if "G_ema.pt" in record["files"] else "G.pt"}


class StateMismatch(Exception):
    """A checkpoint that this run cannot continue, whatever its files hold (another backend)."""


def take_over_epochs(url: str, saved: dict, ts: TrainState) -> None:
    """Data positions for a layout of reading slots (processes x workers) other than the one that
    wrote ``saved``: when every old slot was in the same epoch ``e`` (as at a checkpoint: slots
    read in step), the new slots share out exactly the positions of ``e`` the old ones had not
    read (``stream.handover_plan``) and go on from ``e + 1``. Otherwise (slots in different
    epochs, a checkpoint written before positions were recorded, or one written during an
    earlier take-over of that epoch) each stream goes on at the next epoch, and the rest of the
    current one is not seen."""
    old_slots = saved["world_size"] * max(1, saved.get("workers", 0))
    per_rank = max(1, ts.workers)
    mine = range(ts.rank * per_rank, (ts.rank + 1) * per_rank)
    for stream, epoch in saved.get("epochs", {}).items():
        slots = {int(s): p for s, p in (saved.get("positions") or {}).get(stream, {}).items()}
        epochs = {e for e, _ in slots.values()}
        earlier = ts.handovers.get(stream)
        if sorted(slots) == list(range(old_slots)) and len(epochs) == 1 and not (
                earlier and earlier["epoch"] in epochs):
            e = int(next(iter(epochs)))
            consumed = [int(slots[s][1]) for s in range(old_slots)]
            ts.handovers[stream] = {"epoch": e, "slots": old_slots, "consumed": consumed}
            ts.positions[stream] = {s: (e, 0) for s in mine}
            log.warning("checkpoint %s was read by %d slots (processes x workers), this run has %d: stream %s "
                        "shares out what they had not read of epoch %d; no sample of it is lost or read twice",
                        url, old_slots, ts.world_size * per_rank, stream, e)
        else:
            ts.positions[stream] = {s: (int(epoch) + 1, 0) for s in mine}
            log.warning("checkpoint %s was read by %d slots, this run has %d: stream %s goes on at epoch %d; the "
                        "rest of epoch %d is not seen", url, old_slots, ts.world_size * per_rank, stream,
                        int(epoch) + 1, int(epoch))


def restore(found: Found, ts: TrainState, storage_options: dict | None = None) -> bool:
    """Load ``found`` into ``ts``; returns whether the per-rank part (RNG, data positions, family
    state, running statistics) was restored, which needs the same world size."""
    so = storage_options
    saved = read_json(found.file("state.json"), so)
    if saved.get("backend", "ddp") != ts.backend:
        raise StateMismatch(f"{found.url} was written with distributed.backend={saved.get('backend', 'ddp')}; resume "
                            f"it with the same backend (this run uses {ts.backend})")
    if any(e.local_dir for e in ts.engines.values()) and saved["world_size"] != ts.world_size:
        raise StateMismatch(f"{found.url} holds DeepSpeed ZeRO partitions for {saved['world_size']} processes; resume "
                            f"it with {saved['world_size']} processes (this run has {ts.world_size})")
    for name, module in ts.modules().items():
        module.load_state_dict(load_tensors(found.file(f"{name}.pt"), so))
    if any(e.local_dir for e in ts.engines.values()):
        with local_copy(found.file(ZERO_DIR), so) as local:
            for engine in ts.engines.values():
                engine.load_local(local)  # weights, fp32 master partitions, Adam state
    for name, engine in ts.engines.items():
        engine.load_state_dicts(lambda key, name=name: load_tensors(found.file(f"{key}_{name}.pt"), so))
    ts.counters.update({k: saved[k] for k in ts.counters if k in saved})
    ts.positions.clear()
    ts.family_state.clear()
    ts.handovers.clear()
    ts.handovers.update(saved.get("handovers") or {})
    relaid = saved["world_size"] * max(1, saved.get("workers", 0)) != ts.world_size * max(1, ts.workers)
    if saved["world_size"] != ts.world_size:
        take_over_epochs(found.url, saved, ts)
        log.warning("checkpoint %s was written by %d processes, this run has %d: per-rank state (RNG, the "
                    "family's, running statistics) starts anew", found.url, saved["world_size"], ts.world_size)
        return False
    mine = load_tensors(found.file(f"rank-{ts.rank:03d}.pt"), so)
    for name, module in ts.modules().items():
        for key, buf in module.named_buffers():
            buf.copy_(mine["buffers"][name][key])
    torch.set_rng_state(mine["cpu_rng"])
    if ts.device.type == "cuda" and "cuda_rng" in mine:
        torch.cuda.set_rng_state(mine["cuda_rng"], ts.device)
    if relaid:  # as many processes, other DataLoader workers
        take_over_epochs(found.url, saved, ts)
    else:
        for stream, slots in mine["positions"].items():
            ts.positions[stream] = {int(s): (int(e), int(i)) for s, (e, i) in slots.items()}
    ts.family_state.update({k: v.to(ts.device) for k, v in mine.get("family_state", {}).items()})
    return True
