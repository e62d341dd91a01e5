"""Export: the quantized file round trip, ONNX checked in onnxruntime, bad files, A/B switching.

Models are rounded for real (few iterations) on scikit-learn's handwritten digits.
"""

from __future__ import annotations

import argparse
import copy
import io
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_adaround import (
    AdaRoundConfig, AdaRoundResult, PerChannel, PerTensor, adaround, export_onnx, export_quantized,
    load_quantized, use_float_weights, use_rounded_weights,
)
from lightning_adaround.io.export import FORMAT, VERSION, pack_int4, unpack_int4

FAST = dict(iterations=20, batch_size=16)


@pytest.fixture(scope="module")
def images(digits):
    """Real digits: 256 calibration images (training split) and the 360 test images."""
    return digits["train"].tensors[0][:256], digits["test"].tensors[0]


def calibration(images, n=4):
    return list(images[0].split(len(images[0]) // n))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(current[key], value), key


def fresh_cnn(seed=123):
    from digits import make_cnn

    torch.manual_seed(seed)  # other random weights than the rounded model's
    return make_cnn().eval()


# ----------------------------------------------------------------------------- the file round trip


@pytest.mark.parametrize("bits, granularity, symmetric", [
    (4, PerChannel(), True),
    (4, PerTensor(), False),
    (3, PerChannel(), False),
    (8, PerChannel(), True),
    (8, PerTensor(), False),
])
def test_round_trip_is_bit_exact(digits_cnn, images, tmp_path, bits, granularity, symmetric):
    config = AdaRoundConfig(bits=bits, granularity=granularity, symmetric=symmetric, **FAST)
    result = adaround(digits_cnn, calibration(images), config)
    assert len(result.layers) == 5
    path = tmp_path / "model.pt"
    export_quantized(digits_cnn, result, path)

    target = fresh_cnn()
    loaded = load_quantized(target, path)
    assert_state_equal(target, state(digits_cnn))
    with torch.no_grad():
        assert torch.equal(target(images[1]), digits_cnn(images[1]))
    for name, layer in result.layers.items():
        again = loaded.layers[name]
        assert torch.equal(again.integer_weight, layer.integer_weight)
        assert again.integer_weight.dtype == (torch.int8 if symmetric else torch.uint8)
        assert torch.equal(again.scale, layer.scale) and torch.equal(again.zero_point, layer.zero_point)
        assert (again.bits, again.qmin, again.qmax, again.axis) == (layer.bits, layer.qmin, layer.qmax, layer.axis)

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == VERSION
    entry = payload["layers"]["3"]
    numel = result.layers["3"].integer_weight.numel()
    if bits <= 4:
        assert entry["packed"] and entry["data"].dtype == torch.uint8 and entry["data"].numel() == (numel + 1) // 2
    else:
        assert not entry["packed"] and entry["data"].shape == result.layers["3"].integer_weight.shape
    assert "3.weight" not in payload["state"] and "3.bias" in payload["state"]


def test_four_bit_file_is_smaller(digits_cnn, images, tmp_path):
    float_path, path = tmp_path / "float.pt", tmp_path / "int4.pt"
    torch.save(digits_cnn.state_dict(), float_path)
    result = adaround(digits_cnn, calibration(images), AdaRoundConfig(bits=4, **FAST))
    export_quantized(digits_cnn, result, path)
    assert path.stat().st_size < 0.2 * float_path.stat().st_size


def test_lightning_module_names_round_trip(images, tmp_path):
    from digits import DigitsClassifier

    torch.manual_seed(0)
    model = DigitsClassifier().eval()
    result = adaround(model, calibration(images), AdaRoundConfig(bits=4, **FAST))
    assert "net.0" in result.layers
    export_quantized(model, result, tmp_path / "m.pt")
    target = DigitsClassifier()
    load_quantized(target, tmp_path / "m.pt")
    assert_state_equal(target, state(model))


def transposed_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 3, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 19 * 19, 10),
    ).eval()


