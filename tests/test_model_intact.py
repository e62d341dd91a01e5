"""On any failure the user's model is as it was: weights, requires_grad, per-module training mode, device, .grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, adaround


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
