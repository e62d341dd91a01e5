"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), before rounding.

In ``layer2(f(layer1(x)))`` with ``f`` commuting with a positive per-channel scale (ReLU,
pooling), dividing output channel ``i`` of ``layer1`` by ``s_i`` and multiplying input
channel ``i`` of ``layer2`` by ``s_i`` leaves the outputs unchanged. ``s_i = sqrt(r1_i / r2_i)``
gives both channels the range ``sqrt(r1_i * r2_i)``: one per-tensor grid then fits every channel.
Pairs are found by the graph walk folding uses (``model/graph.py``); fold BatchNorms first.
A ReLU6/Hardtanh module in between becomes a :class:`ChannelClip` whose bounds are divided too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.model.fold import computed_weight_fix
from lightning_adaround.model.graph import Op, layer_chains
from lightning_adaround.model.layers import _ELEMENTWISE_ACTIVATIONS, BATCH_NORMS, SUPPORTED_LAYER_TYPES, ChannelClip

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Modules with f(x / s) = f(x) / s per channel for every s > 0.
_COMMUTING = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_COMMUTING_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.leaky_relu}
_CLIPPING_FUNCTIONS = {torch.nn.functional.relu6, torch.nn.functional.hardtanh}
_FLATTEN_FUNCTIONS = {torch.flatten}
MAX_SWEEPS = 100
TOLERANCE = 1e-6  # stop when no scale moves by more than this (relative)


_CLIPPING = (nn.Hardtanh, ChannelClip)  # nn.ReLU6 is a Hardtanh(0, 6)


@dataclass
class _Pair:
    first: str
    second: str
    shifts: list[str] = field(default_factory=list)  # unit-scale (folded) BatchNorms in between
    flattened: bool = False  # a Flatten between a convolution and a Linear
    clips: list[tuple[str, bool]] = field(default_factory=list)  # ReLU6/Hardtanh/ChannelClip, after a Flatten?
    blocker: Optional[str] = None  # why it cannot be equalized (from the graph)


def _step(module: Any, name: str) -> tuple[str, Optional[str]]:
    """How an op between two layers behaves: ``pass``, ``shift`` (a BatchNorm), ``clip`` (bounds to divide),
    ``flatten``, ``block`` or ``stop``."""
    if isinstance(module, _COMMUTING):
        return "pass", None
    if isinstance(module, BATCH_NORMS):
        return "shift", None
    if isinstance(module, nn.Flatten):
        return ("flatten", None) if module.start_dim == 1 and module.end_dim == -1 else ("stop", None)
    if isinstance(module, _CLIPPING):
        return "clip", None

    if isinstance(module, _ELEMENTWISE_ACTIVATIONS):
        return "block", f"the {type(module).__name__} {name!r} between them does not commute with a per-channel scale"
    return "stop", None


