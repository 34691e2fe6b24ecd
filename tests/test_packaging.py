"""The wheel as a user installs it: the shipped configs inside, the commands working from another
directory; and a run's own config.json accepted by --config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from test_train import SMALL, explain, launch_cmd, run

from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_configs_and_gan_train_finds_them(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "--quiet", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("gan_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("pipeline/configs/")) == shipped
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # From an unrelated directory, the installed package first on the path (not this checkout).
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([str(target / "bin" / "gan-train"), "--config", "pix2pixhd_cityscapes", "--dry-run"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run directory: runs/pix2pixhd_cityscapes" in r.stdout and "G: HDGenerator" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.stdout.strip().startswith(str(target)), r.stdout + r.stderr


def test_a_run_s_config_json_is_a_config(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", "train.total_kimg=0.004",
                           "data.workers=0", "model.lr_G=0.0003", *SMALL]))
    assert r.returncode == 0, explain(r)
    saved = run_dir / "config.json"
    cfg = load_config(str(saved), ["train.total_kimg=0.008"])
    assert (cfg.name, cfg.run.dir, cfg.model.lr_G) == ("pix2pix_demo", str(run_dir), 0.0003)
    assert cfg.train.total_kimg == 0.008 and json.loads(saved.read_text())["train"]["total_kimg"] == 0.004
    r = run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(saved), "train.total_kimg=0.008"])
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
