"""Second moments of a layer's inputs, accumulated batch by batch in float64.

Without an activation in the loss, ``mean ||W~ x~ - W x||^2`` over all calibration rows
is a quadratic form of W~ built from these d x d matrices (d = in_features, or
C_in/groups * prod(kernel) for a convolution's patches), so no activation is kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_adaround.data.unit import Unit, UnitData

_CHUNK_BYTES = 16 * 2**20  # bound on one chunk of unfolded float64 patches


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

    Convolutions are unfolded by running the layer's own forward with an identity kernel,
    so stride, dilation, groups, string padding and padding modes come for free.
    """
    if isinstance(layer, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    g, d = layer.groups, patch_dim(layer)
    kernel = layer.kernel_size
    inputs = inputs.to(torch.promote_types(inputs.dtype, torch.float32))  # half-precision models: exact patches
    eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device)
    eye = eye.reshape(d, layer.in_channels // g, *kernel).repeat(g, *([1] * (len(kernel) + 1)))
    patches = torch.func.functional_call(layer, {"weight": eye, "bias": None}, (inputs,))
    n = patches.shape[0]
    return patches.reshape(n, g, d, -1).permute(1, 0, 3, 2).reshape(g, -1, d)


class LayerMoments:
    """Running sums of ``x~ x~^T``, ``x~ (x~ - x)^T`` and ``(x~ - x)(x~ - x)^T`` per group."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.layer = layer
        g, d = groups_of(layer), patch_dim(layer)
        zeros = lambda: torch.zeros(g, d, d, dtype=torch.float64, device=device)  # noqa: E731
        self.xx, self.x_diff, self.diff_diff = zeros(), zeros(), zeros()
        self.rows = 0
        self.samples = 0

    @torch.no_grad()
    def add(self, rounded_input: Tensor, float_input: Optional[Tensor]) -> None:
        """Accumulate one batch (same samples in both; ``None``: the float input is the same)."""
        same = float_input is None
        self.samples += rounded_input.shape[0]
        # one sample unfolds to about (input positions) x groups x d float64 values
        channels = self.layer.in_features if isinstance(self.layer, nn.Linear) else self.layer.in_channels
        positions = max(1, rounded_input[:1].numel() // channels)
        per_sample = positions * groups_of(self.layer) * patch_dim(self.layer) * 8
        step = max(1, _CHUNK_BYTES // per_sample)
        for start in range(0, rounded_input.shape[0], step):
            rows = patch_rows(self.layer, rounded_input[start:start + step]).double()
            self.xx += rows.transpose(1, 2) @ rows
            self.rows += rows.shape[1]
            if not same:
                diff = rows - patch_rows(self.layer, float_input[start:start + step]).double()
                self.x_diff += rows.transpose(1, 2) @ diff
                self.diff_diff += diff.transpose(1, 2) @ diff

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.xx, self.x_diff, self.diff_diff))



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
    found = {name: LayerMoments(layer, device) for name, layer in layers.items() if moments_supported(layer)}
    for _, x, args, kwargs in data.chunks(chunk, device, weights[0].dtype) if data is not None and found else ():
        inputs: list[tuple[str, Tensor]] = []
        handles = [
            layers[name].register_forward_pre_hook(lambda _m, a, name=name: inputs.append((name, a[0])))
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
