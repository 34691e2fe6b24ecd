"""Evaluation metrics: our InceptionV3 features + FID/KID against torch-fidelity's own command-line
tool on PNG folders (random-init but informative weights of its real architecture), chunked
extraction as several evaluator processes do it, the reference-feature cache, the protocol record,
and the paired metrics (PSNR, SSIM, MS-SSIM, LPIPS) on hand-made images.

Inception on CPU costs ~0.5 CPU-s per image and a 2048-d FID ~15 CPU-s (torch-fidelity's dense
eigendecomposition), so the image sets are small and each costly result is computed once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inception_weights import write_random_inception_weights, write_random_lpips_weights
from PIL import Image

from pipeline.eval import metrics, paired
from pipeline.eval.metrics import (
    InceptionFeatures,
    ReferenceKey,
    fid_kid,
    load_or_compute,
    provenance,
    to_uint8,
)

N_GEN, N_REF = 7, 8  # odd generated count: the chunked extraction below splits it unevenly
SIZE = 64
KID_SUBSETS, KID_SUBSET_SIZE, SEED = 10, 5, 123


# ----------------------------------------------------------------------------- image sets


def smooth_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Distribution X: random 4x4 colour grids, bilinearly upsampled (``[n, H, W, 3]`` uint8)."""
    grid = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4))).float()
    up = F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def noise_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Distribution Y: i.i.d. uniform pixel noise (``[n, H, W, 3]`` uint8)."""
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def read_like_fidelity(folder: Path) -> torch.Tensor:
    """``[N, 3, H, W]`` uint8 read by torch-fidelity's own folder dataset, in its file order."""
    from torch_fidelity.datasets import ImagesPathDataset

    files = sorted(os.path.realpath(p) for p in folder.glob("*.png"))
    dataset = ImagesPathDataset(files)
    return torch.stack([dataset[i] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth", seed=0)


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2024)
    return write_pngs(root / "gen", smooth_images(N_GEN, rng)), write_pngs(root / "ref", noise_images(N_REF, rng))


@pytest.fixture(scope="module")
def extractor(inception_file) -> InceptionFeatures:
    return InceptionFeatures(str(inception_file), "cpu")


@pytest.fixture(scope="module")
def fidelity_cli(image_dirs, inception_file, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """torch-fidelity's command-line tool on the two folders, started before our own extraction so
    the two run side by side (Inception on CPU dominates this module's runtime)."""
    exe = Path(sys.executable).parent / "fidelity"
    assert exe.exists(), "torch-fidelity's command-line tool is installed with the package"
    cmd = [str(exe), "--fid", "--kid", "--input1", str(image_dirs[0]), "--input2", str(image_dirs[1]),
           "--feature-extractor-weights-path", str(inception_file), "--kid-subsets", str(KID_SUBSETS),
           "--kid-subset-size", str(KID_SUBSET_SIZE), "--rng-seed", str(SEED),
           "--cpu", "--json", "--silent", "--no-cache", "--save-cpu-ram"]
    # TORCH_HOME in a test directory: whatever the tool might cache stays out of the home directory.
    env = {**os.environ, "TORCH_HOME": str(tmp_path_factory.mktemp("torch-home")), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def extracted(extractor, image_dirs, fidelity_cli) -> dict:
    """Images, features and our FID/KID, computed once for the module.

    Each set is extracted in one batch (as the CLI does), and the generated set again in two uneven
    chunks of an odd count, as two evaluator processes would before the watcher gathers them in rank
    order. Our full 2048-d FID/KID (``"ours"``) runs in a thread meanwhile: torch-fidelity's FID takes
    the eigenvalues of a dense 2048x2048 product (LAPACK dgeev, ~15 CPU-seconds here, mostly on one
    core, GIL released), so it is computed once; tests that only compare FIDs with each other work in
    the features' common span instead (``in_common_span``). Requests ``fidelity_cli`` only to have it
    running meanwhile too.
    """
    from concurrent.futures import ThreadPoolExecutor

    gen_images, ref_images = read_like_fidelity(image_dirs[0]), read_like_fidelity(image_dirs[1])
    gen, ref = extractor(gen_images), extractor(ref_images)
    with ThreadPoolExecutor(1) as pool:
        ours = pool.submit(fid_kid, gen, ref, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, seed=SEED)
        chunked = torch.cat([extractor(gen_images[:3]), extractor(gen_images[3:])])
        return {"gen": gen, "ref": ref, "gen_chunked": chunked, "ours": ours.result()}


def in_common_span(*sets: torch.Tensor) -> list[torch.Tensor]:
    """The sets' coordinates in an orthonormal basis of the span of all their vectors, ``[n_i, k]``.

    FID is unchanged by this (the mean difference and both covariances live in that span, and the
    nonzero eigenvalues of sigma1 sigma2 are those of the projected product), but the dense
    eigenproblem shrinks from 2048 to k <= sum(n_i).
    """
    q, _ = torch.linalg.qr(torch.cat(sets).double().T)
    return [(s.double() @ q).float() for s in sets]


# ----------------------------------------------------------------------------- InceptionFeatures


def test_missing_inception_weights_say_how_to_get_them(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError) as info:
        InceptionFeatures(str(missing))
    message = str(info.value)
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert str(missing) in message
    assert URL_INCEPTION_V3 in message and metrics.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert "--inception-weights" in message and "eval.inception_weights" in message


def test_weights_that_are_not_a_tensor_state_dict_are_refused(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"conv": torch.zeros(1), "extra": argparse.Namespace(a=1)}, bad)  # needs full pickle to load
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        InceptionFeatures(str(bad))


def test_extractor_records_weights_hash_and_protocol(extractor, inception_file):
    assert extractor.weights_sha256 == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    proto = extractor.protocol()
    assert proto["extractor"] == "inception-v3-compat" and proto["feature_layer"] == "2048"
    assert proto["weights_sha256"] == extractor.weights_sha256 and proto["extractor_resolution"] == 299
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 3, 8, 8))


