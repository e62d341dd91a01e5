"""A result's weights in and out of a model: the quantized file and full-precision A/B switching.

The file stores each rounded layer as integers (two per byte at 4 bits and below) with its
scale and zero point, and the rest of the model's state in float, as plain tensors that
``torch.load(..., weights_only=True)`` reads. Loading checks the whole file against the model
before it writes a single value, so a file that does not fit leaves the model as it was.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Mapping, NoReturn, Optional, Union

import torch
from torch import Tensor, nn

from lightning_adaround.grid.quant import MAX_BITS, MIN_BITS, group_count, integer_range
from lightning_adaround.result import AdaRoundResult, LayerResult

FORMAT = "lightning-adaround/quantized"
VERSION = 1
PACKED_MAX_BITS = 4  # at this width and below, two values share a byte
LAYER_KEYS = ("shape", "bits", "qmin", "qmax", "axis", "packed", "data", "scale", "zero_point")
# Optional, added in version 1 without a change of version: an older reader refuses a per-group
# scale (out, G) as not broadcasting against the weight, so it cannot misread one.
GROUP_KEY = "group_size"
_REEXPORT = "re-export the model with export_quantized(model, result, path)"

FileLike = Union[str, "os.PathLike[str]", IO[bytes]]


# ----------------------------------------------------------------------------- writing


def export_quantized(model: nn.Module, result: AdaRoundResult, path: FileLike) -> None:
    """Save ``model`` with its rounded layers as ``b``-bit integers: the small file to ship.

    ``torch.save(model.state_dict())`` of a rounded model is as large as the float model;
    here each layer rounded in ``result`` is stored as integer weights (two per byte at
    4 bits and below), scale and zero point, and every other entry of the model's
    ``state_dict`` as it is. Read it back with :func:`load_quantized`; the schema (version
    1) is documented in docs/export.md.

    Raises:
        TypeError: ``result`` is not an ``AdaRoundResult``.
        ValueError: a layer of ``result`` is missing from ``model`` or has another shape.
    """
    result = check_result(result)
    state = model.state_dict()
    for name, layer in result.layers.items():
        model_weight(model, name, tuple(layer.integer_weight.shape), "the result")
    rounded = {weight_key(name) for name in result.layers}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {name: _layer_entry(layer) for name, layer in result.layers.items()},
        "state": {
            key: value.detach().cpu().clone() if isinstance(value, Tensor) else value
            for key, value in state.items() if key not in rounded
        },
    }
    torch.save(payload, path)


def _layer_entry(layer: LayerResult) -> dict[str, Any]:
    q = layer.integer_weight.detach().cpu()
    packed = layer.bits <= PACKED_MAX_BITS
    return {
        "shape": list(q.shape),
        "bits": int(layer.bits),
        "qmin": int(layer.qmin),
        "qmax": int(layer.qmax),
        "axis": layer.axis,
        GROUP_KEY: layer.group_size,
        "packed": packed,
        "data": pack_int4(q) if packed else q.contiguous().clone(),
        "scale": layer.scale.detach().cpu().float().clone(),
        "zero_point": layer.zero_point.detach().cpu().round().to(q.dtype),
    }


def pack_int4(values: Tensor) -> Tensor:
    """Two 4-bit values per byte: ``values`` flattened in row-major order, the first in the low nibble.

    Signed values are stored as 4-bit two's complement; an odd count leaves the last high
    nibble 0. This is ONNX's INT4/UINT4 layout.
    """
    flat = values.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, numel: int, signed: bool) -> Tensor:
    """The inverse of :func:`pack_int4`: ``numel`` values, ``int8`` if ``signed`` else ``uint8``, flat."""
    data = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack([data & 0xF, data >> 4], dim=1).reshape(-1)[:numel]
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)


# ----------------------------------------------------------------------------- reading


def load_quantized(model: nn.Module, path: FileLike) -> AdaRoundResult:
    """Restore a file written by :func:`export_quantized` into ``model``; return its integer layers.

    Afterwards the model's weights equal the rounded weights bit for bit and its other state
    equals the exported model's. The file is read with ``weights_only=True`` and checked in
    full (schema, version, every layer name and shape) before anything is written, so on
    any error the model is unchanged. The returned result holds each layer's integer
    weights, scale and zero point (for :func:`export_onnx`); its error statistics are NaN.

    Raises:
        ValueError: not such a file, an unsupported version, a damaged file, or a model whose
            layer names or shapes differ from the exported one.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:
        raise ValueError(
            f"cannot read the file as a lightning-adaround quantized export: torch.load(..., weights_only=True) "
            f"failed with {type(err).__name__} (a damaged file, another format, or Python objects other than "
            "tensors, numbers and strings); write it with export_quantized(model, result, path)."
        ) from err
    layers, state = _check_payload(payload)
    model_state = model.state_dict()
    _check_fit(model, model_state, layers, state)
    new_state = dict(state)
    for name, layer in layers.items():
        key = weight_key(name)
        new_state[key] = layer.dequantized_weight().to(model_state[key].dtype)
    model.load_state_dict(new_state, strict=True)
    return AdaRoundResult(layers=layers)


