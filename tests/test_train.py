"""The training engine end to end: real `accelerate launch` of 2 CPU processes, exact resume
after SIGKILL and SIGTERM, NaN guard, rollback, precision modes, TensorBoard read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.train import checkpoint as ckpt
from pipeline.train.cli import CONFIG_ERROR_PAUSE_S
from pipeline.train.stats import tensorboard_url

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
ACCEL_CPU2 = str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")

# A pix2pix small enough for CPU tests: unet_128 at ngf 8 on 128x128 crops, batch 4.
SMALL = ["model.ngf=8", "model.ndf=8", "data.crop_size=128,128", "train.batch_size=4",
         "train.progress=false", "train.log_every_kimg=0.008", "train.image_every_kimg=0.016",
         "train.num_images=2", "model.ema_kimg=0.01"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_cmd(procs: int, overrides: list[str], config: str = "pix2pix_demo") -> list[str]:
    if procs == 1:
        return [sys.executable, TRAIN, "--config", config, *overrides]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCEL_CPU2,
            "--main_process_port", str(free_port()), TRAIN, "--config", config, *overrides]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")
    return r


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def train_demo(config: str, shards: str, run_dir: Path, kimg: float, *overrides: str, timeout: float = 400) -> None:
    """Train ``config`` on ``shards`` for ``kimg`` on one process, one checkpoint at the end."""
    r = run(launch_cmd(1, [f"data.url={shards}", f"run.dir={run_dir}", f"train.total_kimg={kimg}",
                           f"checkpoint.every_kimg={kimg}", "data.workers=0", "train.progress=false",
                           "train.image_every_kimg=0", *overrides], config=config), timeout=timeout)
    assert r.returncode == 0, explain(r)


def split_batch(shards: str, cfg, split: str, fields: tuple[str, ...] = ("image",)) -> dict[str, torch.Tensor]:
    """Every sample of ``split`` as the evaluator reads it (the config's resize, centred crop),
    stacked per field as the loader collates them."""
    from pipeline.data.stream import make_stream
    from pipeline.data.transforms import Augment

    samples = list(make_stream(shards, split, train=False, fields=fields,
                               augment=Augment(cfg.data.load_size, cfg.data.crop_size, False)))
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in fields}


def final_states(run_dir: Path) -> dict[str, dict]:
    """The newest checkpoint's shared files (networks, EMA copies, optimizers), by name."""
    found = ckpt.latest(str(run_dir))
    assert found is not None, f"no committed checkpoint in {run_dir}"
    return {name.removesuffix(".pt"): ckpt.load_tensors(found.file(name)) for name in found.record["files"]
            if name.endswith(".pt") and "/" not in name and not name.startswith("rank-")}


def assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def kill_job_at_commit(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start ``cmd``, wait for ``step``'s checkpoint commit, then SIGKILL the launcher and every
    process under it, as an OOM killer or a node failure would."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    wait_for_commit(run_dir, step, proc)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.kill()
    proc.communicate(timeout=60)


def committed(step_dir: Path, name: str) -> Path:
    """Where the committed file ``name`` of a checkpoint or snapshot directory lies (inside its
    writer's directory)."""
    return Path(ckpt.member(str(step_dir), ckpt.read_record(str(step_dir)), name))


def committed_files(run_dir: Path) -> dict:
    """Every tensor file of the newest checkpoint, by name."""
    found = ckpt.latest(str(run_dir))
    return {name: ckpt.load_tensors(found.file(name)) for name in found.record["files"] if name != "state.json"}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_url(str(run_dir)), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} | {
        "__images__": acc.Tags()["images"]}


# ---------------------------------------------------------------- two real processes


@pytest.mark.multiprocess
def test_two_processes_train_commit_checkpoints_and_agree_on_weights(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.032",
                           "checkpoint.every_kimg=0.016", "data.workers=2", *SMALL]))
    assert r.returncode == 0, explain(r)
    steps = ckpt.list_steps(str(run_dir))
    assert steps == [4, 8]  # 32 images at batch 4, a checkpoint every 16 images
    found = ckpt.latest(str(run_dir))
    assert found.record["world_size"] == 2 and found.record["nimg"] == 32
    ranks = [ckpt.load_tensors(found.file(f"rank-{r:03d}.pt")) for r in (0, 1)]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]  # every rank holds the same G, D, G_ema
    assert set(ranks[0]["positions"]["data"]) == {"0", "1"} and set(ranks[1]["positions"]["data"]) == {"2", "3"}
    assert ckpt.latest(str(run_dir), ckpt.SNAPSHOTS).step == 8
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["world_size"] == 2 and run_info["versions"]["torch"] == torch.__version__
    assert json.loads((run_dir / "config.json").read_text())["train"]["total_kimg"] == 0.032
    scalars = read_scalars(run_dir)
    for tag in ("Loss/G_GAN", "Loss/G_L1", "Loss/D_real", "Loss/D_fake", "Progress/kimg", "Timing/sec_per_kimg",
                "Resources/peak_mem_gb", "Grad/G_norm", "Grad/D_norm", "Data/skipped_samples", "LR/G"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["Progress/kimg"]] == [8, 16, 24, 32]  # global step = images seen
    assert scalars["__images__"] == ["Images/val_input_output_target"]
    # The resolved config as text and as hyperparameters (TensorBoard's own reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_url(str(run_dir)))
    acc.Reload()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["train"]["total_kimg"] == 0.032
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    # It ends on one line saying where it got and where everything is.
    done = [line for line in r.stdout.splitlines() if line.startswith("gan-train: done at kimg 0.032 (step 8)")]
    assert len(done) == 1 and "0 steps and 0 bad samples skipped" in done[0] and str(run_dir) in done[0], explain(r)


