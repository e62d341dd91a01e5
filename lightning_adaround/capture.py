"""Collecting what one layer sees: its input in the partly rounded model, its float target.

Each pass stops at the layer (a pre-forward hook raises), so nothing past it is computed,
and only that layer's tensors are kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.layers import run_with_weight

ForwardFn = Callable[[nn.Module, Any], Any]


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the layer being captured."""


@dataclass
class LayerData:
    """One layer's cached calibration tensors, first dim = samples."""

    inputs: Tensor  # the layer's input in the model with earlier layers already rounded
    targets: Tensor  # activation(layer(float input)) with the float weight

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list's first element is; a dict is keyword arguments."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"cannot turn a calibration batch of type {type(batch).__name__} into a forward call; "
        "pass forward_fn=lambda model, batch: model(...) to say how."
    )


def execution_order(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batch: Any, forward_fn: ForwardFn
) -> list[str]:
    """Names of ``layers`` in the order one forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, module in layers:
        def record(_module, _args, name=name):
            if name not in order:
                order.append(name)
        handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _input_reaching(model: nn.Module, layer: nn.Module, batch: Any, forward_fn: ForwardFn) -> Optional[Tensor]:
    """The first input ``layer`` receives when the model runs on ``batch``; the pass stops there."""
    seen: list[Tensor] = []

    def stop_here(_module, args):
        seen.append(args[0].detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(stop_here)
    try:
        with torch.no_grad():
            forward_fn(model, batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


@contextmanager
def float_weights(modules: dict[str, nn.Module], weights: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put the float weights back into already rounded layers."""
    saved = {name: modules[name].weight.data for name in weights}
    try:
        for name, w in weights.items():
            modules[name].weight.data = w
        yield
    finally:
        for name, w in saved.items():
            modules[name].weight.data = w


def layer_input_pairs(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    batches: Sequence[Any],
    forward_fn: ForwardFn,
    rounded: dict[str, nn.Module],
    float_weight_of: dict[str, Tensor],
) -> Iterator[tuple[Tensor, Tensor]]:
    """Per batch that reaches ``layer``: its input in the partly rounded model and in the float one.

    Streamed batch by batch, so a caller can reduce them (moments) without keeping them.
    """
    for batch in batches:
        rounded_input = _input_reaching(model, layer, batch, forward_fn)
        if rounded_input is None:
            continue
        if rounded:
            with float_weights(rounded, {n: float_weight_of[n] for n in rounded}):
                float_input = _input_reaching(model, layer, batch, forward_fn)
        else:
            float_input = rounded_input  # nothing rounded yet: both models agree
        for what, t in (("input", rounded_input), ("float-model input", float_input)):
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"the {what} of layer {name!r} contains NaN or Inf on the calibration data; "
                    "check the model and the calibration batches (or exclude this layer)."
                )
        yield rounded_input, float_input


def stack_samples(chunks: list[Tensor], name: str) -> Tensor:
    """Concatenate per-batch tensors along samples (Linear inputs of varying length: rows)."""
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) == 1:
        return torch.cat(chunks, dim=0)
    if all(c.dim() >= 2 for c in chunks) and len({c.shape[-1] for c in chunks}) == 1:
        # Linear layers fed with varying sequence lengths: every row is a sample.
        return torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks], dim=0)
    raise ValueError(
        f"layer {name!r} received inputs of different shapes {sorted(shapes)} across calibration "
        "batches; give calibration batches of one input shape (resize or pad them)."
    )


@torch.no_grad()
def layer_targets(
    layer: nn.Module, inputs: Tensor, weight: Tensor, activation: Optional[Callable[[Tensor], Tensor]],
    chunk: int = 256,
) -> Tensor:
    """``activation(layer(inputs))`` computed in chunks, stored where ``inputs`` live."""
    device = weight.device
    outs = []
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start:start + chunk].to(device)
        y = run_with_weight(layer, x, weight)
        if activation is not None:
            y = activation(y)
        outs.append(y.to(inputs.device))
    return torch.cat(outs, dim=0)
