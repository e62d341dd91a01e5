"""What follows each layer in the model: the one graph walk BatchNorm folding and equalization share.

From the ``torch.fx`` graph when the model traces, else from the children of every
``nn.Sequential`` in order. Folding looks for a BatchNorm right after a layer; equalization for
the next layer, through ops that commute with a per-channel scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_adaround.model.layers import SUPPORTED_LAYER_TYPES


@dataclass
class Op:
    """One operation after a layer: a module call, or (``module`` None) a function or method call."""

    name: str
    module: Optional[nn.Module]
    node: Optional[torch.fx.Node] = None  # from the fx graph (None: from an nn.Sequential)
    calls: int = 1  # how often the module is called per forward (Sequential: how often it is listed)

    @property
    def is_layer(self) -> bool:
        return isinstance(self.module, SUPPORTED_LAYER_TYPES)


def layer_chains(model: nn.Module, tracer: Optional[torch.fx.Tracer] = None) -> list[tuple[str, list[Op]]]:
    """For every layer called once: the ops after it, in order, each the only reader of the one before
    (taking it as its first argument), up to and including the next layer."""
    traced = _traced_chains(model, tracer)
    return traced if traced is not None else _sequential_chains(model)


def _traced_chains(model: nn.Module, tracer: Optional[torch.fx.Tracer]) -> Optional[list[tuple[str, list[Op]]]]:
    try:
        graph = (tracer or torch.fx.Tracer()).trace(model)
    except Exception:  # noqa: BLE001 - a model that does not trace is walked as Sequentials
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def op(node: torch.fx.Node) -> Op:
        if node.op == "call_module":
            return Op(str(node.target), modules.get(node.target), node, calls[node.target])
        return Op(node.name, None, node)

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), SUPPORTED_LAYER_TYPES):
            continue
        if calls[node.target] != 1:
            continue
        ops: list[Op] = []
        current = node
        while len(current.users) == 1:  # nothing else (e.g. a residual add) reads this output
            nxt = next(iter(current.users))
            if nxt.args[:1] != (current,):
                break
            ops.append(op(nxt))
            if ops[-1].is_layer:
                break
            current = nxt
        chains.append((str(node.target), ops))
    return chains


def _sequential_chains(model: nn.Module) -> list[tuple[str, list[Op]]]:
    listed: dict[int, int] = {}
    sequentials = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Sequential)]
    for _, sequential in sequentials:
        for child in sequential._modules.values():  # repeats kept, unlike named_children
            if child is not None:
                listed[id(child)] = listed.get(id(child), 0) + 1
    chains = []
    for name, sequential in sequentials:
        prefix = f"{name}." if name else ""
        children = [(n, c) for n, c in sequential._modules.items() if c is not None]
        for i, (a, first) in enumerate(children):
            if not isinstance(first, SUPPORTED_LAYER_TYPES):
                continue
            ops = []
            for b, child in children[i + 1:]:
                ops.append(Op(prefix + b, child, None, listed[id(child)]))
                if ops[-1].is_layer:
                    break
            chains.append((prefix + a, ops))
    return chains