def test_the_progress_bar_ends_where_the_run_ends():
    from pipeline.train.stats import end_nimg

    assert end_nimg(0, 100, 12) == 108  # the last step passes the total by part of a batch
    assert end_nimg(96, 100, 12) == 108 and end_nimg(0, 96, 12) == 96
    assert end_nimg(120, 100, 12) == 120  # resumed past a total since lowered: already there


@pytest.mark.multiprocess
def test_nan_on_one_rank_skips_the_update_on_all_ranks(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.024",
                           "checkpoint.every_kimg=0.024", "data.workers=1", "train.debug_nan_step=2",
                           "train.debug_nan_rank=1", *SMALL, "train.batch_per_device=1"]))  # 2 micro-steps
    assert r.returncode == 0, explain(r)
    assert "step 3 skipped on every rank" in r.stderr
    found = ckpt.latest(str(run_dir))
    ranks = [ckpt.load_tensors(found.file(f"rank-{r:03d}.pt")) for r in (0, 1)]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    states = final_states(run_dir)
    assert all(torch.isfinite(t).all() for t in states["G"].values() if t.is_floating_point())
    skipped = read_scalars(run_dir)["Train/skipped_steps"]
    assert skipped[-1][1] == 1


@pytest.mark.multiprocess
def test_a_rank_that_fails_ends_the_whole_job_promptly(demo_shards, tmp_path):
    # A truncated shard with no bad-sample budget: whichever rank reads it stops with the budget's
    # message. Before the fix, that rank then hung at exit joining its DataLoader worker (which
    # ignores SIGTERM), and the other rank waited on it in a collective until the time limit.
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    for tar in sorted(shards.glob("train-*.tar")):
        data = tar.read_bytes()
        tar.write_bytes(data[: len(data) // 3])
    t0 = time.monotonic()
    r = run(launch_cmd(2, [f"data.url={shards}", f"run.dir={tmp_path / 'run'}", "train.total_kimg=0.2",
                           "data.workers=1", "data.max_bad_samples=0", *SMALL]), timeout=150)
    assert r.returncode != 0, explain(r)
    assert "exceed the budget data.max_bad_samples=0" in r.stderr, explain(r)
    assert time.monotonic() - t0 < 120


# ---------------------------------------------------------------- exact resume


def wait_for_commit(run_dir: Path | str, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``step``'s checkpoint is committed in ``run_dir`` (a path or an fsspec URL)."""
    from pipeline import io

    deadline = time.time() + timeout
    url = ckpt.step_url(str(run_dir), ckpt.CHECKPOINTS, step)
    local = io.is_local(url)
    while not (Path(url, ckpt.COMMIT).exists() if local else ckpt.COMMIT in io.list_fresh(url)):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended before step {step} was committed:\n{out[-3000:]}\n{err[-5000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"step {step} was never committed")
        time.sleep(0.05 if local else 0.2)


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if TRAIN in " ".join(c.cmdline())]


@pytest.mark.multiprocess
# SIGKILL of a whole 2-process job is resumed bit for bit in the CycleGAN and SPADE tests and the
# launcher-only kill in test_faults; here the preemption path, with 2 loader workers per rank.
@pytest.mark.parametrize("how", ["SIGTERM"])
def test_interrupted_run_resumes_bit_identical(demo_shards, tmp_path, how):
    args = [f"data.url={demo_shards}", "train.total_kimg=0.064", "checkpoint.every_kimg=0.016",
            "checkpoint.keep_last=2", "data.workers=2", *SMALL]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", *args]))
    assert r.returncode == 0, explain(r)

    cmd = launch_cmd(2, [f"run.dir={b_dir}", *args])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    wait_for_commit(b_dir, 4, proc)
    if how == "SIGKILL":
        # The launcher and every rank (torchrun puts ranks in sessions of their own), no cleanup.
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        proc.communicate(timeout=60)
    else:
        for worker in workers_of(proc):  # as SLURM does: every task gets the signal
            worker.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert "preempted: saved at kimg" in out + err and "exit code 75" in out + err, err[-4000:]
        marker = json.loads((b_dir / "PREEMPTED.json").read_text())
        assert ckpt.latest(str(b_dir)).step == marker["step"]
        assert marker["nimg"] < 64
    assert ckpt.latest(str(b_dir)).step < 16  # really interrupted before the end

    r = run(cmd)  # resume = the same command again
    assert r.returncode == 0, explain(r)
    assert "resumed from" in r.stdout + r.stderr
    assert not (b_dir / "PREEMPTED.json").exists()
    a, b = final_states(a_dir), final_states(b_dir)
    assert_identical(a, b)


# ---------------------------------------------------------------- single process paths


def test_half_written_and_corrupt_checkpoints_are_never_loaded(demo_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    base = [f"data.url={demo_shards}", f"run.dir={run_dir}", "checkpoint.every_kimg=0.008",
            "checkpoint.keep_last=3", "data.workers=0", *SMALL]
    r = run(launch_cmd(1, [*base, "train.total_kimg=0.024"]))
    assert r.returncode == 0, explain(r)
    assert ckpt.list_steps(str(run_dir)) == [2, 4, 6]
    # A checkpoint killed mid-write: files but no commit record.
    partial = run_dir / "checkpoints" / "step-00000007"
    partial.mkdir()
    (partial / "G.pt").write_bytes(b"half")
    # A committed checkpoint whose weights were damaged afterwards.
    g = committed(run_dir / "checkpoints" / "step-00000006", "G.pt")
    g.write_bytes(g.read_bytes()[:-10] + b"0123456789")
    found = ckpt.latest(str(run_dir))
    assert found.step == 4
    assert "step-00000007 is unusable: not committed" in caplog.text
    assert "step-00000006 is unusable: G.pt does not match its checksum" in caplog.text
    r = run(launch_cmd(1, [*base, "train.total_kimg=0.032"]))
    assert r.returncode == 0, explain(r)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000004'}" in r.stdout + r.stderr
    assert "step-00000006 is unusable" in r.stderr


def test_repeated_divergence_rolls_back_then_stops_with_its_exit_code(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.2",
                           "checkpoint.every_kimg=0.008", "data.workers=0", "train.debug_nan_step=3",
                           "train.debug_nan_count=1000", "train.max_bad_steps=2", "train.max_rollbacks=1", *SMALL]))
    assert r.returncode == 3, explain(r)
    out = r.stdout + r.stderr
    assert "rolled back to" in out and "(rollback 1 of 1)" in out
    assert "diverged: 3 consecutive non-finite steps and 1 rollbacks" in out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_logs(demo_shards, tmp_path, precision):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.016", "data.workers=0", f"train.precision={precision}", *SMALL]))
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(run_dir)
    assert all(v == v for _, v in scalars["Loss/G_L1"])  # finite, logged
    found = ckpt.latest(str(run_dir))
    names = set(found.record["files"])
    if precision == "fp16":
        # One scaler per network, saved separately, each with its own state.
        assert {"scaler_G.pt", "scaler_D.pt"} <= names
        sg, sd = (ckpt.load_tensors(found.file(f"scaler_{k}.pt")) for k in "GD")
        assert "scale" in sg and "scale" in sd
    else:
        assert not any(n.startswith("scaler_") for n in names)


def test_wgan_gp_trains_with_n_critic_and_logs_the_penalty(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.016", "data.workers=0", "train.batch_size=4",
                           "model.ngf=8", "model.ndf=8", "model.image_size=32", "data.load_size=64,32",
                           "data.crop_size=32,32", "train.progress=false", "train.log_every_kimg=0.004",
                           "model.n_critic=2", "model.instance_noise=0.1", "model.instance_noise_kimg=0.01"],
                        config="wgangp_demo"))
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(run_dir)
    assert {"Loss/D_gp", "Loss/D_real", "Loss/D_fake", "Loss/G_GAN"} <= set(scalars)
    assert ckpt.latest(str(run_dir)).record["nimg"] == 16


