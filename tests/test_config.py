"""Config parsing and the small pure pieces of the engine: EMA decay, LR schedule, instance
noise, per-network loss scalers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import Config, ConfigError, from_dict, load_config, to_dict
from pipeline.dist import DDPEngine
from pipeline.losses.regularizers import instance_noise
from pipeline.train.ema import ema_beta, make_ema, update_ema
from pipeline.train.loop import lr_factor


def test_overrides_are_typed():
    cfg = load_config("pix2pix_demo", ["data.crop_size=128x64", "train.batch_per_device=2", "data.flip=false",
                                       "model.ema_rampup=none", "model.lr_D=4e-4", "run.dir=s3://b/{config}"])
    assert cfg.data.crop_size == (128, 64)
    assert cfg.train.batch_per_device == 2 and cfg.data.flip is False and cfg.model.ema_rampup is None
    assert cfg.model.lr_D == 4e-4 and cfg.run.dir == "s3://b/pix2pix_demo"


@pytest.mark.parametrize("override, message", [
    ("data.crop_size=128", "data.crop_size: expected 2 values such as 256,128, got '128'"),
    ("data.flip=maybe", "data.flip: expected true or false, got 'maybe'"),
    ("train.batch_size=2.5", "train.batch_size: expected an int, got '2.5'"),
    ("model.beta1=1.5", "model.beta1: 1.5 is above the maximum 1.0"),
    ("model.family=stylegan9",
     "model.family: 'stylegan9' is not allowed; choose one of: pix2pix, pix2pixhd, dcgan, cyclegan"),
    ("train.batch_per_device=3", "train.batch_size=4 must be a multiple of train.batch_per_device=3"),
    ("model.lambda_A=10", "unknown key 'model.lambda_A'; model (pix2pix) has: family, init_from, ema_kimg"),
    ("loss.gan=lsgan", "unknown key 'loss.gan' (loss.gan is now model.gan); keys are <section>.<name>"),
    ("optim.lr_G=1e-4", "unknown key 'optim.lr_G'; optim.lr_G is now model.lr_G; optim has: schedule"),
    ('data.storage_options={"key": oops}', "data.storage_options: expected a JSON mapping"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("pix2pix_demo", [override])
    assert message in str(err.value)


def test_the_model_section_is_the_family_s_own_with_its_paper_defaults():
    cyclegan = load_config(None, ["model.family=cyclegan"]).model
    assert (cyclegan.lambda_A, cyclegan.lambda_identity, cyclegan.pool_size, cyclegan.gan) == (10.0, 0.5, 50, "lsgan")
    hd = load_config("pix2pixhd_cityscapes").model
    assert (hd.num_D, hd.norm, hd.gan, hd.feat_weight, hd.vgg_weight) == (2, "instance", "lsgan", 10, 10)
    assert hd.ema_kimg == 0  # no EMA in the paper
    # A later model.family chooses the section before any key is set (an override beats the file).
    cfg = load_config("dcgan_folder64", ["model.family=cyclegan", "data.url=x"])
    assert type(cfg.model).__name__ == "CycleGANConfig" and cfg.model.lambda_B == 10.0
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="model.gp_weight and model.weight_clip are alternatives"):
        load_config("wgangp_demo", ["model.weight_clip=0.01"])
    with pytest.raises(ConfigError, match=r"model.gan=rpgan regularises D with R1 \+ R2 \(model.gamma\)"):
        load_config("wgangp_demo", ["model.gan=rpgan"])
    with pytest.raises(ConfigError, match="model.gamma .R1 . R2. belongs to model.gan=rpgan, not wgan"):
        load_config("wgangp_demo", ["model.gamma=1"])


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


def test_linear_and_step_decay_schedules_in_kimg():
    cfg = Config()
    cfg.train.total_kimg, cfg.optim.schedule, cfg.optim.decay_start_kimg = 200, "linear", 100
    assert [lr_factor(cfg, n) for n in (0, 100_000, 150_000, 200_000)] == [1.0, 1.0, 0.5, 0.0]
    cfg.optim.schedule = "constant"
    assert lr_factor(cfg, 150_000) == 1.0
    cfg.optim.schedule = "step"  # SRGAN's: 1e-4, then 1e-5 for the second half
    assert [lr_factor(cfg, n) for n in (0, 99_999, 100_000, 200_000)] == [1.0, 1.0, 0.1, 0.1]


def test_instance_noise_decays_linearly_to_zero():
    x = torch.zeros(4, 3, 8, 8)
    for nimg, sigma in ((0, 0.2), (5000, 0.1), (10_000, 0.0), (20_000, 0.0)):
        torch.manual_seed(0)
        noisy = instance_noise(x, 0.2, 10, nimg)
        torch.manual_seed(0)
        assert torch.equal(noisy, x + sigma * torch.randn_like(x)) if sigma else noisy is x
    torch.manual_seed(0)
    constant = instance_noise(x, 0.2, 0, 10**6)  # no span: constant
    torch.manual_seed(0)
    assert torch.equal(constant, 0.2 * torch.randn_like(x))


def test_fp16_keeps_one_loss_scaler_per_optimizer():
    # Each engine (one per declared optimizer) has its scaler: an overflow in D's gradients lowers
    # D's scale only, and D's step is the scaler's to skip.
    nets = {k: torch.nn.Linear(2, 1) for k in "GD"}
    engines = {k: DDPEngine(k, {k: nets[k]}, torch.optim.SGD(nets[k].parameters(), lr=0.1),
                            torch.amp.GradScaler("cpu"), grad_clip=0.0) for k in "GD"}
    before = {k: nets[k].weight.detach().clone() for k in "GD"}
    for k, engine in engines.items():
        engine.backward(nets[k](torch.ones(1, 2)).sum() * (math.inf if k == "D" else 1.0))
        assert engine.check(nimg=0)  # fp16 overflow is not a bad step of ours
        engine.step(skip=False)
    assert engines["D"].scaler.get_scale() < engines["G"].scaler.get_scale() == 2.0**16
    assert torch.equal(nets["D"].weight, before["D"]) and not torch.equal(nets["G"].weight, before["G"])
    assert set(engines["G"].state_dicts()) == {"opt", "scaler"}


def test_a_sidecar_without_inception_weights_is_refused_before_launch(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.sidecar=true needs eval.inception_weights=PATH, torch-fidelity's "
                                          r"weights-inception-2015-12-05-6726825d.pth"):
        load_config("pix2pix_demo", ["eval.sidecar=true"])
    with pytest.raises(ConfigError, match=f"eval.inception_weights={tmp_path}/no.pth: no such file"):
        load_config("pix2pix_demo", ["eval.sidecar=true", f"eval.inception_weights={tmp_path}/no.pth"])
    (tmp_path / "w.pth").write_bytes(b"")
    assert load_config("pix2pix_demo", ["eval.sidecar=true", f"eval.inception_weights={tmp_path}/w.pth"]).eval.sidecar


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from pipeline.train.loop import resolve_precision

    for caps, want in (({"avx2": True, "avx512_bf16": False}, "fp32"), ({"avx512_bf16": True}, "bf16"),
                       ({"amx_bf16": True}, "bf16"), ({"architecture": "arm64", "bf16": True}, "bf16")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        precision, why = resolve_precision("auto", "cpu")
        assert precision == want and why.startswith("auto: this CPU "), (caps, precision, why)
        assert resolve_precision("fp32", "cpu") == ("fp32", "configured")
        assert resolve_precision("fp16", "cpu") == ("fp16", "configured")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert resolve_precision("bf16", "cpu") == (
        "bf16", "configured; this CPU has no native bf16, so it is emulated and slower than fp32")
    # On CUDA only hardware bf16 counts (Ampere+), not torch's emulation on older GPUs.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "cuda") == ("fp32", "auto: this GPU has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "cuda") == ("bf16", "auto: this GPU computes bf16 natively")


def test_a_launcher_precision_is_honoured_or_refused_never_ignored():
    from pipeline.config import launcher_precision

    assert launcher_precision("auto", None) is None and launcher_precision("fp32", "no") is None
    assert launcher_precision("auto", "bf16") == "bf16" and launcher_precision("fp16", "FP16") == "fp16"
    with pytest.raises(ConfigError, match=r"^accelerate launch --mixed_precision bf16 contradicts "
                                          r"train.precision=fp32: drop the launcher flag"):
        launcher_precision("fp32", "bf16")
    with pytest.raises(ConfigError, match=r"^accelerate launch --mixed_precision fp8: not supported here"):
        launcher_precision("auto", "fp8")
