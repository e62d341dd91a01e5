"""The quantization grid: which integers a weight may take and what they are worth.

Pure functions over tensors (no module state), so the optimizer, the tests and export
all share one definition of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

ScaleMethod = Literal["mse", "minmax", "output"]
SCALE_METHODS = ("mse", "minmax", "output")
# Round-to-nearest error per output channel for a candidate fake-quantized weight (output-major).
ChannelError = Callable[[Tensor], Tensor]
MIN_BITS, MAX_BITS = 2, 8
# Beyond this magnitude a float32 grid's ends (up to twice the largest weight at 2 bits) overflow.
LARGEST_WEIGHT = torch.finfo(torch.float32).max / 4


class Granularity:
    """What shares one scale: the base of :class:`PerTensor` and :class:`PerChannel`.

    A plain class, not a dataclass, so that LightningCLI (jsonargparse) reads a granularity as
    ``class_path: lightning_adaround.PerTensor``; a field-less dataclass alone cannot be told apart.
    """

    __slots__ = ()


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale (and zero point) for the whole weight tensor."""


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per slice along ``axis`` (``None``: the layer's output-channel axis)."""

    axis: Optional[int] = None


@dataclass(frozen=True)
class QuantGrid:
    """An affine integer grid: ``w_q = (w_int - zero_point) * scale``, ``qmin <= w_int <= qmax``.

    ``scale`` and ``zero_point`` have the weight's rank and broadcast against it: size 1
    on every dim (per-tensor) or on every dim but ``axis`` (per-channel). A grouped
    transposed convolution's per-channel scale is ``(in, out/groups, 1, ...)``, since its
    output channels span weight dims 0 and 1.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    bits: int
    symmetric: bool
    axis: Optional[int]

    def quantize(self, weight: Tensor) -> Tensor:
        """Round to nearest: the integer weight (as a float tensor of integral values)."""
        return torch.clamp(torch.round(weight / self.scale) + self.zero_point, self.qmin, self.qmax)

    def dequantize(self, weight_int: Tensor) -> Tensor:
        return (weight_int - self.zero_point) * self.scale

    def fake_quantize(self, weight: Tensor) -> Tensor:
        """Round-to-nearest on the grid, back in float: the baseline AdaRound must beat."""
        return self.dequantize(self.quantize(weight))

    def to(self, device: torch.device) -> "QuantGrid":
        return QuantGrid(
            self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax,
            self.bits, self.symmetric, self.axis,
        )


def check_bits(bits: int, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{what} must be an int between {MIN_BITS} and {MAX_BITS}, got {bits!r}.")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what}={bits} is outside the supported range {MIN_BITS}-{MAX_BITS}. "
            f"Pick a bit width between {MIN_BITS} and {MAX_BITS} (4 is a good start)."
        )


def weight_problem(weight: Tensor) -> Optional[str]:
    """Why no grid can hold ``weight`` (``"contains NaN or Inf (...)"``, ...), or ``None`` when one can.

    Checked before any work, so a broken weight is refused with its layer's name instead of
    silently becoming NaN after minutes of calibration.
    """
    if weight.numel() == 0:
        return f"is empty (shape {tuple(weight.shape)})"
    w = weight.detach().float()
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        return f"contains NaN or Inf ({int((~finite).sum())} of {w.numel()} values)"
    largest = float(w.abs().max())
    if largest > LARGEST_WEIGHT:
        return (
            f"has values up to {largest:.3g} in magnitude, too large for a float32 grid "
            f"(the limit is {LARGEST_WEIGHT:.3g})"
        )
    return None


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed range for symmetric grids, unsigned for asymmetric (affine) ones."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _reduce_dims(weight: Tensor, axis: Optional[int]) -> list[int]:
    if axis is None:
        return list(range(weight.dim()))
    return [d for d in range(weight.dim()) if d != axis]


def _grid_from_range(
    w_min: Tensor, w_max: Tensor, bits: int, symmetric: bool, axis: Optional[int]
) -> QuantGrid:
    qmin, qmax = integer_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny * 1e4
    if symmetric:
        max_abs = torch.maximum(w_min.abs(), w_max.abs())
        scale = torch.clamp(max_abs / qmax, min=tiny)
        zero_point = torch.zeros_like(scale)
    else:
        w_min = torch.clamp(w_min, max=0.0)  # zero must be exactly representable
        w_max = torch.clamp(w_max, min=0.0)
        scale = torch.clamp((w_max - w_min) / (qmax - qmin), min=tiny)
        zero_point = torch.clamp(torch.round(qmin - w_min / scale), qmin, qmax)
    return QuantGrid(scale, zero_point, qmin, qmax, bits, symmetric, axis)


def choose_grid(
    weight: Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: Granularity = PerChannel(),
    method: ScaleMethod = "mse",
    channel_axis: int = 0,
    num_candidates: int = 100,
    channel_error: Optional[ChannelError] = None,
) -> QuantGrid:
    """Pick scale (and zero point) for ``weight``.

    ``"minmax"`` covers the full range (an asymmetric grid may clip by up to half a step,
    since its zero point is rounded to an integer); ``"mse"`` shrinks the range by the factor (out of
    ``num_candidates`` in (0.2, 1]) that minimises the round-to-nearest squared error,
    separately per channel: at 4 bits and below, clipping outliers beats covering them.
    ``"output"`` searches the same factors but minimises ``channel_error(fake_quantized)``, the
    layer's output error per output channel on calibration data (needs ``channel_axis=0`` and the
    per-channel axis 0 or a per-tensor grid): a channel of nine depthwise weights is judged by
    what its rounding does to the output, not to the weights.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"scale method {method!r} is not one of {SCALE_METHODS}.")
    check_bits(bits)
    if isinstance(granularity, PerTensor):
        axis = None
    elif isinstance(granularity, PerChannel):
        axis = channel_axis if granularity.axis is None else granularity.axis
        if not -weight.dim() <= axis < weight.dim():
            raise ValueError(f"per-channel axis {axis} does not exist in a weight of shape {tuple(weight.shape)}.")
        axis = axis % weight.dim()
    else:
        raise TypeError(f"granularity must be PerTensor() or PerChannel(axis), got {granularity!r}.")
    if weight.numel() == 0:
        raise ValueError(f"the weight is empty (shape {tuple(weight.shape)}); there is nothing to put on a grid.")
    problem = weight_problem(weight)
    if problem is not None:
        raise ValueError(
            f"the weight {problem}; no grid can hold it. Load good weights (a diverged training run or a "
            "bad checkpoint?) or leave this layer in float."
        )
    w = weight.detach().float()
    dims = _reduce_dims(w, axis)
    w_min = w.amin(dim=dims, keepdim=True)
    w_max = w.amax(dim=dims, keepdim=True)
    if method == "minmax":
        return _grid_from_range(w_min, w_max, bits, symmetric, axis)
    if method == "output" and (channel_error is None or axis not in (None, 0) or channel_axis != 0):
        raise ValueError(
            "scale_method='output' needs the layer's output error per output channel (channel_error=) and a "
            f"per-tensor or output-channel grid (got axis {axis}); use scale_method='mse' here."
        )
    errors = _weight_error if method == "mse" else _output_error(channel_error, weight.dim(), axis)

    best: Optional[QuantGrid] = None
    best_err: Optional[Tensor] = None
    for ratio in torch.linspace(1.0, 0.2, num_candidates).tolist():
        grid = _grid_from_range(w_min * ratio, w_max * ratio, bits, symmetric, axis)
        err = errors(grid.fake_quantize(w), w, dims)
        if best is None:
            best, best_err = grid, err
            continue
        better = err < best_err
        best = QuantGrid(
            torch.where(better, grid.scale, best.scale),
            torch.where(better, grid.zero_point, best.zero_point),
            grid.qmin, grid.qmax, bits, symmetric, axis,
        )
        best_err = torch.where(better, err, best_err)
    assert best is not None
    return best


def _weight_error(quantized: Tensor, w: Tensor, dims: list[int]) -> Tensor:
    err = (quantized - w).pow(2).sum(dim=dims, keepdim=True)
    if not bool(torch.isfinite(err).all()):  # huge weights: the squares overflow float32
        err = (quantized.double() - w.double()).pow(2).sum(dim=dims, keepdim=True)
    return err.double()


def _output_error(channel_error: ChannelError, rank: int, axis: Optional[int]) -> Callable[..., Tensor]:
    """Per-channel output errors laid out like the weight-error ones: ``(out, 1, ...)`` or all-ones shape."""

    def errors(quantized: Tensor, w: Tensor, dims: list[int]) -> Tensor:
        per_channel = channel_error(quantized).to(w.device, torch.float64)
        if axis is None:
            return per_channel.sum().reshape((1,) * rank)
        return per_channel.reshape(-1, *((1,) * (rank - 1)))

    return errors
