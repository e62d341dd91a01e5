"""The quantization grid: integer ranges, bit checks, minmax/mse scales, fake quantization."""

import pytest
import torch
from torch import nn

from lightning_adaround.model.layers import weight_channel_axis
from lightning_adaround.grid.quant import (
    PerChannel, PerTensor, check_bits, choose_grid, integer_range,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_range(bits):
    assert integer_range(bits, symmetric=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert integer_range(bits, symmetric=False) == (0, 2**bits - 1)


def test_integer_range_examples():
    assert integer_range(4, True) == (-8, 7)
    assert integer_range(8, True) == (-128, 127)
    assert integer_range(4, False) == (0, 15)
    assert integer_range(2, False) == (0, 3)


@pytest.mark.parametrize("bad", [1, 9, 0, -4, 4.0, True, "4", None])
def test_check_bits_rejects_with_value_in_message(bad):
    with pytest.raises((ValueError, TypeError)) as info:
        check_bits(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_check_bits_error_types_and_names():
    with pytest.raises(ValueError, match=r"bits=1\b"):
        check_bits(1)
    with pytest.raises(ValueError, match=r"bits=9\b"):
        check_bits(9)
    with pytest.raises(TypeError, match=r"4\.0"):
        check_bits(4.0)
    with pytest.raises(TypeError, match="True"):
        check_bits(True)
    with pytest.raises(ValueError, match=r"layer_bits\['fc'\]=9"):
        check_bits(9, "layer_bits['fc']")
    with pytest.raises(ValueError):
        integer_range(1, True)


@pytest.mark.parametrize("bits", range(2, 9))
def test_check_bits_accepts_supported(bits):
    check_bits(bits)


def _weights(seed, shape=(6, 5, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    # heavy tails and per-channel spread, so clipping matters
    w = w * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g).mul(3).add(0.1)
    w[0].view(-1)[0] = 8.0
    return w


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_symmetric_max_abs_at_qmax(bits, granularity):
    for seed in range(3):
        w = _weights(seed)
        # make one channel's extreme negative to check the |min| side too
        w[1] = -w[1].abs()
        grid = choose_grid(w, bits, symmetric=True, granularity=granularity, method="minmax")
        assert grid.qmin == -(2 ** (bits - 1)) and grid.qmax == 2 ** (bits - 1) - 1
        assert torch.all(grid.zero_point == 0)
        dims = [d for d in range(w.dim()) if d != grid.axis] if grid.axis is not None else list(range(w.dim()))
        max_abs = w.abs().amax(dim=dims, keepdim=True)
        # qmax * scale is max|w| (to float rounding)
        torch.testing.assert_close(grid.qmax * grid.scale, max_abs, rtol=1e-6, atol=0)
        # the weight of largest magnitude maps onto +-qmax and nothing is clipped
        q = grid.quantize(w)
        assert torch.all(q.abs().amax(dim=dims, keepdim=True) == grid.qmax)
        err = (grid.fake_quantize(w) - w).abs()
        assert torch.all(err <= grid.scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_asymmetric_zero_exact_and_covers_range(bits, granularity):
    for seed in range(3):
        w = _weights(seed) + 0.3
        w[2] = w[2].abs() + 0.5  # an all-positive channel: zero must still be on the grid
        grid = choose_grid(w, bits, symmetric=False, granularity=granularity, method="minmax")
        assert (grid.qmin, grid.qmax) == (0, 2**bits - 1)
        zp = grid.zero_point
        assert torch.equal(zp, zp.round())
        assert torch.all((zp >= grid.qmin) & (zp <= grid.qmax))
        zeros = torch.zeros_like(w)
        assert torch.equal(grid.fake_quantize(zeros), zeros)
        assert torch.equal(grid.quantize(zeros), zp.expand_as(w))
        dims = [d for d in range(w.dim()) if d != grid.axis] if grid.axis is not None else list(range(w.dim()))
        w_min = w.amin(dim=dims, keepdim=True)
        w_max = w.amax(dim=dims, keepdim=True)
        lo = grid.dequantize(torch.full_like(zp, grid.qmin))
        hi = grid.dequantize(torch.full_like(zp, grid.qmax))
        tol = grid.scale * (0.5 + 1e-5)
        # the grid's ends sit within half a step of the weight range (zero point rounding)
        assert torch.all(lo <= torch.clamp(w_min, max=0) + tol)
        assert torch.all(hi >= torch.clamp(w_max, min=0) - tol)
        err = (grid.fake_quantize(w) - w).abs()
        assert torch.all(err <= tol)


def test_per_channel_scale_shape_conv2d_and_conv_transpose2d():
    conv = nn.Conv2d(3, 8, 3)
    axis = weight_channel_axis(conv)
    assert axis == 0
    grid = choose_grid(conv.weight, 4, granularity=PerChannel(), channel_axis=axis)
    assert grid.axis == 0
    assert grid.scale.shape == (8, 1, 1, 1)
    assert grid.zero_point.shape == (8, 1, 1, 1)

    convt = nn.ConvTranspose2d(3, 8, 3)  # weight (in=3, out=8, 3, 3)
    axis = weight_channel_axis(convt)
    assert axis == 1
    grid = choose_grid(convt.weight, 4, granularity=PerChannel(), channel_axis=axis)
    assert grid.axis == 1
    assert grid.scale.shape == (1, 8, 1, 1)
    assert grid.zero_point.shape == (1, 8, 1, 1)

    grid = choose_grid(convt.weight, 4, granularity=PerTensor(), channel_axis=axis)
    assert grid.axis is None
    assert grid.scale.shape == (1, 1, 1, 1)

    lin = nn.Linear(5, 7)
    grid = choose_grid(lin.weight, 4, granularity=PerChannel(), channel_axis=weight_channel_axis(lin))
    assert grid.scale.shape == (7, 1)


def test_depthwise_conv_transpose_per_channel_has_one_scale_per_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=4))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1, 1))
    w = model[0].weight.detach().clone()
    from lightning_adaround import AdaRoundConfig, adaround

    result = adaround(model, [torch.randn(8, 4, 5, 5)], AdaRoundConfig(bits=4, iterations=5, batch_size=8))
    assert result.layers["0"].scale.numel() == 4
    wq = model[0].weight.detach()
    for c in range(4):  # every output channel keeps its own resolution
        assert (wq[c] - w[c]).norm() / w[c].norm() < 0.5, c


def test_per_channel_explicit_axis_and_bad_axis():
    w = torch.randn(4, 6, 3)
    grid = choose_grid(w, 4, granularity=PerChannel(axis=-1))
    assert grid.axis == 2 and grid.scale.shape == (1, 1, 3)
    with pytest.raises(ValueError, match="axis 3"):
        choose_grid(w, 4, granularity=PerChannel(axis=3))
    with pytest.raises(ValueError, match="'bogus'"):
        choose_grid(w, 4, method="bogus")
    with pytest.raises(TypeError):
        choose_grid(w, 4, granularity="per_channel")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()])
