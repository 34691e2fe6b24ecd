"""Data loading cost: the training stream against a plain map-style folder Dataset.

Per-sample CPU time with one thread, in the reading process itself (``num_workers=0``), at
256x128 and 1024x512 demo samples (image, label and instance PNGs):

- ``map-style folder``: a ``torch.utils.data.Dataset`` over the same files extracted to
  ``<field>/<key>.<ext>``: each field read and decoded by PIL (``transforms.decode_field``), the
  same paired random crop + flip (``transforms.augment``), batches by ``DataLoader(batch_size=B,
  shuffle=True)``'s default collation. The baseline users know.
- ``stream``: ``make_stream(train=True, batch_size=B)`` over the local shards: webdataset's tar
  reader, the shuffle buffer, the same decode, augmentation and collation.
- ``stream, glibc default malloc``: the stream in a process without the ``GLIBC_TUNABLES``
  allocator setting that the launch scripts export (``ALLOCATOR``); every other case has it.

Each case runs in ``--replicas`` processes of its own (a warm-up pass, then ``--repeats``
measured passes, one process working at a time, the order rotating from round to round); a
case's figure is the median over all its passes. Then images/s of one DataLoader worker at
1024x512 (wall time, the main process only receiving batches).

    .venv/bin/python bench/data_throughput.py            # the table (~4 min; --quick ~1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

import torch  # noqa: E402

from pipeline.data.manifest import load_manifest  # noqa: E402
from pipeline.data.shard_reader import read_samples  # noqa: E402
from pipeline.data.shards import WriteOptions, write_dataset  # noqa: E402
from pipeline.data.sources import make_source  # noqa: E402
from pipeline.data.stream import make_stream  # noqa: E402
from pipeline.data.transforms import Augment, augment, decode_field, field_dtypes, sample_rng  # noqa: E402

ALLOCATOR = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"  # as launch/*.sh
CASES = ("map-style folder", "stream", "stream, glibc default malloc")
SPLIT = "train"
V100_IMG_PER_SEC = 2.0  # pix2pixHD at 2048x1024 (published: ~2 img/s per V100)
H100_OVER_V100 = 4.0  # our estimate for a convolutional GAN in bf16 (not measured here)


def write_data(root: Path, size: tuple[int, int], n: int, per_shard: int) -> tuple[Path, Path]:
    """Demo samples as local shards and, the same bytes, as one file per field (reused when a
    previous run with the same parameters left them in ``root``)."""
    shards, folder, stamp = root / "shards", root / "folder", root / "params.json"
    params = {"size": list(size), "n": n, "per_shard": per_shard}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return shards, folder
    source = make_source("demo", None, size=size, counts={SPLIT: n}, seed=0)
    write_dataset(source, str(shards), [SPLIT], WriteOptions(samples_per_shard=per_shard, workers=2), progress=False)
    for shard in load_manifest(str(shards)).shards(SPLIT):
        with open(shard.url, "rb") as f:
            for raw in read_samples(f, shard.url):
                for member, data in raw.items():
                    if not member.startswith("__"):
                        stem, ext = member.split(".", 1)
                        (folder / stem).mkdir(parents=True, exist_ok=True)
                        (folder / stem / f"{raw['__key__']}.{ext}").write_bytes(data)
    stamp.write_text(json.dumps(params))
    return shards, folder


class FolderDataset(torch.utils.data.Dataset):
    """The map-style baseline: sample ``i`` is ``<field>/<key_i>.*`` of every field, decoded,
    augmented with the draws of position ``i``."""

    def __init__(self, folder: Path, manifest, aug: Augment):
        self.kinds = {name: spec["kind"] for name, spec in manifest.fields.items()}
        self.dtypes = field_dtypes(manifest.fields, manifest.num_classes)
        self.paths = {name: sorted((folder / name).iterdir()) for name in self.kinds}
        self.aug = aug

    def __len__(self) -> int:
        return len(next(iter(self.paths.values())))

    def __getitem__(self, i: int) -> dict:
        images = {name: decode_field(kind, self.paths[name][i].read_bytes()) for name, kind in self.kinds.items()}
        sample = augment(images, self.kinds, self.dtypes, self.aug, sample_rng(0, 0, 0, i), True)
        sample["__key__"] = self.paths["image"][i].stem
        return sample


def make_pass(case: str, shards: Path, folder: Path, crop: tuple[int, int], batch: int):
    """One pass of ``case``: a function that loads one epoch and returns its sample count."""
    aug = Augment(crop=crop, flip=True)
    if case.startswith("map-style"):
        loader = torch.utils.data.DataLoader(FolderDataset(folder, load_manifest(str(shards)), aug), batch_size=batch,
                                             shuffle=True, generator=torch.Generator().manual_seed(0))
        return lambda: sum(len(b["__key__"]) for b in loader)
    stream = make_stream(str(shards), SPLIT, train=True, augment=aug, batch_size=batch)
    per_epoch = len(stream)  # a fresh iterator per pass: shard opens and the buffer's fill, as each epoch
    return lambda: sum(len(b["__key__"]) for b in itertools.islice(iter(stream), per_epoch))


def case_process(conn, case: str, shards: Path, folder: Path, crop: tuple[int, int], batch: int) -> None:
    torch.set_num_threads(1)
    one_pass = make_pass(case, shards, folder, crop, batch)
    conn.send(one_pass())  # warm-up: page cache, imports, first allocations
    while conn.recv():
        c0 = time.process_time()
        n = one_pass()
        conn.send((time.process_time() - c0) / n)
    conn.close()


def measure(shards: Path, folder: Path, crop: tuple[int, int], batch: int, repeats: int,
            replicas: int) -> dict[str, list[float]]:
    """CPU seconds per sample of every pass of every case, the processes taking turns."""
    ctx = multiprocessing.get_context("spawn")  # a new process: its allocator is set from its environment
    slots, procs = [(case, r) for r in range(replicas) for case in CASES], {}
    for case, r in slots:
        os.environ["GLIBC_TUNABLES"] = "" if "default malloc" in case else ALLOCATOR
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=case_process, args=(child, case, shards, folder, crop, batch), daemon=True)
        proc.start()
        procs[case, r] = (proc, conn)
    os.environ["GLIBC_TUNABLES"] = ALLOCATOR
    per_sample = {case: [] for case in CASES}
    try:
        for slot in slots:
            procs[slot][1].recv()
        for k in range(repeats):
            for slot in slots[k % len(slots):] + slots[:k % len(slots)]:
                procs[slot][1].send(True)
                per_sample[slot[0]].append(procs[slot][1].recv())
    finally:
        for proc, conn in procs.values():
            conn.send(False)
            proc.join(timeout=30)
    return per_sample


def one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def worker_rate(shards: Path, crop: tuple[int, int], batch: int, batches: int, repeats: int) -> float:
    """Images/s delivered by one DataLoader worker (wall time, median over windows of ``batches``)."""
    stream = make_stream(str(shards), SPLIT, train=True, augment=Augment(crop=crop), num_workers=1, batch_size=batch)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="spawn",
                                              worker_init_fn=one_thread, prefetch_factor=2))
    rates = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in itertools.islice(loader, batches):
            pass
        if r:  # window 0 starts the worker
            rates.append(batches * batch / (time.perf_counter() - t0))
    del loader
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="measured passes per process")
    p.add_argument("--replicas", type=int, default=3, help="processes per case")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="fewer samples, 3 repeats, 1 process per case")
    p.add_argument("--workdir", type=Path, help="keep the data here and reuse it (default: a temp dir)")
    args = p.parse_args(argv)
    sizes = [((256, 128), (224, 112), 192, 48), ((1024, 512), (896, 448), 36, 12)]  # size, crop, samples, per shard
    if args.quick:
        args.repeats, args.replicas = 3, 1
        sizes = [(s, c, n // 2, k) for s, c, n, k in sizes]
    os.environ["GLIBC_TUNABLES"] = ALLOCATOR
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    load = os.getloadavg()[0]
    print(f"bench/data_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}  "
          f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}, {os.cpu_count()} cores, load {load:.2f} "
          f"at start; torch {torch.__version__}, Python {platform.python_version()}")
    print(f"CPU ms per sample, 1 thread; median over {args.replicas} processes x {args.repeats} passes per case; "
          f"batches of {args.batch}; random crop + flip\n")
    print(f"| size (crop) | {' | '.join(CASES)} | stream / map-style | glibc default / {ALLOCATOR.split(':')[0]}... |")
    print("|---" * (len(CASES) + 3) + "|")
    for (w, h), crop, n, per_shard in sizes:
        shards, folder = write_data(work / f"{w}x{h}", (w, h), n, per_shard)
        cpu = {case: statistics.median(v) * 1e3 for case, v in
               measure(shards, folder, crop, args.batch, args.repeats, args.replicas).items()}
        print(f"| {w}x{h} ({crop[0]}x{crop[1]}) | " + " | ".join(f"{cpu[c]:.2f}" for c in CASES)
              + f" | **{cpu['stream'] / cpu['map-style folder']:.3f}** | "
              f"{cpu['stream, glibc default malloc'] / cpu['stream']:.3f} |")
    rate = worker_rate(shards, crop, args.batch, 3 if args.quick else 5, args.repeats)
    h100 = V100_IMG_PER_SEC * H100_OVER_V100
    print(f"\nOne DataLoader worker at {w}x{h}: {rate:.1f} images/s (wall). pix2pixHD trains at ~{V100_IMG_PER_SEC:g} "
          f"img/s per V100 (published); at an estimated {H100_OVER_V100:g}x that on an H100 (~{h100:g} img/s), one "
          f"worker feeds ~{rate / h100:.1f} H100s, so 1-2 workers per GPU keep it fed.")
    print(f"load at the end: {os.getloadavg()[0]:.2f}; data in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
