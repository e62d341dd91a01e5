"""The rounding variable V: per weight, a learnt choice between rounding down and up.

``h(V)`` is the rectified sigmoid of the AdaRound paper; the soft weight starts equal to
the float weight and the final, hard-rounded weight lies exactly on the grid.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_adaround.grid.quant import QuantGrid

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """The V with ``h(V) == h`` for ``0 <= h < 1``."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def soft_forward(
    v: Tensor, weight_floor: Tensor, low: Tensor, high: Tensor, scale: Tensor, beta: Optional[float],
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(soft weight, regularizer, saved)``: the step's elementwise work in one pass, no graph.

    ``saved`` is what :func:`soft_backward` needs; ``beta=None`` means no regularizer (0).
    """
    s = torch.sigmoid(v)
    h = s * (ZETA - GAMMA) + GAMMA
    h_inside = (h > 0) & (h < 1)
    h.clamp_(0.0, 1.0)
    w_int = weight_floor + h
    dw_dh = ((w_int >= low) & (w_int <= high)) * scale
    weight = torch.minimum(torch.maximum(w_int, low), high).mul_(scale)
    dh_dv = s.mul_(1.0 - s).mul_(ZETA - GAMMA).mul_(h_inside)
    if beta is None:
        return weight, weight.new_zeros(()), (dh_dv, dw_dh)
    t = h.mul_(2.0).sub_(1.0)  # 2h - 1
    # |t|^beta below float's normal range only makes denormals (slow on CPUs); both the term
    # and its gradient are < 1e-30 there, so the floor changes nothing measurable.
    magnitude = t.abs().clamp_min_(1e-30 ** (1.0 / beta))
    power = magnitude.pow(beta - 1.0)
    reg = (1.0 - power * magnitude).sum()
    dreg_dh = power.mul_(t.sign_()).mul_(-2.0 * beta)
    return weight, reg, (dh_dv, dw_dh, dreg_dh)


def soft_backward(saved: tuple[Tensor, ...], grad_weight: Tensor, grad_reg: Optional[Tensor | float]) -> Tensor:
    """The gradient on V from the gradients on the soft weight and on the regularizer."""
    dh_dv, dw_dh = saved[0], saved[1]
    grad = grad_weight * dw_dh
    if len(saved) == 3 and grad_reg is not None:
        # a Python number, or autograd's 0-dim gradient on the same device: CUDA's ternary ops
        # (addcmul) reject a CPU 0-dim tensor beside device tensors, so none is made here
        if isinstance(grad_reg, Tensor):
            grad.addcmul_(saved[2], grad_reg.to(grad.dtype))
        else:
            grad.add_(saved[2], alpha=float(grad_reg))
    return grad.mul_(dh_dv)


class _SoftRounding(torch.autograd.Function):
    """Soft weight and regularizer as one autograd node with the hand-written gradient.

    Equal to autograd through :meth:`RoundingVariable.soft` plus :func:`rounding_regularizer`
    (tested), but it keeps three tensors instead of an autograd graph of a dozen ops.
    """

    @staticmethod
    def forward(ctx, v, weight_floor, low, high, scale, beta):
        weight, reg, saved = soft_forward(v, weight_floor, low, high, scale, beta)
        ctx.save_for_backward(*saved)
        return weight, reg

    @staticmethod
    def backward(ctx, grad_weight, grad_reg):
        return soft_backward(ctx.saved_tensors, grad_weight, grad_reg), None, None, None, None, None


class RoundingVariable:
    """Holds V for one weight tensor plus everything about the grid that never changes.

    ``floor(W/s)`` and the per-channel clamp bounds are computed once here, so a step
    costs one sigmoid, one clamp and one multiply.
    """

    def __init__(self, weight: Tensor, grid: QuantGrid) -> None:
        w = weight.detach().float()
        grid = grid.to(w.device)
        self.grid = grid
        # per group: each group's scale and zero point repeated over its weights, once, so the
        # steps stay elementwise (for per-tensor/per-channel grids these are the grid's own tensors)
        self.scale, zero_point = grid.broadcastable(w.shape)
        scaled = w / self.scale
        self.weight_floor = torch.floor(scaled)
        # Bounds of floor(W/s) + h so that the integer weight stays in [qmin, qmax].
        self.low = grid.qmin - zero_point
        self.high = grid.qmax - zero_point
        self.v = inverse_rectified_sigmoid(scaled - self.weight_floor).requires_grad_(True)

    def soft(self) -> tuple[Tensor, Tensor]:
        """``(weight, h)``: the differentiable weight used during optimisation and its h(V)."""
        h = rectified_sigmoid(self.v)
        return torch.clamp(self.weight_floor + h, self.low, self.high) * self.scale, h

    def soft_with_regularizer(self, beta: Optional[float]) -> tuple[Tensor, Tensor]:
        """``(weight, sum(1 - |2h - 1|^beta))`` in one fused op; ``beta=None``: regularizer 0."""
        return _SoftRounding.apply(self.v, self.weight_floor, self.low, self.high, self.scale, beta)

    @torch.no_grad()
    def soft_step(self, beta: Optional[float]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """:meth:`soft_with_regularizer` without autograd, plus what :func:`soft_backward` needs."""
        return soft_forward(self.v, self.weight_floor, self.low, self.high, self.scale, beta)

    @torch.no_grad()
    def use_nearest(self, weight: Tensor, channels: Tensor) -> None:
        """Set V so that the output channels where ``channels`` (bool, weight dim 0) is true round to nearest."""
        up = (self.grid.quantize(weight.float()) - self._zero_point() - self.weight_floor).clamp(0.0, 1.0)
        mask = channels.to(self.v.device).reshape(-1, *((1,) * (self.v.dim() - 1)))
        self.v.copy_(torch.where(mask, up * 2.0 - 1.0, self.v))

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """Hard rounding, ``h = (V >= 0)``: the integer weight in ``[qmin, qmax]``."""
        up = (self.v >= 0).to(self.weight_floor.dtype)
        return torch.clamp(self.weight_floor + up + self._zero_point(), self.grid.qmin, self.grid.qmax)

    def _zero_point(self) -> Tensor:
        """The zero point laid out like ``low`` (exact: small integers), not kept as one more weight-sized tensor."""
        return self.grid.qmin - self.low

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The weight to write back: exactly on the grid."""
        return self.grid.dequantize(self.integer_weight())
