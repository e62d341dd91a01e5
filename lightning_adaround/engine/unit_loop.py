"""The unit loop: each unit's objective, grids, optimisation, write-back and result, in order.

A unit is a layer, or a block whose layers are rounded together (``data/unit.py``); both go through
the same builder (``reconstruct.py``), objective and optimiser loop, and each sees the units
before it already rounded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.io.checkpoint import Restored, RoundingCheckpoint
from lightning_adaround.config import DEFAULT_LOG_EVERY_N_STEPS, AdaRoundConfig
from lightning_adaround.model.layers import (
    OutputOps, bits_for, following_ops, output_major, per_channel_to_weight_layout, weight_channel_axis,
)
from lightning_adaround.grid.loss import BetaSchedule
from lightning_adaround.observer import AdaRoundObserver, RoundingStopped
from lightning_adaround.engine.optimize import optimize_rounding
from lightning_adaround.grid.quant import ChannelError, PerChannel, PerGroup, PerTensor, QuantGrid, choose_grid
from lightning_adaround.engine.reconstruct import RunData, build_objective
from lightning_adaround.result import AdaRoundResult, LayerResult, compact_integer
from lightning_adaround.grid.rounding import RoundingVariable
from lightning_adaround.data.unit import Unit

Activation = Callable[[Tensor], Tensor]


def round_units(
    model: nn.Module,
    modules: dict[str, nn.Module],
    order: list[str],
    data: RunData,
    float_weights: dict[str, Tensor],
    activations: dict[str, Optional[Activation]],
    observer: AdaRoundObserver,
    checkpoint: Optional[RoundingCheckpoint] = None,
    blocks: Sequence[Unit] = (),
) -> AdaRoundResult:
    """Round ``order``'s layers unit by unit; each sees the earlier ones already rounded.

    A unit is a layer, or a block whose layers are rounded together when the forward pass
    reaches its first layer; both go through the same builder, objective and loop.
    Each unit holds out its own samples (drawn from ``seed`` and its position); one generator,
    seeded once, draws every unit's minibatches in turn. A checkpoint stores its state after
    each layer, so a resumed run continues the same sequence; with several processes rank 0
    writes it and every process reads it.
    """
    config, reducer, device, generator = data.config, data.reducer, data.device, data.generator
    writes = checkpoint is not None and reducer.is_main
    result = AdaRoundResult()
    rounded: dict[str, nn.Module] = {}
    block_of = {layer: block for block in blocks for layer in block.layers}
    units: list[Unit] = []
    for name in order:
        block = block_of.get(name)
        if block is None:
            units.append(Unit.of_layer(name, modules[name], _loss_ops(model, name, activations, config)))
        elif block.layers[0] == name:
            units.append(block)
    observer.on_start([u.name for u in units])
    resuming = checkpoint is not None
    for index, unit in enumerate(units):
        names, label, kind = unit.layers, unit.name, unit.kind
        if observer.should_stop():
            raise RoundingStopped(f"stopped on request before {kind} {label!r}")
        positions = [order.index(n) for n in names]
        if resuming:
            assert checkpoint is not None
            restored = _restore(checkpoint, positions, names)
            resuming = restored is not None
            if restored is not None:
                for name, saved in zip(names, restored):
                    if saved.result is None:
                        result.unreached.append(name)
                        continue
                    _write_back(modules[name], saved.result.dequantized_weight().to(device))
                    generator.set_state(saved.generator_state)
                    rounded[name] = modules[name]
                    result.layers[name] = saved.result
                    result.restored.append(name)
                    observer.on_layer_restored(saved.result)
                continue
        started = time.perf_counter()
        # iterations=None: by the unit's layers (fewer for Linear layers only), like upstream_correction
        steps = config.iterations_for([modules[n] for n in names])
        learning_rate = config.learning_rate_for(steps)
        schedule = BetaSchedule(steps, config.warm_start, config.beta_start, config.beta_end)
        held_out = data.layout.unit_held_out(config.holdout_fraction, config.seed, positions[0])
        prepared = build_objective(data, unit, rounded, float_weights, held_out)
        if prepared is None:
            result.unreached.extend(names)
            for position, name in zip(positions, names):
                if writes:
                    checkpoint.save_unreached(position, name)
            continue
        capture_seconds = time.perf_counter() - started
        objective = prepared.objective
        weights = [float_weights[n].float() for n in names]
        channel_errors = prepared.channel_errors  # per layer, where known
        candidates = _grid_candidates(names, modules, weights, config, objective, channel_errors)
        for _, _, nearest_mse in candidates:
            if not math.isfinite(nearest_mse):
                raise ValueError(
                    f"the reconstruction error of {kind} {label!r} is not finite ({nearest_mse}) even with "
                    "round-to-nearest weights: its weights or inputs are too large for float32 arithmetic. "
                    f"Check the model and the calibration data, or leave the layer in float with exclude={names!r}."
                )
        observer.on_layer_start(label, index, steps)
        # rows split over processes: their gradients are averaged at each step, from the moment a
        # process may fail on the way there (it then meets the others in that average)
        sync = objective.sharded or (reducer.world_size > 1 and reducer.sync_every_step)
        reducer.where = f"optimising {kind} {label!r}"
        tried = []
        # the averaged gradient: V's, and each learned scale's (a log-multiplier per scale entry)
        learned = sum(g.scale.numel() for g in candidates[0][1]) if config.learn_scale else 0
        for choice, grids, nearest_mse in candidates:
            history: list[tuple[int, float, float, float]] = []
            live = observer if len(candidates) == 1 else None  # else the curves of the rounding kept, after
            on_log = _step_logger(history, kind, label, live)
            numel = sum(w.numel() for w in weights) + learned
            with reducer.stepping(numel, steps, f"{kind} {label!r}") if sync else nullcontext():
                roundings = [RoundingVariable(w, g, learn_scale=config.learn_scale) for w, g in zip(weights, grids)]
                optimize_rounding(
                    roundings, objective, steps, learning_rate, config.reg_lambda, schedule,
                    average_gradients=reducer.average_gradients if sync else None, on_log=on_log,
                    log_every_n_steps=_log_interval(config), should_stop=observer.should_stop,
                    scale_lr=config.scale_lr,
                )
            refit = 0
            if config.learn_scale and unit.is_layer and unit.name in channel_errors:  # exact for the final integers
                refit = roundings[0].refit_scale(channel_errors[unit.name])
            kept = _keep_nearest_where_better(names, channel_errors, roundings, weights, objective)
            hards = [r.hard_weight() for r in roundings]
            learned_note = _learned_scale_note(roundings, grids) + (f", refit on {refit}" if refit else "") if config.learn_scale else ""
            tried.append((objective.mse(hards), choice, grids, nearest_mse, roundings, kept, hards, history, learned_note))
        adaround_mse, choice, grids, nearest_mse, roundings, kept, hards, history, learned_note = min(tried, key=lambda t: t[0])
        for step, recon, reg, beta in history if len(candidates) > 1 else ():
            observer.on_step(label, step, {"recon_loss": recon, "reg_loss": reg, "beta": beta})
        notes = [prepared.note]
        if len(tried) > 1:
            other = next(t for t in tried if t[1] != choice)
            notes.append(f"'{choice}' scales (held-out {adaround_mse:.3g} vs {other[0]:.3g} with '{other[1]}')")
        if config.scale_method == "output" and not channel_errors:
            notes.append(f"'mse' scales ({objective.form} form has no per-channel output error)")
        notes.append(f"nearest kept on {kept[0]}/{kept[1]} channels" if kept[0] else "")
        if config.learn_scale:
            notes.append(learned_note)
            grids = [r.grid for r in roundings]  # the learned scales: the result's grid is the one rounded on
        note = "; ".join(filter(None, notes))
        for name, hard in zip(names, hards):
            _write_back(modules[name], hard)
            rounded[name] = modules[name]
        seconds = time.perf_counter() - started
        finished = [
            LayerResult(
                name=name, bits=grid.bits, scale=grid.scale.cpu(), zero_point=grid.zero_point.cpu(),
                qmin=grid.qmin, qmax=grid.qmax, axis=grid.axis,
                integer_weight=compact_integer(rounding.integer_weight(), grid.qmin, grid.qmax),
                nearest_mse=nearest_mse, adaround_mse=adaround_mse,
                iterations=steps, seconds=seconds / len(names),
                num_samples=prepared.num_samples, eval_samples=prepared.eval_samples,
                loss_form=objective.form,
                with_activation=prepared.ops is not None and prepared.ops.activation is not None,
                note=note, history=history, capture_seconds=capture_seconds / len(names),
                cache_bytes=prepared.cache_bytes if name == names[0] else 0,
                float_weight=float_weights[name].detach().cpu().clone() if config.keep_float_weights else None,
                block="" if unit.is_layer else label,
            )
            for name, grid, rounding in zip(names, grids, roundings)
        ]
        if reducer.world_size > 1:
            reducer.check_same(
                _checksum(finished), f"the integer weights and grids of {kind} {label!r}",
                "the ranks' models or calibration layout differ, or the ranks compute differently (mixed hardware "
                "or thread counts: try distributed_adaround(..., sync_every_step=True)).",
            )
        for position, layer_result in zip(positions, finished):
            result.layers[layer_result.name] = layer_result
            if writes:  # before the observer: a failing hook cannot lose a finished layer
                checkpoint.save_layer(position, layer_result, generator.get_state())
        if unit.is_layer:
            observer.on_layer_end(finished[0])
        else:
            observer.on_block_end(label, finished)
        del prepared, objective, roundings  # free this layer's cache before the next one is built
    return result


def _grid_candidates(
    names: list[str], modules: dict[str, nn.Module], weights: list[Tensor], config: AdaRoundConfig,
    objective: Any, channel_errors: dict[str, ChannelError],
) -> list[tuple[str, list[QuantGrid], float]]:
    """``(scale method, each layer's grid, the unit's round-to-nearest error on them)`` to round on.

    One, but two for ``scale_method="auto"`` when some layer's output error per channel is known:
    the weight-error (``"mse"``) and the output-error (``"output"``) scales, both rounded, and the
    unit keeps whichever ends with the lower held-out error (which of the two gives the better
    round-to-nearest error does not tell which AdaRound will do better on).
    """
    method = config.scale_method
    choices = [method]
    if method == "auto":
        applies = any(_output_applies(modules[n], w, config) for n, w in zip(names, weights) if n in channel_errors)
        choices = ["mse", "output"] if applies else ["mse"]
    candidates = []
    for choice in choices:
        grids = [layer_grid(n, modules[n], w, config, channel_errors.get(n), choice) for n, w in zip(names, weights)]
        candidates.append((choice, grids, objective.mse([g.fake_quantize(w) for g, w in zip(grids, weights)])))
    return candidates


def _step_logger(
    history: list[tuple[int, float, float, float]], kind: str, label: str, observer: Optional[AdaRoundObserver],
) -> Callable[[int, dict[str, float]], None]:
    """Collect the step metrics into ``history`` (and pass them to ``observer``); a non-finite loss
    is an error at once."""

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics["recon_loss"]):
            raise ValueError(
                f"the reconstruction loss of {kind} {label!r} became {metrics['recon_loss']} at step {step}: "
                "its weights or inputs are too large for float32 arithmetic. Check the model and the "
                f"calibration data, or leave the layer in float with exclude=[{label!r}]."
            )
        history.append((step, metrics["recon_loss"], metrics["reg_loss"], metrics["beta"]))
        if observer is not None:
            observer.on_step(label, step, metrics)

    return on_log


def _output_applies(layer: nn.Module, weight: Tensor, config: AdaRoundConfig) -> bool:
    """Whether output-error scales can be searched for ``layer`` (one error per output channel)."""
    granularity = config.granularity
    if isinstance(granularity, PerGroup) or getattr(layer, "transposed", False):
        return False
    return isinstance(granularity, PerTensor) or granularity.axis is None or granularity.axis % weight.dim() == 0


def _keep_nearest_where_better(
    names: list[str], channel_errors: dict[str, ChannelError], roundings: list[RoundingVariable],
    weights: list[Tensor], objective: Any,
) -> tuple[int, int]:
    """Round to nearest the output channels whose error AdaRound did not beat; ``(how many, of)``.

    A layer alone: exact per channel in the moments form (channels do not interact in a layer's
    output), so the result is never worse than round-to-nearest on the training rows, however few
    iterations ran. A block's layers are judged each on its own output, and the swap is kept only
    if the block's error on its training rows does not grow (a block's layers may trade errors).
    With a learned scale, "nearest" is on the searched grid where a channel has scales of its own
    (they are reset), on the learned grid per tensor (:meth:`RoundingVariable.use_nearest`).
    """
    kept, channels, undo = 0, 0, []
    for name, rounding, weight in zip(names, roundings, weights):
        channel_error = channel_errors.get(name)
        if channel_error is None:
            continue
        channels += weight.shape[0]
        nearest_better = channel_error(rounding.nearest_weight(weight), exact=True) < channel_error(rounding.hard_weight(), exact=True)
        if bool(nearest_better.any()):
            undo.append((rounding, rounding.state()))
            rounding.use_nearest(weight, nearest_better)
            kept += int(nearest_better.sum())
    if undo and len(roundings) > 1:
        swapped = [rounding.state() for rounding, _ in undo]
        swapped_error = objective.fit_error([r.hard_weight() for r in roundings])
        for rounding, state in undo:
            rounding.load_state(state)
        if swapped_error <= objective.fit_error([r.hard_weight() for r in roundings]):
            for (rounding, _), state in zip(undo, swapped):
                rounding.load_state(state)
        else:
            kept = 0
    return kept, channels


def _learned_scale_note(roundings: Sequence[RoundingVariable], searched: Sequence[QuantGrid]) -> str:
    """How far the learned scales moved from the searched ones, for the summary."""
    ratios = torch.cat([
        (r.grid.scale.cpu() / g.scale.cpu()).flatten() for r, g in zip(roundings, searched)
    ])
    return f"learned scale x{float(ratios.min()):.3f}-{float(ratios.max()):.3f} of searched"


def _checksum(finished: list[LayerResult]) -> list[float]:
    """A few numbers that differ when two processes' integer weights or grids differ."""
    totals = [0.0] * 5
    for layer in finished:
        q = layer.integer_weight.to(torch.int64).flatten()
        scale = layer.scale.double().flatten()
        totals[0] += float(q.sum())
        totals[1] += float((q * (torch.arange(q.numel(), dtype=torch.int64) % 8191 + 1)).sum())
        totals[2] += float(scale.sum())
        totals[3] += float((scale * torch.arange(1, scale.numel() + 1, dtype=torch.float64)).sum())
        totals[4] += float(layer.zero_point.double().sum())
    return totals


