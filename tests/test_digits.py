"""AdaRound against round-to-nearest on a CNN trained for real on scikit-learn's digits."""

from __future__ import annotations

import copy

import pytest

from conftest import accuracy
from lightning_adaround import AdaRoundConfig, PerChannel, PerTensor, adaround, round_to_nearest

ITERATIONS = 1000

CASES = [
    pytest.param(4, PerChannel(), marks=pytest.mark.slow, id="W4-per-channel"),
    pytest.param(4, PerTensor(), marks=pytest.mark.slow, id="W4-per-tensor"),
    pytest.param(3, PerChannel(), marks=pytest.mark.slow, id="W3-per-channel"),
    pytest.param(3, PerTensor(), id="W3-per-tensor"),
    pytest.param(2, PerChannel(), id="W2-per-channel"),
]


def calibration(digits, n=1024, batch=64):
    x = digits["train"].tensors[0][:n]
    return [x[i:i + batch] for i in range(0, len(x), batch)]


@pytest.mark.parametrize("bits, granularity", CASES)
def test_adaround_beats_nearest_on_real_digits(digits, trained_digits_cnn, bits, granularity):
    config = AdaRoundConfig(bits=bits, granularity=granularity, iterations=ITERATIONS)
    fp_acc = accuracy(trained_digits_cnn, digits["test"])

    nearest = copy.deepcopy(trained_digits_cnn)
    round_to_nearest(nearest, config)
    nearest_acc = accuracy(nearest, digits["test"])

    model = copy.deepcopy(trained_digits_cnn)
    result = adaround(model, calibration(digits), config)
    ada_acc = accuracy(model, digits["test"])

    assert len(result.layers) == 5 and not result.unreached
    for name, layer in result.layers.items():
        assert layer.adaround_mse < layer.nearest_mse, (name, layer.nearest_mse, layer.adaround_mse)
    # One test digit is 0.28%: where nearest already matches full precision, a single digit
    # either way is noise, not a difference between the methods.
    one_digit = 1.0 / len(digits["test"]) + 1e-6
    assert ada_acc >= nearest_acc - one_digit, (fp_acc, nearest_acc, ada_acc)
    if fp_acc - nearest_acc > 0.02:
        # "clearly above": AdaRound wins back at least half of what nearest rounding lost
        assert ada_acc - nearest_acc >= 0.5 * (fp_acc - nearest_acc), (fp_acc, nearest_acc, ada_acc)


def test_nearest_loses_accuracy_at_two_bits(digits, trained_digits_cnn):
    """Guards the test above: at 2 bits it must exercise the 'clearly above' branch."""
    fp_acc = accuracy(trained_digits_cnn, digits["test"])
    nearest = copy.deepcopy(trained_digits_cnn)
    round_to_nearest(nearest, AdaRoundConfig(bits=2))
    assert fp_acc - accuracy(nearest, digits["test"]) > 0.02
