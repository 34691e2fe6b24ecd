"""Faults that used to lose data, each injected: every checkpoint broken, a checkpoint that
verifies but cannot be loaded, retention among broken checkpoints, a launcher killed under its
ranks, two jobs on one run directory, a lease taken over, files unreadable to others, a
preemption notice before torch is imported and after the run is done."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_train import SMALL, assert_identical, committed, env, explain, launch_cmd, run, wait_for_commit

from pipeline import io
from pipeline.train import checkpoint as ckpt
from pipeline.train.lease import LEASE, RunDirBusy, RunLease

pytestmark = pytest.mark.faults

ONE = ["data.workers=0", "checkpoint.every_kimg=0.008", "checkpoint.keep_last=2", *SMALL]


@pytest.fixture(scope="module")
def three_checkpoints(demo_shards, tmp_path_factory) -> Path:
    """A finished 1-process run with checkpoints at steps 2, 4 and 6 (read-only: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.024",
                           "checkpoint.every_kimg=0.008", "checkpoint.keep_last=3", "data.workers=0", *SMALL]))
    assert r.returncode == 0, explain(r)
    assert ckpt.list_steps(str(run_dir)) == [2, 4, 6]
    return run_dir


def damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


# ---------------------------------------------------------------- no silent restart


def test_the_same_seed_world_size_and_config_give_the_same_state(three_checkpoints, demo_shards, tmp_path):
    # The determinism golden the fault tests lean on: a second run of the same command writes the
    # same checkpoint, file for file (hashes from its commit record), RNG and data positions included.
    again = tmp_path / "again"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={again}", "train.total_kimg=0.024",
                           "checkpoint.every_kimg=0.008", "checkpoint.keep_last=3", "data.workers=0", *SMALL]))
    assert r.returncode == 0, explain(r)
    a, b = ckpt.latest(str(three_checkpoints)).record, ckpt.latest(str(again)).record
    assert a["files"] == b["files"] and len(a["files"]) >= 7


