"""The loader's pieces below the stream: the batch contract and its conversion on the device,
the per-sample random draws, paired crop/flip, map dtypes, and the tar reading (webdataset's
reader entered at a sample, per-sample offsets against webdataset's own grouping)."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.device import class_ids, float_image, instance_ids
from pipeline.data.shard_reader import CompressedShardError, read_samples, sample_offsets
from pipeline.data.sources.base import encode_png
from pipeline.data.transforms import Augment, DecodeError, augment, decode_field, field_dtypes, map_dtype, sample_rng
from pipeline.eval.metrics import to_uint8
from pipeline.families.labelmaps import one_hot

RNG = np.random.default_rng(0)
KINDS = {"image": "image", "label": "label", "instance": "instance"}
DTYPES = {"image": np.dtype(np.uint8), "label": np.dtype(np.uint8), "instance": np.dtype(np.uint16)}


def decoded(encoded: dict[str, bytes]) -> dict[str, Image.Image]:
    return {name: decode_field(KINDS[name], data) for name, data in encoded.items()}


# ---------------------------------------------------------------- on the device


def test_float_image_maps_uint8_to_minus_one_one_and_refuses_anything_else():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    new = float_image(values)
    old = values.float().mul_(1 / 127.5).sub_(1.0)  # the formula, on a tensor of its own
    assert new.dtype == torch.float32 and new.shape == (2, 3, 16, 16) and torch.equal(new, old)
    assert float(new.min()) == -1.0 and float(new.max()) == 1.0
    assert torch.equal(to_uint8(new), values)  # the evaluator's way back is exact
    for wrong in (new, values.permute(0, 2, 3, 1), values[:, :1]):
        with pytest.raises(TypeError, match=r"uint8 \[N, 3, H, W\]"):
            float_image(wrong)


def test_class_ids_are_int64_and_instance_ids_int32():
    label = torch.tensor([[[0, 3], [34, 1]]], dtype=torch.uint8)
    ids = class_ids(label)
    assert ids.dtype == torch.int64 and torch.equal(one_hot(ids, 35).argmax(1), ids)
    palette = torch.arange(35 * 3).reshape(35, 3)
    assert palette[ids].shape == (1, 2, 2, 3)  # indexing, where a uint8 index would be a mask
    instance = torch.tensor([[[0, 33001], [65535, 7]]], dtype=torch.uint16)
    assert instance_ids(instance).dtype == torch.int32 and instance_ids(instance).max() == 65535
    with pytest.raises(TypeError, match="integer label maps"):
        class_ids(label.float())
    with pytest.raises(TypeError, match="integer instance maps"):
        instance_ids(instance.float())


# ---------------------------------------------------------------- dtypes


def test_map_dtypes_follow_the_manifest_not_the_sample():
    png, tif = ["png"], ["tif"]
    assert map_dtype("label", 35, png) == np.uint8 and map_dtype("label", 256, tif) == np.uint8
    assert map_dtype("label", 257, png) == np.uint16 and map_dtype("label", None, ["seg.png"]) == np.uint16
    assert map_dtype("instance", 35, png) == np.uint16  # PNG holds at most 16 bits per pixel
    assert map_dtype("instance", 35, tif) == np.int32 and map_dtype("instance", 35, ["png", "tiff"]) == np.int32
    assert map_dtype("label", 300, None) == np.int32  # nothing known of the members: the wide type
    manifest_fields = {"image": {"kind": "image", "exts": ["jpg"]}, "label": {"kind": "label", "exts": ["png"]},
                       "instance": {"kind": "instance", "exts": ["png"]}}
    assert field_dtypes(manifest_fields, 35) == DTYPES
    photo = encode_png(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    ids8 = np.arange(48, dtype=np.uint8).reshape(6, 8) % 35
    for stored in (ids8, ids8.astype(np.uint16)):  # an 8-bit and a 16-bit PNG of one dataset
        out = augment(decoded({"image": photo, "label": encode_png(stored)}), KINDS, DTYPES, Augment(), None, False)
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 6, 8)
        assert out["label"].dtype == torch.uint8 and np.array_equal(out["label"].numpy(), ids8)
    wide = ids8.astype(np.uint16)
    wide[0, 0] = 300  # does not fit the dataset's uint8: refused, never wrapped
    with pytest.raises(DecodeError, match="label map has id 300, outside uint8"):
        augment(decoded({"image": photo, "label": encode_png(wide)}), KINDS, DTYPES, Augment(), None, False)


@pytest.mark.parametrize("bad", [70000, -1])
def test_a_32_bit_map_that_uint16_cannot_hold_is_refused(bad):
    ids = np.arange(48, dtype=np.int32).reshape(6, 8)
    wrong = ids.copy()
    wrong[5, 7] = bad
    stored = {}
    for name, arr in (("ok", ids), ("wrong", wrong)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")  # mode I: 32-bit ids
        stored[name] = buf.getvalue()
    out = augment(decoded({"instance": stored["ok"]}), KINDS, DTYPES, Augment(), None, False)
    assert out["instance"].dtype == torch.uint16 and out["instance"].tolist() == ids.tolist()
    with pytest.raises(DecodeError, match=f"instance map has id {bad}, outside uint16"):
        augment(decoded({"instance": stored["wrong"]}), KINDS, DTYPES, Augment(), None, False)


def test_undecodable_and_multichannel_maps_are_decode_errors():
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_field("image", b"not an image")
    with pytest.raises(DecodeError, match="must be single-channel, got mode RGB"):
        decode_field("label", encode_png(np.zeros((4, 4, 3), np.uint8)))


# ---------------------------------------------------------------- random draws, crop and flip


def test_sample_rng_is_a_pure_function_of_the_position_and_uniform_enough():
    a, b = sample_rng(7, 1, 2, 3), sample_rng(7, 1, 2, 3)
    draws = [a.randrange(33) for _ in range(20)] + [a.random()]
    assert draws == [b.randrange(33) for _ in range(20)] + [b.random()]
    assert draws != [sample_rng(7, 1, 2, 4).randrange(33) for _ in range(20)] + [0]
    counts = np.bincount([sample_rng(0, 0, 0, i).randrange(4) for i in range(4000)], minlength=4)
    assert counts.min() > 900 and counts.max() < 1100
    flips = sum(sample_rng(1, 0, 0, i).random() < 0.5 for i in range(4000))
    assert 1850 < flips < 2150


def test_one_crop_and_flip_for_every_field():
    h, w = 16, 24
    y, x = np.mgrid[0:h, 0:w]
    photo = np.stack([x * 10, y * 10, (x + y) % 256], -1).astype(np.uint8)
    label = (x % 7).astype(np.uint8)
    instance = (x * 1000 + y).astype(np.uint16)
    encoded = {"image": encode_png(photo), "label": encode_png(label), "instance": encode_png(instance)}
    aug = Augment(crop=(15, 9))
    seen = set()
    for i in range(24):
        out = augment(decoded(encoded), KINDS, DTYPES, aug, sample_rng(5, 0, 0, i), True)
        _, (x0, y0, x1, y1), flip = aug.params((w, h), sample_rng(5, 0, 0, i), True)
        seen.add(flip)
        cols = slice(x1 - 1, x0 - 1 if x0 else None, -1) if flip else slice(x0, x1)
        assert out["image"].shape == (3, y1 - y0, x1 - x0) and out["image"].is_contiguous()
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), photo[y0:y1, cols])
        assert np.array_equal(out["label"].numpy(), label[y0:y1, cols])
        assert out["instance"].dtype == torch.uint16
        assert np.array_equal(out["instance"].numpy(), instance[y0:y1, cols])
        assert all(t.numpy().flags.writeable for t in out.values())  # tensors of their own
    assert seen == {True, False}
    with pytest.raises(ValueError, match="crop 30x9 is larger than the image 24x16"):
        Augment(crop=(30, 9)).params((w, h), random.Random(0), True)


def test_resize_is_bicubic_for_images_and_nearest_for_maps():
    label = np.repeat(np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4), 4, 0), 4, 1)  # 16x12 blocks
    encoded = {"image": encode_png(np.stack([label * 20] * 3, -1)), "label": encode_png(label)}
    out = augment(decoded(encoded), KINDS, DTYPES, Augment(resize=(32, 24)), None, False)
    assert out["label"].shape == (24, 32) and set(out["label"].unique().tolist()) == set(range(12))
    assert len(out["image"].unique()) > 12  # interpolated values between the blocks


def test_fields_of_different_sizes_are_refused():
    encoded = {"image": encode_png(np.zeros((6, 8, 3), np.uint8)), "label": encode_png(np.zeros((5, 8), np.uint8))}
    with pytest.raises(DecodeError, match=r"fields disagree in size: \[\(8, 5\), \(8, 6\)\]"):
        augment(decoded(encoded), KINDS, DTYPES, Augment(), random.Random(0), True)


# ---------------------------------------------------------------- reading tars


def make_tar(members: list[tuple[str, bytes | None]], fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar of ``(name, data)`` regular files; data None makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def webdataset_samples(data: bytes) -> list[dict]:
    """Samples as webdataset's own pipeline makes them (``tarfile_to_samples``' stages)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return list(group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(data)}])))


