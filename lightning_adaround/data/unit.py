"""The unit of reconstruction: layers rounded together and the output their loss compares.

A block (BRECQ) is a submodule whose layers are rounded jointly against its output; a single
layer is a unit of one, whose output is the layer's own followed by the BatchNorm/activation
its loss includes. One builder, one data class and one minibatch objective serve both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.data.capture import Call
from lightning_adaround.model.layers import OutputOps, call_in_dtype, cast_tensors, output_channel_dim


@dataclass
class Unit:
    """Layers rounded together; ``module`` runs them (the layer itself, a block, or a fresh Sequential)."""

    name: str
    module: nn.Module
    first: tuple[str, nn.Module]  # the submodule whose call is the unit's input
    last: nn.Module  # the submodule whose output is the unit's output
    layers: list[str]  # the rounded layers inside, in execution order
    weight_paths: dict[str, str]  # layer name -> its weight's name inside ``module``
    ops: Optional[OutputOps] = None  # what the loss applies to the output (a unit of one only)
    _cast: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # fixed for a unit's run: whether it is a single layer, and its other tensors cast per dtype
        self._single = (
            self.module is self.first[1] and self.layers == [self.first[0]] and self.weight_paths == {self.name: "weight"}
        )

    @classmethod
    def of_layer(cls, name: str, layer: nn.Module, ops: Optional[OutputOps] = None) -> "Unit":
        return cls(name, layer, (name, layer), layer, [name], {name: "weight"}, ops)

    @property
    def is_layer(self) -> bool:
        """A single layer rounded against its own output (not a block that holds one layer)."""
        return self._single

    @property
    def kind(self) -> str:
        return "layer" if self.is_layer else "block"

    def layer_module(self, layer: str) -> nn.Module:
        path = self.weight_paths[layer]
        return self.module if path == "weight" else self.module.get_submodule(path[: -len(".weight")])

    @property
    def channel_dim(self) -> int:
        """The output dim holding channels (the last layer's)."""
        return output_channel_dim(self.layer_module(self.layers[-1]))

    def output(self, value: Any) -> Tensor:
        """The unit's output tensor: the value itself or the first element of a tuple, then ``ops``."""
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
            value = value[0]
        if not isinstance(value, Tensor):
            raise ValueError(
                f"block {self.name!r} returns {type(value).__name__}, not a tensor (or a tuple starting with one); "
                "block reconstruction compares one output tensor. Name a different block or use reconstruction='layer'."
            )
        return self.ops(value) if self.ops is not None else value

    def run(self, weights: Sequence[Tensor], x: Tensor, args: tuple = (), kwargs: Optional[dict] = None) -> Tensor:
        """The output with ``weights`` (in ``layers`` order) in place, computed in their dtype.

        On a CPU, a block's 4-d input goes channels-last: its depthwise and 1x1 convolutions run
        about 1.6x faster forward and backward (EfficientNet-Lite block, measured). A single layer
        stays as cached: converting its input every step cost more than it saved
        (``benchmarks/bench.py``: EfficientNet-Lite1 layers, minibatch form, 1.8x slower).
        """
        if x.dim() == 4 and x.device.type == "cpu" and not self.is_layer:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = weights[0].dtype
        if dtype not in self._cast:  # the unit's other parameters do not change while it is optimised
            self._cast[dtype] = cast_tensors(self.module, dtype, self.weight_paths.values())
        params = dict(zip(self.weight_paths.values(), weights))
        return self.output(call_in_dtype(self.module, (x, *args), kwargs or {}, params, dtype, self._cast[dtype]))


@dataclass
class UnitData:
    """A unit's cached calibration tensors, first dim = samples (or rows, for a Linear fed sequences).

    ``args``/``kwargs`` hold a block's other arguments: a tensor here is per sample (gathered
    with the inputs), anything else is passed as it is. ``fisher``: per-element output weights.
    """

    inputs: Tensor  # the unit's input in the model with earlier layers already rounded
    targets: Tensor  # the unit's output in the float model
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    fisher: Optional[Tensor] = None
    per_sample: frozenset = frozenset()  # which args ("a0", ...) and kwargs ("kname") are cached per sample

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]

    def rows(self, take: Callable[[Tensor, str], Tensor]) -> tuple[Tensor, tuple, dict]:
        """``(input, args, kwargs)`` with ``take(tensor, key)`` (rows of it) applied to the input and
        the per-sample arguments; a fixed argument (a shared mask, say) is passed as it is."""
        args = tuple(take(a, f"a{i}") if f"a{i}" in self.per_sample else a for i, a in enumerate(self.args))
        kwargs = {k: take(v, f"k{k}") if f"k{k}" in self.per_sample else v for k, v in self.kwargs.items()}
        return take(self.inputs, "x"), args, kwargs

    def chunks(self, size: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[slice, Tensor, tuple, dict]]:
        """``(rows, input, args, kwargs)`` for ``size`` samples at a time, on ``device``, floating
        tensors in ``dtype``: for passes of the unit over every cached row."""
        for start in range(0, self.num_samples, size):
            rows = slice(start, start + size)
            yield (rows, *self.rows(lambda t, _key: t[rows].to(device, dtype if t.is_floating_point() else t.dtype)))


