"""Official StyleGAN2-ADA / StyleGAN3 network pickles (``ffhq.pkl``, ``network-snapshot-*.pkl``) read
into plain state dicts, without running any code from the pickle.

The official code (NVlabs stylegan2-ada-pytorch and stylegan3, ``torch_utils/persistence.py``)
pickles each network as a call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` carries the
source code of the network's module, which unpickling normally ``exec()``s. Here a restricted
unpickler resolves only an explicit allow-list of globals, each to a stand-in that builds data:
persistent objects become :class:`ModuleRecord` (class name and ``__dict__``; the source is never
run), tensor storages load through ``torch.load(weights_only=True)``, numpy values are rebuilt from
their bytes. Any other global is refused when it is named, before anything could call it. A parse
of the opcodes first bounds what a damaged or hostile file can make the unpickler allocate.
"""

from __future__ import annotations

import collections
import io as _bytes_io
import math
import pickle
import pickletools
import re
from typing import Any

import numpy as np
import torch

from .. import io

NETWORKS = ("G", "D", "G_ema", "augment_pipe")
REQUIRED = ("G", "D", "G_ema")
_MAX_DEPTH = 64  # module nesting / kwargs nesting; the official networks nest 4 deep


class OfficialPickleError(ValueError):
    """A file that is not a readable official network pickle; the message is one printable line
    (names taken from the file, such as class names, are escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class RefusedGlobalError(OfficialPickleError):
    """The pickle names a global outside the allow-list; it was refused, never called."""


class ModuleRecord:
    """An ``nn.Module`` as pickled, never instantiated: its class name and its ``__dict__``
    (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, ...)."""

    class_name = ""

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state: Any) -> None:
        # BUILD after NEWOBJ: how a plain (not persistent) torch.nn module pickles.
        if not isinstance(state, dict):
            raise OfficialPickleError(f"a {self.class_name} holds a {type(state).__name__} state, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r})"


class OfficialPickle(dict):
    """Network name → state dict (``G``, ``D``, ``G_ema``; ``augment_pipe`` when the pickle has one),
    keys exactly as the official module's ``state_dict()``. Beside it, what a caller needs to build
    matching networks: ``init_kwargs`` (name → the constructor's keyword arguments, None if not
    recorded), ``class_names`` (name → official class name) and ``training_set_kwargs``."""

    def __init__(self, state_dicts: dict[str, dict[str, torch.Tensor]], init_kwargs: dict[str, dict | None],
                 class_names: dict[str, str], training_set_kwargs: dict | None) -> None:
        super().__init__(state_dicts)
        self.init_kwargs = init_kwargs
        self.class_names = class_names
        self.training_set_kwargs = training_set_kwargs


# ----------------------------------------------------------------------------- stand-ins
# Each stand-in must be harmless for any arguments a hostile pickle can build. None keeps a
# security setting in a default or attribute: a pickle can BUILD onto a global it names, though
# only with objects it could build anyway.


class _EasyDict(dict):
    """``dnnlib.util.EasyDict`` (a dict subclass): only its items matter."""


def _persistent_object(meta: Any) -> ModuleRecord:
    """``torch_utils.persistence._reconstruct_persistent_obj``: the record, ``module_src`` unread."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict | None)):
        raise OfficialPickleError("a persistent object's record is not in the official layout "
                                  "(type='class', class_name, state)")
    return ModuleRecord(meta["class_name"], dict(meta.get("state") or {}))


_plain_module_types: dict[str, type] = {}


def _plain_module_type(module: str, name: str) -> type:
    """A :class:`ModuleRecord` type standing in for the class ``torch.nn.modules.<x>.<Name>``."""
    path = f"{module}.{name}"
    if path not in _plain_module_types:
        _plain_module_types[path] = type(name, (ModuleRecord,), {"class_name": path, "state": None})
    return _plain_module_types[path]