def test_rpgan_with_r1_and_r2_trains_on_two_processes_and_decays_gamma(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                           "checkpoint.every_kimg=0.016", "data.workers=0", "train.batch_size=4", "model.ngf=8",
                           "model.ndf=8", "model.image_size=32", "data.load_size=64,32", "data.crop_size=32,32",
                           "train.progress=false", "train.log_every_kimg=0.004", "model.gan=rpgan", "model.gamma=10",
                           "model.gamma_final=1", "model.norm_D=none", "model.gp_weight=0"], config="wgangp_demo"))
    assert r.returncode == 0, explain(r)
    scalars = read_scalars(run_dir)
    assert {"Loss/D_rpgan", "Loss/D_r1", "Loss/D_r2", "Loss/G_rpgan"} <= set(scalars)
    gammas = [v for _, v in scalars["Progress/gamma"]]
    assert gammas[0] == pytest.approx(10.0) and all(a > b for a, b in zip(gammas, gammas[1:])), gammas
    assert all(v > 0 for _, v in scalars["Loss/D_r1"] + scalars["Loss/D_r2"])


def test_gradient_accumulation_matches_the_full_batch(demo_shards, tmp_path):
    # One step of batch 4, whole or as 2 micro-batches of 2, compared by its gradients: Adam's first
    # moment after one step is (1 - beta1) x the gradient, and it is in the checkpoint. (Weights
    # after several Adam steps would not do: Adam turns rounding-level differences, such as the
    # gradient of a conv bias in front of instance norm, into full-size steps.) Instance norm and
    # no dropout make the batch's loss the mean of its micro-batches' losses; model.lr_D=0 keeps
    # D as it was for G's phase, so G's gradients are taken against the same D in both runs.
    common = [f"data.url={demo_shards}", "train.total_kimg=0.004", "checkpoint.every_kimg=0.004",
              "data.workers=0", "model.norm=instance", "model.norm_D=instance", "model.dropout=false",
              "model.lr_D=0", *SMALL]
    for name, extra in (("full", []), ("accum", ["train.batch_per_device=2"])):
        r = run(launch_cmd(1, [*common, f"run.dir={tmp_path / name}", *extra]))
        assert r.returncode == 0, explain(r)
    assert json.loads((tmp_path / "accum" / "run.json").read_text())["accumulation_steps"] == 2
    full, accum = final_states(tmp_path / "full"), final_states(tmp_path / "accum")
    for opt in ("opt_G", "opt_D"):
        assert full[opt]["state"].keys() == accum[opt]["state"].keys()
        grads = [(full[opt]["state"][i]["exp_avg"], accum[opt]["state"][i]["exp_avg"]) for i in full[opt]["state"]]
        assert all(int(full[opt]["state"][i]["step"]) == 1 for i in full[opt]["state"])
        scale = max(float(a.abs().max()) for a, _ in grads)
        assert scale > 0, f"{opt}: no gradient at all"
        worst = max(float((a - b).abs().max()) for a, b in grads)
        total = sum(float((a - b).square().sum()) for a, b in grads) ** 0.5
        norm = sum(float(a.square().sum()) for a, _ in grads) ** 0.5
        # Rounding-level: the summation order differs, nothing else.
        assert worst <= 1e-4 * scale and total <= 1e-5 * norm, (opt, worst, scale, total, norm)


