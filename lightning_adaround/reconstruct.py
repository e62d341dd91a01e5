"""Per layer: stream its calibration inputs, hold some out, and build its reconstruction objective.

The one place that decides between the minibatch and the moments form, so the optimiser
loop and the public API stay the same for every layer type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_adaround.capture import InputCapture, LayerData, layer_targets, stack_samples
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.layers import OutputOps, run_with_weight
from lightning_adaround.moments import LayerMoments, moments_supported, patch_dim
from lightning_adaround.objective import MinibatchObjective, MomentsObjective, ReconstructionObjective


@dataclass
class LayerObjective:
    objective: ReconstructionObjective
    num_samples: int
    eval_samples: int
    ops: Optional[OutputOps]
    note: str = ""


class _Holdout:
    """Splits streamed batches so that ``floor(seen * fraction)`` samples are held out so far."""

    def __init__(self, fraction: float, generator: torch.Generator) -> None:
        self.fraction = fraction
        self.generator = generator
        self.seen = 0

    def split(self, n: int) -> tuple[Tensor, Tensor]:
        held = math.floor((self.seen + n) * self.fraction) - math.floor(self.seen * self.fraction)
        self.seen += n
        perm = torch.randperm(n, generator=self.generator)
        return perm[held:].sort().values, perm[:held].sort().values


def _rows_per_sample(layer: nn.Module, sample: Tensor) -> int:
    """Rows of one sample the weight multiplies: tokens for Linear, output positions for conv."""
    if isinstance(layer, nn.Linear):
        return max(1, sample[:1].numel() // layer.in_features)
    with torch.no_grad():
        out = run_with_weight(layer, sample[:1], layer.weight)
    return max(1, out.numel() // out.shape[1])


def choose_form(
    loss_form: str, layer: nn.Module, ops: Optional[OutputOps], batch_size: int, first_input: Tensor,
) -> tuple[str, Optional[OutputOps], str]:
    """``(form, ops used in the loss, note for the summary)`` for one layer.

    ``auto`` takes moments when the layer supports it, no activation was asked for
    explicitly, and one step costs less: ``out * d^2`` against ``3 * rows_per_step * d * out``.
    """
    if loss_form == "minibatch":
        return "minibatch", ops, ""
    if not moments_supported(layer):
        note = "transposed conv: minibatch form" if loss_form == "moments" else ""
        return "minibatch", ops, note
    explicit_activation = ops is not None and not ops.detected and ops.activation is not None
    if loss_form == "auto":
        if explicit_activation:
            return "minibatch", ops, ""
        rows_per_step = batch_size * _rows_per_sample(layer, first_input)
        if patch_dim(layer) > 3 * rows_per_step:
            return "minibatch", ops, ""
    if ops is None:
        return "moments", None, ""
    kept = OutputOps(batchnorm=ops.batchnorm, detected=ops.detected) if ops.channel_scale() is not None else None
    dropped = [type(m).__name__ for m in (ops.activation, ops.batchnorm if kept is None else None) if m is not None]
    note = f"{'/'.join(dropped)} left out of the loss (moments form)" if dropped else ""
    return "moments", kept, note


def build_layer_objective(
    capture: InputCapture,
    name: str,
    layer: nn.Module,
    rounded: dict[str, nn.Module],
    float_weights: dict[str, Tensor],
    ops: Optional[OutputOps],
    config: AdaRoundConfig,
    generator: torch.Generator,
    device: torch.device,
    cache_device: torch.device,
) -> Optional[LayerObjective]:
    """Everything one layer's optimisation needs, or ``None`` when no batch reaches the layer."""
    pairs = capture.pairs(name, layer, rounded, float_weights)
    first = next(pairs, None)
    if first is None:
        return None
    form, used_ops, note = choose_form(config.loss_form, layer, ops, config.batch_size, first[0])
    weight = float_weights[name]
    holdout = _Holdout(config.holdout_fraction, generator)
    moments = LayerMoments(layer, device) if form == "moments" else None
    train_in, train_out, eval_in, eval_out = [], [], [], []
    for rounded_input, float_input in chain([first], pairs):
        keep, held = holdout.split(rounded_input.shape[0])
        if held.numel():
            eval_in.append(rounded_input[held].to(cache_device))
            eval_out.append(layer_targets(layer, float_input[held], weight, used_ops).to(cache_device))
        if moments is not None:
            same = float_input is rounded_input
            moments.add(rounded_input[keep], None if same else float_input[keep])
        else:
            train_in.append(rounded_input[keep].to(cache_device))
            train_out.append(layer_targets(layer, float_input[keep], weight, used_ops).to(cache_device))
    evaluation = LayerData(stack_samples(eval_in, name), stack_samples(eval_out, name)) if eval_in else None
    # Errors are reported on the held-out samples, or on the training ones when none are held out.
    if moments is not None:
        objective: ReconstructionObjective = MomentsObjective(layer, moments, weight, evaluation, used_ops, device)
        train_samples = moments.samples
    else:
        train = LayerData(stack_samples(train_in, name), stack_samples(train_out, name))
        objective = MinibatchObjective(
            layer, train, evaluation or train, config.batch_size, used_ops, generator, device,
        )
        train_samples = train.num_samples
    eval_samples = evaluation.num_samples if evaluation is not None else train_samples
    return LayerObjective(objective, train_samples, eval_samples, used_ops, note)
