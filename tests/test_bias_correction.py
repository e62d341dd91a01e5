"""Bias correction: each rounded layer's mean output error on the calibration data moves into its bias."""

import copy
import csv
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.data.calibration import SampleLayout
from lightning_adaround.io.checkpoint import run_fingerprint

FAST = dict(bits=3, iterations=30, batch_size=16)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),  # no bias: the shift is only reported
        nn.Flatten(), nn.Linear(8 * 36, 10),
    ).eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 6, 6, generator=g) + 0.5 for _ in range(n)]  # a non-zero mean input


def _layer_means(model, names, batches):
    """Per layer: its mean output per channel over the calibration data."""
    outputs = {name: [] for name in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: outputs[n].append(out.movedim(-1 if out.dim() == 2 else 1, 0).flatten(1)))
        for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(o, dim=1).double().mean(1) for n, o in outputs.items()}


def _mean_errors(model, names, batches):
    """Per layer: the largest |mean output of the float model - mean output of ``model``| over channels."""
    reference, found = _layer_means(_model(), names, batches), _layer_means(model, names, batches)
    return {n: float((reference[n] - found[n]).abs().max()) for n in names}


def test_mean_output_error_is_removed_and_layers_without_bias_only_report():
    batches = _batches()
    plain_model, model = _model(), _model()
    plain = adaround(plain_model, batches, AdaRoundConfig(**FAST))
    corrected = adaround(model, batches, AdaRoundConfig(bias_correction=True, **FAST))
    for name in plain.layers:  # the same rounding: bias correction only touches biases
        assert torch.equal(plain.layers[name].integer_weight, corrected.layers[name].integer_weight)
    before = _mean_errors(plain_model, list(plain.layers), batches)
    after = _mean_errors(model, list(plain.layers), batches)
    for name in ("0", "5"):
        assert corrected.layers[name].bias_corrected
        assert after[name] < 1e-4 * before[name] + 1e-6, (name, before[name], after[name])
        shift = corrected.layers[name].bias_shift
        assert torch.allclose(model.get_submodule(name).bias, _model().get_submodule(name).bias + shift, atol=1e-6)
    no_bias = corrected.layers["2"]
    assert model[2].bias is None and not no_bias.bias_corrected and no_bias.bias_shift_max > 0
    assert list(model.state_dict()) == list(_model().state_dict())
    table = corrected.summary_table()
    assert "bias shift" in table and "(no bias)" in table
    assert "bias shift" not in plain.summary_table()
    # the end-to-end mean output of the network moves towards the float one
    reference = _model()
    with torch.no_grad():
        float_mean = torch.cat([reference(x) for x in batches]).mean(0)
        plain_gap = (torch.cat([plain_model(x) for x in batches]).mean(0) - float_mean).abs().max()
        corrected_gap = (torch.cat([model(x) for x in batches]).mean(0) - float_mean).abs().max()
    assert corrected_gap < plain_gap


def test_off_leaves_biases_bit_identical_and_records_nothing():
    model, original = _model(), _model()
    result = adaround(model, _batches(), AdaRoundConfig(**FAST))
    assert torch.equal(model[0].bias, original[0].bias) and torch.equal(model[5].bias, original[5].bias)
    assert all(r.bias_shift is None and not r.bias_corrected for r in result.layers.values())


def _fail_on_fifth_layer_pass(monkeypatch):
    """Make bias correction's fifth per-layer statistics pass raise."""
    import lightning_adaround.model.bias_correction as correction

    real = correction._output_sums
    calls = []

    def fails(layer, *args):
        calls.append(layer)
        if len(calls) == 5:
            raise RuntimeError("stop in the middle of bias correction")
        return real(layer, *args)

    monkeypatch.setattr(correction, "_output_sums", fails)


def test_failure_during_correction_restores_weights_and_biases(monkeypatch):
    model = _model()
    original = copy.deepcopy(model.state_dict())
    _fail_on_fifth_layer_pass(monkeypatch)  # after the float pass (3 layers); the first layer's bias is corrected by now
    with pytest.raises(RuntimeError, match="stop in the middle"):
        adaround(model, _batches(), AdaRoundConfig(bias_correction=True, **FAST))
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_checkpoint_resume_corrects_again_and_fingerprints_the_option(tmp_path):
    batches = _batches()
    config = AdaRoundConfig(bias_correction=True, **FAST)
    first, again = _model(), _model()
    result = adaround(first, batches, config, checkpoint_dir=tmp_path / "ckpt")
    resumed = adaround(again, batches, config, checkpoint_dir=tmp_path / "ckpt")
    assert resumed.restored == list(result.layers)
    for name in ("0", "5"):
        assert torch.equal(first.get_submodule(name).bias, again.get_submodule(name).bias)
        assert torch.equal(result.layers[name].bias_shift, resumed.layers[name].bias_shift)
    model = _model()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    on = run_fingerprint(model, layers, batches, config, {})
    off = run_fingerprint(model, layers, batches, AdaRoundConfig(**FAST), {})
    assert on["settings"]["bias_correction"] is True and off["settings"]["bias_correction"] is False
    with pytest.raises(ValueError, match="bias_correction is True there and False here"):
        adaround(_model(), batches, AdaRoundConfig(**FAST), checkpoint_dir=tmp_path / "ckpt")


