"""The GPTQ baseline of the quality benchmark (benchmarks/gptq.py): better than round-to-nearest, on its grid.

Both round to the same grid (the library's ``layer_grid``, as ``round_to_nearest``), so GPTQ must
reconstruct each layer's output on the calibration inputs better and leave every weight an
integer times its scale.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from gptq import gptq  # noqa: E402
from lightning_adaround import AdaRoundConfig, PerChannel, PerGroup, round_to_nearest  # noqa: E402
from lightning_adaround.api import layer_grid  # noqa: E402


def _correlated(*shape: int, seed: int) -> torch.Tensor:
    """Inputs whose features are correlated (a non-diagonal H), where error feedback has something to do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[1], shape[1], generator=g) / shape[1] ** 0.5 + torch.eye(shape[1])
    x = torch.randn(shape, generator=g)
    return torch.einsum("nc...,cd->nd...", x, mix)


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise: one H per channel
        nn.Conv2d(16, 12, 3, stride=2, groups=2), nn.ReLU(),
        nn.Conv2d(12, 24, 1),
    )


def _layer_errors(float_model: nn.Module, rounded: nn.Module, other: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Each layer's squared output error against the float weight, ``rounded``'s and ``other``'s weight, both on
    the inputs the layer gets in ``rounded`` (earlier layers rounded: what GPTQ fitted it to)."""
    errors, hooks = {}, []
    float_layers, other_layers = dict(float_model.named_modules()), dict(other.named_modules())
    for name, layer in rounded.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            def hook(m, args, out, name=name):
                target = float_layers[name](args[0])
                errors[name] = tuple(float((y - target).pow(2).sum()) for y in (out, other_layers[name](args[0])))
            hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        rounded(x)
    for h in hooks:
        h.remove()
    return errors


def _on_grid(float_model: nn.Module, rounded: nn.Module, config: AdaRoundConfig) -> None:
    for name, layer in rounded.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            original = dict(float_model.named_modules())[name]
            grid = layer_grid(name, original, original.weight.detach().float(), config)
            w = layer.weight.detach()
            assert torch.equal(grid.fake_quantize(w), w), name  # rounding again moves nothing
            scale, zero = grid.broadcastable(w.shape)
            integer = w / scale + zero
            assert torch.allclose(integer, integer.round(), atol=1e-4), name
            assert grid.qmin <= float(integer.round().min()) and float(integer.round().max()) <= grid.qmax
            assert not torch.equal(w, original.weight.detach()), name


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(16)], ids=["per-channel", "group-16"])
def test_linear_beats_nearest_on_the_same_grid(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = _correlated(512, 64, seed=1)
    config = AdaRoundConfig(bits=3, granularity=granularity, fold_batchnorm=False, equalize=False)
    nearest, rounded = copy.deepcopy(model), copy.deepcopy(model)
    round_to_nearest(nearest, config)
    assert gptq(rounded, list(x.split(128)), config) == {"0": "gptq"}
    e_gptq, e_nearest = _layer_errors(model, rounded, nearest, x)["0"]
    assert e_gptq < 0.8 * e_nearest, (e_gptq, e_nearest)
    _on_grid(model, rounded, config)


def test_conv_net_beats_nearest_layer_by_layer_and_at_the_output():
    torch.manual_seed(0)
    model = _conv_net()
    x = _correlated(64, 3, 12, 12, seed=2)
    config = AdaRoundConfig(bits=3, fold_batchnorm=False, equalize=False)
    nearest, rounded = copy.deepcopy(model), copy.deepcopy(model)
    round_to_nearest(nearest, config)
    assert set(gptq(rounded, list(x.split(16)), config).values()) == {"gptq"}
    for name, (e_gptq, e_nearest) in _layer_errors(model, rounded, nearest, x).items():
        assert e_gptq < e_nearest, (name, e_gptq, e_nearest)  # the depthwise layer (9 inputs) gains least
    with torch.no_grad():
        out_gptq, out_nearest = (float((m(x) - model(x)).pow(2).mean()) for m in (rounded, nearest))
    assert out_gptq < 0.8 * out_nearest, (out_gptq, out_nearest)
    _on_grid(model, rounded, config)


def test_blocks_change_only_the_time():
    """``blocks=`` reruns a block from its kept inputs instead of the whole model: the same weights."""
    model = nn.Sequential(_conv_net(), nn.ReLU(), nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU()), nn.Flatten())
    x = _correlated(32, 3, 12, 12, seed=3)
    config = AdaRoundConfig(bits=4, fold_batchnorm=False, equalize=False)
    plain, blocked = copy.deepcopy(model), copy.deepcopy(model)
    gptq(plain, list(x.split(8)), config)
    gptq(blocked, list(x.split(8)), config, blocks=["0", "2"])
    for a, b in zip(plain.parameters(), blocked.parameters()):
        assert torch.equal(a, b)
