"""Distribution metrics: torch-fidelity's InceptionV3 features from a local weights file, FID and KID
through torch-fidelity's own functions, a cache of reference-set features, and the protocol record
that goes beside every number.

Nothing here touches process state: evaluator processes each extract features for their share of
the samples, the watcher gathers them, and passes the gathered ``[N, 2048]`` tensors in here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from io import BytesIO
from typing import Any

import torch

from .. import io
from ..data.manifest import manifest_url

log = logging.getLogger(__name__)

EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name: the TF-Inception port used for FID
FEATURE_LAYER = "2048"  # the pool3 features FID and KID are defined on
FEATURE_DIMS = 2048
INCEPTION_RESOLUTION = 299
# How torch-fidelity brings any input size to 299x299: TF1.x-compatible bilinear
# (interpolate_bilinear_2d_like_tensorflow1x, align_corners=False), after which x -> (x - 128) / 128.
INCEPTION_RESIZE = "tf1x-bilinear-299"
# torch-fidelity's feature batch size (its DEFAULTS["batch_size"]): the same batches as its command-line
# tool, whose features ours match bit for bit on CPU (tests/test_metrics.py).
DEFAULT_BATCH_SIZE = 64

# What torch-fidelity 0.4.0 itself downloads (URL_INCEPTION_V3 in feature_extractor_inceptionv3.py):
# the official TF "inception-2015-12-05" graph converted to PyTorch.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]

# The stand-in Inception's marker (``standin.py``): a BatchNorm step counter, which inference never
# reads, set to "STANDIN" in ASCII. The file keeps torch-fidelity's exact layout, so its `fidelity`
# command loads it too.
STANDIN_MARK = ("Conv2d_1a_3x3.bn.num_batches_tracked", int.from_bytes(b"STANDIN", "big"))

REFSTATS_FORMAT = "gan-pipeline-refstats"
REFSTATS_VERSION = 1
REFSTATS_DIR = "refstats"


def missing_weights_message(path: str) -> str:
    return (
        f"InceptionV3 weights not found at {path}.\n"
        f"FID/KID use torch-fidelity's '{EXTRACTOR}' extractor, and nothing is downloaded at run time. "
        f"On a machine with internet, fetch the exact file torch-fidelity would download:\n"
        f"    curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL}\n"
        f"copy it where every evaluator can read it (a local path or any fsspec URL), and pass it as "
        f"--inception-weights PATH (config: eval.inception_weights=PATH)."
    )


def load_tensor_state_dict(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict from torch.save bytes, unpickling nothing but tensors."""
    try:
        state = torch.load(BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        raise ValueError(f"{where} is not a plain tensor state dict saved with torch.save "
                         f"(refusing to unpickle anything else): {exc}") from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{where} does not hold a {{name: tensor}} state dict")
    return dict(state)


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` ('inception-v3-compat', layer '2048') with
    weights from a local file (or any fsspec URL); never downloads.

    ``images_uint8 [N, 3, H, W]`` (uint8, any H and W) -> ``features [N, 2048]`` float32 on the CPU:
    exactly what torch-fidelity feeds ``fid_features_to_statistics`` and ``kid_features_to_metric``
    (its extractor returns float32, and FID's mean is then taken in float32, the covariance in float64).
    The extractor resizes to 299x299 itself (``INCEPTION_RESIZE``).

    ``weights_sha256`` is the SHA-256 of the weights file's bytes, computed once from the same bytes
    that are loaded, for the protocol record; ``standin`` is true for the untrained stand-in
    (``standin.py``), whose numbers must never pass for real FIDs.
    """

    name = EXTRACTOR
    feature_layer = FEATURE_LAYER
    dims = FEATURE_DIMS
    resolution = INCEPTION_RESOLUTION
    resize = INCEPTION_RESIZE

    def __init__(self, weights_path: str, device: str | torch.device = "cpu", *,
                 batch_size: int = DEFAULT_BATCH_SIZE, storage_options: dict | None = None) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights_path = str(weights_path)
        try:
            data = io.read_bytes(weights_path, storage_options)
        except FileNotFoundError as exc:
            raise FileNotFoundError(missing_weights_message(weights_path)) from exc
        self.weights_path = weights_path
        self.weights_sha256 = hashlib.sha256(data).hexdigest()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        # torch-fidelity loads a weights *path* with a full-pickle load (weights_only=False).
        # We load the bytes tensors-only, and hand it a fresh torch.save of that dict instead, so
        # nothing but tensors is ever unpickled from the file (and its tensors land on the CPU first).
        state = load_tensor_state_dict(data, weights_path)
        del data
        mark = state.get(STANDIN_MARK[0])
        self.standin = mark is not None and mark.numel() == 1 and int(mark) == STANDIN_MARK[1]
        clean = BytesIO()
        torch.save(state, clean)
        del state
        clean.seek(0)
        self.model = FeatureExtractorInceptionV3(EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=clean)
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` uint8 -> ``[N, 2048]`` float32 (CPU), in batches of ``batch_size``."""
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images_uint8.dtype} "
                             f"{list(images_uint8.shape)} (see to_uint8)")
        out = [self.model(batch.to(self.device))[0].cpu() for batch in images_uint8.split(self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, FEATURE_DIMS, dtype=torch.float32)

    def protocol(self) -> dict[str, Any]:
        """What identifies these features: extractor, layer, weights, internal resize."""
        return {"extractor": self.name, "feature_layer": self.feature_layer, "feature_dims": self.dims,
                "weights_file": self.weights_path.rstrip("/").rsplit("/", 1)[-1],
                "weights_sha256": self.weights_sha256, "standin": self.standin,
                "extractor_resolution": self.resolution, "extractor_resize": self.resize}


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images ``[N, C, H, W]`` in ``value_range`` -> uint8 ``[N, 3, H, W]``.

    Quantised the way ``torchvision.utils.save_image`` does (``x * 255 + 0.5``, clamped, truncated), so
    the features equal those of the same images saved as PNG and read back by torch-fidelity's folder
    loader. One channel is repeated to three, as PIL's ``convert("RGB")`` does.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {list(images.shape)}")
    lo, hi = value_range
    x = (images.detach().float() - lo) / (hi - lo)
    x = x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------- FID and KID


def _as_features(features: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{what} must be a [N, D] tensor")
    if features.shape[0] < 2:
        raise ValueError(f"{what} has {features.shape[0]} samples; FID and KID need at least 2")
    # float32 on the CPU is what torch-fidelity's extractor hands its metric functions; its FID
    # asserts equal dtypes, and the dtype changes the last digits.
    return features.detach().to("cpu", torch.float32)


def fid_kid(gen_features: torch.Tensor, ref_features: torch.Tensor, *, kid_subsets: int,
            kid_subset_size: int, seed: int) -> dict[str, float | int]:
    """FID and KID between generated ``[N_gen, D]`` and reference ``[N_ref, D]`` features.

    Computed by torch-fidelity's own functions (``fid_features_to_statistics`` +
    ``fid_statistics_to_metric``, ``kid_features_to_metric`` with its default cubic polynomial
    kernel), with generated features as its input 1 and reference features as its input 2 — the
    order its command-line tool uses, which fixes which subsets KID's seeded RNG draws.

    KID subset size: torch-fidelity refuses a subset size above either sample count (ValueError). We
    clamp it to ``min(N_gen, N_ref)`` instead, log a warning, and return the effective size as
    ``kid_subset_size`` (the requested one as ``kid_subset_size_requested``): a KID is comparable only
    with KIDs of the same subset size, so the effective size belongs to the protocol.

    Returns ``{"fid", "kid_mean", "kid_std", "kid_subset_size", "kid_subset_size_requested",
    "kid_subsets", "num_gen", "num_ref"}``. Cost: FID takes the eigenvalues of a dense ``D x D``
    product (2048: ~10-20 CPU-seconds, mostly one core), so call this on one process only.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    gen = _as_features(gen_features, "gen_features")
    ref = _as_features(ref_features, "ref_features")
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature widths differ: gen {gen.shape[1]}, ref {ref.shape[1]}")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise ValueError(f"need kid_subsets >= 1 and kid_subset_size >= 2, got {kid_subsets}, {kid_subset_size}")
    n_gen, n_ref = gen.shape[0], ref.shape[0]
    subset = min(kid_subset_size, n_gen, n_ref)
    if subset < kid_subset_size:
        log.warning("KID subset size %d exceeds the sample counts (gen %d, ref %d); using %d",
                    kid_subset_size, n_gen, n_ref, subset)

    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref),
                                   verbose=False)[KEY_METRIC_FID]
    kid = kid_features_to_metric(gen, ref, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed,
                                 verbose=False)
    return {"fid": float(fid), "kid_mean": float(kid[KEY_METRIC_KID_MEAN]), "kid_std": float(kid[KEY_METRIC_KID_STD]),
            "kid_subset_size": subset, "kid_subset_size_requested": kid_subset_size, "kid_subsets": kid_subsets,
            "num_gen": n_gen, "num_ref": n_ref}


