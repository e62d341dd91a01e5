"""Learned clipping (``learn_scale=True``): the grid scale learned with the rounding, the result still an exact grid."""

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, PerChannel, PerGroup, PerTensor, adaround
from lightning_adaround.engine.optimize import optimize_rounding
from lightning_adaround.grid.loss import BetaSchedule, rounding_regularizer
from lightning_adaround.grid.quant import choose_grid
from lightning_adaround.grid.rounding import RoundingVariable, soft_backward

GRANULARITIES = [PerChannel(), PerTensor(), PerGroup(8)]


def _learning(w, grid, seed=0):
    """A rounding variable part way through learning: V and the log-multipliers moved off their start."""
    g = torch.Generator().manual_seed(seed)
    r = RoundingVariable(w, grid, learn_scale=True)
    r.v = (r.v + 2.0 * torch.randn(r.v.shape, generator=g)).detach().requires_grad_(True)  # some h saturated
    r.log_scale = (0.2 * torch.randn(r.log_scale.shape, generator=g)).requires_grad_(True)
    return r


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("beta", [None, 7.3])
def test_hand_written_scale_gradient_equals_autograd(granularity, symmetric, beta):
    """Both fast paths (the autograd node and the graph-free step of the moments form) give autograd's
    gradients on V and on the log-multipliers, clipped weights and per-group scales included."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 2, 2)
    grid = choose_grid(w, 3, symmetric, granularity, "mse")
    r = _learning(w, grid)
    upstream = torch.randn_like(w)
    weight, h = r.soft()  # autograd through every op
    reference = (weight * upstream).sum() + (0.01 * rounding_regularizer(h, beta) if beta else 0.0)
    expected_v, expected_s = torch.autograd.grad(reference, [r.v, r.log_scale])
    assert float(expected_s.abs().max()) > 0

    fused, reg = r.soft_with_regularizer(beta)
    got_v, got_s = torch.autograd.grad((fused * upstream).sum() + 0.01 * reg, [r.v, r.log_scale])
    torch.testing.assert_close(got_v, expected_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s, expected_s, rtol=1e-5, atol=1e-5)

    stepped, _, saved = r.soft_step(beta)
    torch.testing.assert_close(stepped, weight.detach())
    torch.testing.assert_close(r.scale_grad(upstream, stepped), expected_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft_backward(saved, upstream, 0.01 if beta else None), expected_v, rtol=1e-5, atol=1e-6)


def test_off_keeps_the_fast_path_as_it_was():
    """Without learning, the autograd node keeps only its three tensors and no scale gradient exists."""
    w = torch.randn(4, 5)
    r = RoundingVariable(w, choose_grid(w, 4))
    assert r.log_scale is None and r.grid is r._grid and r.current_scale() is r.scale
    weight, reg = r.soft_with_regularizer(3.0)
    assert len(weight.grad_fn.saved_tensors) == 3


def _correlated_model_and_batches(seed=0, d=32, out=16):
    torch.manual_seed(seed)
    x = torch.randn(1024, d) @ (torch.randn(d, d) / d**0.5)
    model = nn.Sequential(nn.Linear(d, out), nn.ReLU(), nn.Linear(out, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.2, 3.0, out)[:, None])
        model[0].weight[:, 0] *= 4  # an outlier input column
    return model, list(x.split(128))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("options", [
    dict(loss_form="moments"), dict(loss_form="minibatch"), dict(reconstruction="block", blocks=["[0:3]"]),
])
def test_result_is_an_exact_grid_with_the_learned_scales(granularity, options):
    """Integer weights in range, the learned scales in the result, and the written weight exactly dequantize(integer)."""
    model, batches = _correlated_model_and_batches()
    config = AdaRoundConfig(bits=3, granularity=granularity, symmetric=False, iterations=60, lr=1e-2,
                            learn_scale=True, scale_lr=1e-2, **options)
    searched = adaround(copy.deepcopy(model), batches, AdaRoundConfig(
        bits=3, granularity=granularity, symmetric=False, iterations=60, lr=1e-2, **options))
    result = adaround(model, batches, config)
    modules = dict(model.named_modules())
    for name, layer in result.layers.items():
        assert "learned scale" in layer.note
        q = layer.integer_weight.float()
        assert q.min() >= layer.qmin and q.max() <= layer.qmax and torch.equal(q, q.round())
        assert torch.equal(layer.dequantized_weight(), modules[name].weight.detach())
        assert torch.equal(layer.zero_point, searched.layers[name].zero_point)  # the zero point is not learned
        assert not torch.equal(layer.scale, searched.layers[name].scale), name  # the scales moved


@pytest.mark.parametrize("granularity", [PerChannel(), PerTensor()])
def test_moments_error_with_learned_scales_beats_poorly_searched_clipping(granularity):
    """Min-max grids clip nothing, so the outlier column wastes the range: learning the clipping lowers the
    layer's exact training error below that of AdaRound on the searched scales."""
    model, batches = _correlated_model_and_batches()
    errors = {}
    for learn in (False, True):
        config = AdaRoundConfig(bits=3, granularity=granularity, scale_method="minmax", iterations=300, lr=1e-2,
                                loss_form="moments", holdout_fraction=0.0, learn_scale=learn, scale_lr=1e-3,
                                layers=["0"])
        errors[learn] = adaround(copy.deepcopy(model), batches, config).layers["0"].adaround_mse
    assert errors[True] < 0.9 * errors[False], errors


