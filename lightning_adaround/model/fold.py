"""Folding each BatchNorm into the Conv/Linear that feeds it, before rounding.

A runtime folds ``BN(conv(x))`` into one convolution with weight ``s * W`` (``s`` the
BatchNorm's per-channel scale), so the grid should be chosen for ``s * W``, not ``W``.
Folding here keeps every ``state_dict`` key: the scale goes into the layer's weight, and
the BatchNorm is left as an exact shift (unit scale, ``running_var + eps == 1``), which
a runtime folds away again for free.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from lightning_adaround.model.graph import layer_chains
from lightning_adaround.model.layers import BATCH_NORMS, SUPPORTED_LAYER_TYPES


def find_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm's only input is the layer's only output.

    From the ``torch.fx`` graph when the model traces, else from ``nn.Sequential`` chains.
    """
    found = [
        (layer, ops[0].name) for layer, ops in layer_chains(model)
        if ops and isinstance(ops[0].module, BATCH_NORMS) and ops[0].calls == 1
    ]
    return sorted(set(found), key=found.index)


def computed_weight_fix(module: nn.Module, name: str) -> Optional[str]:
    """How to bake in the weight of layer ``name`` when it is computed from other tensors, else ``None``.

    ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``/``spectral_norm``) turns
    ``weight`` into a property; the older ``weight_norm``/``spectral_norm`` hooks keep
    ``weight_g``/``weight_v`` or ``weight_orig`` as the parameters and ``weight`` as a plain
    attribute. Either way, writing into ``module.weight`` changes a recomputed copy, not the layer.
    """
    if isinstance(module._parameters.get("weight"), nn.Parameter):
        return None
    layer = f"model.get_submodule({name!r})"
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return f"torch.nn.utils.parametrize.remove_parametrizations({layer}, 'weight')"
    if "weight_g" in module._parameters and "weight_v" in module._parameters:
        return f"torch.nn.utils.remove_weight_norm({layer})"
    if "weight_orig" in module._parameters:
        return f"torch.nn.utils.remove_spectral_norm({layer})"
    return f"{layer}.weight = nn.Parameter({layer}.weight.detach().clone())"


def _why_not(layer: nn.Module, bn: nn.Module, layer_name: str) -> Optional[str]:
    if not isinstance(layer, SUPPORTED_LAYER_TYPES):
        return f"it follows a {type(layer).__name__}, not a Linear or convolution"
    fix = computed_weight_fix(layer, layer_name)
    if fix is not None:
        return f"the layer's weight is computed from other tensors (a parametrization); bake it in first with {fix}"
    if bn.running_var is None or bn.running_mean is None:
        return "it keeps no running statistics (track_running_stats=False)"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != channels:
        return f"it has {bn.num_features} features for {channels} output channels"
    if getattr(layer, "transposed", False) and layer.groups != 1:
        return "it follows a grouped transposed convolution"
    return None


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
    # BN(W x + b) = s W x + s (b - mean) + beta  ==  (s W) x + b - shift, with the shift below
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    shift = bias - scale * (bias - bn.running_mean.double()) - beta
    axis = 1 if getattr(layer, "transposed", False) else 0
    shape = [1] * layer.weight.dim()
    shape[axis] = -1
    layer.weight.copy_((layer.weight.double() * scale.reshape(shape)).to(layer.weight.dtype))
    bn.running_mean.copy_(shift.to(bn.running_mean.dtype))
    # 1 - eps + eps rounds back to exactly 1 for float16/bfloat16/float32/float64 and the
    # usual eps values, so the BatchNorm divides by exactly 1 (checked in the tests).
    bn.running_var.copy_(torch.ones_like(bn.running_var) - bn.eps)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.bias.zero_()


def fold_batchnorm(model: nn.Module, pairs: Optional[Sequence[tuple[str, str]]] = None) -> list[tuple[str, str]]:
    """Fold BatchNorms into the layers before them, in place; returns the ``(layer, bn)`` pairs folded.

    Args:
        model: Any module; its BatchNorms' running statistics are used (eval semantics).
        pairs: ``(layer name, batchnorm name)`` to fold; by default found from the model's
            ``torch.fx`` graph, or its ``nn.Sequential`` chains when it does not trace.

    Every BatchNorm that is not folded gets a warning naming it and the reason. The model's
    outputs in eval mode are unchanged up to float rounding, and its ``state_dict`` keys too.
    """
    modules = dict(model.named_modules())
    chosen = list(pairs) if pairs is not None else find_batchnorm_pairs(model)
    for layer_name, bn_name in chosen:
        for name in (layer_name, bn_name):
            if name not in modules:
                raise ValueError(f"fold_batchnorm pairs name {name!r}, which is not a module of {type(model).__name__}.")
        if not isinstance(modules[bn_name], BATCH_NORMS):
            raise ValueError(f"fold_batchnorm pairs {bn_name!r} as a BatchNorm, but it is a {type(modules[bn_name]).__name__}.")
    folded = []
    for layer_name, bn_name in chosen:
        reason = _why_not(modules[layer_name], modules[bn_name], layer_name)
        if reason is not None:
            warnings.warn(f"BatchNorm {bn_name!r} is not folded into {layer_name!r}: {reason}.", stacklevel=2)
            continue
        _fold(modules[layer_name], modules[bn_name])
        folded.append((layer_name, bn_name))
    done = {bn for _, bn in folded} | {bn for _, bn in chosen}
    for name, module in modules.items():
        if isinstance(module, BATCH_NORMS) and name not in done:
            warnings.warn(
                f"BatchNorm {name!r} is not folded: no Linear/convolution feeds it directly; "
                "name the pair with fold_batchnorm(model, pairs=[(layer, batchnorm)]) if one does.",
                stacklevel=2,
            )
    return folded