def intra_fid(gen_features: torch.Tensor, gen_classes: torch.Tensor, ref_features: torch.Tensor,
              ref_classes: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """The intra-FID of a class-conditional model (Miyato & Koyama 2018, Sec. 5): the FID of each
    class's generated features against the reference features of the same class, and their mean
    over the classes that have at least 2 samples on both sides (torch-fidelity's FID, as
    ``fid_kid``). Returns ``{"intra_fid": mean or None, "by_class": [FID or None per class],
    "num_gen": [...], "num_ref": [...]}``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    gen, ref = _as_features(gen_features, "gen_features"), _as_features(ref_features, "ref_features")
    by_class, num_gen, num_ref = [], [], []
    for c in range(num_classes):
        g, r = gen[gen_classes.cpu() == c], ref[ref_classes.cpu() == c]
        num_gen.append(len(g))
        num_ref.append(len(r))
        if len(g) < 2 or len(r) < 2:
            by_class.append(None)
            continue
        fid = fid_statistics_to_metric(fid_features_to_statistics(g), fid_features_to_statistics(r), verbose=False)
        by_class.append(float(fid[KEY_METRIC_FID]))
    scored = [v for v in by_class if v is not None]
    return {"intra_fid": sum(scored) / len(scored) if scored else None, "by_class": by_class,
            "num_gen": num_gen, "num_ref": num_ref}


# ---------------------------------------------------------------------------------- provenance


def library_versions() -> dict[str, str]:
    import numpy
    import torch_fidelity
    import torchvision

    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__}


def provenance(extractor: InceptionFeatures | Mapping[str, Any], *, num_gen: int, num_ref: int,
               reference_split: str, seed: int, kid_subsets: int | None = None,
               kid_subset_size: int | None = None, image_resolution: tuple[int, int] | None = None,
               manifest_sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    """The protocol recorded beside every FID/KID: extractor, weights hash, resolutions, resize, sample
    counts, reference split, seed, KID settings (pass the *effective* subset size from ``fid_kid``) and
    library versions. ``extractor`` is an ``InceptionFeatures`` or its ``protocol()`` dict; ``extra``
    keys are added as given (e.g. ``step``, ``checkpoint``)."""
    record = dict(extractor.protocol() if isinstance(extractor, InceptionFeatures) else extractor)
    record.update({
        "image_resolution": list(image_resolution) if image_resolution is not None else None,
        "num_gen": int(num_gen), "num_ref": int(num_ref), "reference_split": reference_split,
        "manifest_sha256": manifest_sha256, "seed": int(seed),
        "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
        "versions": library_versions(),
    })
    record.update(extra)
    return record


# ---------------------------------------------------------------------------------- reference cache


def manifest_sha256(shards_url: str, storage_options: dict | None = None) -> str:
    """SHA-256 of the shard manifest (``manifest.json`` or the directory holding it)."""
    return io.sha256_url(manifest_url(shards_url), storage_options)[0]


def default_cache_url(run_dir: str) -> str:
    """Where reference features live unless ``eval.reference_cache`` says otherwise: in the run's
    ``eval/refstats/``, which the evaluator may write (a dataset's prefix may be read-only, and is
    shared by runs that must not write into it)."""
    return io.join(run_dir, "eval", REFSTATS_DIR)


@dataclass(frozen=True)
class ReferenceKey:
    """Everything that decides the reference features. ``resolution`` is ``(H, W)`` of the uint8 images
    handed to the extractor; ``resize`` says how they reach its input (e.g. ``INCEPTION_RESIZE``, prefixed
    by any resize of the dataset images to ``resolution``)."""

    manifest_sha256: str
    split: str
    extractor: str
    weights_sha256: str
    resolution: tuple[int, int]
    resize: str
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resolution"] = list(self.resolution)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()

    def stem(self) -> str:
        """File name stem: readable split and extractor, then the key's digest."""
        split = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.split)
        return f"{split}-{self.extractor}-{self.digest()[:16]}"


