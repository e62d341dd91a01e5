"""The run: prepare the model, capture each unit's data, optimise its rounding, write it back.

Plain PyTorch; :func:`round_model` is what ``adaround`` and ``distributed_adaround`` call, the
second with a reducer that meets the other processes at the points ``engine/reducer.py`` names. Data
flows one way: (BatchNorm folding, equalization) -> calibration batches -> capture -> unit
objective -> optimise -> hard-rounded weights written back -> (bias correction) -> result.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_adaround.model.bias_correction import correct_biases
from lightning_adaround.data.blocks import find_blocks
from lightning_adaround.data.cache import CachePlan
from lightning_adaround.data.calibration import SampleLayout, map_tensors, tensors_in
from lightning_adaround.data.capture import FirstPass, ForwardFn, InputCapture, default_forward, first_pass
from lightning_adaround.data.chain import find_block_chains
from lightning_adaround.io.checkpoint import PathLike, RoundingCheckpoint, run_fingerprint
from lightning_adaround.engine.checks import (
    account_for_float, check_weights, forward_failure, matching_nothing, selected_layers, warn_float_matrices,
    warn_nothing_held_out, warn_unmatched_excludes,
)
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.observer import AdaRoundObserver
from lightning_adaround.model.prepare import ModelSnapshot, prepare_model
from lightning_adaround.engine.reconstruct import RunData, TaskLoss
from lightning_adaround.engine.reducer import Reducer
from lightning_adaround.result import AdaRoundResult
from lightning_adaround.data.unit import Unit
from lightning_adaround.engine.unit_loop import round_units

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
            capture = InputCapture(
                model, staged, run, chains, device, cache_device, seen.calls, _float_pass_budget(cache_device, config),
            )
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
            result = round_units(
                model, dict(layers), seen.order, data,
                {n: w.to(device) for n, w in float_weights.items()}, activations or {}, report, checkpoint, blocks,
            )
            if config.bias_correction:  # fresh captures: inputs change as earlier biases are corrected
                fresh = lambda: InputCapture(model, staged, run, chains, device, cache_device, seen.calls)  # noqa: E731
                correct_biases(
                    model, result, fresh, float_weights, device, reducer,
                    config.bias_correction, data.held_out, layout.sizes,  # "auto" judges on the held-out samples
                )
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


def _float_pass_budget(cache_device: torch.device, config: AdaRoundConfig) -> Callable[[], Optional[int]]:
    """What a block's float-model pass may keep where the capture keeps it (see InputCapture): half of
    the per-layer cache budget of that memory, the layer's own cache having the rest."""
    plan = CachePlan(cache_device, config.device_cache_bytes, config.host_cache_bytes)

    def budget() -> Optional[int]:
        whole = plan.budget("host" if cache_device.type == "cpu" else "device")
        return None if whole is None else whole // 2

    return budget


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
