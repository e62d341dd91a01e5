"""Supported layers: running with a substitute weight, channel axes, selection, activations."""

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.model.layers import (
    SUPPORTED_LAYER_TYPES, bits_for, following_ops, is_supported, output_channel_dim,
    run_with_weight, select_layers, weight_channel_axis,
)


LAYER_CASES = {
    "linear2d": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear3d": (lambda: nn.Linear(6, 5), (3, 7, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), (3, 7, 6)),
    "conv1d_stride_pad": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 11)),
    "conv1d_same_reflect": (lambda: nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 9)),
    "conv1d_dilation_groups": (lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2), (2, 4, 12)),
    "conv2d_stride_pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2), (2, 3, 9, 9)),
    "conv2d_same": (lambda: nn.Conv2d(3, 4, (3, 5), padding="same"), (2, 3, 8, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    "conv2d_circular": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), (2, 3, 7, 7)),
    "conv2d_replicate": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (2, 3, 7, 7)),
    "conv2d_dilation": (lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2), (2, 3, 9, 9)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2, bias=False), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 7, 7)),
    "conv2d_same_circular_dil": (
        lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="circular"), (2, 3, 8, 8)),
    "conv3d_stride_pad": (lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (2, 2, 6, 6, 6)),
    "conv3d_same_replicate": (
        lambda: nn.Conv3d(2, 3, 3, padding="same", padding_mode="replicate"), (1, 2, 5, 5, 5)),
    "conv3d_groups_dilation": (lambda: nn.Conv3d(4, 4, 2, groups=2, dilation=2), (1, 4, 6, 6, 6)),
    "convT1d_stride_outpad": (
        lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (2, 3, 7)),
    "convT1d_groups_dilation": (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, dilation=2), (2, 4, 7)),
    "convT2d_stride_outpad": (
        lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (2, 3, 5, 5)),
    "convT2d_groups": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), (2, 4, 5, 5)),
    "convT2d_depthwise": (lambda: nn.ConvTranspose2d(4, 4, 3, groups=4, stride=2), (2, 4, 5, 5)),
    "convT2d_dilation": (lambda: nn.ConvTranspose2d(3, 4, 3, dilation=2, stride=(1, 2)), (2, 3, 5, 4)),
    "convT3d_stride_outpad": (
        lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1), (1, 2, 3, 3, 3)),
    "convT3d_groups_dilation": (lambda: nn.ConvTranspose3d(4, 2, 2, groups=2, dilation=2), (1, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_run_with_weight_matches_module(case):
    make, shape = LAYER_CASES[case]
    torch.manual_seed(0)
    module = make()
    assert is_supported(module)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = module(x)
        got = run_with_weight(module, x, module.weight)
    assert torch.equal(got, expected)

    w2 = torch.randn_like(module.weight)
    with torch.no_grad():
        got2 = run_with_weight(module, x, w2)
    # the module's own weight was not touched
    assert not torch.equal(module.weight.detach(), w2)
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.weight.copy_(w2)
        expected2 = other(x)
    torch.testing.assert_close(got2, expected2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got2, expected)

    # differentiable w.r.t. the substitute weight
    w3 = w2.clone().requires_grad_(True)
    run_with_weight(module, x, w3).sum().backward()
    assert w3.grad is not None and w3.grad.shape == w3.shape
    assert module.weight.grad is None


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_channel_axes(case):
    make, shape = LAYER_CASES[case]
    module = make()
    out = module(torch.randn(shape))
    axis = weight_channel_axis(module)
    dim = output_channel_dim(module)
    if isinstance(module, nn.Linear):
        assert axis == 0 and dim == -1
        assert module.weight.shape[axis] == out.shape[dim] == module.out_features
    elif module.transposed:
        assert axis == 1 and dim == 1
        assert module.weight.shape[axis] * module.groups == out.shape[dim] == module.out_channels
    else:
        assert axis == 0 and dim == 1
        assert module.weight.shape[axis] == out.shape[dim] == module.out_channels


def test_is_supported():
    assert all(is_supported(t(2, 2, 1) if t is not nn.Linear else t(2, 2)) for t in SUPPORTED_LAYER_TYPES)
    for m in (nn.ReLU(), nn.BatchNorm2d(3), nn.Embedding(3, 4), nn.LayerNorm(3), nn.Sequential()):
        assert not is_supported(m)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.up = nn.ConvTranspose2d(4, 2, 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
        self.norm = nn.LayerNorm(2)


def test_select_layers_all_supported_in_module_order():
    names = [n for n, _ in select_layers(_Net())]
    assert names == ["features.0", "features.3", "up", "head.1", "head.3"]


def test_select_layers_include_exclude_types():
    net = _Net()
    assert [n for n, _ in select_layers(net, include=["features.*"])] == ["features.0", "features.3"]
    assert [n for n, _ in select_layers(net, include=["head.?", "up"])] == ["up", "head.1", "head.3"]
    assert [n for n, _ in select_layers(net, exclude=["head.*", "features.0"])] == ["features.3", "up"]
    assert [n for n, _ in select_layers(net, include=["features.*"], exclude=["*.3"])] == ["features.0"]
    assert [n for n, _ in select_layers(net, layer_types=[nn.Linear])] == ["head.1", "head.3"]
    assert [n for n, _ in select_layers(net, layer_types=[nn.ConvTranspose2d])] == ["up"]
    assert [n for n, _ in select_layers(net, layer_types=[nn.Conv2d], exclude=["features.3"])] == ["features.0"]
    assert select_layers(net, include=["nothing*"]) == []
    assert select_layers(net, include=[]) == []
    # globs are case sensitive and match whole names
    assert select_layers(net, include=["HEAD.*"]) == []
    assert select_layers(net, include=["head"]) == []
    # returns the modules themselves
    assert select_layers(net, include=["up"])[0][1] is net.up


def test_select_layers_rejects_unsupported_types():
    with pytest.raises(TypeError, match="BatchNorm2d"):
        select_layers(_Net(), layer_types=[nn.Linear, nn.BatchNorm2d])


def test_bits_for_first_matching_glob():
    overrides = {"head.*": 8, "head.3": 2, "features.0": 6}
    assert bits_for("head.3", 4, overrides) == 8  # first matching pattern wins
    assert bits_for("head.1", 4, overrides) == 8
    assert bits_for("features.0", 4, overrides) == 6
    assert bits_for("features.3", 4, overrides) == 4
    assert bits_for("features.3", 3, {}) == 3
    assert bits_for("head.3", 4, {"head.3": 2, "head.*": 8}) == 2
    assert bits_for("a.b.c", 4, {"a.*": 5}) == 5  # fnmatch '*' crosses dots


def _ops(model, name):
    ops = following_ops(model, name)
    return None if ops is None else (ops.batchnorm, ops.activation)


def test_following_ops():
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # 0: BN + ReLU
        nn.Conv2d(4, 4, 3), nn.ReLU(),                     # 3: ReLU
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),             # 5: BN only
        nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1),            # 7: another conv follows
        nn.Flatten(), nn.Linear(4, 2), nn.GELU(),          # 10: GELU
        nn.Linear(2, 2),                                   # 12: last
    )
    model = nn.Sequential(seq)  # nested: names are "0.<i>"
    assert _ops(model, "0.0") == (seq[1], seq[2])
    assert following_ops(model, "0.0").detected
    assert _ops(model, "0.3") == (None, seq[4])
    assert _ops(model, "0.5") == (seq[6], None)
    assert _ops(model, "0.7") is None
    assert _ops(model, "0.8") is None  # Flatten is not an activation
    assert _ops(model, "0.10") == (None, seq[11])
    assert _ops(model, "0.12") is None
    # top-level sequential
    assert _ops(seq, "3") == (None, seq[4])
    # not inside an nn.Sequential
    net = _Net()
    assert _ops(net, "up") is None
    assert _ops(net, "features.0")[1] is net.features[2]
    assert _ops(net, "head.1") == (None, net.head[2])
    assert _ops(net, "head.3") is None
    # applying the ops runs BN then the activation
    x = torch.randn(2, 4, 5, 5)
    seq.eval()
    assert torch.equal(following_ops(seq, "0")(x), seq[2](seq[1](x)))


