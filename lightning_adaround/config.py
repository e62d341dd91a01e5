"""One configuration object for a rounding run, checked when it is built.

A typo or an out-of-range value fails here, before a single calibration batch is read.
"""

from __future__ import annotations

import math

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_adaround.model.layers import SUPPORTED_LAYER_TYPES, check_layer_types
from lightning_adaround.grid.quant import SCALE_METHODS, PerChannel, PerGroup, PerTensor, check_bits

LOSS_FORMS = ("auto", "minibatch", "moments")
RECONSTRUCTIONS = ("layer", "block")
BLOCK_LOSSES = ("mse", "fisher")
# What upstream_correction=None means for a unit of Linear layers only (transformers; docs/four-bits.md).
LINEAR_UPSTREAM_CORRECTION = 0.5
# What iterations=None means: the paper's count, and fewer for a unit of Linear layers only.
PAPER_ITERATIONS = 10_000
LINEAR_ITERATIONS = 1_000
# What log_every_n_steps=None means outside a Trainer (the callback uses the Trainer's).
DEFAULT_LOG_EVERY_N_STEPS = 50


def _linear_only(layers: Sequence[nn.Module]) -> bool:
    """Whether a unit holds only ``nn.Linear`` layers: the kind the ``None`` defaults tell apart."""
    return all(isinstance(m, nn.Linear) for m in layers)


