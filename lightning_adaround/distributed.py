"""Data-parallel rounding: each process reads its own shard of the calibration data, and all
processes find ONE rounding together.

Plain ``torch.distributed`` (gloo on CPU, NCCL on GPUs, every buffer on the compute device).
The Lightning callback calls :func:`distributed_adaround` under ``strategy="ddp"`` or
``"ddp_spawn"``; a script started with ``torchrun`` can call it directly.

How W processes find the rounding one process would find
--------------------------------------------------------
* Global sample order. The calibration samples are numbered rank by rank: rank 0's shard
  first, then rank 1's, and so on. :func:`shard_calibration` gives rank ``r`` the ``r``-th
  contiguous block of the first N samples (blocks differ in size by at most one; a batch on a
  block boundary is cut in two), so that order is the order one process reads them in, for
  every layer, including Linear layers fed with token sequences.
* Hold-out. Per layer every rank replays the single-process hold-out split over ALL global
  batches with the same seeded generator (the generators never drift apart) and keeps the rows
  it owns.
* Minibatch form. Each step's global minibatch indices come from that shared generator over
  the global row index space, exactly as one process draws them; each rank runs the layer on
  the rows it owns (about ``batch_size / W`` of them) and returns ``W x`` its part of the global
  mean. Averaging the gradients then gives the single-process gradient, up to float summation
  order. One all-reduce per step: V's gradient, the loss and one failure flag per rank travel in
  one flat buffer; every rank applies the same Adam update.
* Moments form: the per-rank second-moment sums are added in one all-reduce per layer, so every
  rank holds the same, exact global objective and steps without communicating (replicated
  compute; ``sync_every_step=True`` all-reduces these gradients too).
* At the end of each layer a checksum of the integer weights and the grid is compared across
  ranks.
* Reporting. Held-out MSEs are global sums over global counts and the logged reconstruction
  loss is the global one; the observer (loggers, progress bar) runs on rank 0 only, after the
  reduction.
* Faults. Every collective carries a failure flag per rank. A rank that raises (a forward that
  fails, NaN activations, a non-finite loss) joins the collective the others wait in with its
  flag set, and every rank raises the same :class:`AdaRoundDistributedError`. A rank that dies
  outside Python (killed, segfault) ends the others through the backend: gloo raises at once,
  NCCL when the process group's timeout expires.
* Limits. A layer's input must be sample-major (its first dim a fixed multiple of the batch's
  samples; e.g. ``batch_first=True`` transformers), else every rank raises a clear error. If
  a layer is reached by only some calibration batches, the ranks still agree with each other
  but the hold-out split no longer matches one process.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
import contextlib
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_adaround.api import Activation, MoveBatch, adaround, move_to_device
from lightning_adaround.calibration import batch_size_of, leading_rows, tensors_in
from lightning_adaround.capture import InputCapture
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.layers import ForwardFn, compute_dtype
from lightning_adaround.moments import LayerMoments
from lightning_adaround.objective import MinibatchSampler, MomentsObjective, unit_channel_errors
from lightning_adaround.observer import AdaRoundObserver
from lightning_adaround.reconstruct import TaskLoss, UnitObjective, _Holdout, choose_form, unit_targets
from lightning_adaround.result import AdaRoundResult, LayerResult
from lightning_adaround.unit import Unit, UnitData

__all__ = [
    "AdaRoundDistributedError",
    "CalibrationShard",
    "ShardedMinibatchObjective",
    "distributed_adaround",
    "is_sharded_loader",
    "shard_calibration",
]


class AdaRoundDistributedError(RuntimeError):
    """Raised on every rank, with the same message, when any rank fails or the ranks disagree."""


# ------------------------------------------------------------------------------ sharding


@dataclass
class CalibrationShard:
    """This rank's part of a calibration set that every rank read in full.

    ``batches`` are this rank's samples (a contiguous block of the global samples, cut out of
    the global batches); ``pieces[j] = (global batch index, offset, size)`` says where local
    batch ``j`` came from; ``global_sizes`` are the samples per global batch (the same on every
    rank); ``fingerprint`` summarises the global data, to check that all ranks read the same.
    """

    batches: list[Any]
    pieces: list[tuple[int, int, int]]
    global_sizes: list[int]
    fingerprint: tuple[float, float] = (0.0, 0.0)

    @property
    def num_samples(self) -> int:
        return sum(n for _, _, n in self.pieces)


def shard_calibration(batches: Iterable[Any], rank: int, world_size: int) -> CalibrationShard:
    """Rank ``rank``'s contiguous block of the samples in ``batches`` (the same on every rank).

    With N samples, rank ``r`` keeps samples ``[r*N//W + min(r, N%W), ...)`` (``N//W`` of them,
    one more for the first ``N%W`` ranks), so the ranks' shards, in rank order, are exactly the
    data one process would read. A batch without a tensor counts as one sample and is not cut.
    With fewer samples than ranks some shards are empty; :func:`distributed_adaround` then
    raises the same clear error on every rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
    batches = list(batches)
    sizes = [_samples_in(b) for b in batches]
    total = sum(sizes)
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    local, pieces = [], []
    position = 0
    for index, (batch, size) in enumerate(zip(batches, sizes)):
        lo, hi = max(start, position), min(stop, position + size)
        if lo < hi:
            cut = lo - position, hi - position
            local.append(batch if cut == (0, size) else leading_rows(batch, cut[0], cut[1], size))
            pieces.append((index, lo - position, hi - lo))
        position += size
    return CalibrationShard(local, pieces, sizes, _fingerprint(batches, sizes))


