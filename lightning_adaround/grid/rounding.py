"""The rounding variable V: per weight, a learnt choice between rounding down and up.

``h(V)`` is the rectified sigmoid of the AdaRound paper; the soft weight starts equal to
the float weight and the final, hard-rounded weight lies exactly on the grid.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_adaround.grid.quant import QuantGrid, group_view, expand_groups

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """The V with ``h(V) == h`` for ``0 <= h < 1``."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


@dataclasses.dataclass(frozen=True)
class Edges:
    """The weights whose ``floor(W/s) + h`` can leave ``[low, high]`` for some ``h`` in ``[0, 1]`` (clipped
    by the scale search, or at the top of the range): flat indices and their bounds. Every other
    weight stays inside, so a step clamps and masks only these few."""

    index: Tensor
    low: Tensor
    high: Tensor

    @staticmethod
    def of(weight_floor: Tensor, low: Tensor, high: Tensor) -> Optional["Edges"]:
        low, high = low.expand_as(weight_floor).reshape(-1), high.expand_as(weight_floor).reshape(-1)
        floor = weight_floor.reshape(-1)
        index = ((floor < low) | (floor + 1.0 > high)).nonzero().flatten()
        return Edges(index, low[index], high[index]) if index.numel() else None


def soft_forward(
    v: Tensor, weight_floor: Tensor, edges: Optional[Edges], scale: Tensor, beta: Optional[float],
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(soft weight, regularizer, saved)``: the step's elementwise work in few passes, no graph.

    ``saved`` is what :func:`soft_backward` needs; ``beta=None`` means no regularizer (0). Masks are
    built from ``sign`` rather than comparisons: on a CPU a float pass costs a fraction of a
    comparison into a bool tensor and of a float-by-bool product.
    """
    s = torch.sigmoid(v)
    h = s.mul(ZETA - GAMMA).add_(GAMMA)
    # 1 where 0 < h < 1, else 0: at exactly 0 (a weight on the grid, a pruned zero) V gets no gradient
    inside = torch.rsub(h, 1.0).sign_().add_(torch.sign(h)).sub_(1.0).clamp_min_(0.0)
    h.clamp_(0.0, 1.0)
    dh_dv = torch.addcmul(s, s, s, value=-1.0).mul_(inside).mul_(ZETA - GAMMA)  # s (1 - s) (zeta - gamma)
    w_int = weight_floor + h  # contiguous (RoundingVariable keeps its tensors so): indexed flat below
    dw_dh = scale
    if edges is not None:
        flat = w_int.view(-1)
        at_edge = flat[edges.index]
        kept = ((at_edge >= edges.low) & (at_edge <= edges.high)).to(flat.dtype)
        flat[edges.index] = torch.minimum(torch.maximum(at_edge, edges.low), edges.high)
        dw_dh = scale.expand_as(w_int).clone(memory_format=torch.contiguous_format)
        dw_dh.view(-1)[edges.index] *= kept
    weight = w_int.mul_(scale)
    if beta is None:
        return weight, weight.new_zeros(()), (dh_dv, dw_dh)
    t = h.mul_(2.0).sub_(1.0)  # 2h - 1
    # |t|^beta below float's normal range only makes denormals (slow on CPUs); both the term
    # and its gradient are < 1e-30 there, so the floor changes nothing measurable.
    magnitude = t.abs().clamp_min_(1e-30 ** (1.0 / beta))
    power = magnitude.pow(beta - 1.0)
    reg = (power * magnitude).neg_().add_(1.0).sum()
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
    (tested), but it keeps three tensors instead of an autograd graph of a dozen ops. A
    ``scale`` that requires grad (learned clipping) gets ``d weight / d scale = weight / scale``,
    the clamped integer-domain value; it then also keeps the weight and the scale.
    """

    @staticmethod
    def forward(ctx, v, weight_floor, edges, scale, beta):
        weight, reg, saved = soft_forward(v, weight_floor, edges, scale, beta)
        ctx.learns_scale = ctx.needs_input_grad[3]
        ctx.save_for_backward(*saved, *((weight, scale) if ctx.learns_scale else ()))
        return weight, reg

    @staticmethod
    def backward(ctx, grad_weight, grad_reg):
        saved, grad_scale = ctx.saved_tensors, None
        if ctx.learns_scale:
            saved, (weight, scale) = saved[:-2], saved[-2:]
            grad_scale = (grad_weight * weight / scale).sum_to_size(scale.shape)
        return soft_backward(saved, grad_weight, grad_reg), None, None, grad_scale, None


class RoundingVariable:
    """Holds V for one weight tensor plus everything about the grid that never changes.

    ``floor(W/s)`` and the per-channel clamp bounds are computed once here, so a step
    costs one sigmoid, one clamp and one multiply.

    ``learn_scale``: also learn the clipping range, a log-multiplier ``log_scale`` per entry of
    the grid's scale (its own shape: per tensor, per channel or per group), so the scale is
    ``searched * exp(log_scale)``. ``floor(W/s)`` stays that of the searched scale and the zero
    point stays the searched integer, so the hard weight is ``(integer - zero_point) * scale``
    on :attr:`grid`, the grid with the learned scale.
    """

    def __init__(self, weight: Tensor, grid: QuantGrid, learn_scale: bool = False) -> None:
        w = weight.detach().float().contiguous()  # a channels_last weight: the steps index it flat
        grid = grid.to(w.device)
        self._grid = grid
        # per group: each group's scale and zero point repeated over its weights, once, so the
        # steps stay elementwise (for per-tensor/per-channel grids these are the grid's own tensors)
        self.scale, zero_point = grid.broadcastable(w.shape)
        scaled = w / self.scale
        self.weight_floor = torch.floor(scaled)
        # Bounds of floor(W/s) + h so that the integer weight stays in [qmin, qmax].
        self.low = grid.qmin - zero_point
        self.high = grid.qmax - zero_point
        self.edges = Edges.of(self.weight_floor, self.low, self.high)
        self.v = inverse_rectified_sigmoid(scaled - self.weight_floor).requires_grad_(True)
        self.log_scale: Optional[Tensor] = (
            torch.zeros_like(grid.scale, dtype=torch.float32).requires_grad_(True) if learn_scale else None
        )

    @property
    def grid(self) -> QuantGrid:
        """The grid the weight is rounded on: the searched one, with the learned scale if any."""
        if self.log_scale is None:
            return self._grid
        return dataclasses.replace(self._grid, scale=self._learned_scale().detach())

    def _learned_scale(self) -> Tensor:
        """``searched scale * exp(log_scale)`` in the grid scale's own shape (exactly the searched at 0)."""
        assert self.log_scale is not None
        return self._grid.scale * torch.exp(self.log_scale)

    def current_scale(self) -> Tensor:
        """The scale broadcast against the weight, differentiable in ``log_scale`` when it is learned."""
        if self.log_scale is None:
            return self.scale
        scale = self._learned_scale()
        size = self._grid.group_size
        return scale if size is None else expand_groups(scale, self.weight_floor.shape, size)

    def scale_grad(self, grad_weight: Tensor, weight: Tensor) -> Tensor:
        """The gradient on ``log_scale`` from the gradient on the soft ``weight``: ``d weight / d log_scale = weight``."""
        assert self.log_scale is not None
        product = grad_weight * weight
        size = self._grid.group_size
        if size is None:
            return product.sum_to_size(self.log_scale.shape)
        return group_view(product, size).sum(-1)

    def soft(self) -> tuple[Tensor, Tensor]:
        """``(weight, h)``: the differentiable weight used during optimisation and its h(V)."""
        h = rectified_sigmoid(self.v)
        return torch.clamp(self.weight_floor + h, self.low, self.high) * self.current_scale(), h

    def soft_with_regularizer(self, beta: Optional[float]) -> tuple[Tensor, Tensor]:
        """``(weight, sum(1 - |2h - 1|^beta))`` in one fused op; ``beta=None``: regularizer 0."""
        return _SoftRounding.apply(self.v, self.weight_floor, self.edges, self.current_scale(), beta)

    @torch.no_grad()
    def soft_step(self, beta: Optional[float]) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """:meth:`soft_with_regularizer` without autograd, plus what :func:`soft_backward` needs."""
        return soft_forward(self.v, self.weight_floor, self.edges, self.current_scale(), beta)

    @torch.no_grad()
    def refit_scale(self, channel_error: Callable[..., Tensor]) -> int:
        """Set each learned scale to the one that minimises the error of the final integer weights; how many moved.

        ``channel_error(weight, exact=True)``: the error per output channel (weight dim 0) up to a
        constant per channel, a quadratic in the scale for fixed integers (the moments form's), so
        three evaluations give each channel's best scale exactly. For a scale per output channel,
        or one per tensor (the channels' errors summed); a group's scale shares its channel's error
        with the other groups, so per-group scales are left as learned (returns 0). A scale moves
        only where its error drops.
        """
        if self.log_scale is None or self._grid.group_size is not None:
            return 0
        per_channel = self._resets_per_channel()
        if not per_channel and self.log_scale.numel() != 1:
            return 0
        scale = self._learned_scale().double()
        unit = (self.integer_weight() - self._zero_point()).double()  # the integer weight less the zero point

        def error(k: Tensor) -> Tensor:
            e = channel_error((unit * scale * k).float(), exact=True).double()
            return e if per_channel else e.sum().reshape(1)

        shape = scale.shape if per_channel else (1,) * scale.dim()
        ones = torch.ones(shape, dtype=torch.float64, device=scale.device)
        e0, e1, e2 = error(ones * 0.0), error(ones), error(ones * 2.0)
        curvature = (e2 - 2.0 * e1 + e0) / 2.0  # e(k) = curvature k^2 + slope k + e0, k = new scale / learned
        slope = e1 - e0 - curvature
        best = torch.where(curvature > 0, -slope / (2.0 * curvature).clamp_min(1e-300), ones.flatten())
        best = torch.where(best > 0, best, ones.flatten())
        better = error(best.reshape(shape)) < e1
        factor = torch.where(better, best, ones.flatten()).reshape(shape).to(self.log_scale.dtype)
        self.log_scale.add_(torch.log(factor))
        return int(better.sum())

    def _resets_per_channel(self) -> bool:
        """Whether each output channel (weight dim 0) has scale entries of its own, which can be reset."""
        grid = self._grid
        if grid.group_size is not None:
            return True
        return grid.axis == 0 and grid.scale.dim() == self.v.dim() and grid.scale.shape[0] == self.v.shape[0] > 1

    def _nearest_grid(self) -> QuantGrid:
        """The grid :meth:`use_nearest` rounds on: the searched one (resetting the channel's learned
        scale), or the learned one where a channel has no scale of its own (per tensor)."""
        if self.log_scale is None or self._resets_per_channel():
            return self._grid
        return self.grid

    @torch.no_grad()
    def nearest_weight(self, weight: Tensor) -> Tensor:
        """The hard weight :meth:`use_nearest` gives a channel, for every channel at once."""
        grid = self._nearest_grid()
        if grid is self._grid:
            return grid.fake_quantize(weight.float())
        return grid.dequantize(torch.clamp(self.weight_floor + self._nearest_up(weight, grid) + self._zero_point(),
                                           grid.qmin, grid.qmax))

    def _nearest_up(self, weight: Tensor, grid: QuantGrid) -> Tensor:
        return (grid.quantize(weight.float()) - self._zero_point() - self.weight_floor).clamp(0.0, 1.0)

    @torch.no_grad()
    def use_nearest(self, weight: Tensor, channels: Tensor) -> None:
        """Set V so that the output channels where ``channels`` (bool, weight dim 0) is true round to nearest.

        With a learned scale those channels get the searched scale back where they have their own
        (per channel, per group); per tensor they round to nearest on the learned grid.
        """
        grid = self._nearest_grid()
        up = self._nearest_up(weight, grid)
        mask = channels.to(self.v.device).reshape(-1, *((1,) * (self.v.dim() - 1)))
        self.v.copy_(torch.where(mask, up * 2.0 - 1.0, self.v))
        if self.log_scale is not None and grid is self._grid:
            own = channels.to(self.v.device).reshape(-1, *((1,) * (self.log_scale.dim() - 1)))
            self.log_scale.masked_fill_(own, 0.0)

    def state(self) -> tuple[Tensor, Optional[Tensor]]:
        """Copies of V and the learned log-scale, to undo a change with :meth:`load_state`."""
        return self.v.detach().clone(), None if self.log_scale is None else self.log_scale.detach().clone()

    @torch.no_grad()
    def load_state(self, state: tuple[Tensor, Optional[Tensor]]) -> None:
        v, log_scale = state
        self.v.copy_(v)
        if log_scale is not None and self.log_scale is not None:
            self.log_scale.copy_(log_scale)

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """Hard rounding, ``h = (V >= 0)``: the integer weight in ``[qmin, qmax]``."""
        up = (self.v >= 0).to(self.weight_floor.dtype)
        grid = self._grid
        return torch.clamp(self.weight_floor + up + self._zero_point(), grid.qmin, grid.qmax)

    def _zero_point(self) -> Tensor:
        """The zero point laid out like ``low`` (exact: small integers), not kept as one more weight-sized tensor."""
        return self._grid.qmin - self.low

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """The weight to write back: exactly on :attr:`grid` (with the learned scale, if any)."""
        return self.grid.dequantize(self.integer_weight())
