"""Second moments of a layer's inputs, accumulated batch by batch in float64.

Without an activation in the loss, ``mean ||W~ x~ - W x||^2`` over all calibration rows
is a quadratic form of W~ built from these d x d matrices (d = in_features, or
C_in/groups * prod(kernel) for a convolution's patches), so no activation is kept.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_adaround.model.layers import positional_call

if TYPE_CHECKING:
    from lightning_adaround.data.unit import Unit, UnitData

_CHUNK_BYTES = 16 * 2**20  # bound on one chunk of unfolded patches


def moments_supported(layer: nn.Module) -> bool:
    """Linear and (non-transposed) convolutions; a transposed conv has no single patch matrix."""
    return isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed
    )


def patch_dim(layer: nn.Module) -> int:
    """d: the length of one row the layer's weight multiplies."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def groups_of(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def weight_as_groups(layer: nn.Module, weight: Tensor) -> Tensor:
    """``(groups, out/groups, d)``: the weight as one matrix per group."""
    g = groups_of(layer)
    return weight.reshape(g, weight.shape[0] // g, -1)


def patch_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """``(groups, rows, d)``: every row the layer's weight multiplies.

    One- and two-dimensional convolutions with numeric zero padding are unfolded by ``F.unfold``
    (a copy); any other convolution by running the layer's own forward with an identity kernel
    (as many multiply-adds as ``x^T x`` itself), so stride, dilation, groups, string padding and
    padding modes come for free.
    """
    if isinstance(layer, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    g, d = layer.groups, patch_dim(layer)
    if inputs.dim() != len(layer.kernel_size) + 2:
        raise ValueError(
            f"a {type(layer).__name__} received an input of shape {tuple(inputs.shape)} without a batch "
            "dimension; the moments form needs batched inputs (call it on x.unsqueeze(0)) or use "
            "loss_form='minibatch'."
        )
    dtype = torch.promote_types(inputs.dtype, torch.float32)  # half-precision models: exact patches
    n = inputs.shape[0]
    if _unfolds(layer):
        two_d = (lambda v: tuple(v)) if isinstance(layer, nn.Conv2d) else (lambda v: (1, *v))  # noqa: E731
        if isinstance(layer, nn.Conv1d):
            inputs = inputs.unsqueeze(2)
        patches = F.unfold(
            inputs.to(dtype), two_d(layer.kernel_size), dilation=two_d(layer.dilation),
            padding=two_d(layer.padding) if isinstance(layer, nn.Conv2d) else (0, *layer.padding),
            stride=two_d(layer.stride),
        )
    else:
        # float64 on CUDA: cuDNN convolutions take TF32 by default, which would round the inputs
        exact = torch.float64 if inputs.is_cuda else dtype
        kernel = layer.kernel_size
        eye = torch.eye(d, dtype=exact, device=inputs.device)
        eye = eye.reshape(d, layer.in_channels // g, *kernel).repeat(g, *([1] * (len(kernel) + 1)))
        patches = torch.func.functional_call(layer, {"weight": eye, "bias": None}, (inputs.to(exact),)).to(dtype)
    return patches.reshape(n, g, d, -1).permute(1, 0, 3, 2).reshape(g, -1, d)


def _unfolds(layer: nn.Module) -> bool:
    """Whether ``F.unfold`` gives the layer's patches: a 1-d or 2-d convolution with numeric zero padding."""
    return (
        isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


class LayerMoments:
    """Running float64 sums, per group, of what the moments form needs from a layer's inputs.

    With ``x~`` the input in the rounded model, ``x`` the target input and ``e = x~ - x``:
    ``xx = sum x~ x~^T``, and the two terms of the error that reaches the layer, ``wx = sum (W e) x~^T``
    (``out x d``) and ``ee = sum (W e)^2`` per output channel, ``W`` the float weight.

    A layer with fewer outputs than inputs (per group) gets the error terms through ``W e``
    (``2 out d`` multiply-adds per row); a wider one through ``x~ e^T`` and ``e e^T`` (``2 d^2``),
    turned into them once at the end (:meth:`error_terms`). Each chunk's products run in float32
    (float64 inputs stay float64) and are summed in float64: GPTQ's precision for ``x~ x~^T``, at
    half the time of float64 products on a CPU and far less on most GPUs.
    """

    def __init__(self, layer: nn.Module, device: torch.device, weight: Optional[Tensor] = None) -> None:
        """``weight``: the layer's float weight (default: its current one)."""
        self.layer = layer
        g, d = groups_of(layer), patch_dim(layer)
        self.weight = weight_as_groups(layer, (layer.weight if weight is None else weight).detach().to(device))
        out = self.weight.shape[1]
        self.through_outputs = out < d
        zeros = lambda *shape: torch.zeros(g, *shape, dtype=torch.float64, device=device)  # noqa: E731
        self.xx = zeros(d, d)
        # the error terms as summed: (wx, ee) through the outputs, else (x~ e^T, e e^T)
        self.error_sums = [zeros(out, d), zeros(out)] if self.through_outputs else [zeros(d, d), zeros(d, d)]
        self.rows = 0
        self.samples = 0

    def sums(self) -> list[Tensor]:
        """Every running sum, for the processes to add up."""
        return [self.xx, *self.error_sums]

    @torch.no_grad()
    def add(self, rounded_input: Tensor, float_input: Optional[Tensor]) -> None:
        """Accumulate one batch (same samples in both; ``None``: the float input is the same)."""
        same = float_input is None
        self.samples += rounded_input.shape[0]
        dtype = torch.promote_types(rounded_input.dtype, torch.float32)
        # one sample unfolds to about (input positions) x groups x d values
        channels = self.layer.in_features if isinstance(self.layer, nn.Linear) else self.layer.in_channels
        positions = max(1, rounded_input[:1].numel() // channels)
        per_sample = positions * groups_of(self.layer) * patch_dim(self.layer) * dtype.itemsize
        step = max(1, _CHUNK_BYTES // per_sample)
        weight = self.weight.to(dtype)
        with _full_float32(rounded_input.device):
            for start in range(0, rounded_input.shape[0], step):
                rows = patch_rows(self.layer, rounded_input[start:start + step].to(dtype))
                _add_gram(self.xx, rows)
                self.rows += rows.shape[1]
                if same:
                    continue
                diff = rows - patch_rows(self.layer, float_input[start:start + step].to(dtype))
                first, second = self.error_sums
                if self.through_outputs:
                    error = diff @ weight.transpose(1, 2)  # (groups, rows, out): W e
                    first += error.transpose(1, 2) @ rows
                    second += error.square().sum(1)
                else:
                    first += rows.transpose(1, 2) @ diff
                    _add_gram(second, diff)

    def error_terms(self) -> tuple[Tensor, Tensor]:
        """``(wx, ee)`` in float64, from the sums as they are now (call after the processes add them up)."""
        if self.through_outputs:
            return self.error_sums[0], self.error_sums[1]
        w = self.weight.double()
        x_diff, diff_diff = self.error_sums
        return w @ x_diff.transpose(1, 2), ((w @ diff_diff) * w).sum(-1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums())


_HALVED_GRAM_MIN = 256  # widths from which a Gram product in three half-width products is faster (CPU)


def _add_gram(total: Tensor, rows: Tensor) -> None:
    """``total += rows^T rows`` per group. The product is symmetric: from a width of
    ``_HALVED_GRAM_MIN`` on it is built from three products of half the width (its two diagonal
    blocks and one off-diagonal block, mirrored), three quarters of the multiply-adds; 17% less
    time at 384, 24% at 1,536 on one CPU thread."""
    d = rows.shape[-1]
    if d < _HALVED_GRAM_MIN:
        total += rows.transpose(1, 2) @ rows
        return
    half = d // 2
    left, right = rows[..., :half], rows[..., half:]
    cross = left.transpose(1, 2) @ right
    total[..., :half, :half] += left.transpose(1, 2) @ left
    total[..., :half, half:] += cross
    total[..., half:, :half] += cross.transpose(1, 2)
    total[..., half:, half:] += right.transpose(1, 2) @ right


@contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Full float32 matrix products on CUDA, whatever ``torch.set_float32_matmul_precision`` the user
    chose ("high" and "medium" allow TF32 or bfloat16 there), put back afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@torch.no_grad()
def inner_layer_moments(
    unit: "Unit", data: Optional["UnitData"], weights: list[Tensor], device: torch.device, chunk: int = 64,
) -> dict[str, LayerMoments]:
    """Input moments of each of a block's layers (those :func:`moments_supported`), from one pass of
    the block with its float ``weights`` over its training rows ``data`` (``None``: zeros).

    Each layer's output error per channel, ``diag(D A D^T)`` on these moments, judges its grid
    candidates and its rounding against round-to-nearest, as a layer rounded alone is judged.
    """
    layers = {name: unit.layer_module(name) for name in unit.layers}
    found = {
        name: LayerMoments(layer, device, weight)
        for (name, layer), weight in zip(layers.items(), weights) if moments_supported(layer)
    }
    for _, x, args, kwargs in data.chunks(chunk, device, weights[0].dtype) if data is not None and found else ():
        inputs: list[tuple[str, Tensor]] = []
        handles = [
            layers[name].register_forward_pre_hook(
                lambda m, a, k, name=name: inputs.append((name, positional_call(m, a, k)[0][0])), with_kwargs=True
            )
            for name in found
        ]
        try:
            unit.run(weights, x, args, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name, x in inputs:  # after the hooks are gone: unfolding runs the layer's own forward
            found[name].add(x, None)
    return found