def test_every_checkpoint_broken_stops_with_its_exit_code_and_deletes_nothing(three_checkpoints, demo_shards,
                                                                              tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    damage(committed(step_dir(run_dir, 6), "G.pt"))
    damage(committed(step_dir(run_dir, 4), "rank-000.pt"))
    damage(committed(step_dir(run_dir, 2), "opt_D.pt"))
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    cmd = launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.032", *ONE])
    r = run(cmd)
    assert r.returncode == 4, explain(r)
    last = r.stderr.strip().splitlines()[-1]
    assert "holds 3 committed checkpoint(s) and none is usable" in last, explain(r)
    assert "G.pt does not match its checksum" in last and "run.resume=never" in last and "new run.dir" in last
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written or deleted
    # Starting over is a choice made explicitly; the new run's checkpoints replace the broken ones.
    r = run([*cmd, "run.resume=never"])
    assert r.returncode == 0, explain(r)
    assert ckpt.list_steps(str(run_dir)) == [6, 8]
    assert ckpt.latest(str(run_dir)).record["nimg"] == 32


def test_a_checkpoint_that_verifies_but_cannot_be_loaded_is_passed_over_and_nothing_in_it_runs(
        three_checkpoints, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # A pickle with code in it, its size and checksum written into the commit record.
    data = pickle.dumps({"weight": Payload()})
    committed(step_dir(run_dir, 6), "G.pt").write_bytes(data)
    record = json.loads((step_dir(run_dir, 6) / ckpt.COMMIT).read_text())
    record["files"]["G.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir(run_dir, 6) / ckpt.COMMIT).write_text(json.dumps(record))
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.032", *ONE]))
    assert r.returncode == 0, explain(r)
    out = r.stdout + r.stderr
    assert "step-00000006 verified but cannot be loaded (CheckpointInvalid: G.pt holds more than tensors" in out
    assert f"resumed from {step_dir(run_dir, 4)} at kimg 0.016 (1 newer checkpoint(s) could not be loaded)" in out
    assert not marker.exists()
    assert "weights_only` set to `False`" not in out  # torch's advice to load it anyway is not passed on


@pytest.mark.parametrize("tamper, reason", [
    (lambda r: [r], "lists no files"),
    (lambda r: {**r, "files": {}}, "lists no files"),
    (lambda r: {**r, "files": {**r["files"], "G.pt": {"bytes": "1"}}}, "entry for 'G.pt' is malformed"),
    (lambda r: {**r, "files": {"../../../etc/hostname": {"bytes": 1, "sha256": "0" * 64}}}, "outside the checkpoint"),
    (lambda r: {**r, "files": {**r["files"], "extra.pt": {"bytes": 1, "sha256": "0" * 64}}}, "extra.pt is missing"),
])
def test_a_tampered_commit_record_makes_a_checkpoint_invalid(tmp_path, tamper, reason):
    make_checkpoint(tmp_path, 1)
    url = make_checkpoint(tmp_path, 2)
    record = json.loads((url / ckpt.COMMIT).read_text())
    (url / ckpt.COMMIT).write_text(json.dumps(tamper(record)))
    with pytest.raises(ckpt.CheckpointInvalid, match=re.escape(reason)):
        ckpt.verify(str(url))
    assert [f.step for f in ckpt.verified(str(tmp_path))] == [1]


@pytest.mark.parametrize("text, reason", [
    ('{"files": {}, "pad": "' + "x" * (ckpt.MAX_COMMIT_BYTES + 1) + '"}', "larger than any commit record"),
    ("[" * 100_000 + "]" * 100_000, "COMMIT.json unreadable"),  # nesting deeper than the parser's recursion
])
def test_an_oversized_or_hostile_commit_record_is_refused_without_reading_it_all(tmp_path, text, reason):
    make_checkpoint(tmp_path, 1)
    url = make_checkpoint(tmp_path, 2)
    (url / ckpt.COMMIT).write_text(text)
    with pytest.raises(ckpt.CheckpointInvalid, match=reason):
        ckpt.verify(str(url))
    assert [f.step for f in ckpt.verified(str(tmp_path))] == [1]


def make_checkpoint(run_dir: Path, step: int, commit: bool = True) -> Path:
    url = ckpt.step_url(str(run_dir), ckpt.CHECKPOINTS, step)
    ckpt.save_tensors(io.join(url, "G.pt"), {"w": torch.full((4,), float(step))})
    if commit:
        ckpt.commit(url, {"step": step})
    return Path(url)


def test_prune_keeps_verified_checkpoints_and_only_removes_what_a_newer_verified_one_supersedes(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3, 5):
        make_checkpoint(run_dir, step)
    make_checkpoint(run_dir, 4, commit=False)  # a write that never finished
    damage(committed(step_dir(run_dir, 2), "G.pt"))
    assert ckpt.prune(str(run_dir), 2) == [1, 2, 4]
    assert ckpt.list_steps(str(run_dir)) == [3, 5]
    # The two newest broken (the old bug: they held both keep_last slots, and each fresh, valid
    # checkpoint was deleted right after its commit).
    for step in (6, 7):
        make_checkpoint(run_dir, step)
        damage(committed(step_dir(run_dir, step), "G.pt"))
    assert ckpt.prune(str(run_dir), 2) == []  # nothing newer than the newest verified one is touched
    assert ckpt.list_steps(str(run_dir)) == [3, 5, 6, 7]
    # None verified: nothing is deleted at all.
    damage(committed(step_dir(run_dir, 3), "G.pt"))
    damage(committed(step_dir(run_dir, 5), "G.pt"))
    assert ckpt.prune(str(run_dir), 2) == []
    with pytest.raises(ckpt.NoUsableCheckpoint, match="holds 4 committed checkpoint"):
        list(ckpt.verified(str(run_dir)))


def test_snapshot_retention_keeps_what_awaits_evaluation_and_the_best(tmp_path):
    run_dir = tmp_path / "run"
    for step in range(1, 6):
        url = ckpt.step_url(str(run_dir), ckpt.SNAPSHOTS, step)
        ckpt.save_tensors(io.join(url, "G.pt"), {"w": torch.zeros(1)})
        ckpt.commit(url, {"step": step})
    for step in (1, 2, 3):  # evaluated
        io.atomic_write_json(ckpt.eval_result_url(str(run_dir), step), {"step": step})
    io.atomic_write_json(str(run_dir / "eval" / "best.json"), {"step": 1})
    assert ckpt.snapshots_to_keep(str(run_dir)) == {1, 4, 5}
    assert ckpt.prune(str(run_dir), 1, ckpt.SNAPSHOTS, keep=ckpt.snapshots_to_keep(str(run_dir))) == [2, 3]
    assert ckpt.list_steps(str(run_dir), ckpt.SNAPSHOTS) == [1, 4, 5]


def test_a_checkpoint_whose_snapshot_was_never_written_gets_it_on_resume(three_checkpoints, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    ckpt.clear(ckpt.step_url(str(run_dir), ckpt.SNAPSHOTS, 6))  # killed after the checkpoint's commit
    (run_dir / "DONE.json").unlink()
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.032", *ONE]))
    assert r.returncode == 0, explain(r)
    assert "step-00000006 had no snapshot (interrupted before it was written): written now" in r.stderr
    record = ckpt.verify(ckpt.step_url(str(run_dir), ckpt.SNAPSHOTS, 6))
    saved = ckpt.load_tensors(committed(step_dir(run_dir, 6), "G_ema.pt"))
    snapshot = Path(ckpt.step_url(str(run_dir), ckpt.SNAPSHOTS, 6))
    assert_identical(ckpt.load_tensors(committed(snapshot, "G_ema.pt")), saved)
    assert record["networks"] == {"G": "G_ema.pt"} and record["nimg"] == 24
    assert ckpt.list_steps(str(run_dir), ckpt.SNAPSHOTS) == [2, 4, 6, 8]  # none pruned by default


@pytest.mark.parametrize("moment, left", [("checkpoint.rank_file", 4), ("checkpoint.files", 4),
                                          ("checkpoint.commit", 6), ("snapshot.files", 6)])
def test_a_kill_inside_a_checkpoint_write_loses_nothing(three_checkpoints, demo_shards, tmp_path, moment, left):
    """SIGKILL at a moment of step 6's write (its rank file written; every file written, not
    committed; committed, snapshot not written; snapshot files written, not committed): the newest
    usable checkpoint is the one before, or step 6 itself once committed, and the relaunched
    command ends with step 6 bit-identical to the uninterrupted run's and a verified snapshot."""
    from pipeline import failpoints

    run_dir = tmp_path / "run"
    cmd = launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.024",
                         "checkpoint.every_kimg=0.008", "checkpoint.keep_last=3", "data.workers=0", *SMALL])
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=240, start_new_session=True,
                            env={**env(), failpoints.VARIABLE: f"{moment}@6"})
    assert killed.returncode == -signal.SIGKILL, explain(killed)
    assert ckpt.latest(str(run_dir)).step == left
    r = run(cmd)
    assert r.returncode == 0 and f"resumed from {step_dir(run_dir, left)}" in r.stdout + r.stderr, explain(r)
    assert ckpt.latest(str(run_dir)).record["files"] == ckpt.latest(str(three_checkpoints)).record["files"]
    snapshot = Path(ckpt.step_url(str(run_dir), ckpt.SNAPSHOTS, 6))
    ckpt.verify(str(snapshot))
    assert_identical(ckpt.load_tensors(committed(snapshot, "G_ema.pt")),
                     ckpt.load_tensors(committed(step_dir(run_dir, 6), "G_ema.pt")))


def test_credentials_given_on_the_command_line_reach_no_artifact(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    secret = "SUPERSECRET-" + os.urandom(6).hex()
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.004",
                           "checkpoint.every_kimg=0.004", "data.workers=0", *SMALL,
                           f'data.storage_options={{"secret": "{secret}"}}']))
    assert r.returncode == 0, explain(r)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10 and not [p for p in files if secret.encode() in p.read_bytes()]
    assert "data.storage_options=<redacted>" in json.loads((run_dir / "run.json").read_text())["command"]


