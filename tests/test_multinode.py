"""Multi-node without SLURM: two `accelerate launch` "machines" on 127.0.0.1 (machine rank 0
first), one process each, train together and stay in sync, with DDP and with DeepSpeed ZeRO-2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_train import SMALL, env, free_port

from pipeline.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.multiprocess
@pytest.mark.parametrize("accel_config", ["multi_node.yaml", "deepspeed_zero2.yaml"])
def test_two_machines_on_loopback_train_in_sync(demo_shards, tmp_path, accel_config):
    if accel_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    port = free_port()
    run_dir = tmp_path / "run"
    machines = []
    for machine_rank in (0, 1):  # machine rank 0 hosts the rendezvous: it starts first
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / accel_config), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), str(REPO / "launch" / "train.py"), "--config", "pix2pix_demo",
               f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.016",
               "checkpoint.every_kimg=0.008", "data.workers=1", *SMALL]
        machines.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                                         start_new_session=True))
    outputs = []
    try:
        outputs = [m.communicate(timeout=300) for m in machines]
    except subprocess.TimeoutExpired:
        for m in machines:
            m.kill()
        outputs = [m.communicate() for m in machines]
        pytest.fail("machines timed out:\n" + "\n".join(err[-3000:] for _, err in outputs))
    for i, (m, (_, err)) in enumerate(zip(machines, outputs)):
        assert m.returncode == 0, f"machine {i}:\n{err[-5000:]}"
    found = ckpt.latest(str(run_dir))
    assert found.record["world_size"] == 2 and found.record["nimg"] == 16
    ranks = [ckpt.load_tensors(found.file(f"rank-{r:03d}.pt")) for r in (0, 1)]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    backend = "deepspeed" if accel_config.startswith("deepspeed") else "ddp"
    assert ckpt.read_json(found.file("state.json"))["backend"] == backend
