"""The rounding variable V: per weight, a learnt choice between rounding down and up.

``h(V)`` is the rectified sigmoid of the AdaRound paper; the soft weight starts equal to
the float weight and the final, hard-rounded weight lies exactly on the grid.
"""

from __future__ import annotations

from typing import Optional

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


class _SoftRounding(torch.autograd.Function):
    """Soft weight and regularizer in one pass, with the gradient on V written out by hand.

    Equal to autograd through :meth:`RoundingVariable.soft` plus :func:`rounding_regularizer`
    (tested), but it keeps three tensors instead of an autograd graph of a dozen ops.
    """

    @staticmethod
    def forward(ctx, v, weight_floor, low, high, scale, beta):
        s = torch.sigmoid(v)
        h = s * (ZETA - GAMMA) + GAMMA
        h_inside = (h > 0) & (h < 1)
        h.clamp_(0.0, 1.0)
        w_int = weight_floor + h
        dw_dh = ((w_int >= low) & (w_int <= high)) * scale
        weight = torch.minimum(torch.maximum(w_int, low), high).mul_(scale)
        dh_dv = s.mul_(1.0 - s).mul_(ZETA - GAMMA).mul_(h_inside)
        ctx.regularizing = beta is not None
        if beta is None:
            ctx.save_for_backward(dh_dv, dw_dh)
            return weight, weight.new_zeros(())
        t = h.mul_(2.0).sub_(1.0)  # 2h - 1
        magnitude = t.abs()
        power = magnitude.pow(beta - 1.0)
        reg = (1.0 - power * magnitude).sum()
        dreg_dh = power.mul_(t.sign_()).mul_(-2.0 * beta)
        ctx.save_for_backward(dh_dv, dw_dh, dreg_dh)
        return weight, reg

    @staticmethod
    def backward(ctx, grad_weight, grad_reg):
        if ctx.regularizing:
            dh_dv, dw_dh, dreg_dh = ctx.saved_tensors
            grad = torch.addcmul(grad_weight * dw_dh, dreg_dh, grad_reg)
        else:
            dh_dv, dw_dh = ctx.saved_tensors
            grad = grad_weight * dw_dh
        return grad.mul_(dh_dv), None, None, None, None, None


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

    def soft_with_regularizer(self, beta: Optional[float]) -> tuple[Tensor, Tensor]:
        """``(weight, sum(1 - |2h - 1|^beta))`` in one fused op; ``beta=None``: regularizer 0."""
        return _SoftRounding.apply(self.v, self.weight_floor, self.low, self.high, self.grid.scale, beta)

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """Hard rounding, ``h = (V >= 0)``: the integer weight in ``[qmin, qmax]``."""
        up = (self.v >= 0).to(self.weight_floor.dtype)
        return torch.clamp(self.weight_floor + up + self.grid.zero_point, self.grid.qmin, self.grid.qmax)

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The weight to write back: exactly on the grid."""
        return self.grid.dequantize(self.integer_weight())