# ---------------------------------------------------------------- one job per run directory


@pytest.mark.multiprocess
def test_killing_only_the_launcher_ends_its_ranks_and_a_relaunch_resumes(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.064",
                         "data.workers=1", "checkpoint.every_kimg=0.008", *SMALL])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        wait_for_commit(run_dir, 2, proc)
        launcher = psutil.Process(proc.pid)
        descendants = launcher.children(recursive=True)
        assert len([p for p in descendants if "train.py" in " ".join(p.cmdline())]) >= 2
        launcher.kill()  # only the launcher: torchrun put each rank in a session of its own
        proc.communicate(timeout=30)
        gone, alive = psutil.wait_procs(descendants, timeout=20)
        assert not alive, f"outlived their launcher by 20 s: {[p.cmdline() for p in alive]}"
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()
    assert ckpt.latest(str(run_dir)).step < 16
    r = run(cmd)  # the same command: takes the lease of the dead job at once (same host), resumes
    assert r.returncode == 0, explain(r)
    assert "resumed from" in r.stdout + r.stderr
    assert ckpt.latest(str(run_dir)).record["nimg"] == 64


@pytest.mark.multiprocess
def test_a_stopped_rank_ends_the_job_with_a_clear_message_and_a_relaunch_resumes(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(2, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.048",
                         "data.workers=1", "checkpoint.every_kimg=0.008", "distributed.timeout_sec=10", *SMALL])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        wait_for_commit(run_dir, 2, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())
                 and p.parent().pid == proc.pid]
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        t0 = time.monotonic()
        rank1.send_signal(signal.SIGSTOP)  # swapped out, a frozen node: alive, silent
        out, err = proc.communicate(timeout=180)
        took = time.monotonic() - t0
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.send_signal(signal.SIGCONT)
            p.kill()
    assert proc.returncode != 0
    assert "rank 0: a collective did not complete within distributed.timeout_sec=10: another rank stopped" in err, \
        f"{out[-2000:]}\n{err[-5000:]}"
    assert took < 120, took
    r = run(cmd)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    assert ckpt.latest(str(run_dir)).record["nimg"] == 48


