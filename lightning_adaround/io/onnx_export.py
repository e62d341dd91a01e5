"""ONNX export: the rounded model with integer weight initializers feeding ``DequantizeLinear``.

torch's exporter writes the model with float weights; each rounded layer's weight
initializer is then replaced by its integers, scale and zero point and a
``DequantizeLinear`` node (the ONNX "QDQ" form), so a runtime sees the grid and can keep the
weights as 8-bit integers. ``onnx`` and ``onnxscript`` are optional and imported only here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from lightning_adaround.io.export import check_result, model_weight, weight_key
from lightning_adaround.result import AdaRoundResult, LayerResult

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 18  # torch's exporter starts there; per-channel DequantizeLinear needs 13
BLOCK_OPSET = 21  # DequantizeLinear's block_size (per-group scales)
_SET_BY_US = ("dynamo", "optimize", "do_constant_folding", "keep_initializers_as_inputs", "f")


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as err:
        raise ImportError(
            f"export_onnx needs the onnx and onnxscript packages ({err.name} is missing): "
            "pip install 'lightning-adaround[onnx]'"
        ) from err
    return onnx


def export_onnx(
    model: nn.Module,
    result: AdaRoundResult,
    path: Union[str, "os.PathLike[str]"],
    args: Any,
    *,
    opset_version: Optional[int] = None,
    **export_kwargs: Any,
) -> "onnx.ModelProto":
    """Write ``model`` to ONNX with each layer of ``result`` as integers plus ``DequantizeLinear``.

    An ONNX file of the rounded model otherwise carries float weights, and the integer grid is
    lost to the runtime. The graph comes from ``torch.onnx.export(model, args, dynamo=True)``
    in eval mode (extra keyword arguments such as ``input_names`` or ``dynamic_shapes`` are
    passed on); the rounded layers' weights in it are those of ``result`` whatever the model
    holds, per tensor or per channel (``axis``) or per group (``block_size``, opset 21).
    ``opset_version=None`` is 18, or 21 when ``result`` has a per-group layer. The graph is
    checked with ``onnx.checker``, saved to ``path`` and returned.

    Raises:
        ImportError: onnx or onnxscript is not installed.
        TypeError: ``result`` is not an ``AdaRoundResult``, or ``export_kwargs`` sets what this
            function must set itself.
        ValueError: ``opset_version`` below 18 (below 21 with per-group layers), a layer of ``result`` missing from ``model``
            (or of another shape), or a weight the exporter did not keep as a float32
            initializer of that name.
    """
    result = check_result(result)
    fixed = sorted(k for k in export_kwargs if k in _SET_BY_US)
    if fixed:
        raise TypeError(
            f"export_onnx sets {fixed} itself (the weights must stay float initializers named like the "
            "state_dict); remove them from the call."
        )
    grouped = sorted(name for name, layer in result.layers.items() if layer.group_size is not None)
    if opset_version is None:
        opset_version = BLOCK_OPSET if grouped else MIN_OPSET
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < MIN_OPSET:
        raise ValueError(f"opset_version={opset_version!r} is too old; use {MIN_OPSET} or later.")
    if grouped and opset_version < BLOCK_OPSET:
        raise ValueError(_block_opset_message(opset_version, grouped))
    for name, layer in result.layers.items():
        model_weight(model, name, tuple(layer.integer_weight.shape), "the result")
    onnx = _require_onnx()
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, args if isinstance(args, tuple) else (args,), dynamo=True, optimize=False,
            opset_version=opset_version, **{"verbose": False, **export_kwargs},
        )
    finally:
        model.train(was_training)
    proto = program.model_proto
    quantize_initializers(proto, result)
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    return proto


def quantize_initializers(proto: "onnx.ModelProto", result: AdaRoundResult) -> None:
    """Replace each rounded layer's float weight initializer in ``proto`` by integers + ``DequantizeLinear``.

    Works on any graph whose weight initializers are named like the model's ``state_dict``
    keys (``net.0.weight``), in place. A scale that varies along one weight axis becomes a
    per-axis ``DequantizeLinear``; a grouped ``ConvTranspose``'s per-channel scale varies
    along two axes and is written as ``Cast``, ``Sub``, ``Mul`` over the same integers. A
    per-group scale becomes a blocked ``DequantizeLinear`` (``axis=1``, ``block_size``, opset 21)
    over the integers as ``(out, K)``, then a ``Reshape`` to a convolution's weight shape.
    """
    onnx = _require_onnx()
    from onnx import TensorProto, helper

    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"the ONNX graph uses opset {opset}; per-channel DequantizeLinear needs 13 or later.")
    grouped = sorted(name for name, layer in result.layers.items() if layer.group_size is not None)
    if grouped and opset < BLOCK_OPSET:
        raise ValueError(_block_opset_message(opset, grouped))
    index = {init.name: i for i, init in enumerate(graph.initializer)}
    taken = set(index) | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    new_nodes = []
    replaced = []
    for name, layer in result.layers.items():
        key = weight_key(name)
        if key not in index:
            raise ValueError(
                f"the ONNX graph has no initializer {key!r} for the rounded layer {name!r} (the exporter renamed, "
                "folded or shared it); export without constant folding so weights keep their state_dict names."
            )
        init = graph.initializer[index[key]]
        shape = tuple(layer.integer_weight.shape)
        if tuple(init.dims) != shape or init.data_type != TensorProto.FLOAT:
            raise ValueError(
                f"the ONNX initializer {key!r} is {TensorProto.DataType.Name(init.data_type)} of shape "
                f"{tuple(init.dims)}, expected FLOAT of shape {shape}; export the model in float32 (model.float())."
            )
        replaced.append(key)
        new_inits, nodes = _dequantize(onnx, helper, layer, key, lambda base: _unique(base, taken))
        graph.initializer.extend(new_inits)
        new_nodes.extend(nodes)
    keep = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [v for v in graph.input if v.name not in replaced]  # keep_initializers_as_inputs graphs
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = new_nodes + list(graph.node)  # the weights' producers first: the graph stays sorted
    del graph.node[:]
    graph.node.extend(nodes)


def _block_opset_message(opset: int, grouped: list[str]) -> str:
    return (
        f"opset {opset} has no blocked DequantizeLinear for the per-group layers {grouped[:5]}"
        f"{' ...' if len(grouped) > 5 else ''}; export with opset_version={BLOCK_OPSET} or later (the default "
        "for a result with per-group layers), or round them with PerChannel()."
    )


def _dequantize(onnx: Any, helper: Any, layer: LayerResult, key: str, unique: Any) -> tuple[list, list]:
    """Initializers and nodes that compute ``key`` = ``(integers - zero_point) * scale`` in float32."""
    numpy_helper = onnx.numpy_helper
    q = layer.integer_weight.detach().cpu()
    scale = layer.scale.detach().cpu().float()
    zero_point = layer.zero_point.detach().cpu().round().to(q.dtype)
    q_name, s_name, z_name = unique(f"{key}_quantized"), unique(f"{key}_scale"), unique(f"{key}_zero_point")
    group_size = layer.group_size
    if group_size is not None:  # blocked along the inputs of each output channel: the weight as (out, K)
        rows = q.reshape(q.shape[0], -1)
        flat = q.dim() > 2
        out_name = unique(f"{key}_rows") if flat else key
        inits = [
            numpy_helper.from_array(rows.numpy(), q_name),
            numpy_helper.from_array(scale.numpy(), s_name),
            numpy_helper.from_array(zero_point.numpy(), z_name),
        ]
        nodes = [helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [out_name], name=unique(f"{key}_DequantizeLinear"),
            axis=1, block_size=group_size,
        )]
        if flat:  # a convolution's (out, in/groups, k...) weight, restored from its rows
            shape_name = unique(f"{key}_shape")
            inits.append(numpy_helper.from_array(torch.tensor(q.shape, dtype=torch.int64).numpy(), shape_name))
            nodes.append(helper.make_node("Reshape", [out_name, shape_name], [key], name=unique(f"{key}_Reshape")))
        return inits, nodes
    varying = [d for d, size in enumerate(scale.shape) if size != 1]
    if len(varying) <= 1:  # per tensor (scalar scale) or per axis (1-D scale): DequantizeLinear
        attrs = {"axis": varying[0]} if varying else {}
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
        if not varying:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        inits = [
            numpy_helper.from_array(q.numpy(), q_name),
            numpy_helper.from_array(scale.numpy(), s_name),
            numpy_helper.from_array(zero_point.numpy(), z_name),
        ]
        node = helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [key], name=unique(f"{key}_DequantizeLinear"), **attrs,
        )
        return inits, [node]
    # Scale varying along several axes (grouped ConvTranspose): the same arithmetic, spelled out.
    cast, centred = unique(f"{key}_float"), unique(f"{key}_centred")
    inits = [
        numpy_helper.from_array(q.numpy(), q_name),
        numpy_helper.from_array(scale.numpy(), s_name),
        numpy_helper.from_array(zero_point.float().numpy(), z_name),
    ]
    nodes = [
        helper.make_node("Cast", [q_name], [cast], to=onnx.TensorProto.FLOAT, name=unique(f"{key}_Cast")),
        helper.make_node("Sub", [cast, z_name], [centred], name=unique(f"{key}_Sub")),
        helper.make_node("Mul", [centred, s_name], [key], name=unique(f"{key}_Mul")),
    ]
    return inits, nodes


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name
