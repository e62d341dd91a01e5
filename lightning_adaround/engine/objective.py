"""The reconstruction term: how far a unit's output with candidate weights is from the target.

An objective is anything with ``step_loss(weights)`` (a differentiable scalar for one
optimisation step) and ``mse(weights)`` (a plain number for reporting), each taking the unit's
weights in its ``layers`` order, so the optimiser loop does not care how the term is computed:
by minibatches of cached rows (any unit), or from second moments (a unit of one layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.data.moments import LayerMoments, weight_as_groups
from lightning_adaround.engine.reducer import Reducer
from lightning_adaround.data.unit import Unit, UnitData


class ReconstructionObjective(Protocol):
    form: str

    def step_loss(self, weights: Sequence[Tensor]) -> Tensor:
        """Reconstruction term for one step (summed over output channels, averaged over the rest)."""
        ...

    def mse(self, weights: Sequence[Tensor]) -> float:
        """Mean squared error per output element on the evaluation samples."""
        ...

    # Optional (the moments form, exact over every training row): ``channel_errors(weight)`` gives,
    # per output channel, the reconstruction error of ``weight`` up to a constant per channel. It
    # drives ``scale_method="output"`` and keeps round-to-nearest where it beats AdaRound.


class MinibatchSampler:
    """Minibatch indices over ``total`` samples, a fresh permutation per pass.

    A pass that does not fill the last minibatch is completed from the next permutation,
    so every sample is drawn equally often (give or take one).
    """

    def __init__(self, total: int, batch_size: int, generator: torch.Generator) -> None:
        self.total = total
        self.batch_size = min(batch_size, total)
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def next_indices(self) -> Tensor:
        idx = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += idx.numel()
        if idx.numel() < self.batch_size:  # pass finished: the rest comes from a fresh permutation
            self._order = torch.randperm(self.total, generator=self.generator)
            self._cursor = self.batch_size - idx.numel()
            idx = torch.cat([idx, self._order[:self._cursor]])
        return idx


def reconstruction_loss(output: Tensor, target: Tensor, channel_dim: int) -> Tensor:
    """``||output - target||^2`` summed over output channels, averaged over everything else.

    One fused kernel forward and backward (``mse_loss``), instead of subtract, square, sum.
    """
    rows = output.numel() // output.shape[channel_dim]
    return nn.functional.mse_loss(output, target, reduction="sum") / rows


class RowGather:
    """Rows ``idx`` of cached tensors on the compute device, into buffers reused every step.

    A fresh 10-100 MB tensor per step costs page faults; a buffer is free to reuse because
    the previous step's backward has finished with it. Rows of a host or disk cache bound for
    a GPU are gathered into one of two pinned staging buffers and copied without blocking (a
    copy from pageable memory cannot overlap); a staging buffer is refilled only once the copy
    that read it two steps ago has finished.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, Tensor] = {}
        self._staging: dict[str, list[tuple[Tensor, Any]]] = {}

    def __call__(self, source: Tensor, idx: Tensor, key: str, dtype: torch.dtype) -> Tensor:
        idx = idx.to(source.device)
        if source.device != self.device and self.device.type == "cuda" and source.device.type == "cpu":
            return self._staged_copy(source, idx, key).to(dtype)
        if source.device != self.device or source.dtype != dtype:  # compact dtype
            return source[idx].to(self.device, dtype, non_blocking=True)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] != idx.numel():
            buffer = self._buffers[key] = source.new_empty((idx.numel(), *source.shape[1:]))
        return torch.index_select(source, 0, idx, out=buffer)

    def _staged_copy(self, source: Tensor, idx: Tensor, key: str) -> Tensor:
        shape = (idx.numel(), *source.shape[1:])
        slots = self._staging.get(key)
        if slots is None or slots[0][0].shape != shape:
            slots = self._staging[key] = [
                (torch.empty(shape, dtype=source.dtype).pin_memory(), None) for _ in range(2)
            ]
        staged, copied = slots.pop(0)
        if copied is not None:
            copied.synchronize()
        torch.index_select(source, 0, idx, out=staged)
        out = staged.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        slots.append((staged, done))
        return out


@dataclass(frozen=True)
class RowShard:
    """This process's training rows among every process's, laid out in rank order: rows
    ``offset`` to ``offset + (its own rows)`` of ``total``."""

    offset: int
    total: int