def test_channels_last_and_weight_histograms_run(demo_shards, tmp_path):
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={tmp_path}", "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "data.workers=0", "train.channels_last=true",
                           "train.histograms=true", *SMALL]))
    assert r.returncode == 0, explain(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_url(str(tmp_path)), size_guidance={"histograms": 0})
    acc.Reload()
    assert any(t.startswith("Weights/G/") for t in acc.Tags()["histograms"])


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "unknown key 'train.bogus'; train has: total_kimg, batch_size"),
    ("train.batch_size=big", "train.batch_size: expected an int, got 'big'"),
    ("train.precision=fp8", "train.precision: 'fp8' is not allowed; choose one of: auto, fp32, bf16, fp16"),
    ("checkpoint.keep_last=1", "checkpoint.keep_last: 1 is below the minimum 2"),
    ("nosection=1", "unknown key 'nosection'; keys are <section>.<name>"),
])
def test_config_errors_are_one_line_before_any_process_starts(override, message):
    r = run([sys.executable, TRAIN, "--config", "pix2pix_demo", override], timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_config_error_is_said_once_under_a_launcher_whichever_rank_exits_first():
    # Every rank meets the error; only rank 0 says it. Rank 1 used to exit at once, and the
    # launcher then stopped rank 0 before it had printed: the job failed with no reason given.
    r = run(launch_cmd(2, ["train.bogus=1"]), timeout=180)
    assert r.returncode != 0
    assert r.stderr.count("gan-train: config error: unknown key 'train.bogus'") == 1, explain(r)


def test_a_rank_other_than_0_still_says_its_config_error_when_nobody_stops_it():
    # Rank 0 may be on another node: after its pause, a rank that nobody has stopped reports it.
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, TRAIN, "--config", "pix2pix_demo", "train.bogus=1"], capture_output=True,
                       text=True, timeout=60, env={**env(), "RANK": "1", "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "gan-train: config error: unknown key 'train.bogus'" in r.stderr, explain(r)
    assert time.monotonic() - t0 >= CONFIG_ERROR_PAUSE_S


def test_dry_run_prints_config_run_dir_and_parameter_counts(demo_shards):
    r = run([sys.executable, TRAIN, "--config", "pix2pix_demo", "--dry-run", f"data.url={demo_shards}"], timeout=60)
    assert r.returncode == 0, explain(r)
    assert "run directory: runs/pix2pix_demo" in r.stdout
    assert "G: UnetGenerator, 10,465,603 parameters" in r.stdout  # unet_128, ngf 32, 11 demo classes in
    assert '"total_kimg": 1.0' in r.stdout


def test_a_resume_with_changed_training_settings_is_refused_until_accepted(demo_shards, tmp_path):
    """Length, logging and evaluation may change on resume; anything else stops with one line
    naming each change and how to accept it. --dry-run says the same without writing. Each
    segment's config is kept by the step it started at."""
    run_dir = tmp_path / "run"
    base = [f"data.url={demo_shards}", f"run.dir={run_dir}", "data.workers=0", "checkpoint.every_kimg=0.008", *SMALL]
    r = run(launch_cmd(1, [*base, "train.total_kimg=0.008"]))
    assert r.returncode == 0, explain(r)
    saved = (run_dir / "config.json").read_text()
    longer = [*base, "train.total_kimg=0.016", "model.lr_G=0.001"]
    r = run(launch_cmd(1, longer))
    assert r.returncode == 2, explain(r)
    line = r.stderr.strip().splitlines()[-1]
    assert line == (f"gan-train: {run_dir} was trained with other settings: model.lr_G 0.0002 -> 0.001. Resume "
                    "with the saved values, choose a new run.dir, or accept the change with "
                    "run.accept_changes=model.lr_G"), explain(r)
    assert (run_dir / "config.json").read_text() == saved and ckpt.list_steps(str(run_dir)) == [2]
    r = run([sys.executable, TRAIN, "--config", "pix2pix_demo", "--dry-run", *longer], timeout=60)
    assert r.returncode == 0, explain(r)
    assert f"would resume from {run_dir}/checkpoints/step-00000002 at kimg 0.008" in r.stdout
    assert "changed, accepted: train.total_kimg 0.008 -> 0.016" in r.stdout
    assert "changed, REFUSED (run.accept_changes or a new run.dir): model.lr_G 0.0002 -> 0.001" in r.stdout
    r = run(launch_cmd(1, [*longer, "run.accept_changes=model.lr_G"]))
    assert r.returncode == 0, explain(r)
    assert "resuming with changed settings: model.lr_G 0.0002 -> 0.001; run.accept_changes '' -> 'model.lr_G'; " \
           "train.total_kimg 0.008 -> 0.016" in r.stdout + r.stderr
    first, second = (json.loads((run_dir / "configs" / f"step-{s:08d}.json").read_text()) for s in (0, 2))
    assert (first["model"]["lr_G"], second["model"]["lr_G"]) == (0.0002, 0.001)
    assert json.loads((run_dir / "config.json").read_text()) == second and ckpt.list_steps(str(run_dir)) == [2, 4]


def test_data_mistakes_end_in_one_line_that_says_what_to_run(tmp_path):
    """No shards at data.url, or a folder of images given as data.url: exit 2 and one line naming
    the command that fixes it. Shards without the validation split train, without image grids, and
    say which key chooses another split."""
    from PIL import Image

    from pipeline.data.shards import WriteOptions, write_dataset
    from pipeline.data.sources import make_source

    images = tmp_path / "photos"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    cases = {
        str(tmp_path / "nowhere"): f"no shard manifest at {tmp_path}/nowhere/manifest.json: write shards there with "
                                   f"`gan-shard write SOURCE --root DATA --out {tmp_path}/nowhere`",
        str(images): f"data.url={images} holds images, not shards: shard them first, e.g. `gan-shard write folder "
                     f"--root {images} --out shards/mydata`",
    }
    for url, message in cases.items():
        r = run(launch_cmd(1, [f"data.url={url}", f"run.dir={tmp_path / 'run'}", "data.workers=0", *SMALL]), timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], explain(r)
    train_only = tmp_path / "train-only"
    write_dataset(make_source("demo", None, counts={"train": 4}), str(train_only), ["train"],
                  WriteOptions(samples_per_shard=4, workers=1), progress=False)
    r = run(launch_cmd(1, [f"data.url={train_only}", f"run.dir={tmp_path / 'run'}", "data.workers=0",
                           "train.total_kimg=0.004", *SMALL]), timeout=120)
    assert r.returncode == 0, explain(r)
    assert (f"no image grids: split 'val' is not in {train_only}/manifest.json; it has: train (choose with "
            "data.split / data.val_split, e.g. data.val_split=train)") in r.stdout
