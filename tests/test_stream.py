"""The streaming loader: slot planning, exactly-once evaluation over real processes, equal
training batches over real gloo ranks, paired augmentation, resume, and bad data."""

from __future__ import annotations

import collections
import io
import itertools
import json
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import NUM_CLASSES, SyntheticSource, render

from pipeline.data.manifest import ShardInfo
from pipeline.data.shards import WriteOptions, write_dataset
from pipeline.data.sources.base import encode_png
from pipeline.data.stream import POSITIONS, BadDataBudgetExceeded, make_stream, plan_segments, shuffled
from pipeline.data.transforms import Augment

REPO = Path(__file__).resolve().parent.parent
RANK_SCRIPT = REPO / "tests" / "workers" / "stream_rank.py"


def write(out: Path, counts: dict[str, int], per_shard: int) -> list[str]:
    write_dataset(SyntheticSource(counts=counts), str(out), list(counts),
                  WriteOptions(samples_per_shard=per_shard), progress=False)
    return [f"{split}_{k:04d}" for split, n in counts.items() for k in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, *args: str, timeout: float = 120) -> list[dict]:
    """Start ``world`` rank processes together; on failure show every rank's output."""
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), "--rank", str(r), "--world", str(world), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate() for p in procs]
        pytest.fail("ranks timed out (hang?):\n" + "\n".join(f"rank {r}: {o[1][-3000:]}" for r, o in
                                                            enumerate(outputs)))
    for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{err[-4000:]}"
    return [json.loads(out) for out, _ in outputs]


# ---------------------------------------------------------------- planning (pure functions)


