"""``scale_method="output"``: scales chosen by the layer's output error on calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, PerChannel, PerTensor, adaround, round_to_nearest
from lightning_adaround.data.unit import Unit, UnitData
from lightning_adaround.model.layers import run_with_weight
from lightning_adaround.data.moments import LayerMoments
from lightning_adaround.engine.objective import MomentsObjective, unit_channel_errors
from lightning_adaround.grid.quant import choose_grid


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a large shared mean and correlated features, as after a ReLU: what the weight error ignores."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, generator=g)
    return 2.0 + base + 0.3 * torch.randn(n, d, generator=g)


def _output_error(layer: nn.Linear, x: torch.Tensor):
    target = x @ layer.weight.detach().T
    return lambda w: (x @ w.T - target).pow(2).sum(0).double()


@pytest.mark.parametrize("granularity", [PerChannel(), PerTensor()])
@pytest.mark.parametrize("bits", [2, 4])
def test_output_scale_is_never_worse_on_the_output_and_better_somewhere(bits, granularity):
    torch.manual_seed(1)
    layer = nn.Linear(9, 16)
    x = _correlated_inputs(256, 9)
    error = _output_error(layer, x)
    w = layer.weight.detach()
    by_weight = choose_grid(w, bits, granularity=granularity, method="mse")
    by_output = choose_grid(w, bits, granularity=granularity, method="output", channel_error=error)
    e_weight, e_output = error(by_weight.fake_quantize(w)), error(by_output.fake_quantize(w))
    if isinstance(granularity, PerChannel):
        assert bool((e_output <= e_weight * (1 + 1e-9)).all())
    assert e_output.sum() < 0.95 * e_weight.sum()  # the weight error is the wrong yardstick for these inputs
    assert by_output.fake_quantize(w).unique().numel() <= 2**bits * (16 if isinstance(granularity, PerChannel) else 1)


def test_output_scale_needs_an_error_and_output_channels():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="channel_error="):
        choose_grid(w, 4, method="output")
    with pytest.raises(ValueError, match="axis 1"):
        choose_grid(w, 4, granularity=PerChannel(axis=1), method="output", channel_error=lambda q: q.sum(1))


def test_round_to_nearest_refuses_output_scale_with_the_fix():
    with pytest.raises(ValueError, match="scale_method='mse'"):
        round_to_nearest(nn.Linear(3, 2), AdaRoundConfig(scale_method="output"))


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(6, 5),
    lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1),
    lambda: nn.Conv2d(3, 6, 3, groups=3, stride=2),
])
def test_moments_channel_errors_rank_candidates_as_a_forward_pass_does(make):
    """Both forms give each channel's error up to a per-channel constant: differences between two weights agree."""
    torch.manual_seed(0)
    layer = make().eval()
    shape = (8, 6) if isinstance(layer, nn.Linear) else (8, layer.in_channels, 7, 7)
    x_float = torch.randn(shape)
    x_rounded = x_float + 0.1 * torch.randn(shape)
    w = layer.weight.detach()
    moments = LayerMoments(layer, torch.device("cpu"))
    moments.add(x_rounded, x_float)
    unit = Unit.of_layer("layer", layer)
    by_moments = MomentsObjective(unit, moments, w, None, torch.device("cpu"), dtype=torch.float64)
    train = UnitData(x_rounded, run_with_weight(layer, x_float, w).detach())
    by_forward = lambda weight: unit_channel_errors(unit, train, [weight], torch.device("cpu"))[0]  # noqa: E731
    w1, w2 = w + 0.05 * torch.randn_like(w), w + 0.05 * torch.randn_like(w)
    rows = moments.rows
    moments_diff = (by_moments.channel_errors(w1) - by_moments.channel_errors(w2)) * rows
    forward_diff = by_forward(w1) - by_forward(w2)
    assert moments_diff.shape == (w.shape[0],)
    torch.testing.assert_close(moments_diff, forward_diff, rtol=1e-4, atol=1e-6)


def test_adaround_output_scale_lowers_the_first_layers_nearest_error(digits_cnn, digits):
    """On the trained digits CNN the first layer sees the same input either way: its training-row error must drop."""
    x = digits["train"].tensors[0][:256]
    batches = list(x.split(64))
    errors = {}
    for method in ("mse", "output"):
        model = copy.deepcopy(digits_cnn)
        config = AdaRoundConfig(bits=2, iterations=20, scale_method=method, holdout_fraction=0.0)
        result = adaround(model, batches, config)
        errors[method] = result.layers[next(iter(result.layers))].nearest_mse
    assert errors["output"] < errors["mse"]


