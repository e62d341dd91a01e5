"""The second-moment form equals the minibatch reconstruction over every row, for every layer type."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.model.layers import OutputOps, run_with_weight
from lightning_adaround.data.moments import LayerMoments, patch_rows
from lightning_adaround.engine.objective import MomentsObjective
from lightning_adaround.engine.reconstruct import choose_form
from lightning_adaround.data.unit import Unit

LAYERS = {
    "linear-2d": (lambda: nn.Linear(6, 5), (7, 6)),
    "linear-btc": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "linear-wide": (lambda: nn.Linear(4, 9), (7, 4)),  # more outputs than inputs: x~ e^T and e e^T
    "conv2d-wide": (lambda: nn.Conv2d(2, 24, 3, padding=1), (3, 2, 5, 5)),
    "conv1d-dilated": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (4, 3, 11)),
    "conv2d-groups-strided": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (3, 4, 7, 6),
    ),
    "conv1d-stride-reflect": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (4, 3, 11)),
    "conv2d-same-dilation": (lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), (3, 3, 7, 7)),
    "conv2d-groups-circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"), (3, 4, 5, 5)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, stride=2, groups=4), (3, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), (2, 2, 4, 4, 4)),
    # from 256 inputs the symmetric products are built from half-width blocks (an odd width: unequal halves)
    "linear-halved-narrow": (lambda: nn.Linear(301, 5), (40, 301)),
    "linear-halved-wide": (lambda: nn.Linear(257, 300), (40, 257)),
    "conv2d-halved-groups": (lambda: nn.Conv2d(64, 4, 3, padding=1, groups=2), (2, 64, 6, 6)),
}


def reference_loss(layer, x_rounded, x_float, weight_rounded, weight_float, ops=None):
    """float64 minibatch form over every row: mean over rows of the sum over output channels."""
    layer = copy.deepcopy(layer).double()
    out = run_with_weight(layer, x_rounded.double(), weight_rounded)
    target = run_with_weight(layer, x_float.double(), weight_float)
    if ops is not None:
        ops = copy.deepcopy(ops)
        ops.batchnorm = ops.batchnorm.double()
        out, target = ops(out), ops(target)
    channel_dim = -1 if isinstance(layer, nn.Linear) else 1
    return (out - target).pow(2).sum(dim=channel_dim).mean()


def moments_of(layer, pairs):
    acc = LayerMoments(layer, torch.device("cpu"))
    for x_rounded, x_float in pairs:
        acc.add(x_rounded, x_float)
    return acc


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 2e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_moments_value_and_gradient_equal_float64_minibatch_over_all_rows(key, dtype, rel):
    """Exact with float64 inputs; float32 inputs take float32 products, summed in float64."""
    torch.manual_seed(0)
    make, shape = LAYERS[key]
    layer = make().eval()
    x_float = torch.randn(shape, dtype=dtype)
    x_rounded = x_float + 0.1 * torch.randn(shape)
    w = layer.weight.detach()
    w_tilde = (w + 0.05 * torch.randn_like(w)).double().requires_grad_(True)

    objective = MomentsObjective(
        Unit.of_layer("layer", layer), moments_of(layer, [(x_rounded, x_float)]), w, None, torch.device("cpu"),
        dtype=torch.float64,
    )
    value = objective.step_loss([w_tilde])
    (grad,) = torch.autograd.grad(value, w_tilde)
    ref = reference_loss(layer, x_rounded, x_float, w_tilde, w.double())
    (ref_grad,) = torch.autograd.grad(ref, w_tilde)
    assert value.item() == pytest.approx(ref.item(), rel=rel)
    assert torch.allclose(grad, ref_grad, rtol=rel, atol=rel * ref_grad.abs().max().item())
    assert objective.exact_loss(w_tilde.detach()) == pytest.approx(ref.item(), rel=rel)


def test_batchnorm_after_the_layer_weighs_channels_exactly():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 3.0)
        bn.bias.normal_()
    bn.eval()
    x_float = torch.randn(5, 3, 6, 6)
    x_rounded = x_float + 0.1 * torch.randn_like(x_float)
    w = conv.weight.detach()
    w_tilde = (w + 0.05 * torch.randn_like(w)).double()
    ops = OutputOps(batchnorm=bn)
    objective = MomentsObjective(
        Unit.of_layer("conv", conv, ops), moments_of(conv, [(x_rounded, x_float)]), w, None, torch.device("cpu"),
        dtype=torch.float64,
    )
    ref = reference_loss(conv, x_rounded, x_float, w_tilde, w.double(), ops)
    assert objective.step_loss([w_tilde]).item() == pytest.approx(ref.item(), rel=1e-6)


def test_streaming_in_batches_gives_the_same_moments_as_one_pass():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    x_float = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    x_rounded = x_float + 0.1 * torch.randn_like(x_float)
    whole = moments_of(conv, [(x_rounded, x_float)])
    parts = moments_of(conv, [(x_rounded[i:i + 5], x_float[i:i + 5]) for i in range(0, 12, 5)])
    assert whole.rows == parts.rows == 12 * 36
    for a, b in zip(whole.sums(), parts.sums()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-10)


def test_same_input_means_no_difference_terms():
    layer = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    acc = LayerMoments(layer, torch.device("cpu"))
    acc.add(x, None)
    assert all(torch.count_nonzero(t) == 0 for t in acc.error_terms())
    assert torch.allclose(acc.xx[0], (x.double().T @ x.double()))


def test_patch_rows_match_unfold():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7)
    rows = patch_rows(conv, x)[0]
    ref = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    assert torch.allclose(rows, ref, atol=1e-6)


@pytest.mark.parametrize("key", [k for k in LAYERS if k.startswith("conv")])
def test_patch_rows_equal_an_identity_kernel_convolution(key):
    """Unfolded (1-d/2-d, zero padding) or not, the rows are what the layer's weight multiplies."""
    make, shape = LAYERS[key]
    layer = make()
    x = torch.randn(shape, dtype=torch.float64)
    g, d = layer.groups, layer.weight[0].numel()
    eye = torch.eye(d, dtype=torch.float64).reshape(d, layer.in_channels // g, *layer.kernel_size)
    eye = eye.repeat(g, *([1] * (eye.dim() - 1)))
    patches = torch.func.functional_call(layer, {"weight": eye, "bias": None}, (x,))
    ref = patches.reshape(x.shape[0], g, d, -1).permute(1, 0, 3, 2).reshape(g, -1, d)
    torch.testing.assert_close(patch_rows(layer, x), ref, rtol=0, atol=0)


def test_auto_picks_what_the_cost_rule_says():
    conv = nn.Conv2d(8, 8, 3, padding=1)  # d = 72, rows per step = 32 * 64
    assert choose_form("auto", conv, None, 32, torch.randn(2, 8, 8, 8))[0] == "moments"
    wide = nn.Linear(512, 16)  # d = 512 > 3 * 32 rows
    assert choose_form("auto", wide, None, 32, torch.randn(2, 512))[0] == "minibatch"
    tokens = nn.Linear(512, 16)  # 32 sequences x 64 tokens: d = 512 < 3 * 2048 rows
    assert choose_form("auto", tokens, None, 32, torch.randn(2, 64, 512))[0] == "moments"
    explicit = OutputOps(activation=torch.relu)
    assert choose_form("auto", conv, explicit, 32, torch.randn(2, 8, 8, 8))[0] == "minibatch"
    detected = OutputOps(activation=nn.ReLU(), detected=True)
    form, ops, note = choose_form("auto", conv, detected, 32, torch.randn(2, 8, 8, 8))
    assert form == "moments" and ops is None and "ReLU" in note
    transposed = nn.ConvTranspose2d(4, 4, 3)
    form, _, note = choose_form("moments", transposed, None, 32, torch.randn(2, 4, 5, 5))
    assert form == "minibatch" and "transposed" in note


def test_moments_with_an_explicit_activation_is_refused_before_work():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="loss_form='moments'.*activations="):
        adaround(model, [torch.randn(8, 4)], AdaRoundConfig(loss_form="moments", iterations=5),
                 activations={"0": torch.relu})
    assert torch.equal(model[0].weight, before)


