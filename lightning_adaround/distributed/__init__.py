"""Data-parallel rounding: each process reads its own shard of the calibration data, and all
processes find ONE rounding together, the one a single process finds on all of the data.

Plain ``torch.distributed`` (gloo on CPU, NCCL on GPUs, every buffer on the compute device).
The Lightning callback calls :func:`distributed_adaround` under ``strategy="ddp"`` or
``"ddp_spawn"``; a script started with ``torchrun`` can call it directly. The run is the
single-process one (``engine.run.round_model``) with a :class:`DistributedReducer`, which meets
the other processes at the points ``engine/reducer.py`` names; everything one process can do
(layer and block reconstruction, both loss forms, cache tiers and ``cache_dtype``,
``checkpoint_dir`` resume, bias correction, the Fisher block loss) works the same way here.

How W processes find the rounding one process would find
--------------------------------------------------------
* Global sample order. The samples are numbered rank by rank: rank 0's shard first, then
  rank 1's. :func:`shard_calibration` gives rank ``r`` the ``r``-th contiguous block of the
  samples (a batch on a block boundary is cut in two), so that order is the order one
  process reads them in.
* Hold-out. The held-out samples are drawn once, over the global sample numbers, from the
  shared seeded generator; each process holds out its own samples' rows.
* Minibatch form. Each step's minibatch indices come from that shared generator over every
  process's rows (laid out in rank order); each process runs the unit on the rows it holds
  and returns ``W x`` its part of the mean; averaging the gradients gives the one-process
  gradient, up to float summation order. One all-reduce per step: V's gradient, the loss and
  one failure flag per rank in one flat buffer; every rank applies the same Adam update.
* Moments form: the second moments are summed in one all-reduce per layer, so every rank
  holds the same exact objective and steps without communicating (``sync_every_step=True``
  averages these gradients too).
* At the end of each unit a checksum of the integer weights and grids is compared.
* Reporting. Errors are global sums over global counts and the logged loss is the global
  one; the observer (loggers, progress bar) runs on rank 0 only.
* Checkpoints. Every rank reads ``checkpoint_dir`` (a folder all ranks see); rank 0 writes it.
* Faults. Every meeting point starts with a small fixed-size exchange that carries one
  failure flag per rank and a tag naming the point. A rank that raises joins the exchange
  the others wait in with its flag set (inside a unit's optimisation loop: the gradient
  all-reduce), and every rank raises the same :class:`AdaRoundDistributedError`; ranks
  reaching different points is the same kind of error, not a hang. A rank that dies outside
  Python (killed, segfault) ends the others through the backend: gloo raises at once, NCCL
  when the process group's timeout expires.
* Limits. A layer whose input rows are not a whole number per sample has none held out. A
  layer called several times per forward matches one process only when no batch is cut
  between ranks (its calls' rows are ordered by call within each rank's piece).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from lightning_adaround.data.calibration import SampleLayout, leading_rows, samples_in, tensors_in
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.engine.run import RunOptions, round_model
from lightning_adaround.distributed.reducer import AdaRoundDistributedError, DistributedReducer
from lightning_adaround.engine.reducer import crc
from lightning_adaround.result import AdaRoundResult

__all__ = [
    "AdaRoundDistributedError",
    "CalibrationShard",
    "DistributedReducer",
    "distributed_adaround",
    "is_sharded_loader",
    "shard_calibration",
]


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
    sizes = [samples_in(b) for b in batches]
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


@torch.no_grad()
def _fingerprint(batches: Sequence[Any], sizes: Sequence[int]) -> tuple[float, float]:
    """Two numbers that change when the samples or their order change (shuffled loaders)."""
    plain, ordered = 0.0, crc(list(sizes))
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


# ------------------------------------------------------------------------------ entry point

Batches = Union[Iterable[Any], CalibrationShard]


def distributed_adaround(
    model: nn.Module,
    calibration_batches: Union[Batches, Callable[[], Batches]],
    config: Optional[AdaRoundConfig] = None,
    *,
    group: Optional[Any] = None,
    sync_every_step: bool = False,
    **options: Any,
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
        config: As for :func:`~lightning_adaround.adaround`.
        group: The process group (default: the global one).
        sync_every_step: Also average the gradient every step for moments-form layers. Their
            objective is already identical on every rank, so by default the ranks step without
            communicating (the end-of-unit checksum still compares the results); turn this on
            if ranks compute differently (mixed hardware or thread counts) and the checksum fails.
        **options: :func:`~lightning_adaround.adaround`'s keyword arguments (``forward_fn``,
            ``device``, ``activations``, ``observer``, ``move_batch``, ``checkpoint_dir``,
            ``task_loss``), with three differences: ``device`` is this rank's compute device (default:
            where the model is), where every collective buffer lives (CUDA tensors for NCCL);
            ``observer`` is called on rank 0 only, with values already combined across ranks (every
            rank asks its own ``should_stop``); ``checkpoint_dir`` must be a folder every rank sees
            (one machine, or a shared file system), which rank 0 writes, and a resumed run needs the
            same number of ranks and the same data.

    Raises:
        AdaRoundDistributedError: on every rank, with the same message, when any rank fails
            (an exception, non-finite values), the calibration data has fewer samples than ranks,
            or the ranks disagree (model, settings, data, integer weights).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_adaround needs an initialised torch.distributed process group "
            "(torchrun, or Lightning's strategy='ddp'); use adaround() in a single process."
        )
    config = config if config is not None else AdaRoundConfig()
    run_options = RunOptions(**options)
    device = run_options.device
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    run_options = dataclasses.replace(run_options, device=device)
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got device={device}.")
    reducer = DistributedReducer(group, device, sync_every_step)
    # Lightning's validate may run this under inference_mode: our buffers are updated in place.
    with torch.inference_mode(False), reducer.guard():
        reducer.where = "reading the calibration data"
        source = calibration_batches() if callable(calibration_batches) else calibration_batches
        shard = source if isinstance(source, CalibrationShard) else None
        batches = list(shard.batches if shard is not None else source)
        layout = _start(reducer, batches, shard, config)
        result = round_model(model, batches, config, run_options, reducer, layout)
        reducer.where = "finishing"
        reducer.exchange([], "finishing")  # after the last unit: any late failure reaches every rank
    return result


def _start(
    reducer: DistributedReducer, batches: list[Any], shard: Optional[CalibrationShard], config: AdaRoundConfig,
) -> SampleLayout:
    """Check the ranks agree on the settings and data, and learn where this rank's samples sit."""
    local = sum(samples_in(b) for b in batches)
    fingerprint = shard.fingerprint if shard is not None else (0.0, 0.0)
    rows = reducer.exchange([
        float(local), crc(config), 1.0 if shard is not None else 0.0,
        float(sum(shard.global_sizes)) if shard is not None else -1.0, fingerprint[0], fingerprint[1],
    ], "starting")
    w = reducer.world_size
    total = int(sum(r[0] for r in rows))
    if any(r[0] == 0 for r in rows):
        empty = [q for q, r in enumerate(rows) if r[0] == 0]
        if total < w:
            reducer.disagree(
                f"the calibration data has {total} sample(s) for {w} ranks; every rank needs at least one. "
                f"Read more (num_calibration_samples >= {w}, a few hundred per rank is typical)."
            )
        reducer.disagree(f"rank(s) {empty} received no calibration sample; give every rank part of the data.")
    if len({r[1] for r in rows}) > 1:
        reducer.disagree("the rounding settings (AdaRoundConfig) differ across ranks; pass the same config on every rank.")
    if len({r[2] for r in rows}) > 1:
        reducer.disagree("some ranks passed a CalibrationShard and others plain batches; use one kind on every rank.")
    if shard is not None and len({(r[3], r[4], r[5]) for r in rows}) > 1:
        reducer.disagree(
            "the calibration data read on each rank differs (a shuffled or randomly augmented loader?); "
            "every rank must read the same global batches before sharding: pass a loader without shuffling "
            "or augmentation (e.g. a datamodule's calibration_dataloader())."
        )
    if shard is not None:
        starts = [sum(shard.global_sizes[:b]) + offset for b, offset, _ in shard.pieces]
        return SampleLayout(starts, [n for _, _, n in shard.pieces], sum(shard.global_sizes))
    sizes = [json.loads(text) for text in reducer.gather_text(json.dumps([samples_in(b) for b in batches]), "sizes")]
    base = sum(sum(s) for s in sizes[:reducer.rank])
    mine = sizes[reducer.rank]
    return SampleLayout([base + sum(mine[:j]) for j in range(len(mine))], mine, sum(sum(s) for s in sizes))