def test_following_ops_bn_relu_output():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    seq[1].running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    act = following_ops(seq, "0")
    with torch.no_grad():
        assert torch.equal(act(seq[0](x)), seq(x))


class _AllFamilies(nn.Module):
    """Conv1d -> depthwise Conv2d -> ConvTranspose2d -> Linear on (B, T, C)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):  # x: (B, 3, 16)
        y = self.act(self.conv1(x))               # (B, 4, 16)
        y = y.view(y.shape[0], 4, 4, 4)
        y = self.act(self.dw(y))                  # (B, 4, 4, 4)
        y = self.up(y)                            # (B, 3, 8, 8)
        y = y.flatten(2).transpose(1, 2)          # (B, 64, 3)
        return self.fc(y)                         # (B, 64, 5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_adaround_every_family_lands_on_grid(symmetric):
    torch.manual_seed(0)
    model = _AllFamilies()
    original = {n: m.weight.detach().clone() for n, m in select_layers(model)}
    batches = [torch.randn(8, 3, 16) for _ in range(3)]
    config = AdaRoundConfig(bits=3, symmetric=symmetric, iterations=30, batch_size=8, holdout_fraction=0.0)
    result = adaround(model, batches, config)
    assert set(result.layers) == {"conv1", "dw", "up", "fc"}
    assert result.unreached == []
    for name, module in select_layers(model):
        r = result.layers[name]
        assert torch.equal(r.dequantized_weight(), module.weight.detach()), name
        wi = r.integer_weight
        assert wi.dtype == (torch.int8 if symmetric else torch.uint8)
        assert wi.shape == module.weight.shape
        assert int(wi.min()) >= r.qmin and int(wi.max()) <= r.qmax
        assert (r.qmin, r.qmax) == ((-4, 3) if symmetric else (0, 7))
        assert r.axis == weight_channel_axis(module)
        assert not torch.equal(module.weight.detach(), original[name])
        # AdaRound stays within one grid step of the float weight
        assert torch.all((module.weight.detach() - original[name]).abs() <= r.scale * 1.0001 + 1e-6)
    assert result.layers["up"].scale.shape == (1, 3, 1, 1)
    assert result.layers["fc"].scale.shape == (5, 1)
    assert result.layers["fc"].num_samples == 24


class _Block(nn.Module):
    def __init__(self, by_keyword: bool):
        super().__init__()
        self.a, self.b, self.by_keyword = nn.Linear(8, 16), nn.Linear(16, 8), by_keyword

    def forward(self, x):
        if self.by_keyword:
            return x + self.b(input=torch.relu(self.a(input=x)))
        return x + self.b(torch.relu(self.a(x)))


class _Encoder(nn.Module):
    """A chain of two blocks of Linear layers; layers and blocks called by position or by keyword."""

    def __init__(self, by_keyword: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Block(by_keyword) for _ in range(2))
        self.by_keyword = by_keyword

    def forward(self, x):
        for block in self.blocks:
            x = block(x=x) if self.by_keyword else block(x)
        return x


@pytest.mark.parametrize("reconstruction, loss_form", [("layer", "moments"), ("layer", "minibatch"), ("block", "auto")])
def test_layers_called_by_keyword_round_as_called_by_position(reconstruction, loss_form):
    """``self.fc(input=x)`` once failed with an IndexError: recorded calls are read by position."""
    data = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = AdaRoundConfig(bits=3, iterations=30, reconstruction=reconstruction, loss_form=loss_form)
    results = [adaround(_Encoder(by_keyword), data, config) for by_keyword in (False, True)]
    assert sorted(results[0].layers) == sorted(results[1].layers) and len(results[0].layers) == 4
    if reconstruction == "block":
        assert results[1].layers["blocks.0.a"].block == "blocks.0"
    for name in results[0].layers:
        assert torch.equal(results[0].layers[name].integer_weight, results[1].layers[name].integer_weight), name
