"""The callback's arguments, checked when it is built: each error gives the value and the fix."""

from __future__ import annotations

import os
from typing import Any, Optional

from lightning_adaround.io.checkpoint import PathLike
from lightning_adaround.config import AdaRoundConfig

RUN_ON = ("fit_end", "validate")


def config_with_bits(bits: Optional[int], config: Optional[AdaRoundConfig]) -> AdaRoundConfig:
    """``config`` (default ``AdaRoundConfig()``) with the ``bits`` shortcut applied; two bit widths are an error."""
    if config is None:
        return AdaRoundConfig() if bits is None else AdaRoundConfig(bits=bits)
    if not isinstance(config, AdaRoundConfig):
        raise TypeError(
            f"config={config!r} must be an AdaRoundConfig, e.g. config=AdaRoundConfig(bits=4, iterations=2_000)."
        )
    if bits is not None and bits != config.bits:
        raise ValueError(
            f"AdaRoundCallback got bits={bits!r} and a config with bits={config.bits!r} (an AdaRoundConfig's bits "
            f"default to 4); give the bit width once, in the config: AdaRoundCallback(config=AdaRoundConfig("
            f"bits={bits!r}, ...)) (in YAML: init_args.config.bits)."
        )
    return config


def checked_run_on(run_on: str) -> str:
    if run_on not in RUN_ON:
        raise ValueError(f"run_on={run_on!r} isn't one of {RUN_ON}; use run_on='fit_end' or 'validate'.")
    return run_on


def checked_sample_count(count: Optional[int]) -> Optional[int]:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(
            f"num_calibration_samples={count!r} must be a positive integer "
            "(about 1,024 is typical) or None to read all calibration data."
        )
    return count


def checked_callable(name: str, value: Any, usage: str) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name}={value!r} must be callable as {usage}.")
    return value


def checked_folder(folder: Optional[PathLike]) -> Optional[PathLike]:
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a folder path (str or os.PathLike), got {folder!r}.")
    return folder