@dataclass
class ReferenceStats:
    """Reference features ``[num_samples, D]`` float32 and where they are stored.

    ``url`` is the features file (torch.save of one tensor); ``meta_url`` the JSON written after it,
    which commits the entry. ``computed`` is True when ``compute_fn`` ran in this call.
    """

    key: ReferenceKey
    features: torch.Tensor
    url: str
    meta_url: str
    computed: bool
    meta: dict[str, Any] = field(default_factory=dict)


def reference_key(shards_url: str, split: str, extractor: InceptionFeatures, *, resolution: tuple[int, int],
                  num_samples: int, resize: str | None = None,
                  storage_options: dict | None = None) -> ReferenceKey:
    """The cache key for ``split`` of the shards at ``shards_url`` as seen by ``extractor``.
    ``resize`` defaults to the extractor's own; prefix it when the dataset images are resized to
    ``resolution`` first (e.g. ``"bicubic-256x256+" + INCEPTION_RESIZE``)."""
    return ReferenceKey(manifest_sha256=manifest_sha256(shards_url, storage_options), split=split,
                        extractor=extractor.name, weights_sha256=extractor.weights_sha256,
                        resolution=(int(resolution[0]), int(resolution[1])),
                        resize=resize or extractor.resize, num_samples=int(num_samples))


