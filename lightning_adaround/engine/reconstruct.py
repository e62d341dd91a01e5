"""Per unit (a layer, or a block of layers): stream its calibration inputs, hold some out, and
build its reconstruction objective.

The one place that decides between the minibatch and the moments form, so the optimiser
loop and the public API stay the same for every layer type and for blocks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_adaround.data.cache import CachePlan, ChunkStore
from lightning_adaround.data.calibration import SampleLayout, held_rows
from lightning_adaround.data.capture import Call, InputCapture, check_finite
from lightning_adaround.data.capture import float_weights as float_weights_in
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.model.layers import OutputOps, compute_dtype, run_with_weight
from lightning_adaround.data.moments import LayerMoments, inner_layer_moments, moments_supported, patch_dim
from lightning_adaround.engine.objective import MinibatchObjective, MomentsObjective, ReconstructionObjective, RowShard
from lightning_adaround.engine.reducer import Reducer, crc
from lightning_adaround.grid.quant import ChannelError
from lightning_adaround.data.unit import Unit, UnitArguments, UnitData, one_row_each


@dataclass
class UnitObjective:
    objective: ReconstructionObjective
    num_samples: int
    eval_samples: int
    ops: Optional[OutputOps]
    note: str = ""
    cache_bytes: int = 0  # what this unit kept: cached activations, or moments plus held-out samples
    # per layer, its output error per channel (``MomentsObjective.channel_errors``) where known:
    # a layer in the moments form, and a block's layers, from one pass of the block
    channel_errors: dict[str, ChannelError] = dataclasses.field(default_factory=dict)


TaskLoss = Callable[[Any, Any], Tensor]  # task_loss(model output, batch) -> scalar


@dataclass
class RunData:
    """What every unit of one run shares: calibration data, settings, the generator, the other processes."""

    capture: InputCapture
    config: AdaRoundConfig
    generator: torch.Generator  # one seeded stream: bias_correction="auto"'s held-out draw, then every minibatch
    device: torch.device
    cache_device: torch.device
    layout: SampleLayout
    held_out: list[Tensor]  # per calibration batch: the samples bias_correction="auto" judges on
    reducer: Reducer
    task_loss: Optional[TaskLoss] = None  # for a block's Fisher loss


def _held_out_rows(run: RunData, held_out: list[Tensor], index: int, rows: int) -> tuple[Tensor, Tensor, bool]:
    """``(training rows, held-out rows, per sample)`` of a call on batch ``index`` with ``rows`` input rows,
    ``held_out`` giving the unit's held-out samples per batch.

    Rows that are not per sample (:func:`held_rows`) are all training rows.
    """
    held = held_rows(held_out[index], run.layout.sizes[index], rows)
    if held is None:
        return torch.arange(rows), torch.arange(0), False
    return (~held).nonzero().flatten(), held.nonzero().flatten(), True


def _rows_per_sample(layer: nn.Module, sample: Tensor) -> int:
    """Rows of one sample the weight multiplies: tokens for Linear, output positions for conv."""
    if isinstance(layer, nn.Linear):
        return max(1, sample[:1].numel() // layer.in_features)
    with torch.no_grad():
        out = run_with_weight(layer, sample[:1], layer.weight.to(compute_dtype(layer.weight.dtype)))
    return max(1, out.numel() // out.shape[1])


def choose_form(
    loss_form: str, layer: nn.Module, ops: Optional[OutputOps], batch_size: int, first_input: Tensor,
) -> tuple[str, Optional[OutputOps], str]:
    """``(form, ops used in the loss, note for the summary)`` for one layer.

    ``auto`` takes moments when the layer supports it, no activation was asked for
    explicitly, and one step costs less: ``out * d^2`` against ``3 * rows_per_step * d * out``.
    """
    if loss_form == "minibatch":
        return "minibatch", ops, ""
    if not moments_supported(layer):
        note = "transposed conv: minibatch form" if loss_form == "moments" else ""
        return "minibatch", ops, note
    explicit_activation = ops is not None and not ops.detected and ops.activation is not None
    if loss_form == "auto":
        if explicit_activation:
            return "minibatch", ops, ""
        rows_per_step = batch_size * _rows_per_sample(layer, first_input)
        if patch_dim(layer) > 3 * rows_per_step:
            return "minibatch", ops, ""
    if ops is None:
        return "moments", None, ""
    kept = OutputOps(batchnorm=ops.batchnorm, detected=ops.detected) if ops.channel_scale() is not None else None
    dropped = [type(m).__name__ for m in (ops.activation, ops.batchnorm if kept is None else None) if m is not None]
    note = f"{'/'.join(dropped)} left out of the loss (moments form)" if dropped else ""
    return "moments", kept, note


class _Cache:
    """One unit's cached tensors by key; where they live is chosen at the first batch."""

    def __init__(self, plan: CachePlan, num_batches: int) -> None:
        self.plan = plan
        self.num_batches = num_batches
        self.stores: dict[str, ChunkStore] = {}
        self.tier: Optional[str] = None
        self.note = ""

    def add(self, pieces: list[tuple[str, Tensor]]) -> None:
        if self.tier is None:
            estimate = self.num_batches * sum(self.plan.stored_bytes(t) for _, t in pieces)
            self.tier = self.plan.tier_for(estimate)
            if self.tier != self.plan.tier_for(0):
                self.note = f"cached on {self.tier} (about {estimate / 2**20:.0f} MiB)"
        for key, t in pieces:
            if key not in self.stores:
                self.stores[key] = self.plan.store(self.tier, self.num_batches, exact=not t.is_floating_point())
            self.stores[key].add(t)

    def rows(self, split: str) -> list[float]:
        """``[rows, rows if flattened, shape signature, last dim]`` of ``split``'s inputs, for the
        processes to agree on one stacking (a Linear fed sequences of several lengths stacks rows)."""
        store = self.stores.get(f"{split}_in")
        shapes = store.shapes if store is not None else []
        if not shapes:
            return [0.0, 0.0, _NO_ROWS, -1.0]
        tails = {tuple(s[1:]) for s in shapes}
        lasts = {s[-1] for s in shapes} if all(len(s) >= 2 for s in shapes) else set()
        return [
            float(sum(s[0] for s in shapes)), float(sum(math.prod(s[:-1]) for s in shapes)),
            crc(next(iter(tails))) if len(tails) == 1 else _MIXED, float(lasts.pop()) if len(lasts) == 1 else -1.0,
        ]

    def tensors(self, name: str, flatten: dict[str, Optional[bool]]) -> dict[str, Tensor]:
        return {
            key: store.tensor(name, flatten.get(key, False))
            for key, store in self.stores.items() if store.shapes
        }

    @staticmethod
    def nbytes(data: dict[str, Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in data.values())


_NO_ROWS, _MIXED = -2.0, -1.0
_FORMS = ("minibatch", "moments")


def _stacking(rows: list[list[float]], at: int, unit: Unit, rank: int) -> tuple[Optional[bool], list[int]]:
    """Whether every process stacks a split's rows flattened, and each process's row count.

    One process stacks samples when every batch gave the same per-sample shape, else (a Linear fed
    sequences of several lengths) rows; the processes decide together, from all of their shapes.
    ``None``: shapes that cannot be stacked, which stacking this process's own reports in detail.
    """
    signatures = {r[at + 2] for r in rows if r[at + 2] != _NO_ROWS}
    if _MIXED not in signatures and len(signatures) <= 1:
        return False, [int(r[at]) for r in rows]
    lasts = {r[at + 3] for r in rows if r[at + 2] != _NO_ROWS}
    if len(lasts) != 1 or -1.0 in lasts or not unit.is_layer or not isinstance(unit.module, nn.Linear):
        if rows[rank][at + 2] == _MIXED:
            return None, []
        raise ValueError(
            f"{unit.kind} {unit.name!r} received inputs of different shapes across calibration batches (on "
            "different ranks); give calibration batches of one input shape (resize or pad them)."
        )
    return True, [int(r[at + 1]) for r in rows]


def build_objective(
    run: RunData, unit: Unit, rounded: dict[str, nn.Module], float_weights: dict[str, Tensor],
    held_out: list[Tensor],
) -> Optional[UnitObjective]:
    """Everything one unit's optimisation needs, or ``None`` when no batch reaches it.

    Per calibration batch: the unit's input in the rounded model, its other per-sample
    arguments and its output in the float model, split into training and held-out rows (the
    rows of the unit's held-out samples, ``held_out`` per batch). A layer called several times
    per forward (weight sharing) contributes every call's rows (or moments). A unit of one layer may take the moments form,
    which keeps second moments instead of rows. With ``run.task_loss`` (a block's Fisher loss)
    the cache also holds the squared gradient of the task loss at the unit's output.

    With several processes each holds its own batches' rows; they agree here on the form, the
    stacking and the row counts, and sum the moments, so that the objective is the one a single
    process would build from all of their batches.
    """
    config, reducer, device = run.config, run.reducer, run.device
    task_loss = None if unit.is_layer else run.task_loss
    reducer.where = f"capturing {unit.kind} {unit.name!r}"
    first_name, first_module = unit.first
    calls = run.capture.calls(first_name, first_module, rounded, float_weights)
    first = next(calls, None)
    form, ops, note = "minibatch", unit.ops, ""
    if first is not None and unit.is_layer:
        form, ops, note = choose_form(config.loss_form, unit.module, unit.ops, config.batch_size, first[1][0][0])
    agreed = _agree_on_form(reducer, unit, first is not None, form, float_weights)
    if agreed is None:
        return None
    if agreed != form or (first is None and unit.is_layer):  # as the first process that reached the unit chose
        form, ops, note = choose_form(agreed, unit.module, unit.ops, config.batch_size, None)
    if unit.is_layer:
        unit = dataclasses.replace(unit, ops=ops)
    weights = [float_weights[n].to(compute_dtype(float_weights[n].dtype)) for n in unit.layers]
    moments = LayerMoments(unit.module, device, float_weights[unit.name]) if form == "moments" else None
    cache = _Cache(CachePlan(
        device, config.device_cache_bytes, config.host_cache_bytes, config.cache_dir, config.cache_dtype,
    ), len(run.capture.batches) * run.capture.calls_per_batch(first_name))
    arguments = UnitArguments(unit, first[1], first[1][0][0].shape) if first is not None else None
    per_sample_rows = True
    correction = config.upstream_correction_for([unit.layer_module(n) for n in unit.layers])
    for index, rounded_call, float_call in chain([first], calls) if first is not None else ():
        assert arguments is not None
        x = rounded_call[0][0].detach()
        x_float = x if float_call is rounded_call else float_call[0][0].detach()
        per_sample = arguments.per_sample(rounded_call, x.shape)
        check_finite(f"{unit.kind} {unit.name!r}", [("input", x), ("float-model input", x_float)], fix=_fix(unit))
        x_target = target_input(x, x_float, correction)
        keep, held, by_sample = _held_out_rows(run, held_out, index, x.shape[0])
        per_sample_rows = per_sample_rows and by_sample
        pieces = []
        if held.numel():
            pieces += [("eval_in", x[held]), ("eval_out", unit_targets(unit, weights, x_target[held], float_call, held))]
            pieces += [(f"eval_{key}", t[held]) for key, t in per_sample.items()]
        if moments is not None:
            moments.add(x[keep], None if x_target is x else x_target[keep])
        else:
            target = unit_targets(unit, weights, x_target[keep], float_call, keep)
            check_finite(f"{unit.kind} {unit.name!r}", [("full-precision output", target)], fix=_fix(unit))
            pieces += [("train_in", x[keep]), ("train_out", target)]
            pieces += [(f"train_{key}", t[keep]) for key, t in per_sample.items()]
            if task_loss is not None:
                gradient = _output_gradient(run.capture, unit, rounded, float_weights, task_loss, index)
                pieces.append(("train_fisher", gradient[keep].square()))
        if pieces:
            cache.add(pieces)
    numbers = cache.rows("train") + cache.rows("eval")
    if moments is not None:
        count = torch.tensor([float(moments.rows), float(moments.samples)], dtype=torch.float64, device=device)
        rows = reducer.sum(
            [*moments.sums(), count], f"summing the moments of {unit.kind} {unit.name!r}",
            numbers=numbers,
        )
        moments.rows, moments.samples = int(count[0].item()), int(count[1].item())
    else:
        rows = reducer.exchange(numbers, f"counting the rows of {unit.kind} {unit.name!r}")
    flatten_train, train_counts = _stacking(rows, 0, unit, reducer.rank)
    flatten_eval, eval_counts = _stacking(rows, 4, unit, reducer.rank)
    flatten = {"train_in": flatten_train, "train_out": flatten_train, "eval_in": flatten_eval, "eval_out": flatten_eval}
    data = cache.tensors(unit.name, flatten)
    eval_total = sum(eval_counts)
    evaluation = arguments.data(data, "eval") if arguments is not None and "eval_in" in data else None
    cache_bytes = _Cache.nbytes(data)
    if moments is not None:
        # errors are reported on the held-out samples, or on every training row when none are held out
        objective: ReconstructionObjective = MomentsObjective(
            unit, moments, float_weights[unit.name], evaluation, device, eval_total=eval_total, reducer=reducer,
        )
        train_samples, cache_bytes = moments.samples, cache_bytes + moments.nbytes()
    else:
        train = None
        if arguments is not None and "train_in" in data:
            train = arguments.data(data, "train", _fisher(unit, data.get("train_fisher"), reducer))
        elif task_loss is not None:
            _fisher(unit, None, reducer)  # this process has no rows, but the others sum the Fisher weights
        shard = RowShard(sum(train_counts[:reducer.rank]), sum(train_counts))
        if not eval_total:  # report on the training rows
            evaluation, eval_total = train, shard.total
        objective = MinibatchObjective(
            unit, train, evaluation, config.batch_size, run.generator, device, shard=shard, reducer=reducer,
        )
        train_samples = shard.total
    channel_errors: dict[str, ChannelError] = {}
    if isinstance(objective, MomentsObjective):
        channel_errors[unit.name] = objective.channel_errors
    elif not unit.is_layer:
        note = f"block {unit.name} ({len(unit.layers)} layers)"
        channel_errors = _inner_channel_errors(unit, train, weights, float_weights, device, reducer)
    if not per_sample_rows and config.holdout_fraction > 0:
        note = "; ".join(filter(None, [note, "input rows not per sample: none held out"]))
    # the paper's target (1) goes unsaid; any other is what this unit was fitted to, and why
    upstream = f"upstream correction {correction:g}" if correction != 1.0 else ""
    if upstream and config.upstream_correction is None:
        upstream += " (Linear layers' default)"
    note = "; ".join(filter(None, [note, upstream, cache.note]))
    return UnitObjective(
        objective, train_samples, eval_total or train_samples, unit.ops, note, cache_bytes, channel_errors,
    )


def _inner_channel_errors(
    unit: Unit, train: Optional[UnitData], weights: list[Tensor], float_weights: dict[str, Tensor],
    device: torch.device, reducer: Reducer,
) -> dict[str, ChannelError]:
    """Each block layer's output error per channel, from its input moments in one pass of the
    block over the training rows of every process."""
    moments = inner_layer_moments(unit, train, weights, device)
    count = torch.tensor([float(m.rows) for m in moments.values()], dtype=torch.float64, device=device)
    reducer.sum([m.xx for m in moments.values()] + [count], f"summing the layer moments of block {unit.name!r}")
    errors = {}
    for (name, layer_moments), rows in zip(moments.items(), count.tolist()):
        layer_moments.rows = int(rows)
        layer = unit.layer_module(name)
        errors[name] = MomentsObjective(Unit.of_layer(name, layer), layer_moments, float_weights[name], None, device).channel_errors
    return errors


def _agree_on_form(
    reducer: Reducer, unit: Unit, reached: bool, form: str, float_weights: dict[str, Tensor],
) -> Optional[str]:
    """The form every process uses (the first process that reached the unit chose it), or ``None``
    when no calibration batch of any process reached it; the float weights must agree too."""
    if reducer.world_size == 1:
        return form if reached else None
    sums = []
    for name in unit.layers:
        w = float_weights[name].detach().double().flatten()
        sums += [float(w.sum()), float((w * torch.arange(1, w.numel() + 1, dtype=torch.float64, device=w.device)).sum())]
    rows = reducer.exchange(
        [1.0 if reached else 0.0, float(_FORMS.index(form)), crc(sums)], f"starting {unit.kind} {unit.name!r}",
    )
    if len({r[2] for r in rows}) > 1:
        reducer.disagree(
            f"the float weights of {unit.kind} {unit.name!r} differ across ranks; every rank must hold the same model "
            "(DDP training keeps them equal; otherwise load the same checkpoint on every rank)."
        )
    reached_by = [r for r in rows if r[0]]
    return _FORMS[int(reached_by[0][1])] if reached_by else None


def target_input(rounded: Tensor, float_input: Tensor, correction: float) -> Tensor:
    """The input whose float output a unit is fitted to: ``correction`` of the way from its input in
    the rounded model to its input in the float model (``upstream_correction``). At 1 the unit
    makes up for the earlier layers' rounding error (the paper); at 0 it only fits its own."""
    if correction == 1.0 or float_input is rounded:
        return float_input
    if correction == 0.0:
        return rounded
    return torch.lerp(rounded, float_input, correction)


def _fix(unit: Unit) -> str:
    return "exclude this layer" if unit.is_layer else "round its layers with reconstruction='layer'"


@torch.no_grad()
def unit_targets(
    unit: Unit, weights: list[Tensor], x: Tensor, call: Optional[Call] = None, rows: Optional[Tensor] = None,
    chunk: int = 256,
) -> Tensor:
    """The unit's output with the float ``weights`` on ``x`` (rows ``rows`` of ``call``, whose other
    per-sample arguments are taken at those rows), in chunks, in the weights' dtype."""
    n = call[0][0].shape[0] if call is not None else 0
    pick = lambda value, idx: value[idx] if one_row_each(value, n) else value  # noqa: E731
    outs = []
    for start in range(0, x.shape[0], chunk):
        idx = rows[start:start + chunk] if rows is not None else None
        args = tuple(pick(a, idx) for a in call[0][1:]) if call is not None else ()
        kwargs = {k: pick(v, idx) for k, v in call[1].items()} if call is not None else {}
        outs.append(unit.run(weights, x[start:start + chunk], args, kwargs).detach())
    return torch.cat(outs, dim=0)


def _fisher(unit: Unit, fisher: Optional[Tensor], reducer: Reducer) -> Optional[Tensor]:
    """Fisher weights scaled to mean 1 (over every process's rows), so the regularizer keeps its
    balance against the MSE."""
    local = [float(fisher.double().sum()), float(fisher.numel())] if fisher is not None else [0.0, 0.0]
    rows = reducer.exchange(local, f"normalising the Fisher weights of block {unit.name!r}")
    if fisher is None:
        return None
    mean = sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1.0)
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(
            f"the task-loss gradient at the output of block {unit.name!r} is {'zero' if mean == 0 else mean} on "
            "the calibration data, so the Fisher weights are undefined; check task_loss (does it depend on the "
            "model output?) or use block_loss='mse'."
        )
    return fisher.div_(mean)


