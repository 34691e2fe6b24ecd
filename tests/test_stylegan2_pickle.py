"""Official StyleGAN2-ADA network pickles read without running their code: pickles built here in the
official format (persistence records whose module_src would write a marker), hostile pickles, damaged
files, and a tiny real official pickle (tests/data, made by tests/tools/make_stylegan2_pickle.py)."""

from __future__ import annotations

import builtins
import collections
import contextlib
import copy
import hashlib
import json
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models.stylegan2_pickle import (
    OfficialPickleError,
    RefusedGlobalError,
    load_official_pickle,
)

DATA = Path(__file__).resolve().parent / "data"
FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


# ----------------------------------------------------------------------------- the official format, faked


@contextlib.contextmanager
def official_code(marker: Path) -> Iterator[types.SimpleNamespace]:
    """Throwaway ``torch_utils.persistence`` and ``dnnlib.util`` in sys.modules while pickles are
    dumped: ``persistent_class`` reduces exactly as the official one does (a call to
    ``_reconstruct_persistent_obj(meta)``), with a module_src that writes ``marker`` if exec'd."""
    assert not any(m in sys.modules for m in FAKE_MODULES)
    module_src = f"open({str(marker)!r}, 'w').write('module_src ran')\n"
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # what official unpickling does first: exec the source
        exec(meta["module_src"], {})
        return meta

    class EasyDict(dict):  # dnnlib/util.py
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    _reconstruct_persistent_obj.__module__ = persistence.__name__  # pickled by name, as the official one
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = EasyDict

    def persistent_class(orig_class):
        class Decorator(orig_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)

            def __reduce__(self):  # torch_utils/persistence.py, verbatim in substance
                fields = list(super().__reduce__())
                fields += [None] * max(3 - len(fields), 0)
                if fields[0] is not _reconstruct_persistent_obj:
                    meta = dict(type="class", version=6, module_src=module_src, class_name=orig_class.__name__,
                                state=fields[2])
                    fields[0] = _reconstruct_persistent_obj
                    fields[1] = (meta,)
                    fields[2] = None
                return tuple(fields)

        Decorator.__name__ = orig_class.__name__
        return Decorator

    fakes = {"torch_utils": types.ModuleType("torch_utils"), persistence.__name__: persistence,
             "dnnlib": types.ModuleType("dnnlib"), util.__name__: util}
    sys.modules.update(fakes)
    try:
        yield types.SimpleNamespace(persistent_class=persistent_class, EasyDict=EasyDict)
    finally:
        for name in fakes:
            del sys.modules[name]


def official_networks(code: types.SimpleNamespace) -> dict:
    """A tiny snapshot dict shaped like training_loop.py's: persistent networks nesting persistent
    layers, a plain torch.nn container, numpy gains and sizes, a non-persistent buffer, a
    channels-last weight, a None bias and a None submodule."""

    @code.persistent_class
    class Layer(nn.Module):
        def __init__(self, in_features, out_features, bias=True, size=4):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(out_features, in_features, 3, 3)
                                       .to(memory_format=torch.channels_last))
            self.bias = nn.Parameter(torch.randn(out_features)) if bias else None
            self.weight_gain = 1 / np.sqrt(in_features * 9)  # numpy float64, as the official layers
            self.size = np.broadcast_to(np.asarray(size), [2])  # numpy array, as StyleGAN3's layers
            self.register_buffer("resample_filter", torch.tensor([[1.0, 3.0], [3.0, 1.0]]) / 8)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    @code.persistent_class
    class Generator(nn.Module):
        def __init__(self, z_dim, w_dim, mapping_kwargs=None, synthesis_kwargs=None):
            super().__init__()
            self.fc0 = Layer(z_dim, w_dim)
            self.fc1 = Layer(w_dim, w_dim, bias=False)
            self.embed = None
            self.register_module("unused", None)
            self.torgb = nn.Sequential(nn.Linear(w_dim, 3), nn.LeakyReLU(0.2))
            self.register_buffer("w_avg", torch.randn(w_dim))

    @code.persistent_class
    class Discriminator(nn.Module):
        def __init__(self, c_dim, img_resolution, block_kwargs=None):
            super().__init__()
            self.b4 = Layer(3, 4)
            self.out = Layer(4, 1, size=np.int64(img_resolution))

    @code.persistent_class
    class AugmentPipe(nn.Module):
        def __init__(self, xflip=0, rotate90=0):
            super().__init__()
            self.xflip = float(xflip)
            self.register_buffer("p", torch.ones([]))

    E = code.EasyDict
    torch.manual_seed(0)
    G_kwargs = E(z_dim=4, w_dim=4, mapping_kwargs=E(num_layers=2),
                 synthesis_kwargs=E(channel_base=np.int64(64), conv_clamp=256.0, gain=np.float32(0.5),
                                    sizes=np.asarray([4, 8])))
    G = Generator(**G_kwargs)
    D = Discriminator(c_dim=0, img_resolution=16, block_kwargs=E())
    G_ema = Generator(**G_kwargs)  # other weights than G's: the loader must not mix them up
    augment_pipe = AugmentPipe(xflip=1, rotate90=1)
    augment_pipe.p.fill_(0.3)
    nets = {"G": G, "D": D, "G_ema": G_ema, "augment_pipe": augment_pipe}
    snapshot = dict(training_set_kwargs=dict(E(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                               resolution=np.int64(16), xflip=False, max_size=None)))
    for name, module in nets.items():
        snapshot[name] = module.eval().requires_grad_(False).cpu()
    return snapshot


