"""Shards made elsewhere: a set written by ``webdataset.ShardWriter`` with its own naming is
indexed by ``gan-shard index`` (never rewritten), verified, streamed through brace patterns and
trained on, with a bit-identical resume after SIGKILL."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import NUM_CLASSES, render

from pipeline.data.cli import main as shard_cli
from pipeline.data.shard_reader import sample_offsets
from pipeline.data.stream import make_stream

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
SIZE = 128


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def shardwriter_set(root: Path, split: str, count: int, per_shard: int, label: bool = True) -> list[str]:
    """``count`` samples written by webdataset's own ShardWriter: ``photos-<split>-000.tar``, ...,
    members ``<key>.jpg`` (photo), ``<key>.seg.png`` (labels), ``<key>.json``. Returns the keys."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    keys = []
    with wds.ShardWriter(str(root / f"photos-{split}-%03d.tar"), maxcount=per_shard, verbose=0) as sink:
        for k in range(count):
            fields = render(k, SIZE, SIZE)
            sample = {"__key__": f"{split}{k:05d}", "jpg": jpeg(fields["image"]), "json": json.dumps({"k": k})}
            if label:
                sample["seg.png"] = png(fields["label"])
            sink.write(sample)
            keys.append(sample["__key__"])
    return keys


@pytest.fixture(scope="module")
def made_elsewhere(tmp_path_factory) -> tuple[Path, Path, dict[str, list[str]]]:
    """The ShardWriter set (train: 22 samples in 4 shards, val: 5 in 1) and its index manifest."""
    root = tmp_path_factory.mktemp("made-elsewhere")
    keys = {"train": shardwriter_set(root, "train", 22, 6), "val": shardwriter_set(root, "val", 5, 8)}
    before = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    manifest = root / "index" / "manifest.json"
    code = shard_cli(["index", f"train={root}/photos-train-{{000..003}}.tar", f"val={root}/photos-val-000.tar",
                      "--out", str(manifest), "--field", "image=image:jpg", "--field", "label=label:seg.png",
                      "--num-classes", str(NUM_CLASSES), "--dataset", "photos"])
    assert code == 0
    assert {p.name: p.read_bytes() for p in root.glob("*.tar")} == before  # not a byte rewritten
    return root, manifest, keys