def test_bad_loss_form_is_refused():
    with pytest.raises(ValueError, match="loss_form='exact'"):
        AdaRoundConfig(loss_form="exact")


@pytest.mark.parametrize("form", ["moments", "minibatch"])
def test_both_forms_round_every_layer_and_report_the_form(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    model.eval()
    data = [torch.randn(16, 1, 4, 4) for _ in range(3)]
    result = adaround(model, data, AdaRoundConfig(loss_form=form, iterations=50, bits=3))
    assert [r.loss_form for r in result.layers.values()] == [form, form]
    for name, r in result.layers.items():
        assert r.num_samples + r.eval_samples == 48
        assert r.adaround_mse <= r.nearest_mse * 1.05
        assert torch.equal(model.get_submodule(name).weight, r.dequantized_weight())


class _AutogradOnly:
    """The same objective seen through ``step_loss`` only: the optimiser's autograd path."""

    def __init__(self, inner):
        self.inner, self.form = inner, inner.form

    def step_loss(self, weight):
        return self.inner.step_loss(weight)

    def mse(self, weight):
        return self.inner.mse(weight)


@pytest.mark.parametrize("key", ["linear-btc", "conv2d-groups-circular", "conv2d-depthwise"])
def test_step_without_autograd_follows_the_autograd_step(key):
    from lightning_adaround.grid.loss import BetaSchedule
    from lightning_adaround.engine.optimize import optimize_rounding
    from lightning_adaround.grid.quant import PerChannel, choose_grid
    from lightning_adaround.grid.rounding import RoundingVariable

    torch.manual_seed(0)
    make, shape = LAYERS[key]
    layer = make().eval()
    x = torch.randn(shape)
    objective = MomentsObjective(Unit.of_layer("layer", layer), moments_of(layer, [(x, x)]), layer.weight.detach(),
                                 None, torch.device("cpu"))
    grid = choose_grid(layer.weight.detach(), 3, granularity=PerChannel())
    logs = {}
    finals = {}
    for name, obj in (("analytic", objective), ("autograd", _AutogradOnly(objective))):
        rounding = RoundingVariable(layer.weight.detach(), grid)
        logs[name] = []
        optimize_rounding(rounding, obj, 200, 1e-2, 0.01, BetaSchedule(200),
                          on_log=lambda step, m, log=logs[name]: log.append(m), log_every_n_steps=10)
        finals[name] = rounding
    assert torch.allclose(finals["analytic"].v, finals["autograd"].v, rtol=1e-4, atol=1e-5)
    assert torch.equal(finals["analytic"].integer_weight(), finals["autograd"].integer_weight())
    for a, b in zip(logs["analytic"], logs["autograd"]):
        assert a["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-4, abs=1e-7)
        assert a["reg_loss"] == pytest.approx(b["reg_loss"], rel=1e-5)


def test_an_unbatched_conv_input_is_refused_with_the_fix():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    with pytest.raises(ValueError, match=r"without a batch dimension.*unsqueeze\(0\).*minibatch"):
        patch_rows(conv, torch.randn(3, 6, 5))


def test_full_float32_products_put_the_users_matmul_precision_back():
    """On CUDA the accumulation takes full float32 products; the user's setting ("medium" here) comes back."""
    from lightning_adaround.data.moments import _full_float32

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with _full_float32(torch.device("cuda")):  # only the setting: runs without a GPU
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
        with _full_float32(torch.device("cpu")):
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)
