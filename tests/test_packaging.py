"""What a user installs and launches with: the wheel (the shipped configs inside, the commands
working from another directory), a run's own config.json accepted by --config, the Docker entry
point's process count and GPU check, and accelerate's precision flag honoured or refused."""

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


def entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The Docker image's entry point, run from this checkout (no Docker engine here)."""
    full = {**os.environ, "APP": str(REPO), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", str(REPO / "launch" / "docker-entrypoint.sh"), *args], capture_output=True,
                          text=True, timeout=180, env=full, cwd=REPO)


def test_the_image_refuses_to_train_on_the_cpu_unless_asked():
    r = entrypoint("train", "--config", "pix2pixhd_cityscapes", "--dry-run")
    assert r.returncode == 2, explain(r)
    assert r.stderr.strip().splitlines()[-1] == (
        "gan-pipeline: no GPU is visible in the container: run it with --gpus all (NVIDIA container toolkit), "
        "or set -e DEVICE=cpu to train on the CPU")
    r = entrypoint("train", "--dry-run", DEVICE="tpu")
    assert r.returncode == 2 and "DEVICE=tpu is not one of: gpu (the default), cpu" in r.stderr, explain(r)


def test_the_image_trains_on_the_cpu_when_asked_with_its_process_count():
    r = entrypoint("train", "--config", "pix2pixhd_cityscapes", "--dry-run", DEVICE="cpu", NPROC="2")
    assert r.returncode == 0, explain(r)
    assert "gan-pipeline: 2 training processes (cpu; 0 GPUs visible)" in r.stderr
    # accelerate started two ranks, each of which resolved the config.
    assert r.stdout.count("run directory: runs/pix2pixhd_cityscapes") == 2, explain(r)


def test_accelerate_launch_mixed_precision_reaches_every_rank_or_is_refused():
    def launch(*args):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--mixed_precision", "bf16",
               str(REPO / "launch" / "train.py"), "--config", "pix2pixhd_cityscapes", "--dry-run", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})

    r = launch()
    assert r.returncode == 0, explain(r)
    assert r.stdout.count('"precision": "bf16"') == 2, explain(r)
    # Refused: the variable the launcher set above, given to one process (no second launch needed).
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", "pix2pixhd_cityscapes",
                        "--dry-run", "train.precision=fp32"], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert r.returncode == 2, explain(r)
    assert r.stderr.strip() == ("gan-train: config error: accelerate launch --mixed_precision bf16 contradicts "
                                "train.precision=fp32: drop the launcher flag (or the launch file's "
                                "mixed_precision), or set train.precision=bf16"), explain(r)


def test_s3_urls_without_s3fs_name_the_extra_to_install():
    # s3fs is the `s3` extra, not a core dependency: without it an s3:// URL is one line saying what to install.
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from pipeline.train.cli import main\n"
            "sys.exit(main(['--config', 'pix2pix_demo', 'data.url=s3://bucket/shards', '--dry-run']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("gan-train: error: s3://bucket/shards/manifest.json: Install s3fs "
                                                 "to access S3: pip install 'gan-pipeline[s3]'")
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("s3fs") for d in project["dependencies"])
    assert project["optional-dependencies"]["s3"] == ["s3fs>=2024.6"]
