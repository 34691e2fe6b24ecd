"""The SLURM scripts: static checks (bash -n, shellcheck), then a real two-node cluster on
loopback (tests/slurm_cluster.py): train.sbatch trains across both nodes with identical weights
on both ranks; a job sent SLURM's preemption notice saves, requeues itself and finishes from its
checkpoint; a genuine failure is not requeued and requeues are capped; eval.sbatch follows a
training job to the end; shard.sbatch's array parts and final step equal a plain write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, free_port, missing_binaries

from pipeline.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
EVAL_SBATCH = REPO / "launch" / "slurm" / "eval.sbatch"
SHARD_SBATCH = REPO / "launch" / "slurm" / "shard.sbatch"
FAST_EVAL = ["--max-samples", "7", "--kid-subset-size", "4", "--kid-subsets", "10", "--batch-size", "4"]

# tests/test_train.py's SMALL pix2pix: unet_128 at ngf 8 on 128x128 crops, global batch 4.
SMALL = ["model.ngf=8", "model.ndf=8", "data.crop_size=128,128", "train.batch_size=4", "train.progress=false",
         "train.log_every_kimg=0.008", "train.image_every_kimg=0.016", "train.num_images=2",
         "model.ema_kimg=0.01", "data.workers=1"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# ---------------------------------------------------------------- static


def test_there_are_the_three_scripts():
    assert [p.name for p in SCRIPTS] == ["eval.sbatch", "shard.sbatch", "train.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash launch/setup_system.sh installs it)")
    r = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- a real cluster

def _why_no_cluster() -> str:
    if missing_binaries():
        return (f"SLURM/munge binaries missing: {', '.join(missing_binaries())} "
                "(bash launch/setup_system.sh installs them)")
    if os.geteuid() != 0:
        return "the test cluster runs slurmctld/slurmd as root (SlurmUser=root), and this is not root"
    return ""


needs_slurm = pytest.mark.skipif(bool(_why_no_cluster()), reason=_why_no_cluster())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Also here, not only in each test's mark: a cluster test that forgot @needs_slurm skips
    # instead of failing on a machine without SLURM.
    if _why_no_cluster():
        pytest.skip(_why_no_cluster())
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "demo"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", "demo", "--out", str(out),
                        "--demo-count", "train=32", "--demo-count", "val=8", "--samples-per-shard", "8",
                        "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


def job_env(tmp: Path, **extra: str) -> dict[str, str]:
    # MAIN_PROCESS_PORT: a free port instead of the one derived from the job id (tests never use
    # fixed ports; the derived one could be taken on a shared machine).
    return {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "LOG_DIR": str(tmp / "logs"),
            "MAIN_PROCESS_PORT": str(free_port()), **extra}


# train.sbatch requests GPUs by default; these nodes have none (the documented CPU override).
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=1"]


def submit_train(cluster: SlurmCluster, tmp: Path, overrides: list[str], **env: str) -> int:
    env = job_env(tmp, CONFIG="pix2pix_demo", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120", **{"DEVICE": "cpu", **env})
    return cluster.sbatch(["--time=15", f"--output={tmp}/%x-%j.out", *CPU_ONLY, str(TRAIN_SBATCH), *overrides],
                          cwd=REPO, env=env)


def job_report(cluster: SlurmCluster, tmp: Path) -> str:
    parts = [f"--- {p.relative_to(tmp)}\n{p.read_text(errors='replace')[-8000:]}"
             for p in sorted(tmp.rglob("*.out"))]
    return "\n".join(parts) + "\n" + cluster.logs()


def wait_final(cluster: SlurmCluster, job_id: int, tmp: Path, timeout: float, **cond) -> dict:
    deadline = time.time() + timeout
    info: dict = {}
    while time.time() < deadline:
        info = cluster.job(job_id)
        if info.get("JobState") in FINAL and all(int(info.get(k, -1)) >= v for k, v in cond.items()):
            return info
        time.sleep(2)
    pytest.fail(f"job {job_id} not finished after {timeout}s ({info.get('JobState')}, "
                f"restarts {info.get('Restarts')})\n{job_report(cluster, tmp)}")


def assert_ranks_agree(run_dir: Path) -> ckpt.Found:
    found = ckpt.latest(str(run_dir))
    assert found is not None, f"no committed checkpoint in {run_dir}"
    ranks = [ckpt.load_tensors(found.file(f"rank-{r:03d}.pt")) for r in (0, 1)]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]  # the same G, D, G_ema on both nodes
    assert found.record["world_size"] == 2
    return found


@needs_slurm
@pytest.mark.slurm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("accel_config", ["multi_node.yaml", "deepspeed_zero2.yaml"])
def test_train_sbatch_trains_across_two_nodes(cluster, shards, tmp_path, accel_config):
    if accel_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    run_dir = tmp_path / "run"
    job = submit_train(cluster, tmp_path, [f"data.url={shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                                           "checkpoint.every_kimg=0.008", *SMALL],
                       ACCEL_CONFIG=f"launch/accelerate/{accel_config}")
    info = wait_final(cluster, job, tmp_path, timeout=600)
    report = job_report(cluster, tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report
    assert info["NodeList"] == "n[1-2]", report
    found = assert_ranks_agree(run_dir)
    assert found.record["nimg"] == 16 and ckpt.list_steps(str(run_dir)) == [2, 4]
    assert (run_dir / "DONE.json").exists() and not (run_dir / "PREEMPTED.json").exists()
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["world_size"] == 2
    assert run_info["backend"] == ("deepspeed" if accel_config.startswith("deepspeed") else "ddp")
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == [f"gan-train-{job}-node0.out", f"gan-train-{job}-node1.out", f"gan-train-{job}-ranks"], logs
    # One directory per node's agent, each with its rank's streams.
    assert len(list((tmp_path / "logs" / f"gan-train-{job}-ranks").glob("*/attempt_0/0/stderr.log"))) == 2
    batch = (tmp_path / f"gan-train-{job}.out").read_text()
    assert "restart 0" in batch and "requeue" not in batch, report
    assert "AWS_SECRET" not in batch + report


def notice_once_training(cluster: SlurmCluster, job: int, run_dir: Path, tmp: Path) -> int:
    """Wait for training to be under way (a committed checkpoint), then give the notice SLURM gives
    at --signal=USR1@120: SIGUSR1 to every process of the job's steps, not to the batch shell.
    Returns the step committed before the notice."""
    deadline = time.time() + 600
    while ckpt.latest(str(run_dir)) is None:
        if time.time() > deadline or cluster.job(job).get("JobState") in FINAL:
            pytest.fail(f"no checkpoint before the notice\n{job_report(cluster, tmp)}")
        time.sleep(0.5)
    step = ckpt.latest(str(run_dir)).step
    cluster.run(["scancel", "--signal=USR1", str(job)])
    return step


PREEMPTIBLE = ["train.total_kimg=0.2", "checkpoint.every_kimg=0.008", "checkpoint.keep_last=2", *SMALL]


@needs_slurm
@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_preempted_job_requeues_and_resumes_from_its_checkpoint(cluster, shards, tmp_path):
    run_dir = tmp_path / "run"
    job = submit_train(cluster, tmp_path, [f"data.url={shards}", f"run.dir={run_dir}", *PREEMPTIBLE])
    deadline = time.time() + 600
    signalled_at = notice_once_training(cluster, job, run_dir, tmp_path)

    preempted = tmp_path / "preempted.json"
    while not preempted.exists():  # the marker lives only until the requeued run starts: copy it
        if (run_dir / "PREEMPTED.json").exists():
            try:
                shutil.copy(run_dir / "PREEMPTED.json", preempted)
            except FileNotFoundError:
                continue
        if (run_dir / "DONE.json").exists() or time.time() > deadline:
            pytest.fail(f"no PREEMPTED.json after the notice\n{job_report(cluster, tmp_path)}")
        time.sleep(0.2)
    marker = json.loads(preempted.read_text())
    assert signalled_at <= marker["step"] < 50

    info = wait_final(cluster, job, tmp_path, timeout=700, Restarts=1)
    report = job_report(cluster, tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", report
    assert info["Restarts"] == "1", report
    batch = (tmp_path / f"gan-train-{job}.out").read_text()
    assert "restart 0" in batch and "requeueing job" in batch and "restart 1" in batch, report
    node0 = (tmp_path / "logs" / f"gan-train-{job}-node0.out").read_text()
    assert "preempted: saved at kimg" in node0, report
    step_dir = run_dir / "checkpoints" / f"step-{marker['step']:08d}"
    resumed = f"resumed from {step_dir}"
    assert resumed in node0.split("preempted: saved at kimg", 1)[1], report
    assert (run_dir / "DONE.json").exists() and not (run_dir / "PREEMPTED.json").exists()
    found = assert_ranks_agree(run_dir)
    assert found.record["nimg"] == 200


@needs_slurm
@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_eval_sbatch_follows_a_training_job_on_a_node_of_its_own(cluster, shards, tmp_path):
    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception-standin.pth")
    run_dir = tmp_path / "run"
    train = submit_train(cluster, tmp_path, [f"data.url={shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
                                             "checkpoint.every_kimg=0.008", *SMALL])
    evaluator = cluster.sbatch(["--time=15", f"--output={tmp_path}/%x-%j.out", f"--dependency=after:{train}",
                                str(EVAL_SBATCH), "--inception-weights", str(inception), "--poll-sec", "1",
                                "--timeout", "600", *FAST_EVAL],
                               cwd=REPO, env=job_env(tmp_path, RUN_DIR=str(run_dir), WAIT_FOR_RUN_SEC="600"))
    for job in (train, evaluator):
        info = wait_final(cluster, job, tmp_path, timeout=700)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_report(cluster, tmp_path)
    report = job_report(cluster, tmp_path)
    assert (run_dir / "DONE.json").exists(), report
    assert (run_dir / "eval" / "FINISHED.json").exists(), report
    for step in (2, 4):  # every snapshot evaluated once, with its protocol
        result = json.loads((run_dir / "eval" / f"step-{step:08d}.json").read_text())
        assert "fid" in json.dumps(result), result


def shard_files(root: Path) -> dict[str, bytes]:
    """Shards, journal and manifest (without the command line that made it)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                manifest = json.loads(data)
                manifest.pop("command")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