def test_features_are_float32_and_separate_distributions(extracted):
    gen, ref = extracted["gen"], extracted["ref"]
    assert gen.shape == (N_GEN, 2048) and gen.dtype == torch.float32 and ref.shape == (N_REF, 2048)

    def fid(a: torch.Tensor, b: torch.Tensor) -> float:
        return fid_kid(*in_common_span(a, b), kid_subsets=2, kid_subset_size=2, seed=0)["fid"]

    assert fid(gen, ref) == pytest.approx(extracted["ours"]["fid"], rel=1e-4)  # the projection changes nothing
    # A and A' are disjoint samples of X; B is from Y. Equal sizes, so the small-sample bias is equal.
    same, different = fid(gen[:3], gen[3:6]), fid(gen[:3], ref[:3])
    print(f"FID(A, A') = {same:.4f}, FID(A, B) = {different:.4f}")
    assert same > 0
    assert different > 5 * same, (same, different)


# ----------------------------------------------------------------------------- FID/KID vs the CLI


def test_fid_kid_match_torch_fidelity_cli(extracted, fidelity_cli):
    stdout, stderr = fidelity_cli.communicate(timeout=300)
    assert fidelity_cli.returncode == 0, f"fidelity failed:\n{stdout}\n{stderr}"
    cli = json.loads(stdout[stdout.index("{"):])
    ours = extracted["ours"]
    print(f"CLI: {cli}\nours: {ours}")
    assert ours["fid"] > 1.0  # a real distance, not a collapsed one
    assert ours["fid"] == pytest.approx(cli["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(cli["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(cli["kernel_inception_distance_std"], rel=1e-6)
    assert (ours["num_gen"], ours["num_ref"], ours["kid_subset_size"]) == (N_GEN, N_REF, KID_SUBSET_SIZE)


def test_two_uneven_chunks_give_the_one_chunk_result(extracted):
    from torch_fidelity.metric_kid import kid_features_to_metric

    one, two, ref = extracted["gen"], extracted["gen_chunked"], extracted["ref"]
    assert torch.allclose(two, one, rtol=1e-5, atol=1e-6)
    # FID of both in one basis (that of the one-chunk features and the reference; see in_common_span).
    q, _ = torch.linalg.qr(torch.cat([one, ref]).double().T)

    def fid(gen: torch.Tensor) -> float:
        return fid_kid((gen.double() @ q).float(), (ref.double() @ q).float(), kid_subsets=1, kid_subset_size=2,
                       seed=SEED)["fid"]

    def kid(gen: torch.Tensor) -> float:  # KID is cheap in 2048-d; the same function fid_kid calls
        return kid_features_to_metric(gen, ref, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE,
                                      rng_seed=SEED, verbose=False)["kernel_inception_distance_mean"]

    print(f"FID one chunk {fid(one)!r}, two chunks {fid(two)!r}; KID {kid(one)!r}, {kid(two)!r}; "
          f"bitwise equal features: {torch.equal(one, two)}")
    assert fid(two) == pytest.approx(fid(one), rel=1e-6)
    assert kid(two) == pytest.approx(kid(one), rel=1e-6)


def test_to_uint8_equals_a_png_round_trip(tmp_path):
    from torchvision.utils import save_image

    images = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8) ** 3
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        save_image((img + 1) / 2, folder / f"{i}.png")
    assert torch.equal(to_uint8(images), read_like_fidelity(folder))
    gray = to_uint8(torch.zeros(1, 1, 4, 4))
    assert gray.shape == (1, 3, 4, 4) and int(gray[0, 0, 0, 0]) == 128


# ----------------------------------------------------------------------------- fid_kid details


def test_kid_subset_size_is_clamped_where_torch_fidelity_refuses(caplog):
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    ref = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    with pytest.raises(ValueError):  # torch-fidelity: subset size above a sample count is an error
        kid_features_to_metric(gen, ref, kid_subsets=3, kid_subset_size=1000, rng_seed=7, verbose=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.metrics"):
        out = fid_kid(gen, ref, kid_subsets=3, kid_subset_size=1000, seed=7)
    assert "KID subset size 1000" in caplog.text
    assert out["kid_subset_size"] == 6 and out["kid_subset_size_requested"] == 1000
    direct = kid_features_to_metric(gen, ref, kid_subsets=3, kid_subset_size=6, rng_seed=7, verbose=False)
    assert out["kid_mean"] == direct["kernel_inception_distance_mean"]


def test_fid_kid_reject_what_they_cannot_measure():
    one = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(one, torch.zeros(5, 4), kid_subsets=1, kid_subset_size=2, seed=0)
    with pytest.raises(ValueError, match="widths differ"):
        fid_kid(torch.zeros(3, 4), torch.zeros(3, 5), kid_subsets=1, kid_subset_size=2, seed=0)


def test_fid_of_a_set_with_itself_is_zero():
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert fid_kid(feats, feats.clone(), kid_subsets=2, kid_subset_size=10, seed=0)["fid"] == pytest.approx(0, abs=1e-4)


# ----------------------------------------------------------------------------- reference cache


def make_key(**changes) -> ReferenceKey:
    fields = dict(manifest_sha256="m" * 64, split="val", extractor="inception-v3-compat", weights_sha256="w" * 64,
                  resolution=(64, 64), resize="tf1x-bilinear-299", num_samples=7)
    fields.update(changes)
    return ReferenceKey(**fields)


def test_reference_cache_computes_once_and_recomputes_on_key_change(tmp_path):
    cache = str(tmp_path / "refstats")
    calls = []

    def compute(n: int = 7) -> torch.Tensor:
        calls.append(n)
        return torch.arange(n * 3, dtype=torch.float32).view(n, 3) + len(calls)

    key = make_key()
    first = load_or_compute(cache, key, compute, protocol={"reference_split": "val"})
    assert first.computed and calls == [7]
    second = load_or_compute(cache, key, compute)
    assert not second.computed and calls == [7]  # loaded: compute_fn not called
    assert torch.equal(second.features, first.features) and second.features.dtype == torch.float32

    # Every field of the key matters.
    for change in (dict(split="test"), dict(weights_sha256="v" * 64), dict(resolution=(32, 32)),
                   dict(resize="bicubic"), dict(manifest_sha256="n" * 64), dict(extractor="other")):
        assert load_or_compute(cache, make_key(**change), compute).computed
    assert load_or_compute(cache, make_key(num_samples=5), lambda: compute(5)).computed
    assert len(calls) == 8

    files = sorted(p.name for p in Path(cache).iterdir())
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")]  # atomic: no temp file left
    assert len(files) == 16  # features + metadata per key
    meta = json.loads(Path(first.meta_url).read_text())
    assert meta["key"] == key.to_dict() and meta["shape"] == [7, 3] and meta["dtype"] == "float32"
    assert meta["features_sha256"] == hashlib.sha256(Path(first.url).read_bytes()).hexdigest()
    assert meta["provenance"] == {"reference_split": "val"}


def test_reference_cache_rejects_a_damaged_entry_and_a_wrong_count(tmp_path, caplog):
    cache = str(tmp_path / "refstats")
    key = make_key()
    entry = load_or_compute(cache, key, lambda: torch.ones(7, 3))
    Path(entry.url).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.metrics"):
        again = load_or_compute(cache, key, lambda: torch.full((7, 3), 2.0))
    assert again.computed and "unusable" in caplog.text and float(again.features[0, 0]) == 2.0
    assert not load_or_compute(cache, key, lambda: torch.zeros(7, 3)).computed
    with pytest.raises(ValueError, match="promises"):
        load_or_compute(str(tmp_path / "other"), key, lambda: torch.ones(6, 3))


def test_reference_key_from_shards_and_extractor(tmp_path, extractor):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "gan-pipeline-shards"}')
    key = metrics.reference_key(str(shards), "val", extractor, resolution=(64, 32), num_samples=3)
    assert key.manifest_sha256 == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert key.weights_sha256 == extractor.weights_sha256 and key.resize == metrics.INCEPTION_RESIZE
    assert metrics.default_cache_url(str(tmp_path / "run")) == str(tmp_path / "run" / "eval" / "refstats")


def test_provenance_records_the_protocol(extractor):
    import torch_fidelity
    import torchvision

    record = provenance(extractor, num_gen=11, num_ref=14, reference_split="val", seed=3, kid_subsets=20,
                        kid_subset_size=8, image_resolution=(64, 64), step=1000)
    assert record["weights_sha256"] == extractor.weights_sha256 and record["extractor"] == "inception-v3-compat"
    assert record["extractor_resize"] == metrics.INCEPTION_RESIZE and record["image_resolution"] == [64, 64]
    assert (record["num_gen"], record["num_ref"], record["reference_split"], record["seed"]) == (11, 14, "val", 3)
    assert record["versions"] == {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
                                  "torchvision": torchvision.__version__, "numpy": np.__version__}
    assert record["step"] == 1000
    json.dumps(record)  # goes into metrics.jsonl as is


# ----------------------------------------------------------------------------- paired metrics


def test_psnr_identical_and_known_constant_difference():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    assert torch.isinf(paired.psnr(x, x.clone())).all()
    # In [-1, 1] a difference of 0.1 is 0.05 in [0, 1]: PSNR = 10 log10(1 / 0.05^2) = 26.0206 dB.
    got = paired.psnr(x, x + 0.1)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx([10 * math.log10(1 / 0.05**2)] * 3, abs=1e-3)
    # Same images stated in [0, 255]: same PSNR.
    assert paired.psnr((x + 1) * 127.5, (x + 1.1) * 127.5, value_range=(0, 255)).tolist() == pytest.approx(
        got.tolist(), abs=1e-3)


def test_ssim_and_ms_ssim_are_one_for_identical_and_fall_with_noise():
    gen = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(2, 3, 12, 12, generator=gen), size=(176, 176), mode="bilinear",
                         align_corners=False) * 2 - 1
    noise = torch.randn(base.shape, generator=gen)
    assert paired.ssim(base, base.clone()).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert paired.ms_ssim(base, base.clone()).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    ssims = [paired.ssim(base, base + s * noise) for s in (0.02, 0.1, 0.4)]
    ms = [paired.ms_ssim(base, base + s * noise) for s in (0.02, 0.1, 0.4)]
    for a, b in zip(ssims, ssims[1:]):
        assert (b < a).all()
    for a, b in zip(ms, ms[1:]):
        assert (b < a).all()
    assert (ssims[-1] < 0.9).all() and (ms[-1] < 0.9).all()
    with pytest.raises(ValueError, match="at least 161x161"):
        paired.ms_ssim(base[..., :100, :100], base[..., :100, :100])


