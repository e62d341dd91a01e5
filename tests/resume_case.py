"""A rounding run with ``checkpoint_dir`` that tests/test_resume.py kills with SIGTERM, then resumes.

Usage: ``python resume_case.py <checkpoint_dir> <seconds to sleep per step>``. The sleep (an
observer) makes each layer take about a second, so the test can kill the process mid-layer.
The model, data and settings are defined here and imported by the test for the resume and the
uninterrupted reference.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, adaround


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 3),
    )


def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 2, 6, 6, generator=g) for _ in range(3)]


def config() -> AdaRoundConfig:
    return AdaRoundConfig(iterations=200, batch_size=8, loss_form="minibatch", lr=1e-2, log_every_n_steps=1)


class _Slow(AdaRoundObserver):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step(self, name: str, step: int, metrics: dict[str, float]) -> None:
        time.sleep(self.seconds)


if __name__ == "__main__":
    torch.set_num_threads(1)
    adaround(model(), data(), config(), observer=_Slow(float(sys.argv[2])), checkpoint_dir=sys.argv[1])
