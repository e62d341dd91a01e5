"""Block reconstruction: blocks found and checked, rounded jointly, better than layer by layer."""

import copy
import csv
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, adaround, fold_batchnorm
from lightning_adaround.data.blocks import find_blocks
from lightning_adaround.data.capture import default_forward, execution_order
from lightning_adaround.model.layers import select_layers
from test_chain import Encoder, resnet, token_batches
from test_fold import InvertedResidual, SmallMobileNet

FAST = dict(iterations=60, batch_size=8, reconstruction="block")


def _blocks(model, batch, patterns=None):
    order = execution_order(model, select_layers(model), batch, default_forward)
    return {b.name: b.layers for b in find_blocks(model, patterns, order, batch, default_forward)}


class Stages(nn.Module):
    """Stages of inverted-residual blocks, as EfficientNet lays them out: a Sequential of Sequentials."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(nn.Sequential(InvertedResidual(), InvertedResidual()), InvertedResidual())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_blocks_found_in_residual_inverted_residual_and_transformer_models():
    images = torch.randn(2, 3, 8, 8)
    assert _blocks(resnet(), images) == {str(i): [f"{i}.body.0", f"{i}.body.3"] for i in (3, 4, 5)}
    assert _blocks(SmallMobileNet(), images) == {
        f"blocks.{i}": [f"blocks.{i}.expand", f"blocks.{i}.depthwise", f"blocks.{i}.project"] for i in (0, 1)
    }
    assert list(_blocks(Stages(), images)) == ["stages.0.0", "stages.0.1", "stages.1"]  # inside the stage
    encoder = _blocks(Encoder(), token_batches()[0])
    assert list(encoder) == [f"layers.{i}" for i in range(4)]
    assert encoder["layers.0"] == ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.ffn.0", "layers.0.ffn.2"]
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert _blocks(flat, images) == {}  # one layer per element: nothing to join
    assert _blocks(flat, images, ["[0:3]"]) == {"[0:3]": ["0", "2"]}
    assert _blocks(resnet(), images, ["3.body", "[0:2]"]) == {"3.body": ["3.body.0", "3.body.3"], "[0:2]": ["0"]}
    # a glob keeps its outermost matches holding a layer: "blocks.*" is each block, not also its parts
    assert list(_blocks(SmallMobileNet(), images, ["blocks.*"])) == ["blocks.0", "blocks.1"]
    assert list(_blocks(resnet(), images, ["*.body"])) == ["3.body", "4.body", "5.body"]


def _digits_setup(digits_cnn, digits):
    fold_batchnorm(digits_cnn)
    calibration = list(DataLoader(digits["train"], batch_size=64))[:6]
    return digits_cnn, calibration


def _block_output_error(model, reference, images, upto=10):
    with torch.no_grad():
        return float((model[:upto](images) - reference[:upto](images)).pow(2).mean())


def test_block_mode_beats_layer_mode_on_the_block_output(digits_cnn, digits):
    """W2 per-channel on the three convolutions of the trained digits CNN, error on held-out images.

    Both modes take the minibatch form, so only the grouping differs. (With two convolutions,
    ``[0:6]``, layer mode wins here: the second layer's own loss already is the block output.)
    """
    reference, calibration = _digits_setup(digits_cnn, digits)
    held_out = digits["test"].tensors[0]
    errors = {}
    for mode, extra in (("layer", {}), ("block", {"blocks": ["[0:10]"]})):
        model = copy.deepcopy(reference)
        result = adaround(model, calibration, AdaRoundConfig(
            bits=2, iterations=1500, reconstruction=mode, loss_form="minibatch", layers=["0", "3", "7"], **extra,
        ))
        errors[mode] = _block_output_error(model, reference, held_out)
    assert result.layers["0"].block == result.layers["7"].block == "[0:10]"
    assert result.layers["3"].loss_form == "block"
    assert result.layers["0"].adaround_mse < result.layers["0"].nearest_mse
    assert errors["block"] < 0.95 * errors["layer"], errors


def test_fisher_weighting_runs_and_differs_from_plain_mse(digits_cnn, digits):
    reference, calibration = _digits_setup(digits_cnn, digits)
    weights = {}
    for loss in ("mse", "fisher"):
        model = copy.deepcopy(reference)
        result = adaround(
            model, calibration,
            AdaRoundConfig(
                bits=2, iterations=600, reconstruction="block", blocks=["[0:6]"], block_loss=loss, layers=["0", "3"],
            ),
            task_loss=lambda output, batch: nn.functional.cross_entropy(output, batch[1]),
        )
        weights[loss] = {n: r.integer_weight for n, r in result.layers.items()}
        assert result.layers["0"].adaround_mse < result.layers["0"].nearest_mse
    assert any(not torch.equal(weights["mse"][n], weights["fisher"][n]) for n in ("0", "3"))


def test_fisher_needs_a_task_loss_that_uses_the_output():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [torch.randn(8, 8)]
    config = AdaRoundConfig(iterations=2, reconstruction="block", blocks=["[0:3]"], block_loss="fisher")
    with pytest.raises(ValueError, match="pass task_loss="):
        adaround(model, batches, config)
    with pytest.raises(ValueError, match="the Fisher weights are undefined"):
        adaround(model, batches, config, task_loss=lambda out, batch: (out * 0).sum())


def test_encoder_blocks_gather_per_sample_masks_and_carrying_changes_nothing():
    batches = token_batches(4)
    results = []
    for carry in (True, False):
        model = Encoder()
        result = adaround(model, batches, AdaRoundConfig(bits=3, carry_activations=carry, **FAST))
        results.append(result)
        assert result.layers["layers.2.v"].block == "layers.2"
    for name, layer in results[0].layers.items():
        assert torch.equal(layer.integer_weight, results[1].layers[name].integer_weight), name


class _StopAfter(AdaRoundObserver):
    def __init__(self, blocks_done):
        self.blocks_done = blocks_done

    def on_block_end(self, name, results):
        self.blocks_done -= 1
        if self.blocks_done == 0:
            raise KeyboardInterrupt


def test_interrupted_block_run_resumes_to_the_same_weights_and_failure_leaves_floats(tmp_path):
    images = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = AdaRoundConfig(bits=3, **FAST)
    reference = adaround(resnet(), images, config)
    model = resnet()
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        adaround(model, images, config, checkpoint_dir=tmp_path, observer=_StopAfter(2))
    assert all(torch.equal(v, floats[k]) for k, v in model.state_dict().items())  # nothing half written
    resumed = adaround(model, images, config, checkpoint_dir=tmp_path)
    assert set(resumed.restored) == {"0", "3.body.0", "3.body.3", "4.body.0", "4.body.3"}
    for name, layer in reference.layers.items():
        assert torch.equal(layer.integer_weight, resumed.layers[name].integer_weight), name


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale


class _Calls(nn.Module):
    def __init__(self, twice=False, scale_per_batch=False):
        super().__init__()
        self.block = _TwoInputs()
        self.twice, self.scale_per_batch = twice, scale_per_batch

    def forward(self, x):
        scale = x.sum() if self.scale_per_batch else 2.0
        y = self.block(x, scale)
        return self.block(y, scale) if self.twice else y


@pytest.mark.parametrize("problem, match", [
    (dict(blocks=["nothing*"]), "matches no module"),
    (dict(blocks=["block", "block.a"]), "overlap"),
    (dict(blocks=["block.a", "[0:2]"]), "is not an nn.Sequential"),
    (dict(blocks=["block"], model=dict(twice=True)), "is called 2 times"),
    (dict(blocks=["block"], model=dict(scale_per_batch=True)), "changes between calibration batches"),
])
def test_bad_blocks_are_refused_before_rounding_naming_the_module(problem, match):
    model = _Calls(**problem.pop("model", {}))
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match=match):
        adaround(model, batches, AdaRoundConfig(iterations=2, reconstruction="block", **problem))
    assert all(torch.equal(v, floats[k]) for k, v in model.state_dict().items())


def test_block_options_need_block_reconstruction():
    with pytest.raises(ValueError, match="add reconstruction='block'"):
        AdaRoundConfig(blocks=["features.*"])
    with pytest.raises(TypeError, match="give a list"):
        AdaRoundConfig(reconstruction="block", blocks="features.*")


def test_block_mode_without_blocks_warns_and_rounds_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="found no block"):
        result = adaround(model, [torch.randn(8, 8)], AdaRoundConfig(iterations=2, reconstruction="block"))
    assert all(r.block == "" for r in result.layers.values())


def test_callback_rounds_blocks_and_logs_per_block(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_adaround import AdaRoundCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallMobileNet()

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g))
    callback = AdaRoundCallback(
        config=AdaRoundConfig(bits=3, iterations=40, batch_size=8, reconstruction="block", block_loss="fisher",
                              log_every_n_steps=10),
        run_on="validate", task_loss=lambda out, batch: nn.functional.cross_entropy(out, batch[1]),
        calibration_data=DataLoader(data, 16), report=False,
    )
    trainer = L.Trainer(
        callbacks=[callback], logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = Module()
    trainer.validate(module, DataLoader(data, 16))
    layers = callback.result.layers
    assert layers["net.blocks.1.depthwise"].block == "net.blocks.1"
    assert {r.block for r in layers.values()} == {"", "net.blocks.0", "net.blocks.1"}
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    columns = set(rows[0])
    assert "adaround/net.blocks.0/recon_loss" in columns and "adaround/net.blocks.0/reg_loss" in columns
    assert "adaround/net.blocks.0.project/adaround_mse" in columns
    for name, layer in layers.items():  # the model holds the rounded weights
        assert torch.allclose(module.get_submodule(name).weight, layer.dequantized_weight(), atol=1e-6)


class _MaskedMixer(nn.Module):
    """A block called as ``block(x, per_sample_mask, None, shared=positions)``: HF encoder layers pass a
    literal ``None`` positionally; a shared tensor (one per model, not per sample) rides along."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, mask, unused=None, shared=None):
        assert unused is None and shared.shape == (x.shape[1], x.shape[1])
        weights = (x @ x.transpose(1, 2) + shared).masked_fill(~mask, -1e4).softmax(-1)
        return x + self.out(torch.relu(self.mix(weights @ x)))


class _MaskedNet(nn.Module):
    def __init__(self, width: int = 8, tokens: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_MaskedMixer(width), _MaskedMixer(width)])
        self.register_buffer("positions", torch.linspace(-1, 1, tokens**2).reshape(tokens, tokens))

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask, None, shared=self.positions)
        return x


def test_blocks_take_fixed_arguments_as_given_beside_per_sample_ones():
    """A positional ``None`` and a shared tensor are passed as they are, every step; only the
    per-sample mask is cached and gathered with the rows (both used to break the run)."""
    torch.manual_seed(0)
    model = _MaskedNet()
    batches = []
    for _ in range(3):
        lengths = torch.randint(2, 6, (16,))
        mask = (torch.arange(5)[None, :] < lengths[:, None])[:, None, :].expand(16, 5, 5)
        batches.append((torch.randn(16, 5, 8), mask))
    config = AdaRoundConfig(bits=3, iterations=200, batch_size=8, reconstruction="block", blocks=["blocks.*"])
    result = adaround(model, batches, config, forward_fn=lambda m, b: m(*b))
    assert [result.layers[n].block for n in ("blocks.0.mix", "blocks.1.out")] == ["blocks.0", "blocks.1"]
    errors = [(result.layers[n].adaround_mse, result.layers[n].nearest_mse) for n in ("blocks.0.mix", "blocks.1.mix")]
    assert all(ours <= nearest for ours, nearest in errors) and any(ours < nearest for ours, nearest in errors)