def _entry_urls(url: str, key: ReferenceKey) -> tuple[str, str]:
    return io.join(url, key.stem() + ".pt"), io.join(url, key.stem() + ".json")


def _entry_problem(meta: Any, data: bytes, key: ReferenceKey, pt_url: str) -> str | None:
    if not isinstance(meta, dict) or meta.get("format") != REFSTATS_FORMAT:
        return f"not a {REFSTATS_FORMAT} metadata file"
    if meta.get("key") != key.to_dict():
        return "its key differs"  # a digest-prefix collision, or a hand-edited file
    if hashlib.sha256(data).hexdigest() != meta.get("features_sha256"):
        return f"{pt_url} does not match the SHA-256 its metadata records"
    return None


def _checked_features(features: torch.Tensor, key: ReferenceKey) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != key.num_samples:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"reference features have shape {shape}; the key promises "
                         f"[{key.num_samples}, D] for split {key.split!r}")
    return features.detach().to("cpu", torch.float32).contiguous()


def lookup(url: str, key: ReferenceKey, storage_options: dict | None = None) -> ReferenceStats | None:
    """The cached entry for ``key`` under ``url``, or None when there is none or it is unusable (an
    unusable entry — features missing or not matching their recorded hash — is logged)."""
    pt_url, meta_url = _entry_urls(url, key)
    if not io.exists(meta_url, storage_options):
        return None
    try:
        meta = io.read_json(meta_url, storage_options)
        data = io.read_bytes(pt_url, storage_options)
    except (*io.storage_errors(), ValueError) as exc:
        log.warning("reference cache entry %s is unreadable (%s); recomputing", meta_url, exc)
        return None
    problem = _entry_problem(meta, data, key, pt_url)
    if problem is None:
        try:
            features = torch.load(BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
            problem = f"{pt_url} does not load as a tensor ({exc})"
        else:
            if not isinstance(features, torch.Tensor) or list(features.shape) != meta.get("shape"):
                problem = f"{pt_url} does not hold a tensor of shape {meta.get('shape')}"
    if problem is not None:
        log.warning("reference cache entry %s is unusable (%s); recomputing", meta_url, problem)
        return None
    return ReferenceStats(key=key, features=features, url=pt_url, meta_url=meta_url, computed=False, meta=meta)


def store(url: str, key: ReferenceKey, features: torch.Tensor, *, protocol: Mapping[str, Any] | None = None,
          storage_options: dict | None = None) -> ReferenceStats:
    """Write ``features [key.num_samples, D]`` for ``key``: the features file atomically, then the JSON
    metadata atomically, last (a reader trusts an entry only through its metadata)."""
    features = _checked_features(features, key)
    buf = BytesIO()
    torch.save(features.clone(), buf)  # clone: never serialise a view's whole backing storage
    data = buf.getvalue()
    pt_url, meta_url = _entry_urls(url, key)
    meta = {"format": REFSTATS_FORMAT, "version": REFSTATS_VERSION, "key": key.to_dict(), "digest": key.digest(),
            "features_file": pt_url.rsplit("/", 1)[-1], "features_sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "shape": list(features.shape), "dtype": "float32", "created_unix": time.time(),
            "provenance": dict(protocol or {})}
    io.atomic_write_bytes(pt_url, data, storage_options)
    io.atomic_write_json(meta_url, meta, storage_options)
    return ReferenceStats(key=key, features=features, url=pt_url, meta_url=meta_url, computed=True, meta=meta)


def load_or_compute(url: str, key: ReferenceKey, compute_fn: Callable[[], torch.Tensor], *,
                    protocol: Mapping[str, Any] | None = None, write: bool = True,
                    storage_options: dict | None = None) -> ReferenceStats:
    """The reference features for ``key``: loaded from the cache directory ``url`` when a valid entry
    exists, else ``compute_fn() -> [key.num_samples, D]`` and stored (when ``write``).

    With several evaluator processes, do not let each rank decide hit or miss on its own: another job
    can commit the entry between two ranks' looks, and if ``compute_fn`` holds a collective gather one
    rank would wait forever. Let the main process ``lookup``, broadcast the outcome, compute on all
    ranks on a miss, and ``store`` on the main process only (or pass ``write=False`` elsewhere).
    """
    hit = lookup(url, key, storage_options)
    if hit is not None:
        return hit
    features = _checked_features(compute_fn(), key)
    if write:
        return store(url, key, features, protocol=protocol, storage_options=storage_options)
    pt_url, meta_url = _entry_urls(url, key)
    return ReferenceStats(key=key, features=features, url=pt_url, meta_url=meta_url, computed=True)
