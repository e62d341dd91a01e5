"""A Lightning validate pass that rounds with ``checkpoint_dir``; tests/test_resume.py sends it SIGTERM.

Usage: ``python sigterm_case.py <checkpoint_dir> <report file>``. With ``SLOW_STEPS=1`` in the
environment each layer forward sleeps 5 ms, so a layer takes about a second and the test can
signal mid-run. On the stop the script records whether the model is exactly as given.
"""

from __future__ import annotations

import os
import sys
import time

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_adaround import AdaRoundCallback, AdaRoundConfig


class SlowLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get("SLOW_STEPS") == "1":
            time.sleep(0.005)
        return super().forward(x)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(SlowLinear(6, 16), nn.ReLU(), SlowLinear(16, 16), nn.ReLU(),
                                 SlowLinear(16, 16), nn.ReLU(), SlowLinear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_out", self(batch[0]).square().mean())


def data() -> torch.utils.data.DataLoader:
    x = torch.randn(96, 6, generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32)


def callback(folder: str) -> AdaRoundCallback:
    config = AdaRoundConfig(bits=3, iterations=300, batch_size=16, loss_form="minibatch", lr=1e-2)
    return AdaRoundCallback(config=config, run_on="validate", calibration_data=data(), checkpoint_dir=folder,
                            verbose=False, report=False)


def trainer(cb: AdaRoundCallback) -> pl.Trainer:
    return pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    model = Net()
    given = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        trainer(callback(sys.argv[1])).validate(model, data(), verbose=False)
        outcome = "finished"
    except SystemExit:
        same = all(torch.equal(given[k], v) for k, v in model.state_dict().items())
        outcome = "stopped, model as given" if same else "stopped, model changed"
    with open(sys.argv[2], "w") as f:
        f.write(outcome)
