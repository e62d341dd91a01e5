"""The rounding variable V: per weight, a learnt choice between rounding down and up.

``h(V)`` is the rectified sigmoid of the AdaRound paper; the soft weight starts equal to
the float weight and the final, hard-rounded weight lies exactly on the grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_adaround.quant import QuantGrid

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """The V with ``h(V) == h`` for ``0 <= h < 1``."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


class RoundingVariable:
    """Holds V for one weight tensor plus everything about the grid that never changes.

    ``floor(W/s)`` and the per-channel clamp bounds are computed once here, so a step
    costs one sigmoid, one clamp and one multiply.
    """

    def __init__(self, weight: Tensor, grid: QuantGrid) -> None:
        w = weight.detach().float()
        grid = grid.to(w.device)
        self.grid = grid
        scaled = w / grid.scale
        self.weight_floor = torch.floor(scaled)
        # Bounds of floor(W/s) + h so that the integer weight stays in [qmin, qmax].
        self.low = grid.qmin - grid.zero_point
        self.high = grid.qmax - grid.zero_point
        self.v = inverse_rectified_sigmoid(scaled - self.weight_floor).requires_grad_(True)

    def soft(self) -> tuple[Tensor, Tensor]:
        """``(weight, h)``: the differentiable weight used during optimisation and its h(V)."""
        h = rectified_sigmoid(self.v)
        return torch.clamp(self.weight_floor + h, self.low, self.high) * self.grid.scale, h

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """Hard rounding, ``h = (V >= 0)``: the integer weight in ``[qmin, qmax]``."""
        up = (self.v >= 0).to(self.weight_floor.dtype)
        return torch.clamp(self.weight_floor + up + self.grid.zero_point, self.grid.qmin, self.grid.qmax)

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The weight to write back: exactly on the grid."""
        return self.grid.dequantize(self.integer_weight())
