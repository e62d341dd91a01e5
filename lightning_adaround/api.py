"""``adaround(model, batches, config)``: round a model's weights in place, layer by layer.

Plain PyTorch. Data flows one way: (BatchNorm folding, cross-layer equalization) ->
calibration batches -> capture -> objective -> optimise -> hard-rounded weight written back ->
(bias correction) -> result. Any failure, in any of these steps, leaves the model as it was given
(weights, BatchNorm statistics, the ReLU6 modules equalization replaces, training modes,
``requires_grad``) and raises the original error; with ``checkpoint_dir`` the finished layers are
kept on disk and a second call resumes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.bias_correction import SumReduce, correct_biases
from lightning_adaround.cache import CachePlan
from lightning_adaround.calibration import batch_size_of, map_tensors, tensors_in
from lightning_adaround.capture import FirstPass, ForwardFn, InputCapture, default_forward, first_pass, parameters_read
from lightning_adaround.blocks import find_blocks
from lightning_adaround.chain import find_block_chains
from lightning_adaround.checkpoint import PathLike, Restored, RoundingCheckpoint, run_fingerprint
from lightning_adaround.config import DEFAULT_LOG_EVERY_N_STEPS, AdaRoundConfig
from lightning_adaround.fold import computed_weight_fix
from lightning_adaround.layers import (
    SUPPORTED_LAYER_TYPES, OutputOps, bits_for, float_modules, following_ops, output_major,
    per_channel_to_weight_layout, select_layers, weight_channel_axis,
)
from lightning_adaround.loss import BetaSchedule
from lightning_adaround.observer import AdaRoundObserver, RoundingStopped
from lightning_adaround.optimize import GradReduce, optimize_rounding
from lightning_adaround.prepare import ModelSnapshot, prepare_model
from lightning_adaround.reconstruct import TaskLoss, build_objective
from lightning_adaround.quant import ChannelError, PerChannel, PerTensor, QuantGrid, choose_grid, weight_problem
from lightning_adaround.result import EXCLUDED, NORM_OR_BIAS, AdaRoundResult, FloatModule, LayerResult, compact_integer
from lightning_adaround.unit import Unit
from lightning_adaround.rounding import RoundingVariable

Activation = Callable[[Tensor], Tensor]
MoveBatch = Callable[[Any, torch.device], Any]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere inside tuples, lists and mappings go to ``device``; the rest is untouched."""
    return map_tensors(batch, lambda t: t.to(device))


