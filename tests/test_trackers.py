"""Experiment trackers beside TensorBoard (``run.trackers``): W&B and MLflow in their offline modes
get the scalars TensorBoard gets, the trainer's and the evaluator's, and a resumed run continues
the same tracker runs; a tracker that cannot start stops the run in one line before its first step."""

from __future__ import annotations

import pytest
from test_train import SMALL, explain, launch_cmd, read_scalars, run

from pipeline.config import ConfigError, load_config

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is not installed (the dev extra installs it)")
wandb = pytest.importorskip("wandb", reason="wandb is not installed (the dev extra installs it)")


def test_unknown_or_missing_trackers_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^run.trackers=tensorboardx: 'tensorboardx' is not one of: wandb, mlflow$"):
        load_config("pix2pix_demo", ["run.trackers=tensorboardx"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"the mlflow package is not installed \(pip install mlflow-skinny"):
        load_config("pix2pix_demo", ["run.trackers=wandb,mlflow"])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline into each run's directory, MLflow into a local store (its file store, allowed
    explicitly since MLflow 3 prefers a database)."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.tracking.MlflowClient(uri)


def same_points(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """The same steps, and the same values up to TensorBoard's float32."""
    a, b = sorted(a), sorted(b)
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)


def wandb_records(path) -> list[bytes]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header
    (CRC32C, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    import struct

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
    return out


def wandb_history(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Per key, the (step, value) pairs of the history records of every offline W&B run segment of
    the trainer (each segment continues the run of the same id), parsed with wandb's own protobuf."""
    import json

    from wandb.proto import wandb_internal_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    ident = {p.stem for p in logs}
    assert len(ident) == 2, ident  # one id for the trainer's segments, one for the evaluator
    for log in logs:
        for data in wandb_records(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    out.setdefault(key, []).append((int(items["_step"]), float(value)))
    return out


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    from pipeline.eval.standin import write_standin_inception

    return str(write_standin_inception(tmp_path_factory.mktemp("inception") / "inception-standin.pth"))


def test_trainer_and_evaluator_scalars_reach_wandb_and_mlflow_and_a_resume_continues(
        demo_shards, tmp_path, offline, inception):
    run_dir = tmp_path / "run"
    base = [f"data.url={demo_shards}", f"run.dir={run_dir}", "data.workers=0", "checkpoint.every_kimg=0.008",
            "run.trackers=wandb,mlflow", "run.project=gan-tests", *SMALL]
    r = run(launch_cmd(1, [*base, "train.total_kimg=0.016"]))
    assert r.returncode == 0, explain(r)
    r = run(launch_cmd(1, [*base, "train.total_kimg=0.032"]))
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    from test_eval import FAST_EVAL, evaluate

    r = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)

    board = read_scalars(run_dir)
    losses = sorted(k for k in board if k.startswith("Loss/"))
    assert losses and any(k.startswith("Metrics") for k in board), sorted(board)
    (experiment,) = [e for e in offline.search_experiments() if e.name == "gan-tests"]
    runs = {r.info.run_name: r for r in offline.search_runs([experiment.experiment_id])}
    assert set(runs) == {"run", "run-eval"}  # the second segment continued the first one's run
    train_run = runs["run"]
    assert train_run.data.params["model.family"] == "pix2pix" and train_run.data.params["train.total_kimg"] == "0.016"
    assert train_run.data.tags["changed.train.total_kimg"] == "0.016 -> 0.032"  # MLflow keeps a param's first value
    for tag in losses:
        logged = [(m.step, m.value) for m in offline.get_metric_history(train_run.info.run_id, tag)]
        assert same_points(logged, board[tag]), tag  # both segments, at the same steps
    assert max(s for s, _ in board[losses[0]]) > 16  # the resumed segment's points are there too
    evals = {m: [(x.step, x.value) for x in offline.get_metric_history(runs["run-eval"].info.run_id, m)]
             for m in runs["run-eval"].data.metrics}
    assert evals and all(same_points(points, board[tag]) for tag, points in evals.items()), evals

    history = wandb_history(run_dir)
    for tag in [*losses, *evals]:  # the trainer's run and the evaluator's
        assert same_points(history[tag], board[tag]), tag


def test_a_tracker_that_cannot_start_stops_the_run_before_its_first_step(demo_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses its file store then
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "data.workers=0",
                           "train.total_kimg=0.016", "run.trackers=mlflow", *SMALL]))
    assert r.returncode == 2, explain(r)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gan-train: error: run.trackers: mlflow did not start (") and "MLFLOW_TRACKING_URI" in last
    assert not list(run_dir.glob("checkpoints/step-*"))  # stopped before its first step