class MinibatchObjective:
    """The paper's procedure for any unit: each step a random minibatch of cached rows, one forward.

    Rows are drawn without replacement from a fresh permutation per pass over the data, so
    every calibration sample reaches the optimiser equally often (give or take one). The
    unit runs with every rounded layer's soft weight at once through its own forward, so
    any block (attention, residuals) works; with Fisher weights each output element's squared
    error is weighted.

    With several processes (``shard``), every process draws the same minibatch indices over all
    processes' rows and runs the unit on the rows it holds; its loss is ``world_size`` times its
    part of the minibatch's, so averaging the gradients gives the gradient one process would find.
    """

    def __init__(
        self, unit: Unit, train: Optional[UnitData], evaluation: Optional[UnitData], batch_size: int,
        generator: torch.Generator, device: torch.device, shard: Optional[RowShard] = None,
        reducer: Optional[Reducer] = None,
    ) -> None:
        self.unit = unit
        self.form = "minibatch" if unit.is_layer else "block"
        self.train = train
        self.evaluation = evaluation
        self.reducer = reducer if reducer is not None else Reducer()
        self.sharded = self.reducer.world_size > 1  # rows split over processes: gradients are averaged
        local = train.num_samples if train is not None else 0
        self.shard = shard if shard is not None else RowShard(0, local)
        self._rows_here = (self.shard.offset, self.shard.offset + local)
        self.sampler = MinibatchSampler(self.shard.total, batch_size, generator)
        self.batch_size = self.sampler.batch_size
        self.device = device
        self._gather = RowGather(device)

    def _rows(self, data: UnitData, idx: Tensor, dtype: torch.dtype, prefix: str) -> tuple[Tensor, tuple, dict]:
        # ``dtype``: activations may be cached in a compact dtype the user allowed
        return data.rows(
            lambda t, key: self._gather(t, idx, f"{prefix}{key}", dtype if t.is_floating_point() else t.dtype)
        )

    def step_loss(self, weights: Sequence[Tensor]) -> Tensor:
        idx = self.sampler.next_indices()
        share = 1.0
        if self.sharded:
            lo, hi = self._rows_here
            idx = idx[(idx >= lo) & (idx < hi)] - lo
            if idx.numel() == 0 or self.train is None:  # none of this step's rows here: a zero gradient
                return torch.stack([w.sum() for w in weights]).sum() * 0.0
            share = self.reducer.world_size * idx.numel() / self.batch_size
        assert self.train is not None
        dtype = weights[0].dtype
        x, args, kwargs = self._rows(self.train, idx, dtype, "train")
        y = self._gather(self.train.targets, idx, "y", dtype)
        out = self.unit.run(weights, x, args, kwargs)
        if self.train.fisher is None:
            loss = reconstruction_loss(out, y, self.unit.channel_dim)
        else:
            fisher = self._gather(self.train.fisher, idx, "f", dtype)
            rows = out.numel() // out.shape[self.unit.channel_dim]
            loss = (fisher * (out - y).square()).sum() / rows
        return loss * share if self.sharded else loss

    def mse(self, weights: Sequence[Tensor]) -> float:
        return shared_mse(self.unit, self.evaluation, weights, self.device, self.reducer)

    def fit_error(self, weights: Sequence[Tensor]) -> float:
        """Mean squared error per output element on every process's training rows."""
        return shared_mse(self.unit, self.train, weights, self.device, self.reducer)


@torch.no_grad()
def unit_channel_errors(
    unit: Unit, data: UnitData, weights: Sequence[Tensor], device: torch.device, chunk: int = 128,
) -> tuple[Tensor, int]:
    """``(squared error summed per output channel, number of output elements)`` of the unit's output."""
    dtype = weights[0].dtype
    channel_dim = unit.channel_dim
    total: Optional[Tensor] = None
    count = 0
    for rows, x, args, kwargs in data.chunks(chunk, device, dtype):
        err = (unit.run(weights, x, args, kwargs) - data.targets[rows].to(device, dtype)).double().pow(2)
        sums = err.transpose(0, channel_dim).reshape(err.shape[channel_dim], -1).sum(1)
        total = sums if total is None else total + sums
        count += err.numel()
    if total is None:
        total = torch.zeros(1, dtype=torch.float64, device=device)
    return total, count


def shared_mse(
    unit: Unit, data: Optional[UnitData], weights: Sequence[Tensor], device: torch.device, reducer: Reducer,
) -> float:
    """Mean squared error per output element of the unit's output against the targets, over every
    process's rows (``data``: this process's, maybe none)."""
    total, count = 0.0, 0
    if data is not None and data.num_samples:
        sums, count = unit_channel_errors(unit, data, weights, device)
        total = float(sums.sum())
    rows = reducer.exchange([total, float(count)], f"measuring the error of {unit.kind} {unit.name!r}")
    return sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1.0)