def test_refit_finds_the_best_scale_for_the_final_integers():
    """With a quadratic channel error the refit lands on its minimum exactly, per channel and per tensor."""
    torch.manual_seed(1)
    w = torch.randn(5, 7)
    for granularity, factor in ((PerChannel(), torch.linspace(0.8, 1.3, 5)[:, None]), (PerTensor(), torch.tensor(1.2))):
        r = RoundingVariable(w, choose_grid(w, 4, granularity=granularity), learn_scale=True)
        target = r.hard_weight() * factor  # the same integers at another scale

        def channel_error(weight, exact=False):
            return (weight.double() - target.double()).square().sum(1)

        assert r.refit_scale(channel_error) == r.log_scale.numel()
        torch.testing.assert_close(r.hard_weight(), target, rtol=1e-5, atol=1e-6)
        at_minimum = r.grid.scale.clone()
        r.refit_scale(channel_error)  # at the minimum: at most rounding noise moves
        torch.testing.assert_close(r.grid.scale, at_minimum, rtol=1e-6, atol=0)


def test_keep_nearest_resets_the_channel_scale_or_uses_the_learned_grid():
    torch.manual_seed(2)
    w = torch.randn(6, 9)
    chosen = torch.tensor([True, False, True, False, False, True])
    # per channel: the chosen channels round to nearest on the searched grid, their scale reset
    grid = choose_grid(w, 3)
    r = _learning(w, grid)
    before_scale, before_int = r.grid.scale.clone(), r.integer_weight()
    torch.testing.assert_close(r.nearest_weight(w), grid.fake_quantize(w))
    r.use_nearest(w, chosen)
    assert torch.equal(r.grid.scale[chosen], grid.scale[chosen])
    assert torch.equal(r.grid.scale[~chosen], before_scale[~chosen])
    assert torch.equal(r.hard_weight()[chosen], grid.fake_quantize(w)[chosen])
    assert torch.equal(r.integer_weight()[~chosen], before_int[~chosen])
    # per tensor: one scale for all, so the chosen channels round to nearest on the learned grid
    grid = choose_grid(w, 3, granularity=PerTensor())
    r = _learning(w, grid)
    r.log_scale = torch.full_like(r.log_scale, 0.03).requires_grad_(True)  # small: nearest stays floor or floor + 1
    learned = r.grid
    r.use_nearest(w, chosen)
    assert torch.equal(r.grid.scale, learned.scale)
    assert torch.equal(r.hard_weight()[chosen], learned.fake_quantize(w)[chosen])
    assert torch.equal(r.nearest_weight(w)[chosen], r.hard_weight()[chosen])


def test_optimizer_steps_the_scales_at_their_own_rate_and_averages_their_gradients():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    grid = choose_grid(w, 3)
    r = RoundingVariable(w, grid, learn_scale=True)
    target = torch.randn(8, 6)

    class Objective:
        def step_loss(self, weights):
            return (weights[0] - target).square().sum()

    shapes = []

    def average(grads, loss):
        shapes.append([tuple(g.shape) for g in grads])
        return loss

    optimize_rounding(r, Objective(), 10, lr=1e-2, reg_lambda=0.01, schedule=BetaSchedule(10),
                      average_gradients=average, scale_lr=1e-3)
    assert shapes == [[(8, 6), (8, 1)]] * 10
    moved = r.log_scale.detach().abs()
    assert 0 < float(moved.max()) <= 10 * 1e-3 * 1.01  # Adam moves at most about lr per step


def test_off_leaves_the_searched_scales_and_integers_alone():
    """learn_scale=False: the result's scales are the searched ones, and a run is reproducible bit for bit."""
    model, batches = _correlated_model_and_batches()
    config = AdaRoundConfig(bits=3, iterations=40, lr=1e-2)
    a = adaround(copy.deepcopy(model), batches, config)
    b = adaround(copy.deepcopy(model), batches, AdaRoundConfig(bits=3, iterations=40, lr=1e-2, learn_scale=False))
    for name, layer in a.layers.items():
        assert torch.equal(layer.integer_weight, b.layers[name].integer_weight)
        assert torch.equal(layer.scale, choose_grid(model.get_submodule(name).weight, 3).scale)
        assert "learned" not in layer.note


@pytest.mark.parametrize("field,value,error", [
    ("learn_scale", 1, TypeError), ("scale_lr", 0.0, ValueError), ("scale_lr", -1e-3, ValueError),
])
def test_config_refuses_bad_learned_scale_options(field, value, error):
    with pytest.raises(error, match=field):
        AdaRoundConfig(**{field: value})


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(8)])
def test_export_round_trip_keeps_the_learned_grid(tmp_path, granularity):
    """The exported file holds the learned scales: loading it rebuilds the rounded weights bit for bit."""
    from lightning_adaround import export_quantized, load_quantized

    model, batches = _correlated_model_and_batches()
    fresh = copy.deepcopy(model)
    config = AdaRoundConfig(bits=4, granularity=granularity, iterations=40, lr=1e-2, learn_scale=True, scale_lr=1e-2)
    result = adaround(model, batches, config)
    export_quantized(model, result, tmp_path / "q.pt")
    loaded = load_quantized(fresh, tmp_path / "q.pt")
    for name, layer in result.layers.items():
        assert torch.equal(loaded.layers[name].scale, layer.scale)
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
