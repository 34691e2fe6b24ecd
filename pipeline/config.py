"""Typed run configuration: the only place where field names, defaults and allowed values live.

A named config (``configs/<name>.yaml``) holds only what differs from these defaults;
``key=value`` overrides follow. Loading is strict: an unknown key, a bad type or a value out of
range fails before any process starts, naming the key and the allowed keys or values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # configs/ in a checkout (a link), in the wheel


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def choice(default, *allowed, doc: str = ""):
    return field(default=default, metadata={"choices": allowed, "doc": doc})


def field_choices(section: type, name: str) -> tuple:
    """The values a ``choice`` field of a config section allows (for a CLI flag of the same key)."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["choices"]


def bounded(default, lo=None, hi=None, doc: str = ""):
    return field(default=default, metadata={"min": lo, "max": hi, "doc": doc})


@dataclass
class RunConfig:
    dir: str = "runs/{config}"  # any fsspec URL; {config} is the config's name
    seed: int = bounded(0, 0, 2**63 - 1)
    # auto: continue from the newest usable checkpoint, or start (refusing when checkpoints exist
    # and none is usable); never: start over (refused when usable checkpoints exist); must: resume.
    resume: str = choice("auto", "auto", "never", "must")
    lease_sec: float = bounded(60.0, 5.0, 3600.0)  # the run.dir lease lapses this long after its last renewal
    lease_wait_sec: float = bounded(120.0, 0.0, 86400.0)  # how long a second job waits for it, then refuses
    # Keys (comma-separated) a resume may change beyond those that never matter (SAFE_ON_RESUME).
    accept_changes: str = ""
    # Experiment trackers beside TensorBoard, comma-separated: wandb, mlflow (train/trackers.py).
    trackers: str = ""
    project: str = "gan-pipeline"  # the trackers' project (W&B) or experiment (MLflow)


@dataclass
class DataConfig:
    url: str = "shards/demo"  # shard directory or manifest URL
    split: str = "train"  # what training reads (a family with two domains adds A and B: trainA, trainB)
    val_split: str = "val"  # what image grids and the evaluator read
    workers: int = bounded(2, 0, 64)  # DataLoader workers per rank (per stream)
    load_size: tuple[int, int] | None = None  # (W, H) resize before crop; None keeps the stored size
    crop_size: tuple[int, int] | None = None  # (W, H) random crop in training, centred in evaluation
    flip: bool = True
    shuffle_buffer: int = bounded(256, 1)  # samples held for shuffling, per DataLoader worker
    shuffle_buffer_mb: float = bounded(256.0, 1.0)  # and at most this many MB of their encoded bytes
    max_bad_samples: int = bounded(100, 0)
    storage_options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The ``model`` section every family's own section extends (``Family.config``): its networks,
    losses and optimizer hyperparameters, with the paper's and official code's defaults."""

    family: str = "pix2pix"
    init_from: str | None = None  # checkpoint/snapshot/run URL whose networks initialise this run
    ema_kimg: float = bounded(0.0, 0.0)  # EMA half-life in kimg of the networks that have one; 0: none
    ema_rampup: float | None = None  # half-life <= ema_rampup * kimg seen (StyleGAN2-ADA), None: no ramp-up

    def check(self) -> None:
        """Checks across this section's keys (``ConfigError``)."""

    def deepspeed_limits(self) -> None:
        """What this family's options need from DDP that ZeRO engines cannot give (``ConfigError``)."""

    def check_files(self) -> None:
        """Before training (not for ``--dry-run``): the local files this section names are there
        (``ConfigError``)."""


@dataclass
class OptimConfig:
    schedule: str = choice("constant", "constant", "linear", "step")
    decay_start_kimg: float = bounded(0.0, 0.0)  # linear: constant until here, then to 0 at total_kimg
    step_factor: float = bounded(0.1, 0.0, 1.0)  # step: the lr times this from decay_start_kimg on (SRGAN)
    grad_clip: float = bounded(0.0, 0.0)  # max grad norm; 0 disables
    # Adam implementation: fused is fastest on CPU and CUDA and needs no full-size temporaries
    # (foreach allocates one as large as the network: +183 MB and ~1.9x the optimizer time for
    # pix2pixHD's G on CPU, bench/pix2pixhd_step.py).
    adam: str = choice("fused", "fused", "foreach", "for-loop")