def is_sharded_loader(loader: Any) -> bool:
    """Whether ``loader`` already yields only this rank's part (a ``DistributedSampler`` inside)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(
        getattr(batch_sampler, "sampler", None), DistributedSampler
    )


def _object_collective_device(device: torch.device) -> Any:
    """Object collectives under NCCL stage through ``torch.cuda.current_device()``, not the rank's
    device: without this, a script that never calls ``torch.cuda.set_device`` hangs on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _samples_in(batch: Any) -> int:
    size = batch_size_of(batch)
    return 1 if size is None else size


@torch.no_grad()
def _fingerprint(batches: Sequence[Any], sizes: Sequence[int]) -> tuple[float, float]:
    """Two numbers that change when the samples or their order change (shuffled loaders)."""
    plain, ordered = 0.0, float(zlib.crc32(repr(list(sizes)).encode()))
    first = 0
    for batch, size in zip(batches, sizes):
        for t in tensors_in(batch):
            if t.is_complex() or t.numel() == 0:
                continue
            t = t.detach()
            plain += float(t.sum(dtype=torch.float64))
            if t.dim() > 0 and t.shape[0] == size:
                per_sample = t.reshape(size, -1).sum(dim=1, dtype=torch.float64).cpu()
                position = torch.arange(first + 1, first + size + 1, dtype=torch.float64)
                ordered += float((per_sample * position).sum())
        first += size
    return plain, ordered


@dataclass
class _Layout:
    """Where this rank's local batches sit among the global batches."""

    global_sizes: list[int]
    pieces: list[tuple[int, int, int]]
    by_batch: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grouped: dict[int, list[int]] = defaultdict(list)
        for j, (b, _, _) in enumerate(self.pieces):
            grouped[b].append(j)
        self.by_batch = dict(grouped)


# ------------------------------------------------------------------------------ collectives

_SLOTS = 8  # numbers each rank contributes to a status exchange
_FORMS = ("minibatch", "moments")


@dataclass(frozen=True)
class _Next:
    """The next collective a rank will enter: payload length and dtype (the flags come after)."""

    numel: int
    dtype: torch.dtype


def _crc(value: Any) -> float:
    return float(zlib.crc32(repr(value).encode()))


