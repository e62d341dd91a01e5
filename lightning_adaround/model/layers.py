"""Which modules AdaRound can round, and one way to run any of them with a substitute weight.

Every supported layer runs through its own ``forward`` via ``torch.func.functional_call``,
so stride, padding modes, groups and transposed convolutions need no code of ours.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def weight_channel_axis(module: nn.Module) -> int:
    """The weight axis that indexes output channels: 1 for transposed convolutions, else 0."""
    return 1 if getattr(module, "transposed", False) else 0


def output_major(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` laid out as ``(out_channels, ...)``; only transposed convolutions need a change.

    A transposed conv stores ``(in, out/groups, k...)``: with groups > 1, weight axis 1 is
    not the output channel, so per-channel scales must be found in this layout.
    """
    if not getattr(module, "transposed", False):
        return weight
    groups = module.groups
    cin, per_group = weight.shape[:2]
    grouped = weight.reshape(groups, cin // groups, per_group, *weight.shape[2:]).transpose(1, 2)
    return grouped.reshape(groups * per_group, cin // groups, *weight.shape[2:])


def per_channel_to_weight_layout(module: nn.Module, values: Tensor, weight: Tensor) -> Tensor:
    """Per-output-channel ``values`` (shape ``(out, 1, ...)``) made to broadcast against ``weight``."""
    if not getattr(module, "transposed", False):
        return values
    groups = module.groups
    cin, per_group = weight.shape[:2]
    ones = (1,) * (weight.dim() - 2)
    if groups == 1:
        return values.reshape(1, per_group, *ones)
    spread = values.reshape(groups, 1, per_group).expand(groups, cin // groups, per_group)
    return spread.reshape(cin, per_group, *ones)


def output_channel_dim(module: nn.Module) -> int:
    """The activation dim holding output channels: last for Linear, 1 for convolutions."""
    return -1 if isinstance(module, nn.Linear) else 1


ForwardFn = Callable[[nn.Module, Any], Any]


def forward_with_hooks(model: nn.Module, batch: Any, forward_fn: ForwardFn, handles: Sequence[Any]) -> None:
    """One ``forward_fn(model, batch)`` without autograd, for hooks that observe it; they are removed after."""
    try:
        with torch.no_grad():
            forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def positional_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's ``(args, kwargs)`` with its first input positional: ``fc(input=x)`` is recorded as
    ``fc(x)`` (the same call), the form every reader of a recorded call takes its input from."""
    kwargs = dict(kwargs)
    if not args and kwargs:
        # the class's forward: an instance's may be wrapped (*args, **kwargs) while a pass runs
        first = next(iter(list(inspect.signature(type(module).forward).parameters.values())[1:]), None)
        if first is not None and first.kind is first.POSITIONAL_OR_KEYWORD and first.name in kwargs:
            return (kwargs.pop(first.name),), kwargs
    return args, kwargs


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rounding computes in: float32, or float64 for a float64 model, never half precision."""
    return torch.promote_types(dtype, torch.float32)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def cast_tensors(module: nn.Module, dtype: torch.dtype, skip: Iterable[str] = ()) -> dict[str, Tensor]:
    """``module``'s float parameters and buffers not already in ``dtype`` (but those in ``skip``), cast."""
    skip = set(skip)
    return {
        name: t.to(dtype)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if t.is_floating_point() and t.dtype != dtype and name not in skip
    }


def call_in_dtype(
    module: nn.Module, args: tuple, kwargs: dict, overrides: dict[str, Tensor], dtype: torch.dtype,
    cast: Optional[dict[str, Tensor]] = None,
) -> Any:
    """``module``'s own forward with ``overrides`` in place and every float tensor it uses in ``dtype``.

    A bfloat16/float16 model is optimised in float32: its other parameters and buffers (bias,
    BatchNorm statistics, clip bounds) and the float arguments are cast for the call, so one
    dtype runs through the forward. A model already in ``dtype`` costs nothing extra. ``cast``:
    :func:`cast_tensors` computed once by a caller that runs the module many times.
    """
    params = dict(cast if cast is not None else cast_tensors(module, dtype, overrides))
    params.update(overrides)
    args = tuple(_cast(a, dtype) for a in args)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    if not params:
        return module(*args, **kwargs)
    return torch.func.functional_call(module, params, args, kwargs)


def run_with_weight(module: nn.Module, inputs: Tensor, weight: Tensor) -> Tensor:
    """The module's own forward with ``weight`` in place of its weight, computed in ``weight.dtype``."""
    return call_in_dtype(module, (inputs,), {}, {"weight": weight}, weight.dtype)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_layer_types(layer_types: Sequence[type[nn.Module]]) -> None:
    unsupported = [t for t in layer_types if not (isinstance(t, type) and issubclass(t, SUPPORTED_LAYER_TYPES))]
    if unsupported:
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
        raise TypeError(
            f"layer_types has unsupported entries {[getattr(t, '__name__', t) for t in unsupported]}; "
            f"choose among {names}."
        )


def select_layers(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    layer_types: Sequence[type[nn.Module]] = SUPPORTED_LAYER_TYPES,
) -> list[tuple[str, nn.Module]]:
    """Supported modules of the requested types whose names match ``include`` (globs) and not ``exclude``."""
    check_layer_types(layer_types)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, tuple(layer_types)):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        chosen.append((name, module))
    return chosen


_MHA_ADVICE = (
    "nn.MultiheadAttention computes its projections with F.multi_head_attention_forward from in_proj_weight "
    "and out_proj.weight, never calling a layer, and the library cannot round a weight outside a layer's own "
    "forward yet; for a quantized attention write it with nn.Linear q/k/v/out projections that its forward "
    "calls (with F.scaled_dot_product_attention), or keep it in float knowingly"
)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def _own_parameters(module: nn.Module, skip: set[int]) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in module._parameters.items() if p is not None and id(p) not in skip]


def _unsupported_reason(module: nn.Module, params: list[tuple[str, Tensor]]) -> tuple[str, str, str]:
    """``(kind, reason, advice)`` for a module of a type the library does not round."""
    from lightning_adaround.result import NORM_OR_BIAS, UNSUPPORTED

    kind = type(module).__name__
    matrices = ", ".join(n for n, p in params if p.dim() >= 2)
    if isinstance(module, nn.MultiheadAttention):
        return UNSUPPORTED, f"MultiheadAttention's own {matrices or 'biases'} not rounded", _MHA_ADVICE
    if not matrices:
        return NORM_OR_BIAS, "1-D parameters only (norm scales, biases)", "Normally kept in float"
    if isinstance(module, nn.Embedding):
        return UNSUPPORTED, f"unsupported type {kind} (a lookup table)", (
            "Looked-up rows are not multiplied, so AdaRound's output reconstruction does not apply; round the rows "
            "to nearest on an MSE grid yourself (docs/troubleshooting.md, 'Weights left in float') or keep it in float"
        )
    if isinstance(module, _RECURRENT):
        return UNSUPPORTED, f"unsupported type {kind} (a fused recurrent kernel)", (
            "Its gate weights run inside a fused recurrent kernel, not through layers the library can call; keep it "
            "in float or write the cell with nn.Linear gates"
        )
    supported = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
    return UNSUPPORTED, f"unsupported type {kind} ({matrices})", f"The library rounds {supported} weights only"


def float_modules(
    model: nn.Module,
    rounded: Iterable[str],
    config: Any,
    unreached: Sequence[str] = (),
    read: Optional[set[int]] = None,
    ran: Optional[set[str]] = None,
) -> dict[str, Any]:
    """Every module of ``model`` that owns parameters and kept them all in float: name -> ``FloatModule``.

    ``rounded``: the layers rounded; ``config``: the run's ``AdaRoundConfig`` (``layers``, ``exclude``,
    ``layer_types`` say why a supported layer was not selected); ``unreached``: selected layers no
    calibration batch called; ``read``: ``id``s of weights the forward pass handed to some torch function
    (``None``: unknown); ``ran``: names of the modules one forward pass called. A parameter shared with a
    rounded weight (tied weights) was rounded with it and does not count.
    """
    from lightning_adaround.result import FloatModule

    modules = dict(model.named_modules())
    rounded = set(rounded)
    done = {id(modules[n].weight) for n in rounded}
    unreached = set(unreached)
    found: dict[str, Any] = {}
    for name, module in modules.items():
        if name in rounded:
            continue
        params = _own_parameters(module, done)
        if not params:
            continue
        weight = getattr(module, "weight", None)
        if is_supported(module) and isinstance(weight, Tensor) and id(weight) not in done:
            kind, reason, advice = _supported_reason(name, module, config, name in unreached, read, ran, modules)
        else:
            kind, reason, advice = _unsupported_reason(module, params)
        matrices = [p.numel() for _, p in params if p.dim() >= 2]
        found[name] = FloatModule(
            type(module).__name__, kind, reason, advice, sum(p.numel() for _, p in params), max(matrices, default=0),
        )
    return found


def _supported_reason(
    name: str, module: nn.Module, config: Any, unreached: bool, read: Optional[set[int]],
    ran: Optional[set[str]], modules: dict[str, nn.Module],
) -> tuple[str, str, str]:
    from lightning_adaround.result import EXCLUDED, NOT_CALLED, UNREACHED

    if not isinstance(module, tuple(config.layer_types)):
        return EXCLUDED, f"excluded by layer_types (not a {'/'.join(t.__name__ for t in config.layer_types)})", ""
    if config.layers is not None and not _matches(name, config.layers):
        return EXCLUDED, f"excluded: matches none of layers={list(config.layers)!r}", ""
    pattern = next((p for p in config.exclude if fnmatch.fnmatchcase(name, p)), None)
    if pattern is not None:
        return EXCLUDED, f"excluded by exclude={pattern!r}", ""
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        return NOT_CALLED, "used without a module call (by MultiheadAttention)", _MHA_ADVICE
    if unreached and read is not None and id(module.weight) in read:
        who = f"{type(parent).__name__} {parent_name!r}" if parent_name else "the model"
        return NOT_CALLED, f"used without a module call (its weight is read in {who}'s forward)", (
            "The library rounds a layer through its own forward, so a weight read directly (F.linear(x, "
            "layer.weight)) cannot be rounded; call the layer there instead, or exclude it to keep it in float "
            "knowingly"
        )
    if unreached and read is None and ran is not None and parent_name in ran:
        return UNREACHED, "unreached: never called although its parent ran", (
            "If the parent reads its weight directly, call the layer there instead (the library rounds a layer "
            "through its own forward); if it is a branch these inputs never take, use calibration data that takes it"
        )
    return UNREACHED, "unreached: no calibration batch called it", (
        "Use calibration data that takes the branch that calls it, or exclude it to keep it in float knowingly"
    )


def bits_for(name: str, default_bits: int, overrides: dict[str, int]) -> int:
    """The bit width for layer ``name``: the first matching glob in ``overrides`` wins."""
    for pattern, bits in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    return default_bits


class ChannelClip(nn.Module):
    """``min(max(x, lower), upper)`` with one bound per channel: what a ReLU6 or Hardtanh becomes
    when equalization scales the channels it clips.

    ``clip(x / s, l, u) = clip(x, l s, u s) / s``, so ``clip(x, l / s, u / s)`` after a layer whose
    channel ``i`` was divided by ``s_i`` gives the old output divided by ``s_i``: exactly what the
    next layer, multiplied by ``s_i``, expects. ``lower`` and ``upper`` are buffers shaped to
    broadcast against the channel dim (``(C, 1, 1)`` after a Conv2d, ``(C,)`` after a Linear).
    They are saved in the ``state_dict`` (as ``<activation>.lower``/``.upper``): a checkpoint of an
    equalized model loaded into a model with the original ReLU6 fails loudly on those keys,
    instead of silently clipping at the wrong place.
    """

    lower: Tensor
    upper: Tensor

    def __init__(self, lower: Tensor, upper: Tensor) -> None:
        super().__init__()
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, self.lower), self.upper)

    def extra_repr(self) -> str:
        return f"channels={self.lower.shape[0]}"


_ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Mish, ChannelClip,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class OutputOps:
    """What a layer's loss applies to its output: an optional BatchNorm, then an optional activation.

    ``detected`` marks ops the library found by itself (a user's explicit activation is not).
    """

    batchnorm: Optional[nn.Module] = None
    activation: Optional[Callable[[Tensor], Tensor]] = None
    detected: bool = False

    def __call__(self, output: Tensor) -> Tensor:
        """In ``output``'s dtype: a half-precision model's BatchNorm runs in float32 with the float32 output."""
        for op in (self.batchnorm, self.activation):
            if isinstance(op, nn.Module):
                output = call_in_dtype(op, (output,), {}, {}, output.dtype)
            elif op is not None:
                output = op(output)
        return output

    def channel_scale(self) -> Optional[Tensor]:
        """The BatchNorm's per-channel output scale (eval mode), or ``None`` without a usable one."""
        bn = self.batchnorm
        if bn is None or getattr(bn, "running_var", None) is None:
            return None
        scale = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
        return scale * bn.weight.detach().float() if bn.weight is not None else scale


def following_ops(model: nn.Module, layer_name: str) -> Optional[OutputOps]:
    """The BatchNorm and/or activation right after ``layer_name`` inside an ``nn.Sequential``.

    Putting them in the reconstruction loss weighs each channel as the network does and
    ignores errors a ReLU would zero out. ``None`` when nothing of that kind follows.
    """
    parent_name, _, child = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    children = list(parent.named_children())
    position = [n for n, _ in children].index(child) + 1
    ops = OutputOps(detected=True)
    if position < len(children) and isinstance(children[position][1], BATCH_NORMS):
        ops.batchnorm = children[position][1]
        position += 1
    if position < len(children) and isinstance(children[position][1], _ELEMENTWISE_ACTIVATIONS):
        ops.activation = children[position][1]
    if ops.batchnorm is None and ops.activation is None:
        return None
    return ops