@dataclass
class TrainConfig:
    total_kimg: float = bounded(100.0, 0.0)
    batch_size: int = bounded(1, 1)  # global, over all ranks and accumulation steps
    batch_per_device: int | None = None  # None: batch_size / world size (no accumulation)
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16",
                            doc="auto: bf16 where the GPU or CPU computes it natively, else fp32")
    channels_last: bool = False
    compile: bool = False
    log_every_kimg: float = bounded(1.0, 0.0)
    image_every_kimg: float = bounded(10.0, 0.0)
    num_images: int = bounded(8, 1)
    histograms: bool = False
    max_bad_steps: int = bounded(5, 1)  # consecutive skipped steps before a rollback
    max_rollbacks: int = bounded(2, 0)
    progress: bool = True
    # Testing aids: rank ``debug_nan_rank`` multiplies the first phase's loss by NaN for
    # ``debug_nan_count`` steps from ``debug_nan_step`` on, to exercise the divergence guard.
    debug_nan_step: int | None = None
    debug_nan_count: int = bounded(1, 1)
    debug_nan_rank: int = bounded(0, 0)


@dataclass
class DistributedConfig:
    # auto: DeepSpeed when `accelerate launch` was given a DeepSpeed config file
    # (launch/accelerate/deepspeed_zero2.yaml sets ACCELERATE_USE_DEEPSPEED), else DDP.
    backend: str = choice("auto", "auto", "ddp", "deepspeed")
    # ZeRO stage of the engines (one per optimizer: optimizer state, and at 2 gradients,
    # partitioned over ranks); None: the launcher's deepspeed_config zero_stage, else 2. Stage 3
    # is not supported: EMA copies, snapshots and the evaluator need every parameter on every rank.
    zero_stage: int | None = choice(None, None, 1, 2)
    reduce_bucket_mb: float = bounded(200.0, 1.0)  # DeepSpeed's reduce_bucket_size / allgather_bucket_size
    # How long a rank waits in a collective for the others before the job stops with a message.
    timeout_sec: float = bounded(600.0, 5.0, 86400.0)


@dataclass
class CheckpointConfig:
    every_kimg: float = bounded(10.0, 0.0)
    keep_last: int = bounded(2, 2)  # checkpoints that verify
    # Snapshots (the networks for evaluation and inference): None keeps every one; a number keeps
    # the newest that many, and always those not evaluated yet and the best one.
    keep_snapshots: int | None = None


@dataclass
class EvalConfig:
    sidecar: bool = False  # start one evaluator process beside the main training process
    inception_weights: str | None = None  # local torch-fidelity InceptionV3 weights (never downloaded)
    lpips_weights: str | None = None  # local LPIPS (AlexNet) weights; None leaves LPIPS out
    policy: str = choice("all", "all", "latest", "every_k")
    every_k: int = bounded(1, 1)
    max_samples: int | None = None  # translation: cap on input samples (None: the whole split)
    num_samples: int = bounded(1000, 2)  # unconditional: generated images from fixed latents
    batch_size: int = bounded(16, 1)
    kid_subset_size: int = bounded(1000, 2)
    diversity_pairs: int = bounded(500, 0)  # unconditional: MS-SSIM over this many pairs of images; 0: off
    seed: int = bounded(0, 0)
    reference_cache: str | None = None  # URL for real-image features, shareable by runs (None: run.dir/eval/refstats)
    poll_sec: float = bounded(10.0, 0.1)
    best_metric: str = choice("fid", "fid", "intra_fid", "kid", "lpips", "psnr", "ssim", "psnr_y", "ssim_y")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the family's own section (a subclass)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "unnamed"


# ---------------------------------------------------------------- parsing and validation

def _article(tp: type) -> str:
    return {"int": "an int", "float": "a number"}.get(tp.__name__, tp.__name__)


