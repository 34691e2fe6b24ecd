"""The family seam: declarations the loop, checkpoints and evaluator follow (any set of networks,
optimizers with their own parameter groups, per-rank state, several streams), CycleGAN as the
family that proves it, the cross-rank mean on real processes, and the static rule that no network
or checkpoint file name is written outside the family modules and the checkpoint module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import assert_identical, committed_files, env, explain, free_port, kill_job_at_commit, launch_cmd, run

from pipeline.config import load_config
from pipeline.families import FAMILIES
from pipeline.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- CycleGAN's networks


def test_cyclegan_networks_have_the_official_parameter_counts():
    from pipeline.families.cyclegan import build
    from pipeline.train.family import DataInfo

    cfg = load_config(None, ["model.family=cyclegan"])
    with torch.device("meta"):
        nets = build(cfg, DataInfo("unpaired", None, ("image",)))
        assert num_params(nets["G_A"]) == num_params(nets["G_B"]) == 11_378_179  # ResNet-9 at 256, ngf 64
        assert num_params(nets["D_A"]) == num_params(nets["D_B"]) == 2_764_737  # 70x70 PatchGAN on 3 channels
        six = build(load_config(None, ["model.family=cyclegan", "model.generator=resnet_6blocks"]),
                    DataInfo("unpaired", None, ("image",)))
        assert num_params(nets["G_A"]) - num_params(six["G_A"]) == 3 * 2 * (256 * 256 * 9 + 256)  # 3 blocks fewer
    G = build(cfg, DataInfo("unpaired", None, ("image",)))["G_A"]
    assert G(torch.zeros(1, 3, 64, 32)).shape == (1, 3, 64, 32)
    # The official module order (c7s1-64, d128, d256, R256 x 9, u128, u64, c7s1-3): official keys load.
    names = [n for n, _ in G.named_parameters()]
    assert names[:2] == ["model.1.weight", "model.1.bias"] and names[-2:] == ["model.26.weight", "model.26.bias"]


def test_the_image_pool_is_the_official_one_on_the_torch_rng():
    from pipeline.families.cyclegan import pool_query

    state: dict = {}
    images = [torch.full((1, 3, 4, 4), float(i)) for i in range(8)]
    torch.manual_seed(0)
    out = [pool_query(state, "fake_pool", x, 3) for x in images]
    assert [float(o[0, 0, 0, 0]) for o in out[:3]] == [0, 1, 2]  # filling up: each returned as it is
    assert int(state["fake_pool_count"]) == 3
    # Then: with p = 0.5 a stored one comes back and the new one takes its place, else the new one.
    torch.manual_seed(0)
    expected, pool = [], [0.0, 1.0, 2.0]
    for x in range(3, 8):
        if float(torch.rand(())) > 0.5:
            j = int(torch.randint(3, ()))
            expected.append(pool[j])
            pool[j] = float(x)
        else:
            expected.append(float(x))
    assert [float(o[0, 0, 0, 0]) for o in out[3:]] == expected and len(set(expected)) > 1
    assert sorted(float(v) for v in state["fake_pool"][:, 0, 0, 0]) == sorted(pool)
    assert pool_query(state, "off", images[0], 0) is not images[0] and torch.equal(pool_query({}, "k", images[1], 0),
                                                                                   images[1])


def test_the_demo_unpaired_source_makes_two_unpaired_domains():
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.sources import make_source
    from pipeline.data.sources.demo import render, sample_seed
    from pipeline.data.verify import palette

    source = make_source("demo_unpaired", None, size=(64, 32), counts={"trainA": 3, "trainB": 3})
    assert source.info.task == "unpaired" and source.info.default_splits == ("trainA", "trainB")
    items = {split: source.list_items(split)[0] for split in ("trainA", "trainB")}
    a, b = ({it.key: np.asarray(Image.open(io.BytesIO(source.read(it)["image.png"]))) for it in items[s]}
            for s in ("trainA", "trainB"))
    scene = render(sample_seed(0, "trainA", 0, 64, 32), 64, 32)
    assert np.array_equal(a["demo_trainA_000000"], scene["image"])  # A: the demo photo
    colours = {tuple(c) for c in palette(256)}
    for image in b.values():  # B: label colours only, of other scenes than A's
        assert {tuple(c) for c in image.reshape(-1, 3)} <= colours
    assert not np.array_equal(b["demo_trainB_000000"], palette(256)[scene["label"]])
    with pytest.raises(Exception, match="demo_unpaired splits are trainA, trainB, testA, testB"):
        make_source("demo_unpaired", None, counts={"val": 2})


# ---------------------------------------------------------------- the training state round trip


def test_everything_declared_round_trips_through_a_checkpoint(tmp_path):
    # Two optimizers, one of them with parameter groups of their own lr, betas and a fixed span;
    # EMA copies; per-stream positions; a family state tensor; an fp16 scaler. Saved by the
    # checkpoint module from the declarations, restored into fresh objects: all of it equal.
    from pipeline.dist import DDPEngine
    from pipeline.train.ema import make_ema

    def world(seed: int):
        torch.manual_seed(seed)
        nets = {"G_A": torch.nn.Linear(3, 4), "G_B": torch.nn.Linear(4, 3), "D": torch.nn.Linear(3, 1)}
        groups = [{"params": nets["G_A"].parameters(), "lr": 1e-3, "betas": (0.0, 0.99)},
                  {"params": nets["G_B"].parameters(), "lr": 5e-4, "betas": (0.5, 0.9), "fixed_until_nimg": 8}]
        engines = {"G": DDPEngine("G", {k: nets[k] for k in ("G_A", "G_B")}, torch.optim.Adam(groups), None, 0.0),
                   "D": DDPEngine("D", {"D": nets["D"]}, torch.optim.Adam(nets["D"].parameters(), lr=2e-4),
                                  torch.amp.GradScaler("cpu"), 0.0)}
        for e in engines.values():
            for g in e.param_groups:
                g.setdefault("initial_lr", g["lr"])
        return ckpt.TrainState(nets=nets, ema={"G_A": make_ema(nets["G_A"])}, engines=engines,
                               counters={"step": 0, "nimg": 0}, positions={}, family_state={}, snapshot=("G_A", "G_B"),
                               backend="ddp", world_size=1, rank=0, workers=1, device=torch.device("cpu"))

    ts = world(0)
    for step in range(3):  # a few real steps, so the Adam moments and the scaler have state
        x = torch.randn(2, 3)
        for name, e in ts.engines.items():
            loss = (ts.nets["G_B"](ts.nets["G_A"](x)).square().mean() if name == "G" else ts.nets["D"](x).mean())
            e.backward(loss)
            assert e.check(nimg=step * 4)
            e.step(skip=False)
    ts.counters.update(step=3, nimg=12)
    ts.positions.update({"A": {0: (1, 5)}, "B": {0: (2, 1)}})
    ts.family_state.update({"fake_B_pool": torch.randn(3, 3, 4, 4), "fake_B_pool_count": torch.tensor(3)})
    with torch.no_grad():
        ts.ema["G_A"].weight.add_(1.0)
    ckpt.save(str(tmp_path), ts, {"step": 3, "nimg": 12}, keep_last=2, keep_snapshots=None)

    fresh = world(1)
    assert ckpt.restore(ckpt.latest(str(tmp_path)), fresh)
    for name in ts.nets:
        assert_identical(ts.nets[name].state_dict(), fresh.nets[name].state_dict(), name)
    assert_identical(ts.ema["G_A"].state_dict(), fresh.ema["G_A"].state_dict(), "G_A_ema")
    for name in ts.engines:
        assert_identical(ts.engines[name].state_dicts(), fresh.engines[name].state_dicts(), name)
    groups = fresh.engines["G"].param_groups
    assert [(g["lr"], g["betas"], g.get("fixed_until_nimg")) for g in groups] == [(1e-3, (0.0, 0.99), None),
                                                                                   (5e-4, (0.5, 0.9), 8)]
    assert fresh.counters == {"step": 3, "nimg": 12} and fresh.positions == ts.positions
    assert_identical(ts.family_state, fresh.family_state, "family_state")
    snap = ckpt.latest(str(tmp_path), ckpt.SNAPSHOTS).record
    assert ckpt.snapshot_networks(snap) == {"G_A": "G_A_ema.pt", "G_B": "G_B.pt"}


def test_a_resume_at_another_world_size_without_every_slots_position_goes_on_at_the_next_epoch(tmp_path, caplog):
    from pipeline.dist import DDPEngine

    def state(world: int, workers: int) -> ckpt.TrainState:
        net = torch.nn.Linear(2, 1)
        engine = DDPEngine("G", {"G": net}, torch.optim.Adam(net.parameters()), None, 0.0)
        return ckpt.TrainState(nets={"G": net}, ema={}, engines={"G": engine}, counters={"step": 0, "nimg": 0},
                               positions={}, family_state={}, snapshot=("G",), backend="ddp", world_size=world,
                               rank=0, workers=workers, device=torch.device("cpu"))

    two = state(world=2, workers=1)  # as rank 0 of two, alone: the other slot's positions are not known
    two.positions.update({"A": {0: (3, 7)}, "B": {0: (5, 2)}})
    two.family_state["pool"] = torch.ones(2)
    two.counters.update(step=9, nimg=36)
    ckpt.save(str(tmp_path), two, {"step": 9, "nimg": 36}, keep_last=2, keep_snapshots=None)
    one = state(world=1, workers=2)
    assert not ckpt.restore(ckpt.latest(str(tmp_path)), one)  # the per-rank part is not restored
    assert one.positions == {"A": {0: (4, 0), 1: (4, 0)}, "B": {0: (6, 0), 1: (6, 0)}}
    assert one.family_state == {} and one.counters == {"step": 9, "nimg": 36}
    assert "stream A goes on at epoch 4; the rest of epoch 3 is not seen" in caplog.text
    assert "stream B goes on at epoch 6" in caplog.text


def test_a_resume_with_another_layout_of_slots_takes_the_epoch_over(tmp_path, caplog):
    """Two slots of one process had read 5 and 7 positions of epoch 2 (a bad sample costs a
    position); three slots in three processes share out what is left of it."""
    from pipeline.dist import DDPEngine

    def state(world: int, rank: int, workers: int) -> ckpt.TrainState:
        net = torch.nn.Linear(2, 1)
        engine = DDPEngine("G", {"G": net}, torch.optim.Adam(net.parameters()), None, 0.0)
        return ckpt.TrainState(nets={"G": net}, ema={}, engines={"G": engine}, counters={"step": 0, "nimg": 0},
                               positions={}, family_state={}, snapshot=("G",), backend="ddp", world_size=world,
                               rank=rank, workers=workers, device=torch.device("cpu"))

    one = state(world=1, rank=0, workers=2)
    one.positions.update({"data": {0: (2, 5), 1: (2, 7)}})
    ckpt.save(str(tmp_path), one, {"step": 9, "nimg": 36}, keep_last=2, keep_snapshots=None)
    found = ckpt.latest(str(tmp_path))
    for rank in range(3):
        new = state(world=3, rank=rank, workers=0)
        assert not ckpt.restore(found, new)
        assert new.positions == {"data": {rank: (2, 0)}}
        assert new.handovers == {"data": {"epoch": 2, "slots": 2, "consumed": [5, 7]}}
    assert "stream data shares out what they had not read of epoch 2" in caplog.text
    # The same world size with other DataLoader workers takes over as well, keeping the rank's state.
    same = state(world=1, rank=0, workers=3)
    assert ckpt.restore(found, same) and same.positions == {"data": {0: (2, 0), 1: (2, 0), 2: (2, 0)}}


# ---------------------------------------------------------------- real processes


def test_the_mean_over_ranks_on_two_processes():
    port = free_port()
    code = ("import os, sys, torch, datetime; from pipeline import dist; rank = int(sys.argv[1]); "
            "torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{sys.argv[2]}', rank=rank, "
            "world_size=2, timeout=datetime.timedelta(seconds=60)); "
            "t = torch.tensor([float(rank), 10.0 * rank]); out = dist.mean_over_ranks(t); "
            "print(out.tolist(), t.tolist()); torch.distributed.destroy_process_group()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO) for r in (0, 1)]
    outs = []
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    report = "\n".join(f"--- rank {r}\n{o}\n{e}" for r, (o, e) in enumerate(outs))
    assert all(p.returncode == 0 for p in procs), report
    assert [o.split("]")[0] + "]" for o, _ in outs] == ["[0.5, 5.0]"] * 2, report
    assert outs[1][0].strip().endswith("[1.0, 10.0]"), report  # the rank's own tensor is left as it was


TINY_CYCLE = ["model.ngf=4", "model.ndf=4", "model.generator=resnet_6blocks", "model.pool_size=3",
              "data.load_size=none", "train.batch_size=4", "train.progress=false", "train.log_every_kimg=0.008",
              "train.image_every_kimg=0.016", "train.num_images=2", "model.lambda_identity=0.5"]


@pytest.mark.multiprocess
def test_cyclegan_on_two_processes_resumes_bit_identical_pools_and_streams_included(unpaired_shards, tmp_path):
    args = [f"data.url={unpaired_shards}", "train.total_kimg=0.048", "checkpoint.every_kimg=0.016",
            "data.workers=1", *TINY_CYCLE]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    r = run(launch_cmd(2, [f"run.dir={a_dir}", *args], config="cyclegan_demo"))
    assert r.returncode == 0, explain(r)
    assert "DDP: G steps G_A, G_B; D steps D_A, D_B (fp32: configured)" in r.stdout + r.stderr
    cmd = launch_cmd(2, [f"run.dir={b_dir}", *args], config="cyclegan_demo")
    kill_job_at_commit(cmd, b_dir, 4)
    assert ckpt.latest(str(b_dir)).step < 12
    r = run(cmd)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, explain(r)
    a, b = committed_files(a_dir), committed_files(b_dir)
    assert set(a) == {"G_A.pt", "G_B.pt", "D_A.pt", "D_B.pt", "opt_G.pt", "opt_D.pt", "rank-000.pt", "rank-001.pt"}
    assert_identical(a, b)
    for rank in ("rank-000.pt", "rank-001.pt"):  # per rank: its own pools, both streams' positions
        mine = a[rank]
        assert set(mine["positions"]) == {"A", "B"}
        assert int(mine["family_state"]["fake_A_pool_count"]) == int(mine["family_state"]["fake_B_pool_count"]) == 3
    pools = [a[rank]["family_state"]["fake_B_pool"] for rank in ("rank-000.pt", "rank-001.pt")]
    assert not torch.equal(*pools)  # each rank pools its own fakes
    assert a["rank-000.pt"]["fingerprints"] == a["rank-001.pt"]["fingerprints"]
    # Evaluation and grid read testA -> B and testB -> A.
    found = ckpt.latest(str(a_dir), ckpt.SNAPSHOTS)
    assert ckpt.snapshot_networks(found.record) == {"G_A": "G_A.pt", "G_B": "G_B.pt"}


# ---------------------------------------------------------------- what only families may name


def _declared_names() -> tuple[set[str], set[str]]:
    """Every network and optimizer name a registered family declares."""
    nets = {n.name for f in FAMILIES.values() for n in f.networks}
    opts = set()
    for name, family in FAMILIES.items():
        opts |= {o.name for o in family.optimizers(load_config(None, [f"model.family={name}"]))}
    return nets, opts


def test_no_network_or_checkpoint_file_name_is_written_outside_the_families_and_the_checkpoint_module():
    nets, opts = _declared_names()
    files = ({f"{n}.pt" for n in nets} | {f"{n}_ema.pt" for n in nets} | {f"{n}_ema" for n in nets}
             | {f"{k}_{o}.pt" for k in ("opt", "scaler") for o in opts})
    # The reader of official StyleGAN2 pickles names that project's keys (G, D, G_ema), not ours.
    allowed = {"pipeline/train/checkpoint.py", "pipeline/models/stylegan2_pickle.py"}
    offenders = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in allowed or rel.startswith("pipeline/families/"):
            continue
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in nets | opts | files or node.value.startswith(("opt_", "scaler_", "rank-")):
                    found.append(f"line {node.lineno}: {node.value!r}")
            elif isinstance(node, ast.JoinedStr):  # f"opt_{name}.pt" and the like
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if text.startswith(("opt_", "scaler_", "rank-")) or text.endswith(("_ema.pt", "_ema")):
                    found.append(f"line {node.lineno}: f-string {text!r}")
        if found:
            offenders[rel] = found
    assert offenders == {}
    assert "G" in nets and "G_A" in nets and "D_B" in nets and {"G", "D"} <= opts  # the checker sees real names


def test_registering_a_family_is_one_entry_and_its_module():
    # Every registered family is reachable by name from a config, and its module is the only
    # other place that knows it: the loop, checkpoints and evaluator import none of them. A module
    # may hold the stages of one method (srgan.py: srresnet and srgan), named after one of them.
    by_module: dict[str, set[str]] = {}
    for name, family in FAMILIES.items():
        assert load_config(None, [f"model.family={name}"]).model.family == name
        module = family.config.__module__
        assert module.startswith("pipeline.families.") and family.build.__module__ == module
        by_module.setdefault(module.rsplit(".", 1)[1], set()).add(name)
    assert all(module in names for module, names in by_module.items()), by_module
    modules = set(by_module)
    for rel in ("pipeline/train/loop.py", "pipeline/train/checkpoint.py", "pipeline/eval/watcher.py",
                "pipeline/train/stats.py", "pipeline/config.py"):
        imports = [n for n in ast.walk(ast.parse((REPO / rel).read_text())) if isinstance(n, ast.ImportFrom)]
        named = {f"{n.module}.{a.name}" if n.module else a.name for n in imports for a in n.names}
        assert not any(f".{f}" in m or m.endswith(f"families.{f}") for m in named for f in modules | set(FAMILIES)), \
            (rel, named)


def test_cyclegan_grid_and_evaluation_cover_both_directions(unpaired_shards, tmp_path):
    run_dir = tmp_path / "run"
    r = run(launch_cmd(1, [f"data.url={unpaired_shards}", f"run.dir={run_dir}", "train.total_kimg=0.008",
                           "checkpoint.every_kimg=0.008", "data.workers=0", *TINY_CYCLE,
                           "train.image_every_kimg=0.008"],
                       config="cyclegan_demo"))
    assert r.returncode == 0, explain(r)
    from test_train import read_scalars

    scalars = read_scalars(run_dir)
    for tag in ("Loss/G_A", "Loss/G_B", "Loss/cycle_A", "Loss/cycle_B", "Loss/idt_A", "Loss/idt_B", "Loss/D_A",
                "Loss/D_B", "LR/G", "LR/D", "Grad/G_norm", "Grad/D_norm"):
        assert tag in scalars, sorted(scalars)
    assert scalars["__images__"] == ["Images/val_input_output_target"]
    from pipeline.eval.standin import write_standin_inception

    inception = write_standin_inception(tmp_path / "inception.pth")
    r = run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run", str(run_dir), "--once",
             "--inception-weights", str(inception), "--kid-subset-size", "4", "--kid-subsets", "5",
             "--batch-size", "4"], timeout=400)
    assert r.returncode == 0, explain(r)
    result = json.loads((run_dir / "eval" / "step-00000002.json").read_text())
    m = result["metrics"]
    assert {"fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA", "fid", "kid"} <= set(m)
    assert m["fid"] == pytest.approx((m["fid_AtoB"] + m["fid_BtoA"]) / 2)
    assert result["protocol"]["AtoB"]["reference_split"] == "testB"
    assert result["protocol"]["BtoA"]["reference_split"] == "testA"
    assert (result["protocol"]["AtoB"]["num_gen"], result["protocol"]["BtoA"]["num_gen"]) == (6, 5)


def test_cyclegan_demo_learns_to_map_photos_to_their_label_colours(tmp_path):
    # Unpaired training, checked against the pairing it never saw: the demo renderer gives each
    # held-out scene's photo and its true colourised label map; G_A's output must move from an
    # untrained G's distance to that truth well below the distance of the truth's mean colour.
    import torch.nn.functional as F

    from pipeline.data.sources.demo import render
    from pipeline.data.sources.demo_unpaired import colourised_labels
    from pipeline.families.cyclegan import build
    from pipeline.train.family import DataInfo

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "shard.py"), "write", "demo_unpaired", "--out",
                        str(shards), "--demo-size", "64x32", "--demo-count", "trainA=200", "--demo-count", "trainB=200",
                        "--demo-count", "testA=8", "--demo-count", "testB=8", "--samples-per-shard", "100",
                        "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    overrides = [f"data.url={shards}", "data.load_size=none", "model.ngf=8", "model.ndf=8", "data.workers=0"]
    r = run(launch_cmd(1, [*overrides, f"run.dir={run_dir}", "train.total_kimg=0.6", "checkpoint.every_kimg=0.6",
                           "train.image_every_kimg=0", "train.progress=false"], config="cyclegan_demo"), timeout=400)
    assert r.returncode == 0, explain(r)
    scenes = [render([999, i], 64, 32) for i in range(16)]
    x = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    y = torch.stack([torch.from_numpy(colourised_labels(s["label"])).permute(2, 0, 1) for s in scenes]).float()
    y = y / 127.5 - 1
    cfg = load_config("cyclegan_demo", overrides)
    torch.manual_seed(cfg.run.seed)
    G = build(cfg, DataInfo("unpaired", None, ("image",)))["G_A"].eval()
    with torch.no_grad():
        before = float((G(x) - y).abs().mean())
        G.load_state_dict(ckpt.load_tensors(ckpt.latest(str(run_dir)).file("G_A.pt")))
        after = float((G(x) - y).abs().mean())
    mean_colour = float((y.mean((0, 2, 3), keepdim=True) - y).abs().mean())
    assert after < 0.8 * before and after < 0.9 * mean_colour, (before, after, mean_colour)
    assert F.l1_loss(G(x), y) < F.l1_loss(G(torch.flip(x, (0,))), y)  # it maps each scene, not an average
