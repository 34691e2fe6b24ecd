"""The loader's pieces below the stream: zero-copy pixel views, the uint8 contract and its
conversion on the device, the per-sample random draws, paired crop/flip, and the tar reader
(against WebDataset's own reader on the tar formats writers produce)."""

from __future__ import annotations

import gc
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.collate import Collate
from pipeline.data.pixels import pixels, rgbx_words
from pipeline.data.sources.base import encode_png
from pipeline.data.tar_samples import TarFormatError, TarSamples
from pipeline.data.transforms import (
    Augment,
    DecodeBuffer,
    DecodeError,
    Fields,
    SampleRandom,
    class_ids,
    decode_augment,
    decode_field,
    float_image,
    loader_dtypes,
    map_dtype,
    rgb_image,
)
from pipeline.eval.metrics import to_uint8
from pipeline.families.labelmaps import one_hot

RNG = np.random.default_rng(0)
DTYPES = {"image": "rgbx", "label": "uint8", "instance": "uint16"}  # the loader dtypes of most tests here


def png_image(arr: np.ndarray) -> Image.Image:
    """``arr`` through a PNG and back, decoded the way the loader decodes."""
    return Image.open(io.BytesIO(encode_png(arr)))


# ---------------------------------------------------------------- pixel views


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "I;16", "I;16B", "I", "1"])
def test_pixel_views_equal_numpy_copies_and_stay_valid_after_the_image_is_gone(mode):
    img = Image.fromarray(RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode) if mode != "I;16" \
        else png_image(RNG.integers(0, 65536, (37, 53), dtype=np.uint16))
    if mode in ("I;16B", "I"):
        img = Image.new(mode, (53, 37))
        for x in range(53):
            img.putpixel((x, x % 37), 1000 * x + 7)
    img.load()
    expected = np.asarray(img).copy()
    view = pixels(img)
    assert view.shape == expected.shape and view.dtype == expected.dtype
    assert np.array_equal(view, expected)
    assert not view.flags.writeable  # PIL's memory is never written through a view
    del img
    gc.collect()
    _ = [bytearray(1 << 20) for _ in range(8)]  # reuse freed memory, if the view did not keep it
    assert np.array_equal(view, expected)


def test_pixel_views_fall_back_to_a_copy_for_images_in_several_blocks():
    big = Image.new("RGB", (4096, 4096), (1, 2, 3))  # 64 MB: more than one of Pillow's blocks
    view = pixels(big)
    assert view.shape == (4096, 4096, 3) and view[-1, -1].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- the uint8 contract


def test_float_image_is_the_old_host_side_conversion_bit_for_bit_and_refuses_floats():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    rgbx = torch.cat([values, torch.full((2, 1, 16, 16), 77, dtype=torch.uint8)], 1).permute(0, 2, 3, 1).contiguous()
    old = values.permute(0, 2, 3, 1).float().permute(0, 3, 1, 2).mul_(1 / 127.5).sub_(1.0)
    new = float_image(rgbx)
    assert new.dtype == torch.float32 and new.is_contiguous() and torch.equal(new, old)
    assert float(new.min()) == -1.0 and float(new.max()) == 1.0
    # So the evaluator may hand the loader's uint8 straight to the Inception features: the FID
    # inputs are exactly what to_uint8 of the prepared [-1, 1] image gave; the padding byte is gone.
    assert torch.equal(to_uint8(new), values) and torch.equal(rgb_image(rgbx), values)
    with pytest.raises(TypeError, match=r"expected the loader's uint8 \[N, H, W, 4\] images"):
        float_image(new)
    with pytest.raises(TypeError, match=r"uint8 \[2, 3, 16, 16\]"):  # the old [N, 3, H, W] layout
        float_image(values)


def test_class_ids_are_int64_so_one_hot_and_indexing_are_right():
    label = torch.tensor([[[0, 2], [1, 2]]], dtype=torch.uint8)
    ids = class_ids(label)
    assert ids.dtype == torch.int64 and torch.equal(ids, label.long())
    assert torch.equal(one_hot(ids, 3).argmax(1), ids)
    palette = torch.tensor([[0.0], [1.0], [2.0]])
    assert palette[ids].shape == (1, 2, 2, 1)  # indexing, where a uint8 index would be a mask
    with pytest.raises(TypeError, match="integer label maps"):
        class_ids(label.float())


