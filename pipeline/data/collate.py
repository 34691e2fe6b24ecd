"""Batches of the loader's samples: the one host copy of every field, from its view of the decoded
pixels (cropped and flipped by strides, see ``transforms``) into the batch tensor.

The stream fills a batch sample by sample (``BatchBuilder.put``), each copy made right after its
sample's decode, while the decoded pixels are still in the CPU's caches, and before the next
sample is decoded into the same memory (``transforms.DecodeBuffer``). Holding a batch of decoded
images for a later stack cost ~2% more per 256x128 sample. Inside a DataLoader worker the batch is
allocated in shared memory, as PyTorch's ``default_collate`` does, so it crosses to the main
process without another copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from .transforms import IMAGE_DTYPE


@dataclass(frozen=True)
class Collate:
    """How the loader's samples become batches. A sample is ``{field: view, "__key__": str,
    "__slot__": int, ...}``; in the batch, image fields (``[h, w]`` uint32 RGBX views) become uint8
    ``[N, h, w, 4]``, maps ``[N, h, w]`` in their loader dtype, ints an int64 ``[N]`` tensor,
    anything else what ``default_collate`` makes of it (strings a list). ``fields`` maps each
    field to its batch dtype, as ``transforms.loader_dtypes`` gives it (``"rgbx"`` for images).
    Picklable: a map-style Dataset's ``collate_fn``."""

    fields: dict[str, str]

    def builder(self, size: int, ints: tuple[str, ...] = ()) -> BatchBuilder:
        """An empty batch of at most ``size`` samples (``ints``: see ``BatchBuilder.put``)."""
        return BatchBuilder(self.fields, size, shared=get_worker_info() is not None, ints=ints)

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.builder(len(samples))
        for sample in samples:
            batch.add(sample)
        return batch.finish()

    def batches(self, samples: Iterator[dict], size: int) -> Iterator[dict]:
        """``samples`` in batches of ``size`` (the last may be smaller), each sample copied into
        its batch as soon as it arrives, and let go before the next one is made."""
        return self._batches(samples, size, (), BatchBuilder.add)

    def put_batches(self, rows: Iterator[tuple[str, list, tuple[int, ...]]], size: int,
                    ints: tuple[str, ...]) -> Iterator[dict]:
        """``batches`` of positional samples ``(key, views, ints)`` (``BatchBuilder.put``)."""
        return self._batches(rows, size, ints, lambda batch, row: batch.put(*row))

    def _batches(self, items: Iterator, size: int, ints: tuple[str, ...], add) -> Iterator[dict]:
        batch = self.builder(size, ints)
        for item in items:
            add(batch, item)
            del item  # not held while the next sample is decoded
            if len(batch) == size:
                yield batch.finish()
                batch = self.builder(size, ints)
        if len(batch):
            yield batch.finish()

    def put_one(self, key: str, views: list, ints: tuple[int, ...], int_names: tuple[str, ...]) -> dict:
        """``one`` of a positional sample: its fields copied into tensors of their own, its key, its
        ints under ``int_names``."""
        batch = self.builder(1, int_names)
        batch.put(key, views, ints)
        sample = {name: tensor[0] for name, tensor in zip(batch.names, batch.tensors)}
        sample["__key__"] = key
        sample.update(zip(int_names, ints))
        return sample

    def one(self, sample: dict) -> dict:
        """One sample on its own: fields copied into tensors of their own, the rest as it is."""
        batch = self.builder(1)
        batch.add(sample)
        copies = dict(zip(batch.names, batch.tensors))
        return {name: copies[name][0] if name in copies else value for name, value in sample.items()}


