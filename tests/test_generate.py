"""``gan-generate`` and ``pipeline.load_generator`` on runs trained in the test: images from seeds
(the same seed, the same image), truncation, grids, translations of a split, ``--dump-eval``
giving exactly the images the evaluator scores, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_stylegan2 import TINY
from test_train import SMALL, explain, launch_cmd, run

import pipeline

GENERATE = str(Path(__file__).resolve().parent.parent / "launch" / "generate.py")


def generate(*args: str, process: bool = False) -> subprocess.CompletedProcess:
    """``gan-generate ARGS``: through the script in a process of its own, or (saving an
    interpreter start and torch import per call) its ``main`` called here, output captured."""
    if process:
        return subprocess.run([sys.executable, GENERATE, *args], capture_output=True, text=True, timeout=120)
    from pipeline.generate import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess([GENERATE, *args], code, out.getvalue(), err.getvalue())


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def stylegan2_run(demo_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sg2") / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *TINY, "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "eval.num_samples=6", "eval.batch_size=4"],
                       config="stylegan2_demo"))
    assert r.returncode == 0, explain(r)
    return run_dir


def test_seeds_give_the_same_images_every_time_and_the_api_gives_the_same_generator(stylegan2_run, tmp_path):
    r = generate("--run", str(stylegan2_run), "--out", str(tmp_path / "a"), "--seeds", "3-5,9", process=True)
    assert r.returncode == 0, explain(r)
    a = pngs(tmp_path / "a")
    assert list(a) == ["seed0003.png", "seed0004.png", "seed0005.png", "seed0009.png"]
    assert a["seed0003.png"].shape == (32, 32, 3)
    assert generate("--run", str(stylegan2_run), "--out", str(tmp_path / "b"), "--seeds", "9").returncode == 0
    assert np.array_equal(pngs(tmp_path / "b")["seed0009.png"], a["seed0009.png"])  # alone or in a list
    assert not np.array_equal(a["seed0003.png"], a["seed0004.png"])

    G, snap = pipeline.load_generator(str(stylegan2_run))
    assert snap.family.name == "stylegan2" and snap.step == 2 and not G.training
    from pipeline.eval.metrics import to_uint8
    from pipeline.generate import from_seeds

    img = to_uint8(from_seeds(snap, [9]))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(img, a["seed0009.png"])
    with torch.no_grad():
        torch.manual_seed(9)
        z = torch.randn(1, snap.cfg.model.z_dim)
        direct = to_uint8(G(z, z.new_zeros(1, 0)).clamp(-1, 1))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(direct, a["seed0009.png"])  # the API's G is the snapshot's G_ema

    r = generate("--run", str(stylegan2_run), "--out", str(tmp_path / "g"), "--count", "10", "--grid",
                 "--truncation", "0.5")
    assert r.returncode == 0, explain(r)
    grid = pngs(tmp_path / "g")["grid.png"]
    assert grid.shape == (2 + 2 * (32 + 2), 2 + 8 * (32 + 2), 3)  # 8 per row, 2 rows, 2-pixel padding


def test_an_exported_generator_gives_the_same_images_without_its_run(stylegan2_run, tmp_path):
    r = generate("--run", str(stylegan2_run), "--out", str(tmp_path / "export"), "--export")
    assert r.returncode == 0, explain(r)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["G.safetensors"]  # no program: unconditional
    for extra in (["--export", "--onnx"], ["--onnx", "--count", "1"]):
        r = generate("--run", str(stylegan2_run), "--out", str(tmp_path / "onnx"), *extra)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
        assert ("ONNX export is for the conditional families" if "--export" in extra else
                "--onnx goes with --export") in r.stderr, explain(r)
    exported = tmp_path / "export" / "G.safetensors"
    G, snap = pipeline.load_generator(str(stylegan2_run))
    G2, snap2 = pipeline.load_generator(str(exported))
    assert (snap2.family.name, snap2.step, snap2.cfg) == (snap.family.name, snap.step, snap.cfg)
    a, b = G.state_dict(), G2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The file alone, its run moved away: the same images from the same seeds.
    generate("--run", str(stylegan2_run), "--out", str(tmp_path / "run"), "--seeds", "2,7")
    stylegan2_run.rename(stylegan2_run.with_name("moved"))
    try:
        r = generate("--run", str(exported), "--out", str(tmp_path / "file"), "--seeds", "2,7")
    finally:
        stylegan2_run.with_name("moved").rename(stylegan2_run)
    assert r.returncode == 0, explain(r)
    ours, theirs = pngs(tmp_path / "run"), pngs(tmp_path / "file")
    assert list(ours) == list(theirs) == ["seed0002.png", "seed0007.png"]
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    r = generate("--run", str(exported), "--out", str(tmp_path / "x"), "--step", "2", "--count", "1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "holds one exported network: --step and --best choose among a run's snapshots" in r.stderr
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    r = generate("--run", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "x"), "--count", "1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "without gan-pipeline metadata: export one with gan-generate --run RUN --out DIR --export" in r.stderr


def test_dump_eval_writes_exactly_the_images_the_evaluator_scores(stylegan2_run, tmp_path):
    from inception_weights import write_random_inception_weights

    from pipeline.eval.metrics import InceptionFeatures
    from pipeline.eval.watcher import EvalOptions, Evaluator, evaluations_for

    r = generate("--run", str(stylegan2_run), "--out", str(tmp_path / "dump"), "--dump-eval")
    assert r.returncode == 0, explain(r)
    dumped = pngs(tmp_path / "dump")
    assert len(dumped) == 6  # eval.num_samples
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    snap = pipeline.load_snapshot(str(stylegan2_run))
    ev = Evaluator(EvalOptions.from_config(str(stylegan2_run), snap.cfg, inception_weights=str(weights)))
    (evaluation,) = evaluations_for(snap.family, snap.cfg, snap.info, _manifest(snap))
    gen = ev._run(snap.cfg, snap.family, snap.info, snap.nets, evaluation)[0]
    theirs = torch.cat([f for _, f in sorted(gen, key=lambda t: int(t[0][0]))])
    images = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in dumped.values()])
    ours = InceptionFeatures(str(weights), torch.device("cpu"))(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _manifest(snap):
    from pipeline.data.manifest import load_manifest

    return load_manifest(snap.cfg.data.url)


def test_a_conditional_run_translates_a_split_or_a_folder_and_refuses_seeds(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={demo_shards}", f"run.dir={run_dir}", *SMALL, "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "data.workers=0", "eval.max_samples=5"]))
    assert r.returncode == 0, explain(r)
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "val"), "--split", "val", "--max-samples", "3",
                 process=True)
    assert r.returncode == 0, explain(r)
    out = pngs(tmp_path / "val")
    assert list(out) == ["000000.png", "000001.png", "000002.png"]
    assert out["000000.png"].shape == (128, 128, 3)
    # A folder of the same inputs, as a user has them (the label maps as files): the same images.
    import tarfile

    from pipeline.data.manifest import load_manifest

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with tarfile.open(load_manifest(demo_shards).shards("val")[0].url) as tar:
        labels = [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar if m.name.endswith(".label.png")]
    for i, (key, data) in enumerate(labels[:3]):
        (inputs / f"{i:02d}-{key}.png").write_bytes(data)
    (inputs / "notes.txt").write_text("not an image: passed over")
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "folder"), "--inputs", str(inputs))
    assert r.returncode == 0, explain(r)
    folder = pngs(tmp_path / "folder")
    assert list(folder) == [f"{i:02d}-{key}.png" for i, (key, _) in enumerate(labels[:3])]
    for i, name in enumerate(folder):
        assert np.array_equal(folder[name], out[f"{i:06d}.png"]), name
    # Photos where the model takes label maps: one line naming the file and why.
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "none"), "--inputs", str(tmp_path / "val"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "000000: a label map must be single-channel, got mode RGB" in r.stderr, explain(r)
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "none"), "--inputs", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such folder" in r.stderr and r.stderr.strip().count("\n") == 0, explain(r)
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "dump"), "--dump-eval")
    assert r.returncode == 0 and len(pngs(tmp_path / "dump")) == 5, explain(r)  # eval.max_samples of val
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "x"), "--seeds", "0-3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "translates inputs: give --split" in r.stderr
    # Export: G's weights with its config, and its forward as a torch.export program that runs with
    # torch alone, for any batch size, as G does on the family's encoded inputs.
    r = generate("--run", str(run_dir), "--out", str(tmp_path / "export"), "--export", "--onnx")
    assert r.returncode == 0, explain(r)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["G.onnx", "G.pt2", "G.safetensors"]
    from pipeline.export import captured_inputs
    from pipeline.generate import prepared_batches

    G, snap = pipeline.load_generator(str(run_dir))
    G2, _ = pipeline.load_generator(str(tmp_path / "export" / "G.safetensors"))
    a, b = G.state_dict(), G2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    program = torch.export.load(str(tmp_path / "export" / "G.pt2")).module()
    (ev,) = snap.evaluations()
    for n in (1, 5):
        _, batch = next(prepared_batches(snap, ev, n))
        args, kwargs = captured_inputs(G, ev.generate, snap.nets, batch)
        assert len(args[0]) == n
        with torch.no_grad():
            torch.testing.assert_close(program(*args, **kwargs), G(*args, **kwargs), rtol=1e-5, atol=1e-5)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "G.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), args, strict=True)}
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), G(*args), rtol=1e-4, atol=1e-4)


def test_a_directory_without_snapshots_is_one_line_that_says_what_it_expected(tmp_path):
    r = generate("--run", str(tmp_path), "--out", str(tmp_path / "o"), "--count", "2", process=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "holds no committed snapshot" in r.stderr
    r = generate("--run", str(tmp_path), "--out", str(tmp_path / "o"), "--best")
    assert r.returncode == 2 and "no eval/best.json" in r.stderr, explain(r)


def test_a_hostile_safetensors_file_is_one_line(tmp_path):
    """A header length of 2^60 (and of more than the file) is refused by safetensors' own parser
    before anything is allocated."""
    bad = tmp_path / "G.safetensors"
    bad.write_bytes((1 << 60).to_bytes(8, "little") + b'{"__metadata__": {}}')
    r = generate("--run", str(bad), "--out", str(tmp_path / "o"), "--count", "1", process=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, explain(r)
    assert "is not a readable safetensors file" in r.stderr


@pytest.mark.parametrize("config, overrides", [
    ("pix2pixhd_demo", ["data.load_size=128,64", "model.ngf=4", "model.n_blocks_global=1"]),
    ("spade_demo", ["data.load_size=64,32", "model.ngf=2", "model.spade_hidden=4"]),
    ("spade_demo", ["data.load_size=64,32", "model.ngf=2", "model.spade_hidden=4", "model.use_vae=true",
                    "model.z_dim=16"]),
])
def test_the_exported_program_and_onnx_model_of_pix2pixhd_and_spade_compute_what_g_computes(
        config, overrides, demo_shards, tmp_path):
    """The ``torch.export`` program, and its ONNX model run by ONNX Runtime (``--onnx``), at the
    traced batch size and another. With SPADE's VAE and no style given G draws z: the program
    draws the same z from the same seed; the ONNX model draws in its graph, so two runs differ."""
    # Freshly built (seeded) networks: the exported numbers, not training, are the point here.
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.export import captured_inputs
    from pipeline.families import get_family
    from pipeline.generate import Snapshot, export, prepared_batches
    from pipeline.train.family import DataInfo

    cfg = load_config(config, [f"data.url={demo_shards}", *overrides])
    info = DataInfo.of(load_manifest(demo_shards))
    family = get_family(cfg.model.family)
    torch.manual_seed(0)
    nets = {name: net.eval().requires_grad_(False) for name, net in family.build(cfg, info).items()}
    snap = Snapshot(nets, cfg, family, info, str(tmp_path / "none"), 0)
    written = export(snap, str(tmp_path / "export"), onnx=True)
    assert [Path(u).name for u in written] == ["G.safetensors", "G.pt2", "G.onnx"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["G.onnx", "G.pt2", "G.safetensors"]
    program = torch.export.load(written[1]).module()
    session = ort.InferenceSession(written[2], providers=["CPUExecutionProvider"])
    (ev,) = snap.evaluations()
    for n in (1, 3):
        _, batch = next(prepared_batches(snap, ev, n))
        args, kwargs = captured_inputs(nets["G"], ev.generate, snap.nets, batch)
        outs = []
        for f in (program, nets["G"]):  # with the VAE and no style given, G draws z: the same draw
            torch.manual_seed(1)
            with torch.no_grad():
                outs.append(f(*args, **kwargs))
        torch.testing.assert_close(*outs, rtol=1e-5, atol=1e-5)
        ref = outs[1] if torch.is_tensor(outs[1]) else outs[1][0]
        tensors = [*args, *(v for v in kwargs.values() if torch.is_tensor(v))]
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors, strict=True)}
        out = torch.from_numpy(session.run(None, feeds)[0])
        assert out.shape == ref.shape and len(out) == n
        if getattr(cfg.model, "use_vae", False):  # pix2pixHD has no VAE
            assert torch.isfinite(out).all() and not torch.equal(out, torch.from_numpy(session.run(None, feeds)[0]))
        else:
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cyclegan_exports_either_direction_and_each_program_computes_what_its_g_computes(unpaired_shards, tmp_path):
    """``--network G_B`` exports the B->A generator, traced on the B->A evaluation's inputs."""
    from pipeline.config import load_config
    from pipeline.data.manifest import load_manifest
    from pipeline.export import captured_inputs, read_metadata
    from pipeline.families import get_family
    from pipeline.generate import Snapshot, export, prepared_batches
    from pipeline.train.family import DataInfo

    cfg = load_config("cyclegan_demo", [f"data.url={unpaired_shards}", "model.ngf=4", "model.ndf=4",
                                        "model.generator=resnet_6blocks", "data.load_size=none"])
    m = load_manifest(unpaired_shards)
    info = DataInfo(m.task, m.num_classes, tuple(m.fields))
    family = get_family(cfg.model.family)
    torch.manual_seed(0)
    nets = {name: net.eval().requires_grad_(False) for name, net in family.build(cfg, info).items()}
    snap = Snapshot(nets, cfg, family, info, str(tmp_path / "none"), 0)
    for name in ("G_A", "G_B"):
        written = export(snap, str(tmp_path / name), name)
        assert [Path(u).name for u in written] == [f"{name}.safetensors", f"{name}.pt2"]
        assert read_metadata(written[0])["network"] == name
        program = torch.export.load(written[1]).module()
        traced = 0
        for ev in snap.evaluations():
            _, batch = next(prepared_batches(snap, ev, 2))
            try:
                args, kwargs = captured_inputs(nets[name], ev.generate, snap.nets, batch)
            except ValueError:  # the other direction's evaluation does not run this network
                continue
            traced += 1
            with torch.no_grad():
                torch.testing.assert_close(program(*args, **kwargs), nets[name](*args, **kwargs), rtol=1e-5, atol=1e-5)
        assert traced == 1, f"{name}: expected exactly one evaluation to run it, found {traced}"