def test_use_nearest_rounds_the_chosen_channels_to_nearest_and_leaves_the_rest():
    from lightning_adaround.grid.rounding import RoundingVariable

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    grid = choose_grid(w, 3, method="minmax")
    rounding = RoundingVariable(w, grid)
    with torch.no_grad():
        rounding.v.copy_(torch.randn_like(rounding.v) * 3)  # as if optimised: far from nearest
    before = rounding.integer_weight()
    chosen = torch.tensor([True, False, True, False, False, True])
    rounding.use_nearest(w, chosen)
    after = rounding.integer_weight()
    assert torch.equal(after[chosen], grid.quantize(w)[chosen])
    assert torch.equal(after[~chosen], before[~chosen])
    assert not torch.equal(before[chosen], grid.quantize(w)[chosen])  # the test changed something


@pytest.mark.parametrize("scale_method", ["mse", "output"])
def test_moments_layers_never_end_worse_than_nearest_on_the_training_rows(digits_cnn, digits, scale_method):
    """Five iterations cannot converge; each channel keeps whichever of AdaRound and nearest fits better."""
    x = digits["train"].tensors[0][:256]
    config = AdaRoundConfig(bits=2, iterations=5, lr=0.5, scale_method=scale_method, holdout_fraction=0.0)
    result = adaround(copy.deepcopy(digits_cnn), list(x.split(64)), config)
    moments_layers = [r for r in result.layers.values() if r.loss_form == "moments"]
    assert moments_layers
    for layer in moments_layers:
        assert layer.adaround_mse <= layer.nearest_mse * (1 + 1e-6) + 1e-12, layer.name
    assert any("nearest kept on" in r.note for r in moments_layers)  # the big lr made some channels worse


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def test_output_scale_falls_back_to_weight_error_where_no_channel_error_exists():
    """Minibatch-form layers have no per-channel output error: 'mse' scales, said in the note."""
    model = _small_cnn()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    options = dict(bits=3, iterations=10, loss_form="minibatch")
    by_output = adaround(copy.deepcopy(model), batches, AdaRoundConfig(scale_method="output", **options))
    by_mse = adaround(copy.deepcopy(model), batches, AdaRoundConfig(scale_method="mse", **options))
    for name in ("0", "2"):
        assert torch.equal(by_output.layers[name].scale, by_mse.layers[name].scale), name
        assert "'mse' scales" in by_output.layers[name].note


def test_a_blocks_layers_get_output_error_scales_from_one_pass_of_the_block():
    """The block's first layer sees the block's input: its output scales minimise its own output
    error on the training rows, as a layer rounded alone would (the search picks per channel among
    the same candidates, so never worse than 'mse', and better here on correlated inputs)."""
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 8))
    x = _correlated_inputs(320, 9, seed=2)
    batches = list(x.split(64))
    options = dict(bits=3, iterations=10, reconstruction="block", blocks=["[0:3]"], holdout_fraction=0.0)
    found = {
        method: adaround(copy.deepcopy(model), batches, AdaRoundConfig(scale_method=method, **options))
        for method in ("mse", "output")
    }
    error = _output_error(model[0], x)
    w = model[0].weight.detach()
    nearest = {}
    for method, result in found.items():
        layer = result.layers["0"]
        q = torch.clamp(torch.round(w / layer.scale) + layer.zero_point, layer.qmin, layer.qmax)
        nearest[method] = error((q - layer.zero_point) * layer.scale).sum()
    assert nearest["output"] < nearest["mse"] * 0.99
    for name in ("0", "2"):
        assert "'mse' scales" not in found["output"].layers[name].note
        assert not torch.equal(found["output"].layers[name].scale, found["mse"].layers[name].scale), name