def shard_list(sizes: list[int]) -> list[ShardInfo]:
    return [ShardInfo(f"s{i}", f"s{i}", n, 0, "") for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes, slots", [([7, 3, 11], 4), ([5], 3), ([2, 2, 2, 2, 9], 8), ([1, 1], 1)])
def test_eval_plan_partitions_every_sample_exactly_once(sizes, slots):
    shards = shard_list(sizes)
    seen = collections.Counter()
    for slot in range(slots):
        for seg in plan_segments(shards, slot=slot, num_slots=slots, seed=3, epoch=0, train=False):
            seen.update((seg.shard.name, i) for i in range(seg.start, seg.stop))
    assert sorted(seen) == sorted((f"s{i}", j) for i, n in enumerate(sizes) for j in range(n))
    assert set(seen.values()) == {1}


def test_train_plan_gives_equal_disjoint_quotas_that_reshuffle_per_epoch():
    shards = shard_list([7, 3, 11, 4])
    plans = {}
    for epoch in range(3):
        seen = []
        for slot in range(4):
            segs = plan_segments(shards, slot=slot, num_slots=4, seed=3, epoch=epoch, train=True)
            positions = [(s.shard.name, i) for s in segs for i in range(s.start, s.stop)]
            assert len(positions) == 25 // 4
            seen += positions
        assert len(set(seen)) == len(seen)  # no sample twice in an epoch
        plans[epoch] = seen
    assert plans[0] != plans[1] != plans[2]
    again = [(s.shard.name, i) for slot in range(4)
             for s in plan_segments(shards, slot=slot, num_slots=4, seed=3, epoch=1, train=True)
             for i in range(s.start, s.stop)]
    assert again == plans[1]  # a pure function of (seed, epoch, slot)


def test_the_shuffle_buffer_holds_at_most_its_samples_and_bytes_and_mixes_within_its_reach():
    sizes = [100, 900, 300, 50, 700, 200] * 10  # member bytes of 60 raw samples
    raws = [{"__key__": f"k{i}", "image.png": b"x" * n} for i, n in enumerate(sizes)]
    pulled = []

    def source():
        for raw in raws:
            pulled.append(raw["__key__"])
            yield raw

    for size, max_bytes in [(8, 1e9), (50, 2000), (1000, 1500)]:
        pulled.clear()
        out, held = [], []
        for raw in shuffled(source(), size, max_bytes, random.Random(4)):
            waiting = set(pulled) - {r["__key__"] for r in out}  # in the buffer when this one left
            held.append((len(waiting), sum(sizes[int(k[1:])] for k in waiting)))
            out.append(raw)
        assert sorted(r["__key__"] for r in out) == sorted(r["__key__"] for r in raws)  # each once
        assert max(n for n, _ in held) <= size
        # Bytes held before one leaves: the bound, plus the sample whose arrival pushed it over.
        assert max(b for _, b in held) <= max_bytes + max(sizes)
        positions = [int(r["__key__"][1:]) for r in out]
        assert positions != sorted(positions)  # mixed
        assert all(pos < p + size for p, pos in enumerate(positions))  # within the buffer's reach
        again = [r["__key__"] for r in shuffled(iter(raws), size, max_bytes, random.Random(4))]
        assert again == [r["__key__"] for r in out]  # a function of the input, the bounds and the seed
    assert [r["__key__"] for r in shuffled(iter(raws), 1, 1e9, random.Random(4))] == [r["__key__"] for r in raws]
    big = [{"__key__": "big", "image.png": b"x" * 5000}]  # larger than the bound alone: passes through
    assert [r["__key__"] for r in shuffled(iter(big), 8, 1000, random.Random(0))] == ["big"]


# ---------------------------------------------------------------- real processes


@pytest.mark.multiprocess
def test_eval_mode_two_ranks_two_workers_sees_every_sample_once(tmp_path):
    keys = write(tmp_path, {"val": 23}, per_shard=5)
    ranks = run_ranks(2, "--url", str(tmp_path), "--split", "val", "--workers", "2", "--batch", "3")
    got = collections.Counter(k for r in ranks for b in r["batches"] for k in b["__key__"])
    assert got == collections.Counter(keys)
    assert [r["len"] for r in ranks] == [4, 4]  # batches of 3 per slot, rounded up: slots of 5, 6, 6, 6
    assert sum(len(b["__key__"]) for b in ranks[0]["batches"]) == 11


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", [None, "truncate"])
def test_training_with_uneven_shards_keeps_ranks_in_step(tmp_path, damage):
    write(tmp_path, {"train": 23}, per_shard=8)  # 3 shards (8, 8, 7) over 2 ranks x 2 workers
    if damage:
        # A truncated shard must cost samples on the rank that reads it, never a hang of the other.
        shard = tmp_path / "train-000001.tar"
        shard.write_bytes(shard.read_bytes()[:5000])
    steps = 14
    ranks = run_ranks(2, "--url", str(tmp_path), "--workers", "2", "--train", "--batch", "2",
                      "--steps", str(steps), "--dist", f"tcp://127.0.0.1:{free_port()}")
    assert [len(r["batches"]) for r in ranks] == [steps, steps]
    per_epoch = collections.Counter((r["rank"], e) for r in ranks for b in r["batches"] for e in b["__epoch__"])
    first = {r["rank"]: len({k for b in r["batches"] for k, e in zip(b["__key__"], b["__epoch__"]) if e == 0})
             for r in ranks}
    epoch0 = [k for r in ranks for b in r["batches"] for k, e in zip(b["__key__"], b["__epoch__"]) if e == 0]
    assert len(epoch0) == len(set(epoch0))  # within an epoch no sample is read twice
    if damage is None:
        assert per_epoch[(0, 0)] == per_epoch[(1, 0)] == 10  # 23 // 4 slots = 5 each, 2 slots per rank
        assert first == {0: 10, 1: 10}
    else:
        bad = [max(b["__bad__"]) for r in ranks for b in r["batches"]]
        assert max(bad) > 0  # the loss was counted by some slot


# ---------------------------------------------------------------- augmentation and tensors


def check_rule(sample: dict) -> None:
    """The synthetic pixel rule survives any paired transform (see synthetic_data)."""
    image = sample["image"].to(torch.int64)  # [3, H, W]
    label, instance = sample["label"].to(torch.int64), sample["instance"].to(torch.int64)
    k = int(image[2, 0, 0])
    assert torch.equal(image[0], label * 20)
    assert torch.equal(instance, label * 1000 + k)


def test_paired_augmentation_applies_one_crop_and_flip_to_every_field(tmp_path):
    write(tmp_path, {"train": 12}, per_shard=12)
    stream = make_stream(str(tmp_path), "train", train=True, augment=Augment(crop=(16, 12), flip=True))
    flips, origins = set(), set()
    for n, sample in enumerate(stream):
        if n == 40:
            break
        # The loader's contract: integers as stored, uint8 images, (<= 256 classes) uint8 labels and
        # uint16 instance maps (stored as PNG, at most 16 bits).
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 12, 16)
        assert sample["label"].dtype == torch.uint8 and sample["label"].shape == (12, 16)
        assert sample["instance"].dtype == torch.uint16 and sample["instance"].shape == (12, 16)
        assert all(sample[f].is_contiguous() for f in ("image", "label", "instance"))
        assert int(sample["label"].max()) < NUM_CLASSES
        check_rule(sample)
        green = sample["image"][1, 0].to(torch.int64)
        flips.add(bool(green[0] > green[-1]))  # the column ramp runs backwards after a flip
        origins.add(int(green.min()) // 8)  # the crop's first column
    assert flips == {True, False}
    assert len(origins) > 1  # random crops, not one fixed window


def test_prepare_gives_the_floats_of_the_host_side_conversion(tmp_path):
    """A host-side reference (PIL crop and flip, ``np.array``, ``.float().mul_(1 / 127.5).sub_(1)``
    and int64 labels) and the uint8 stream + ``prepare`` give the same tensors, bit for bit, on
    every sample of a real stream with random crops and flips drawn from ``sample_rng``."""
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.data.transforms import decode_field, sample_rng
    from pipeline.families import get_family
    from pipeline.families.labelmaps import one_hot
    from pipeline.train.family import DataInfo

    write(tmp_path, {"train": 10}, per_shard=4)
    aug = Augment(crop=(16, 12), flip=True)
    m = load_manifest(str(tmp_path))
    info = DataInfo(m.task, m.num_classes, tuple(m.fields))
    cfg = load_config(None, ["model.family=pix2pixhd", "model.generator=global"])
    family = get_family("pix2pixhd")
    raws = {}
    for shard in m.shards("train"):
        with tarfile.open(shard.url) as tar:
            for member in tar:
                key, _, name = member.name.partition(".")
                raws.setdefault(key, {})[name.split(".")[0]] = tar.extractfile(member).read()
    flips = set()
    for n, sample in enumerate(make_stream(str(tmp_path), "train", train=True, augment=aug, seed=3)):
        if n == 20:
            break
        b = family.prepare({"data": torch.utils.data.default_collate([sample])}, torch.device("cpu"), cfg, info)
        rng = sample_rng(3, sample["__slot__"], sample["__epoch__"], sample["__index__"])
        fields = {name: decode_field(m.fields[name]["kind"], data) for name, data in raws[sample["__key__"]].items()}
        _, box, flip = aug.params(fields["image"].size, rng, True)
        flips.add(flip)
        old = {}
        for name, img in fields.items():
            img = img.crop(box)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            old[name] = np.array(img)
        old_image = torch.from_numpy(old["image"]).permute(2, 0, 1).float().mul_(1 / 127.5).sub_(1.0).contiguous()
        old_label = torch.from_numpy(old["label"].astype(np.int64))
        assert b["image"].dtype == torch.float32 and torch.equal(b["image"][0], old_image)
        assert -1 <= float(b["image"].min()) and float(b["image"].max()) <= 1
        assert b["label"].dtype == torch.int64 and torch.equal(b["label"][0], old_label)
        assert torch.equal(b["input"][:, :NUM_CLASSES], one_hot(old_label[None], NUM_CLASSES))
        assert b["instance"].dtype == torch.int32
        assert torch.equal(b["instance"][0, 0], torch.from_numpy(old["instance"].astype(np.int32)))
    assert flips == {True, False}


def paired_shard(path: Path, count: int) -> None:
    """A paired (pix2pix facades-like) shard written by webdataset's own ShardWriter."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for k in range(count):
            fields = render(k)
            sink.write({"__key__": f"p{k}", "input.png": encode_png(fields["image"][..., ::-1].copy()),
                        "image.png": encode_png(fields["image"])})


@pytest.mark.parametrize("family, task", [("pix2pix", "label2image"), ("pix2pix", "paired"),
                                          ("pix2pixhd", "label2image"), ("dcgan", "unconditional"),
                                          ("cyclegan", "unpaired")])
def test_every_familys_prepare_takes_the_stream_batch(tmp_path, family, task):
    """The batch contract end to end: a real stream's batch through each family's ``prepare``."""
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.families import get_family
    from pipeline.train.family import DataInfo

    if task == "paired":
        paired_shard(tmp_path / "facades-000.tar", 4)
        url = str(tmp_path / "facades-000.tar")  # a shard pattern: fields found by their stems
    else:
        write(tmp_path, {"train": 4}, per_shard=4)
        url = str(tmp_path)
    manifest = load_manifest(url)
    info = DataInfo(task, manifest.num_classes, tuple(manifest.fields))
    assert manifest.task == task or task in ("unconditional", "unpaired")
    fam = get_family(family)
    size, aug = ((64, 64), Augment(resize=(64, 64))) if family == "dcgan" else ((16, 12), Augment(crop=(16, 12)))
    cfg = load_config(None, [f"model.family={family}"])
    # Each of the family's streams reads the one split here (CycleGAN's A and B: its two domains).
    batches = {s.name: next(iter(make_stream(url, "train", train=True, fields=s.fields, augment=aug, batch_size=4)))
               for s in fam.streams(cfg, info, "train")}
    for batch in batches.values():
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, size[1], size[0])
    b = fam.prepare(batches, torch.device("cpu"), cfg, info)
    if family == "cyclegan":
        assert set(b) == {"A", "B"} and all(t.dtype == torch.float32 and t.shape == (4, 3, size[1], size[0])
                                              for t in b.values())
        return
    assert b["image"].dtype == torch.float32 and b["image"].shape == (4, 3, size[1], size[0])
    assert -1 <= float(b["image"].min()) and float(b["image"].max()) <= 1
    expected_input = {"pix2pix": 3 if task == "paired" else NUM_CLASSES, "pix2pixhd": NUM_CLASSES + 1}
    if family in expected_input:
        assert b["input"].dtype == torch.float32 and b["input"].shape == (4, expected_input[family], size[1], size[0])
    if task == "label2image":
        assert b["label"].dtype == torch.int64 and b["label"].shape == (4, size[1], size[0])
    if family == "pix2pixhd":
        assert b["instance"].dtype == torch.int32 and b["instance"].shape == (4, 1, size[1], size[0])
    if family == "dcgan":
        assert b["z"].shape == (4, cfg.model.z_dim)


@pytest.mark.parametrize("train", [True, False])
def test_batches_are_the_samples_in_order_stacked(tmp_path, train):
    write(tmp_path, {"val": 11}, per_shard=4)
    aug = Augment(crop=(16, 12), flip=True)
    singles = list(itertools.islice(make_stream(str(tmp_path), "val", train=train, augment=aug), 24 if train else 11))
    stream = make_stream(str(tmp_path), "val", train=train, augment=aug, batch_size=4)
    batches = list(itertools.islice(stream, 6 if train else 100))
    # Training: endless, every batch full, across the epoch boundary; evaluation: 4 + 4 + 3.
    assert [len(b["__key__"]) for b in batches] == ([4] * 6 if train else [4, 4, 3])
    assert len(stream) == 3
    for i, b in enumerate(batches):
        part = singles[4 * i:4 * i + 4]
        assert b["__key__"] == [x["__key__"] for x in part]
        assert b["__epoch__"].tolist() == [x["__epoch__"] for x in part]
        for name in ("image", "label", "instance"):
            assert torch.equal(b[name], torch.stack([x[name] for x in part]))


def test_a_stream_under_a_users_own_dataloader_batches_as_the_stream_does(tmp_path):
    """``DataLoader(stream, batch_size=B, num_workers=W)`` over single samples (what a user writes)
    gives the batches the stream makes itself with ``batch_size=B`` (what the loop uses)."""
    write(tmp_path, {"train": 26}, per_shard=7)
    make = lambda batch: make_stream(str(tmp_path), "train", train=True, num_workers=2, seed=1,  # noqa: E731
                                     augment=Augment(crop=(16, 12)), batch_size=batch)
    users = list(itertools.islice(torch.utils.data.DataLoader(make(None), batch_size=4, num_workers=2), 8))
    ours = list(itertools.islice(torch.utils.data.DataLoader(make(4), batch_size=None, num_workers=2), 8))
    assert {int(s) for b in users for s in b["__slot__"]} == {0, 1}  # both workers took part
    for a, b in zip(users, ours):
        assert a.keys() == b.keys() and a["__key__"] == b["__key__"]
        assert a["image"].shape == (4, 3, 12, 16) and a["image"].dtype == torch.uint8
        assert a["label"].dtype == torch.uint8 and a["instance"].dtype == torch.uint16
        assert a["__index__"].dtype == torch.int64
        for name in ("image", "label", "instance", *POSITIONS):
            assert torch.equal(a[name], b[name]), name


def test_resize_keeps_label_ids_and_eval_is_deterministic(tmp_path):
    write(tmp_path, {"val": 4}, per_shard=4)
    aug = Augment(resize=(48, 32), crop=(40, 24))
    a = list(make_stream(str(tmp_path), "val", train=False, augment=aug))
    b = list(make_stream(str(tmp_path), "val", train=False, augment=aug))
    assert len(a) == 4
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["label"].shape == (24, 40) and int(x["label"].max()) < NUM_CLASSES
        assert x["image"].dtype == torch.uint8 and x["label"].dtype == torch.uint8
        assert torch.equal(x["instance"].to(torch.int64) // 1000, x["label"].to(torch.int64))


def test_resume_from_consumed_positions_continues_exactly(tmp_path):
    write(tmp_path, {"train": 21}, per_shard=6)
    make = lambda start=None: torch.utils.data.DataLoader(  # noqa: E731
        make_stream(str(tmp_path), "train", train=True, num_workers=2, seed=5, shuffle_buffer=8,
                    augment=Augment(crop=(16, 12)), start=start, batch_size=3), batch_size=None, num_workers=2)
    full = [b for _, b in zip(range(12), make())]
    # Consume 6 batches (a multiple of the worker count), note the position of every slot.
    positions = {}
    for batch in full[:6]:
        for slot, epoch, index in zip(batch["__slot__"], batch["__epoch__"], batch["__index__"]):
            positions[int(slot)] = max(positions.get(int(slot), (0, 0)), (int(epoch), int(index) + 1))
    resumed = [b for _, b in zip(range(6), make(start=positions))]
    assert any(int(e) > 0 for b in full for e in b["__epoch__"])  # the run crossed an epoch boundary
    for a, b in zip(full[6:], resumed):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_another_layout_of_slots_takes_over_an_epoch_without_losing_or_repeating_a_sample(tmp_path):
    """Three slots read 5, 7 and 4 positions of epoch 0 of 50 samples; two slots then share out
    the rest (``handover``): every sample the three would still have read is read once, with the
    augmentation its old slot would have drawn (with other counts, all but fewer than the new
    number of slots); epoch 1 then follows in the new layout. A resume inside a piece continues it."""
    from pipeline.data.stream import handover_plan

    write(tmp_path, {"train": 50}, per_shard=7)
    aug = Augment(crop=(16, 12))

    def stream(world: int, rank: int, **kw):
        return iter(make_stream(str(tmp_path), "train", train=True, rank=rank, world_size=world, seed=3,
                                shuffle_buffer=6, augment=aug, **kw))

    old = [[next(s) for _ in range(16)] for s in (stream(3, r) for r in range(3))]  # quota 16 each
    consumed = [5, 7, 4]
    read = {x["__key__"] for r, k in enumerate(consumed) for x in old[r][:k]}
    would = {x["__key__"]: x for r, k in enumerate(consumed) for x in old[r][k:]}
    handover = {"epoch": 0, "slots": 3, "consumed": consumed}
    # 11 + 9 + 12 unread positions of old slots 0, 1, 2, cut in two pieces of 16.
    assert [handover_plan(handover, 50, s, 2) for s in range(2)] == [[(0, 5, 16), (1, 7, 12)],
                                                                     [(1, 12, 16), (2, 4, 16)]]
    assert handover_plan(handover, 50, 0, 3) == [(0, 5, 15)]  # 32 over 3: pieces of 10, 2 left over
    pieces = []
    for rank in range(2):
        s = stream(2, rank, handover=handover, start={rank: (0, 0)})
        piece = [next(s) for _ in range(len(would) // 2)]
        assert next(s)["__epoch__"] == 1  # then the new layout's epoch 1
        pieces.append(piece)
    got = [x for piece in pieces for x in piece]
    keys = [x["__key__"] for x in got]
    assert len(keys) == len(set(keys)) == 2 * (len(would) // 2) and not set(keys) & read
    assert len(set(would) - set(keys)) == len(would) % 2  # only the remainder of two equal pieces
    for x in got:  # the sample and the augmentation the old slot would have delivered
        assert x["__epoch__"] == 0 and torch.equal(x["image"], would[x["__key__"]]["image"])
    # A resume 4 samples into slot 1's piece continues it exactly.
    s = stream(2, 1, handover=handover, start={1: (0, 4)})
    assert [next(s)["__key__"] for _ in range(3)] == [x["__key__"] for x in pieces[1][4:7]]


# ---------------------------------------------------------------- bad data


def tar_with(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> int:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(samples)


def good(k: int) -> dict[str, bytes]:
    return {f"{name}.png": encode_png(arr) for name, arr in render(k).items()}


def hand_made_dataset(tmp_path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write a valid dataset, then replace its only shard with hand-made tar content."""
    write(tmp_path, {"val": 1}, per_shard=1)
    n = tar_with(tmp_path / "val-000000.tar", samples)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] = n
    manifest["splits"]["val"]["samples"] = n
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


