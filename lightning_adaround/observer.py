"""Hooks through which a rounding run reports progress, losses and per-layer results.

The core calls these; the Lightning callback implements them with loggers and a progress
bar. The base class does nothing, so plain-PyTorch users need not subclass it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_adaround.result import AdaRoundResult, LayerResult


class RoundingStopped(RuntimeError):
    """Raised when :meth:`AdaRoundObserver.should_stop` asked the run to stop (a SIGTERM, say).

    Like any failure it leaves the model as given; with ``checkpoint_dir`` the finished layers
    are kept, and running again resumes with the integer weights of an uninterrupted run.
    """


class AdaRoundObserver:
    """Override any subset; every method is a no-op here."""

    def should_stop(self) -> bool:
        """Asked before every step and every layer; ``True`` stops the run with :class:`RoundingStopped`."""
        return False

    def on_start(self, layer_names: list[str]) -> None:
        """Called once with the layers (and blocks, by name) that will be rounded, in execution order."""

    def on_layer_start(self, name: str, index: int, iterations: int) -> None:
        """Called before layer or block ``index`` (0-based) starts its ``iterations`` steps."""

    def on_step(self, name: str, step: int, metrics: dict[str, float]) -> None:
        """Called every ``log_every_n_steps`` with ``recon_loss``, ``reg_loss`` and ``beta``."""

    def on_layer_end(self, result: "LayerResult") -> None:
        """Called after a layer's hard-rounded weight has been written back."""

    def on_block_end(self, name: str, results: list["LayerResult"]) -> None:
        """Called after a block's layers were rounded together; by default ``on_layer_end`` for each."""
        for result in results:
            self.on_layer_end(result)

    def on_layer_restored(self, result: "LayerResult") -> None:
        """Called instead of the other per-layer hooks for a layer read back from ``checkpoint_dir``."""

    def on_end(self, result: "AdaRoundResult") -> None:
        """Called once when every layer is done."""