@pytest.mark.parametrize("trained, learn_scale", [(True, False), (False, False), (True, True)])
def test_a_blocks_layers_keep_nearest_only_where_the_block_error_does_not_grow(
    trained, learn_scale, digits_cnn, digits, monkeypatch,
):
    """Five steps at a huge learning rate leave AdaRound behind nearest on some channels of each
    layer. The block keeps nearest there only when that lowers its error on the training rows
    (with nothing held out, the reported error): never above the same run without the swap. On the
    trained CNN on digits the swap would raise it (so none is kept); on an untrained one fed noise it
    lowers it."""
    from digits import make_cnn

    import lightning_adaround.engine.unit_loop as unit_loop

    torch.manual_seed(0)
    model = digits_cnn if trained else make_cnn()
    x = digits["train"].tensors[0][:256] if trained else torch.randn(256, 1, 8, 8)
    config = AdaRoundConfig(
        bits=2, iterations=5, lr=0.5, holdout_fraction=0.0, reconstruction="block", blocks=["[0:4]"],
        learn_scale=learn_scale, scale_lr=0.05,
    )
    result = adaround(copy.deepcopy(model), list(x.split(64)), config)
    monkeypatch.setattr(unit_loop, "_keep_nearest_where_better", lambda *args: (0, 0))
    without = adaround(copy.deepcopy(model), list(x.split(64)), config)
    assert result.layers["0"].block == "[0:4]"
    assert result.layers["0"].adaround_mse <= without.layers["0"].adaround_mse
    kept = "nearest kept on" in result.layers["0"].note
    assert kept == (result.layers["0"].adaround_mse < without.layers["0"].adaround_mse)
    if not learn_scale:  # (with learned scales, undoing the swap restores them too)
        assert kept == (not trained)


@pytest.mark.parametrize("symmetric", [True, False])
def test_use_nearest_matches_the_grid_with_clipping_and_zero_points(symmetric):
    from lightning_adaround.grid.rounding import RoundingVariable

    torch.manual_seed(3)
    w = torch.randn(5, 7) * torch.linspace(0.1, 3.0, 5)[:, None]
    full = choose_grid(w, 3, symmetric=symmetric, method="minmax")
    grid = type(full)(full.scale * 0.5, full.zero_point, full.qmin, full.qmax, full.bits, full.symmetric, full.axis)
    rounding = RoundingVariable(w, grid)  # half the range: many weights lie beyond the grid's ends
    rounding.use_nearest(w, torch.ones(5, dtype=torch.bool))
    assert torch.equal(rounding.integer_weight(), grid.quantize(w))
    assert bool((grid.quantize(w) == grid.qmax).any())  # clipping was exercised


@pytest.mark.parametrize("granularity", [PerChannel(), PerTensor()])
def test_auto_scale_keeps_the_rounding_with_the_lower_held_out_error_of_the_two(granularity):
    """One layer, so every run sees the same inputs: auto rounds on both kinds of scales and keeps
    the one whose error after AdaRound on the held-out samples is lower (not the better nearest)."""
    x = _correlated_inputs(320, 9, seed=3)
    batches = list(x.split(64))
    found = {}
    for method in ("mse", "output", "auto"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(9, 16))
        config = AdaRoundConfig(bits=3, granularity=granularity, scale_method=method, iterations=20, loss_form="moments")
        found[method] = adaround(model, batches, config).layers["0"]
    assert found["auto"].adaround_mse == min(found["mse"].adaround_mse, found["output"].adaround_mse)
    chosen, other = ("output", "mse") if found["output"].adaround_mse < found["mse"].adaround_mse else ("mse", "output")
    assert f"'{chosen}' scales (held-out {found[chosen].adaround_mse:.3g} vs {found[other].adaround_mse:.3g}" in found["auto"].note
    assert torch.equal(found["auto"].scale, found[chosen].scale)
    assert torch.equal(found["auto"].integer_weight, found[chosen].integer_weight)
    assert found["auto"].nearest_mse == found[chosen].nearest_mse
    assert [h[0] for h in found["auto"].history] == [h[0] for h in found[chosen].history]  # one curve, the kept one


def test_auto_scale_is_mse_where_no_output_error_exists():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = list(_correlated_inputs(128, 9).split(32))
    config = dict(bits=3, iterations=10, loss_form="minibatch")
    auto = adaround(copy.deepcopy(model), batches, AdaRoundConfig(scale_method="auto", **config))
    mse = adaround(copy.deepcopy(model), batches, AdaRoundConfig(scale_method="mse", **config))
    for name, layer in auto.layers.items():
        assert torch.equal(layer.scale, mse.layers[name].scale) and "scales" not in layer.note
    round_to_nearest(model, AdaRoundConfig(bits=3, scale_method="auto"))  # no data: the weight-error search
