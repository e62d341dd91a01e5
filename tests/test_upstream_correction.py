"""``upstream_correction``: how much of the earlier layers' rounding error a layer is fitted to undo."""

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround


def _two_layers() -> tuple[nn.Module, list[torch.Tensor]]:
    """Two Linear layers, the second already on its 4-bit min-max grid: its own rounding error is zero,
    so whatever error it is judged to have comes from the first layer's rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 8))
    with torch.no_grad():
        integers = torch.randint(-7, 8, (8, 16)).float()
        integers[:, 0] = 7  # every row reaches the grid's top, so min-max picks scale 0.05 exactly
        model[1].weight.copy_(0.05 * integers)
    batches = list(torch.randn(128, 12).split(32))
    return model, batches


def _run(correction: float, loss_form: str):
    model, batches = _two_layers()
    config = AdaRoundConfig(
        bits=4, scale_method="minmax", iterations=20, loss_form=loss_form, holdout_fraction=0.25,
        upstream_correction=correction,
    )
    return adaround(model, batches, config).layers


@pytest.mark.parametrize("loss_form", ["moments", "minibatch"])
def test_the_target_moves_from_the_float_input_to_the_rounded_one(loss_form):
    """The second layer's round-to-nearest error is the first layer's error carried through it: all of
    it at 1, a quarter at 0.5 (half the input gap, squared), none at 0. The first layer sees the
    calibration data in both models, so the option does not touch it."""
    full, half, none = (_run(c, loss_form) for c in (1.0, 0.5, 0.0))
    assert full["1"].nearest_mse > 1e-4
    assert half["1"].nearest_mse == pytest.approx(0.25 * full["1"].nearest_mse, rel=1e-4)
    assert none["1"].nearest_mse == pytest.approx(0.0, abs=1e-10)
    for result in (half, none):
        assert result["0"].nearest_mse == full["0"].nearest_mse
        assert torch.equal(result["0"].integer_weight, full["0"].integer_weight)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), True, "1"])
def test_values_outside_zero_to_one_are_refused(value):
    with pytest.raises(ValueError, match="upstream_correction=.* must be a number in \\[0, 1\\]"):
        AdaRoundConfig(upstream_correction=value)


def test_the_default_is_the_papers_full_correction():
    assert AdaRoundConfig().upstream_correction == 1.0
    model, batches = _two_layers()
    a = adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=4, iterations=20))
    b = adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=4, iterations=20, upstream_correction=1))
    assert all(torch.equal(x.integer_weight, y.integer_weight) for x, y in zip(a.layers.values(), b.layers.values()))