class _Sync:
    """Collectives that carry one failure flag per rank, and the failure protocol.

    Every collective is a SUM all-reduce of ``[payload, flags(W)]``. ``pending`` always
    describes the collective this rank will enter next, so a rank that fails between two
    collectives can enter that one with its flag set: the others never wait for it in vain.
    """

    def __init__(self, group: Optional[Any], device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.status_next = _Next(_SLOTS * self.world_size, torch.float64)
        self.pending = self.status_next
        self.broken = False
        self.where = "starting"
        self.layer = ""
        self.iterations = 0
        self.steps_done = 0
        self.mse_calls = 0
        self.grad_next = self.status_next
        self.replicated = False
        self.local_recon: Optional[Tensor] = None
        self._global_recon: Union[float, Tensor] = float("nan")

    # -- the primitive

    def _all_reduce(self, buffer: Tensor) -> None:
        try:
            dist.all_reduce(buffer, group=self.group)
        except Exception:
            self.broken = True  # a peer is gone or the group timed out: no further collectives
            raise

    def collective(
        self, payload: Tensor, then: _Next, local_flag: Optional[Tensor] = None,
        flag_message: str = "", host_tail: int = 0,
    ) -> tuple[Tensor, list[float]]:
        """All-reduce ``payload`` with the flags; raise on every rank if any rank flagged.

        Returns the reduced payload and, read in the same device sync as the flags, its last
        ``host_tail`` values as Python floats.
        """
        w = self.world_size
        flags = torch.zeros(w, dtype=payload.dtype, device=payload.device)
        if local_flag is not None:
            flags[self.rank] = local_flag.to(payload.dtype)
        buffer = torch.cat([payload.reshape(-1), flags])
        self._all_reduce(buffer)
        tail = buffer[buffer.numel() - w - host_tail:].tolist()
        flagged = tail[host_tail:]
        if any(f != 0 for f in flagged):
            own = (flag_message or "failed") if flagged[self.rank] != 0 else None
            self._fail_together(flagged, own)
        self.pending = then
        return buffer[:-w], tail[:host_tail]

    def status(self, values: Sequence[float], then: Optional[_Next] = None) -> list[list[float]]:
        """Exchange up to ``_SLOTS`` numbers per rank; returns every rank's numbers (float64)."""
        payload = torch.zeros(self.world_size, _SLOTS, dtype=torch.float64, device=self.device)
        if values:
            payload[self.rank, :len(values)] = torch.tensor(list(values), dtype=torch.float64)
        reduced, _ = self.collective(payload, then or self.status_next)
        return reduced.reshape(self.world_size, _SLOTS).tolist()

    def _fail_together(self, flags: Sequence[float], own_message: Optional[str]) -> None:
        messages: list[Optional[str]] = [None] * self.world_size
        try:
            with _object_collective_device(self.device):
                dist.all_gather_object(messages, own_message, group=self.group)
        except Exception:
            self.broken = True
            messages = [own_message if q == self.rank else None for q in range(self.world_size)]
        failed = [q for q, f in enumerate(flags) if f != 0]
        details = "; ".join(f"rank {q}: {messages[q] or 'failed (see its log)'}" for q in failed)
        raise AdaRoundDistributedError(
            f"AdaRound stopped on all {self.world_size} ranks because {len(failed)} rank(s) failed. {details}"
        )

    def disagree(self, message: str) -> None:
        """Raise for a disagreement every rank detected from the same exchanged numbers."""
        raise AdaRoundDistributedError(f"AdaRound stopped on all {self.world_size} ranks: {message}")

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
        nxt, w = self.pending, self.world_size
        buffer = torch.zeros(nxt.numel + w, dtype=nxt.dtype, device=self.device)
        buffer[nxt.numel + self.rank] = 1
        try:
            self._all_reduce(buffer)
        except Exception:
            raise err
        message = f"{type(err).__name__} while {self.where}: {err}"
        try:
            self._fail_together(buffer[-w:].tolist(), message)
        except AdaRoundDistributedError as combined:
            raise combined from err

    # -- the sync points of a layer

    def begin_layer(self, name: str, iterations: int, weight_numel: int, replicated: bool) -> None:
        """``replicated``: every rank holds the same objective; the steps need no collective."""
        self.layer = name
        self.iterations = iterations
        self.steps_done = 0
        self.mse_calls = 0
        self.replicated = replicated
        self.grad_next = self.status_next if replicated else _Next(weight_numel + 1, torch.float32)

    @property
    def global_recon(self) -> float:
        """The reconstruction loss of the last step over all ranks' rows."""
        value = self._global_recon
        return float(value) if isinstance(value, Tensor) else value

    def record_loss(self, loss: Tensor) -> None:
        self.local_recon = loss.detach()

    def grad_reduce(self, grads: list[Tensor]) -> None:
        """Average V's gradient (and the loss) across ranks in one all-reduce, in place."""
        if self.replicated:  # the same objective and V everywhere: the gradients already agree
            self._global_recon = self.local_recon if self.local_recon is not None else float("nan")
            self.steps_done += 1
            return
        self.where = f"step {self.steps_done} of layer {self.layer!r}"
        grads = [g for g in grads if g is not None]
        dtype = grads[0].dtype if grads else torch.float32
        recon = self.local_recon if self.local_recon is not None else torch.zeros((), device=self.device)
        payload = torch.cat([g.reshape(-1) for g in grads] + [recon.reshape(1).to(dtype)])
        bad = ~torch.isfinite(payload).all()
        last = self.steps_done + 1 >= self.iterations
        reduced, tail = self.collective(
            payload, self.status_next if last else self.grad_next, local_flag=bad,
            flag_message=f"non-finite reconstruction loss or gradient at {self.where} "
            "(check this rank's calibration data for huge or NaN values)",
            host_tail=1,
        )
        reduced /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(reduced[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self._global_recon = tail[0] / self.world_size
        self.steps_done += 1

    def reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` across ranks in place, in one all-reduce (for the moments)."""
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        reduced, _ = self.collective(flat, self.status_next)
        offset = 0
        for t in tensors:
            t.copy_(reduced[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()

    def sum_statistics(self, name: str, numel: int, compute: Callable[[], Tensor]) -> Tensor:
        """Sum this rank's ``compute()`` (``numel`` float64 values) over ranks, for bias correction.

        A status exchange first sets the next collective to this one, so a rank that fails inside
        ``compute`` meets the others in it with its flag set.
        """
        self.where = f"correcting the bias of layer {name!r}"
        self.status([], then=_Next(numel, torch.float64))
        local = compute().to(device=self.device, dtype=torch.float64)
        reduced, _ = self.collective(
            local, self.status_next, local_flag=~torch.isfinite(local).all(),
            flag_message=f"non-finite output error while {self.where} (check this rank's calibration data)",
        )
        return reduced

    def reduce_error(self, total: float, count: int) -> float:
        """Global mean squared error from each rank's sum and count (before/after optimisation)."""
        self.where = f"evaluating layer {self.layer!r}"
        first = self.mse_calls == 0 and self.iterations > 0
        self.mse_calls += 1
        rows = self.status([total, count], then=self.grad_next if first else self.status_next)
        total_all = sum(r[0] for r in rows)
        count_all = sum(r[1] for r in rows)
        return total_all / max(count_all, 1.0)

    def check_same_rounding(self, result: LayerResult) -> None:
        """Compare a checksum of the integer weights and the grid across ranks."""
        self.where = f"checking layer {result.name!r}"
        q = result.integer_weight.to(torch.int64).flatten()
        w = torch.arange(q.numel(), dtype=torch.int64) % 8191 + 1
        scale = result.scale.double().flatten()
        values = [
            float(q.sum()), float((q * w).sum()), float(scale.sum()),
            float((scale * torch.arange(1, scale.numel() + 1, dtype=torch.float64)).sum()),
            float(result.zero_point.double().sum()), _crc(result.name),
        ]
        rows = self.status(values)
        if any(row != rows[0] for row in rows):
            differing = [q for q, row in enumerate(rows) if row != rows[0]]
            self.disagree(
                f"the integer weights of layer {result.name!r} differ between rank 0 and rank(s) {differing} "
                "(checksums of the integer weights and the grid disagree). The ranks' models or "
                "calibration layout differ, or the ranks compute differently (mixed hardware or thread counts: "
                "try distributed_adaround(..., sync_every_step=True))."
            )


# ------------------------------------------------------------------------------ objectives


class ShardedMinibatchObjective:
    """The minibatch form over a calibration set split across ranks.

    Draws the same global minibatch indices as :class:`~lightning_adaround.objective.MinibatchObjective`
    would over all ranks' rows (same generator, same permutation per pass), runs the layer on
    the rows this rank owns, and returns ``world_size x`` this rank's part of the global mean:
    averaging the ranks' gradients then yields the gradient of the global minibatch loss.
    """

    form = "minibatch"

    def __init__(
        self,
        sync: _Sync,
        unit: Unit,
        train: Optional[UnitData],
        train_counts: Sequence[int],
        evaluation: Optional[UnitData],
        batch_size: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.sync = sync
        self.unit = unit
        self.train = train
        self.evaluation = evaluation
        self.total = int(sum(train_counts))
        self.lo = int(sum(train_counts[:sync.rank]))
        self.hi = self.lo + int(train_counts[sync.rank])
        # The single-process sampler, over the global row index space.
        self.sampler = MinibatchSampler(self.total, batch_size, generator)
        self.batch_size = self.sampler.batch_size
        self.device = device
        self.channel_dim = unit.channel_dim

    def step_loss(self, weights: Sequence[Tensor]) -> Tensor:
        weight = weights[0]
        idx = self.sampler.next_indices()
        mine = idx[(idx >= self.lo) & (idx < self.hi)] - self.lo
        if mine.numel() == 0 or self.train is None:
            loss = weight.sum() * 0.0  # no row of this step here: a zero gradient of the right shape
        else:
            x = self.train.inputs[mine.to(self.train.inputs.device)].to(self.device, non_blocking=True)
            y = self.train.targets[mine.to(self.train.targets.device)].to(self.device, non_blocking=True)
            per_row = (self.unit.run([weight], x) - y).pow(2).sum(dim=self.channel_dim)
            share = self.sync.world_size * mine.numel() / (self.batch_size * per_row.numel())
            loss = per_row.sum() * share
        self.sync.record_loss(loss)
        return loss

    def mse(self, weights: Sequence[Tensor]) -> float:
        total, count = _squared_error(self.unit, self.evaluation, weights, self.device)
        return self.sync.reduce_error(total, count)


class _SharedMoments:
    """The moments form after the moments were summed over ranks: the same objective everywhere."""

    form = "moments"

    def __init__(
        self, sync: _Sync, inner: MomentsObjective, evaluation: Optional[UnitData], global_eval: int,
        device: torch.device,
    ) -> None:
        self.sync, self.inner, self.unit = sync, inner, inner.unit
        self.evaluation, self.global_eval, self.device = evaluation, global_eval, device

    def step_loss(self, weights: Sequence[Tensor]) -> Tensor:
        loss = self.inner.step_loss(weights)
        self.sync.record_loss(loss)
        return loss

    def value_and_grad(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        value, grad = self.inner.value_and_grad(weight)
        self.sync.record_loss(value)
        return value, grad

    def channel_errors(self, weight: Tensor, exact: bool = False) -> Tensor:
        return self.inner.channel_errors(weight, exact)  # the moments are summed already: no collective

    def mse(self, weights: Sequence[Tensor]) -> float:
        if self.global_eval:
            total, count = _squared_error(self.unit, self.evaluation, weights, self.device)
            return self.sync.reduce_error(total, count)
        value = self.inner.exact_loss(weights[0]) / weights[0].shape[0]
        self.sync.reduce_error(0.0, 0)  # keeps the sync points the same for both forms
        return value


@torch.no_grad()
def _squared_error(
    unit: Unit, data: Optional[UnitData], weights: Sequence[Tensor], device: torch.device,
) -> tuple[float, int]:
    """This rank's sum of squared output errors and element count (the parts of ``unit_mse``)."""
    if data is None:
        return 0.0, 0
    total, count = unit_channel_errors(unit, data, weights, device)
    return float(total.sum()), count


# ------------------------------------------------------------------------------ per layer

_NO_CHUNKS, _MIXED = -2.0, -1.0


def _shape_signature(chunks: Sequence[Tensor]) -> tuple[float, float]:
    """(signature of the per-sample shape or _MIXED/_NO_CHUNKS, last dim or -1)."""
    if not chunks:
        return _NO_CHUNKS, -1.0
    shapes = {tuple(c.shape[1:]) for c in chunks}
    last = {c.shape[-1] for c in chunks} if all(c.dim() >= 2 for c in chunks) else set()
    signature = _crc(next(iter(shapes))) if len(shapes) == 1 else _MIXED
    return signature, (float(next(iter(last))) if len(last) == 1 else -1.0)


def _flat_rows(chunks: Sequence[Tensor]) -> int:
    return sum(c.numel() // c.shape[-1] for c in chunks if c.dim() >= 1 and c.shape[-1])


def _stack(chunks: list[Tensor], flatten: bool) -> Tensor:
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks] if flatten else chunks, dim=0)


class _DistributedLayers:
    """The distributed counterpart of ``reconstruct.build_objective`` (same signature; layers only)."""

    def __init__(self, sync: _Sync, layout: _Layout, sync_moments: bool = False) -> None:
        self.sync = sync
        self.layout = layout
        self.sync_moments = sync_moments

    def _holdout(self, fraction: float, generator: torch.Generator, rows_per_sample: int):
        """Replay the single-process split over every global batch; keep this rank's rows."""
        holdout = _Holdout(fraction, generator)
        keep_of: dict[int, Tensor] = {}
        held_of: dict[int, Tensor] = {}
        for b, size in enumerate(self.layout.global_sizes):
            keep, held = holdout.split(size * rows_per_sample)
            for j in self.layout.by_batch.get(b, ()):
                _, offset, n = self.layout.pieces[j]
                lo, hi = offset * rows_per_sample, (offset + n) * rows_per_sample
                keep_of[j] = keep[(keep >= lo) & (keep < hi)] - lo
                held_of[j] = held[(held >= lo) & (held < hi)] - lo
        return keep_of, held_of

    def __call__(
        self,
        capture: InputCapture,
        unit: Unit,
        rounded: dict[str, nn.Module],
        float_weights: dict[str, Tensor],
        config: AdaRoundConfig,
        generator: torch.Generator,
        device: torch.device,
        cache_device: torch.device,
        task_loss: Optional[TaskLoss] = None,
    ) -> Optional[UnitObjective]:
        name, layer, ops = unit.name, unit.module, unit.ops
        sync, pieces = self.sync, self.layout.pieces
        sync.where = f"capturing layer {name!r}"
        sync.layer = name
        batches = capture.batches
        if len(batches) != len(pieces):
            raise RuntimeError(f"internal: {len(batches)} calibration batches but {len(pieces)} shard pieces")
        weight = float_weights[name]

        def capture_batch(j: int):
            return next(capture.pairs(name, layer, rounded, float_weights, only=[j]), None)

        # 1. Capture up to the first batch that reaches the layer, then agree on layer, weights, form.
        first_j, first = len(batches), None
        for j in range(len(batches)):
            first = capture_batch(j)
            if first is not None:
                first_j = j
                break
        local = choose_form(config.loss_form, layer, ops, config.batch_size, first[0]) if first is not None else None
        rows_per_sample = -1.0
        if first is not None:
            m, n = first[0].shape[0] if first[0].dim() else 1, pieces[first_j][2]
            rows_per_sample = float(m // n) if m % n == 0 and m >= n else -1.0
        w64 = weight.detach().double().flatten()
        rows = sync.status([
            1.0 if first is not None else 0.0, _crc(name), float(w64.sum()),
            float((w64 * torch.arange(1, w64.numel() + 1, dtype=torch.float64, device=w64.device)).sum()),
            float(_FORMS.index(local[0])) if local is not None else -1.0, rows_per_sample,
        ])
        if len({r[1] for r in rows}) > 1:
            sync.disagree(
                f"the ranks reached different layers at this point (rank 0: {name!r} on this rank): the model "
                "or its forward pass differs across ranks."
            )
        if len({(r[2], r[3]) for r in rows}) > 1:
            sync.disagree(
                f"the float weights of layer {name!r} differ across ranks; every rank must hold the same model "
                "(DDP training keeps them equal; otherwise load the same checkpoint on every rank)."
            )
        reached = [q for q, r in enumerate(rows) if r[0]]
        if not reached:
            return None
        ks = {rows[q][5] for q in reached}
        if len(ks) > 1 or min(ks) < 1:
            sync.disagree(
                f"the first dim of layer {name!r}'s input is not the same multiple of the samples in every "
                "calibration batch; data-parallel rounding needs sample-major layer inputs (e.g. batch_first=True) "
                "or a single process (strategy='auto')."
            )
        k = int(ks.pop())
        form = _FORMS[int(rows[reached[0]][4])]
        if local is not None and local[0] == form:
            _, used_ops, note = local
        else:
            first_input = first[0] if first is not None else None
            _, used_ops, note = choose_form(form, layer, ops, config.batch_size, first_input)
        unit = dataclasses.replace(unit, ops=used_ops)
        target_weights = [weight.to(compute_dtype(weight.dtype))]

        # 2. The rest of this rank's batches, split like one process splits the global ones.
        keep_of, held_of = self._holdout(config.holdout_fraction, generator, k)
        moments = LayerMoments(layer, device) if form == "moments" else None
        train_in: list[Tensor] = []
        train_out: list[Tensor] = []
        eval_in: list[Tensor] = []
        eval_out: list[Tensor] = []
        for j in range(first_j, len(batches)):
            pair = first if j == first_j else capture_batch(j)
            if pair is None:
                continue
            rounded_input, float_input = pair
            if rounded_input.shape[0] != pieces[j][2] * k:
                raise ValueError(
                    f"layer {name!r} received {rounded_input.shape[0]} rows for a batch of {pieces[j][2]} samples "
                    f"(expected {k} per sample); data-parallel rounding needs sample-major layer inputs."
                )
            keep, held = keep_of[j], held_of[j]
            if held.numel():
                eval_in.append(rounded_input[held].to(cache_device))
                eval_out.append(unit_targets(unit, target_weights, float_input[held]).to(cache_device))
            if moments is not None:
                same = float_input is rounded_input
                moments.add(rounded_input[keep], None if same else float_input[keep])
            else:
                train_in.append(rounded_input[keep].to(cache_device))
                train_out.append(unit_targets(unit, target_weights, float_input[keep]).to(cache_device))

        # 3. Agree on row counts and stacking, sum the moments, build the objective.
        train_sig, train_last = _shape_signature(train_in)
        eval_sig, eval_last = _shape_signature(eval_in)
        moments_next = _Next(3 * moments.xx.numel() + 2, torch.float64) if moments is not None else None
        rows = sync.status([
            sum(c.shape[0] for c in train_in), _flat_rows(train_in), train_sig, train_last,
            sum(c.shape[0] for c in eval_in), _flat_rows(eval_in), eval_sig, eval_last,
        ], then=moments_next)
        flatten_train, train_counts = _global_stacking(rows, 0, name)
        flatten_eval, eval_counts = _global_stacking(rows, 4, name)
        global_eval = sum(eval_counts)
        evaluation = UnitData(_stack(eval_in, flatten_eval), _stack(eval_out, flatten_eval)) if eval_in else None
        if moments is not None:
            sync.where = f"summing the moments of layer {name!r}"
            moments.all_reduce(sync.reduce_sum)
            inner = MomentsObjective(unit, moments, weight, evaluation, device)
            objective: Any = _SharedMoments(sync, inner, evaluation, global_eval, device)
            prepared = UnitObjective(objective, moments.samples, global_eval, used_ops, note)
        else:
            train = UnitData(_stack(train_in, flatten_train), _stack(train_out, flatten_train)) if train_in else None
            objective = ShardedMinibatchObjective(
                sync, unit, train, train_counts, evaluation if global_eval else train,
                config.batch_size, generator, device,
            )
            prepared = UnitObjective(objective, sum(train_counts), global_eval, used_ops, note)
        replicated = form == "moments" and not self.sync_moments
        sync.begin_layer(name, config.iterations, weight.numel(), replicated=replicated)
        sync.where = f"optimising layer {name!r}"
        return prepared


def _global_stacking(rows: list[list[float]], at: int, name: str) -> tuple[bool, list[int]]:
    """Whether every rank must flatten (as ``stack_samples`` does over all chunks) and the row counts."""
    sigs = [r[at + 2] for r in rows if r[at + 2] != _NO_CHUNKS]
    uniform = _MIXED not in sigs and len(set(sigs)) <= 1
    if uniform:
        return False, [int(r[at]) for r in rows]
    lasts = {r[at + 3] for r in rows if r[at + 2] != _NO_CHUNKS}
    if len(lasts) != 1 or -1.0 in lasts:
        raise AdaRoundDistributedError(
            f"layer {name!r} received inputs of different shapes across calibration batches; give calibration "
            "batches of one input shape (resize or pad them)."
        )
    return True, [int(r[at + 1]) for r in rows]


# ------------------------------------------------------------------------------ observer


class _RankZeroObserver(AdaRoundObserver):
    """Runs the collectives of the end of a layer on every rank; forwards to ``inner`` on rank 0 only."""

    def __init__(self, inner: Optional[AdaRoundObserver], sync: _Sync) -> None:
        self._stop = inner.should_stop if inner is not None else None  # every rank's own stop request
        self.inner = inner if inner is not None and sync.rank == 0 else None
        self.sync = sync
        self.global_recon: dict[int, float] = {}

    def should_stop(self) -> bool:
        """A rank asked to stop raises inside the failure protocol, which stops every rank."""
        return self._stop is not None and self._stop()

    def on_start(self, layer_names: list[str]) -> None:
        if self.inner is not None:
            self.inner.on_start(layer_names)

    def on_layer_start(self, name: str, index: int, iterations: int) -> None:
        self.global_recon = {}
        if self.inner is not None:
            self.inner.on_layer_start(name, index, iterations)

    def on_step(self, name: str, step: int, metrics: dict[str, float]) -> None:
        self.global_recon[step] = self.sync.global_recon  # this step's loss, averaged with the gradient
        if self.inner is not None:
            self.inner.on_step(name, step, dict(metrics, recon_loss=self.sync.global_recon))

    def on_layer_end(self, result: LayerResult) -> None:
        self.sync.check_same_rounding(result)  # a collective: every rank, before any rank-0-only code
        history = getattr(result, "history", None)
        if history:  # the core recorded this rank's part of the loss: put the global one in
            result.history = [(s, self.global_recon.get(s, r), *rest) for s, r, *rest in history]
        if self.inner is not None:
            self.inner.on_layer_end(result)

    def on_end(self, result: AdaRoundResult) -> None:
        self.sync.where = "finishing"
        if self.inner is not None:
            self.inner.on_end(result)


# ------------------------------------------------------------------------------ entry point

Batches = Union[Iterable[Any], CalibrationShard]


def distributed_adaround(
    model: nn.Module,
    calibration_batches: Union[Batches, Callable[[], Batches]],
    config: Optional[AdaRoundConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    device: Optional[torch.device | str] = None,
    activations: Optional[dict[str, Optional[Activation]]] = None,
    observer: Optional[AdaRoundObserver] = None,
    move_batch: MoveBatch = move_to_device,
    group: Optional[Any] = None,
    sync_every_step: bool = False,
) -> AdaRoundResult:
    """:func:`~lightning_adaround.adaround` over the processes of ``group``: one rounding, sharded data.

    Call it on every rank of an initialised process group with the same model and config.

    Args:
        model: The same model on every rank; rounded in place, identically on every rank.
        calibration_batches: This rank's data: a :class:`CalibrationShard` from
            :func:`shard_calibration` (every rank read the same global batches; the result then
            matches one process on those batches), or an iterable of this rank's own batches (the
            global set is the ranks' batches in rank order), or a zero-argument callable returning
            either (read inside the failure protocol, so a rank whose loader fails stops all ranks).
        config, forward_fn, activations, move_batch: As for :func:`~lightning_adaround.adaround`.
        device: This rank's compute device (default: where the model is); every collective buffer
            lives there (CUDA tensors for NCCL).
        observer: Called on rank 0 only, with values already reduced across ranks.
        group: The process group (default: the global one).
        sync_every_step: Also all-reduce the gradient every step for moments-form layers. Their
            objective is already identical on every rank, so by default the ranks step without
            communicating (the end-of-layer checksum still compares the results); turn this on
            if ranks compute differently (mixed hardware or thread counts) and the checksum fails.

    Raises:
        AdaRoundDistributedError: on every rank, with the same message, when any rank fails
            (an exception, non-finite values), the calibration data has fewer samples than ranks,
            or the ranks disagree (model, settings, data, integer weights).
    """
    if config is not None and config.reconstruction == "block":
        raise ValueError(
            "distributed_adaround rounds layer by layer; reconstruction='block' works in a single process "
            "for now. Call adaround() in one process, or use reconstruction='layer'."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_adaround needs an initialised torch.distributed process group "
            "(torchrun, or Lightning's strategy='ddp'); use adaround() in a single process."
        )
    config = config if config is not None else AdaRoundConfig()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got device={device}.")
    sync = _Sync(group, device)
    # Lightning's validate may run this under inference_mode: our buffers are updated in place.
    with torch.inference_mode(False), sync.guard():
        sync.where = "reading the calibration data"
        source = calibration_batches() if callable(calibration_batches) else calibration_batches
        shard = source if isinstance(source, CalibrationShard) else None
        batches = list(shard.batches if shard is not None else source)
        layout = _start(sync, batches, shard, config)
        result = adaround(
            model, batches, config,
            forward_fn=forward_fn, device=device, activations=activations,
            observer=_RankZeroObserver(observer, sync), grad_reduce=sync.grad_reduce,
            move_batch=move_batch, objective_builder=_DistributedLayers(sync, layout, sync_every_step),
            statistics_reduce=sync.sum_statistics,
        )
        sync.status([])  # after the last layer: any late failure reaches every rank
    return result


def _start(sync: _Sync, batches: list[Any], shard: Optional[CalibrationShard], config: AdaRoundConfig) -> _Layout:
    """Check the ranks agree on the settings and data, and learn the global layout."""
    local = sum(_samples_in(b) for b in batches)
    fingerprint = shard.fingerprint if shard is not None else (0.0, 0.0)
    rows = sync.status([
        float(local), _crc(config), 1.0 if shard is not None else 0.0,
        float(sum(shard.global_sizes)) if shard is not None else -1.0, fingerprint[0], fingerprint[1],
    ])
    w = sync.world_size
    total = int(sum(r[0] for r in rows))
    if any(r[0] == 0 for r in rows):
        empty = [q for q, r in enumerate(rows) if r[0] == 0]
        if total < w:
            sync.disagree(
                f"the calibration data has {total} sample(s) for {w} ranks; every rank needs at least one. "
                f"Read more (num_calibration_samples >= {w}, a few hundred per rank is typical)."
            )
        sync.disagree(f"rank(s) {empty} received no calibration sample; give every rank part of the data.")
    if len({r[1] for r in rows}) > 1:
        sync.disagree("the rounding settings (AdaRoundConfig) differ across ranks; pass the same config on every rank.")
    if len({r[2] for r in rows}) > 1:
        sync.disagree("some ranks passed a CalibrationShard and others plain batches; use one kind on every rank.")
    if shard is not None and len({(r[3], r[4], r[5]) for r in rows}) > 1:
        sync.disagree(
            "the calibration data read on each rank differs (a shuffled or randomly augmented loader?); "
            "every rank must read the same global batches before sharding: pass a loader without shuffling "
            "or augmentation (e.g. a datamodule's calibration_dataloader())."
        )
    if shard is not None:
        return _Layout(list(shard.global_sizes), list(shard.pieces))
    sizes: list[Optional[list[int]]] = [None] * w
    with _object_collective_device(sync.device):
        dist.all_gather_object(sizes, [_samples_in(b) for b in batches], group=sync.group)
    base = sum(len(s) for s in sizes[:sync.rank])
    return _Layout(
        [n for s in sizes for n in s],
        [(base + j, 0, n) for j, n in enumerate(sizes[sync.rank])],
    )
