"""Config parsing and the small pure pieces of the engine: EMA decay, LR schedule, instance
noise, per-network loss scalers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import Config, ConfigError, load_config, to_dict
from pipeline.train.ema import ema_beta, make_ema, update_ema
from pipeline.train.family import DataInfo, StepContext
from pipeline.train.loop import lr_factor, make_scalers


def test_overrides_are_typed():
    cfg = load_config("pix2pix_demo", ["data.crop_size=128x64", "train.batch_per_device=2", "data.flip=false",
                                       "train.ema_rampup=none", "optim.lr_D=4e-4", "run.dir=s3://b/{config}"])
    assert cfg.data.crop_size == (128, 64)
    assert cfg.train.batch_per_device == 2 and cfg.data.flip is False and cfg.train.ema_rampup is None
    assert cfg.optim.lr_D == 4e-4 and cfg.run.dir == "s3://b/pix2pix_demo"


@pytest.mark.parametrize("override, message", [
    ("data.crop_size=128", "data.crop_size: expected 2 values such as 256,128, got '128'"),
    ("data.flip=maybe", "data.flip: expected true or false, got 'maybe'"),
    ("train.batch_size=2.5", "train.batch_size: expected an int, got '2.5'"),
    ("optim.beta1=1.5", "optim.beta1: 1.5 is above the maximum 1.0"),
    ("model.family=stylegan9", "model.family: 'stylegan9' is not allowed; choose one of: pix2pix, pix2pixhd, dcgan"),
    ("train.batch_per_device=3", "train.batch_size=4 must be a multiple of train.batch_per_device=3"),
    ("loss.weight_clip=0.01", "loss.gp_weight and loss.weight_clip are alternatives"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    extra = ["loss.gp_weight=10"] if "weight_clip" in override else []
    with pytest.raises(ConfigError) as err:
        load_config("pix2pix_demo", [*extra, override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.total_kimg=nan", "train.total_kimg: expected a finite number, got 'nan'"),
    ("train.total_kimg=inf", "train.total_kimg: expected a finite number, got 'inf'"),
    ("train.total_kimg=-inf", "train.total_kimg: expected a finite number, got '-inf'"),
    ("train.total_kimg=1e308", "train.total_kimg: 1e+308 is above the maximum 1000000000000.0"),
    ("run.seed=12345678901234567890123", "run.seed: 12345678901234567890123 is above the maximum 9223372036854775807"),
    ("train.batch_size=99999999999", "train.batch_size: 99999999999 is above the maximum 2147483647"),
    ("run.resume=sometimes", "run.resume: 'sometimes' is not allowed; choose one of: auto, never, must"),
])
def test_hostile_values_are_refused_before_anything_runs(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("pix2pix_demo", [override])
    assert str(err.value) == message


def test_a_yaml_file_with_a_python_tag_is_a_one_line_refusal(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(f"train:\n  total_kimg: !!python/object/apply:os.system ['touch {tmp_path}/ran']\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"{path}: not a plain YAML mapping (line 2): could not determine a constructor")
    assert "\n" not in str(err.value) and not (tmp_path / "ran").exists()


def test_unknown_config_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown config 'nope'; shipped configs: .*pix2pix_demo"):
        load_config("nope")


def test_credentials_never_reach_the_saved_config():
    cfg = load_config("pix2pix_demo", ['data.storage_options={"key": "AKIA", "secret": "s3cr3t"}'])
    assert cfg.data.storage_options == {"key": "AKIA", "secret": "s3cr3t"}
    assert "s3cr3t" not in str(to_dict(cfg))


def test_ema_half_life_means_half_weight_after_that_many_images():
    beta = ema_beta(batch_size=32, nimg=10**9, halflife_kimg=10, rampup=None)
    assert beta ** (10_000 / 32) == pytest.approx(0.5)
    # Ramp-up: early on the half-life is capped at rampup * images seen.
    assert ema_beta(32, nimg=1000, halflife_kimg=10, rampup=0.05) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(32, 0, 10, 0.05) == 0.0 and ema_beta(32, 10**6, 0, None) == 0.0


def test_ema_update_moves_parameters_and_copies_buffers():
    G = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    G_ema = make_ema(G)
    assert not any(p.requires_grad for p in G_ema.parameters())
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G[1].running_mean.fill_(3.0)
    before = [p.clone() for p in G_ema.parameters()]
    update_ema(G_ema, G, beta=0.75)
    for p_ema, p0, p in zip(G_ema.parameters(), before, G.parameters()):
        assert torch.allclose(p_ema, 0.75 * p0 + 0.25 * p)
    assert torch.equal(G_ema[1].running_mean, G[1].running_mean)


def test_linear_decay_schedule_in_kimg():
    cfg = Config()
    cfg.train.total_kimg, cfg.optim.schedule, cfg.optim.decay_start_kimg = 200, "linear", 100
    assert [lr_factor(cfg, n) for n in (0, 100_000, 150_000, 200_000)] == [1.0, 1.0, 0.5, 0.0]
    cfg.optim.schedule = "constant"
    assert lr_factor(cfg, 150_000) == 1.0


def test_instance_noise_decays_linearly_to_zero():
    cfg = Config()
    cfg.loss.instance_noise, cfg.loss.instance_noise_kimg = 0.2, 10
    ctx = StepContext(None, None, None, None, cfg, DataInfo("unconditional", None, ("image",)))
    sigmas = []
    for nimg in (0, 5000, 10_000, 20_000):
        ctx.nimg = nimg
        sigmas.append(ctx.instance_noise())
    assert sigmas == [pytest.approx(0.2), pytest.approx(0.1), 0.0, 0.0]


def test_fp16_keeps_one_loss_scaler_per_network():
    scalers = make_scalers("fp16", torch.device("cpu"))
    assert set(scalers) == {"G", "D"} and scalers["G"] is not scalers["D"]
    assert make_scalers("bf16", torch.device("cpu")) is None and make_scalers("fp32", torch.device("cpu")) is None
    # An overflow in D's gradients lowers D's scale only.
    nets = {k: torch.nn.Linear(2, 1) for k in "GD"}
    opts = {k: torch.optim.SGD(nets[k].parameters(), lr=0.1) for k in "GD"}
    for k in "GD":
        loss = nets[k](torch.ones(1, 2)).sum() * (math.inf if k == "D" else 1.0)
        scalers[k].scale(loss).backward()
        scalers[k].step(opts[k])
        scalers[k].update()
    assert scalers["D"].get_scale() < scalers["G"].get_scale() == 2.0**16
