"""Dataset layout adapters on tiny trees built with the real file naming of each dataset."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import make_source
from pipeline.data.sources.ade20k import ADE20KSource
from pipeline.data.sources.aligned import AlignedSource
from pipeline.data.sources.base import FIELD_KINDS, PROBLEM_KINDS, TASKS, SourceError, unique_keys
from pipeline.data.sources.cityscapes import CityscapesSource
from pipeline.data.sources.folder import FolderSource
from pipeline.data.sources.paired import PairedSource, UnpairedSource

# ----------------------------------------------------------------------------- tree helpers


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def rgb(value: tuple[int, int, int], h: int = 4, w: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(value, np.uint8), (h, w, 3)).copy()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def problem_rows(problems) -> list[tuple[str, str, str]]:
    return sorted((p.kind, p.key, Path(p.path).name) for p in problems)


# ----------------------------------------------------------------------------- cityscapes


def cityscapes_frame(root: Path, split: str, city: str, seq: int, frame: int, *,
                     photo: bool = True, label: bool = True, instance: bool = True) -> str:
    key = f"{city}_{seq:06d}_{frame:06d}"
    if photo:
        save(root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png", rgb((10, 20, seq % 250)))
    gt = root / "gtFine" / split / city
    if label:
        save(gt / f"{key}_gtFine_labelIds.png", np.full((4, 8), 26, np.uint8))
    if instance:
        save(gt / f"{key}_gtFine_instanceIds.png", np.full((4, 8), 26001, np.uint16))
    # Present in real trees and not part of a sample.
    save(gt / f"{key}_gtFine_color.png", rgb((0, 0, 142)))
    gt.mkdir(parents=True, exist_ok=True)
    (gt / f"{key}_gtFine_polygons.json").write_text('{"objects": []}')
    return key


def test_cityscapes_pairs_photo_label_instance_and_ignores_extras(tmp_path):
    good = [cityscapes_frame(tmp_path, "train", "aachen", 0, 19),
            cityscapes_frame(tmp_path, "train", "bremen", 5, 19)]
    cityscapes_frame(tmp_path, "train", "aachen", 1, 19, label=False)
    cityscapes_frame(tmp_path, "train", "bremen", 7, 19, photo=False)
    cityscapes_frame(tmp_path, "val", "frankfurt", 0, 294)

    source = make_source("cityscapes", tmp_path)
    assert isinstance(source, CityscapesSource)
    items, problems = source.list_items("train")
    assert [i.key for i in items] == good == ["aachen_000000_000019", "bremen_000005_000019"]
    assert problem_rows(problems) == [
        ("missing_partner", "aachen_000001_000019", "aachen_000001_000019_leftImg8bit.png"),
        ("missing_partner", "bremen_000007_000019", "bremen_000007_000019_gtFine_instanceIds.png"),
        ("missing_partner", "bremen_000007_000019", "bremen_000007_000019_gtFine_labelIds.png"),
    ]
    assert all(p.split == "train" for p in problems)

    fields = source.read(items[1])
    assert sorted(fields) == ["image.png", "instance.png", "label.png"]
    assert fields["image.png"] == Path(items[1].paths["image"]).read_bytes()
    assert Path(items[1].paths["label"]).name == "bremen_000005_000019_gtFine_labelIds.png"
    assert Path(items[1].paths["instance"]).name == "bremen_000005_000019_gtFine_instanceIds.png"
    assert decode(fields["image.png"])[0, 0].tolist() == [10, 20, 5]
    label = decode(fields["label.png"])
    assert label.dtype == np.uint8 and np.all(label == 26)
    inst = decode(fields["instance.png"])
    assert inst.dtype == np.uint16 and np.all(inst == 26001)

    val_items, val_problems = source.list_items("val")
    assert [i.key for i in val_items] == ["frankfurt_000000_000294"] and val_problems == []


def test_cityscapes_info_and_class_names():
    info = CityscapesSource.info
    assert info.task == "label2image" and info.default_splits == ("train", "val")
    assert [(f.name, f.kind) for f in info.fields] == [
        ("image", "image"), ("label", "label"), ("instance", "instance")]
    names = info.class_names
    assert info.num_classes == len(names) == len(set(names)) == 35
    assert (names[0], names[7], names[24], names[26], names[33], names[34]) == (
        "unlabeled", "road", "person", "car", "bicycle", "license plate")


def test_cityscapes_missing_folders_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        CityscapesSource(tmp_path / "nowhere")
    cityscapes_frame(tmp_path, "train", "aachen", 0, 19)
    source = CityscapesSource(tmp_path)
    with pytest.raises(SourceError) as err:
        source.list_items("val")
    assert str(tmp_path / "leftImg8bit" / "val") in str(err.value)
    (tmp_path / "leftImg8bit" / "test").mkdir()
    with pytest.raises(SourceError) as err:
        source.list_items("test")
    assert str(tmp_path / "gtFine" / "test") in str(err.value)


# ----------------------------------------------------------------------------- ADE20K


def ade_tree(parent: Path) -> Path:
    root = parent / "ADEChallengeData2016"
    for split, tag, numbers in (("training", "train", (1, 2)), ("validation", "val", (1,))):
        for n in numbers:
            save(root / "images" / split / f"ADE_{tag}_{n:08d}.jpg", rgb((n * 40, 90, 30)), quality=95)
    save(root / "annotations" / "training" / "ADE_train_00000001.png", np.full((4, 8), 150, np.uint8))
    save(root / "annotations" / "training" / "ADE_train_00000003.png", np.full((4, 8), 3, np.uint8))
    save(root / "annotations" / "validation" / "ADE_val_00000001.png", np.full((4, 8), 7, np.uint8))
    return root


@pytest.mark.parametrize("use_parent", [True, False])
def test_ade20k_pairs_images_and_annotations(tmp_path, use_parent):
    release = ade_tree(tmp_path)
    source = make_source("ade20k", tmp_path if use_parent else release)
    assert isinstance(source, ADE20KSource)
    items, problems = source.list_items("train")
    assert [i.key for i in items] == ["ADE_train_00000001"]
    assert problem_rows(problems) == [
        ("missing_partner", "ADE_train_00000002", "ADE_train_00000002.jpg"),
        ("missing_partner", "ADE_train_00000003", "ADE_train_00000003.png"),
    ]
    fields = source.read(items[0])
    assert sorted(fields) == ["image.jpg", "label.png"]
    assert fields["image.jpg"] == (release / "images/training/ADE_train_00000001.jpg").read_bytes()
    assert np.all(decode(fields["label.png"]) == 150)

    val_items, val_problems = source.list_items("val")
    assert [i.key for i in val_items] == ["ADE_val_00000001"] and val_problems == []
    assert np.all(decode(source.read(val_items[0])["label.png"]) == 7)


def test_ade20k_class_names_follow_object_info_150():
    info = ADE20KSource.info
    names = info.class_names
    assert info.task == "label2image"
    assert info.num_classes == len(names) == len(set(names)) == 151
    assert (names[0], names[1], names[2], names[3], names[13]) == (
        "unlabeled", "wall", "building", "sky", "person")
    assert (names[45], names[59], names[131], names[137], names[150]) == (
        "chest of drawers", "screen door", "screen", "traffic light", "flag")
    # The benchmark's colours, one per id (its table gives road and skyscraper the same grey):
    colours = info.palette
    assert len(colours) == 151 and len(set(colours)) == 150 and colours[0] == (0, 0, 0)
    assert colours[7] == colours[49] == (140, 140, 140)
    assert (colours[1], colours[2], colours[3], colours[13], colours[150]) == (
        (120, 120, 120), (180, 120, 120), (6, 230, 230), (150, 5, 61), (92, 0, 255))


def test_ade20k_errors_name_paths_and_splits(tmp_path):
    with pytest.raises(SourceError) as err:
        ADE20KSource(tmp_path)
    assert str(tmp_path / "ADEChallengeData2016") in str(err.value)
    source = ADE20KSource(ade_tree(tmp_path))
    with pytest.raises(SourceError, match="choose one of: train, val"):
        source.list_items("test")


# ----------------------------------------------------------------------------- aligned (pix2pix)

RED, BLUE = (200, 16, 16), (16, 16, 200)


def ab_array(left: tuple[int, int, int], right: tuple[int, int, int], w: int = 16) -> np.ndarray:
    return np.concatenate([rgb(left, 8, w // 2), rgb(right, 8, w // 2)], axis=1)


def aligned_tree(root: Path) -> None:
    # 8x8 solid blocks with no chroma subsampling keep JPEG's error to a level or two.
    for name in ("1.jpg", "2.jpg"):
        save(root / "train" / name, ab_array(RED, BLUE), quality=100, subsampling=0)
    save(root / "val" / "1_AB.png", ab_array(RED, BLUE))


def test_aligned_splits_halves_a_to_b_and_b_to_a(tmp_path):
    aligned_tree(tmp_path)
    source = make_source("aligned", tmp_path)
    assert isinstance(source, AlignedSource) and source.info.task == "paired"
    items, problems = source.list_items("train")
    assert [i.key for i in items] == ["1", "2"] and problems == []

    fields = source.read(items[0])
    assert sorted(fields) == ["image.png", "input.png"]
    a, b = decode(fields["input.png"]), decode(fields["image.png"])
    assert a.shape == b.shape == (8, 8, 3)
    assert np.abs(a.astype(int) - RED).max() <= 3
    assert np.abs(b.astype(int) - BLUE).max() <= 3

    (val_item,), _ = source.list_items("val")
    assert val_item.key == "1_AB"
    exact = source.read(val_item)
    assert np.all(decode(exact["input.png"]) == RED) and np.all(decode(exact["image.png"]) == BLUE)
    swapped = AlignedSource(tmp_path, direction="BtoA").read(val_item)
    assert swapped["input.png"] == exact["image.png"] and swapped["image.png"] == exact["input.png"]


def test_aligned_listing_does_not_decode_and_read_raises_on_bad_files(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "3.jpg").write_bytes(b"not a jpeg")
    save(tmp_path / "train" / "4.png", rgb(RED, 8, 15))
    source = AlignedSource(tmp_path)
    items, problems = source.list_items("train")
    assert [i.key for i in items] == ["3", "4"] and problems == []
    assert items[0].where() == str(tmp_path / "train" / "3.jpg")
    with pytest.raises(OSError):
        source.read(items[0])
    with pytest.raises(ValueError, match="width 15"):
        source.read(items[1])


def test_aligned_errors(tmp_path):
    with pytest.raises(SourceError, match=r"direction must be one of AtoB, BtoA; got 'AtoC'"):
        AlignedSource(tmp_path, direction="AtoC")
    with pytest.raises(SourceError) as err:
        AlignedSource(tmp_path).list_items("test")
    assert str(tmp_path / "test") in str(err.value)


# ----------------------------------------------------------------------------- paired / unpaired


def paired_tree(root: Path) -> None:
    save(root / "A" / "train" / "1.jpg", rgb((255, 0, 0)), quality=90)
    save(root / "A" / "train" / "2.png", rgb((1, 1, 1)))
    save(root / "A" / "train" / "3.jpg", rgb((2, 2, 2)))
    save(root / "B" / "train" / "1.png", rgb((0, 0, 255)))
    save(root / "B" / "train" / "2.png", rgb((3, 3, 3)))
    save(root / "B" / "train" / "4.jpg", rgb((4, 4, 4)))


def test_paired_matches_by_stem_across_extensions(tmp_path):
    paired_tree(tmp_path)
    source = make_source("paired", tmp_path)
    assert isinstance(source, PairedSource) and source.info.task == "paired"
    items, problems = source.list_items("train")
    assert [i.key for i in items] == ["1", "2"]
    assert problem_rows(problems) == [("missing_partner", "3", "3.jpg"), ("missing_partner", "4", "4.jpg")]
    by_name = {Path(p.path).parent.parent.name + "/" + Path(p.path).name: p.message for p in problems}
    assert by_name == {"A/3.jpg": "input file without a matching image",
                       "B/4.jpg": "no input file for this image"}

    fields = source.read(items[0])
    assert fields == {"input.jpg": (tmp_path / "A/train/1.jpg").read_bytes(),
                      "image.png": (tmp_path / "B/train/1.png").read_bytes()}

    swapped = PairedSource(tmp_path, direction="BtoA")
    items, _ = swapped.list_items("train")
    assert swapped.read(items[0]) == {"input.png": (tmp_path / "B/train/1.png").read_bytes(),
                                      "image.jpg": (tmp_path / "A/train/1.jpg").read_bytes()}


def test_paired_errors(tmp_path):
    paired_tree(tmp_path)
    with pytest.raises(SourceError, match="AtoB, BtoA"):
        PairedSource(tmp_path, direction="atob")
    (tmp_path / "A" / "val").mkdir()
    with pytest.raises(SourceError) as err:
        PairedSource(tmp_path).list_items("val")
    assert str(tmp_path / "B" / "val") in str(err.value)


def test_unpaired_lists_each_folder_and_requires_only_existing_ones(tmp_path):
    save(tmp_path / "trainA" / "n02381460_1001.jpg", rgb((9, 9, 9)))
    save(tmp_path / "trainA" / "extra" / "n02381460_2.jpg", rgb((8, 8, 8)))
    save(tmp_path / "trainB" / "n02391049_10.jpg", rgb((7, 7, 7)))
    source = make_source("unpaired", tmp_path)
    assert isinstance(source, UnpairedSource) and source.info.task == "unpaired"
    assert source.info.default_splits == ("trainA", "trainB")
    assert UnpairedSource.info.default_splits == ("trainA", "trainB", "testA", "testB")

    items, problems = source.list_items("trainA")
    assert [i.key for i in items] == ["extra_n02381460_2", "n02381460_1001"] and problems == []
    assert source.read(items[1]) == {"image.jpg": (tmp_path / "trainA/n02381460_1001.jpg").read_bytes()}
    assert [i.key for i in source.list_items("trainB")[0]] == ["n02391049_10"]
    with pytest.raises(SourceError) as err:
        source.list_items("testA")
    assert str(tmp_path / "testA") in str(err.value)


def test_unpaired_root_without_any_split_folder(tmp_path):
    with pytest.raises(SourceError, match="trainA, trainB, testA, testB"):
        UnpairedSource(tmp_path)


# ----------------------------------------------------------------------------- folder


def test_folder_ffhq_layout_keys_from_relative_path(tmp_path):
    images = tmp_path / "images1024x1024"
    for rel in ("00000/00000.png", "00000/00001.png", "01000/01000.png"):
        save(images / rel, rgb((int(rel[-5]), 0, 0)))
    (images / "LICENSE.txt").write_text("not an image")
    source = make_source("folder", images)
    assert isinstance(source, FolderSource) and source.info.task == "unconditional"
    items, problems = source.list_items("train")
    assert [i.key for i in items] == ["00000_00000", "00000_00001", "01000_01000"] and problems == []
    assert source.read(items[1]) == {"image.png": (images / "00000/00001.png").read_bytes()}
    with pytest.raises(SourceError) as err:
        source.list_items("val")
    assert str(images / "val") in str(err.value)


def test_folder_uses_split_folders_when_present(tmp_path):
    save(tmp_path / "train" / "a.png", rgb((1, 1, 1)))
    save(tmp_path / "val" / "deep" / "b.jpeg", rgb((2, 2, 2)))
    source = FolderSource(tmp_path)
    assert [i.key for i in source.list_items("train")[0]] == ["a"]
    (item,), _ = source.list_items("val")
    assert item.key == "deep_b"
    assert source.read(item) == {"image.jpg": (tmp_path / "val/deep/b.jpeg").read_bytes()}


def test_folder_refuses_whole_root_as_train_when_split_folders_exist(tmp_path):
    save(tmp_path / "val" / "b.png", rgb((2, 2, 2)))
    save(tmp_path / "c.png", rgb((3, 3, 3)))
    with pytest.raises(SourceError, match=r"split folders \(val\)"):
        FolderSource(tmp_path).list_items("train")


def test_folder_colliding_keys_are_made_unique_deterministically(tmp_path, caplog):
    names = ["a b.png", "a.jpg", "a.png", "a_2.png", "a_b.png"]
    for n, name in enumerate(names):
        save(tmp_path / name, rgb((n, n, n)))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources.base"):
        items, _ = FolderSource(tmp_path).list_items("train")
    assert [(i.key, Path(i.paths["image"]).name) for i in items] == [
        ("a_b", "a b.png"), ("a", "a.jpg"), ("a_3", "a.png"), ("a_2", "a_2.png"), ("a_b_2", "a_b.png")]
    assert len(caplog.records) == 2 and "a.png" in caplog.records[0].getMessage()
    assert [i.key for i in FolderSource(tmp_path).list_items("train")[0]] == [i.key for i in items]


def test_unique_keys_names_a_file_without_a_usable_key(tmp_path):
    assert unique_keys([("x.y", tmp_path / "x.y.png")]) == [("x_y", tmp_path / "x.y.png")]
    with pytest.raises(SourceError) as err:
        unique_keys([("__", tmp_path / "__.png")])
    assert str(tmp_path / "__.png") in str(err.value)


# ----------------------------------------------------------------------------- all adapters


@pytest.mark.parametrize("cls", [CityscapesSource, ADE20KSource, AlignedSource, PairedSource,
                                 UnpairedSource, FolderSource])
def test_info_uses_known_kinds_and_missing_root_is_a_source_error(tmp_path, cls):
    info = cls.info
    assert info.task in TASKS and all(f.kind in FIELD_KINDS for f in info.fields)
    assert "missing_partner" in PROBLEM_KINDS
    with pytest.raises(SourceError) as err:
        cls(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)
    with pytest.raises(SourceError, match="needs a dataset root"):
        cls(None)