def test_corrupt_pickled_and_unsafe_samples_are_skipped_counted_and_named(tmp_path, caplog):
    url = hand_made_dataset(tmp_path, [
        ("s0", good(0)),
        ("s1", {**good(1), "image.png": b"garbage"}),
        ("s2", {**good(2), "meta.pyd": b"cos\nsystem\n(S'echo owned'\ntR."}),
        ("../s3", good(3)),
        ("s4", {k: v for k, v in good(4).items() if k != "label.png"}),
        ("\u00e9\u00e8", good(6)),  # nothing of it can name a file
        ("s5", good(5)),
    ])
    out = list(make_stream(url, "val", train=False))
    assert [s["__key__"] for s in out] == ["s0", "s5"]
    assert out[-1]["__bad__"] == 5
    text = caplog.text
    assert "val-000000.tar#s1" in text and "cannot decode" in text
    assert "refusing member s2.meta.pyd" in text
    assert "unsafe key '../s3'" in text
    assert "missing field 'label'" in text
    assert "cannot make a sample key" in text


def test_a_batch_of_samples_of_different_sizes_names_them_and_what_to_set(tmp_path):
    smaller = {f"{name}.png": encode_png(arr) for name, arr in render(1, 20, 16).items()}
    url = hand_made_dataset(tmp_path, [("s0", good(0)), ("s1", smaller)])
    with pytest.raises(ValueError, match=r"samples \['s0', 's1'\] differ in size .*data.crop_size"):
        next(iter(make_stream(url, "val", train=False, batch_size=2)))