def _restore(checkpoint: RoundingCheckpoint, positions: list[int], names: list[str]) -> Optional[list[Restored]]:
    """Every layer of a unit as saved, or ``None``: a block is redone unless all its layers were saved."""
    restored = []
    for position, name in zip(positions, names):
        saved = checkpoint.restore(position, name)
        if saved is None:
            return None
        restored.append(saved)
    return restored


@torch.no_grad()
def _write_back(layer: nn.Module, hard: Tensor) -> None:
    layer.weight.copy_(hard.to(layer.weight.dtype))


def _loss_ops(
    model: nn.Module, name: str, activations: dict[str, Optional[Activation]], config: AdaRoundConfig,
) -> Optional[OutputOps]:
    """What follows the layer in its loss: the user's explicit choice, else what is detected."""
    if name in activations:
        fn = activations[name]
        return OutputOps(activation=fn) if fn is not None else None
    return following_ops(model, name) if config.include_activation else None


def layer_grid(
    name: str, layer: nn.Module, weight: Tensor, config: AdaRoundConfig, channel_error: Optional[ChannelError] = None,
    method: Optional[str] = None,
) -> QuantGrid:
    """The grid ``config`` asks for this layer: its bits override, granularity and scale method.

    Per-channel scales are searched with output channels first, then laid out to broadcast
    against the weight (this matters for grouped transposed convolutions). ``scale_method="output"``
    judges candidates by ``channel_error`` (the layer objective's output error per channel); where
    there is none (a block's layers, a transposed convolution, a per-channel axis other than the
    output channels) the weight-error search stands in. ``method`` overrides the config's;
    ``"auto"`` here (no data to judge by) is ``"mse"``.
    """
    bits = bits_for(name, config.bits, dict(config.layer_bits))
    granularity = config.granularity
    method = method or config.scale_method
    if method == "auto" or (method == "output" and (channel_error is None or not _output_applies(layer, weight, config))):
        method = "mse"
    if not (isinstance(granularity, PerChannel) and granularity.axis is None):
        return choose_grid(weight, bits, config.symmetric, granularity, method, channel_error=channel_error)
    grid = choose_grid(
        output_major(layer, weight), bits, config.symmetric, granularity, method, channel_axis=0,
        channel_error=channel_error,
    )
    return dataclasses.replace(
        grid,
        scale=per_channel_to_weight_layout(layer, grid.scale, weight),
        zero_point=per_channel_to_weight_layout(layer, grid.zero_point, weight),
        axis=weight_channel_axis(layer),
    )


def _log_interval(config: AdaRoundConfig) -> int:
    """``config.log_every_n_steps``; ``None`` (the callback's "the Trainer's") is 50 here."""
    return DEFAULT_LOG_EVERY_N_STEPS if config.log_every_n_steps is None else config.log_every_n_steps