@pytest.mark.parametrize("symmetric", [True, False])
def test_conv_transpose_axis(images, tmp_path, symmetric):
    pytest.importorskip("onnxruntime")
    model = transposed_model()
    result = adaround(model, calibration(images), AdaRoundConfig(bits=4, symmetric=symmetric, **FAST))
    assert result.layers["2"].axis == 1 and result.layers["2"].scale.shape == (1, 6, 1, 1)
    assert result.layers["4"].scale.shape == (6, 2, 1, 1)  # grouped: output channels over axes 0 and 1
    export_quantized(model, result, tmp_path / "t.pt")
    target = transposed_model()
    for p in target.parameters():
        nn.init.zeros_(p)
    load_quantized(target, tmp_path / "t.pt")
    assert_state_equal(target, state(model))

    onnx_model = export_onnx(model, result, tmp_path / "t.onnx", images[1][:2], input_names=["x"])
    dq = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"}
    assert [a.i for a in dq["2.weight"].attribute if a.name == "axis"] == [1]
    assert "4.weight" not in dq  # two varying axes: spelled out as Cast/Sub/Mul
    ort_matches(tmp_path / "t.onnx", model, {"x": images[1][:2]})


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pack_int4_round_trips(data):
    signed = data.draw(st.booleans())
    low, high = (-8, 7) if signed else (0, 15)
    values = data.draw(st.lists(st.integers(low, high), min_size=0, max_size=41))
    tensor = torch.tensor(values, dtype=torch.int8 if signed else torch.uint8)
    packed = pack_int4(tensor)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) + 1) // 2
    assert torch.equal(unpack_int4(packed, len(values), signed), tensor)


def test_pack_int4_is_onnx_int4_layout():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    values = torch.tensor([1, -2, 7, -8, 3], dtype=torch.int8)
    assert pack_int4(values).tolist() == [0xE1, 0x87, 0x03]  # first value in the low nibble
    tensor = helper.make_tensor("w", TensorProto.INT4, [5], pack_int4(values).numpy().tobytes(), raw=True)
    assert numpy_helper.to_array(tensor).astype("int8").tolist() == values.tolist()


# ----------------------------------------------------------------------------- bad files leave the model alone


@pytest.fixture(scope="module")
def exported(trained_digits_cnn, digits, tmp_path_factory):
    """A 3-bit per-channel export of the trained CNN: (path, payload)."""
    model = copy.deepcopy(trained_digits_cnn)
    x = digits["train"].tensors[0][:128]
    result = adaround(model, [x[:64], x[64:]], AdaRoundConfig(bits=3, **FAST))
    path = tmp_path_factory.mktemp("export") / "cnn_w3.pt"
    export_quantized(model, result, path)
    return path, torch.load(path, weights_only=True)


def tampered(payload, tmp_path, edit):
    payload = copy.deepcopy(payload)
    edit(payload)
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


def _set(mapping, keys, value):
    for key in keys[:-1]:
        mapping = mapping[key]
    mapping[keys[-1]] = value


@pytest.mark.parametrize("edit, message", [
    (lambda p: _set(p, ["version"], 2), "file version 2 is not supported: this lightning-adaround reads version 1"),
    (lambda p: p.pop("format"), "is not a lightning-adaround quantized export"),
    (lambda p: _set(p, ["layers", "0", "data"], p["layers"]["0"]["data"][:-1]),
     "layer '0' packed data is torch.uint8 of shape (143,), expected torch.uint8 of shape (144,)"),
    (lambda p: _set(p, ["layers", "3", "shape"], [64, 32, 3, 2]),
     "layer '3' packed data is torch.uint8 of shape (9216,), expected torch.uint8 of shape (6144,)"),
    (lambda p: _set(p, ["layers", "0", "data"], torch.full_like(p["layers"]["0"]["data"], 0x77)),
     "layer '0' integer weights leave the range [-4, 3]"),
    (lambda p: _set(p, ["layers", "0", "scale"], p["layers"]["0"]["scale"][:4]),
     "layer '0' scale is not a float tensor that broadcasts against the weight shape (32, 1, 3, 3)"),
    (lambda p: _set(p, ["layers", "0", "bits"], 5), "layer '0' has bits=5, qmin=-4, qmax=3, which do not form a grid"),
    (lambda p: p["layers"]["12"].pop("zero_point"), "layer '12' lacks ['zero_point']"),
    (lambda p: p["state"].pop("1.running_var"), "in the model but not in the file: ['1.running_var']; in the file"),
    (lambda p: p["layers"].pop("14"), "in the model but not in the file: ['14.weight']; in the file"),
    (lambda p: _set(p, ["state", "head.bias"], torch.zeros(3)),
     "in the model but not in the file: []; in the file but not in the model: ['head.bias']."),
], ids=["version", "format", "data-shape", "shape", "range", "scale", "bits", "zero-point", "state", "layer",
        "extra"])