def test_map_dtypes_follow_the_manifest_not_the_sample():
    png, tif = ["png"], ["tif"]
    assert map_dtype("label", 35, png) == np.uint8 and map_dtype("label", 256, tif) == np.uint8
    assert map_dtype("label", 257, png) == np.uint16 and map_dtype("label", None, png) == np.uint16
    assert map_dtype("instance", 35, png) == np.uint16  # PNG holds at most 16 bits per pixel
    assert map_dtype("instance", 35, tif) == np.int32 and map_dtype("instance", 35, ["png", "tiff"]) == np.int32
    assert map_dtype("label", 300, None) == np.int32  # nothing known of the members: the wide type
    manifest_fields = {"image": {"kind": "image", "exts": ["jpg"]}, "label": {"kind": "label", "exts": ["png"]},
                       "instance": {"kind": "instance", "exts": ["png"]}}
    assert loader_dtypes(manifest_fields, 35) == DTYPES
    kinds = {"image": "image", "label": "label"}
    photo = encode_png(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    ids8 = np.arange(48, dtype=np.uint8).reshape(6, 8) % 35
    collate = Collate(DTYPES)
    for stored in (ids8, ids8.astype(np.uint16)):  # an 8-bit and a 16-bit PNG of one dataset
        views = decode_augment({"image": photo, "label": encode_png(stored)}, kinds, Augment(), None, False, DTYPES)
        out = collate.one(views)
        assert out["image"].dtype == torch.uint8 and out["label"].dtype == torch.uint8
        assert np.array_equal(out["label"].numpy(), ids8)
    wide = ids8.astype(np.uint16)
    wide[0, 0] = 300  # does not fit the dataset's uint8: refused, never wrapped
    with pytest.raises(DecodeError, match="label map has id 300, outside uint8"):
        decode_augment({"image": photo, "label": encode_png(wide)}, kinds, Augment(), None, False, DTYPES)


@pytest.mark.parametrize("bad", [70000, -1])
def test_a_32_bit_map_that_uint16_cannot_hold_is_refused(bad):
    ids = np.arange(48, dtype=np.int32).reshape(6, 8)
    wrong = ids.copy()
    wrong[5, 7] = bad
    stored = {}
    for name, arr in (("ok", ids), ("wrong", wrong)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")  # mode I: 32-bit ids, viewed as int32
        stored[name] = buf.getvalue()
    kinds, dtypes = {"instance": "instance"}, {"instance": "uint16"}
    out = Collate(dtypes).one(decode_augment({"instance": stored["ok"]}, kinds, Augment(), None, False, dtypes))
    assert out["instance"].dtype == torch.uint16 and out["instance"].tolist() == ids.tolist()
    with pytest.raises(DecodeError, match=f"instance map has id {bad}, outside uint16"):
        decode_augment({"instance": stored["wrong"]}, kinds, Augment(), None, False, dtypes)


# ---------------------------------------------------------------- random draws, crop and flip


def test_sample_random_is_a_pure_function_of_its_words_and_uniform_enough():
    a, b = SampleRandom(7, 1, 2, 3), SampleRandom(7, 1, 2, 3)
    draws = [a.integers(0, 33) for _ in range(20)] + [a.random()]
    assert draws == [b.integers(0, 33) for _ in range(20)] + [b.random()]  # 20 draws: a second block
    assert draws != [SampleRandom(7, 1, 2, 4).integers(0, 33) for _ in range(20)] + [0]
    counts = np.bincount([SampleRandom(0, i).integers(0, 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900 and counts.max() < 1100
    flips = sum(SampleRandom(1, i).random() < 0.5 for i in range(4000))
    assert 1850 < flips < 2150
    with pytest.raises(ValueError, match="empty range"):
        a.integers(3, 3)


def test_one_crop_and_flip_for_every_field():
    h, w = 16, 24
    y, x = np.mgrid[0:h, 0:w]
    photo = np.stack([x * 10, y * 10, (x + y) % 256], -1).astype(np.uint8)
    label = (x % 7).astype(np.uint8)
    instance = (x * 1000 + y).astype(np.uint16)
    encoded = {"image": encode_png(photo), "label": encode_png(label), "instance": encode_png(instance)}
    kinds = {"image": "image", "label": "label", "instance": "instance"}
    aug = Augment(crop=(15, 9))
    seen = set()
    collate = Collate(DTYPES)
    for i in range(24):
        views = decode_augment(encoded, kinds, aug, SampleRandom(5, i), True, DTYPES)
        assert not any(v.flags.writeable or v.flags.owndata for v in views.values())  # views of PIL's memory
        out = collate.one(views)
        _, (x0, y0, x1, y1), flip = aug.params((w, h), SampleRandom(5, i), True)
        seen.add(flip)
        cols = slice(x1 - 1, x0 - 1 if x0 else None, -1) if flip else slice(x0, x1)
        assert out["image"].shape == (y1 - y0, x1 - x0, 4)
        assert np.array_equal(out["image"][..., :3].numpy(), photo[y0:y1, cols])
        assert np.array_equal(out["label"].numpy(), label[y0:y1, cols])
        assert out["instance"].dtype == torch.uint16
        assert np.array_equal(out["instance"].numpy(), instance[y0:y1, cols])
        assert all(t.numpy().flags.writeable for t in out.values())
    assert seen == {True, False}


def test_fields_of_different_sizes_are_refused():
    kinds = {"image": "image", "label": "label"}
    encoded = {"image": encode_png(np.zeros((6, 8, 3), np.uint8)), "label": encode_png(np.zeros((5, 8), np.uint8))}
    with pytest.raises(DecodeError, match=r"fields disagree in size: \[\(8, 5\), \(8, 6\)\]"):
        decode_augment(encoded, kinds, Augment(), SampleRandom(0), True, DTYPES)


# ---------------------------------------------------------------- decoding into reused memory


def _encoded(fmt: str, arr: np.ndarray, mode: str | None = None) -> bytes:
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


_PHOTO = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)
_IDS = RNG.integers(0, 35, (21, 34), dtype=np.uint8)
ENCODINGS = {  # name: (kind, encoded bytes, decoded into the buffer's memory?)
    "RGB PNG": ("image", encode_png(_PHOTO), True),
    "RGB JPEG": ("image", _encoded("JPEG", _PHOTO), True),
    "L PNG label": ("label", encode_png(_IDS), True),
    "P PNG label": ("label", _encoded("PNG", _IDS, "P"), True),
    "16-bit PNG instance": ("instance", encode_png(RNG.integers(0, 65536, (21, 34), dtype=np.uint16)), True),
    "RGBA PNG photo": ("image", _encoded("PNG", _PHOTO, "RGBA"), False),  # converted to RGB: new memory
    "L PNG photo": ("image", encode_png(_IDS), False),
    "32-bit TIFF instance": ("instance", _encoded("TIFF", _IDS.astype(np.int32) * 70000), False),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_decoding_into_reused_memory_gives_a_plain_decodes_pixels(name):
    kind, data, mapped = ENCODINGS[name]
    plain = decode_field(kind, data)
    expected = rgbx_words(plain) if kind == "image" else pixels(plain)
    buffer = DecodeBuffer()
    for _ in range(2):  # the second decode reuses the first one's memory
        img = decode_field(kind, data, buffer)
        assert img.mode == plain.mode and img.size == plain.size
        got = rgbx_words(img) if kind == "image" else pixels(img)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        if mapped:
            assert buffer.array is buffer.memory and img.im is buffer.core
            assert np.array_equal(buffer.array, expected) and not buffer.array.flags.writeable
        else:
            assert buffer.array is None


@pytest.mark.parametrize("ext", ["png", "jpg", "tif", "xyz", None])
def test_the_members_extension_only_says_which_format_to_try_first(ext):
    for kind, data, _ in ENCODINGS.values():  # PNG, JPEG and TIFF data, whatever the extension says
        expected = decode_field(kind, data)
        got = decode_field(kind, data, DecodeBuffer(), ext)
        assert got.format == expected.format and got.mode == expected.mode
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_field("image", b"not an image", None, ext)


def test_a_decode_buffer_is_overwritten_by_the_next_decode_and_follows_size_changes():
    def rgb(words: np.ndarray) -> np.ndarray:
        return words.view(np.uint8).reshape(*words.shape, 4)[..., :3]

    buffer = DecodeBuffer()
    first, second = (RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(2))
    decode_field("image", encode_png(first), buffer)
    memory = buffer.array
    assert np.array_equal(rgb(memory), first)
    decode_field("image", encode_png(second), buffer)
    assert buffer.array is memory  # the same memory, now the second image's: a view must be used before
    assert np.array_equal(rgb(memory), second)
    other = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decode_field("image", encode_png(other), buffer)
    assert buffer.array.shape == (5, 7) and np.array_equal(rgb(buffer.array), other)
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_field("image", encode_png(first)[:60], buffer)  # truncated
    decode_field("image", encode_png(first), buffer)  # and the buffer is still good
    assert np.array_equal(rgb(buffer.array), first)


def test_fields_decoding_into_reused_memory_give_the_batches_of_decode_augment():
    kinds = {"image": "image", "label": "label", "instance": "instance"}
    reused, plain = Fields(kinds, DTYPES, reuse=True), Fields(kinds, DTYPES)
    collate, aug = Collate(DTYPES), Augment(crop=(15, 9))
    flips = set()
    for i in range(12):
        encoded = [encode_png(RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)),
                   encode_png(RNG.integers(0, 7, (16, 24), dtype=np.uint8)),
                   encode_png(RNG.integers(0, 65536, (16, 24), dtype=np.uint16))]
        expected = collate.one(decode_augment(dict(zip(kinds, encoded)), kinds, aug, SampleRandom(4, i), True, DTYPES))
        assert plain.decode_augment(encoded, aug, SampleRandom(4, i), True)[0].base is not None
        views = reused.decode_augment(encoded, aug, SampleRandom(4, i), True)
        assert all(not v.flags.writeable for v in views)
        got = collate.one(dict(zip(kinds, views)))
        for name in kinds:
            assert torch.equal(got[name], expected[name]), (i, name)
        flips.add(views[0].strides[1] < 0)
    assert flips == {True, False}


# ---------------------------------------------------------------- batches: the one copy


def test_rgbx_words_are_the_rgb_bytes_in_pillows_memory_and_a_copy_where_there_is_no_view():
    photo = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    img = png_image(photo)
    img.load()
    words = rgbx_words(img)
    assert words.shape == (9, 13) and words.dtype == np.uint32 and not words.flags.owndata
    assert np.array_equal(np.ascontiguousarray(words).view(np.uint8).reshape(9, 13, 4)[..., :3], photo)
    big = Image.new("RGB", (4096, 4096), (1, 2, 3))  # several of Pillow's blocks: no view, a copy
    assert np.ascontiguousarray(rgbx_words(big)[-1:, -1:]).view(np.uint8).tolist()[0][:3] == [1, 2, 3]
    with pytest.raises(ValueError, match="takes RGB images, not L"):
        rgbx_words(img.convert("L"))


def _samples(n: int, crop=(15, 9), prefix: str = "k") -> tuple[list[dict], dict[str, str]]:
    """``n`` augmented samples (views) of random 16x24 fields, flips among them, with metadata."""
    kinds = {"image": "image", "label": "label", "instance": "instance"}
    out = []
    for i in range(n):
        encoded = {"image": encode_png(RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)),
                   "label": encode_png(RNG.integers(0, 7, (16, 24), dtype=np.uint8)),
                   "instance": encode_png(RNG.integers(0, 65536, (16, 24), dtype=np.uint16))}
        views = decode_augment(encoded, kinds, Augment(crop=crop), SampleRandom(2, i), True, DTYPES)
        out.append({**views, "__key__": f"{prefix}{i}", "__index__": i, "__slot__": 3})
    return out, kinds


def test_a_batch_is_its_samples_each_copied_once_in_the_loader_dtypes():
    samples, kinds = _samples(6)
    collate = Collate(DTYPES)

    batch = collate(samples)
    singles = [collate.one(s) for s in samples]
    assert batch["image"].shape == (6, 9, 15, 4) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (6, 9, 15) and batch["label"].dtype == torch.uint8
    assert batch["instance"].dtype == torch.uint16 and int(batch["instance"].int().max()) > 32767  # not wrapped
    for name in kinds:
        assert torch.equal(batch[name], torch.stack([one[name] for one in singles]))
        assert batch[name].is_contiguous()
    assert batch["__key__"] == [f"k{i}" for i in range(6)] and batch["__index__"].tolist() == list(range(6))
    assert batch["__slot__"].tolist() == [3] * 6 and batch["__slot__"].dtype == torch.int64
    assert batch["__slot__"].is_contiguous() and batch["__index__"].is_contiguous()
    # the ints share one tensor: one allocation (one shared-memory segment in a worker)
    assert batch["__slot__"].untyped_storage().data_ptr() == batch["__index__"].untyped_storage().data_ptr()
    assert collate(samples[:4])["__index__"].tolist() == [0, 1, 2, 3]
    assert not batch["image"].is_shared()  # in the main process: private memory


class _CollateInWorker(torch.utils.data.IterableDataset):
    """Collates in a DataLoader worker and reports where the batch was allocated."""

    def __iter__(self):
        samples, kinds = _samples(2)
        batch = Collate(DTYPES)(samples)
        yield {name: batch[name].is_shared() for name in (*kinds, "__index__")}


def test_a_batch_made_in_a_dataloader_worker_is_born_in_shared_memory():
    # Moving a private tensor to the main process would copy it into shared memory first.
    loader = torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1, timeout=60)
    assert next(iter(loader)) == {"image": True, "label": True, "instance": True, "__index__": True}


def test_a_batch_of_different_sizes_or_fields_is_refused_by_name():
    samples, kinds = _samples(2)
    other, _ = _samples(1, crop=(14, 9), prefix="other")
    collate = Collate(DTYPES)
    with pytest.raises(ValueError, match=r"sample 'other0' is not the size of the first of its batch \('k0'\): "
                                         r"fields \(w, h\) .*'image': \(14, 9\).* and .*'image': \(15, 9\).*crop"):
        collate(samples[:1] + other)
    del samples[1]["instance"]
    with pytest.raises(ValueError, match=r"sample 'k1' has other fields than the first of its batch \('k0'\)"):
        collate(samples)
    samples[1]["extra"] = 1
    with pytest.raises(ValueError, match=r"sample 'k1' has other fields than"):
        collate(samples)
    samples, _ = _samples(2)
    samples[1]["__index__"] = "1"
    with pytest.raises(ValueError, match=r"sample 'k1' has other values \(not ints\) than the first"):
        collate(samples)


def test_put_makes_the_batch_add_makes_and_refuses_a_missing_field():
    samples, kinds = _samples(4)
    collate = Collate(DTYPES)
    added = collate(samples)
    builder = collate.builder(4, ("__index__", "__slot__"))
    for s in samples:
        builder.put(s["__key__"], [s[name] for name in DTYPES], (s["__index__"], s["__slot__"]))
    put = builder.finish()
    assert set(put) == set(added) and put["__key__"] == added["__key__"]
    for name in (*kinds, "__index__", "__slot__"):
        assert put[name].dtype == added[name].dtype and torch.equal(put[name], added[name]), name
    views = [samples[0][name] for name in DTYPES]
    builder = collate.builder(2, ("__index__",))
    builder.put("k0", views, (0,))
    with pytest.raises(ValueError, match=r"sample 'k1' has other fields than the first of its batch \('k0'\)"):
        builder.put("k1", views[:2] + [None], (1,))
    builder = collate.builder(2, ("__index__",))
    builder.put("k0", views[:2] + [None], (0,))  # a field the first sample lacks is not in the batch
    with pytest.raises(ValueError, match=r"sample 'k1' has other fields than"):
        builder.put("k1", views, (1,))
    builder.put("k2", views[:2] + [None], (1,))
    assert set(builder.finish()) == {"image", "label", "__index__", "__key__"}


# ---------------------------------------------------------------- the tar reader


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
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files():
        for f in tar_file_iterator(io.BytesIO(data)):
            f["__url__"] = "u"
            yield f

    return list(group_by_keys(files()))


LONG = "d" * 120 + "/sub/" + "k" * 90  # a path that needs the ustar prefix, GNU long names or pax

MEMBERS = [
    ("a.image.png", b"A" * 700), ("a.label.png", b"a" * 3), ("dir", None), ("__index__", b"meta"),
    ("b.image.PNG", b""), ("b.seg.label.png", b"x" * 513), ("noext", b"skip me"),
    ("sub/c.image.png", b"C" * 1024), (f"{LONG}.image.png", b"L" * 5), (f"{LONG}.json", b"{}"),
    ("d\u00e9j\u00e0.image.png", b"unicode"),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_groups_samples_as_webdataset_does(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or not m[0].startswith(LONG)
               and m[0].isascii()]  # ustar cannot hold those names
    if fmt == tarfile.USTAR_FORMAT:
        members.append(("p" * 60 + "/" + "q" * 60 + ".image.png", b"prefix"))  # the ustar prefix field
    data = make_tar(members, fmt)
    ours = list(TarSamples(io.BytesIO(data), "u"))
    assert ours == webdataset_samples(data)
    assert [s["__key__"] for s in ours][:3] == ["a", "b", "sub/c"]
    assert ours[1] == {"__key__": "b", "__url__": "u", "image.png": b"", "seg.label.png": b"x" * 513}


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size=-1):
        out = super().read(size)
        self.read_bytes += len(out)
        return out


def test_tar_reader_skips_before_start_without_reading_and_stops_before_stop():
    samples = [(f"s{k}", {"image.png": bytes([k]) * 5000, "label.png": bytes([k]) * 300}) for k in range(6)]
    data = make_tar([(f"{key}.{name}", v) for key, fields in samples for name, v in fields.items()])
    f = CountingReader(data)
    reader = TarSamples(f, "u", start=2, stop=4)
    got = list(reader)
    assert [s["__key__"] for s in got] == ["s2", "s3"]
    assert got[0]["image.png"] == bytes([2]) * 5000 and reader.samples == 4
    assert f.read_bytes < 2 * 5300 + 6 * 2 * 512 + 1024  # the data of s0, s1, s4, s5 was never read
    everything = TarSamples(io.BytesIO(data), "u")
    assert len(list(everything)) == 6 and everything.samples == 6


def test_tar_reader_refuses_truncated_and_corrupt_archives():
    data = make_tar([("s0.image.png", b"x" * 3000), ("s1.image.png", b"y" * 3000)])
    reader = TarSamples(io.BytesIO(data[:5000]), "u")  # cut inside s1's data
    with pytest.raises(TarFormatError, match="unexpected end of data in s1.image.png"):
        list(reader)
    assert reader.samples == 1
    with pytest.raises(TarFormatError, match="a 100-byte tar header"):
        list(TarSamples(io.BytesIO(data[:512 * 7 + 100]), "u"))
    corrupt = bytearray(data)
    corrupt[20] ^= 0x55  # a name byte: the header checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        list(TarSamples(io.BytesIO(bytes(corrupt)), "u"))
    with pytest.raises(TarFormatError, match="in a tar header"):  # a size field that is not a number
        list(TarSamples(io.BytesIO(b"not a tar file at all" * 40), "u"))
    ended = TarSamples(io.BytesIO(data[:512 * 7]), "u")  # cut at a member boundary: a short shard
    assert [s["__key__"] for s in ended] == ["s0"] and ended.samples == 1
    with pytest.raises(ValueError, match="duplicate file name"):
        list(TarSamples(io.BytesIO(make_tar([("s.image.png", b"1"), ("s.image.png", b"2")])), "u"))
