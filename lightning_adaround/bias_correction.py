"""Empirical bias correction: after rounding, each rounded layer's mean output error moves into its bias.

Rounding changes a layer's mean output by ``E[(W - W~) x]`` per output channel, an error every
later layer inherits. Measured on the calibration data, layer by layer in execution order, with
each layer's input taken from the model whose earlier layers are already rounded and corrected.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_adaround.capture import InputCapture
from lightning_adaround.result import AdaRoundResult

# ``reduce(layer name, numel, compute)``: ``compute()`` gives this process's float64 sums; the
# result is their sum over every process (``distributed_adaround`` passes one that all-reduces).
SumReduce = Callable[[str, int, Callable[[], Tensor]], Tensor]


def _local(name: str, numel: int, compute: Callable[[], Tensor]) -> Tensor:
    return compute()


def _output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _error_sums(layer: nn.Module, capture: InputCapture, name: str, delta: Tensor, device: torch.device) -> Tensor:
    """Per output channel, the sum of ``layer``'s output error over all calibration positions; then the count.

    The error ``y(W) - y(W~)`` is the layer run with ``W - W~`` and no bias (it is linear in the weight).
    """
    channels = _output_channels(layer)
    sums = torch.zeros(channels + 1, dtype=torch.float64, device=device)
    zero_bias = {"bias": torch.zeros_like(layer.bias)} if layer.bias is not None else {}
    for inputs, _ in capture.pairs(name, layer, {}, {}):
        error = torch.func.functional_call(layer, {"weight": delta, **zero_bias}, (inputs.to(device),))
        per_channel = error.movedim(-1 if isinstance(layer, nn.Linear) else 1, 0).reshape(channels, -1)
        sums[:-1] += per_channel.sum(dim=1, dtype=torch.float64)
        sums[-1] += per_channel.shape[1]
    return sums


@torch.no_grad()
def correct_biases(
    model: nn.Module,
    result: AdaRoundResult,
    capture: InputCapture,
    float_weights: dict[str, Tensor],
    device: torch.device,
    reduce: Optional[SumReduce] = None,
) -> None:
    """Add each rounded layer's mean output error to its bias, in place; record it in ``result``.

    ``capture`` must be fresh (no inputs kept from before the corrections). A layer without a
    bias gets no new parameter: its shift is only recorded (``LayerResult.bias_corrected`` False).
    """
    reduce = reduce if reduce is not None else _local
    for name, layer_result in result.layers.items():
        layer = model.get_submodule(name)
        delta = float_weights[name].to(device=device, dtype=layer.weight.dtype) - layer.weight
        totals = reduce(name, _output_channels(layer) + 1, lambda: _error_sums(layer, capture, name, delta, device))
        count = float(totals[-1])
        if count == 0:  # no calibration batch reached the layer
            continue
        shift = totals[:-1] / count
        if layer.bias is not None:
            layer.bias.add_(shift.to(device=layer.bias.device, dtype=layer.bias.dtype))
        layer_result.bias_shift = shift.float().cpu()
        layer_result.bias_corrected = layer.bias is not None