def write_official(tmp_path: Path, protocol: int = 3) -> tuple[Path, Path, dict]:
    """(pickle, marker, {name: expected state_dict()}) for a fake-official snapshot."""
    marker = tmp_path / "module_src_ran"
    with official_code(marker) as code:
        snapshot = official_networks(code)
        data = pickle.dumps(snapshot, protocol=protocol)
    path = tmp_path / f"network-snapshot-p{protocol}.pkl"
    path.write_bytes(data)
    expected = {k: v.state_dict() for k, v in snapshot.items() if isinstance(v, nn.Module)}
    return path, marker, expected


def assert_state_dicts_equal(ours: dict, expected: dict) -> None:
    assert list(ours) == list(expected)
    for key, ref in expected.items():
        got = ours[key]
        assert type(got) is torch.Tensor and not got.requires_grad, key
        assert (got.dtype, got.shape, got.stride()) == (ref.dtype, ref.shape, ref.stride()), key
        assert torch.equal(got, ref), key


def assert_one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(e.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_official_format_loads_exactly_without_running_module_src(tmp_path, protocol):
    path, marker, expected = write_official(tmp_path, protocol)

    nets = load_official_pickle(str(path))

    assert not marker.exists(), "module_src ran"
    assert not any(m in sys.modules for m in FAKE_MODULES)
    assert list(nets) == ["G", "D", "G_ema", "augment_pipe"]
    for name, state in expected.items():
        assert_state_dicts_equal(nets[name], state)
    assert "fc1.bias" not in nets["G"] and "fc0.scratch" not in nets["G"]  # None and non-persistent
    assert "torgb.0.weight" in nets["G"]  # a plain torch.nn container inside a persistent network
    assert nets.class_names == {"G": "Generator", "D": "Discriminator", "G_ema": "Generator",
                                "augment_pipe": "AugmentPipe"}
    assert nets.init_kwargs["G"] == {"z_dim": 4, "w_dim": 4, "mapping_kwargs": {"num_layers": 2},
                                     "synthesis_kwargs": {"channel_base": 64, "conv_clamp": 256.0, "gain": 0.5,
                                                          "sizes": [4, 8]}}
    assert type(nets.init_kwargs["G"]["mapping_kwargs"]) is dict
    assert type(nets.init_kwargs["G"]["synthesis_kwargs"]["channel_base"]) is int
    assert nets.init_kwargs["D"] == {"c_dim": 0, "img_resolution": 16, "block_kwargs": {}}
    assert nets.init_kwargs["augment_pipe"] == {"xflip": 1, "rotate90": 1}
    assert nets.training_set_kwargs == {"class_name": "training.dataset.ImageFolderDataset", "path": "x.zip",
                                        "resolution": 16, "xflip": False, "max_size": None}


def test_plain_pickle_would_run_module_src(tmp_path):
    """The control: the marker does detect module_src running, under an ordinary unpickler."""
    path, marker, _ = write_official(tmp_path)
    with official_code(marker):
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "module_src ran"


def test_numpy_1_names_and_a_missing_augment_pipe(tmp_path):
    """The published pickles predate numpy 2 (``numpy.core.multiarray``), and a run without ADA
    snapshots ``augment_pipe=None``."""
    marker = tmp_path / "module_src_ran"
    with official_code(marker) as code:
        snapshot = official_networks(code)
        snapshot["augment_pipe"] = None
        data = pickle.dumps(snapshot, protocol=3)
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # globals are text lines
    assert b"numpy.core.multiarray\nscalar\n" in data and b"numpy._core" not in data
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(data)

    nets = load_official_pickle(str(path))

    assert list(nets) == ["G", "D", "G_ema"] and "augment_pipe" not in nets.init_kwargs
    assert_state_dicts_equal(nets["D"], snapshot["D"].state_dict())
    assert nets.training_set_kwargs["resolution"] == 16
    assert not marker.exists()


def test_loads_through_fsspec_urls(tmp_path):
    path, marker, expected = write_official(tmp_path)
    url = f"memory://stylegan2-pickle-test/{os.getpid()}/snapshot.pkl"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    try:
        nets = load_official_pickle(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert_state_dicts_equal(nets["G_ema"], expected["G_ema"])
    assert not marker.exists()


def test_real_official_pickle_matches_the_official_state_dicts():
    """A pickle the official stylegan2-ada-pytorch code wrote (training_loop.py's snapshot, tiny);
    the JSON beside it holds the official modules' state_dict() digests and init_kwargs."""
    ref = json.loads((DATA / "stylegan2_official_tiny.json").read_text())

    nets = load_official_pickle(str(DATA / "stylegan2_official_tiny.pkl"))

    assert list(nets) == list(ref["networks"])
    for name, info in ref["networks"].items():
        assert [k for k, _ in info["state_dict"]] == list(nets[name]), name
        for key, digest in info["state_dict"]:
            t = nets[name][key]
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert [list(t.shape), str(t.dtype).removeprefix("torch."), hashlib.sha256(data).hexdigest()] == \
                [digest["shape"], digest["dtype"], digest["sha256"]], (name, key)
        assert nets.init_kwargs[name] == info["init_kwargs"], name
        assert nets.class_names[name] == info["class_name"]
    assert nets.training_set_kwargs == ref["training_set_kwargs"]
    assert nets["augment_pipe"]["p"].item() == 0.25
    assert not torch.equal(nets["G"]["synthesis.b4.const"], nets["G_ema"]["synthesis.b4.const"])
    official = ("torch_utils", "dnnlib", "training")
    assert not any(m in official or m.startswith((*(f"{o}." for o in official), "_imported_module_"))
                   for m in sys.modules)


# ----------------------------------------------------------------------------- hostile pickles


class _Call:
    """Pickles as a call of ``fn(*args)``: what a hostile pickle does with a global it names."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile_payloads(marker: Path) -> dict[str, tuple[str, object]]:
    touch = f"touch {marker}"
    return {
        "os.system": (os.system.__module__ + ".system", _Call(os.system, touch)),
        "builtins.eval": ("builtins.eval", _Call(builtins.eval, f"open({str(marker)!r}, 'w')")),
        "subprocess.Popen": ("subprocess.Popen", _Call(subprocess.Popen, ["touch", str(marker)])),
    }


@pytest.mark.faults
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_foreign_globals_are_refused_before_they_run(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    name, obj = _hostile_payloads(marker)[payload]
    alone = tmp_path / "alone.pkl"
    alone.write_bytes(pickle.dumps(obj, protocol=4))
    # Hidden deep inside an otherwise official snapshot: inside D's layer state.
    path, module_marker, _ = write_official(tmp_path)
    with official_code(module_marker) as code:
        snapshot = official_networks(code)
        snapshot["D"].b4.hidden = {"gain": [obj]}
        inside = tmp_path / "inside.pkl"
        inside.write_bytes(pickle.dumps(snapshot, protocol=3))

    for p in (alone, inside):
        with pytest.raises(RefusedGlobalError) as e:
            load_official_pickle(str(p))
        assert_one_line(e, str(p), f"'{name}'", "not run", "official", "convert")
    assert not marker.exists() and not module_marker.exists()


@pytest.mark.faults
def test_classic_protocol_0_exploit_and_tensorflow_pickles_are_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    exploit = tmp_path / "exploit.pkl"
    exploit.write_bytes(f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(RefusedGlobalError) as e:
        load_official_pickle(str(exploit))
    assert_one_line(e, "'posix.system'", "not run")
    assert not marker.exists()

    tf = tmp_path / "tf.pkl"
    tf.write_bytes(b"\x80\x03cdnnlib.tflib.network\nNetwork\n)\x81}b.")
    with pytest.raises(RefusedGlobalError) as e:
        load_official_pickle(str(tf))
    assert_one_line(e, "TensorFlow", "legacy.py")


@pytest.mark.faults
def test_a_hostile_tensor_storage_is_refused_by_the_weights_only_load(tmp_path):
    marker = tmp_path / "payload_ran"
    inner = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    path = tmp_path / "storage.pkl"
    path.write_bytes(pickle.dumps({"G": _Call(torch.storage._load_from_bytes, inner)}, protocol=4))
    with pytest.raises(RefusedGlobalError) as e:
        load_official_pickle(str(path))
    assert_one_line(e, "posix.system", "tensor storage")
    assert not marker.exists()


@pytest.mark.faults
def test_out_of_bounds_tensors_and_object_arrays_are_refused(tmp_path):
    storage = torch.arange(4.0).untyped_storage()
    typed = torch.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    rebuild = torch._utils._rebuild_tensor_v2
    reads_past = tmp_path / "past.pkl"
    reads_past.write_bytes(pickle.dumps([_Call(rebuild, typed, 2, (100,), (1,), False, collections.OrderedDict())]))
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(reads_past))
    assert_one_line(e, "reaches element 102 of a storage of 4")

    objects = tmp_path / "objects.pkl"
    objects.write_bytes(pickle.dumps({"training_set_kwargs": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(objects))
    assert_one_line(e, "refused the numpy dtype 'O")


@pytest.mark.faults
@pytest.mark.parametrize(("content", "message"), [
    # The C unpickler sizes its memo array by the largest index: 2**31 would ask for 16 GB.
    (b"\x80\x04N" + b"r" + (2**31).to_bytes(4, "little") + b".", "memo index 2147483648 at byte 3"),
    # A length far past the end would be allocated before the read finds the file short.
    (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc.", "truncated"),
])
def test_numbers_a_file_names_are_bounded_before_unpickling(tmp_path, content, message):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(content)
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(path))
    assert_one_line(e, str(path), message)


# ----------------------------------------------------------------------------- damaged and foreign files


@pytest.mark.faults
def test_truncated_files_name_the_problem(tmp_path):
    path, marker, _ = write_official(tmp_path)
    data = path.read_bytes()
    for cut in (1, 10, len(data) // 3, len(data) - 1):
        damaged = tmp_path / f"cut{cut}.pkl"
        damaged.write_bytes(data[:cut])
        with pytest.raises(OfficialPickleError) as e:
            load_official_pickle(str(damaged))
        assert_one_line(e, str(damaged), "truncated")
    assert not marker.exists()


@pytest.mark.faults
@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"resolution: 256\nchannels: 3\n", "not a pickle"),
    (b"PK\x03\x04rest-of-a-zip", "torch.save"),
])
def test_not_a_pickle(tmp_path, content, message):
    path = tmp_path / "network.pkl"
    path.write_bytes(content)
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(path))
    assert_one_line(e, str(path), message)


@pytest.mark.parametrize(("obj", "message"), [
    ([1, 2, 3], "holds a list, not the official dict of G, D, G_ema"),
    ({"state_dict": collections.OrderedDict(w=torch.zeros(2))}, "[state_dict] without G, D, G_ema"),
    ({"G": torch.zeros(2), "D": None, "G_ema": None}, "G is a Tensor, not a network"),
])
def test_other_layouts_are_named(tmp_path, obj, message):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(path))
    assert_one_line(e, str(path), message)


def test_names_from_the_file_cannot_break_the_message_line(tmp_path):
    path = tmp_path / "names.pkl"
    path.write_bytes(pickle.dumps({"state\ndict\x1b[2J": 1}))
    with pytest.raises(OfficialPickleError) as e:
        load_official_pickle(str(path))
    assert_one_line(e, "[state\\ndict\\x1b[2J] without G, D, G_ema")
