"""Shared fixtures: real digits data, a trained digits CNN, and both Lightning namespaces."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

QUICK = os.environ.get("LIGHTNING_ADAROUND_QUICK") == "1"


def pytest_collection_modifyitems(config, items):
    if not QUICK:
        return
    skip = pytest.mark.skip(reason="LIGHTNING_ADAROUND_QUICK=1: slow case left to the full run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is as fast and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    from digits import load_digits_tensors

    return load_digits_tensors(seed=0)


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """The examples' CNN trained for real on the digits training split (plain PyTorch)."""
    from digits import make_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same trained weights whatever OMP_NUM_THREADS says (sums differ with threads)
    torch.manual_seed(0)
    net = make_cnn()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(digits["train"], batch_size=64, shuffle=True)
    for _ in range(15):
        net.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    torch.set_num_threads(threads)
    net.eval()
    return net


@pytest.fixture
def digits_cnn(trained_digits_cnn):
    return copy.deepcopy(trained_digits_cnn)


def accuracy(model: torch.nn.Module, dataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def namespace(request):
    """(Lightning package, its AdaRoundCallback class) for each namespace."""
    pl = importlib.import_module(request.param)
    if request.param == "lightning.pytorch":
        from lightning_adaround import AdaRoundCallback
    else:
        from lightning_adaround.pytorch_lightning import AdaRoundCallback
    return pl, AdaRoundCallback
