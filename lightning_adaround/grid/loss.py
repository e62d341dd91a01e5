"""The regularizer that pushes every h(V) to 0 or 1, and the beta schedule that anneals it.

Loss = reconstruction + lambda * sum(1 - |2h - 1|^beta); the regularizer is off during the
warm start, then beta falls from ``beta_start`` to ``beta_end`` on a cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class BetaSchedule:
    """Beta per step; ``None`` during the warm start, where the regularizer is off."""

    iterations: int
    warm_start: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    @property
    def warm_steps(self) -> int:
        return int(self.warm_start * self.iterations)

    def regularizing(self, step: int) -> bool:
        return step >= self.warm_steps

    def beta(self, step: int) -> float:
        """Cosine from ``beta_start`` at the end of the warm start to ``beta_end`` at the last step."""
        span = max(self.iterations - 1 - self.warm_steps, 1)
        progress = min(max((step - self.warm_steps) / span, 0.0), 1.0)
        return self.beta_end + 0.5 * (self.beta_start - self.beta_end) * (1.0 + math.cos(math.pi * progress))


def rounding_regularizer(h: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero when every h is exactly 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
