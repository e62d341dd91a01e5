"""AdaRound post-training weight rounding for PyTorch, with a PyTorch Lightning callback.

Public API: ``adaround`` and ``AdaRoundConfig`` (plain PyTorch), the grid granularities,
the result types, the observer hooks, BatchNorm folding, cross-layer equalization, export (a quantized file, ONNX) and full-precision
A/B switching, and ``AdaRoundCallback`` (imported lazily so the core works without
Lightning installed).
"""

from lightning_adaround.api import adaround, round_to_nearest
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.model.equalize import equalize_layers
from lightning_adaround.model.fold import fold_batchnorm
from lightning_adaround.io.export import export_quantized, load_quantized, use_float_weights, use_rounded_weights
from lightning_adaround.io.onnx_export import export_onnx
from lightning_adaround.observer import AdaRoundObserver, RoundingStopped
from lightning_adaround.grid.quant import PerChannel, PerGroup, PerTensor, QuantGrid
from lightning_adaround.result import AdaRoundResult, FloatModule, LayerResult

__all__ = [
    "AdaRoundCallback",
    "AdaRoundConfig",
    "AdaRoundObserver",
    "AdaRoundResult",
    "FloatModule",
    "LayerResult",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantGrid",
    "RoundingStopped",
    "adaround",
    "equalize_layers",
    "export_onnx",
    "export_quantized",
    "fold_batchnorm",
    "load_quantized",
    "round_to_nearest",
    "use_float_weights",
    "use_rounded_weights",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "AdaRoundCallback":
        from lightning_adaround.trainer.callback import AdaRoundCallback

        return AdaRoundCallback
    raise AttributeError(f"module 'lightning_adaround' has no attribute {name!r}")
