"""Batches of the loader's samples: the one host copy of every field, from its view of the decoded
pixels (cropped and flipped by strides, see ``transforms``) into the batch tensor.

The stream fills a batch sample by sample (``BatchBuilder``), each copy made right after its
sample's decode, while the decoded pixels are still in the CPU's caches, and the decoded image is
freed at once, so the next decode reuses warm memory. Holding a batch of decoded images for a
later stack cost ~2% more per 256x128 sample. Inside a DataLoader worker the batch is allocated in
shared memory, as PyTorch's ``default_collate`` does, so it crosses to the main process without
another copy.
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

    def builder(self, size: int) -> BatchBuilder:
        """An empty batch of at most ``size`` samples."""
        return BatchBuilder(self.fields, size, shared=get_worker_info() is not None)

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.builder(len(samples))
        for sample in samples:
            batch.add(sample)
        return batch.finish()

    def batches(self, samples: Iterator[dict], size: int) -> Iterator[dict]:
        """``samples`` in batches of ``size`` (the last may be smaller), each sample copied into
        its batch as soon as it arrives, and let go before the next one is made."""
        batch = self.builder(size)
        for sample in samples:
            batch.add(sample)
            del sample  # its decoded pixels are freed before the next decode
            if len(batch) == size:
                yield batch.finish()
                batch = self.builder(size)
        if len(batch):
            yield batch.finish()

    def one(self, sample: dict) -> dict:
        """One sample on its own: fields copied into tensors of their own, the rest as it is."""
        batch = self.builder(1)
        batch.add(sample)
        return {name: batch.tensors[name][0] if name in self.fields else value for name, value in sample.items()}


class BatchBuilder:
    """A batch being filled: ``add`` copies a sample's fields into its row at once and keeps the
    rest of the sample (``__key__``, ``__slot__``, ...); ``finish`` returns the batch of the samples
    added. The first sample fixes the batch's names and shapes; a later one that differs is refused
    with both samples' keys.

    Names whose values are ints (the stream's positions ``__slot__``, ``__epoch__``, ``__index__``,
    ``__bad__``) share one int64 tensor, a contiguous row each: one allocation, and in a DataLoader
    worker one shared-memory segment, where ``default_collate`` made a tensor per name."""

    def __init__(self, fields: dict[str, str], size: int, shared: bool):
        self.fields, self.size, self.shared = fields, size, shared
        self.tensors: dict[str, torch.Tensor] = {}  # field -> [size, ...] tensor, made at the first add
        self.rows: dict[str, np.ndarray] = {}  # field -> the numpy view the copies write through
        self.ints: list[str] = []  # names of int values -> rows of int_rows, in this order
        self.int_rows: np.ndarray | None = None  # [len(ints), size] int64, the view the ints are written through
        self.int_tensor: torch.Tensor | None = None
        self.rest: dict[str, list] = {}  # every other name -> its values, one per sample
        self.count = 0
        self.first_key = None

    def __len__(self) -> int:
        return self.count

    def add(self, sample: dict) -> None:
        i = self.count
        if i == self.size:
            raise ValueError(f"the batch is full ({self.size} samples)")
        if i == 0:
            self._allocate(sample)
        elif len(sample) != len(self.rows) + len(self.ints) + len(self.rest):
            self._refuse(sample, "has other fields than")
        try:
            for name, rows in self.rows.items():
                rows[i] = sample[name]  # crop, flip (negative strides), widening (uint8 -> uint16): one copy
            ints = [sample[name] for name in self.ints]
            for name, values in self.rest.items():
                values.append(sample[name])
        except KeyError:
            self._refuse(sample, "has other fields than")
        except ValueError:  # numpy: "could not broadcast input array from shape ..."
            self._refuse(sample, "is not the size of")
        if ints:
            if any(type(v) is not int for v in ints):
                self._refuse(sample, "has other values (not ints) than")
            self.int_rows[:, i] = ints
        self.count = i + 1

    def _refuse(self, sample: dict, how: str) -> None:
        fields = {name: tuple(sample[name].shape[1::-1]) for name in sample if name in self.fields}
        first = {name: tuple(rows.shape[2:0:-1]) for name, rows in self.rows.items()}  # (w, h)
        raise ValueError(f"sample {sample.get('__key__')!r} {how} the first of its batch ({self.first_key!r}): "
                         f"fields (w, h) {fields} and {first}; crop to one size (data.crop_size)")

    def _allocate(self, sample: dict) -> None:
        self.first_key = sample.get("__key__")
        for name, value in sample.items():
            if name not in self.fields:
                if type(value) is int:
                    self.ints.append(name)
                else:
                    self.rest[name] = []
                continue
            shape = value.shape
            if self.fields[name] == IMAGE_DTYPE:
                tensor = _empty((self.size, *shape, 4), torch.uint8, self.shared)
                rows = tensor.numpy().view(np.uint32).reshape(self.size, *shape)  # whole 4-byte words
            else:
                tensor = _empty((self.size, *shape), getattr(torch, self.fields[name]), self.shared)
                rows = tensor.numpy()
            self.tensors[name], self.rows[name] = tensor, rows
        if self.ints:
            self.int_tensor = _empty((len(self.ints), self.size), torch.int64, self.shared)
            self.int_rows = self.int_tensor.numpy()

    def finish(self) -> dict:
        n = self.count
        if n == 0:
            raise ValueError("cannot collate an empty batch")
        batch = {name: tensor if n == self.size else tensor[:n] for name, tensor in self.tensors.items()}
        for j, name in enumerate(self.ints):
            batch[name] = self.int_tensor[j, :n]
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
