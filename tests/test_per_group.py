"""Group-wise grids (``PerGroup``): the grid, rounding in both loss forms, config and YAML,
the quantized file, ONNX checked in onnxruntime, and checkpoints.

The models are rounded for real: the digits CNN trained on scikit-learn's handwritten digits,
whose layers have 9, 288, 576, 64 and 64 inputs per output channel, so group sizes 32 and 40
give exact groups, shorter last groups and a layer that is one group per channel.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import accuracy
from test_export import DigitRows
from lightning_adaround import (
    AdaRoundConfig, AdaRoundResult, PerChannel, PerGroup, adaround, export_onnx, export_quantized,
    load_quantized, round_to_nearest,
)
from lightning_adaround.io.checkpoint import run_fingerprint
from lightning_adaround.grid.quant import (
    check_granularity, choose_grid, expand_groups, group_count, group_size_of,
)
from lightning_adaround.grid.rounding import RoundingVariable

FAST = dict(iterations=20, batch_size=16)


def calibration(digits, n=256, parts=4):
    return list(digits["train"].tensors[0][:n].split(n // parts))


def rows_of(weight):
    return weight.reshape(weight.shape[0], -1)


def group_reference(weight, grid, group_size):
    """Round to nearest group by group, each with its own scalar grid: what a per-group grid must equal."""
    rows = rows_of(weight)
    out = torch.empty_like(rows)
    for o in range(rows.shape[0]):
        for g in range(grid.scale.shape[1]):
            cols = slice(g * group_size, (g + 1) * group_size)
            s, z = grid.scale[o, g], grid.zero_point[o, g]
            q = torch.clamp(torch.round(rows[o, cols] / s) + z, grid.qmin, grid.qmax)
            out[o, cols] = (q - z) * s
    return out.reshape(weight.shape)


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("inputs, group_size, groups, block", [
    (384, 128, 3, 128), (1536, 128, 12, 128),  # MiniLM's Linear layers: exact groups
    (576, 128, 5, 116),  # 64 channels x 3x3: five groups, never wider than asked, the last (112) shorter
    (200, 128, 2, 100), (288, 40, 8, 36), (576, 40, 15, 39), (9, 128, 1, 9), (128, 128, 1, 128),
])
def test_group_count_splits_each_row_into_groups_no_wider_than_asked(inputs, group_size, groups, block):
    assert group_count(inputs, group_size) == (groups, block)
    assert block <= group_size and (groups - 1) * block < inputs <= groups * block
    if groups > 1:  # the scale's shape alone gives the group size back
        assert group_size_of((7, groups), (7, inputs)) == block
        assert group_size_of((7, groups), (7, inputs // 9, 3, 3) if inputs % 9 == 0 else (7, inputs, 1)) == block


def test_layouts_of_linear_and_conv_weights():
    torch.manual_seed(0)
    linear = choose_grid(nn.Linear(384, 6).weight, 4, granularity=PerGroup(128))
    assert linear.scale.shape == linear.zero_point.shape == (6, 3)
    assert (linear.axis, linear.group_size) == (0, 128)
    conv = choose_grid(nn.Conv2d(64, 8, 3).weight, 4, granularity=PerGroup(128))  # rows of 64 x 9 = 576
    assert conv.scale.shape == (8, 5) and conv.group_size == 116
    conv1d = choose_grid(nn.Conv1d(6, 4, 5, groups=2).weight, 4, granularity=PerGroup(4))  # rows of 3 x 5
    assert conv1d.scale.shape == (4, 4) and conv1d.group_size == 4
    weight = nn.Conv2d(8, 8, 3, groups=8).weight
    depthwise = choose_grid(weight, 4, granularity=PerGroup(128))
    assert depthwise.scale.shape == (8, 1, 1, 1) and depthwise.group_size is None  # one group: per channel
    per_channel = choose_grid(weight, 4, granularity=PerChannel())
    assert torch.equal(depthwise.scale, per_channel.scale)
    assert PerGroup().group_size == 128 and PerGroup(64).axis == 0
    with pytest.raises(ValueError, match=r"PerGroup needs a weight with output channels and inputs"):
        choose_grid(torch.randn(10), 4, granularity=PerGroup(4))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("shape, group_size", [((12, 96), 32), ((10, 6, 3, 3), 16), ((5, 7, 5), 8)])
def test_every_weight_on_its_groups_grid(shape, group_size, method, symmetric):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).mul(3)
    grid = choose_grid(w, 3, symmetric, PerGroup(group_size), method)
    block = grid.group_size
    assert block == group_count(math.prod(shape[1:]), group_size)[1]
    q = grid.quantize(w)
    assert torch.equal(q, q.round()) and q.min() >= grid.qmin and q.max() <= grid.qmax
    fq = grid.fake_quantize(w)
    assert torch.equal(fq, grid.dequantize(q)) and torch.equal(grid.fake_quantize(fq), fq)
    torch.testing.assert_close(fq, group_reference(w, grid, block), rtol=0, atol=0)
    assert torch.equal(grid.zero_point, grid.zero_point.round())
    if symmetric and method == "minmax":  # each group's largest |w| lands on +-qmax: its own range, no one else's
        groups = torch.nn.functional.pad(rows_of(w), (0, grid.scale.shape[1] * block - rows_of(w).shape[1]))
        largest = groups.reshape(shape[0], -1, block).abs().amax(2)
        torch.testing.assert_close(grid.scale * grid.qmax, largest, rtol=1e-6, atol=0)


def test_per_group_beats_per_channel_on_group_varying_magnitude():
    """A Linear whose input groups differ in magnitude (outlier input channels): one scale per row wastes the grid."""
    g = torch.Generator().manual_seed(0)
    magnitude = torch.logspace(-2, 0, 8)[torch.randperm(8, generator=g)].repeat_interleave(32)  # 8 groups of 32
    w = torch.randn(64, 256, generator=g) * magnitude
    errors, worst = {}, {}
    for name, granularity in {"channel": PerChannel(), "group": PerGroup(32), "group64": PerGroup(64)}.items():
        for method in ("minmax", "mse"):
            squared = (choose_grid(w, 4, True, granularity, method).fake_quantize(w) - w).pow(2)
            errors[name, method] = float(squared.mean())
            # relative error of the worst group of 32 inputs, over all output channels
            worst[name, method] = float((squared.reshape(64, 8, 32).sum((0, 2)) / w.pow(2).reshape(64, 8, 32).sum((0, 2))).max())
    for method in ("minmax", "mse"):
        assert errors["group", method] < errors["channel", method] / 3, errors
        assert errors["group", method] < errors["group64", method] < errors["channel", method], errors
        assert worst["channel", method] > 0.5 > 0.02 > worst["group", method], worst  # small groups: rounded away vs kept
    assert errors["group", "mse"] <= errors["group", "minmax"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_never_worse_than_minmax_in_any_group(symmetric):
    for seed in range(4):
        w = torch.distributions.StudentT(2.0).sample((6, 5, 3, 3))
        mm = choose_grid(w, 3, symmetric, PerGroup(10), "minmax")
        mse = choose_grid(w, 3, symmetric, PerGroup(10), "mse", num_candidates=40)

        def per_group(grid):
            err = rows_of((grid.fake_quantize(w) - w).pow(2))
            return torch.nn.functional.pad(err, (0, 5 * 9 - 45)).reshape(6, -1, 9).sum(2)

        assert torch.all(per_group(mse) <= per_group(mm) * (1 + 1e-6)), seed


# ----------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_variable_per_group(symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=g) * torch.rand(8, 36, generator=g).mul(4).reshape(8, 4, 3, 3)
    grid = choose_grid(w, 3, symmetric, PerGroup(8), "minmax")  # 36 inputs: 5 groups of 8, the last of 4
    assert grid.scale.shape == (8, 5) and grid.group_size == 8
    rv = RoundingVariable(w, grid)
    scale, zero_point = grid.broadcastable(w.shape)
    assert scale.shape == w.shape and torch.equal(scale, expand_groups(grid.scale, w.shape, 8))
    soft, h = rv.soft()
    inside = ((w / scale + zero_point) >= grid.qmin) & ((w / scale + zero_point) <= grid.qmax)
    # an affine grid rounds its zero point: a group's extremes can sit up to half a step outside
    assert bool(inside.all()) if symmetric else inside.float().mean() > 0.75
    assert torch.all((soft - w).abs()[inside] <= 1e-5 * scale[inside] + 1e-7)  # starts at the float weight
    fused, _ = rv.soft_with_regularizer(10.0)
    torch.testing.assert_close(fused, soft)
    # hard rounding: down or up from each weight, on its own group's grid
    with torch.no_grad():
        rv.v.copy_(torch.randn(w.shape, generator=g))
    q = rv.integer_weight()
    assert torch.equal(q, q.round()) and q.min() >= grid.qmin and q.max() <= grid.qmax
    assert torch.equal(rv.hard_weight(), grid.dequantize(q))
    floor = torch.floor(w / scale) + zero_point
    assert torch.all((q == floor.clamp(grid.qmin, grid.qmax)) | (q == (floor + 1).clamp(grid.qmin, grid.qmax)))
    # keep-nearest on some output channels: exactly round-to-nearest there, untouched elsewhere
    before = rv.hard_weight()
    channels = torch.tensor([True, False] * 4)
    rv.use_nearest(w, channels)
    after = rv.hard_weight()
    assert torch.equal(after[channels], grid.fake_quantize(w)[channels])
    assert torch.equal(after[~channels], before[~channels])


def test_round_to_nearest_per_group_is_each_layers_grid(digits_cnn):
    float_model = copy.deepcopy(digits_cnn)
    config = AdaRoundConfig(bits=4, granularity=PerGroup(40), fold_batchnorm=False)
    assert round_to_nearest(digits_cnn, config) == {name: 4 for name in ("0", "3", "7", "12", "14")}
    sizes = {}
    for name in ("0", "3", "7", "12", "14"):
        w = float_model.get_submodule(name).weight.detach()
        grid = choose_grid(w, 4, True, PerGroup(40), "mse")
        assert torch.equal(digits_cnn.get_submodule(name).weight, grid.fake_quantize(w)), name
        sizes[name] = grid.group_size
    assert sizes == {"0": None, "3": 36, "7": 39, "12": 32, "14": 32}  # 9, 288, 576, 64, 64 inputs


@pytest.mark.parametrize("loss_form", ["moments", "minibatch"])
def test_adaround_per_group_on_real_digits(digits, trained_digits_cnn, loss_form):
    """W2, where the rounding decides: both loss forms beat round-to-nearest on the same per-group grid."""
    nearest = copy.deepcopy(trained_digits_cnn)
    round_to_nearest(nearest, AdaRoundConfig(bits=2, granularity=PerGroup(32)))
    model = copy.deepcopy(trained_digits_cnn)
    config = AdaRoundConfig(bits=2, granularity=PerGroup(32), iterations=200, loss_form=loss_form)
    result = adaround(model, calibration(digits), config)
    assert {r.loss_form for r in result.layers.values()} == {loss_form}
    assert {n: r.group_size for n, r in result.layers.items()} == {"0": None, "3": 32, "7": 32, "12": 32, "14": 32}
    for name, layer in result.layers.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(weight, layer.dequantized_weight()), name  # exactly on the grid
        assert layer.qmin <= int(layer.integer_weight.min()) and int(layer.integer_weight.max()) <= layer.qmax
    assert sum(r.adaround_mse for r in result.layers.values()) < sum(r.nearest_mse for r in result.layers.values())
    assert accuracy(model, digits["test"]) > accuracy(nearest, digits["test"]) + 0.05


def test_output_scales_fall_back_to_the_mse_search_per_group(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    config = AdaRoundConfig(bits=3, granularity=PerGroup(32), scale_method="output", keep_float_weights=True, **FAST)
    result = adaround(model, calibration(digits), config)
    for name, layer in result.layers.items():
        grid = choose_grid(layer.float_weight, 3, True, PerGroup(32), "mse")
        assert torch.equal(layer.scale, grid.scale), name


# ----------------------------------------------------------------------------- config, YAML, refusals


def test_config_accepts_per_group_and_checks_the_group_size():
    config = AdaRoundConfig(granularity=PerGroup(128))
    assert config.granularity == PerGroup(group_size=128) and config.equalizes is False
    for bad in (1, 0, 64.0, True, "128"):
        with pytest.raises(ValueError, match=rf"PerGroup\(group_size={bad!r}\): the group size must be an int >= 2"):
            PerGroup(bad)
    layers = [("0", nn.Linear(8, 8))]
    runs = [run_fingerprint(nn.Linear(8, 8), layers, [torch.ones(2, 8)], AdaRoundConfig(granularity=g), {})
            for g in (PerGroup(32), PerGroup(64), PerChannel())]
    assert len({repr(r["settings"]["granularity"]) for r in runs}) == 3  # a resume never mixes group sizes


def test_transposed_convolutions_are_refused_by_name():
    layers = [("up", nn.ConvTranspose2d(8, 4, 2)), ("conv", nn.Conv2d(4, 4, 3)), ("up2", nn.ConvTranspose1d(4, 4, 3))]
    check_granularity(layers, PerChannel())
    check_granularity(layers[1:2], PerGroup(32))
    with pytest.raises(ValueError) as info:
        check_granularity(layers, PerGroup(32))
    message = str(info.value)
    assert "layer 'up' (and 1 more) is a ConvTranspose2d" in message
    assert "granularity=PerChannel()" in message and "exclude=['up', 'up2']" in message


def _lightning_classes():
    import lightning.pytorch as pl

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(128, 64, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)

    return Model, Data


def test_lightning_cli_yaml_reaches_per_group(tmp_path):
    import warnings

    import yaml
    from lightning.pytorch.cli import LightningCLI

    from lightning_adaround import AdaRoundCallback

    Model, Data = _lightning_classes()
    config = {"iterations": 10, "batch_size": 16,
              "granularity": {"class_path": "lightning_adaround.PerGroup", "init_args": {"group_size": 16}}}
    callback = {"class_path": "lightning_adaround.AdaRoundCallback",
                "init_args": {"bits": 4, "num_calibration_samples": 64, "verbose": False, "report": False, "config": config}}
    trainer = dict(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, callbacks=[callback])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(Model, Data, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaRoundCallback)]
    assert cb.config.granularity == PerGroup(16)
    assert {n: tuple(r.scale.shape) for n, r in cb.result.layers.items()} == {"net.0": (48, 4), "net.2": (10, 3)}
    for name, layer in cb.result.layers.items():
        assert torch.equal(cli.model.get_submodule(name).weight, layer.dequantized_weight())
    bad = dict(config, granularity={"class_path": "lightning_adaround.PerGroup", "init_args": {"group_size": 1}})
    path.write_text(yaml.safe_dump({"trainer": dict(trainer, callbacks=[dict(callback, init_args=dict(
        callback["init_args"], config=bad))])}))
    with pytest.raises((SystemExit, ValueError)), warnings.catch_warnings():  # refused before any work
        warnings.simplefilter("ignore")
        LightningCLI(Model, Data, args=["--config", str(path)], run=False)


# ----------------------------------------------------------------------------- results, checkpoints, the file


def _rounded_cnn(digits, model, group_size, bits=4, symmetric=True, **options):
    config = AdaRoundConfig(bits=bits, symmetric=symmetric, granularity=PerGroup(group_size), **FAST)
    return adaround(model, calibration(digits), config, **options)


def test_result_state_dict_and_checkpoint_resume_keep_the_groups(digits, digits_cnn, tmp_path):
    float_model = copy.deepcopy(digits_cnn)
    result = _rounded_cnn(digits, digits_cnn, 40, checkpoint_dir=tmp_path / "ckpt")
    buffer = io.BytesIO()
    torch.save(result.state_dict(), buffer)
    buffer.seek(0)
    restored = AdaRoundResult.from_state_dict(torch.load(buffer, weights_only=True))
    for name, layer in result.layers.items():
        assert restored.layers[name].group_size == layer.group_size
        assert torch.equal(restored.layers[name].dequantized_weight(), layer.dequantized_weight())
    again = _rounded_cnn(digits, float_model, 40, checkpoint_dir=tmp_path / "ckpt")  # every layer from the files
    assert sorted(again.restored) == sorted(result.layers)
    for name, layer in result.layers.items():
        assert again.layers[name].group_size == layer.group_size
        assert torch.equal(float_model.get_submodule(name).weight, digits_cnn.get_submodule(name).weight)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (3, 40, False), (8, 40, True)])
def test_quantized_file_round_trip_per_group(digits, digits_cnn, tmp_path, bits, group_size, symmetric):
    result = _rounded_cnn(digits, digits_cnn, group_size, bits, symmetric)
    export_quantized(digits_cnn, result, tmp_path / "cnn.pt")
    payload = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert payload["version"] == 1
    for name, entry in payload["layers"].items():
        layer = result.layers[name]
        assert entry["group_size"] == layer.group_size
        assert entry["packed"] is (bits <= 4)
        assert tuple(entry["scale"].shape) == tuple(layer.scale.shape)
    assert payload["layers"]["7"]["group_size"] == (32 if group_size == 32 else 39)
    from digits import make_cnn

    torch.manual_seed(123)
    fresh = make_cnn().eval()
    loaded = load_quantized(fresh, tmp_path / "cnn.pt")
    for key, value in digits_cnn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key  # bit for bit
    for name, layer in result.layers.items():
        assert loaded.layers[name].group_size == layer.group_size
        assert torch.equal(loaded.layers[name].integer_weight, layer.integer_weight)
        assert torch.equal(loaded.layers[name].scale, layer.scale)


def test_damaged_per_group_entries_are_refused(digits, digits_cnn, tmp_path):
    result = _rounded_cnn(digits, digits_cnn, 40)
    export_quantized(digits_cnn, result, tmp_path / "cnn.pt")

    def load_edited(edit):
        payload = torch.load(tmp_path / "cnn.pt", weights_only=True)
        edit(payload["layers"]["7"])
        torch.save(payload, tmp_path / "edited.pt")
        before = copy.deepcopy(digits_cnn.state_dict())
        with pytest.raises(ValueError, match="the file is damaged") as info:
            load_quantized(digits_cnn, tmp_path / "edited.pt")
        assert all(torch.equal(v, before[k]) for k, v in digits_cnn.state_dict().items())  # nothing written
        return str(info.value)

    # without its group size (a reader from before PerGroup) the scale does not broadcast: refused, not misread
    assert "scale is not a float tensor that broadcasts" in load_edited(lambda e: e.pop("group_size"))
    assert "group_size=40" in load_edited(lambda e: e.update(group_size=40))  # 576 inputs make groups of 39
    assert "of shape (64, 15)" in load_edited(lambda e: e.update(scale=e["scale"][:, :14], zero_point=e["zero_point"][:, :14]))
    assert "axis=1" in load_edited(lambda e: e.update(axis=1))


# ----------------------------------------------------------------------------- ONNX


def ort_outputs(path, feeds):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])


@pytest.mark.parametrize("group_size, symmetric", [(32, True), (40, False)])
def test_onnx_blocked_dequantize_matches_pytorch(digits, digits_cnn, tmp_path, group_size, symmetric):
    pytest.importorskip("onnxruntime")
    result = _rounded_cnn(digits, digits_cnn, group_size, 4, symmetric)
    export_quantized(digits_cnn, result, tmp_path / "cnn.pt")
    from digits import make_cnn

    model = make_cnn().eval()
    loaded = load_quantized(model, tmp_path / "cnn.pt")  # from the file, as a deployment would
    images = digits["test"].tensors[0]
    graph = export_onnx(model, loaded, tmp_path / "cnn.onnx", images[:4], input_names=["pixels"],
                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [21]  # the default here
    inits = {i.name: i for i in graph.graph.initializer}
    nodes = {n.output[0]: n for n in graph.graph.node}
    for name, layer in result.layers.items():
        producer = nodes[f"{name}.weight"]
        dq = producer if producer.op_type == "DequantizeLinear" else nodes[producer.input[0]]
        attrs = {a.name: a.i for a in dq.attribute}
        q, scale, zero_point = (inits[i] for i in dq.input)
        assert q.data_type == (3 if symmetric else 2) and zero_point.data_type == q.data_type
        if layer.group_size is None:  # the 9-input first conv: one group, per channel
            assert attrs == {"axis": 0} and list(scale.dims) == [layer.scale.shape[0]]
        else:
            assert attrs == {"axis": 1, "block_size": layer.group_size}
            assert list(scale.dims) == list(layer.scale.shape) and list(q.dims) == list(rows_of(layer.integer_weight).shape)
            assert producer.op_type == ("Reshape" if layer.integer_weight.dim() > 2 else "DequantizeLinear")
    logits = ort_outputs(tmp_path / "cnn.onnx", {"pixels": images})
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    with pytest.raises(ValueError, match=r"opset 18 has no blocked DequantizeLinear .* opset_version=21"):
        export_onnx(model, loaded, tmp_path / "old.onnx", images[:4], opset_version=18)


def test_onnx_transformer_block_per_group(digits, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DigitRows().eval()
    result = adaround(model, calibration(digits), AdaRoundConfig(bits=4, granularity=PerGroup(16), **FAST))
    assert {result.layers[n].group_size for n in ("block.linear1", "block.linear2", "head")} == {16}
    images = digits["test"].tensors[0]
    export_onnx(model, result, tmp_path / "block.onnx", images[:4], input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("batch")},))
    got = ort_outputs(tmp_path / "block.onnx", {"x": images})
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_transposed_convolution_with_groups_is_refused_before_any_work():
    model = nn.Sequential(nn.ConvTranspose2d(8, 3, 2))
    with pytest.raises(ValueError, match="is a ConvTranspose2d"):
        adaround(model, [torch.randn(4, 8, 5, 5)], AdaRoundConfig(granularity=PerGroup(16)))
