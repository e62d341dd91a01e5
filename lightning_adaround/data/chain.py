"""Block chains: a sequence of blocks where each one's output is the next one's input.

Capturing a layer's input by running the model until the layer costs ``L^2/2``
layer-forwards for ``L`` layers. In a chain (an ``nn.Sequential``, or a ``ModuleList`` of
transformer blocks run in a loop) the input of block ``k`` can instead be kept and carried
to block ``k + 1`` by running block ``k`` alone, which makes capture linear in depth.

A chain is only used when one forward pass shows that it really is one: every block called
once, in order, its first argument the previous block's output, and every other argument
the same object for all blocks (an attention mask computed once, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from lightning_adaround.model.layers import ForwardFn, forward_with_hooks, positional_call

@dataclass
class BlockChain:
    name: str  # the container's name ("" for the model itself)
    blocks: list[tuple[str, nn.Module]]  # (qualified name, block) in call order
    tuple_output: bool  # blocks return ``(hidden, ...)`` rather than a tensor

    def block_of(self, layer_name: str) -> Optional[int]:
        """Index of the block that contains ``layer_name`` (or is it), else ``None``."""
        for index, (block_name, _) in enumerate(self.blocks):
            if layer_name == block_name or layer_name.startswith(block_name + "."):
                return index
        return None

    def carry(self, output: Any) -> Tensor:
        """The next block's first argument, from this block's output."""
        return output[0] if self.tuple_output else output


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: Any = None


def _qualified(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _candidates(model: nn.Module, layer_names: Sequence[str]) -> list[tuple[str, nn.Module, int]]:
    """Sequential/ModuleList containers holding at least two of the layers, most layers first."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        prefix = name + "." if name else ""
        inside = sum(1 for n in layer_names if n.startswith(prefix))
        if inside >= 2:
            found.append((name, module, inside))
    return sorted(found, key=lambda c: -c[2])


def _same_object(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _verify(name: str, container: nn.Module, calls: dict[int, list[_Call]]) -> Optional[BlockChain]:
    children = list(container.named_children())
    seen = [calls.get(id(child), []) for _, child in children]
    if any(len(c) != 1 for c in seen):
        return None
    first = seen[0][0]
    if not first.args or not isinstance(first.args[0], Tensor):
        return None
    tuple_output = not isinstance(first.output, Tensor)
    for previous, (call,) in zip(seen, seen[1:]):
        out = previous[0].output
        carried = out if not tuple_output else (out[0] if isinstance(out, (tuple, list)) and out else None)
        if not isinstance(carried, Tensor) or not call.args or call.args[0] is not carried:
            return None
        if len(call.args) != len(first.args) or set(call.kwargs) != set(first.kwargs):
            return None
        rest_same = all(_same_object(a, b) for a, b in zip(call.args[1:], first.args[1:]))
        if not rest_same or not all(_same_object(call.kwargs[k], first.kwargs[k]) for k in first.kwargs):
            return None
    blocks = [(_qualified(name, child_name), child) for child_name, child in children]
    return BlockChain(name, blocks, tuple_output)


def find_block_chains(
    model: nn.Module, layer_names: Sequence[str], batch: Any, forward_fn: ForwardFn
) -> list[BlockChain]:
    """Chains that hold the layers, found with one forward pass; outer chains win over nested ones.

    ``batch`` must already be where the model runs. Containers whose blocks do not pass
    their output straight to the next block (a residual added outside, blocks called twice,
    a ModuleList indexed out of order) are not chains and are skipped.
    """
    candidates = _candidates(model, layer_names)
    if not candidates:
        return []
    calls: dict[int, list[_Call]] = {}
    handles = []

    def pre_hook(module, args, kwargs):
        calls.setdefault(id(module), []).append(_Call(*positional_call(module, args, kwargs)))

    def post_hook(module, args, kwargs, output):
        calls[id(module)][-1].output = output

    watched = {id(child): child for _, container, _ in candidates for child in container.children()}
    for child in watched.values():
        handles.append(child.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(child.register_forward_hook(post_hook, with_kwargs=True))
    forward_with_hooks(model, batch, forward_fn, handles)
    chains: list[BlockChain] = []
    for name, container, _ in candidates:
        if any(name == c.name or name.startswith(c.name + ".") or c.name == "" for c in chains):
            continue  # inside a chain already chosen
        chain = _verify(name, container, calls)
        if chain is not None:
            chains.append(chain)
    return chains