def reference_ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure of one channel ``[H, W]`` in [0, 1], float64, by direct
    11x11 window sums (an independent path: no separable filter, no torch)."""
    from numpy.lib.stride_tricks import sliding_window_view

    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def win(a: np.ndarray) -> np.ndarray:
        return np.einsum("ijkl,kl->ij", sliding_window_view(a, (11, 11)), w)

    mx, my = win(x), win(y)
    vx, vy, cxy = win(x * x) - mx**2, win(y * y) - my**2, win(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return float(((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs).mean()), float(cs.mean())


def reference_ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM of one channel: cs at scales 1-4, SSIM at 5, 2x2-mean halving (odd edge replicated)."""
    def halve(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
        return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4

    value = 1.0
    for scale, weight in enumerate(paired.MS_SSIM_WEIGHTS):
        s, cs = reference_ssim_terms(x, y)
        value *= max(s if scale == 4 else cs, 0.0) ** weight
        x, y = halve(x), halve(y)
    return value


def test_ssim_and_ms_ssim_match_a_float64_reference():
    gen = torch.Generator().manual_seed(3)
    x = F.interpolate(torch.rand(1, 3, 20, 20, generator=gen), size=(165, 171), mode="bilinear",
                      align_corners=False)  # odd sizes: the halving's edge rule is exercised
    y = (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    xs, ys = x[0].double().numpy(), y[0].double().numpy()
    expected_ssim = np.mean([reference_ssim_terms(xs[c], ys[c])[0] for c in range(3)])
    expected_ms = np.mean([reference_ms_ssim(xs[c], ys[c]) for c in range(3)])
    assert paired.ssim(x, y, value_range=(0, 1)).item() == pytest.approx(expected_ssim, abs=2e-5)
    assert paired.ms_ssim(x, y, value_range=(0, 1)).item() == pytest.approx(expected_ms, abs=2e-5)
    assert 0.3 < expected_ssim < 0.95  # a pair where the terms matter


def test_ssim_by_hand_on_flat_images():
    # Flat images: no variance, so SSIM is the luminance term (2 a b + C1) / (a^2 + b^2 + C1) in [0, 1] units.
    # Tolerance: the variances come out as E[x^2] - E[x]^2 in fp32, ~1e-7 off zero, next to C2 = 9e-4.
    a, b = 0.25, 0.75
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    c1 = (0.01 * 1) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert paired.ssim(x, y, value_range=(0, 1)).item() == pytest.approx(expected, abs=5e-4)


@pytest.fixture(scope="module")
def lpips_model(tmp_path_factory) -> paired.LPIPS:
    path = write_random_lpips_weights(tmp_path_factory.mktemp("lpips") / "lpips-random.pth", seed=0)
    return paired.load_lpips(str(path))


def test_lpips_zero_for_identical_positive_and_symmetric_otherwise(lpips_model):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    assert paired.lpips(lpips_model, x, x.clone()).tolist() == [0.0, 0.0]
    d = paired.lpips(lpips_model, x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and (d > 0).all()
    assert paired.lpips(lpips_model, y, x).tolist() == pytest.approx(d.tolist(), rel=1e-5)
    near = paired.lpips(lpips_model, x, x + 0.05 * torch.randn(x.shape, generator=gen))
    assert (near < d).all()
    assert not any(p.requires_grad for p in lpips_model.parameters())


def test_missing_lpips_weights_say_how_to_build_them(tmp_path):
    missing = tmp_path / "lpips.pth"
    with pytest.raises(FileNotFoundError) as info:
        paired.load_lpips(str(missing))
    message = str(info.value)
    assert str(missing) in message and paired.ALEXNET_URL in message and paired.LPIPS_LINEAR_URL in message
    assert "python -m pipeline.eval.paired" in message and "--lpips-weights" in message


def test_lpips_file_builds_from_torchvision_alexnet_and_official_heads(tmp_path, capsys):
    from torchvision.models import alexnet

    # torchvision's own key layout and shapes (built on the meta device: no 61M-parameter init); random
    # features, and empty stand-ins for the classifier, which the builder must ignore.
    with torch.device("meta"):
        layout = alexnet(weights=None).state_dict()
    gen = torch.Generator().manual_seed(0)
    tv_state = {k: torch.randn(v.shape, generator=gen) if k.startswith("features.") else torch.empty(0)
                for k, v in layout.items()}
    torch.save(tv_state, tmp_path / "alexnet.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(paired.LPIPS.CHANNELS)}
    torch.save(heads, tmp_path / "alex.pth")  # the official lpips v0.1 key layout
    out = tmp_path / "lpips_alex_v0.1.pth"
    paired.main(["--alexnet", str(tmp_path / "alexnet.pth"), "--linear", str(tmp_path / "alex.pth"),
                 "--out", str(out)])
    assert "sha256" in capsys.readouterr().out
    model = paired.load_lpips(str(out))
    assert torch.equal(model.features[3].weight, tv_state["features.3.weight"])
    assert torch.equal(model.lins[2].weight, heads["lin2.model.1.weight"])
    assert model.weights_sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    shutil.copy(tmp_path / "alexnet.pth", tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not an LPIPS weights file"):
        paired.load_lpips(str(tmp_path / "wrong.pth"))
