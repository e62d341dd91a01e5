"""The quantization grid: which integers a weight may take and what they are worth.

Pure functions over tensors (no module state), so the optimizer, the tests and export
all share one definition of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Literal, Optional, Sequence

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
    """What shares one scale: the base of :class:`PerTensor`, :class:`PerChannel` and :class:`PerGroup`.

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
class PerGroup(Granularity):
    """One scale per output channel per ``group_size`` consecutive inputs (weight-only int4 as in LLM toolkits).

    The inputs of an output channel are its row of ``weight.reshape(out, -1)``: ``in_features``
    for a ``Linear``, ``in_channels/groups * prod(kernel_size)`` for a ``Conv`` (each input
    channel's kernel taps consecutive, as the layer's second moments and GPTQ order them). A row of
    ``K`` inputs is split into ``G = ceil(K / group_size)`` groups of ``ceil(K / G)`` (the last one
    shorter): exactly ``group_size`` when it divides ``K``, never more, and one group per output
    channel (a per-channel grid) when ``K <= group_size``. Transposed convolutions are refused.
    """

    group_size: int = 128

    def __post_init__(self) -> None:
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(
                f"PerGroup(group_size={size!r}): the group size must be an int >= 2, e.g. 32, 64 or 128 "
                "(one scale per weight would store more than the float weight)."
            )

    @property
    def axis(self) -> int:
        """The weight axis of the output channels the groups belong to (``Linear``/``Conv``: 0)."""
        return 0


@dataclass(frozen=True)
class QuantGrid:
    """An affine integer grid: ``w_q = (w_int - zero_point) * scale``, ``qmin <= w_int <= qmax``.

    ``scale`` and ``zero_point`` have the weight's rank and broadcast against it: size 1
    on every dim (per-tensor) or on every dim but ``axis`` (per-channel). A grouped
    transposed convolution's per-channel scale is ``(in, out/groups, 1, ...)``, since its
    output channels span weight dims 0 and 1. Per group (``group_size`` set, ``axis`` 0) they
    are ``(out, G)``: group ``g`` of output channel ``o`` is inputs ``g * group_size`` up to
    ``(g + 1) * group_size`` of row ``o`` of ``weight.reshape(out, -1)``, the last group shorter
    (:func:`group_size_of` reads the group size back from the shapes).
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    bits: int
    symmetric: bool
    axis: Optional[int]
    group_size: Optional[int] = None

    def broadcastable(self, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` laid out to broadcast against a weight of ``shape``.

        Unchanged unless per group, where each group's value is repeated over its inputs (a
        weight-sized tensor): what elementwise code such as the rounding variable needs.
        """
        if self.group_size is None:
            return self.scale, self.zero_point
        return expand_groups(self.scale, shape, self.group_size), expand_groups(self.zero_point, shape, self.group_size)

    def quantize(self, weight: Tensor) -> Tensor:
        """Round to nearest: the integer weight (as a float tensor of integral values)."""
        scale, zero_point = self.broadcastable(weight.shape)
        return torch.clamp(torch.round(weight / scale) + zero_point, self.qmin, self.qmax)

    def dequantize(self, weight_int: Tensor) -> Tensor:
        scale, zero_point = self.broadcastable(weight_int.shape)
        return (weight_int - zero_point) * scale

    def fake_quantize(self, weight: Tensor) -> Tensor:
        """Round-to-nearest on the grid, back in float: the baseline AdaRound must beat."""
        return self.dequantize(self.quantize(weight))

    def to(self, device: torch.device) -> "QuantGrid":
        return QuantGrid(
            self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax,
            self.bits, self.symmetric, self.axis, self.group_size,
        )


