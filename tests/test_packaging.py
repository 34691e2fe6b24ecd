"""The wheel as a user installs it: the shipped configs inside, the commands working from another
directory; and a run's own config.json accepted by --config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from test_train import explain, run

from pipeline.config import load_config, to_dict

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


def test_a_run_s_config_json_is_a_config(tmp_path):
    """What a run saves as config.json (``to_dict``, credentials redacted) loads back as the same
    config, with overrides on top, and gan-train accepts the file."""
    cfg = load_config("pix2pix_demo", [f"run.dir={tmp_path / 'run'}", "model.lr_G=0.0003",
                                       'data.storage_options={"key": "secret"}'])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(to_dict(cfg)))
    again = load_config(str(saved), ["train.total_kimg=0.008"])
    assert again.data.storage_options == {} and again.train.total_kimg == 0.008
    again.data.storage_options, again.train.total_kimg = cfg.data.storage_options, cfg.train.total_kimg
    assert again == cfg
    r = run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(saved), "--dry-run"], timeout=60)
    assert r.returncode == 0 and f"run directory: {tmp_path / 'run'}" in r.stdout, explain(r)
