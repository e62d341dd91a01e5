"""The run: prepare the model, capture each unit's data, optimise its rounding, write it back.

Plain PyTorch; :func:`round_model` is what ``adaround`` and ``distributed_adaround`` call, the
second with a reducer that meets the other processes at the points ``reducer.py`` names. Data
flows one way: (BatchNorm folding, equalization) -> calibration batches -> capture -> unit
objective -> optimise -> hard-rounded weights written back -> (bias correction) -> result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.bias_correction import correct_biases
from lightning_adaround.blocks import find_blocks
from lightning_adaround.cache import CachePlan
from lightning_adaround.calibration import SampleLayout, map_tensors, tensors_in
from lightning_adaround.capture import FirstPass, ForwardFn, InputCapture, default_forward, first_pass
from lightning_adaround.chain import find_block_chains
from lightning_adaround.checkpoint import PathLike, Restored, RoundingCheckpoint, run_fingerprint
from lightning_adaround.checks import (
    account_for_float, check_weights, forward_failure, matching_nothing, selected_layers, warn_float_matrices,
    warn_nothing_held_out, warn_unmatched_excludes,
)
from lightning_adaround.config import DEFAULT_LOG_EVERY_N_STEPS, AdaRoundConfig
from lightning_adaround.layers import (
    OutputOps, bits_for, following_ops, output_major, per_channel_to_weight_layout, weight_channel_axis,
)
from lightning_adaround.loss import BetaSchedule
from lightning_adaround.observer import AdaRoundObserver, RoundingStopped
from lightning_adaround.optimize import optimize_rounding
from lightning_adaround.prepare import ModelSnapshot, prepare_model
from lightning_adaround.quant import ChannelError, PerChannel, PerTensor, QuantGrid, choose_grid
from lightning_adaround.reconstruct import RunData, TaskLoss, build_objective
from lightning_adaround.reducer import Reducer
from lightning_adaround.result import AdaRoundResult, LayerResult, compact_integer
from lightning_adaround.rounding import RoundingVariable
from lightning_adaround.unit import Unit

Activation = Callable[[Tensor], Tensor]
MoveBatch = Callable[[Any, torch.device], Any]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere inside tuples, lists and mappings go to ``device``; the rest is untouched."""
    return map_tensors(batch, lambda t: t.to(device))


@dataclass(frozen=True)
class RunOptions:
    """``adaround``'s keyword arguments (documented there), as the engine takes them."""

    forward_fn: Optional[ForwardFn] = None
    device: Optional[torch.device | str] = None
    activations: Optional[dict[str, Optional[Activation]]] = None
    observer: Optional[AdaRoundObserver] = None
    move_batch: MoveBatch = move_to_device
    checkpoint_dir: Optional[PathLike] = None
    task_loss: Optional[TaskLoss] = None


