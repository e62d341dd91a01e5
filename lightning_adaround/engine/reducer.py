"""Where the processes of a data-parallel run meet: a few named points in the unit loop.

One process is data-parallel rounding with a reducer that does nothing (:class:`Reducer`);
``distributed.DistributedReducer`` sums over a process group at the same points. The points:

* ``exchange(numbers, where)``: every process's numbers (up to ``SLOTS``), e.g. row counts;
* ``sum(tensors, where)``: tensors summed in place (moments, bias-correction sums), with
  every process's numbers exchanged on the way;
* ``stepping(numel, iterations)`` and ``average_gradients(grads, loss)``: inside the
  optimisation loop of a unit whose rows are split over the processes;
* ``check_same(numbers, what)``: a disagreement (model, rounding) is an error everywhere.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Sequence

import torch
from torch import Tensor

SLOTS = 8  # numbers one process contributes to an exchange


def crc(value: Any) -> float:
    """A number naming ``value`` (its repr), the same in every process: tags, shapes, checksums."""
    return float(zlib.crc32(repr(value).encode()))


class Reducer:
    """The reducer of a single process: every sum is the local value, every check passes."""

    rank = 0
    world_size = 1
    where = ""  # what the processes are doing now, for failure messages
    sync_every_step = False  # also average gradients of objectives that are the same everywhere

    @property
    def is_main(self) -> bool:
        """The process that logs and writes checkpoint files."""
        return self.rank == 0

    def exchange(self, numbers: Sequence[float], where: str) -> list[list[float]]:
        """Every process's ``numbers``, in rank order (this process's only, here)."""
        return [list(numbers)]

    def sum(self, tensors: Sequence[Tensor], where: str, numbers: Sequence[float] = (),
            finite: bool = False) -> list[list[float]]:
        """Sum ``tensors`` over processes in place; returns every process's ``numbers``.

        ``finite``: a NaN/Inf in a process's tensors is an error on every process.
        """
        if finite:
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise ValueError(f"non-finite values while {where} (check the calibration data for huge or NaN values)")
        return [list(numbers)]

    def stepping(self, numel: int, iterations: int, what: str = "the unit") -> ContextManager[None]:
        """The optimisation loop of a unit whose gradient (``numel`` values) is averaged each step."""
        return nullcontext()

    def average_gradients(self, grads: Sequence[Tensor], loss: Tensor) -> Tensor:
        """Average ``grads`` over processes in place; returns the loss averaged the same way."""
        return loss

    def disagree(self, message: str) -> None:
        """Raise for a disagreement every process found in the same exchanged numbers."""
        raise ValueError(message)

    def check_same(self, numbers: Sequence[float], what: str, advice: str) -> None:
        """Raise on every process when ``numbers`` (describing ``what``) differ between processes."""
        if self.world_size == 1:
            return
        rows = self.exchange(numbers, f"checking {what}")
        differing = [q for q, row in enumerate(rows) if row != rows[0]]
        if differing:
            self.disagree(f"{what} differ between rank 0 and rank(s) {differing}; {advice}")

    def gather_text(self, text: str, where: str) -> list[str]:
        """Every process's ``text`` (a fingerprint), in rank order."""
        return [text]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """A local failure inside becomes the same error on every process (nothing to do here)."""
        yield
