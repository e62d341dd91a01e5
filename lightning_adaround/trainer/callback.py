"""``AdaRoundCallback``: thin Lightning glue over :func:`lightning_adaround.adaround`.

It gathers calibration batches, calls the core on the strategy's device with a
``TrainerObserver`` (loggers, progress bar, report: ``trainer/observer.py``) and remembers
the result. Rounding options live in ``AdaRoundConfig``, taken whole as ``config=``. The logic
lives in a namespace-free base so ``lightning.pytorch`` and ``pytorch_lightning`` each get a
one-line class.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from lightning_adaround.api import adaround
from lightning_adaround.trainer.arguments import (
    checked_callable, checked_folder, checked_run_on, checked_sample_count, config_with_bits,
)
from lightning_adaround.engine.checks import check_weights, forward_failure, selected_layers
from lightning_adaround.io.checkpoint import PathLike
from lightning_adaround.data.capture import default_forward
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.distributed import CalibrationShard, distributed_adaround
from lightning_adaround.trainer.data import (
    calibration_source, check_nonempty, early_source, read_calibration, read_seeded, world_size,
)
from lightning_adaround.trainer.observer import TrainerObserver
from lightning_adaround.result import AdaRoundResult

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class _AdaRoundCallbackBase:
    """Round the model's weights with AdaRound after training, or in a validate pass.

    ``bits`` is the one rounding option taken directly; every other one (iterations, grid,
    layers, caches, block reconstruction, ...) is a field of ``config``, spelled once in
    :class:`~lightning_adaround.AdaRoundConfig`. The other arguments say how the callback
    gets its data and what it shows.

    Args:
        bits: Weight bit width, 2-8: ``AdaRoundCallback(bits=4)`` is
            ``AdaRoundCallback(config=AdaRoundConfig(bits=4))``. ``None``: ``config.bits``
            (4 without a config).
        config: Every rounding option (``AdaRoundConfig()`` by default). Its ``log_every_n_steps``
            of ``None`` means the Trainer's. In LightningCLI YAML, a mapping of its fields under
            ``init_args.config`` (see the quickstart).
        run_on: ``"fit_end"`` rounds in ``on_fit_end`` (after checkpoints of the float model
            are written); ``"validate"`` rounds at the start of ``trainer.validate(...)``, so
            that validation reports the rounded model.
        num_calibration_samples: How many samples to read from the calibration data
            (``None``: all of it). A shuffling loader draws them from ``config.seed``.
        calibration_data: A dataloader or iterable of batches; by default the datamodule's
            ``calibration_dataloader()`` or ``train_dataloader()``, else the Trainer's loaders.
        forward_fn: ``forward_fn(module, batch)`` runs the module on a batch; by default a
            tensor is the input, a tuple/list's first element is, a dict is keyword arguments.
        task_loss: ``task_loss(output, batch) -> scalar`` for ``block_loss="fisher"``, e.g.
            ``lambda out, batch: F.cross_entropy(out, batch[1])``.
        checkpoint_dir: A folder where each finished layer is saved; a run stopped part way
            (an exception, Ctrl-C, a killed job) resumes from it when started again with the same
            model, data and settings, with the same result. Under DDP every rank reads it and rank 0
            writes it, so it must be a folder every rank sees.
        verbose: Print the per-layer summary table at the end.
        report: Save a PNG report (held-out error ratio and errors per layer, the loss curves
            labelled for what they are) as ``adaround_report.png`` in the first logger's folder
            (else a ``default_root_dir`` you gave; never the working directory) and send it to
            every logger that takes images (TensorBoard, W&B, MLflow); needs matplotlib.

    Raises:
        ValueError: ``bits`` and ``config.bits`` that differ, an unknown ``run_on``, a
            non-positive ``num_calibration_samples`` (and any invalid ``AdaRoundConfig`` value
            when the config is built), and, when the run starts, missing or empty calibration
            data, a sharded strategy (FSDP, DeepSpeed: refused in ``setup``), or a ``checkpoint_dir``
            holding another run's checkpoint.
        TypeError: a ``config`` that is not an ``AdaRoundConfig``, a ``forward_fn`` or ``task_loss``
            that is not callable, a ``checkpoint_dir`` that is not a path.
        AdaRoundDistributedError: under DDP, on every rank, when any rank fails or the ranks
            disagree (see ``lightning_adaround.distributed``).

    Under ``strategy="ddp"``/``"ddp_spawn"`` each rank keeps a contiguous block of the first
    ``num_calibration_samples`` samples and all ranks find one rounding together (one
    gradient all-reduce per step); logging and the progress bar stay on rank 0.

    Example::

        from lightning_adaround import AdaRoundCallback, AdaRoundConfig, PerTensor

        trainer = Trainer(callbacks=[AdaRoundCallback(bits=4)])
        trainer.fit(model, datamodule=dm)   # weights are on the 4-bit grid afterwards

        config = AdaRoundConfig(bits=3, granularity=PerTensor(), iterations=2_000, layer_bits={"fc": 8})
        trainer = Trainer(callbacks=[AdaRoundCallback(config=config, run_on="validate")])
        trainer.validate(model, datamodule=dm)   # the metrics are the rounded model's
    """

    def __init__(
        self,
        bits: Optional[int] = None,
        *,
        config: Optional[AdaRoundConfig] = None,
        run_on: str = "fit_end",
        num_calibration_samples: Optional[int] = 1024,
        calibration_data: Optional[Iterable[Any]] = None,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
        task_loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        checkpoint_dir: Optional[PathLike] = None,
        verbose: bool = True,
        report: bool = True,
    ) -> None:
        self.config = config_with_bits(bits, config)
        self.run_on = checked_run_on(run_on)
        self.num_calibration_samples = checked_sample_count(num_calibration_samples)
        self.calibration_data = calibration_data
        self.forward_fn = checked_callable("forward_fn", forward_fn, "forward_fn(module, batch)")
        self.task_loss = checked_callable("task_loss", task_loss, "task_loss(output, batch)")
        self.checkpoint_dir = checked_folder(checkpoint_dir)
        self.verbose = verbose
        self.report = report
        self.report_path: Optional[str] = None
        self.result: Optional[AdaRoundResult] = None
        self._log_step = 0

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                f"AdaRoundCallback cannot round a model sharded by {strategy} yet: each rank holds "
                "only part of every weight. Train with it, save a checkpoint, then round the full "
                "model with strategy='auto' or 'ddp' in a separate trainer.validate(...) call."
            )


    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Before training: what can fail without trained weights fails now, not after the fit."""
        if self.run_on == "fit_end":
            self.check_before_work(trainer, pl_module)

    def check_before_work(self, trainer: Any, pl_module: Any) -> None:
        """Select the layers, read one calibration batch and run one forward of it on the device.

        A model with no layer to round or with parametrized weights, calibration data that cannot
        be read, and a batch that ``forward_batch`` cannot run are reported here, in the terms
        the rounding itself would use. The model's train/eval modes and the random state are kept.
        """
        check_weights(selected_layers(pl_module, self.config))
        try:
            batches = read_seeded(early_source(trainer, pl_module, self.calibration_data), 1, self.config.seed)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(
                f"reading the calibration data failed with {type(err).__name__}: {err}. Check the loader "
                "(AdaRoundCallback(calibration_data=...) or the datamodule's calibration_dataloader())."
            ) from err
        check_nonempty(batches)
        strategy, precision = trainer.strategy, trainer.precision_plugin
        modes = [(module, module.training) for module in pl_module.modules()]
        try:
            batch = precision.convert_input(strategy.batch_to_device(batches[0], strategy.root_device))
            pl_module.eval()
            with torch.no_grad():
                self._forward_in_precision(precision, pl_module, batch)
        except Exception as err:
            raise forward_failure(err, " (checked before training, so no training time was lost)") from err
        finally:
            for module, training in modes:
                module.training = training

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run_on == "fit_end":
            self.round_model(trainer, pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.run_on == "validate" and trainer.state.fn == "validate":
            self.round_model(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result.state_dict() if self.result is not None else None, "log_step": self._log_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        result = state_dict.get("result")
        self.result = AdaRoundResult.from_state_dict(result) if result is not None else None
        self._log_step = state_dict.get("log_step", 0)

    # ----------------------------------------------------------------- extension points

    def forward_batch(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` on one calibration batch. Override, or pass ``forward_fn``."""
        return (self.forward_fn or default_forward)(module, batch)

    def calibration_batches(self, trainer: Any, pl_module: Any) -> list[Any] | CalibrationShard:
        """Up to ``num_calibration_samples`` samples of calibration batches. Override to customise.

        Under DDP (``trainer.world_size > 1``) this is the rank's part of them: a
        ``CalibrationShard`` (a contiguous block) of the first ``num_calibration_samples`` samples
        that every rank reads from the same loader, or, from a loader that already has a
        ``DistributedSampler``, this rank's own ``num_calibration_samples / world_size`` samples.
        """
        source = calibration_source(trainer, self.calibration_data)
        return read_calibration(trainer, source, self.num_calibration_samples, self.config.seed)

    # ----------------------------------------------------------------- the run

    def round_model(self, trainer: Any, pl_module: Any) -> Optional[AdaRoundResult]:
        """Round ``pl_module`` in place now (the hooks call this); returns the result."""
        if self.result is not None and _weights_match(pl_module, self.result):
            warnings.warn(
                "AdaRoundCallback: the model's weights are already the rounded ones from the last run; "
                "not rounding twice. A model with other weights (retrained, say) is rounded again, and callback.result "
                "then holds the new run.",
                stacklevel=2,
            )
            return self.result
        config = self.config
        if config.log_every_n_steps is None:  # the Trainer's
            config = dataclasses.replace(config, log_every_n_steps=max(1, trainer.log_every_n_steps))
        strategy = trainer.strategy
        distributed = world_size(trainer) > 1  # DDP: one rounding from every rank's shard
        read = lambda: self.calibration_batches(trainer, pl_module)  # noqa: E731
        batches = read if distributed else read()  # under DDP, read inside the failure protocol
        self._log_step = self._first_log_step(trainer)
        observer = TrainerObserver(self, trainer, config.iterations)
        precision = trainer.precision_plugin
        try:
            self.result = (distributed_adaround if distributed else adaround)(
                pl_module, batches, config,
                forward_fn=lambda module, batch: self._forward_in_precision(precision, module, batch),
                device=strategy.root_device,
                observer=observer,
                # the batch as the Trainer's own loops see it: the module's transfer hooks, then the
                # precision plugin's input conversion (bfloat16 batches for a "bf16-true" model)
                move_batch=lambda batch, device: precision.convert_input(strategy.batch_to_device(batch, device)),
                checkpoint_dir=self.checkpoint_dir, task_loss=self.task_loss,
            )
        except Exception as error:
            if observer.should_stop():  # not a failure: stop as Lightning's own loops do on SIGTERM
                raise SIGTERMException() from error
            raise
        finally:
            observer.progress.close()
        return self.result

    def _forward_in_precision(self, precision: Any, module: nn.Module, batch: Any) -> Any:
        """:meth:`forward_batch` in the precision plugin's forward context, except autocast.

        A ``"*-true"`` model runs as in training (its default dtype set); a ``"*-mixed"`` model's
        weights are float32 and the rounding computes in float32, so autocast stays off.
        """
        if any(cls.__name__ in ("MixedPrecision", "MixedPrecisionPlugin") for cls in type(precision).__mro__):
            return self.forward_batch(module, batch)
        with precision.forward_context():
            return self.forward_batch(module, batch)

    def _first_log_step(self, trainer: Any) -> int:
        """AdaRound's curves continue after everything logged so far: the fit's steps and any
        earlier rounding by this or another AdaRoundCallback (loggers such as W&B drop a step
        that goes back)."""
        others = [cb._log_step for cb in trainer.callbacks if isinstance(cb, _AdaRoundCallbackBase)]
        after_fit = trainer.global_step + 1 if trainer.global_step > 0 else 0
        return max([self._log_step, after_fit, *others])

    @property
    def state_key(self) -> str:
        """Distinct per configuration, so two callbacks (a W8 and a W4 pass) keep their own state."""
        config = self.config
        return self._generate_state_key(
            bits=config.bits, run_on=self.run_on, layers=config.layers, exclude=list(config.exclude),
            layer_bits=dict(config.layer_bits),
        )

    def _info(self, message: str) -> None:
        rank_zero_info(message)


def _weights_match(module: nn.Module, result: AdaRoundResult) -> bool:
    if not result.layers:
        return False
    for name, layer in result.layers.items():
        try:
            weight = module.get_submodule(name).weight.detach().cpu()
        except AttributeError:
            return False
        if weight.shape != layer.integer_weight.shape:
            return False
        if not torch.equal(weight, layer.dequantized_weight().to(weight.dtype)):
            return False
    return True


class AdaRoundCallback(_AdaRoundCallbackBase, Callback):
    __doc__ = _AdaRoundCallbackBase.__doc__
