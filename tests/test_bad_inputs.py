"""Bad input sweep: random weights, shapes and grid settings either give a valid grid or a clear error.

The property test draws weights with zeros, constant channels, all-zero tensors, huge (up to
float32's maximum), tiny and subnormal magnitudes, NaN and Inf, over random shapes, bits,
symmetric/affine grids and per-tensor/per-channel axes. ``adaround`` itself must refuse a bad
weight before any calibration work starts, naming the layer.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, adaround, round_to_nearest

from lightning_adaround.grid.quant import LARGEST_WEIGHT, PerChannel, PerTensor, choose_grid
from lightning_adaround.grid.rounding import RoundingVariable

FLOAT32_MAX = float(np.finfo(np.float32).max)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-40, -1e-45, 1e30, -1e30, 1e37, LARGEST_WEIGHT, -FLOAT32_MAX]
MAGNITUDES = [1.0, 1e30, 1e-30, 1e-40, 1e-45, 0.0]

# Examples tried by the last sweep, per outcome (read by test_sweep_counts_are_reported).
SWEEP_COUNTS: collections.Counter = collections.Counter()


@st.composite
def grid_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    elements = st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from(SPECIAL),
    )
    kind = draw(st.sampled_from(["random", "scaled", "zeros", "constant_channel", "empty"]))
    if kind == "random":
        values = draw(hnp.arrays(np.float32, shape, elements=elements))
    elif kind == "scaled":  # a normal-looking weight at an extreme magnitude, maybe with holes
        seed = draw(st.integers(0, 2**16))
        base = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        values = (base * np.float32(draw(st.sampled_from(MAGNITUDES)))).astype(np.float32)
        if draw(st.booleans()):
            values.reshape(-1)[:: draw(st.integers(2, 4))] = 0.0
    elif kind == "zeros":
        values = np.zeros(shape, np.float32)
    elif kind == "constant_channel":
        values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-3, 3, width=32)))
        values[0] = draw(st.sampled_from([0.0, 2.5, -1e-40, 1e30]))
    else:  # a dim of size zero
        shape = tuple(0 if i == 0 else s for i, s in enumerate(shape))
        values = np.zeros(shape, np.float32)
    if kind != "empty" and draw(st.integers(0, 4)) == 0:  # poison one value
        values.reshape(-1)[draw(st.integers(0, values.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    ndim = len(shape)
    granularity = draw(st.one_of(
        st.just(PerTensor()),
        st.just(PerChannel()),
        st.builds(PerChannel, st.integers(-ndim - 1, ndim)),  # out-of-range axes included
    ))
    return {
        "weight": torch.from_numpy(values.copy()),
        "bits": draw(st.sampled_from([1, *range(2, 9), *range(2, 9), *range(2, 9), 9])),  # 1, 9: out of range
        "symmetric": draw(st.booleans()),
        "granularity": granularity,
        "method": draw(st.sampled_from(["minmax", "mse"])),
        "kind": kind,
    }


def _expected_refusal(case) -> str | None:
    """The reason the grid must be refused, or None when it must be valid."""
    w, g = case["weight"], case["granularity"]
    if not 2 <= case["bits"] <= 8:
        return "bits"
    if isinstance(g, PerChannel) and g.axis is not None and not -w.dim() <= g.axis < w.dim():
        return "axis"
    if w.numel() == 0:
        return "empty"
    if not torch.isfinite(w).all():
        return "nonfinite"
    if w.abs().max() > LARGEST_WEIGHT:
        return "too large"
    return None


def _check_valid_grid(w, grid, case):
    assert grid.bits == case["bits"] and grid.symmetric == case["symmetric"]
    assert torch.isfinite(grid.scale).all() and (grid.scale > 0).all(), grid.scale
    zp = grid.zero_point
    assert torch.equal(zp, zp.round()) and (zp >= grid.qmin).all() and (zp <= grid.qmax).all()
    if grid.symmetric:
        assert (zp == 0).all()
    q = grid.quantize(w)
    assert torch.equal(q, q.round()) and q.min() >= grid.qmin and q.max() <= grid.qmax
    fq = grid.fake_quantize(w)
    lo = grid.dequantize(torch.full_like(zp, grid.qmin))
    hi = grid.dequantize(torch.full_like(zp, grid.qmax))
    assert torch.isfinite(fq).all() and torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert (fq >= lo).all() and (fq <= hi).all()
    assert torch.equal(grid.fake_quantize(torch.zeros_like(w)), torch.zeros_like(w))  # zero is on the grid
    # the rounding variable starts finite and its hard weight lies on the same grid
    rounding = RoundingVariable(w, grid)
    assert torch.isfinite(rounding.v).all()
    hard = rounding.hard_weight()
    assert torch.isfinite(hard).all() and torch.equal(grid.fake_quantize(hard), hard)
    if case["method"] == "mse":  # the search never does worse than covering the whole range
        minmax = choose_grid(w, case["bits"], case["symmetric"], case["granularity"], "minmax")
        dims = [d for d in range(w.dim()) if d != grid.axis] if grid.axis is not None else list(range(w.dim()))
        err = (grid.fake_quantize(w).double() - w.double()).pow(2).sum(dim=dims)
        err_minmax = (minmax.fake_quantize(w).double() - w.double()).pow(2).sum(dim=dims)
        assert (err <= err_minmax * (1 + 1e-5) + 1e-300).all(), (err, err_minmax)


REFUSAL_WORDS = {
    "bits": "bits=", "axis": "axis", "empty": "empty", "nonfinite": "NaN or Inf", "too large": "too large",
}


@pytest.fixture(scope="module")
def sweep_counts():
    SWEEP_COUNTS.clear()

    @settings(
        max_examples=250, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=grid_cases())
    def sweep(case):
        w = case["weight"]
        refusal = _expected_refusal(case)
        try:
            grid = choose_grid(w, case["bits"], case["symmetric"], case["granularity"], case["method"])
        except (ValueError, TypeError) as err:
            assert refusal is not None, f"refused a valid weight: {err}"
            assert REFUSAL_WORDS[refusal] in str(err), (refusal, str(err))
            SWEEP_COUNTS[f"refused: {refusal}"] += 1
            return
        assert refusal is None, f"expected a refusal ({refusal}), got a grid"
        _check_valid_grid(w, grid, case)
        SWEEP_COUNTS[f"valid: {case['kind']}"] += 1

    sweep()
    return dict(SWEEP_COUNTS)


def test_grid_sweep_valid_grid_or_clear_error(sweep_counts):
    assert sum(sweep_counts.values()) >= 200
    assert sum(v for k, v in sweep_counts.items() if k.startswith("valid")) >= 50
    for reason in REFUSAL_WORDS:
        assert sweep_counts.get(f"refused: {reason}", 0) >= 1, (reason, sweep_counts)


def test_sweep_counts_are_reported(sweep_counts, capsys):
    with capsys.disabled():
        total = sum(sweep_counts.values())
        print(f"\ngrid sweep: {total} examples tried: {dict(sorted(sweep_counts.items()))}")


# ---------------------------------------------------------------- adaround refuses before any work


class _Counting(AdaRoundObserver):
    def __init__(self):
        self.layer_starts = 0

    def on_layer_start(self, name, index, iterations):
        self.layer_starts += 1


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("bad, words", [
    (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (-float("inf"), "NaN or Inf"),
    (1e38, "too large"),
])
@pytest.mark.parametrize("where", [0, 2])
def test_adaround_refuses_a_bad_weight_before_work(bad, words, where):
    model = _model()
    with torch.no_grad():
        model[where].weight[1, 2] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    observer = _Counting()
    with pytest.raises(ValueError) as info:
        adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5), observer=observer)
    message = str(info.value)
    assert words in message and f"layer {str(where)!r}" in message and f"exclude=[{str(where)!r}]" in message
    assert observer.layer_starts == 0
    for key, value in model.state_dict().items():  # untouched, the bad value included
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key
    with pytest.raises(ValueError, match=words):
        round_to_nearest(model)


def test_adaround_refuses_an_empty_weight():
    model = nn.Sequential(nn.Linear(0, 3))
    with pytest.raises(ValueError, match="empty"):
        adaround(model, [torch.randn(4, 0)], AdaRoundConfig(iterations=5))


@pytest.mark.parametrize("loss_form, words", [("minibatch", "output of layer .0. contains NaN or Inf"), ("moments", "became nan")])
def test_overflowing_reconstruction_error_is_refused(loss_form, words):
    """Finite weights whose products overflow float32: refused at the first check that sees it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e30)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=words):
        adaround(model, [torch.randn(8, 8) * 1e10], AdaRoundConfig(iterations=5, loss_form=loss_form))
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-40, 1e20])
def test_tiny_and_huge_but_finite_weights_round(magnitude):
    model = _model()
    with torch.no_grad():
        model[0].weight.mul_(magnitude)
    result = adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5, loss_form="minibatch"))
    for name, layer in result.layers.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.isfinite(weight).all()
        assert torch.equal(weight, layer.dequantized_weight())


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _parametrize(module):
    torch.nn.utils.parametrize.register_parametrization(module, "weight", _Doubled())
    return module


