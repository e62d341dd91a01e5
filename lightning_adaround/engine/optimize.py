"""The per-layer optimisation loop: Adam on V (and a learned clipping range, if asked),
reconstruction plus annealed regularizer.

Shared by every unit and both objective forms; with several processes an ``average_gradients``
hook (the reducer's) averages the gradients of every learned tensor, and the loss, before each update.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lightning_adaround.grid.loss import BetaSchedule
from lightning_adaround.engine.objective import ReconstructionObjective
from lightning_adaround.observer import RoundingStopped
from lightning_adaround.grid.rounding import RoundingVariable, soft_backward

GradientAverage = Callable[[list[Tensor], Tensor], Tensor]  # (grads, loss) -> loss over every process
StepLogger = Callable[[int, dict[str, float]], None]


def optimize_rounding(
    rounding: RoundingVariable | Sequence[RoundingVariable],
    objective: ReconstructionObjective,
    iterations: int,
    lr: float,
    reg_lambda: float,
    schedule: BetaSchedule,
    average_gradients: Optional[GradientAverage] = None,
    on_log: Optional[StepLogger] = None,
    log_every_n_steps: int = 50,
    should_stop: Optional[Callable[[], bool]] = None,
    scale_lr: Optional[float] = None,
) -> None:
    """Run ``iterations`` Adam steps on ``rounding.v``; V is left at its final value.

    A rounding that learns its scale (``log_scale``) has it stepped too, in a parameter group of
    its own with learning rate ``scale_lr`` (``None``: ``lr``).

    Several roundings (a block's layers) are optimised jointly: the objective takes their soft
    weights as a list and the regularizer is summed over them. An objective with
    ``value_and_grad(weight)`` (the moments form, one layer) is stepped without autograd: its
    gradient on the weight goes straight through :func:`soft_backward`.
    """
    group = [rounding] if isinstance(rounding, RoundingVariable) else list(rounding)  # a unit's layers
    scales = [r.log_scale for r in group if r.log_scale is not None]
    params: list[dict] = [{"params": [r.v for r in group]}]
    if scales:
        params.append({"params": scales, "lr": lr if scale_lr is None else scale_lr})
    optimizer = _adam(params, lr)
    value_and_grad = getattr(objective, "value_and_grad", None) if len(group) == 1 else None
    for step in range(iterations):
        if should_stop is not None and should_stop():
            raise RoundingStopped(f"stopped on request at step {step} of {iterations}")
        optimizer.zero_grad(set_to_none=True)
        regularizing = schedule.regularizing(step)
        beta = schedule.beta(step)
        if value_and_grad is not None:
            weight, reg, saved = group[0].soft_step(beta if regularizing else None)
            recon, grad_weight = value_and_grad(weight)
            if group[0].log_scale is not None:
                group[0].log_scale.grad = group[0].scale_grad(grad_weight, weight)
            group[0].v.grad = soft_backward(saved, grad_weight, reg_lambda if regularizing else None)
        else:
            soft = [r.soft_with_regularizer(beta if regularizing else None) for r in group]
            weights = [w for w, _ in soft]
            reg = soft[0][1] if len(soft) == 1 else torch.stack([r for _, r in soft]).sum()
            recon = objective.step_loss(weights)
            loss = recon + reg_lambda * reg if regularizing else recon
            loss.backward()
        if average_gradients is not None:
            recon = average_gradients([r.v.grad for r in group] + [s.grad for s in scales], recon.detach())
        optimizer.step()
        last = step == iterations - 1
        if on_log is not None and (step % log_every_n_steps == 0 or last):
            on_log(step, {
                "recon_loss": float(recon.detach()),
                "reg_loss": float(reg.detach()),
                "beta": beta,
            })


def _adam(params: list[dict], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over V and its state per step instead of several) where
    this torch has one for the parameters' device: CUDA, and the CPU from torch 2.4; else the default."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)