def test_mse_never_worse_than_minmax(symmetric, granularity):
    for bits in range(2, 9):
        for seed in range(6):
            w = _weights(seed + 100 * bits, shape=(5, 4, 3, 3))
            if seed % 2:
                w = torch.distributions.StudentT(2.0).sample(w.shape)  # heavier tails
            g_mm = choose_grid(w, bits, symmetric, granularity, "minmax")
            g_mse = choose_grid(w, bits, symmetric, granularity, "mse", num_candidates=40)
            axis = g_mm.axis
            dims = [d for d in range(w.dim()) if d != axis] if axis is not None else list(range(w.dim()))
            e_mm = (g_mm.fake_quantize(w) - w).pow(2).sum(dim=dims)
            e_mse = (g_mse.fake_quantize(w) - w).pow(2).sum(dim=dims)
            assert torch.all(e_mse <= e_mm), (bits, seed, e_mse, e_mm)


def test_mse_clips_outliers_at_low_bits():
    # one big outlier among many small weights: at 2-3 bits clipping it is the better deal
    w = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 10.0
    g_mm = choose_grid(w, 3, granularity=PerTensor(), method="minmax")
    g_mse = choose_grid(w, 3, granularity=PerTensor(), method="mse")
    assert g_mse.scale.item() < g_mm.scale.item()
    assert (g_mse.fake_quantize(w) - w).pow(2).sum() < (g_mm.fake_quantize(w) - w).pow(2).sum()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_lies_on_grid(symmetric, method, bits):
    w = _weights(7)
    grid = choose_grid(w, bits, symmetric, PerChannel(), method)
    q = grid.quantize(w)
    assert torch.equal(q, q.round())
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    fq = grid.fake_quantize(w)
    assert torch.equal(fq, grid.dequantize(q))
    # idempotent: a point on the grid stays where it is
    assert torch.equal(grid.quantize(fq), q)
    assert torch.equal(grid.fake_quantize(fq), fq)
    # values far outside the range clamp to the ends of the grid
    big = grid.quantize(w * 1000)
    assert big.min() >= grid.qmin and big.max() <= grid.qmax


def test_fake_quantize_is_round_to_nearest():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    grid = choose_grid(w, 4, True, PerChannel(), "minmax")
    fq = grid.fake_quantize(w)
    # no other grid point is closer than the chosen one
    for k in range(grid.qmin, grid.qmax + 1):
        other = grid.dequantize(torch.full_like(w, k))
        assert torch.all((fq - w).abs() <= (other - w).abs() + 1e-6)


def test_grid_to_device_keeps_fields():
    w = torch.randn(4, 3)
    grid = choose_grid(w, 5, False, PerChannel(), "minmax")
    moved = grid.to(torch.device("cpu"))
    assert torch.equal(moved.scale, grid.scale) and torch.equal(moved.zero_point, grid.zero_point)
    assert (moved.qmin, moved.qmax, moved.bits, moved.symmetric, moved.axis) == (0, 31, 5, False, 0)