def adaround(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    config: Optional[AdaRoundConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    device: Optional[torch.device | str] = None,
    activations: Optional[dict[str, Optional[Activation]]] = None,
    observer: Optional[AdaRoundObserver] = None,
    grad_reduce: Optional[GradReduce] = None,
    move_batch: MoveBatch = move_to_device,
    objective_builder: Optional[Callable[..., Any]] = None,
    checkpoint_dir: Optional[PathLike] = None,
    task_loss: Optional[TaskLoss] = None,
    statistics_reduce: Optional[SumReduce] = None,
) -> AdaRoundResult:
    """Round ``model``'s weights in place with AdaRound and return what was done per layer.

    First, as ``config`` asks, BatchNorms are folded into the layers that feed them
    (``fold_batchnorm``, on by default) and consecutive layers are equalized (``equalize``, on by
    default for per-tensor grids); ``result.folded`` and ``result.equalized`` list the pairs. On any
    failure (an exception, Ctrl-C) the model is left exactly as given and the original error is
    raised.

    Args:
        model: Any ``nn.Module``; its supported layers (Linear, Conv1-3d, ConvTranspose1-3d)
            selected by ``config`` are rounded in the order the forward pass reaches them.
        calibration_batches: An iterable of batches (read once, kept for the run).
        config: How to round; ``AdaRoundConfig()`` by default.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch; by default a
            tensor is the input, a tuple/list's first element is, a dict is keyword arguments.
        device: Where to compute (default: where the model's parameters are). The model
            returns to its own device afterwards.
        activations: Layer name -> callable applied to the layer's output inside the loss
            (``None`` turns the automatic BatchNorm/activation detection off for that layer).
        observer: Receives progress, per-step losses and per-layer results.
        grad_reduce: Called with ``[V.grad]`` after each backward (e.g. a DDP all-reduce).
        move_batch: ``move_batch(batch, device)`` moves one batch to the device; called exactly once
            per calibration batch (Lightning's transfer hooks run once), later moves between a host
            cache and the device are plain tensor moves.
        objective_builder: Replaces ``reconstruct.build_objective`` (same arguments); used by
            ``distributed.distributed_adaround`` for sharded data.
        checkpoint_dir: A folder where each finished layer is saved as soon as it is done. Calling
            again with the same arguments after an interruption (an exception, Ctrl-C, a killed
            process) skips the finished layers and gives the same integer weights as an
            uninterrupted run; a folder from other settings, model or data is refused.
        task_loss: ``task_loss(output, batch) -> scalar``, the training loss of one batch (its
            labels moved to the device), for ``block_loss="fisher"``.
        statistics_reduce: Sums the bias-correction statistics over processes (passed by
            ``distributed.distributed_adaround``).

    Raises:
        ValueError: empty calibration data, no supported layer selected, a weight computed by a
            parametrization (``weight_norm``, ``spectral_norm``), a NaN/Inf, huge or empty weight,
            a forward function that fails on the first batch, NaN/Inf activations, a reconstruction
            error that overflows float32, a ``checkpoint_dir`` holding another run's checkpoint.
    """
    config = config if config is not None else AdaRoundConfig()
    forward_fn = forward_fn if forward_fn is not None else default_forward
    observer = observer if observer is not None else AdaRoundObserver()
    layers = _selected_layers(model, config)
    _check_weights(layers)
    names = [n for n, _ in layers]
    unused = _matching_nothing(config.layer_bits, names)
    if unused:
        warnings.warn(
            f"layer_bits patterns {unused} match none of the layers being rounded ({names[:8]}"
            f"{'...' if len(names) > 8 else ''}); check the names with model.named_modules().",
            stacklevel=2,
        )
    _warn_unmatched_excludes(model, config)
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
    batches = list(calibration_batches)
    if not batches:
        raise ValueError(
            "the calibration data is empty; pass an iterable with at least one batch "
            "(AdaRound needs a few hundred to a thousand samples)."
        )
    if objective_builder is None:  # data-parallel rounding holds out from the global samples
        _warn_nothing_held_out(batches, config.holdout_fraction)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    # Lightning's validate runs hooks under inference_mode: tensors made there cannot be
    # saved for backward, so everything below (ChannelClip bounds included) is created outside it.
    with torch.inference_mode(False), torch.enable_grad():
        snapshot = ModelSnapshot(model, config.layer_types)
        try:
            checkpoint = None
            if checkpoint_dir is not None:
                fingerprint = run_fingerprint(model, layers, batches, config, activations or {})
                checkpoint = RoundingCheckpoint.open(checkpoint_dir, fingerprint)
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
            seen = _first_pass(model, layers, staged[0], run)
            order = seen.order
            chains = find_block_chains(model, order, staged[0], run) if config.carry_activations else []
            capture = InputCapture(model, staged, run, chains, device, cache_device, seen.calls)
            blocks = _blocks(model, config, order, staged[0], run)
            loss_on_device = None  # the task loss is only used for the Fisher weights
            if config.block_loss == "fisher" and task_loss is not None:
                loss_on_device = lambda out, b: task_loss(out, move_to_device(b, device))  # noqa: E731
            result = _round_layers(
                model, dict(layers), order, capture, config,
                {n: w.to(device) for n, w in float_weights.items()},
                device, cache_device, activations or {}, observer, grad_reduce,
                objective_builder or build_objective, checkpoint, blocks, loss_on_device,
            )
            if config.bias_correction:  # fresh captures: inputs change as earlier biases are corrected
                fresh = lambda: InputCapture(model, staged, run, chains, device, cache_device, seen.calls)  # noqa: E731
                correct_biases(model, result, fresh, float_weights, device, statistics_reduce)
            result.folded, result.equalized = prepared.folded, prepared.equalized
            result.float_modules = _account_for_float(model, result, config, seen, staged[0], run)
        except BaseException as error:
            snapshot.restore(error)  # the model exactly as given; never raises over ``error``
            raise
        snapshot.restore_settings()
    _warn_float_matrices(result.float_modules)
    observer.on_end(result)
    return result


FLOAT_WARN_ELEMENTS = 4096  # a float weight matrix larger than this is worth a warning


def _account_for_float(
    model: nn.Module, result: AdaRoundResult, config: AdaRoundConfig, seen: FirstPass, batch: Any, run: ForwardFn,
) -> dict[str, FloatModule]:
    """Every module that owns parameters and kept them in float, with the reason (see ``layers.float_modules``).

    Only when a selected layer was never called does one more forward pass (under a torch function
    mode) tell whether the model reads its weight without calling it.
    """
    read = None
    if result.unreached:
        weights = [model.get_submodule(name).weight for name in result.unreached]
        read = parameters_read(model, batch, run, weights)
    return float_modules(model, result.layers, config, result.unreached, read, seen.ran)


def _warn_float_matrices(found: dict[str, FloatModule]) -> None:
    """One warning naming every weight matrix above ``FLOAT_WARN_ELEMENTS`` left in float by no choice of the user.

    Layers kept out with ``layers``/``exclude``/``layer_types`` were the user's choice; norm scales and
    biases are normally kept in float. Both are listed in the summary table, not warned about.
    """
    big = {
        name: m for name, m in found.items()
        if m.kind not in (EXCLUDED, NORM_OR_BIAS) and m.largest_matrix > FLOAT_WARN_ELEMENTS
    }
    if not big:
        return
    listed = "; ".join(f"{name!r} ({m.type}, {m.parameters:,} parameters): {m.reason}" for name, m in big.items())
    advice = " ".join(dict.fromkeys(f"{m.advice}." for m in big.values() if m.advice))
    warnings.warn(
        f"{len(big)} module{'s' if len(big) != 1 else ''} with a weight matrix of more than {FLOAT_WARN_ELEMENTS:,} "
        f"elements stay in float, not rounded, so the model is not fully quantized: {listed}. {advice} "
        "result.float_modules and the summary table's 'left in float' section list every module left in float.",
        stacklevel=3,
    )


def _staging_device(batches: list[Any], device: torch.device, config: AdaRoundConfig) -> torch.device:
    """The calibration batches, like every cache, stay on the device when they fit ``device_cache_bytes``."""
    nbytes = sum(t.numel() * t.element_size() for b in batches for t in tensors_in(b))
    plan = CachePlan(device, config.device_cache_bytes, config.host_cache_bytes)
    return device if plan.tier_for(nbytes) == "device" else torch.device("cpu")


def _matching_nothing(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """The name globs in ``patterns`` that match none of ``names``."""
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _warn_unmatched_excludes(model: nn.Module, config: AdaRoundConfig) -> None:
    """An ``exclude`` glob that matches no layer is a typo the user would otherwise never see."""
    candidates = [name for name, _ in select_layers(model, config.layers, (), config.layer_types)]
    unused = _matching_nothing(config.exclude, candidates)
    if unused:
        warnings.warn(
            f"exclude patterns {unused} match none of the layers that would be rounded ({candidates[:8]}"
            f"{'...' if len(candidates) > 8 else ''}), so they keep nothing in float; check the names with "
            "model.named_modules().",
            stacklevel=3,
        )


def _warn_nothing_held_out(batches: list[Any], fraction: float) -> None:
    """Too few samples to hold any out: the 'held-out' errors of the summary are training errors."""
    total = sum(batch_size_of(b) or 1 for b in batches)
    if fraction > 0 and math.floor(total * fraction) == 0:
        warnings.warn(
            f"only {total} calibration sample(s): none can be held out at holdout_fraction={fraction}, so the "
            "nearest/AdaRound errors in the summary are measured on the samples the rounding was fitted to. "
            f"Pass at least {math.ceil(1 / fraction)} samples (AdaRound wants a few hundred to a thousand).",
            stacklevel=3,
        )


def _check_weights(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse a computed (parametrized) or a NaN/Inf, huge or empty weight by name, before any work."""
    computed = [(name, fix) for name, module in layers if (fix := computed_weight_fix(module, name)) is not None]
    if computed:
        names = [name for name, _ in computed]
        one = len(names) == 1
        raise ValueError(
            f"the weight{'' if one else 's'} of layer{'' if one else 's'} "
            f"{repr(names[0]) if one else names} {'is' if one else 'are'} computed from other tensors (weight_norm, "
            "spectral_norm or another torch.nn.utils.parametrize parametrization), so a rounded weight written "
            f"into {'it' if one else 'them'} would be recomputed away. Bake {'it' if one else 'them'} in first "
            f"with {'; '.join(fix for _, fix in computed)}, or leave {'the layer' if one else 'them'} in float "
            f"with exclude={names}."
        )
    for name, module in layers:
        problem = weight_problem(module.weight)
        if problem is not None and module.weight.numel() == 0:
            raise ValueError(
                f"the weight of layer {name!r} {problem}: there is nothing to round. Leave the layer out "
                f"with exclude=[{name!r}]."
            )
        if problem is not None:
            raise ValueError(
                f"the weight of layer {name!r} {problem}; AdaRound cannot put it on a grid. Load good weights "
                f"(a diverged training run or a bad checkpoint?) or leave the layer in float with exclude=[{name!r}]."
            )


def _selected_layers(model: nn.Module, config: AdaRoundConfig) -> list[tuple[str, nn.Module]]:
    layers = select_layers(model, config.layers, config.exclude, config.layer_types)
    if not layers:
        kinds = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
        raise ValueError(
            f"no layer to round in {type(model).__name__}: AdaRound rounds {kinds} "
            f"(selected by layers={config.layers!r}, exclude={list(config.exclude)!r}); "
            "check the model or the name globs."
        )
    return layers


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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


def forward_failure(err: Exception, when: str = "") -> ValueError:
    """The error for a forward that cannot run a calibration batch (``when``: a note appended)."""
    return ValueError(
        f"running the model on the first calibration batch failed with {type(err).__name__}: "
        f"{str(err).rstrip('.')}. "
        f"Pass forward_fn=lambda model, batch: ... that turns one of your batches into a forward call{when}."
    )


def _blocks(model: nn.Module, config: AdaRoundConfig, order: list[str], batch: Any, run: ForwardFn) -> list[Unit]:
    if config.reconstruction != "block":
        return []
    blocks = find_blocks(model, config.blocks, order, batch, run)
    if not blocks:
        warnings.warn(
            f"reconstruction='block' found no block holding two or more of the layers of {type(model).__name__}, "
            "so every layer is rounded alone; name blocks with blocks=['name', 'sequential[i:j]'].",
            stacklevel=3,
        )
    return blocks


def _round_layers(
    model: nn.Module,
    modules: dict[str, nn.Module],
    order: list[str],
    capture: InputCapture,
    config: AdaRoundConfig,
    float_weights: dict[str, Tensor],
    device: torch.device,
    cache_device: torch.device,
    activations: dict[str, Optional[Activation]],
    observer: AdaRoundObserver,
    grad_reduce: Optional[GradReduce],
    build: Callable[..., Any] = build_objective,
    checkpoint: Optional[RoundingCheckpoint] = None,
    blocks: Sequence[Unit] = (),
    task_loss: Optional[TaskLoss] = None,
) -> AdaRoundResult:
    """Round ``order``'s layers unit by unit; each sees the earlier ones already rounded.

    A unit is a layer, or a block whose layers are rounded together when the forward pass
    reaches its first layer; both go through the same builder, objective and loop.
    One generator, seeded once, feeds every layer's hold-out split and minibatches in turn. A
    checkpoint stores its state after each layer, so a resumed run continues the same sequence.
    """
    result = AdaRoundResult()
    generator = torch.Generator().manual_seed(config.seed)
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
        prepared = build(
            capture, unit, rounded, float_weights, config, generator, device, cache_device,
            None if unit.is_layer else task_loss,
        )
        if prepared is None:
            result.unreached.extend(names)
            for position, name in zip(positions, names):
                if checkpoint is not None:
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
        observer.on_layer_start(label, index, config.iterations)
        roundings = [RoundingVariable(w, g) for w, g in zip(weights, grids)]
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

        optimize_rounding(
            roundings, objective, config.iterations, config.lr, config.reg_lambda,
            schedule, grad_reduce=grad_reduce, on_log=on_log, log_every_n_steps=_log_interval(config),
            should_stop=observer.should_stop,
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
        for position, layer_result in zip(positions, finished):
            result.layers[layer_result.name] = layer_result
            if checkpoint is not None:  # before the observer: a failing hook cannot lose a finished layer
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


@torch.no_grad()
def round_to_nearest(model: nn.Module, config: Optional[AdaRoundConfig] = None) -> dict[str, int]:
    """The baseline: round the same layers to the same grids as :func:`adaround`, to nearest.

    Folds and equalizes first as ``config`` asks (``fold_batchnorm``, ``equalize``), like
    :func:`adaround`, so both round the same weights. Mutates ``model`` in place (on failure it is
    left as given); returns layer name -> bits.
    """
    config = config if config is not None else AdaRoundConfig()
    if config.scale_method == "output":
        raise ValueError(
            "round_to_nearest has no calibration data, so scale_method='output' (scales judged by the layer's "
            "output error) cannot work here; use scale_method='mse', or adaround(), which measures it."
        )
    rounded = {}
    layers = _selected_layers(model, config)
    _check_weights(layers)
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) alone turns grad mode on
        snapshot = ModelSnapshot(model, config.layer_types)
        try:
            prepare_model(model, config)
            for name, layer in layers:
                weight = layer.weight.detach().float()
                grid = layer_grid(name, layer, weight, config)
                layer.weight.copy_(grid.fake_quantize(weight).to(layer.weight.dtype))
                rounded[name] = grid.bits
        except BaseException as error:
            snapshot.restore(error)
            raise
    return rounded


def _log_interval(config: AdaRoundConfig) -> int:
    """``config.log_every_n_steps``; ``None`` (the callback's "the Trainer's") is 50 here."""
    return DEFAULT_LOG_EVERY_N_STEPS if config.log_every_n_steps is None else config.log_every_n_steps
