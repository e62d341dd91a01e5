"""Cached activations on the device, in host memory or on disk: same values, same rounding."""

import os

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.data.cache import CachePlan, ChunkStore


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                         nn.Linear(8 * 3 * 3, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)]


FAST = dict(bits=3, iterations=40, batch_size=8, loss_form="minibatch")


@pytest.mark.parametrize("chunks", [
    [torch.randn(4, 5, 6), torch.randn(3, 5, 6)],  # samples first
    [torch.randn(2, 5, 6), torch.randn(2, 3, 6)],  # varying sequence length: rows first
])
def test_disk_store_holds_the_same_tensor_as_memory(chunks, tmp_path):
    stored = {}
    for tier in ("host", "disk"):
        store = ChunkStore(tier, torch.device("cpu"), str(tmp_path), None)
        for c in chunks:
            store.add(c)
        stored[tier] = store.tensor("layer")
    assert torch.equal(stored["host"], stored["disk"])
    assert os.listdir(tmp_path) == []  # the mapped file is unlinked at once


def test_tier_follows_the_budgets():
    cpu = CachePlan(torch.device("cpu"), host_bytes=1000)
    assert cpu.tier_for(1000) == "host" and cpu.tier_for(1001) == "disk"
    gpu = CachePlan(torch.device("cuda"), device_bytes=10, host_bytes=100)  # budgets given: no CUDA query
    assert [gpu.tier_for(n) for n in (10, 100, 101)] == ["device", "host", "disk"]


def test_calibration_batches_stay_on_the_device_only_while_they_fit_its_budget():
    """``device_cache_bytes=0`` keeps the batches in host memory too (what ``cache_on_cpu`` did)."""
    from lightning_adaround.engine.run import _staging_device

    batches = [torch.zeros(4, 8), (torch.zeros(4, 8), {"mask": torch.zeros(4, dtype=torch.bool)})]  # 260 bytes
    cuda = torch.device("cuda")  # budgets given: no CUDA query, so this runs on any machine
    assert _staging_device(batches, cuda, AdaRoundConfig(device_cache_bytes=260)) == cuda
    assert _staging_device(batches, cuda, AdaRoundConfig(device_cache_bytes=259, host_cache_bytes=10**6)) == torch.device("cpu")
    assert _staging_device(batches, cuda, AdaRoundConfig(device_cache_bytes=0, host_cache_bytes=10**6)) == torch.device("cpu")
    assert _staging_device(batches, torch.device("cpu"), AdaRoundConfig()) == torch.device("cpu")


def test_rounding_is_identical_wherever_the_cache_lives(tmp_path):
    reference = adaround(model(), batches(), AdaRoundConfig(**FAST))
    on_disk = adaround(model(), batches(), AdaRoundConfig(**FAST, host_cache_bytes=0, cache_dir=str(tmp_path)))
    for name, layer in reference.layers.items():
        assert torch.equal(layer.integer_weight, on_disk.layers[name].integer_weight), name
        assert "cached on disk" in on_disk.layers[name].note
        assert "cached on" not in layer.note
        assert on_disk.layers[name].cache_bytes == layer.cache_bytes > 0
    assert os.listdir(tmp_path) == []


def test_compact_cache_dtype_halves_the_cache_and_still_rounds_well():
    full = adaround(model(), batches(), AdaRoundConfig(**FAST))
    compact = adaround(model(), batches(), AdaRoundConfig(**FAST, cache_dtype=torch.bfloat16))
    for name, layer in full.layers.items():
        assert compact.layers[name].cache_bytes * 2 == layer.cache_bytes
        assert compact.layers[name].adaround_mse < 1.5 * layer.adaround_mse + 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(host_cache_bytes=-1), "host_cache_bytes=-1 must be a number of bytes >= 0"),
    (dict(device_cache_bytes=1.5), "device_cache_bytes=1.5 must be a number of bytes >= 0"),
    (dict(cache_dtype=torch.int8), "cache_dtype=torch.int8 must be a floating torch dtype"),
    (dict(cache_dir="/no/such/dir"), "cache_dir='/no/such/dir' is not an existing directory"),
])
def test_bad_cache_settings_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")):
        AdaRoundConfig(**kwargs)
