"""Empirical bias correction: after rounding, each rounded layer's mean output error moves into its bias.

Rounding shifts a layer's mean output per output channel, and every later layer inherits the
shift. Measured on the calibration data, layer by layer in execution order: the layer's mean
output in the float model minus its mean output in the model whose earlier layers are already
rounded and corrected. ``bias_correction=True`` applies that shift on every channel;
``"auto"`` estimates it on the training samples and keeps it only on the channels where it
lowers the layer's output error on the held-out samples (see :func:`correct_biases`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_adaround.data.calibration import held_rows
from lightning_adaround.data.capture import InputCapture, float_weights
from lightning_adaround.model.layers import following_ops
from lightning_adaround.engine.reducer import Reducer
from lightning_adaround.result import AdaRoundResult

MakeCapture = Callable[[], InputCapture]
MODES = (False, True, "auto")  # the values of ``AdaRoundConfig.bias_correction``


def following_batchnorm(model: nn.Module, name: str) -> Optional[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm with running statistics right after layer ``name`` in an ``nn.Sequential``, if any."""
    ops = following_ops(model, name)
    batchnorm = ops.batchnorm if ops is not None else None
    if batchnorm is None or getattr(batchnorm, "running_mean", None) is None:
        return None
    return batchnorm


def _output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _held_rows(held_out: Optional[Sequence[Tensor]], sizes: Sequence[int], index: int, rows: int) -> Tensor:
    """Which of a call's ``rows`` input rows (on batch ``index``) belong to held-out samples.

    As in reconstruction: rows follow their sample when the first dim is a whole number of rows
    per sample; otherwise (or without held-out masks) none of the call's rows is held out.
    """
    held = None if held_out is None or index >= len(held_out) else held_rows(held_out[index], sizes[index], rows)
    return torch.zeros(rows, dtype=torch.bool) if held is None else held


def _output_sums(
    layer: nn.Module, capture: InputCapture, name: str, device: torch.device,
    held_out: Optional[Sequence[Tensor]] = None, sizes: Sequence[int] = (),
) -> Tensor:
    """``[sums per channel, count]`` of ``layer``'s output over the training positions, then the same over
    the held-out positions (the rows of the held-out samples; none without ``held_out``)."""
    channels = _output_channels(layer)
    sums = torch.zeros(2, channels + 1, dtype=torch.float64, device=device)
    for index, calls in capture.batch_inputs(name, layer):
        for inputs in calls:  # one call at a time: its first dim tells which rows are held out
            output = layer(inputs.to(device))
            output = output.unsqueeze(0) if output.dim() == 1 else output
            rows = output.shape[0]
            if isinstance(layer, nn.Linear):
                per_row = output.reshape(rows, -1, channels).sum(dim=1, dtype=torch.float64)
            else:
                per_row = output.reshape(rows, channels, -1).sum(dim=2, dtype=torch.float64)
            positions = output.numel() // max(rows * channels, 1)
            held = _held_rows(held_out, sizes, index, rows).to(device)
            for part, chosen in ((0, ~held), (1, held)):
                sums[part, :-1] += per_row[chosen].sum(dim=0)
                sums[part, -1] += int(chosen.sum()) * positions
    return sums.flatten()


def _means(model: nn.Module, names: list[str], capture: InputCapture, device: torch.device,
           reducer: Reducer, held_out: Optional[Sequence[Tensor]], sizes: Sequence[int],
           on_layer: Optional[Callable[[str, Tensor], None]] = None,
           ) -> dict[str, Tensor]:
    """Per layer of ``model`` as it is (``on_layer`` may change it in between): its output sums over the
    training and the held-out positions of every process, as ``(2, channels + 1)`` (count last)."""
    found: dict[str, Tensor] = {}
    for name in names:
        layer = model.get_submodule(name)
        reducer.where = f"correcting the bias of layer {name!r}"
        totals = _output_sums(layer, capture, name, device, held_out, sizes)
        reducer.sum([totals], reducer.where, finite=True)  # every process's sums
        found[name] = totals.view(2, -1)
        if on_layer is not None:
            on_layer(name, found[name])
    return found


def _mean(sums: Tensor) -> Optional[Tensor]:
    """Per channel the mean of ``sums`` rows ``[sums..., count]`` taken together; ``None`` without a count."""
    total = sums.sum(dim=0) if sums.dim() == 2 else sums
    return total[:-1] / total[-1] if float(total[-1]) > 0 else None


