"""Sharding in parallel parts (``write --part I/N`` on N machines, then ``write --finalize N``):
the shards, journal and manifest are byte-identical to a single-process write, whatever N, with
skipped samples and byte-capped shards; missing or damaged parts stop the finalize step before
any shard is written from them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from synthetic_data import SyntheticSource

from pipeline.data.manifest import MANIFEST_NAME
from pipeline.data.shards import JOURNAL_DIR, PARTS_DIR, ShardWriteError, WriteOptions, write_dataset, write_part

REPO = Path(__file__).resolve().parent.parent
SPLITS = ["train", "val"]
BAD = {"train_0003": "undecodable", "train_0011": "size_mismatch", "val_0004": "label_out_of_range"}


def options(**kw) -> WriteOptions:
    return WriteOptions(**{"samples_per_shard": 4, "max_shard_bytes": 14_000, **kw})


def files(root: Path) -> dict[str, bytes]:
    """Every file of a shard directory (manifest without the command that made it)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == MANIFEST_NAME:
                manifest = json.loads(data)
                manifest.pop("command")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def write_in_parts(out: Path, source, opts: WriteOptions, parts: int, order=None) -> dict:
    for part in order or range(parts):
        for split in SPLITS:
            write_part(source, split, str(out), opts, part, parts)
    return write_dataset(source, str(out), SPLITS, opts, command="parts", progress=False, parts=parts)


# Shards cut by bytes (14,000: 3 samples) or by count (4); 11 parts > the 9 val samples: empty
# parts. Each value of each parameter once (every combination cost 2.5 minutes); a worker pool
# per part and split only where parts are few (11 parts x 2 splits of pools cost ~30 s).
@pytest.mark.parametrize("parts, max_shard_bytes, workers", [(1, 14_000, 2), (3, 1 << 30, 2), (11, 14_000, 1)])
def test_parts_are_byte_identical_to_a_single_process_write(tmp_path, parts, max_shard_bytes, workers):
    source = SyntheticSource(bad=BAD)
    opts = options(max_shard_bytes=max_shard_bytes)
    single = write_dataset(source, str(tmp_path / "single"), SPLITS, opts, command="single", progress=False)
    assert len(single["splits"]["train"]["shards"]) >= 5 and single["totals"]["skipped"] == 3
    # Skipped samples move every later shard boundary: no part can know where its shards start.
    journal = [json.loads(p.read_text()) for p in sorted((tmp_path / "single" / JOURNAL_DIR).glob("train-*"))]
    assert any(e["end"] - e["start"] != e["samples"] for e in journal)
    order = list(reversed(range(parts)))  # parts finish in any order
    staged = write_in_parts(tmp_path / "parts", source, replace(opts, workers=workers), parts, order)
    assert staged["totals"] == single["totals"]
    a, b = files(tmp_path / "single"), files(tmp_path / "parts")
    assert a.keys() == b.keys() and not (tmp_path / "parts" / PARTS_DIR).exists()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.startswith(JOURNAL_DIR) for k in b)  # the journal too: a later plain re-run resumes


def test_finalize_refuses_a_missing_part_and_writes_no_manifest(tmp_path):
    source, opts = SyntheticSource(), options()
    for split in SPLITS:
        write_part(source, split, str(tmp_path), opts, 0, 2)
    with pytest.raises(ShardWriteError, match=r"train: part 1/2 is not staged .*--part 1/2"):
        write_dataset(source, str(tmp_path), SPLITS, opts, progress=False, parts=2)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_parts_of_other_options_are_refused(tmp_path):
    source = SyntheticSource()
    for split in SPLITS:
        for part in range(2):
            write_part(source, split, str(tmp_path), options(seed=1), part, 2)
    with pytest.raises(ShardWriteError, match="written for other input or options"):
        write_dataset(source, str(tmp_path), SPLITS, options(), progress=False, parts=2)


def test_a_damaged_staged_sample_stops_finalize_and_restaging_repairs_it(tmp_path, caplog):
    source, opts = SyntheticSource(), options()
    for part in range(2):
        for split in SPLITS:
            write_part(source, split, str(tmp_path), opts, part, 2)
    blob = tmp_path / PARTS_DIR / "train-part-0001-of-0002.bin"
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ShardWriteError, match=r"staged sample train_\d+ .* is damaged; run write with --part 1/2"):
        write_dataset(source, str(tmp_path), SPLITS, opts, progress=False, parts=2)
    assert not (tmp_path / MANIFEST_NAME).exists()
    with caplog.at_level(logging.INFO):
        write_part(source, "train", str(tmp_path), opts, 0, 2)  # intact: kept
        write_part(source, "train", str(tmp_path), opts, 1, 2)  # damaged: staged again
    assert "train: part 0/2 already staged" in caplog.text and "part 1/2 already staged" not in caplog.text
    write_dataset(source, str(tmp_path), SPLITS, opts, progress=False, parts=2)
    assert files(tmp_path) == files(Path(write_ref(tmp_path.parent / "ref", source, opts)))


def write_ref(out: Path, source, opts) -> str:
    write_dataset(source, str(out), SPLITS, opts, command="ref", progress=False)
    return str(out)


def test_cli_parts_then_finalize_equal_a_plain_write(tmp_path):
    common = ["demo", "--demo-count", "train=10", "--demo-count", "val=3", "--demo-size", "64x32",
              "--samples-per-shard", "4", "--workers", "1", "--quiet"]
    shard = [sys.executable, str(REPO / "launch" / "shard.py"), "write"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([*shard, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    cli(*common, "--out", str(tmp_path / "plain"))
    for part in ("1/2", "0/2"):
        r = cli(*common, "--out", str(tmp_path / "parts"), "--part", part)
        assert f"staged train part {part}" in r.stdout and not (tmp_path / "parts" / MANIFEST_NAME).exists()
    r = cli(*common, "--out", str(tmp_path / "parts"), "--finalize", "2")
    assert "wrote 13 samples in 4 shards" in r.stdout
    assert files(tmp_path / "plain") == files(tmp_path / "parts")
    manifest = json.loads((tmp_path / "parts" / MANIFEST_NAME).read_text())
    assert "--finalize" not in manifest["command"] and "--part" not in manifest["command"]
    bad = subprocess.run([*shard, *common, "--out", str(tmp_path / "x"), "--part", "2/2"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "expected I/N with 0 <= I < N" in bad.stderr