@pytest.mark.parametrize("value", ["yes", "on", 1, None])
def test_bad_value_is_refused(value):
    with pytest.raises(ValueError, match=rf"bias_correction={value!r} must be True, False or 'auto'"):
        AdaRoundConfig(bias_correction=value)


def test_through_the_lightning_callback(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaround import AdaRoundCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self.log("out", self(batch[0]).abs().mean())

    data = DataLoader(TensorDataset(torch.cat(_batches())), batch_size=16)
    module = Module()
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    config = AdaRoundConfig(bias_correction=True, iterations=30, bits=3, batch_size=16)
    callback = AdaRoundCallback(config=config, run_on="validate", calibration_data=data, report=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, dataloaders=data, verbose=False)
    result = callback.result
    assert result.layers["net.0"].bias_corrected and not result.layers["net.2"].bias_corrected
    assert torch.allclose(module.net[0].bias, _model()[0].bias + result.layers["net.0"].bias_shift, atol=1e-6)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("adaround/net.2/bias_shift") for r in rows)
    # the callback's state (and so a Lightning checkpoint) carries the shifts
    state = callback.state_dict()
    fresh = AdaRoundCallback()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.result.layers["net.0"].bias_shift, result.layers["net.0"].bias_shift)


def _bn_model():
    """Bias-less convolutions each followed by a BatchNorm (as in ResNets and EfficientNets), not folded."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 36, 10),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_a_bias_less_layer_followed_by_a_batchnorm_is_corrected_through_its_running_mean():
    batches = _batches()
    model = _bn_model()
    keys = list(model.state_dict())
    config = AdaRoundConfig(bias_correction=True, loss_form="minibatch", fold_batchnorm=False, **FAST)
    result = adaround(model, batches, config)
    assert list(model.state_dict()) == keys and model[0].bias is None  # no new parameter
    assert result.layers["0"].bias_corrected and result.layers["3"].bias_corrected
    shift = result.layers["0"].bias_shift
    assert torch.allclose(model[1].running_mean, _bn_model()[1].running_mean - shift, atol=1e-6)
    # the first layer sees the same input in both models: after correction its BatchNorm's mean output matches
    float_means = _layer_means(_bn_model(), ["1"], batches)["1"]
    plain = _bn_model()
    adaround(plain, batches, AdaRoundConfig(loss_form="minibatch", fold_batchnorm=False, **FAST))
    error_before = float((float_means - _layer_means(plain, ["1"], batches)["1"]).abs().max())
    error_after = float((float_means - _layer_means(model, ["1"], batches)["1"]).abs().max())
    assert error_before > 1e-3 and error_after < 1e-5 * max(1.0, error_before * 100)


def test_failure_during_correction_restores_the_batchnorm_running_means(monkeypatch):
    model = _bn_model()
    original = copy.deepcopy(model.state_dict())
    _fail_on_fifth_layer_pass(monkeypatch)  # float pass done (3 layers), the first layer's BatchNorm already moved
    with pytest.raises(RuntimeError, match="stop in the middle"):
        adaround(model, _batches(), AdaRoundConfig(bias_correction=True, **FAST))
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


# ------------------------------------------------------------------ bias_correction="auto"

NOTE = re.compile(r"bias corrected on (\d+)/(\d+) channels \(held-out squared mean error (\S+) -> (\S+)\)")


def _held_out_mask(batches, fraction, seed=0):
    """The samples a run with ``holdout_fraction=fraction`` and ``seed`` holds out (drawn first from the seed)."""
    return torch.cat(SampleLayout.of(batches).held_out(fraction, torch.Generator().manual_seed(seed)))


def test_auto_leaves_a_bias_alone_where_the_held_out_samples_disagree():
    """Held-out inputs with the opposite mean: the training shift would double their mean error."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 4)).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g) * 0.1 + torch.randn(6, generator=g)
    batches = [x[i:i + 16] for i in range(0, 64, 16)]
    held = _held_out_mask(batches, 0.25)
    x[held] = -x[held]  # in place: the batches are views
    config = dict(bits=2, iterations=30, batch_size=16, holdout_fraction=0.25)
    always, auto = copy.deepcopy(layer), copy.deepcopy(layer)
    adaround(always, batches, AdaRoundConfig(bias_correction=True, **config))
    result = adaround(auto, batches, AdaRoundConfig(bias_correction="auto", **config))
    assert not torch.allclose(always[0].bias, layer[0].bias, atol=1e-4)  # True moves it
    assert torch.equal(auto[0].bias, layer[0].bias)  # "auto" leaves it
    assert "bias left alone: no channel's held-out error fell" in result.layers["0"].note
    assert not result.layers["0"].bias_shift.any()


