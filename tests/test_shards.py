"""The shard writer, the manifest and the sharding CLI: contents, determinism, resume,
atomicity, problem reporting and one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import NUM_CLASSES, SyntheticSource
from test_sources import cityscapes_frame

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import JOURNAL_DIR, ShardWriteError, WriteOptions, write_dataset
from pipeline.data.verify import verify

REPO = Path(__file__).resolve().parent.parent
SHARD_CLI = [sys.executable, str(REPO / "launch" / "shard.py")]


def write(out: Path, source=None, **opts) -> dict:
    opts.setdefault("samples_per_shard", 6)
    return write_dataset(source or SyntheticSource(), str(out), ["train", "val"], WriteOptions(**opts),
                         command="test", progress=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SHARD_CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_manifest_describes_every_shard(tmp_path):
    m = write(tmp_path)
    assert m["format"] == "gan-pipeline-shards" and m["task"] == "label2image"
    assert m["fields"] == {"image": {"kind": "image", "required": True, "exts": ["png"]},
                           "label": {"kind": "label", "required": True, "exts": ["png"]},
                           "instance": {"kind": "instance", "required": True, "exts": ["png"]}}
    assert m["num_classes"] == NUM_CLASSES and m["class_names"][0] == "c0"
    train = m["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [6, 6, 6, 2]
    assert [s["name"] for s in m["splits"]["val"]["shards"]] == ["val-000000.tar", "val-000001.tar"]
    for split in m["splits"].values():
        for s in split["shards"]:
            path = tmp_path / s["name"]
            assert (sha(path), path.stat().st_size) == (s["sha256"], s["bytes"])
    assert m["totals"] == {"samples": 29, "bytes": sum(s["bytes"] for sp in m["splits"].values()
                                                       for s in sp["shards"]), "shards": 6, "skipped": 0}
    assert train["image_size"]["most_common"] == [{"width": 24, "height": 16, "count": 20}]
    assert sum(train["class_histogram"]) == 20 * 24 * 16 and len(train["class_histogram"]) == NUM_CLASSES
    assert m["tool"]["name"] == "gan-pipeline" and m["command"] == "test"
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    with tarfile.open(tmp_path / "val-000001.tar") as tar:
        names = tar.getnames()
    assert len(names) == 9 and all(n.split(".", 1)[1] in ("image.png", "label.png", "instance.png") for n in names)


def test_same_input_and_seed_give_byte_identical_shards_whatever_the_workers(tmp_path):
    a, b, c = write(tmp_path / "a", workers=1), write(tmp_path / "b", workers=2), write(tmp_path / "c", seed=1)
    shards = lambda m: [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]  # noqa: E731
    assert shards(a) == shards(b)
    assert shards(a) != shards(c)  # another seed, another order
    assert a["splits"]["train"]["samples"] == c["splits"]["train"]["samples"]


def test_rerun_skips_complete_shards_and_rewrites_a_damaged_one(tmp_path):
    first = write(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    # Damage the third train shard: it and everything after it must be rewritten.
    damaged = tmp_path / "train-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    second = write(tmp_path)
    assert second["splits"] == first["splits"]
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert after["train-000000.tar"] == mtimes["train-000000.tar"]
    assert after["train-000001.tar"] == mtimes["train-000001.tar"]
    assert after["val-000000.tar"] == mtimes["val-000000.tar"]
    assert after["train-000002.tar"] != mtimes["train-000002.tar"]
    assert verify(load_manifest(str(tmp_path)), log=lambda *_: None).ok


class CrashingSource(SyntheticSource):
    """Dies (not a data problem: a crash) when it reaches one sample."""

    def __init__(self, crash_key: str):
        super().__init__()
        self.crash_key = crash_key

    def read(self, item):
        if item.key == self.crash_key:
            raise RuntimeError("simulated crash")
        return super().read(item)


def test_interrupted_write_leaves_no_manifest_and_resumes(tmp_path):
    write(tmp_path)
    assert (tmp_path / "manifest.json").exists()
    order = [n for n in json.loads((tmp_path / "_journal" / "train-000002.tar.json").read_text())["sizes"]]
    assert order  # the journal records the shard's contents
    journal = json.loads((tmp_path / JOURNAL_DIR / "train-000001.tar.json").read_text())
    with tarfile.open(tmp_path / "train-000002.tar") as tar:
        crash_key = tar.getnames()[0].split(".")[0]
    for p in [tmp_path / "train-000002.tar", tmp_path / JOURNAL_DIR / "train-000002.tar.json"]:
        p.unlink()
    with pytest.raises(RuntimeError, match="simulated crash"):
        write(tmp_path, CrashingSource(crash_key))
    # The old manifest is gone before any shard changed; nothing names a partial shard.
    assert not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "train-000002.tar").exists()
    assert journal["end"] == 12
    m = write(tmp_path)
    assert verify(load_manifest(str(tmp_path)), log=lambda *_: None).ok
    assert m["splits"]["train"]["samples"] == 20


def test_bad_samples_are_skipped_listed_and_counted(tmp_path):
    bad = {"train_0003": "undecodable", "train_0005": "label_out_of_range", "train_0007": "size_mismatch"}
    m = write(tmp_path, SyntheticSource(bad=bad))
    train = m["splits"]["train"]
    assert train["samples"] == 17 and m["totals"]["skipped"] == 3
    assert train["skipped_by_kind"] == {"undecodable": 1, "label_out_of_range": 1, "size_mismatch": 1}
    by_key = {s["key"]: s for s in train["skipped"]}
    assert set(by_key) == set(bad)
    assert "label ids [8] outside 0..4" in by_key["train_0005"]["message"]
    assert by_key["train_0003"]["path"] == "/synthetic/train/3.png"
    keys = {n.split(".")[0] for p in tmp_path.glob("train-*.tar") for n in tarfile.open(p).getnames()}
    assert not keys & set(bad) and len(keys) == 17


def test_strict_turns_a_problem_into_a_failure(tmp_path):
    with pytest.raises(ShardWriteError, match=r"--strict: \[undecodable\] train/train_0003"):
        write(tmp_path, SyntheticSource(bad={"train_0003": "undecodable"}), strict=True)
    assert not (tmp_path / "manifest.json").exists()


def test_resize_uses_nearest_for_maps_and_keeps_ids(tmp_path):
    m = write(tmp_path, resize=(12, 8))
    assert m["splits"]["train"]["image_size"]["most_common"][0] == {"width": 12, "height": 8, "count": 20}
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = {n.split(".", 1)[1]: tar.extractfile(n).read() for n in tar.getnames()[:3]}
    label = np.asarray(Image.open(__import__("io").BytesIO(members["label.png"])))
    instance = np.asarray(Image.open(__import__("io").BytesIO(members["instance.png"])))
    assert label.shape == (8, 12) and set(np.unique(label)) <= set(range(NUM_CLASSES))
    assert (instance // 1000 == label).all()  # nearest: no blended ids


def test_max_shard_bytes_cuts_shards(tmp_path):
    m = write(tmp_path, samples_per_shard=1000, max_shard_bytes=25_000)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["bytes"] <= 25_000 for s in shards)
    assert all(s["bytes"] == (tmp_path / s["name"]).stat().st_size for s in shards)
    assert sum(s["samples"] for s in shards) == 20


# ---------------------------------------------------------------- the CLI


def test_cli_write_verify_inspect_on_a_cityscapes_tree(tmp_path):
    root = tmp_path / "cityscapes"
    for i in range(4):
        cityscapes_frame(root, "train", "aachen", i, 19)
    cityscapes_frame(root, "val", "lindau", 0, 19)
    lonely = cityscapes_frame(root, "train", "bremen", 7, 19, label=False)
    out = tmp_path / "shards"
    r = run_cli("write", "cityscapes", "--root", str(root), "--out", str(out), "--samples-per-shard", "2",
                "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote 5 samples in 3 shards" in r.stdout and "1 skipped" in r.stdout
    assert f"[missing_partner] train/{lonely}" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_classes"] == 35 and m["splits"]["train"]["skipped"][0]["path"].endswith("_leftImg8bit.png")
    assert m["command"].startswith("gan-shard write cityscapes")
    r = run_cli("verify", str(out))
    assert r.returncode == 0 and "verify OK: 3 shards, 5 samples" in r.stdout, r.stdout + r.stderr
    sheet = tmp_path / "sheet.png"
    r = run_cli("inspect", str(out), "--samples", "3", "--sheet", str(sheet))
    assert r.returncode == 0 and "4 samples in 2 shards" in r.stdout, r.stdout + r.stderr
    assert Image.open(sheet).size[1] == 3 * (128 + 4)
    # Label maps in the dataset's own colours: a frame of "car" (26) as its _gtFine_color.png has it.
    assert len(m["palette"]) == 35 and m["palette"][7] == [128, 64, 128] and m["palette"][26] == [0, 0, 142]
    photo_width = 8 * 128 // 4  # the 8x4 photo at the sheet's tile height
    assert Image.open(sheet).convert("RGB").getpixel((photo_width + 4 + 10, 10)) == (0, 0, 142)
    r = run_cli("write", "cityscapes", "--root", str(root), "--out", str(tmp_path / "s2"), "--strict", "--quiet")
    assert r.returncode == 1 and "--strict: [missing_partner]" in r.stderr
    assert not (tmp_path / "s2" / "manifest.json").exists()


def test_image_grids_show_label_maps_in_the_datasets_colours():
    import torch

    from pipeline.data.sources.cityscapes import CITYSCAPES_PALETTE
    from pipeline.families.labelmaps import colourised
    from pipeline.train.family import DataInfo

    label = torch.tensor([[[7, 26], [23, 200]]])  # road, car, sky, an id beyond the palette
    own = colourised(label, DataInfo("label2image", 35, ("image", "label"), CITYSCAPES_PALETTE))
    rgb = ((own[0] + 1) * 127.5).round().int().permute(1, 2, 0).tolist()
    assert rgb[0] == [[128, 64, 128], [0, 0, 142]] and rgb[1][0] == [70, 130, 180]
    generated = colourised(label, DataInfo("label2image", 35, ("image", "label")))
    assert torch.equal(generated[0, :, 1, 1], own[0, :, 1, 1])  # ids past the palette: the generated colours
    assert not torch.equal(generated[0, :, 0, 0], own[0, :, 0, 0])


def test_cli_verify_reports_a_damaged_shard(tmp_path):
    write(tmp_path)
    shard = tmp_path / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01
    shard.write_bytes(bytes(data))
    r = run_cli("verify", str(tmp_path))
    assert r.returncode == 1
    assert f"{shard}: checksum mismatch" in r.stderr and "verify FAILED" in r.stdout


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["write", "imagenet", "--root", ".", "--out", "x"], "unknown source 'imagenet'; choose one of: cityscapes,"),
    (["write", "cityscapes", "--root", "/does/not/exist", "--out", "x"], "--root /does/not/exist is not a directory"),
    (["write", "folder", "--out", "x"], "source 'folder' needs --root DIR"),
    (["verify", "/does/not/exist"], "no shard manifest at /does/not/exist/manifest.json"),
])
def test_cli_errors_are_one_clear_line(args, expected):
    assert expected in one_line_error(run_cli(*args))


def test_cli_unwritable_output_is_one_clear_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = one_line_error(run_cli("write", "folder", "--root", str(tmp_path / "imgs"),
                                  "--out", str(blocker / "shards"), "--quiet"))
    assert line.startswith(f"gan-shard: error: cannot write to {blocker / 'shards'}")
