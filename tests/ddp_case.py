"""One multi-process AdaRound run, started by tests/test_ddp.py in its own subprocess.

Usage: ``python ddp_case.py '<json options>'``. With ``strategy="ddp"`` Lightning starts
this script again for rank 1. Each rank writes what it saw into ``out``:
``rank{r}.pt`` (result and weights), ``error{r}.txt`` (the exception it raised) and
``log{r}.jsonl`` (every metric its loggers were asked to log).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_adaround import AdaRoundCallback, AdaRoundConfig

OPTS = json.loads(sys.argv[1])
OUT = Path(OPTS["out"])


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        # A raw, shuffling loader: every rank sees all data; the callback reads it with a fixed seed.
        return DataLoader(dataset(), batch_size=32, shuffle=True)


class RankLogger(Logger):
    """Not rank-zero-only (unlike Lightning's loggers): records what each rank was asked to log."""

    name, version = "rank_logger", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        with open(OUT / f"log{rank_zero_only.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")


class Recording(AdaRoundCallback):
    def round_model(self, trainer, pl_module):
        rank = trainer.global_rank
        try:
            result = super().round_model(trainer, pl_module)
        except Exception as err:
            (OUT / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}")
            raise
        weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save({"result": result.state_dict(), "weights": weights}, OUT / f"rank{rank}.pt")
        return result


def forward_fn(module, batch):
    calls = getattr(module, "_calls", 0) + 1
    module._calls = calls
    # call 1 is the callback's check before training (on_fit_start); the rounding's start after it
    if OPTS.get("raise_on_rank1") and module.trainer.global_rank == 1 and calls > 5:
        raise RuntimeError("simulated failure in rank 1's forward")
    return module(batch[0])


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Net()
    config = AdaRoundConfig(
        bits=4, iterations=OPTS.get("iterations", 60), batch_size=32, loss_form=OPTS.get("loss_form", "minibatch"),
        log_every_n_steps=10,
        # the failing-rank case counts forward_fn calls, which carried block inputs skip
        carry_activations=not OPTS.get("raise_on_rank1"),
        **({"reconstruction": "block", "blocks": ["net[0:4]"]} if OPTS.get("block") else {}),
    )
    callback = Recording(
        config=config, run_on=OPTS.get("run_on", "fit_end"), num_calibration_samples=OPTS.get("samples", 160),
        calibration_data=DataLoader(dataset(), batch_size=40) if OPTS.get("explicit_data") else None,
        forward_fn=forward_fn, verbose=False, checkpoint_dir=OPTS.get("checkpoint_dir"),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=OPTS["devices"], strategy=OPTS.get("strategy", "auto"), max_epochs=1,
        callbacks=[callback], logger=[CSVLogger(OUT, name="csv"), RankLogger()], default_root_dir=OUT,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    if OPTS.get("run_on") == "validate":
        trainer.validate(model, dataloaders=DataLoader(dataset(), batch_size=64), verbose=False)
    else:
        trainer.fit(model, datamodule=Data())
    # Lightning leaves the process group up; exiting with it can abort (SIGABRT, "terminate called without an
    # active exception") while gloo's threads are torn down after the interpreter (pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
