"""``AdaRoundCallback``: thin Lightning glue over :func:`lightning_adaround.adaround`.

It gathers calibration batches, calls the core on the strategy's device, logs to every
logger, shows progress and remembers the result. The logic lives in a namespace-free
base so ``lightning.pytorch`` and ``pytorch_lightning`` each get a one-line class.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_adaround.api import adaround
from lightning_adaround.calibration import take_samples
from lightning_adaround.checkpoint import PathLike
from lightning_adaround.capture import default_forward
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.distributed import CalibrationShard, distributed_adaround, is_sharded_loader, shard_calibration
from lightning_adaround.observer import AdaRoundObserver
from lightning_adaround.quant import PerChannel, PerTensor
from lightning_adaround.result import AdaRoundResult, LayerResult

RUN_ON = ("fit_end", "validate")
GRANULARITIES = {"per_channel": PerChannel, "per_tensor": PerTensor}
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class _AdaRoundCallbackBase:
    """Everything the callback does; the subclasses only add the namespace's ``Callback`` base.

    Args:
        bits: Weight bit width, 2-8.
        run_on: ``"fit_end"`` rounds in ``on_fit_end`` (after checkpoints of the float model
            are written); ``"validate"`` rounds at the start of ``trainer.validate(...)``, so
            that validation reports the rounded model.
        granularity: ``"per_channel"`` or ``"per_tensor"`` scales.
        symmetric: Signed grid with zero point 0, or an unsigned affine grid.
        scale_method: ``"mse"`` (clipping search on the weights), ``"minmax"`` or ``"output"``
            (clipping search on each layer's output error over the calibration data).
        loss_form: ``"auto"``, ``"minibatch"`` or ``"moments"`` (see ``AdaRoundConfig``).
        iterations: Optimisation steps per layer.
        batch_size: Calibration samples per optimisation step.
        lr, reg_lambda, warm_start: Optimiser and regularizer settings (AdaRound defaults).
        num_calibration_samples: How many samples to read from the calibration data.
        calibration_data: A dataloader or iterable of batches; by default the datamodule's
            ``calibration_dataloader()`` or ``train_dataloader()``, else the Trainer's loaders.
        forward_fn: ``forward_fn(module, batch)`` runs the module on a batch; by default a
            tensor is the input, a tuple/list's first element is, a dict is keyword arguments.
        layers, exclude: Name globs of layers to round / to keep in full precision.
        layer_bits: Name glob -> bits, e.g. ``{"net.0": 8}`` for an 8-bit first layer.
        include_activation: Include a following BatchNorm/activation in the loss.
        holdout_fraction: Calibration share kept out of optimisation for honest reporting.
        cache_on_cpu: Keep cached activations in host memory.
        device_cache_bytes, host_cache_bytes, cache_dir, cache_dtype: Where cached activations
            live (device, host, memory-mapped file) and in which dtype (see ``AdaRoundConfig``).
        carry_activations: Feed layers inside a chain of blocks from the previous block's
            kept output (capture linear in depth; see ``AdaRoundConfig``).
        fold_batchnorm: Fold each BatchNorm into the Conv/Linear that feeds it before rounding
            (``lightning_adaround.fold_batchnorm``), so each grid fits the weights a runtime
            uses; ``state_dict`` keys and outputs stay the same, the BatchNorm keeps an exact
            shift. Done by the core (``AdaRoundConfig.fold_batchnorm``), undone if rounding fails.
        equalize: Cross-layer equalization after folding (``lightning_adaround.equalize_layers``):
            rescales the channels of consecutive layers so one per-tensor grid fits them all,
            outputs unchanged. ``None`` (default): on for ``granularity="per_tensor"``, off for
            ``"per_channel"`` (per-channel scales already fit each channel). Done by the core
            (``AdaRoundConfig.equalize``), undone if rounding fails.
        bias_correction: After rounding, move each rounded layer's mean output error on the
            calibration data into its bias (a layer without a bias: into the BatchNorm after it,
            or only reported; see ``AdaRoundConfig``). Under DDP the means are taken over every rank's samples.
        seed: Seed of the minibatch sampler and of the calibration read (a shuffling loader
            gives the same samples on every run; the global random state is left alone).
        log_every_n_steps: Per-step loss logging interval (default: the Trainer's).
        keep_float_weights: Keep the full-precision weights in ``callback.result`` (and so in
            checkpoints) to switch between them and the rounded ones with
            ``use_float_weights``/``use_rounded_weights``.
        verbose: Print the per-layer summary table at the end.
        report: Save a PNG report (per-layer error, loss curves) as ``adaround_report.png``
            in the first logger's directory (else ``default_root_dir``) and add it to
            TensorBoard; needs matplotlib.
        checkpoint_dir: A folder where each finished layer is saved; a run stopped part way
            (an exception, Ctrl-C, a killed job) resumes from it when started again with the same
            model, data and settings, with the same result. Single process only (refused under DDP).
        reconstruction, blocks, block_loss: ``"block"`` rounds the layers of each block together
            against the block's output (BRECQ); see ``AdaRoundConfig``. Single process only.
        task_loss: ``task_loss(output, batch) -> scalar`` for ``block_loss="fisher"``, e.g.
            ``lambda out, batch: F.cross_entropy(out, batch[1])``.

    Raises:
        ValueError: an unknown ``run_on``/``granularity``/``scale_method``, bits outside
            2-8, a non-positive count, and (when the run starts) missing or empty
            calibration data, a sharded strategy (FSDP, DeepSpeed: refused in ``setup``),
            ``checkpoint_dir`` with more than one process, or a ``checkpoint_dir`` holding
            another run's checkpoint.
        AdaRoundDistributedError: under DDP, on every rank, when any rank fails or the ranks
            disagree (see ``lightning_adaround.distributed``).

    Under ``strategy="ddp"``/``"ddp_spawn"`` each rank keeps a contiguous block of the first
    ``num_calibration_samples`` samples and all ranks find one rounding together (one
    gradient all-reduce per step); logging and the progress bar stay on rank 0.

    Example::

        trainer = Trainer(callbacks=[AdaRoundCallback(bits=4)])
        trainer.fit(model, datamodule=dm)   # weights are on the 4-bit grid afterwards
    """

    def __init__(
        self,
        bits: int = 4,
        *,
        run_on: str = "fit_end",
        granularity: str = "per_channel",
        symmetric: bool = True,
        scale_method: str = "mse",
        loss_form: str = "auto",
        iterations: int = 10_000,
        batch_size: int = 32,
        lr: float = 1e-3,
        reg_lambda: float = 0.01,
        warm_start: float = 0.2,
        num_calibration_samples: Optional[int] = 1024,
        calibration_data: Optional[Iterable[Any]] = None,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
        layers: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (),
        layer_bits: Optional[dict[str, int]] = None,
        include_activation: bool = True,
        holdout_fraction: float = 0.1,
        cache_on_cpu: bool = False,
        device_cache_bytes: Optional[int] = None,
        host_cache_bytes: Optional[int] = None,
        cache_dir: Optional[str] = None,
        cache_dtype: Optional[torch.dtype] = None,
        carry_activations: bool = True,
        fold_batchnorm: bool = True,
        equalize: Optional[bool] = None,
        bias_correction: bool = False,
        seed: int = 0,
        log_every_n_steps: Optional[int] = None,
        keep_float_weights: bool = False,
        verbose: bool = True,
        report: bool = True,
        checkpoint_dir: Optional[PathLike] = None,
        reconstruction: str = "layer",
        blocks: Optional[Sequence[str]] = None,
        block_loss: str = "mse",
        task_loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    ) -> None:
        if run_on not in RUN_ON:
            raise ValueError(f"run_on={run_on!r} isn't one of {RUN_ON}; use run_on='fit_end' or 'validate'.")
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={granularity!r} isn't one of {tuple(GRANULARITIES)}; "
                "use 'per_channel' (usually better) or 'per_tensor'."
            )
        if num_calibration_samples is not None and (
            isinstance(num_calibration_samples, bool) or not isinstance(num_calibration_samples, int)
            or num_calibration_samples < 1
        ):
            raise ValueError(
                f"num_calibration_samples={num_calibration_samples!r} must be a positive integer "
                "(about 1,024 is typical) or None to read all calibration data."
            )
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn={forward_fn!r} must be callable as forward_fn(module, batch).")
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a folder path (str or os.PathLike), got {checkpoint_dir!r}.")
        self.config = AdaRoundConfig(
            bits=bits, symmetric=symmetric, granularity=GRANULARITIES[granularity](),
            scale_method=scale_method, loss_form=loss_form, iterations=iterations, batch_size=batch_size, lr=lr,
            reg_lambda=reg_lambda, warm_start=warm_start, include_activation=include_activation,
            holdout_fraction=holdout_fraction, cache_on_cpu=cache_on_cpu,
            device_cache_bytes=device_cache_bytes, host_cache_bytes=host_cache_bytes, cache_dir=cache_dir,
            cache_dtype=cache_dtype, carry_activations=carry_activations, seed=seed,
            layers=layers, exclude=tuple(exclude), layer_bits=dict(layer_bits or {}),
            log_every_n_steps=50 if log_every_n_steps is None else log_every_n_steps,
            keep_float_weights=keep_float_weights, reconstruction=reconstruction, blocks=blocks,
            block_loss=block_loss, bias_correction=bias_correction, fold_batchnorm=fold_batchnorm, equalize=equalize,
        )
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss={task_loss!r} must be callable as task_loss(output, batch).")
        self.task_loss = task_loss
        self.run_on = run_on
        self.num_calibration_samples = num_calibration_samples
        self.calibration_data = calibration_data
        self.forward_fn = forward_fn
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self.report = report
        self.checkpoint_dir = checkpoint_dir
        self.report_path: Optional[str] = None
        self.result: Optional[AdaRoundResult] = None
        self._log_step = 0

    @property
    def fold_batchnorm(self) -> bool:
        """``config.fold_batchnorm``: BatchNorms are folded before rounding."""
        return self.config.fold_batchnorm

    @property
    def equalize(self) -> Optional[bool]:
        """``config.equalize``: cross-layer equalization (``None``: for per-tensor grids)."""
        return self.config.equalize

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                f"AdaRoundCallback cannot round a model sharded by {strategy} yet: each rank holds "
                "only part of every weight. Train with it, save a checkpoint, then round the full "
                "model with strategy='auto' or 'ddp' in a separate trainer.validate(...) call."
            )
        self._check_checkpoint_dir(trainer)

    def _check_checkpoint_dir(self, trainer: Any) -> None:
        if self.checkpoint_dir is not None and _world_size(trainer) > 1:
            raise ValueError(
                f"AdaRoundCallback(checkpoint_dir=...) works in a single process, but this Trainer runs "
                f"{_world_size(trainer)} processes. Round with devices=1 to use checkpoint_dir, or drop it."
            )
        if self.config.reconstruction == "block" and _world_size(trainer) > 1:
            raise ValueError(
                f"AdaRoundCallback(reconstruction='block') works in a single process for now, but this Trainer "
                f"runs {_world_size(trainer)} processes. Round with devices=1 (e.g. in a separate "
                "trainer.validate(...) call), or use reconstruction='layer'."
            )

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
        source = self._calibration_source(trainer, pl_module)
        if _world_size(trainer) > 1:
            return self._calibration_shard(trainer, source)
        batches = self._read_seeded(source, self.num_calibration_samples)
        if not batches:
            raise ValueError(
                "the calibration data gave no batch; pass a non-empty loader with "
                "AdaRoundCallback(calibration_data=...) or define calibration_dataloader() in the datamodule."
            )
        return batches

    # ----------------------------------------------------------------- the run

    def round_model(self, trainer: Any, pl_module: Any) -> Optional[AdaRoundResult]:
        """Round ``pl_module`` in place now (the hooks call this); returns the result."""
        if self.result is not None and _weights_match(pl_module, self.result):
            warnings.warn(
                "AdaRoundCallback: the model's weights are already the rounded ones from the last run; "
                "not rounding twice. Create a new callback to round a retrained model.",
                stacklevel=2,
            )
            return self.result
        config = self.config
        if self.log_every_n_steps is None:
            config = dataclasses.replace(config, log_every_n_steps=max(1, trainer.log_every_n_steps))
        self._check_checkpoint_dir(trainer)
        strategy = trainer.strategy
        distributed = _world_size(trainer) > 1  # DDP: one rounding from every rank's shard
        read = lambda: self.calibration_batches(trainer, pl_module)  # noqa: E731
        batches = read if distributed else read()  # under DDP, read inside the failure protocol
        self._log_step = self._first_log_step(trainer)
        observer = _TrainerObserver(self, trainer, config.iterations)
        options: dict[str, Any] = {} if distributed else {"checkpoint_dir": self.checkpoint_dir, "task_loss": self.task_loss}
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
                **options,
            )
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

    def _calibration_shard(self, trainer: Any, source: Iterable[Any]) -> list[Any] | CalibrationShard:
        world, rank, total = trainer.world_size, trainer.global_rank, self.num_calibration_samples
        if is_sharded_loader(source):  # Lightning injected a DistributedSampler: already this rank's part
            share = None if total is None else total // world + (1 if rank < total % world else 0)
            return take_samples(source, share)
        # Every rank reads the same samples, then keeps its block; distributed_adaround checks
        # that the ranks read the same data.
        return shard_calibration(self._read_seeded(source, total), rank, world)

    def _read_seeded(self, source: Iterable[Any], num_samples: Optional[int]) -> list[Any]:
        """A shuffling or augmenting loader draws from ``seed`` here: same seed, same samples.

        The global random state is restored afterwards, so training randomness is untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return take_samples(source, num_samples)

    def _calibration_source(self, trainer: Any, pl_module: Any) -> Iterable[Any]:
        if self.calibration_data is not None:
            return self.calibration_data
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

    def _info(self, message: str) -> None:
        rank_zero_info(message)


def _world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


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


class _TrainerObserver(AdaRoundObserver):
    """Sends the core's progress to the Trainer's loggers and progress bar."""

    def __init__(self, callback: _AdaRoundCallbackBase, trainer: Any, iterations: int) -> None:
        self.callback = callback
        self.trainer = trainer
        self.iterations = iterations
        self.progress = _Progress(trainer)
        self._done_steps = 0
        self._restored_blocks: set[str] = set()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_start(self, layer_names: list[str]) -> None:
        self.progress.start(len(layer_names) * self.iterations)

    def on_layer_start(self, name: str, index: int, iterations: int) -> None:
        self.progress.describe(f"AdaRound {name}")
        self._layer_start = self.callback._log_step

    def on_step(self, name: str, step: int, metrics: dict[str, float]) -> None:
        self._log({f"adaround/{name}/{k}": v for k, v in metrics.items()}, self._layer_start + step)
        self.progress.update(step + 1 - self._done_steps)
        self._done_steps = step + 1

    def on_layer_restored(self, result: LayerResult) -> None:
        if result.block and result.block in self._restored_blocks:
            return  # a block's steps count once
        self._restored_blocks.add(result.block)
        self.callback._log_step += result.iterations  # later layers log at the steps of an uninterrupted run
        self.progress.update(result.iterations)

    def on_layer_end(self, result: LayerResult) -> None:
        self.on_block_end(result.name, [result])

    def on_block_end(self, name: str, results: list[LayerResult]) -> None:
        self.callback._log_step = self._layer_start + results[0].iterations
        for result in results:
            self._log(
                {
                    f"adaround/{result.name}/nearest_mse": result.nearest_mse,
                    f"adaround/{result.name}/adaround_mse": result.adaround_mse,
                    f"adaround/{result.name}/seconds": result.seconds,
                    f"adaround/{result.name}/bits": float(result.bits),
                },
                self.callback._log_step,
            )
        self.progress.update(results[0].iterations - self._done_steps)
        self._done_steps = 0

    def on_end(self, result: AdaRoundResult) -> None:
        self.progress.close()
        shifts = {f"adaround/{r.name}/bias_shift": r.bias_shift_max for r in result.layers.values()}
        shifts = {k: v for k, v in shifts.items() if v is not None}
        if shifts:
            self._log(shifts, self.callback._log_step)
        for logger in self.trainer.loggers:
            logger.save()
        if result.folded:
            self.callback._info(f"AdaRound: folded {len(result.folded)} BatchNorm(s) into the layers that feed them.")
        if result.equalized:
            self.callback._info(
                f"AdaRound: equalized the channel ranges of {len(result.equalized)} pair(s) of consecutive layers."
            )
        if self.callback.verbose:
            self.callback._info("AdaRound per-layer summary:\n" + result.summary_table())
        if self.callback.report and result.layers and self.trainer.is_global_zero:
            self._save_report(result)

    def _save_report(self, result: AdaRoundResult) -> None:
        try:
            from lightning_adaround.report import report_figure
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("AdaRoundCallback(report=True) needs matplotlib; skipping the PNG report.", stacklevel=2)
            return
        log_dirs = [lg.log_dir for lg in self.trainer.loggers if getattr(lg, "log_dir", None)]
        folder = Path(log_dirs[0] if log_dirs else self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        fig = report_figure(result)
        path = folder / "adaround_report.png"
        fig.savefig(path, dpi=110)
        self.callback.report_path = str(path)
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter
                experiment.add_figure("adaround/report", fig, global_step=self.callback._log_step, close=False)
        plt.close(fig)


class _Progress:
    """A bar in the style of the Trainer's own (Rich or TQDM); nothing when it is disabled."""

    def __init__(self, trainer: Any) -> None:
        bar = getattr(trainer, "progress_bar_callback", None)
        self.kind = None
        if bar is not None and not bar.is_disabled:
            rich = any(cls.__name__ == "RichProgressBar" for cls in type(bar).__mro__)
            self.kind = "rich" if rich else "tqdm"
        self._bar: Any = None

    def start(self, total: int) -> None:
        if self.kind == "rich":
            from rich.progress import Progress

            self._bar = Progress()
            self._task = self._bar.add_task("AdaRound", total=total)
            self._bar.start()
        elif self.kind == "tqdm":
            import sys

            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="AdaRound", file=sys.stdout, dynamic_ncols=True, leave=True)

    def describe(self, text: str) -> None:
        if self.kind == "rich":
            self._bar.update(self._task, description=text)
        elif self.kind == "tqdm":
            self._bar.set_description(text)

    def update(self, steps: int) -> None:
        if steps <= 0 or self._bar is None:
            return
        if self.kind == "rich":
            self._bar.update(self._task, advance=steps)
        else:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is None:
            return
        if self.kind == "rich":
            self._bar.stop()
        else:
            self._bar.close()
        self._bar = None


class AdaRoundCallback(_AdaRoundCallbackBase, Callback):
    __doc__ = _AdaRoundCallbackBase.__doc__
