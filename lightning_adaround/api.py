"""``adaround(model, batches, config)``: round a model's weights in place, layer by layer.

Plain PyTorch. The public entry points; the run itself is ``engine.run.round_model``. Any failure
leaves the model as it was given (weights, BatchNorm statistics, the ReLU6 modules equalization
replaces, training modes, ``requires_grad``) and raises the original error; with
``checkpoint_dir`` the finished layers are kept on disk and a second call resumes.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from lightning_adaround.data.capture import ForwardFn
from lightning_adaround.io.checkpoint import PathLike
from lightning_adaround.engine.checks import check_weights, selected_layers
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.engine.run import Activation, MoveBatch, RunOptions, move_to_device, round_model
from lightning_adaround.engine.unit_loop import layer_grid
from lightning_adaround.observer import AdaRoundObserver
from lightning_adaround.model.prepare import ModelSnapshot, prepare_model
from lightning_adaround.engine.reconstruct import TaskLoss
from lightning_adaround.result import AdaRoundResult

__all__ = ["Activation", "MoveBatch", "adaround", "layer_grid", "move_to_device", "round_to_nearest"]


def adaround(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    config: Optional[AdaRoundConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    device: Optional[torch.device | str] = None,
    activations: Optional[dict[str, Optional[Activation]]] = None,
    observer: Optional[AdaRoundObserver] = None,
    move_batch: MoveBatch = move_to_device,
    checkpoint_dir: Optional[PathLike] = None,
    task_loss: Optional[TaskLoss] = None,
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
        move_batch: ``move_batch(batch, device)`` moves one batch to the device; called exactly once
            per calibration batch (Lightning's transfer hooks run once), later moves between a host
            cache and the device are plain tensor moves.
        checkpoint_dir: A folder where each finished layer is saved as soon as it is done. Calling
            again with the same arguments after an interruption (an exception, Ctrl-C, a killed
            process) skips the finished layers and gives the same integer weights as an
            uninterrupted run; a folder from other settings, model or data is refused.
        task_loss: ``task_loss(output, batch) -> scalar``, the training loss of one batch (its
            labels moved to the device), for ``block_loss="fisher"``.

    Raises:
        ValueError: empty calibration data, no supported layer selected, a weight computed by a
            parametrization (``weight_norm``, ``spectral_norm``), a NaN/Inf, huge or empty weight,
            a forward function that fails on the first batch, NaN/Inf activations, a reconstruction
            error that overflows float32, a ``checkpoint_dir`` holding another run's checkpoint.
    """
    config = config if config is not None else AdaRoundConfig()
    options = RunOptions(forward_fn, device, activations, observer, move_batch, checkpoint_dir, task_loss)
    return round_model(model, list(calibration_batches), config, options)


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
    layers = selected_layers(model, config)
    check_weights(layers)
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