class _AnalyticLoss(torch.autograd.Function):
    """Autograd node for an objective that computes its own value and gradient in one go."""

    @staticmethod
    def forward(ctx, weight: Tensor, value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        value, grad = value_and_grad(weight)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None


class MomentsObjective:
    """The exact reconstruction term over every calibration row, from second moments.

    With ``D = W~ - W`` and ``x~ = x + e``:  ``mean ||W~ x~ - W x||^2 =
    tr(D A D^T) + 2 tr(D M W^T) + tr(W K W^T)``, ``A = E[x~ x~^T]``, ``M = E[x~ e^T]``,
    ``K = E[e e^T]``; :class:`LayerMoments` keeps ``W M^T = E[(W e) x~^T]`` and ``diag(W K W^T)``.
    Written around ``D`` the value stays accurate (and non-negative) as W~ approaches W, where the
    expanded form would cancel. A BatchNorm after the layer weighs each output channel by its
    squared scale.
    """

    form = "moments"

    def __init__(
        self,
        unit: Unit,
        moments: LayerMoments,
        float_weight: Tensor,
        evaluation: Optional[UnitData],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        eval_total: Optional[int] = None,
        reducer: Optional[Reducer] = None,
    ) -> None:
        """``moments``: summed over every process; ``evaluation``: this process's held-out rows, of
        ``eval_total`` over every process (default: these)."""
        self.unit = unit
        self.reducer = reducer if reducer is not None else Reducer()
        self.sharded = False  # the summed moments make the same objective on every process
        local_eval = evaluation.num_samples if evaluation is not None else 0
        self.eval_total = local_eval if eval_total is None else eval_total
        self.layer = layer = unit.module
        self.evaluation = evaluation
        self.ops = ops = unit.ops
        self.device = device
        rows = max(moments.rows, 1)
        w = weight_as_groups(layer, float_weight.double().to(device))
        scale = ops.channel_scale() if ops is not None else None
        channel_weight = torch.ones(w.shape[0] * w.shape[1], dtype=torch.float64, device=device)
        if scale is not None:
            channel_weight = scale.double().to(device) ** 2
        # float64 copies for exact reporting; ``dtype`` ones for the steps
        wx, ee = moments.error_terms()
        channel_weight = channel_weight.reshape(w.shape[0], w.shape[1], 1)
        self.exact = {
            "a": moments.xx / rows,
            "wm": wx / rows,
            "channel_weight": channel_weight,
            "float_weight": w,
            "const": (channel_weight[..., 0] * ee).sum() / rows,
        }
        self.a, self.wm, self.const, self.channel_weight, self.float_weight = (
            self.exact[k].to(dtype) for k in ("a", "wm", "const", "channel_weight", "float_weight")
        )
        self.weighted_wm = self.wm * self.channel_weight

    @torch.no_grad()
    def value_and_grad(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The reconstruction term and its gradient on ``weight``: one batched matmul.

        ``value = sum(w * (D A + 2 W M^T) * D) + c``, ``grad = 2 w (D A + W M^T)``.
        """
        delta = weight_as_groups(self.layer, weight.to(self.float_weight.dtype)) - self.float_weight
        weighted = torch.baddbmm(self.wm, delta, self.a).mul_(self.channel_weight)
        value = ((weighted + self.weighted_wm) * delta).sum() + self.const
        return value, weighted.mul_(2.0).reshape(weight.shape).to(weight.dtype)

    def step_loss(self, weights: Sequence[Tensor]) -> Tensor:
        return _AnalyticLoss.apply(weights[0], self.value_and_grad)

    @torch.no_grad()
    def exact_loss(self, weight: Tensor) -> float:
        """The reconstruction term over all training rows, in float64 (clamped at 0)."""
        e = self.exact
        delta = weight_as_groups(self.layer, weight.to(self.device).double()) - e["float_weight"]
        value = (e["channel_weight"] * (delta @ e["a"] + 2.0 * e["wm"]) * delta).sum() + e["const"]
        return max(float(value), 0.0)

    def mse(self, weights: Sequence[Tensor]) -> float:
        if self.eval_total:
            return shared_mse(self.unit, self.evaluation, weights, self.device, self.reducer)
        return self.exact_loss(weights[0]) / weights[0].shape[0]

    @torch.no_grad()
    def channel_errors(self, weight: Tensor, exact: bool = False) -> Tensor:
        """Per output channel, the reconstruction term less the part no weight changes.

        In the step dtype for the grid search (100 candidates); ``exact``: in float64.
        """
        e = self.exact if exact else dict(a=self.a, wm=self.wm, channel_weight=self.channel_weight,
                                          float_weight=self.float_weight)
        delta = weight_as_groups(self.layer, weight.to(self.device, e["float_weight"].dtype)) - e["float_weight"]
        per_element = torch.baddbmm(e["wm"], delta, e["a"]).add_(e["wm"]).mul_(delta).mul_(e["channel_weight"])
        return per_element.sum(-1).reshape(-1)