def test_bad_file_raises_and_leaves_model_unchanged(exported, tmp_path, edit, message):
    path = tampered(exported[1], tmp_path, edit)
    target = fresh_cnn()
    before = state(target)
    with pytest.raises(ValueError) as err:
        load_quantized(target, path)
    assert message in str(err.value)
    assert_state_equal(target, before)


@pytest.mark.parametrize("content", [
    {"weight": torch.zeros(3)},            # some other torch file
    "make_cnn().state_dict()",             # a plain state_dict of the same model
    b"not a torch file at all",
], ids=["dict", "state_dict", "garbage"])
def test_not_an_export(tmp_path, content):
    path = tmp_path / "other.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(fresh_cnn(0).state_dict() if isinstance(content, str) else content, path)
    target = fresh_cnn()
    before = state(target)
    with pytest.raises(ValueError, match="lightning-adaround quantized export"):
        load_quantized(target, path)
    assert_state_equal(target, before)


@pytest.mark.parametrize("change", ["missing layer", "other shape"])
def test_model_that_does_not_fit(exported, change):
    from digits import make_cnn

    torch.manual_seed(0)
    if change == "missing layer":
        target = nn.Sequential(*list(make_cnn())[:-1])
        expected = "in the model but not in the file: []; in the file but not in the model: ['14.bias', '14.weight']"
    else:
        target = make_cnn()
        target[14] = nn.Linear(64, 12)
        expected = "'14.weight' has shape (10, 64) in the file but (12, 64) in the model"
    before = state(target)
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_quantized(target, exported[0])
    assert_state_equal(target, before)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "layers": {}, "state": {}, "x": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError, match="cannot read the file"):
        load_quantized(fresh_cnn(), path)