class BatchBuilder:
    """A batch being filled: ``add`` copies a sample's fields into its row at once and keeps the
    rest of the sample (``__key__``, ``__slot__``, ...); ``finish`` returns the batch of the samples
    added. The first sample fixes the batch's names and shapes; a later one that differs is refused
    with both samples' keys.

    Names whose values are ints (the stream's positions ``__slot__``, ``__epoch__``, ``__index__``,
    ``__bad__``) share one int64 tensor, a contiguous row each: one allocation, and in a DataLoader
    worker one shared-memory segment, where ``default_collate`` made a tensor per name.

    ``put`` is ``add`` for a caller that made the sample positionally (the stream): its key, the
    views of the batch's fields in their order (``None`` for a field the sample lacks), its ints in
    the order of ``ints``. It skips the dicts and the checks of values the caller made itself."""

    def __init__(self, fields: dict[str, str], size: int, shared: bool, ints: tuple[str, ...] = ()):
        self.fields, self.size, self.shared = fields, size, shared
        self.names: list[str] = []  # the fields in the batch, in the order of their views
        self.tensors: list[torch.Tensor] = []  # per name: [size, ...], made at the first sample
        self.rows: list[np.ndarray] = []  # per name: the numpy view the copies write through
        self.lacking: list[int] | None = None  # for ``put``: positions of the fields the first sample lacked
        self.ints: list[str] = list(ints)  # names of int values, in the order of their rows in the int tensor
        self.int_values: list[tuple[int, ...]] = []  # per sample
        self.rest: dict[str, list] = {}  # every other name -> its values, one per sample
        self.keys: list[str] = []  # per sample, for ``put``
        self.first_key = None

    def __len__(self) -> int:
        return len(self.int_values)

    def put(self, key: str, views: list[np.ndarray | None], ints: tuple[int, ...]) -> None:
        i = self._next(key)
        if i == 0:
            self._allocate(list(self.fields), views)
            if len(self.names) < len(views):
                self.lacking = [j for j, view in enumerate(views) if view is None]
        if self.lacking is not None:  # the first sample lacked fields: so must this one
            if any(views[j] is not None for j in self.lacking):
                self._refuse(key, dict(zip(self.fields, views)), "has other fields than")
            views = [view for j, view in enumerate(views) if j not in self.lacking]
        self._copy(i, key, views)
        self.int_values.append(ints)
        self.keys.append(key)

    def add(self, sample: dict) -> None:
        key = sample.get("__key__")
        i = self._next(key)
        if i == 0:
            self.ints = [name for name, value in sample.items() if name not in self.fields and type(value) is int]
            self.rest = {name: [] for name in sample if name not in self.fields and name not in self.ints}
            names = [name for name in sample if name in self.fields]
            self._allocate(names, [sample[name] for name in names])
        elif len(sample) != len(self.names) + len(self.ints) + len(self.rest):
            self._refuse(key, sample, "has other fields than")
        try:
            views = [sample[name] for name in self.names]
            ints = tuple(sample[name] for name in self.ints)
            extra = [sample[name] for name in self.rest]
        except KeyError:
            self._refuse(key, sample, "has other fields than")
        if any(type(v) is not int for v in ints):
            self._refuse(key, sample, "has other values (not ints) than")
        self._copy(i, key, views)
        for values, value in zip(self.rest.values(), extra):
            values.append(value)
        self.int_values.append(ints)

    def _next(self, key) -> int:
        """The row of the sample being added (its key the batch's first, if it is row 0)."""
        i = len(self.int_values)
        if i == self.size:
            raise ValueError(f"the batch is full ({self.size} samples)")
        if i == 0:
            self.first_key = key
        return i

    def _copy(self, i: int, key, views: list) -> None:
        try:
            for rows, view in zip(self.rows, views):
                rows[i] = view  # crop, flip (negative strides), widening (uint8 -> uint16): one copy
        except (ValueError, TypeError):  # numpy: "could not broadcast ..."; a view missing (None)
            how = "has other fields than" if any(view is None for view in views) else "is not the size of"
            self._refuse(key, dict(zip(self.names, views)), how)

    def _refuse(self, key, sample: dict, how: str) -> None:
        fields = {name: tuple(sample[name].shape[1::-1]) for name in sample
                  if name in self.fields and sample[name] is not None}
        first = {name: tuple(rows.shape[2:0:-1]) for name, rows in zip(self.names, self.rows)}  # (w, h)
        raise ValueError(f"sample {key!r} {how} the first of its batch ({self.first_key!r}): "
                         f"fields (w, h) {fields} and {first}; crop to one size (data.crop_size)")

    def _allocate(self, names: list[str], views: list) -> None:
        for name, view in zip(names, views):
            if view is None:  # a field the first sample lacks is not in the batch
                continue
            shape = view.shape
            if self.fields[name] == IMAGE_DTYPE:
                tensor = _empty((self.size, *shape, 4), torch.uint8, self.shared)
                rows = tensor.numpy().view(np.uint32).reshape(self.size, *shape)  # whole 4-byte words
            else:
                tensor = _empty((self.size, *shape), getattr(torch, self.fields[name]), self.shared)
                rows = tensor.numpy()
            self.names.append(name)
            self.tensors.append(tensor)
            self.rows.append(rows)

    def finish(self) -> dict:
        n = len(self.int_values)
        if n == 0:
            raise ValueError("cannot collate an empty batch")
        batch = {name: tensor if n == self.size else tensor[:n] for name, tensor in zip(self.names, self.tensors)}
        if self.ints:
            int_tensor = _empty((len(self.ints), n), torch.int64, self.shared)
            int_tensor.numpy()[:] = np.array(self.int_values, dtype=np.int64).T
            for j, name in enumerate(self.ints):
                batch[name] = int_tensor[j]
        if self.keys:
            batch["__key__"] = self.keys
        for name, values in self.rest.items():
            batch[name] = default_collate(values)
        return batch


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A new tensor; in shared memory when ``shared`` (a DataLoader worker's batch: moving a private
    tensor to the main process would copy it into shared memory first)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)