def round_model(
    model: nn.Module, batches: list[Any], config: AdaRoundConfig, options: RunOptions,
    reducer: Optional[Reducer] = None, layout: Optional[SampleLayout] = None,
) -> AdaRoundResult:
    """``adaround``'s work (see its docstring); ``reducer``/``layout``: this process's part of a
    data-parallel run (default: a single process holding every batch)."""
    forward_fn, device, activations = options.forward_fn, options.device, options.activations
    observer, move_batch, task_loss = options.observer, options.move_batch, options.task_loss
    forward_fn = forward_fn if forward_fn is not None else default_forward
    observer = observer if observer is not None else AdaRoundObserver()
    reducer = reducer if reducer is not None else Reducer()
    layers = selected_layers(model, config)
    check_weights(layers)
    names = [n for n, _ in layers]
    unused = matching_nothing(config.layer_bits, names)
    if unused:
        warnings.warn(
            f"layer_bits patterns {unused} match none of the layers being rounded ({names[:8]}"
            f"{'...' if len(names) > 8 else ''}); check the names with model.named_modules().",
            stacklevel=3,
        )
    warn_unmatched_excludes(model, config)
    explicit = sorted(n for n, fn in (activations or {}).items() if fn is not None)
    if config.loss_form == "moments" and explicit:
        raise ValueError(
            f"loss_form='moments' cannot include an activation in the loss, but activations= gives one "
            f"for {explicit}; use loss_form='minibatch' (or 'auto') or drop those activations."
        )
    if config.block_loss == "fisher" and task_loss is None:
        raise ValueError(
            "block_loss='fisher' weights the block output by the gradient of the task loss: pass "
            "task_loss=lambda output, batch: loss(output, batch[1]) (or use block_loss='mse')."
        )
    if not batches and reducer.world_size == 1:
        raise ValueError(
            "the calibration data is empty; pass an iterable with at least one batch "
            "(AdaRound needs a few hundred to a thousand samples)."
        )
    layout = layout if layout is not None else SampleLayout.of(batches)
    warn_nothing_held_out(layout.total, config.holdout_fraction)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device) if device is not None else home
    # Lightning's validate runs hooks under inference_mode: tensors made there cannot be
    # saved for backward, so everything below (ChannelClip bounds included) is created outside it.
    with torch.inference_mode(False), torch.enable_grad():
        snapshot = ModelSnapshot(model, config.layer_types)
        try:
            checkpoint = None
            if options.checkpoint_dir is not None:
                checkpoint = _open_checkpoint(
                    options.checkpoint_dir, model, layers, batches, config, activations, reducer,
                )
            prepared = prepare_model(model, config)
            float_weights = {
                name: (module.weight.detach().clone() if prepared.changed else snapshot.saved(module, "weight"))
                for name, module in layers
            }
            for param in model.parameters():  # gradients for V only: the model's .grad stay untouched
                param.requires_grad_(False)
            model.to(device).eval()
            cache_device = _staging_device(batches, device, config)
            # move_batch (Lightning: the module's transfer hooks) runs once per batch; every later
            # move between the cache and the device is a plain tensor move
            staged = [move_to_device(_clone_inference_tensors(move_batch(b, device)), cache_device) for b in batches]
            run = (lambda m, b: forward_fn(m, move_to_device(b, device))) if cache_device != device else forward_fn
            seen = _first_pass(model, layers, staged[0], run) if staged else FirstPass([n for n, _ in layers], {}, set())
            chains = find_block_chains(model, seen.order, staged[0], run) if config.carry_activations and staged else []
            capture = InputCapture(model, staged, run, chains, device, cache_device, seen.calls)
            blocks = _blocks(model, config, seen.order, staged[0], run) if staged else []
            generator = torch.Generator().manual_seed(config.seed)
            loss_on_device = None  # the task loss is only used for the Fisher weights
            if config.block_loss == "fisher" and task_loss is not None:
                loss_on_device = lambda out, b: task_loss(out, move_to_device(b, device))  # noqa: E731
            data = RunData(
                capture, config, generator, device, cache_device, layout,
                layout.held_out(config.holdout_fraction, generator), reducer, loss_on_device,
            )
            report = observer if reducer.is_main else _StopOnly(observer)
            result = _round_units(
                model, dict(layers), seen.order, data,
                {n: w.to(device) for n, w in float_weights.items()}, activations or {}, report, checkpoint, blocks,
            )
            if config.bias_correction:  # fresh captures: inputs change as earlier biases are corrected
                fresh = lambda: InputCapture(model, staged, run, chains, device, cache_device, seen.calls)  # noqa: E731
                correct_biases(model, result, fresh, float_weights, device, reducer)
            result.folded, result.equalized = prepared.folded, prepared.equalized
            if staged:
                result.float_modules = account_for_float(model, result, config, seen, staged[0], run)
        except BaseException as error:
            snapshot.restore(error)  # the model exactly as given; never raises over ``error``
            raise
        snapshot.restore_settings()
    if reducer.is_main:
        warn_float_matrices(result.float_modules)
    report.on_end(result)
    return result


class _StopOnly(AdaRoundObserver):
    """Another process's view of the observer: its stop request counts; rank 0 reports."""

    def __init__(self, observer: AdaRoundObserver) -> None:
        self._observer = observer

    def should_stop(self) -> bool:
        return self._observer.should_stop()


