"""What ``adaround`` does to a model before rounding, and how it puts the model back on failure.

Preparation (``AdaRoundConfig.fold_batchnorm`` and ``equalize``) folds BatchNorms and equalizes
consecutive layers in place. :class:`ModelSnapshot` is taken before it: on any failure it puts back
the module structure (the ReLU6/Hardtanh modules equalization replaced by ``ChannelClip``s), then
every tensor preparation, rounding and bias correction can write (weights, biases, BatchNorm
statistics, clip bounds), the device, the training modes and ``requires_grad``. Restoring never
raises: a step that fails is attached to the original error as a note, so the user sees why the
run stopped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.model.equalize import clips_restorer, equalize_layers
from lightning_adaround.model.fold import fold_batchnorm
from lightning_adaround.model.layers import BATCH_NORMS, SUPPORTED_LAYER_TYPES


@dataclass
class Preparation:
    folded: list[tuple[str, str]] = field(default_factory=list)
    equalized: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.folded or self.equalized)


def prepare_model(model: nn.Module, config: AdaRoundConfig) -> Preparation:
    """Fold BatchNorms, then equalize, as ``config`` asks; in place. Call under ``inference_mode(False)``
    so that the new ``ChannelClip`` bounds can feed autograd."""
    done = Preparation()
    if config.fold_batchnorm and any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        done.folded = fold_batchnorm(model)
    if config.equalizes:
        done.equalized = equalize_layers(model)
    return done


class ModelSnapshot:
    """The parts of ``model`` that preparation and rounding can change, kept to put back on failure.

    Tensors are saved per (module, name) and copied back into whatever tensor the module holds
    under that name when restoring (moving the model to another device replaces buffers), so a
    restore needs no ``load_state_dict`` and cannot trip over keys that preparation added.
    """

    def __init__(self, model: nn.Module, layer_types: Sequence[type[nn.Module]] = ()) -> None:
        self.model = model
        kinds = tuple(SUPPORTED_LAYER_TYPES) + tuple(layer_types) + (nn.modules.batchnorm._BatchNorm,)
        self._restore_clips = clips_restorer(model)  # saves the clip modules and their bounds
        self._tensors: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, kinds):
                    continue
                for store in (module._parameters, module._buffers):
                    for name, tensor in store.items():
                        if tensor is not None:
                            self._tensors.append((module, name, tensor, tensor.detach().clone()))
        self._saved = {(id(m), n): value for m, n, _, value in self._tensors}
        self._modes = [(module, module.training) for module in model.modules()]
        self._trainable = [(param, param.requires_grad) for param in model.parameters()]
        self._device = next((p.device for p in model.parameters()), None)

    def saved(self, module: nn.Module, name: str) -> Optional[Tensor]:
        """The value ``module.<name>`` had when the snapshot was taken (``None`` if not kept)."""
        return self._saved.get((id(module), name))

    def restore_settings(self) -> None:
        """The device, per-module training modes and ``requires_grad`` flags as they were."""
        if self._device is not None:
            self.model.to(self._device)
        for module, training in self._modes:
            module.training = training
        for param, requires_grad in self._trainable:
            param.requires_grad_(requires_grad)

    def restore(self, error: BaseException) -> None:
        """Everything as it was, after ``error``; never raises (a failing step becomes a note on ``error``)."""
        problems: list[str] = []
        _attempt(self._restore_clips, "putting back the ReLU6/Hardtanh modules", problems)
        with torch.no_grad():
            for module, name, original, value in self._tensors:
                _attempt(lambda: _put_back(module, name, original, value), f"restoring {name!r} of a "
                         f"{type(module).__name__}", problems)
        _attempt(self.restore_settings, "restoring the device, training modes and requires_grad", problems)
        if problems:
            message = "lightning_adaround could not fully restore the model after this error: " + "; ".join(problems)
            if hasattr(error, "add_note"):
                error.add_note(message)
            else:  # Python < 3.11
                warnings.warn(message, RuntimeWarning, stacklevel=3)


def _put_back(module: nn.Module, name: str, original: Tensor, value: Tensor) -> None:
    store = module._parameters if name in module._parameters or isinstance(original, nn.Parameter) else module._buffers
    current = store.get(name)
    if current is not None and current.shape == value.shape and current.dtype == value.dtype:
        current.copy_(value.to(current.device))
        return
    original.data = value.to(original.device)  # something replaced or reshaped it: the original object, as it was
    store[name] = original


def _attempt(step, what: str, problems: list[str]) -> None:
    try:
        step()
    except BaseException as err:  # noqa: BLE001 - the original error must reach the user
        problems.append(f"{what} failed with {type(err).__name__}: {err}")