def _node_step(node: torch.fx.Node, op: Op) -> tuple[str, Optional[str]]:
    if node.op == "call_module":
        return _step(op.module, op.name)
    if node.op == "call_function" and node.target in _COMMUTING_FUNCTIONS:
        return "pass", None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "pass", None
    if node.op == "call_function" and node.target in _CLIPPING_FUNCTIONS:
        return "block", (
            f"the {node.target.__name__} call {node.name!r} between them clips at fixed bounds, and a function "
            "call cannot be given per-channel ones (use an nn.ReLU6 or nn.Hardtanh module instead: equalization "
            "replaces it by an exact per-channel clip)"
        )
    is_method = node.op == "call_method" and node.target == "flatten"  # x.flatten(1): args[0] is x
    if is_method or (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten", None) if start == 1 and end == -1 else ("stop", None)
    return "stop", None


class _Tracer(torch.fx.Tracer):
    """Keeps a :class:`ChannelClip` as one call, so that a second ``equalize_layers`` finds it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelClip) or super().is_leaf_module(m, module_qualified_name)


def _pairs(model: nn.Module) -> list[_Pair]:
    """Layer -> (ops) -> layer paths, each op's output read once, with what lies between recorded."""
    pairs = []
    for first, ops in layer_chains(model, _Tracer()):
        pair = _Pair(first, "")
        for op in ops:
            if op.is_layer:
                if op.calls == 1:
                    pair.second = op.name
                    pairs.append(pair)
                break
            kind, reason = _node_step(op.node, op) if op.node is not None else _step(op.module, op.name)
            if kind == "stop":
                break
            if kind == "clip" and op.calls != 1:
                kind, reason = "block", _shared(op.module, op.name)
            _record(pair, kind, reason, op.name)
    return pairs


def _record(pair: _Pair, kind: str, reason: Optional[str], name: str) -> None:
    if kind == "shift":
        pair.shifts.append(name)
    elif kind == "flatten":
        pair.flattened = True
    elif kind == "clip":
        pair.clips.append((name, pair.flattened))
    elif kind == "block" and pair.blocker is None:
        pair.blocker = reason


def _shared(module: nn.Module, name: str) -> str:
    return (
        f"the {type(module).__name__} {name!r} between them is used in more than one place, so it cannot "
        "be given the per-channel bounds of this pair (give each use its own module)"
    )


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer1, layer2)`` names where ``layer1``'s output reaches only ``layer2``, through ops that
    commute with a per-channel scale (and unit-scale BatchNorms), or ReLU6/Hardtanh modules.

    From the ``torch.fx`` graph when the model traces, else from ``nn.Sequential`` chains.
    Pairs that another activation, a ``relu6``/``hardtanh`` function call or a shared
    (called or registered twice) ReLU6 module in between rules out are left out.
    """
    return [(p.first, p.second) for p in _pairs(model) if p.blocker is None]


def _channels_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _channels_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _why_not(pair: _Pair, modules: dict[str, nn.Module], uses: dict[int, int]) -> Optional[str]:
    first, second = modules[pair.first], modules[pair.second]
    if pair.blocker is not None:
        return pair.blocker
    for name, _ in pair.clips:  # also registered under another name (or twice in one Sequential)
        if uses[id(modules[name])] > 1:
            return _shared(modules[name], name)
    for layer in (first, second):
        if isinstance(layer, _TRANSPOSED):
            return f"{type(layer).__name__} layers are not equalized (only Linear and Conv1d/2d/3d)"
    for name, layer in ((pair.first, first), (pair.second, second)):
        fix = computed_weight_fix(layer, name)
        if fix is not None:
            return (
                f"the weight of {name!r} is computed from other tensors (a parametrization); bake it in first with {fix}"
            )
    for name in pair.shifts:
        bn = modules[name]
        if bn.running_var is None or bn.running_mean is None:
            return f"the BatchNorm {name!r} between them keeps no running statistics"
        unit = torch.all(bn.running_var + bn.eps == 1) and (bn.weight is None or torch.all(bn.weight == 1))
        if not unit:
            return f"the BatchNorm {name!r} between them is not folded; call fold_batchnorm(model) first"
    c1, c2 = _channels_out(first), _channels_in(second)
    conv_to_linear = not isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    if conv_to_linear != pair.flattened or (isinstance(first, nn.Linear) and not isinstance(second, nn.Linear)):
        return (
            f"the {type(first).__name__}'s output channels do not map onto the {type(second).__name__}'s input "
            "channels (only a Flatten(start_dim=1) between a convolution and a Linear is followed)"
        )
    fits = c1 > 0 and (c2 % c1 == 0 if pair.flattened else c2 == c1)
    if not fits:
        return f"{pair.first!r} has {c1} output channels and {pair.second!r} {c2} input channels"
    return None


def _second_view(layer: nn.Module, weight: Tensor, channels: int) -> Tensor:
    """``layer``'s weight as ``(channels, -1)``: row ``i`` holds every weight that reads input channel ``i``.

    A grouped convolution's input channel ``i`` is local channel ``i % per_group`` of group
    ``i // per_group``: it reads only that group's output rows (for a depthwise convolution,
    input channel ``i`` feeds output channels ``i*m ... (i+1)*m - 1``).
    """
    if isinstance(layer, nn.Linear):  # (out, channels * k): k consecutive features per channel after a Flatten
        k = layer.in_features // channels
        return weight.reshape(layer.out_features, channels, k).transpose(0, 1).reshape(channels, -1)
    groups, per_group = layer.groups, weight.shape[1]
    out_per_group = weight.shape[0] // groups
    w = weight.reshape(groups, out_per_group, per_group, -1).permute(0, 2, 1, 3)
    return w.reshape(channels, -1)


def _scale_second(layer: nn.Module, weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with input channel ``i`` multiplied by ``scale[i]``."""
    channels = scale.numel()
    if isinstance(layer, nn.Linear):
        k = layer.in_features // channels
        return weight * scale.repeat_interleave(k).reshape(1, -1)
    groups, per_group = layer.groups, weight.shape[1]
    by_group = scale.reshape(groups, 1, per_group).expand(groups, weight.shape[0] // groups, per_group)
    return weight * by_group.reshape(weight.shape[0], per_group, *([1] * (weight.dim() - 2)))


def _first_ranges(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1).abs().amax(dim=1)


def _equalize(model: nn.Module, pairs: Sequence[_Pair], modules: dict[str, nn.Module]) -> None:
    names = {n for p in pairs for n in (p.first, p.second)}
    weights = {n: modules[n].weight.detach().double() for n in names}
    totals = [torch.ones(_channels_out(modules[p.first]), dtype=torch.float64, device=weights[p.first].device) for p in pairs]
    for _ in range(MAX_SWEEPS):  # a chain l1 -> l2 -> l3 couples its pairs: sweep until nothing moves
        moved = 0.0
        for pair, total in zip(pairs, totals):
            w1, w2 = weights[pair.first], weights[pair.second]
            r1 = _first_ranges(w1)
            r2 = _second_view(modules[pair.second], w2, r1.numel()).abs().amax(dim=1)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
            weights[pair.first] = w1 / s.reshape(-1, *([1] * (w1.dim() - 1)))
            weights[pair.second] = _scale_second(modules[pair.second], w2, s)
            total.mul_(s)
            moved = max(moved, float((s - 1).abs().max()))
        if moved < TOLERANCE:
            break
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(weights[name].to(modules[name].weight.dtype))
        for pair, total in zip(pairs, totals):
            first = modules[pair.first]
            if first.bias is not None:
                first.bias.copy_((first.bias.double() / total).to(first.bias.dtype))
            for bn_name in pair.shifts:  # BN(y / s) = BN(y) / s once its shift is divided too
                bn = modules[bn_name]
                bn.running_mean.copy_((bn.running_mean.double() / total).to(bn.running_mean.dtype))
                if bn.bias is not None:
                    bn.bias.copy_((bn.bias.double() / total).to(bn.bias.dtype))
            for clip_name, after_flatten in pair.clips:
                _divide_clip(model, modules, clip_name, total, pair, after_flatten)


def _divide_clip(
    model: nn.Module, modules: dict[str, nn.Module], name: str, total: Tensor, pair: _Pair, after_flatten: bool,
) -> None:
    """Divide the bounds of the clip ``name`` by the pair's scales; a ReLU6/Hardtanh becomes a ChannelClip."""
    clip = modules[name]
    if not isinstance(clip, ChannelClip):
        first, second = modules[pair.first], modules[pair.second]
        channels = total.numel() * (second.in_features // total.numel() if after_flatten else 1)
        spatial = 0 if after_flatten or isinstance(first, nn.Linear) else first.weight.dim() - 2
        shape = (channels,) + (1,) * spatial
        weight = first.weight
        bound = lambda value: torch.full(shape, float(value), dtype=weight.dtype, device=weight.device)  # noqa: E731
        replacement = ChannelClip(bound(clip.min_val), bound(clip.max_val))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        modules[name] = clip = replacement
    per_entry = total.repeat_interleave(clip.lower.shape[0] // total.numel()).reshape(clip.lower.shape)
    for bound in (clip.lower, clip.upper):
        bound.copy_((bound.double() / per_entry).to(bound.dtype))


def equalize_layers(model: nn.Module, pairs: Optional[Sequence[tuple[str, str]]] = None) -> list[tuple[str, str]]:
    """Equalize the per-channel weight ranges of consecutive layers in place; returns the pairs equalized.

    Args:
        model: Any module, in eval semantics; fold its BatchNorms first (:func:`fold_batchnorm`).
        pairs: ``(layer1, layer2)`` names; by default found from the model's ``torch.fx`` graph
            (``layer1``'s output must reach nothing but ``layer2``: an output that also feeds a
            residual add is left alone), or from its ``nn.Sequential`` chains when it does not trace.
            Named pairs must be connected only through ops that commute with a positive
            per-channel scale (ReLU, LeakyReLU, pooling); unit-scale BatchNorms and ReLU6/Hardtanh
            modules between them are found from the graph.

    Linear -> Linear and Conv1d/2d/3d -> Conv/Linear pairs are equalized, grouped and depthwise
    convolutions included; pairs sharing a layer are swept until the scales settle. An
    ``nn.ReLU6``/``nn.Hardtanh`` module between a pair is replaced in its parent by a
    :class:`ChannelClip` whose bounds are divided by the scales (a ChannelClip left by an
    earlier call is divided again). Every pair found that cannot be equalized (a
    ``F.relu6`` call, a ReLU6 module used in two places, another activation in between, an
    unfolded BatchNorm, a transposed convolution) gets a warning naming it and the reason.
    The model's outputs are unchanged up to float rounding, and its ``state_dict`` keys too;
    the clip bounds are not in the ``state_dict``, so a saved ``state_dict`` reproduces the
    model only in one that was equalized the same way.

    Raises:
        ValueError: ``pairs`` names a module the model lacks or one that is not a Linear/convolution.
    """
    listing = list(model.named_modules(remove_duplicate=False))  # a module registered twice: both names
    modules = dict(listing)
    found = _pairs(model)
    if pairs is None:
        chosen = found
    else:
        known = {(p.first, p.second): p for p in found}
        chosen = []
        for first, second in pairs:
            for name in (first, second):
                if name not in modules:
                    raise ValueError(f"equalize_layers pairs name {name!r}, which is not a module of {type(model).__name__}.")
                if not isinstance(modules[name], SUPPORTED_LAYER_TYPES):
                    raise ValueError(
                        f"equalize_layers pairs {name!r}, a {type(modules[name]).__name__}; pairs are Linear or "
                        "convolution layers."
                    )
            default = _Pair(first, second, flattened=isinstance(modules[second], nn.Linear)
                            and not isinstance(modules[first], nn.Linear))
            chosen.append(known.get((first, second), default))
    uses: dict[int, int] = {}
    for _, module in listing:
        uses[id(module)] = uses.get(id(module), 0) + 1
    usable = []
    for pair in chosen:
        reason = _why_not(pair, modules, uses)
        if reason is None:
            usable.append(pair)
        else:
            warnings.warn(f"Layers {pair.first!r} -> {pair.second!r} are not equalized: {reason}.", stacklevel=2)
    if usable:
        _equalize(model, usable, modules)
    return [(p.first, p.second) for p in usable]


def clips_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts back the model's ReLU6/Hardtanh/ChannelClip modules as they are now.

    :func:`equalize_layers` replaces modules and divides clip bounds, which ``load_state_dict``
    does not undo; call this before it and the returned function after ``load_state_dict``.
    """
    saved = [
        (name, module, [b.clone() for b in module.buffers()] if isinstance(module, ChannelClip) else [])
        for name, module in model.named_modules() if isinstance(module, _CLIPPING)
    ]

    def restore() -> None:
        for name, module, bounds in saved:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
            with torch.no_grad():
                for buffer, value in zip(module.buffers(), bounds):
                    buffer.copy_(value)

    return restore


def channel_range_balance(weight: Tensor, axis: int = 0) -> float:
    """Smallest over largest per-channel max-abs range along ``axis`` (1: every channel uses the full grid)."""
    ranges = weight.detach().transpose(0, axis).reshape(weight.shape[axis], -1).abs().amax(dim=1)
    top = float(ranges.max()) if ranges.numel() else 0.0
    return float(ranges.min()) / top if top > 0 else 1.0


__all__ = ["ChannelClip", "channel_range_balance", "clips_restorer", "equalize_layers", "find_equalization_pairs"]
