"""Class-conditional GANs: the class field from an ImageFolder-style tree through the shards and
the stream; the projection discriminator and ACGAN's classifier on hand inputs; conditional batch
norm; intra-FID against a direct computation; two processes through the real launcher and the
evaluator; and the demo that learns to draw each class."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import explain, final_states, launch_cmd, run, split_batch, train_demo

from pipeline.config import load_config
from pipeline.data.stream import make_stream
from pipeline.families import get_family
from pipeline.families.dcgan import d_step, g_step
from pipeline.models.dcgan import DCGANDiscriminator, DCGANGenerator
from pipeline.train.family import DataInfo, StepContext

REPO = Path(__file__).resolve().parent.parent
FAMILY = get_family("dcgan")
INFO = DataInfo("class2image", 4, ("image", "class"))


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> str:
    """The labelled demo (object crops of the demo scenes, 4 classes), written once."""
    from pipeline.data.shards import WriteOptions, write_dataset
    from pipeline.data.sources import make_source

    out = tmp_path_factory.mktemp("objects")
    write_dataset(make_source("demo_objects", None, counts={"train": 512, "val": 64}), str(out), ["train", "val"],
                  WriteOptions(samples_per_shard=256, workers=2), progress=False)
    return str(out)


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_folder_classes_through_shards_and_stream(tmp_path):
    root = tmp_path / "tree"  # torchvision ImageFolder's layout: split/class/[nested/]image
    for split, n in (("train", 3), ("val", 1)):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
            for i in range(n):
                _png(root / split / cls / ("sub" if i == 2 else "") / f"{i:03d}.png", colour)
    _png(root / "val" / "bird" / "b.png", (0, 0, 200))  # a class only val has: ids agree across splits
    _png(root / "train" / "loose.png", (9, 9, 9))  # outside every class folder
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", "folder", "--classes",
                        "--root", str(root), "--out", str(out), "--splits", "train,val", "--quiet", "--workers", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "class2image" and m["class_names"] == ["bird", "cat", "dog"] and m["num_classes"] == 3
    assert m["fields"]["class"] == {"kind": "class", "required": True, "exts": ["cls"]}
    assert m["splits"]["train"]["class_histogram"] == [0, 3, 3] and m["splits"]["val"]["class_histogram"] == [1, 1, 1]
    assert [s["kind"] for s in m["splits"]["train"]["skipped"]] == ["no_class"]
    for split in ("train", "val"):
        for s in make_stream(str(out), split, train=False):
            assert s["class"].dtype == torch.int64 and s["class"].shape == ()
            red, green = int(s["image"][0, 0, 0]), int(s["image"][1, 0, 0])
            assert int(s["class"]) == (1 if red > 100 else 2 if green > 100 else 0), s["__key__"]
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "verify", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "verify OK" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", "demo", "--classes",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].endswith("not 'demo'"), r.stderr


def test_a_bad_class_member_is_skipped_and_counted(tmp_path):
    members = [("a", b"1"), ("b", b"cat"), ("c", b"7"), ("d", b"0")]  # not an id; out of 0..2
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, cls in members:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="PNG")
            for name, data in ((f"{key}.image.png", buf.getvalue()), (f"{key}.class.cls", cls)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "index", str(shard), "--out",
                        str(tmp_path / "m.json"), "--num-classes", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m.json").read_text())["fields"]["class"]["kind"] == "class"
    got = list(make_stream(str(tmp_path / "m.json"), "train", train=False))
    assert [(s["__key__"], int(s["class"])) for s in got] == [("a", 1), ("d", 0)] and got[-1]["__bad__"] == 2


def test_projection_and_acgan_discriminators_on_hand_inputs():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 1, 3])
    D = DCGANDiscriminator(ndf=8, image_size=32, norm="none", spectral_norm=True, num_classes=4).eval()
    features = D.model[:-1](x)
    psi = D.model[-1](features).flatten()
    expected = psi + (D.embed.weight[y] * features.sum((2, 3))).sum(1)  # Miyato & Koyama, Eq. 3
    torch.testing.assert_close(D(x, y), expected)
    # The embedding is spectrally normalised as the official SNEmbedID: σ of the [classes, C] matrix is 1.
    assert torch.linalg.matrix_norm(D.embed.weight.detach(), 2) == pytest.approx(1.0, rel=0.1)
    # Only the projection term depends on the class: two classes differ by <e_a - e_b, Σφ>.
    a, b = D(x[:1], torch.tensor([0])), D(x[:1], torch.tensor([2]))
    torch.testing.assert_close(a - b, ((D.embed.weight[0] - D.embed.weight[2]) * features[:1].sum((2, 3))).sum(1))
    A = DCGANDiscriminator(ndf=8, image_size=32, norm="none", num_classes=4, conditioning="acgan")
    logits, cls = A(x)
    features = A.model[:-1](x)
    torch.testing.assert_close(logits, A.model[-1](features).flatten())
    torch.testing.assert_close(cls, features.flatten(1) @ A.classifier.weight.T + A.classifier.bias)
    assert cls.shape == (4, 4)


def test_conditional_generators():
    torch.manual_seed(0)
    z = torch.randn(3, 16)
    G = DCGANGenerator(z_dim=16, ngf=8, image_size=32, num_classes=5).train()
    plain = DCGANGenerator(z_dim=16, ngf=8, image_size=32).train()
    # γ starts at 1 and β at 0 for every class: with the same convs, the unconditional G's output.
    plain.load_state_dict({k: v for k, v in G.state_dict().items() if not k.endswith(("weight.weight", "bias.weight"))},
                          strict=False)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.testing.assert_close(G(z, torch.tensor([0, 1, 4])), plain(z))
    G.eval(), plain.eval()  # running statistics (the same in both): samples do not interact
    with torch.no_grad():
        G.model[1].weight.weight[2] *= 3  # class 2's scale of the first block only
        out, base = G(z, torch.tensor([2, 2, 0])), plain(z)
    assert not torch.allclose(out[:2], base[:2], atol=1e-4) and torch.allclose(out[2], base[2], atol=1e-6)
    with pytest.raises(ValueError, match="class ids y"):
        G(z)
    C = DCGANGenerator(z_dim=16, ngf=8, image_size=32, num_classes=5, conditioning="concat")
    assert C.model[0].in_channels == 16 + 5  # the cGAN's one-hot y beside z
    captured = []
    C.model[0].register_forward_hook(lambda m, args, out: captured.append(args[0]))
    C(z, torch.tensor([1, 0, 4]))
    assert torch.equal(captured[0][:, 16:, 0, 0], F.one_hot(torch.tensor([1, 0, 4]), 5).float())


@pytest.mark.parametrize("conditional, loss", [("projection", []), ("acgan", []),
                                               ("projection", ["model.gan=rpgan", "model.gamma=1"]),
                                               ("acgan", ["model.gan=wgan", "model.gp_weight=10"]),
                                               ("projection", ["model.attention=16", "model.spectral_norm_G=true"])])
def test_each_network_gets_the_class_losses(conditional, loss):
    torch.manual_seed(0)
    cfg = load_config("cgan_demo", [f"model.conditional={conditional}", "model.ngf=8", "model.ndf=8", *loss])
    nets = FAMILY.build(cfg, INFO)
    ctx = StepContext(nets=nets, plain=nets, cfg=cfg, info=INFO)
    b = FAMILY.prepare({"data": {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                                 "class": torch.tensor([0, 1, 2, 3])}}, torch.device("cpu"), cfg, INFO)
    assert b["y"].tolist() == [0, 1, 2, 3] and b["y_fake"].shape == (4,) and b["y_fake"].max() < 4
    out = d_step(ctx, b, {})
    out["loss"].backward()
    assert all(p.grad is not None for p in nets["D"].parameters())
    if conditional == "acgan" and not loss:  # D classifies reals as their class, fakes as the class drawn for them
        with torch.no_grad():
            fake = nets["G"](b["z"], b["y_fake"])
            D = nets["D"].eval()  # spectral norm's σ as the step's forward left it
            want = F.cross_entropy(D(b["image"])[1], b["y"]) + F.cross_entropy(D(fake)[1], b["y_fake"])
            D.train()
        torch.testing.assert_close(out["D_cls"].detach(), want)
        total = out["D_real"] + out["D_fake"] + out["D_cls"]
        assert float(out["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    g = g_step(ctx, b, {})
    assert ("D_cls" in out and "G_cls" in g) == (conditional == "acgan")
    g["loss"].backward()
    assert all(p.grad is not None for p in nets["G"].parameters())  # the class embeddings of G's norms too
    with pytest.raises(ValueError, match="gan-shard write folder --classes"):
        FAMILY.build(cfg, DataInfo("unconditional", None, ("image",)))


def test_the_grid_has_one_row_per_class():
    torch.manual_seed(0)
    cfg = load_config("cgan_demo", ["model.ngf=8", "model.ndf=8"])
    G = FAMILY.build(cfg, INFO)["G"].eval()
    image = torch.rand(5, 3, 32, 32) * 2 - 1
    b = {"image": image, "y": torch.tensor([2, 0, 2, 0, 1]), "z": torch.randn(5, cfg.model.z_dim)}
    columns = FAMILY.visualize({"G": G}, b, INFO)
    assert len(columns) == 5 + 1 and all(c.shape == (4, 3, 32, 32) for c in columns)  # a column per latent
    with torch.no_grad():  # row c, column j: latent j drawn as class c
        torch.testing.assert_close(columns[3][2], G(b["z"][3:4], torch.tensor([2]))[0])
    real = columns[-1]  # the first real image of each row's class; none of class 3 in the batch
    assert torch.equal(real[0], image[1]) and torch.equal(real[1], image[4]) and torch.equal(real[2], image[0])
    assert torch.equal(real[3], torch.full_like(real[3], -1.0))


def test_intra_fid_against_a_direct_computation():
    from scipy import linalg

    from pipeline.eval.metrics import intra_fid

    gen = torch.randn(90, 16, generator=torch.Generator().manual_seed(0)).double()
    ref = torch.randn(70, 16, generator=torch.Generator().manual_seed(1)).double() * 1.3 + 0.2
    gen_classes, ref_classes = torch.arange(90) % 3, torch.tensor([0, 1] * 34 + [2, 0])  # class 2: one ref only

    def fid(a, b):
        a, b = a.numpy(), b.numpy()
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(s1 @ s2).real
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))

    out = intra_fid(gen, gen_classes, ref, ref_classes, 3)
    want = [fid(gen[gen_classes == c].float().double(), ref[ref_classes == c].float().double()) for c in (0, 1)]
    assert out["by_class"][:2] == pytest.approx(want, rel=1e-3) and out["by_class"][2] is None
    assert out["intra_fid"] == pytest.approx(sum(want) / 2, rel=1e-3)
    assert out["num_gen"] == [30, 30, 30] and out["num_ref"] == [35, 34, 1]


def test_cgan_on_two_processes_and_the_evaluator(objects, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(2, [f"data.url={objects}", f"run.dir={run_dir}", "model.ngf=8", "model.ndf=8",
                           "train.total_kimg=0.032", "checkpoint.every_kimg=0.032", "data.workers=0",
                           "train.batch_size=8", "train.progress=false", "train.image_every_kimg=0.032"],
                       config="cgan_demo"))
    assert r.returncode == 0, explain(r)
    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception.pth")
    r = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(run_dir), "--once",
             "--inception-weights", str(inception), "--num-samples", "16", "--kid-subset-size", "4",
             "--kid-subsets", "5", "--batch-size", "8"], timeout=300)
    assert r.returncode == 0, explain(r)
    result = json.loads(next((run_dir / "eval").glob("step-*.json")).read_text())
    assert {"fid", "intra_fid", "kid"} <= set(result["metrics"]), result["metrics"]
    per = result["protocol"]["intra_fid"]
    assert list(per["by_class"]) == ["car", "tree", "pole", "person"]
    assert per["num_gen"] == dict.fromkeys(per["by_class"], 4) and sum(per["num_ref"].values()) == 64
    assert result["metrics"]["intra_fid"] == pytest.approx(np.mean(list(per["by_class"].values())))
    # The reference features are cached in the run, never in the dataset's prefix.
    assert list((run_dir / "eval" / "refstats").glob("*.json")) and not (Path(objects) / "refstats").exists()
    # gan-generate draws the classes it is asked for, by name.
    out = tmp_path / "gen"
    r = run([sys.executable, str(REPO / "launch" / "generate.py"), "--run", str(run_dir), "--seeds", "0-2",
             "--class", "tree", "--out", str(out)])
    assert r.returncode == 0, explain(r)
    assert len(list(out.glob("seed*.png"))) == 3


def test_the_demo_config_learns_each_class(objects, tmp_path):
    """After 10 kimg (about 20 s here) the generated images of each class are recognised as that
    class by a nearest-class-mean classifier of the real training images (4x4 colour layout):
    0.70 on this machine, where the real validation images score 0.68 and chance is 0.25."""
    train_demo("cgan_demo", objects, tmp_path / "run", 10, "model.ema_kimg=0")
    cfg = load_config("cgan_demo", [f"data.url={objects}"])
    train = split_batch(objects, cfg, "train", ("image", "class"))

    def features(x):
        return F.avg_pool2d(x.float(), 8).flatten(1)

    images = train["image"].float() / 127.5 - 1
    means = torch.stack([features(images[train["class"] == c]).mean(0) for c in range(4)])
    torch.manual_seed(cfg.run.seed)
    G = FAMILY.build(cfg, INFO)["G"].eval()
    z, y = torch.randn(256, cfg.model.z_dim), torch.arange(256) % 4

    def accuracy():
        with torch.no_grad():
            return float((torch.cdist(features(G(z, y)), means).argmin(1) == y).float().mean())

    before = accuracy()
    G.load_state_dict(final_states(tmp_path / "run")["G"])
    after = accuracy()
    assert after > 0.5 and after > before + 0.2, (before, after)