class UnitArguments:
    """Which of a unit's other arguments are per sample (cached, gathered) and which are fixed.

    Fixed from the first batch: non-tensors and tensors without one row per sample (a shared
    mask, say). Such an argument must be the same in every batch, since one value is used for all.
    """

    def __init__(self, unit: Unit, call: Call, input_shape: torch.Size) -> None:
        self.unit = unit
        self.input_tail = tuple(input_shape[1:])
        n = input_shape[0]
        args, kwargs = call
        self.fixed_args = [PER_SAMPLE if one_row_each(a, n) else a for a in args[1:]]
        self.fixed_kwargs = {k: PER_SAMPLE if one_row_each(v, n) else v for k, v in kwargs.items()}

    def per_sample(self, call: Call, input_shape: torch.Size) -> dict[str, Tensor]:
        name = self.unit.name
        if tuple(input_shape[1:]) != self.input_tail and not self.unit.is_layer:  # a layer's rows are stacked
            raise ValueError(
                f"block {name!r} received inputs of shapes {self.input_tail} and {tuple(input_shape[1:])} "
                "(per sample) across calibration batches; give calibration batches of one shape (pad them) "
                "or use reconstruction='layer'."
            )
        args, kwargs = call
        n = input_shape[0]
        found = {}
        for where, value, fixed in [
            *((f"a{i}", a, f) for i, (a, f) in enumerate(zip(args[1:], self.fixed_args))),
            *((f"k{k}", v, self.fixed_kwargs.get(k)) for k, v in kwargs.items()),
        ]:
            if one_row_each(value, n) and fixed is PER_SAMPLE:
                found[where] = value.detach()
            elif not same_value(value, fixed):
                raise ValueError(
                    f"block {name!r} takes an argument ({where[1:] if where[0] == 'k' else 'position ' + str(int(where[1:]) + 1)}) "
                    "that changes between calibration batches but is not one row per sample, so it cannot be "
                    "cached; name a different block or use reconstruction='layer'."
                )
        return found

    def data(self, tensors: dict[str, Tensor], split: str, fisher: Optional[Tensor] = None) -> UnitData:
        args = tuple(tensors[f"{split}_a{i}"] if f is PER_SAMPLE else f for i, f in enumerate(self.fixed_args))
        kwargs = {k: tensors[f"{split}_k{k}"] if f is PER_SAMPLE else f for k, f in self.fixed_kwargs.items()}
        per_sample = {f"a{i}" for i, f in enumerate(self.fixed_args) if f is PER_SAMPLE}
        per_sample |= {f"k{k}" for k, f in self.fixed_kwargs.items() if f is PER_SAMPLE}
        return UnitData(tensors[f"{split}_in"], tensors[f"{split}_out"], args, kwargs, fisher, frozenset(per_sample))


PER_SAMPLE = object()  # marks an argument cached per sample (``None`` is a fixed argument's value too)


def one_row_each(value: Any, n: int) -> bool:
    """Whether ``value`` is a tensor with one row per sample (of ``n``)."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects count as different
        return a is b