def test_truncated_shard_is_reported_and_the_rest_still_streams(tmp_path, caplog):
    write(tmp_path, {"val": 12}, per_shard=4)
    shard = tmp_path / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    out = list(make_stream(str(tmp_path), "val", train=False))
    assert 8 <= len(out) < 12
    assert out[-1]["__bad__"] == 12 - len(out)
    assert str(shard) in caplog.text


def test_a_slot_enters_its_shard_at_the_recorded_offset_and_without_offsets_walks_the_headers(tmp_path, caplog):
    write(tmp_path, {"val": 8}, per_shard=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    offsets = manifest["splits"]["val"]["shards"][0]["offsets"]
    keys = [s["__key__"] for s in make_stream(str(tmp_path), "val", train=False)]
    ranks = lambda: [list(make_stream(str(tmp_path), "val", train=False, rank=r, world_size=2))  # noqa: E731
                     for r in range(2)]
    del manifest["splits"]["val"]["shards"][0]["offsets"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    walked = ranks()  # no offsets: tar headers walked up to the slot's first sample
    assert [[s["__key__"] for s in r] for r in walked] == [keys[:4], keys[4:]]
    shard = tmp_path / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[offsets[1]:offsets[1] + 512] = b"\xff" * 512  # sample 1's first header is garbage now
    shard.write_bytes(bytes(data))
    assert [s["__key__"] for s in ranks()[1]] == []  # the walk cannot pass it: rank 1's samples are lost
    manifest["splits"]["val"]["shards"][0]["offsets"] = offsets
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    entered = ranks()  # with offsets, rank 1 seeks to sample 4 and never reads sample 1
    assert [s["__key__"] for s in entered[1]] == keys[4:] and entered[1][-1]["__bad__"] == 0
    assert [s["__key__"] for s in entered[0]] == keys[:1]  # the tar ends at the garbage for rank 0:
    assert "skipped 3 bad sample(s)" in caplog.text and "shard ends after 1 samples" in caplog.text  # counted


def test_bad_sample_budget_stops_with_a_clear_message(tmp_path):
    url = hand_made_dataset(tmp_path, [("s0", {**good(0), "image.png": b"x"}), ("s1", {**good(1), "label.png": b"y"}),
                                       ("s2", good(2))])
    with pytest.raises(BadDataBudgetExceeded, match=r"2 bad samples exceed the budget data.max_bad_samples=1"):
        list(make_stream(url, "val", train=False, max_bad_samples=1))


def test_stream_argument_errors_are_clear(tmp_path):
    write(tmp_path, {"val": 3}, per_shard=3)
    with pytest.raises(Exception, match="split 'train' is not in .*; it has: val"):
        make_stream(str(tmp_path), "train", train=True)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        make_stream(str(tmp_path), "val", train=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least 1 sample and more than 0 MB, got shuffle_buffer=0"):
        make_stream(str(tmp_path), "val", train=True, shuffle_buffer=0)
    with pytest.raises(ValueError, match="shuffle_buffer_mb=0"):
        make_stream(str(tmp_path), "val", train=True, shuffle_buffer_mb=0)
    stream = make_stream(str(tmp_path), "val", train=True, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="3 samples, fewer than the 4 reading slots"):
        next(iter(torch.utils.data.DataLoader(stream, num_workers=2)))