PARAMETRIZED = "torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule('2'), 'weight')"


@pytest.mark.parametrize("kind, wrap, fix", [
    ("weight_norm", torch.nn.utils.parametrizations.weight_norm, PARAMETRIZED),
    ("spectral_norm", torch.nn.utils.parametrizations.spectral_norm, PARAMETRIZED),
    ("old weight_norm", torch.nn.utils.weight_norm, "torch.nn.utils.remove_weight_norm(model.get_submodule('2'))"),
    ("register_parametrization", _parametrize, PARAMETRIZED),
])
def test_a_parametrized_weight_is_refused_before_work(kind, wrap, fix):
    """A computed weight would be selected and reported rounded, but the write-back would not reach the layer."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old torch.nn.utils.weight_norm is deprecated
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), wrap(nn.Linear(8, 3))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    observer = _Counting()
    with pytest.raises(ValueError) as info:
        adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5), observer=observer)
    message = str(info.value)
    assert "layer '2' is computed" in message and fix in message and "exclude=['2']" in message, message
    assert observer.layer_starts == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="layer '2' is computed from other tensors"):
        round_to_nearest(model)
    result = adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5, exclude=["2"]))  # the way out
    assert list(result.layers) == ["0"]


def test_old_spectral_norm_is_refused_with_its_own_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), torch.nn.utils.spectral_norm(nn.Linear(8, 3))).eval()
    with pytest.raises(ValueError, match=r"with torch.nn.utils.remove_spectral_norm\(model.get_submodule\('2'\)\)"):
        adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5))
    torch.nn.utils.remove_spectral_norm(model[2])  # baked in: now it rounds
    result = adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5))
    assert torch.equal(model[2].weight, result.layers["2"].dequantized_weight())


def test_an_exclude_pattern_that_matches_no_layer_warns():
    model = _model()
    with pytest.warns(UserWarning, match=r"exclude patterns \['fc\*'\] match none"):
        adaround(model, [torch.randn(16, 4)], AdaRoundConfig(iterations=5, exclude=("fc*", "0")))


def test_too_few_samples_to_hold_any_out_warns_that_the_held_out_error_is_a_training_error():
    with pytest.warns(UserWarning, match="none can be held out at holdout_fraction=0.1"):
        result = adaround(_model(), [torch.randn(3, 4)], AdaRoundConfig(iterations=5))
    assert all(layer.eval_samples == layer.num_samples == 3 for layer in result.layers.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        adaround(_model(), [torch.randn(16, 4)], AdaRoundConfig(iterations=5))  # 1 of 16 held out: no warning
