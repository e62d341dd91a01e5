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
