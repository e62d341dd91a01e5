"""On any failure the user's model is as it was: weights, requires_grad, per-module training mode, device, .grad."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, PerTensor, adaround, round_to_nearest


class _Boom(Exception):
    pass


class _FailAt(AdaRoundObserver):
    def __init__(self, hook: str, layer: int, error: type[BaseException]):
        self.hook, self.layer, self.error = hook, layer, error
        self.ends = 0

    def on_step(self, name, step, metrics):
        if self.hook == "step" and self.ends == self.layer and step == 3:
            raise self.error("injected")

    def on_layer_end(self, result):
        self.ends += 1
        if self.hook == "layer_end" and self.ends == self.layer + 1:
            raise self.error("injected")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
        nn.Linear(8, 3),
    )


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "device": {n: p.device for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "ids": [id(p) for p in model.parameters()],
    }


def _assert_same(model, before):
    after = _snapshot(model)
    for key in ("requires_grad", "training", "device", "ids"):
        assert after[key] == before[key], key
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    for name, grad in before["grad"].items():
        assert (after["grad"][name] is None) == (grad is None), name
        if grad is not None:
            assert torch.equal(after["grad"][name], grad), name


def _prepare(model):
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model: the mode is per module
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    model[6].weight.grad = torch.ones_like(model[6].weight)  # a gradient the user had before
    return model


@pytest.mark.parametrize("hook, layer, error", [
    ("step", 0, RuntimeError), ("step", 1, KeyboardInterrupt), ("layer_end", 1, _Boom), ("step", 2, _Boom),
])
@pytest.mark.parametrize("loss_form", ["minibatch", "auto"])
def test_failure_leaves_the_model_as_it_was(hook, layer, error, loss_form, tmp_path):
    model = _prepare(_model())
    before = _snapshot(model)
    data = [torch.randn(8, 2, 6, 6) for _ in range(2)]
    config = AdaRoundConfig(iterations=10, batch_size=8, loss_form=loss_form, log_every_n_steps=1)
    with pytest.raises(error):
        adaround(model, data, config, observer=_FailAt(hook, layer, error))
    _assert_same(model, before)
    with pytest.raises(error):  # the same with a checkpoint folder: the finished layers are on disk only
        adaround(model, data, config, observer=_FailAt(hook, layer, error), checkpoint_dir=tmp_path / "ckpt")
    _assert_same(model, before)


def test_success_keeps_flags_modes_and_gradients():
    model = _prepare(_model())
    before = _snapshot(model)
    result = adaround(model, [torch.randn(8, 2, 6, 6)], AdaRoundConfig(iterations=10, loss_form="minibatch"))
    after = _snapshot(model)
    for key in ("requires_grad", "training", "device", "ids"):
        assert after[key] == before[key], key
    for name, grad in before["grad"].items():  # no gradient leaked into the model's parameters
        assert (after["grad"][name] is None) == (grad is None), name
    assert torch.equal(model[6].weight.grad, torch.ones_like(model[6].weight))
    assert set(result.layers) == {"0", "4", "6"}


def _relu6_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.copy_(torch.randn(4, generator=g))
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
    model.train()
    model[4].eval()
    model[0].weight.requires_grad_(False)
    model[7].weight.grad = torch.ones_like(model[7].weight)
    return model


def _fail_after_equalizing(monkeypatch):
    import lightning_adaround.model.prepare as prepare

    real = prepare.equalize_layers

    def equalize_then_fail(model):
        real(model)
        raise _Boom("equalization went wrong")

    monkeypatch.setattr(prepare, "equalize_layers", equalize_then_fail)


@pytest.mark.parametrize("where", ["step", "layer_end", "equalization"])
@pytest.mark.parametrize("loss_form", ["minibatch", "auto"])
def test_failure_after_folding_and_equalizing_leaves_the_model_as_given(where, loss_form, monkeypatch):
    """Folding, equalization (ReLU6 -> ChannelClip), rounding: one restore scope, the original error."""
    model = _relu6_model()
    before = _snapshot(model)
    relu6 = (model[2], model[5])
    data = [torch.randn(8, 2, 6, 6) for _ in range(2)]
    config = AdaRoundConfig(
        iterations=10, batch_size=8, loss_form=loss_form, granularity=PerTensor(), log_every_n_steps=1,
    )
    observer = AdaRoundObserver()
    if where == "equalization":
        _fail_after_equalizing(monkeypatch)
    else:
        observer = _FailAt(where, 1, _Boom)
    with pytest.raises(_Boom):
        adaround(model, data, config, observer=observer)
    assert (model[2], model[5]) == relu6  # the very ReLU6 modules, not ChannelClips
    _assert_same(model, before)
    if where == "equalization":  # round_to_nearest prepares the same way, in the same restore scope
        with pytest.raises(_Boom):
            round_to_nearest(model, config)
        assert (model[2], model[5]) == relu6
        _assert_same(model, before)


def test_a_failing_restore_step_does_not_hide_the_original_error(monkeypatch):
    import lightning_adaround.model.prepare as prepare

    def broken_restorer(model):
        def restore():
            raise RuntimeError("the clip restorer broke")
        return restore

    monkeypatch.setattr(prepare, "clips_restorer", broken_restorer)
    model = _relu6_model()
    before = _snapshot(model)
    data = [torch.randn(8, 2, 6, 6) for _ in range(2)]
    config = AdaRoundConfig(iterations=10, batch_size=8, granularity=PerTensor(), log_every_n_steps=1)
    with pytest.raises(_Boom, match="injected") as info:
        adaround(model, data, config, observer=_FailAt("step", 1, _Boom))
    if sys.version_info >= (3, 11):
        assert any("the clip restorer broke" in note for note in info.value.__notes__)
    after = _snapshot(model)  # the clips stay (their restorer broke); every other step still ran
    assert after["requires_grad"] == before["requires_grad"] and after["ids"] == before["ids"]
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
