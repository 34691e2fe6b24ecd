"""S3 against a real S3-compatible server (moto) on loopback: the sharding CLI, verify and the
multi-process stream end to end, the ``pipeline.io`` primitives, resume, and clear failures.

Everything reaches the server through the standard AWS environment only (see ``s3_server``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import io

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parent.parent
SHARD_CLI = str(REPO / "launch" / "shard.py")
PROCESS_TIMEOUT_SEC = 60

# ----------------------------------------------------------------------------- helpers


def colour(i: int) -> tuple[int, int, int]:
    return (i * 20) % 256, (255 - i * 20) % 256, (i * 37 + 11) % 256


def make_folder_dataset(root: Path, count: int = 11) -> dict[str, tuple[int, int, int]]:
    """FFHQ-style nested PNGs (``00000/00003.png``), one solid colour each; returns key -> colour."""
    expected = {}
    for i in range(count):
        path = root / f"{i // 6:05d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), colour(i), np.uint8)).save(path)
        expected[f"{i // 6:05d}_{i:05d}"] = colour(i)
    return expected


def run(args: list[str], timeout: float = PROCESS_TIMEOUT_SEC,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A subprocess in the repo with the test's environment (which carries the S3 settings),
    updated with ``env``."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} timed out after {timeout} s\n--- stdout\n{exc.stdout}\n--- stderr\n{exc.stderr}")


def shard_write(root: Path, out: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([SHARD_CLI, "write", "folder", "--root", str(root), "--out", out, "--samples-per-shard", "3",
                "--seed", "7", "--quiet", *extra], env=env)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def objects(s3, prefix: str) -> dict[str, dict]:
    """Key (relative to ``prefix``) -> the server's listing entry, read with an independent client."""
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix.strip("/") + "/")
    return {o["Key"][len(prefix.strip("/")) + 1:]: o for o in listing.get("Contents", [])}


def object_sha256(s3, key: str) -> str:
    return hashlib.sha256(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()).hexdigest()


# One rank of an evaluation stream: a real process with a real DataLoader and 2 worker processes.
RANK_SCRIPT = """
import json, sys
import torch
from pipeline.data.stream import make_stream

url, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stream = make_stream(url, "train", train=False, rank=rank, world_size=world, num_workers=2)
loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
rows = [{"key": s["__key__"], "slot": s["__slot__"], "bad": s["__bad__"],
         "dtype": str(s["image"].dtype), "rgb": s["image"][:, 0, 0].int().tolist()} for s in loader]
print("ROWS " + json.dumps(rows))
"""


