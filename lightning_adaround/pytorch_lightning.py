"""``AdaRoundCallback`` for the standalone ``pytorch_lightning`` package.

``lightning.pytorch.Callback`` and ``pytorch_lightning.Callback`` are different classes,
so each namespace gets its own thin class over the same base.
"""

from __future__ import annotations

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_adaround.trainer.callback import _AdaRoundCallbackBase


class AdaRoundCallback(_AdaRoundCallbackBase, Callback):
    __doc__ = _AdaRoundCallbackBase.__doc__

    def _info(self, message: str) -> None:
        rank_zero_info(message)


__all__ = ["AdaRoundCallback"]