def _open_checkpoint(
    checkpoint_dir: PathLike, model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Any],
    config: AdaRoundConfig, activations: Optional[dict[str, Optional[Activation]]], reducer: Reducer,
) -> RoundingCheckpoint:
    """The run's checkpoint folder; with several processes every one reads it, rank 0 writes it,
    and the data part of the fingerprint covers every process's batches."""
    fingerprint = run_fingerprint(model, layers, batches, config, activations or {})
    if reducer.world_size > 1:
        hashes = reducer.gather_text(fingerprint["data"], "fingerprinting the calibration data")
        fingerprint["data"] = hashlib.sha256(" ".join(hashes).encode()).hexdigest()
    return RoundingCheckpoint.open(checkpoint_dir, fingerprint)


def _staging_device(batches: list[Any], device: torch.device, config: AdaRoundConfig) -> torch.device:
    """The calibration batches, like every cache, stay on the device when they fit ``device_cache_bytes``."""
    nbytes = sum(t.numel() * t.element_size() for b in batches for t in tensors_in(b))
    plan = CachePlan(device, config.device_cache_bytes, config.host_cache_bytes)
    return device if plan.tier_for(nbytes) == "device" else torch.device("cpu")


def _clone_inference_tensors(batch: Any) -> Any:
    """Batches made under ``torch.inference_mode`` cannot feed autograd; copy those out."""
    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def _first_pass(
    model: nn.Module, layers: list[tuple[str, nn.Module]], batch: Any, forward_fn: ForwardFn
) -> FirstPass:
    """Execution order and call counts from one forward pass; layers it misses go last (maybe unreached)."""
    try:
        seen = first_pass(model, layers, batch, forward_fn)
    except Exception as err:
        raise forward_failure(err) from err
    seen.order += [name for name, _ in layers if name not in seen.order]
    return seen


def _blocks(model: nn.Module, config: AdaRoundConfig, order: list[str], batch: Any, run: ForwardFn) -> list[Unit]:
    if config.reconstruction != "block":
        return []
    blocks = find_blocks(model, config.blocks, order, batch, run)
    if not blocks:
        warnings.warn(
            f"reconstruction='block' found no block holding two or more of the layers of {type(model).__name__}, "
            "so every layer is rounded alone; name blocks with blocks=['name', 'sequential[i:j]'].",
            stacklevel=4,
        )
    return blocks


