"""The rounding variable: identity at init, hard rounding on the grid, V's sign picks the side."""

import copy
import dataclasses

import pytest
import torch

from lightning_adaround.grid.quant import PerChannel, PerTensor, choose_grid
from lightning_adaround.grid.rounding import (
    RoundingVariable, inverse_rectified_sigmoid, rectified_sigmoid,
)


def _weight(seed=0, shape=(6, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], 1, 1, 1, generator=g).add(0.2)


GRIDS = [
    (True, PerChannel()), (True, PerTensor()), (False, PerChannel()), (False, PerTensor()),
]


def test_rectified_sigmoid_inverse_roundtrip():
    h = torch.linspace(0.0, 0.999, 200)
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5, rtol=0)
    assert rectified_sigmoid(torch.tensor([-100.0])).item() == 0.0
    assert rectified_sigmoid(torch.tensor([100.0])).item() == 1.0
    assert rectified_sigmoid(torch.tensor([0.0])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("symmetric,granularity", GRIDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_init_soft_weight_is_float_weight(symmetric, granularity, bits):
    w = _weight(bits)
    grid = choose_grid(w, bits, symmetric, granularity, "minmax")
    rv = RoundingVariable(w, grid)
    soft, h = rv.soft()
    scale = grid.scale.expand_as(w)
    # An asymmetric minmax grid rounds its zero point, which can leave the extreme weights
    # up to half a step outside the grid; the identity holds wherever the weight is inside.
    scaled = w / grid.scale + grid.zero_point
    inside = (scaled >= grid.qmin) & (scaled <= grid.qmax)
    if symmetric:
        assert inside.all()
    assert inside.float().mean() > 0.9
    assert torch.all((soft - w).abs()[inside] <= 1e-5 * scale[inside] + 1e-7)
    assert torch.all((soft - w).abs() <= scale * 0.5 * (1 + 1e-5))
    frac = w / grid.scale - torch.floor(w / grid.scale)
    torch.testing.assert_close(h, frac, atol=1e-5, rtol=0)
    assert rv.v.requires_grad and rv.v.shape == w.shape
    # the soft weight is differentiable in V
    soft.sum().backward()
    assert rv.v.grad is not None and torch.isfinite(rv.v.grad).all()


@pytest.mark.parametrize("symmetric,granularity", GRIDS)
@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hard_weight_integral_in_range_and_on_grid(symmetric, granularity, method, bits):
    w = _weight(10 + bits)
    grid = choose_grid(w, bits, symmetric, granularity, method)
    rv = RoundingVariable(w, grid)
    # push V around, including far past both ends, to exercise the clamps
    with torch.no_grad():
        rv.v.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 10)
    wi = rv.integer_weight()
    assert torch.equal(wi, wi.round())
    assert wi.min() >= grid.qmin and wi.max() <= grid.qmax
    hard = rv.hard_weight()
    assert torch.equal(hard, grid.dequantize(wi))
    # on the grid: re-quantizing gives back the same integers
    assert torch.equal(grid.quantize(hard), wi)


@pytest.mark.parametrize("symmetric,granularity", GRIDS)
def test_sign_of_v_picks_rounding_direction(symmetric, granularity):
    w = _weight(3)
    grid = choose_grid(w, 4, symmetric, granularity, "minmax")  # minmax: no clipping
    rv = RoundingVariable(w, grid)
    floor_int = torch.floor(w / grid.scale) + grid.zero_point
    with torch.no_grad():
        rv.v.fill_(1e-3)
    assert torch.equal(rv.integer_weight(), torch.clamp(floor_int + 1, grid.qmin, grid.qmax))
    with torch.no_grad():
        rv.v.fill_(0.0)  # V == 0 rounds up
    assert torch.equal(rv.integer_weight(), torch.clamp(floor_int + 1, grid.qmin, grid.qmax))
    with torch.no_grad():
        rv.v.fill_(-1e-3)
    assert torch.equal(rv.integer_weight(), torch.clamp(floor_int, grid.qmin, grid.qmax))
    # mixed signs element by element
    sign = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(5)).bool()
    with torch.no_grad():
        rv.v.copy_(torch.where(sign, 2.0, -2.0))
    expected = torch.clamp(floor_int + sign.float(), grid.qmin, grid.qmax)
    assert torch.equal(rv.integer_weight(), expected)