def judge(target: Tensor, found: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, kept, held-out mean error)`` for ``"auto"`` from both models' sums (see :func:`correct_biases`).

    ``target``/``found``: the float and the rounded model's ``(2, channels + 1)`` sums, training
    row then held-out row. ``shift``: the training mean error where it lowers the held-out
    error (``shift**2 - 2 * shift * m < 0``), zero elsewhere.
    """
    delta = target[0, :-1] / target[0, -1] - found[0, :-1] / found[0, -1]
    m = target[1, :-1] / target[1, -1] - found[1, :-1] / found[1, -1]
    kept = delta * delta - 2 * delta * m < 0
    return torch.where(kept, delta, torch.zeros_like(delta)), kept, m


@torch.no_grad()
def correct_biases(
    model: nn.Module,
    result: AdaRoundResult,
    make_capture: MakeCapture,
    float_weight_of: dict[str, Tensor],
    device: torch.device,
    reducer: Optional[Reducer] = None,
    mode: Union[bool, str] = True,
    held_out: Optional[Sequence[Tensor]] = None,
    sizes: Sequence[int] = (),
) -> None:
    """Add each rounded layer's mean output error to its bias, in place; record it in ``result``.

    Two passes over the calibration data, each with a fresh capture from ``make_capture``: the
    float model's mean outputs (the float weights put back for the pass), then, layer after
    layer, the rounded model's, each layer corrected before the next one is measured. A layer
    without a bias gets no new parameter: when a BatchNorm with running statistics follows it
    (as after every ``bias=False`` convolution of a folded network), the shift goes into that
    BatchNorm's ``running_mean``, which is exact in eval mode; otherwise it is only recorded
    (``bias_corrected`` False).

    Why the float model's output and not the float weight on the rounded model's input:
    AdaRound fits each rounded layer to the float model's output (asymmetric reconstruction),
    so its rounding already offsets part of the error it inherits; measuring against the float
    weight on the rounded input would undo that (on the digits CNN it doubled the output error).

    ``mode=True``: the shift is the mean error over all calibration samples, on every channel.
    ``mode="auto"``: judged on the run's held-out samples (``held_out``: per local batch, which
    samples; ``sizes``: samples per local batch). The shift ``delta_c`` is the mean error on the
    training samples only; ``m_c`` is the mean error on the held-out ones. Adding ``delta_c`` to
    channel ``c`` turns each held-out error ``e`` into ``e - delta_c``, so the channel's held-out
    mean squared error changes by exactly ``delta_c**2 - 2 * delta_c * m_c`` (its variance part
    does not move). The decision is per output channel because it is exact per channel: a
    channel's bias moves only that channel's output, so the layer's held-out output MSE, the
    mean over channels, is lowest with the shift kept on precisely the channels where that
    change is negative (``m_c / delta_c > 1/2``: the held-out samples confirm the direction and
    at least half the size). Choosing among channels on the same held-out samples that judge
    them flatters the reported gain a little; where the true shift is near zero, a kept shift
    is as small as the noise in ``delta_c``, so the harm it can do is of that size. Later
    layers are measured with this layer's decision in place, as with ``True``. Where no row of
    the layer is held out (``holdout_fraction=0``, too few samples, or input rows that are not
    per sample), the layer falls back to ``True``'s shift on every channel, and its note says so.
    ``LayerResult.bias_shift`` holds the shift applied (zero on channels left alone), and the
    note the decision: the channels kept, and the held-out squared mean error ``mean_c(m_c**2)``
    before and ``mean_c((m_c - shift_c)**2)`` after, the part of the layer's held-out output MSE
    a bias can change (the rest, the error's variance, is the same before and after).
    """
    if mode not in MODES or not isinstance(mode, (bool, str)):
        raise ValueError(f"bias correction mode {mode!r}: expected one of {MODES}")
    reducer = reducer if reducer is not None else Reducer()
    judged = mode == "auto"
    names = list(result.layers)
    layers = {name: model.get_submodule(name) for name in names}
    weights = {name: float_weight_of[name].to(device=device, dtype=layers[name].weight.dtype) for name in names}
    masks = held_out if judged else None  # True: every sample counts as training
    with float_weights(layers, weights):
        targets = _means(model, names, make_capture(), device, reducer, masks, sizes)
    unjudged: list[str] = []

    def correct(name: str, found: Tensor) -> None:
        layer, target = layers[name], targets[name]
        everywhere, mean = _mean(target), _mean(found)
        if everywhere is None or mean is None:  # never reached
            return
        note = ""
        shift = everywhere - mean
        batchnorm = following_batchnorm(model, name)
        applies = layer.bias is not None or batchnorm is not None
        if judged and float(target[1, -1]) > 0 and float(target[0, -1]) > 0:
            shift, kept, m = judge(target, found)
            before, after = float((m * m).mean()), float(((m - shift) ** 2).mean())
            where = f"{int(kept.sum())}/{kept.numel()} channels"
            if not applies:
                note = f"bias correction would keep {where} (only reported: no bias)"
            elif bool(kept.any()):
                note = f"bias corrected on {where} (held-out squared mean error {before:.2e} -> {after:.2e})"
            else:
                note = f"bias left alone: no channel's held-out error fell (held-out squared mean error {before:.2e})"
        elif judged:
            unjudged.append(name)
            note = "bias corrected on every channel, not judged: no held-out rows"
        if layer.bias is not None:
            layer.bias.add_(shift.to(device=layer.bias.device, dtype=layer.bias.dtype))
        elif batchnorm is not None:  # eval-mode BN(y + shift) == BN(y) with running_mean - shift
            batchnorm.running_mean.sub_(shift.to(device=batchnorm.running_mean.device, dtype=batchnorm.running_mean.dtype))
        record = result.layers[name]
        record.bias_shift = shift.float().cpu()
        record.bias_corrected = applies
        record.note = "; ".join(filter(None, [record.note, note]))

    _means(model, names, make_capture(), device, reducer, masks, sizes, on_layer=correct)
    if unjudged and reducer.is_main:
        warnings.warn(
            f"bias_correction='auto' found no held-out rows for {len(unjudged)} layer(s) ({unjudged[:4]}"
            f"{'...' if len(unjudged) > 4 else ''}): they are corrected on every channel, as with "
            "bias_correction=True. Hold samples out with holdout_fraction > 0 (and inputs whose first "
            "dim is the batch) to have each correction judged.",
            stacklevel=4,
        )
