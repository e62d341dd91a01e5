"""Where the callback's calibration batches come from: the given loader, the datamodule's
``calibration_dataloader()`` / ``train_dataloader()``, or the Trainer's own loaders; and, under
DDP, each rank's part of them.

Lightning glue only: the core takes plain lists of batches (or a ``CalibrationShard``).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch

from lightning_adaround.data.calibration import samples_in, take_samples
from lightning_adaround.distributed import CalibrationShard, is_sharded_loader, shard_calibration


def calibration_source(trainer: Any, calibration_data: Optional[Iterable[Any]]) -> Iterable[Any]:
    """``calibration_data``, else the datamodule's calibration or training loader, else the Trainer's loaders."""
    if calibration_data is not None:
        return calibration_data
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        method = "calibration_dataloader" if hasattr(datamodule, "calibration_dataloader") else "train_dataloader"
        try:
            return getattr(datamodule, method)()
        except Exception as err:
            raise ValueError(
                f"{type(datamodule).__name__}.{method}() failed ({type(err).__name__}: {err}); "
                "define calibration_dataloader() in the datamodule (set up for every stage) or pass "
                "AdaRoundCallback(calibration_data=...)."
            ) from err
    held = trainer.train_dataloader if trainer.train_dataloader is not None else trainer.val_dataloaders
    if isinstance(held, (list, tuple)):
        held = held[0] if held else None
    if held is not None:
        return held
    raise ValueError(
        "AdaRoundCallback found no calibration data: there is no datamodule and the Trainer holds no "
        "loader. Pass AdaRoundCallback(calibration_data=your_loader) or fit/validate with a datamodule."
    )


def early_source(trainer: Any, pl_module: Any, calibration_data: Optional[Iterable[Any]]) -> Iterable[Any]:
    """The calibration source at fit start, when Lightning has not set up its loaders yet:
    the loader given to ``fit(train_dataloaders=...)`` or the module's ``train_dataloader()``."""
    try:
        return calibration_source(trainer, calibration_data)
    except ValueError:
        given = getattr(getattr(getattr(trainer, "fit_loop", None), "_data_source", None), "instance", None)
        if given is not None and given is not pl_module and isinstance(given, Iterable):
            return given
        if callable(getattr(pl_module, "train_dataloader", None)):
            try:
                return pl_module.train_dataloader()
            except Exception:  # noqa: BLE001 - not defined (Lightning's default raises): the first error stands
                pass
        raise


def read_seeded(source: Iterable[Any], num_samples: Optional[int], seed: int) -> list[Any]:
    """A shuffling or augmenting loader draws from ``seed`` here: same seed, same samples.

    The global random state is restored afterwards, so training randomness is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return take_samples(source, num_samples)


def read_calibration(
    trainer: Any, source: Iterable[Any], num_samples: Optional[int], seed: int,
) -> list[Any] | CalibrationShard:
    """Up to ``num_samples`` samples from ``source``; under DDP this rank's part of them.

    Every rank reads the same samples and keeps its contiguous block (``distributed_adaround``
    checks that the ranks read the same data); from a loader Lightning gave a
    ``DistributedSampler`` each rank takes its own share.
    """
    world, rank = world_size(trainer), getattr(trainer, "global_rank", 0)
    if world > 1 and is_sharded_loader(source):  # already this rank's part
        share = None if num_samples is None else num_samples // world + (1 if rank < num_samples % world else 0)
        return take_samples(source, share)
    batches = read_seeded(source, num_samples, seed)
    warn_if_short(batches, num_samples)
    if world > 1:
        return shard_calibration(batches, rank, world)
    check_nonempty(batches)
    return batches


def check_nonempty(batches: list[Any]) -> None:
    if not batches:
        raise ValueError(
            "the calibration data gave no batch; pass a non-empty loader with "
            "AdaRoundCallback(calibration_data=...) or define calibration_dataloader() in the datamodule."
        )


def warn_if_short(batches: list[Any], asked: Optional[int]) -> None:
    read = sum(samples_in(b) for b in batches)
    if asked is not None and 0 < read < asked:
        warnings.warn(
            f"AdaRoundCallback read {read} calibration samples, fewer than num_calibration_samples={asked}: the "
            "loader ran out. Rounding goes on with these; pass a larger loader (AdaRound wants a few hundred to a "
            "thousand samples) or set num_calibration_samples to what you have.",
            stacklevel=4,
        )


def world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)