def test_init_hard_rounding_is_near_round_to_nearest():
    # at init h = frac(W/s), so V >= 0 iff frac >= 0.5 (up to the sigmoid's numerics)
    w = _weight(4)
    grid = choose_grid(w, 4, True, PerChannel(), "minmax")
    rv = RoundingVariable(w, grid)
    frac = w / grid.scale - torch.floor(w / grid.scale)
    clear = (frac - 0.5).abs() > 1e-3
    assert torch.equal(rv.integer_weight()[clear], grid.quantize(w)[clear])


def test_soft_weight_clamped_to_grid_range():
    w = _weight(6)
    grid = choose_grid(w, 2, True, PerTensor(), "mse")  # mse may clip: bounds matter
    rv = RoundingVariable(w, grid)
    with torch.no_grad():
        rv.v.fill_(50.0)
    soft, h = rv.soft()
    assert torch.all(h == 1.0)
    ints = soft / grid.scale + grid.zero_point
    assert ints.min() >= grid.qmin - 1e-4 and ints.max() <= grid.qmax + 1e-4


@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "inside"])
def test_fused_soft_rounding_equals_autograd_reference(beta, symmetric, clipped):
    """The fast path (hand-written gradient) against autograd through soft() and the regularizer."""
    from lightning_adaround.grid.loss import rounding_regularizer

    torch.manual_seed(0)
    w = torch.randn(16, 3, 3, 3)
    grid = choose_grid(w, 3, symmetric=symmetric, method="mse")  # mse: some weights clipped
    if not clipped:  # a range twice as wide: no weight can leave it
        grid = dataclasses.replace(grid, scale=grid.scale * 2.0)
    r = RoundingVariable(w, grid)
    assert (r.edges is not None) == clipped
    r.v = (r.v + 2.0 * torch.randn_like(r.v)).detach().requires_grad_(True)  # some h saturated
    upstream = torch.randn_like(w)
    weight, h = r.soft()
    reference = (weight * upstream).sum() + (0.01 * rounding_regularizer(h, beta) if beta else 0.0)
    (expected,) = torch.autograd.grad(reference, r.v)
    fused_weight, reg = r.soft_with_regularizer(beta)
    (got,) = torch.autograd.grad((fused_weight * upstream).sum() + 0.01 * reg, r.v)
    assert torch.equal(fused_weight, weight.detach())
    if beta is None:
        assert reg.item() == 0.0
    else:
        assert reg.item() == pytest.approx(rounding_regularizer(h, beta).item(), rel=1e-6)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_weights_on_the_grid_get_no_gradient_and_stay():
    """h is exactly 0 for a weight on the grid (a pruned zero): the step leaves its V alone, as autograd's
    strict interior would, so a sparse model keeps its zeros."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[:, :4] = 0.0
    grid = choose_grid(w, 4, granularity=PerChannel(), method="minmax")
    r = RoundingVariable(w, grid)
    _, h = r.soft()
    assert torch.all(h[:, :4] == 0.0)
    _, _, saved = r.soft_step(10.0)
    dh_dv = saved[0]
    assert torch.all(dh_dv[:, :4] == 0.0) and torch.all(dh_dv[:, 4:][h[:, 4:] > 0] > 0)


@pytest.mark.parametrize("form", ["moments", "minibatch"])
def test_a_channels_last_model_rounds_as_a_contiguous_one(form):
    from torch import nn

    from lightning_adaround import AdaRoundConfig, adaround

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    config = AdaRoundConfig(bits=4, iterations=20, batch_size=8, loss_form=form)
    adaround(model, batches, config)
    adaround(twin, batches, config)
    assert twin[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(model, twin):
        if isinstance(a, nn.Conv2d):
            torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-6)