def test_export_checks_result_and_model(images, tmp_path):
    model = fresh_cnn()
    result = adaround(model, calibration(images), AdaRoundConfig(bits=4, layers=["12"], **FAST))
    with pytest.raises(TypeError, match="got NoneType"):
        export_quantized(model, None, tmp_path / "x.pt")
    other = nn.Sequential(*[nn.Identity()] * 12, nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"layer '12' has a weight of shape \(32, 64\) in the model but \(64, 64\)"):
        export_quantized(other, result, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="layer '12' of the result is not in this Linear"):
        export_quantized(nn.Linear(2, 2), result, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- ONNX


def ort_run(path, feeds, float_accuracy=True):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    if float_accuracy:  # else onnxruntime's MatMulNBits computes DequantizeLinear -> MatMul in int8
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def ort_matches(path, model, feeds, rtol=1e-4):
    """onnxruntime's output equals the PyTorch model's within ``rtol`` of the largest output."""
    got = ort_run(path, feeds)
    with torch.no_grad():
        expected = model(*feeds.values())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
    return got


@pytest.mark.parametrize("bits, granularity, symmetric", [(4, PerChannel(), True), (3, PerTensor(), False)])
def test_onnx_digits_cnn(digits_cnn, images, tmp_path, bits, granularity, symmetric):
    pytest.importorskip("onnxruntime")
    config = AdaRoundConfig(bits=bits, granularity=granularity, symmetric=symmetric, **FAST)
    result = adaround(digits_cnn, calibration(images), config)
    # From the file, as a deployment would: the loaded result is enough to write ONNX.
    export_quantized(digits_cnn, result, tmp_path / "cnn.pt")
    model = fresh_cnn()
    loaded = load_quantized(model, tmp_path / "cnn.pt")
    onnx_model = export_onnx(
        model, loaded, tmp_path / "cnn.onnx", images[1][:4], input_names=["pixels"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    assert model.training is False
    names = {init.name: init for init in onnx_model.graph.initializer}
    dq = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.output[0] for n in dq) == sorted(f"{name}.weight" for name in result.layers)
    for node in dq:
        assert node.output[0] not in names  # the float weight is gone
        q, scale, zero_point = (names[i] for i in node.input)
        assert q.data_type == (3 if symmetric else 2)  # INT8 / UINT8
        assert zero_point.data_type == q.data_type
        axis = [a.i for a in node.attribute if a.name == "axis"]
        if isinstance(granularity, PerChannel):
            assert axis == [0] and list(scale.dims) == [q.dims[0]]
        else:
            assert axis == [] and list(scale.dims) == []
    logits = ort_matches(tmp_path / "cnn.onnx", model, {"pixels": images[1]})
    assert logits.shape == (len(images[1]), 10)
    with torch.no_grad():  # the same predictions on all 360 test digits
        assert torch.equal(logits.argmax(1), model(images[1]).argmax(1))


class DigitRows(nn.Module):
    """A transformer block over a digit's 8 pixel rows: embedding, encoder layer, classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.block(self.embed(x.reshape(-1, 8, 8))).mean(1))


def test_onnx_transformer_block(images, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DigitRows().eval()
    result = adaround(model, calibration(images), AdaRoundConfig(bits=4, **FAST))
    assert {"embed", "block.linear1", "block.linear2", "head"} <= set(result.layers)
    export_onnx(model, result, tmp_path / "block.onnx", images[1][:4], input_names=["x"],
                dynamic_shapes=({0: torch.export.Dim("batch")},))
    expected = ort_matches(tmp_path / "block.onnx", model, {"x": images[1]})
    # onnxruntime's default session fuses DequantizeLinear -> MatMul into MatMulNBits, which
    # quantizes the activations to int8: close, not float-exact (docs/export.md says so).
    default = ort_run(tmp_path / "block.onnx", {"x": images[1]}, float_accuracy=False)
    assert float((default - expected).abs().max()) < 1e-2 * float(expected.abs().max())


def test_onnx_argument_checks(tmp_path, monkeypatch):
    model = nn.Linear(4, 2)
    result = AdaRoundResult()
    with pytest.raises(TypeError, match=r"export_onnx sets \['do_constant_folding'\] itself"):
        export_onnx(model, result, tmp_path / "m.onnx", torch.randn(1, 4), do_constant_folding=True)
    with pytest.raises(ValueError, match="opset_version=13 is too old; use 18 or later"):
        export_onnx(model, result, tmp_path / "m.onnx", torch.randn(1, 4), opset_version=13)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-adaround\[onnx\]'"):
        export_onnx(model, result, tmp_path / "m.onnx", torch.randn(1, 4))


# ----------------------------------------------------------------------------- A/B switching


def test_switch_between_float_and_rounded(digits_cnn, images):
    float_state = state(digits_cnn)
    with torch.no_grad():
        float_out = digits_cnn(images[1])
    # unfolded, so the float weights kept are the ones given (folded, they are the folded ones: same function)
    config = AdaRoundConfig(bits=3, keep_float_weights=True, fold_batchnorm=False, **FAST)
    result = adaround(digits_cnn, calibration(images), config)
    rounded_state = state(digits_cnn)
    with torch.no_grad():
        rounded_out = digits_cnn(images[1])
    assert not torch.equal(rounded_out, float_out)

    use_float_weights(digits_cnn, result)
    assert_state_equal(digits_cnn, float_state)
    with torch.no_grad():
        assert torch.equal(digits_cnn(images[1]), float_out)
    use_rounded_weights(digits_cnn, result)
    assert_state_equal(digits_cnn, rounded_state)

    # The float copies survive the result's state_dict (checkpoints) and load with weights_only.
    buffer = io.BytesIO()
    torch.save(result.state_dict(), buffer)
    buffer.seek(0)
    restored = AdaRoundResult.from_state_dict(torch.load(buffer, weights_only=True))
    use_float_weights(digits_cnn, restored)
    assert_state_equal(digits_cnn, float_state)


def test_switch_needs_kept_weights(digits_cnn, images):
    result = adaround(digits_cnn, calibration(images), AdaRoundConfig(bits=4, **FAST))
    assert all(layer.float_weight is None for layer in result.layers.values())
    before = state(digits_cnn)
    with pytest.raises(ValueError, match=r"keep_float_weights=True"):
        use_float_weights(digits_cnn, result)
    partial = nn.Sequential(copy.deepcopy(digits_cnn[0]))
    nn.init.zeros_(partial[0].weight)
    with pytest.raises(ValueError, match="layer '3' of the result is not in this Sequential"):
        use_rounded_weights(partial, result)
    assert not partial[0].weight.any()  # layer '0' fits, but nothing is written before all layers are checked
    assert_state_equal(digits_cnn, before)


def test_callback_forwards_keep_float_weights():
    from lightning_adaround import AdaRoundCallback, AdaRoundConfig

    assert AdaRoundCallback(config=AdaRoundConfig(keep_float_weights=True)).config.keep_float_weights is True
    assert AdaRoundCallback().config.keep_float_weights is False
