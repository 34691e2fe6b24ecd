"""A trained generator as files that outlive its run.

``G.safetensors``: the network's weights with, as safetensors metadata, the run's resolved config,
its data description and where the weights came from, so ``load_exported`` (and
``pipeline.load_generator``) rebuild the network without the run directory or its shards.

``G.pt2``: a ``torch.export`` program of the network's forward, traced with the inputs the family's
own evaluation passes to it (for a conditional family: its encoded inputs, e.g. one-hot label maps
and instance edges), batch size free. It runs with torch alone: ``torch.export.load(path).module()``.
``torch.export`` is the successor torch names for TorchScript, which torch 2.14 deprecates.

``G.onnx`` (``--onnx``, the ``onnx`` extra): that program as an ONNX model through torch's own
exporter, weights inside the file, batch size free; for ONNX Runtime, TensorRT and the like.
What the generator draws itself (SPADE's VAE style) is drawn in the graph by ONNX's RNG.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io as _io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import io

META_KEY = "gan_pipeline"
FORMAT = 1


def export_safetensors(snap, network: str, url: str) -> None:
    """``snap.nets[network]``'s state as a safetensors file at ``url``, described by its metadata."""
    from safetensors.torch import save

    from .config import to_dict

    state = {k: v.detach().cpu().contiguous().clone() for k, v in snap.nets[network].state_dict().items()}
    info = snap.info
    meta = {"format": FORMAT, "family": snap.family.name, "network": network, "step": snap.step,
            "source": snap.url, "config": to_dict(snap.cfg),
            "info": {"task": info.task, "num_classes": info.num_classes, "fields": list(info.fields),
                     "palette": [list(c) for c in info.palette] if info.palette else None}}
    io.atomic_write_bytes(url, save(state, metadata={META_KEY: json.dumps(meta)}))


def read_metadata(path: str | Path) -> dict:
    """The gan-pipeline description inside an exported safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error type for a file it cannot parse
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta is None:
        raise ValueError(f"{path} is a safetensors file without gan-pipeline metadata: export one with "
                         f"gan-generate --run RUN --out DIR --export")
    return json.loads(meta)


def load_exported(url: str, device: str | torch.device = "cpu", storage_options: dict | None = None):
    """``(G, snapshot)`` from an exported safetensors file (any fsspec URL): the network rebuilt from
    the file's config and loaded (eval mode, no gradients), and a ``Snapshot`` holding it alone, so
    ``pipeline.generate``'s functions work on it as on a run's snapshot."""
    from safetensors.torch import load_file

    from .config import from_dict
    from .families import get_family
    from .generate import Snapshot
    from .train.family import DataInfo

    with _local_file(url, storage_options) as path:
        meta = read_metadata(path)
        state = load_file(path)
    cfg = from_dict(meta["config"])
    family = get_family(meta["family"])
    own = meta["info"].get("palette")
    info = DataInfo(meta["info"]["task"], meta["info"]["num_classes"], tuple(meta["info"]["fields"]),
                    tuple(map(tuple, own)) if own else None)
    net = family.build(cfg, info)[meta["network"]]
    net.load_state_dict(state)
    net = net.eval().requires_grad_(False).to(device)
    return net, Snapshot({meta["network"]: net}, cfg, family, info, url, meta["step"])


@contextlib.contextmanager
def _local_file(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """``url`` as a local file path: itself, or a temporary download removed afterwards."""
    if io.is_local(url):
        yield io.fs_for(url, storage_options)[1]
        return
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        tmp.write(io.read_bytes(url, storage_options))
        tmp.flush()
        yield tmp.name


def captured_inputs(net: nn.Module, call, *args) -> tuple[tuple, dict]:
    """The positional and keyword arguments of ``net``'s first forward during ``call(*args)``."""
    seen: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        if not seen:
            seen.append((args, kwargs))

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call(*args)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the family's evaluation never called the network to export")
    return seen[0]


def export_program(net: nn.Module, args: tuple, kwargs: dict, url: str) -> torch.export.ExportedProgram:
    """``net``'s forward on inputs shaped like ``args``/``kwargs`` as a ``torch.export`` program
    at ``url``, the batch dimension of every tensor input free."""
    batch = torch.export.Dim("batch", min=1)
    bound = inspect.signature(net.forward).bind(*args, **kwargs)
    dynamic = {name: {0: batch} if torch.is_tensor(x) and x.dim() > 0 else None
               for name, x in bound.arguments.items()}
    program = torch.export.export(net, args, kwargs, dynamic_shapes=dynamic)
    buf = _io.BytesIO()
    torch.export.save(program, buf)
    io.atomic_write_bytes(url, buf.getvalue())
    return program


def onnx_missing() -> str | None:
    """Why an ONNX export cannot run here, or None."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"--onnx needs the {' and '.join(missing)} package(s): pip install -e '.[onnx]'"
    return None


def export_onnx(program: torch.export.ExportedProgram, url: str) -> None:
    """``program`` as one self-contained ONNX file at ``url`` (its dynamic batch dimension kept).
    ONNX's protobuf limit holds such a file to 2 GB of weights, far above these generators'."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with contextlib.redirect_stdout(_io.StringIO()):  # the exporter's progress lines
            torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, verbose=False)
        io.atomic_write_bytes(url, path.read_bytes())
