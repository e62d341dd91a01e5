"""Which layers a run rounds, refused or warned about before the work; what stayed in float after it.

Every check here runs before the first forward pass or right after the last layer, so a bad
setting costs seconds, not a finished run.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any, Iterable, Sequence

from torch import nn

from lightning_adaround.data.capture import FirstPass, ForwardFn, parameters_read
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.model.fold import computed_weight_fix
from lightning_adaround.model.layers import SUPPORTED_LAYER_TYPES, float_modules, select_layers
from lightning_adaround.grid.quant import check_granularity, weight_problem
from lightning_adaround.result import EXCLUDED, NORM_OR_BIAS, AdaRoundResult, FloatModule


FLOAT_WARN_ELEMENTS = 4096  # a float weight matrix larger than this is worth a warning


def account_for_float(
    model: nn.Module, result: AdaRoundResult, config: AdaRoundConfig, seen: FirstPass, batch: Any, run: ForwardFn,
) -> dict[str, FloatModule]:
    """Every module that owns parameters and kept them in float, with the reason (see ``layers.float_modules``).

    Only when a selected layer was never called does one more forward pass (under a torch function
    mode) tell whether the model reads its weight without calling it.
    """
    read = None
    if result.unreached:
        weights = [model.get_submodule(name).weight for name in result.unreached]
        read = parameters_read(model, batch, run, weights)
    return float_modules(model, result.layers, config, result.unreached, read, seen.ran)


def warn_float_matrices(found: dict[str, FloatModule]) -> None:
    """One warning naming every weight matrix above ``FLOAT_WARN_ELEMENTS`` left in float by no choice of the user.

    Layers kept out with ``layers``/``exclude``/``layer_types`` were the user's choice; norm scales and
    biases are normally kept in float. Both are listed in the summary table, not warned about.
    """
    big = {
        name: m for name, m in found.items()
        if m.kind not in (EXCLUDED, NORM_OR_BIAS) and m.largest_matrix > FLOAT_WARN_ELEMENTS
    }
    if not big:
        return
    listed = "; ".join(f"{name!r} ({m.type}, {m.parameters:,} parameters): {m.reason}" for name, m in big.items())
    advice = " ".join(dict.fromkeys(f"{m.advice}." for m in big.values() if m.advice))
    warnings.warn(
        f"{len(big)} module{'s' if len(big) != 1 else ''} with a weight matrix of more than {FLOAT_WARN_ELEMENTS:,} "
        f"elements stay in float, not rounded, so the model is not fully quantized: {listed}. {advice} "
        "result.float_modules and the summary table's 'left in float' section list every module left in float.",
        stacklevel=4,
    )


def matching_nothing(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """The name globs in ``patterns`` that match none of ``names``."""
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def warn_unmatched_excludes(model: nn.Module, config: AdaRoundConfig) -> None:
    """An ``exclude`` glob that matches no layer is a typo the user would otherwise never see."""
    candidates = [name for name, _ in select_layers(model, config.layers, (), config.layer_types)]
    unused = matching_nothing(config.exclude, candidates)
    if unused:
        warnings.warn(
            f"exclude patterns {unused} match none of the layers that would be rounded ({candidates[:8]}"
            f"{'...' if len(candidates) > 8 else ''}), so they keep nothing in float; check the names with "
            "model.named_modules().",
            stacklevel=4,
        )


def warn_nothing_held_out(total: int, fraction: float) -> None:
    """Too few samples to hold any out: the 'held-out' errors of the summary are training errors."""
    if fraction > 0 and math.floor(total * fraction) == 0:
        warnings.warn(
            f"only {total} calibration sample(s): none can be held out at holdout_fraction={fraction}, so the "
            "nearest/AdaRound errors in the summary are measured on the samples the rounding was fitted to. "
            f"Pass at least {math.ceil(1 / fraction)} samples (AdaRound wants a few hundred to a thousand).",
            stacklevel=4,
        )


def check_weights(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse a computed (parametrized) or a NaN/Inf, huge or empty weight by name, before any work."""
    computed = [(name, fix) for name, module in layers if (fix := computed_weight_fix(module, name)) is not None]
    if computed:
        names = [name for name, _ in computed]
        one = len(names) == 1
        raise ValueError(
            f"the weight{'' if one else 's'} of layer{'' if one else 's'} "
            f"{repr(names[0]) if one else names} {'is' if one else 'are'} computed from other tensors (weight_norm, "
            "spectral_norm or another torch.nn.utils.parametrize parametrization), so a rounded weight written "
            f"into {'it' if one else 'them'} would be recomputed away. Bake {'it' if one else 'them'} in first "
            f"with {'; '.join(fix for _, fix in computed)}, or leave {'the layer' if one else 'them'} in float "
            f"with exclude={names}."
        )
    for name, module in layers:
        problem = weight_problem(module.weight)
        if problem is not None and module.weight.numel() == 0:
            raise ValueError(
                f"the weight of layer {name!r} {problem}: there is nothing to round. Leave the layer out "
                f"with exclude=[{name!r}]."
            )
        if problem is not None:
            raise ValueError(
                f"the weight of layer {name!r} {problem}; AdaRound cannot put it on a grid. Load good weights "
                f"(a diverged training run or a bad checkpoint?) or leave the layer in float with exclude=[{name!r}]."
            )


def selected_layers(model: nn.Module, config: AdaRoundConfig) -> list[tuple[str, nn.Module]]:
    layers = select_layers(model, config.layers, config.exclude, config.layer_types)
    if not layers:
        kinds = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
        raise ValueError(
            f"no layer to round in {type(model).__name__}: AdaRound rounds {kinds} "
            f"(selected by layers={config.layers!r}, exclude={list(config.exclude)!r}); "
            "check the model or the name globs."
        )
    check_granularity(layers, config.granularity)
    return layers


def forward_failure(err: Exception, when: str = "") -> ValueError:
    """The error for a forward that cannot run a calibration batch (``when``: a note appended)."""
    return ValueError(
        f"running the model on the first calibration batch failed with {type(err).__name__}: "
        f"{str(err).rstrip('.')}. "
        f"Pass forward_fn=lambda model, batch: ... that turns one of your batches into a forward call{when}."
    )
