"""Blocks for block reconstruction: a submodule (or a run of an ``nn.Sequential``) whose layers
are rounded together against the block's full-precision output (BRECQ, Li et al. 2021).

Found automatically as the elements of a block chain (``chain.py``) that hold at least two of
the layers being rounded, looking inside nested chains: a residual or inverted-residual block,
a transformer encoder layer. Or named by the user: a module-name glob (``"features.*"``) or a
run of a Sequential's children (``"model[0:6]"``). Everything is checked on one forward pass
before any rounding work.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from lightning_adaround.data.capture import call_reaching
from lightning_adaround.data.chain import find_block_chains
from lightning_adaround.model.layers import ForwardFn, forward_with_hooks, positional_call
from lightning_adaround.data.unit import Unit

_RUN = re.compile(r"^(?P<name>[\w.]*)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def _prefix(name: str) -> str:
    return name + "." if name else ""


def _inside(layer: str, module_name: str) -> bool:
    return module_name == "" or layer == module_name or layer.startswith(module_name + ".")


def _make_block(
    name: str, module: nn.Module, first: tuple[str, nn.Module], members: Sequence[tuple[str, nn.Module]],
    order: Sequence[str],
) -> Unit:
    """``members`` are the (qualified name, module) pairs ``module`` consists of."""
    layers = [n for n in order if any(_inside(n, m) for m, _ in members)]
    paths = {}
    for layer in layers:
        i, member = next((i, m) for i, (m, _) in enumerate(members) if _inside(layer, m))
        local = layer[len(_prefix(member)):] if layer != member else ""
        if len(members) > 1:
            local = f"{i}.{local}" if local else str(i)
        paths[layer] = f"{local}.weight" if local else "weight"
    return Unit(name, module, first, members[-1][1], layers, paths)


def _run_of(model: nn.Module, spec: str, order: Sequence[str]) -> Unit:
    match = _RUN.match(spec)
    assert match is not None
    parent_name, start, stop = match["name"], int(match["start"]), int(match["stop"])
    modules = dict(model.named_modules())
    parent = modules.get(parent_name)
    where = repr(parent_name) if parent_name else "the model"
    if not isinstance(parent, nn.Sequential):
        raise ValueError(
            f"block {spec!r}: {where} is not an nn.Sequential "
            f"({type(parent).__name__ if parent is not None else 'no such module'}); a run 'name[i:j]' "
            "takes children i to j-1 of a Sequential. Check the names with model.named_modules()."
        )
    if not 0 <= start < stop <= len(parent):
        raise ValueError(
            f"block {spec!r}: children {start} to {stop - 1} are out of range for {where}, "
            f"which has {len(parent)}; give 0 <= i < j <= {len(parent)}."
        )
    members = [(_prefix(parent_name) + str(i), parent[i]) for i in range(start, stop)]
    module = members[0][1] if len(members) == 1 else nn.Sequential(*(m for _, m in members))
    return _make_block(spec, module, members[0], members, order)


def named_blocks(model: nn.Module, patterns: Sequence[str], order: Sequence[str]) -> list[Unit]:
    """The user's blocks: each pattern a module-name glob or a Sequential run ``name[i:j]``."""
    blocks: list[Unit] = []
    modules = list(model.named_modules())
    for pattern in patterns:
        if _RUN.match(pattern):
            found = [_run_of(model, pattern, order)]
        else:
            found = [
                _make_block(name, module, (name, module), [(name, module)], order)
                for name, module in modules if name and fnmatch.fnmatchcase(name, pattern)
            ]
            if _is_glob(pattern):  # a glob's outermost matches that hold layers: 'blocks.*' means each block
                found = [b for b in found if b.layers]
                found = [b for b in found if not any(_inside(b.name, o.name) and o is not b for o in found)]
            if not found:
                raise ValueError(
                    f"block pattern {pattern!r} matches no module of {type(model).__name__}"
                    f"{' that holds a layer being rounded' if _is_glob(pattern) else ''}; "
                    "check the names with model.named_modules() (a run of a Sequential is written 'name[i:j]')."
                )
        blocks += found
    for block in blocks:
        if not block.layers:
            raise ValueError(
                f"block {block.name!r} holds none of the layers being rounded; drop it from blocks= "
                "or check layers=/exclude=."
            )
    _check_overlaps(blocks)
    return blocks


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _check_overlaps(blocks: Sequence[Unit]) -> None:
    owner: dict[str, str] = {}
    for block in blocks:
        for layer in block.layers:
            if layer in owner:
                raise ValueError(
                    f"blocks {owner[layer]!r} and {block.name!r} overlap (both hold layer {layer!r}); "
                    "each layer can be in one block only. Name non-overlapping blocks."
                )
            owner[layer] = block.name


def find_blocks(
    model: nn.Module,
    patterns: Optional[Sequence[str]],
    order: Sequence[str],
    batch: Any,
    forward_fn: ForwardFn,
) -> list[Unit]:
    """Blocks for ``order``'s layers, checked on one forward pass over ``batch`` (already on the device).

    Automatic (``patterns=None``): chain elements with several layers; where such an element is
    itself a chain (a stage of blocks), its elements instead.
    """
    if patterns is None:
        blocks = sorted(_chain_blocks(model, "", order, batch, forward_fn), key=lambda b: order.index(b.layers[0]))
    else:
        blocks = named_blocks(model, patterns, order)
    _check_calls(model, blocks, batch, forward_fn)
    return blocks


def _chain_blocks(module: nn.Module, module_name: str, order: Sequence[str], batch: Any, forward_fn: ForwardFn) -> list[Unit]:
    """Elements of ``module``'s chains holding two or more layers; a Sequential element is looked into."""
    inner_names = [n[len(_prefix(module_name)):] for n in order if _inside(n, module_name) and n != module_name]
    blocks = []
    for chain in find_block_chains(module, inner_names, batch, forward_fn):
        for name, element in chain.blocks:
            qualified = _prefix(module_name) + name
            block = _make_block(qualified, element, (qualified, element), [(qualified, element)], order)
            if len(block.layers) < 2:
                continue
            if not isinstance(element, (nn.Sequential, nn.ModuleList)):
                blocks.append(block)
                continue
            call = call_reaching(module, element, batch, forward_fn)
            inner = _chain_blocks(element, qualified, order, call, _run_call) if call is not None else []
            blocks += inner if inner or isinstance(element, nn.ModuleList) else [block]
    return blocks


def _run_call(module: nn.Module, call: tuple) -> Any:
    return module(*call[0], **call[1])


def _check_calls(model: nn.Module, blocks: Sequence[Unit], batch: Any, forward_fn: ForwardFn) -> None:
    """Each block's first module must be called once per forward, with a tensor first argument."""
    seen: dict[str, list[tuple]] = {b.name: [] for b in blocks}
    handles = []
    for block in blocks:
        def record(module, args, kwargs, name=block.name):
            seen[name].append(positional_call(module, args, kwargs)[0])
        handles.append(block.first[1].register_forward_pre_hook(record, with_kwargs=True))
    forward_with_hooks(model, batch, forward_fn, handles)
    for block in blocks:
        calls = seen[block.name]
        if len(calls) != 1:
            raise ValueError(
                f"block {block.name!r} is called {len(calls)} times in one forward pass; block reconstruction "
                "needs a block called exactly once. Name a different block or use reconstruction='layer'."
            )
        if not calls[0] or not isinstance(calls[0][0], Tensor):
            raise ValueError(
                f"block {block.name!r} is not called with a tensor as its first argument; block reconstruction "
                "needs one input tensor. Name a different block or use reconstruction='layer'."
            )