def _load_storage(data: Any) -> torch.TypedStorage:
    """``torch.storage._load_from_bytes``: a storage saved by ``torch.save`` (legacy format) inside
    the pickle, loaded with torch's own weights-only unpickler."""
    if not isinstance(data, bytes):
        raise OfficialPickleError(f"a tensor storage is a {type(data).__name__}, not bytes")
    try:
        storage = torch.load(_bytes_io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged bytes fail inside torch's reader with assorted types
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise RefusedGlobalError(f"refused the global {refused.group(1)!r} inside a tensor storage "
                                     "(torch.load(weights_only=True) did not run it)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))  # past torch's generic advice
        reason = f"weights-only unpickler: {detail.group(1)[:200]}" if detail else _first_line(e)
        raise OfficialPickleError(f"a tensor storage does not load ({reason})") from None
    if not isinstance(storage, torch.TypedStorage):
        raise OfficialPickleError(f"a tensor storage holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``: a view of ``storage``, bounds checked (``Tensor.set_`` does
    not check them). Backward hooks are dropped; metadata (conj/neg bits) is refused."""
    if not isinstance(storage, torch.TypedStorage):
        raise OfficialPickleError(f"a tensor's storage is a {type(storage).__name__}")
    if metadata:
        raise OfficialPickleError("a tensor carries metadata (conjugate/negative bits): not a network weight")
    ints = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else (None,)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise OfficialPickleError(f"a tensor has a bad offset/size/stride {str((storage_offset, size, stride))[:80]}")
    available = torch.empty(0, dtype=storage.dtype).set_(storage).numel()
    end = storage_offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
    if end > available:
        raise OfficialPickleError(f"a tensor of size {size} reaches element {end} of a storage of {available}")
    return torch.empty(0, dtype=storage.dtype).set_(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter[_with_state]``: the plain tensor, as ``state_dict()`` gives it."""
    if not isinstance(data, torch.Tensor):
        raise OfficialPickleError(f"a parameter holds a {type(data).__name__}, not a tensor")
    return data


# numpy: never hand numpy a pickled dtype state (its flags could make raw bytes pass for object
# pointers); rebuild plain numeric dtypes from their type string and byte order only.
_NUMPY_KINDS = frozenset("biufc")


class _DtypeSpec:
    """``numpy.dtype(spec, align, copy)`` then BUILD with its state: a numeric dtype, or refused."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        dtype = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 8 else None
        if dtype is None or dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype:
            raise OfficialPickleError(f"refused the numpy dtype {str(spec)[:20]!r}: only numeric dtypes are read")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[2:5] == (None, None, None)
                and state[1] in ("<", ">", "|", "=")):
            raise OfficialPickleError("refused a numpy dtype state: only plain numeric dtypes are read")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _dtype(spec: Any) -> np.dtype:
    if not isinstance(spec, _DtypeSpec):
        raise OfficialPickleError(f"a numpy value has a {type(spec).__name__} for its dtype")
    return spec.dtype


def _array_from_bytes(raw: Any, dtype: np.dtype, shape: Any, order: Any) -> np.ndarray:
    if not (isinstance(raw, bytes | bytearray) and isinstance(shape, tuple)
            and all(isinstance(n, int) and n >= 0 for n in shape) and order in ("C", "F")):
        raise OfficialPickleError("a numpy array is not in the layout numpy pickles")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise OfficialPickleError(f"a numpy array of shape {shape} has {len(raw)} bytes")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


def _numpy_scalar(dtype: Any, data: Any) -> np.generic:
    """``numpy.core.multiarray.scalar``: e.g. the ``np.float64`` gains the official layers keep."""
    dt = _dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise OfficialPickleError("a numpy scalar is not in the layout numpy pickles")
    return np.frombuffer(data, dtype=dt)[0]


_NDARRAY = object()  # ``numpy.ndarray``: only ever the first argument of ``_reconstruct``


class _ArrayRecord:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` then BUILD: the array in ``.array``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise OfficialPickleError("a numpy array is not in the layout numpy pickles")
        shape, dtype, is_fortran, raw = state
        self.array = _array_from_bytes(raw, _dtype(dtype), shape, "F" if is_fortran else "C")


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _ArrayRecord:
    if subtype is not _NDARRAY:
        raise OfficialPickleError("numpy _reconstruct of something other than numpy.ndarray")
    return _ArrayRecord()


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy.core.numeric._frombuffer``: how numpy pickles arrays under protocol 5."""
    return _array_from_bytes(buf, _dtype(dtype), shape, order)


# (module, name) as the pickle names it → what it resolves to. Nothing else is ever resolved.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # protocol <= 3 (Python 3.7's default) pickles sets by a call
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy", "ndarray"): _NDARRAY,
    **{(f"numpy.{core}.multiarray", "scalar"): _numpy_scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy_frombuffer for core in ("core", "_core")},
}
_PLAIN_MODULE = re.compile(r"torch\.nn\.modules\.[a-z_]+")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS` (and plain ``torch.nn.modules`` classes, as inert
    :class:`ModuleRecord` types); any other global raises :class:`RefusedGlobalError` when named."""

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if _PLAIN_MODULE.fullmatch(module) and name.isidentifier():
            return _plain_module_type(module, name)
        path = f"{module}.{name}"[:120]
        if module.startswith("dnnlib.tflib"):
            raise RefusedGlobalError(f"a TensorFlow StyleGAN pickle (refused the global {path!r}, not run): convert "
                                     "it with the official stylegan2-ada-pytorch legacy.py first")
        raise RefusedGlobalError(
            f"refused the global {path!r} (it was not run): an official network pickle calls only torch, numpy "
            "and its persistence records; use a pickle written by the official stylegan2-ada-pytorch/stylegan3 "
            "code, or convert this one with a tool you trust to a state dict (torch.save) and load that")

    def persistent_load(self, pid: Any) -> Any:
        raise OfficialPickleError("the pickle refers to external storage (a torch.save file?), "
                                  "not an official network pickle")


# ----------------------------------------------------------------------------- reading


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def check_opcodes(data: bytes) -> None:
    """A parse of every opcode before unpickling (``pickletools`` reads, it never builds): each length
    must fit in the file and memo indices must stay sequential, so a damaged or hostile file cannot
    make the C unpickler allocate by a number it names (its memo is an array as long as the
    largest index)."""
    memo_ops = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if arg > memo_ops:
                    raise OfficialPickleError(f"not a pickle, or a damaged one (memo index {arg} at byte {pos})")
                memo_ops += 1
            elif op.name == "MEMOIZE":
                memo_ops += 1
    except OfficialPickleError:
        raise
    except ValueError as e:  # pickletools: an argument runs past the end, an unknown opcode, bad text
        if any(m in str(e) for m in ("remain", "not enough data", "exhausted", "no newline")):
            raise OfficialPickleError(f"truncated: the pickle ends early ({_first_line(e)})") from None
        raise OfficialPickleError(f"not a pickle, or a damaged one ({_first_line(e)})") from None


def unpickle(data: bytes) -> Any:
    """The object pickled in ``data``, read with :class:`RestrictedUnpickler` after
    :func:`check_opcodes`; damaged or foreign input raises :class:`OfficialPickleError` (one line)."""
    check_opcodes(data)
    try:
        return RestrictedUnpickler(_bytes_io.BytesIO(data)).load()
    except OfficialPickleError:
        raise
    except EOFError:
        raise OfficialPickleError("truncated: the pickle ends before its end mark") from None
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise OfficialPickleError("truncated: the pickle ends inside a value") from None
        raise OfficialPickleError(f"not a pickle ({_first_line(e)})") from None
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError, ArithmeticError,
            MemoryError) as e:
        # A stand-in given arguments an official pickle never passes, or a damaged value.
        raise OfficialPickleError(f"malformed pickle ({_first_line(e)})") from None


def _plain(obj: Any, depth: int = 0) -> Any:
    """kwargs as plain Python: EasyDicts as dicts, numpy scalars as numbers, arrays as lists."""
    if depth > _MAX_DEPTH:
        raise OfficialPickleError("keyword arguments nested too deep")
    if isinstance(obj, dict):
        return {k: _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _ArrayRecord):
        obj = obj.array
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _add_state(record: ModuleRecord, prefix: str, out: dict[str, torch.Tensor], path: list[int]) -> None:
    """``nn.Module.state_dict()`` over the pickled ``__dict__``s: parameters, persistent buffers,
    then submodules, with dotted prefixes; None entries skipped, as torch does."""
    if id(record) in path or len(path) > _MAX_DEPTH:
        raise OfficialPickleError(f"{prefix or 'the network'} contains itself or nests too deep")
    state = record.state if isinstance(record.state, dict) else {}
    tables = [state.get(k) for k in ("_parameters", "_buffers", "_modules")]
    if not all(isinstance(t, dict) for t in tables):
        raise OfficialPickleError(f"{prefix.rstrip('.') or 'a network'} ({record.class_name}) has no nn.Module state")
    parameters, buffers, modules = tables
    non_persistent = state.get("_non_persistent_buffers_set", set())  # absent before torch 1.6
    if not isinstance(non_persistent, set | frozenset):
        raise OfficialPickleError(f"{prefix.rstrip('.') or 'a network'} has a bad _non_persistent_buffers_set")
    for name, value in [*parameters.items(), *((k, v) for k, v in buffers.items() if k not in non_persistent)]:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise OfficialPickleError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
        out[prefix + name] = value
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise OfficialPickleError(f"{prefix}{name} is a {type(child).__name__}, not a module")
        _add_state(child, f"{prefix}{name}.", out, [*path, id(record)])


def state_dict(record: ModuleRecord) -> dict[str, torch.Tensor]:
    """The state dict the official module would give, from its :class:`ModuleRecord`."""
    out: dict[str, torch.Tensor] = {}
    _add_state(record, "", out, [])
    return out


def _networks(data: Any) -> OfficialPickle:
    if not isinstance(data, dict):
        raise OfficialPickleError(f"holds a {type(data).__name__}, not the official dict of G, D, G_ema")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        keys = ", ".join(sorted(str(k) for k in data)[:8])
        raise OfficialPickleError(f"holds a dict of [{keys}] without {', '.join(missing)}: not an official "
                                  "network pickle")
    state_dicts, init_kwargs, class_names = {}, {}, {}
    for name in NETWORKS:
        record = data.get(name)
        if record is None and name not in REQUIRED:
            continue
        if not isinstance(record, ModuleRecord):
            raise OfficialPickleError(f"{name} is a {type(record).__name__}, not a network")
        state_dicts[name] = state_dict(record)
        kwargs = record.state.get("_init_kwargs")
        init_kwargs[name] = _plain(kwargs) if isinstance(kwargs, dict) else None
        class_names[name] = record.class_name
    training_set_kwargs = data.get("training_set_kwargs")
    return OfficialPickle(state_dicts, init_kwargs, class_names,
                          _plain(training_set_kwargs) if isinstance(training_set_kwargs, dict) else None)


def load_official_pickle(path_or_url: str, storage_options: dict | None = None) -> OfficialPickle:
    """The networks of an official StyleGAN2-ADA / StyleGAN3 pickle at ``path_or_url`` (any fsspec
    URL) as state dicts, without running code from it. Raises :class:`OfficialPickleError` (one
    line, naming the file) for a damaged or foreign file, :class:`RefusedGlobalError` for a pickle
    that calls anything outside the allow-list."""
    url = str(path_or_url)
    try:
        data = io.read_bytes(url, storage_options)  # whole: the opcode check reads it before unpickling
        if data.startswith(b"PK\x03\x04"):
            raise OfficialPickleError("a torch.save zip checkpoint, not an official network pickle: read it "
                                      "with torch.load(weights_only=True)")
        if not data:
            raise OfficialPickleError("empty file")
        return _networks(unpickle(data))
    except OfficialPickleError as e:
        raise type(e)(f"{url}: {e}") from None
