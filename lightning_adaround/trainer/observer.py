"""What a rounding run shows through the Trainer: per-step curves in every logger, a progress
bar like the Trainer's own (Rich or TQDM), the summary table and the PNG report.

The callback hands :class:`TrainerObserver` to the core as its observer; nothing here imports Lightning.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

from lightning_adaround.observer import AdaRoundObserver
from lightning_adaround.result import AdaRoundResult, LayerResult

if TYPE_CHECKING:
    from lightning_adaround.trainer.callback import _AdaRoundCallbackBase


class TrainerObserver(AdaRoundObserver):
    """Sends the core's progress to the Trainer's loggers and progress bar."""

    def __init__(self, callback: _AdaRoundCallbackBase, trainer: Any, iterations: Optional[int]) -> None:
        """``iterations``: the config's; ``None`` (per unit, by its layers) sizes the bar as each unit starts."""
        self.callback = callback
        self.trainer = trainer
        self.iterations = iterations
        self.progress = TrainerProgress(trainer)
        self._done_steps = 0
        self._restored_blocks: set[str] = set()

    def should_stop(self) -> bool:
        """The Trainer received SIGTERM (a scheduler's preemption, ``docker stop``): stop between steps."""
        return bool(getattr(self.trainer, "received_sigterm", False))

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_start(self, layer_names: list[str]) -> None:
        self._units = len(layer_names)
        self.progress.start(None if self.iterations is None else self._units * self.iterations)

    def on_layer_start(self, name: str, index: int, iterations: int) -> None:
        if self.iterations is None:  # the steps so far, this unit's, and as many for each one left
            self.progress.set_total(self.progress.done + iterations * (self._units - index))
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
        """Write the PNG where the run's files go (:func:`~lightning_adaround.io.report.report_file`) and hand
        the figure to every logger that takes images: TensorBoard (``experiment.add_figure``), W&B
        (``log_image``), MLflow (``experiment.log_figure``), found by what they offer, not by import.
        A logger that fails to take it costs a warning, not the rounded model."""
        self.callback.report_path = None
        try:
            import matplotlib.pyplot as plt

            from lightning_adaround.io.report import report_figure, report_file
        except ImportError:
            warnings.warn("AdaRoundCallback(report=True) needs matplotlib; skipping the PNG report.", stacklevel=2)
            return
        fig = report_figure(result)
        try:
            path, source = report_file(self.trainer)
            if path is None:
                self.callback._info(
                    f"AdaRound: report PNG not written ({source}); it would land in the working directory. "
                    "Attach a logger or give Trainer(default_root_dir=...) to get adaround_report.png."
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=100)
                self.callback.report_path = str(path)
            step = self.callback._log_step
            for logger in self.trainer.loggers:
                try:
                    _send_figure(logger, fig, step)
                except Exception as err:  # noqa: BLE001 - an upload must not lose a finished rounding
                    warnings.warn(f"AdaRound: could not send the report to {type(logger).__name__}: {err!r}",
                                  stacklevel=2)
        finally:
            plt.close(fig)


def _send_figure(logger: Any, fig: Any, step: int) -> None:
    """The report to one logger, by what it offers (no import of wandb or mlflow); CSV takes no images.

    A custom ``Logger`` need not have an ``experiment`` (Lightning's base class has none): it takes no image."""
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_figure", None)):  # TensorBoard's SummaryWriter
        experiment.add_figure("adaround/report", fig, global_step=step, close=False)
    elif callable(getattr(experiment, "log_figure", None)) and getattr(logger, "run_id", None):  # MlflowClient
        experiment.log_figure(logger.run_id, fig, "adaround_report.png")
    elif callable(getattr(logger, "log_image", None)):  # WandbLogger.log_image(key, images, step)
        import numpy as np
        from PIL import Image  # matplotlib's own dependency

        fig.canvas.draw()
        image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        logger.log_image(key="adaround/report", images=[image], step=step)


class TrainerProgress:
    """A bar in the style of the Trainer's own (Rich or TQDM); nothing when it is disabled."""

    def __init__(self, trainer: Any) -> None:
        bar = getattr(trainer, "progress_bar_callback", None)
        self.kind = None
        if bar is not None and not bar.is_disabled:
            rich = any(cls.__name__ == "RichProgressBar" for cls in type(bar).__mro__)
            self.kind = "rich" if rich else "tqdm"
        self._bar: Any = None
        self.done = 0  # steps counted so far

    def start(self, total: Optional[int]) -> None:
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

    def set_total(self, total: int) -> None:
        if self.kind == "rich":
            self._bar.update(self._task, total=total)
        elif self.kind == "tqdm":
            self._bar.total = total
            self._bar.refresh()

    def update(self, steps: int) -> None:
        if steps <= 0 or self._bar is None:
            return
        self.done += steps
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