def test_a_second_job_on_the_same_run_dir_waits_then_refuses(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=1", *ONE]
    first = subprocess.Popen(launch_cmd(1, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(), start_new_session=True)
    try:
        wait_for_commit(run_dir, 2, first)
        t0 = time.monotonic()
        second = run(launch_cmd(1, [*args, "run.lease_wait_sec=3"]), timeout=120)
        assert second.returncode == 5, explain(second)
        assert 3 <= time.monotonic() - t0 < 60
        holder = json.loads((run_dir / LEASE).read_text())
        last = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another job (host {holder['host']}, pid {holder['pid']}" in last, explain(second)
        assert "stop that job or use another run.dir" in last
        assert first.poll() is None  # the first job goes on, undisturbed
    finally:
        first.kill()
        first.communicate(timeout=30)


def test_a_job_whose_lease_was_taken_over_stops_without_writing(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = subprocess.Popen(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=1",
                                          "run.lease_sec=5", *ONE]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        wait_for_commit(run_dir, 2, job)
        rec = json.loads((run_dir / LEASE).read_text())
        # Another job's lease, as if this one had stalled past its time to live.
        io.atomic_write_json(str(run_dir / LEASE), {**rec, "token": "another-job", "pid": 1, "renewed": time.time()})
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 5, f"{out[-2000:]}\n{err[-4000:]}"
    assert "another job took over" in err
    steps = ckpt.list_steps(str(run_dir))
    assert json.loads((run_dir / LEASE).read_text())["token"] == "another-job"  # not released: not its own
    time.sleep(1)
    assert ckpt.list_steps(str(run_dir)) == steps and max(steps) < 250


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_the_run_dir_lease(where, tmp_path, request):
    url = request.getfixturevalue("s3_server").url("runs/leased") if where == "s3" else str(tmp_path / "run")
    a, b = RunLease(url, ttl_sec=30), RunLease(url, ttl_sec=30)
    a.acquire(wait_sec=0, poll_sec=0.1)
    with pytest.raises(RunDirBusy, match=f"in use by another job \\(host {os.uname().nodename}, pid {os.getpid()}"):
        b.acquire(wait_sec=0.5, poll_sec=0.1)
    assert a.still_mine()
    a.release()
    assert not io.exists(io.join(url, LEASE))
    b.acquire(wait_sec=0, poll_sec=0.1)
    assert not a.still_mine() and a.lost
    a.release()  # not its own: left alone
    assert io.read_json(io.join(url, LEASE))["token"] == b.token
    # A holder that stopped renewing lapses after its time to live; one on this host whose
    # process is gone, at once.
    rec = io.read_json(io.join(url, LEASE))
    io.atomic_write_json(io.join(url, LEASE), {**rec, "host": "elsewhere", "renewed": time.time() - 31})
    RunLease(url, ttl_sec=30).acquire(wait_sec=0, poll_sec=0.1)
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    rec = io.read_json(io.join(url, LEASE))
    io.atomic_write_json(io.join(url, LEASE), {**rec, "token": "x", "pid": dead.pid, "renewed": time.time()})
    RunLease(url, ttl_sec=30).acquire(wait_sec=0, poll_sec=0.1)


# ---------------------------------------------------------------- files others can read


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.atomic_write_bytes(str(tmp_path / "manifest.json"), b"{}")
        ckpt.save_tensors(str(tmp_path / "G.pt"), {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "G.pt").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_sigterm_during_a_lease_wait_ends_the_job_at_once(demo_shards, tmp_path):
    # A job waiting for the lease still answers a preemption notice: it ends, the other job's
    # lease untouched and nothing written.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lease = {"token": "other", "host": "elsewhere", "pid": 1, "renewed": time.time() + 3600, "ttl_sec": 60}
    io.atomic_write_json(str(run_dir / LEASE), lease)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}",
                                               "run.lease_wait_sec=600", *ONE]),
                                stdout=subprocess.DEVNULL, stderr=err, text=True, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while "waiting up to" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 5, log.read_text()
    assert "interrupted while waiting" in log.read_text().strip().splitlines()[-1]
    assert json.loads((run_dir / LEASE).read_text()) == lease
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE]



def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc (Linux)")
def test_a_notice_while_the_job_is_still_importing_is_kept_and_saved(demo_shards, tmp_path):
    # A requeued job can be preempted again before its ranks have even imported torch; the batch
    # script requeues only a job that saved, so a rank that died of that notice would end the run.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *ONE]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while not catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.time() < deadline, "the trainer never handled SIGTERM"
            time.sleep(0.005)
        torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert not torch_loaded, "the notice handler came only after torch was imported"
    assert proc.returncode == 75, out[-4000:]
    assert "preempted: saved at kimg" in out
    marker = json.loads((run_dir / "PREEMPTED.json").read_text())
    assert ckpt.latest(str(run_dir)).step == marker["step"] >= 1


def test_a_notice_after_the_run_is_done_leaves_exit_code_0(demo_shards, tmp_path):
    # SLURM's notice can come while a finished rank is closing down; Python gives back the default
    # action (death) to handled signals as it exits, which once turned a finished run into -15.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.008",
                                           *ONE]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            start_new_session=True)
    lines, sent = [], 0
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("gan-train: done"):
                break
            assert time.time() < deadline, "".join(lines[-50:])
        while proc.poll() is None:  # notices until the process has gone
            proc.send_signal(signal.SIGTERM)
            sent += 1
            time.sleep(0.002)
        lines += proc.stdout.readlines()
    finally:
        proc.kill()
    out = "".join(lines)
    assert sent > 0 and "gan-train: done" in out, out[-4000:]
    assert proc.returncode == 0, f"exit {proc.returncode} after {sent} notices\n{out[-4000:]}"
    assert (run_dir / "DONE.json").exists() and not (run_dir / "PREEMPTED.json").exists()


