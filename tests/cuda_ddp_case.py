"""A one-device ``strategy="ddp"`` AdaRound run, started by tests/test_cuda.py in its own subprocess.

Usage: ``python cuda_ddp_case.py '<json options>'`` with ``out`` (a folder) and ``device``
(``"cuda"``, or ``"cpu"`` for a dry run on gloo). ``Trainer(strategy="ddp", devices=1)`` fits two
steps and rounds at fit end; inside that ``on_fit_end`` (the process group is alive there) the
same group then runs ``distributed_adaround`` directly, once per loss form, so NCCL's
collectives see the library's device buffers. Everything found goes to ``out/report.json``;
an exception goes to ``out/error.txt`` and the exit status is non-zero.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_adaround import AdaRoundCallback, AdaRoundConfig

OPTS = json.loads(sys.argv[1])
OUT = Path(OPTS["out"])
ON_CUDA = OPTS.get("device", "cuda") == "cuda"
REPORT: dict = {}


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 3, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def on_grid(module: nn.Module, result) -> bool:
    for name, layer in result.layers.items():
        weight = module.get_submodule(name).weight.detach().cpu()
        if not torch.equal(weight, layer.dequantized_weight().to(weight.dtype)):
            return False
    return bool(result.layers)


def summary(module: nn.Module, result) -> dict:
    return {
        "layers": list(result.layers),
        "forms": sorted({layer.loss_form for layer in result.layers.values()}),
        "on_grid": on_grid(module, result),
        "finite": all(layer.adaround_mse == layer.adaround_mse and layer.adaround_mse < float("inf")
                      for layer in result.layers.values()),
        "nearest_mse": [layer.nearest_mse for layer in result.layers.values()],
        "adaround_mse": [layer.adaround_mse for layer in result.layers.values()],
    }


class Checking(AdaRoundCallback):
    def round_model(self, trainer, pl_module):
        import torch.distributed as dist

        from lightning_adaround.distributed import distributed_adaround, shard_calibration

        result = super().round_model(trainer, pl_module)
        REPORT["fit"] = summary(pl_module, result)
        REPORT["backend"] = dist.get_backend() if dist.is_initialized() else None
        REPORT["world_size"] = trainer.world_size
        REPORT["root_device"] = str(trainer.strategy.root_device)
        # The group Lightning made is still alive here: the distributed core on it, both forms.
        device = trainer.strategy.root_device
        calibration = [(x, y) for x, y in DataLoader(dataset(), batch_size=32)]
        for form in ("minibatch", "moments"):
            fresh = copy.deepcopy(pl_module).to(device)
            for p in fresh.parameters():  # other float weights than the rounded ones
                p.data.add_(0.01 * torch.randn_like(p))
            shard = shard_calibration(calibration, trainer.global_rank, trainer.world_size)
            config = AdaRoundConfig(bits=4, iterations=40, batch_size=16, loss_form=form)
            got = distributed_adaround(fresh, shard, config, device=device, sync_every_step=True)
            REPORT[f"distributed_{form}"] = summary(fresh, got)
        return result


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callback = Checking(
        config=AdaRoundConfig(bits=4, iterations=40, batch_size=16, loss_form="auto", log_every_n_steps=10),
        num_calibration_samples=128, calibration_data=DataLoader(dataset(), batch_size=32), verbose=False,
        report=False,
    )
    trainer = pl.Trainer(
        accelerator="gpu" if ON_CUDA else "cpu", devices=1, strategy="ddp", max_steps=2,
        callbacks=[callback], logger=CSVLogger(OUT, name="csv"), default_root_dir=OUT,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(Net(), train_dataloaders=DataLoader(dataset(), batch_size=32, shuffle=True))
    (OUT / "report.json").write_text(json.dumps(REPORT, indent=1))
    if torch.distributed.is_initialized():  # exiting with the group up can abort (see ddp_case.py)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        (OUT / "error.txt").write_text(traceback.format_exc())
        (OUT / "report.json").write_text(json.dumps(REPORT, indent=1))
        raise
