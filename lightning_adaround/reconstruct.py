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

from lightning_adaround.cache import CachePlan, ChunkStore
from lightning_adaround.capture import InputCapture, LayerData, layer_targets
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
    cache_bytes: int = 0  # what this layer kept: cached activations, or moments plus held-out samples


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
    plan = CachePlan(
        device, config.device_cache_bytes, config.host_cache_bytes, config.cache_dir, config.cache_dtype,
        skip_device=config.cache_on_cpu,
    )
    stores: dict[str, ChunkStore] = {}
    for rounded_input, float_input in chain([first], pairs):
        keep, held = holdout.split(rounded_input.shape[0])
        pieces = []
        if held.numel():
            pieces += [("eval_in", rounded_input[held]), ("eval_out", layer_targets(layer, float_input[held], weight, used_ops))]
        if moments is not None:
            same = float_input is rounded_input
            moments.add(rounded_input[keep], None if same else float_input[keep])
        else:
            pieces += [("train_in", rounded_input[keep]), ("train_out", layer_targets(layer, float_input[keep], weight, used_ops))]
        if not stores:  # the first batch: choose where this layer's cache lives
            estimate = len(capture.batches) * sum(plan.stored_bytes(t) for _, t in pieces)
            tier = plan.tier_for(estimate)
            stores = {key: plan.store(tier, len(capture.batches)) for key in ("eval_in", "eval_out", "train_in", "train_out")}
            if tier != plan.tier_for(0):
                note = "; ".join(filter(None, [note, f"cached on {tier} (about {estimate / 2**20:.0f} MiB)"]))
        for key, t in pieces:
            stores[key].add(t)
    data = {key: store.tensor(name) for key, store in stores.items() if store.shapes}
    evaluation = LayerData(data["eval_in"], data["eval_out"]) if "eval_in" in data else None
    # Errors are reported on the held-out samples, or on the training ones when none are held out.
    if moments is not None:
        objective: ReconstructionObjective = MomentsObjective(layer, moments, weight, evaluation, used_ops, device)
        train_samples = moments.samples
    else:
        train = LayerData(data["train_in"], data["train_out"])
        objective = MinibatchObjective(
            layer, train, evaluation or train, config.batch_size, used_ops, generator, device,
        )
        train_samples = train.num_samples
    eval_samples = evaluation.num_samples if evaluation is not None else train_samples
    cache_bytes = sum(t.numel() * t.element_size() for t in data.values())
    if moments is not None:
        cache_bytes += moments.nbytes()
    return LayerObjective(objective, train_samples, eval_samples, used_ops, note, cache_bytes)