# ---------------------------------------------------------------- another world size


def test_a_resume_on_fewer_processes_reads_the_rest_of_the_epoch_once(demo_shards, tmp_path):
    """T07: two processes read 8 of their 24 positions each of epoch 0 (48 demo photos); one
    process resumes and reads the 32 left, once each, before epoch 1 (the sample-level property is
    tested in test_stream)."""
    run_dir = tmp_path / "run"
    args = [f"data.url={demo_shards}", f"run.dir={run_dir}", "data.workers=0", "checkpoint.every_kimg=0.016", *SMALL]
    r = run(launch_cmd(2, [*args, "train.total_kimg=0.016"]))
    assert r.returncode == 0, explain(r)
    r = run(launch_cmd(1, [*args, "train.total_kimg=0.048"]))
    assert r.returncode == 0, explain(r)
    assert "stream data shares out what they had not read of epoch 0; no sample of it is lost or read twice" in \
        r.stdout + r.stderr, explain(r)
    found = ckpt.latest(str(run_dir))
    state = json.loads(Path(found.file("state.json")).read_text())
    assert state["handovers"] == {"data": {"epoch": 0, "slots": 2, "consumed": [8, 8]}}
    assert state["positions"] == {"data": {"0": [0, 32]}}  # the whole piece: 16 + 16 positions


# ---------------------------------------------------------------- racing writers


def writer_state(value: float) -> ckpt.TrainState:
    """A one-network training state whose weights are all ``value``, with a writer of its own."""
    from pipeline.dist import DDPEngine

    net = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(net.weight, value)
    torch.nn.init.constant_(net.bias, value)
    engine = DDPEngine("G", {"G": net}, torch.optim.Adam(net.parameters()), None, 0.0)
    return ckpt.TrainState(nets={"G": net}, ema={}, engines={"G": engine}, counters={"step": 4, "nimg": 16},
                           positions={}, family_state={}, snapshot=("G",), backend="ddp", world_size=1, rank=0,
                           workers=0, device=torch.device("cpu"))


