"""GPTQ as a baseline for the quality benchmark (not part of the library).

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, *GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers*, ICLR 2023, arXiv:2210.17323) rounds a layer's weight one
input column at a time and pushes each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error, ``H = 2 X X^T`` (``X``:
the layer's inputs on the calibration data). This module follows the reference code,
IST-DASLab/gptq ``gptq.py`` (commit 2d65066, ``GPTQ.add_batch`` and ``GPTQ.fasterquant``):

- ``H`` summed over every calibration row the layer sees (a ``Linear``'s tokens, a
  convolution's unfolded patches, as ``nn.Unfold`` there); the reference's ``2 / nsamples``
  factor is left out, as it changes nothing (the dampening is relative to ``H``);
- dead inputs (``H[i, i] == 0``): ``H[i, i] = 1`` and the weight column set to 0;
- dampening ``1%`` of the mean diagonal, then the upper Cholesky factor of ``H^-1``;
- blocks of 128 columns, column-by-column rounding with error feedback inside a block and one
  matrix product for the columns after it (``fasterquant``'s two loops);
- act-order (columns by decreasing ``H[i, i]``) optional and off, as in the reference.

What differs, so that only the rounding differs from this library's round-to-nearest:

- The grid is fixed before rounding, from the original weights, and is the one
  ``round_to_nearest`` uses: ``lightning_adaround.api.layer_grid`` (``choose_grid``'s MSE
  search per output channel, or per group of inputs with ``PerGroup``, whose groups run along
  the same input columns as here). For groups that is the reference's ``static_groups=True``.
- Grouped and depthwise convolutions get one ``H`` per group (the reference handles only
  ``groups=1``); all groups are rounded together as a batch of small problems.
- Conv1d/2d/3d with any stride, dilation, string or non-zero padding; ``ConvTranspose`` layers
  and layers no calibration batch reaches are rounded to nearest on the same grid.
- ``H`` is accumulated and inverted in float64; the column loop runs in float32.

Layers are rounded one after another in forward order; each layer's ``H`` comes from a pass of
the calibration batches through the model whose earlier layers are already rounded (the pass
stops at the layer). With ``blocks=`` (an EfficientNet's inverted-residual blocks, a
transformer's encoder layers) a block's inputs are kept and only the block is run again for
each of its layers; the result is the same, the time much shorter. The reference rounds a
transformer block's layers together from one pass; here each sees its block-mates' rounding.
Preparation (BatchNorm folding, equalization) is done as ``config`` asks, as
``round_to_nearest`` does.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_adaround import AdaRoundConfig
from lightning_adaround.api import layer_grid
from lightning_adaround.data.capture import call_reaching
from lightning_adaround.model.layers import select_layers
from lightning_adaround.model.prepare import prepare_model
from lightning_adaround.grid.quant import QuantGrid

ForwardFn = Callable[[nn.Module, Any], Any]


class _Stop(Exception):
    """Raised by the input hook once the layer has seen a batch: the rest of the model is not needed."""


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input rows, ``(conv groups, rows, inputs per group)``: tokens of a Linear, patches of a conv."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    n = len(layer.kernel_size)
    if layer.padding == "same":
        total = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation)]
        pad = [p for t in reversed(total) for p in (t // 2, t - t // 2)]
    elif layer.padding == "valid":
        pad = [0] * (2 * n)
    else:
        pad = [p for p in reversed(layer.padding) for _ in range(2)]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, pad, mode=mode)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # a view: the window goes last
    b, c, g = x.shape[0], x.shape[1], layer.groups
    positions, window = math.prod(x.shape[2:2 + n]), math.prod(x.shape[2 + n:])
    x = x.reshape(b, g, c // g, positions, window).permute(1, 0, 3, 2, 4)
    return x.reshape(g, b * positions, c // g * window)


def collect_hessian(layer: nn.Module, model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn,
                    calls: int = 1) -> Tensor:
    """``sum X^T X`` over the layer's inputs on ``batches``, ``(groups, inputs, inputs)`` in float64.

    Each forward stops after the layer's ``calls``-th call (its calls per forward).
    """
    hessian: list[Tensor] = []
    seen = [0]

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        if not isinstance(layer, nn.Linear) and x.dim() == len(layer.kernel_size) + 1:
            x = x.unsqueeze(0)  # an unbatched conv input
        per_sample = x[:1].numel() * math.prod(getattr(layer, "kernel_size", ()))  # about one sample's patches
        chunks = x.split(max(1, 2**25 // per_sample)) if not isinstance(layer, nn.Linear) else [x]
        for chunk in chunks:  # bounds the patch copies to about 128 MB
            rows = _patches(layer, chunk)
            block = torch.bmm(rows.transpose(1, 2), rows).double()
            if hessian:
                hessian[0] += block
            else:
                hessian.append(block)
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            seen[0] = 0
            try:
                forward_fn(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hessian[0]


def gptq_round(weight: Tensor, hessian: Tensor, grid: QuantGrid, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = False) -> Tensor:
    """GPTQ-rounded ``weight`` (same shape and dtype), on ``grid``; ``hessian``: ``(conv groups, inputs, inputs)``."""
    groups, columns = hessian.shape[0], hessian.shape[-1]
    scale, zero = grid.broadcastable(weight.shape)
    split = lambda t: t.expand_as(weight).float().reshape(groups, -1, columns).clone()  # noqa: E731
    W, S, Z = split(weight.detach()), split(scale), split(zero)
    H = hessian.clone()
    diagonal = H.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1
    W.masked_fill_(dead.unsqueeze(1), 0)
    if act_order:
        perm = torch.argsort(diagonal, dim=-1, descending=True)
        cols = perm.unsqueeze(1).expand_as(W)
        W, S, Z = W.gather(2, cols), S.gather(2, cols), Z.gather(2, cols)
        H = H.gather(1, perm.unsqueeze(2).expand_as(H)).gather(2, perm.unsqueeze(1).expand_as(H))
        diagonal = H.diagonal(dim1=-2, dim2=-1)
    diagonal += percdamp * diagonal.mean(-1, keepdim=True)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Err1, Hinv1 = W[:, :, i1:i2].clone(), torch.zeros_like(W[:, :, i1:i2]), Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, s, z = W1[:, :, i], S[:, :, i1 + i], Z[:, :, i1 + i]
            q = (torch.clamp(torch.round(w / s) + z, grid.qmin, grid.qmax) - z) * s  # QuantGrid.fake_quantize
            Q[:, :, i1 + i] = q
            err = (w - q) / Hinv1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
            Err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=-1).unsqueeze(1).expand_as(Q))
    return Q.reshape(weight.shape).to(weight.dtype)


def _call_counts(model: nn.Module, layers: list[tuple[str, nn.Module]], batch: Any, forward_fn: ForwardFn) -> dict[str, int]:
    """Calls per forward of each layer, in the order of first call (one pass over ``batch``)."""
    counts: dict[str, int] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
               for name, layer in layers]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _is_chain(model: nn.Module, blocks: list[nn.Module], batch: Any, forward_fn: ForwardFn) -> bool:
    """Whether each block's input is the previous block's output with the same other arguments (one pass)."""
    last: dict[str, Any] = {}
    verdicts: list[bool] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if "out" in last:
            verdicts.append(bool(args) and _same(last["out"], args[0]) and _same(last["rest"], (args[1:], kwargs)))

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        last.update(out=_first(output), rest=(args[1:], kwargs))

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before, with_kwargs=True),
                                           b.register_forward_hook(after, with_kwargs=True))]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return len(verdicts) == len(blocks) - 1 and all(verdicts)


def block_inputs(block: nn.Module, model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn) -> list[Any]:
    """``(args, kwargs)`` of ``block``'s first call in each batch's forward (which stops there)."""
    return [call for batch in batches if (call := call_reaching(model, block, batch, forward_fn)) is not None]


def _run_block(block: nn.Module, inputs: Any) -> Any:
    return block(*inputs[0], **inputs[1])


@torch.no_grad()
def gptq(model: nn.Module, batches: list[Any], config: Optional[AdaRoundConfig] = None, *,
         forward_fn: Optional[ForwardFn] = None, blocks: Iterable[str] = (),
         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False) -> dict[str, str]:
    """Round ``model``'s layers in place with GPTQ on ``config``'s grid; layer name -> ``"gptq"`` or ``"nearest"``.

    The layers, bits and grid are ``round_to_nearest(model, config)``'s (``scale_method`` ``"mse"``
    or ``"minmax"``; any granularity, ``PerGroup`` included).
    ``blocks`` (module names, each called once per forward) only saves time: a block's inputs are
    captured once (or, when the blocks form a chain, computed from the previous block's) and its
    layers' inputs come from running the block alone, not the whole model up to the layer.
    """
    config = config if config is not None else AdaRoundConfig()
    if config.scale_method == "output":
        raise ValueError("gptq, like round_to_nearest, chooses the grid without data: use scale_method 'mse' or 'minmax'.")
    forward_fn = forward_fn or (lambda m, b: m(b))
    with torch.inference_mode(False):
        prepare_model(model, config)
    layers = select_layers(model, config.layers, config.exclude, config.layer_types)
    counts = _call_counts(model, layers, batches[0], forward_fn)
    order = sorted(layers, key=lambda item: list(counts).index(item[0]) if item[0] in counts else len(counts))
    blocks = list(blocks)
    modules = dict(model.named_modules())
    chain = len(blocks) > 1 and _is_chain(model, [modules[b] for b in blocks], batches[0], forward_fn)
    block_of = {name: b for name, _ in layers for b in blocks if name.startswith(b + ".")}
    current, inputs = None, None
    how = {}
    for name, layer in order:
        grid = layer_grid(name, layer, layer.weight.detach().float(), config)
        if name not in counts or getattr(layer, "transposed", False):
            layer.weight.copy_(grid.fake_quantize(layer.weight.float()).to(layer.weight.dtype))
            how[name] = "nearest"
            continue
        block = block_of.get(name)
        if block is None:  # the whole model, stopped at the layer
            hessian = collect_hessian(layer, model, batches, forward_fn, counts[name])
        else:
            if block != current:
                follows = chain and current is not None and blocks.index(block) == blocks.index(current) + 1
                inputs = ([((_first(_run_block(modules[current], i)), *i[0][1:]), i[1]) for i in inputs] if follows
                          else block_inputs(modules[block], model, batches, forward_fn))
                current = block
            hessian = collect_hessian(layer, modules[block], inputs, _run_block, counts[name])
        layer.weight.copy_(gptq_round(layer.weight, hessian, grid, block_size, percdamp, act_order))
        how[name] = "gptq"
    return how
