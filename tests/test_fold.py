"""BatchNorm folding: same outputs, same state_dict keys, every unfolded BatchNorm named."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround, fold_batchnorm
from lightning_adaround.model.fold import find_batchnorm_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _randomize_statistics(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1, residual add. Not a Sequential."""

    def __init__(self, channels=8, expand=3):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.depthwise(h)))
        return x + self.bn3(self.project(h))


class SmallMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(InvertedResidual(), InvertedResidual())
        self.head = nn.Linear(8, 4)
        self.head_bn = nn.BatchNorm1d(4, affine=False)

    def forward(self, x):
        x = self.blocks(nn.functional.relu6(self.stem_bn(self.stem(x))))
        return self.head_bn(self.head(x.mean((2, 3))))


def digits_cnn():
    from digits import make_cnn

    torch.manual_seed(0)
    return make_cnn()


def _images(shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


CASES = {
    "digits CNN (Sequential)": (digits_cnn, (16, 1, 8, 8)),
    "inverted residuals (torch.fx)": (SmallMobileNet, (16, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folding_keeps_outputs_and_state_dict_keys(case):
    make, shape = CASES[case]
    model = _randomize_statistics(make())
    x = _images(shape)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    with _no_warning():
        folded = fold_batchnorm(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(bn for _, bn in folded) == sorted(bns)  # every BatchNorm here has a feeding layer
    with torch.no_grad():
        after = model(x)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for _, bn in folded:  # only an exact shift is left
        module = model.get_submodule(bn)
        assert torch.all(module.running_var + module.eps == 1.0)
        if module.affine:
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_pairs_found_in_the_graph_and_in_sequentials():
    assert find_batchnorm_pairs(SmallMobileNet())[:4] == [
        ("stem", "stem_bn"), ("blocks.0.expand", "blocks.0.bn1"), ("blocks.0.depthwise", "blocks.0.bn2"),
        ("blocks.0.project", "blocks.0.bn3"),
    ]
    assert ("0", "1") in find_batchnorm_pairs(digits_cnn())


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the Sequential inside is still found."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.side = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            x = self.side(x)
        return self.body(x)


def test_untraceable_model_falls_back_to_sequentials_and_names_the_rest():
    model = _randomize_statistics(_Untraceable())
    with pytest.warns(UserWarning, match="BatchNorm 'side' is not folded: no Linear/convolution feeds it directly"):
        assert fold_batchnorm(model) == [("body.0", "body.1")]


def test_unfoldable_pairs_warn_with_the_reason_and_bad_names_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"BatchNorm '1' is not folded into '0': it keeps no running statistics"):
        assert fold_batchnorm(model) == []
    with pytest.raises(ValueError, match="fold_batchnorm pairs name 'conv', which is not a module of Sequential"):
        fold_batchnorm(model, pairs=[("conv", "1")])
    with pytest.raises(ValueError, match="fold_batchnorm pairs '0' as a BatchNorm, but it is a Conv2d"):
        fold_batchnorm(model, pairs=[("1", "0")])


def test_a_parametrized_layer_left_out_of_rounding_is_not_folded_into():
    """Folding into a computed weight would change a recomputed copy while the BatchNorm became a unit shift."""
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(
        torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3),
    ))
    x = _images((8, 3, 8, 8))
    with torch.no_grad():
        before = model[:3](x)
    with pytest.warns(UserWarning, match=r"BatchNorm '1' is not folded into '0': the layer's weight is computed"):
        result = adaround(model, [x], AdaRoundConfig(iterations=5, exclude=["0"]))
    assert list(result.layers) == ["3"] and result.folded == []
    with torch.no_grad():
        assert torch.equal(model[:3](x), before)  # the left-out layer and its BatchNorm as they were


def test_folded_model_rounds_with_the_grid_of_the_weights_a_runtime_uses():
    model = _randomize_statistics(SmallMobileNet())
    batches = [_images((16, 3, 8, 8)) for _ in range(2)]
    with torch.no_grad():
        reference = model(batches[0])
    fold_batchnorm(model)
    result = adaround(model, batches, AdaRoundConfig(bits=4, iterations=50))
    assert "blocks.0.depthwise" in result.layers
    with torch.no_grad():
        rounded = model(batches[0])
    assert torch.nn.functional.cosine_similarity(rounded.flatten(), reference.flatten(), dim=0) > 0.9


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _trainer(callback):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback])


def _module(make_net=lambda: _randomize_statistics(SmallMobileNet())):
    """A LightningModule around ``make_net()`` whose validation logs its mean output."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self.log("out", self(batch[0]).abs().mean())

    return Module()


def test_callback_folds_by_default_and_restores_on_failure():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaround import AdaRoundCallback

    data = DataLoader(TensorDataset(_images((32, 3, 8, 8))), batch_size=16)
    module = _module()
    original = {k: v.clone() for k, v in module.state_dict().items()}

    def failing(model, batch):
        if model.net.blocks[1].expand.weight.abs().sum() != original["net.blocks.1.expand.weight"].abs().sum():
            raise RuntimeError("stop after folding")  # the weights seen here are already folded
        return model(batch[0])

    fast = AdaRoundConfig(iterations=10)
    callback = AdaRoundCallback(config=fast, run_on="validate", calibration_data=data, forward_fn=failing,
                                verbose=False, report=False)
    with pytest.raises(ValueError, match="stop after folding"):
        _trainer(callback).validate(module, dataloaders=data, verbose=False)
    for key, value in module.state_dict().items():  # weights and BatchNorm statistics as given
        assert torch.equal(value, original[key]), key

    callback = AdaRoundCallback(config=fast, run_on="validate", calibration_data=data, verbose=False, report=False)
    _trainer(callback).validate(module, dataloaders=data, verbose=False)
    assert list(module.state_dict()) == list(original)
    assert torch.all(module.net.blocks[0].bn2.running_var + module.net.blocks[0].bn2.eps == 1.0)
    unfolded = _module()
    _trainer(AdaRoundCallback(config=AdaRoundConfig(iterations=10, fold_batchnorm=False), run_on="validate",
                              calibration_data=data, verbose=False, report=False)).validate(
        unfolded, dataloaders=data, verbose=False)
    assert torch.equal(unfolded.net.blocks[0].bn2.running_var, original["net.blocks.0.bn2.running_var"])
