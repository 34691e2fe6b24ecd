"""T20, the chaos soak (marked slow: CI runs it after the README's test command): one run whose
directory is in a bucket behind a proxy that throttles or resets every 9th request, relaunched
with the same command after each of a seeded sequence of faults (SIGKILL of the job at a moment
inside a checkpoint write or at a random time, a preemption notice at a random time), until it
completes. Its final checkpoint must equal, bit for bit, that of a run that met no fault."""

from __future__ import annotations

import random
import signal
import subprocess
import time

import psutil
import pytest
from test_train import SMALL, assert_identical, committed_files, env, explain, launch_cmd, run

from pipeline import failpoints
from pipeline.train import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.s3]

MOMENTS = ("checkpoint.rank_file", "checkpoint.files", "checkpoint.commit", "snapshot.files")


def test_a_run_under_random_kills_preemptions_and_store_faults_ends_as_the_golden_one(demo_shards, s3_server,
                                                                                        tmp_path):
    from s3_fault_proxy import FaultProxy

    args = [f"data.url={demo_shards}", "train.total_kimg=0.048", "checkpoint.every_kimg=0.008", "data.workers=0",
            *SMALL]
    golden = tmp_path / "golden"
    r = run(launch_cmd(1, [f"run.dir={golden}", *args]))
    assert r.returncode == 0, explain(r)

    rng = random.Random(20261205)
    url = s3_server.url("chaos/run")
    cmd = launch_cmd(1, [f"run.dir={url}", *args])
    faults, log = 0, []
    with FaultProxy(s3_server.endpoint, every=9) as proxy:
        for attempt in range(16):
            kind = rng.choice(["kill_at", "sigkill", "preempt"]) if attempt < 10 else "none"
            extra = {"AWS_ENDPOINT_URL": proxy.endpoint}
            if kind == "kill_at":
                extra[failpoints.VARIABLE] = f"{rng.choice(MOMENTS)}@{rng.choice(range(2, 13, 2))}"
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**env(), **extra}, start_new_session=True)
            if kind in ("sigkill", "preempt"):
                delay = rng.uniform(4, 14)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    sig = signal.SIGKILL if kind == "sigkill" else signal.SIGTERM
                    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                        p.send_signal(sig)
            try:
                out, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"attempt {attempt} ({kind}) hung:\n" + "\n".join(log))
            log.append(f"attempt {attempt}: {kind} {extra.get(failpoints.VARIABLE, '')} -> exit {proc.returncode}")
            if proc.returncode == 0:
                break
            faults += 1
            assert proc.returncode in (-9, 75, 137), "\n".join(log) + f"\n{out[-3000:]}\n{err[-5000:]}"
            time.sleep(0.5)
        else:
            pytest.fail("the run never completed:\n" + "\n".join(log))
        store_faults = proxy.throttled + proxy.resets
    print("\n".join(log), f"\nstore faults: {proxy.throttled} throttled, {proxy.resets} reset")
    assert faults >= 3 and store_faults > 0, (log, store_faults)
    assert ckpt.latest(url).step == 12
    assert_identical(committed_files(golden), committed_files(url))