LONG = "d" * 120 + "/sub/" + "k" * 90  # a path that needs GNU long names or pax

MEMBERS = [
    ("a.image.png", b"A" * 7000), ("a.label.png", b"a" * 3), ("dir", None), ("__index__", b"meta"),
    ("b.image.PNG", b""), ("b.seg.label.png", b"x" * 513), ("noext", b"skip me"),
    ("sub/c.image.png", b"C" * 10240), (f"{LONG}.image.png", b"L" * 5), (f"{LONG}.json", b"{}"),
    ("d\u00e9j\u00e0.image.png", b"unicode"), ("e.image.png", b"E" * 2000),
]


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size=-1):
        out = super().read(size)
        self.read_bytes += len(out)
        return out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_offsets_and_reads_from_any_sample_agree_with_webdatasets_grouping(fmt):
    data = make_tar(MEMBERS, fmt)
    expected = webdataset_samples(data)
    assert [s["__key__"] for s in expected] == ["a", "b", "sub/c", LONG, "d\u00e9j\u00e0", "e"]
    offsets = sample_offsets(io.BytesIO(data))
    assert len(offsets) == len(expected)
    assert list(read_samples(io.BytesIO(data), "u")) == expected
    for start in range(len(expected)):
        assert list(read_samples(io.BytesIO(data), "u", start, offsets[start])) == expected[start:]
        walked = CountingReader(data)  # no offset: the headers before are walked, their data not read
        assert list(read_samples(walked, "u", start)) == expected[start:]
        before = sum(len(v) for s in expected[:start] for k, v in s.items() if not k.startswith("__"))
        assert walked.read_bytes < len(data) - before + 1100  # + the headers of sample ``start``, read twice
    assert sample_offsets(io.BytesIO(data), limit=1) == offsets[:2]
    assert list(read_samples(io.BytesIO(data), "u", len(expected) + 3)) == []  # a shorter tar: nothing


def test_a_compressed_tar_is_refused_where_a_sample_must_be_entered():
    data = gzip.compress(make_tar(MEMBERS[:2]))
    assert [s["__key__"] for s in read_samples(io.BytesIO(data), "u")] == ["a"]  # read from its start
    with pytest.raises(CompressedShardError, match="store shards as plain .tar"):
        list(read_samples(io.BytesIO(data), "u", 1))


def test_truncated_and_duplicate_members_raise_for_the_stream_to_count():
    data = make_tar([("s0.image.png", b"x" * 3000), ("s1.image.png", b"y" * 3000)])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(read_samples(io.BytesIO(data[:5000]), "u"))  # cut inside s1's data
    ended = list(read_samples(io.BytesIO(data[:512 * 7]), "u"))  # cut at a member boundary: a short shard
    assert [s["__key__"] for s in ended] == ["s0"]
    with pytest.raises(ValueError, match="duplicate file name"):
        list(read_samples(io.BytesIO(make_tar([("s.image.png", b"1"), ("s.image.png", b"2")])), "u"))
