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


def _run(correction, loss_form: str):
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


def _conv_then_linear() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    )
    return model, list(torch.randn(64, 3, 6, 6).split(16))


def _layers(model, batches, **options):
    return adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=3, iterations=20, **options)).layers


def test_the_default_is_by_the_units_layers():
    """``None``: 0.5 for a unit of Linear layers only (transformers overfit the full correction),
    1 for any other (convolutions, and a block holding one)."""
    assert AdaRoundConfig().upstream_correction is None
    config = AdaRoundConfig()
    assert config.upstream_correction_for([nn.Linear(2, 2)]) == 0.5
    assert config.upstream_correction_for([nn.Conv2d(2, 2, 1)]) == 1.0
    assert config.upstream_correction_for([nn.Conv2d(2, 2, 1), nn.Linear(2, 2)]) == 1.0
    assert AdaRoundConfig(upstream_correction=0.25).upstream_correction_for([nn.Linear(2, 2)]) == 0.25


@pytest.mark.parametrize("model, same_as", [
    ("convolutions", 1.0), ("linears", 0.5), ("blocks: convolutions, then linears", None),
])
def test_the_default_rounds_as_the_correction_it_names(model, same_as):
    """The default rounds a model of convolutions as ``1`` and one of Linear layers as ``0.5``, to the
    bit; blocks of each kind as their own. A unit's round-to-nearest error is measured against its
    target, so equal errors show the same correction was used."""
    net, batches = _conv_then_linear()
    options = {}
    if model == "convolutions":
        net = net[:4]
    elif model == "linears":
        net, batches = net[5:], [net[:5](b).detach() for b in batches]
    else:
        options = dict(reconstruction="block", blocks=["[0:4]", "[5:8]"])
    default = _layers(net, batches, **options)
    if same_as is not None:
        named = _layers(net, batches, upstream_correction=same_as, **options)
        other = _layers(net, batches, upstream_correction=1.5 - same_as, **options)
        last = list(default)[-1]
        assert named[last].nearest_mse != other[last].nearest_mse  # the test tells the two apart
    else:
        full, half = (_layers(net, batches, upstream_correction=c, **options) for c in (1.0, 0.5))
        named = {**{n: full[n] for n in ("0", "2")}, **{n: half[n] for n in ("5", "7")}}
        assert half["7"].nearest_mse < 0.9 * full["7"].nearest_mse
    for name in default:
        assert default[name].nearest_mse == named[name].nearest_mse, name
        assert torch.equal(default[name].integer_weight, named[name].integer_weight), name


def test_the_paper_is_one_option_away():
    """Linear layers get half the correction by default; ``upstream_correction=1`` gives the paper's."""
    paper, default = _run(1.0, "moments"), _run(None, "moments")
    assert default["1"].nearest_mse == pytest.approx(0.25 * paper["1"].nearest_mse, rel=1e-4)


def test_the_summary_says_which_correction_a_layer_was_fitted_with():
    """The per-layer note names a correction other than the paper's 1, and why it was chosen."""
    model, batches = _conv_then_linear()
    by_default = adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=3, iterations=20))
    assert "upstream correction 0.5 (Linear layers' default)" in by_default.layers["5"].note
    assert "upstream correction" not in by_default.layers["2"].note
    assert "upstream correction 0.5 (Linear layers' default)" in by_default.summary_table()
    chosen = adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=3, iterations=20, upstream_correction=0.25))
    assert "upstream correction 0.25" in chosen.layers["2"].note
    assert "default" not in chosen.layers["2"].note


def test_iterations_default_by_the_units_layers():
    """``iterations=None``: 1,000 for a unit of Linear layers only (MiniLM: the same cosine as at
    10,000), the paper's 10,000 for any other; each layer's result says what it took."""
    config = AdaRoundConfig()
    assert config.iterations is None
    assert config.iterations_for([nn.Linear(2, 2)]) == 1_000
    assert config.iterations_for([nn.Conv2d(2, 2, 1)]) == 10_000
    assert config.iterations_for([nn.Conv2d(2, 2, 1), nn.Linear(2, 2)]) == 10_000
    assert AdaRoundConfig(iterations=20).iterations_for([nn.Conv2d(2, 2, 1)]) == 20
    model, batches = _conv_then_linear()
    small = nn.Sequential(model[0], model[1], nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    layers = adaround(copy.deepcopy(small), batches, AdaRoundConfig(bits=3, reg_lambda=0.01)).layers
    assert layers["0"].iterations == 10_000 and layers["3"].iterations == 1_000
    assert len(layers["3"].history) and layers["3"].history[-1][0] == 999