@pytest.mark.parametrize("paused_at", ["checkpoint.rank_file", "checkpoint.files"])
def test_of_two_writers_racing_for_one_step_the_first_to_commit_wins_whatever_the_other_writes(
        tmp_path, monkeypatch, paused_at):
    """T14: writer A stops inside its save of step 4 (after its rank file, or after all its files);
    B saves the same step meanwhile and commits; A then goes on. A's files, written before and
    after B's commit, land in its own directory: B's checkpoint and snapshot verify and hold B's
    weights, A gets ``CommitRaced``, and no file of B's is touched."""
    import threading

    a, b = writer_state(1.0), writer_state(2.0)
    paused, go = threading.Event(), threading.Event()
    real = ckpt.failpoints.reached

    def reached(name: str, step: int) -> None:
        if name == paused_at and threading.current_thread().name == "writer-A":
            paused.set()
            assert go.wait(60)
        real(name, step)

    monkeypatch.setattr(ckpt.failpoints, "reached", reached)
    outcome = {}

    def save_a() -> None:
        try:
            ckpt.save(str(tmp_path), a, {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None)
            outcome["A"] = "committed"
        except ckpt.CommitRaced as exc:
            outcome["A"] = str(exc)

    thread = threading.Thread(target=save_a, name="writer-A")
    thread.start()
    assert paused.wait(60)
    ckpt.save(str(tmp_path), b, {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None)
    b_files = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()
               and ckpt.writer_dir(b.writer) in p.parts}
    go.set()
    thread.join(60)
    assert "committed by another writer first" in outcome["A"]
    for kind in (ckpt.CHECKPOINTS, ckpt.SNAPSHOTS):
        found = ckpt.latest(str(tmp_path), kind)
        assert found.step == 4 and found.record["writer"] == b.writer
        assert torch.equal(ckpt.load_tensors(found.file("G.pt"))["weight"], torch.full((1, 2), 2.0))
    assert {p: p.read_bytes() for p in b_files} == b_files
    # A's files are its own, beside B's; the step is pruned whole later.
    assert (tmp_path / "checkpoints" / "step-00000004" / ckpt.writer_dir(a.writer) / "rank-000.pt").exists()


def test_a_stale_writer_never_replaces_the_lease_holders_commit(tmp_path):
    """T14 before writing: a step already committed by the writer that holds the lease now is
    left as it is (the other writer stops, nothing written); one committed by a writer that
    holds no lease (an earlier job: ``run.resume=never``) or by this writer (a rollback) is
    replaced."""
    a, b = writer_state(1.0), writer_state(2.0)
    ckpt.save(str(tmp_path), b, {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None)
    step = tmp_path / "checkpoints" / "step-00000004"
    before = sorted(step.rglob("*"))
    with pytest.raises(ckpt.CommitRaced, match="the run directory's lease holder now"):
        ckpt.save(str(tmp_path), a, {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None,
                  holder=lambda: b.writer)
    assert sorted(step.rglob("*")) == before and ckpt.latest(str(tmp_path)).record["writer"] == b.writer
    for writer, holder in ((a, lambda: a.writer), (a, lambda: None), (b, lambda: b.writer)):
        ckpt.save(str(tmp_path), writer, {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None, holder=holder)
        found = ckpt.latest(str(tmp_path))
        assert found.record["writer"] == writer.writer
        assert [p.name for p in step.iterdir() if p.name.startswith("w-")] == [ckpt.writer_dir(writer.writer)]


def test_a_record_naming_a_directory_outside_its_step_is_refused(tmp_path):
    ckpt.save(str(tmp_path), writer_state(1.0), {"step": 4, "nimg": 16}, keep_last=2, keep_snapshots=None)
    step = tmp_path / "checkpoints" / "step-00000004"
    record = json.loads((step / ckpt.COMMIT).read_text())
    for hostile in ("..", "../../etc", "w-../x", 7):
        (step / ckpt.COMMIT).write_text(json.dumps({**record, "dir": hostile}))
        with pytest.raises(ckpt.CheckpointInvalid, match="writer directory"):
            ckpt.verify(str(step))


@pytest.mark.s3
def test_the_commit_is_exclusive_on_s3_too(s3_server):
    url = s3_server.url("run/checkpoints/step-00000004")
    entry = ckpt.save_tensors(io.join(url, "G.pt"), {"w": torch.ones(2)})
    ckpt.commit(url, {"step": 4, "writer": "B"}, written={"G.pt": entry})
    with pytest.raises(ckpt.CommitRaced):
        ckpt.commit(url, {"step": 4, "writer": "A"}, written={"G.pt": entry})
    assert ckpt.verify(url)["writer"] == "B"