def _check_payload(payload: Any) -> tuple[dict[str, LayerResult], dict[str, Any]]:
    """Schema, version and every layer entry; returns the layers as results and the other state."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = type(payload).__name__
        if isinstance(payload, dict):
            got = f"a dict with keys {sorted(map(str, payload))[:8]}"
        raise ValueError(
            f"the file is not a lightning-adaround quantized export: expected a dict with 'format': {FORMAT!r}, "
            f"got {got}. Write it with export_quantized(model, result, path); a plain state_dict loads with "
            "model.load_state_dict(torch.load(path))."
        )
    version = payload.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ValueError(
            f"file version {version!r} is not supported: this lightning-adaround reads version {VERSION}. "
            "Load it with the lightning-adaround release that wrote it, or re-export the model with this one."
        )
    layers, state = payload.get("layers"), payload.get("state")
    if not isinstance(layers, dict) or not isinstance(state, dict):
        _malformed(f"'layers' and 'state' must be dicts, got {type(layers).__name__} and {type(state).__name__}")
    return {str(name): _layer_from_entry(str(name), entry) for name, entry in layers.items()}, state


def _malformed(what: str) -> NoReturn:
    raise ValueError(f"the file is damaged: {what}; {_REEXPORT}.")


def _layer_from_entry(name: str, entry: Any) -> LayerResult:
    """One layer entry checked in full (grid, integer data, scale, zero point) and read back."""
    if not isinstance(entry, dict) or any(k not in entry for k in LAYER_KEYS):
        missing = [k for k in LAYER_KEYS if not isinstance(entry, dict) or k not in entry]
        _malformed(f"layer {name!r} lacks {missing}")
    shape, bits, qmin, qmax, axis = _entry_grid(name, entry)
    values = _entry_values(name, entry, shape, bits, qmin)
    int_dtype = values.dtype
    scale, zero_point = entry["scale"], entry["zero_point"]
    group_size = entry.get(GROUP_KEY)
    if group_size is None:
        if not (isinstance(scale, Tensor) and scale.is_floating_point() and _broadcasts(tuple(scale.shape), shape)):
            _malformed(f"layer {name!r} scale is not a float tensor that broadcasts against the weight shape {shape}")
    else:
        groups = _entry_groups(name, group_size, shape, axis)
        if not (isinstance(scale, Tensor) and scale.is_floating_point() and tuple(scale.shape) == groups):
            _malformed(f"layer {name!r} scale is not a float tensor of shape {groups} (output channels, groups)")
    if not (isinstance(zero_point, Tensor) and zero_point.dtype == int_dtype and zero_point.shape == scale.shape):
        _malformed(f"layer {name!r} zero point is not a {int_dtype} tensor of the scale's shape {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        _malformed(f"layer {name!r} has a scale that is not finite and positive")
    for what, tensor in (("integer weights", values), ("zero point", zero_point)):
        if tensor.numel() and not (qmin <= int(tensor.min()) and int(tensor.max()) <= qmax):
            _malformed(f"layer {name!r} {what} leave the range [{qmin}, {qmax}]")
    nan = float("nan")
    return LayerResult(
        name=name, bits=bits, scale=scale.float(), zero_point=zero_point.float(), qmin=qmin, qmax=qmax,
        axis=axis, integer_weight=values.clone(), nearest_mse=nan, adaround_mse=nan, iterations=0,
        seconds=0.0, num_samples=0, eval_samples=0, note="loaded from a quantized export",
    )


def _entry_grid(name: str, entry: dict[str, Any]) -> tuple[tuple[int, ...], int, int, int, Optional[int]]:
    shape, bits, qmin, qmax, axis = (entry[k] for k in ("shape", "bits", "qmin", "qmax", "axis"))
    if not (isinstance(shape, (list, tuple)) and all(_is_int(s) and s >= 0 for s in shape)):
        _malformed(f"layer {name!r} has shape {shape!r}, not a list of sizes")
    valid = _is_int(bits) and MIN_BITS <= bits <= MAX_BITS and _is_int(qmin) and _is_int(qmax)
    if not valid or (qmin, qmax) != integer_range(bits, symmetric=qmin < 0):
        _malformed(f"layer {name!r} has bits={bits!r}, qmin={qmin!r}, qmax={qmax!r}, which do not form a grid")
    if axis is not None and not (_is_int(axis) and 0 <= axis < len(shape)):
        _malformed(f"layer {name!r} has axis={axis!r} for a weight of shape {tuple(shape)}")
    return tuple(shape), bits, qmin, qmax, axis


def _entry_groups(name: str, group_size: Any, shape: tuple[int, ...], axis: Optional[int]) -> tuple[int, int]:
    """The per-group scale shape ``(out, G)`` that ``group_size`` implies for ``shape``; damaged if it cannot be one."""
    inputs = math.prod(shape[1:]) if len(shape) >= 2 else 0
    if not (_is_int(group_size) and group_size >= 1 and axis == 0 and inputs >= 1):
        _malformed(f"layer {name!r} has group_size={group_size!r} with axis={axis!r} for a weight of shape {shape}")
    groups, block = group_count(inputs, group_size)
    if block != group_size or groups < 2:
        _malformed(f"layer {name!r} has group_size={group_size!r}, not a group size of {inputs} inputs in 2 groups or more")
    return shape[0], groups


def _entry_values(name: str, entry: dict[str, Any], shape: tuple[int, ...], bits: int, qmin: int) -> Tensor:
    """The integer weights, unpacked, in the weight's shape (int8 for signed grids, else uint8)."""
    data, packed = entry["data"], entry["packed"]
    if packed is not (bits <= PACKED_MAX_BITS) or not isinstance(data, Tensor):
        _malformed(f"layer {name!r} has packed={packed!r} and data of type {type(data).__name__} at {bits} bits")
    numel = math.prod(shape)
    dtype, expected = (torch.uint8, ((numel + 1) // 2,)) if packed else (torch.int8 if qmin < 0 else torch.uint8, shape)
    if data.dtype != dtype or tuple(data.shape) != expected:
        _malformed(
            f"layer {name!r} {'packed' if packed else 'integer'} data is {data.dtype} of shape "
            f"{tuple(data.shape)}, expected {dtype} of shape {expected}"
        )
    return unpack_int4(data, numel, signed=qmin < 0).reshape(shape) if packed else data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _broadcasts(small: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(small) == len(shape) and all(s in (1, n) for s, n in zip(small, shape))


def _check_fit(
    model: nn.Module, model_state: Mapping[str, Any], layers: dict[str, LayerResult], state: dict[str, Any],
) -> None:
    """Every entry of the file has its place in the model with the same shape, and nothing is left out."""
    in_file = {weight_key(name): tuple(layer.integer_weight.shape) for name, layer in layers.items()}
    for key, value in state.items():
        in_file[key] = tuple(value.shape) if isinstance(value, Tensor) else None
    missing = sorted(set(model_state) - set(in_file))
    extra = sorted(set(in_file) - set(model_state))
    if missing or extra:
        raise ValueError(
            f"the file does not fit this {type(model).__name__}: in the model but not in the file: {_some(missing)}; "
            f"in the file but not in the model: {_some(extra)}. Load it into the architecture it was exported "
            "from (same module names and layers)."
        )
    for key, shape in in_file.items():
        value = model_state[key]
        if shape is not None and isinstance(value, Tensor) and tuple(value.shape) != shape:
            raise ValueError(
                f"{key!r} has shape {shape} in the file but {tuple(value.shape)} in the model; load the file "
                "into the model it was exported from (same layer sizes)."
            )


def _some(names: list[str]) -> str:
    return f"{names[:5]}{' and ' + str(len(names) - 5) + ' more' if len(names) > 5 else ''}"


# ----------------------------------------------------------------------------- A/B switching


def use_float_weights(model: nn.Module, result: AdaRoundResult) -> None:
    """Put the full-precision weights back into ``model``'s rounded layers, to compare without rounding again.

    Needs a result from a run with ``keep_float_weights=True``. :func:`use_rounded_weights`
    switches back; both write nothing unless every layer fits.

    Raises:
        TypeError: ``result`` is not an ``AdaRoundResult``.
        ValueError: the result kept no full-precision weights, or a layer is missing from
            ``model`` or has another shape.
    """
    result = check_result(result)
    without = [name for name, layer in result.layers.items() if layer.float_weight is None]
    if without:
        raise ValueError(
            f"the result holds no full-precision weights for layers {_some(without)}; round with "
            "AdaRoundConfig(keep_float_weights=True) (the callback's config=) to switch "
            "between full-precision and rounded weights."
        )
    _write_weights(model, {name: layer.float_weight for name, layer in result.layers.items()})


def use_rounded_weights(model: nn.Module, result: AdaRoundResult) -> None:
    """Write the rounded weights of ``result`` into ``model``: the weights ``adaround`` left there, bit for bit.

    Raises:
        TypeError: ``result`` is not an ``AdaRoundResult``.
        ValueError: a layer of ``result`` is missing from ``model`` or has another shape.
    """
    result = check_result(result)
    _write_weights(model, {name: layer.dequantized_weight() for name, layer in result.layers.items()})


@torch.no_grad()
def _write_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    targets = [(model_weight(model, name, tuple(w.shape), "the result"), w) for name, w in weights.items()]
    for param, weight in targets:  # every layer checked before the first write
        param.copy_(weight.to(device=param.device, dtype=param.dtype))


# ----------------------------------------------------------------------------- shared checks


def check_result(result: Any) -> AdaRoundResult:
    if not isinstance(result, AdaRoundResult):
        raise TypeError(
            f"result must be an AdaRoundResult (what adaround() returns, or callback.result after the callback "
            f"has rounded), got {type(result).__name__}."
        )
    return result


def weight_key(layer_name: str) -> str:
    """The ``state_dict`` key (and ONNX initializer name) of a layer's weight."""
    return f"{layer_name}.weight" if layer_name else "weight"


def model_weight(model: nn.Module, name: str, shape: tuple[int, ...], source: str) -> Tensor:
    """The weight of layer ``name`` in ``model``, which must have ``shape`` (as given by ``source``)."""
    try:
        weight = model.get_submodule(name).weight if name else model.weight
    except AttributeError:
        weight = None
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"layer {name!r} of {source} is not in this {type(model).__name__} (no module of that name with a "
            "weight); pass the model the result was computed on."
        )
    if tuple(weight.shape) != shape:
        raise ValueError(
            f"layer {name!r} has a weight of shape {tuple(weight.shape)} in the model but {shape} in {source}; "
            "pass the model the result was computed on."
        )
    return weight
