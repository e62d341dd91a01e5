"""Where one layer's cached calibration tensors live: the compute device, host memory, or disk.

The minibatch form keeps every training sample's layer input and target for thousands of
steps. A layer whose cache does not fit the device budget is cached in host memory, and one
that does not fit the host budget in a memory-mapped file; each step's rows are gathered from
there into a small pinned buffer, so the copy to a GPU overlaps the compute. The values are the same wherever they live, so the rounding is too.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_adaround.data.capture import stacked_shape

TIERS = ("device", "host", "disk")
_AUTO_SHARE = 0.5  # of free device memory / available host memory, when no budget is given


def _available_host_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class CachePlan:
    """Per-layer budgets in bytes (``None``: half of what is free when the layer starts)."""

    device: torch.device  # where the layer computes
    device_bytes: Optional[int] = None
    host_bytes: Optional[int] = None
    directory: Optional[str] = None
    dtype: Optional[torch.dtype] = None  # a compact storage dtype the user allowed, e.g. bfloat16

    def budget(self, tier: str) -> Optional[int]:
        if tier == "device":
            if self.device_bytes is not None:
                return self.device_bytes
            if self.device.type == "cuda":
                # free on the device plus what the caching allocator holds free for reuse
                held = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                return int(_AUTO_SHARE * (torch.cuda.mem_get_info(self.device)[0] + held))
            # no free-memory query for other accelerators: the host budget below applies
        if self.host_bytes is not None:
            return self.host_bytes
        available = _available_host_bytes()
        return int(_AUTO_SHARE * available) if available is not None else None

    def tier_for(self, nbytes: int) -> str:
        """The first tier whose budget holds ``nbytes``; disk when none does."""
        for tier in (("host",) if self.device.type == "cpu" else ("device", "host")):
            budget = self.budget(tier)
            if budget is None or nbytes <= budget:
                return tier
        return "disk"

    def stored_bytes(self, t: Tensor) -> int:
        return t.numel() * (self.dtype.itemsize if self.dtype is not None else t.element_size())

    def store(self, tier: str, expected_chunks: int = 1, exact: bool = False) -> "ChunkStore":
        """A store in ``tier``; ``exact`` keeps the dtype (masks, indices) whatever ``cache_dtype`` says."""
        if tier not in TIERS:
            raise ValueError(f"cache tier {tier!r} is not one of {TIERS}")
        return ChunkStore(tier, self.device, self.directory, None if exact else self.dtype, expected_chunks)


class ChunkStore:
    """Chunks of one cached tensor, appended batch by batch, stacked along samples at the end.

    On disk the chunks' bytes are appended to one file, which is the same byte layout as
    ``torch.cat`` of the chunks (or of their rows), then memory-mapped and unlinked.
    """

    def __init__(
        self, tier: str, device: torch.device, directory: Optional[str], dtype: Optional[torch.dtype],
        expected_chunks: int = 1,
    ):
        self.tier = tier
        self.device = device
        self.dtype = dtype
        self.chunks: list[Tensor] = []
        self.shapes: list[torch.Size] = []
        self._file = None
        self._path: Optional[str] = None
        self._directory = directory
        self._expected = expected_chunks
        self._buffer: Optional[Tensor] = None  # preallocated, so stacking never holds two copies
        self._used = 0

    def _append_in_memory(self, t: Tensor) -> None:
        if self._buffer is None and not self.chunks:
            # Room for every batch as large as the first (+1 row: holdout splits vary by one).
            rows = (t.shape[0] + 1) * self._expected
            self._buffer = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        fits = (
            self._buffer is not None and t.shape[1:] == self._buffer.shape[1:]
            and self._used + t.shape[0] <= self._buffer.shape[0]
        )
        if fits:
            self._buffer[self._used:self._used + t.shape[0]].copy_(t)
            self._used += t.shape[0]
            return
        if self._buffer is not None:  # an unexpected shape or size: plain chunks from here on
            self.chunks.append(self._buffer[:self._used].clone())
            self._buffer = None
        self.chunks.append(t)

    def add(self, t: Tensor) -> None:
        t = t.detach()
        if self.dtype is not None:
            t = t.to(self.dtype)
        self.shapes.append(t.shape)
        if self.tier == "device":
            self._append_in_memory(t.to(self.device))
        elif self.tier == "host":
            self._append_in_memory(t.to("cpu"))
        else:
            if self._file is None:
                fd, self._path = tempfile.mkstemp(prefix="adaround-cache-", suffix=".bin", dir=self._directory)
                self._file = os.fdopen(fd, "wb")
            self._file.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._dtype_on_disk = t.dtype

    def tensor(self, name: str, flatten: Optional[bool] = None) -> Tensor:
        """All chunks as one tensor, samples (or, for varying-length Linear inputs, rows) first.

        ``flatten``: stack rows of the last dim (decided with the other processes); ``None``: when
        the chunks' shapes differ.
        """
        shape = stacked_shape(self.shapes, name, flatten)
        if self.tier != "disk" and self._buffer is not None:
            out = self._buffer[:self._used].reshape(shape)
            self._buffer = None
            return out
        if self.tier != "disk":
            if all(c.shape[1:] == shape[1:] for c in self.chunks):
                out = torch.cat(self.chunks, dim=0)
            else:
                out = torch.cat([c.reshape(-1, shape[-1]) for c in self.chunks], dim=0)
            self.chunks = []
            return out
        self._file.close()
        mapped = torch.from_file(self._path, shared=False, size=math.prod(shape), dtype=self._dtype_on_disk)
        os.unlink(self._path)  # the mapping keeps the data; nothing is left behind on exit
        return mapped.reshape(shape)