def test_auto_keeps_the_channels_where_the_held_out_error_falls_by_the_amount_the_note_says():
    batches = _batches(8)
    fraction = 0.25
    plain_model, model = _model(), _model()
    adaround(plain_model, batches, AdaRoundConfig(holdout_fraction=fraction, **FAST))
    result = adaround(model, batches, AdaRoundConfig(bias_correction="auto", holdout_fraction=fraction, **FAST))
    for name in ("0", "5"):
        found = NOTE.search(result.layers[name].note)
        assert found, result.layers[name].note
        kept, channels, before, after = int(found[1]), int(found[2]), float(found[3]), float(found[4])
        shift = result.layers[name].bias_shift
        assert channels == shift.numel() and kept == int((shift != 0).sum()) and 0 < kept
        assert after <= before
        assert torch.allclose(model.get_submodule(name).bias, _model().get_submodule(name).bias + shift, atol=1e-6)
    assert "bias correction would keep" in result.layers["2"].note and "only reported" in result.layers["2"].note
    assert "bias corrected on" in result.summary_table()
    # the first layer sees the same input in every model: its held-out output MSE falls by exactly
    # mean_c(shift^2 - 2 * shift * m), m the held-out mean error, and never rises
    x = torch.cat(batches)[_held_out_mask(batches, fraction)]
    with torch.no_grad():
        reference, plain, corrected = (m[0](x).movedim(1, 0).flatten(1) for m in (_model(), plain_model, model))
    shift = result.layers["0"].bias_shift[:, None]
    m = (reference - plain).mean(1, keepdim=True)
    mse_plain, mse_auto = float(((reference - plain) ** 2).mean()), float(((reference - corrected) ** 2).mean())
    assert mse_auto <= mse_plain
    assert mse_auto - mse_plain == pytest.approx(float((shift ** 2 - 2 * shift * m).mean()), rel=1e-3, abs=1e-9)


def test_auto_with_nothing_held_out_is_bias_correction_true_and_says_so():
    batches = _batches()
    always, auto = _model(), _model()
    adaround(always, batches, AdaRoundConfig(bias_correction=True, holdout_fraction=0.0, **FAST))
    with pytest.warns(UserWarning, match="bias_correction='auto' found no held-out rows for 3 layer"):
        result = adaround(auto, batches, AdaRoundConfig(bias_correction="auto", holdout_fraction=0.0, **FAST))
    for name in ("0", "5"):
        assert torch.equal(always.get_submodule(name).bias, auto.get_submodule(name).bias)
        assert "bias corrected on every channel, not judged: no held-out rows" in result.layers[name].note


def test_auto_on_the_digits_cnn_beats_off_and_matches_always_on(digits_cnn, digits):
    """W3 per-tensor, 512 calibration images, a quarter held out: the logits' MSE to the float model
    on the held-out images and on the test set."""
    from lightning_adaround import PerTensor

    x = digits["train"].tensors[0][:512]
    batches = list(x.split(64))
    fraction = 0.25
    held = x[_held_out_mask(batches, fraction)]
    test = digits["test"].tensors[0]
    with torch.no_grad():
        references = [digits_cnn(held), digits_cnn(test)]
    errors, results = {}, {}
    for mode in (False, True, "auto"):
        model = copy.deepcopy(digits_cnn)
        config = AdaRoundConfig(bits=3, granularity=PerTensor(), iterations=100, batch_size=32,
                                holdout_fraction=fraction, bias_correction=mode)
        results[mode] = adaround(model, batches, config)
        with torch.no_grad():
            errors[mode] = [float(((model(d) - r) ** 2).mean()) for d, r in zip((held, test), references)]
    for i in range(2):  # held-out images, test set
        assert errors["auto"][i] < 0.7 * errors[False][i], errors
        # "auto" estimates on 3/4 of the samples and drops a few channels: as good as True within 1%
        assert errors["auto"][i] <= 1.01 * errors[True][i], errors
    assert all(NOTE.search(r.note) for r in results["auto"].layers.values()), results["auto"].summary_table()
