"""Shared test fixtures. One section per resource; keep each fixture self-contained so new
sections can be added without touching the others.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# One compute thread per test process, set before anything imports torch or numpy: the pytest-xdist
# workers already keep both cores busy, the training processes the tests start run with
# OMP_NUM_THREADS=1 as well, and more threads per process only contend (OpenMP waits spin).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ----------------------------------------------------------------------------- S3 (moto server)

# Fake credentials for the loopback server. The secret is distinctive so tests can assert it
# never shows up in logs, CLI output or manifests.
S3_ACCESS_KEY_ID = "gan-pipeline-test-key"
S3_SECRET_ACCESS_KEY = "gan-pipeline-test-secret-never-logged"
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A bucket on a real S3-compatible server (moto) on loopback, reached through the standard
    AWS environment variables, which are set while the test runs."""

    endpoint: str
    bucket: str
    access_key_id: str = S3_ACCESS_KEY_ID
    secret_access_key: str = S3_SECRET_ACCESS_KEY
    region: str = S3_REGION

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to reach this server (merge into ``os.environ``)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    @contextmanager
    def read_only_env(self) -> Iterator[dict[str, str]]:
        """The environment of a principal that may read this bucket but not write to it.

        moto checks credentials and IAM policies only while its auth switch is on, which is
        server-wide: it is on inside this block only.
        """
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=self.region,
                           aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)
        user = f"reader-{self.bucket}"
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"]}]}
        iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._set_auth("0")  # every request from now on is authenticated
        try:
            yield {**self.env(), "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                   "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        finally:
            self._set_auth("inf")

    def _set_auth(self, initial_no_auth_action_count: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                         data=initial_no_auth_action_count.encode(),
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def client(self):
        """A boto3 client: an independent second client, for checking what is really stored."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)


def _clear_fsspec_s3_cache() -> None:
    # fsspec caches filesystem instances by constructor arguments, and the endpoint taken from
    # the environment is not among them: a cached client would keep talking to an old server.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the whole session (starting it is the expensive part)."""
    from moto.server import ThreadedMotoServer

    # Port 0: the OS picks a free port at bind time, so there is no race with other processes.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    werkzeug_log = logging.getLogger("werkzeug")
    old_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one access-log line per request drowns failure output
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(old_level)


@pytest.fixture
def s3_server(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A fresh, empty bucket per test (tests never see each other's objects), with the standard
    AWS environment pointing at the server for the test's duration (restored afterwards)."""
    server = S3Server(endpoint=moto_endpoint, bucket=f"test-{uuid.uuid4().hex[:16]}")
    # A developer's own AWS setup (profiles, config files, a service-specific endpoint) must not
    # leak in: it could outrank the variables below.
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, os.devnull)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    server.client().create_bucket(Bucket=server.bucket)
    _clear_fsspec_s3_cache()
    yield server
    _clear_fsspec_s3_cache()


# ----------------------------------------------------------------------------- demo shards

@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """A small demo dataset (256x128 street scenes) written once per session; read-only for tests."""
    from pipeline.data.shards import WriteOptions, write_dataset
    from pipeline.data.sources import make_source

    out = tmp_path_factory.mktemp("demo-shards")
    source = make_source("demo", None, counts={"train": 48, "val": 8})
    write_dataset(source, str(out), ["train", "val"], WriteOptions(samples_per_shard=16, workers=1),
                  progress=False)
    return str(out)


@pytest.fixture(scope="session")
def vgg_weights(tmp_path_factory) -> str:
    """A seeded, randomly initialised VGG19 in torchvision's layout (feature layers up to relu5_4:
    all the perceptual losses read), standing in for the ImageNet weights nobody may download here."""
    import torch
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg19(weights=None).features[:36]
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="session")
def cityscapes_shards(tmp_path_factory) -> str:
    """A tiny Cityscapes tree with the real file naming (128x64), sharded by the CLI; read-only."""
    import subprocess
    import sys

    from test_pix2pixhd_train import cityscapes_tree

    root = tmp_path_factory.mktemp("cityscapes")
    cityscapes_tree(root, {"train": 6, "val": 2})
    out = tmp_path_factory.mktemp("cityscapes-shards")
    shard = Path(__file__).resolve().parent.parent / "launch" / "shard.py"
    r = subprocess.run([sys.executable, str(shard), "write", "cityscapes", "--root", str(root), "--out", str(out),
                        "--samples-per-shard", "2", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="session")
def unpaired_shards(tmp_path_factory) -> str:
    """Two small unpaired demo sets (64x32; A 24 + 6, B 20 + 5), sharded by the CLI; read-only."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("unpaired") / "shards"
    shard = Path(__file__).resolve().parent.parent / "launch" / "shard.py"
    r = subprocess.run([sys.executable, str(shard), "write", "demo_unpaired", "--out", str(out),
                        "--demo-size", "64x32", "--demo-count", "trainA=24", "--demo-count", "trainB=20",
                        "--demo-count", "testA=6", "--demo-count", "testB=5", "--samples-per-shard", "8",
                        "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


# ----------------------------------------------------------------------------- parallel runs (pytest-xdist)


def pytest_collection_modifyitems(config, items) -> None:
    """Under ``-n 2 --dist loadgroup`` every SLURM test would run on one worker, in order: they share
    one session-scoped cluster on loopback, which a second worker would start again beside it. (With
    pytest 9, xdist 3.8 does not apply groups: its suffix goes to ``Item._nodeid``, which pytest 9
    no longer reads. So the SLURM tests run in a step of their own, without ``-n``.)"""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
