"""Reading a bounded number of calibration samples from any iterable of batches.

Plain PyTorch: the callback and plain-PyTorch users both bound calibration data this way.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

from torch import Tensor


def batch_size_of(batch: Any) -> Optional[int]:
    """Leading dim of the first tensor found in the batch (``None``: no tensor)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, (tuple, list)):
        items: Iterable[Any] = batch
    elif isinstance(batch, dict):
        items = batch.values()
    else:
        return None
    for item in items:
        size = batch_size_of(item)
        if size is not None:
            return size
    return None


def tensors_in(batch: Any) -> Iterator[Tensor]:
    """Every tensor inside tuples, lists and dicts of ``batch``."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for item in batch:
            yield from tensors_in(item)
    elif isinstance(batch, dict):
        for item in batch.values():
            yield from tensors_in(item)


def _head(batch: Any, count: int, size: int) -> Any:
    """The first ``count`` samples of every tensor whose leading dim is the batch size."""
    if isinstance(batch, Tensor):
        return batch[:count] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_head(b, count, size) for b in batch)
    if isinstance(batch, dict):
        return {k: _head(v, count, size) for k, v in batch.items()}
    return batch


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
        taken.append(batch if keep == size else _head(batch, keep, size))
        seen += keep
    return taken
