"""Empirical bias correction: after rounding, each rounded layer's mean output error moves into its bias.

Rounding shifts a layer's mean output per output channel, and every later layer inherits the
shift. Measured on the calibration data, layer by layer in execution order: the layer's mean
output in the float model minus its mean output in the model whose earlier layers are already
rounded and corrected.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_adaround.data.capture import InputCapture, float_weights
from lightning_adaround.model.layers import following_ops
from lightning_adaround.engine.reducer import Reducer
from lightning_adaround.result import AdaRoundResult

MakeCapture = Callable[[], InputCapture]


def following_batchnorm(model: nn.Module, name: str) -> Optional[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm with running statistics right after layer ``name`` in an ``nn.Sequential``, if any."""
    ops = following_ops(model, name)
    batchnorm = ops.batchnorm if ops is not None else None
    if batchnorm is None or getattr(batchnorm, "running_mean", None) is None:
        return None
    return batchnorm


def _output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _output_sums(layer: nn.Module, capture: InputCapture, name: str, device: torch.device) -> Tensor:
    """Per output channel, the sum of ``layer``'s output over all calibration positions; then the count."""
    channels = _output_channels(layer)
    sums = torch.zeros(channels + 1, dtype=torch.float64, device=device)
    for inputs in capture.inputs(name, layer):
        output = layer(inputs.to(device))
        per_channel = output.movedim(-1 if isinstance(layer, nn.Linear) else 1, 0).reshape(channels, -1)
        sums[:-1] += per_channel.sum(dim=1, dtype=torch.float64)
        sums[-1] += per_channel.shape[1]
    return sums


def _means(model: nn.Module, names: list[str], capture: InputCapture, device: torch.device,
           reducer: Reducer, on_layer: Optional[Callable[[str, Optional[Tensor]], None]] = None,
           ) -> dict[str, Optional[Tensor]]:
    """Each layer's mean output per channel in ``model`` as it is (``on_layer`` may change it in between)."""
    found: dict[str, Optional[Tensor]] = {}
    for name in names:
        layer = model.get_submodule(name)
        reducer.where = f"correcting the bias of layer {name!r}"
        totals = _output_sums(layer, capture, name, device)
        reducer.sum([totals], reducer.where, finite=True)  # every process's sums
        found[name] = totals[:-1] / totals[-1] if float(totals[-1]) > 0 else None  # None: never reached
        if on_layer is not None:
            on_layer(name, found[name])
    return found


@torch.no_grad()
def correct_biases(
    model: nn.Module,
    result: AdaRoundResult,
    make_capture: MakeCapture,
    float_weight_of: dict[str, Tensor],
    device: torch.device,
    reducer: Optional[Reducer] = None,
) -> None:
    """Add each rounded layer's mean output error to its bias, in place; record it in ``result``.

    Two passes over the calibration data, each with a fresh capture from ``make_capture``: the
    float model's mean outputs (the float weights put back for the pass), then, layer after
    layer, the rounded model's, each layer corrected before the next one is measured. A layer
    without a bias gets no new parameter: when a BatchNorm with running statistics follows it
    (as after every ``bias=False`` convolution of a folded network), the shift goes into that
    BatchNorm's ``running_mean``, which is exact in eval mode; otherwise it is only recorded
    (``bias_corrected`` False).

    Why the float model's output and not the float weight on the rounded model's input:
    AdaRound fits each rounded layer to the float model's output (asymmetric reconstruction),
    so its rounding already offsets part of the error it inherits; measuring against the float
    weight on the rounded input would undo that (on the digits CNN it doubled the output error).
    """
    reducer = reducer if reducer is not None else Reducer()
    names = list(result.layers)
    layers = {name: model.get_submodule(name) for name in names}
    weights = {name: float_weight_of[name].to(device=device, dtype=layers[name].weight.dtype) for name in names}
    with float_weights(layers, weights):
        targets = _means(model, names, make_capture(), device, reducer)

    def correct(name: str, mean: Optional[Tensor]) -> None:
        layer, target = layers[name], targets[name]
        if mean is None or target is None:
            return
        shift = target - mean
        batchnorm = following_batchnorm(model, name)
        if layer.bias is not None:
            layer.bias.add_(shift.to(device=layer.bias.device, dtype=layer.bias.dtype))
        elif batchnorm is not None:  # eval-mode BN(y + shift) == BN(y) with running_mean - shift
            batchnorm.running_mean.sub_(shift.to(device=batchnorm.running_mean.device, dtype=batchnorm.running_mean.dtype))
        result.layers[name].bias_shift = shift.float().cpu()
        result.layers[name].bias_corrected = layer.bias is not None or batchnorm is not None

    _means(model, names, make_capture(), device, reducer, on_layer=correct)
