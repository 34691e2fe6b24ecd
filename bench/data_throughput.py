"""Data-loading throughput: the streaming loader against the baselines, measured in one run.

What runs. The embedded demo dataset (photo + label map + instance map, PNG) is rendered once
and written as WebDataset shards, at two resolutions: the demo's own 256x128 (``--size``, many
samples) and a realistic training size, 1024x512 (``--hd-size``, what ``launch/shard.py write demo
--demo-size 1024x512`` writes; fewer samples, the same number of shards). For each resolution the
same encoded bytes are then read seven ways, each a pass over every sample. Every case but the
two decode-only ones delivers what training consumes, batches (``--batch`` samples, the collate's
one copy of every field into uint8/int tensors, see ``pipeline/data/collate.py``):

- ``decode-only (in memory)``: bytes already in memory, ``decode_field`` per field, as Pillow
  decodes by default (new image memory per decode); no I/O, no augment, no batches. The baseline
  of the issue's target.
- ``decode-only (reused memory)``: the same, each field decoded into memory of its own that every
  sample reuses (``transforms.DecodeBuffer``), as the stream decodes. Pillow then allocates and
  zero-fills no image memory per decode. Not a target: it tells how much of the stream's rate
  comes from that, so the stream's own overhead can be read against the decode it does.
- ``decode+augment+batch``: in memory, the stream's own decode and views (``transforms.Fields``
  with ``reuse``: ``decode_field`` for every field, then the paired random crop + flip as views;
  the per-sample draws of ``SampleRandom``) and its collate (``Collate.put_batches``). Not a
  target; it tells the loader's own overhead apart from augment cost.
- ``map-style folder``: a plain ``torch.utils.data.Dataset`` over one file per field in a folder,
  read in a shuffled order, decoded, augmented (``decode_augment``) and collated (``Collate``).
  The baseline users know. Its samples wait for their batch's collate, so it cannot decode into
  reused memory as the stream does.
- ``stream local (train)`` / ``(eval)``: ``make_stream(batch_size=...)`` over the local shards
  (train: shuffle buffer, random crop + flip; eval: centre crop, no flip).
- ``stream S3 (train)``: the same shards uploaded to a real S3-compatible server on loopback
  (moto's ``ThreadedMotoServer`` in a *separate* process), read through s3fs.

How it is measured. ``torch.set_num_threads(1)``, ``num_workers=0``: batches are taken straight
from the dataset (no DataLoader), so ``time.process_time()`` is the CPU cost of the work. Each
case runs in ``--replicas`` processes of its own (spawned, its data read there), and each such
process first sets glibc's allocator as every stream-reading process does
(``stream.keep_freed_memory``), so the baselines and the loader run under the same settings.
Measured side by side in one process, the cases changed each other's costs by up to a quarter,
depending on which ran beside which; and one process's timings carry that process's own luck,
which more passes of it do not average out. Each process makes one warm-up pass, then
``--repeats`` measured passes; the processes take turns, one working at a time, the order rotating
from round to round, so drifting machine load hits them alike; a case's figure is the median over
all its processes' passes. Ratios use CPU time except where marked. For S3, process CPU time
counts the client process only (including s3fs's event-loop thread) because the server runs
elsewhere; wall time also includes the server's work and the loopback round trips, on the same
cores, so the S3/local *wall* ratio (the one held to the target) is a pessimistic stand-in for a
remote store. An extra 2-worker DataLoader wall-time section runs only when the 1-minute load
average, read at start before this benchmark does any work (later it counts this benchmark's own
busy core), is below 0.5; ``--force-workers`` runs it anyway, labelled as noisy.

Why two resolutions. What the streaming loader adds per sample has a fixed part (tar headers,
key grouping, the shuffle buffer, the rng, dict building) and a part that grows with the encoded
bytes (reading the members out of the tar into memory: ``decode-only`` starts from bytes already in
memory). Decoding, and the augment (crop and flip folded into one copy per field), grow with the
pixels. So the streaming/decode-only ratio is not one number for the loader: it depends on the
per-sample decode cost. The summary at the end prints both resolutions side by side, with the loader's own work
(stream minus decode+augment+batch) in ms per sample and per encoded MB.

    .venv/bin/python bench/data_throughput.py            # 300 + 48 (1024x512) samples, 3 processes x 7 passes
    .venv/bin/python bench/data_throughput.py --quick    # < 90 s
    .venv/bin/python bench/data_throughput.py --no-hd    # the 256x128 case only
    .venv/bin/python bench/data_throughput.py --profile stream   # cProfile of one case
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import multiprocessing
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402

from pipeline import io  # noqa: E402
from pipeline.data.collate import Collate  # noqa: E402
from pipeline.data.manifest import MANIFEST_NAME, load_manifest  # noqa: E402
from pipeline.data.shards import WriteOptions, write_dataset  # noqa: E402
from pipeline.data.sources import make_source  # noqa: E402
from pipeline.data.stream import keep_freed_memory, make_stream  # noqa: E402
from pipeline.data.transforms import (  # noqa: E402
    Augment,
    DecodeBuffer,
    Fields,
    SampleRandom,
    decode_augment,
    decode_field,
    loader_dtypes,
)

TARGET_STREAM_VS_DECODE = 0.9
TARGET_S3_VS_LOCAL = 0.8
LOW_LOAD = 0.5
SPLIT = "train"


# ----------------------------------------------------------------------------- the data


def write_shards(root: Path, n: int, size: tuple[int, int], per_shard: int) -> Path:
    """Render ``n`` demo samples into local shards under ``root/shards`` (reused when a previous
    run with the same parameters left them there)."""
    out = root / "shards"
    params = {"n": n, "size": list(size), "per_shard": per_shard}
    stamp = root / "bench-params.json"
    if (out / MANIFEST_NAME).exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return out
    source = make_source("demo", None, size=size, counts={SPLIT: n}, seed=0)
    opts = WriteOptions(samples_per_shard=per_shard, workers=min(2, os.cpu_count() or 1), seed=0)
    write_dataset(source, str(out), [SPLIT], opts, progress=False)
    stamp.write_text(json.dumps(params))
    return out


def read_raw_samples(shard_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the split as ``(key, {"image.png": bytes, ...})``, in shard order, read with
    plain ``tarfile`` (independent of the loader under test)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in load_manifest(str(shard_dir)).shards(SPLIT):
        with tarfile.open(shard.url) as tar:
            for member in tar:
                if member.isfile():
                    key, _, name = member.name.partition(".")
                    samples.setdefault(key, {})[name] = tar.extractfile(member).read()
    return list(samples.items())


def write_folder(root: Path, raws: list[tuple[str, dict[str, bytes]]]) -> Path:
    """The same bytes as one file per field: ``root/folder/<field>/<key>.<ext>``."""
    folder = root / "folder"
    wanted = set()
    for key, fields in raws:
        for name, data in fields.items():
            stem, ext = name.split(".", 1)
            path = folder / stem / f"{key}.{ext}"
            wanted.add(path)
            if not path.exists() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    for path in folder.glob("*/*"):
        if path not in wanted:  # left by a reused --workdir with other parameters
            path.unlink()
    return folder


class FolderPairs(torch.utils.data.Dataset):
    """The map-style baseline: sample ``i`` is ``<field>/<key_i>.<ext>`` for every field, decoded
    with ``decode_field`` and augmented with ``augment`` (one rng per index, the loader's kind);
    batch its samples with ``Collate(dtypes)``."""

    def __init__(self, folder: Path, kinds: dict[str, str], aug: Augment, dtypes: dict[str, str], seed: int = 0,
                 train: bool = True):
        self.folder, self.kinds, self.aug, self.seed, self.train = folder, kinds, aug, seed, train
        self.dtypes = dtypes
        lead = next(iter(kinds))
        self.files = {stem: {} for stem in kinds}
        for stem in kinds:
            for path in (folder / stem).iterdir():
                self.files[stem][path.name.split(".", 1)[0]] = path
        self.keys = sorted(self.files[lead])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        encoded = {}
        for stem in self.kinds:
            with open(self.files[stem][key], "rb") as f:
                encoded[stem] = f.read()
        out = decode_augment(encoded, self.kinds, self.aug, SampleRandom(self.seed, i), self.train, self.dtypes)
        out["__key__"] = key
        return out


# ----------------------------------------------------------------------------- the S3 server


class MotoProcess:
    """moto's S3 server in its own process, so this process's CPU time is the client's alone."""

    CODE = ("import sys\nfrom moto.server import ThreadedMotoServer\n"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\ns.start()\n"
            "print(s.get_host_and_port()[1], flush=True)\nsys.stdin.read()\ns.stop()\n")

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"moto server did not start; see {log_path}")
        self.port = int(line)

    def requests(self) -> int:
        """Requests served so far (werkzeug logs one line per request)."""
        self._log.flush()
        return sum(1 for line in open(self.log_path) if '" 200 ' in line or '" 206 ' in line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def upload_shards(shard_dir: Path, url: str) -> None:
    """Copy the local shards and their manifest to ``url`` (manifest last, as the writer does)."""
    manifest = load_manifest(str(shard_dir))
    for shard in manifest.shards(SPLIT):
        io.atomic_upload(shard.url, io.join(url, shard.name))
    io.atomic_upload(shard_dir / MANIFEST_NAME, io.join(url, MANIFEST_NAME))


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    samples: Callable[[], Iterator[str]] | None = None  # one pass: the key of every sample it produces
    cpu: list[float] = field(default_factory=list)  # per measured pass
    wall: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # of the warm-up pass

    def run(self) -> list[str]:
        return list(self.samples())


def stream_pass(stream, n: int) -> Callable[[], Iterator[str]]:
    """A pass over a batching stream: a fresh iterator (as at an epoch's start: shard opens,
    shuffle-buffer fill), cut after ``n`` samples (``n`` a multiple of the batch size)."""
    def samples() -> Iterator[str]:
        batches = itertools.islice(iter(stream), n // stream.spec.batch_size)
        return (key for batch in batches for key in batch["__key__"])
    return samples


def batched(samples: Iterator[dict], size: int, collate: Collate) -> Iterator[str]:
    """The keys of ``samples``, batched ``size`` at a time as the stream batches them."""
    return (key for batch in collate.batches(samples, size) for key in batch["__key__"])


@dataclass(frozen=True)
class Setup:
    """What a process needs to build the cases of one resolution (picklable, sent to case processes)."""

    shard_dir: Path
    folder: Path
    crop: tuple[int, int]
    s3_url: str | None
    batch: int


CASE_NAMES = ("decode-only (in memory)", "decode-only (reused memory)", "decode+augment+batch (in memory)",
              "map-style folder Dataset", "stream local (train)", "stream local (eval)", "stream S3 (train)")
PROFILE_NAMES = dict(zip(("decode", "decode_reuse", "decode_aug", "map", "stream", "stream_eval", "s3"), CASE_NAMES))


def build_case(name: str, setup: Setup) -> Case:
    """One case, built (and its data read) in the process that will measure it."""
    manifest = load_manifest(str(setup.shard_dir))
    kinds = {field_name: spec["kind"] for field_name, spec in manifest.fields.items()}
    dtypes = loader_dtypes(manifest.fields, manifest.num_classes)
    aug, n = Augment(crop=setup.crop, flip=True), manifest.num_samples(SPLIT)
    raws = read_raw_samples(setup.shard_dir) if "memory" in name else []  # only where a case reads them
    collate = Collate(dtypes)

    def decode_only() -> Iterator[str]:
        for key, fields in raws:
            for member, data in fields.items():
                decode_field(kinds[member.split(".", 1)[0]], data)
            yield key

    buffers = {stem: DecodeBuffer() for stem in kinds}

    def decode_only_reused() -> Iterator[str]:  # decode_field as the stream calls it
        for key, fields in raws:
            for member, data in fields.items():
                stem, ext = member.split(".", 1)
                decode_field(kinds[stem], data, buffers[stem], ext)
            yield key

    loader_fields = Fields(kinds, dtypes, reuse=True)  # the stream's own decode and views (stream.SlotDecoder)

    def decode_and_augment() -> Iterator[str]:
        def samples() -> Iterator[tuple]:
            for i, (key, fields) in enumerate(raws):
                by_stem = {member.split(".", 1)[0]: member for member in fields}
                members = [by_stem[stem] for stem in kinds]
                views = loader_fields.decode_augment([fields[m] for m in members], aug, SampleRandom(0, i), True,
                                                     [m.split(".", 1)[1] for m in members])
                yield key, views, (i,)
        batches = collate.put_batches(samples(), setup.batch, ("__index__",))
        return (key for batch in batches for key in batch["__key__"])

    if name.startswith("stream"):
        url = setup.s3_url if "S3" in name else str(setup.shard_dir)
        stream = make_stream(url, SPLIT, train="(eval)" not in name, augment=aug, batch_size=setup.batch)
        return Case(name, stream_pass(stream, n))
    if name == "map-style folder Dataset":
        dataset, passes = FolderPairs(setup.folder, kinds, aug, dtypes), itertools.count()

        def map_style() -> Iterator[str]:
            order = np.random.default_rng([1, next(passes)]).permutation(len(dataset))
            return batched((dataset[int(i)] for i in order), setup.batch, collate)

        return Case(name, map_style)
    cases = {"decode-only (in memory)": decode_only, "decode-only (reused memory)": decode_only_reused}
    return Case(name, cases.get(name, decode_and_augment))


def case_process(conn, name: str, setup: Setup) -> None:
    """One case in a process of its own, measured when the parent says so. Its heap, allocator state
    and Python objects are its own. Measured in one process, the cases changed each other's costs:
    decode-only cost 2.24 ms per 256x128 sample taking turns with the training stream by whole
    passes, 2.82 ms taking turns with four other cases every 25 samples, and how much depended on
    the company, not on the case."""
    torch.set_num_threads(1)
    keep_freed_memory()  # what every stream-reading process does first; the baselines run alike
    case = build_case(name, setup)
    conn.send(case.run())  # the warm-up pass (page cache, imports, s3fs session, allocator): its keys
    while conn.recv():
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in case.samples():
            pass
        conn.send((time.process_time() - c0, time.perf_counter() - w0))
    conn.close()


def run_rounds(names: list[str], setup: Setup, repeats: int, replicas: int) -> list[Case]:
    """Each case in ``replicas`` processes of its own (``case_process``), each making one warm-up
    pass and then ``repeats`` measured passes. The passes are taken in turns, one process working at
    a time while the others wait on their pipes, the order rotating from round to round so drifting
    machine load hits every case alike. A case's figure is the median over all its processes'
    passes: one process's timings carry its own luck (where its buffers landed), which more passes
    of the same process do not average out; in two runs with one process per case, the augment's
    cost relative to a decode came out 0% in one run and 14% in the other."""
    ctx = multiprocessing.get_context("spawn")  # s3fs may hold an event-loop thread here: never fork
    slots = [(name, r) for r in range(replicas) for name in names]
    workers: dict[tuple[str, int], tuple] = {}
    cases = {name: Case(name) for name in names}  # the figures only: the work runs in the processes

    def reply(slot: tuple[str, int]):
        proc, conn = workers[slot]
        if not conn.poll(900):
            raise SystemExit(f"case {slot[0]!r} gave no answer in 900 s")
        try:
            return conn.recv()
        except EOFError:
            raise SystemExit(f"case {slot[0]!r} died (exit code {proc.exitcode}); its traceback is above") from None

    try:
        for slot in slots:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=case_process, args=(child, slot[0], setup), daemon=True)
            proc.start()
            child.close()
            workers[slot] = (proc, conn)
        for slot in slots:
            keys = reply(slot)
            if slot[1] == 0:
                cases[slot[0]].keys = keys
            elif keys != cases[slot[0]].keys:
                raise SystemExit(f"two processes of case {slot[0]!r} produced different samples")
        for r in range(repeats):
            k = r % len(slots)
            for slot in slots[k:] + slots[:k]:
                workers[slot][1].send(True)
                cpu, wall = reply(slot)
                cases[slot[0]].cpu.append(cpu)
                cases[slot[0]].wall.append(wall)
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(False)
            except OSError:
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return list(cases.values())


def one_thread_worker(worker_id: int) -> None:
    """DataLoader worker init: one torch thread per worker, as in this process (a spawned worker
    would otherwise size its pool by the cores, and 2 workers x 2 threads oversubscribe 2 cores),
    and the allocator settings of this process (a stream's workers set them themselves; the
    map-style loader's get them here, so both run alike)."""
    torch.set_num_threads(1)
    keep_freed_memory()


def two_worker_lines(folder: Path, shard_dir: Path, kinds, dtypes: dict[str, str], aug: Augment, n: int,
                     repeats: int, batch: int) -> list[str]:
    """Wall time of a real 2-worker DataLoader for the map-style and streaming loaders.

    The map-style loader runs epoch after epoch (persistent workers), as users run it. The training
    stream is endless, so it is timed as one iterator cut into windows of ``n`` samples: restarting
    it every pass would throw away the batches the workers had prefetched.
    """
    ctx = "spawn"  # s3fs may have an event-loop thread in this process: never fork it
    windows = -(-n // batch)
    mapped = torch.utils.data.DataLoader(FolderPairs(folder, kinds, aug, dtypes), batch_size=batch, shuffle=True,
                                         collate_fn=Collate(dtypes), num_workers=2,
                                         persistent_workers=True, multiprocessing_context=ctx,
                                         worker_init_fn=one_thread_worker)
    walls = []
    for r in range(repeats + 1):
        w0 = time.perf_counter()
        count = sum(len(b["__key__"]) for b in mapped)
        if r:  # pass 0 starts the workers
            walls.append(time.perf_counter() - w0)
    lines = [f"  {'map-style folder, 2 workers':<34} {count / statistics.median(walls):>9.1f} samples/s (wall)"]
    del mapped

    stream = make_stream(str(shard_dir), SPLIT, train=True, augment=aug, num_workers=2, batch_size=batch)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context=ctx,
                                               worker_init_fn=one_thread_worker))
    walls = []
    for r in range(repeats + 1):
        w0 = time.perf_counter()
        for _ in itertools.islice(batches, windows):
            pass
        if r:  # window 0 starts the workers
            walls.append(time.perf_counter() - w0)
    # Let the workers finish the batches they prefetched before shutting them down: a worker shut down
    # while still sending a large (1024x512) batch aborts on its way out ("terminate called without an
    # active exception"), after the timing, but noisily.
    time.sleep(3.0)
    del batches
    lines.append(f"  {'stream local (train), 2 workers':<34} {windows * batch / statistics.median(walls):>9.1f} "
                 f"samples/s (wall)")
    return lines


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Resolution:
    """One dataset the cases run over: rendered at ``size``, randomly cropped to ``crop``."""

    size: tuple[int, int]
    crop: tuple[int, int]
    samples: int
    per_shard: int
    loader_batch: int  # the 2-worker DataLoader lines: >= 6 batches per epoch, so the epoch's tail is small

    @property
    def name(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


def rate(case: Case, clock: str) -> float:
    return len(case.keys) / statistics.median(case.cpu if clock == "cpu" else case.wall)


def ms_per_sample(case: Case) -> float:
    return 1000 * statistics.median(case.cpu) / len(case.keys)


def report(cases: list[Case], notes: list[str]) -> dict[str, float]:
    """Print the table and the ratios; return the figures the cross-resolution summary needs."""
    by = {c.name: c for c in cases}
    print(f"\n{'case':<30} {'samples/s':>10} {'samples/s':>10} {'CPU ms':>8} {'CPU/wall':>9} {'spread':>7}")
    print(f"{'':<30} {'(CPU)':>10} {'(wall)':>10} {'/sample':>8} {'':>9} {'(CPU)':>7}")
    for c in cases:
        med_cpu, med_wall = statistics.median(c.cpu), statistics.median(c.wall)
        spread = (max(c.cpu) - min(c.cpu)) / med_cpu
        print(f"{c.name:<30} {rate(c, 'cpu'):>10.1f} {rate(c, 'wall'):>10.1f} "
              f"{ms_per_sample(c):>8.2f} {med_cpu / med_wall:>9.2f} {spread:>6.0%}")

    figures: dict[str, float] = {name: ms_per_sample(c) for name, c in by.items()}

    def ratio(num: str, den: str, clock: str, target: float | None = None) -> None:
        if num not in by or den not in by:
            return
        value = rate(by[num], clock) / rate(by[den], clock)
        figures[f"{num} / {den} [{clock}]"] = value
        verdict = "" if target is None else f"  target >= {target:.2f}: {'OK' if value >= target else 'BELOW'}"
        print(f"  {num} / {den} [{clock}]".ljust(72) + f"{value:6.3f}{verdict}")

    print("\nratios (same run):")
    ratio("stream local (train)", "decode-only (in memory)", "cpu", TARGET_STREAM_VS_DECODE)
    ratio("stream local (eval)", "decode-only (in memory)", "cpu", TARGET_STREAM_VS_DECODE)
    ratio("stream local (train)", "decode-only (reused memory)", "cpu")
    ratio("decode-only (reused memory)", "decode-only (in memory)", "cpu")
    ratio("stream local (train)", "decode+augment+batch (in memory)", "cpu")
    ratio("stream local (train)", "map-style folder Dataset", "cpu")
    ratio("map-style folder Dataset", "decode-only (in memory)", "cpu")
    ratio("decode+augment+batch (in memory)", "decode-only (in memory)", "cpu")
    ratio("stream S3 (train)", "stream local (train)", "wall", TARGET_S3_VS_LOCAL)
    ratio("stream S3 (train)", "stream local (train)", "cpu")
    for line in notes:
        print(line)
    return figures


SUMMARY_ROWS = [
    # (label, key in the figures, format, target)
    ("encoded kB/sample (all fields)", "kb_per_sample", "{:.1f}", None),
    ("decode-only, CPU ms/sample", "decode-only (in memory)", "{:.2f}", None),
    ("decode+augment+batch, CPU ms/sample", "decode+augment+batch (in memory)", "{:.2f}", None),
    ("stream local (train), CPU ms/sample", "stream local (train)", "{:.2f}", None),
    ("  loader's own work, ms/sample *", "overhead", "{:.2f}", None),
    ("  loader's own work, ms/encoded MB *", "overhead_per_mb", "{:.2f}", None),
    ("stream (train) / decode-only [cpu]", "stream local (train) / decode-only (in memory) [cpu]", "{:.3f}",
     TARGET_STREAM_VS_DECODE),
    ("stream (eval) / decode-only [cpu]", "stream local (eval) / decode-only (in memory) [cpu]", "{:.3f}",
     TARGET_STREAM_VS_DECODE),
    ("stream (train) / decode-only, reused memory [cpu]", "stream local (train) / decode-only (reused memory) [cpu]",
     "{:.3f}", None),
    ("decode-only: reused memory / Pillow's own [cpu]", "decode-only (reused memory) / decode-only (in memory) [cpu]",
     "{:.3f}", None),
    ("stream (train) / decode+augment+batch [cpu]", "stream local (train) / decode+augment+batch (in memory) [cpu]",
     "{:.3f}", None),
    ("decode+augment+batch / decode-only [cpu]", "decode+augment+batch (in memory) / decode-only (in memory) [cpu]",
     "{:.3f}", None),
    ("S3 / local (train) [wall]", "stream S3 (train) / stream local (train) [wall]", "{:.3f}", TARGET_S3_VS_LOCAL),
    ("S3 / local (train) [cpu]", "stream S3 (train) / stream local (train) [cpu]", "{:.3f}", None),
]


def summary(results: list[tuple[Resolution, dict[str, float]]]) -> None:
    """The two resolutions side by side: how the ratios follow the per-sample decode cost."""
    print("\n" + "=" * 88)
    print("summary: the same cases at both resolutions (medians, CPU time unless marked)")
    cols = [f"{r.name} crop {r.crop[0]}x{r.crop[1]}" for r, _ in results]
    print(f"{'':<46}" + "".join(f"{c:>22}" for c in cols) + "   target")
    for label, key, fmt, target in SUMMARY_ROWS:
        cells = []
        for _, fig in results:
            overhead = fig["stream local (train)"] - fig["decode+augment+batch (in memory)"]
            if key == "overhead":
                value = overhead
            elif key == "overhead_per_mb":
                value = overhead / (fig["kb_per_sample"] / 1e3)
            else:
                value = fig.get(key)
            cell = "-" if value is None else fmt.format(value)
            if value is not None and target is not None:
                cell += " OK" if value >= target else " BELOW"
            cells.append(cell)
        print(f"{label:<46}" + "".join(f"{c:>22}" for c in cells) + (f"   >= {target:.2f}" if target else ""))
    print("* stream (train) minus decode+augment+batch, CPU time: what the streaming loader itself adds. A fixed "
          "part per sample\n  (tar headers, grouping, shuffle buffer, rng, dicts) and a part per encoded byte "
          "(reading the members\n  out of the tar; the in-memory baselines start from bytes already read).")


def header(args, start_load: tuple[float, ...]) -> None:
    print("data throughput benchmark (bench/data_throughput.py)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in start_load)}   cpus: {os.cpu_count()}")
    print(f"torch {torch.__version__} (threads: {torch.get_num_threads()})   python {platform.python_version()}   "
          f"pillow {PIL.__version__}   numpy {np.__version__}")
    print(f"num_workers=0, batches of {args.batch} (all but decode-only); each case in {args.replicas} processes "
          f"of its own, {args.repeats} passes each after 1 warm-up, median over all; the processes take turns, "
          "one at a time")
    print("allocator: " + ("glibc, freed memory kept mapped (stream.keep_freed_memory), for every case"
                           if args.allocator else "defaults (stream.keep_freed_memory did not apply)")
          + f"; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (inherited by every case process)")


def data_line(res: Resolution, shard_dir: Path, raws) -> None:
    load = os.getloadavg()
    manifest = load_manifest(str(shard_dir))
    per_sample = {name: statistics.mean(len(f[name]) for _, f in raws) for name in raws[0][1]}
    print("\n" + "=" * 88)
    print(f"resolution {res.name}: demo {res.name}, {len(raws)} samples in {len(manifest.shards(SPLIT))} shards; "
          f"load average after setup {' '.join(f'{x:.2f}' for x in load)}")
    print("  bytes/sample: " + ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in per_sample.items()))
    print(f"  augment: random crop {res.crop[0]}x{res.crop[1]} + h-flip (eval: centre crop)")


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=300, help="samples in the dataset = one pass")
    p.add_argument("--repeats", type=int, default=7, help="measured passes per case process")
    p.add_argument("--replicas", type=int, default=3, help="processes per case")
    p.add_argument("--size", type=parse_size, default=(256, 128), help="demo sample size WxH")
    p.add_argument("--crop", type=parse_size, default=(224, 112), help="random crop WxH")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--batch", type=int, default=12, help="samples per batch (divides both sample counts)")
    p.add_argument("--hd-size", type=parse_size, default=(1024, 512), help="the second resolution WxH")
    p.add_argument("--hd-crop", type=parse_size, default=(896, 448), help="its random crop WxH")
    p.add_argument("--hd-samples", type=int, default=48, help="samples at the second resolution")
    p.add_argument("--hd-samples-per-shard", type=int, default=16)
    p.add_argument("--no-hd", action="store_true", help="the first resolution only")
    p.add_argument("--quick", action="store_true", help="96 + 12 samples, 3 repeats (< 90 s)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 case")
    p.add_argument("--force-workers", action="store_true", help="run the 2-worker lines whatever the load")
    p.add_argument("--workdir", type=Path, help="keep data here and reuse it (default: a temp dir)")
    p.add_argument("--profile", choices=("decode", "decode_aug", "map", "stream", "stream_eval", "s3"),
                   help="instead of the table, cProfile --repeats passes of one case (first resolution)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.replicas, args.samples_per_shard = 96, 3, 1, 32
        args.hd_samples, args.hd_samples_per_shard = 12, 4
    for count in (args.samples, args.hd_samples):
        if count % args.batch:  # a training pass of whole batches must be exactly one epoch
            p.error(f"--batch {args.batch} must divide the sample counts ({args.samples}, {args.hd_samples})")
    return args


def profile(case: Case, repeats: int) -> None:
    case.run()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        case.run()
    prof.disable()
    print(f"\ncProfile of {repeats} passes of '{case.name}'")
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def run_resolution(args, res: Resolution, root: Path, server: MotoProcess | None, bucket: str | None,
                   start_load: tuple[float, ...]) -> dict[str, float] | None:
    """Render, shard and (for S3) upload one resolution, measure every case, print its report."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    shard_dir = write_shards(root, res.samples, res.size, res.per_shard)
    raws = read_raw_samples(shard_dir)
    folder = write_folder(root, raws)
    manifest = load_manifest(str(shard_dir))
    kinds = {name: spec["kind"] for name, spec in manifest.fields.items()}
    dtypes = loader_dtypes(manifest.fields, manifest.num_classes)
    aug = Augment(crop=res.crop, flip=True)
    s3_url = None
    if server is not None:
        s3_url = f"s3://{bucket}/{res.name}/shards"
        upload_shards(shard_dir, s3_url)
    setup = Setup(shard_dir, folder, res.crop, s3_url, args.batch)
    if args.profile:
        profile(build_case(PROFILE_NAMES[args.profile], setup), args.repeats)
        return None
    data_line(res, shard_dir, raws)
    print(f"  setup (render, shard, extract, upload): {time.perf_counter() - t0:.1f} s")
    requests_before = server.requests() if server else 0
    cases = run_rounds([n for n in CASE_NAMES if s3_url or "S3" not in n], setup, args.repeats, args.replicas)
    notes = check_keys(cases, len(raws))
    if server:
        per_pass = (server.requests() - requests_before) / ((args.repeats + 1) * args.replicas)
        notes.append(f"S3: {per_pass:.0f} requests per pass (moto server in a separate process; "
                     f"CPU = the client process only, wall includes the server on the same cores)")
    figures = report(cases, notes)
    figures["kb_per_sample"] = statistics.mean(sum(len(b) for b in f.values()) for _, f in raws) / 1e3
    if start_load[0] < LOW_LOAD or args.force_workers:
        why = (f"load average at start {start_load[0]:.2f} < {LOW_LOAD}" if start_load[0] < LOW_LOAD
               else f"forced: load average at start {start_load[0]:.2f}, NOISY")
        now = os.getloadavg()[0]  # includes this benchmark's own busy core: a hint of others' load, no more
        print(f"\n2-worker DataLoader (batch {res.loader_batch}, 1 torch thread per worker), wall time only ({why}; "
              f"1-minute load average now {now:.2f}, this benchmark's own core included):")
        print("\n".join(two_worker_lines(folder, shard_dir, kinds, dtypes, aug, len(raws), args.repeats,
                                         res.loader_batch)))
    else:
        print(f"\n2-worker DataLoader lines skipped: load average at start {start_load[0]:.2f} >= {LOW_LOAD}")
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    start_load = os.getloadavg()  # before this process adds its own busy core to it
    torch.set_num_threads(1)
    # What every process that iterates a stream does first; set here, before any case runs, so that
    # the baselines run with the same allocator settings as the loader.
    args.allocator = keep_freed_memory()
    start = time.perf_counter()
    resolutions = [Resolution(args.size, args.crop, args.samples, args.samples_per_shard, 16)]
    if not (args.no_hd or args.profile):
        resolutions.append(Resolution(args.hd_size, args.hd_crop, args.hd_samples, args.hd_samples_per_shard, 4))
    if not args.profile:
        header(args, start_load)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = args.workdir or Path(tmp)
        server, bucket, results = None, None, []
        try:
            if not args.no_s3:
                server = MotoProcess(Path(tmp) / "moto.log")
                os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.port}", AWS_ACCESS_KEY_ID="bench",
                                  AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
                bucket = f"bench-{os.getpid()}"
                io.fs_for(f"s3://{bucket}")[0].mkdir(bucket)
            for res in resolutions:
                # The first resolution keeps the layout a reused --workdir already has.
                sub = root if res == resolutions[0] else root / res.name
                figures = run_resolution(args, res, sub, server, bucket, start_load)
                if figures is None:
                    return 0
                results.append((res, figures))
        finally:
            if server:
                server.close()
        if len(results) > 1:
            summary(results)
        print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"total {time.perf_counter() - start:.0f} s")
    return 0


def check_keys(cases: list[Case], n: int) -> list[str]:
    """Every case must have produced every sample once; local and S3 streams the same order."""
    expected = None
    for case in cases:
        if len(case.keys) != n or len(set(case.keys)) != n:
            raise SystemExit(f"{case.name} produced {len(case.keys)} samples ({len(set(case.keys))} distinct), "
                             f"expected {n}")
        expected = expected or sorted(case.keys)
        if sorted(case.keys) != expected:
            raise SystemExit(f"{case.name} produced a different set of samples")
    note = f"checked: every case yields the same {n} samples per pass"
    by = {c.name: c for c in cases}
    if "stream S3 (train)" in by:
        if by["stream S3 (train)"].keys != by["stream local (train)"].keys:
            raise SystemExit("the S3 stream and the local stream disagree on the sample order")
        note += "; S3 and local streams in the same order"
    return [note]


if __name__ == "__main__":
    sys.exit(main())
