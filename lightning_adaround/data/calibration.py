"""Calibration batches: the one walker over their tensors, and reading a bounded number of samples.

Plain PyTorch: the callback and plain-PyTorch users both bound calibration data this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor inside tuples (named ones too), lists and mappings.

    The one walker over a batch's structure: moving, cloning and cutting batches all go through
    it. A mapping keeps its type where it can be rebuilt from a dict (``OrderedDict``, a
    tokenizer's ``BatchEncoding``); anything else that is not a tensor is passed through.
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes positional fields
        return type(batch)(*(map_tensors(b, fn) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(mapped)
        except Exception:  # noqa: BLE001 - a mapping that cannot be rebuilt from a dict: a plain dict
            return mapped
    return batch


def tensors_in(batch: Any) -> Iterator[Tensor]:
    """Every tensor inside ``batch``, in the order :func:`map_tensors` visits them."""
    found: list[Tensor] = []
    map_tensors(batch, found.append)
    return iter(found)


def batch_size_of(batch: Any) -> Optional[int]:
    """Leading dim of the first tensor with one (``None``: no such tensor)."""
    return next((t.shape[0] for t in tensors_in(batch) if t.dim() > 0), None)


def samples_in(batch: Any) -> int:
    """Samples in ``batch``: its batch size, or 1 for a batch without a tensor."""
    size = batch_size_of(batch)
    return 1 if size is None else size


@dataclass
class SampleLayout:
    """Where each calibration batch of this process sits among all processes' samples.

    One process: the batches in order. Data-parallel: rank ``r``'s batches follow rank
    ``r - 1``'s (or are pieces cut from batches every rank read), so numbering the samples
    this way is the order one process would read them in.
    """

    starts: list[int]  # global index of each local batch's first sample
    sizes: list[int]  # samples in each local batch
    total: int  # samples over all processes

    @classmethod
    def of(cls, batches: Sequence[Any]) -> "SampleLayout":
        sizes = [samples_in(b) for b in batches]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        return cls(starts, sizes, sum(sizes))

    def held_out(self, fraction: float, generator: torch.Generator) -> list[Tensor]:
        """Per local batch, which samples are held out: ``floor(total * fraction)`` samples drawn
        from ``generator``; every process draws the same set from the same generator state."""
        chosen = torch.zeros(self.total, dtype=torch.bool)
        chosen[torch.randperm(self.total, generator=generator)[:math.floor(self.total * fraction)]] = True
        return [chosen[start:start + size] for start, size in zip(self.starts, self.sizes)]

    def unit_held_out(self, fraction: float, seed: int, position: int) -> list[Tensor]:
        """The samples held out of the unit whose first layer is ``position`` in the execution order.

        Each unit draws its own, so every calibration sample is fitted by most layers: with one set
        for the whole run a tenth of the samples reached no layer's optimisation, and EfficientNet-Lite1
        with bias correction lost to it (docs/four-bits.md). The draw depends only on ``seed`` and
        ``position``, not on what ran before: a resumed run and every process draw the same samples.
        """
        return self.held_out(fraction, torch.Generator().manual_seed(seed * 1_000_003 + position + 1))


def held_rows(held: Tensor, size: int, rows: int) -> Optional[Tensor]:
    """Which of a call's ``rows`` input rows belong to held-out samples, given ``held`` for its batch of
    ``size`` samples: rows follow their sample when the first dim is a whole number of rows per
    sample (a Linear fed flattened tokens has several); otherwise ``None``, rows are not per sample."""
    if not size or rows % size:
        return None
    return held.repeat_interleave(rows // size)


def leading_rows(batch: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``start:stop`` of every tensor whose leading dim is the batch size ``size``."""
    return map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == size else t)


def take_samples(batches: Iterable[Any], num_samples: Optional[int]) -> list[Any]:
    """Batches from ``batches`` until ``num_samples`` samples are read; the last one is cut to fit.

    ``None`` reads everything. Stops iterating as soon as enough is read, so an infinite
    or large loader is fine.
    """
    taken: list[Any] = []
    seen = 0
    for batch in batches:
        if num_samples is not None and seen >= num_samples:
            break
        size = batch_size_of(batch)
        if size is None or num_samples is None:
            taken.append(batch)
            seen += size or 1
            continue
        keep = min(size, num_samples - seen)
        taken.append(batch if keep == size else leading_rows(batch, 0, keep, size))
        seen += keep
    return taken