def _parse_scalar(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _parse_scalar(key, args[0], value)
    if origin is tuple:
        parts = value.replace("x", ",").split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # any length: "16,32", [16, 32], or "" for none
            parts = [p for p in parts if not isinstance(p, str) or p.strip()]
            return tuple(_parse_scalar(key, args[0], p) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values such as 256,128, got {value!r}")
        return tuple(_parse_scalar(key, a, p) for a, p in zip(args, parts))
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a JSON mapping such as {{\"key\": \"value\"}}, got {value!r}") \
                    from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {_article(tp)}, got {value!r}")
        try:
            number = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {_article(tp)}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if tp is float and not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


# Caps for numbers whose field names none: beyond them a value is a typo, and would overflow or
# stall later (an int64 seed, kimg times 1000 as an int) instead of failing here.
MAX_INT, MAX_FLOAT = 2**31 - 1, 1e12


def _check_field(key: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if hi is None and isinstance(value, int | float) and not isinstance(value, bool):
        hi = MAX_INT if isinstance(value, int) else MAX_FLOAT
    if value is not None and lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if value is not None and hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")


# Keys of earlier versions, and where they are now (a family's own options moved into ``model``).
MOVED = {"loss.": "model.", "optim.lr_G": "model.lr_G", "optim.lr_D": "model.lr_D", "optim.beta1": "model.beta1",
         "optim.beta2": "model.beta2", "optim.n_critic": "model.n_critic",
         "train.ema_halflife_kimg": "model.ema_kimg", "train.ema_rampup": "model.ema_rampup",
         "train.fix_global_kimg": "model.fix_global_kimg"}


def family_names() -> list[str]:
    from .families import FAMILIES  # the registry imports the families, which import this module

    return list(FAMILIES)


def model_section(family: str) -> ModelConfig:
    """A fresh ``model`` section of ``family`` (its defaults), or a ``ConfigError``."""
    from .families import FAMILIES

    if family not in FAMILIES:
        raise ConfigError(f"model.family: {family!r} is not allowed; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[family].config()


def _set(cfg: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "name"}
    moved = next((new + key[len(old):] if old.endswith(".") else new for old, new in MOVED.items()
                  if key == old or (old.endswith(".") and key.startswith(old))), None)
    if section_name not in sections or not name:
        hint = f" ({key} is now {moved})" if moved else ""
        raise ConfigError(f"unknown key {key!r}{hint}; keys are <section>.<name> with sections: {', '.join(sections)}")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        where = f"model ({section.family})" if section_name == "model" else section_name
        hint = f"; {key} is now {moved}" if moved else ""
        raise ConfigError(f"unknown key {key!r}{hint}; {where} has: {', '.join(fields)}")
    hints = typing.get_type_hints(type(section))
    parsed = _parse_scalar(key, hints[name], value)
    _check_field(key, fields[name], parsed)
    setattr(section, name, parsed)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown config {name!r}; shipped configs: {', '.join(known)} (or give a .yaml path, "
                      "or a run's config.json)")


def _read_saved(path: Path) -> dict:
    """A config saved by a run (``to_dict``), less the credentials it never held."""
    try:
        tree = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not a JSON config: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    data = tree.get("data")
    if isinstance(data, dict) and isinstance(data.get("storage_options"), dict):
        data["storage_options"] = {k: v for k, v in data["storage_options"].items() if v != "<redacted>"}
    return tree


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # e.g. a python/object tag: safe_load constructs no objects
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not a plain YAML mapping{where}: {what}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return tree


def _build(items: list[tuple[str, Any]], name: str) -> Config:
    """A config from ``(key, value)`` assignments in order; ``model.family`` (the last one given)
    decides the ``model`` section's type before any key is set."""
    family = ModelConfig.family
    for key, value in items:
        if key == "model.family":
            family = _parse_scalar(key, str, value)
    cfg = Config(model=model_section(family), name=name)
    for key, value in items:
        if key != "model.family":
            _set(cfg, key, value)
    return cfg


def load_config(name: str | None, overrides: list[str] = ()) -> Config:
    """Defaults (the family's, for ``model``), then the named config's differences, then
    ``key=value`` overrides."""
    items: list[tuple[str, Any]] = []
    config_name = "unnamed"
    if name:
        path = resolve_config_path(name)
        if path.suffix == ".json":  # a run's own config.json: everything resolved, its name inside
            tree = _read_saved(path)
            config_name = str(tree.pop("name", path.stem))
        else:
            tree, config_name = _read_yaml(path), path.stem
        items += list(_flatten(tree).items())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        items.append((key.strip(), value.strip()))
    cfg = _build(items, config_name)
    validate(cfg)
    cfg.run.dir = cfg.run.dir.replace("{config}", cfg.name)
    return cfg


_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def validate(cfg: Config) -> None:
    """Checks that involve more than one key; nothing is rewritten."""
    t = cfg.train
    if t.batch_per_device is not None and t.batch_size % t.batch_per_device:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                          f"train.batch_per_device={t.batch_per_device}")
    cfg.model.check()
    weights = cfg.eval.inception_weights
    if cfg.eval.sidecar and not weights:
        raise ConfigError(f"eval.sidecar=true needs eval.inception_weights=PATH, torch-fidelity's {_INCEPTION} "
                          "(nothing is downloaded; the README says where to get it)")
    if cfg.eval.sidecar and "://" not in weights and not Path(weights).is_file():
        raise ConfigError(f"eval.inception_weights={weights}: no such file (torch-fidelity's {_INCEPTION}; the "
                          "README says where to get it)")
    if cfg.distributed.backend == "deepspeed":
        deepspeed_limits(cfg)
    from .train.trackers import check

    if why := check(cfg.run.trackers):
        raise ConfigError(why)


def deepspeed_limits(cfg: Config) -> None:
    """What the DeepSpeed engines cannot do that DDP can; also checked at start-up when
    ``distributed.backend=auto`` resolves to deepspeed."""
    cfg.model.deepspeed_limits()
    if cfg.train.compile:
        raise ConfigError("train.compile needs distributed.backend=ddp (DeepSpeed engines are not compiled here)")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs distributed.backend=ddp; with deepspeed choose one of: "
                          "auto, fp32, bf16 (DeepSpeed has no fp16 on CPU, so that path is untested here)")


def launcher_precision(precision: str, launcher: str | None) -> str | None:
    """The precision ``accelerate launch --mixed_precision X`` asks for (it reaches each rank as
    ``ACCELERATE_MIXED_PRECISION``), honoured as ``train.precision`` or refused: never ignored.
    None when the launcher asks for nothing ("no" is also its default)."""
    launcher = (launcher or "no").strip().lower()
    if launcher == "no":
        return None
    if launcher not in ("bf16", "fp16"):
        raise ConfigError(f"accelerate launch --mixed_precision {launcher}: not supported here; launch with "
                          f"--mixed_precision no and set train.precision to one of: fp32, bf16, fp16")
    if precision not in ("auto", launcher):
        raise ConfigError(f"accelerate launch --mixed_precision {launcher} contradicts train.precision={precision}: "
                          f"drop the launcher flag (or the launch file's mixed_precision), or set "
                          f"train.precision={launcher}")
    return launcher


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain JSON-able data, storage credentials left out."""
    d = dataclasses.asdict(cfg)
    if d["data"]["storage_options"]:
        d["data"]["storage_options"] = {k: "<redacted>" for k in d["data"]["storage_options"]}
    return d


# What a resumed run may change unasked: its length, logging, checkpointing, evaluation, data
# loading and the job's plumbing. Any other difference changes the training that goes on.
SAFE_ON_RESUME = ("name", "run.resume", "run.lease_sec", "run.lease_wait_sec", "run.accept_changes", "run.trackers",
                  "run.project",
                  "train.total_kimg", "train.log_every_kimg", "train.image_every_kimg", "train.num_images",
                  "train.progress", "train.histograms", "train.max_bad_steps", "checkpoint.", "eval.",
                  "data.workers", "data.storage_options", "data.max_bad_samples", "distributed.timeout_sec")


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """How ``cfg`` differs from the config a checkpoint was written with: ``(accepted, refused)``,
    each as ``"key old -> new"``. Accepted: ``SAFE_ON_RESUME`` and ``run.accept_changes``."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    accept = {k.strip() for k in cfg.run.accept_changes.split(",") if k.strip()}
    accepted, refused = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if key == "run.dir" or json.dumps(a) == json.dumps(b):  # tuples were saved as lists
            continue
        # A key the saved config lacks is one this version added, at its default unless given.
        safe = key not in old or key in accept or any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_ON_RESUME)
        (accepted if safe else refused).append(f"{key} {a!r} -> {b!r}")
    return accepted, refused


def from_dict(data: dict) -> Config:
    """Rebuild a config saved by ``to_dict`` (same strict checks)."""
    cfg = _build(list(_flatten({k: v for k, v in data.items() if k != "name"}).items()), data.get("name", "unnamed"))
    return cfg
