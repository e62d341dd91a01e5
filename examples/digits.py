"""Round a small CNN trained on scikit-learn's real handwritten digits, at the end of ``fit``.

    python examples/digits.py            # trains, rounds at W4 and W3, prints the accuracy table

Curves land in ``lightning_logs/`` (``tensorboard --logdir lightning_logs``).
"""

from __future__ import annotations

import argparse
import copy
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(seed: int = 0) -> dict[str, TensorDataset]:
    """The 1,797 real 8x8 digits, split 60/20/20 into train/val/test (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y.numpy())
    val_idx, test_idx = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y.numpy()[rest])
    return {
        split: TensorDataset(x[i], y[i])
        for split, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }


def make_cnn() -> nn.Sequential:
    """Three conv blocks and a classifier: 5 layers AdaRound rounds."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


import lightning as L  # noqa: E402
import torchmetrics  # noqa: E402

from lightning_adaround import AdaRoundCallback, AdaRoundConfig, PerChannel, PerTensor, round_to_nearest  # noqa: E402


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's handwritten digits; calibration reads the training split."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.splits: Optional[dict[str, TensorDataset]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is None:
            self.splits = load_digits_tensors(self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=256)


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_cnn()
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def test_accuracy(model: L.LightningModule, dm: DigitsDataModule) -> float:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]


def main(argv: Optional[list[str]] = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--granularity", choices=["per_channel", "per_tensor"], default="per_channel")
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(seed=args.seed)
    model = DigitsClassifier()
    first, *rest = args.bits
    granularity = {"per_channel": PerChannel(), "per_tensor": PerTensor()}[args.granularity]

    def config(bits: int) -> AdaRoundConfig:
        return AdaRoundConfig(bits=bits, granularity=granularity, iterations=args.iterations, seed=args.seed)

    # Round at the end of fit; last.ckpt is written before, so it keeps the float weights.
    trainer = L.Trainer(
        max_epochs=args.epochs, callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(save_last=True),
            AdaRoundCallback(config=config(first)),
        ],
        enable_progress_bar=not args.quiet, log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=dm)
    float_ckpt = trainer.checkpoint_callback.last_model_path
    adarounded = {first: model}
    for bits in rest:  # the other widths: round a float copy in a dedicated validate pass
        float_model = DigitsClassifier.load_from_checkpoint(float_ckpt)
        L.Trainer(
            callbacks=[AdaRoundCallback(config=config(bits), run_on="validate")],
            enable_progress_bar=not args.quiet, logger=trainer.logger, enable_model_summary=False,
        ).validate(float_model, datamodule=dm, verbose=False)
        adarounded[bits] = float_model

    fp_acc = test_accuracy(DigitsClassifier.load_from_checkpoint(float_ckpt), dm)
    rows = []
    for bits in args.bits:
        nearest = DigitsClassifier.load_from_checkpoint(float_ckpt).eval()
        round_to_nearest(nearest, config(bits))  # folds (and equalizes per-tensor grids) as the callback does
        rows.append({
            "bits": bits, "fp32": fp_acc, "nearest": test_accuracy(nearest, dm),
            "adaround": test_accuracy(adarounded[bits], dm),
        })
    print(f"\nDigits test accuracy ({args.granularity}, MSE grid, {args.iterations} iterations per layer)")
    print(f"{'bits':>4}  {'FP32':>7}  {'nearest':>7}  {'AdaRound':>8}")
    for r in rows:
        print(f"W{r['bits']:<3}  {r['fp32']:>7.2%}  {r['nearest']:>7.2%}  {r['adaround']:>8.2%}")
    print(f"\nLogs and curves: {trainer.logger.log_dir} (tensorboard --logdir {trainer.logger.save_dir})")
    return rows


if __name__ == "__main__":
    main()
