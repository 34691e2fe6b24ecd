"""The asynchronous evaluator: agreement with torch-fidelity's own tool, independence from the
number of evaluator processes, exactly-once evaluation of what a concurrent 2-process training
commits, restarts, rotation, the sidecar, TensorBoard, and S3."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import SMALL, env, explain, free_port, launch_cmd, run

from pipeline.eval.standin import write_standin_inception
from pipeline.train import checkpoint as ckpt
from pipeline.train.stats import tensorboard_url

REPO = Path(__file__).resolve().parent.parent
EVALUATE = str(REPO / "launch" / "evaluate.py")
ACCEL_CPU2 = str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")
FAST_EVAL = ["--max-samples", "7", "--kid-subset-size", "4", "--kid-subsets", "10", "--batch-size", "4"]


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return str(write_standin_inception(tmp_path_factory.mktemp("inception") / "inception-standin.pth"))


@pytest.fixture(scope="module")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A tiny pix2pix run with snapshots at steps 2 and 4 (read-only: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.008", "data.workers=0", *SMALL]))
    assert r.returncode == 0, explain(r)
    return run_dir


@pytest.fixture(scope="module")
def evaluated_run(trained_run, inception, tmp_path_factory) -> Path:
    """``trained_run`` evaluated once by one evaluator process (read-only: tests copy it)."""
    run_dir = copy_run(trained_run, tmp_path_factory.mktemp("evaluated") / "run")
    r = evaluate(run_dir, "--once", "--inception-weights", inception, "--reference-cache", str(run_dir / "refcache"),
                 *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "eval", ignore_errors=True)
    return dst


def evaluate(run_dir: Path, *args: str, procs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, EVALUATE, "--run", str(run_dir), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCEL_CPU2,
               "--num_processes", str(procs), "--main_process_port", str(free_port()), EVALUATE,
               "--run", str(run_dir), *args]
    return run(cmd, timeout=timeout)


def result(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "eval" / f"step-{step:08d}.json").read_text())


# ---------------------------------------------------------------- numbers


def test_matches_torch_fidelity_command_line_tool(trained_run, inception, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    r = evaluate(run_dir, "--once", "--step", "4", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    ours = result(run_dir, 4)
    assert ours["protocol"]["num_gen"] == ours["protocol"]["num_ref"] == 7
    # The same generated and reference images, written as PNGs, through `fidelity` itself.
    from pipeline.config import from_dict
    from pipeline.data.manifest import load_manifest
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment
    from pipeline.eval.metrics import to_uint8
    from pipeline.families import get_family
    from pipeline.train.family import DataInfo

    record = ckpt.verify(str(run_dir / "snapshots" / "step-00000004"))
    cfg = from_dict(record["config"])
    family, m = get_family(cfg.model.family), load_manifest(cfg.data.url)
    info = DataInfo(m.task, m.num_classes, tuple(m.fields))
    G = family.build(cfg, info)["G"]
    G.load_state_dict(ckpt.load_tensors(ckpt.member(str(run_dir / "snapshots" / "step-00000004"), record, "G_ema.pt")))
    G.eval()
    gen_dir, ref_dir = tmp_path / "gen", tmp_path / "ref"
    gen_dir.mkdir()
    ref_dir.mkdir()
    fields = family.streams(cfg, info, "val")[0].fields
    stream = make_stream(cfg.data.url, cfg.data.val_split, train=False, fields=fields,
                         augment=Augment(cfg.data.load_size, cfg.data.crop_size, False))
    import torchvision

    for i, sample in enumerate(stream):
        if i == 7:
            break
        b = family.prepare({"data": torch.utils.data.default_collate([sample])}, torch.device("cpu"), cfg, info)
        with torch.no_grad():
            fake = family.evaluations(cfg, info, "val")[0].generate({"G": G}, b).clamp(-1, 1)
        torchvision.io.write_png(to_uint8(fake)[0], str(gen_dir / f"{i:03d}.png"))
        torchvision.io.write_png(to_uint8(b["image"])[0], str(ref_dir / f"{i:03d}.png"))
    cli = run([str(Path(sys.executable).parent / "fidelity"), "--fid", "--kid", "--kid-subset-size", "4",
               "--kid-subsets", "10", "--input1", str(gen_dir), "--input2", str(ref_dir), "--cpu",
               "--feature-extractor-weights-path", inception, "--batch-size", "4", "--rng-seed", "0"], timeout=300)
    assert cli.returncode == 0, explain(cli)
    text = cli.stdout + cli.stderr
    fid = float(re.search(r"frechet_inception_distance: ([0-9.eE+-]+)", text)[1])
    kid = float(re.search(r"kernel_inception_distance_mean: ([0-9.eE+-]+)", text)[1])
    assert ours["metrics"]["fid"] == pytest.approx(fid, rel=1e-5, abs=1e-6)
    assert ours["metrics"]["kid"] == pytest.approx(kid, rel=1e-5, abs=1e-7)


@pytest.mark.multiprocess
def test_one_and_two_evaluator_processes_agree(trained_run, evaluated_run, inception, tmp_path):
    two = copy_run(trained_run, tmp_path / "two")
    r = evaluate(two, "--once", "--step", "4", "--inception-weights", inception, "--reference-cache",
                 str(two / "refcache"), *FAST_EVAL, procs=2)  # 7 samples: an odd count over 2
    assert r.returncode == 0, explain(r)
    a, b = result(evaluated_run, 4), result(two, 4)
    assert (a["evaluators"], b["evaluators"]) == (1, 2)
    assert a["protocol"]["num_gen"] == b["protocol"]["num_gen"] == 7
    for name in ("fid", "kid", "psnr", "ssim"):
        assert abs(a["metrics"][name] - b["metrics"][name]) <= 1e-6 * max(1.0, abs(a["metrics"][name])), name


def test_ms_ssim_diversity_pairs_fixed_latents_and_is_one_for_identical_images():
    from pipeline.eval.paired import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_weights
    from pipeline.eval.watcher import Diversity

    assert ms_ssim_weights(256, 256) == pytest.approx(MS_SSIM_WEIGHTS)  # five scales fit: the standard ones
    w64 = ms_ssim_weights(64, 64)
    assert len(w64) == 3 and sum(w64) == pytest.approx(1) and len(ms_ssim_weights(32, 48)) == 2
    torch.manual_seed(0)
    images = torch.rand(9, 3, 32, 32) * 2 - 1
    same = Diversity(10)
    same.add(0, torch.cat([images[:1]] * 6))
    total, count = same.sums("d")["d"]
    assert count == 3 and total / count == pytest.approx(1.0)  # identical images: MS-SSIM 1
    # Batches of 3 from index 0, and a cap of 4 pairs: pairs (0, 1), (2, 3) across a batch edge, (4, 5), (6, 7).
    div = Diversity(4)
    for start in range(0, 9, 3):
        div.add(start, images[start:start + 3])
    total, count = div.sums("d")["d"]
    direct = ms_ssim(images[0:8:2], images[1:8:2], weights=ms_ssim_weights(32, 32))
    assert count == 4 and total == pytest.approx(float(direct.double().sum()), rel=1e-6)
    # A rank's share starts at an even index: the same pairs, whichever evaluator computes them.
    late = Diversity(4)
    late.add(4, images[4:8])
    assert late.sums("d")["d"][1] == 2
    # Reals: seeded random pairs picked across batches of any size, without copying the rest.
    from pipeline.eval.watcher import real_diversity

    reals = (images[:9] * 127.5 + 127.5).round().to(torch.uint8)
    total, count = real_diversity([(None, reals[:5]), (None, reals[5:7]), (None, reals[7:])], 3, 0)[
        "diversity_msssim_real"]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))[:6]
    unit = reals.float() / 127.5 - 1
    direct = ms_ssim(unit[order[0::2]], unit[order[1::2]], weights=ms_ssim_weights(32, 32))
    assert count == 3 and total == pytest.approx(float(direct.double().sum()), rel=1e-6)


@pytest.mark.multiprocess
def test_unconditional_runs_report_diversity_the_same_with_one_or_two_evaluators(demo_shards, inception, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "data.workers=0", "train.batch_size=4", "model.ngf=8",
                           "model.ndf=8", "model.image_size=32", "data.load_size=64,32", "data.crop_size=32,32",
                           "train.progress=false", "model.n_critic=1"], config="wgangp_demo"))
    assert r.returncode == 0, explain(r)
    two = copy_run(run_dir, tmp_path / "two")
    args = ["--once", "--inception-weights", inception, "--num-samples", "13", "--diversity-pairs", "5",
            "--kid-subset-size", "4", "--kid-subsets", "10", "--batch-size", "3"]
    for where, procs in ((run_dir, 1), (two, 2)):
        r = evaluate(where, *args, "--reference-cache", str(where / "refcache"), procs=procs)
        assert r.returncode == 0, explain(r)
    a, b = result(run_dir, 2), result(two, 2)
    assert 0 < a["metrics"]["diversity_msssim"] < 1 and 0 < a["metrics"]["diversity_msssim_real"] < 1
    assert a["metrics"]["diversity_msssim"] == pytest.approx(b["metrics"]["diversity_msssim"], rel=1e-9, abs=1e-12)
    d = a["protocol"]["diversity"]
    assert (d["pairs"], len(d["weights"])) == (5, 2) and b["protocol"]["diversity"]["pairs"] == 5


# ---------------------------------------------------------------- watching a run


@pytest.mark.multiprocess
def test_follows_a_concurrent_two_process_training_and_evaluates_each_snapshot_once(demo_shards, inception,
                                                                                    tmp_path):
    run_dir = tmp_path / "run"
    train = subprocess.Popen(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.024",
                                            "checkpoint.every_kimg=0.008", "checkpoint.keep_last=5",
                                            "data.workers=1", *SMALL]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                             start_new_session=True)
    while not (run_dir / "config.json").exists():
        assert train.poll() is None, train.communicate()
        time.sleep(0.1)
    # Present from the start and never committed: must never be evaluated.
    (run_dir / "snapshots" / "step-99999999").mkdir(parents=True)
    follower = evaluate(run_dir, "--inception-weights", inception, "--poll-sec", "0.5", "--timeout", "400",
                        *FAST_EVAL, timeout=500)
    out, err = train.communicate(timeout=300)
    assert train.returncode == 0, err[-4000:]
    assert follower.returncode == 0, explain(follower)
    committed = ckpt.list_steps(str(run_dir), ckpt.SNAPSHOTS)
    assert 99999999 in committed
    evaluated = [json.loads(line)["step"] for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(evaluated) == [2, 4, 6] and len(set(evaluated)) == len(evaluated)
    assert not (run_dir / "eval" / "step-99999999.json").exists()
    assert (run_dir / "eval" / "FINISHED.json").exists()
    assert json.loads((run_dir / "eval" / "best.json").read_text())["metric"] == "fid"
    # TensorBoard: the evaluator's scalars at each snapshot's images-seen step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_url(str(run_dir)))
    acc.Reload()
    # The stand-in's FID/KID have tags of their own; the paired metrics do not depend on it.
    assert [e.step for e in acc.Scalars("Metrics_standin/fid")] == [8, 16, 24]
    assert [e.step for e in acc.Scalars("Metrics/psnr")] == [8, 16, 24]
    assert not {"Metrics/fid", "Metrics/kid"} & set(acc.Tags()["scalars"])
    assert "Eval/samples" in acc.Tags()["images"]
    # A restarted evaluator redoes nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "eval").glob("step-*.json")}
    again = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert again.returncode == 0, explain(again)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "eval").glob("step-*.json")} == stamps


def test_killed_evaluator_resumes_without_redoing_and_skips_rotated_snapshots(trained_run, inception, tmp_path,
                                                                              caplog):
    run_dir = copy_run(trained_run, tmp_path / "run")
    r = evaluate(run_dir, "--once", "--step", "2", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    first = (run_dir / "eval" / "step-00000002.json").stat().st_mtime_ns
    # A half-done evaluation of step 4 left nothing behind (results are written atomically, last).
    r = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    assert (run_dir / "eval" / "step-00000002.json").stat().st_mtime_ns == first
    assert (run_dir / "eval" / "step-00000004.json").exists()
    # Rotation: a snapshot deleted under the evaluator is skipped with a log line.
    from pipeline.eval.watcher import EvalOptions, Evaluator

    evaluator = Evaluator(EvalOptions(run=str(run_dir), inception_weights=inception, max_samples=3))
    shutil.rmtree(run_dir / "snapshots" / "step-00000002")
    assert evaluator.evaluate(2) is None
    assert "is gone or incomplete" in caplog.text


def test_an_evaluator_stopped_between_its_writes_evaluates_that_snapshot_again_exactly_once(
        trained_run, inception, tmp_path, monkeypatch):
    # The step's result file is written last: stopped at any write before it (after the metrics
    # line: before TensorBoard for step 2, before best.json for step 4), the evaluator finds the
    # snapshot still pending and redoes it, and no metrics line is repeated.
    from dataclasses import replace

    from pipeline.eval.watcher import EvalOptions, Evaluator, pending_steps, run_evaluator

    run_dir = copy_run(trained_run, tmp_path / "run")
    opts = EvalOptions(run=str(run_dir), inception_weights=inception, max_samples=7, kid_subset_size=4,
                       kid_subsets=10, batch_size=4)

    class Killed(BaseException):
        pass

    def killed(self, *args):
        raise Killed

    for step, killed_at in ((2, "_write_events"), (4, "_update_best")):
        monkeypatch.setattr(Evaluator, killed_at, killed)
        with pytest.raises(Killed):
            Evaluator(opts).evaluate(step)
        monkeypatch.undo()
        assert not (run_dir / "eval" / f"step-{step:08d}.json").exists()
    assert [json.loads(line)["step"] for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()] \
        == [2, 4]
    assert not (run_dir / "eval" / "best.json").exists()
    assert pending_steps(opts) == [2, 4]
    assert run_evaluator(replace(opts, once=True)) == 0
    lines = [json.loads(line) for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert [result(run_dir, s)["metrics"] for s in (2, 4)] == [line["metrics"] for line in lines]
    assert json.loads((run_dir / "eval" / "best.json").read_text())["step"] in (2, 4)
    assert pending_steps(opts) == []


def test_a_snapshot_that_cannot_be_loaded_is_recorded_and_the_next_one_evaluated(trained_run, inception, tmp_path):
    import hashlib
    import pickle

    run_dir = copy_run(trained_run, tmp_path / "run")
    snap = run_dir / "snapshots" / "step-00000002"
    data = pickle.dumps({"weight": print})  # not weights: refused by the weights-only loader
    record = json.loads((snap / ckpt.COMMIT).read_text())
    Path(ckpt.member(str(snap), record, "G_ema.pt")).write_bytes(data)
    record["files"]["G_ema.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (snap / ckpt.COMMIT).write_text(json.dumps(record))
    r = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    assert "G_ema.pt holds more than tensors" in result(run_dir, 2)["invalid"]
    assert result(run_dir, 4)["metrics"]["fid"] > 0
    lines = (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4]
    again = evaluate(run_dir, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert again.returncode == 0 and "cannot be evaluated" not in again.stderr, explain(again)  # not retried


def test_a_follower_stops_once_its_trainer_is_gone_after_evaluating_what_was_committed(trained_run, inception,
                                                                                      tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    (run_dir / "DONE.json").unlink()  # as if the trainer had been killed before the end
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    r = evaluate(run_dir, "--follow-pid", str(gone.pid), "--poll-sec", "0.2", "--inception-weights", inception,
                 *FAST_EVAL, timeout=300)
    assert r.returncode == 0, explain(r)
    assert "is gone without finishing the run" in r.stderr
    assert [json.loads(line)["step"] for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()] \
        == [2, 4]
    assert not (run_dir / "eval" / "FINISHED.json").exists()



def test_a_sigterm_while_a_finished_evaluator_exits_leaves_exit_code_0(trained_run, inception, tmp_path):
    # SLURM's SIGTERM as the job ends can meet an evaluator that has finished and is exiting,
    # when Python has given the default action (death) back to the signals it handled.
    run_dir = copy_run(trained_run, tmp_path / "run")
    proc = subprocess.Popen([sys.executable, EVALUATE, "--run", str(run_dir), "--poll-sec", "0.2",
                             "--inception-weights", inception, *FAST_EVAL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    finished, sent = run_dir / "eval" / "FINISHED.json", 0
    try:
        deadline = time.time() + 300
        while not finished.exists():
            assert proc.poll() is None and time.time() < deadline, f"exit {proc.returncode} before FINISHED.json"
            time.sleep(0.01)
        while proc.poll() is None:  # notices until the process has gone
            proc.send_signal(signal.SIGTERM)
            sent += 1
            time.sleep(0.002)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode} after {sent} SIGTERMs"
    assert sent > 0


def test_missing_inception_weights_says_how_to_get_them(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "run")
    r = evaluate(run_dir, "--once", "--inception-weights", str(tmp_path / "nope.pth"))
    assert r.returncode == 2
    assert "nope.pth" in r.stderr and "weights-inception-2015-12-05-6726825d.pth" in r.stderr
    assert "--inception-weights PATH" in r.stderr


def test_training_sidecar_evaluates_and_writes_to_tensorboard(demo_shards, inception, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "data.workers=0", "eval.sidecar=true",
                           f"eval.inception_weights={inception}", "eval.max_samples=4", "eval.kid_subset_size=4",
                           "eval.poll_sec=0.5", *SMALL]))
    assert r.returncode == 0, explain(r)
    assert "evaluation sidecar started" in r.stdout
    deadline = time.time() + 240
    while not (run_dir / "eval" / "FINISHED.json").exists():
        assert time.time() < deadline, (run_dir / "eval" / "sidecar.log").read_text()[-3000:]
        time.sleep(0.5)
    assert result(run_dir, 2)["metrics"]["fid"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_url(str(run_dir)))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Metrics_standin/fid")] == [8]


# ---------------------------------------------------------------- object storage


@pytest.mark.s3
def test_trains_and_evaluates_a_run_on_s3(s3_server, demo_shards, inception):
    url = s3_server.url("runs/p2p")
    common = [f"data.url={demo_shards}", f"run.dir={url}", "checkpoint.every_kimg=0.008", "data.workers=0", *SMALL]
    r = run(launch_cmd(1, [*common, "train.total_kimg=0.008"]))
    assert r.returncode == 0, explain(r)
    r = run(launch_cmd(1, [*common, "train.total_kimg=0.016"]))  # resume from the bucket
    assert r.returncode == 0 and "resumed from s3://" in r.stdout + r.stderr, explain(r)
    assert ckpt.list_steps(url) == [2, 4]
    r = evaluate(url, "--once", "--inception-weights", inception, *FAST_EVAL)
    assert r.returncode == 0, explain(r)
    from pipeline import io

    lines = io.read_bytes(f"{url}/eval/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    assert any(name.endswith(".eval") for name in io.list_fresh(tensorboard_url(url)))


def test_the_summary_is_a_table_of_every_snapshot_and_the_best(trained_run, evaluated_run, tmp_path):
    from PIL import Image

    from pipeline.eval.summary import plot, summary

    assert summary(str(trained_run)) == f"no evaluation results yet in {trained_run}/eval"
    assert plot(str(trained_run), str(tmp_path / "none.png")) == [] and not (tmp_path / "none.png").exists()
    # The plot: one 320-pixel panel per metric (KID's spread drawn as a band, not a panel of its own).
    assert plot(str(evaluated_run), str(tmp_path / "metrics.png")) == ["fid", "kid", "psnr", "ssim"]
    with Image.open(tmp_path / "metrics.png") as png:
        assert png.format == "PNG" and png.size == (4 * 320, 280)
        assert len(png.convert("RGB").getcolors(1 << 16) or []) > 50  # lines, text and a band, not a blank
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run, run_dir)
    lines = summary(str(run_dir)).splitlines()
    # The stand-in's numbers are starred, and the star explained.
    assert lines[0].split() == ["step", "kimg", "fid*", "kid*", "kid_std*", "psnr", "ssim"]
    rows = [line.split() for line in lines[1:3]]
    assert [(row[0], row[1]) for row in rows] == [("2", "0.008"), ("4", "0.016")]
    fids = [result(run_dir, s)["metrics"]["fid"] for s in (2, 4)]
    assert [float(row[2]) for row in rows] == pytest.approx(fids, rel=1e-3)
    best = min((2, 4), key=lambda s: result(run_dir, s)["metrics"]["fid"])
    assert lines[3].startswith("best fid*: ") and f"at step {best} " in lines[3]
    assert lines[4].startswith("* from an UNTRAINED stand-in Inception") and len(lines) == 5
    # Numbers from real weights (as the records say) are plain.
    jsonl = run_dir / "eval" / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({**json.loads(line), "standin": False}) + "\n"
                             for line in jsonl.read_text().splitlines()))
    lines = summary(str(run_dir)).splitlines()
    assert lines[0].split()[2:4] == ["fid", "kid"] and lines[3].startswith("best fid: ") and len(lines) == 4


def test_only_a_stand_in_inception_is_labelled_as_one(inception, tmp_path):
    from pipeline.eval.metrics import STANDIN_MARK, InceptionFeatures
    from pipeline.eval.watcher import metric_group

    assert InceptionFeatures(inception).standin
    state = torch.load(inception, weights_only=True)
    state[STANDIN_MARK[0]] = torch.tensor(0)  # any file standin.py did not make
    torch.save(state, tmp_path / "real-layout.pth")
    assert not InceptionFeatures(str(tmp_path / "real-layout.pth")).standin
    assert [metric_group(n, True) for n in ("fid", "kid_std", "fid_AtoB", "psnr", "lpips")] == \
        ["Metrics_standin"] * 3 + ["Metrics"] * 2
    assert {metric_group(n, False) for n in ("fid", "kid", "psnr")} == {"Metrics"}


def test_every_best_metric_choice_has_a_direction_and_the_cli_offers_the_same():
    from pipeline.config import EvalConfig, field_choices
    from pipeline.eval.cli import build_parser
    from pipeline.eval.watcher import LOWER_IS_BETTER

    choices = field_choices(EvalConfig, "best_metric")
    assert set(choices) == set(LOWER_IS_BETTER) and "psnr_y" in choices
    assert next(a for a in build_parser()._actions if a.dest == "best_metric").choices == choices
