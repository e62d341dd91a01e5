"""bfloat16 / float16 models: rounded in float32, written back in the model's own dtype.

The integer weights and float32 scales are the truth; a half-precision weight is their
rounding to the model's dtype (``scale * q`` needs up to ``bits`` more significant bits than
bfloat16's 8), and that is exactly what is written back and what ``load_quantized`` restores.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import accuracy
from lightning_adaround import AdaRoundConfig, adaround, export_quantized, load_quantized

HALF = [torch.bfloat16, torch.float16]
FORMS = {
    "minibatch": dict(loss_form="minibatch"),
    "moments": dict(loss_form="moments"),  # past the warm start: the regularized step runs too
    "block": dict(reconstruction="block", blocks=["[0:6]"]),
    "output-scales": dict(scale_method="output"),
    "bias-correction": dict(bias_correction=True),
}


def _dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("form", list(FORMS))
def test_half_precision_model_rounds_on_its_grid_in_every_form(digits_cnn, digits, dtype, form):
    model = digits_cnn.to(dtype)
    before = _dtypes(model)
    x = digits["train"].tensors[0][:256].to(dtype)
    batches = list(x.split(64))
    result = adaround(model, batches, AdaRoundConfig(bits=4, iterations=120, **FORMS[form]))

    assert len(result.layers) == 5
    assert _dtypes(model) == before  # every parameter and buffer keeps the model's dtype
    for name, layer in result.layers.items():
        weight = model.get_submodule(name).weight
        truth = layer.dequantized_weight()  # float32: integer weights times float32 scales
        assert torch.equal(weight, truth.to(dtype)), name
        # the half weight is the nearest representable value of the grid point
        spacing = torch.finfo(dtype).eps * truth.abs()
        assert bool(((weight.float() - truth).abs() <= spacing / 2 + torch.finfo(dtype).tiny).all()), name
        assert layer.integer_weight.min() >= layer.qmin and layer.integer_weight.max() <= layer.qmax
    x_test = digits["test"].tensors[0].to(dtype)
    y_test = digits["test"].tensors[1]
    with torch.no_grad():
        rounded_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert rounded_accuracy >= accuracy(copy.deepcopy(digits_cnn).float(), digits["test"]) - 0.03


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_rounding_matches_float32_in_quality(digits_cnn, digits, dtype):
    """The same model in bfloat16/float16 rounds as well as in float32: held-out error within 10%
    over the layers (geometric mean), 30% per layer. With 25 held-out samples the per-layer ratio
    of bfloat16 to float32 ranges 0.8-1.2 over seeds (measured, seeds 0-3: the half model's own
    targets carry its rounded activations)."""
    x = digits["train"].tensors[0][:256]
    config = AdaRoundConfig(bits=3, iterations=300)
    full = adaround(copy.deepcopy(digits_cnn), list(x.split(64)), config)
    half = adaround(copy.deepcopy(digits_cnn).to(dtype), list(x.to(dtype).split(64)), config)
    ratios = []
    for name, layer in half.layers.items():
        ratios.append(layer.adaround_mse / full.layers[name].adaround_mse)
        assert layer.adaround_mse <= 1.3 * full.layers[name].adaround_mse + 1e-6, name
        assert layer.adaround_mse <= layer.nearest_mse * 1.0001, name
    assert torch.tensor(ratios).log().mean().exp() <= 1.1, ratios


def test_half_precision_export_restores_the_same_half_weights(digits_cnn, digits, tmp_path):
    model = digits_cnn.to(torch.bfloat16)
    x = digits["train"].tensors[0][:128].to(torch.bfloat16)
    result = adaround(model, [x], AdaRoundConfig(bits=4, iterations=50))
    export_quantized(model, result, tmp_path / "q.pt")
    fresh = copy.deepcopy(model)
    for name in result.layers:
        fresh.get_submodule(name).weight.data.zero_()
    loaded = load_quantized(fresh, tmp_path / "q.pt")
    for name, layer in loaded.layers.items():
        assert fresh.get_submodule(name).weight.dtype == torch.bfloat16
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
        assert torch.equal(layer.integer_weight, result.layers[name].integer_weight)
        assert torch.equal(layer.scale, result.layers[name].scale) and layer.scale.dtype == torch.float32
