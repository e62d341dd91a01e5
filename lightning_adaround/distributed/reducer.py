"""The reducer over a ``torch.distributed`` process group, and the failure protocol.

Each meeting point of ``engine/reducer.py`` is a fixed-size header exchange (tag, one failure
flag per rank, a few numbers) so that a rank that fails anywhere meets the others where they
wait, and every rank raises the same :class:`AdaRoundDistributedError`.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_adaround.engine.reducer import SLOTS, Reducer, crc


class AdaRoundDistributedError(RuntimeError):
    """Raised on every rank, with the same message, when any rank fails or the ranks disagree."""


def _object_collective_device(device: torch.device) -> Any:
    """Object collectives under NCCL stage through ``torch.cuda.current_device()``, not the rank's
    device: without this, a script that never calls ``torch.cuda.set_device`` hangs on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class DistributedReducer(Reducer):
    """The meeting points of ``engine/reducer.py`` over a process group, and the failure protocol.

    Each point starts with a header: a SUM all-reduce of ``[tag, flags(W), numbers(W x SLOTS)]``
    in float64, the same size at every point. ``tag`` names the point (ranks at different
    points are told so); a rank that fails anywhere outside a unit's optimisation loop joins
    the next header with its flag set, so the others never wait for it in vain. Inside the loop
    (:meth:`stepping`) the next collective is the gradient average, which carries the flags.
    """

    def __init__(self, group: Optional[Any], device: torch.device, sync_every_step: bool = False) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.sync_every_step = sync_every_step
        self.where = "starting"
        self.broken = False  # a peer is gone or the group timed out: no further collectives
        self._gradient_numel = 0  # inside a unit's loop: the gradient collective's payload size
        self._steps_left = 0

    # -- the primitives

    def _all_reduce(self, buffer: Tensor) -> None:
        try:
            dist.all_reduce(buffer, group=self.group)
        except Exception:
            self.broken = True
            raise

    def _header(self, numbers: Sequence[float], where: str, failed: Optional[str] = None) -> list[list[float]]:
        """Every rank's ``numbers``; raises on every rank if any rank failed or is at another point."""
        w = self.world_size
        buffer = torch.zeros(1 + w + w * SLOTS, dtype=torch.float64, device=self.device)
        tag = crc(where)
        buffer[0] = tag
        if failed is not None:
            buffer[1 + self.rank] = 1
        if numbers:
            start = 1 + w + self.rank * SLOTS
            buffer[start:start + len(numbers)] = torch.tensor(list(numbers), dtype=torch.float64)
        self._all_reduce(buffer)
        values = buffer.tolist()
        flags = values[1:1 + w]
        if any(flags):
            self._fail_together(flags, failed)
        if values[0] != tag * w:
            wheres = self._gather_objects(where)
            raise AdaRoundDistributedError(
                f"AdaRound stopped on all {w} ranks: the ranks reached different points ("
                + "; ".join(f"rank {q}: {wq}" for q, wq in enumerate(wheres))
                + "): the model, its forward pass or the settings differ across ranks."
            )
        rows = values[1 + w:]
        return [rows[q * SLOTS:(q + 1) * SLOTS] for q in range(w)]

    def _gather_objects(self, value: Any) -> list[Any]:
        found: list[Any] = [None] * self.world_size
        try:
            with _object_collective_device(self.device):
                dist.all_gather_object(found, value, group=self.group)
        except Exception:
            self.broken = True
            raise
        return found

    def _fail_together(self, flags: Sequence[float], own_message: Optional[str]) -> None:
        try:
            messages = self._gather_objects(own_message)
        except Exception:
            messages = [own_message if q == self.rank else None for q in range(self.world_size)]
        failed = [q for q, f in enumerate(flags) if f != 0]
        details = "; ".join(f"rank {q}: {messages[q] or 'failed (see its log)'}" for q in failed)
        raise AdaRoundDistributedError(
            f"AdaRound stopped on all {self.world_size} ranks because {len(failed)} rank(s) failed. {details}"
        )

    # -- the points

    def exchange(self, numbers: Sequence[float], where: str) -> list[list[float]]:
        if len(numbers) > SLOTS:
            raise RuntimeError(f"internal: {len(numbers)} numbers exchanged at {where!r}, at most {SLOTS}")
        return self._header(numbers, where)

    def sum(self, tensors: Sequence[Tensor], where: str, numbers: Sequence[float] = (),
            finite: bool = False) -> list[list[float]]:
        failed = None
        if finite and not all(bool(torch.isfinite(t).all()) for t in tensors):
            failed = f"non-finite values while {where} (check this rank's calibration data for huge or NaN values)"
        rows = self._header(numbers, where, failed)
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        self._all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()
        return rows

    def disagree(self, message: str) -> None:
        raise AdaRoundDistributedError(f"AdaRound stopped on all {self.world_size} ranks: {message}")

    def gather_text(self, text: str, where: str) -> list[str]:
        self._header([], where)
        return self._gather_objects(text)

    @contextmanager
    def stepping(self, numel: int, iterations: int, what: str = "the unit") -> Iterator[None]:
        """Until the last step's average, a failing rank joins a gradient-sized collective."""
        self._gradient_numel, self._steps_left = numel, iterations
        self._iterations, self._stepping = iterations, what
        yield
        self._steps_left = 0  # only on a normal exit: a failure inside still meets the others in a step

    def average_gradients(self, grads: Sequence[Tensor], loss: Tensor) -> Tensor:
        """Average V's gradients and the loss over ranks in one all-reduce, in place."""
        self.where = f"step {self._iterations - self._steps_left} of {self._stepping}"
        grads = [g for g in grads if g is not None]
        payload = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
        w = self.world_size
        buffer = torch.cat([payload, torch.zeros(w, dtype=payload.dtype, device=payload.device)])
        bad = ~torch.isfinite(payload).all()
        buffer[payload.numel() + self.rank] = bad.to(payload.dtype)
        self._all_reduce(buffer)
        self._steps_left -= 1
        tail = buffer[payload.numel() - 1:].tolist()
        if any(tail[1:]):
            own = None
            if tail[1 + self.rank]:
                own = (f"non-finite reconstruction loss or gradient at {self.where} "
                       "(check this rank's calibration data for huge or NaN values)")
            self._fail_together(tail[1:], own)
        reduced = buffer[:payload.numel()] / w
        offset = 0
        for g in grads:
            g.copy_(reduced[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return reduced[-1]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """A local exception becomes the same :class:`AdaRoundDistributedError` on every rank."""
        try:
            yield
        except AdaRoundDistributedError:
            raise
        except Exception as err:
            if self.broken:
                raise
            self._announce(err)

    def _announce(self, err: Exception) -> None:
        """Meet the others where they wait, with this rank's flag set, and fail together."""
        message = f"{type(err).__name__} while {self.where}: {err}"
        try:
            if self._steps_left > 0:
                w = self.world_size
                buffer = torch.zeros(self._gradient_numel + 1 + w, dtype=torch.float32, device=self.device)
                buffer[-w + self.rank] = 1
                self._all_reduce(buffer)
                self._steps_left = 0
                self._fail_together(buffer[-w:].tolist(), message)
            self._header([], self.where, failed=message)
        except AdaRoundDistributedError as combined:
            raise combined from err
        except Exception:
            raise err
        raise err  # unreachable: a flagged exchange always raises