def test_index_records_counts_fields_checksums_offsets_and_sizes(made_elsewhere, capsys):
    root, manifest_path, keys = made_elsewhere
    m = json.loads(manifest_path.read_text())
    assert m["task"] == "label2image" and m["num_classes"] == NUM_CLASSES and m["source"] == "webdataset"
    assert m["fields"]["image"] == {"kind": "image", "members": ["jpg"], "required": True, "exts": ["jpg"]}
    assert m["fields"]["label"]["members"] == ["seg.png"]
    train = m["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [6, 6, 6, 4] and train["samples"] == 22
    for shard in train["shards"] + m["splits"]["val"]["shards"]:
        data = Path(shard["url"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
        with open(shard["url"], "rb") as f:
            assert shard["offsets"] == sample_offsets(f)
    assert train["image_size"]["most_common"] == [{"width": SIZE, "height": SIZE, "count": 22}]
    assert shard_cli(["verify", str(manifest_path)]) == 0
    assert "verify OK: 5 shards, 27 samples" in capsys.readouterr().out
    sheet = manifest_path.parent / "sheet.png"
    assert shard_cli(["inspect", str(manifest_path), "--sheet", str(sheet), "--samples", "2"]) == 0
    assert Image.open(sheet).size[1] == 2 * (128 + 4)


def test_streams_over_the_manifest_and_brace_patterns_agree(made_elsewhere):
    root, manifest_path, keys = made_elsewhere
    via_manifest = list(make_stream(str(manifest_path), "train", train=False))
    assert sorted(s["__key__"] for s in via_manifest) == keys["train"]
    assert via_manifest[0]["image"].shape == (3, SIZE, SIZE) and via_manifest[0]["label"].dtype == torch.uint8
    assert int(max(s["label"].max() for s in via_manifest)) < NUM_CLASSES
    pattern = f"{root}/photos-train-{{000..003}}.tar"
    via_pattern = list(make_stream(pattern, "train", train=False, fields=("image",)))
    assert [s["__key__"] for s in via_pattern] == [s["__key__"] for s in via_manifest]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(via_pattern, via_manifest))
    both = f"{root}/photos-train-{{000..001}}.tar::{root}/photos-val-000.tar"  # webdataset's "::" union
    assert len(make_stream(both, "val", train=False)) == 6 + 6 + 5
    alone = make_stream(f"{root}/photos-val-000.tar", "val", train=False).spec.manifest
    assert list(alone.fields) == ["image"]  # found alone: a plain image extension; seg.png needs --field
    with pytest.raises(ValueError, match="split 'train' is not in .*; it has: val"):
        alone.split("train")


def test_fields_found_alone_and_clear_errors(tmp_path, capsys):
    shardwriter_set(tmp_path / "faces", "train", 3, 8, label=False)
    out = tmp_path / "faces.json"
    assert shard_cli(["index", str(tmp_path / "faces" / "photos-train-000.tar"), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["task"] == "unconditional" and m["fields"]["image"]["members"] == ["jpg"] and len(m["fields"]) == 1
    capsys.readouterr()
    gz = tmp_path / "faces-000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "faces" / "photos-train-000.tar").read_bytes()))
    one = str(tmp_path / "faces" / "photos-train-000.tar")
    for args, message in [([str(gz)], "is compressed: store shards as plain .tar"),
                          ([one, "--field", "label=label"], "expected --field NAME=KIND:SUFFIX"),
                          ([one, "--field", "image=image:jpg", "--field", "label=label:seg.png"],
                           "holds label maps or class ids: their number of classes is needed")]:
        assert shard_cli(["index", *args, "--out", str(tmp_path / "bad.json")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("gan-shard: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad.json").exists()
    assert shard_cli(["index", one, "--field", "image=image:png", "--out", str(tmp_path / "png.json")]) == 0
    assert "3 lack 'image'" in capsys.readouterr().out  # said, and skipped as bad samples by the loader


def run_training(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.mark.multiprocess
def test_trains_on_the_shardwriter_set_and_resumes_bit_identically(made_elsewhere, tmp_path):
    from pipeline.train import checkpoint as ckpt

    _, manifest_path, _ = made_elsewhere
    args = [f"data.url={manifest_path}", "model.ngf=8", "model.ndf=8", "data.crop_size=128,128",
            "train.batch_size=4", "train.total_kimg=0.064", "checkpoint.every_kimg=0.016", "checkpoint.keep_last=2",
            "data.workers=1", "train.progress=false", "train.log_every_kimg=0.016", "train.image_every_kimg=0",
            "model.ema_kimg=0.01", "train.precision=fp32"]
    cmd = lambda d: [sys.executable, TRAIN, "--config", "pix2pix_demo", f"run.dir={d}", *args]  # noqa: E731
    run_training(cmd(tmp_path / "a"))
    b_dir = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd(b_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    marker = b_dir / "checkpoints" / f"step-{4:08d}" / ckpt.COMMIT
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)  # the run and its DataLoader worker, no cleanup
    out, err = proc.communicate(timeout=60)
    assert marker.exists(), f"step 4 was never committed\n{out[-2000:]}\n{err[-4000:]}"
    assert ckpt.latest(str(b_dir)).step < 16, "the run was not interrupted"
    r = run_training(cmd(b_dir))
    assert "resumed from" in r.stdout + r.stderr
    for name in ("G", "D", "G_ema", "opt_G", "opt_D"):
        a = ckpt.load_tensors(ckpt.latest(str(tmp_path / "a")).file(f"{name}.pt"))
        b = ckpt.load_tensors(ckpt.latest(str(b_dir)).file(f"{name}.pt"))
        assert json.dumps(_shapes(a)) == json.dumps(_shapes(b))
        assert all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b))), name


def _leaves(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _leaves(obj[key])
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _leaves(item)


def _shapes(obj):
    return [list(t.shape) for t in _leaves(obj)]


@pytest.mark.s3
def test_index_and_stream_shards_on_s3_in_place(s3_server, tmp_path):
    from pipeline import io as storage

    keys = shardwriter_set(tmp_path, "train", 9, 4)  # 3 shards
    for path in sorted(tmp_path.glob("*.tar")):
        storage.atomic_upload(path, s3_server.url(f"elsewhere/{path.name}"))
    pattern = s3_server.url("elsewhere/photos-train-{000..002}.tar")
    manifest = s3_server.url("index/manifest.json")
    assert shard_cli(["index", pattern, "--out", manifest]) == 0
    m = json.loads(s3_server.client().get_object(Bucket=s3_server.bucket, Key="index/manifest.json")["Body"].read())
    assert [s["url"] for s in m["splits"]["train"]["shards"]] == [
        s3_server.url(f"elsewhere/photos-train-00{i}.tar") for i in range(3)]
    assert all(s["sha256"] == hashlib.sha256((tmp_path / s["name"]).read_bytes()).hexdigest()
               for s in m["splits"]["train"]["shards"])
    for url in (manifest, pattern):
        halves = [[s["__key__"] for s in make_stream(url, "train", train=False, rank=rank, world_size=2)]
                  for rank in range(2)]
        assert sorted(halves[0] + halves[1]) == keys and len(halves[0]) == 4  # 9 samples over 2 ranks, exactly once