def run_ranks(url: str, world_size: int, env: dict[str, str] | None = None) -> list[dict]:
    """Start every rank at once, wait with a timeout, and print every rank's output on failure."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, url, str(rank), str(world_size)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world_size)]
    outputs = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=PROCESS_TIMEOUT_SEC)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\n[timed out after {PROCESS_TIMEOUT_SEC} s]"
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    report = "\n".join(f"=== rank {r}: exit {rc}\n--- stdout\n{out}\n--- stderr\n{err}"
                       for r, (rc, out, err) in enumerate(outputs))
    assert all(rc == 0 for rc, _, _ in outputs), report
    rows = []
    for _, out, _ in outputs:
        lines = [line for line in out.splitlines() if line.startswith("ROWS ")]
        assert len(lines) == 1, report
        rows.extend(json.loads(lines[0][len("ROWS "):]))
    return rows


# ----------------------------------------------------------------------------- the user path


def test_cli_write_verify_and_stream_two_ranks_two_workers(s3_server, tmp_path: Path):
    expected = make_folder_dataset(tmp_path / "photos")
    out = s3_server.url("datasets/photos")

    written = shard_write(tmp_path / "photos", out, "--workers", "2")
    assert written.returncode == 0, explain(written)
    assert "wrote 11 samples in 4 shards" in written.stdout, explain(written)

    stored = objects(s3_server, "datasets/photos")
    assert sorted(k for k in stored if not k.startswith("_journal/")) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]
    manifest_text = s3_server.client().get_object(Bucket=s3_server.bucket,
                                                  Key="datasets/photos/manifest.json")["Body"].read().decode()
    manifest = json.loads(manifest_text)
    assert manifest["splits"]["train"]["samples"] == 11
    for shard in manifest["splits"]["train"]["shards"]:
        assert object_sha256(s3_server, f"datasets/photos/{shard['name']}") == shard["sha256"]
    # Credentials live in the environment only: never in the manifest or the CLI's output.
    for text in (manifest_text, written.stdout, written.stderr):
        assert s3_server.secret_access_key not in text
        assert s3_server.endpoint not in text

    verified = run([SHARD_CLI, "verify", out])
    assert verified.returncode == 0, explain(verified)
    assert "verify OK: 4 shards, 11 samples" in verified.stdout, explain(verified)

    rows = run_ranks(out, world_size=2)
    assert Counter(r["key"] for r in rows) == Counter(expected.keys()), "every key exactly once across ranks x workers"
    assert {r["slot"] for r in rows} == {0, 1, 2, 3}
    assert all(r["bad"] == 0 for r in rows)
    assert {r["dtype"] for r in rows} == {"torch.uint8"}, "the loader hands over uint8 images"
    assert {r["key"]: tuple(r["rgb"]) for r in rows} == expected, "pixels survive the round trip"


def test_standard_environment_reaches_the_endpoint(s3_server, monkeypatch: pytest.MonkeyPatch):
    """No ``endpoint_url`` in code or storage options: botocore reads ``AWS_ENDPOINT_URL`` itself,
    and the S3-specific ``AWS_ENDPOINT_URL_S3`` outranks it."""
    io.atomic_write_bytes(s3_server.url("env/probe.bin"), b"via AWS_ENDPOINT_URL")
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key="env/probe.bin")["Body"].read() \
        == b"via AWS_ENDPOINT_URL"

    import s3fs

    # The generic variable now names a closed port (any request there would fail), the
    # service-specific one the server.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    assert io.read_bytes(s3_server.url("env/probe.bin")) == b"via AWS_ENDPOINT_URL"


# ----------------------------------------------------------------------------- io primitives


def test_atomic_write_json_and_read_json(s3_server):
    url = s3_server.url("run/state.json")
    io.atomic_write_json(url, {"step": 1, "files": ["a", "b"]})
    assert io.read_json(url) == {"step": 1, "files": ["a", "b"]}
    raw = s3_server.client().get_object(Bucket=s3_server.bucket, Key="run/state.json")["Body"].read()
    assert json.loads(raw) == {"step": 1, "files": ["a", "b"]}

    io.atomic_write_json(url, {"step": 2})  # a replacement is read back, not a cached old copy
    assert io.read_json(url) == {"step": 2}
    assert list(objects(s3_server, "run")) == ["state.json"], "no temporary objects left behind"


def test_list_fresh_sees_objects_written_by_another_client(s3_server):
    url = s3_server.url("run/checkpoints")
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="run/config.json", Body=b"{}")
    fs, path = io.fs_for(url)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path.rsplit("/", 1)[0])] == ["config.json"]  # parent cached
    # The poller looks before anything exists, as a watcher started with the trainer does.
    assert io.list_fresh(url) == []
    client.put_object(Bucket=s3_server.bucket, Key="run/checkpoints/step-000100/commit.json", Body=b"{}")
    assert io.list_fresh(url) == ["step-000100"]

    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == ["step-000100"]  # now in s3fs's listing cache
    client.put_object(Bucket=s3_server.bucket, Key="run/checkpoints/step-000200/commit.json", Body=b"{}")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == ["step-000100"], \
        "s3fs serves this listing from its cache; list_fresh must not"
    assert io.list_fresh(url) == ["step-000100", "step-000200"]

    client.put_object(Bucket=s3_server.bucket, Key="run/checkpoints/latest.txt", Body=b"200")
    assert io.list_fresh(url) == ["latest.txt", "step-000100", "step-000200"]


def test_exists_and_remove(s3_server):
    url = s3_server.url("a/b/object.bin")
    assert not io.exists(url)
    io.atomic_write_bytes(url, b"payload")
    assert io.exists(url)
    assert io.exists(s3_server.url("a/b")), "a prefix with objects under it exists"
    assert io.sha256_url(url) == (hashlib.sha256(b"payload").hexdigest(), 7)

    io.remove(url)
    assert not io.exists(url)
    assert objects(s3_server, "a") == {}, "removed on the server, not only in a cache"
    io.remove(url)  # removing what is gone is not an error


def test_atomic_upload_of_a_large_shard_goes_multipart(s3_server, tmp_path: Path):
    """Shards of the default size (1 GiB) are uploaded in parts; the object must be whole."""
    big = tmp_path / "big.tar"
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    with open(big, "wb") as f:
        for i in range(101):  # s3fs goes multipart from 2 x 50 MiB
            f.write(i.to_bytes(4, "big") + block[4:])
    with open(big, "rb") as f:
        local = io.sha256_stream(f)
    io.atomic_upload(big, s3_server.url("ds/train-000000.tar"))
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="ds/train-000000.tar")
    assert head["ETag"].strip('"').endswith("-3"), "three parts: a multipart upload"
    assert io.sha256_url(s3_server.url("ds/train-000000.tar")) == local
    assert not s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads"), \
        "no unfinished upload left behind"


def test_makedirs_never_creates_a_bucket(s3_server):
    io.makedirs(s3_server.url("some/prefix"))  # a prefix in an existing bucket: nothing to do
    assert objects(s3_server, "some") == {}
    missing = f"{s3_server.bucket}-typo"
    io.makedirs(f"s3://{missing}/prefix")
    assert missing not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    with pytest.raises(FileNotFoundError):
        io.atomic_write_bytes(f"s3://{missing}/prefix/x", b"")


# ----------------------------------------------------------------------------- resume and failures


def test_rewrite_resumes_and_is_byte_identical(s3_server, tmp_path: Path):
    make_folder_dataset(tmp_path / "photos")
    out = s3_server.url("ds")
    first = shard_write(tmp_path / "photos", out, "--workers", "1")
    assert first.returncode == 0, explain(first)
    before = objects(s3_server, "ds")
    manifest_before = io.read_json(s3_server.url("ds/manifest.json"))
    shards = [s["name"] for s in manifest_before["splits"]["train"]["shards"]]
    assert len(shards) == 4

    # Interrupted after three shards: the last shard and its journal entry never got written.
    client = s3_server.client()
    for key in ("ds/train-000003.tar", "ds/_journal/train-000003.tar.json", "ds/manifest.json"):
        client.delete_object(Bucket=s3_server.bucket, Key=key)

    second = shard_write(tmp_path / "photos", out, "--workers", "1")
    assert second.returncode == 0, explain(second)
    assert "train: 3 shards already complete, resuming at sample 9" in second.stderr, explain(second)
    after = objects(s3_server, "ds")
    for name in shards[:3]:
        assert (after[name]["LastModified"], after[name]["ETag"]) == \
            (before[name]["LastModified"], before[name]["ETag"]), f"{name} was uploaded again"
    assert after[shards[3]]["LastModified"] > before[shards[3]]["LastModified"]

    manifest_after = io.read_json(s3_server.url("ds/manifest.json"))
    assert manifest_after["splits"]["train"]["shards"] == manifest_before["splits"]["train"]["shards"]
    for shard in manifest_after["splits"]["train"]["shards"]:
        assert object_sha256(s3_server, f"ds/{shard['name']}") == shard["sha256"]

    third = shard_write(tmp_path / "photos", out, "--workers", "1")  # nothing left to do
    assert third.returncode == 0, explain(third)
    assert "train: 4 shards already complete, resuming at sample 11" in third.stderr, explain(third)
    assert {k: v["ETag"] for k, v in objects(s3_server, "ds").items() if k.endswith(".tar")} == \
        {k: v["ETag"] for k, v in after.items() if k.endswith(".tar")}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    return [line for line in proc.stderr.splitlines() if "error" in line.lower()]


def test_write_to_missing_bucket_fails_in_one_line(s3_server, tmp_path: Path):
    make_folder_dataset(tmp_path / "photos", count=2)
    missing = f"{s3_server.bucket}-missing"
    proc = shard_write(tmp_path / "photos", f"s3://{missing}/ds", "--workers", "1")
    assert error_lines(proc) == [
        f"gan-shard: error: cannot write to s3://{missing}/ds: The specified bucket does not exist"], explain(proc)
    # A typo in the bucket name must not create a new bucket.
    assert missing not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


def test_write_to_read_only_bucket_fails_in_one_line(s3_server, tmp_path: Path):
    make_folder_dataset(tmp_path / "photos", count=2)
    with s3_server.read_only_env() as env:
        proc = shard_write(tmp_path / "photos", s3_server.url("ds"), "--workers", "1", env=env)
    assert error_lines(proc) == [f"gan-shard: error: cannot write to {s3_server.url('ds')}: Access Denied"], \
        explain(proc)
    assert objects(s3_server, "ds") == {}
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_write_to_unreachable_endpoint_fails_in_one_line(s3_server, tmp_path: Path):
    make_folder_dataset(tmp_path / "photos", count=2)
    with socket.socket() as closed:
        # Bound but not listening: connections are refused, and no other process can take the port.
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        proc = shard_write(tmp_path / "photos", s3_server.url("ds"), "--workers", "1",
                           env={"AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"})
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"gan-shard: error: cannot write to {s3_server.url('ds')}: "
                                                   f"Could not connect to the endpoint URL"), explain(proc)


# ----------------------------------------------------------------------------- injected store faults


def test_throttling_and_connection_resets_are_retried_to_the_identical_result(s3_server, tmp_path: Path):
    """Through a proxy that answers every 5th request with 503 SlowDown or a connection reset, in
    turn: the shards written and the samples streamed equal those of a fault-free run (T13)."""
    from s3_fault_proxy import FaultProxy

    expected = make_folder_dataset(tmp_path / "photos")
    clean = shard_write(tmp_path / "photos", s3_server.url("clean"), "--workers", "2")
    assert clean.returncode == 0, explain(clean)
    with FaultProxy(s3_server.endpoint, every=5) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint}
        faulty = shard_write(tmp_path / "photos", s3_server.url("faulty"), "--workers", "2", env=env)
        assert faulty.returncode == 0, explain(faulty)
        rows = run_ranks(s3_server.url("faulty"), world_size=2, env=env)
        assert proxy.throttled >= 2 and proxy.resets >= 2, vars(proxy)

    def shards(prefix: str) -> list[tuple[str, str, int]]:
        m = json.loads(s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/manifest.json")["Body"]
                       .read())
        return [(s["name"], s["sha256"], s["samples"]) for s in m["splits"]["train"]["shards"]]

    assert shards("faulty") == shards("clean")
    for name, sha, _ in shards("faulty"):
        assert object_sha256(s3_server, f"faulty/{name}") == sha
    assert {r["key"]: tuple(r["rgb"]) for r in rows} == expected and all(r["bad"] == 0 for r in rows)


def test_a_store_that_denies_everything_fails_fast_in_one_line(s3_server, tmp_path: Path):
    from s3_fault_proxy import FaultProxy

    make_folder_dataset(tmp_path / "photos", count=2)
    with FaultProxy(s3_server.endpoint, deny=True) as proxy:
        proc = shard_write(tmp_path / "photos", s3_server.url("ds"), "--workers", "1",
                           env={"AWS_ENDPOINT_URL": proxy.endpoint})
        asked = proxy.requests
    assert error_lines(proc) == [f"gan-shard: error: cannot write to {s3_server.url('ds')}: Access Denied"], \
        explain(proc)
    assert asked <= 3, asked  # a 403 is an answer, not a fault to retry


def test_a_writer_killed_mid_multipart_upload_leaves_nothing_visible_and_its_rewrite_no_orphan(s3_server,
                                                                                              tmp_path: Path):
    """SIGKILL while the parts of a 101 MiB shard are in flight: no object appears; the upload the
    killed writer started is aborted when the key is written again (a resumed writer's rewrite)."""
    from s3_fault_proxy import FaultProxy

    big = tmp_path / "big.tar"
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    with open(big, "wb") as f:
        for i in range(101):
            f.write(i.to_bytes(4, "big") + block[4:])
    url = s3_server.url("ds/train-000000.tar")
    script = f"from pipeline import io; io.atomic_upload({str(big)!r}, {url!r})"
    with FaultProxy(s3_server.endpoint, hold_parts=True) as proxy:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": proxy.endpoint})
        assert proxy.part_seen.wait(PROCESS_TIMEOUT_SEC), proc.communicate(timeout=5)
        proc.kill()
        proc.communicate(timeout=30)
    client = s3_server.client()
    assert objects(s3_server, "ds") == {}, "nothing visible"
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", [])] == \
        ["ds/train-000000.tar"], "the killed writer's upload is unfinished"
    io.atomic_upload(big, url)
    with open(big, "rb") as f:
        assert io.sha256_url(url) == io.sha256_stream(f)
    assert not client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads"), "no orphaned upload"