def group_count(inputs: int, group_size: int) -> tuple[int, int]:
    """``(G, block)``: how :class:`PerGroup` splits ``inputs`` per output channel, at most ``group_size`` each.

    ``block = ceil(inputs / G)`` is the smallest size that gives the same ``G = ceil(inputs /
    group_size)`` groups, so the scale's shape ``(out, G)`` alone tells the group size
    (:func:`group_size_of`), and it is ONNX's ``block_size`` (the last block shorter).
    """
    groups = -(-inputs // group_size)
    return groups, -(-inputs // groups)


def group_size_of(scale_shape: Sequence[int], weight_shape: Sequence[int]) -> Optional[int]:
    """The group size of a per-group scale ``(out, G)`` for a weight of ``weight_shape``; ``None`` for a scale that broadcasts.

    Raises ``ValueError`` for a scale that is neither (a damaged result or file).
    """
    scale_shape, weight_shape = tuple(scale_shape), tuple(weight_shape)
    if len(scale_shape) == len(weight_shape) and all(s in (1, n) for s, n in zip(scale_shape, weight_shape)):
        return None
    if len(scale_shape) == 2 and len(weight_shape) >= 2 and scale_shape[0] == weight_shape[0]:
        inputs, groups = math.prod(weight_shape[1:]), scale_shape[1]
        if 2 <= groups <= inputs:
            block = -(-inputs // groups)
            if -(-inputs // block) == groups:
                return block
    raise ValueError(
        f"a scale of shape {scale_shape} neither broadcasts against a weight of shape {weight_shape} nor "
        "holds one value per output channel and group of inputs (out, G); the grid is damaged."
    )


def expand_groups(values: Tensor, shape: Sequence[int], group_size: int) -> Tensor:
    """Per-group ``values`` ``(out, G)`` repeated over each group's inputs, in the weight's ``shape``."""
    shape = tuple(shape)
    inputs = math.prod(shape[1:])
    return values.repeat_interleave(group_size, dim=1)[:, :inputs].reshape(shape)


def group_view(weight: Tensor, group_size: int) -> Tensor:
    """``weight`` as ``(out, G, block)``, the last group padded with zeros (on every grid; they move no range)."""
    rows = weight.reshape(weight.shape[0], -1)
    groups, block = group_count(rows.shape[1], group_size)
    rows = torch.nn.functional.pad(rows, (0, groups * block - rows.shape[1]))
    return rows.reshape(rows.shape[0], groups, block)


def granularity_problem(layer: torch.nn.Module, granularity: Granularity) -> Optional[str]:
    """Why ``layer`` cannot take ``granularity`` (a sentence), or ``None``: checked before any work."""
    if isinstance(granularity, PerGroup) and getattr(layer, "transposed", False):
        return (
            f"is a {type(layer).__name__}, whose weight (in, out/groups, k...) holds no row of inputs per output "
            f"channel to split into groups of PerGroup(group_size={granularity.group_size})"
        )
    return None


def check_granularity(layers: Sequence[tuple[str, torch.nn.Module]], granularity: Granularity) -> None:
    """Refuse, by name and type, every selected layer the grid cannot hold, before any work.

    Today one case: a transposed convolution with :class:`PerGroup`.
    """
    refused = [(name, problem) for name, layer in layers if (problem := granularity_problem(layer, granularity))]
    if not refused:
        return
    name, problem = refused[0]
    names = [n for n, _ in refused]
    others = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    raise ValueError(
        f"layer {name!r}{others} {problem}. Use granularity=PerChannel() for this model, or leave "
        f"{'it' if len(names) == 1 else 'them'} in float with exclude={names!r}."
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
    what its rounding does to the output, not to the weights. :class:`PerGroup` searches per group
    of ``weight.reshape(out, -1)`` (rows are output channels, as for ``Linear`` and ``Conv``); its
    groups within a channel share one output error, so ``"output"`` searches by weight error there.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"scale method {method!r} is not one of {SCALE_METHODS}.")
    check_bits(bits)
    if isinstance(granularity, PerTensor):
        axis = None
    elif isinstance(granularity, PerGroup):
        axis = 0
        if weight.dim() < 2:
            raise ValueError(
                f"PerGroup needs a weight with output channels and inputs (2 dims or more), got shape "
                f"{tuple(weight.shape)}; use PerChannel() or PerTensor()."
            )
    elif isinstance(granularity, PerChannel):
        axis = channel_axis if granularity.axis is None else granularity.axis
        if not -weight.dim() <= axis < weight.dim():
            raise ValueError(f"per-channel axis {axis} does not exist in a weight of shape {tuple(weight.shape)}.")
        axis = axis % weight.dim()
    else:
        raise TypeError(f"granularity must be PerTensor(), PerChannel(axis) or PerGroup(group_size), got {granularity!r}.")
    if weight.numel() == 0:
        raise ValueError(f"the weight is empty (shape {tuple(weight.shape)}); there is nothing to put on a grid.")
    problem = weight_problem(weight)
    if problem is not None:
        raise ValueError(
            f"the weight {problem}; no grid can hold it. Load good weights (a diverged training run or a "
            "bad checkpoint?) or leave this layer in float."
        )
    w = weight.detach().float()
    if isinstance(granularity, PerGroup):
        return _group_grid(w, bits, symmetric, granularity.group_size, method, num_candidates)
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
    return _search(w, w_min, w_max, dims, bits, symmetric, axis, errors, num_candidates)


def _group_grid(w: Tensor, bits: int, symmetric: bool, group_size: int, method: ScaleMethod, num_candidates: int) -> QuantGrid:
    """:func:`choose_grid` per group: the search runs on the ``(out, G, block)`` view, one candidate per group."""
    groups = group_view(w, group_size)
    w_min = groups.amin(dim=2, keepdim=True)
    w_max = groups.amax(dim=2, keepdim=True)
    if method == "minmax":
        grid = _grid_from_range(w_min, w_max, bits, symmetric, 0)
    else:  # "output" too: a channel's groups share one output error, so no group can be judged by it
        grid = _search(groups, w_min, w_max, [2], bits, symmetric, 0, _weight_error, num_candidates)
    if groups.shape[1] == 1:  # one group per output channel: a per-channel grid, laid out like one
        ones = (1,) * (w.dim() - 1)
        return QuantGrid(grid.scale.reshape(-1, *ones), grid.zero_point.reshape(-1, *ones),
                         grid.qmin, grid.qmax, bits, symmetric, 0)
    return QuantGrid(grid.scale.squeeze(2), grid.zero_point.squeeze(2), grid.qmin, grid.qmax, bits, symmetric, 0,
                     group_size=groups.shape[2])


def _search(
    w: Tensor, w_min: Tensor, w_max: Tensor, dims: list[int], bits: int, symmetric: bool, axis: Optional[int],
    errors: Callable[..., Tensor], num_candidates: int,
) -> QuantGrid:
    """The range shrunk by the factor in (0.2, 1] with the least ``errors``, chosen per slice of ``w``."""
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