@dataclass(frozen=True)
class AdaRoundConfig:
    """How to round.

    Frozen: a field cannot be assigned after the checks ran. For a changed copy, use
    ``dataclasses.replace(config, iterations=2_000)`` (checked again).

    Args:
        bits: Weight bit width, 2-8.
        symmetric: Signed grid with zero point 0 (``True``) or an unsigned affine grid.
        granularity: ``PerChannel()`` (one scale per output channel; ``PerChannel(axis=0)`` names
            the weight axis), ``PerTensor()``, or ``PerGroup(group_size=128)``: one scale per output
            channel and group of ``group_size`` consecutive inputs (the row of ``weight.reshape(out,
            -1)``: ``in_features``, or ``in_channels/groups * prod(kernel_size)`` for a convolution;
            a row that ``group_size`` does not divide is split into ``ceil(K / group_size)`` groups
            of ``ceil(K / G)``, the last shorter), the usual weight-only int4 grid of LLM toolkits.
            Not for transposed convolutions.
        scale_method: ``"mse"`` searches the clipping range that minimises rounding error;
            ``"minmax"`` covers the full weight range; ``"output"`` searches the same ranges but
            judges them by the layer's output error on the calibration data (per output channel,
            round-to-nearest), which matters for layers with few weights per channel (depthwise
            convolutions). A block's layers are judged on their own outputs inside the block (one
            pass of the block over its training rows gives their input moments). Where no layer
            output is measured (layers in the minibatch form, transposed convolutions) and for
            ``PerGroup`` grids (a channel's groups share one output error) ``"output"`` falls back
            to ``"mse"``. ``"auto"``: per unit (a layer or a block), AdaRound on both ``"mse"`` and
            ``"output"`` scales, keeping the one with the lower error on the held-out samples
            afterwards (twice the optimisation; ``"mse"`` alone where ``"output"`` falls back); the
            summary notes the choice and both errors.
        loss_form: ``"minibatch"`` (the paper: a random minibatch of cached activations per
            step), ``"moments"`` (the exact loss over every calibration row from second
            moments; no activation in the loss) or ``"auto"`` (moments where it is cheaper and
            no activation was asked for explicitly, minibatch otherwise).
        reconstruction: ``"layer"`` rounds each layer against its own float output (AdaRound);
            ``"block"`` rounds all layers of a block together against the block's float
            output (BRECQ), which recovers much more at 2-4 bits on residual and
            depthwise-separable networks. Layers outside any block are rounded alone.
        blocks: With ``reconstruction="block"``: module-name globs (``"layer*.?"``) or runs
            of an ``nn.Sequential``'s children (``"features[0:6]"``) to use as blocks.
            ``None`` finds them: each element of a chain of blocks (a residual or
            inverted-residual block, a transformer layer) that holds two or more layers.
        block_loss: ``"mse"``, or ``"fisher"``: weight each block-output element by the squared
            gradient of the task loss (``task_loss=`` on ``adaround``/the callback), as BRECQ.
        iterations: Optimisation steps per layer or block. ``None`` (default): by the unit's
            layers, ``1,000`` for a unit of ``nn.Linear`` layers only and the paper's ``10,000``
            for any other. MiniLM's cosine is the same at 1,000 as at 10,000 (0.9812, 0.981;
            W3 0.943 against 0.931) in a tenth of the time, while EfficientNet-Lite1's
            convolutions lose beyond noise at 5,000 (per tensor KL 0.331 against 0.295); measured
            in docs/four-bits.md. The summary's ``iterations`` per layer say what each used.
        batch_size: Calibration samples per step (paper: 32).
        lr: Adam learning rate on the rounding variables (the paper's ``1e-3``); ``None`` ties it
            to ``iterations``: ``1e-3`` at the paper's 10,000, ``1e-2`` at 500 and fewer (measured
            on EfficientNet-Lite1, docs/four-bits.md), log-linear in between. Adam moves each
            variable by about ``lr`` per step, so fewer steps need larger ones on depthwise-separable
            CNNs; not the default, since MiniLM did worse with it (cosine 0.950 at 500 iterations
            against 0.977 with ``1e-3``) and so did block reconstruction at 1,500 iterations
            (tests/test_blocks.py).
        upstream_correction: How much of the earlier layers' rounding error each unit makes up
            for. Every unit sees its input in the rounded model; its target is its float output on
            ``upstream_correction`` of the way from that input to its input in the float model.
            ``1`` (the paper): the float model's output, so each layer also corrects the error
            that reaches it. ``0``: its own float output on the rounded input, so it only fits its
            own rounding. Between them, a share. ``None`` (default): by the unit's layers, ``0.5``
            for a unit of ``nn.Linear`` layers only and ``1`` for any other. A transformer overfits
            the full correction to its calibration text (MiniLM W4 per-channel: cosine 0.958 at
            ``1``, 0.981 at ``0.5``, 10,000 iterations), while a depthwise-separable CNN needs it
            (EfficientNet-Lite1: top-1 agreement 0.629 at ``1``, 0.535 at ``0.5``); measured in
            docs/four-bits.md. The summary's note names any correction other than ``1``.
        reg_lambda: Weight of the rounding regularizer.
        warm_start: Fraction of iterations with the regularizer off.
        beta_start, beta_end: Regularizer exponent, annealed on a cosine after the warm start.
        include_activation: Put the BatchNorm/activation that directly follows a layer in an
            ``nn.Sequential`` into its reconstruction loss.
        holdout_fraction: Share of calibration samples kept out of each layer's (or block's)
            optimisation to report nearest vs AdaRound error and judge its choices on; each layer
            draws its own, so every sample is fitted by most layers (0: report on the training samples).
        device_cache_bytes: Per-layer budget for cached activations on the compute device
            (``None``: half the free GPU memory when the layer starts; on a CPU device the
            host budget applies). A layer over budget is cached in host memory; so are the
            calibration batches when they do not fit it (``0``: everything in host memory, for
            a device short of memory).
        host_cache_bytes: Per-layer budget in host memory (``None``: half the available
            memory). A layer over it is cached in a memory-mapped file in ``cache_dir``.
        cache_dir: Directory for the memory-mapped caches (``None``: the system temp dir);
            the files are unlinked as soon as they are mapped.
        cache_dtype: Store cached activations in this dtype, e.g. ``torch.bfloat16``, to
            halve their memory; steps still compute in float32. ``None`` keeps them as they
            are (exact). Where a cache lives never changes the result; its dtype does.
        carry_activations: In a chain of blocks (an ``nn.Sequential``, or a ``ModuleList``
            of blocks run one after another, as in transformers) feed each layer from its
            block's kept input rather than re-running the model from the start: capture
            time linear in depth instead of quadratic, for the memory of one block input
            (two copies) per calibration sample. Inputs are identical either way. While a
            block's layers are rounded, the float model's inputs of its layers (one pass of
            the block per batch) are kept too where they fit the per-layer cache budget.
        seed: Seed of the minibatch sampler; same seed, same integer weights.
        layers: Name globs of layers to round (``None``: every supported layer).
        exclude: Name globs of layers to leave in full precision.
        layer_types: Module types to round (subclasses of the supported ones; in YAML by import
            path, e.g. ``[torch.nn.Linear]``).
        layer_bits: Name glob -> bits overrides, e.g. ``{"conv1": 8, "fc": 8}``.
        log_every_n_steps: How often per-step losses reach the observer/loggers. ``None``:
            the Trainer's ``log_every_n_steps`` in the callback, 50 in :func:`~lightning_adaround.adaround`.
        keep_float_weights: Keep a copy of each rounded layer's full-precision weight in the
            result (``LayerResult.float_weight``), so ``use_float_weights`` and
            ``use_rounded_weights`` can switch the model between the two for A/B evaluation
            without rounding again. Costs one float copy of the rounded weights (in memory
            and in checkpoints that hold the result).
        fold_batchnorm: Before rounding, fold each BatchNorm into the Conv/Linear that feeds it
            (:func:`~lightning_adaround.fold_batchnorm`), so each grid fits the weights a runtime
            uses; ``state_dict`` keys and eval-mode outputs stay the same, the BatchNorm keeps an
            exact shift (weight 1, bias 0, ``running_var + eps == 1``; a model trained further
            would normalise differently, so round a copy you no longer train).
        equalize: Cross-layer equalization after folding (:func:`~lightning_adaround.equalize_layers`):
            rescales the channels of consecutive layers so one per-tensor grid fits them all,
            outputs unchanged; a ReLU6/Hardtanh module between them becomes a ``ChannelClip``.
            ``None`` (default): on for ``PerTensor()`` grids, off for ``PerChannel()`` and ``PerGroup()``
            (their scales already fit each channel).
        bias_correction: After rounding, add each rounded layer's mean output error on the
            calibration data to its bias: per output channel, its mean output in the float model
            minus its mean output in the model whose earlier layers are rounded and corrected. A
            layer without a bias keeps none: the shift goes into the ``running_mean`` of a
            BatchNorm right after it in an ``nn.Sequential`` (exact in eval mode), or is only
            reported (``LayerResult.bias_shift``). ``True``: on every channel, measured on all
            calibration samples. ``"auto"``: measured on the training samples only and kept on
            the output channels where it lowers the layer's output error on the held-out samples
            (``holdout_fraction``); each layer's note says how many channels kept it and the
            held-out error before and after. Layers with no held-out rows (``holdout_fraction=0``)
            are corrected as with ``True``, with a warning. ``False``: off.
        learn_scale: Learn each grid scale (the clipping range: per tensor, per channel or per
            group) jointly with the rounding, in every form: a log-multiplier per scale entry,
            starting from the searched scale, stepped by Adam at ``scale_lr``. ``floor(W/s)`` and
            the zero point stay those of the searched grid, so the result is still an exact grid
            (integer weights, the learned scales in ``LayerResult.scale``). In the moments form a
            per-channel or per-tensor scale is then refit to the final integer weights (exact: the
            error is quadratic in the scale; it moves only where the error drops). Keeping
            round-to-nearest where it is better resets a channel's learned scale to the searched one
            (per tensor: nearest on the learned grid). An affine grid's zero point is not learned:
            it must stay an integer, and rounding a learned one afterwards would move every weight
            of the channel. Measured in docs/four-bits.md; off by default.
        scale_lr: Adam learning rate of the learned scales' log-multipliers (``learn_scale=True``):
            a step of ``scale_lr`` changes a scale by about ``scale_lr`` of itself.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Union[PerChannel, PerTensor, PerGroup] = field(default_factory=PerChannel)
    scale_method: str = "mse"
    loss_form: str = "auto"
    reconstruction: str = "layer"
    blocks: Optional[Sequence[str]] = None
    block_loss: str = "mse"
    iterations: Optional[int] = None
    batch_size: int = 32
    lr: Optional[float] = 1e-3
    upstream_correction: Optional[float] = None
    reg_lambda: float = 0.01
    warm_start: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    include_activation: bool = True
    holdout_fraction: float = 0.1
    device_cache_bytes: Optional[int] = None
    host_cache_bytes: Optional[int] = None
    cache_dir: Optional[str] = None
    cache_dtype: Optional[torch.dtype] = None
    carry_activations: bool = True
    seed: int = 0
    layers: Optional[Sequence[str]] = None
    exclude: Sequence[str] = ()
    layer_types: Sequence[type[nn.Module]] = SUPPORTED_LAYER_TYPES
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    log_every_n_steps: Optional[int] = None
    keep_float_weights: bool = False
    fold_batchnorm: bool = True
    equalize: Optional[bool] = None
    bias_correction: Union[bool, str] = False
    learn_scale: bool = False
    scale_lr: float = 1e-4

    @property
    def learning_rate(self) -> float:
        """``lr``, or the rate tied to ``iterations`` when ``lr`` is ``None`` (the paper's count when that is ``None``)."""
        return self.learning_rate_for(self.iterations or PAPER_ITERATIONS)

    def learning_rate_for(self, iterations: int) -> float:
        """``lr``, or with ``lr=None`` the rate tied to a unit's ``iterations``."""
        if self.lr is not None:
            return self.lr
        steps = min(max(iterations, 500), PAPER_ITERATIONS)
        return 1e-2 * 10 ** (-math.log(steps / 500) / math.log(20))

    def iterations_for(self, layers: Sequence[nn.Module]) -> int:
        """``iterations`` for a unit of these layers; by their kind when it is ``None``."""
        if self.iterations is not None:
            return self.iterations
        return LINEAR_ITERATIONS if _linear_only(layers) else PAPER_ITERATIONS

    def upstream_correction_for(self, layers: Sequence[nn.Module]) -> float:
        """``upstream_correction`` for a unit of these layers; by their kind when it is ``None``."""
        if self.upstream_correction is not None:
            return float(self.upstream_correction)
        return LINEAR_UPSTREAM_CORRECTION if _linear_only(layers) else 1.0

    def __post_init__(self) -> None:
        # Copies the caller cannot change afterwards (the instance is frozen: object.__setattr__).
        for name in ("exclude", "layer_types"):
            if isinstance(getattr(self, name), list):  # from YAML, or written as a list
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.layer_bits, Mapping):
            object.__setattr__(self, "layer_bits", dict(self.layer_bits))
        check_bits(self.bits)
        for pattern, bits in self.layer_bits.items():
            check_bits(bits, f"layer_bits[{pattern!r}]")
        if self.scale_method not in (*SCALE_METHODS, "auto"):
            raise ValueError(f"scale_method={self.scale_method!r} is not one of {(*SCALE_METHODS, 'auto')}.")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form={self.loss_form!r} is not one of {LOSS_FORMS}.")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction={self.reconstruction!r} is not one of {RECONSTRUCTIONS}.")
        if self.block_loss not in BLOCK_LOSSES:
            raise ValueError(f"block_loss={self.block_loss!r} is not one of {BLOCK_LOSSES}.")
        if isinstance(self.blocks, str):
            raise TypeError(f"blocks={self.blocks!r}: give a list of module names or globs, e.g. blocks=['features.*'].")
        if self.reconstruction == "layer" and (self.blocks is not None or self.block_loss != "mse"):
            raise ValueError(
                "blocks= and block_loss= apply to block reconstruction; add reconstruction='block' "
                f"(got blocks={self.blocks!r}, block_loss={self.block_loss!r})."
            )
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise TypeError(
                f"granularity={self.granularity!r}: use PerChannel() or PerTensor() "
                "from lightning_adaround."
            )
        if self.iterations is not None:
            _positive_int("iterations", self.iterations)
        _positive_int("batch_size", self.batch_size)
        if self.log_every_n_steps is not None:
            _positive_int("log_every_n_steps", self.log_every_n_steps)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive (the reference uses 1e-3), or None to tie it to iterations.")
        correction = self.upstream_correction
        if correction is not None and (
            isinstance(correction, bool) or not isinstance(correction, (int, float)) or not 0 <= correction <= 1
        ):
            raise ValueError(
                f"upstream_correction={correction!r} must be a number in [0, 1] (1: target the full-precision "
                "model's output, as the paper; 0: each layer's float output on its rounded input), or None "
                "(0.5 for units of Linear layers only, 1 for others)."
            )
        if not self.reg_lambda >= 0:
            raise ValueError(f"reg_lambda={self.reg_lambda} must be >= 0 (the reference uses 0.01).")
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(f"warm_start={self.warm_start} must be in [0, 1) (the reference uses 0.2).")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1).")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(
                f"beta must anneal downwards from a positive value: got beta_start={self.beta_start}, "
                f"beta_end={self.beta_end} (the reference uses 20 -> 2)."
            )
        for budget in ("device_cache_bytes", "host_cache_bytes"):
            value = getattr(self, budget)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{budget}={value!r} must be a number of bytes >= 0, or None for automatic.")
        if self.cache_dtype is not None and not (
            isinstance(self.cache_dtype, torch.dtype) and self.cache_dtype.is_floating_point
        ):
            raise TypeError(f"cache_dtype={self.cache_dtype!r} must be a floating torch dtype, e.g. torch.bfloat16.")
        if self.cache_dir is not None and not os.path.isdir(self.cache_dir):
            raise ValueError(f"cache_dir={self.cache_dir!r} is not an existing directory; create it or pass None.")
        if not (isinstance(self.bias_correction, bool) or self.bias_correction == "auto"):
            raise ValueError(
                f"bias_correction={self.bias_correction!r} must be True, False or 'auto' ('auto': keep each "
                "layer's correction only on the output channels where it lowers the held-out error)."
            )
        if not isinstance(self.learn_scale, bool):
            raise TypeError(f"learn_scale={self.learn_scale!r} must be True or False.")
        if isinstance(self.scale_lr, bool) or not isinstance(self.scale_lr, (int, float)) or not self.scale_lr > 0:
            raise ValueError(
                f"scale_lr={self.scale_lr!r} must be a positive number (the Adam rate of the learned scales, "
                "used with learn_scale=True; e.g. 1e-4)."
            )
        if not isinstance(self.fold_batchnorm, bool):
            raise TypeError(f"fold_batchnorm={self.fold_batchnorm!r} must be True or False.")
        if not (self.equalize is None or isinstance(self.equalize, bool)):
            raise ValueError(
                f"equalize={self.equalize!r} must be True, False or None (None: on for granularity='per_tensor')."
            )
        check_layer_types(self.layer_types)
        if isinstance(self.layers, str) or isinstance(self.exclude, str):
            raise TypeError("layers and exclude take a list of name globs, e.g. layers=['features.*'].")

    @property
    def equalizes(self) -> bool:
        """Whether cross-layer equalization runs: ``equalize``, or for ``None`` whether the grid is per tensor."""
        return self.equalize if self.equalize is not None else isinstance(self.granularity, PerTensor)


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