def _output_gradient(
    capture: InputCapture, block: Unit, rounded: dict[str, nn.Module], float_weight_of: dict[str, Tensor],
    task_loss: TaskLoss, index: int,
) -> Tensor:
    """d task_loss / d block output on batch ``index``, in the full-precision model (BRECQ's Fisher diagonal)."""
    leaves: list[Tensor] = []

    def detach_output(_module: nn.Module, _args: Any, output: Any) -> Any:
        leaf = block.output(output).detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf if isinstance(output, Tensor) else type(output)([leaf, *output[1:]])

    batch = capture.batches[index]
    handle = block.last.register_forward_hook(detach_output)
    try:
        with float_weights_in(rounded, {n: float_weight_of[n] for n in rounded}), torch.enable_grad():
            loss = task_loss(capture.forward_fn(capture.model, batch), batch)
            if not (isinstance(loss, Tensor) and loss.dim() == 0):
                raise TypeError(
                    f"task_loss(output, batch) must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
                )
            loss.backward()
    finally:
        handle.remove()
    grad = leaves[0].grad if leaves else None
    if grad is None:
        raise ValueError(
            f"task_loss does not depend on the output of block {block.name!r}, so it gives no Fisher weights; "
            "check task_loss or use block_loss='mse'."
        )
    return grad.detach()