@needs_slurm
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_shard_sbatch_array_parts_then_final_step_equal_a_plain_write(cluster, tmp_path):
    args = ["demo", "--demo-count", "train=12", "--demo-count", "val=5", "--demo-size", "64x32",
            "--samples-per-shard", "4"]
    plain = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", *args, "--out",
                            str(tmp_path / "plain"), "--workers", "1", "--quiet"],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    out = tmp_path / "parts"
    array = cluster.sbatch(["--array=0-1", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%x-%A_%a.out",
                            str(SHARD_SBATCH), *args, "--out", str(out)], cwd=REPO, env=job_env(tmp_path))
    deadline = time.time() + 400
    while not (out / "manifest.json").exists():
        if time.time() > deadline:
            pytest.fail(f"no manifest from the array job\n{job_report(cluster, tmp_path)}")
        time.sleep(2)
    report = job_report(cluster, tmp_path)
    for task in (f"{array}_0", f"{array}_1"):
        info = cluster.job(task)
        assert info.get("JobState") == "COMPLETED", (task, info.get("JobState"), report)
    first = (tmp_path / f"gan-shard-{array}_0.out").read_text()
    assert "part 0 of 2" in first and "final step queued as job" in first, report
    final = int(first.split("final step queued as job ")[1].split()[0])
    info = wait_final(cluster, final, tmp_path, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["JobName"] == "gan-shard-finalize", report
    log = (tmp_path / f"gan-shard-finalize-{final}_0.out").read_text()  # beside the parts' logs
    assert "writing shards and manifest from 2 parts" in log and "wrote 17 samples in 5 shards" in log, report
    assert shard_files(out) == shard_files(tmp_path / "plain")  # byte-identical, no _parts/ left


@needs_slurm
@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_a_failure_is_not_requeued_requeues_are_capped_and_no_gpu_stops(cluster, shards, tmp_path):
    failing, capped, nogpu = tmp_path / "failing", tmp_path / "capped", tmp_path / "nogpu"
    failing.mkdir(), capped.mkdir(), nogpu.mkdir()
    # Asks for GPUs (the default) on nodes without any: stops before launching, saying how to go on.
    cpu_only = submit_train(cluster, nogpu, [f"data.url={shards}", f"run.dir={nogpu / 'run'}"], DEVICE="gpu")
    # A genuine failure: the trainers exit non-zero without PREEMPTED.json (no shards there).
    bad = submit_train(cluster, failing, [f"data.url={tmp_path / 'no-shards'}", f"run.dir={failing / 'run'}",
                                          *PREEMPTIBLE])
    # A preemption with no requeues left.
    cap = submit_train(cluster, capped, [f"data.url={shards}", f"run.dir={capped / 'run'}", *PREEMPTIBLE],
                       MAX_REQUEUES="0")
    notice_once_training(cluster, cap, capped / "run", capped)
    for job, tmp, code in ((bad, failing, "1:0"), (cap, capped, "75:0"), (cpu_only, nogpu, "2:0")):
        info = wait_final(cluster, job, tmp, timeout=600)
        report = job_report(cluster, tmp)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == code and info["Restarts"] == "0", report
    batch = (failing / f"gan-train-{bad}.out").read_text()
    assert "training failed (exit 1, no PREEMPTED.json): not requeueing" in batch, job_report(cluster, failing)
    assert not (failing / "run" / "PREEMPTED.json").exists()
    batch = (capped / f"gan-train-{cap}.out").read_text()
    assert "preempted, but already requeued 0 times (MAX_REQUEUES=0)" in batch, job_report(cluster, capped)
    assert (capped / "run" / "PREEMPTED.json").exists() and not (capped / "run" / "DONE.json").exists()
    batch = (nogpu / f"gan-train-{cpu_only}.out").read_text()
    assert "train.sbatch: no GPU visible on" in batch and "and DEVICE=cpu" in batch, job_report(cluster, nogpu)
    assert not (nogpu / "run").exists() and not (nogpu / "logs").exists()
    # Without the override, the script's own requests: GPUs, which this cluster does not have.
    r = subprocess.run(["sbatch", "--parsable", "--time=15", str(TRAIN_SBATCH)], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env=cluster.env(**job_env(nogpu)))
    assert r.returncode == 1 and "Invalid generic resource (gres) specification" in r.stderr, r.stdout + r.stderr
