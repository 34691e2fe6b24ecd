"""The embedded demo source: deterministic, well-formed street scenes whose photo follows the label."""

from __future__ import annotations

import io
import multiprocessing
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import make_source
from pipeline.data.sources.base import Item, SourceError
from pipeline.data.sources.demo import (
    BUILDING,
    CAR,
    CLASS_NAMES,
    PERSON,
    THING_CLASSES,
    DemoSource,
    render,
)

SMALL = {"size": (128, 64), "counts": {"train": 6, "val": 3}}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def samples() -> list[dict[str, np.ndarray]]:
    source = DemoSource(None, **SMALL)
    return [source.sample("train", i) for i in range(6)]


def test_same_inputs_give_identical_bytes_even_after_pickling():
    source = DemoSource(None, **SMALL)
    items, _ = source.list_items("train")
    twin = pickle.loads(pickle.dumps(DemoSource(None, **SMALL)))  # as a writer's pool worker gets it
    for item in (items[0], items[4]):
        assert source.read(item) == twin.read(item)
    # The key alone is enough: a worker rebuilds nothing from list_items.
    assert twin.read(Item(key=items[2].key)) == source.read(items[2])


def test_read_in_a_spawned_worker_matches_the_parent():
    source = DemoSource(None, **SMALL)
    items = source.list_items("val")[0]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.map_async(source.read, items).get(timeout=60)
    assert remote == [source.read(item) for item in items]


def test_index_seed_and_split_change_the_sample():
    source = DemoSource(None, **SMALL)
    train, _ = source.list_items("train")
    val, _ = source.list_items("val")
    first = source.read(train[0])
    assert source.read(train[1])["image.png"] != first["image.png"]
    assert source.read(val[0])["image.png"] != first["image.png"]
    reseeded = DemoSource(None, seed=1, **SMALL)
    assert reseeded.read(train[0])["label.png"] != first["label.png"]


def test_fields_decode_with_the_right_shapes_and_dtypes():
    source = DemoSource(None, **SMALL)
    fields = source.read(source.list_items("val")[0][0])
    assert sorted(fields) == ["image.png", "instance.png", "label.png"]
    image, label, instance = (decode(fields[f"{n}.png"]) for n in ("image", "label", "instance"))
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    assert label.shape == (64, 128) and label.dtype == np.uint8
    assert instance.shape == (64, 128) and instance.dtype == np.uint16
    assert image.std() > 20  # a scene, not a flat fill


def test_labels_in_range_and_instances_follow_cityscapes_convention(samples):
    for sample in samples:
        label, instance = sample["label"], sample["instance"]
        assert label.max() < len(CLASS_NAMES)
        thing = np.isin(label, THING_CLASSES)
        assert (instance[thing] // 1000 == label[thing]).all()
        assert (instance[~thing] == label[~thing]).all()
    per_class = {c: {int(i) for s in samples for i in np.unique(s["instance"][s["label"] == c])}
                 for c in THING_CLASSES}
    assert all(len(ids) >= 2 for ids in per_class.values()), per_class


def test_every_class_appears_in_a_handful_of_samples(samples):
    used = set().union(*(np.unique(s["label"]).tolist() for s in samples))
    assert used == set(range(len(CLASS_NAMES))), sorted(set(range(len(CLASS_NAMES))) - used)


def test_photo_follows_the_label(samples):
    """What makes the demo learnable: a class fixes the colour far more than the scene does."""
    pixels = np.concatenate([s["image"].reshape(-1, 3) for s in samples]).astype(np.float64)
    labels = np.concatenate([s["label"].ravel() for s in samples])
    means = np.zeros((len(CLASS_NAMES), 3))
    for c in np.unique(labels):
        means[c] = pixels[labels == c].mean(0)
    residual = pixels - means[labels]
    explained = 1 - residual.var(0).sum() / pixels.var(0).sum()
    assert explained > 0.5, explained
    # Classes with one look (cars, people, buildings vary per instance on purpose).
    fixed = [c for c in range(len(CLASS_NAMES)) if c not in (CAR, PERSON, BUILDING)]
    gaps = [np.linalg.norm(means[a] - means[b]) for a in fixed for b in fixed if a < b]
    assert min(gaps) > 25, min(gaps)
    spread = np.sqrt(((means[fixed] - means[fixed].mean(0)) ** 2).sum(1).mean())
    in_fixed = np.isin(labels, fixed)
    within = np.sqrt((residual[in_fixed] ** 2).sum(1).mean())
    assert within < 0.5 * spread, (within, spread)


def test_cars_differ_from_one_another(samples):
    colours = [s["image"][s["instance"] == i].mean(0) for s in samples
               for i in np.unique(s["instance"][s["label"] == CAR]) if (s["instance"] == i).sum() > 20]
    assert len(colours) >= 5 and np.std(colours, axis=0).mean() > 15


def test_list_items_counts_keys_and_info():
    source = DemoSource(None, **SMALL)
    items, problems = source.list_items("train")
    assert problems == [] and len(items) == 6
    assert [it.key for it in items] == [f"demo_train_{i:06d}" for i in range(6)]
    assert all(not it.paths for it in items)
    assert len(source.list_items("val")[0]) == 3
    info = source.info
    assert info.task == "label2image" and info.num_classes == len(CLASS_NAMES) == len(info.class_names)
    assert [f.kind for f in info.fields] == ["image", "label", "instance"]
    default = DemoSource()
    assert default.size == (256, 128) and default.info.default_splits == ("train", "val")
    assert [len(default.list_items(s)[0]) for s in ("train", "val")] == [384, 128]


def test_unknown_split_and_foreign_keys_are_errors():
    source = DemoSource(None, **SMALL)
    with pytest.raises(SourceError, match="available: train, val"):
        source.list_items("test")
    for key in ("demo_test_000000", "demo_train_000006", "cityscapes_0001"):
        with pytest.raises(SourceError, match="not a demo sample key"):
            source.read(Item(key=key))


def test_size_option_is_honoured():
    for size in ((96, 48), "96x48"):
        source = make_source("demo", None, size=size, counts={"train": 1})
        sample = source.sample("train", 0)
        assert sample["image"].shape == (48, 96, 3) and sample["label"].shape == (48, 96)
    with pytest.raises(SourceError, match="size"):
        DemoSource(size=(10, 10))
    with pytest.raises(SourceError, match="count"):
        DemoSource(counts={"train": -1})


def test_render_is_a_pure_function_of_its_seed():
    a, b = render(7, 64, 32), render(np.random.default_rng(7), 64, 32)
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "label", "instance"))
    assert not np.array_equal(a["image"], render(8, 64, 32)["image"])