def _round_units(
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
    One generator, seeded once, draws the held-out samples and then every unit's minibatches in
    turn. A checkpoint stores its state after each layer, so a resumed run continues the same
    sequence; with several processes rank 0 writes it and every process reads it.
    """
    config, reducer, device, generator = data.config, data.reducer, data.device, data.generator
    writes = checkpoint is not None and reducer.is_main
    result = AdaRoundResult()
    schedule = BetaSchedule(config.iterations, config.warm_start, config.beta_start, config.beta_end)
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
        prepared = build_objective(data, unit, rounded, float_weights)
        if prepared is None:
            result.unreached.extend(names)
            for position, name in zip(positions, names):
                if writes:
                    checkpoint.save_unreached(position, name)
            continue
        capture_seconds = time.perf_counter() - started
        objective = prepared.objective
        weights = [float_weights[n].float() for n in names]
        # a block's objective has no single layer's output error: its layers' scales minimise weight error
        channel_error = getattr(objective, "channel_errors", None) if unit.is_layer else None
        grids = [layer_grid(n, modules[n], w, config, channel_error) for n, w in zip(names, weights)]
        nearest_mse = objective.mse([g.fake_quantize(w) for g, w in zip(grids, weights)])
        if not math.isfinite(nearest_mse):
            raise ValueError(
                f"the reconstruction error of {kind} {label!r} is not finite ({nearest_mse}) even with "
                "round-to-nearest weights: its weights or inputs are too large for float32 arithmetic. "
                f"Check the model and the calibration data, or leave the layer in float with exclude={names!r}."
            )
        history: list[tuple[int, float, float, float]] = []

        def on_log(step: int, metrics: dict[str, float], label: str = label, kind: str = kind) -> None:
            if not math.isfinite(metrics["recon_loss"]):
                raise ValueError(
                    f"the reconstruction loss of {kind} {label!r} became {metrics['recon_loss']} at step {step}: "
                    "its weights or inputs are too large for float32 arithmetic. Check the model and the "
                    f"calibration data, or leave the layer in float with exclude=[{label!r}]."
                )
            history.append((step, metrics["recon_loss"], metrics["reg_loss"], metrics["beta"]))
            observer.on_step(label, step, metrics)

        # rows split over processes: their gradients are averaged at each step, from the moment a
        # process may fail on the way there (it then meets the others in that average)
        sync = objective.sharded or (reducer.world_size > 1 and reducer.sync_every_step)
        reducer.where = f"optimising {kind} {label!r}"
        with reducer.stepping(sum(w.numel() for w in weights), config.iterations, f"{kind} {label!r}") if sync else nullcontext():
            observer.on_layer_start(label, index, config.iterations)
            roundings = [RoundingVariable(w, g) for w, g in zip(weights, grids)]
            optimize_rounding(
                roundings, objective, config.iterations, config.lr, config.reg_lambda, schedule,
                average_gradients=reducer.average_gradients if sync else None, on_log=on_log,
                log_every_n_steps=_log_interval(config), should_stop=observer.should_stop,
            )
        notes = [prepared.note]
        if config.scale_method == "output" and channel_error is None:
            notes.append(f"'mse' scales ({objective.form} form has no per-channel output error)")
        if channel_error is not None:
            kept = _keep_nearest_where_better(channel_error, roundings[0], weights[0], grids[0])
            notes.append(f"nearest kept on {kept}/{weights[0].shape[0]} channels" if kept else "")
        note = "; ".join(filter(None, notes))
        hards = [r.hard_weight() for r in roundings]
        for name, hard in zip(names, hards):
            _write_back(modules[name], hard)
            rounded[name] = modules[name]
        adaround_mse = objective.mse(hards)
        seconds = time.perf_counter() - started
        finished = [
            LayerResult(
                name=name, bits=grid.bits, scale=grid.scale.cpu(), zero_point=grid.zero_point.cpu(),
                qmin=grid.qmin, qmax=grid.qmax, axis=grid.axis,
                integer_weight=compact_integer(rounding.integer_weight(), grid.qmin, grid.qmax),
                nearest_mse=nearest_mse, adaround_mse=adaround_mse,
                iterations=config.iterations, seconds=seconds / len(names),
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


def _keep_nearest_where_better(
    channel_error: Callable[..., Tensor], rounding: RoundingVariable, weight: Tensor, grid: QuantGrid,
) -> int:
    """Round to nearest the output channels whose training error AdaRound did not beat; how many.

    Exact per channel in the moments form (channels do not interact in a layer's output), so the
    result is never worse than round-to-nearest on the training rows, however few iterations ran.
    """
    nearest_better = channel_error(grid.fake_quantize(weight), exact=True) < channel_error(rounding.hard_weight(), exact=True)
    if bool(nearest_better.any()):
        rounding.use_nearest(weight, nearest_better)
    return int(nearest_better.sum())


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
) -> QuantGrid:
    """The grid ``config`` asks for this layer: its bits override, granularity and scale method.

    Per-channel scales are searched with output channels first, then laid out to broadcast
    against the weight (this matters for grouped transposed convolutions). ``scale_method="output"``
    judges candidates by ``channel_error`` (the layer objective's output error per channel); where
    there is none (a block's layers, a transposed convolution, a per-channel axis other than the
    output channels) the weight-error search stands in.
    """
    bits = bits_for(name, config.bits, dict(config.layer_bits))
    granularity = config.granularity
    method = config.scale_method
    output_layout = isinstance(granularity, PerTensor) or granularity.axis is None or granularity.axis % weight.dim() == 0
    if method == "output" and (channel_error is None or getattr(layer, "transposed", False) or not output_layout):
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
